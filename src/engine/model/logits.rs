//! A sequence's logits as a forward pass hands them back: a host tensor, or rows of one
//! host buffer that every sequence of a batched step shares (the fused GPU path's
//! page-locked copy of the step's logits), so that a decode step of many sequences makes
//! no per-row copies before the sampler's own. Depends on candle only.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{Device, Result, Tensor};

/// Host memory holding several sequences' logits rows back to back.
pub trait HostRows: Send + Sync {
    /// All the floats (waiting for the copy that fills them, where one is in flight).
    fn floats(&self) -> Result<&[f32]>;
}

/// One sequence's logits: `rows` rows of the vocabulary's width.
pub enum Logits {
    /// A `(rows, vocab)` tensor (on the host or the model's device).
    Tensor(Tensor),
    /// Rows `range` (in floats) of a shared host buffer.
    Shared {
        buf: Arc<dyn HostRows>,
        range: Range<usize>,
        rows: usize,
    },
}

impl From<Tensor> for Logits {
    fn from(t: Tensor) -> Self {
        Logits::Tensor(t)
    }
}

impl Logits {
    /// Rows `range` (in floats, `rows` of them) of `buf`.
    pub fn shared(buf: Arc<dyn HostRows>, range: Range<usize>, rows: usize) -> Self {
        Logits::Shared { buf, range, rows }
    }

    /// Every row, flattened, as host floats (copied).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match self {
            Logits::Tensor(t) => t.flatten_all()?.to_vec1::<f32>(),
            Logits::Shared { buf, range, .. } => {
                let f = buf.floats()?;
                let rows = f.get(range.clone()).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "logits rows {range:?} outside a buffer of {} floats",
                        f.len()
                    ))
                })?;
                Ok(rows.to_vec())
            }
        }
    }

    /// As a `(rows, vocab)` tensor (shared rows copied into a host tensor).
    pub fn into_tensor(self) -> Result<Tensor> {
        match self {
            Logits::Tensor(t) => Ok(t),
            Logits::Shared {
                ref range, rows, ..
            } => {
                let width = range.len() / rows.max(1);
                let v = self.to_vec()?;
                Tensor::from_vec(v, (rows, width), &Device::Cpu)
            }
        }
    }

    /// The tensor, where these logits are one; None for shared rows.
    pub fn tensor(&self) -> Option<&Tensor> {
        match self {
            Logits::Tensor(t) => Some(t),
            Logits::Shared { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Buf(Vec<f32>);
    impl HostRows for Buf {
        fn floats(&self) -> Result<&[f32]> {
            Ok(&self.0)
        }
    }

    #[test]
    fn shared_rows_read_their_own_range() {
        let buf: Arc<dyn HostRows> = Arc::new(Buf((0..12).map(|i| i as f32).collect()));
        let a = Logits::shared(buf.clone(), 0..4, 1);
        let b = Logits::shared(buf, 4..12, 2);
        assert_eq!(a.to_vec().unwrap(), vec![0.0, 1.0, 2.0, 3.0]);
        let t = b.into_tensor().unwrap();
        assert_eq!(t.dims(), &[2, 4]);
        assert_eq!(
            t.to_vec2::<f32>().unwrap(),
            vec![vec![4.0, 5.0, 6.0, 7.0], vec![8.0, 9.0, 10.0, 11.0]]
        );
    }

    #[test]
    fn rows_past_the_buffer_are_an_error() {
        let buf: Arc<dyn HostRows> = Arc::new(Buf(vec![0.0; 4]));
        assert!(Logits::shared(buf, 2..6, 1).to_vec().is_err());
    }

    #[test]
    fn tensors_flatten() {
        let t = Tensor::from_vec(vec![1f32, 2.0, 3.0, 4.0], (2, 2), &Device::Cpu).unwrap();
        let l = Logits::from(t);
        assert!(l.tensor().is_some());
        assert_eq!(l.to_vec().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    }
}
