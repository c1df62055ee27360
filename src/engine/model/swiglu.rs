//! `silu(gate) * up` with the arithmetic of ggml's x86 AVX-512 build
//! (`ggml_vec_swiglu_f32`): `expf` by ggml's vector approximation (`ggml_v_expf`,
//! adapted from ARM's optimized routines, ~1.5 ulp, not libm's), `x / (1 + e)`, times
//! `up`; elements past the last multiple of 16 use libm's `expf` as ggml's scalar tail
//! does. The AVX2 + FMA path (detected at run time) and the NEON path (aarch64)
//! compute the same lanes.

/// `y[i] = silu(g[i]) * u[i]`.
pub(crate) fn swiglu(g: &[f32], u: &[f32], y: &mut [f32]) {
    let n = y.len();
    let nv = n / 16 * 16;
    #[cfg(target_arch = "x86_64")]
    if has_simd() {
        // SAFETY: AVX2 and FMA were detected; lengths are checked by the slicing.
        unsafe { swiglu_avx2(&g[..nv], &u[..nv], &mut y[..nv]) };
        tail(g, u, y, nv);
        return;
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: NEON is baseline on aarch64; lengths are checked by the slicing.
    unsafe {
        swiglu_neon(&g[..nv], &u[..nv], &mut y[..nv])
    };
    #[cfg(not(target_arch = "aarch64"))]
    for i in 0..nv {
        y[i] = g[i] / (1.0 + expf_v(0.0 - g[i])) * u[i];
    }
    tail(g, u, y, nv);
}

/// GELU (tanh approximation) as ggml's CPU kernel computes it: the input rounded to
/// f16, looked up in a table of f16-rounded `0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715
/// x^2)))`; 0 at or below -10, the input itself at or above 10.
pub(crate) fn gelu_ggml(x: f32) -> f32 {
    if x <= -10.0 {
        return 0.0;
    }
    if x >= 10.0 {
        return x;
    }
    gelu_table()[half::f16::from_f32(x).to_bits() as usize].to_f32()
}

/// The GELU of every f16 value, rounded to f16 (built once: a `tanh` per element
/// costs more than the matmuls around it in a prefill).
fn gelu_table() -> &'static [half::f16] {
    static TABLE: std::sync::OnceLock<Vec<half::f16>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| half::f16::from_f32(gelu_exact(half::f16::from_bits(bits).to_f32())))
            .collect()
    })
}

/// `0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))` in f32, as ggml's table holds it.
fn gelu_exact(v: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044715;
    0.5 * v * (1.0 + (SQRT_2_OVER_PI * v * (1.0 + COEF_A * v * v)).tanh())
}

/// GeGLU: `y = gelu(g) * u` per element, as ggml's `geglu` (see [`gelu_ggml`]).
pub(crate) fn geglu(g: &[f32], u: &[f32], y: &mut [f32]) {
    let table = gelu_table();
    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
        *y = if g <= -10.0 {
            0.0
        } else if g >= 10.0 {
            g * u
        } else {
            table[half::f16::from_f32(g).to_bits() as usize].to_f32() * u
        };
    }
}

fn tail(g: &[f32], u: &[f32], y: &mut [f32], from: usize) {
    for i in from..y.len() {
        y[i] = g[i] / (1.0 + (-g[i]).exp()) * u[i];
    }
}

#[cfg(target_arch = "x86_64")]
fn has_simd() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

const SHIFT: u32 = 0x4b40_0000; // 0x1.8p23
const LOG2E: u32 = 0x3fb8_aa3b;
const LN2_HI: u32 = 0x3f31_7200;
const LN2_LO: u32 = 0x35bf_be8e;
const P: [u32; 5] = [
    0x3f7f_fff6, // b
    0x3eff_fedb, // b^2
    0x3e2a_af33, // b^3
    0x3d2b_9f17, // b^4
    0x3c07_2010, // b^5
];

fn c(bits: u32) -> f32 {
    f32::from_bits(bits)
}

