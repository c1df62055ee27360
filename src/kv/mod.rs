//! Per-sequence KV cache storage.
//!
//! Owns the K/V tensors of one sequence (every layer) and the token ids they were
//! computed from. The model code borrows a [`SeqCache`] mutably for a forward pass and
//! appends to it; the caller decides how long a cache lives (one request, or a whole
//! agent session, see [`store`]). This module must not depend on `engine` or `api`.

pub mod dtype;
pub mod shared;
pub mod spill;
pub mod store;

use candle_core::{DType, Device, Result, Tensor};
use half::{bf16, f16};

pub use dtype::KvDtype;

/// Capacity grows in steps of this many tokens: one copy per step instead of one per
/// token (candle's `quantized_llama` concatenates the whole cache every token).
pub const GROW_TOKENS: usize = 256;

/// Positions a local layer keeps beyond its window, so that a next turn may rewind a
/// little (a chat template re-rendering the end of the last reply) and still reuse the
/// cache.
pub const REWIND_TOKENS: usize = 128;

/// Sliding-window (local) layers: each attends over the last `size` positions only, so
/// its cache holds a window (plus [`REWIND_TOKENS`] and room to grow), never the whole
/// context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalWindow {
    pub size: usize,
    /// Bit `l` set: layer `l` is local.
    pub layers: u128,
}

impl LocalWindow {
    /// Built from a per-layer flag list; None when no layer is local. Models with more
    /// than 128 layers keep whole caches (no known sliding-window model is that deep).
    pub fn new(size: usize, local: &[bool]) -> Option<Self> {
        if size == 0 || local.len() > 128 || !local.iter().any(|&l| l) {
            return None;
        }
        let layers = local
            .iter()
            .enumerate()
            .filter(|(_, &l)| l)
            .fold(0u128, |m, (i, _)| m | (1u128 << i));
        Some(Self { size, layers })
    }

    fn is_local(&self, layer: usize) -> bool {
        layer < 128 && self.layers & (1u128 << layer) != 0
    }

    /// Positions a local layer allocates when it has to drop old ones while `extra`
    /// tokens are added: the window, the rewind margin, the new tokens, and one growth
    /// step so that the next drop is [`GROW_TOKENS`] tokens away.
    fn span(&self, extra: usize) -> usize {
        (self.size + REWIND_TOKENS + extra).div_ceil(GROW_TOKENS) * GROW_TOKENS + GROW_TOKENS
    }
}

/// Shape of a model's cache, enough to allocate and account for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLayout {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: KvDtype,
    /// Which layers are local, and their window; None when every layer is global.
    pub window: Option<LocalWindow>,
}

impl CacheLayout {
    /// Bytes one token occupies across all layers, K and V (the real storage size: for
    /// q8_0 the 8-bit values and their f16 block scales). With local layers this is the
    /// rate while a session is shorter than their window; past it, only the global
    /// layers grow ([`CacheLayout::bytes_for`]).
    pub fn bytes_per_token(&self) -> usize {
        self.n_layers * self.layer_bytes_per_token()
    }

    /// Bytes one token occupies in one layer, K and V.
    fn layer_bytes_per_token(&self) -> usize {
        2 * self.n_kv_heads * self.dtype.bytes_for(self.head_dim)
    }

    /// Number of local layers.
    pub fn n_local(&self) -> usize {
        self.window.map_or(0, |w| w.layers.count_ones() as usize)
    }

    /// Bytes a session of `tokens` tokens holds once settled after decoding (capacity
    /// rounded up to [`GROW_TOKENS`] steps; local layers capped at their window span).
    pub fn bytes_for(&self, tokens: usize) -> usize {
        let cap = tokens.div_ceil(GROW_TOKENS) * GROW_TOKENS;
        let local_cap = self.window.map_or(cap, |w| cap.min(w.span(1)));
        let n_local = self.n_local();
        self.layer_bytes_per_token() * ((self.n_layers - n_local) * cap + n_local * local_cap)
    }

    /// Whether this model's cache can be stored in `dtype` (checked at start-up).
    pub fn check(&self) -> std::result::Result<(), String> {
        self.dtype.check_head_dim(self.head_dim)
    }
}

