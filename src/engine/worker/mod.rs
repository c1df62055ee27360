//! The generation worker: one thread that owns the model and every live sequence.
//!
//! Each loop turn admits queued requests (up to `max_batch` live sequences), then runs
//! one forward pass where it can: the next prompt chunks of sequences still reading
//! their prompts (`PREFILL_CHUNK` tokens in all, `MIXED_PREFILL_CHUNK` while others
//! decode) together with the next token of every decoding sequence. Sequences join and
//! leave between steps.

use std::fs::File;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use tokio::sync::{mpsc, watch};

use super::decode::constrain::{Constraint, TokenTable};
use super::decode::sampling::Sampler;
use super::model::{Model, SeqInput};
use super::text::stop::StopMatcher;
use super::text::template::{ChatTemplate, CHATML};
use super::text::tokenizer::{DetokStream, Tok};
use super::{
    fetch, EngineConfig, EngineError, EngineState, FinishReason, GenEvent, GenRequest, Loaded,
    LogprobEntry, ModelInfo, Usage,
};
use crate::kv::store::{Lookup, SessionStore, SpillConfig};
use crate::kv::{KvDtype, SeqCache};
use crate::metrics;
use std::sync::Mutex;

/// Prompt tokens processed per forward pass during prefill, so that a long prompt does
/// not stall the decode steps of other sequences for its whole length.
const PREFILL_CHUNK: usize = 512;
/// Prompt tokens per forward pass while other sequences are decoding. Their next tokens
/// ride in the same pass (a mixed step), so a long prompt joining holds each running
/// stream up by one such chunk at a time (~0.1 s on two cores for a small model), not by
/// a whole `PREFILL_CHUNK` plus a separate decode pass.
const MIXED_PREFILL_CHUNK: usize = 128;
/// Trim the allocator once idle caches shrank by this much since the last trim.
const TRIM_AFTER_BYTES: usize = 32 << 20;

/// How often the worker looks at the host's available memory.
const MEM_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

struct Seq {
    req: GenRequest,
    cache: SeqCache,
    sampler: Sampler,
    detok: DetokStream,
    stop: StopMatcher,
    /// Prompt tokens not yet run through the model.
    prefill_pos: usize,
    generated: Vec<u32>,
    /// Last sampled token, to be fed in the next decode step.
    next: Option<u32>,
    first_token_at: Option<Instant>,
    last_token_at: Instant,
    /// Prompt tokens served from the cache.
    reused: usize,
    constraint: Option<(Constraint, Arc<TokenTable>)>,
    /// The last event (`Done` or `Error`), sent only after the cache is checked back in,
    /// so a client that sends its next turn the moment it has this answer finds the
    /// session idle instead of busy.
    last_event: Option<GenEvent>,
}

