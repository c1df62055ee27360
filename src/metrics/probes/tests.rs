use super::*;

#[test]
fn meminfo_parses_kb_into_bytes() {
    let t = "MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    4000000 kB\n\
             SwapTotal:       2000000 kB\nSwapFree:        1500000 kB\n";
    let s = parse_meminfo(t).unwrap();
    assert_eq!(s.total, 16_000_000 * 1024);
    assert_eq!(s.available, 4_000_000 * 1024);
    assert_eq!(s.used(), 12_000_000 * 1024);
    assert_eq!(s.swap_used(), 500_000 * 1024);
    assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
}

#[test]
fn psi_parses_totals() {
    let t = "some avg10=0.00 avg60=0.00 avg300=0.00 total=1234567\n\
             full avg10=0.00 avg60=0.00 avg300=0.00 total=89\n";
    let p = parse_psi(t).unwrap();
    assert_eq!(p.some_total_us, 1_234_567);
    assert_eq!(p.full_total_us, 89);
    assert_eq!(parse_psi(""), None);
}

#[test]
fn gpu_readings_set_every_gpu_gauge() {
    let r = Registry::new();
    let m = ProbeMetrics::register(&r).unwrap();
    m.set_gpus(
        "nvml",
        Some(vec![GpuStats {
            index: 0,
            utilization_ratio: Some(0.5),
            memory_used_bytes: Some(1 << 30),
            memory_total_bytes: Some(8 << 30),
            power_watts: Some(120.0),
            temperature_celsius: Some(60.0),
            clock_hertz: Some(1.5e9),
        }]),
    );
    let fams = r.gather();
    for name in GPU_METRICS {
        let f = fams.iter().find(|f| f.name() == name).expect(name);
        assert_eq!(f.get_metric()[0].get_label()[0].value(), "0");
    }
    let up = fams.iter().find(|f| f.name() == "candela_collector_up");
    assert_eq!(up.unwrap().get_metric()[0].get_gauge().get_value(), 1.0);
}

#[test]
fn apple_readings_map_to_gpu_stats() {
    let g = apple_gpu_stats(0.25, 1398, 3.5, 41.0, Some((512 << 20, 16 << 30)));
    assert_eq!(g.utilization_ratio, Some(0.25));
    assert_eq!(g.clock_hertz, Some(1398e6));
    assert_eq!(g.power_watts, Some(3.5));
    assert_eq!(g.temperature_celsius, Some(41.0));
    assert_eq!(g.memory_used_bytes, Some(512 << 20));
    assert_eq!(g.memory_total_bytes, Some(16 << 30));
    // No SMC temperature, idle clock, no Metal device, garbage ratio: no readings.
    let g = apple_gpu_stats(f32::NAN, 0, 0.0, 0.0, None);
    assert_eq!(g.utilization_ratio, None);
    assert_eq!(g.clock_hertz, None);
    assert_eq!(g.power_watts, Some(0.0));
    assert_eq!(g.temperature_celsius, None);
    assert_eq!(g.memory_used_bytes, None);
    assert_eq!(
        apple_gpu_stats(1.7, 1, 1.0, 1.0, None).utilization_ratio,
        Some(1.0)
    );
}

#[test]
fn sysctl_pressure_levels_map_to_gauge_values() {
    assert_eq!(pressure_level_from_sysctl(1), Some(0));
    assert_eq!(pressure_level_from_sysctl(2), Some(1));
    assert_eq!(pressure_level_from_sysctl(4), Some(2));
    assert_eq!(pressure_level_from_sysctl(0), None);
    assert_eq!(pressure_level_from_sysctl(3), None);
}

#[test]
fn psi_counter_tracks_kernel_total() {
    let r = Registry::new();
    let m = ProbeMetrics::register(&r).unwrap();
    let mut last = PsiStats::default();
    for (some, full) in [(1_500_000, 0), (2_000_000, 250_000)] {
        let p = PsiStats {
            some_total_us: some,
            full_total_us: full,
        };
        m.set_psi(Some(p), &mut last);
    }
    let get = |k: &str| m.pressure.with_label_values(&[k]).get();
    assert!((get("some") - 2.0).abs() < 1e-9);
    assert!((get("full") - 0.25).abs() < 1e-9);
}
