//! Per-sequence KV cache storage.
//!
//! Owns the K/V tensors of one sequence (every layer) and the token ids they were
//! computed from. The model code borrows a [`SeqCache`] mutably for a forward pass and
//! appends to it; the caller decides how long a cache lives (one request, or a whole
//! agent session, see [`store`]). This module must not depend on `engine` or `api`.

pub mod dtype;
pub mod spill;
pub mod store;

use candle_core::{DType, Device, Result, Tensor};

pub use dtype::KvDtype;

/// Capacity grows in steps of this many tokens: one copy per step instead of one per
/// token (candle's `quantized_llama` concatenates the whole cache every token).
pub const GROW_TOKENS: usize = 256;

/// Shape of a model's cache, enough to allocate and account for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLayout {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: KvDtype,
}

impl CacheLayout {
    /// Bytes one token occupies across all layers, K and V (the real storage size: for
    /// q8_0 the 8-bit values and their f16 block scales).
    pub fn bytes_per_token(&self) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.dtype.bytes_for(self.head_dim)
    }

    /// Whether this model's cache can be stored in `dtype` (checked at start-up).
    pub fn check(&self) -> std::result::Result<(), String> {
        self.dtype.check_head_dim(self.head_dim)
    }
}

/// K and V of one layer: `(1, n_kv_heads, capacity, head_dim)` each, filled up to `len`.
/// A q8_0 layer keeps the offset 8-bit values there and the f16 scales of its 32-value
/// blocks in `(1, n_kv_heads, capacity, head_dim / 32)` tensors beside them.
#[derive(Debug, Clone)]
enum LayerKv {
    Dense {
        k: Tensor,
        v: Tensor,
    },
    Q8 {
        k: Tensor,
        k_scale: Tensor,
        v: Tensor,
        v_scale: Tensor,
    },
}

impl LayerKv {
    /// The stored tensors with their spill-file names (`k.{i}`, `k_scale.{i}`, ...).
    fn parts(&self) -> Vec<(&'static str, &Tensor)> {
        match self {
            Self::Dense { k, v } => vec![("k", k), ("v", v)],
            Self::Q8 {
                k,
                k_scale,
                v,
                v_scale,
            } => vec![
                ("k", k),
                ("k_scale", k_scale),
                ("v", v),
                ("v_scale", v_scale),
            ],
        }
    }

    /// K/V values of positions `0..len` as attention reads them (q8_0: dequantized).
    fn values(&self, len: usize) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Dense { k, v } => Ok((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?)),
            Self::Q8 {
                k,
                k_scale,
                v,
                v_scale,
            } => Ok((
                dtype::dequantize_q8(&k.narrow(2, 0, len)?, &k_scale.narrow(2, 0, len)?)?,
                dtype::dequantize_q8(&v.narrow(2, 0, len)?, &v_scale.narrow(2, 0, len)?)?,
            )),
        }
    }
}

/// Storage tensor types and last dimensions of a layer's parts, in [`LayerKv::parts`] order.
fn part_specs(layout: &CacheLayout) -> Vec<(&'static str, DType, usize)> {
    let hd = layout.head_dim;
    match layout.dtype.dense() {
        Some(dt) => vec![("k", dt, hd), ("v", dt, hd)],
        None => {
            let nb = hd / dtype::Q8_BLOCK;
            vec![
                ("k", DType::U8, hd),
                ("k_scale", DType::F16, nb),
                ("v", DType::U8, hd),
                ("v_scale", DType::F16, nb),
            ]
        }
    }
}

