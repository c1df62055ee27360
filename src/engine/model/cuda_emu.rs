//! Host emulation tests of CUDA kernels, for CI without a GPU: `cuda/attn_tc_emu.cpp`
//! compiles the tensor-core decode attention's own source (attn.cuh, attn_tc.cuh) with
//! CUDA's built-ins emulated (threads, warp shuffles, m16n8k16 fragments) and checks it
//! against a double-precision reference and batched against single-stream. Test-only;
//! needs a C++20 compiler (`$CXX`, else `c++`), not a GPU or the `cuda` feature.

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;

    #[test]
    fn tensor_core_decode_attention_in_host_emulation() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine/model/cuda");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let exe = std::env::temp_dir().join(format!("candela-attn-tc-emu-{}", std::process::id()));
        let built = Command::new(&cxx)
            .args([
                "-std=c++20",
                "-O2",
                "-ffp-contract=off",
                "-fno-strict-aliasing",
                "-pthread",
            ])
            .arg(dir.join("attn_tc_emu.cpp"))
            .arg("-o")
            .arg(&exe)
            .output()
            .unwrap_or_else(|e| panic!("running {cxx} (a C++20 compiler is needed): {e}"));
        assert!(
            built.status.success(),
            "{cxx} failed:\n{}",
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
}
