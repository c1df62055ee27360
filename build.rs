//! With the `cuda` feature, compile the fused decode kernels (src/engine/model/cuda/decode.cu)
//! and the prefill attention (flash.cu) to PTX with nvcc (`NVCC`, else
//! `$CUDA_ROOT/bin/nvcc`, else `nvcc` on PATH) for the compute capability that candle's own
//! kernels are built for: `CUDA_COMPUTE_CAP`, else the first card `nvidia-smi` lists
//! (cudaforge's detection, which candle-kernels uses, so both agree). The decode kernels need
//! 6.1 (dp4a); the tensor-core code needs 8.0 and is left out below that; the driver
//! compiles the PTX for the card at load, so a build for 8.0 runs on any later card too.
//! The default build does nothing here.

// A build script reports a failure by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    kernels();
}

/// The kernels' PTX into OUT_DIR.
#[cfg(feature = "cuda")]
fn kernels() {
    use std::path::PathBuf;
    use std::process::Command;

    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
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
    let cap = compute_cap();
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

/// The compute capability to build for, as candle-kernels detects it.
#[cfg(feature = "cuda")]
fn compute_cap() -> usize {
    let cap = match cudaforge::detect_compute_cap() {
        Ok(arch) => arch.base(),
        Err(e) => panic!(
            "the cuda feature needs the card's compute capability: {e} \
             (set CUDA_COMPUTE_CAP, e.g. 90 for H100/H200, 89 for RTX 40xx, 86 for RTX 30xx)"
        ),
    };
    assert!(
        cap >= 61,
        "CUDA_COMPUTE_CAP {cap}: candela's CUDA kernels need compute capability 6.1 or later"
    );
    cap
}
