//! Text in and out of the model: the tokenizer and the streaming detokenizer, the chat
//! template, stop strings.
//!
//! Depends on nothing else in the engine but its error type (and `model::hf` for the
//! JSON files of a Hugging Face directory).

pub mod spm;
pub mod stop;
pub mod template;
pub mod tokenizer;
