//! The CPU forward pass: the same model as [`Model::forward`]'s tensor path, run on
//! reused host buffers with fused loops — RMSNorm, RoPE, attention straight over the
//! f16, bf16 or q8_0 cache, SiLU·up — and our quantized kernels for the projections. No tensor op
//! and no allocation per layer; the thread pool is entered once per projection and
//! once per layer for attention.
//!
//! The arithmetic follows the tensor path (and through it ggml's): activations
//! quantized like ggml, Q and the attention weights rounded to f16 like ggml's
//! flash-attention kernel, rotary angles built as ggml builds them. Over a bf16 cache
//! attention runs in f32, as the tensor path's does ([`attn::attend_heads_bf16`]).

use candle_core::{Module, Result, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use super::{Act, Embed, Expert, Mlp, Model, MoeMlp, Proj, SeqInput, Weight};
use crate::engine::kernels::attn;
use crate::engine::kernels::quant::{KActs, QActs};
use crate::kv::{dtype::quantize_q8_row, HostKvMut};

/// One sequence's cache of one layer, as attention reads it: f16 or bf16 K/V, or q8_0
/// bytes and scales; `(n_kv_heads, capacity, width)` each, slot 0 holding position `base`.
#[derive(Clone, Copy)]
enum KvView<'a> {
    F16(&'a [f16], &'a [f16]),
    BF16(&'a [bf16], &'a [bf16]),
    Q8(attn::Q8Rows<'a>),
}

/// Debugging aid: with `CANDELA_DUMP_DIR` set, every forward pass writes its
/// intermediate values (raw little-endian f32, named as llama.cpp's graph names them:
/// `attn_norm-0`, `Qcur-0`, `kqv_out-0`, ...) to `$CANDELA_DUMP_DIR/callNN/`, for
/// op-by-op comparison with llama.cpp's (`tests/fixtures/dump_llama.py`). Off: one
/// branch per op.
mod dump {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;

    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    static CALL: AtomicUsize = AtomicUsize::new(0);

    /// The folder for this forward pass, when dumping is on.
    pub(super) fn begin() -> Option<PathBuf> {
        let root = DIR
            .get_or_init(|| std::env::var_os("CANDELA_DUMP_DIR").map(PathBuf::from))
            .as_ref()?;
        let d = root.join(format!("call{:02}", CALL.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&d).ok()?;
        Some(d)
    }

    /// `name` is formatted only when dumping is on (no allocation per op otherwise).
    pub(super) fn write(dir: &Option<PathBuf>, name: std::fmt::Arguments<'_>, v: &[f32]) {
        if let Some(d) = dir {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            let _ = std::fs::write(d.join(format!("{name}.f32")), bytes);
        }
    }
}

/// Buffers reused from one forward pass to the next (they only grow).
#[derive(Debug, Default)]
pub(super) struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    gu: Vec<f32>,
    act: Vec<f32>,
    tmp: Vec<f32>,
    acts: QActs,
    kacts: KActs,
    /// Per row: (sequence index, position).
    rows: Vec<(usize, usize)>,
}

fn fit(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// RMSNorm of each row of `x` into `out`, with ggml's arithmetic: squares rounded to
/// f32 and summed in f64 in order, the mean rounded to f32, `1 / sqrt(mean + eps)` in
/// f32, then `x * scale * w`. The in-order f64 sum is a chain of dependent additions,
/// so rows go eight (or four) at a time, their chains side by side.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    let rows = x.len() / n;
    let mut r = 0;
    while r < rows {
        let (x, out) = (&x[r * n..], &mut out[r * n..]);
        r += match rows - r {
            8.. => rms_norm_rows::<8>(x, w, eps, out),
            4.. => rms_norm_rows::<4>(x, w, eps, out),
            _ => rms_norm_rows::<1>(x, w, eps, out),
        };
    }
}

/// [`rms_norm`] of the first `R` rows; returns `R`.
fn rms_norm_rows<const R: usize>(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) -> usize {
    let n = w.len();
    let xs: [&[f32]; R] = std::array::from_fn(|i| &x[i * n..(i + 1) * n]);
    let mut sum2 = [0f64; R];
    for j in 0..n {
        for (s, xr) in sum2.iter_mut().zip(&xs) {
            let v = xr[j];
            *s += (v * v) as f64;
        }
    }
    for ((xr, yr), s) in xs.iter().zip(out.chunks_exact_mut(n)).zip(sum2) {
        let mean = (s / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((y, &v), &g) in yr.iter_mut().zip(xr.iter()).zip(w) {
            *y = v * scale * g;
        }
    }
    R
}

/// Rotate one head in place: interleaved pairs `(2i, 2i+1)` or NEOX pairs `(i, i+d/2)`.
fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], neox: bool) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = if neox {
            (i, i + half)
        } else {
            (2 * i, 2 * i + 1)
        };
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0.mul_add(cos[i], -(x1 * sin[i]));
        x[b] = x0.mul_add(sin[i], x1 * cos[i]);
    }
}

