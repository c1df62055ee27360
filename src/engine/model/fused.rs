//! The fused CUDA path's side of [`Model::forward`]: which passes it takes, and how a
//! pass of several sequences becomes batched steps — decode steps of one token per
//! sequence, prefill steps of one prompt's positions (see `batch_plan`) — or
//! single-sequence runs. Depends on `cuda` and `batch_plan` only.

use std::sync::atomic::Ordering;

use candle_core::{Device, Result, Tensor};

use super::{batch_plan, cuda, Logits, Model, SeqInput, FUSED_MAX_TOKENS};
use crate::kv::SeqCache;

impl Model {
    /// The fused path for a batch whose every sequence it covers; None otherwise.
    pub(super) fn forward_fused(&self, batch: &mut [SeqInput<'_>]) -> Result<Option<Vec<Logits>>> {
        use cuda::FusedDecoder;
        let Some(dec) = &self.fused else {
            return Ok(None);
        };
        // Prompt chunks up to the prefill limit run fused in batched steps; with batched
        // prefill off, short ones one token at a time.
        let prefill = dec.prefill();
        let max = if prefill {
            dec.prefill_max()
        } else {
            FUSED_MAX_TOKENS
        };
        if !self.fused_on.load(Ordering::Relaxed) {
            return Ok(None);
        }
        // Chunks past the limit (and past `wide_min`) prefill wide where the card has it,
        // each sequence in its own passes; or, where packing is on, several sequences'
        // chunks with more rows in all than that share passes (each weight matrix
        // multiplied once for all). Caches are committed once every sequence ran.
        let wide_past = max.max(dec.wide_min());
        let lens: Vec<usize> = batch.iter().map(|s| s.tokens.len()).collect();
        let wide_ok = |s: &SeqInput<'_>| !s.all_logits && FusedDecoder::supports(s.cache);
        let packed = dec.wide_pack()
            && batch_plan::packed_wide(&lens, wide_past)
            && batch.iter().all(wide_ok);
        let alone = dec.wide()
            && batch
                .iter()
                .all(|s| s.tokens.len() > wide_past && wide_ok(s));
        if packed || alone {
            let vocab = self.config.vocab;
            let seqs: Vec<(&[u32], &SeqCache)> =
                batch.iter().map(|s| (s.tokens, &*s.cache)).collect();
            let rows = if packed {
                dec.run_wide_packed(&seqs)?
            } else {
                let each = seqs.iter().map(|&(t, c)| dec.run_wide(t, c));
                each.collect::<Result<Vec<_>>>()?
            };
            let mut out = Vec::with_capacity(batch.len());
            for v in rows {
                out.push(Tensor::from_vec(v, (1, vocab), &Device::Cpu)?.into());
            }
            for s in batch.iter_mut() {
                s.cache.commit(s.tokens);
            }
            return Ok(Some(out));
        }
        if !batch
            .iter()
            .all(|s| s.tokens.len() <= max && FusedDecoder::supports(s.cache))
        {
            return Ok(None);
        }
        let vocab = self.config.vocab;
        let mut out = Vec::with_capacity(batch.len());
        if prefill && batch_plan::packed_prefill(&lens) {
            let out = self.fused_prefill(dec, batch)?;
            return Ok(Some(out.into_iter().map(Logits::from).collect()));
        }
        if batch_plan::batched(&lens, 1) {
            // A decode step: one token per sequence, each at its own position; the rows
            // come back as the step left them (one host buffer they share).
            let seqs: Vec<(u32, usize, &SeqCache)> = batch
                .iter()
                .map(|s| (s.tokens[0], s.cache.len(), &*s.cache))
                .collect();
            let rows = dec.run_batch(&seqs)?;
            if rows.len() != batch.len() {
                candle_core::bail!("fused batched step returned too few logits rows");
            }
            for s in batch.iter_mut() {
                s.cache.commit(s.tokens);
            }
            return Ok(Some(rows));
        }
        if batch_plan::batched(&lens, FUSED_MAX_TOKENS) {
            // Short prompt chunks: one batched step per token position, each sequence at
            // its own. Caches are committed only once all steps ran, so a failed pass
            // leaves them as they were.
            let mut rows: Vec<Vec<f32>> = vec![Vec::new(); batch.len()];
            for (t, idx) in batch_plan::token_steps(&lens).into_iter().enumerate() {
                let seqs: Vec<(u32, usize, &SeqCache)> = idx
                    .iter()
                    .map(|&i| {
                        (
                            batch[i].tokens[t],
                            batch[i].cache.len() + t,
                            &*batch[i].cache,
                        )
                    })
                    .collect();
                let v = if seqs.len() == 1 {
                    vec![dec.run_at(&seqs[0])?]
                } else {
                    // Copied out at once: the next step reuses the buffer.
                    dec.run_batch(&seqs)?
                        .iter()
                        .map(Logits::to_vec)
                        .collect::<Result<Vec<_>>>()?
                };
                for (&i, row) in idx.iter().zip(v) {
                    if batch[i].all_logits {
                        rows[i].extend_from_slice(&row);
                    } else {
                        rows[i] = row; // the last token's stays
                    }
                }
            }
            for (s, r) in batch.iter_mut().zip(rows) {
                let n = r.len() / vocab;
                out.push(Tensor::from_vec(r, (n, vocab), &Device::Cpu)?.into());
                s.cache.commit(s.tokens);
            }
            return Ok(Some(out));
        }
        for s in batch.iter_mut() {
            let v = dec.run(s.tokens, s.cache, s.all_logits)?;
            let rows = v.len() / vocab;
            out.push(Tensor::from_vec(v, (rows, vocab), &Device::Cpu)?.into());
            s.cache.commit(s.tokens);
        }
        Ok(Some(out))
    }

    /// A pass with batched prefill on: the rows of every sequence (a prompt chunk's
    /// positions, or one token) packed into batched prefill steps, the logits of each
    /// sequence's last row (every row with `all_logits`) back. Caches are committed only
    /// once every step ran, so a failed pass leaves them as they were.
    fn fused_prefill(
        &self,
        dec: &cuda::FusedDecoder,
        batch: &mut [SeqInput<'_>],
    ) -> Result<Vec<Tensor>> {
        let vocab = self.config.vocab;
        let shape: Vec<(usize, bool)> = batch
            .iter()
            .map(|s| (s.tokens.len(), s.all_logits))
            .collect();
        let (want, back) = batch_plan::packed_want(&shape);
        let got = {
            let mut rows = Vec::with_capacity(want.len());
            for s in batch.iter() {
                let pos0 = s.cache.len();
                let cache = &*s.cache;
                rows.extend(
                    s.tokens
                        .iter()
                        .enumerate()
                        .map(|(i, &t)| (t, pos0 + i, cache)),
                );
            }
            dec.run_rows(&rows, &want)?
        };
        let mut got = got.into_iter();
        let mut out = Vec::with_capacity(batch.len());
        for &n in &back {
            let r: Vec<f32> = got.by_ref().take(n).flatten().collect();
            if r.len() != n * vocab {
                candle_core::bail!("fused prefill returned too few logits rows");
            }
            out.push(Tensor::from_vec(r, (n, vocab), &Device::Cpu)?);
        }
        for s in batch.iter_mut() {
            s.cache.commit(s.tokens);
        }
        Ok(out)
    }
}
