//! Spill files: one session's cache as safetensors (`k.{layer}`, `v.{layer}`, `tokens`)
//! plus metadata (format version, model fingerprint, dtype, session id, counters), and
//! beside it, when the session carries notes (opaque strings the API attaches to a
//! session, such as stored responses), a `.notes.json` sidecar. Both are written
//! crash-safe (temp file, fsync, rename, fsync of the directory) and readable only by
//! the owner. Reading checks everything before a tensor is trusted: a torn, corrupt or
//! foreign file is an error, never a panic. A cache file without a sidecar (older
//! files, sessions without notes) has no notes.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::{CacheLayout, SeqCache};

pub const FORMAT: &str = "candela-kv-1";
/// Refuse headers larger than this (a corrupt length field must not allocate gigabytes).
const MAX_HEADER: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    #[error("{path}: {msg}")]
    Bad { path: String, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn bad(path: &Path, msg: impl Into<String>) -> SpillError {
    SpillError::Bad {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SpillError + '_ {
    move |source| SpillError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What a spill file says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct SpillMeta {
    pub session: String,
    pub fingerprint: String,
    pub tokens: usize,
    pub created: u64,
    pub hits: u64,
    /// Turns the session has had (across replicas on a shared spill dir): a replica
    /// holding an older generation in memory reads the newer file instead. 0 in files
    /// written without it.
    pub generation: u64,
}

/// File name for a session id (ids are restricted to `[A-Za-z0-9-_.:@]` by the API;
/// anything else is hex-escaped so a name can never leave the directory).
pub fn file_name(session: &str) -> String {
    let safe: String = session
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => (b as char).to_string(),
            other => format!("%{other:02x}"),
        })
        .collect();
    format!("{safe}.kv.safetensors")
}

/// A name beside `path` that no other writer uses, even on a directory shared by
/// several processes (it ends in `.tmp`, so a dead writer's leftovers are recognised).
pub(crate) fn private_name(path: &Path) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Write `bytes` to `path` crash-safe: a private temp file, fsync, rename, fsync of the
/// directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SpillError> {
    let tmp = private_name(path);
    {
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).map_err(io(&tmp))?;
        let written = f.write_all(bytes).and_then(|_| f.sync_all());
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io(&tmp)(e));
        }
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io(path)(e));
    }
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The notes sidecar of a cache file (`x.kv.safetensors` → `x.notes.json`).
pub fn notes_path(cache_file: &Path) -> PathBuf {
    let name = cache_file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".kv.safetensors").unwrap_or(&name);
    cache_file.with_file_name(format!("{stem}.notes.json"))
}

/// Largest notes sidecar read back (a corrupt file must not allocate without bound).
const MAX_NOTES: u64 = 256 << 20;

/// Write (or, for no notes, remove) the notes sidecar of `cache_file`.
pub fn write_notes(cache_file: &Path, notes: &BTreeMap<String, String>) -> Result<(), SpillError> {
    let path = notes_path(cache_file);
    if notes.is_empty() {
        return match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&path)(e)),
            _ => Ok(()),
        };
    }
    let bytes = serde_json::to_vec(notes).map_err(|e| bad(&path, e.to_string()))?;
    write_atomic(&path, &bytes)
}

/// The notes beside `cache_file` (none without a sidecar).
pub fn read_notes(cache_file: &Path) -> Result<BTreeMap<String, String>, SpillError> {
    let path = notes_path(cache_file);
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(io(&path)(e)),
    };
    let len = f.metadata().map_err(io(&path))?.len();
    if len > MAX_NOTES {
        return Err(bad(
            &path,
            format!("notes file of {len} bytes is too large"),
        ));
    }
    let mut text = Vec::with_capacity(len as usize);
    f.take(MAX_NOTES)
        .read_to_end(&mut text)
        .map_err(io(&path))?;
    serde_json::from_slice(&text).map_err(|e| bad(&path, format!("notes: {e}")))
}

/// Remove a cache file and its notes sidecar.
pub fn remove(cache_file: &Path) {
    let _ = fs::remove_file(cache_file);
    let _ = fs::remove_file(notes_path(cache_file));
}