/// The activations of one projection input, quantized on first use in the form each
/// weight type needs (Q8_0/Q8_1 for Q4_0, Q4_1, Q5_0, Q8_0; Q8_K for the K-quants).
struct Input<'a> {
    x: &'a [f32],
    rows: usize,
    acts: &'a mut QActs,
    kacts: &'a mut KActs,
    have: (bool, bool),
}

impl<'a> Input<'a> {
    fn new(x: &'a [f32], rows: usize, acts: &'a mut QActs, kacts: &'a mut KActs) -> Self {
        Self {
            x,
            rows,
            acts,
            kacts,
            have: (false, false),
        }
    }

    fn k(&self) -> usize {
        self.x.len() / self.rows.max(1)
    }

    fn q8(&mut self) -> &QActs {
        if !self.have.0 {
            self.acts.quantize(self.x, self.k());
            self.have.0 = true;
        }
        self.acts
    }

    fn q8k(&mut self) -> &KActs {
        if !self.have.1 {
            self.kacts.quantize(self.x, self.k());
            self.have.1 = true;
        }
        self.kacts
    }
}

impl Weight {
    /// `out[r * ldo + c]` for `c < n` (the weight's output width) and every input row.
    fn forward_host(&self, x: &mut Input<'_>, n: usize, out: &mut [f32], ldo: usize) -> Result<()> {
        match self {
            Weight::Ours(w) => w.matmul_into(x.q8(), out, ldo),
            Weight::Q5(w) => w.matmul_into(x.q8(), out, ldo),
            Weight::K(w) => w.matmul_into(x.q8k(), out, ldo),
            Weight::Candle(w) => {
                let (rows, k) = (x.rows, x.k());
                let y = w.forward(&Tensor::from_slice(
                    x.x,
                    (rows, k),
                    &candle_core::Device::Cpu,
                )?)?;
                let y: Vec<f32> = y
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                for r in 0..rows {
                    out[r * ldo..r * ldo + n].copy_from_slice(&y[r * n..(r + 1) * n]);
                }
            }
        }
        Ok(())
    }
}

impl Proj {
    /// `out[r * ldo + c]` for every row of the input, the parts side by side, biases added.
    fn forward_host(&self, x: &mut Input<'_>, out: &mut [f32], ldo: usize) -> Result<()> {
        let rows = x.rows;
        let mut col = 0;
        for p in &self.parts {
            let dst = &mut out[col..];
            p.w.forward_host(x, p.n, dst, ldo)?;
            if let Some((_, b)) = &p.b {
                for r in 0..rows {
                    for (y, b) in dst[r * ldo..r * ldo + p.n].iter_mut().zip(b) {
                        *y += b;
                    }
                }
            }
            col += p.n;
        }
        Ok(())
    }
}

