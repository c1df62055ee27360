//! The small synthetic GGUFs of every architecture beyond llama and qwen2, written by
//! `tests/fixtures/synth/gen_synth.py` into the test data dir when missing, and the
//! llama.cpp references made from them (`tests/fixtures/synth/ref_<name>.json`).

use std::path::PathBuf;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

pub const NAMES: &[&str] = &[
    "qwen3",
    "qwen3moe",
    "gemma3",
    "llama-rope-llama3",
    "llama-rope-linear",
    "llama-rope-yarn",
];

pub fn fixture(name: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/synth")
        .join(format!("ref_{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn sha256(path: &std::path::Path) -> String {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(path).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

/// The synthetic files, written once per data dir by the generator (the `gguf` and
/// `numpy` Python packages) and checked against the sha256 the fixtures were made from.
pub fn dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = super::data_dir().join("synth");
        let fresh = |n: &str| {
            let p = dir.join(format!("{n}.gguf"));
            p.exists() && sha256(&p) == fixture(n)["gguf_sha256"].as_str().unwrap()
        };
        if !NAMES.iter().all(|n| fresh(n)) {
            let out = std::process::Command::new(super::python())
                .arg(
                    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                        .join("tests/fixtures/synth/gen_synth.py"),
                )
                .arg(&dir)
                .arg("--tokenizer-from")
                .arg(super::model_path())
                .output()
                .expect("run gen_synth.py");
            assert!(
                out.status.success(),
                "gen_synth.py failed (needs `pip install gguf==0.19.0 numpy`): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for n in NAMES {
            assert!(
                fresh(n),
                "{n}.gguf differs from the file its fixture was made from"
            );
        }
        dir
    })
    .clone()
}

/// Path of the synthetic GGUF `name`.
pub fn path(name: &str) -> PathBuf {
    dir().join(format!("{name}.gguf"))
}
