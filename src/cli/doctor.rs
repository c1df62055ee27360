//! `candela doctor`: check a compute device against the CPU on the real model and time
//! it, in one command that prints everything (for GPU machines reached seldom, and for a
//! Mac user verifying Metal). Greedy decoding of a short and a long prompt on the device
//! (through the fused CUDA path and through the tensor path where the build has both)
//! and on the CPU; per run: leading tokens equal to the CPU's, the largest logit gap on
//! the first decoded token, prefill time and decode tok/s; then 8 and 32 sequences
//! decoded together, each checked against the same sequence decoded alone. Models with
//! sliding-window (local) layers also get a long sequence fed through one cache in chunks
//! and single tokens, past the point where the local layers drop the positions their
//! window has left behind, against fresh one-pass prefills.

use std::fs::File;
use std::path::Path;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::Device;

use crate::engine::decode::sampling::argmax;
use crate::engine::model::{Model, SeqInput, Sum8, WideGemm};
use crate::engine::text::tokenizer::Tok;
use crate::engine::{fetch, pick_device, EngineError};
use crate::kv::{KvDtype, SeqCache};

struct Run {
    tokens: Vec<u32>,
    first: Vec<f32>,
    prefill_ms: f64,
    steps_ms: Vec<f64>,
    /// Of each step, the time inside `Model::forward` (the rest: the logits to a Vec).
    forward_ms: Vec<f64>,
}

fn forward1(model: &Model, ids: &[u32], cache: &mut SeqCache) -> Result<Vec<f32>, EngineError> {
    Ok(forward1_timed(model, ids, cache)?.0)
}

/// forward1, and the milliseconds spent inside `Model::forward`.
fn forward1_timed(
    model: &Model,
    ids: &[u32],
    cache: &mut SeqCache,
) -> Result<(Vec<f32>, f64), EngineError> {
    let mut input = [SeqInput {
        tokens: ids,
        cache,
        all_logits: false,
    }];
    let t = Instant::now();
    let out = model.forward(&mut input)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    Ok((out[0].squeeze(0)?.to_vec1::<f32>()?, ms))
}

fn greedy(model: &Model, prompt: &[u32], n: usize) -> Result<Run, EngineError> {
    let mut cache = SeqCache::new(model.cache_layout(KvDtype::F16), model.device());
    let t0 = Instant::now();
    let mut logits = forward1(model, prompt, &mut cache)?;
    let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
    let first = logits.clone();
    let mut tokens = Vec::with_capacity(n);
    let mut steps_ms = Vec::with_capacity(n);
    let mut forward_ms = Vec::with_capacity(n);
    for _ in 0..n {
        let next = argmax(&logits);
        tokens.push(next);
        let t = Instant::now();
        let (l, fwd) = forward1_timed(model, &[next], &mut cache)?;
        logits = l;
        steps_ms.push(t.elapsed().as_secs_f64() * 1e3);
        forward_ms.push(fwd);
    }
    Ok(Run {
        tokens,
        first,
        prefill_ms,
        steps_ms,
        forward_ms,
    })
}

/// `k` sequences stepped together for `n` steps, sequence `i` from the prompt cut by
/// `i % 8` tokens (so that they sit at different positions): aggregate decode tok/s over
/// the forward passes, then each sequence's greedy tokens and a hash of its logits bits
/// per step.
type Batched = (f64, Vec<Vec<u32>>, Vec<Vec<u64>>);

fn batched(model: &Model, prompt: &[u32], k: usize, n: usize) -> Result<Batched, EngineError> {
    let prompts: Vec<&[u32]> = (0..k)
        .map(|i| &prompt[..prompt.len() - (i % 8).min(prompt.len() - 1)])
        .collect();
    let mut caches: Vec<SeqCache> = (0..k)
        .map(|_| SeqCache::new(model.cache_layout(KvDtype::F16), model.device()))
        .collect();
    let mut next = Vec::with_capacity(k);
    for (c, p) in caches.iter_mut().zip(&prompts) {
        next.push(argmax(&forward1(model, p, c)?));
    }
    let mut tokens = vec![Vec::with_capacity(n); k];
    let mut hashes = vec![Vec::with_capacity(n); k];
    // Forward passes only: the hashing below is the check's, not decoding's.
    let mut busy = std::time::Duration::ZERO;
    for _ in 0..n {
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut inputs: Vec<SeqInput<'_>> = caches
            .iter_mut()
            .zip(&toks)
            .map(|(cache, t)| SeqInput {
                tokens: t,
                cache,
                all_logits: false,
            })
            .collect();
        // Timed up to the logits in host memory (as llama.cpp's `llama_decode` leaves
        // them); each row's copy for the check below is not.
        let t0 = Instant::now();
        let out = model.forward_logits(&mut inputs)?;
        busy += t0.elapsed();
        for (i, l) in out.iter().enumerate() {
            let v = l.to_vec()?;
            tokens[i].push(toks[i][0]);
            hashes[i].push(v.iter().fold(0xcbf29ce484222325u64, |h, x| {
                (h ^ x.to_bits() as u64).wrapping_mul(0x100000001b3)
            }));
            next[i] = argmax(&v);
        }
    }
    let rate = (k * n) as f64 / busy.as_secs_f64();
    Ok((rate, tokens, hashes))
}

