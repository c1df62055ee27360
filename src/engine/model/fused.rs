//! The fused CUDA path's side of [`Model::forward`]: which passes it takes, and how a
//! pass of several sequences becomes batched steps — decode steps of one token per
//! sequence, prefill steps of one prompt's positions (see `batch_plan`) — or
//! single-sequence runs. Depends on `cuda` and `batch_plan` only.

use std::sync::atomic::Ordering;

use candle_core::{Device, Result, Tensor};

use super::{batch_plan, cuda, Model, SeqInput, FUSED_MAX_TOKENS};
use crate::kv::SeqCache;

impl Model {
    /// The fused path for a batch whose every sequence it covers; None otherwise.
    pub(super) fn forward_fused(&self, batch: &mut [SeqInput<'_>]) -> Result<Option<Vec<Tensor>>> {
        use cuda::FusedDecoder;
        let Some(dec) = &self.fused else {
            return Ok(None);
        };
        // With batched prefill a prompt of any length runs fused; without it, only
        // short ones (one token at a time).
        let prefill = dec.prefill();
        let max = if prefill {
            usize::MAX
        } else {
            FUSED_MAX_TOKENS
        };
        if !self.fused_on.load(Ordering::Relaxed)
            || !batch
                .iter()
                .all(|s| s.tokens.len() <= max && FusedDecoder::supports(s.cache))
        {
            return Ok(None);
        }
        let vocab = self.config.vocab;
        let mut out = Vec::with_capacity(batch.len());
        let lens: Vec<usize> = batch.iter().map(|s| s.tokens.len()).collect();
        if prefill && !batch_plan::batched(&lens, 1) {
            return self.fused_prefill(dec, batch).map(Some);
        }
        if batch_plan::batched(&lens, FUSED_MAX_TOKENS) {
            // Decode steps and short prompt chunks: one batched step per token position,
            // each sequence at its own. Caches are committed only once all steps ran, so
            // a failed pass leaves them as they were.
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
                    dec.run_batch(&seqs)?
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
                out.push(Tensor::from_vec(r, (n, vocab), &Device::Cpu)?);
                s.cache.commit(s.tokens);
            }
            return Ok(Some(out));
        }
        for s in batch.iter_mut() {
            let v = dec.run(s.tokens, s.cache, s.all_logits)?;
            let rows = v.len() / vocab;
            out.push(Tensor::from_vec(v, (rows, vocab), &Device::Cpu)?);
            s.cache.commit(s.tokens);
        }
        Ok(Some(out))
    }

    /// A pass with batched prefill on: each prompt chunk prefills through its own batched
    /// steps, and the sequences feeding one token step together. Caches are committed
    /// only once every sequence ran, so a failed pass leaves them as they were.
    fn fused_prefill(
        &self,
        dec: &cuda::FusedDecoder,
        batch: &mut [SeqInput<'_>],
    ) -> Result<Vec<Tensor>> {
        let vocab = self.config.vocab;
        let mut rows: Vec<Vec<f32>> = vec![Vec::new(); batch.len()];
        let singles: Vec<usize> = (0..batch.len())
            .filter(|&i| batch[i].tokens.len() == 1)
            .collect();
        for (i, s) in batch.iter_mut().enumerate() {
            if s.tokens.len() > 1 || singles.len() == 1 {
                rows[i] = dec.run(s.tokens, s.cache, s.all_logits)?;
            }
        }
        if singles.len() > 1 {
            let seqs: Vec<(u32, usize, &SeqCache)> = singles
                .iter()
                .map(|&i| (batch[i].tokens[0], batch[i].cache.len(), &*batch[i].cache))
                .collect();
            for (&i, row) in singles.iter().zip(dec.run_batch(&seqs)?) {
                rows[i] = row;
            }
        }
        let mut out = Vec::with_capacity(batch.len());
        for (s, r) in batch.iter_mut().zip(rows) {
            let n = r.len() / vocab;
            out.push(Tensor::from_vec(r, (n, vocab), &Device::Cpu)?);
            s.cache.commit(s.tokens);
        }
        Ok(out)
    }
}
