//! Our CPU kernels, where candle's generic ones are slower or round differently from
//! llama.cpp: quantized matrix products per GGUF format and instruction-set level
//! ([`quant`]), and attention over an f16 cache ([`attn`]). Each is bit-exact with its
//! portable reference.
//!
//! A leaf of the engine: it knows nothing of models, caches or requests.

pub mod attn;
pub mod quant;
