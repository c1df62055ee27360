//! The CPU forward pass: the same model as [`Model::forward`]'s tensor path, run on
//! reused host buffers with fused loops — RMSNorm, RoPE, attention straight over the
//! f16 cache, SiLU·up — and our quantized kernels for the projections. No tensor op
//! and no allocation per layer; the thread pool is entered once per projection and
//! once per layer for attention.
//!
//! The arithmetic follows the tensor path (and through it ggml's): activations
//! quantized like ggml, Q and the attention weights rounded to f16 like ggml's
//! flash-attention kernel, rotary angles built as ggml builds them.

use candle_core::{Module, Result, Tensor};
use half::f16;
use rayon::prelude::*;

use super::{Embed, Model, Proj, SeqInput, Weight};
use crate::engine::attn;
use crate::engine::quant::QActs;

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
    /// Per row: (sequence index, position).
    rows: Vec<(usize, usize)>,
}

fn fit(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// RMSNorm of each row of `x` into `out`, with the arithmetic of candle's `rms_norm`
/// that the tensor path uses (f32 sum of squares, divide by the root, then the weight).
/// ggml's variant (f64 sum, multiply by the reciprocal) was tried: over the greedy
/// fixture it agreed with llama.cpp on fewer tokens (see README, "Correctness").
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, yr) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let sum2: f32 = xr.iter().map(|&v| v * v).sum();
        let m = (sum2 / n as f32 + eps).sqrt();
        for ((y, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
            *y = v / m * g;
        }
    }
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
        x[a] = x0 * cos[i] - x1 * sin[i];
        x[b] = x0 * sin[i] + x1 * cos[i];
    }
}

