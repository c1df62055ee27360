//! How the fused CUDA path lays GGUF weights out on the device, kept apart from the
//! device code so that it builds and is tested without a GPU.
//!
//! The kernels read four layouts, each as rows of 32-element blocks: the block's quants
//! (16 bytes of nibbles or 32 signed bytes, 16-byte aligned) in one array and the
//! scales in another (a pair of f32 per block, but for Q4_K). Every GGUF type the path
//! takes is repacked into one of them at load, exactly (the repacked weights dequantize
//! to the GGUF file's values bit for bit):
//!
//! - [`Pack::Q4_0`] (Q4_0): nibbles `q`, pair `(d, 0)`, value `d * (q - 8)`.
//! - [`Pack::Q4_1`] (Q4_1): nibbles `q`, pair `(d, m)`, value `d * q + m`.
//! - [`Pack::Q4K`] (Q4_K): nibbles `q`; per row, the super-blocks' `(d, -dmin)` f32 pairs,
//!   then each 32's 6-bit scale and min as two bytes `(sc, m)` (3 bytes of scales per 32
//!   instead of 8); value `(d * sc) * q + (-dmin) * m`, the Q4_1 arithmetic with the pair
//!   `(d * sc, -dmin * m)`. Repacked as Q4_1 with that pair instead when asked (`wide`:
//!   the same values and arithmetic, more bytes).
//! - [`Pack::Q8`] (Q8_0, Q5_0, Q6_K): signed bytes `q`, pair `(d0, d1)`, value `d0 * q`
//!   for the block's first 16 elements and `d1 * q` for the last 16. Q5_0's 5-bit
//!   values are stored as `q - 16`, Q6_K's 6-bit ones as `q - 32` with the 16-element
//!   sub-block scales `d * sc`; Q8_0 has `d0 = d1 = d`.
//!
//! Nibbles of a block: byte `j` holds element `j` (low) and element `j + 16` (high).
//!
//! Depends on nothing in the engine; `model::cuda` is its only user.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use candle_core::quantized::GgmlDType;
use half::f16;

/// A device layout of the fused kernels (the `KIND_*` constants of `decode.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pack {
    Q4_0 = 0,
    Q4_1 = 1,
    Q8 = 2,
    Q4K = 3,
}

impl Pack {
    /// The layout a GGUF type is repacked into, or None when the kernels do not take it.
    pub fn of(dt: GgmlDType) -> Option<Self> {
        match dt {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q8_0 | GgmlDType::Q5_0 | GgmlDType::Q6K => Some(Self::Q8),
            _ => None,
        }
    }

    /// Whether the wide prefill's kernels were checked on a GPU for this layout (it
    /// prefills wide by default only where every projection is in one of these).
    pub fn wide_checked(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q4K | Self::Q8)
    }

    /// Bytes of quants per 32-element block.
    pub fn quant_bytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::Q4K => 16,
            Self::Q8 => 32,
        }
    }

    /// Bytes of scales of a row of `k` elements.
    pub fn scale_bytes(self, k: usize) -> usize {
        match self {
            Self::Q4K => 3 * (k / 32),
            _ => 8 * (k / 32),
        }
    }
}

/// (bytes per GGUF block, elements per GGUF block).
fn block_size(dt: GgmlDType) -> Option<(usize, usize)> {
    Some(match dt {
        GgmlDType::Q4_0 => (18, 32),
        GgmlDType::Q4_1 => (20, 32),
        GgmlDType::Q8_0 => (34, 32),
        GgmlDType::Q5_0 => (22, 32),
        GgmlDType::Q4K => (144, 256),
        GgmlDType::Q6K => (210, 256),
        _ => return None,
    })
}

/// A `(n, k)` matrix repacked for the device: `qs` (quant bytes, `n * k / 32` blocks)
/// and `dm` (the scales, [`Pack::scale_bytes`] a row), both row-major.
#[derive(Debug)]
pub struct Packed {
    pub pack: Pack,
    pub n: usize,
    pub k: usize,
    pub qs: Vec<u8>,
    pub dm: Vec<u8>,
}

/// Matrices that read the same input, stacked by rows: consecutive ones of the same
/// layout become one part (one launch), a change of layout starts the next part.
pub fn stack(mats: impl IntoIterator<Item = Packed>) -> Vec<Packed> {
    let mut parts: Vec<Packed> = Vec::new();
    for m in mats {
        match parts.last_mut() {
            Some(last) if last.pack == m.pack && last.k == m.k => {
                last.qs.extend(m.qs);
                last.dm.extend(m.dm);
                last.n += m.n;
            }
            _ => parts.push(m),
        }
    }
    parts
}

