//! Decode control: choosing each next token. Sampling (penalties, temperature, top-k,
//! top-p, min-p, logprobs), JSON grammars compiled from a schema, and the constraint
//! that masks the logits so the output follows its grammar.
//!
//! Works on host logits and token bytes only; knows nothing of the model or the worker.

pub mod constrain;
pub mod grammar;
pub mod sampling;
