//! Per-sequence KV cache storage.
//!
//! Owns the K/V tensors of one sequence (every layer) and the token ids they were
//! computed from. The model code borrows a [`SeqCache`] mutably for a forward pass and
//! appends to it; the caller decides how long a cache lives (one request, or a whole
//! agent session, see [`store`]). This module must not depend on `engine` or `api`.

pub mod spill;
pub mod store;

use candle_core::{DType, Device, Result, Tensor};

/// Capacity grows in steps of this many tokens: one copy per step instead of one per
/// token (candle's `quantized_llama` concatenates the whole cache every token).
pub const GROW_TOKENS: usize = 256;

/// Shape of a model's cache, enough to allocate and account for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLayout {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
}

impl CacheLayout {
    /// Bytes one token occupies across all layers, K and V.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }
}

/// K and V of one layer: `(1, n_kv_heads, capacity, head_dim)` each, filled up to `len`.
#[derive(Debug, Clone)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// The cache of one sequence: token ids plus K/V for every layer.
#[derive(Debug, Clone)]
pub struct SeqCache {
    layout: CacheLayout,
    device: Device,
    layers: Vec<Option<LayerKv>>,
    capacity: usize,
    /// Tokens whose K/V are stored (positions `0..tokens.len()`).
    tokens: Vec<u32>,
}

impl SeqCache {
    pub fn new(layout: CacheLayout, device: &Device) -> Self {
        Self {
            layout,
            device: device.clone(),
            layers: vec![None; layout.n_layers],
            capacity: 0,
            tokens: Vec::new(),
        }
    }