fn load(cfg: &EngineConfig) -> Result<(Model, Arc<Loaded>), EngineError> {
    let resolved = fetch::resolve(&cfg.model, &cfg.data_dir)?;
    let path = resolved.path.clone();
    tracing::info!(path = %path.display(), "loading model");
    let t0 = Instant::now();
    let device = pick_device(&cfg.device)?;
    tracing::info!(device = ?device.location(), "compute device");
    let (model, tok, template) = if resolved.is_hf_dir() {
        load_hf_dir(&path, &device, cfg.ctx_size)?
    } else {
        load_gguf(&path, &device, cfg.ctx_size)?
    };
    let ctx = model.ctx_size;
    model
        .cache_layout(cfg.kv_dtype)
        .check()
        .map_err(EngineError::Load)?;
    let tokens = Arc::new(TokenTable::new(
        tok.token_bytes(),
        tok.eog.iter().copied().collect(),
    ));
    let info = ModelInfo {
        id: resolved.id,
        path,
        arch: model.config.arch.clone(),
        ctx_size: ctx,
        vocab_size: model.config.vocab,
        n_layers: model.config.n_layers,
        weight_bytes: model.weight_bytes,
        kv_bytes_per_token: model.cache_layout(cfg.kv_dtype).bytes_per_token(),
        kv_dtype: cfg.kv_dtype,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    tracing::info!(
        model = %info.id, arch = %info.arch, ctx = info.ctx_size, layers = info.n_layers,
        weight_mb = info.weight_bytes / (1 << 20), secs = t0.elapsed().as_secs_f32(),
        "model loaded"
    );
    metrics::model_loaded(&info.id, &info.arch, info.weight_bytes, info.ctx_size);
    metrics::kv_layout(info.kv_dtype.name(), info.kv_bytes_per_token);
    Ok((
        model,
        Arc::new(Loaded {
            info,
            tok: Arc::new(tok),
            template,
            tokens,
        }),
    ))
}

/// A GGUF file: weights, tokenizer (a `tokenizer.json` beside it wins) and template
/// from its metadata.
fn load_gguf(
    path: &std::path::Path,
    device: &Device,
    ctx_size: usize,
) -> Result<(Model, Tok, ChatTemplate), EngineError> {
    let mut f =
        File::open(path).map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
    let ct = gguf_file::Content::read(&mut f)
        .map_err(|e| EngineError::Load(format!("{}: not a readable GGUF: {e}", path.display())))?;
    let probe = super::model::ModelConfig::from_gguf(&ct)?;
    let ctx = if ctx_size == 0 {
        probe.train_ctx
    } else {
        ctx_size
    };
    let model = Model::from_gguf(&ct, &mut f, device, ctx)?;
    let sibling = path.with_file_name("tokenizer.json");
    let tok = Tok::from_gguf(&ct, Some(&sibling))?;
    let meta_str = |k: &str| ct.metadata.get(k).and_then(|v| v.to_string().ok()).cloned();
    let tmpl_src = meta_str("tokenizer.chat_template").unwrap_or_else(|| CHATML.to_string());
    let tok_text = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
    let template = ChatTemplate::new(&tmpl_src, &tok_text(tok.bos_id), &tok_text(tok.eos_id))?;
    Ok((model, tok, template))
}

/// A Hugging Face model directory: `config.json` and safetensors, `tokenizer.json`,
/// `tokenizer_config.json` (template, BOS/EOS), `generation_config.json` (EOS ids).
fn load_hf_dir(
    dir: &std::path::Path,
    device: &Device,
    ctx_size: usize,
) -> Result<(Model, Tok, ChatTemplate), EngineError> {
    let load = |e: candle_core::Error| EngineError::Load(e.to_string());
    let (_, config) = super::model::hf::read_config(dir).map_err(load)?;
    let (tok, bos, eos) = Tok::from_hf_dir(dir, &config)?;
    let tc = super::model::hf::read_json(dir, "tokenizer_config.json")
        .map_err(load)?
        .unwrap_or_default();
    let src = super::text::template::hf_template(&tc, dir).unwrap_or_else(|| CHATML.to_string());
    let template = ChatTemplate::new(&src, &bos, &eos)?;
    let model = Model::from_hf_dir(dir, device, ctx_size).map_err(load)?;
    Ok((model, tok, template))
}

pub(super) fn run(
    cfg: EngineConfig,
    mut rx: mpsc::Receiver<GenRequest>,
    state: watch::Sender<EngineState>,
    store: Arc<Mutex<SessionStore>>,
) {
    // The store stays consistent between statements; a poisoned lock is still usable.
    let lock = || store.lock().unwrap_or_else(|p| p.into_inner());
    if cfg.threads > 0 {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads)
            .build_global()
        {
            tracing::warn!("thread pool already set up: {e}");
        }
    }
    let (model, loaded) = match load(&cfg) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!("{e}");
            let _ = state.send(EngineState::Failed(e.to_string()));
            return;
        }
    };
    if cfg.kv_disk_budget > 0 {
        let layout = model.cache_layout(cfg.kv_dtype);
        let fingerprint = format!(
            "{}:{}:{}x{}x{}:{:?}",
            loaded.info.id,
            std::fs::metadata(&loaded.info.path)
                .map(|m| m.len())
                .unwrap_or(0),
            layout.n_layers,
            layout.n_kv_heads,
            layout.head_dim,
            layout.dtype
        );
        let found = lock().enable_spill(SpillConfig {
            dir: cfg.kv_spill_dir.clone(),
            disk_budget: cfg.kv_disk_budget,
            fingerprint,
            layout,
            device: model.device().clone(),
        });
        tracing::info!(dir = %cfg.kv_spill_dir.display(), sessions = found, "session spill dir indexed");
    }
    metrics::bind_model(&loaded.info.id);
    let _ = state.send(EngineState::Ready(loaded.clone()));
    let (stats, delta) = lock().report();
    metrics::kv_store(&loaded.info.id, &stats, &delta);
    let tok = loaded.tok.clone();
    let mut seqs: Vec<Seq> = Vec::new();
    // Most bytes the store held since the allocator was last trimmed.
    let mut resident_peak = 0usize;
    let mut sys = sysinfo::System::new();
    let mut last_mem_check = Instant::now();
    loop {
        if seqs.is_empty() {
            match rx.blocking_recv() {
                Some(r) => seqs.extend(admit(&model, &loaded.tokens, cfg.kv_dtype, r, &mut lock())),
                None => return,
            }
        }
        while seqs.len() < cfg.max_batch.max(1) {
            match rx.try_recv() {
                Ok(r) => seqs.extend(admit(&model, &loaded.tokens, cfg.kv_dtype, r, &mut lock())),
                Err(_) => break,
            }
        }
        metrics::set_running(seqs.len(), rx.len());
        // Mixed steps on host caches; a GPU keeps separate prefill and decode passes.
        let mixed = seqs.iter().any(|s| s.next.is_some()) && seqs.iter().all(|s| s.cache.is_host());
        let budget = if mixed {
            MIXED_PREFILL_CHUNK
        } else {
            PREFILL_CHUNK
        };
        let picked = pick_prefill(&seqs, budget);
        if !(mixed && !picked.is_empty() && mixed_step(&model, &tok, &mut seqs, &picked)) {
            prefill_picked(&model, &tok, &mut seqs, &picked);
            decode_step(&model, &tok, &mut seqs);
        }
        if cfg.kv_min_free > 0 && last_mem_check.elapsed() >= MEM_CHECK_EVERY {
            last_mem_check = Instant::now();
            sys.refresh_memory();
            let avail = sys.available_memory() as usize;
            if avail < cfg.kv_min_free {
                let freed = lock().relieve(cfg.kv_min_free - avail);
                if freed > 0 {
                    tracing::warn!(
                        available = avail,
                        freed,
                        "host memory low: idle session caches moved out of memory"
                    );
                }
            }
        }
        // Keep sequences still prefilling or with a token to feed whose client listens;
        // the others hand their cache back (it holds exactly the tokens computed).
        let (live, done): (Vec<Seq>, Vec<Seq>) = seqs.into_iter().partition(|s| {
            (s.next.is_some() || s.prefill_pos < s.req.prompt.len()) && !s.req.events.is_closed()
        });
        seqs = live;
        if !done.is_empty() {
            let mut st = lock();
            let mut last = Vec::with_capacity(done.len());
            for s in done {
                metrics::kv_session_tokens(s.cache.len());
                st.checkin(s.req.session.as_deref(), s.cache);
                last.extend(s.last_event.map(|ev| (s.req.events, ev)));
            }
            let (stats, delta) = st.report();
            metrics::kv_store(&loaded.info.id, &stats, &delta);
            drop(st);
            // Caches left memory (spilled, evicted, dropped): give the pages back.
            resident_peak = resident_peak.max(stats.resident_bytes);
            if resident_peak - stats.resident_bytes >= TRIM_AFTER_BYTES {
                super::release_freed_memory();
                resident_peak = stats.resident_bytes;
            }
            // Only now: the session is idle and the metrics count this request.
            for (events, ev) in last {
                // Counted here, on this thread: `accept` may run on a pool thread, and
                // the model label is this thread's.
                if let GenEvent::Done { finish, usage } = &ev {
                    metrics::finished(
                        finish.as_str(),
                        usage.prompt_tokens,
                        usage.completion_tokens,
                    );
                }
                let _ = events.send(ev);
            }
        }
    }
}