/// K and V of one layer, filled up to `len`: device tensors `(1, n_kv_heads, capacity,
/// head_dim)`; or (f16, bf16 and q8_0 on the CPU) plain vectors that the CPU kernels read and
/// write in place without tensor ops ([`HostKv`]); or (q8_0 on a device) the offset
/// 8-bit values plus the f16 scales of their 32-value blocks in
/// `(1, n_kv_heads, capacity, head_dim / 32)` tensors beside them.
#[derive(Debug, Clone)]
enum LayerKv {
    Dense {
        k: Tensor,
        v: Tensor,
    },
    Host(HostKv),
    Q8 {
        k: Tensor,
        k_scale: Tensor,
        v: Tensor,
        v_scale: Tensor,
    },
}

/// One layer of a host cache, `(n_kv_heads, capacity, width)` per vector: f16 or bf16
/// values (width `head_dim`), or q8_0 as the tensor path stores it — the 8-bit values
/// offset by 128 (width `head_dim`) and one f16 scale per 32 values (width
/// `head_dim / 32`).
#[derive(Debug, Clone)]
enum HostKv {
    F16 {
        k: Vec<f16>,
        v: Vec<f16>,
    },
    BF16 {
        k: Vec<bf16>,
        v: Vec<bf16>,
    },
    Q8 {
        k: Vec<u8>,
        k_scale: Vec<f16>,
        v: Vec<u8>,
        v_scale: Vec<f16>,
    },
}

/// Mutable view of one layer of a host cache ([`HostKv`]'s vectors).
pub enum HostKvMut<'a> {
    F16 {
        k: &'a mut [f16],
        v: &'a mut [f16],
    },
    BF16 {
        k: &'a mut [bf16],
        v: &'a mut [bf16],
    },
    Q8 {
        k: &'a mut [u8],
        k_scale: &'a mut [f16],
        v: &'a mut [u8],
        v_scale: &'a mut [f16],
    },
}

/// Mutable view of one layer of a host cache: `(n_kv_heads, capacity, width)` per
/// vector, slot `s` holding position `base + s` (`base` is 0 for a global layer).
pub struct HostLayer<'a> {
    pub kv: HostKvMut<'a>,
    pub capacity: usize,
    pub base: usize,
}

impl HostKv {
    /// Zeroed vectors for `cap` slots.
    fn zeros(dtype: KvDtype, nh: usize, cap: usize, hd: usize) -> Self {
        let nb = hd / dtype::Q8_BLOCK;
        match dtype {
            KvDtype::Q8_0 => Self::Q8 {
                k: vec![dtype::Q8_ZERO; nh * cap * hd],
                k_scale: vec![f16::ZERO; nh * cap * nb],
                v: vec![dtype::Q8_ZERO; nh * cap * hd],
                v_scale: vec![f16::ZERO; nh * cap * nb],
            },
            KvDtype::BF16 => Self::BF16 {
                k: vec![bf16::ZERO; nh * cap * hd],
                v: vec![bf16::ZERO; nh * cap * hd],
            },
            _ => Self::F16 {
                k: vec![f16::ZERO; nh * cap * hd],
                v: vec![f16::ZERO; nh * cap * hd],
            },
        }
    }