impl Proj {
    /// `out[r * ldo + c]` for the `rows` rows of `x` (quantized in `acts` when the
    /// projection uses our kernels; `acts` must hold exactly `x`).
    fn forward_host(
        &self,
        x: &[f32],
        acts: &QActs,
        rows: usize,
        out: &mut [f32],
        ldo: usize,
    ) -> Result<()> {
        let k = x.len() / rows.max(1);
        let mut col = 0;
        for p in &self.parts {
            let dst = &mut out[col..];
            match &p.w {
                Weight::Ours(w) => w.matmul_into(acts, dst, ldo),
                Weight::Candle(w) => {
                    let y = w.forward(&Tensor::from_slice(
                        x,
                        (rows, k),
                        &candle_core::Device::Cpu,
                    )?)?;
                    let y: Vec<f32> = y
                        .to_dtype(candle_core::DType::F32)?
                        .flatten_all()?
                        .to_vec1()?;
                    for r in 0..rows {
                        dst[r * ldo..r * ldo + p.n].copy_from_slice(&y[r * p.n..(r + 1) * p.n]);
                    }
                }
            }
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
        let (cos, sin) = (&self.rope_host.0, &self.rope_host.1);
        let half = hd / 2;
        for (li, layer) in self.layers.iter().enumerate() {
            let x = &mut sc.x[..t * hidden];
            let h = fit(&mut sc.h, t * hidden);
            rms_norm(x, &layer.attn_norm.v, eps, h);
            sc.acts.quantize(h, hidden);
            let qkv = fit(&mut sc.qkv, t * dqkv);
            layer.qkv.forward_host(h, &sc.acts, t, qkv, dqkv)?;
            // RoPE on Q and K of every row, at that row's position.
            for (r, row) in qkv.chunks_exact_mut(dqkv).enumerate() {
                let p = sc.rows[r].1;
                let (c, s) = (
                    &cos[p * half..(p + 1) * half],
                    &sin[p * half..(p + 1) * half],
                );
                for head in row[..nq + nkv].chunks_exact_mut(hd) {
                    rope(head, c, s, cfg.rope_neox);
                }
            }
            // Append K/V to each sequence's cache, then attend.
            let mut views = Vec::with_capacity(batch.len());
            for (si, s) in batch.iter_mut().enumerate() {
                let (off, n, pos) = spans[si];
                let Some(l) = s.cache.host_layer(li) else {
                    candle_core::bail!("kv cache layer {li} not allocated");
                };
                if pos + n > l.capacity {
                    candle_core::bail!(
                        "kv cache overflow: pos {pos} + {n} > capacity {}",
                        l.capacity
                    );
                }
                for i in 0..n {
                    let row = &qkv[(off + i) * dqkv..(off + i + 1) * dqkv];
                    for g in 0..nkvh {
                        let at = (g * l.capacity + pos + i) * hd;
                        let ks = &row[nq + g * hd..nq + (g + 1) * hd];
                        let vs = &row[nq + nkv + g * hd..nq + nkv + (g + 1) * hd];
                        for d in 0..hd {
                            l.k[at + d] = f16::from_f32(ks[d]);
                            l.v[at + d] = f16::from_f32(vs[d]);
                        }
                    }
                }
                views.push((&*l.k, &*l.v, l.capacity));
            }
            let att = fit(&mut sc.att, t * nq);
            let qkv = &sc.qkv[..t * dqkv];
            let rows = &sc.rows;
            let scale = 1.0 / (hd as f32).sqrt();
            let group = nh / nkvh;
            let job = |(i, out): (usize, &mut [f32])| {
                let (r, head) = (i / nh, i % nh);
                let (si, p) = rows[r];
                let (k, v, cap) = views[si];
                let g = head / group;
                let base = g * cap * hd;
                let len = p + 1;
                attn::attend(
                    &qkv[r * dqkv + head * hd..r * dqkv + (head + 1) * hd],
                    &k[base..base + len * hd],
                    &v[base..base + len * hd],
                    scale,
                    out,
                );
            };
            // (head, position) pairs; a pair costs ~20 ns, entering the pool ~10 µs, so
            // several short sequences (a decode step of a batch) are worth splitting too.
            let work: usize = rows.iter().map(|&(_, p)| p + 1).sum::<usize>() * nh;
            if work >= 1024 {
                att.par_chunks_mut(hd).enumerate().for_each(job);
            } else {
                att.chunks_mut(hd).enumerate().for_each(job);
            }
            drop(views);
            // Output projection and residual.
            sc.acts.quantize(att, nq);
            let tmp = fit(&mut sc.tmp, t * hidden);
            layer.wo.forward_host(att, &sc.acts, t, tmp, hidden)?;
            let x = &mut sc.x[..t * hidden];
            x.iter_mut().zip(tmp.iter()).for_each(|(a, b)| *a += b);
            // MLP.
            let h = &mut sc.h[..t * hidden];
            rms_norm(x, &layer.ffn_norm.v, eps, h);
            sc.acts.quantize(h, hidden);
            let dgu = layer.gate_up.width();
            let ffn = dgu / 2;
            let gu = fit(&mut sc.gu, t * dgu);
            layer.gate_up.forward_host(h, &sc.acts, t, gu, dgu)?;
            let act = fit(&mut sc.act, t * ffn);
            for (a, g) in act.chunks_exact_mut(ffn).zip(gu.chunks_exact(dgu)) {
                for ((a, &gv), &uv) in a.iter_mut().zip(&g[..ffn]).zip(&g[ffn..]) {
                    *a = gv / (1.0 + (-gv).exp()) * uv;
                }
            }
            sc.acts.quantize(act, ffn);
            layer.down.forward_host(act, &sc.acts, t, tmp, hidden)?;
            let x = &mut sc.x[..t * hidden];
            x.iter_mut().zip(tmp.iter()).for_each(|(a, b)| *a += b);
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
        let h = fit(&mut sc.h, m * hidden);
        for (i, &r) in sel.iter().enumerate() {
            let xr = &sc.x[r * hidden..(r + 1) * hidden];
            rms_norm(xr, &self.norm.v, eps, &mut h[i * hidden..(i + 1) * hidden]);
        }
        sc.acts.quantize(h, hidden);
        let vocab = cfg.vocab;
        let mut logits = vec![0f32; m * vocab];
        match &self.output {
            Weight::Ours(w) => w.matmul_into(&sc.acts, &mut logits, vocab),
            Weight::Candle(w) => {
                let y = w.forward(&Tensor::from_slice(
                    h,
                    (m, hidden),
                    &candle_core::Device::Cpu,
                )?)?;
                logits = y
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
            }
        }
        let mut out = Vec::with_capacity(batch.len());
        let mut r = 0;
        for s in batch.iter_mut() {
            let k = if s.all_logits { s.tokens.len() } else { 1 };
            out.push(Tensor::from_slice(
                &logits[r * vocab..(r + k) * vocab],
                (k, vocab),
                &candle_core::Device::Cpu,
            )?);
            r += k;
            s.cache.commit(s.tokens);
        }
        Ok(out)
    }
}