fn admit(
    model: &Model,
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
fn fail(seqs: &mut [Seq], i: usize, msg: &str) {
    let s = &mut seqs[i];
    tracing::error!(parent: &s.req.span, "generation failed: {msg}");
    s.last_event = Some(GenEvent::Error(msg.to_string()));
    s.next = None;
    s.prefill_pos = s.req.prompt.len();
}

/// The sequences still reading their prompts and how many of their tokens the next
/// pass takes: in order, up to `budget` tokens in all.
fn pick_prefill(seqs: &[Seq], mut budget: usize) -> Vec<(usize, usize)> {
    let mut picked = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        let left = s.req.prompt.len().saturating_sub(s.prefill_pos);
        if left == 0 || budget == 0 {
            continue;
        }
        let n = left.min(budget);
        budget -= n;
        picked.push((i, n));
    }
    picked
}

/// Prefill the `picked` chunks: all in one forward pass, so that streams joining
/// together are not prefilled one loop turn each. If that pass fails, each sequence is
/// retried alone, so that one bad sequence fails only itself (a failed pass commits
/// nothing to any cache).
fn prefill_picked(model: &Model, tok: &Tok, seqs: &mut [Seq], picked: &[(usize, usize)]) {
    // Host caches only: on a GPU the fused decoder takes short prompts one sequence at a
    // time anyway, and a batch with one long prompt would send all of them to the
    // tensor path instead.
    if picked.len() > 1 && picked.iter().all(|&(i, _)| seqs[i].cache.is_host()) {
        let t0 = Instant::now();
        let result = {
            // `picked` is in index order: walk the sequences once, taking those picked.
            let mut next = picked.iter().peekable();
            let mut inputs: Vec<SeqInput> = seqs
                .iter_mut()
                .enumerate()
                .filter_map(|(i, s)| {
                    let &(_, n) = next.next_if(|&&(j, _)| j == i)?;
                    Some(SeqInput {
                        tokens: &s.req.prompt[s.prefill_pos..s.prefill_pos + n],
                        cache: &mut s.cache,
                        all_logits: false,
                    })
                })
                .collect();
            model.forward(&mut inputs)
        };
        if let Ok(logits) = result {
            let total: usize = picked.iter().map(|&(_, n)| n).sum();
            metrics::observe_prefill(total, t0.elapsed());
            for (&(i, n), l) in picked.iter().zip(logits) {
                let s = &mut seqs[i];
                s.prefill_pos += n;
                if s.prefill_pos == s.req.prompt.len() {
                    let done = l
                        .squeeze(0)
                        .and_then(|r| r.to_vec1::<f32>())
                        .map_err(EngineError::from)
                        .and_then(|mut row| accept(tok, s, &mut row));
                    if let Err(e) = done {
                        fail(seqs, i, &e.to_string());
                    }
                }
            }
            return;
        }
    }
    for &(i, n) in picked {
        if let Err(e) = prefill_chunk(model, tok, &mut seqs[i], n) {
            fail(seqs, i, &e.to_string());
        }
    }
}

