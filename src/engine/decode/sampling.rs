//! Token sampling: penalties, temperature, top-k, top-p, min-p, seeded RNG, logprobs.
//!
//! Works on a plain `Vec<f32>` of logits on the host; the order of the steps follows
//! llama.cpp's default chain (penalties → top-k → top-p → min-p → temperature).

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Checked sampling parameters (validation happens in the API layer).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means off.
    pub top_k: usize,
    pub min_p: f32,
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1.0 means off.
    pub repetition_penalty: f32,
    /// How many alternatives to report per token; None: no logprobs.
    pub logprobs: Option<usize>,
    /// Added to the logits of these tokens first (OpenAI `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    /// Never pick an end-of-generation token (llama.cpp's `ignore_eos`): the completion
    /// runs to `max_tokens` or a stop string. Benchmarks use it to generate fixed lengths.
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logprobs: None,
            logit_bias: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Log-probability of the chosen token and the best alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Counts of generated tokens, for presence/frequency penalties.
    counts: HashMap<u32, u32>,
    /// Reused buffers: candidates, their weights, block sums of the weights.
    cand: Vec<(u32, f32)>,
    w: Vec<f32>,
    sums: Vec<f32>,
    /// Per-bucket counts or weights for the top-k / top-p cuts, and a second candidate
    /// list for top-p after top-k.
    hist: Vec<f64>,
    spare: Vec<(u32, f32)>,
    edge: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_entropy(),
        };
        Self {
            params,
            rng,
            counts: HashMap::new(),
            cand: Vec::new(),
            w: Vec::new(),
            sums: Vec::new(),
            hist: Vec::new(),
            spare: Vec::new(),
            edge: Vec::new(),
        }
    }

    /// Pick the next token. `context` is the prompt + generated ids, for the repetition
    /// penalty; presence/frequency penalties apply to generated tokens only (OpenAI).
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32]) -> (u32, Option<TokenLogprob>) {
        self.sample_after(logits, context, &[])
    }

    /// [`Sampler::sample`] with the context in two parts (prompt, generated), so the
    /// decode loop need not join them into a new vector every token.
    pub fn sample_after(
        &mut self,
        logits: &mut [f32],
        prompt: &[u32],
        generated: &[u32],
    ) -> (u32, Option<TokenLogprob>) {
        let p = &self.params;
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &t in prompt.iter().chain(generated) {
                if seen.insert(t) {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = if *l > 0.0 {
                            *l / p.repetition_penalty
                        } else {
                            *l * p.repetition_penalty
                        };
                    }
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
        let lp = p.logprobs.map(|k| logprobs_of(logits, k));
        let tok = if p.temperature <= 0.0 {
            argmax(logits)
        } else {
            self.sample_stochastic(logits)
        };
        *self.counts.entry(tok).or_insert(0) += 1;
        let lp = lp.map(|(all_lse, top)| TokenLogprob {
            logprob: logits
                .get(tok as usize)
                .map(|l| l - all_lse)
                .unwrap_or(f32::NEG_INFINITY),
            top,
        });
        (tok, lp)
    }

    /// Temperature sampling after top-k, top-p and min-p, in time linear in the
    /// vocabulary: the cuts find their boundary by bucketing the candidates by logit
    /// ([`top_k_cut`], [`top_p_cut`]) and order only the boundary bucket, and the draw
    /// walks the kept candidates in the order they are left in. The kept set is the one
    /// a full sort would keep (best logit first, lower id first among equals), so the
    /// distribution is the same; a given seed gives a given sequence.
    fn sample_stochastic(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let r: f32 = self.rng.gen();
        if p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
            // Nothing is cut: weigh every finite logit where it is.
            let max = finite_max(logits);
            if max == f32::NEG_INFINITY {
                return argmax(logits);
            }
            self.w.resize(logits.len(), 0.0);
            for (w, &l) in self.w.iter_mut().zip(logits) {
                *w = weight(l, max, inv_t);
            }
            return pick(&self.w, r, &mut self.sums).map_or_else(|| argmax(logits), |i| i as u32);
        }
        let max = finite_max(logits);
        if max == f32::NEG_INFINITY {
            return argmax(logits);
        }
        // The first cut reads the logits and gathers only what it keeps; top-p after
        // top-k then works on those.
        let all = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l));
        let (cand, spare) = (&mut self.cand, &mut self.spare);
        let scratch = (&mut self.hist, &mut self.edge);
        if p.top_k > 0 {
            top_k_cut(all, max, p.top_k, scratch, cand);
        } else if p.top_p < 1.0 {
            top_p_cut(all, max, p.top_p, scratch, cand);
        } else {
            cand.clear();
            cand.extend(all);
        }
        // Probabilities before temperature decide top-p and min-p, as in llama.cpp's
        // chain: weights exp(l - max), so the best has weight 1.
        if p.top_k > 0 && p.top_p < 1.0 {
            std::mem::swap(cand, spare);
            let scratch = (&mut self.hist, &mut self.edge);
            top_p_cut(spare.iter().copied(), max, p.top_p, scratch, cand);
        }
        let mut keep = cand.len();
        if p.min_p > 0.0 {
            // p_i >= min_p * p_max, i.e. weight >= min_p; the best always stays.
            let floor = p.min_p;
            let mut n = 0;
            for i in 0..keep {
                let l = cand[i].1;
                if l == max || fast_exp(l - max) >= floor {
                    cand.swap(n, i);
                    n += 1;
                }
            }
            keep = n.max(1);
        }
        cand.truncate(keep);
        weigh(cand.iter().map(|c| c.1), max, inv_t, &mut self.w);
        match pick(&self.w, r, &mut self.sums) {
            Some(i) => cand[i].0,
            None => cand[0].0,
        }
    }
}

