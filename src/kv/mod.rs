//! Per-sequence KV cache storage.
//!
//! Owns the K/V tensors of one sequence (every layer) and the token ids they were
//! computed from. The model code borrows a [`SeqCache`] mutably for a forward pass and
//! appends to it; the caller decides how long a cache lives (one request, or a whole
//! agent session, see [`store`]). This module must not depend on `engine` or `api`.

pub mod spill;
pub mod store;

use candle_core::{DType, Device, Result, Tensor};
use half::f16;

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

/// K and V of one layer, `(n_kv_heads, capacity, head_dim)` each, filled up to `len`:
/// device tensors, or (f16 on the CPU) plain vectors that the CPU kernels read and
/// write in place without going through tensor ops.
#[derive(Debug, Clone)]
enum LayerKv {
    Dev { k: Tensor, v: Tensor },
    Host { k: Vec<f16>, v: Vec<f16> },
}

/// Mutable view of one layer of a host cache: `(n_kv_heads, capacity, head_dim)`.
pub struct HostLayer<'a> {
    pub k: &'a mut [f16],
    pub v: &'a mut [f16],
    pub capacity: usize,
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

    /// Whether the cache lives in plain host vectors (f16 on the CPU).
    pub fn is_host(&self) -> bool {
        self.device.is_cpu() && self.layout.dtype == DType::F16
    }

    /// Make room for `extra` more tokens (all layers), growing in [`GROW_TOKENS`] steps.
    pub fn reserve(&mut self, extra: usize) -> Result<()> {
        let need = self.len() + extra;
        if need <= self.capacity && self.layers.iter().all(Option::is_some) {
            return Ok(());
        }
        let new_cap = need.div_ceil(GROW_TOKENS) * GROW_TOKENS;
        let (nh, hd) = (self.layout.n_kv_heads, self.layout.head_dim);
        let shape = (1, nh, new_cap, hd);
        let (len, old_cap) = (self.len(), self.capacity);
        let host = self.is_host();
        for layer in self.layers.iter_mut() {
            *layer = Some(if host {
                let mut k = vec![f16::ZERO; nh * new_cap * hd];
                let mut v = vec![f16::ZERO; nh * new_cap * hd];
                if let Some(LayerKv::Host { k: ok, v: ov }) = layer.as_ref() {
                    for h in 0..nh {
                        let (src, dst) = (h * old_cap * hd, h * new_cap * hd);
                        k[dst..dst + len * hd].copy_from_slice(&ok[src..src + len * hd]);
                        v[dst..dst + len * hd].copy_from_slice(&ov[src..src + len * hd]);
                    }
                }
                LayerKv::Host { k, v }
            } else {
                let k = Tensor::zeros(shape, self.layout.dtype, &self.device)?;
                let v = Tensor::zeros(shape, self.layout.dtype, &self.device)?;
                if let Some(LayerKv::Dev { k: ok, v: ov }) = layer.as_ref() {
                    if len > 0 {
                        k.slice_set(&ok.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                        v.slice_set(&ov.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                    }
                }
                LayerKv::Dev { k, v }
            });
        }
        self.capacity = new_cap;
        Ok(())
    }

    /// The host vectors of `layer`, for in-place writes of new positions and reads by
    /// the CPU kernels. None for a device cache or an unallocated layer.
    pub fn host_layer(&mut self, layer: usize) -> Option<HostLayer<'_>> {
        let capacity = self.capacity;
        match self.layers.get_mut(layer) {
            Some(Some(LayerKv::Host { k, v })) => Some(HostLayer { k, v, capacity }),
            _ => None,
        }
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
        let (nh, hd, cap) = (self.layout.n_kv_heads, self.layout.head_dim, self.capacity);
        match self.layers.get_mut(layer) {
            Some(Some(LayerKv::Dev { k: kc, v: vc })) => {
                let k = k.to_dtype(self.layout.dtype)?;
                let v = v.to_dtype(self.layout.dtype)?;
                kc.slice_set(&k, 2, pos)?;
                vc.slice_set(&v, 2, pos)?;
                Ok((kc.narrow(2, 0, pos + n)?, vc.narrow(2, 0, pos + n)?))
            }
            Some(Some(LayerKv::Host { k: kc, v: vc })) => {
                for (src, dst) in [(k, &mut *kc), (v, &mut *vc)] {
                    let src: Vec<f16> = src.to_dtype(DType::F16)?.flatten_all()?.to_vec1()?;
                    if src.len() != nh * n * hd {
                        candle_core::bail!(
                            "kv write: {} values, expected {}",
                            src.len(),
                            nh * n * hd
                        );
                    }
                    for h in 0..nh {
                        let at = (h * cap + pos) * hd;
                        dst[at..at + n * hd].copy_from_slice(&src[h * n * hd..(h + 1) * n * hd]);
                    }
                }
                let view = |t: &[f16]| host_tensor(t, nh, cap, hd, pos + n, &self.device);
                Ok((view(kc)?, view(vc)?))
            }
            _ => candle_core::bail!("kv cache layer {layer} not allocated"),
        }
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
                Some(LayerKv::Dev { k, v }) => Ok((
                    k.narrow(2, 0, len)?.contiguous()?,
                    v.narrow(2, 0, len)?.contiguous()?,
                )),
                Some(LayerKv::Host { k, v }) => {
                    let (nh, hd) = (self.layout.n_kv_heads, self.layout.head_dim);
                    Ok((
                        host_tensor(k, nh, self.capacity, hd, len, &self.device)?,
                        host_tensor(v, nh, self.capacity, hd, len, &self.device)?,
                    ))
                }
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

/// Positions `0..len` of a host layer as a `(1, nh, len, hd)` f16 tensor (a copy).
fn host_tensor(
    t: &[f16],
    nh: usize,
    cap: usize,
    hd: usize,
    len: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut out = Vec::with_capacity(nh * len * hd);
    for h in 0..nh {
        out.extend_from_slice(&t[h * cap * hd..(h * cap + len) * hd]);
    }
    Tensor::from_vec(out, (1, nh, len, hd), device)
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

    /// The host form (f16 on the CPU) keeps contents across growth, and its in-place
    /// view, `write_layer` and `export_layers` agree on the layout.
    #[test]
    fn host_cache_grows_and_exports() -> Result<()> {
        let dev = Device::Cpu;
        let lay = CacheLayout {
            dtype: DType::F16,
            ..layout()
        };
        let mut c = SeqCache::new(lay, &dev);
        assert!(c.is_host());
        c.reserve(200)?;
        // Integers below 2048 are exact in f16.
        let val = |i: usize| (i % 1500) as f32;
        let t = Tensor::from_vec((0..2400).map(val).collect(), (1, 3, 200, 4), &dev)?;
        for l in 0..2 {
            c.write_layer(l, 0, &t, &(&t * 2.0)?)?;
        }
        c.commit(&[7; 200]);
        c.reserve(100)?; // grows to 512: contents move to the wider layout
        assert_eq!(c.allocated_bytes(), 2 * GROW_TOKENS * lay.bytes_per_token());
        let hl = c.host_layer(1).unwrap();
        assert_eq!(hl.capacity, 2 * GROW_TOKENS);
        // head 2, position 199, element 3
        let at = (2 * hl.capacity + 199) * 4 + 3;
        assert_eq!(hl.k[at].to_f32(), val(2 * 200 * 4 + 199 * 4 + 3));
        hl.k[(hl.capacity + 200) * 4] = half::f16::from_f32(-1.0);
        c.commit(&[8]);
        let (k, v) = &c.export_layers()?[1];
        assert_eq!(k.dims(), &[1, 3, 201, 4]);
        let k: Vec<f32> = k.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let v: Vec<f32> = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        assert_eq!(k[(201 + 200) * 4], -1.0);
        assert_eq!(k[(2 * 201 + 199) * 4 + 3], val(2 * 200 * 4 + 199 * 4 + 3));
        assert_eq!(
            v[(2 * 201 + 199) * 4 + 3],
            2.0 * val(2 * 200 * 4 + 199 * 4 + 3)
        );
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