/// One lane of ggml's AVX-512 `ggml_v_expf`.
fn expf_v(x: f32) -> f32 {
    let r = c(SHIFT);
    let z = x.mul_add(c(LOG2E), r);
    let n = z - r;
    let b = (-n).mul_add(c(LN2_LO), (-n).mul_add(c(LN2_HI), x));
    let u = b * b;
    let j = c(P[4])
        .mul_add(b, c(P[3]))
        .mul_add(u, c(P[2]).mul_add(b, c(P[1])))
        .mul_add(u, c(P[0]).mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    // `_mm512_scalef_ps(j, n)`: j * 2^n rounded once (n is an integer here).
    (j as f64 * (n as f64).exp2()) as f32
}

/// Eight lanes of the same arithmetic; lanes whose result could leave the normal
/// range (|n| > 125) are redone one by one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_avx2(g: &[f32], u: &[f32], y: &mut [f32]) {
    unsafe {
        use std::arch::x86_64::*;
        let set = |b: u32| _mm256_set1_ps(f32::from_bits(b));
        let (r, log2e, hi, lo) = (set(SHIFT), set(LOG2E), set(LN2_HI), set(LN2_LO));
        let p = [set(P[0]), set(P[1]), set(P[2]), set(P[3]), set(P[4])];
        let one = _mm256_set1_ps(1.0);
        let lim = _mm256_set1_ps(125.0);
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let mut i = 0;
        while i + 8 <= y.len() {
            let gx = _mm256_loadu_ps(g.as_ptr().add(i));
            let x = _mm256_sub_ps(_mm256_setzero_ps(), gx);
            let z = _mm256_fmadd_ps(x, log2e, r);
            let n = _mm256_sub_ps(z, r);
            let b = _mm256_fnmadd_ps(n, lo, _mm256_fnmadd_ps(n, hi, x));
            let uu = _mm256_mul_ps(b, b);
            let j = _mm256_fmadd_ps(
                _mm256_fmadd_ps(
                    _mm256_fmadd_ps(p[4], b, p[3]),
                    uu,
                    _mm256_fmadd_ps(p[2], b, p[1]),
                ),
                uu,
                _mm256_fmadd_ps(p[0], b, one),
            );
            let big = _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_and_ps(n, abs_mask), lim);
            if _mm256_movemask_ps(big) != 0 {
                for l in i..i + 8 {
                    y[l] = g[l] / (1.0 + expf_v(0.0 - g[l])) * u[l];
                }
            } else {
                // 2^n as a float: (n + 127) << 23; exact product since both stay normal.
                let k = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                    _mm256_cvtps_epi32(n),
                    _mm256_set1_epi32(127),
                )));
                let e = _mm256_mul_ps(j, k);
                let s = _mm256_div_ps(gx, _mm256_add_ps(one, e));
                _mm256_storeu_ps(
                    y.as_mut_ptr().add(i),
                    _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr().add(i))),
                );
            }
            i += 8;
        }
    }
}