/// Batched decoding against each sequence stepped alone: aggregate tok/s at 8, 16 and 32
/// sequences, and how many sequences have the same tokens and the same logits bits
/// (`what`, when not empty, names a variant after the count of sequences).
fn batch_report(model: &Model, prompt: &[u32], n: usize, what: &str) -> Result<(), EngineError> {
    let (single_rate, ..) = batched(model, prompt, 1, n)?;
    println!("1 sequence{what}: {single_rate:.1} tok/s");
    for k in [8, 16, 32] {
        batched(model, prompt, k, 4)?; // warm-up: this width's graph
        model.fused_host_phases();
        let (rate, toks, hashes) = batched(model, prompt, k, n)?;
        if let Some((steps, [ptrs, launch, wait])) = model.fused_host_phases() {
            let forward = 1e6 * k as f64 / rate;
            println!(
                "{k} sequences, host side of a batched step ({steps} steps): forward {forward:.0} us = \
                 cache pointers {ptrs:.0} + upload and launch {launch:.0} + GPU and logits \
                 copy {wait:.0} + the rest {:.0}",
                forward - ptrs - launch - wait
            );
        }
        let (mut same_toks, mut same_bits) = (0, 0);
        for i in 0..k.min(8) {
            let p = &prompt[..prompt.len() - (i % 8).min(prompt.len() - 1)];
            let (_, t1, h1) = batched(model, p, 1, n)?;
            same_toks += usize::from(t1[0] == toks[i]);
            same_bits += usize::from(h1[0] == hashes[i]);
        }
        println!(
            "{k} sequences{what} stepped together: {rate:.1} tok/s aggregate; against each stepped \
             alone ({} distinct prompts): tokens identical {same_toks}/{}, logits bit-identical \
             at every step {same_bits}/{}",
            k.min(8),
            k.min(8),
            k.min(8)
        );
    }
    Ok(())
}