/// Write `cache` for `meta.session` into `dir`; returns the path and its size in bytes.
pub fn write(dir: &Path, cache: &SeqCache, meta: &SpillMeta) -> Result<(PathBuf, u64), SpillError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(file_name(&meta.session));
    let stored = cache
        .export_tensors()
        .map_err(|e| bad(&path, e.to_string()))?;
    let tokens =
        Tensor::new(cache.tokens(), &Device::Cpu).map_err(|e| bad(&path, e.to_string()))?;
    let mut named: Vec<(String, Tensor)> = vec![("tokens".into(), tokens)];
    for (name, t) in stored {
        let t = t
            .to_device(&Device::Cpu)
            .map_err(|e| bad(&path, e.to_string()))?;
        named.push((name, t));
    }
    let layout = cache.layout();
    let info: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("session", meta.session.clone()),
        ("fingerprint", meta.fingerprint.clone()),
        ("dtype", layout.dtype.name().to_string()),
        ("kv_rotation", rotation_name(cache.rotated()).to_string()),
        ("tokens", cache.len().to_string()),
        ("created", meta.created.to_string()),
        ("hits", meta.hits.to_string()),
        ("generation", meta.generation.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let bytes = safetensors::serialize(named.iter().map(|(n, t)| (n.as_str(), t)), Some(info))
        .map_err(|e| bad(&path, e.to_string()))?;
    write_atomic(&path, &bytes)?;
    Ok((path, bytes.len() as u64))
}

/// The `kv_rotation` metadata value.
fn rotation_name(rotated: bool) -> &'static str {
    if rotated {
        "hadamard"
    } else {
        "none"
    }
}

/// Read only the header's metadata (cheap: used to index the directory at start-up).
pub fn read_meta(path: &Path) -> Result<(SpillMeta, HashMap<String, String>), SpillError> {
    let mut f = File::open(path).map_err(io(path))?;
    let len = f.metadata().map_err(io(path))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| bad(path, "too short for a safetensors header"))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n + 8 > len {
        return Err(bad(
            path,
            format!("header length {n} does not fit the file ({len} bytes)"),
        ));
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h).map_err(|_| bad(path, "torn header"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&h).map_err(|e| bad(path, format!("header: {e}")))?;
    let m: HashMap<String, String> = v
        .get("__metadata__")
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .ok_or_else(|| bad(path, "no metadata"))?;
    if m.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad(path, format!("not a {FORMAT} file")));
    }
    let num = |k: &str| -> Result<u64, SpillError> {
        m.get(k)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(path, format!("metadata `{k}` missing")))
    };
    let meta = SpillMeta {
        session: m
            .get("session")
            .cloned()
            .ok_or_else(|| bad(path, "metadata `session` missing"))?,
        fingerprint: m.get("fingerprint").cloned().unwrap_or_default(),
        tokens: num("tokens")? as usize,
        created: num("created")?,
        hits: num("hits")?,
        generation: num("generation").unwrap_or(0),
    };
    Ok((meta, m))
}

