//! Host and GPU probes: a background sampler thread reads host memory and swap
//! (`/proc/meminfo`; sysinfo elsewhere), memory pressure (`/proc/pressure/memory`; on
//! macOS the kernel's pressure level) and GPUs (NVML; on macOS IOReport and Metal, see
//! `apple.rs`) into plain stat structs and sets gauges, so a `/metrics` scrape only
//! reads numbers and never waits on a probe.
//!
//! Each source reports `candela_collector_up{source}`; a source that is absent (no GPU,
//! no PSI in the kernel) is 0, never an error. Depends on nothing else in the crate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus::{CounterVec, GaugeVec, IntGauge, IntGaugeVec, Opts, Registry};

/// How often the sampler reads the probes unless told otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);

/// Names of the per-GPU gauges. They appear in a scrape only once a GPU was read, so
/// tests that look for dashboard metrics need to know them.
pub const GPU_METRICS: [&str; 6] = [
    "candela_gpu_utilization_ratio",
    "candela_gpu_memory_used_bytes",
    "candela_gpu_memory_total_bytes",
    "candela_gpu_power_watts",
    "candela_gpu_temperature_celsius",
    "candela_gpu_clock_hertz",
];

/// Host memory and swap, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostMemStats {
    pub total: u64,
    pub available: u64,
    pub swap_total: u64,
    pub swap_free: u64,
}

impl HostMemStats {
    pub fn used(&self) -> u64 {
        self.total.saturating_sub(self.available)
    }
    pub fn swap_used(&self) -> u64 {
        self.swap_total.saturating_sub(self.swap_free)
    }
}

/// Cumulative memory stall time from Linux PSI, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PsiStats {
    pub some_total_us: u64,
    pub full_total_us: u64,
}

/// One GPU's readings; a reading the driver does not offer is `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuStats {
    pub index: u32,
    pub utilization_ratio: Option<f64>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub power_watts: Option<f64>,
    pub temperature_celsius: Option<f64>,
    pub clock_hertz: Option<f64>,
}

/// Parse `/proc/meminfo` text (values in kB). `None` if `MemTotal` or `MemAvailable`
/// is missing.
pub fn parse_meminfo(text: &str) -> Option<HostMemStats> {
    let mut s = HostMemStats::default();
    let (mut total, mut avail) = (false, false);
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(key), Some(val)) = (it.next(), it.next()) else {
            continue;
        };
        let Ok(kb) = val.parse::<u64>() else {
            continue;
        };
        let bytes = kb.saturating_mul(1024);
        match key {
            "MemTotal:" => (s.total, total) = (bytes, true),
            "MemAvailable:" => (s.available, avail) = (bytes, true),
            "SwapTotal:" => s.swap_total = bytes,
            "SwapFree:" => s.swap_free = bytes,
            _ => {}
        }
    }
    (total && avail).then_some(s)
}

/// Parse `/proc/pressure/memory` text: the `total=` fields of the `some` and `full`
/// lines. `None` if the `some` line is missing.
pub fn parse_psi(text: &str) -> Option<PsiStats> {
    let mut s = PsiStats::default();
    let mut some = false;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let kind = it.next();
        let total = it
            .find_map(|f| f.strip_prefix("total="))
            .and_then(|v| v.parse::<u64>().ok());
        match (kind, total) {
            (Some("some"), Some(t)) => (s.some_total_us, some) = (t, true),
            (Some("full"), Some(t)) => s.full_total_us = t,
            _ => {}
        }
    }
    some.then_some(s)
}

#[cfg(target_os = "linux")]
fn read_host_mem() -> Option<HostMemStats> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

#[cfg(not(target_os = "linux"))]
fn read_host_mem() -> Option<HostMemStats> {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    let total = sys.total_memory();
    (total > 0).then(|| HostMemStats {
        total,
        available: sys.available_memory(),
        swap_total: sys.total_swap(),
        swap_free: sys.free_swap(),
    })
}

fn read_psi() -> Option<PsiStats> {
    parse_psi(&std::fs::read_to_string("/proc/pressure/memory").ok()?)
}

/// NVML, loaded at run time: no library or no GPU means no readings.
#[cfg(not(target_os = "macos"))]
mod gpu {
    use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
    use nvml_wrapper::Nvml;

    use super::GpuStats;

    /// The `candela_collector_up{source}` label of the GPU probe on this platform.
    pub const SOURCE: &str = "nvml";

    pub struct Gpus(Option<Nvml>);

    impl Gpus {
        pub fn open() -> Self {
            match Nvml::init() {
                Ok(n) => Self(Some(n)),
                Err(e) => {
                    tracing::debug!("NVML unavailable, no GPU metrics: {e}");
                    Self(None)
                }
            }
        }