    fn view(&mut self) -> HostKvMut<'_> {
        match self {
            Self::F16 { k, v } => HostKvMut::F16 { k, v },
            Self::BF16 { k, v } => HostKvMut::BF16 { k, v },
            Self::Q8 {
                k,
                k_scale,
                v,
                v_scale,
            } => HostKvMut::Q8 {
                k,
                k_scale,
                v,
                v_scale,
            },
        }
    }

    /// Bytes held.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        match self {
            Self::F16 { k, v } => (k.len() + v.len()) * 2,
            Self::BF16 { k, v } => (k.len() + v.len()) * 2,
            Self::Q8 {
                k,
                k_scale,
                v,
                v_scale,
            } => k.len() + v.len() + (k_scale.len() + v_scale.len()) * 2,
        }
    }

    /// Slots `from..from + keep` of every head moved to the front of `new_cap` slots.
    fn relayout(
        self,
        nh: usize,
        old_cap: usize,
        new_cap: usize,
        from: usize,
        keep: usize,
        hd: usize,
    ) -> Self {
        let nb = hd / dtype::Q8_BLOCK;
        match self {
            Self::F16 { k, v } => Self::F16 {
                k: moved(k, nh, old_cap, new_cap, from, keep, hd),
                v: moved(v, nh, old_cap, new_cap, from, keep, hd),
            },
            Self::BF16 { k, v } => Self::BF16 {
                k: moved(k, nh, old_cap, new_cap, from, keep, hd),
                v: moved(v, nh, old_cap, new_cap, from, keep, hd),
            },
            Self::Q8 {
                k,
                k_scale,
                v,
                v_scale,
            } => Self::Q8 {
                k: moved(k, nh, old_cap, new_cap, from, keep, hd),
                k_scale: moved(k_scale, nh, old_cap, new_cap, from, keep, nb),
                v: moved(v, nh, old_cap, new_cap, from, keep, hd),
                v_scale: moved(v_scale, nh, old_cap, new_cap, from, keep, nb),
            },
        }
    }

    /// The first `len` slots of each vector as `(1, nh, len, width)` tensors (copies), in
    /// [`part_specs`] order.
    fn tensors(&self, nh: usize, cap: usize, len: usize, device: &Device) -> Result<Vec<Tensor>> {
        match self {
            Self::F16 { k, v } => Ok(vec![
                plane_tensor(k, nh, cap, len, device)?,
                plane_tensor(v, nh, cap, len, device)?,
            ]),
            Self::BF16 { k, v } => Ok(vec![
                plane_tensor(k, nh, cap, len, device)?,
                plane_tensor(v, nh, cap, len, device)?,
            ]),
            Self::Q8 {
                k,
                k_scale,
                v,
                v_scale,
            } => Ok(vec![
                plane_tensor(k, nh, cap, len, device)?,
                plane_tensor(k_scale, nh, cap, len, device)?,
                plane_tensor(v, nh, cap, len, device)?,
                plane_tensor(v_scale, nh, cap, len, device)?,
            ]),
        }
    }

    /// Copy `t`, `(1, nh, held, width)`, into the first `held` slots of vector `part`
    /// ([`part_specs`] order), at `slot`.
    fn load(&mut self, part: usize, t: &Tensor, nh: usize, cap: usize, slot: usize) -> Result<()> {
        match (self, part) {
            (Self::F16 { k, .. }, 0) | (Self::F16 { v: k, .. }, 1) => {
                load_plane(k, t, nh, cap, slot)
            }
            (Self::BF16 { k, .. }, 0) | (Self::BF16 { v: k, .. }, 1) => {
                load_plane(k, t, nh, cap, slot)
            }
            (Self::Q8 { k, .. }, 0) | (Self::Q8 { v: k, .. }, 2) => load_plane(k, t, nh, cap, slot),
            (Self::Q8 { k_scale, .. }, 1)
            | (
                Self::Q8 {
                    v_scale: k_scale, ..
                },
                3,
            ) => load_plane(k_scale, t, nh, cap, slot),
            _ => candle_core::bail!("kv: no part {part} in this layer"),
        }
    }
}

/// `src` (`nh` heads of `old_cap` slots of `w` values) with slots `from..from + keep`
/// of each head moved to the front of `new_cap` slots (zeros after them when it grows).
fn moved<T: Copy + Default>(
    mut src: Vec<T>,
    nh: usize,
    old_cap: usize,
    new_cap: usize,
    from: usize,
    keep: usize,
    w: usize,
) -> Vec<T> {
    if old_cap == new_cap {
        // Same size: slide each head's positions to the front in place.
        for h in 0..nh {
            let s = (h * old_cap + from) * w;
            src.copy_within(s..s + keep * w, h * new_cap * w);
        }
        return src;
    }
    let mut dst = vec![T::default(); nh * new_cap * w];
    for h in 0..nh {
        let (s, d) = ((h * old_cap + from) * w, h * new_cap * w);
        dst[d..d + keep * w].copy_from_slice(&src[s..s + keep * w]);
    }
    dst
}

/// Slots `0..len` of each of `nh` heads of `t` as a `(1, nh, len, w)` tensor (a copy).
fn plane_tensor<T: candle_core::WithDType>(
    t: &[T],
    nh: usize,
    cap: usize,
    len: usize,
    device: &Device,
) -> Result<Tensor> {
    let w = t.len() / (nh * cap).max(1);
    let mut out = Vec::with_capacity(nh * len * w);
    for h in 0..nh {
        out.extend_from_slice(&t[h * cap * w..(h * cap + len) * w]);
    }
    Tensor::from_vec(out, (1, nh, len, w), device)
}