/// Load a spill file back into a cache for `layout` on `device`, after checking that it
/// was written for the same model (`fingerprint`) and cache element type.
pub fn read(
    path: &Path,
    layout: CacheLayout,
    device: &Device,
    fingerprint: &str,
) -> Result<(SeqCache, SpillMeta), SpillError> {
    let (meta, m) = read_meta(path)?;
    if meta.fingerprint != fingerprint {
        return Err(bad(
            path,
            format!("written for another model ({})", meta.fingerprint),
        ));
    }
    let file_dtype = m.get("dtype").map(String::as_str).unwrap_or("none");
    if file_dtype != layout.dtype.name() {
        return Err(bad(
            path,
            format!(
                "written with kv dtype {file_dtype}, this server caches {}",
                layout.dtype
            ),
        ));
    }
    // K/V stored rotated (q8_0 on the CPU) are no use to a cache that is not, and back.
    let file_rot = m.get("kv_rotation").map(String::as_str).unwrap_or("none");
    let want_rot = rotation_name(super::rotated(
        super::host_dtype(device, layout.dtype),
        &layout,
    ));
    if file_rot != want_rot {
        return Err(bad(
            path,
            format!("written with kv rotation {file_rot}, this server's cache has {want_rot}"),
        ));
    }
    let data = fs::read(path).map_err(io(path))?;
    let tensors = candle_core::safetensors::load_buffer(&data, &Device::Cpu)
        .map_err(|e| bad(path, e.to_string()))?;
    let get = |n: &str| {
        tensors
            .get(n)
            .ok_or_else(|| bad(path, format!("tensor `{n}` missing")))
    };
    let tokens: Vec<u32> = get("tokens")?
        .to_vec1()
        .map_err(|e| bad(path, e.to_string()))?;
    if tokens.len() != meta.tokens {
        return Err(bad(path, "token count does not match the metadata"));
    }
    let cache = SeqCache::from_tensors(layout, device, tokens, |n| tensors.get(n))
        .map_err(|e| bad(path, e.to_string()))?;
    Ok((cache, meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvDtype;
    use candle_core::DType;

    fn layout() -> CacheLayout {
        CacheLayout {
            n_layers: 2,
            n_kv_heads: 1,
            head_dim: 4,
            dtype: KvDtype::F16,
            window: None,
        }
    }

    fn cache(n: usize) -> SeqCache {
        let mut c = SeqCache::new(layout(), &Device::Cpu);
        c.reserve(n).unwrap();
        for l in 0..2 {
            let t = Tensor::arange(0f32, (n * 4) as f32, &Device::Cpu)
                .unwrap()
                .reshape((1, 1, n, 4))
                .unwrap();
            c.write_layer(l, 0, &(&t + l as f64).unwrap(), &(&t * 2.0).unwrap())
                .unwrap();
        }
        c.commit(&(0..n as u32).collect::<Vec<_>>());
        c
    }

    fn meta(fp: &str) -> SpillMeta {
        SpillMeta {
            session: "s/1".into(),
            fingerprint: fp.into(),
            tokens: 5,
            created: 1,
            hits: 2,
            generation: 3,
        }
    }

    #[test]
    fn round_trip_is_exact_and_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(5);
        let (path, bytes) = write(dir.path(), &c, &meta("m1")).unwrap();
        assert!(path.starts_with(dir.path()), "escaped the dir: {path:?}");
        assert!(bytes > 0);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o077, 0);
        }
        let (back, m) = read(&path, layout(), &Device::Cpu, "m1").unwrap();
        assert_eq!(m, meta("m1"));
        assert_eq!(back.tokens(), c.tokens());
        for ((k1, v1), (k2, v2)) in back
            .export_layers()
            .unwrap()
            .iter()
            .zip(c.export_layers().unwrap().iter())
        {
            let d = |a: &Tensor, b: &Tensor| {
                a.to_dtype(DType::F32)
                    .unwrap()
                    .sub(&b.to_dtype(DType::F32).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert_eq!(d(k1, k2), 0.0);
            assert_eq!(d(v1, v2), 0.0);
        }
    }

    #[test]
    fn notes_sidecar_round_trips_and_is_optional() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write(dir.path(), &cache(5), &meta("m1")).unwrap();
        assert_eq!(notes_path(&path), dir.path().join("s%2f1.notes.json"));
        // A file without a sidecar (as older servers wrote them) has no notes.
        assert!(read_notes(&path).unwrap().is_empty());
        let notes: BTreeMap<String, String> =
            [("resp_1".to_string(), "{\"a\":1}".to_string())].into();
        write_notes(&path, &notes).unwrap();
        assert_eq!(read_notes(&path).unwrap(), notes);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(notes_path(&path))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0);
        }
        fs::write(notes_path(&path), b"{torn").unwrap();
        assert!(read_notes(&path).is_err());
        write_notes(&path, &BTreeMap::new()).unwrap();
        assert!(!notes_path(&path).exists());
        write_notes(&path, &notes).unwrap();
        remove(&path);
        assert!(!path.exists() && !notes_path(&path).exists());
    }

    #[test]
    fn foreign_torn_and_garbage_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write(
            dir.path(),
            &cache(3),
            &SpillMeta {
                tokens: 3,
                ..meta("m1")
            },
        )
        .unwrap();
        assert!(read(&path, layout(), &Device::Cpu, "other-model").is_err());
        let other = CacheLayout {
            dtype: KvDtype::F32,
            ..layout()
        };
        assert!(read(&path, other, &Device::Cpu, "m1").is_err());
        let full = fs::read(&path).unwrap();
        for cut in [0, 4, 20, full.len() / 2, full.len() - 1] {
            fs::write(&path, &full[..cut]).unwrap();
            assert!(
                read(&path, layout(), &Device::Cpu, "m1").is_err(),
                "torn at {cut} accepted"
            );
        }
        let mut garbage = full.clone();
        garbage[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        fs::write(&path, &garbage).unwrap();
        assert!(read(&path, layout(), &Device::Cpu, "m1").is_err());
    }

    /// A q8_0 cache with a head dimension of 64 holds K/V rotated (on the CPU); a file
    /// written from an unrotated one (the tensor path's) is refused, never misread.
    #[test]
    fn a_q8_0_file_of_other_rotation_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let q8 = CacheLayout {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim: 64,
            dtype: KvDtype::Q8_0,
            window: None,
        };
        for (rotated, c) in [
            (true, SeqCache::new(q8, &Device::Cpu)),
            (false, SeqCache::new_tensor_path(q8, &Device::Cpu)),
        ] {
            let mut c = c;
            assert_eq!(c.rotated(), rotated);
            c.reserve(2).unwrap();
            let t = Tensor::randn(0f32, 1.0, (1, 1, 2, 64), &Device::Cpu).unwrap();
            c.write_layer(0, 0, &t, &t).unwrap();
            c.commit(&[1, 2]);
            let sub = dir.path().join(format!("{rotated}"));
            let (path, _) = write(
                &sub,
                &c,
                &SpillMeta {
                    tokens: 2,
                    ..meta("m")
                },
            )
            .unwrap();
            let got = read(&path, q8, &Device::Cpu, "m");
            if rotated {
                assert!(got.unwrap().0.rotated());
            } else {
                let err = got.unwrap_err().to_string();
                assert!(
                    err.contains("kv rotation none") && err.contains("hadamard"),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn q8_0_file_round_trips_and_is_refused_by_an_f16_server() {
        let dir = tempfile::tempdir().unwrap();
        let q8 = CacheLayout {
            n_layers: 2,
            n_kv_heads: 2,
            head_dim: 32,
            dtype: KvDtype::Q8_0,
            window: None,
        };
        let mut c = SeqCache::new(q8, &Device::Cpu);
        c.reserve(3).unwrap();
        for l in 0..2 {
            let t = Tensor::randn(0f32, 1.0, (1, 2, 3, 32), &Device::Cpu).unwrap();
            c.write_layer(l, 0, &t, &(&t * 3.0).unwrap()).unwrap();
        }
        c.commit(&[7, 8, 9]);
        let (path, bytes) = write(
            dir.path(),
            &c,
            &SpillMeta {
                tokens: 3,
                ..meta("m")
            },
        )
        .unwrap();
        // The file holds 8-bit values: well under the f16 size of the same cache.
        let f16_bytes = 3 * CacheLayout {
            dtype: KvDtype::F16,
            ..q8
        }
        .bytes_per_token() as u64;
        assert!(bytes < f16_bytes + 2048, "{bytes} bytes");
        let (back, _) = read(&path, q8, &Device::Cpu, "m").unwrap();
        let (a, b) = (c.export_layers().unwrap(), back.export_layers().unwrap());
        for ((k1, v1), (k2, v2)) in a.iter().zip(&b) {
            let d = |x: &Tensor, y: &Tensor| {
                (x - y)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert_eq!(d(k1, k2), 0.0);
            assert_eq!(d(v1, v2), 0.0);
            assert_eq!(k1.dtype(), DType::F32);
        }
        let f16 = CacheLayout {
            dtype: KvDtype::F16,
            ..q8
        };
        let err = read(&path, f16, &Device::Cpu, "m").unwrap_err().to_string();
        assert!(err.contains("q8_0") && err.contains("f16"), "{err}");
    }
}
