//! Configuration: built-in defaults, then a TOML file (`--config`, else
//! `config/default.toml` when present), then environment variables `CANDELA_*`, then
//! command-line flags — later sources win. One definition: [`ServeArgs`] is the
//! command line (clap, which also reads the env vars) and the file (serde) alike;
//! [`Config`] is the result, validated once at start-up.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::error::Error;
use crate::kv::store::tiers::DeviceBudget;
use crate::kv::KvDtype;

#[derive(Debug, Parser)]
#[command(
    name = "candela",
    version,
    about = "Local OpenAI-compatible LLM server on candle"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the model over HTTP (the default).
    Serve(ServeArgs),
    /// Download and verify a model into the data dir without serving it.
    Fetch {
        /// `default`, a known model name, or a hub repo id.
        model: Option<String>,
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Check the compute device (--device) against the CPU on the first model: greedy
    /// decoding of a short and a long prompt, tokens agreeing, logit gaps, prefill time,
    /// decode tok/s, 8 sequences together.
    Doctor {
        /// Tokens to decode per run.
        #[arg(long, default_value_t = 128)]
        tokens: usize,
        /// Prompt text (the long prompt repeats it).
        #[arg(
            long,
            default_value = "The numbers, one after another: 1, 2, 3, 4, 5, 6, 7, 8,"
        )]
        prompt: String,
        /// Skip the CPU reference (on an 8B model it takes minutes): the device paths
        /// are then compared with each other only.
        #[arg(long)]
        no_cpu: bool,
        /// Only the fused path's timings and its bit-identity checks (batched against
        /// single-stream decoding, the per-kernel costs): no tensor path, no prompt
        /// prefill comparisons, no sliding-window check. For a quick look at a build.
        #[arg(long)]
        quick: bool,
        /// Only the prompt prefill comparisons: each way of prefilling prompts of 16 to
        /// 4,000 tokens (batched steps, the tensor path, the wide prefill and its GEMMs),
        /// their times and logit gaps.
        #[arg(long, conflicts_with = "quick")]
        prefill: bool,
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Size a machine: weights, KV bytes per token, how many tokens and sessions fit
    /// the KV budget (--kv-budget), and what is left of RAM.
    Plan {
        /// Length of one session, for the "how many sessions" line.
        #[arg(long, default_value_t = 4096)]
        session_tokens: usize,
        /// GPU memory to plan for (`80GiB`); default: read from the GPU --device names.
        /// With a GPU the plan counts the sessions each tier holds (device, host, disk).
        #[arg(long)]
        gpu_memory: Option<String>,
        #[command(flatten)]
        args: ServeArgs,
    },
}

