//! Our CPU kernels, where candle's generic ones are slower or round differently from
//! llama.cpp: quantized matrix products per GGUF format and instruction-set level
//! ([`quant`]), and attention over an f16 cache ([`attn`]). Each is bit-exact with its
//! portable reference.
//!
//! A leaf of the engine: it knows nothing of models, caches or requests.

pub mod attn;
pub mod quant;

/// The kernel levels this process runs, e.g. `quant=Avx512Vnni attention=Avx512` (after
/// the `CANDELA_ISA` / `CANDELA_ATTN_PATH` caps), for the start-up log and benchmarks.
pub fn describe() -> String {
    format!("quant={:?} attention={}", quant::isa(), attn::level_name())
}
