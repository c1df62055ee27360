//! The scheduling loop driven through a small fake model: batching, admission up to
//! `max_batch`, mixed steps, failure isolation and the session commands, with outputs
//! checked against each request run alone.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    serve, Forward, Link, Sched, IDLE_WIDE_PREFILL_CHUNK, MIXED_PREFILL_CHUNK, PREFILL_CHUNK,
};
use crate::engine::decode::constrain::TokenTable;
use crate::engine::model::{HostRows, Logits, SeqInput};
use crate::engine::text::template::{ChatTemplate, CHATML};
use crate::engine::text::tokenizer::Tok;
use crate::engine::{
    Command, EngineError, EngineState, FinishReason, GenEvent, GenRequest, Loaded, ModelInfo,
    SamplingParams, SessionCmd, StoreView,
};
use crate::kv::store::{KvError, SessionStore};
use crate::kv::{CacheLayout, KvDtype};

/// Words `w0`..`w30` and `</s>` (the end of generation).
const VOCAB: usize = 32;
const EOS: u32 = 31;
/// A token the fake refuses: any pass that feeds it fails.
const POISON: u32 = 13;

/// A model whose next token is the last one plus one, never [`POISON`] (so `w30` is
/// followed by `</s>`),
/// that keeps real caches and records the shape of every pass.
struct Fake {
    /// Per pass, the number of new tokens of each sequence.
    passes: Mutex<Vec<Vec<usize>>>,
    /// Time each pass takes, so that requests can join while others run.
    delay: Duration,
    /// Whether it claims to prefill wide (as a GPU with tensor-core prefill does).
    wide: bool,
}

impl Fake {
    fn new(delay_ms: u64) -> Arc<Self> {
        Arc::new(Self {
            passes: Mutex::new(Vec::new()),
            delay: Duration::from_millis(delay_ms),
            wide: false,
        })
    }

    fn wide() -> Arc<Self> {
        Arc::new(Self {
            passes: Mutex::new(Vec::new()),
            delay: Duration::ZERO,
            wide: true,
        })
    }

    fn passes(&self) -> Vec<Vec<usize>> {
        self.passes.lock().unwrap().clone()
    }
}

/// The fake's shared logits buffer.
struct SharedRows(Vec<f32>);

impl HostRows for SharedRows {
    fn floats(&self) -> candle_core::Result<&[f32]> {
        Ok(&self.0)
    }
}