/// Every setting, as one layer of the configuration: the command line (each flag also
/// reads its `CANDELA_*` env var, through clap) or the TOML file (the same names with
/// underscores, `deny_unknown_fields`). Unset is `None` (or empty for lists);
/// [`Config::load`] lays the command line over the file, fills in defaults and
/// validates. A new setting is one field here — its flag, env var and TOML key at once
/// — plus its line in `Config::load` and its docs.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML config file (default: config/default.toml if present).
    #[arg(long, env = "CANDELA_CONFIG", global = true)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to bind.
    #[arg(long, env = "CANDELA_HOST", global = true)]
    pub host: Option<String>,
    /// Port to bind (0 = any free port).
    #[arg(long, env = "CANDELA_PORT", global = true)]
    pub port: Option<u16>,
    /// `default`, a known model name, a .gguf path, a directory, or a hub repo id.
    /// Repeat it (or give a comma-separated list) to serve several models; the first is
    /// the default one.
    #[arg(long, env = "CANDELA_MODEL", value_delimiter = ',', global = true)]
    #[serde(deserialize_with = "one_model")]
    pub model: Vec<String>,
    /// The TOML file's way to name several models (`models = ["a", "b"]`), instead of
    /// `model = "a"`; not both. Read from the file only: on the command line `--model`
    /// repeats.
    #[arg(skip)]
    pub models: Option<Vec<String>>,
    /// Where models (and later session caches) are stored.
    #[arg(long, env = "CANDELA_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Context size in tokens (0 = the model's training context).
    #[arg(long, env = "CANDELA_CTX_SIZE", global = true)]
    pub ctx_size: Option<usize>,
    /// Compute threads (0 = all cores).
    #[arg(long, env = "CANDELA_THREADS", global = true)]
    pub threads: Option<usize>,
    /// Requests that may wait for the engine before new ones get 503.
    #[arg(long, env = "CANDELA_QUEUE_SIZE", global = true)]
    pub queue_size: Option<usize>,
    /// Sequences decoded together in one batched step.
    #[arg(long, env = "CANDELA_MAX_BATCH", global = true)]
    pub max_batch: Option<usize>,
    /// Bytes the idle session KV caches may hold: a number with an optional unit
    /// (`512MiB`, `2GiB`, `1.5GB`) or a fraction of RAM (`0.25`). Default: 1/8 of RAM, at most 4 GiB.
    #[arg(long, env = "CANDELA_KV_BUDGET", global = true)]
    pub kv_budget: Option<String>,
    /// Bytes the idle session caches may hold in GPU memory before the least recently
    /// used move to host RAM (units as for --kv-budget, or a share of the GPU memory
    /// free once the model is loaded, such as `0.5`, the default). Only with a GPU.
    #[arg(long, env = "CANDELA_KV_DEVICE_BUDGET", global = true)]
    pub kv_device_budget: Option<String>,
    /// KV cache element type: f16 (default), f32, bf16, or q8_0 (8-bit blocks, about
    /// half the bytes of f16, dequantized when attention reads them).
    #[arg(long, env = "CANDELA_KV_DTYPE", global = true)]
    pub kv_dtype: Option<String>,
    /// Where evicted sessions are spilled (default: <data dir>/sessions).
    #[arg(long, env = "CANDELA_KV_SPILL_DIR", global = true)]
    pub kv_spill_dir: Option<PathBuf>,
    /// Bytes the spill dir may hold (units as for --kv-budget; 0 turns spilling off).
    #[arg(long, env = "CANDELA_KV_DISK_BUDGET", global = true)]
    pub kv_disk_budget: Option<String>,
    /// The spill dir is shared by several replicas (a shared volume): each session is
    /// leased while served, written behind every turn, and found there on a miss.
    #[arg(long, env = "CANDELA_KV_SHARED", global = true)]
    pub kv_shared: Option<bool>,
    /// API key required as `Authorization: Bearer <key>` on /v1 (repeat for several;
    /// env: comma-separated; TOML: `api_keys = [...]`).
    #[arg(
        long = "api-key",
        env = "CANDELA_API_KEYS",
        value_delimiter = ',',
        global = true
    )]
    pub api_keys: Vec<String>,
    /// File with one API key per line (blank lines and `#` comments ignored).
    #[arg(long, env = "CANDELA_API_KEY_FILE", global = true)]
    pub api_key_file: Option<PathBuf>,
    /// Require an API key on /metrics too.
    #[arg(long, env = "CANDELA_METRICS_AUTH", global = true)]
    pub metrics_auth: Option<bool>,
    /// Compute device: auto (GPU when the build has one), cpu, cuda, cuda:N, metal.
    #[arg(long, env = "CANDELA_DEVICE", global = true)]
    pub device: Option<String>,
    /// Generation requests one API key may have in flight (0 = unlimited); more get 429.
    #[arg(long, env = "CANDELA_MAX_CONCURRENT_PER_KEY", global = true)]
    pub max_concurrent_per_key: Option<usize>,
    /// Spill idle sessions when the host's available memory falls below this (bytes with
    /// units, or a RAM fraction; default 0.05; 0 = never).
    #[arg(long, env = "CANDELA_KV_MIN_FREE", global = true)]
    pub kv_min_free: Option<String>,
    /// Seconds a streaming client may leave its events unread before the stream is cut
    /// and its generation cancelled (0 = never).
    #[arg(long, env = "CANDELA_STREAM_IDLE_TIMEOUT", global = true)]
    pub stream_idle_timeout: Option<u64>,
}

/// TOML `model = "name"`: one model (a list goes in `models`).
fn one_model<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    String::deserialize(d).map(|m| vec![m])
}

/// Models one server may hold (each has its own engine thread, weights and KV store).
pub const MAX_MODELS: usize = 8;