/// [`swiglu_avx2`]'s arithmetic four lanes at a time with NEON (the x86 `fnmadd(a, b,
/// c)` is `vfmsq_f32(c, a, b)`, both `c - a * b` rounded once).
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn swiglu_neon(g: &[f32], u: &[f32], y: &mut [f32]) {
    unsafe {
        use std::arch::aarch64::*;
        let set = |b: u32| vdupq_n_f32(f32::from_bits(b));
        let (r, log2e, hi, lo) = (set(SHIFT), set(LOG2E), set(LN2_HI), set(LN2_LO));
        let p = [set(P[0]), set(P[1]), set(P[2]), set(P[3]), set(P[4])];
        let one = vdupq_n_f32(1.0);
        let lim = vdupq_n_f32(125.0);
        let mut i = 0;
        while i + 4 <= y.len() {
            let gx = vld1q_f32(g.as_ptr().add(i));
            let x = vsubq_f32(vdupq_n_f32(0.0), gx);
            let z = vfmaq_f32(r, x, log2e);
            let n = vsubq_f32(z, r);
            let b = vfmsq_f32(vfmsq_f32(x, n, hi), n, lo);
            let uu = vmulq_f32(b, b);
            // ((p4 b + p3) u + (p2 b + p1)) u + (p0 b + 1), each step fused.
            let j = vfmaq_f32(
                vfmaq_f32(one, p[0], b),
                vfmaq_f32(vfmaq_f32(p[1], p[2], b), vfmaq_f32(p[3], p[4], b), uu),
                uu,
            );
            if vmaxvq_u32(vcagtq_f32(n, lim)) != 0 {
                for l in i..i + 4 {
                    y[l] = g[l] / (1.0 + expf_v(0.0 - g[l])) * u[l];
                }
            } else {
                // 2^n as a float: (n + 127) << 23; exact product since both stay normal.
                let k = vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(
                    vcvtnq_s32_f32(n),
                    vdupq_n_s32(127),
                )));
                let s = vdivq_f32(gx, vaddq_f32(one, vmulq_f32(j, k)));
                vst1q_f32(
                    y.as_mut_ptr().add(i),
                    vmulq_f32(s, vld1q_f32(u.as_ptr().add(i))),
                );
            }
            i += 4;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector path equals the lane-by-lane definition bit for bit, over ordinary
    /// values and the edges (large magnitudes, zeros, subnormal results).
    #[test]
    fn simd_equals_scalar_definition() {
        let mut g: Vec<f32> = (0..4096).map(|i| (i as f32 - 2048.0) * 0.0137).collect();
        g.extend([
            0.0, -0.0, 87.0, -87.0, 88.5, -88.5, 100.0, -100.0, 104.0, -104.0, 150.0,
        ]);
        g.extend([
            -126.0 * std::f32::consts::LN_2,
            1e-30,
            -1e-30,
            200.0,
            -200.0,
        ]);
        while !g.len().is_multiple_of(16) {
            g.push(0.5);
        }
        g.push(3.0); // a scalar tail element
        let u: Vec<f32> = (0..g.len()).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let mut y = vec![0f32; g.len()];
        swiglu(&g, &u, &mut y);
        for i in 0..g.len() {
            let want = if i < g.len() / 16 * 16 {
                g[i] / (1.0 + expf_v(0.0 - g[i])) * u[i]
            } else {
                g[i] / (1.0 + (-g[i]).exp()) * u[i]
            };
            assert_eq!(
                y[i].to_bits(),
                want.to_bits(),
                "g {}: {} vs {want}",
                g[i],
                y[i]
            );
            let exact = g[i] as f64 / (1.0 + (-(g[i] as f64)).exp()) * u[i] as f64;
            assert!(
                (y[i] as f64 - exact).abs() <= 1e-6 * exact.abs().max(1e-30),
                "g {}: {} vs {exact}",
                g[i],
                y[i]
            );
        }
    }

    /// The table holds, for every f16 input in (-10, 10), the f16-rounded formula of that
    /// input; outside it GELU is 0 or the input, as ggml's kernel has it.
    #[test]
    fn gelu_table_is_the_rounded_formula() {
        for bits in 0..=u16::MAX {
            let x = half::f16::from_bits(bits).to_f32();
            if !x.is_finite() {
                continue;
            }
            let want = if x <= -10.0 {
                0.0
            } else if x >= 10.0 {
                x
            } else {
                half::f16::from_f32(gelu_exact(x)).to_f32()
            };
            assert_eq!(gelu_ggml(x).to_bits(), want.to_bits(), "x = {x}");
        }
        // Inputs between f16 values take their rounded neighbour's entry.
        assert_eq!(gelu_ggml(1.000_1), gelu_ggml(1.0));
        assert!((gelu_ggml(1.0) - 0.841_2).abs() < 1e-3);
        assert_eq!(gelu_ggml(-12.0), 0.0);
        assert_eq!(gelu_ggml(12.5), 12.5);
    }
}