/// Batched decoding deep into the context, as long agent sessions decode: 8 and 32
/// sequences, each first prefilled with about 2,000 tokens (fewer where the context is
/// smaller), then stepped together for `n` steps: aggregate tok/s.
fn long_batch_report(model: &Model, ctx: usize, n: usize) -> Result<(), EngineError> {
    let len = 2000.min(ctx.saturating_sub(n + 16));
    if len < 64 {
        return Ok(());
    }
    let vocab = model.config.vocab as u32;
    let ids: Vec<u32> = (0..len as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    // Sequences 0 and 7 (the longest and the shortest prompt) stepped alone, for the
    // check that batched attention deep in the context computes the same bits.
    let mut alone = Vec::with_capacity(2);
    for cut in [0, 7] {
        let (_, toks, hashes) = batched(model, &ids[..len - cut], 1, n)?;
        alone.push((cut, toks, hashes));
    }
    for k in [8, 32] {
        let (rate, toks, hashes) = batched(model, &ids, k, n)?;
        let same = alone
            .iter()
            .filter(|(i, t, h)| toks[*i] == t[0] && hashes[*i] == h[0])
            .count();
        println!(
            "{k} sequences at position {}-{len} stepped together: {rate:.1} tok/s aggregate; \
             tokens and logits bits as stepped alone: {same}/{}",
            len - 7,
            alone.len()
        );
    }
    // The tensor-core attention with its other least chunk length (64 against the
    // default 256, or back), where it runs: its rates and its own batched-against-alone
    // bits (chunks are cut by the length alone, so they hold under either).
    if model.attn_tc() {
        if let Some(was) = model.set_attn_tc_chunk(64) {
            let other = if was == 64 { 256 } else { 64 };
            model.set_attn_tc_chunk(other);
            let cuts: Vec<usize> = alone.iter().map(|(cut, ..)| *cut).collect();
            let r = chunk_rates(model, &ids, n, other, &cuts);
            model.set_attn_tc_chunk(was);
            r?;
        }
    }
    // The other decode attention (tensor cores or a block per query head), where the
    // card and model have both: its rates, and the longest sequence's logits step by
    // step against these (fed the same tokens; the kernels sum in other orders).
    let tc = model.attn_tc();
    if model.set_attn_tc(!tc) {
        let other = if tc {
            "a block per query head"
        } else {
            "on tensor cores"
        };
        let r = other_attention(model, &ids, n, other);
        model.set_attn_tc(tc);
        let theirs = r?;
        let (_, ours) = forced_steps(model, &ids, Some(&theirs.0), n)?;
        println!(
            "attention {other} against the default at position {len}+, {} steps fed the same \
             tokens: {}",
            ours.len(),
            compare_rows(&ours, &theirs.1)
        );
    }
    Ok(())
}

/// `long_batch_report`'s rates and bit checks (the sequences whose prompts are cut by
/// `cuts` stepped alone) with the tensor-core attention in chunks of at least `chunk`
/// positions.
fn chunk_rates(
    model: &Model,
    ids: &[u32],
    n: usize,
    chunk: usize,
    cuts: &[usize],
) -> Result<(), EngineError> {
    let len = ids.len();
    // Its own single-stream runs: the chunking changes the sums' order.
    let mut mine = Vec::with_capacity(cuts.len());
    for &cut in cuts {
        let (_, toks, hashes) = batched(model, &ids[..len - cut], 1, n)?;
        mine.push((cut, toks, hashes));
    }
    for k in [8, 32] {
        let (rate, toks, hashes) = batched(model, ids, k, n)?;
        let same = mine
            .iter()
            .filter(|(i, t, h)| toks[*i] == t[0] && hashes[*i] == h[0])
            .count();
        println!(
            "{k} sequences at position {}-{len}, attention on tensor cores in chunks of at \
             least {chunk}: {rate:.1} tok/s aggregate; tokens and logits bits as stepped \
             alone: {same}/{}",
            len - 7,
            mine.len()
        );
    }
    Ok(())
}

/// `long_batch_report`'s rates with the other attention kernel switched on, then the
/// longest sequence's greedy tokens and logits for `n` steps.
fn other_attention(
    model: &Model,
    ids: &[u32],
    n: usize,
    other: &str,
) -> Result<(Vec<u32>, Vec<Vec<f32>>), EngineError> {
    let len = ids.len();
    for k in [8, 32] {
        let (rate, ..) = batched(model, ids, k, n)?;
        println!(
            "{k} sequences at position {}-{len}, attention {other}: {rate:.1} tok/s aggregate",
            len - 7
        );
    }
    forced_steps(model, ids, None, n)
}

/// `prompt` prefilled, then `steps` steps fed `tokens` (or each step's argmax): the
/// tokens fed and every step's logits.
fn forced_steps(
    model: &Model,
    prompt: &[u32],
    tokens: Option<&[u32]>,
    steps: usize,
) -> Result<(Vec<u32>, Vec<Vec<f32>>), EngineError> {
    let mut cache = SeqCache::new(model.cache_layout(KvDtype::F16), model.device());
    let mut logits = forward1(model, prompt, &mut cache)?;
    let steps = tokens.map_or(steps, |t| t.len().min(steps));
    let (mut fed, mut all) = (Vec::with_capacity(steps), Vec::with_capacity(steps));
    for i in 0..steps {
        let t = tokens.map_or_else(|| argmax(&logits), |t| t[i]);
        fed.push(t);
        logits = forward1(model, &[t], &mut cache)?;
        all.push(logits.clone());
    }
    Ok((fed, all))
}

/// Prompt prefill on the fused GPU path: batched prefill steps (past the default limit
/// too) against the same prompt fed one token at a time (logits bit-identical?) and
/// against the tensor path (largest logit difference), with the median time of each at a
/// few prompt lengths; then eight prompts prefilled in one pass against each alone.
fn prefill_report(model: &Model, ctx: usize) -> Result<(), EngineError> {
    let Some(limit) = model.set_fused_prefill_max(usize::MAX) else {
        return Ok(());
    };
    let r = prefill_checks(model, ctx, limit);
    model.set_fused_prefill_max(limit);
    r
}

fn prefill_checks(model: &Model, ctx: usize, limit: usize) -> Result<(), EngineError> {
    let vocab = model.config.vocab as u32;
    let fresh = || SeqCache::new(model.cache_layout(KvDtype::F16), model.device());
    let time = |ids: &[u32], reps: usize| -> Result<(f64, Vec<f32>), EngineError> {
        let mut ms = Vec::with_capacity(reps);
        let mut last = Vec::new();
        for _ in 0..reps {
            let mut cache = fresh();
            let t = Instant::now();
            last = forward1(model, ids, &mut cache)?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok((median(&ms), last))
    };
    let ids_of = |n: usize, salt: u32| -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i * 7919 + 13 + salt * 104729) % vocab)
            .collect()
    };
    println!("-- prefill (prompts of up to {limit} tokens take batched steps by default)");
    for n in [8, 16, 32, 64, 100, 512, 4000] {
        if n + 1 >= ctx {
            continue;
        }
        let ids = ids_of(n, 0);
        let reps = if n > 1000 { 3 } else { 5 };
        time(&ids, 1)?; // warm-up: graphs of this prompt's buckets
        let (fused_ms, fused) = time(&ids, reps)?;
        let mut line = format!("prefill {n:>5} tokens: batched steps {fused_ms:>8.2} ms");
        if n <= 512 {
            let mut cache = fresh();
            let t = Instant::now();
            let mut one = Vec::new();
            for &id in &ids {
                one = forward1(model, &[id], &mut cache)?;
            }
            let one_ms = t.elapsed().as_secs_f64() * 1e3;
            let same = fused
                .iter()
                .zip(&one)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            line += &format!(
                ", one token at a time {one_ms:>8.2} ms (logits {})",
                if same { "bit-identical" } else { "DIFFER" }
            );
        }
        // Past one chunk of positions the decode attention is split (the batched steps
        // and the one-token-at-a-time run above both); against it not split.
        if n > 256 && model.set_attn_split(false) {
            let unsplit = time(&ids, 1).and_then(|_| time(&ids, 1));
            model.set_attn_split(true);
            let (_, unsplit) = unsplit?;
            line += &format!(", attention unsplit ({})", compare(&fused, &unsplit));
        }
        // The other decode attention kernel (batched prefill steps attend through it).
        let tc = model.attn_tc();
        if model.set_attn_tc(!tc) {
            let other = time(&ids, 1).and_then(|_| time(&ids, 1));
            model.set_attn_tc(tc);
            let (_, other) = other?;
            let what = if tc { "per head" } else { "on tensor cores" };
            line += &format!(", attention {what} ({})", compare(&fused, &other));
        }
        model.set_fused_decode(false);
        let tensor = time(&ids, 1).and_then(|_| time(&ids, reps));
        model.set_fused_decode(true);
        let (tensor_ms, tensor) = tensor?;
        line += &format!(
            ", tensor path {tensor_ms:>8.2} ms ({})",
            compare(&fused, &tensor)
        );
        // The wide prefill (its default GEMMs) at this length too, where the card has it.
        let was_wide = model.fused_wide();
        if model.set_fused_wide(true) {
            model.set_fused_prefill_max(1);
            let wide_min = model.set_fused_wide_min(0);
            let wide = time(&ids, 1).and_then(|_| time(&ids, reps));
            model.set_fused_prefill_max(usize::MAX);
            if let Some(m) = wide_min {
                model.set_fused_wide_min(m);
            }
            model.set_fused_wide(was_wide);
            let (wide_ms, wide) = wide?;
            line += &format!(", wide {wide_ms:>8.2} ms ({})", compare(&fused, &wide));
        }
        println!("{line}");
    }
    // Eight prompts of 17 to 24 tokens in one pass: their rows packed into shared steps.
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| ids_of(17 + i, i as u32 + 1)).collect();
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .map(|p| time(p, 1).map(|(_, l)| l))
        .collect::<Result<_, _>>()?;
    // In batched steps (packed wide passes, on by default where the card prefills wide,
    // are timed against them below).
    let was = model.fused_wide_pack();
    model.set_fused_wide_pack(false);
    let pass = one_pass(model, &prompts);
    model.set_fused_wide_pack(was);
    let (ms, out) = pass?;
    let same = out
        .iter()
        .zip(&alone)
        .filter(|(v, a)| v.iter().zip(*a).all(|(x, y)| x.to_bits() == y.to_bits()))
        .count();
    println!(
        "8 prompts (17-24 tokens) prefilled in one pass: {ms:.2} ms; last logits bit-identical \
         to each prefilled alone {same}/8"
    );
    // Packed wide passes, where the card prefills wide: prompts of several sequences in
    // shared wide passes against the same prompts in batched steps or each alone.
    if model.fused_wide() && model.set_fused_wide_pack(true) {
        model.set_fused_prefill_max(limit);
        let r = packed_checks(model, &prompts, &alone, ms, &ids_of);
        model.set_fused_prefill_max(usize::MAX);
        model.set_fused_wide_pack(was);
        r?;
    }
    Ok(())
}

