//! Stepping: which prompt chunks a pass takes, and the one batched forward routine
//! ([`pass`]) behind the three kinds of step — prefill (prompt chunks only), mixed
//! (prompt chunks riding with every decoding sequence's next token) and decode (the
//! next token of every decoding sequence).

use std::time::Instant;

use candle_core::Tensor;
use rayon::prelude::*;

use super::seq::{accept, fail, Seq};
use super::Forward;
use crate::engine::model::{Logits, SeqInput};
use crate::engine::text::tokenizer::Tok;
use crate::engine::EngineError;
use crate::metrics;

/// What one sequence puts into a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Take {
    /// Its next `n` prompt tokens.
    Prompt(usize),
    /// The token it sampled last.
    Next,
}

/// One sequence's share of a pass: its index in the live list and what it feeds.
pub(super) type Part = (usize, Take);

/// The sequences still reading their prompts and how many of their tokens the next
/// pass takes: in order, up to `budget` tokens in all.
pub(super) fn pick_prefill(seqs: &[Seq], mut budget: usize) -> Vec<Part> {
    let mut picked = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        let left = s.req.prompt.len().saturating_sub(s.prefill_pos);
        if left == 0 || budget == 0 {
            continue;
        }
        let n = left.min(budget);
        budget -= n;
        picked.push((i, Take::Prompt(n)));
    }
    picked
}

/// Whether prompt chunks `(host cache, take)` go through one forward pass: several of
/// them, each on a host cache or at most `fused_chunk` tokens long.
pub(super) fn prefill_together(
    chunks: impl IntoIterator<Item = (bool, Take)>,
    fused_chunk: usize,
) -> bool {
    let mut n = 0;
    for (host, take) in chunks {
        if !(host || matches!(take, Take::Prompt(k) if k <= fused_chunk)) {
            return false;
        }
        n += 1;
    }
    n > 1
}

/// Prefill the `picked` chunks: all in one forward pass, so that streams joining
/// together are not prefilled one loop turn each. If that pass fails, each sequence is
/// retried alone, so that one bad sequence fails only itself (a failed pass commits
/// nothing to any cache).
pub(super) fn prefill(model: &impl Forward, tok: &Tok, seqs: &mut [Seq], picked: &[Part]) {
    // Host caches, or chunks short enough for the fused GPU path, which steps them
    // together one token position at a time (a GPU batch with one long chunk would send
    // all of them to the tensor path instead); chunks of any length where the GPU packs
    // several sequences into shared wide passes.
    let chunks = picked
        .iter()
        .map(|&(i, take)| (seqs[i].cache.is_host(), take));
    let limit = if model.prefill_packed() {
        usize::MAX
    } else {
        model.fused_chunk()
    };
    let together = prefill_together(chunks, limit);
    if together && pass(model, tok, seqs, picked).is_ok() {
        return;
    }
    for &part in picked {
        if let Err(e) = pass(model, tok, seqs, &[part]) {
            fail(seqs, part.0, &e.to_string());
        }
    }
}

/// One forward pass for the `picked` prompt chunks and the next token of every decoding
/// sequence (host caches). Returns false, having changed nothing, if the pass fails: the
/// caller then prefills and decodes separately, which retries each sequence alone.
pub(super) fn mixed(model: &impl Forward, tok: &Tok, seqs: &mut [Seq], picked: &[Part]) -> bool {
    let mut chunks = picked.iter().peekable();
    let parts: Vec<Part> = seqs
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let chunk = chunks.next_if(|&&(j, _)| j == i).copied();
            match (s.next, chunk) {
                (Some(_), _) => Some((i, Take::Next)),
                (None, chunk) => chunk,
            }
        })
        .collect();
    pass(model, tok, seqs, &parts).is_ok()
}

/// One batched decode step for every sequence that has a token to feed; a failed pass
/// ends all of them.
pub(super) fn decode(model: &impl Forward, tok: &Tok, seqs: &mut [Seq]) {
    let parts: Vec<Part> = seqs
        .iter()
        .enumerate()
        .filter(|(_, s)| s.next.is_some())
        .map(|(i, _)| (i, Take::Next))
        .collect();
    if let Err(e) = pass(model, tok, seqs, &parts) {
        for &(i, _) in parts.iter().rev() {
            fail(seqs, i, &e.to_string());
        }
    }
}

