//! With the `cuda` feature, compile the fused decode kernels (src/engine/model/cuda/decode.cu)
//! and the prefill attention (flash.cu) to PTX with nvcc (`NVCC`, else
//! `$CUDA_ROOT/bin/nvcc`, else `nvcc` on PATH) for `CUDA_COMPUTE_CAP` (default 61: dp4a is
//! the newest instruction the decode kernels use; the attention's tensor-core code needs 80
//! and is left out below that; the driver compiles the PTX for the card at load). The
//! default build does nothing here.

// A build script reports a failure by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=src/engine/model/cuda/batch.cuh");
    println!("cargo:rerun-if-changed=src/engine/model/cuda/prefill.cuh");
    println!("cargo:rerun-if-changed=src/engine/model/cuda/tc.cuh");
    println!("cargo:rerun-if-changed=src/engine/model/cuda/sum8.cuh");
    println!("cargo:rerun-if-changed=src/engine/model/cuda/mma.cuh");
    println!("cargo:rerun-if-changed=src/engine/model/cuda/attn.cuh");
    println!("cargo:rerun-if-changed=src/engine/model/cuda/attn_tc.cuh");
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| {
            ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"]
                .iter()
                .filter_map(std::env::var_os)
                .map(|r| PathBuf::from(r).join("bin/nvcc"))
                .find(|p| p.exists())
        })
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "61".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    for (src, ptx) in [
        ("src/engine/model/cuda/decode.cu", "decode.ptx"),
        ("src/engine/model/cuda/flash.cu", "flash.ptx"),
    ] {
        println!("cargo:rerun-if-changed={src}");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(src)
            .arg("-o")
            .arg(out_dir.join(ptx))
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "running {}: {e} (the cuda feature needs nvcc)",
                    nvcc.display()
                )
            });
        assert!(status.success(), "nvcc failed on {src}");
    }
}