impl Model {
    /// The CPU path of [`Model::forward`]; every cache is a host cache and the ids are
    /// checked. `spans` holds, per sequence, (first row, rows, first position).
    pub(super) fn forward_host(
        &self,
        batch: &mut [SeqInput<'_>],
        spans: &[(usize, usize, usize)],
        ids: &[u32],
    ) -> Result<Vec<Tensor>> {
        let cfg = &self.config;
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let sc = &mut *guard;
        let t = ids.len();
        let (hidden, hd) = (cfg.hidden, cfg.head_dim);
        let (nh, nkvh) = (cfg.n_heads, cfg.n_kv_heads);
        let (nq, nkv) = (nh * hd, nkvh * hd);
        let dqkv = nq + 2 * nkv;
        let eps = cfg.rms_eps as f32;
        let Embed::Host(table) = &self.embed else {
            candle_core::bail!("host forward without a host embedding table");
        };
        sc.rows.clear();
        for (si, &(_, n, pos)) in spans.iter().enumerate() {
            sc.rows.extend((0..n).map(|i| (si, pos + i)));
        }
        let x = fit(&mut sc.x, t * hidden);
        for (row, &id) in x.chunks_exact_mut(hidden).zip(ids) {
            row.copy_from_slice(&table[id as usize * hidden..(id as usize + 1) * hidden]);
        }
        if let Some(scale) = cfg.embed_scale {
            x.iter_mut().for_each(|v| *v *= scale);
        }
        let dd = dump::begin();
        let half = hd / 2;
        let rot = batch
            .first()
            .filter(|s| s.cache.layout().dtype == crate::kv::KvDtype::Q8_0)
            .and_then(|_| crate::kv::dtype::q8_rotation(hd));
        for (li, layer) in self.layers.iter().enumerate() {
            let (cos, sin) = {
                let t = &self.rope_host[cfg.rope_table(li)];
                (&t.0, &t.1)
            };
            let window = cfg.window(li);
            let x = &mut sc.x[..t * hidden];
            let h = fit(&mut sc.h, t * hidden);
            rms_norm(x, &layer.attn_norm.v, eps, h);
            dump::write(&dd, format_args!("attn_norm-{li}"), h);
            let qkv = fit(&mut sc.qkv, t * dqkv);
            let mut input = Input::new(h, t, &mut sc.acts, &mut sc.kacts);
            layer.qkv.forward_host(&mut input, qkv, dqkv)?;
            // QK-norm (each Q and K head), then RoPE on Q and K of every row, at that
            // row's position; Q scaled here where the family scales it before attention.
            let tmp = fit(&mut sc.tmp, hd);
            for (r, row) in qkv.chunks_exact_mut(dqkv).enumerate() {
                let p = sc.rows[r].1;
                let (c, s) = (
                    &cos[p * half..(p + 1) * half],
                    &sin[p * half..(p + 1) * half],
                );
                for (i, head) in row[..nq + nkv].chunks_exact_mut(hd).enumerate() {
                    let norm = if i < nh { &layer.q_norm } else { &layer.k_norm };
                    if let Some(w) = norm {
                        tmp.copy_from_slice(head);
                        rms_norm(tmp, &w.v, eps, head);
                    }
                    rope(head, c, s, cfg.rope_neox);
                    if cfg.q_prescale && i < nh {
                        head.iter_mut().for_each(|v| *v *= cfg.attn_scale);
                    }
                }
            }
            if dd.is_some() {
                let pick = |a: usize, w: usize| -> Vec<f32> {
                    qkv.chunks_exact(dqkv)
                        .flat_map(|r| r[a..a + w].to_vec())
                        .collect()
                };
                dump::write(&dd, format_args!("Qcur-{li}"), &pick(0, nq));
                dump::write(&dd, format_args!("Kcur-{li}"), &pick(nq, nkv));
                dump::write(&dd, format_args!("Vcur-{li}"), &pick(nq + nkv, nkv));
            }
            // In front of a q8_0 cache, Q, K and V turn by a Walsh-Hadamard rotation as
            // llama.cpp turns them (it spreads outliers across the 8-bit blocks).
            if let Some((rk, rv)) = rot {
                for row in qkv.chunks_exact_mut(dqkv) {
                    row[..nq + nkv].chunks_exact_mut(rk).for_each(attn::fwht);
                    row[nq + nkv..].chunks_exact_mut(rv).for_each(attn::fwht);
                }
            }
            // Append K/V to each sequence's cache, then attend.
            let mut views = Vec::with_capacity(batch.len());
            for (si, s) in batch.iter_mut().enumerate() {
                let (off, n, pos) = spans[si];
                let Some(l) = s.cache.host_layer(li) else {
                    candle_core::bail!("kv cache layer {li} not allocated");
                };
                // The first new position must still see its whole window.
                let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                if first < l.base || pos + n > l.base + l.capacity {
                    candle_core::bail!(
                        "kv cache overflow: positions {first}..{} outside {}..{}",
                        pos + n,
                        l.base,
                        l.base + l.capacity
                    );
                }
                let nb = hd / crate::kv::dtype::Q8_BLOCK;
                let (cap, base) = (l.capacity, l.base);
                let mut kv = l.kv;
                for i in 0..n {
                    let row = &qkv[(off + i) * dqkv..(off + i + 1) * dqkv];
                    for g in 0..nkvh {
                        let slot = g * cap + pos + i - base;
                        let ks = &row[nq + g * hd..nq + (g + 1) * hd];
                        let vs = &row[nq + nkv + g * hd..nq + nkv + (g + 1) * hd];
                        let (at, bt) = (slot * hd, slot * nb);
                        match &mut kv {
                            HostKvMut::F16 { k, v } => {
                                // Vectorized (F16C where present), rounding to nearest even.
                                k[at..at + hd].convert_from_f32_slice(ks);
                                v[at..at + hd].convert_from_f32_slice(vs);
                            }
                            HostKvMut::BF16 { k, v } => {
                                // Rounding to nearest even, as the tensor path's cast.
                                k[at..at + hd].convert_from_f32_slice(ks);
                                v[at..at + hd].convert_from_f32_slice(vs);
                            }
                            HostKvMut::Q8 {
                                k,
                                k_scale,
                                v,
                                v_scale,
                            } => {
                                quantize_q8_row(ks, &mut k[at..at + hd], &mut k_scale[bt..bt + nb]);
                                quantize_q8_row(vs, &mut v[at..at + hd], &mut v_scale[bt..bt + nb]);
                            }
                        }
                    }
                }
                let view = match kv {
                    HostKvMut::F16 { k, v } => KvView::F16(k, v),
                    HostKvMut::BF16 { k, v } => KvView::BF16(k, v),
                    HostKvMut::Q8 {
                        k,
                        k_scale,
                        v,
                        v_scale,
                    } => KvView::Q8(attn::Q8Rows {
                        k,
                        k_scale,
                        v,
                        v_scale,
                    }),
                };
                views.push((view, cap, base));
            }
            let att = fit(&mut sc.att, t * nq);
            let qkv = &sc.qkv[..t * dqkv];
            let rows = &sc.rows;
            let scale = if cfg.q_prescale { 1.0 } else { cfg.attn_scale };
            let group = nh / nkvh;
            // One job per (row, KV head): the query heads of its group share the K/V rows.
            // With few rows (a single decode) the groups alone are too few jobs to share
            // the pool evenly: split them into single heads then.
            let per = if t * nkvh >= 4 * rayon::current_num_threads() {
                group
            } else {
                1
            };
            let jobs_per_row = nh / per;
            let job = |(i, out): (usize, &mut [f32])| {
                let (r, j) = (i / jobs_per_row, i % jobs_per_row);
                let (h0, g) = (j * per, j * per / group);
                let (si, p) = rows[r];
                let (view, cap, base) = views[si];
                // A local layer sees the last `window` positions only; its slot 0 holds
                // position `base` (checked above to be at most `first`).
                let first = window.map_or(0, |w| (p + 1).saturating_sub(w));
                let (lo, hi) = (g * cap + first - base, g * cap + p + 1 - base);
                let q0 = r * dqkv + h0 * hd;
                let q = &qkv[q0..q0 + per * hd];
                match view {
                    KvView::F16(k, v) => attn::attend_heads(
                        q,
                        hd,
                        &k[lo * hd..hi * hd],
                        &v[lo * hd..hi * hd],
                        scale,
                        out,
                    ),
                    KvView::BF16(k, v) => attn::attend_heads_bf16(
                        q,
                        hd,
                        &k[lo * hd..hi * hd],
                        &v[lo * hd..hi * hd],
                        scale,
                        out,
                    ),
                    KvView::Q8(c) => {
                        let nb = hd / crate::kv::dtype::Q8_BLOCK;
                        let rows = attn::Q8Rows {
                            k: &c.k[lo * hd..hi * hd],
                            k_scale: &c.k_scale[lo * nb..hi * nb],
                            v: &c.v[lo * hd..hi * hd],
                            v_scale: &c.v_scale[lo * nb..hi * nb],
                        };
                        attn::attend_heads_q8(q, hd, rows, scale, out)
                    }
                }
            };
            // (head, position) pairs; a pair costs ~20 ns, entering the pool ~10 µs, so
            // several short sequences (a decode step of a batch) are worth splitting too.
            let seen = |p: usize| window.map_or(p + 1, |w| (p + 1).min(w));
            let work: usize = rows.iter().map(|&(_, p)| seen(p)).sum::<usize>() * nh;
            if work >= 1024 {
                att.par_chunks_mut(per * hd).enumerate().for_each(job);
            } else {
                att.chunks_mut(per * hd).enumerate().for_each(job);
            }
            drop(views);
            dump::write(&dd, format_args!("kqv_out-{li}"), att);
            if let Some((_, rv)) = rot {
                att.chunks_exact_mut(rv).for_each(attn::fwht);
            }
            // Output projection and residual.
            let tmp = fit(&mut sc.tmp, t * hidden);
            let mut input = Input::new(att, t, &mut sc.acts, &mut sc.kacts);
            layer.wo.forward_host(&mut input, tmp, hidden)?;
            dump::write(&dd, format_args!("attn_out-{li}"), tmp);
            if let Some(w) = &layer.post_attn_norm {
                let h = fit(&mut sc.h, t * hidden);
                rms_norm(tmp, &w.v, eps, h);
                tmp.copy_from_slice(h);
            }
            let x = &mut sc.x[..t * hidden];
            x.iter_mut().zip(tmp.iter()).for_each(|(a, b)| *a += b);
            dump::write(&dd, format_args!("ffn_inp-{li}"), x);
            // MLP.
            let h = &mut sc.h[..t * hidden];
            rms_norm(x, &layer.ffn_norm.v, eps, h);
            dump::write(&dd, format_args!("ffn_norm-{li}"), h);
            let tmp = fit(&mut sc.tmp, t * hidden);
            let mut bufs = MlpBufs {
                gu: &mut sc.gu,
                act: &mut sc.act,
                acts: &mut sc.acts,
                kacts: &mut sc.kacts,
            };
            match &layer.mlp {
                Mlp::Dense(e) => self.expert_host(e, h, t, tmp, &mut bufs, &dd, li)?,
                Mlp::Moe(m) => self.moe_host(m, h, t, tmp, &mut bufs)?,
            }
            dump::write(&dd, format_args!("ffn_out-{li}"), tmp);
            if let Some(w) = &layer.post_ffn_norm {
                let h = fit(&mut sc.h, t * hidden);
                rms_norm(tmp, &w.v, eps, h);
                tmp.copy_from_slice(h);
            }
            let x = &mut sc.x[..t * hidden];
            x.iter_mut().zip(tmp.iter()).for_each(|(a, b)| *a += b);
            dump::write(&dd, format_args!("l_out-{li}"), x);
        }
        // Final norm and vocabulary projection for the rows whose logits are wanted.
        let mut sel = Vec::new();
        for (si, s) in batch.iter().enumerate() {
            let (off, n, _) = spans[si];
            if s.all_logits {
                sel.extend(off..off + n);
            } else {
                sel.push(off + n - 1);
            }
        }
        let m = sel.len();
        // The selected rows side by side (in `tmp`), then normed together.
        let xs = fit(&mut sc.tmp, m * hidden);
        for (dst, &r) in xs.chunks_exact_mut(hidden).zip(&sel) {
            dst.copy_from_slice(&sc.x[r * hidden..(r + 1) * hidden]);
        }
        let h = fit(&mut sc.h, m * hidden);
        rms_norm(&sc.tmp[..m * hidden], &self.norm.v, eps, h);
        dump::write(&dd, format_args!("result_norm"), h);
        let vocab = cfg.vocab;
        let mut logits = vec![0f32; m * vocab];
        let mut input = Input::new(h, m, &mut sc.acts, &mut sc.kacts);
        self.output
            .forward_host(&mut input, vocab, &mut logits, vocab)?;
        if let Some(c) = cfg.final_softcap {
            logits
                .iter_mut()
                .for_each(|v| *v = (*v * (1.0 / c)).tanh() * c);
        }
        dump::write(&dd, format_args!("result_output"), &logits);
        // One tensor owns the rows; each sequence gets a view of its own (no copy).
        let logits = Tensor::from_vec(logits, (m, vocab), &candle_core::Device::Cpu)?;
        let mut out = Vec::with_capacity(batch.len());
        let mut r = 0;
        for s in batch.iter_mut() {
            let k = if s.all_logits { s.tokens.len() } else { 1 };
            out.push(logits.narrow(0, r, k)?);
            r += k;
            s.cache.commit(s.tokens);
        }
        Ok(out)
    }
}

/// Up to this many rows, a mixture of experts runs its experts side by side rather than
/// splitting each expert's matmuls across the threads.
const PARALLEL_EXPERT_ROWS: usize = 4;

/// The buffers an MLP pass works in (borrowed from the scratch).
struct MlpBufs<'a> {
    gu: &'a mut Vec<f32>,
    act: &'a mut Vec<f32>,
    acts: &'a mut QActs,
    kacts: &'a mut KActs,
}