/// `prompts` prefilled in one forward pass, five times: the median time and the last
/// run's last logits of each prompt.
fn one_pass(model: &Model, prompts: &[Vec<u32>]) -> Result<(f64, Vec<Vec<f32>>), EngineError> {
    let mut ms = Vec::new();
    let mut last = Vec::new();
    for _ in 0..5 {
        let mut caches: Vec<SeqCache> = prompts
            .iter()
            .map(|_| SeqCache::new(model.cache_layout(KvDtype::F16), model.device()))
            .collect();
        let mut inputs: Vec<SeqInput<'_>> = caches
            .iter_mut()
            .zip(prompts)
            .map(|(cache, p)| SeqInput {
                tokens: p,
                cache,
                all_logits: false,
            })
            .collect();
        let t = Instant::now();
        let out = model.forward(&mut inputs)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        last = out
            .iter()
            .map(|o| o.squeeze(0)?.to_vec1::<f32>())
            .collect::<candle_core::Result<_>>()?;
    }
    Ok((median(&ms), last))
}

/// The largest logit gap between two sets of rows, and in how many the argmax agrees.
fn compare_rows(a: &[Vec<f32>], b: &[Vec<f32>]) -> String {
    let gap = a
        .iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0f32, f32::max);
    let same = a
        .iter()
        .zip(b)
        .filter(|(x, y)| argmax(x) == argmax(y))
        .count();
    format!("argmax equal {same}/{}, max |dlogit| {gap:.4}", a.len())
}