/// Build a layer from its parts (in [`part_specs`] order).
fn layer_from_parts(mut parts: Vec<Tensor>) -> Result<LayerKv> {
    match parts.len() {
        2 => {
            let v = parts.remove(1);
            let k = parts.remove(0);
            Ok(LayerKv::Dense { k, v })
        }
        4 => {
            let v_scale = parts.remove(3);
            let v = parts.remove(2);
            let k_scale = parts.remove(1);
            let k = parts.remove(0);
            Ok(LayerKv::Q8 {
                k,
                k_scale,
                v,
                v_scale,
            })
        }
        n => candle_core::bail!("a cache layer has 2 or 4 parts, not {n}"),
    }
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
        if let Err(e) = self.layout.check() {
            candle_core::bail!("{e}");
        }
        let new_cap = need.div_ceil(GROW_TOKENS) * GROW_TOKENS;
        let len = self.len();
        let specs = part_specs(&self.layout);
        for layer in self.layers.iter_mut() {
            let old = layer.as_ref().map(LayerKv::parts);
            let mut parts = Vec::with_capacity(specs.len());
            for (i, &(_, dt, last)) in specs.iter().enumerate() {
                let t =
                    Tensor::zeros((1, self.layout.n_kv_heads, new_cap, last), dt, &self.device)?;
                if let (Some(old), true) = (&old, len > 0) {
                    t.slice_set(&old[i].1.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
                parts.push(t);
            }
            *layer = Some(layer_from_parts(parts)?);
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
        match kv {
            LayerKv::Dense { k: kc, v: vc } => {
                kc.slice_set(&k.to_dtype(kc.dtype())?, 2, pos)?;
                vc.slice_set(&v.to_dtype(vc.dtype())?, 2, pos)?;
            }
            LayerKv::Q8 {
                k: kc,
                k_scale,
                v: vc,
                v_scale,
            } => {
                let (kq, kd) = dtype::quantize_q8(k)?;
                let (vq, vd) = dtype::quantize_q8(v)?;
                kc.slice_set(&kq, 2, pos)?;
                k_scale.slice_set(&kd, 2, pos)?;
                vc.slice_set(&vq, 2, pos)?;
                v_scale.slice_set(&vd, 2, pos)?;
            }
        }
        kv.values(pos + n)
    }

    /// Record that `tokens` now occupy the positions after the current length.
    pub fn commit(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
    }

    /// K/V values of the filled part of every layer, `(1, n_kv_heads, len, head_dim)`
    /// each, contiguous, as attention sees them (q8_0: dequantized to f32).
    pub fn export_layers(&self) -> Result<Vec<(Tensor, Tensor)>> {
        let len = self.len();
        self.layers
            .iter()
            .enumerate()
            .map(|(i, l)| match l {
                Some(kv) => {
                    let (k, v) = kv.values(len)?;
                    Ok((k.contiguous()?, v.contiguous()?))
                }
                None => candle_core::bail!("kv cache layer {i} not allocated"),
            })
            .collect()
    }

    /// The stored tensors of the filled part, named `k.{layer}`, `v.{layer}` (and for
    /// q8_0 `k_scale.{layer}`, `v_scale.{layer}`), for spill files.
    pub fn export_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let len = self.len();
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let Some(kv) = l else {
                candle_core::bail!("kv cache layer {i} not allocated");
            };
            for (name, t) in kv.parts() {
                out.push((format!("{name}.{i}"), t.narrow(2, 0, len)?.contiguous()?));
            }
        }
        Ok(out)
    }

    /// Rebuild a cache from tensors named as [`SeqCache::export_tensors`] names them.
    /// Every tensor's shape and element type is checked against `layout` first: a tensor
    /// of another type is an error, never reinterpreted.
    pub fn from_tensors<'a>(
        layout: CacheLayout,
        device: &Device,
        tokens: Vec<u32>,
        get: impl Fn(&str) -> Option<&'a Tensor>,
    ) -> Result<Self> {
        let specs = part_specs(&layout);
        let mut c = Self::new(layout, device);
        c.reserve(tokens.len())?;
        for i in 0..layout.n_layers {
            for (p, &(name, dt, last)) in specs.iter().enumerate() {
                let key = format!("{name}.{i}");
                let Some(t) = get(&key) else {
                    candle_core::bail!("tensor `{key}` missing");
                };
                let want = [1, layout.n_kv_heads, tokens.len(), last];
                if t.dims() != want || t.dtype() != dt {
                    candle_core::bail!(
                        "tensor `{key}`: {:?} {:?}, expected {dt:?} {want:?}",
                        t.dtype(),
                        t.dims()
                    );
                }
                if !tokens.is_empty() {
                    if let Some(kv) = &c.layers[i] {
                        kv.parts()[p].1.slice_set(&t.to_device(device)?, 2, 0)?;
                    }
                }
            }
        }
        c.commit(&tokens);
        Ok(c)
    }

    /// Bytes of the tensors actually allocated (what [`SeqCache::allocated_bytes`]
    /// must agree with).
    #[cfg(test)]
    fn tensor_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flat_map(|l| l.parts())
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
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
            dtype: KvDtype::F32,
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

    fn layout_of(dtype: KvDtype) -> CacheLayout {
        CacheLayout {
            n_layers: 2,
            n_kv_heads: 3,
            head_dim: 64,
            dtype,
        }
    }

    /// Write `n` positions of ramp values into every layer.
    fn fill(c: &mut SeqCache, n: usize) -> Result<()> {
        let dev = Device::Cpu;
        let pos = c.len();
        c.reserve(n)?;
        for l in 0..c.layout().n_layers {
            let t = (Tensor::arange(0f32, (3 * n * 64) as f32, &dev)?.reshape((1, 3, n, 64))?
                * (0.01 * (l + 1) as f64))?;
            c.write_layer(l, pos, &t, &(&t * -0.5)?)?;
        }
        c.commit(&vec![1; n]);
        Ok(())
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn accounted_bytes_are_the_real_tensor_bytes_for_every_dtype() -> Result<()> {
        // Per token: 2 (K, V) x 2 layers x 3 heads x 64 values.
        let per_token = |d: KvDtype| match d {
            KvDtype::F32 => 2 * 2 * 3 * 64 * 4,
            KvDtype::F16 | KvDtype::BF16 => 2 * 2 * 3 * 64 * 2,
            KvDtype::Q8_0 => 2 * 2 * 3 * (64 + 2 * 2),
        };
        for d in KvDtype::ALL {
            let l = layout_of(d);
            assert_eq!(l.bytes_per_token(), per_token(d), "{d}");
            let mut c = SeqCache::new(l, &Device::Cpu);
            fill(&mut c, 300)?;
            assert_eq!(c.allocated_bytes(), c.tensor_bytes(), "{d}");
            assert_eq!(c.allocated_bytes(), 2 * GROW_TOKENS * per_token(d), "{d}");
        }
        assert_eq!(
            layout_of(KvDtype::Q8_0).bytes_per_token() as f64
                / layout_of(KvDtype::F16).bytes_per_token() as f64,
            34.0 / 64.0
        );
        Ok(())
    }

    #[test]
    fn every_dtype_holds_the_values_and_round_trips_through_its_tensors() -> Result<()> {
        let dev = Device::Cpu;
        // Two writes (the second at position 30), as prefill then more turns would.
        let mut reference = SeqCache::new(layout_of(KvDtype::F32), &dev);
        fill(&mut reference, 30)?;
        fill(&mut reference, 10)?;
        let want = reference.export_layers()?;
        for (d, tol) in [
            (KvDtype::F32, 0.0),
            (KvDtype::F16, 2e-3),
            (KvDtype::BF16, 2e-2),
            (KvDtype::Q8_0, 1e-2),
        ] {
            let mut c = SeqCache::new(layout_of(d), &dev);
            fill(&mut c, 30)?;
            fill(&mut c, 10)?;
            let got = c.export_layers()?;
            for ((k, v), (wk, wv)) in got.iter().zip(&want) {
                let scale = wk.abs()?.max_all()?.to_scalar::<f32>()?;
                assert_eq!(k.dims(), &[1, 3, 40, 64]);
                assert!(max_diff(k, wk) <= tol * scale, "{d}: K differs");
                assert!(max_diff(v, wv) <= tol * scale, "{d}: V differs");
            }
            let named = c.export_tensors()?;
            let map: std::collections::HashMap<_, _> = named.into_iter().collect();
            let back =
                SeqCache::from_tensors(layout_of(d), &dev, c.tokens().to_vec(), |n| map.get(n))?;
            for ((k, v), (bk, bv)) in got.iter().zip(&back.export_layers()?) {
                assert_eq!(max_diff(k, bk), 0.0, "{d}: K changed in the round trip");
                assert_eq!(max_diff(v, bv), 0.0, "{d}: V changed in the round trip");
            }
            // Tensors of another dtype are refused, never reinterpreted.
            for other in KvDtype::ALL.into_iter().filter(|o| *o != d) {
                let r = SeqCache::from_tensors(layout_of(other), &dev, c.tokens().to_vec(), |n| {
                    map.get(n)
                });
                assert!(r.is_err(), "{d} tensors accepted as {other}");
            }
        }
        Ok(())
    }

    #[test]
    fn q8_0_refuses_a_head_dim_it_cannot_block() {
        let l = CacheLayout {
            head_dim: 4,
            ..layout_of(KvDtype::Q8_0)
        };
        assert!(l.check().is_err());
        assert!(SeqCache::new(l, &Device::Cpu).reserve(1).is_err());
    }
}