impl Model {
    /// One gated MLP over the `t` rows of `h`: `out` (rows of `hidden`) gets
    /// `down(act(gate) * up)`.
    #[allow(clippy::too_many_arguments)]
    fn expert_host(
        &self,
        e: &Expert,
        h: &[f32],
        t: usize,
        out: &mut [f32],
        b: &mut MlpBufs<'_>,
        dd: &Option<std::path::PathBuf>,
        li: usize,
    ) -> Result<()> {
        let hidden = self.config.hidden;
        let dgu = e.gate_up.width();
        let ffn = dgu / 2;
        let gu = fit(b.gu, t * dgu);
        let mut input = Input::new(h, t, b.acts, b.kacts);
        e.gate_up.forward_host(&mut input, gu, dgu)?;
        let act = fit(b.act, t * ffn);
        for (a, g) in act.chunks_exact_mut(ffn).zip(gu.chunks_exact(dgu)) {
            match self.config.act {
                Act::Silu => super::swiglu::swiglu(&g[..ffn], &g[ffn..], a),
                Act::GeluTanh => super::swiglu::geglu(&g[..ffn], &g[ffn..], a),
            }
        }
        if dd.is_some() {
            let half_of = |a: usize| -> Vec<f32> {
                gu.chunks_exact(dgu)
                    .flat_map(|r| r[a..a + ffn].to_vec())
                    .collect()
            };
            dump::write(dd, format_args!("ffn_gate-{li}"), &half_of(0));
            dump::write(dd, format_args!("ffn_up-{li}"), &half_of(ffn));
            dump::write(dd, format_args!("ffn_swiglu-{li}"), act);
        }
        let mut input = Input::new(act, t, b.acts, b.kacts);
        e.down
            .forward_host(&mut input, &mut out[..t * hidden], hidden)
    }