/// The next `n` prompt tokens of `s` in a forward pass of their own.
fn prefill_chunk(model: &Model, tok: &Tok, s: &mut Seq, n: usize) -> Result<(), EngineError> {
    let span = s.req.span.clone();
    let _g = span.enter();
    let t0 = Instant::now();
    let end = (s.prefill_pos + n).min(s.req.prompt.len());
    let chunk = &s.req.prompt[s.prefill_pos..end];
    let mut input = [SeqInput {
        tokens: chunk,
        cache: &mut s.cache,
        all_logits: false,
    }];
    let logits = model.forward(&mut input)?;
    s.prefill_pos = end;
    metrics::observe_prefill(chunk.len(), t0.elapsed());
    if end == s.req.prompt.len() {
        let mut row = logits
            .into_iter()
            .next()
            .ok_or_else(|| EngineError::Tokenizer("no logits".into()))?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        accept(tok, s, &mut row)?;
    }
    Ok(())
}

/// One forward pass for the `picked` prompt chunks and the next token of every decoding
/// sequence (host caches). Returns false, having changed nothing, if the pass fails: the
/// caller then prefills and decodes separately, which retries each sequence alone.
fn mixed_step(model: &Model, tok: &Tok, seqs: &mut [Seq], picked: &[(usize, usize)]) -> bool {
    let t0 = Instant::now();
    let feeds: Vec<Option<[u32; 1]>> = seqs.iter().map(|s| s.next.map(|t| [t])).collect();
    let chunk = |i: usize| picked.iter().find(|&&(j, _)| j == i).map(|&(_, n)| n);
    let result = {
        let mut inputs: Vec<SeqInput> = seqs
            .iter_mut()
            .zip(&feeds)
            .enumerate()
            .filter_map(|(i, (s, feed))| {
                let tokens: &[u32] = match (feed, chunk(i)) {
                    (Some(f), _) => f,
                    (None, Some(n)) => &s.req.prompt[s.prefill_pos..s.prefill_pos + n],
                    (None, None) => return None,
                };
                Some(SeqInput {
                    tokens,
                    cache: &mut s.cache,
                    all_logits: false,
                })
            })
            .collect();
        model.forward(&mut inputs)
    };
    let Ok(rows) = result.and_then(host_rows) else {
        return false;
    };
    let total: usize = picked.iter().map(|&(_, n)| n).sum();
    metrics::observe_prefill(total, t0.elapsed());
    // Every sequence that took part now samples, unless it is still mid-prompt.
    let mut jobs: Vec<(usize, &mut Seq, Vec<f32>)> = Vec::with_capacity(rows.len());
    let mut rows = rows.into_iter();
    for (i, s) in seqs.iter_mut().enumerate() {
        let fed = s.next.take().is_some();
        let n = if fed { None } else { chunk(i) };
        if !fed && n.is_none() {
            continue;
        }
        let Some(row) = rows.next() else { break };
        if let Some(n) = n {
            s.prefill_pos += n;
            if s.prefill_pos < s.req.prompt.len() {
                continue;
            }
        }
        jobs.push((i, s, row));
    }
    let failed: Vec<(usize, String)> = jobs
        .par_iter_mut()
        .filter_map(|(i, s, row)| accept(tok, s, row).err().map(|e| (*i, e.to_string())))
        .collect();
    drop(jobs);
    for (i, e) in failed.into_iter().rev() {
        fail(seqs, i, &e);
    }
    true
}

