//! Mixture-of-experts routing, as llama.cpp's `build_moe_ffn` does it for a softmax
//! gate: the router's logits through ggml's softmax (f32 `expf` of the logit minus the
//! maximum, summed in f64, scaled by the f32 inverse of the sum), the top `used`
//! experts by probability, their probabilities renormalized to sum to 1 (the sum
//! clamped below at 2^-14), and the experts' outputs summed in that order.

/// The experts a row goes to, best first, with their weights.
pub(super) fn route(logits: &[f32], used: usize, norm: bool) -> Vec<(usize, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f64 = probs.iter().map(|&p| p as f64).sum();
    let inv = (1.0 / sum) as f32;
    probs.iter_mut().for_each(|p| *p *= inv);
    let mut order: Vec<usize> = (0..probs.len()).collect();
    // Descending by probability; ties keep the lower index first.
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    order.truncate(used);
    let mut picks: Vec<(usize, f32)> = order.into_iter().map(|e| (e, probs[e])).collect();
    if norm {
        let total: f64 = picks.iter().map(|&(_, w)| w as f64).sum();
        let total = (total as f32).max(6.103_515_6e-5);
        picks.iter_mut().for_each(|(_, w)| *w /= total);
    }
    picks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_top_experts_are_picked_and_renormalized() {
        let logits = [0.5f32, 2.0, -1.0, 1.5, 2.0];
        let picks = route(&logits, 2, true);
        // Experts 1 and 4 tie at the top: the lower index first.
        assert_eq!(picks.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 4]);
        assert!((picks[0].1 - 0.5).abs() < 1e-6 && (picks[1].1 - 0.5).abs() < 1e-6);
        let picks = route(&logits, 3, false);
        assert_eq!(picks.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 4, 3]);
        let total: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((picks[2].1 - 1.5f32.exp() / total).abs() < 1e-6);
    }
}
