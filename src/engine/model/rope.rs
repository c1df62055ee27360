//! Rotary tables, built the way ggml's rope cache builds them (`ggml_rope_cache_init`
//! and `rope_yarn`): the angle of pair `i` at position `p` is `p` times `base^(-2/dim)`
//! applied `i` times in f32, divided by the pair's frequency factor (llama3 scaling),
//! times the frequency scale (linear, YaRN), mixed with the unscaled angle by YaRN's
//! ramp; then f32 `cos`/`sin` times the magnitude scale. With no scaling every step is
//! exact, so the tables equal the plain ones bit for bit. (Angles computed in f64
//! differ in the last bits at high positions; llama.cpp's greedy outputs are followed
//! further with ggml's.)

use super::config::RopeScaling;

/// YaRN's correction dims: the pair range over which it blends interpolation and
/// extrapolation (`ggml_rope_yarn_corr_dims`).
fn corr_dims(dim: usize, n_ctx_orig: usize, base: f32, s: &RopeScaling) -> [f32; 2] {
    let corr = |n_rot: f32| {
        dim as f32 * (n_ctx_orig as f32 / (n_rot * 2.0 * std::f32::consts::PI)).ln()
            / (2.0 * base.ln())
    };
    let start = corr(s.beta_fast).floor();
    let end = corr(s.beta_slow).ceil();
    [start.max(0.0), end.min(dim as f32 - 1.0)]
}

/// YaRN's magnitude scale for a context extended `factor` times, with log multiplier
/// `m`: `0.1 m ln(factor) + 1` (1 when the context is not extended).
pub(crate) fn yarn_mscale(factor: f32, m: f32) -> f32 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * m * factor.ln() + 1.0
    }
}

/// The attention factor to store for a total magnitude scale `total`: [`tables`]
/// multiplies in `1 + 0.1 ln(factor)` itself (as ggml's `rope_yarn` does), so it is
/// divided out here.
pub(crate) fn yarn_attn_factor(factor: f32, total: f32) -> f32 {
    total * (1.0 / (1.0 + 0.1 * factor.ln()))
}

/// One pair's (cos, sin), as `rope_yarn`.
fn yarn(theta_extrap: f32, i0: usize, s: &RopeScaling, corr: [f32; 2]) -> (f32, f32) {
    let theta_interp = s.freq_scale * theta_extrap;
    let mut theta = theta_interp;
    let mut mscale = s.attn_factor;
    if s.ext_factor != 0.0 {
        let y = ((i0 / 2) as f32 - corr[0]) / (corr[1] - corr[0]).max(0.001);
        let ramp_mix = (1.0 - y.clamp(0.0, 1.0)) * s.ext_factor;
        theta = theta_interp * (1.0 - ramp_mix) + theta_extrap * ramp_mix;
        mscale *= 1.0 + 0.1 * (1.0 / s.freq_scale).ln();
    }
    (theta.cos() * mscale, theta.sin() * mscale)
}

/// Tables `(ctx, dim / 2)` of cos and sin, row-major. `factors` divides each pair's
/// angle (llama3's `rope_freqs`), one per pair.
pub(super) fn tables(
    dim: usize,
    base: f32,
    ctx: usize,
    s: &RopeScaling,
    factors: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let theta_scale = base.powf(-2.0 / dim as f32);
    let n_ctx_orig = if s.n_ctx_orig > 0 { s.n_ctx_orig } else { ctx };
    let corr = corr_dims(dim, n_ctx_orig, base, s);
    let mut cos = Vec::with_capacity(ctx * dim / 2);
    let mut sin = Vec::with_capacity(ctx * dim / 2);
    for p in 0..ctx {
        let mut theta = p as f32;
        for i in 0..dim / 2 {
            let ff = factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0);
            let (c, s_) = yarn(theta / ff, 2 * i, s, corr);
            cos.push(c);
            sin.push(s_);
            theta *= theta_scale;
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With no scaling the tables are the plain ones, bit for bit.
    #[test]
    fn unscaled_tables_are_the_plain_angles() {
        let (dim, base, ctx) = (64, 10_000.0f32, 300);
        let (cos, sin) = tables(dim, base, ctx, &RopeScaling::default(), None);
        let theta_scale = base.powf(-2.0 / dim as f32);
        for p in [0usize, 1, 17, 299] {
            let mut theta = p as f32;
            for i in 0..dim / 2 {
                assert_eq!(cos[p * dim / 2 + i].to_bits(), theta.cos().to_bits());
                assert_eq!(sin[p * dim / 2 + i].to_bits(), theta.sin().to_bits());
                theta *= theta_scale;
            }
        }
    }

    /// Linear scaling by 4 at position 4p is the plain angle at p (pair 0: exact).
    #[test]
    fn linear_scaling_and_frequency_factors_slow_the_angles() {
        let s = RopeScaling {
            freq_scale: 0.25,
            ..RopeScaling::default()
        };
        let (cos_s, _) = tables(8, 10_000.0, 64, &s, None);
        let (cos, _) = tables(8, 10_000.0, 64, &RopeScaling::default(), None);
        assert_eq!(cos_s[40 * 4], cos[10 * 4]);
        // A factor of 2 on pair 1 halves its angle only.
        let (cf, _) = tables(
            8,
            10_000.0,
            64,
            &RopeScaling::default(),
            Some(&[1.0, 2.0, 1.0, 1.0]),
        );
        assert_eq!(cf[7 * 4], cos[7 * 4]);
        assert_ne!(cf[7 * 4 + 1], cos[7 * 4 + 1]);
    }

    /// YaRN keeps the fastest pairs (extrapolated) near the unscaled angle and moves the
    /// slowest ones to the interpolated angle.
    #[test]
    fn yarn_blends_between_extrapolation_and_interpolation() {
        let s = RopeScaling {
            freq_scale: 0.25,
            ext_factor: 1.0,
            attn_factor: 1.0,
            n_ctx_orig: 4096,
            ..RopeScaling::default()
        };
        let dim = 64;
        let corr = corr_dims(dim, 4096, 10_000.0, &s);
        assert!(corr[0] < corr[1], "{corr:?}");
        let (t0, _) = yarn(100.0, 0, &s, corr);
        let m = 1.0 + 0.1 * 4f32.ln();
        assert!((t0 - 100f32.cos() * m).abs() < 1e-6);
        let (tl, _) = yarn(100.0, dim - 2, &s, corr);
        assert!((tl - 25f32.cos() * m).abs() < 1e-6);
    }
}