/// With packed wide passes on (and the batched steps' default limit): the eight short
/// prompts, 32 prompts of 30 tokens and eight of 100 to 296 tokens, each set in one pass,
/// against the same in batched steps (`batched_ms`, `batched`) or each prompt alone.
fn packed_checks(
    model: &Model,
    prompts: &[Vec<u32>],
    batched: &[Vec<f32>],
    batched_ms: f64,
    ids_of: &dyn Fn(usize, u32) -> Vec<u32>,
) -> Result<(), EngineError> {
    let (ms, out) = one_pass(model, prompts)?;
    println!(
        "8 prompts (17-24 tokens) in packed wide passes: {ms:.2} ms (batched steps \
         {batched_ms:.2} ms); against batched steps: {}",
        compare_rows(&out, batched)
    );
    let many: Vec<Vec<u32>> = (0..32).map(|i| ids_of(30, 100 + i)).collect();
    model.set_fused_wide_pack(false);
    let steps = one_pass(model, &many);
    model.set_fused_wide_pack(true);
    let (steps_ms, steps) = steps?;
    let (ms, out) = one_pass(model, &many)?;
    println!(
        "32 prompts (30 tokens) in packed wide passes: {ms:.2} ms, in batched steps \
         {steps_ms:.2} ms; {}",
        compare_rows(&out, &steps)
    );
    let long: Vec<Vec<u32>> = (0..8)
        .map(|i| ids_of(100 + 28 * i, 200 + i as u32))
        .collect();
    let mut alone_ms = 0.0;
    let mut alone = Vec::with_capacity(long.len());
    for p in &long {
        let (ms, mut l) = one_pass(model, std::slice::from_ref(p))?;
        alone_ms += ms;
        alone.push(l.remove(0));
    }
    let (ms, out) = one_pass(model, &long)?;
    println!(
        "8 prompts (100-296 tokens) in packed wide passes: {ms:.2} ms, each alone (wide) \
         {alone_ms:.2} ms in all; {}",
        compare_rows(&out, &alone)
    );
    Ok(())
}