impl Forward for Fake {
    fn forward(&self, batch: &mut [SeqInput<'_>]) -> candle_core::Result<Vec<Logits>> {
        if batch.iter().any(|s| s.tokens.contains(&POISON)) {
            candle_core::bail!("poisoned token in the pass");
        }
        std::thread::sleep(self.delay);
        self.passes
            .lock()
            .unwrap()
            .push(batch.iter().map(|s| s.tokens.len()).collect());
        let mut rows = Vec::with_capacity(batch.len());
        for s in batch.iter_mut() {
            s.cache.reserve(s.tokens.len())?;
            s.cache.commit(s.tokens);
            let mut next = (*s.tokens.last().unwrap() as usize + 1).min(EOS as usize);
            if next == POISON as usize {
                next += 1;
            }
            let mut logits = vec![0f32; VOCAB];
            logits[next] = 10.0;
            rows.push(logits);
        }
        // A pass of several sequences hands back rows of one shared buffer, as the fused
        // GPU path's decode steps do; a single sequence a tensor.
        if rows.len() > 1 {
            let buf: Arc<dyn HostRows> = Arc::new(SharedRows(rows.concat()));
            return Ok((0..rows.len())
                .map(|i| Logits::shared(buf.clone(), i * VOCAB..(i + 1) * VOCAB, 1))
                .collect());
        }
        rows.into_iter()
            .map(|r| Ok(Tensor::from_vec(r, (1, VOCAB), &Device::Cpu)?.into()))
            .collect()
    }

    fn cache_layout(&self, dtype: KvDtype) -> CacheLayout {
        CacheLayout {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim: 4,
            dtype,
            window: None,
        }
    }

    fn device(&self) -> &Device {
        &Device::Cpu
    }

    fn prefill_wide(&self) -> bool {
        self.wide
    }
}

fn loaded() -> Arc<Loaded> {
    let mut vocab = serde_json::Map::new();
    for i in 0..EOS {
        vocab.insert(format!("w{i}"), i.into());
    }
    vocab.insert("</s>".into(), EOS.into());
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    let tok = Tok::from_file(&path, None, Some(EOS)).unwrap();
    let tokens = Arc::new(TokenTable::new(tok.token_bytes(), vec![EOS]));
    Arc::new(Loaded {
        info: ModelInfo {
            id: "fake".into(),
            path: path.clone(),
            arch: "fake".into(),
            ctx_size: 4096,
            vocab_size: VOCAB,
            n_layers: 1,
            weight_bytes: 0,
            kv_bytes_per_token: 16,
            kv_dtype: KvDtype::F16,
            created: 0,
        },
        tok: Arc::new(tok),
        template: ChatTemplate::new(CHATML, "", "</s>").unwrap(),
        tokens,
    })
}

/// A running scheduling loop over a fake model.
struct Loop {
    tx: mpsc::Sender<Command>,
    view: watch::Receiver<Arc<StoreView>>,
    waiting: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Loop {
    /// Start the loop; `queued` requests are in its queue before it takes anything.
    fn start(fake: &Arc<Fake>, max_batch: usize, queued: Vec<GenRequest>) -> Self {
        let (tx, rx) = mpsc::channel(64);
        let (state, _) = watch::channel(EngineState::Loading);
        let (view_tx, view) = watch::channel(Arc::new(StoreView::default()));
        let waiting = Arc::new(AtomicUsize::new(0));
        let mut me = Self {
            tx,
            view,
            waiting: waiting.clone(),
            thread: None,
        };
        for r in queued {
            me.submit(r);
        }
        let link = Link {
            rx,
            state,
            view: view_tx,
            waiting,
        };
        let fake = fake.clone();
        let sched = Sched {
            max_batch,
            kv_dtype: KvDtype::F16,
            kv_min_free: 0,
        };
        me.thread = Some(std::thread::spawn(move || {
            serve(&*fake, &loaded(), &sched, SessionStore::new(1 << 20), link)
        }));
        me
    }

    fn submit(&self, r: GenRequest) {
        self.waiting
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.tx.try_send(Command::Generate(r)).unwrap();
    }

    fn ask<T>(&self, cmd: impl FnOnce(oneshot::Sender<T>) -> SessionCmd) -> T {
        let (reply, answer) = oneshot::channel();
        self.tx.try_send(Command::Session(cmd(reply))).unwrap();
        answer.blocking_recv().unwrap()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        // Closing the queue ends the loop.
        let (tx, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn request(
    prompt: &[u32],
    max_tokens: usize,
    session: Option<&str>,
) -> (GenRequest, mpsc::UnboundedReceiver<GenEvent>) {
    let (events, rx) = mpsc::unbounded_channel();
    let req = GenRequest {
        prompt: prompt.to_vec(),
        session: session.map(str::to_string),
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        stop: Vec::new(),
        grammar: None,
        events,
        span: tracing::Span::none(),
        enqueued: Instant::now(),
    };
    (req, rx)
}

/// What a request got back: its text, token count and how it ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    Done {
        text: String,
        tokens: usize,
        finish: FinishReason,
        cached: usize,
    },
    Error(String),
    Rejected(String),
}

fn collect(rx: mpsc::UnboundedReceiver<GenEvent>) -> Outcome {
    collect_after(rx, 0)
}

/// Like [`collect`], for a stream whose first `seen` tokens were read already.
fn collect_after(mut rx: mpsc::UnboundedReceiver<GenEvent>, seen: usize) -> Outcome {
    let (mut text, mut tokens) = (String::new(), seen);
    loop {
        match rx.blocking_recv().expect("the loop dropped a request") {
            GenEvent::Token { text: t, .. } => {
                text.push_str(&t);
                tokens += 1;
            }
            GenEvent::Done { finish, usage, .. } => {
                assert_eq!(usage.completion_tokens, tokens);
                return Outcome::Done {
                    text,
                    tokens,
                    finish,
                    cached: usage.cached_tokens,
                };
            }
            GenEvent::Error(e) => return Outcome::Error(e),
            GenEvent::Rejected(e) => return Outcome::Rejected(e.to_string()),
        }
    }
}

/// The outcome of a request run alone on a fresh loop.
fn alone(prompt: &[u32], max_tokens: usize) -> Outcome {
    let (r, rx) = request(prompt, max_tokens, None);
    let _l = Loop::start(&Fake::new(0), 8, vec![r]);
    collect(rx)
}

#[test]
fn a_request_decodes_to_the_end_of_generation() {
    let out = alone(&[25, 26], 100);
    // 27, 28, 29, 30, then `</s>` ends it (counted, not shown).
    assert_eq!(
        out,
        Outcome::Done {
            text: "w27 w28 w29 w30".into(),
            tokens: 5,
            finish: FinishReason::Stop,
            cached: 0,
        }
    );
    assert!(matches!(
        alone(&[1, 2, 3], 4),
        Outcome::Done {
            tokens: 4,
            finish: FinishReason::Length,
            ..
        }
    ));
}

#[test]
fn requests_queued_together_share_every_pass() {
    let fake = Fake::new(0);
    let prompts: [&[u32]; 3] = [&[1, 2, 3], &[4, 5], &[14, 15, 16, 17]];
    let (reqs, rxs): (Vec<_>, Vec<_>) = prompts.iter().map(|p| request(p, 6, None)).unzip();
    let l = Loop::start(&fake, 8, reqs);
    let got: Vec<Outcome> = rxs.into_iter().map(collect).collect();
    drop(l);
    for (p, g) in prompts.iter().zip(&got) {
        assert_eq!(*g, alone(p, 6), "prompt {p:?}");
    }
    // One prefill pass for the three prompts, then five decode passes of three tokens.
    let passes = fake.passes();
    assert_eq!(passes[0], vec![3, 2, 4], "{passes:?}");
    assert_eq!(passes[1..], vec![vec![1, 1, 1]; 5], "{passes:?}");
}

#[test]
fn max_batch_bounds_the_live_sequences() {
    let fake = Fake::new(0);
    let (reqs, rxs): (Vec<_>, Vec<_>) = (0..5).map(|i| request(&[i, i + 1], 4, None)).unzip();
    let l = Loop::start(&fake, 2, reqs);
    let got: Vec<Outcome> = rxs.into_iter().map(collect).collect();
    drop(l);
    for (i, g) in got.iter().enumerate() {
        let i = i as u32;
        assert_eq!(*g, alone(&[i, i + 1], 4));
    }
    let passes = fake.passes();
    assert!(passes.iter().all(|p| p.len() <= 2), "{passes:?}");
    assert!(passes.iter().any(|p| p.len() == 2), "{passes:?}");
}

#[test]
fn a_long_prompt_joins_running_streams_in_mixed_steps() {
    let fake = Fake::new(2);
    let (a, a_rx) = request(&[0], 30, None);
    let l = Loop::start(&fake, 8, vec![a]);
    // Wait for A's first token, then B joins with a prompt longer than a mixed chunk.
    let mut a_rx = a_rx;
    let first = a_rx.blocking_recv().unwrap();
    assert!(matches!(first, GenEvent::Token { .. }));
    let long: Vec<u32> = (0..300).map(|i| i % 10).collect();
    let (b, b_rx) = request(&long, 3, None);
    l.submit(b);
    let b_out = collect(b_rx);
    let a_rest = collect_after(a_rx, 1);
    drop(l);
    assert_eq!(b_out, alone(&long, 3));
    let Outcome::Done { tokens, .. } = a_rest else {
        panic!("A did not finish: {a_rest:?}")
    };
    assert_eq!(tokens, 30);
    // B's prompt rode along A's decode steps, a mixed chunk at a time.
    let passes = fake.passes();
    assert!(
        passes.contains(&vec![1, MIXED_PREFILL_CHUNK]),
        "no mixed step in {passes:?}"
    );
    assert!(passes
        .iter()
        .all(|p| p.iter().sum::<usize>() <= MIXED_PREFILL_CHUNK + 1 || p.len() == 1));
}

#[test]
fn a_failing_sequence_fails_alone() {
    let fake = Fake::new(0);
    let (good1, r1) = request(&[1, 2], 5, None);
    let (bad, rb) = request(&[POISON, 2], 5, None);
    let (good2, r2) = request(&[20, 21], 5, None);
    let l = Loop::start(&fake, 8, vec![good1, bad, good2]);
    let (o1, ob, o2) = (collect(r1), collect(rb), collect(r2));
    drop(l);
    assert_eq!(o1, alone(&[1, 2], 5));
    assert_eq!(o2, alone(&[20, 21], 5));
    assert!(
        matches!(&ob, Outcome::Error(e) if e.contains("poisoned")),
        "{ob:?}"
    );
}

#[test]
fn sessions_are_reused_and_commanded_through_the_loop() {
    let fake = Fake::new(0);
    let l = Loop::start(&fake, 8, Vec::new());
    let (r, rx) = request(&[1, 2, 3], 3, Some("s1"));
    l.submit(r);
    let first = collect(rx);
    assert!(matches!(first, Outcome::Done { cached: 0, .. }));
    // The view shows the idle session with its tokens.
    let view = l.view.borrow().clone();
    let s = view
        .sessions
        .iter()
        .find(|s| s.id == "s1")
        .expect("session listed");
    assert_eq!(s.tokens, 3 + 2, "prompt and fed tokens: {s:?}");
    assert!(!s.busy);
    // The next turn reads its prefix from the cache.
    let (r, rx) = request(&[1, 2, 3, 4, 5, 9], 2, Some("s1"));
    l.submit(r);
    assert!(matches!(collect(rx), Outcome::Done { cached: 5, .. }));
    // Pin, then delete, through commands answered by the loop.
    let pinned = l.ask(|reply| SessionCmd::Pin {
        id: "s1".into(),
        pinned: true,
        reply,
    });
    assert!(pinned.unwrap().pinned);
    assert!(l
        .view
        .borrow()
        .sessions
        .iter()
        .any(|s| s.id == "s1" && s.pinned));
    let deleted = l.ask(|reply| SessionCmd::Delete {
        id: "s1".into(),
        reply,
    });
    assert!(deleted.is_ok());
    assert!(l.view.borrow().sessions.is_empty());
    let again = l.ask(|reply| SessionCmd::Delete {
        id: "s1".into(),
        reply,
    });
    assert!(matches!(
        again,
        Err(EngineError::Session(KvError::NotFound(_)))
    ));
}

#[test]
fn a_busy_session_rejects_a_second_request() {
    let fake = Fake::new(2);
    let (a, ra) = request(&[1, 2], 20, Some("s"));
    let (b, rb) = request(&[1, 2], 20, Some("s"));
    let l = Loop::start(&fake, 8, vec![a, b]);
    let (oa, ob) = (collect(ra), collect(rb));
    drop(l);
    assert!(matches!(oa, Outcome::Done { .. }), "{oa:?}");
    assert!(
        matches!(&ob, Outcome::Rejected(e) if e.contains("busy")),
        "{ob:?}"
    );
}

#[test]
fn short_prompt_chunks_on_a_fused_gpu_prefill_together() {
    use super::step::{prefill_together, Take};
    // Host caches: always together when there are several.
    assert!(prefill_together(
        [(true, Take::Prompt(500)), (true, Take::Prompt(3))],
        0
    ));
    assert!(!prefill_together([(true, Take::Prompt(5))], 64));
    // Device caches: together only when every chunk fits the fused path.
    let dev = |n| (false, Take::Prompt(n));
    assert!(prefill_together([dev(40), dev(64), dev(1)], 64));
    assert!(!prefill_together([dev(40), dev(65)], 64));
    assert!(!prefill_together([dev(4), dev(5)], 0));
    assert!(!prefill_together([dev(4)], 64));
    // A device that packs sequences into shared wide passes takes any lengths.
    assert!(prefill_together([dev(900), dev(3), dev(2000)], usize::MAX));
}

#[test]
fn a_long_prompt_alone_prefills_in_large_passes_where_the_device_prefills_wide() {
    let long: Vec<u32> = (0..3000).map(|i| i % 10).collect();
    for (fake, first) in [(Fake::new(0), PREFILL_CHUNK), (Fake::wide(), 3000)] {
        let (r, rx) = request(&long, 2, None);
        let l = Loop::start(&fake, 8, vec![r]);
        let out = collect(rx);
        drop(l);
        assert_eq!(out, alone(&long, 2));
        let passes = fake.passes();
        assert_eq!(passes[0], vec![first], "{passes:?}");
        assert!(passes
            .iter()
            .all(|p| p.iter().sum::<usize>() <= IDLE_WIDE_PREFILL_CHUNK));
    }
}