/// The batched forward routine every step goes through: one pass over `parts` (in index
/// order, at most one per sequence), then each sequence advances — a prompt chunk moves
/// `prefill_pos`, and a sequence that finished its prompt or fed its last token samples
/// the next one (sampling, detokenizing and sending spread over the thread pool: each
/// costs tens of µs over a large vocabulary). A failed pass changes nothing and returns
/// the error; a sequence whose sampling fails is ended alone.
pub(super) fn pass(
    model: &impl Forward,
    tok: &Tok,
    seqs: &mut [Seq],
    parts: &[Part],
) -> Result<(), EngineError> {
    if parts.is_empty() {
        return Ok(());
    }
    // A pass of one sequence runs inside that request's span.
    let _span = (parts.len() == 1)
        .then(|| seqs.get(parts[0].0).map(|s| s.req.span.clone().entered()))
        .flatten();
    let t0 = Instant::now();
    let logits = {
        let mut want = parts.iter().peekable();
        let mut inputs: Vec<SeqInput> = seqs
            .iter_mut()
            .enumerate()
            .filter_map(|(i, s)| {
                let &(_, take) = want.next_if(|&&(j, _)| j == i)?;
                let tokens: &[u32] = match take {
                    Take::Prompt(n) => &s.req.prompt[s.prefill_pos..s.prefill_pos + n],
                    Take::Next => s.next.as_slice(),
                };
                Some(SeqInput {
                    tokens,
                    cache: &mut s.cache,
                    all_logits: false,
                })
            })
            .collect();
        model.forward(&mut inputs)?
    };
    let rows = host_rows(logits)?;
    let prompt_tokens: usize = parts
        .iter()
        .map(|&(_, t)| match t {
            Take::Prompt(n) => n,
            Take::Next => 0,
        })
        .sum();
    if prompt_tokens > 0 {
        metrics::observe_prefill(prompt_tokens, t0.elapsed());
    } else {
        metrics::observe_decode_step(parts.len(), t0.elapsed());
    }
    let mut jobs: Vec<(usize, &mut Seq, Row)> = Vec::with_capacity(rows.len());
    let mut rows = rows.into_iter();
    let mut want = parts.iter().peekable();
    for (i, s) in seqs.iter_mut().enumerate() {
        let Some(&(_, take)) = want.next_if(|&&(j, _)| j == i) else {
            continue;
        };
        let Some(row) = rows.next() else { break };
        match take {
            Take::Next => s.next = None,
            Take::Prompt(n) => {
                s.prefill_pos += n;
                if s.prefill_pos < s.req.prompt.len() {
                    continue;
                }
            }
        }
        jobs.push((i, s, row));
    }
    let failed: Vec<(usize, String)> = jobs
        .into_par_iter()
        .filter_map(|(i, s, row)| {
            row.into_vec()
                .map_err(EngineError::from)
                .and_then(|mut v| accept(tok, s, &mut v))
                .err()
                .map(|e| (i, e.to_string()))
        })
        .collect();
    for (i, e) in failed.into_iter().rev() {
        fail(seqs, i, &e);
    }
    Ok(())
}

/// One sequence's logits row on its way to the sampler.
enum Row {
    /// Copied to the host already.
    Host(Vec<f32>),
    /// As the pass left it (a host tensor, or a row of the host buffer the pass shares),
    /// copied out by the sampling job itself (in parallel with the other sequences'
    /// rather than one after another on the engine thread).
    Pass(Logits),
}

impl Row {
    fn into_vec(self) -> candle_core::Result<Vec<f32>> {
        match self {
            Row::Host(v) => Ok(v),
            Row::Pass(l) => l.to_vec(),
        }
    }
}

/// Each sequence's `(1, vocab)` logits: one stacked copy to the host when they are
/// tensors on a GPU (copies from several threads at once would each wait on the device
/// in turn), host rows as they are.
fn host_rows(logits: Vec<Logits>) -> candle_core::Result<Vec<Row>> {
    let on_device = logits.len() > 1
        && logits
            .iter()
            .all(|l| l.tensor().is_some_and(|t| !t.device().is_cpu()));
    if on_device {
        let tensors: Vec<&Tensor> = logits.iter().filter_map(Logits::tensor).collect();
        let rows = Tensor::cat(&tensors, 0)?.to_vec2::<f32>()?;
        return Ok(rows.into_iter().map(Row::Host).collect());
    }
    Ok(logits.into_iter().map(Row::Pass).collect())
}