        /// `None` when NVML is not usable; otherwise one entry per device. NVML answers
        /// at once, so the interval is not used.
        pub fn read(&mut self, _interval: std::time::Duration) -> Option<Vec<GpuStats>> {
            let nvml = self.0.as_ref()?;
            let n = nvml.device_count().ok()?;
            let mut out = Vec::with_capacity(n as usize);
            for index in 0..n {
                let Ok(d) = nvml.device_by_index(index) else {
                    continue;
                };
                let mem = d.memory_info().ok();
                out.push(GpuStats {
                    index,
                    utilization_ratio: d.utilization_rates().ok().map(|u| u.gpu as f64 / 100.0),
                    memory_used_bytes: mem.as_ref().map(|m| m.used),
                    memory_total_bytes: mem.as_ref().map(|m| m.total),
                    power_watts: d.power_usage().ok().map(|mw| mw as f64 / 1000.0),
                    temperature_celsius: d.temperature(TemperatureSensor::Gpu).ok().map(f64::from),
                    clock_hertz: d
                        .clock_info(Clock::Graphics)
                        .ok()
                        .map(|mhz| mhz as f64 * 1e6),
                });
            }
            Some(out)
        }
    }
}

#[cfg(target_os = "macos")]
use super::apple as gpu;

/// A reading from Apple's counters (see `metrics/apple.rs`): GPU active residency,
/// clock in MHz, power in W, temperature in °C (0 when the SMC gave none), and Metal's
/// (allocated, recommended working set) bytes when the build has Metal.
#[cfg_attr(not(target_os = "macos"), allow(dead_code))]
pub(crate) fn apple_gpu_stats(
    active_ratio: f32,
    freq_mhz: u32,
    power_w: f32,
    temp_c: f32,
    metal: Option<(u64, u64)>,
) -> GpuStats {
    let finite = |v: f32| (v.is_finite() && v >= 0.0).then_some(f64::from(v));
    GpuStats {
        index: 0,
        utilization_ratio: finite(active_ratio).map(|r| r.min(1.0)),
        memory_used_bytes: metal.map(|m| m.0),
        memory_total_bytes: metal.map(|m| m.1).filter(|&t| t > 0),
        power_watts: finite(power_w),
        temperature_celsius: finite(temp_c).filter(|&t| t > 0.0),
        clock_hertz: (freq_mhz > 0).then(|| f64::from(freq_mhz) * 1e6),
    }
}

/// `kern.memorystatus_vm_pressure_level` (1 normal, 2 warning, 4 critical) as the
/// gauge's 0 / 1 / 2.
#[cfg_attr(not(target_os = "macos"), allow(dead_code))]
pub(crate) fn pressure_level_from_sysctl(v: i32) -> Option<i64> {
    match v {
        1 => Some(0),
        2 => Some(1),
        4 => Some(2),
        _ => None,
    }
}

/// The gauges the sampler sets. Registered once with the crate's registry.
pub(crate) struct ProbeMetrics {
    up: IntGaugeVec,
    mem_total: IntGauge,
    mem_available: IntGauge,
    mem_used: IntGauge,
    swap_total: IntGauge,
    swap_used: IntGauge,
    pressure: CounterVec,
    /// macOS only: the kernel's memory-pressure level (0 normal, 1 warning, 2 critical).
    #[cfg(target_os = "macos")]
    pressure_level: IntGauge,
    gpu_util: GaugeVec,
    gpu_mem_used: GaugeVec,
    gpu_mem_total: GaugeVec,
    gpu_power: GaugeVec,
    gpu_temp: GaugeVec,
    gpu_clock: GaugeVec,
}

