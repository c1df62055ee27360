//! `candela plan` figures for the real default model.

mod common;

#[test]
fn plan_figures_for_the_default_model() {
    let gguf = common::model_path();
    let budget = 1u64 << 30;
    let p =
        candela::engine::plan::plan(&gguf, "smollm2", "f16", budget, 4096, (24 << 30, 20 << 30))
            .unwrap();
    // 2 (K and V) x 30 layers x 3 KV heads x 64 dims x 2 bytes.
    assert_eq!(p.bytes_per_token, 23_040.0);
    assert_eq!(p.tokens_fit, budget / 23_040);
    assert_eq!(p.sessions_fit, budget / (23_040 * 4096));
    // The tensors' own sizes add up to a bit less than the file.
    let file = std::fs::metadata(&gguf).unwrap().len();
    assert!(
        p.weight_bytes < file && p.weight_bytes > file * 9 / 10,
        "{} vs {file}",
        p.weight_bytes
    );
    let q8 = candela::engine::plan::plan(&gguf, "smollm2", "q8_0", budget, 4096, (0, 0)).unwrap();
    assert!((q8.bytes_per_token - 23_040.0 * 1.0625 / 2.0).abs() < 1e-6);
    let text = q8.render();
    assert!(
        text.contains("SHORT"),
        "no RAM must be reported as short: {text}"
    );
    assert!(p.render().contains("left"));
}