fn h(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn push_pair(dm: &mut Vec<u8>, a: f32, b: f32) {
    dm.extend_from_slice(&a.to_le_bytes());
    dm.extend_from_slice(&b.to_le_bytes());
}

/// Nibbles of 32 values (each 0..16) in the kernels' order.
fn push_nibbles(qs: &mut Vec<u8>, v: &[u8; 32]) {
    for j in 0..16 {
        qs.push(v[j] | (v[j + 16] << 4));
    }
}

/// Q4_K's 6-bit scale and min of sub-block `j` (0..8) from its 12 packed bytes.
fn q4k_scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Repack `raw` (GGUF blocks of a `(n, k)` matrix of type `dt`, rows of whole blocks);
/// `wide`: Q4_K as [`Pack::Q4_1`] rather than [`Pack::Q4K`].
pub fn repack(dt: GgmlDType, raw: &[u8], n: usize, k: usize, wide: bool) -> Result<Packed, String> {
    let (Some(pack), Some((bsz, bel))) = (Pack::of(dt), block_size(dt)) else {
        return Err(format!("{dt:?} is not a type of the fused kernels"));
    };
    let pack = if pack == Pack::Q4K && wide {
        Pack::Q4_1
    } else {
        pack
    };
    if !k.is_multiple_of(bel) || raw.len() != n * k / bel * bsz {
        return Err(format!(
            "bad {dt:?} tensor: {} bytes for {n}x{k}",
            raw.len()
        ));
    }
    let nb = n * k / 32;
    let mut qs = Vec::with_capacity(nb * pack.quant_bytes());
    let mut dm = Vec::with_capacity(n * pack.scale_bytes(k));
    // Pack::Q4K: the current row's (sc, m) bytes, written after its super-blocks' pairs.
    let mut row_sm: Vec<u8> = Vec::with_capacity(2 * (k / 32));
    for (bi, blk) in raw.chunks_exact(bsz).enumerate() {
        match dt {
            GgmlDType::Q4_0 => {
                push_pair(&mut dm, h(blk, 0), 0.0);
                qs.extend_from_slice(&blk[2..18]);
            }
            GgmlDType::Q4_1 => {
                push_pair(&mut dm, h(blk, 0), h(blk, 2));
                qs.extend_from_slice(&blk[4..20]);
            }
            GgmlDType::Q8_0 => {
                let d = h(blk, 0);
                push_pair(&mut dm, d, d);
                qs.extend_from_slice(&blk[2..34]);
            }
            GgmlDType::Q5_0 => {
                let d = h(blk, 0);
                push_pair(&mut dm, d, d);
                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                let q = &blk[6..22];
                for j in 0..32 {
                    let nib = if j < 16 { q[j] & 0x0F } else { q[j - 16] >> 4 };
                    let v = (nib | ((((qh >> j) & 1) as u8) << 4)) as i8 - 16;
                    qs.push(v as u8);
                }
            }
            GgmlDType::Q4K => {
                let (d, dmin) = (h(blk, 0), h(blk, 2));
                let scales = &blk[4..16];
                let q = &blk[16..144];
                if pack == Pack::Q4K {
                    push_pair(&mut dm, d, -dmin);
                }
                for sub in 0..8 {
                    let (sc, m) = q4k_scale_min(scales, sub);
                    if pack == Pack::Q4K {
                        row_sm.extend([sc, m]);
                    } else {
                        push_pair(&mut dm, d * sc as f32, -(dmin * m as f32));
                    }
                    // Sub-blocks 2c and 2c+1 share 32 bytes: low nibbles, then high.
                    let bytes = &q[(sub / 2) * 32..(sub / 2) * 32 + 32];
                    let mut v = [0u8; 32];
                    for (l, b) in bytes.iter().enumerate() {
                        v[l] = if sub % 2 == 0 { b & 0x0F } else { b >> 4 };
                    }
                    push_nibbles(&mut qs, &v);
                }
                if pack == Pack::Q4K && (bi + 1) % (k / 256) == 0 {
                    dm.append(&mut row_sm);
                }
            }
            GgmlDType::Q6K => {
                let ql = &blk[0..128];
                let qhb = &blk[128..192];
                let sc = &blk[192..208];
                let d = h(blk, 208);
                let mut v = [0i8; 256];
                for half in 0..2 {
                    let (l0, h0, e0) = (half * 64, half * 32, half * 128);
                    for l in 0..32 {
                        let hb = qhb[h0 + l];
                        let a = ql[l0 + l];
                        let b = ql[l0 + l + 32];
                        v[e0 + l] = ((a & 0x0F) | ((hb & 3) << 4)) as i8 - 32;
                        v[e0 + l + 32] = ((b & 0x0F) | (((hb >> 2) & 3) << 4)) as i8 - 32;
                        v[e0 + l + 64] = ((a >> 4) | (((hb >> 4) & 3) << 4)) as i8 - 32;
                        v[e0 + l + 96] = ((b >> 4) | (((hb >> 6) & 3) << 4)) as i8 - 32;
                    }
                }
                for b in 0..8 {
                    let (s0, s1) = (sc[2 * b] as i8 as f32, sc[2 * b + 1] as i8 as f32);
                    push_pair(&mut dm, d * s0, d * s1);
                    qs.extend(v[b * 32..b * 32 + 32].iter().map(|&x| x as u8));
                }
            }
            _ => unreachable!("Pack::of and block_size cover the same types"),
        }
    }
    Ok(Packed { pack, n, k, qs, dm })
}

#[cfg(test)]
impl Packed {
    /// Every block's (scale, offset) or (first half's, second half's scale) pair, as the
    /// kernels form it.
    pub fn pairs(&self) -> Vec<[f32; 2]> {
        let (k, nb) = (self.k, self.k / 32);
        let f = |b: &[u8], i: usize| f32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut pairs = Vec::with_capacity(self.n * nb);
        for row in self.dm.chunks_exact(self.pack.scale_bytes(k)) {
            for b in 0..nb {
                pairs.push(if self.pack == Pack::Q4K {
                    let (d, nmin) = (f(row, (b / 8) * 8), f(row, (b / 8) * 8 + 4));
                    let (sc, m) = (row[nb + 2 * b], row[nb + 2 * b + 1]);
                    [d * sc as f32, nmin * m as f32]
                } else {
                    [f(row, 8 * b), f(row, 8 * b + 4)]
                });
            }
        }
        pairs
    }

    /// The weights as floats, the way the kernels form them.
    pub fn dequantize(&self) -> Vec<f32> {
        let qb = self.pack.quant_bytes();
        let pairs = self.pairs();
        let mut out = Vec::with_capacity(self.qs.len() / qb * 32);
        for (q, p) in self.qs.chunks_exact(qb).zip(pairs) {
            if self.pack == Pack::Q8 {
                for (e, &b) in q.iter().enumerate() {
                    out.push(p[e / 16] * b as i8 as f32);
                }
                continue;
            }
            for e in 0..32 {
                let nib = if e < 16 { q[e] & 0x0F } else { q[e - 16] >> 4 };
                out.push(if self.pack == Pack::Q4_0 {
                    p[0] * (nib as f32 - 8.0)
                } else {
                    p[0] * nib as f32 + p[1]
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::ggml_file::qtensor_from_ggml;
    use candle_core::Device;

    /// Random GGUF blocks of `dt` with normal f16 scales (2^-10 .. 2^-1).
    fn random_blocks(dt: GgmlDType, n: usize, k: usize, seed: u64) -> Vec<u8> {
        let (bsz, bel) = block_size(dt).expect("covered type");
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let mut raw = vec![0u8; n * k / bel * bsz];
        for blk in raw.chunks_exact_mut(bsz) {
            for b in blk.iter_mut() {
                *b = next() as u8;
            }
            let f16_at: &[usize] = match dt {
                GgmlDType::Q4_1 | GgmlDType::Q4K => &[0, 2],
                GgmlDType::Q6K => &[208],
                _ => &[0],
            };
            for &o in f16_at {
                let r = next();
                let bits = ((5 + r % 10) << 10 | (r >> 8) & 0x3FF) as u16;
                blk[o..o + 2].copy_from_slice(&bits.to_le_bytes());
            }
        }
        raw
    }

    #[test]
    fn repacked_weights_dequantize_to_the_files_values() {
        let types = [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q5_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ];
        for (i, dt) in types.into_iter().enumerate() {
            for (n, k) in [(3, 256), (5, 512), (2, 4864)] {
                let raw = random_blocks(dt, n, k, 17 + i as u64);
                for wide in [false, true] {
                    check(dt, &raw, n, k, wide);
                }
            }
        }
    }

    fn check(dt: GgmlDType, raw: &[u8], n: usize, k: usize, wide: bool) {
        let p = repack(dt, raw, n, k, wide).expect("repack");
        let pack = match (dt, wide) {
            (GgmlDType::Q4K, true) => Pack::Q4_1,
            _ => Pack::of(dt).expect("covered"),
        };
        assert_eq!(p.pack, pack);
        assert_eq!(p.qs.len(), n * k / 32 * p.pack.quant_bytes());
        assert_eq!(p.dm.len(), n * p.pack.scale_bytes(k));
        let want: Vec<f32> = qtensor_from_ggml(dt, raw, vec![n, k], &Device::Cpu)
            .expect("qtensor")
            .dequantize(&Device::Cpu)
            .expect("dequantize")
            .flatten_all()
            .expect("flatten")
            .to_vec1()
            .expect("floats");
        let got = p.dequantize();
        assert_eq!(got.len(), want.len());
        for (j, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g == w,
                "{dt:?} {n}x{k} wide {wide} element {j}: repacked {g}, file {w}"
            );
        }
    }

    #[test]
    fn stacks_split_where_the_layout_changes() {
        let (k, seed) = (512, 5);
        let mats = |types: &[(GgmlDType, usize)]| -> Vec<(Packed, Vec<f32>)> {
            types
                .iter()
                .map(|&(dt, n)| {
                    let raw = random_blocks(dt, n, k, seed + n as u64);
                    let p = repack(dt, &raw, n, k, false).expect("repack");
                    let v = p.dequantize();
                    (p, v)
                })
                .collect()
        };
        // Qwen2.5-Coder's Q|K|V: Q5_0, Q5_0, Q8_0 -> one Q8 part.
        // Llama-3 Q4_K_M's: Q4_K, Q4_K, Q6_K -> a Q4K part and a Q8 part.
        for (types, want) in [
            (
                vec![
                    (GgmlDType::Q5_0, 4),
                    (GgmlDType::Q5_0, 2),
                    (GgmlDType::Q8_0, 2),
                ],
                vec![(Pack::Q8, 8)],
            ),
            (
                vec![
                    (GgmlDType::Q4K, 4),
                    (GgmlDType::Q4K, 2),
                    (GgmlDType::Q6K, 2),
                ],
                vec![(Pack::Q4K, 6), (Pack::Q8, 2)],
            ),
            (
                vec![
                    (GgmlDType::Q4_0, 1),
                    (GgmlDType::Q8_0, 1),
                    (GgmlDType::Q4_0, 3),
                ],
                vec![(Pack::Q4_0, 1), (Pack::Q8, 1), (Pack::Q4_0, 3)],
            ),
        ] {
            let ms = mats(&types);
            let all: Vec<f32> = ms.iter().flat_map(|(_, v)| v.clone()).collect();
            let parts = stack(ms.into_iter().map(|(p, _)| p));
            let got: Vec<(Pack, usize)> = parts.iter().map(|p| (p.pack, p.n)).collect();
            assert_eq!(got, want);
            let joined: Vec<f32> = parts.iter().flat_map(|p| p.dequantize()).collect();
            assert_eq!(joined, all, "stacked rows keep their values and order");
        }
    }

    /// The compact Q4_K layout gives the kernels the very pairs the wide one stores, so
    /// both run the same arithmetic on the same bits.
    #[test]
    fn compact_q4k_pairs_equal_the_wide_layouts() {
        for (n, k) in [(3, 256), (4, 4864)] {
            let raw = random_blocks(GgmlDType::Q4K, n, k, 99);
            let compact = repack(GgmlDType::Q4K, &raw, n, k, false).expect("compact");
            let wide = repack(GgmlDType::Q4K, &raw, n, k, true).expect("wide");
            assert_eq!(compact.qs, wide.qs);
            let bits = |p: &Packed| -> Vec<[u32; 2]> {
                p.pairs()
                    .iter()
                    .map(|[a, b]| [a.to_bits(), b.to_bits()])
                    .collect()
            };
            assert_eq!(bits(&compact), bits(&wide));
            assert_eq!(compact.dm.len() * 8, wide.dm.len() * 3);
        }
    }

    #[test]
    fn bad_sizes_and_types_are_refused() {
        assert!(repack(GgmlDType::Q4K, &[0u8; 144], 1, 128, false).is_err());
        assert!(repack(GgmlDType::Q4K, &[0u8; 143], 1, 256, false).is_err());
        assert!(repack(GgmlDType::Q5K, &[0u8; 176], 1, 256, false).is_err());
        assert!(repack(GgmlDType::F16, &[0u8; 64], 1, 32, false).is_err());
        assert_eq!(Pack::of(GgmlDType::Q6K), Some(Pack::Q8));
        assert_eq!(Pack::of(GgmlDType::Q4K), Some(Pack::Q4K));
    }
}