/// Copy `t`, `(1, nh, n, w)`, into slots `slot..slot + n` of each head of `dst`.
fn load_plane<T: candle_core::WithDType>(
    dst: &mut [T],
    t: &Tensor,
    nh: usize,
    cap: usize,
    slot: usize,
) -> Result<()> {
    let (n, w) = (t.dim(2)?, t.dim(3)?);
    if t.dim(1)? != nh || dst.len() != nh * cap * w || slot + n > cap {
        candle_core::bail!("kv: a {:?} write does not fit {nh} x {cap} x {w}", t.dims());
    }
    let src: Vec<T> = t.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1()?;
    for h in 0..nh {
        dst[(h * cap + slot) * w..(h * cap + slot + n) * w]
            .copy_from_slice(&src[h * n * w..(h + 1) * n * w]);
    }
    Ok(())
}

impl LayerKv {
    /// The stored tensors with their spill-file names (`k.{i}`, `k_scale.{i}`, ...);
    /// empty for a host layer (see [`SeqCache::export_tensors`]).
    fn parts(&self) -> Vec<(&'static str, &Tensor)> {
        match self {
            Self::Dense { k, v } => vec![("k", k), ("v", v)],
            Self::Host(_) => Vec::new(),
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
            Self::Host(_) => candle_core::bail!("a host layer has no tensors"),
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
///
/// Global layers hold positions `0..len` in slots `0..capacity`. Local (sliding-window)
/// layers hold positions `base..len` in slots `0..local_capacity`: when they run out of
/// room, the positions no query can see any more are dropped and the rest move to the
/// front, so their size stays near the window however long the session grows.
#[derive(Debug, Clone)]
pub struct SeqCache {
    layout: CacheLayout,
    device: Device,
    layers: Vec<Option<LayerKv>>,
    capacity: usize,
    local_capacity: usize,
    /// First position the local layers hold (0 without local layers).
    base: usize,
    /// Tokens whose K/V are stored (positions `0..tokens.len()`).
    tokens: Vec<u32>,
    /// Layers in host vectors ([`HostKv`]) rather than tensors.
    host: bool,
}

impl SeqCache {
    pub fn new(layout: CacheLayout, device: &Device) -> Self {
        Self {
            layout,
            device: device.clone(),
            layers: vec![None; layout.n_layers],
            capacity: 0,
            local_capacity: 0,
            base: 0,
            tokens: Vec::new(),
            host: host_dtype(device, layout.dtype),
        }
    }

    /// A cache kept in tensors even where [`SeqCache::new`] would use host vectors, so
    /// that the model runs its tensor path on it (to compare the two paths).
    pub fn new_tensor_path(layout: CacheLayout, device: &Device) -> Self {
        Self {
            host: false,
            ..Self::new(layout, device)
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

    fn is_local(&self, layer: usize) -> bool {
        self.layout.window.is_some_and(|w| w.is_local(layer))
    }

    /// Slots allocated for `layer` and the position its slot 0 holds.
    fn slots(&self, layer: usize) -> (usize, usize) {
        if self.is_local(layer) {
            (self.local_capacity, self.base)
        } else {
            (self.capacity, 0)
        }
    }

    /// Bytes held by the allocated storage (capacity, not just the filled part).
    pub fn allocated_bytes(&self) -> usize {
        if self.layers.iter().all(Option::is_none) {
            return 0;
        }
        let n_local = self.layout.n_local();
        self.layout.layer_bytes_per_token()
            * ((self.layout.n_layers - n_local) * self.capacity + n_local * self.local_capacity)
    }

    /// Bytes of the filled part.
    pub fn used_bytes(&self) -> usize {
        let n_local = self.layout.n_local();
        let len = self.len();
        self.layout.layer_bytes_per_token()
            * ((self.layout.n_layers - n_local) * len + n_local * (len - self.base))
    }

    /// First position the local layers still hold (0 without local layers); attention
    /// over a local layer's cache starts there.
    pub fn local_base(&self) -> usize {
        self.base
    }

    /// Length of the common prefix of the cached tokens and `tokens`.
    pub fn common_prefix(&self, tokens: &[u32]) -> usize {
        self.tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// Whether the cache can continue at position `len` once cut back to it: the local
    /// layers must still hold the window that position sees.
    pub fn can_resume_at(&self, len: usize) -> bool {
        match self.layout.window {
            Some(w) if self.base > 0 => len <= self.len() && len + 1 >= self.base + w.size,
            _ => len <= self.len(),
        }
    }

    /// Forget every position from `len` on (cut back to a shared prefix). Where the
    /// local layers could not continue from `len` ([`SeqCache::can_resume_at`]), every
    /// position is forgotten.
    pub fn truncate(&mut self, len: usize) {
        if self.can_resume_at(len) {
            self.tokens.truncate(len);
        } else {
            self.tokens.clear();
            self.base = 0;
        }
    }

    /// Drop everything and free the storage.
    pub fn clear(&mut self) {
        self.tokens.clear();
        self.layers.iter_mut().for_each(|l| *l = None);
        self.capacity = 0;
        self.local_capacity = 0;
        self.base = 0;
    }

    /// Whether the model turns Q, K and V by a Walsh-Hadamard rotation before they meet
    /// this cache (q8_0 in host vectors, head dimension a multiple of 64; see
    /// [`dtype::q8_rotation`]): its K and V are stored rotated.
    pub fn rotated(&self) -> bool {
        rotated(self.host, &self.layout)
    }

    /// Whether the cache lives in plain host vectors (f16, bf16 and q8_0 on the CPU).
    pub fn is_host(&self) -> bool {
        self.host
    }

    /// The device the cache's storage lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A copy of this cache with its storage on `device` (a session moving between the
    /// GPU and host RAM): every layer's tensors copied whole, tokens and slot layout
    /// unchanged, so it decodes exactly as the original would. Host-vector caches
    /// ([`SeqCache::is_host`]) live on the CPU only: moving one elsewhere is an error.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                None => Ok(None),
                Some(LayerKv::Host(h)) if device.is_cpu() => Ok(Some(LayerKv::Host(h.clone()))),
                Some(LayerKv::Host(_)) => {
                    candle_core::bail!("a host-vector cache cannot move to {device:?}")
                }
                Some(kv) => {
                    let parts = kv
                        .parts()
                        .into_iter()
                        .map(|(_, t)| t.to_device(device))
                        .collect::<Result<Vec<_>>>()?;
                    layer_from_parts(parts).map(Some)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layout: self.layout,
            device: device.clone(),
            layers,
            capacity: self.capacity,
            local_capacity: self.local_capacity,
            base: self.base,
            tokens: self.tokens.clone(),
            host: self.host,
        })
    }

    /// Make room for `extra` more tokens (all layers), growing in [`GROW_TOKENS`] steps;
    /// local layers drop the positions their window has left behind instead of growing
    /// past [`LocalWindow`]'s span.
    pub fn reserve(&mut self, extra: usize) -> Result<()> {
        let (len, end) = (self.len(), self.len() + extra);
        let allocated = self.layers.iter().all(Option::is_some);
        let cap = if allocated && end <= self.capacity {
            self.capacity
        } else {
            end.div_ceil(GROW_TOKENS) * GROW_TOKENS
        };
        let (base, local_cap) = match self.layout.window {
            None => (0, 0),
            Some(_) if allocated && end - self.base <= self.local_capacity => {
                (self.base, self.local_capacity)
            }
            Some(w) => {
                let span = w.span(extra);
                if end - self.base <= span {
                    let cap = (end - self.base).div_ceil(GROW_TOKENS) * GROW_TOKENS;
                    (self.base, cap.max(self.local_capacity))
                } else {
                    let base = (len + 1)
                        .saturating_sub(w.size + REWIND_TOKENS)
                        .max(self.base);
                    let cap = (end - base).div_ceil(GROW_TOKENS) * GROW_TOKENS;
                    (base, span.max(cap))
                }
            }
        };
        if allocated
            && cap == self.capacity
            && (base, local_cap) == (self.base, self.local_capacity)
        {
            return Ok(());
        }
        self.resize(cap, base, local_cap)
    }

    /// Between requests: local layers grown for a long prompt chunk give back what a
    /// decoding session does not need (they shrink to the window, the rewind margin and
    /// one growth step).
    pub fn settle(&mut self) -> Result<()> {
        let Some(w) = self.layout.window else {
            return Ok(());
        };
        let span = w.span(1);
        if self.local_capacity <= span || self.layers.iter().any(Option::is_none) {
            return Ok(());
        }
        let base = (self.len() + 1)
            .saturating_sub(w.size + REWIND_TOKENS)
            .max(self.base);
        if self.len() - base > span {
            return Ok(());
        }
        self.resize(self.capacity, base, span)
    }

    /// Re-lay every layer out for `cap` global slots and `local_cap` local slots from
    /// position `base`, keeping the positions still held.
    fn resize(&mut self, cap: usize, base: usize, local_cap: usize) -> Result<()> {
        let len = self.len();
        if let Err(e) = self.layout.check() {
            candle_core::bail!("{e}");
        }
        for li in 0..self.layers.len() {
            let (old_cap, old_base) = self.slots(li);
            let (new_cap, new_base) = if self.is_local(li) {
                (local_cap, base)
            } else {
                (cap, 0)
            };
            if self.layers[li].is_some() && (old_cap, old_base) == (new_cap, new_base) {
                continue;
            }
            let old = self.layers[li].take();
            let keep = if old.is_some() { len - new_base } else { 0 };
            self.layers[li] = Some(relayout(
                &self.layout,
                &self.device,
                self.host,
                old,
                old_cap,
                new_cap,
                new_base - old_base,
                keep,
            )?);
        }
        self.capacity = cap;
        self.local_capacity = local_cap;
        self.base = base;
        Ok(())
    }

    /// The host vectors of `layer`, for in-place writes of new positions and reads by
    /// the CPU kernels. None for a device cache or an unallocated layer.
    pub fn host_layer(&mut self, layer: usize) -> Option<HostLayer<'_>> {
        let (capacity, base) = self.slots(layer);
        match self.layers.get_mut(layer) {
            Some(Some(LayerKv::Host(h))) => Some(HostLayer {
                kv: h.view(),
                capacity,
                base,
            }),
            _ => None,
        }
    }

    /// Positions allocated per global layer.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The K and V tensors `(1, n_kv_heads, capacity, head_dim)` of every layer of a
    /// dense (f32/f16/bf16) device cache, for kernels that read and write them in place.
    /// None for a host or q8_0 cache, a cache with local layers, or before
    /// [`SeqCache::reserve`].
    pub fn dense_layers(&self) -> Option<Vec<(&Tensor, &Tensor)>> {
        if self.layout.window.is_some() {
            return None;
        }
        self.layers
            .iter()
            .map(|l| match l {
                Some(LayerKv::Dense { k, v }) => Some((k, v)),
                _ => None,
            })
            .collect()
    }

    /// Write K/V of `n` new positions of `layer` at position `pos` and return views of
    /// the positions the layer holds up to `pos + n`: `0..pos + n` for a global layer,
    /// `local_base()..pos + n` for a local one. `k`/`v` are `(1, n_kv_heads, n,
    /// head_dim)`. Call [`SeqCache::reserve`] first and [`SeqCache::commit`] after the
    /// last layer.
    pub fn write_layer(
        &mut self,
        layer: usize,
        pos: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let n = k.dim(2)?;
        let (cap, base) = self.slots(layer);
        if pos < base || pos + n - base > cap {
            candle_core::bail!(
                "kv cache overflow: pos {pos} + {n} outside positions {base}..{}",
                base + cap
            );
        }
        let slot = pos - base;
        let (nh, hd) = (self.layout.n_kv_heads, self.layout.head_dim);
        if let Some(Some(LayerKv::Host(hk))) = self.layers.get_mut(layer) {
            if k.dims() != [1, nh, n, hd] || v.dims() != k.dims() {
                candle_core::bail!(
                    "kv write: {:?} / {:?}, expected [1, {nh}, {n}, {hd}]",
                    k.dims(),
                    v.dims()
                );
            }
            let parts = match hk {
                HostKv::F16 { .. } | HostKv::BF16 { .. } => vec![k.clone(), v.clone()],
                HostKv::Q8 { .. } => {
                    let (kq, kd) = dtype::quantize_q8(k)?;
                    let (vq, vd) = dtype::quantize_q8(v)?;
                    vec![kq, kd, vq, vd]
                }
            };
            for (i, t) in parts.iter().enumerate() {
                hk.load(i, t, nh, cap, slot)?;
            }
            return host_values(hk, nh, cap, slot + n, &self.device);
        }
        let Some(Some(kv)) = self.layers.get(layer) else {
            candle_core::bail!("kv cache layer {layer} not allocated");
        };
        match kv {
            LayerKv::Dense { k: kc, v: vc } => {
                kc.slice_set(&k.to_dtype(kc.dtype())?, 2, slot)?;
                vc.slice_set(&v.to_dtype(vc.dtype())?, 2, slot)?;
            }
            LayerKv::Host(_) => unreachable!("host layers are written above"),
            LayerKv::Q8 {
                k: kc,
                k_scale,
                v: vc,
                v_scale,
            } => {
                let (kq, kd) = dtype::quantize_q8(k)?;
                let (vq, vd) = dtype::quantize_q8(v)?;
                kc.slice_set(&kq, 2, slot)?;
                k_scale.slice_set(&kd, 2, slot)?;
                vc.slice_set(&vq, 2, slot)?;
                v_scale.slice_set(&vd, 2, slot)?;
            }
        }
        kv.values(slot + n)
    }

    /// Record that `tokens` now occupy the positions after the current length.
    pub fn commit(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
    }

    /// K/V values of the filled part of every layer, `(1, n_kv_heads, held, head_dim)`
    /// each, contiguous, as attention sees them (q8_0: dequantized to f32); `held` is
    /// `len` for a global layer and `len - local_base()` for a local one.
    pub fn export_layers(&self) -> Result<Vec<(Tensor, Tensor)>> {
        let len = self.len();
        self.layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let (cap, base) = self.slots(i);
                match l {
                    Some(LayerKv::Host(h)) => {
                        host_values(h, self.layout.n_kv_heads, cap, len - base, &self.device)
                    }
                    Some(kv) => {
                        let (k, v) = kv.values(len - base)?;
                        Ok((k.contiguous()?, v.contiguous()?))
                    }
                    None => candle_core::bail!("kv cache layer {i} not allocated"),
                }
            })
            .collect()
    }

    /// The stored tensors of the filled part, named `k.{layer}`, `v.{layer}` (and for
    /// q8_0 `k_scale.{layer}`, `v_scale.{layer}`), for spill files. A local layer's
    /// tensors hold its positions `local_base()..len`.
    pub fn export_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let len = self.len();
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let Some(kv) = l else {
                candle_core::bail!("kv cache layer {i} not allocated");
            };
            let (cap, base) = self.slots(i);
            if let LayerKv::Host(h) = kv {
                let ts = h.tensors(self.layout.n_kv_heads, cap, len - base, &self.device)?;
                for ((name, _, _), t) in part_specs(&self.layout).into_iter().zip(ts) {
                    out.push((format!("{name}.{i}"), t));
                }
                continue;
            }
            for (name, t) in kv.parts() {
                out.push((
                    format!("{name}.{i}"),
                    t.narrow(2, 0, len - base)?.contiguous()?,
                ));
            }
        }
        Ok(out)
    }

    /// Rebuild a cache from tensors named as [`SeqCache::export_tensors`] names them.
    /// Every tensor's shape and element type is checked against `layout` first: a tensor
    /// of another type is an error, never reinterpreted. Local layers may hold fewer
    /// positions than `tokens` (their last ones), all the same number.
    pub fn from_tensors<'a>(
        layout: CacheLayout,
        device: &Device,
        tokens: Vec<u32>,
        get: impl Fn(&str) -> Option<&'a Tensor>,
    ) -> Result<Self> {
        let specs = part_specs(&layout);
        let len = tokens.len();
        let mut c = Self::new(layout, device);
        if let Err(e) = layout.check() {
            candle_core::bail!("{e}");
        }
        // Where the local layers start: from the first one's length.
        if let Some(first) = (0..layout.n_layers).find(|&l| c.is_local(l)) {
            let key = format!("{}.{first}", specs[0].0);
            let held = get(&key)
                .and_then(|t| t.dims().get(2).copied())
                .unwrap_or(len);
            c.base = len.saturating_sub(held);
        }
        c.capacity = len.div_ceil(GROW_TOKENS) * GROW_TOKENS;
        c.local_capacity = if layout.window.is_some() {
            (len - c.base).div_ceil(GROW_TOKENS) * GROW_TOKENS
        } else {
            0
        };
        for i in 0..layout.n_layers {
            let (cap, base) = c.slots(i);
            let held = len - base;
            let mut layer = relayout(&layout, device, c.host, None, 0, cap, 0, 0)?;
            for (p, &(name, dt, last)) in specs.iter().enumerate() {
                let key = format!("{name}.{i}");
                let Some(t) = get(&key) else {
                    candle_core::bail!("tensor `{key}` missing");
                };
                let want = [1, layout.n_kv_heads, held, last];
                if t.dims() != want || t.dtype() != dt {
                    candle_core::bail!(
                        "tensor `{key}`: {:?} {:?}, expected {dt:?} {want:?}",
                        t.dtype(),
                        t.dims()
                    );
                }
                if held == 0 {
                    continue;
                }
                match &mut layer {
                    LayerKv::Host(h) => h.load(p, t, layout.n_kv_heads, cap, 0)?,
                    kv => kv.parts()[p].1.slice_set(&t.to_device(device)?, 2, 0)?,
                }
            }
            c.layers[i] = Some(layer);
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
                LayerKv::Host(h) => h.bytes(),
                l => l
                    .parts()
                    .iter()
                    .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
                    .sum(),
            })
            .sum()
    }
}