    pub fn layout(&self) -> CacheLayout {
        self.layout
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Token ids whose K/V are cached.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Bytes held by the allocated tensors (capacity, not just the filled part).
    pub fn allocated_bytes(&self) -> usize {
        if self.layers.iter().all(Option::is_none) {
            0
        } else {
            self.capacity * self.layout.bytes_per_token()
        }
    }

    /// Bytes of the filled part.
    pub fn used_bytes(&self) -> usize {
        self.len() * self.layout.bytes_per_token()
    }

    /// Length of the common prefix of the cached tokens and `tokens`.
    pub fn common_prefix(&self, tokens: &[u32]) -> usize {
        self.tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// Forget every position from `len` on (cut back to a shared prefix).
    pub fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
    }

    /// Drop everything and free the tensors.
    pub fn clear(&mut self) {
        self.tokens.clear();
        self.layers.iter_mut().for_each(|l| *l = None);
        self.capacity = 0;
    }

    /// Make room for `extra` more tokens (all layers), growing in [`GROW_TOKENS`] steps.
    pub fn reserve(&mut self, extra: usize) -> Result<()> {
        let need = self.len() + extra;
        if need <= self.capacity && self.layers.iter().all(Option::is_some) {
            return Ok(());
        }
        let new_cap = need.div_ceil(GROW_TOKENS) * GROW_TOKENS;
        let shape = (1, self.layout.n_kv_heads, new_cap, self.layout.head_dim);
        let len = self.len();
        for layer in self.layers.iter_mut() {
            let k = Tensor::zeros(shape, self.layout.dtype, &self.device)?;
            let v = Tensor::zeros(shape, self.layout.dtype, &self.device)?;
            if let Some(old) = layer.as_ref() {
                if len > 0 {
                    k.slice_set(&old.k.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                    v.slice_set(&old.v.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
            }
            *layer = Some(LayerKv { k, v });
        }
        self.capacity = new_cap;
        Ok(())
    }

    /// Write K/V of `n` new positions of `layer` at position `pos` and return views of
    /// positions `0..pos + n`. `k`/`v` are `(1, n_kv_heads, n, head_dim)`.
    /// Call [`SeqCache::reserve`] first and [`SeqCache::commit`] after the last layer.
    pub fn write_layer(
        &mut self,
        layer: usize,
        pos: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let n = k.dim(2)?;
        if pos + n > self.capacity {
            candle_core::bail!(
                "kv cache overflow: pos {pos} + {n} > capacity {}",
                self.capacity
            );
        }
        let Some(Some(kv)) = self.layers.get(layer) else {
            candle_core::bail!("kv cache layer {layer} not allocated");
        };
        let k = k.to_dtype(self.layout.dtype)?;
        let v = v.to_dtype(self.layout.dtype)?;
        kv.k.slice_set(&k, 2, pos)?;
        kv.v.slice_set(&v, 2, pos)?;
        Ok((kv.k.narrow(2, 0, pos + n)?, kv.v.narrow(2, 0, pos + n)?))
    }

    /// Record that `tokens` now occupy the positions after the current length.
    pub fn commit(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
    }

    /// The filled part of every layer, `(1, n_kv_heads, len, head_dim)` each, contiguous.
    pub fn export_layers(&self) -> Result<Vec<(Tensor, Tensor)>> {
        let len = self.len();
        self.layers
            .iter()
            .enumerate()
            .map(|(i, l)| match l {
                Some(kv) => Ok((
                    kv.k.narrow(2, 0, len)?.contiguous()?,
                    kv.v.narrow(2, 0, len)?.contiguous()?,
                )),
                None => candle_core::bail!("kv cache layer {i} not allocated"),
            })
            .collect()
    }

    /// Rebuild a cache from exported layers and their token ids (shapes are checked).
    pub fn from_layers(
        layout: CacheLayout,
        device: &Device,
        tokens: Vec<u32>,
        layers: &[(Tensor, Tensor)],
    ) -> Result<Self> {
        if layers.len() != layout.n_layers {
            candle_core::bail!("expected {} layers, got {}", layout.n_layers, layers.len());
        }
        let want = [1, layout.n_kv_heads, tokens.len(), layout.head_dim];
        let mut c = Self::new(layout, device);
        c.reserve(tokens.len())?;
        for (i, (k, v)) in layers.iter().enumerate() {
            if k.dims() != want || v.dims() != want {
                candle_core::bail!(
                    "layer {i}: shape {:?}/{:?}, expected {want:?}",
                    k.dims(),
                    v.dims()
                );
            }
            if !tokens.is_empty() {
                c.write_layer(i, 0, &k.to_device(device)?, &v.to_device(device)?)?;
            }
        }
        c.commit(&tokens);
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> CacheLayout {
        CacheLayout {
            n_layers: 2,
            n_kv_heads: 3,
            head_dim: 4,
            dtype: DType::F32,
        }
    }

    #[test]
    fn grows_in_chunks_and_keeps_contents() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = SeqCache::new(layout(), &dev);
        assert_eq!(c.allocated_bytes(), 0);
        let step = |c: &mut SeqCache, n: usize, val: f32| -> Result<()> {
            let pos = c.len();
            c.reserve(n)?;
            let t = Tensor::full(val, (1, 3, n, 4), &dev)?;
            for l in 0..2 {
                c.write_layer(l, pos, &t, &t)?;
            }
            c.commit(&vec![val as u32; n]);
            Ok(())
        };
        step(&mut c, 200, 1.0)?;
        assert_eq!(
            c.allocated_bytes(),
            GROW_TOKENS * layout().bytes_per_token()
        );
        step(&mut c, 100, 2.0)?;
        assert_eq!(c.len(), 300);
        assert_eq!(
            c.allocated_bytes(),
            2 * GROW_TOKENS * layout().bytes_per_token()
        );
        let (k, _) = {
            let t = Tensor::full(3f32, (1, 3, 1, 4), &dev)?;
            c.reserve(1)?;
            c.write_layer(1, 300, &t, &t)?
        };
        let vals: Vec<f32> = k.flatten_all()?.to_vec1()?;
        // position 0 still 1.0, position 250 is 2.0, last is 3.0
        let at = |p: usize| vals[p * 4];
        assert_eq!(at(0), 1.0);
        assert_eq!(at(250), 2.0);
        assert_eq!(at(300), 3.0);
        Ok(())
    }

    #[test]
    fn prefix_and_truncate() {
        let mut c = SeqCache::new(layout(), &Device::Cpu);
        c.commit(&[1, 2, 3, 4]);
        assert_eq!(c.common_prefix(&[1, 2, 9]), 2);
        assert_eq!(c.common_prefix(&[1, 2, 3, 4, 5]), 4);
        c.truncate(2);
        assert_eq!(c.tokens(), &[1, 2]);
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = SeqCache::new(layout(), &dev);
        c.reserve(1)?;
        let t = Tensor::zeros((1, 3, 2, 4), DType::F32, &dev)?;
        assert!(c.write_layer(0, GROW_TOKENS - 1, &t, &t).is_err());
        assert!(c.write_layer(5, 0, &t, &t).is_err());
        Ok(())
    }
}
