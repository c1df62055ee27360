//! `candela plan` figures for the real default model.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candela::kv::KvDtype;

#[test]
fn plan_figures_for_the_default_model() {
    let gguf = common::model_path();
    let budget = 1u64 << 30;
    let p = candela::cli::plan::plan(
        &gguf,
        "smollm2",
        KvDtype::F16,
        budget,
        4096,
        (24 << 30, 20 << 30),
    )
    .unwrap();
    // 2 (K and V) x 30 layers x 3 KV heads x 64 dims x 2 bytes.
    assert_eq!(p.bytes_per_token, 23_040);
    assert_eq!(p.tokens_fit, budget / 23_040);
    assert_eq!(p.sessions_fit, budget / (23_040 * 4096));
    // The tensors' own sizes add up to a bit less than the file.
    let file = std::fs::metadata(&gguf).unwrap().len();
    assert!(
        p.weight_bytes < file && p.weight_bytes > file * 9 / 10,
        "{} vs {file}",
        p.weight_bytes
    );
    let q8 =
        candela::cli::plan::plan(&gguf, "smollm2", KvDtype::Q8_0, budget, 4096, (0, 0)).unwrap();
    // 8-bit values plus one f16 scale per 32: 34 bytes per 32 values.
    assert_eq!(q8.bytes_per_token, 23_040 / 2 * 34 / 32);
    assert_eq!(q8.tokens_fit, budget / 12_240);
    // Every dtype is listed with its own size.
    let listed = p.render();
    for (d, bytes) in [
        ("f32", 46_080),
        ("f16", 23_040),
        ("bf16", 23_040),
        ("q8_0", 12_240),
    ] {
        assert!(listed.contains(&format!("{d} {bytes}")), "{d}: {listed}");
    }
    let text = q8.render();
    assert!(
        text.contains("SHORT"),
        "no RAM must be reported as short: {text}"
    );
    assert!(p.render().contains("left"));
    // On a CUDA card a long prompt prefills wide (every projection Q4_1): passes of up to
    // 1,024 rows hold the residual stream, Q|K|V, roped Q and the attention output in f32
    // (1,024 x (576 + 960 + 576 + 576) x 4), the step buffer (1 + 1,024 x 63 words), the
    // f16 input rows (1,024 x 1,536 x 2), the dequantized gate|up (3,072 x 576 x 2), the
    // gate|up output in f32 (1,024 x 3,072 x 4), SwiGLU's in f16 (1,024 x 1,536 x 2)
    // and cuBLAS's workspace (32 MiB).
    assert_eq!(
        p.gpu_scratch,
        11_010_048 + 516_104 + 3_145_728 + 3_538_944 + 12_582_912 + 3_145_728 + (32 << 20)
    );
    let gpu = candela::cli::plan::GpuMemory {
        total: 8 << 30,
        free: 4 << 30,
        source: "given",
    };
    let t = p.tiers(gpu, candela::kv::store::tiers::DeviceBudget::Share(0.5), 0);
    assert_eq!(
        t.free_after_weights,
        (4 << 30) - p.weight_bytes - p.gpu_scratch
    );
    let text = t.render(4096, p.session_bytes);
    assert!(
        text.contains("MiB of long-prompt prefill buffers"),
        "{text}"
    );
}