/// A layer's storage with `new_cap` slots, holding in its first `keep` slots what
/// slots `from..from + keep` of `old` held (zeros elsewhere); host vectors if `host`.
#[allow(clippy::too_many_arguments)]
fn relayout(
    layout: &CacheLayout,
    device: &Device,
    host: bool,
    old: Option<LayerKv>,
    old_cap: usize,
    new_cap: usize,
    from: usize,
    keep: usize,
) -> Result<LayerKv> {
    let (nh, hd) = (layout.n_kv_heads, layout.head_dim);
    if host {
        if let Some(LayerKv::Host(h)) = old {
            return Ok(LayerKv::Host(
                h.relayout(nh, old_cap, new_cap, from, keep, hd),
            ));
        }
        return Ok(LayerKv::Host(HostKv::zeros(layout.dtype, nh, new_cap, hd)));
    }
    let old = old.as_ref().map(LayerKv::parts);
    let mut parts = Vec::new();
    for (i, &(_, dt, last)) in part_specs(layout).iter().enumerate() {
        let t = Tensor::zeros((1, nh, new_cap, last), dt, device)?;
        if let (Some(old), true) = (&old, keep > 0) {
            t.slice_set(&old[i].1.narrow(2, from, keep)?.contiguous()?, 2, 0)?;
        }
        parts.push(t);
    }
    layer_from_parts(parts)
}

