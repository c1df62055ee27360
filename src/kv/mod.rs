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
mod tests;