impl ProbeMetrics {
    pub(crate) fn register(r: &Registry) -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            r.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let gpu = |name: &str, help: &str| -> prometheus::Result<GaugeVec> {
            let g = GaugeVec::new(Opts::new(name, help), &["gpu"])?;
            r.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let up = IntGaugeVec::new(
            Opts::new(
                "candela_collector_up",
                "Whether a probe source was readable at the last sample (1) or not (0)",
            ),
            &["source"],
        )?;
        r.register(Box::new(up.clone()))?;
        let pressure = CounterVec::new(
            Opts::new(
                "candela_host_memory_pressure_stall_seconds_total",
                "Time tasks stalled on memory (Linux PSI), by kind (some|full)",
            ),
            &["kind"],
        )?;
        r.register(Box::new(pressure.clone()))?;
        Ok(Self {
            up,
            mem_total: gauge("candela_host_memory_total_bytes", "Host memory")?,
            mem_available: gauge(
                "candela_host_memory_available_bytes",
                "Host memory available for new allocations without swapping",
            )?,
            mem_used: gauge(
                "candela_host_memory_used_bytes",
                "Host memory in use (total - available)",
            )?,
            swap_total: gauge("candela_host_swap_total_bytes", "Host swap space")?,
            swap_used: gauge("candela_host_swap_used_bytes", "Host swap in use")?,
            pressure,
            #[cfg(target_os = "macos")]
            pressure_level: gauge(
                "candela_host_memory_pressure_level",
                "macOS memory-pressure level: 0 normal, 1 warning, 2 critical",
            )?,
            gpu_util: gpu(
                GPU_METRICS[0],
                "Fraction of the last sample period a kernel ran on the GPU",
            )?,
            gpu_mem_used: gpu(GPU_METRICS[1], "GPU memory in use")?,
            gpu_mem_total: gpu(GPU_METRICS[2], "GPU memory installed")?,
            gpu_power: gpu(GPU_METRICS[3], "GPU power draw")?,
            gpu_temp: gpu(GPU_METRICS[4], "GPU core temperature")?,
            gpu_clock: gpu(GPU_METRICS[5], "GPU graphics clock")?,
        })
    }

    fn set_up(&self, source: &str, ok: bool) {
        self.up.with_label_values(&[source]).set(i64::from(ok));
    }

    fn set_host(&self, m: Option<HostMemStats>) {
        self.set_up("meminfo", m.is_some());
        if let Some(m) = m {
            self.mem_total.set(clamp(m.total));
            self.mem_available.set(clamp(m.available));
            self.mem_used.set(clamp(m.used()));
            self.swap_total.set(clamp(m.swap_total));
            self.swap_used.set(clamp(m.swap_used()));
        }
    }

    #[cfg(target_os = "macos")]
    fn set_pressure_level(&self, level: Option<i64>) {
        self.set_up("sysctl_pressure", level.is_some());
        if let Some(l) = level {
            self.pressure_level.set(l);
        }
    }

    /// PSI totals are kernel counters; the Prometheus counter advances by the delta so
    /// that it equals the kernel's value in seconds.
    fn set_psi(&self, p: Option<PsiStats>, last: &mut PsiStats) {
        self.set_up("psi", p.is_some());
        let Some(p) = p else { return };
        for (kind, now, before) in [
            ("some", p.some_total_us, &mut last.some_total_us),
            ("full", p.full_total_us, &mut last.full_total_us),
        ] {
            let c = self.pressure.with_label_values(&[kind]);
            if now >= *before {
                c.inc_by((now - *before) as f64 / 1e6);
            }
            *before = now;
        }
    }

    fn set_gpus(&self, source: &str, gpus: Option<Vec<GpuStats>>) {
        self.set_up(source, gpus.is_some());
        for g in gpus.unwrap_or_default() {
            let idx = g.index.to_string();
            let l = [idx.as_str()];
            let set = |v: &GaugeVec, x: Option<f64>| {
                if let Some(x) = x {
                    v.with_label_values(&l).set(x);
                }
            };
            set(&self.gpu_util, g.utilization_ratio);
            set(&self.gpu_mem_used, g.memory_used_bytes.map(|b| b as f64));
            set(&self.gpu_mem_total, g.memory_total_bytes.map(|b| b as f64));
            set(&self.gpu_power, g.power_watts);
            set(&self.gpu_temp, g.temperature_celsius);
            set(&self.gpu_clock, g.clock_hertz);
        }
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Start the process-wide sampler thread (once; later calls are no-ops): it samples
/// every `interval` until the process exits.
pub fn start(interval: Duration) -> std::io::Result<()> {
    static STARTED: AtomicBool = AtomicBool::new(false);
    if STARTED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    let m = &super::get().probes;
    let spawned = std::thread::Builder::new()
        .name("candela-probes".into())
        .spawn(move || {
            let mut gpus = gpu::Gpus::open();
            let mut last_psi = PsiStats::default();
            loop {
                let t0 = std::time::Instant::now();
                m.set_host(read_host_mem());
                m.set_psi(read_psi(), &mut last_psi);
                #[cfg(target_os = "macos")]
                m.set_pressure_level(gpu::pressure_level());
                // On macOS this read itself takes the interval (IOReport deltas).
                m.set_gpus(gpu::SOURCE, gpus.read(interval));
                std::thread::sleep(interval.saturating_sub(t0.elapsed()));
            }
        });
    if let Err(e) = spawned {
        STARTED.store(false, Ordering::SeqCst);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