/// Buckets the cuts spread the candidates over, by how far their logit is below the
/// maximum; logits more than [`SPAN`] below it share the last bucket.
const BUCKETS: usize = 1024;
const SPAN: f32 = 32.0;

/// The bucket of logit `l`: non-decreasing as `l` falls, so every bucket is a run of the
/// candidates in sorted order, and equal logits share one.
#[inline]
fn bucket(l: f32, max: f32) -> usize {
    (((max - l) * (BUCKETS as f32 / SPAN)) as usize).min(BUCKETS - 1)
}

/// Best first, lower id first among equal logits: the order the cuts are defined in.
fn desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Into `out`: the candidates of buckets `< b` (returns how many), then those of `b`.
fn gather(
    src: impl Iterator<Item = (u32, f32)>,
    max: f32,
    b: usize,
    out: &mut Vec<(u32, f32)>,
    edge: &mut Vec<(u32, f32)>,
) -> usize {
    out.clear();
    edge.clear();
    for c in src {
        match bucket(c.1, max).cmp(&b) {
            std::cmp::Ordering::Less => out.push(c),
            std::cmp::Ordering::Equal => edge.push(c),
            std::cmp::Ordering::Greater => {}
        }
    }
    let n = out.len();
    out.append(edge);
    n
}

/// `w(l)` summed per bucket into `hist`; returns the total.
fn bucket_sums(
    src: impl Iterator<Item = (u32, f32)>,
    max: f32,
    hist: &mut Vec<f64>,
    w: impl Fn(f32) -> f64,
) -> f64 {
    hist.clear();
    hist.resize(BUCKETS, 0.0);
    let mut z = 0f64;
    for (_, l) in src {
        let v = w(l);
        hist[bucket(l, max)] += v;
        z += v;
    }
    z
}

/// The bucket where the running sum of `hist` reaches `t` (the last if none does), and
/// what is left of `t` there.
fn crossing(hist: &[f64], mut t: f64) -> (usize, f64) {
    let mut b = 0;
    while b + 1 < hist.len() && hist[b] < t {
        t -= hist[b];
        b += 1;
    }
    (b, t)
}

