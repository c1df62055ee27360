//! Per-sequence work: admitting a request (checking its session's cache out of the
//! store), sampling and streaming each token, deciding when it is finished, and ending
//! it with an error.

use std::sync::Arc;
use std::time::Instant;

use super::Forward;
use crate::engine::decode::constrain::{Constraint, TokenTable};
use crate::engine::decode::sampling::Sampler;
use crate::engine::text::stop::StopMatcher;
use crate::engine::text::tokenizer::{DetokStream, Tok};
use crate::engine::{EngineError, FinishReason, GenEvent, GenRequest, LogprobEntry, Usage};
use crate::kv::store::{Lookup, SessionStore};
use crate::kv::KvDtype;
use crate::kv::SeqCache;
use crate::metrics;

/// A live sequence: its request, its cache (checked out of the store) and where it is.
pub(super) struct Seq {
    pub(super) req: GenRequest,
    pub(super) cache: SeqCache,
    pub(super) sampler: Sampler,
    pub(super) detok: DetokStream,
    pub(super) stop: StopMatcher,
    /// Prompt tokens not yet run through the model.
    pub(super) prefill_pos: usize,
    pub(super) generated: Vec<u32>,
    /// Last sampled token, to be fed in the next decode step.
    pub(super) next: Option<u32>,
    pub(super) first_token_at: Option<Instant>,
    pub(super) last_token_at: Instant,
    /// Prompt tokens served from the cache.
    pub(super) reused: usize,
    pub(super) constraint: Option<(Constraint, Arc<TokenTable>)>,
    /// The last event (`Done` or `Error`), sent only after the cache is checked back in,
    /// so a client that sends its next turn the moment it has this answer finds the
    /// session idle instead of busy.
    pub(super) last_event: Option<GenEvent>,
}

pub(super) fn admit(
    model: &impl Forward,
    tokens: &Arc<TokenTable>,
    dtype: KvDtype,
    req: GenRequest,
    store: &mut SessionStore,
) -> Option<Seq> {
    metrics::observe_queue_wait(req.enqueued.elapsed());
    let layout = model.cache_layout(dtype);
    let checked = store.checkout(req.session.as_deref(), &req.prompt, layout, model.device());
    let (co, lookup) = match checked {
        Ok(x) => x,
        Err(e) => {
            let _ = req.events.send(GenEvent::Rejected(e.into()));
            return None;
        }
    };
    let result = match lookup {
        Lookup::Hit => "hit",
        Lookup::Partial => "partial",
        Lookup::Miss => "miss",
    };
    metrics::kv_lookup(result, req.prompt.len(), co.reused);
    Some(Seq {
        constraint: req
            .grammar
            .clone()
            .map(|g| (Constraint::new(g), tokens.clone())),
        sampler: Sampler::new(req.sampling.clone()),
        stop: StopMatcher::new(req.stop.clone()),
        req,
        cache: co.cache,
        detok: DetokStream::new(),
        prefill_pos: co.reused,
        reused: co.reused,
        generated: Vec::new(),
        next: None,
        first_token_at: None,
        last_token_at: Instant::now(),
        last_event: None,
    })
}

/// End a sequence with an error. Its cache keeps what was computed before the failure
/// (the model commits positions only after a successful pass) and goes back to the store.
pub(super) fn fail(seqs: &mut [Seq], i: usize, msg: &str) {
    let s = &mut seqs[i];
    tracing::error!(parent: &s.req.span, "generation failed: {msg}");
    s.last_event = Some(GenEvent::Error(msg.to_string()));
    s.next = None;
    s.prefill_pos = s.req.prompt.len();
}

/// Sample from `logits`, stream the token, and decide whether the sequence goes on
/// (`s.next` set) or is finished (a `Done` event sent).
pub(super) fn accept(tok: &Tok, s: &mut Seq, logits: &mut [f32]) -> Result<(), EngineError> {
    if s.req.sampling.ignore_eos {
        for &e in &tok.eog {
            if let Some(l) = logits.get_mut(e as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    if let Some((c, table)) = &mut s.constraint {
        let t0 = Instant::now();
        let n = c.mask(table, logits);
        metrics::observe_constraint_mask(t0.elapsed());
        if n == 0 {
            return Err(EngineError::Constraint(
                "the output grammar allows no token here".into(),
            ));
        }
    }
    let (id, lp) = s.sampler.sample_after(logits, &s.req.prompt, &s.generated);
    if let Some((c, table)) = &mut s.constraint {
        if !c.advance(table, id) {
            return Err(EngineError::Constraint(format!(
                "sampled token {id} is outside the output grammar"
            )));
        }
    }
    let now = Instant::now();
    match s.first_token_at {
        None => {
            s.first_token_at = Some(now);
            metrics::observe_ttft(s.req.enqueued.elapsed());
        }
        Some(_) => metrics::observe_itl(now - s.last_token_at),
    }
    s.last_token_at = now;
    s.generated.push(id);
    let is_eog = tok.eog.contains(&id);
    let mut finish = None;
    let mut text = String::new();
    if is_eog {
        finish = Some(FinishReason::Stop);
    } else {
        let delta = s.detok.push(tok, id)?;
        let step = s.stop.push(&delta);
        text = step.emit;
        if step.stopped {
            finish = Some(FinishReason::Stop);
        }
    }
    // The API layer guarantees prompt + max_tokens fits the context.
    if finish.is_none() && s.generated.len() >= s.req.max_tokens {
        finish = Some(FinishReason::Length);
    }
    if finish == Some(FinishReason::Length) {
        // Release what the detokenizer and stop matcher held back.
        let tail = s.detok.flush(tok)?;
        let step = s.stop.push(&tail);
        text.push_str(&step.emit);
        if !step.stopped {
            text.push_str(&s.stop.finish());
        }
    }
    let logprob = lp.map(|lp| LogprobEntry {
        token: tok.decode(&[id], true).unwrap_or_default(),
        logprob: lp.logprob,
        top: lp
            .top
            .iter()
            .map(|&(t, l)| (tok.decode(&[t], true).unwrap_or_default(), l))
            .collect(),
    });
    let gone = s
        .req
        .events
        .send(GenEvent::Token { text, logprob })
        .is_err();
    if gone {
        tracing::info!(parent: &s.req.span, tokens = s.generated.len(), "client went away; generation cancelled");
        metrics::cancelled();
        return Ok(());
    }
    match finish {
        Some(f) => {
            let usage = Usage {
                prompt_tokens: s.req.prompt.len(),
                completion_tokens: s.generated.len(),
                cached_tokens: s.reused,
            };
            let stop_sequence = s.stop.matched().map(str::to_string);
            s.last_event = Some(GenEvent::Done {
                finish: f,
                usage,
                stop_sequence,
            });
        }
        None => s.next = Some(id),
    }
    Ok(())
}
