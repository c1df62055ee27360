//! Hub repo ids: a GGUF from the repo, else a Hugging Face model's files (config,
//! tokenizer, safetensors shards) through `hf-hub`, cached under `<data dir>/hf`; the
//! cached snapshot when the hub is out of reach.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{hub_disabled, hub_get, resolve_dir, EngineError, ResolvedModel};

/// The hub endpoint: `HF_ENDPOINT` (a mirror) or huggingface.co.
fn hub_endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "https://huggingface.co".into())
}

pub(super) fn hub_api(
    data_dir: &Path,
) -> Result<hf_hub::api::sync::Api, hf_hub::api::sync::ApiError> {
    hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(data_dir.join("hf"))
        .with_endpoint(hub_endpoint())
        .with_progress(true)
        .build()
}

/// A hub repo: a GGUF when it has one (prefer Q4_K_M, then Q4_1/Q4_0, then Q8_0), else
/// a Hugging Face model (`config.json`, tokenizer files, safetensors with their index).
/// Without the hub, a repo fetched before is served from the cache, with a warning.
pub(super) fn fetch_hub_repo(repo: &str, data_dir: &Path) -> Result<ResolvedModel, EngineError> {
    let listed = if hub_disabled() {
        Err(EngineError::Fetch(format!(
            "{repo}: hub access disabled (HF_HUB_OFFLINE/CANDELA_OFFLINE)"
        )))
    } else {
        fetch_hub_listed(repo, data_dir)
    };
    match listed {
        Err(EngineError::Fetch(why)) if why.contains(LISTING_FAILED) || hub_disabled() => {
            match cached_snapshot(repo, data_dir) {
                Some(snap) => {
                    let path = resolve_dir(&snap)?.path;
                    tracing::warn!(%repo, path = %path.display(), "hub unavailable ({why}); using the cached copy");
                    eprintln!(
                        "candela: {why}; using the cached copy at {}",
                        path.display()
                    );
                    Ok(ResolvedModel {
                        id: repo.to_string(),
                        path,
                    })
                }
                None => Err(EngineError::Fetch(why)),
            }
        }
        other => other,
    }
}

const LISTING_FAILED: &str = "cannot list the repo on the Hugging Face hub";

/// The snapshot directory hf-hub keeps for the repo's `main` revision, if any.
fn cached_snapshot(repo: &str, data_dir: &Path) -> Option<PathBuf> {
    let root = data_dir
        .join("hf")
        .join(format!("models--{}", repo.replace('/', "--")));
    let commit = fs::read_to_string(root.join("refs").join("main")).ok()?;
    let snap = root.join("snapshots").join(commit.trim());
    snap.is_dir().then_some(snap)
}

fn fetch_hub_listed(repo: &str, data_dir: &Path) -> Result<ResolvedModel, EngineError> {
    let endpoint = hub_endpoint();
    // The listing is the first request: bounded, so an unanswering hub fails fast.
    let (tx, rx) = std::sync::mpsc::channel();
    let (name, dir) = (repo.to_string(), data_dir.to_path_buf());
    std::thread::spawn(move || {
        let r = hub_api(&dir).and_then(|api| api.model(name).info());
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    let unreachable =
        |e: String| EngineError::Fetch(format!("{repo}: {LISTING_FAILED} ({endpoint}): {e}"));
    let info = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(r) => r.map_err(unreachable)?,
        Err(_) => return Err(unreachable("no answer within 30 s".into())),
    };
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let gguf = ["Q4_K_M", "Q4_1", "Q4_0", "Q8_0", ""]
        .iter()
        .find_map(|q| files.iter().find(|f| f.ends_with(".gguf") && f.contains(q)));
    if let Some(pick) = gguf {
        return Ok(ResolvedModel {
            id: repo.to_string(),
            path: hub_get(repo, pick, data_dir)?,
        });
    }
    let has = |f: &str| files.iter().any(|x| x == f);
    let weights = if has("model.safetensors.index.json") {
        "model.safetensors.index.json"
    } else if has("model.safetensors") {
        "model.safetensors"
    } else {
        ""
    };
    if !has("config.json") || !has("tokenizer.json") || weights.is_empty() {
        return Err(EngineError::Fetch(format!(
            "{repo}: the repo has neither a .gguf file nor config.json + tokenizer.json + \
             model.safetensors (or its index)"
        )));
    }
    let api = hub_api(data_dir)
        .map_err(|e| EngineError::Fetch(format!("hub client: {e}")))?
        .model(repo.to_string());
    let get = |f: &str| {
        eprintln!("candela: fetching {f} from the Hugging Face hub ({repo})");
        api.get(f)
            .map_err(|e| EngineError::Fetch(format!("{repo}: {f}: {e}")))
    };
    let config = get("config.json")?;
    get("tokenizer.json")?;
    for f in [
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        if has(f) {
            get(f)?;
        }
    }
    let first = get(weights)?;
    if weights.ends_with(".index.json") {
        let index: serde_json::Value = serde_json::from_str(
            &fs::read_to_string(&first).map_err(|e| EngineError::Fetch(format!("{repo}: {e}")))?,
        )
        .map_err(|e| EngineError::Fetch(format!("{repo}: {weights}: {e}")))?;
        let shards: std::collections::BTreeSet<&str> = index["weight_map"]
            .as_object()
            .map(|m| m.values().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        for shard in shards {
            get(shard)?;
        }
    }
    // hf-hub puts every file of one revision in one snapshot directory.
    let path = config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| EngineError::Fetch(format!("{repo}: odd cache path")))?;
    eprintln!("candela: model ready at {}", path.display());
    Ok(ResolvedModel {
        id: repo.to_string(),
        path,
    })
}