/// The validated configuration. Its `Debug` leaves the API keys out.
#[derive(Clone)]
pub struct Config {
    pub host: String,
    pub port: u16,
    /// Models to serve (known names, paths, hub repo ids); the first is the default one
    /// that requests without `model` (or with `"default"`) get.
    pub models: Vec<String>,
    pub data_dir: PathBuf,
    pub ctx_size: usize,
    pub threads: usize,
    pub queue_size: usize,
    pub max_batch: usize,
    /// Session KV cache budget in bytes (host RAM).
    pub kv_budget: usize,
    /// Budget of the GPU memory tier (used only with a GPU).
    pub kv_device_budget: DeviceBudget,
    /// Element type of the session caches.
    pub kv_dtype: KvDtype,
    pub kv_spill_dir: PathBuf,
    /// 0: evicted sessions are dropped, not spilled.
    pub kv_disk_budget: u64,
    /// The spill dir is shared with other replicas.
    pub kv_shared: bool,
    /// Accepted API keys; empty means no auth. Never printed.
    pub api_keys: Vec<String>,
    pub metrics_auth: bool,
    pub device: String,
    pub max_concurrent_per_key: usize,
    pub kv_min_free: usize,
    /// Seconds (0 = never); see [`ServeArgs::stream_idle_timeout`].
    pub stream_idle_timeout: u64,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("models", &self.models)
            .field("data_dir", &self.data_dir)
            .field("ctx_size", &self.ctx_size)
            .field("threads", &self.threads)
            .field("queue_size", &self.queue_size)
            .field("max_batch", &self.max_batch)
            .field("kv_budget", &self.kv_budget)
            .field("kv_device_budget", &self.kv_device_budget)
            .field("kv_dtype", &self.kv_dtype)
            .field("kv_spill_dir", &self.kv_spill_dir)
            .field("kv_disk_budget", &self.kv_disk_budget)
            .field("kv_shared", &self.kv_shared)
            .field(
                "api_keys",
                &format_args!("<{} hidden>", self.api_keys.len()),
            )
            .field("metrics_auth", &self.metrics_auth)
            .field("device", &self.device)
            .field("max_concurrent_per_key", &self.max_concurrent_per_key)
            .field("kv_min_free", &self.kv_min_free)
            .field("stream_idle_timeout", &self.stream_idle_timeout)
            .finish()
    }
}

fn default_data_dir() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("candela")
}