/// Whether a cache with this storage and layout holds rotated K/V ([`SeqCache::rotated`]).
fn rotated(host: bool, layout: &CacheLayout) -> bool {
    host && layout.dtype == KvDtype::Q8_0 && dtype::q8_rotation(layout.head_dim).is_some()
}

/// Whether caches of `dtype` on `device` live in host vectors ([`HostKv`]).
fn host_dtype(device: &Device, dtype: KvDtype) -> bool {
    device.is_cpu() && matches!(dtype, KvDtype::F16 | KvDtype::BF16 | KvDtype::Q8_0)
}

/// Slots `0..len` of a host layer as attention reads them: `(1, nh, len, hd)` tensors,
/// f16 and bf16 as stored, q8_0 dequantized to f32 (copies).
fn host_values(
    h: &HostKv,
    nh: usize,
    cap: usize,
    len: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let t = h.tensors(nh, cap, len, device)?;
    match h {
        HostKv::F16 { .. } | HostKv::BF16 { .. } => Ok((t[0].clone(), t[1].clone())),
        HostKv::Q8 { .. } => Ok((
            dtype::dequantize_q8(&t[0], &t[1])?,
            dtype::dequantize_q8(&t[2], &t[3])?,
        )),
    }
}

#[cfg(test)]
mod tests;
