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

    fn sample_stochastic(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.truncate(p.top_k);
        }
        // Probabilities before temperature for top-p/min-p, as llama.cpp's chain does.
        let probs = softmax(cand.iter().map(|c| c.1));
        let mut keep = cand.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, pr) in probs.iter().enumerate() {
                acc += pr;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            keep = keep.min(probs.iter().take_while(|&&pr| pr >= floor).count().max(1));
        }
        cand.truncate(keep);
        let probs = softmax(cand.iter().map(|c| c.1 / p.temperature));
        let r: f32 = self.rng.gen();
        let mut acc = 0.0;
        for (c, pr) in cand.iter().zip(&probs) {
            acc += pr;
            if r < acc {
                return c.0;
            }
        }
        cand.last().map(|c| c.0).unwrap_or(0)
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut bv = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > bv {
            bv = l;
            best = i;
        }
    }
    best as u32
}

fn softmax(xs: impl Iterator<Item = f32> + Clone) -> Vec<f32> {
    let m = xs.clone().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = xs.map(|x| (x - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
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
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9]
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&mut logits(), &[]).0, 1);
    }

    #[test]
    fn same_seed_same_sequence_different_seed_differs() {
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(seed),
                temperature: 1.5,
                ..Default::default()
            });
            (0..64)
                .map(|_| s.sample(&mut logits(), &[]).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            seed: Some(1),
            ..Default::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut logits(), &[]).0, 1);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.5,
            seed: Some(3),
            ..Default::default()
        });
        for _ in 0..50 {
            let t = s.sample(&mut logits(), &[]).0;
            assert!(t == 1 || t == 4, "top_p kept {t}");
        }
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.8,
            seed: Some(3),
            ..Default::default()
        });
        for _ in 0..50 {
            let t = s.sample(&mut logits(), &[]).0;
            assert!(t == 1 || t == 4, "min_p kept {t}");
        }
    }

    #[test]
    fn repetition_penalty_changes_the_choice() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repetition_penalty: 2.0,
            ..Default::default()
        });
        // token 1 (3.0) penalised to 1.5; 4 (2.9) penalised to 1.45; 2 (2.0) wins
        assert_eq!(s.sample(&mut logits(), &[1, 4]).0, 2);
    }

    #[test]
    fn frequency_penalty_applies_to_generated_tokens() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            frequency_penalty: 1.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&mut logits(), &[]).0, 1);
        // 1 now has 3.0 - 1.0 = 2.0 < 2.9
        assert_eq!(s.sample(&mut logits(), &[]).0, 4);
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            logprobs: Some(3),
            ..Default::default()
        });
        let (t, lp) = s.sample(&mut logits(), &[]);
        let lp = lp.unwrap();
        assert_eq!(t, 1);
        assert_eq!(
            lp.top.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![1, 4, 2]
        );
        // logprob of token 1 = 3.0 - lse, so exp(l - lse) = exp(l - 3.0 + logprob)
        let total: f32 = logits().iter().map(|l| (l - 3.0 + lp.logprob).exp()).sum();
        assert!((total - 1.0).abs() < 1e-4, "{total}");
        assert_eq!(lp.top[0].1, lp.logprob);
    }
}
