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
fn argmax_takes_the_first_largest() {
    let scalar = |l: &[f32]| {
        let (mut best, mut bv) = (0, f32::NEG_INFINITY);
        for (i, &v) in l.iter().enumerate() {
            if v > bv {
                (best, bv) = (i, v);
            }
        }
        best as u32
    };
    let mut l: Vec<f32> = (0..1000)
        .map(|i| ((i * 7919) % 613) as f32 * 0.01)
        .collect();
    assert_eq!(argmax(&l), scalar(&l));
    l[5] = f32::NAN;
    l[900] = 99.0;
    l[901] = 99.0;
    assert_eq!(argmax(&l), 900);
    assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
    assert_eq!(argmax(&[f32::NAN, 1.0, f32::INFINITY, f32::INFINITY]), 2);
    assert_eq!(argmax(&[]), 0);
}

#[test]
fn fast_exp_is_within_a_few_ulp() {
    let mut x = -87.0f32;
    while x <= 0.0 {
        let (a, b) = (fast_exp(x), x.exp());
        assert!((a - b).abs() <= 3e-7 * b, "exp({x}): {a} vs {b}");
        x += 0.0137;
    }
    assert_eq!(fast_exp(0.0), 1.0);
    assert_eq!(fast_exp(-1000.0), 0.0);
}

/// Reference: the kept set and probabilities by a full sort, as the chain defines it.
fn reference(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
    let mut c: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| (i as u32, l as f64))
        .collect();
    c.sort_by(|a, b| b.1.total_cmp(&a.1));
    if p.top_k > 0 {
        c.truncate(p.top_k);
    }
    let z: f64 = c.iter().map(|x| (x.1 - c[0].1).exp()).sum();
    let probs: Vec<f64> = c.iter().map(|x| (x.1 - c[0].1).exp() / z).collect();
    let mut keep = c.len();
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        for (i, pr) in probs.iter().enumerate() {
            acc += pr;
            if acc >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
    }
    if p.min_p > 0.0 {
        let n = probs
            .iter()
            .take_while(|&&pr| pr >= probs[0] * p.min_p as f64)
            .count();
        keep = keep.min(n.max(1));
    }
    c.truncate(keep);
    let t = p.temperature as f64;
    let z: f64 = c.iter().map(|x| ((x.1 - c[0].1) / t).exp()).sum();
    c.iter()
        .map(|x| (x.0, ((x.1 - c[0].1) / t).exp() / z))
        .collect()
}

/// The bucketed cuts keep exactly the set a full sort keeps (best logit first, lower
/// id first among equals), on flat, peaked, tied and very wide logits, small and
/// vocabulary-sized, for top-k and top-p values from the extremes to the middle.
#[test]
fn cuts_keep_what_a_full_sort_keeps() {
    let mut rng = StdRng::seed_from_u64(11);
    let shapes: [fn(&mut StdRng) -> f32; 4] = [
        |r| r.gen::<f32>(),
        |r| {
            let u: f32 = r.gen::<f32>().max(1e-7);
            -10.0 * u.ln().abs().sqrt() + 20.0
        },
        |r| (r.gen::<f32>() * 8.0).round() * 0.5,
        |r| r.gen::<f32>() * 110.0 - 100.0,
    ];
    let (mut hist, mut edge) = (Vec::new(), Vec::new());
    for (si, shape) in shapes.iter().enumerate() {
        for n in [1usize, 2, 7, 64, 100, 1000, 1000, 1000, 5000, 49152] {
            let logits: Vec<(u32, f32)> = (0..n as u32).map(|i| (i, shape(&mut rng))).collect();
            let max = logits.iter().fold(f32::NEG_INFINITY, |a, c| a.max(c.1));
            let mut sorted = logits.clone();
            sorted.sort_by(desc);
            let ids = |c: &[(u32, f32)]| {
                let mut v: Vec<u32> = c.iter().map(|c| c.0).collect();
                v.sort_unstable();
                v
            };
            for k in [1, 3, 40, n.saturating_sub(1)] {
                if k == 0 || k >= n {
                    continue;
                }
                let mut c = Vec::new();
                top_k_cut(
                    logits.iter().copied(),
                    max,
                    k,
                    (&mut hist, &mut edge),
                    &mut c,
                );
                assert_eq!(ids(&c), ids(&sorted[..k]), "shape {si} n {n} k {k}");
            }
            let z: f64 = logits.iter().map(|c| f64::from(fast_exp(c.1 - max))).sum();
            for top_p in (0..40).map(|i| i as f32 / 40.0).chain([0.999, 0.999_999]) {
                let target = f64::from(top_p) * z;
                let mut acc = 0.0;
                let want = sorted
                    .iter()
                    .position(|c| {
                        acc += f64::from(fast_exp(c.1 - max));
                        acc >= target
                    })
                    .map_or(n, |i| i + 1);
                let mut c = Vec::new();
                let src = logits.iter().copied();
                top_p_cut(src, max, top_p, (&mut hist, &mut edge), &mut c);
                assert_eq!(
                    ids(&c),
                    ids(&sorted[..want]),
                    "shape {si} n {n} top_p {top_p}"
                );
            }
        }
    }
}

/// Drawn frequencies match the chain's probabilities (computed by a full sort) for
/// plain temperature sampling over a large vocabulary and for every cut, and tokens
/// outside the kept set or with -inf logits never come.
#[test]
fn draws_follow_the_chain_distribution() {
    let n = 3000;
    let mut logits: Vec<f32> = (0..n)
        .map(|i| {
            let h = (i as u32).wrapping_mul(2654435761) as f32 / u32::MAX as f32;
            6.0 * h * h * h - 1.0
        })
        .collect();
    logits[17] = f32::NEG_INFINITY;
    logits[2999] = 5.5;
    let cases = [
        SamplingParams {
            temperature: 0.7,
            ..Default::default()
        },
        SamplingParams {
            top_k: 7,
            ..Default::default()
        },
        SamplingParams {
            top_p: 0.3,
            temperature: 1.3,
            ..Default::default()
        },
        SamplingParams {
            top_p: 0.97,
            ..Default::default()
        },
        SamplingParams {
            min_p: 0.2,
            ..Default::default()
        },
        SamplingParams {
            top_k: 50,
            top_p: 0.6,
            min_p: 0.3,
            temperature: 0.9,
            ..Default::default()
        },
    ];
    let draws = 20_000;
    for params in cases {
        let want = reference(&logits, &params);
        let mut s = Sampler::new(SamplingParams {
            seed: Some(11),
            ..params.clone()
        });
        let mut got = vec![0usize; n];
        for _ in 0..draws {
            got[s.sample(&mut logits.clone(), &[]).0 as usize] += 1;
        }
        let kept: std::collections::HashSet<u32> = want.iter().map(|w| w.0).collect();
        for (t, &c) in got.iter().enumerate() {
            assert!(c == 0 || kept.contains(&(t as u32)), "{params:?}: drew {t}");
        }
        for &(t, pr) in want.iter().take(20) {
            let f = got[t as usize] as f64 / draws as f64;
            let sd = (pr * (1.0 - pr) / draws as f64).sqrt();
            assert!(
                (f - pr).abs() <= 5.0 * sd + 1e-3,
                "{params:?}: token {t} drawn {f}, expected {pr}"
            );
        }
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