/// Long prompts: the tensor path with the matmul-softmax-matmul attention (the
/// reference), the tensor path with the flash kernel, and the fused wide prefill (flash
/// attention, the projections as int8 tensor-core GEMMs or as f16 GEMMs on weights
/// dequantized once a pass) where the card has them, at a few prompt lengths: median
/// times, the largest logit difference from the reference and whether the argmax agrees;
/// then each in two chunks (the second attending over the first's cache).
fn long_prompt_report(model: &Model, ctx: usize) -> Result<(), EngineError> {
    let was = (model.flash_attention_on(), model.fused_wide());
    let flash = model.set_flash_attention(true);
    let wide = model.set_fused_wide(true);
    if !flash && !wide {
        return Ok(());
    }
    let gemm = model.set_wide_gemm(WideGemm::Int8);
    // Every chunk past the batched limit wide here, the short second chunks too.
    let wide_min = model.set_fused_wide_min(0);
    let r = long_prompt_checks(model, ctx, flash, wide);
    model.set_flash_attention(was.0);
    model.set_fused_wide(was.1);
    if let Some(m) = wide_min {
        model.set_fused_wide_min(m);
    }
    if let Some(g) = gemm {
        model.set_wide_gemm(g);
    }
    model.set_fused_decode(true);
    r
}

fn long_prompt_checks(
    model: &Model,
    ctx: usize,
    flash: bool,
    wide: bool,
) -> Result<(), EngineError> {
    let vocab = model.config.vocab as u32;
    let fresh = || SeqCache::new(model.cache_layout(KvDtype::F16), model.device());
    let run = |ids: &[u32], split: usize| -> Result<Vec<f32>, EngineError> {
        let mut cache = fresh();
        if split > 0 {
            forward1(model, &ids[..split], &mut cache)?;
        }
        forward1(model, &ids[split..], &mut cache)
    };
    let time = |ids: &[u32], reps: usize| -> Result<(f64, Vec<f32>), EngineError> {
        run(ids, 0)?; // warm-up
        let mut ms = Vec::with_capacity(reps);
        let mut last = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            last = run(ids, 0)?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok((median(&ms), last))
    };
    // (name, fused path on, flash on, wide on, the wide pass's GEMMs)
    let int8 = WideGemm::Int8;
    let mut ways = vec![("tensor path, matmul-softmax", false, false, false, int8)];
    if flash {
        ways.push(("tensor path, flash", false, true, false, int8));
    }
    if wide {
        ways.push(("fused wide, int8 GEMMs", true, false, true, int8));
        ways.push(("fused wide, f16 GEMMs", true, false, true, WideGemm::F16));
    }
    println!("-- long prompts (the first line of each the reference; chunked: n/4, then the rest)");
    for n in [100, 512, 4000] {
        if n + 1 >= ctx {
            continue;
        }
        let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 29) % vocab).collect();
        let reps = if n > 1000 { 3 } else { 5 };
        let mut reference: Option<Vec<f32>> = None;
        for &(name, fused, fl, wi, gemm) in &ways {
            model.set_fused_decode(fused);
            model.set_flash_attention(fl);
            model.set_fused_wide(wi);
            model.set_wide_gemm(gemm);
            let (ms, logits) = time(&ids, reps)?;
            let split = run(&ids, n / 4)?;
            let vs = match &reference {
                Some(r) => format!("{}; chunked {}", compare(&logits, r), compare(&split, r)),
                None => format!("chunked {}", compare(&split, &logits)),
            };
            println!("prefill {n:>5} tokens, {name:<28} {ms:>8.2} ms ({vs})");
            reference.get_or_insert(logits);
        }
    }
    Ok(())
}