impl Config {
    /// The settings of `args` (flags and env vars) over those of the TOML file
    /// (`args.config`, else `config/default.toml` when present) over the defaults,
    /// validated.
    pub fn load(args: &ServeArgs) -> Result<Self, Error> {
        let file = match &args.config {
            Some(p) => read_file(p)?,
            None if Path::new("config/default.toml").exists() => {
                read_file(Path::new("config/default.toml"))?
            }
            None => ServeArgs::default(),
        };
        let cfg = Self::layered(args.clone(), file)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Each setting from `top` if it is set there, else from `file`, else its default;
    /// the values that need it parsed, naming the key when they cannot be.
    fn layered(top: ServeArgs, file: ServeArgs) -> Result<Self, Error> {
        let data_dir = top
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(default_data_dir);
        let models = if !top.model.is_empty() {
            top.model
        } else {
            match (file.model.is_empty(), file.models) {
                (false, Some(_)) => {
                    return Err(Error::Config(
                        "give either `model` or `models` in the config file, not both".into(),
                    ))
                }
                (false, None) => file.model,
                (true, Some(many)) => many,
                (true, None) => vec!["default".into()],
            }
        };
        let mut api_keys = if top.api_keys.is_empty() {
            file.api_keys
        } else {
            top.api_keys
        };
        if let Some(p) = top.api_key_file.or(file.api_key_file) {
            let text = std::fs::read_to_string(&p)
                .map_err(|e| Error::Config(format!("api_key_file {}: {e}", p.display())))?;
            api_keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        api_keys.retain(|k| !k.trim().is_empty());
        Ok(Config {
            host: top.host.or(file.host).unwrap_or_else(|| "127.0.0.1".into()),
            port: top.port.or(file.port).unwrap_or(8080),
            models,
            kv_dtype: match top.kv_dtype.or(file.kv_dtype) {
                Some(s) => s.parse().map_err(Error::Config)?,
                None => KvDtype::default(),
            },
            kv_spill_dir: top
                .kv_spill_dir
                .or(file.kv_spill_dir)
                .unwrap_or_else(|| data_dir.join("sessions")),
            kv_disk_budget: match top.kv_disk_budget.or(file.kv_disk_budget) {
                Some(s) => parse_bytes("kv_disk_budget", &s, total_ram())? as u64,
                None => 8 << 30,
            },
            kv_shared: top.kv_shared.or(file.kv_shared).unwrap_or(false),
            data_dir,
            ctx_size: top.ctx_size.or(file.ctx_size).unwrap_or(8192),
            threads: top.threads.or(file.threads).unwrap_or(0),
            queue_size: top.queue_size.or(file.queue_size).unwrap_or(64),
            max_batch: top.max_batch.or(file.max_batch).unwrap_or(8),
            kv_device_budget: match top.kv_device_budget.or(file.kv_device_budget) {
                Some(s) => parse_device_budget(&s)?,
                None => DeviceBudget::default(),
            },
            kv_budget: match top.kv_budget.or(file.kv_budget) {
                Some(s) => parse_bytes("kv_budget", &s, total_ram())?,
                None => (total_ram() / 8).min(4 << 30),
            },
            api_keys,
            metrics_auth: top.metrics_auth.or(file.metrics_auth).unwrap_or(false),
            device: top.device.or(file.device).unwrap_or_else(|| "auto".into()),
            stream_idle_timeout: top
                .stream_idle_timeout
                .or(file.stream_idle_timeout)
                .unwrap_or(60),
            max_concurrent_per_key: top
                .max_concurrent_per_key
                .or(file.max_concurrent_per_key)
                .unwrap_or(32),
            kv_min_free: match top.kv_min_free.or(file.kv_min_free) {
                Some(s) => parse_bytes("kv_min_free", &s, total_ram())?,
                None => (total_ram() as f64 * 0.05) as usize,
            },
        })
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        if self.kv_shared && self.kv_disk_budget == 0 {
            return bad("kv_shared needs spilling: kv_disk_budget must be > 0, got 0".to_string());
        }
        if self.ctx_size > 1 << 20 {
            return bad(format!(
                "ctx_size must be <= 1048576, got {}",
                self.ctx_size
            ));
        }
        if self.queue_size == 0 || self.queue_size > 100_000 {
            return bad(format!(
                "queue_size must be in 1..=100000, got {}",
                self.queue_size
            ));
        }
        if self.max_batch == 0 || self.max_batch > 256 {
            return bad(format!(
                "max_batch must be in 1..=256, got {}",
                self.max_batch
            ));
        }
        if self.threads > 1024 {
            return bad(format!("threads must be <= 1024, got {}", self.threads));
        }
        if self.models.is_empty() {
            return bad("models must name at least one model".into());
        }
        if self.models.len() > MAX_MODELS {
            return bad(format!(
                "at most {MAX_MODELS} models can be served at once, got {}",
                self.models.len()
            ));
        }
        if self.models.iter().any(|m| m.trim().is_empty()) {
            return bad("model must not be empty".into());
        }
        Ok(())
    }
}

fn read_file(p: &Path) -> Result<ServeArgs, Error> {
    let text = std::fs::read_to_string(p)
        .map_err(|e| Error::Config(format!("cannot read {}: {e}", p.display())))?;
    toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", p.display())))
}

/// `--kv-device-budget`: bytes with units, or a share of the free device memory
/// (`0.5`; `1` is all of it).
pub fn parse_device_budget(s: &str) -> Result<DeviceBudget, Error> {
    let t = s.trim();
    match t.parse::<f64>() {
        Ok(f) if (f > 0.0 && f <= 1.0 && t.contains('.')) || t == "1" => {
            Ok(DeviceBudget::Share(f.min(1.0)))
        }
        _ => parse_bytes("kv_device_budget", t, 0).map(DeviceBudget::Bytes),
    }
}

pub fn total_ram() -> usize {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    sys.total_memory() as usize
}

/// Setting `key`: `123`, `512MiB`, `2GiB`, `1.5GB`, `64k`, or a fraction of `ram` such
/// as `0.25`.
pub fn parse_bytes(key: &str, s: &str, ram: usize) -> Result<usize, Error> {
    let t = s.trim();
    let bad = || {
        Error::Config(format!(
            "{key}: cannot read `{s}` (try 512MiB, 2GiB or 0.25 of RAM)"
        ))
    };
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" if n < 1.0 && num.contains('.') => return Ok((n * ram as f64) as usize),
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    Ok((n * mult) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        let b = |s: &str, ram| parse_bytes("kv_budget", s, ram);
        assert_eq!(b("512MiB", 0).unwrap(), 512 << 20);
        assert_eq!(b("2GiB", 0).unwrap(), 2 << 30);
        assert_eq!(b("1.5GB", 0).unwrap(), 1_500_000_000);
        assert_eq!(b("1000", 0).unwrap(), 1000);
        assert_eq!(b("0.25", 4000).unwrap(), 1000);
        assert!(b("lots", 0).is_err());
        assert!(b("3 parsecs", 0).is_err());
    }

    #[test]
    fn device_budgets_are_bytes_or_a_share_of_free_device_memory() {
        let d = |s: &str| parse_device_budget(s);
        assert_eq!(d("0.5").unwrap(), DeviceBudget::Share(0.5));
        assert_eq!(d("1").unwrap(), DeviceBudget::Share(1.0));
        assert_eq!(d("8GiB").unwrap(), DeviceBudget::Bytes(8 << 30));
        assert_eq!(d("0").unwrap(), DeviceBudget::Bytes(0));
        assert_eq!(d("1000").unwrap(), DeviceBudget::Bytes(1000));
        let e = d("most").unwrap_err().to_string();
        assert!(
            e.contains("kv_device_budget") && e.contains("`most`"),
            "{e}"
        );
        let cfg = with_file("kv_device_budget = \"2GiB\"\n", ServeArgs::default()).unwrap();
        assert_eq!(cfg.kv_device_budget, DeviceBudget::Bytes(2 << 30));
        let cfg = with_file("", ServeArgs::default()).unwrap();
        assert_eq!(cfg.kv_device_budget, DeviceBudget::Share(0.5));
    }

    /// `args` over the TOML `text`.
    fn with_file(text: &str, args: ServeArgs) -> Result<Config, Error> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        Config::load(&ServeArgs {
            config: Some(p),
            ..args
        })
    }

    #[test]
    fn the_shipped_default_toml_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
        let cfg = Config::load(&ServeArgs {
            config: Some(p),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.models, ["default"]);
        assert_eq!(
            (cfg.port, cfg.ctx_size, cfg.stream_idle_timeout),
            (8080, 8192, 60)
        );
    }

    #[test]
    fn every_key_is_read_from_the_file_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::write(&keys, "# comment\nk2\n\n").unwrap();
        let text = format!(
            r#"
host = "0.0.0.0"
port = 9000
model = "m"
data_dir = "/d"
ctx_size = 512
threads = 3
queue_size = 5
max_batch = 4
kv_budget = "1MiB"
kv_dtype = "q8_0"
kv_spill_dir = "/s"
kv_disk_budget = "2MiB"
kv_shared = true
api_keys = ["k1"]
api_key_file = "{}"
metrics_auth = true
device = "cpu"
max_concurrent_per_key = 2
kv_min_free = "3MiB"
stream_idle_timeout = 7
"#,
            keys.display()
        );
        let cfg = with_file(&text, ServeArgs::default()).unwrap();
        assert_eq!((cfg.host.as_str(), cfg.port), ("0.0.0.0", 9000));
        assert_eq!(cfg.models, ["m"]);
        assert_eq!(cfg.data_dir, Path::new("/d"));
        assert_eq!((cfg.ctx_size, cfg.threads), (512, 3));
        assert_eq!((cfg.queue_size, cfg.max_batch), (5, 4));
        assert_eq!((cfg.kv_budget, cfg.kv_disk_budget), (1 << 20, 2 << 20));
        assert!(cfg.kv_shared);
        assert_eq!(cfg.kv_dtype, KvDtype::Q8_0);
        assert_eq!(cfg.kv_spill_dir, Path::new("/s"));
        assert_eq!(cfg.api_keys, ["k1", "k2"]);
        assert!(cfg.metrics_auth);
        assert_eq!(cfg.device, "cpu");
        assert_eq!(cfg.max_concurrent_per_key, 2);
        assert_eq!(cfg.kv_min_free, 3 << 20);
        assert_eq!(cfg.stream_idle_timeout, 7);
        // Flags (and env vars, through clap) beat the file, key by key.
        let flags = ServeArgs {
            port: Some(9001),
            queue_size: Some(6),
            api_keys: vec!["k3".into()],
            kv_budget: Some("4MiB".into()),
            ..Default::default()
        };
        let cfg = with_file(&text, flags).unwrap();
        assert_eq!(
            (cfg.port, cfg.queue_size, cfg.kv_budget),
            (9001, 6, 4 << 20)
        );
        assert_eq!(
            cfg.api_keys,
            ["k3", "k2"],
            "the key file adds to the flag's keys"
        );
        assert_eq!((cfg.host.as_str(), cfg.max_batch), ("0.0.0.0", 4));
    }

