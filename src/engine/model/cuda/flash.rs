//! Causal attention for the tensor path's prompt prefill on CUDA (`flash.cu`), as a
//! candle op on candle's stream: the queries of the new positions against the f16 cache
//! they were just written to, without the `(rows, keys)` score matrix and the additive
//! mask the matmul-softmax-matmul attention materializes (at a 4k-token prompt those are
//! hundreds of megabytes per layer).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape};
use half::f16;

pub(super) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash.ptx"));

/// Query rows a block takes (`BQ` in flash.cu).
const ROWS_PER_BLOCK: usize = 64;

/// Whether the kernel runs on `device` for heads of `head_dim`: a CUDA card of compute
/// capability 8.0 or newer (tensor-core `mma` on f16), head size 64 or 128.
pub fn covers(device: &Device, head_dim: usize) -> bool {
    let Device::Cuda(dev) = device else {
        return false;
    };
    matches!(head_dim, 64 | 128)
        && dev
            .cuda_stream()
            .context()
            .compute_capability()
            .is_ok_and(|(major, _)| major >= 8)
}

/// `apply_op3(q, k, v)`: q `(1, n_heads, n, head_dim)` f32 (contiguous), k and v the f16
/// cache of one layer `(1, n_kv_heads, len, head_dim)` (rows contiguous, heads strided);
/// query `i` sits at position `pos + i`, cache slot `j` holds position `start + j`.
/// Output `(n, n_heads * head_dim)` f32.
#[derive(Debug, Clone, Copy)]
pub struct Flash {
    pub n_rep: usize,
    pub pos: usize,
    pub start: usize,
    /// Sliding window (0: none): a position sees only the `window` last positions.
    pub window: usize,
    pub scale: f32,
}

fn bad(what: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::msg(format!("flash prefill attention: {what}"))
}

impl CustomOp3 for Flash {
    fn name(&self) -> &'static str {
        "candela-flash-prefill"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Err(bad("runs on CUDA only"))
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (qb, n_heads, n, hd) = ql.shape().dims4()?;
        let (kb, n_kv, len, khd) = kl.shape().dims4()?;
        if qb != 1 || kb != 1 || khd != hd || n_kv * self.n_rep != n_heads {
            return Err(bad(format!("q {:?} against k {:?}", ql.dims(), kl.dims())));
        }
        if vl.dims() != kl.dims() || vl.stride() != kl.stride() {
            return Err(bad("k and v differ in shape or strides"));
        }
        let st = kl.stride();
        if st[3] != 1 || st[2] != hd {
            return Err(bad(format!("cache strides {st:?}")));
        }
        if !matches!(hd, 64 | 128) {
            return Err(bad(format!("head size {hd}")));
        }
        if self.pos + n > self.start + len || self.start > self.pos {
            return Err(bad(format!(
                "positions {}..{} outside the cache's {}..{}",
                self.pos,
                self.pos + n,
                self.start,
                self.start + len
            )));
        }
        let (o1, o2) = ql
            .contiguous_offsets()
            .ok_or_else(|| bad("q is not contiguous"))?;
        let dev = q.device();
        let qs = q.as_cuda_slice::<f32>()?.slice(o1..o2);
        let ks = k.as_cuda_slice::<f16>()?.slice(kl.start_offset()..);
        let vs = v.as_cuda_slice::<f16>()?.slice(vl.start_offset()..);
        let func =
            dev.get_or_load_custom_func(&format!("flash_prefill_{hd}"), "candela_flash", PTX)?;
        // SAFETY: every element is written by the kernel (each row of every head).
        let out = unsafe { dev.alloc::<f32>(n * n_heads * hd)? };
        let int = |x: usize| i32::try_from(x).map_err(|_| bad(format!("{x} out of range")));
        let (n_i, rep_i, len_i) = (int(n)?, int(self.n_rep)?, int(len)?);
        let (pos_i, start_i, win_i) = (int(self.pos)?, int(self.start)?, int(self.window)?);
        let hs = st[1] as i64;
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from((n * self.n_rep).div_ceil(ROWS_PER_BLOCK)).map_err(bad)?,
                u32::try_from(n_kv).map_err(bad)?,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = func.builder();
        b.arg(&qs);
        b.arg(&ks);
        b.arg(&vs);
        b.arg(&out);
        b.arg(&n_i);
        b.arg(&rep_i);
        b.arg(&len_i);
        b.arg(&pos_i);
        b.arg(&start_i);
        b.arg(&win_i);
        b.arg(&hs);
        b.arg(&self.scale);
        // Query row i of head h at i * head_dim + h * n * head_dim.
        let (q_row, q_head) = (int(hd)?, int(n * hd)?);
        b.arg(&q_row);
        b.arg(&q_head);
        // SAFETY: the arguments match flash_prefill_{64,128}'s signature; the slices
        // cover what the kernel reads (checked shapes and strides above).
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((n, n_heads * hd)),
        ))
    }
}