/// Into `out`: the `k` best of `src` (finite logits, `max` the largest) in [`desc`]
/// order, as a set; all of them if there are no more than `k`.
fn top_k_cut(
    src: impl Iterator<Item = (u32, f32)> + Clone,
    max: f32,
    k: usize,
    (hist, edge): (&mut Vec<f64>, &mut Vec<(u32, f32)>),
    out: &mut Vec<(u32, f32)>,
) {
    bucket_sums(src.clone(), max, hist, |_| 1.0);
    let (b, _) = crossing(hist, k as f64);
    let n = gather(src, max, b, out, edge);
    let tail = &mut out[n..];
    let need = k.saturating_sub(n);
    if need > 0 && need < tail.len() {
        tail.select_nth_unstable_by(need - 1, desc);
    }
    out.truncate(k);
}

/// Into `out`: the smallest set of the best of `src` (finite logits, `max` the largest)
/// in [`desc`] order whose weights `exp(l - max)` reach `top_p` of their total (at least
/// one).
fn top_p_cut(
    src: impl Iterator<Item = (u32, f32)> + Clone,
    max: f32,
    top_p: f32,
    (hist, edge): (&mut Vec<f64>, &mut Vec<(u32, f32)>),
    out: &mut Vec<(u32, f32)>,
) {
    let z = bucket_sums(src.clone(), max, hist, |l| f64::from(fast_exp(l - max)));
    let (b, t) = crossing(hist, f64::from(top_p) * z);
    let n = gather(src, max, b, out, edge);
    let keep = n + mass_prefix(&mut out[n..], max, t);
    out.truncate(keep.max(1));
}

/// Reorders `c` so that `c[..n]` is the shortest prefix of its [`desc`] order whose
/// weights `exp(l - max)` reach `t`, and returns `n` (`c.len()` if none does): a
/// selection by mass, partitioning around a pivot logit as quickselect does, expected
/// linear time; only the last few are sorted.
fn mass_prefix(c: &mut [(u32, f32)], max: f32, mut t: f64) -> usize {
    let w = |x: &(u32, f32)| f64::from(fast_exp(x.1 - max));
    let (mut lo, mut hi) = (0, c.len());
    while hi - lo > 32 {
        let r = &mut c[lo..hi];
        let (a, m, z) = (r[0].1, r[r.len() / 2].1, r[r.len() - 1].1);
        let pivot = a.max(m).min(a.min(m).max(z));
        // [> pivot | == pivot | < pivot], with the mass of the first two groups.
        let (mut gt, mut i, mut lt) = (0, 0, r.len());
        let (mut m_gt, mut m_eq) = (0f64, 0f64);
        while i < lt {
            let l = r[i].1;
            if l > pivot {
                m_gt += w(&r[i]);
                r.swap(gt, i);
                gt += 1;
                i += 1;
            } else if l < pivot {
                lt -= 1;
                r.swap(i, lt);
            } else {
                m_eq += w(&r[i]);
                i += 1;
            }
        }
        if m_gt >= t {
            hi = lo + gt;
            continue;
        }
        t -= m_gt;
        if m_eq >= t {
            // The cut falls among equal logits: lower ids first.
            let eq = &mut r[gt..lt];
            eq.sort_unstable_by(desc);
            let we = w(&eq[0]);
            let mut acc = 0f64;
            for (j, _) in eq.iter().enumerate() {
                acc += we;
                if acc >= t {
                    return lo + gt + j + 1;
                }
            }
            return lo + lt;
        }
        t -= m_eq;
        lo += lt;
    }
    let r = &mut c[lo..hi];
    r.sort_unstable_by(desc);
    let mut acc = 0f64;
    for (j, x) in r.iter().enumerate() {
        acc += w(x);
        if acc >= t {
            return lo + j + 1;
        }
    }
    hi
}

/// `exp((l - max) * inv_t)` for a finite logit, 0 for the others.
#[inline(always)]
fn weight(l: f32, max: f32, inv_t: f32) -> f32 {
    let e = fast_exp((l - max) * inv_t);
    if l.is_finite() {
        e
    } else {
        0.0
    }
}

