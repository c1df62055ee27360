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
use half::f16;

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

/// K and V of one layer, filled up to `len`: device tensors `(1, n_kv_heads, capacity,
/// head_dim)`; or (f16 on the CPU) plain vectors `(n_kv_heads, capacity, head_dim)` that
/// the CPU kernels read and write in place without tensor ops; or (q8_0) the offset
/// 8-bit values plus the f16 scales of their 32-value blocks in
/// `(1, n_kv_heads, capacity, head_dim / 32)` tensors beside them.
#[derive(Debug, Clone)]
enum LayerKv {
    Dense {
        k: Tensor,
        v: Tensor,
    },
    Host {
        k: Vec<f16>,
        v: Vec<f16>,
    },
    Q8 {
        k: Tensor,
        k_scale: Tensor,
        v: Tensor,
        v_scale: Tensor,
    },
}

/// Mutable view of one layer of a host cache: `(n_kv_heads, capacity, head_dim)`.
pub struct HostLayer<'a> {
    pub k: &'a mut [f16],
    pub v: &'a mut [f16],
    pub capacity: usize,
}

impl LayerKv {
    /// The stored tensors with their spill-file names (`k.{i}`, `k_scale.{i}`, ...);
    /// empty for a host layer (see [`SeqCache::export_tensors`]).
    fn parts(&self) -> Vec<(&'static str, &Tensor)> {
        match self {
            Self::Dense { k, v } => vec![("k", k), ("v", v)],
            Self::Host { .. } => Vec::new(),
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
    /// Host layers are read through [`SeqCache::export_layers`].
    fn values(&self, len: usize) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Dense { k, v } => Ok((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?)),
            Self::Host { .. } => candle_core::bail!("a host layer has no tensors"),
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

    /// Whether the cache lives in plain host vectors (f16 on the CPU).
    pub fn is_host(&self) -> bool {
        self.device.is_cpu() && self.layout.dtype == KvDtype::F16
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
        let (nh, hd) = (self.layout.n_kv_heads, self.layout.head_dim);
        let (len, old_cap) = (self.len(), self.capacity);
        if self.is_host() {
            for layer in self.layers.iter_mut() {
                let mut k = vec![f16::ZERO; nh * new_cap * hd];
                let mut v = vec![f16::ZERO; nh * new_cap * hd];
                if let Some(LayerKv::Host { k: ok, v: ov }) = layer.as_ref() {
                    for h in 0..nh {
                        let (src, dst) = (h * old_cap * hd, h * new_cap * hd);
                        k[dst..dst + len * hd].copy_from_slice(&ok[src..src + len * hd]);
                        v[dst..dst + len * hd].copy_from_slice(&ov[src..src + len * hd]);
                    }
                }
                *layer = Some(LayerKv::Host { k, v });
            }
            self.capacity = new_cap;
            return Ok(());
        }
        let specs = part_specs(&self.layout);
        for layer in self.layers.iter_mut() {
            let old = layer.as_ref().map(LayerKv::parts);
            let mut parts = Vec::with_capacity(specs.len());
            for (i, &(_, dt, last)) in specs.iter().enumerate() {
                let t = Tensor::zeros((1, nh, new_cap, last), dt, &self.device)?;
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

    /// The host vectors of `layer`, for in-place writes of new positions and reads by
    /// the CPU kernels. None for a device cache or an unallocated layer.
    pub fn host_layer(&mut self, layer: usize) -> Option<HostLayer<'_>> {
        let capacity = self.capacity;
        match self.layers.get_mut(layer) {
            Some(Some(LayerKv::Host { k, v })) => Some(HostLayer { k, v, capacity }),
            _ => None,
        }
    }

    /// Positions allocated per layer.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The K and V tensors `(1, n_kv_heads, capacity, head_dim)` of every layer of a
    /// dense (f32/f16/bf16) device cache, for kernels that read and write them in place.
    /// None for a host or q8_0 cache, or before [`SeqCache::reserve`].
    pub fn dense_layers(&self) -> Option<Vec<(&Tensor, &Tensor)>> {
        self.layers
            .iter()
            .map(|l| match l {
                Some(LayerKv::Dense { k, v }) => Some((k, v)),
                _ => None,
            })
            .collect()
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
        if let Some(Some(LayerKv::Host { k: kc, v: vc })) = self.layers.get_mut(layer) {
            for (src, dst) in [(k, &mut *kc), (v, &mut *vc)] {
                let src: Vec<f16> = src.to_dtype(DType::F16)?.flatten_all()?.to_vec1()?;
                if src.len() != nh * n * hd {
                    candle_core::bail!("kv write: {} values, expected {}", src.len(), nh * n * hd);
                }
                for h in 0..nh {
                    let at = (h * cap + pos) * hd;
                    dst[at..at + n * hd].copy_from_slice(&src[h * n * hd..(h + 1) * n * hd]);
                }
            }
            let view = |t: &[f16]| host_tensor(t, nh, cap, hd, pos + n, &self.device);
            return Ok((view(kc)?, view(vc)?));
        }
        let Some(Some(kv)) = self.layers.get(layer) else {
            candle_core::bail!("kv cache layer {layer} not allocated");
        };
        match kv {
            LayerKv::Dense { k: kc, v: vc } => {
                kc.slice_set(&k.to_dtype(kc.dtype())?, 2, pos)?;
                vc.slice_set(&v.to_dtype(vc.dtype())?, 2, pos)?;
            }
            LayerKv::Host { .. } => unreachable!("host layers are written above"),
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
                Some(LayerKv::Host { k, v }) => {
                    let (nh, hd) = (self.layout.n_kv_heads, self.layout.head_dim);
                    Ok((
                        host_tensor(k, nh, self.capacity, hd, len, &self.device)?,
                        host_tensor(v, nh, self.capacity, hd, len, &self.device)?,
                    ))
                }
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
            if let LayerKv::Host { k, v } = kv {
                let (nh, hd) = (self.layout.n_kv_heads, self.layout.head_dim);
                for (name, t) in [("k", k), ("v", v)] {
                    out.push((
                        format!("{name}.{i}"),
                        host_tensor(t, nh, self.capacity, hd, len, &self.device)?,
                    ));
                }
                continue;
            }
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
                if tokens.is_empty() {
                    continue;
                }
                let cap = c.capacity;
                match &mut c.layers[i] {
                    Some(LayerKv::Host { k, v }) => {
                        let dst = if p == 0 { k } else { v };
                        let src: Vec<f16> = t.flatten_all()?.to_vec1()?;
                        let (nh, hd, n) = (layout.n_kv_heads, layout.head_dim, tokens.len());
                        for h in 0..nh {
                            dst[h * cap * hd..h * cap * hd + n * hd]
                                .copy_from_slice(&src[h * n * hd..(h + 1) * n * hd]);
                        }
                    }
                    Some(kv) => kv.parts()[p].1.slice_set(&t.to_device(device)?, 2, 0)?,
                    None => {}
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
            .map(|l| match l {
                LayerKv::Host { k, v } => (k.len() + v.len()) * 2,
                l => l
                    .parts()
                    .iter()
                    .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
                    .sum(),
            })
            .sum()
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

    /// The host form (f16 on the CPU) keeps contents across growth, and its in-place
    /// view, `write_layer` and `export_layers` agree on the layout.
    #[test]
    fn host_cache_grows_and_exports() -> Result<()> {
        let dev = Device::Cpu;
        let lay = CacheLayout {
            dtype: KvDtype::F16,
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