/// One batched decode step for every sequence that has a token to feed.
fn decode_step(model: &Model, tok: &Tok, seqs: &mut [Seq]) {
    let ready: Vec<usize> = (0..seqs.len())
        .filter(|&i| seqs[i].next.is_some())
        .collect();
    if ready.is_empty() {
        return;
    }
    let t0 = Instant::now();
    let feeds: Vec<[u32; 1]> = seqs.iter().filter_map(|s| s.next.map(|t| [t])).collect();
    let result = {
        let mut inputs: Vec<SeqInput> = seqs
            .iter_mut()
            .filter(|s| s.next.is_some())
            .zip(&feeds)
            .map(|(s, f)| SeqInput {
                tokens: f,
                cache: &mut s.cache,
                all_logits: false,
            })
            .collect();
        model.forward(&mut inputs)
    };
    let logits = match result {
        Ok(l) => l,
        Err(e) => {
            for &i in ready.iter().rev() {
                fail(seqs, i, &e.to_string());
            }
            return;
        }
    };
    metrics::observe_decode_step(ready.len(), t0.elapsed());
    // The logits rows on the host, in one copy from a GPU (copies from several threads
    // at once would each wait on the device in turn).
    let rows = match host_rows(logits) {
        Ok(r) => r,
        Err(e) => {
            for &i in ready.iter().rev() {
                fail(seqs, i, &e.to_string());
            }
            return;
        }
    };
    // Sampling, detokenizing and sending are independent per sequence: spread them over
    // the thread pool (each costs tens of µs over a large vocabulary).
    let mut jobs: Vec<(usize, &mut Seq, Vec<f32>)> = seqs
        .iter_mut()
        .enumerate()
        .filter(|(_, s)| s.next.is_some())
        .zip(rows)
        .map(|((i, s), l)| (i, s, l))
        .collect();
    let failed: Vec<(usize, String)> = jobs
        .par_iter_mut()
        .filter_map(|(i, s, row)| {
            s.next = None;
            accept(tok, s, row).err().map(|e| (*i, e.to_string()))
        })
        .collect();
    drop(jobs);
    for (i, e) in failed.into_iter().rev() {
        fail(seqs, i, &e);
    }
}

/// Each sequence's `(1, vocab)` logits as a host vector: one stacked copy when they
/// live on a GPU.
fn host_rows(logits: Vec<Tensor>) -> candle_core::Result<Vec<Vec<f32>>> {
    if logits.len() > 1 && !logits[0].device().is_cpu() {
        return Tensor::cat(&logits, 0)?.to_vec2::<f32>();
    }
    logits
        .iter()
        .map(|l| l.squeeze(0)?.to_vec1::<f32>())
        .collect()
}

/// Sample from `logits`, stream the token, and decide whether the sequence goes on
/// (`s.next` set) or is finished (a `Done` event sent).
fn accept(tok: &Tok, s: &mut Seq, logits: &mut [f32]) -> Result<(), EngineError> {
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
            s.last_event = Some(GenEvent::Done { finish: f, usage });
        }
        None => s.next = Some(id),
    }
    Ok(())
}

/// `auto` (the GPU when this build has one, else the CPU), `cpu`, `cuda`, `cuda:N`, `metal`.
pub fn pick_device(spec: &str) -> Result<Device, EngineError> {
    let dev = |r: candle_core::Result<Device>| {
        r.map_err(|e| EngineError::Load(format!("device `{spec}`: {e}")))
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                dev(Device::new_cuda(0))
            } else if candle_core::utils::metal_is_available() {
                dev(Device::new_metal(0))
            } else {
                Ok(Device::Cpu)
            }
        }
        "cuda" => dev(Device::new_cuda(0)),
        "metal" => dev(Device::new_metal(0)),
        s => match s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => dev(Device::new_cuda(n)),
            None => Err(EngineError::Load(format!(
                "unknown device `{s}` (expected auto, cpu, cuda, cuda:N or metal)"
            ))),
        },
    }
}
