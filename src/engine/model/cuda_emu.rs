//! Host emulation tests of the CUDA kernels, for CI without a GPU: each `cuda/*_emu.cpp`
//! compiles the kernels' own sources (decode.cu and its headers, flash.cu) with CUDA's
//! built-ins emulated (`cuda/emu.h`: a block's threads as threads, warp shuffles and
//! tensor-core fragments exchanged in the PTX layouts) and checks an invariant of the fused
//! path: the decode attention kernels (tensor-core, per head, grouped) against a
//! double-precision reference and batched against single-stream (`attn_emu.cpp`); every
//! batched projection kernel against the single-stream mat-vec bit for bit, in the default
//! order (`batched_emu.cpp`) and in eight parts (`sum8_emu.cpp`); the prefill flash
//! attention (flash.cu) against a double-precision causal softmax, windows and ring caches
//! included (`flash_emu.cpp`); the wide prefill's kernels (int8 GEMMs, f16
//! dequantization, RMS-normed f16 rows, SwiGLU, bias, RoPE) against the mat-vec row by row
//! (`wide_emu.cpp`). Test-only; needs a C++20 compiler with `_Float16` (`$CXX`, else
//! `c++`), not a GPU or the `cuda` feature.

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;

    /// Compile `cuda/<name>.cpp` and run it; its output on failure.
    fn emulate(name: &str) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine/model/cuda");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let exe = std::env::temp_dir().join(format!("candela-{name}-{}", std::process::id()));
        let built = Command::new(&cxx)
            .args([
                "-std=c++20",
                "-O1",
                "-ffp-contract=off",
                "-fno-strict-aliasing",
            ])
            .args(["-pthread", "-Wno-unknown-pragmas"])
            .arg(dir.join(format!("{name}.cpp")))
            .arg("-o")
            .arg(&exe)
            .output()
            .unwrap_or_else(|e| panic!("running {cxx} (a C++20 compiler is needed): {e}"));
        assert!(
            built.status.success(),
            "{cxx} failed on {name}.cpp:\n{}",
            String::from_utf8_lossy(&built.stderr)
        );
        let run = Command::new(&exe).output();
        let _ = std::fs::remove_file(&exe);
        let run = run.expect("running the emulation");
        assert!(
            run.status.success(),
            "{}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
    }

    #[test]
    fn decode_attention_in_host_emulation() {
        emulate("attn_emu");
    }

    #[test]
    fn batched_projections_equal_single_stream_in_host_emulation() {
        emulate("batched_emu");
    }

    #[test]
    fn eight_part_projections_batched_equal_single_stream_in_host_emulation() {
        emulate("sum8_emu");
    }

    #[test]
    fn prefill_flash_attention_in_host_emulation() {
        emulate("flash_emu");
    }

    #[test]
    fn wide_prefill_rows_equal_the_mat_vec_in_host_emulation() {
        emulate("wide_emu");
    }
}