/// [`weight`] of each logit into `w`.
fn weigh(ls: impl Iterator<Item = f32>, max: f32, inv_t: f32, w: &mut Vec<f32>) {
    w.clear();
    w.extend(ls.map(|l| weight(l, max, inv_t)));
}

/// The largest finite logit (-inf if none), in sixteen lanes so that it vectorises.
fn finite_max(ls: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = ls.chunks_exact(16);
    let fold = |a: f32, l: f32| {
        let v = if l.is_finite() { l } else { f32::NEG_INFINITY };
        if v > a {
            v
        } else {
            a
        }
    };
    for c in &mut chunks {
        for (a, &l) in lanes.iter_mut().zip(c) {
            *a = fold(*a, l);
        }
    }
    let m = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &l| fold(a, l));
    lanes.iter().fold(m, |a, &l| fold(a, l))
}

/// Sum in sixteen lanes (vectorises), then a fixed reduction.
fn sum(w: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = w.chunks_exact(16);
    for c in &mut chunks {
        for (a, v) in lanes.iter_mut().zip(c) {
            *a += v;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Index `i` drawn with probability `w_i / sum(w)` for `r` uniform in [0, 1): the
/// first index where the running sum passes `r * total`, found block by block.
fn pick(w: &[f32], r: f32, sums: &mut Vec<f32>) -> Option<usize> {
    const B: usize = 256;
    sums.clear();
    sums.extend(w.chunks(B).map(sum));
    let total: f32 = sums.iter().sum();
    if total.is_nan() || total <= 0.0 {
        return None;
    }
    let target = r * total;
    let mut acc = 0.0;
    let mut last = None;
    for (bi, &s) in sums.iter().enumerate() {
        if s > 0.0 {
            last = Some(bi);
        }
        if s > 0.0 && acc + s > target {
            let block = &w[bi * B..(bi * B + B).min(w.len())];
            let mut a = acc;
            for (j, &v) in block.iter().enumerate() {
                a += v;
                if v > 0.0 && a > target {
                    return Some(bi * B + j);
                }
            }
            // Rounding: the block's own running sum fell short of its total.
            return block.iter().rposition(|&v| v > 0.0).map(|j| bi * B + j);
        }
        acc += s;
    }
    // Rounding at the very end: the last candidate with any weight.
    let bi = last?;
    let block = &w[bi * B..(bi * B + B).min(w.len())];
    block.iter().rposition(|&v| v > 0.0).map(|j| bi * B + j)
}

/// `e^x` for `x <= 0` to about 2 ulp, in plain arithmetic so that loops over it
/// vectorise (the vocabulary is weighed every token). Below -87 it returns 0.
#[inline]
fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    // `t`'s low mantissa bits hold the integer `n` (|n| < 2^22).
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let f = xc - n * LN2_HI - n * LN2_LO;
    // exp(f) on |f| <= ln2/2, Taylor to degree 6.
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0))))));
    let scale = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// Index of the first largest logit (NaN never wins; 0 when none is above -inf).
pub fn argmax(logits: &[f32]) -> u32 {
    // The maximum in sixteen lanes (vectorises), then its first position.
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = logits.chunks_exact(16);
    for c in &mut chunks {
        for (a, &l) in lanes.iter_mut().zip(c) {
            *a = if l > *a { l } else { *a };
        }
    }
    let m = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &l| if l > a { l } else { a });
    if m == f32::NEG_INFINITY {
        return 0;
    }
    logits.iter().position(|&l| l == m).unwrap_or(0) as u32
}

/// log-sum-exp of all logits and the `k` best (id, logprob).
fn logprobs_of(logits: &[f32], k: usize) -> (f32, Vec<(u32, f32)>) {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f32>().ln();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    if k > 0 {
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize])
        });
    }
    let mut top: Vec<(u32, f32)> = idx[..k]
        .iter()
        .map(|&i| (i, logits[i as usize] - lse))
        .collect();
    top.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    (lse, top)
}

#[cfg(test)]
mod tests;