/// The largest logit difference between two logits rows and whether their argmax agrees.
fn compare(a: &[f32], b: &[f32]) -> String {
    let gap = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let arg = if argmax(a) == argmax(b) {
        "equal"
    } else {
        "DIFFERS"
    };
    format!("max |dlogit| {gap:.4}, argmax {arg}")
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

fn report(name: &str, r: &Run, cpu: Option<&Run>) -> String {
    let med = median(&r.steps_ms);
    let mean = r.steps_ms.iter().sum::<f64>() / r.steps_ms.len().max(1) as f64;
    let mut line = format!(
        "{name:<28} prefill {:>8.2} ms  decode median {:>7.1} tok/s (mean {:>7.1}; a step {:.0} us, {:.0} of them in Model::forward)",
        r.prefill_ms,
        1e3 / med,
        1e3 / mean,
        med * 1e3,
        median(&r.forward_ms) * 1e3
    );
    if let Some(c) = cpu {
        let agree = r
            .tokens
            .iter()
            .zip(&c.tokens)
            .take_while(|(a, b)| a == b)
            .count();
        let gap = r
            .first
            .iter()
            .zip(&c.first)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        line += &format!(
            "  vs cpu: {agree}/{} leading tokens, max |dlogit| {gap:.4}, first argmax {}",
            c.tokens.len(),
            if argmax(&r.first) == argmax(&c.first) {
                "equal"
            } else {
                "DIFFERS"
            }
        );
    }
    line
}

/// Chunk sizes the sliding-window check feeds a sequence in, in turn.
const WINDOW_CHUNKS: [usize; 8] = [300, 1, 1, 64, 1, 1, 1, 128];

/// Logits at chosen positions of a sequence, with those positions.
type Checkpoints = Vec<(usize, Vec<f32>)>;

/// Largest difference relative to the largest magnitude of `b`.
fn rel_gap(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().map(|x| x.abs()).fold(1e-6f32, f32::max);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

/// A sequence fed through one f16 cache in [`WINDOW_CHUNKS`]: the logits at every
/// second chunk's end (and the last) with their positions, and where the local layers
/// start at the end.
fn chunked(model: &Model, seq: &[u32]) -> Result<(Checkpoints, usize), EngineError> {
    let mut cache = SeqCache::new(model.cache_layout(KvDtype::F16), model.device());
    let mut out = Vec::new();
    let mut i = 0;
    while cache.len() < seq.len() {
        let at = cache.len();
        let m = WINDOW_CHUNKS[i % WINDOW_CHUNKS.len()].min(seq.len() - at);
        let logits = forward1(model, &seq[at..at + m], &mut cache)?;
        if i % 2 == 1 || at + m == seq.len() {
            out.push((at + m, logits));
        }
        i += 1;
    }
    Ok((out, cache.local_base()))
}

/// Sliding-window models: the chunked cache (whose local layers drop old positions and
/// are laid out again) against one fresh pass over the same prefix, on the device, and
/// the device's chunked logits against the CPU's.
fn window_check(model: &Model, cpu: Option<&Model>, ctx: usize) -> Result<(), EngineError> {
    let Some(w) = model.cache_layout(KvDtype::F16).window else {
        return Ok(());
    };
    let vocab = model.config.vocab as u32;
    let n = (3 * (w.size + 128) + 512).min(ctx - 1);
    let seq: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let (dev, base) = chunked(model, &seq)?;
    println!(
        "-- sliding-window cache (window {}): {n} tokens in chunks of {WINDOW_CHUNKS:?}; \
         the local layers start at position {base} at the end{}",
        w.size,
        if base == 0 {
            " (nothing dropped: the context is too short for this window)"
        } else {
            ""
        }
    );
    let (mut same, mut gap) = (0, 0f32);
    for (end, logits) in &dev {
        let mut fresh = SeqCache::new(model.cache_layout(KvDtype::F16), model.device());
        let one = forward1(model, &seq[..*end], &mut fresh)?;
        same += usize::from(argmax(logits) == argmax(&one));
        gap = gap.max(rel_gap(logits, &one));
    }
    println!(
        "device, chunked vs one pass: argmax equal at {same}/{} positions, \
         max |dlogit| / max |logit| {gap:.2e}",
        dev.len()
    );
    if let Some(cpu) = cpu {
        let (c, cbase) = chunked(cpu, &seq)?;
        let (mut same, mut gap) = (0, 0f32);
        for ((_, a), (_, b)) in dev.iter().zip(&c) {
            same += usize::from(argmax(a) == argmax(b));
            gap = gap.max(rel_gap(a, b));
        }
        println!(
            "device vs cpu, chunked: argmax equal at {same}/{} positions, \
             max |dlogit| / max |logit| {gap:.2e} (cpu local layers start at {cbase})",
            dev.len()
        );
    }
    Ok(())
}

/// Run the checks and print the report; `device` as for `--device`; `with_cpu`: compare
/// a device with the CPU too.
/// What `candela doctor` runs besides the fused path: the CPU reference, and whether it
/// stops at the quick checks (`--quick`).
#[derive(Debug, Clone, Copy)]
pub struct Checks {
    pub cpu: bool,
    pub quick: bool,
    /// Only the prompt-prefill comparisons (`--prefill`).
    pub prefill: bool,
}

pub fn run(
    spec: &str,
    data_dir: &Path,
    device: &str,
    ctx_size: usize,
    n: usize,
    prompt: &str,
    checks: Checks,
) -> Result<(), EngineError> {
    let Checks {
        cpu: with_cpu,
        quick,
        prefill,
    } = checks;
    let resolved = fetch::resolve(spec, data_dir)?;
    let path = resolved.path;
    if path.is_dir() {
        return Err(EngineError::Load(format!(
            "{}: `candela doctor` checks GGUF models; this is a model directory",
            path.display()
        )));
    }
    let open =
        || File::open(&path).map_err(|e| EngineError::Load(format!("{}: {e}", path.display())));
    let mut f = open()?;
    let ct = gguf_file::Content::read(&mut f)
        .map_err(|e| EngineError::Load(format!("{}: not a readable GGUF: {e}", path.display())))?;
    let tok = Tok::from_gguf(&ct, Some(&path.with_file_name("tokenizer.json")))?;
    let short = tok.encode(prompt, true)?;
    let long = tok.encode(&[prompt; 8].join(" "), true)?;
    let dev = pick_device(device)?;
    let probe = crate::engine::model::ModelConfig::from_gguf(&ct)?;
    let ctx = if ctx_size == 0 {
        probe.train_ctx.min(4096)
    } else {
        ctx_size
    };
    println!(
        "model {} ({}), device {:?}, ctx {ctx}",
        path.display(),
        probe.arch,
        dev.location()
    );
    let t = Instant::now();
    let model = Model::from_gguf(&ct, &mut f, &dev, ctx)?;
    println!(
        "loaded on the device in {:.2} s; fused GPU decode: {}",
        t.elapsed().as_secs_f64(),
        if model.has_fused_decode() {
            "yes"
        } else {
            "no"
        }
    );
    if prefill {
        if !model.has_fused_decode() {
            println!(
                "--prefill compares the fused GPU path's ways of prefilling; this device has \
                 none (try --device cuda)"
            );
            return Ok(());
        }
        prefill_report(&model, ctx)?;
        return long_prompt_report(&model, ctx);
    }
    let cpu = if dev.is_cpu() || !with_cpu {
        None
    } else {
        let mut f = open()?;
        let ct = gguf_file::Content::read(&mut f)?;
        Some(Model::from_gguf(&ct, &mut f, &Device::Cpu, ctx)?)
    };
    let prompts: &[(&str, &Vec<u32>)] = if quick {
        &[("short", &short)]
    } else {
        &[("short", &short), ("long", &long)]
    };
    for &(pname, ids) in prompts {
        println!("-- {pname} prompt: {} tokens, {n} decoded", ids.len());
        let c = match &cpu {
            Some(m) => Some(greedy(m, ids, n)?),
            None => None,
        };
        if let Some(c) = &c {
            println!("{}", report("cpu", c, None));
        }
        if model.has_fused_decode() {
            // Warm-up: module load and graph capture stay out of the timings.
            greedy(&model, ids, 4)?;
            let r = greedy(&model, ids, n)?;
            println!("{}", report("device, fused path", &r, c.as_ref()));
            if quick {
                continue;
            }
            model.set_fused_decode(false);
            greedy(&model, ids, 4)?;
            let r = greedy(&model, ids, n);
            model.set_fused_decode(true);
            println!("{}", report("device, tensor path", &r?, c.as_ref()));
        } else {
            greedy(&model, ids, 4)?;
            let r = greedy(&model, ids, n)?;
            println!("{}", report("device", &r, c.as_ref()));
        }
    }
    batch_report(&model, &short, n.min(64), "")?;
    // The other eight-part setting where the card has those kernels (gate|up alone
    // against the 32-lane order, or the 32-lane order against a setting that is on): its
    // rates and its own batched-against-single-stream bits.
    let sum8 = model.sum8();
    let other = if sum8 == Sum8::Off {
        Sum8::GateUp
    } else {
        Sum8::Off
    };
    if model.has_fused_decode() && model.set_sum8(other) {
        let r = batch_report(&model, &short, n.min(64), &format!(" ({})", other.label()));
        model.set_sum8(sum8);
        r?;
    }
    if model.has_fused_decode() {
        long_batch_report(&model, ctx, n.min(32))?;
    }
    if !quick {
        prefill_report(&model, ctx)?;
        long_prompt_report(&model, ctx)?;
        window_check(&model, cpu.as_ref(), ctx)?;
    }
    if let Some(r) = model.fused_bench(&[32, 256, 1024])? {
        print!("{r}");
    }
    Ok(())
}
