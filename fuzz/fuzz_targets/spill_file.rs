//! Spill files on disk may be torn, foreign or hostile: indexing (header only) and
//! loading must return an error for anything that is not a valid file for this model,
//! never panic or allocate without bound.
#![no_main]

use candela::kv::{spill, CacheLayout, KvDtype};
use candle_core::Device;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("candela-fuzz-spill-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("s.kv.safetensors");
    std::fs::write(&path, data).unwrap();
    let _ = spill::read_meta(&path);
    for dtype in KvDtype::ALL {
        let layout = CacheLayout {
            n_layers: 2,
            n_kv_heads: 1,
            head_dim: 4,
            dtype,
        };
        let _ = spill::read(&path, layout, &Device::Cpu, "fp");
    }
});