    #[test]
    fn env_vars_beat_the_file_and_flags_beat_env_vars() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "max_batch = 3\nthreads = 3\nqueue_size = 3\n").unwrap();
        // `Config::load` reads no environment; only clap does, here and in
        // `several_models_from_file_or_flags`, which looks at nothing these change.
        std::env::set_var("CANDELA_MAX_CONCURRENT_PER_KEY", "5");
        std::env::set_var("CANDELA_THREADS", "4");
        let cli = <Cli as clap::Parser>::try_parse_from([
            "candela".as_ref(),
            "--config".as_ref(),
            p.as_os_str(),
            "--threads".as_ref(),
            "6".as_ref(),
        ]);
        std::env::remove_var("CANDELA_MAX_CONCURRENT_PER_KEY");
        std::env::remove_var("CANDELA_THREADS");
        let cfg = Config::load(&cli.unwrap().serve).unwrap();
        assert_eq!(cfg.max_batch, 3, "file over the default");
        assert_eq!(cfg.max_concurrent_per_key, 5, "env over the default");
        assert_eq!(cfg.threads, 6, "flag over env over file");
        assert_eq!(cfg.queue_size, 3);
    }

    #[test]
    fn bad_files_and_values_name_the_key() {
        let err = |text: &str| {
            with_file(text, ServeArgs::default())
                .unwrap_err()
                .to_string()
        };
        let e = err("kv_disk_budget = \"lots\"\n");
        assert!(e.contains("kv_disk_budget") && e.contains("`lots`"), "{e}");
        let e = err("kv_min_free = \"some\"\n");
        assert!(e.contains("kv_min_free") && e.contains("`some`"), "{e}");
        let e = err("ctx_sise = 5\n");
        assert!(e.contains("unknown field `ctx_sise`"), "{e}");
        let e = err("port = \"http\"\n");
        assert!(e.contains("port"), "{e}");
        // Only flags name the config file.
        assert!(err("config = \"x.toml\"\n").contains("unknown field `config`"));
        let e = err("queue_size = 0\n");
        assert!(e.contains("queue_size") && e.contains("got 0"), "{e}");
    }

    #[test]
    fn several_models_from_file_or_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = |text: &str| {
            let p = dir.path().join(format!("c{}.toml", text.len()));
            std::fs::write(&p, text).unwrap();
            ServeArgs {
                config: Some(p),
                ..Default::default()
            }
        };
        let args = file("models = [\"default\", \"qwen2.5-coder-0.5b\"]\n");
        let cfg = Config::load(&args).unwrap();
        assert_eq!(cfg.models, ["default", "qwen2.5-coder-0.5b"]);
        // Flags (and CANDELA_MODEL, through clap) replace the file's list.
        let flags = ServeArgs {
            model: vec!["qwen".into()],
            ..args
        };
        assert_eq!(Config::load(&flags).unwrap().models, ["qwen"]);
        assert_eq!(
            Config::load(&file("model = \"qwen\"\n")).unwrap().models,
            ["qwen"]
        );
        let both = file("model = \"a\"\nmodels = [\"b\"]\n");
        assert!(Config::load(&both).is_err());
        assert!(Config::load(&file("models = []\n")).is_err());
        // The CLI splits a comma list into models.
        let cli =
            <Cli as clap::Parser>::try_parse_from(["candela", "--model", "a,b", "--model", "c"])
                .unwrap();
        assert_eq!(cli.serve.model, ["a", "b", "c"]);
    }

    #[test]
    fn kv_dtype_is_parsed_and_checked() {
        let with = |d: &str| {
            Config::load(&ServeArgs {
                kv_dtype: Some(d.into()),
                ..Default::default()
            })
        };
        assert_eq!(with("q8_0").unwrap().kv_dtype, KvDtype::Q8_0);
        assert_eq!(with("BF16").unwrap().kv_dtype, KvDtype::BF16);
        let e = with("f8").unwrap_err().to_string();
        assert!(e.contains("kv_dtype") && e.contains("`f8`"), "{e}");
        assert_eq!(
            Config::load(&ServeArgs::default()).unwrap().kv_dtype,
            KvDtype::F16
        );
    }
}
