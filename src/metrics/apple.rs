//! Apple Silicon probes (macOS only, compiled there and type-checked here with
//! `scripts/macos/check.sh`; never run on hardware by us):
//!
//! - GPU active residency, clock, power and temperature from IOReport / SMC through the
//!   `macmon` crate (no sudo). Its sampler measures over an interval, so [`Gpus::read`]
//!   blocks for the probe interval — it runs on the sampler thread only.
//! - With the `metal` feature: bytes Metal has allocated in this process
//!   (`currentAllocatedSize`, reported as GPU memory used) and the device's
//!   `recommendedMaxWorkingSetSize` (reported as GPU memory total) — on unified memory
//!   the share of RAM the GPU may use before the system starts paging.
//! - The kernel's memory-pressure level (`kern.memorystatus_vm_pressure_level`).

use std::time::Duration;

use super::probes::{apple_gpu_stats, pressure_level_from_sysctl, GpuStats};

/// The `candela_collector_up{source}` label of the GPU probe on this platform.
pub const SOURCE: &str = "ioreport";

pub struct Gpus {
    sampler: Option<macmon::Sampler>,
    #[cfg(feature = "metal")]
    metal: Option<objc2::rc::Retained<objc2::runtime::ProtocolObject<dyn objc2_metal::MTLDevice>>>,
}

impl Gpus {
    pub fn open() -> Self {
        let sampler = match macmon::Sampler::new() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!("IOReport sampler unavailable, no GPU metrics: {e}");
                None
            }
        };
        Self {
            sampler,
            #[cfg(feature = "metal")]
            metal: objc2_metal::MTLCreateSystemDefaultDevice(),
        }
    }

    /// One reading over `interval` (blocks that long); `None` when IOReport is not
    /// usable.
    pub fn read(&mut self, interval: Duration) -> Option<Vec<GpuStats>> {
        let ms = u32::try_from(interval.as_millis())
            .unwrap_or(u32::MAX)
            .max(100);
        let m = match self.sampler.as_mut()?.get_metrics(ms) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!("IOReport sample failed: {e}");
                return None;
            }
        };
        Some(vec![apple_gpu_stats(
            m.gpu_active_ratio,
            m.gpu_freq_mhz,
            m.gpu_power,
            m.temp.gpu_temp_avg,
            self.metal_memory(),
        )])
    }

    /// (allocated by this process, recommended working-set size) in bytes.
    #[cfg(feature = "metal")]
    fn metal_memory(&self) -> Option<(u64, u64)> {
        use objc2_metal::MTLDevice;
        let d = self.metal.as_ref()?;
        Some((
            d.currentAllocatedSize() as u64,
            d.recommendedMaxWorkingSetSize(),
        ))
    }

    #[cfg(not(feature = "metal"))]
    fn metal_memory(&self) -> Option<(u64, u64)> {
        None
    }
}

/// The kernel's memory-pressure level: 0 normal, 1 warning, 2 critical; `None` when the
/// sysctl cannot be read.
pub fn pressure_level() -> Option<i64> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>();
    // SAFETY: the name is NUL-terminated, `v` and `len` are valid for the call, and the
    // kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::sysctlbyname(
            c"kern.memorystatus_vm_pressure_level".as_ptr(),
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    (rc == 0).then(|| pressure_level_from_sysctl(v)).flatten()
}