    /// A mixture of experts over the `t` rows of `h`: each row's router logits pick its
    /// experts ([`super::moe::route`]); every expert runs once over all the rows routed
    /// to it, and each row sums its experts' weighted outputs in pick order.
    fn moe_host(
        &self,
        m: &MoeMlp,
        h: &[f32],
        t: usize,
        out: &mut [f32],
        b: &mut MlpBufs<'_>,
    ) -> Result<()> {
        let Some(cfg) = &self.config.moe else {
            candle_core::bail!("a mixture-of-experts layer in a model without one");
        };
        let hidden = self.config.hidden;
        let (ne, used) = (m.router.width(), cfg.used);
        let mut logits = vec![0f32; t * ne];
        let mut input = Input::new(h, t, b.acts, b.kacts);
        m.router.forward_host(&mut input, &mut logits, ne)?;
        let picks: Vec<Vec<(usize, f32)>> = logits
            .chunks_exact(ne)
            .map(|l| super::moe::route(l, used, cfg.norm_topk))
            .collect();
        // The rows each expert serves, bucketed in one pass: (row, pick slot, weight).
        let mut routed: Vec<Vec<(usize, usize, f32)>> = vec![Vec::new(); ne];
        for (r, p) in picks.iter().enumerate() {
            for (k, &(e, w)) in p.iter().enumerate() {
                if let Some(bucket) = routed.get_mut(e) {
                    bucket.push((r, k, w));
                }
            }
        }
        // Per row and pick: the weighted output of that expert.
        let mut slots = vec![0f32; t * used * hidden];
        let mut scatter = |routed: &[(usize, usize, f32)], y: &[f32]| {
            for (i, &(r, k, w)) in routed.iter().enumerate() {
                let dst = &mut slots[(r * used + k) * hidden..(r * used + k + 1) * hidden];
                for (d, &v) in dst.iter_mut().zip(&y[i * hidden..(i + 1) * hidden]) {
                    *d = v * w;
                }
            }
        };
        let gather = |routed: &[(usize, usize, f32)], xin: &mut Vec<f32>| {
            xin.clear();
            for &(r, _, _) in routed {
                xin.extend_from_slice(&h[r * hidden..(r + 1) * hidden]);
            }
        };
        let active: Vec<usize> = (0..ne).filter(|&e| !routed[e].is_empty()).collect();
        if t <= PARALLEL_EXPERT_ROWS && active.len() > 1 && rayon::current_num_threads() > 1 {
            // A few rows (decode): each expert's matmuls are too small to split well
            // across the threads, so the experts run side by side, each with its own
            // buffers (the same arithmetic as one after the other).
            let outs: Vec<Result<Vec<f32>>> = active
                .par_iter()
                .map(|&e| {
                    let (mut xin, mut gu, mut act) = (Vec::new(), Vec::new(), Vec::new());
                    let (mut acts, mut kacts) = (QActs::default(), KActs::default());
                    gather(&routed[e], &mut xin);
                    let n = routed[e].len();
                    let mut y = vec![0f32; n * hidden];
                    let mut bufs = MlpBufs {
                        gu: &mut gu,
                        act: &mut act,
                        acts: &mut acts,
                        kacts: &mut kacts,
                    };
                    self.expert_host(&m.experts[e], &xin, n, &mut y, &mut bufs, &None, 0)?;
                    Ok(y)
                })
                .collect();
            for (&e, y) in active.iter().zip(outs) {
                scatter(&routed[e], &y?);
            }
        } else {
            let (mut xin, mut y) = (Vec::new(), Vec::new());
            for &e in &active {
                gather(&routed[e], &mut xin);
                let n = routed[e].len();
                let y = fit(&mut y, n * hidden);
                self.expert_host(&m.experts[e], &xin, n, y, b, &None, 0)?;
                scatter(&routed[e], y);
            }
        }
        for r in 0..t {
            let o = &mut out[r * hidden..(r + 1) * hidden];
            o.copy_from_slice(&slots[r * used * hidden..(r * used + 1) * hidden]);
            for k in 1..used {
                let add = &slots[(r * used + k) * hidden..(r * used + k + 1) * hidden];
                o.iter_mut().zip(add).for_each(|(a, b)| *a += b);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::rms_norm;

    /// Rows normed eight and four at a time give the bits of one row at a time (ggml's
    /// order: squares summed in f64 in order), for every count of rows up to 13.
    #[test]
    fn rms_norm_rows_together_match_one_at_a_time() {
        let (n, eps) = (96, 1e-5f32);
        let w: Vec<f32> = (0..n).map(|i| 0.5 + (i as f32 * 0.37).sin()).collect();
        let x: Vec<f32> = (0..13 * n)
            .map(|i| (i as f32 * 0.731).sin() * (1.0 + (i % 7) as f32 * 3.1))
            .collect();
        let one = |xr: &[f32], yr: &mut [f32]| {
            let sum2: f64 = xr.iter().map(|&v| (v * v) as f64).sum();
            let scale = 1.0 / ((sum2 / n as f64) as f32 + eps).sqrt();
            for ((y, &v), &g) in yr.iter_mut().zip(xr).zip(&w) {
                *y = v * scale * g;
            }
        };
        for rows in 1..=13 {
            let x = &x[..rows * n];
            let mut want = vec![0f32; rows * n];
            for (xr, yr) in x.chunks_exact(n).zip(want.chunks_exact_mut(n)) {
                one(xr, yr);
            }
            let mut got = vec![f32::NAN; rows * n];
            rms_norm(x, &w, eps, &mut got);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{rows} rows");
        }
    }
}
