// Fused single-token decode kernels for llama-family models with Q4_0/Q4_1/Q8_0/Q5_0/
// Q4_K/Q6_K weights, repacked at load into four layouts (src/engine/model/cuda_pack.rs):
// KIND_Q4_0 (nibbles, scale d), KIND_Q4_1 (nibbles, scale d and offset m per 32),
// KIND_Q4_K (nibbles; per row the super-blocks' (d, -dmin) then each 32's 6-bit (sc, m)
// bytes: Q4_1's arithmetic with (d * sc, -dmin * m)) and KIND_Q8_0 (signed bytes, one
// scale per 16 elements: Q8_0, Q5_0 and Q6_K).
//
// Compiled to PTX by build.rs (only with the `cuda` feature) and driven by
// src/engine/cuda.rs, which captures one decode step (embedding, 5 launches per layer,
// final norm + vocabulary projection) in a CUDA graph. Everything that changes from one
// token to the next (token id, position, cache capacity, the per-layer K/V cache
// pointers) is read from a small device "step" buffer, so the same graph replays for
// every token of every sequence.
//
// The arithmetic follows the CPU path (src/engine/model/host.rs) and through it ggml's:
// activations quantized to 8-bit blocks (scale amax/127 rounded to f16, round-half-even),
// integer block dot products (dp4a), Q and the attention weights rounded to f16 like
// K/V, RMSNorm as v / sqrt(mean(v^2) + eps) * g. Float sums run in a different order
// than on the CPU, so results agree to rounding, not bit for bit.

#ifndef CANDELA_EMU
#include <cuda_fp16.h>
#endif
#include <stdint.h>

#define QK 32
#define KIND_Q4_0 0
#define KIND_Q4_1 1
#define KIND_Q8_0 2
#define KIND_Q4_K 3

// Layout of the step buffer (u64 words): token, pos, cap, then n_layers K pointers,
// then n_layers V pointers (each an f16 tensor (n_kv_heads, cap, head_dim)).
#define STEP_TOKEN 0
#define STEP_POS 1
#define STEP_CAP 2
#define STEP_PTRS 3

// A kernel's dynamic shared memory as `T name[]` (every declaration in a launch names the
// same bytes). The host emulation tests (`*_emu.cpp`, CANDELA_EMU) define it themselves.
#ifndef CANDELA_EMU
#define DYN_SMEM(T, name) extern __shared__ __align__(16) T name[]
#endif

// Programmatic dependent launch (Hopper): a kernel launched with the PDL attribute may
// start while its predecessor finishes; `pdl_wait` blocks until the predecessor's
// writes are visible (a no-op for a plain launch). Every kernel waits before it reads
// what an earlier kernel wrote, and none finishes before waiting, so the order holds
// transitively.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
#ifndef CANDELA_EMU
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
    (void)p;
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ int warp_sum_i(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum (or max) over the block; every thread gets the result. `red` holds 32 floats.
__device__ float block_reduce(float v, float* red, bool is_max) {
    v = is_max ? warp_max(v) : warp_sum(v);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int nw = (blockDim.x + 31) >> 5;
    __syncthreads();  // `red` may still be read by an earlier call
    if (lane == 0) red[w] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : (is_max ? -INFINITY : 0.f);
    return is_max ? warp_max(t) : warp_sum(t);
}

__device__ __forceinline__ float round_f16(float x) { return __half2float(__float2half_rn(x)); }

// The (scale, offset) pair of block `b` of a nibble row: stored as such, or for KIND_Q4_K
// formed from the row's scale bytes `srow` (see the header).
// Q4_K's (scale, offset) pair of a block from its super-block's (d, -dmin) and its
// 6-bit (sc, m): (d * sc, -dmin * m).
__device__ __forceinline__ float2 q4k_pair(float2 dd, uchar2 sm) {
    return make_float2(dd.x * (float)sm.x, dd.y * (float)sm.y);
}

template <int KIND>
__device__ __forceinline__ float2 nibble_pair(const float2* __restrict__ wdm,
                                              const uint8_t* __restrict__ srow, int nb, int b) {
    if (KIND == KIND_Q4_K) {
        return q4k_pair(__ldg((const float2*)srow + (b >> 3)),
                        __ldg((const uchar2*)(srow + nb) + b));
    }
    return wdm[b];
}

// Bytes of scales of a row of nb blocks.
template <int KIND>
__device__ __forceinline__ int scale_bytes(int nb) {
    return KIND == KIND_Q4_K ? 3 * nb : 8 * nb;
}

// Sum each of N per-lane partials (N = 8 or 32: one per column) over the warp with the
// pairing tree of warp_sum (offsets 16, 8, 4, 2, 1), in fewer shuffles than N warp_sums:
// while a lane holds more than one column, at each offset it keeps half of them and adds
// its partner's partials of those; once one is left the offsets sum as warp_sum does.
// Every column's sum is bit for bit warp_sum's. Afterwards lane l holds column
// held_col<N>(l) (for N = 32, column l).
// (M columns left per lane at offset O; compile-time, so the partials stay in registers.)
template <int M, int O, int N>
__device__ __forceinline__ void reduce_step(float (&a)[N], int lane) {
    if constexpr (O > 0) {
        if constexpr (M > 1) {
            const bool up = lane & O;
#pragma unroll
            for (int j = 0; j < M / 2; ++j) {
                const float keep = up ? a[j + M / 2] : a[j];
                const float send = up ? a[j] : a[j + M / 2];
                a[j] = keep + __shfl_xor_sync(0xffffffffu, send, O);
            }
            reduce_step<M / 2, O / 2, N>(a, lane);
        } else {
            a[0] += __shfl_xor_sync(0xffffffffu, a[0], O);
            reduce_step<1, O / 2, N>(a, lane);
        }
    }
}

template <int N>
__device__ __forceinline__ float reduce_cols(float (&a)[N], int lane) {
    reduce_step<N, 16, N>(a, lane);
    return a[0];
}

// The column whose sum lane `lane` holds after reduce_cols<N>.
template <int N>
__device__ __forceinline__ int held_col(int lane) {
    int n = N, c = 0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        if (n > 1) {
            if (lane & o) c += n / 2;
            n /= 2;
        }
    }
    return c;
}

// One column's sum of squares as thread `t` of `nt` adds it (elements t, t + nt, ... in
// order), eight loads in flight at a time.
__device__ __forceinline__ float sumsq_one(const float* __restrict__ xc, int K, int t, int nt) {
    float s = 0.f;
    for (int i0 = t; i0 < K; i0 += 8 * nt) {
        float v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int i = i0 + u * nt;
            v[u] = i < K ? xc[i] : 0.f;
        }
#pragma unroll
        for (int u = 0; u < 8; ++u)
            if (i0 + u * nt < K) s = __fadd_rn(s, __fmul_rn(v[u], v[u]));
    }
    return s;
}

// Four values times `id`, rounded to int8 (nearest, ties to even), packed into one word
// (the first in the low byte); their sum added to `sum`.
__device__ __forceinline__ int quant4(const float* v, float id, int& sum) {
    const int q0 = __float2int_rn(__fmul_rn(v[0], id));
    const int q1 = __float2int_rn(__fmul_rn(v[1], id));
    const int q2 = __float2int_rn(__fmul_rn(v[2], id));
    const int q3 = __float2int_rn(__fmul_rn(v[3], id));
    sum += q0 + q1 + q2 + q3;
    return (q0 & 0xff) | ((q1 & 0xff) << 8) | ((q2 & 0xff) << 16) | ((int)((unsigned)q3 << 24));
}

// Quantize `cn` columns of x (rows K floats apart), RMS-normalized first when `norm`,
// into shared memory: sq (cn x K int8) and sds (cn x K/32 pairs (scale, scale * sum of
// the block's ints), both rounded to f16 like ggml's Q8_1). Per column the values do not
// depend on `cn`. Each thread quantizes whole 32-blocks (no shuffles); a nibble kind's
// block is stored with each half-block's 16 values together (elements h*8..h*8+7, then
// 16+h*8..16+h*8+7), so that a lane reads its half-block in one 16-byte load. The RMS
// sums keep block_reduce's order: a strided sum per thread, the warp's tree, then
// ((w0 + w4) + (w2 + w6)) + ((w1 + w5) + (w3 + w7)) over the 8 warps, which is what
// warp_sum makes of [w0..w7, 0, ...]. 256 threads.
// `sq8` (nibble kinds only): the Q8_0 layout of the same values written there too.
// ONE_WIDE: one column's RMS sum with eight loads in flight (for `qact`, a single block
// on the critical path; more registers, so not in the mat-vecs' prologue).
template <int KIND, bool ONE_WIDE = false>
__device__ void quantize_cols(const float* __restrict__ xc, const float* __restrict__ norm,
                              float eps, int K, int cn, int8_t* sq, float2* sds, float* part,
                              float* mrow, int8_t* sq8 = nullptr) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nb = K / QK;
    if (norm != nullptr) {
        for (int g = 0; g < cn; g += 8) {
            float s2[8];
#pragma unroll
            for (int c = 0; c < 8; ++c) s2[c] = 0.f;
            if (ONE_WIDE && cn == 1) {
                s2[0] = sumsq_one(xc, K, threadIdx.x, blockDim.x);
            } else {
                for (int i = threadIdx.x; i < K; i += blockDim.x) {
#pragma unroll
                    for (int c = 0; c < 8; ++c) {
                        if (g + c < cn) {
                            const float v = xc[(size_t)(g + c) * K + i];
                            s2[c] = __fadd_rn(s2[c], __fmul_rn(v, v));
                        }
                    }
                }
            }
            const float r = reduce_cols<8>(s2, lane);
            const int c = held_col<8>(lane);
            if ((lane & 3) == 0 && g + c < cn) part[(g + c) * 8 + warp] = r;
        }
        __syncthreads();
        for (int c = threadIdx.x; c < cn; c += blockDim.x) {
            const float* p = part + c * 8;
            const float t = ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
            mrow[c] = sqrtf(t / (float)K + eps);
        }
        __syncthreads();
    }
    for (int j = threadIdx.x; j < cn * nb; j += blockDim.x) {
        const int c = j / nb, b = j - c * nb;
        const float4* src = (const float4*)(xc + (size_t)c * K + b * QK);
        float v[QK];
#pragma unroll
        for (int e = 0; e < QK / 4; ++e) {
            const float4 t = src[e];
            v[4 * e] = t.x;
            v[4 * e + 1] = t.y;
            v[4 * e + 2] = t.z;
            v[4 * e + 3] = t.w;
        }
        if (norm != nullptr) {
            const float m = mrow[c];
            const float4* gn = (const float4*)(norm + b * QK);
#pragma unroll
            for (int e = 0; e < QK / 4; ++e) {
                const float4 t = gn[e];
                v[4 * e] = __fmul_rn(v[4 * e] / m, t.x);
                v[4 * e + 1] = __fmul_rn(v[4 * e + 1] / m, t.y);
                v[4 * e + 2] = __fmul_rn(v[4 * e + 2] / m, t.z);
                v[4 * e + 3] = __fmul_rn(v[4 * e + 3] / m, t.w);
            }
        }
        float amax = 0.f;
#pragma unroll
        for (int e = 0; e < QK; ++e) amax = fmaxf(amax, fabsf(v[e]));
        const float d = amax / 127.f;
        const float id = amax != 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        int w[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) w[e] = quant4(v + 4 * e, id, sum);
        int4* dst = (int4*)(sq + (size_t)c * K + b * QK);
        if (KIND == KIND_Q8_0) {
            dst[0] = make_int4(w[0], w[1], w[2], w[3]);
            dst[1] = make_int4(w[4], w[5], w[6], w[7]);
        } else {
            dst[0] = make_int4(w[0], w[1], w[4], w[5]);
            dst[1] = make_int4(w[2], w[3], w[6], w[7]);
            if (sq8 != nullptr) {
                int4* d8 = (int4*)(sq8 + (size_t)c * K + b * QK);
                d8[0] = make_int4(w[0], w[1], w[2], w[3]);
                d8[1] = make_int4(w[4], w[5], w[6], w[7]);
            }
        }
        sds[c * nb + b] = make_float2(round_f16(d), round_f16(__fmul_rn(d, (float)sum)));
    }
    __syncthreads();
}

// Dot R weight rows (`row`, and `row2` when R = 2: a SwiGLU's gate and up rows) with
// `cnt` (<= N) columns of quantized activations (quantize_cols' layout); lane `lane` is
// left with the sums of column held_col<N>(lane) in y (and u). The rows are read once
// for all the columns, and each column's activations once for both rows: lane l takes
// half-blocks l, l + 32, ... (a 16-byte load of each column's matching half-block). Per
// row and column the sums, their order and the warp tree are the same for every N and
// R (and tc.cuh's tensor-core kernels repeat them).
template <int KIND>
struct HalfW {
    int4 w;      // Q8_0: the 16 values; nibble kinds: x..w = the four unpacked words
    float2 sc;   // Q8_0: (the half's scale, -); nibble kinds: (scale, offset) pair
};

template <int KIND>
__device__ __forceinline__ HalfW<KIND> load_half(const uint8_t* __restrict__ qs,
                                                 const float2* __restrict__ dm, int row,
                                                 int nb, int b, int h) {
    HalfW<KIND> r;
    if (KIND == KIND_Q8_0) {
        r.w = __ldg((const int4*)(qs + ((size_t)row * nb + b) * 32 + h * 16));
        const float2 wds = dm[(size_t)row * nb + b];
        r.sc = make_float2(h ? wds.y : wds.x, 0.f);
    } else {
        const uint2 w = __ldg((const uint2*)(qs + ((size_t)row * nb + b) * 16 + h * 8));
        r.w = make_int4((int)(w.x & 0x0f0f0f0fu), (int)(w.y & 0x0f0f0f0fu),
                        (int)((w.x >> 4) & 0x0f0f0f0fu), (int)((w.y >> 4) & 0x0f0f0f0fu));
        const uint8_t* srow = (const uint8_t*)dm + (size_t)row * scale_bytes<KIND>(nb);
        r.sc = nibble_pair<KIND>(dm + (size_t)row * nb, srow, nb, b);
    }
    return r;
}

// One half-block (b, h) of R rows against `cnt` columns, into acc.
template <int KIND, int N, int R>
__device__ __forceinline__ void half_dot(const HalfW<KIND> (&w)[R], float (&acc)[R][N], int b,
                                         int h, int nb, int K, const int8_t* sq,
                                         const float2* sds, int cnt) {
#pragma unroll
    for (int c = 0; c < N; ++c) {
        if (c < cnt) {
            // Q8_0: 16 values; nibble kinds: x, y: elements h*8.. (low nibbles); z, w:
            // 16+h*8.. (high nibbles).
            const int4 a = *(const int4*)(sq + (size_t)c * K + b * 32 + h * 16);
            const float2 ds = sds[c * nb + b];
            int sy = 0;
            if (KIND == KIND_Q4_0) {
                sy = __dp4a(0x01010101, a.x, 0);
                sy = __dp4a(0x01010101, a.y, sy);
                sy = __dp4a(0x01010101, a.z, sy);
                sy = __dp4a(0x01010101, a.w, sy);
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
                int s = __dp4a(w[r].w.x, a.x, 0);
                s = __dp4a(w[r].w.y, a.y, s);
                s = __dp4a(w[r].w.z, a.z, s);
                s = __dp4a(w[r].w.w, a.w, s);
                // Spelled out (tc.cuh's tensor-core kernels repeat it to the bit).
                const float is = (float)(KIND == KIND_Q4_0 ? s - 8 * sy : s);
                acc[r][c] = __fmaf_rn(__fmul_rn(w[r].sc.x, ds.x), is, acc[r][c]);
                if ((KIND == KIND_Q4_1 || KIND == KIND_Q4_K) && h == 0)
                    acc[r][c] = __fmaf_rn(w[r].sc.y, ds.y, acc[r][c]);
            }
        }
    }
}

template <int KIND, int N, int R>
__device__ __forceinline__ void rows_dot(const uint8_t* __restrict__ qs,
                                         const float2* __restrict__ dm, int row, int row2,
                                         int nb, int K, const int8_t* sq, const float2* sds,
                                         int cnt, int lane, float* y, float* u) {
    float acc[R][N];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < N; ++c) acc[r][c] = 0.f;
    const int rw[2] = {row, row2};
    // Unrolled for one column so that several half-blocks' loads are in flight at once on
    // long rows (wide kernels have their columns for that).
#pragma unroll(N == 1 ? 4 : 1)
    for (int i = lane; i < nb * 2; i += 32) {
        const int b = i >> 1, h = i & 1;
        HalfW<KIND> w[R];
#pragma unroll
        for (int r = 0; r < R; ++r) w[r] = load_half<KIND>(qs, dm, rw[r], nb, b, h);
        half_dot<KIND, N, R>(w, acc, b, h, nb, K, sq, sds, cnt);
    }
    *y = reduce_cols<N>(acc[0], lane);
    if (R == 2) *u = reduce_cols<N>(acc[R - 1], lane);
}

#define MODE_STORE 0
#define MODE_ADD 1
#define MODE_SWIGLU 2

// SwiGLU of a gate value y and its up value u: silu(y) * u.
__device__ __forceinline__ float silu_mul(float y, float u) {
    return __fmul_rn(y / (1.f + expf(-y)), u);
}

// A projection's output `y` for row r into *o (u: the up row's, for MODE_SWIGLU): every
// mat-vec and mat-mat kernel's epilogue.
template <int MODE>
__device__ __forceinline__ void store_out(float* o, float y, float u,
                                          const float* __restrict__ bias, int r) {
    if (MODE == MODE_SWIGLU) {
        *o = silu_mul(y, u);
    } else if (MODE == MODE_ADD) {
        *o += y;
    } else {
        *o = bias != nullptr ? y + bias[r] : y;
    }
}

// Start weight row `row` (its values and scales) into L2: lane `l` of a group of `n`
// takes every n-th 128-byte line.
template <int KIND>
__device__ __forceinline__ void prefetch_row(const uint8_t* __restrict__ qs,
                                             const float2* __restrict__ dm, int nb, size_t row,
                                             int l, int n) {
    const int qb = KIND == KIND_Q8_0 ? 32 : 16;
    const uint8_t* wq = qs + row * nb * qb;
    for (int off = l * 128; off < nb * qb; off += n * 128) prefetch_l2(wq + off);
    const uint8_t* wd = (const uint8_t*)dm + row * scale_bytes<KIND>(nb);
    for (int off = l * 128; off < scale_bytes<KIND>(nb); off += n * 128) prefetch_l2(wd + off);
}

// Before a mat-vec waits for its input: start fetching this warp's first row (and its
// `up` twin) into L2 (weights do not depend on the previous kernel).
template <int KIND, int MODE>
__device__ __forceinline__ void mv_prefetch(const uint8_t* __restrict__ qs,
                                            const float2* __restrict__ dm, int nb, int rows) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int r = blockIdx.x * nw + warp;
    if (r < rows) {
        for (int t = 0; t < (MODE == MODE_SWIGLU ? 2 : 1); ++t)
            prefetch_row<KIND>(qs, dm, nb, (size_t)r + (size_t)t * rows, lane, 32);
    }
}

// Each warp of the grid takes rows in a grid-stride loop against the quantized
// activations in shared memory (sq, sds): the batched mat-mat kernels' arithmetic for
// one column.
template <int KIND, int MODE>
__device__ __forceinline__ void mv_rows(const int8_t* sq, const float2* sds, int K,
                                        const uint8_t* __restrict__ qs,
                                        const float2* __restrict__ dm,
                                        const float* __restrict__ bias, int rows,
                                        float* __restrict__ out) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int nb = K / QK;
    for (int r = blockIdx.x * nw + warp; r < rows; r += gridDim.x * nw) {
        float y, u = 0.f;
        rows_dot<KIND, 1, MODE == MODE_SWIGLU ? 2 : 1>(qs, dm, r, r + rows, nb, K, sq, sds, 1,
                                                       lane, &y, &u);
        if (lane == 0) store_out<MODE>(out + r, y, u, bias, r);
    }
}

// `cn` columns quantized once (q: cn x K int8 in a KIND's layout, ds: cn x K/32 scale
// pairs; see qcols_* and qact) copied into shared memory (sq, sds) for a block.
__device__ __forceinline__ void load_cols(const int8_t* __restrict__ q,
                                          const float2* __restrict__ ds, int K, int cn,
                                          int8_t* sq, float2* sds) {
    const int4* src = (const int4*)q;
    for (int i = threadIdx.x; i < cn * K / 16; i += blockDim.x) ((int4*)sq)[i] = src[i];
    for (int i = threadIdx.x; i < cn * (K / QK); i += blockDim.x) sds[i] = ds[i];
    __syncthreads();
}

// The rows of a mat-vec in sum8.cuh's order (mv8_*, mvq8_*; defined there), and their
// prefetch (4 rows a warp).
template <int KIND, int MODE>
__device__ __forceinline__ void mv_prefetch8(const uint8_t* __restrict__ qs,
                                             const float2* __restrict__ dm, int nb, int rows);
template <int KIND, int MODE>
__device__ __forceinline__ void mv_rows8(const int8_t* sq, const float2* sds, int K,
                                         const uint8_t* __restrict__ qs,
                                         const float2* __restrict__ dm,
                                         const float* __restrict__ bias, int rows,
                                         float* __restrict__ out);

// out = W · q8(norm(x)) with an epilogue:
//   MODE_STORE:  out[r] = dot_r (+ bias[r])
//   MODE_ADD:    out[r] += dot_r          (residual add; `out` is the hidden state)
//   MODE_SWIGLU: out[r] = silu(dot_r) * dot_{r + N/2}   (gate and up rows stacked)
// Each block quantizes the activations into shared memory itself (no extra launch) or,
// given `q` and `ds` (the input quantized once by `qact`: mvq_*), copies them in — the
// same bits without every block normalizing and quantizing the f32 input, whose reads
// from L2 by hundreds of blocks cost more than the weights' on long rows; then its warps
// take rows (mv_rows, or with S8 mv_rows8: sum8.cuh's order). Dynamic shared memory:
// K + 8 * K/32 bytes.
template <int KIND, int MODE, bool S8 = false>
__device__ void matvec(const float* __restrict__ x, const float* __restrict__ norm, float eps,
                       int K, const uint8_t* __restrict__ qs, const float2* __restrict__ dm,
                       const float* __restrict__ bias, int N, float* __restrict__ out,
                       const int8_t* __restrict__ q = nullptr,
                       const float2* __restrict__ ds = nullptr) {
    DYN_SMEM(int4, smem_v);
    __shared__ float part[8];
    __shared__ float mrow[1];
    int8_t* sq = (int8_t*)smem_v;
    float2* sds = (float2*)(sq + K);
    const int rows = MODE == MODE_SWIGLU ? N / 2 : N;
    pdl_launch_dependents();
    if constexpr (S8) {
        mv_prefetch8<KIND, MODE>(qs, dm, K / QK, rows);
    } else {
        mv_prefetch<KIND, MODE>(qs, dm, K / QK, rows);
    }
    pdl_wait();
    if (q != nullptr) {
        load_cols(q, ds, K, 1, sq, sds);
    } else {
        quantize_cols<KIND>(x, norm, eps, K, 1, sq, sds, part, mrow);
    }
    if constexpr (S8) {
        mv_rows8<KIND, MODE>(sq, sds, K, qs, dm, bias, rows, out);
    } else {
        mv_rows<KIND, MODE>(sq, sds, K, qs, dm, bias, rows, out);
    }
}

// One vector (K) normalized when `norm`, quantized once for the mat-vecs that follow
// (quantize_cols' values): the nibble kinds' layout into qn and the Q8_0 one into q8
// (either may be null), the scale pairs into ds. One block of 256 threads.
extern "C" __global__ void __launch_bounds__(256)
    qact(const float* __restrict__ x, const float* __restrict__ norm, float eps, int K,
         int8_t* __restrict__ qn, int8_t* __restrict__ q8, float2* __restrict__ ds) {
    __shared__ float part[8];
    __shared__ float mrow[1];
    pdl_launch_dependents();
    pdl_wait();
    if (qn != nullptr) {
        quantize_cols<KIND_Q4_1, true>(x, norm, eps, K, 1, qn, ds, part, mrow, q8);
    } else {
        quantize_cols<KIND_Q8_0, true>(x, norm, eps, K, 1, q8, ds, part, mrow);
    }
}

// qact's values on more threads (1,024): the RMS sum by the first 256 in
// quantize_cols' order (so its bits), then four threads to a 32-block, eight values each
// (the block's amax and integer sum across the four by shuffles: a maximum and an integer
// sum, exact in any order), instead of one thread to a block on 256: the quantization's
// serial chain per thread is a quarter as long and runs on four times the warps.
extern "C" __global__ void __launch_bounds__(1024)
    qact_w(const float* __restrict__ x, const float* __restrict__ norm, float eps, int K,
           int8_t* __restrict__ qn, int8_t* __restrict__ q8, float2* __restrict__ ds) {
    __shared__ float part[8];
    __shared__ float mrow[1];
    pdl_launch_dependents();
    pdl_wait();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nb = K / QK;
    float m = 1.f;
    if (norm != nullptr) {
        if (threadIdx.x < 256) {
            // quantize_cols' ONE_WIDE sum for one column, on a block of 256.
            float s2[8];
#pragma unroll
            for (int c = 1; c < 8; ++c) s2[c] = 0.f;
            s2[0] = sumsq_one(x, K, threadIdx.x, 256);
            const float r = reduce_cols<8>(s2, lane);
            if ((lane & 3) == 0 && held_col<8>(lane) == 0) part[warp] = r;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            const float* p = part;
            const float t = ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
            mrow[0] = sqrtf(t / (float)K + eps);
        }
        __syncthreads();
        m = mrow[0];
    }
    const int sub = threadIdx.x & 3;
    // Where this thread's eight values (elements 8 sub ..) go in a nibble kind's block
    // (half-blocks together: elements 0-7, 16-23, 8-15, 24-31).
    const int nib_at = (sub & 1) * 16 + (sub >> 1) * 8;
    for (int b0 = 0; b0 < nb; b0 += blockDim.x / 4) {
        // Whole warps run every round (the shuffles need all 32 lanes).
        const int b = b0 + (threadIdx.x >> 2);
        const bool live = b < nb;
        float v[8];
        if (live) {
            const float4* src = (const float4*)(x + (size_t)b * QK + sub * 8);
            const float4 t0 = src[0], t1 = src[1];
            v[0] = t0.x; v[1] = t0.y; v[2] = t0.z; v[3] = t0.w;
            v[4] = t1.x; v[5] = t1.y; v[6] = t1.z; v[7] = t1.w;
            if (norm != nullptr) {
                const float4* gn = (const float4*)(norm + b * QK + sub * 8);
                const float4 g0 = gn[0], g1 = gn[1];
                const float g[8] = {g0.x, g0.y, g0.z, g0.w, g1.x, g1.y, g1.z, g1.w};
#pragma unroll
                for (int e = 0; e < 8; ++e) v[e] = __fmul_rn(v[e] / m, g[e]);
            }
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) v[e] = 0.f;
        }
        float amax = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(v[e]));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
        const float d = amax / 127.f;
        const float id = amax != 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        int w[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) w[e] = quant4(v + 4 * e, id, sum);
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        if (live) {
            if (qn != nullptr) *(int2*)(qn + (size_t)b * QK + nib_at) = make_int2(w[0], w[1]);
            if (q8 != nullptr) *(int2*)(q8 + (size_t)b * QK + sub * 8) = make_int2(w[0], w[1]);
            if (sub == 0) ds[b] = make_float2(round_f16(d), round_f16(__fmul_rn(d, (float)sum)));
        }
    }
}

#define MATVEC_ENTRY(KIND, KNAME, MODE, MNAME)                                              \
    extern "C" __global__ void mv_##KNAME##_##MNAME(                                        \
        const float* __restrict__ x, const float* __restrict__ norm, float eps, int K,      \
        const uint8_t* __restrict__ qs, const float2* __restrict__ dm,                      \
        const float* __restrict__ bias, int N, float* __restrict__ out) {                   \
        matvec<KIND, MODE>(x, norm, eps, K, qs, dm, bias, N, out);                          \
    }                                                                                       \
    extern "C" __global__ void mvq_##KNAME##_##MNAME(                                       \
        const int8_t* __restrict__ q, const float2* __restrict__ ds, int K,                 \
        const uint8_t* __restrict__ qs, const float2* __restrict__ dm,                      \
        const float* __restrict__ bias, int N, float* __restrict__ out) {                   \
        matvec<KIND, MODE>(nullptr, nullptr, 0.f, K, qs, dm, bias, N, out, q, ds);          \
    }

MATVEC_ENTRY(KIND_Q4_0, q4_0, MODE_STORE, store)
MATVEC_ENTRY(KIND_Q4_0, q4_0, MODE_ADD, add)
MATVEC_ENTRY(KIND_Q4_0, q4_0, MODE_SWIGLU, swiglu)
MATVEC_ENTRY(KIND_Q4_1, q4_1, MODE_STORE, store)
MATVEC_ENTRY(KIND_Q4_1, q4_1, MODE_ADD, add)
MATVEC_ENTRY(KIND_Q4_1, q4_1, MODE_SWIGLU, swiglu)
MATVEC_ENTRY(KIND_Q8_0, q8_0, MODE_STORE, store)
MATVEC_ENTRY(KIND_Q8_0, q8_0, MODE_ADD, add)
MATVEC_ENTRY(KIND_Q8_0, q8_0, MODE_SWIGLU, swiglu)
MATVEC_ENTRY(KIND_Q4_K, q4_k, MODE_STORE, store)
MATVEC_ENTRY(KIND_Q4_K, q4_k, MODE_ADD, add)
MATVEC_ENTRY(KIND_Q4_K, q4_k, MODE_SWIGLU, swiglu)

// x = embedding row of the step's token (f32 table, `hidden` wide).
extern "C" __global__ void embed_row(const unsigned long long* __restrict__ step,
                                     const float* __restrict__ table, int hidden,
                                     float* __restrict__ x) {
    pdl_launch_dependents();
    pdl_wait();
    const size_t t = (size_t)step[STEP_TOKEN];
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < hidden; i += gridDim.x * blockDim.x)
        x[i] = table[t * hidden + i];
}

#include "attn.cuh"

// Scores q·K_j * scale of positions j0 <= j < j1 into sc (a thread per position; the
// new position `pos` from kn), the dot product in eight lanes (element i in lane i % 8,
// fused multiply-adds, ggml's lane reduction) as the CPU path does it; the thread's max.
__device__ __forceinline__ float att_scores(const float* q, const float* kn,
                                            const __half* __restrict__ kc, int hd, float scale,
                                            float* __restrict__ sc, int pos, int j0, int j1) {
    const int nc = hd / 8;
    float mx = -INFINITY;
    for (int j = j0 + (int)threadIdx.x; j < j1; j += blockDim.x) {
        float acc[8];
#pragma unroll
        for (int l = 0; l < 8; ++l) acc[l] = 0.f;
        if (j == pos) {
            for (int c = 0; c < nc; ++c) {
#pragma unroll
                for (int l = 0; l < 8; ++l) acc[l] = fmaf(q[c * 8 + l], kn[c * 8 + l], acc[l]);
            }
        } else {
            const uint4* kr = (const uint4*)(kc + (size_t)j * hd);
#pragma unroll 8
            for (int c = 0; c < nc; ++c) {
                const uint4 raw = kr[c];
                const __half2* hv = (const __half2*)&raw;
#pragma unroll
                for (int l = 0; l < 4; ++l) {
                    const float2 f = __half22float2(hv[l]);
                    acc[2 * l] = fmaf(q[c * 8 + 2 * l], f.x, acc[2 * l]);
                    acc[2 * l + 1] = fmaf(q[c * 8 + 2 * l + 1], f.y, acc[2 * l + 1]);
                }
            }
        }
        const float s = (((acc[0] + acc[4]) + (acc[2] + acc[6])) +
                         ((acc[1] + acc[5]) + (acc[3] + acc[7]))) * scale;
        sc[j] = s;
        mx = fmaxf(mx, s);
    }
    return mx;
}

// dst[d] = sum over j0 <= j < j1 of sc[j] * V_j[d] (the new position's V from vn): each
// thread takes 8 dimensions (one 16-byte load) of every G-th position, the G partial
// sums (in pm: G * hd floats) added at the end in order. The weights in sc must be
// visible to the block (a barrier after they are written).
__device__ __forceinline__ void att_weighted_v(const float* __restrict__ sc, const float* vn,
                                               const __half* __restrict__ vc, int hd, int pos,
                                               int j0, int j1, float* pm,
                                               float* __restrict__ dst) {
    const int tid = threadIdx.x, bd = blockDim.x, nc = hd / 8;
    const int c = tid % nc, gi = tid / nc, ng = bd / nc;
    float acc[8];
#pragma unroll
    for (int l = 0; l < 8; ++l) acc[l] = 0.f;
#pragma unroll 4
    for (int j = j0 + gi; j < j1; j += ng) {
        const float w = sc[j];
        if (j == pos) {
#pragma unroll
            for (int l = 0; l < 8; ++l) acc[l] = fmaf(w, vn[c * 8 + l], acc[l]);
        } else {
            const uint4 raw = ((const uint4*)(vc + (size_t)j * hd))[c];
            const __half2* hv = (const __half2*)&raw;
#pragma unroll
            for (int l = 0; l < 4; ++l) {
                const float2 f = __half22float2(hv[l]);
                acc[2 * l] = fmaf(w, f.x, acc[2 * l]);
                acc[2 * l + 1] = fmaf(w, f.y, acc[2 * l + 1]);
            }
        }
    }
#pragma unroll
    for (int l = 0; l < 8; ++l) pm[gi * hd + c * 8 + l] = acc[l];
    __syncthreads();
    for (int d = tid; d < hd; d += bd) {
        float o = 0.f;
        for (int p = 0; p < ng; ++p) o += pm[p * hd + d];
        dst[d] = o;
    }
}

// One head's split attention (see attend): this block's chunks, then the combination
// by whichever block finishes the head's last. q, kn, vn: the RoPE'd query, new key and
// value (f16-rounded) in shared memory; sc: the head's scores row; pm: room for
// (blockDim.x / (hd / 8)) * hd floats; red: 32 floats.
__device__ void attend_chunks(const float* q, const float* kn, const float* vn,
                              const __half* __restrict__ kc, const __half* __restrict__ vc,
                              int hd, float scale, float* __restrict__ sc, int pos, int clen,
                              int n_c, float* __restrict__ out, int chunk0, int cstep,
                              float* __restrict__ hp, unsigned* __restrict__ hc, float* pm,
                              float* red) {
    __shared__ unsigned last;
    const int tid = threadIdx.x, bd = blockDim.x;
    const int len = pos + 1;
    unsigned done = 0;
    for (int ch = chunk0; ch < n_c; ch += cstep) {
        const int j0 = ch * clen, j1 = min(len, j0 + clen);
        const float mx = block_reduce(att_scores(q, kn, kc, hd, scale, sc, pos, j0, j1), red, true);
        float sum = 0.f;
        for (int j = j0 + tid; j < j1; j += bd) {
            const float e = expf(sc[j] - mx);
            sc[j] = round_f16(e);
            sum += e;
        }
        sum = block_reduce(sum, red, false);  // its barriers order the weights' writes too
        float* cp = hp + (size_t)ch * (hd + 2);
        att_weighted_v(sc, vn, vc, hd, pos, j0, j1, pm, cp);
        if (tid == 0) {
            cp[hd] = mx;
            cp[hd + 1] = sum;
        }
        __syncthreads();  // pm is free again
        ++done;
    }
    // The ticket: the block that brings the head's count to n_c combines.
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(hc, done) + done == (unsigned)n_c;
    __syncthreads();
    if (!last) return;
    att_combine(hp, n_c, hd, out, hc);
}

// One block per query head: RoPE on Q and on the new K (at the step's position), the
// new K/V rounded to f16 and written to the cache (by the first query head of each KV
// group), then softmax(q·K^T * scale)·V over positions 0..=pos of the f16 cache, with
// ggml's flash-attention rounding (Q and the softmax weights to f16). The new position's
// K/V come from shared memory, so no block reads a cache slot written in this launch
// (without `write` the slot was written by an earlier launch, kv_write_b, with the same
// values).
// Scores: one thread per position, the dot product in eight lanes (element i in lane
// i % 8, fused multiply-adds, ggml's lane reduction) as the CPU path does it. Weighted
// V: each thread takes 8 dimensions (one 16-byte load) of every G-th position, and the
// G partial sums are added at the end. head_dim % 8 == 0, head_dim <= 256; `scores`
// holds ctx floats per head. Dynamic shared memory: (3 * hd + 8 * blockDim.x) floats.
// The body, shared with the batched kernel: query head `h` of the sequence whose step
// record is `step` (its qkv row, scores and output row already offset).
__device__ __forceinline__ void attend(const float* __restrict__ qkv,
                                       const unsigned long long* __restrict__ step, int layer,
                                       int n_layers, int nh, int nkvh, int hd,
                                       const float* __restrict__ cos_t,
                                       const float* __restrict__ sin_t, int neox, float scale,
                                       float* __restrict__ scores, int ctx,
                                       float* __restrict__ out, int h, bool write, int chunk0,
                                       int cstep, int nch, float* __restrict__ cpart,
                                       unsigned* __restrict__ cnt) {
    DYN_SMEM(float, sm);
    __shared__ float red[32];
    float* q = sm;
    float* kn = sm + hd;
    float* vn = sm + 2 * hd;
    float* part = sm + 3 * hd;
    const int group = nh / nkvh;
    const int g = h / group;
    const AttSpan a = att_span(step, layer, n_layers, g, hd, nch);
    if (chunk0 >= a.n_c) return;  // the whole block: this length has no such chunk
    const int pos = a.pos, len = a.len, clen = a.clen, n_c = a.n_c;
    __half* kc = a.kc;
    __half* vc = a.vc;
    att_new_qkv(qkv, h, 1, g, nh, nkvh, hd, cos_t, sin_t, neox, pos, q, kn, vn,
                write && h % group == 0 && chunk0 == 0, kc, vc);
    const int tid = threadIdx.x, bd = blockDim.x;
    if (n_c > 1) {
        attend_chunks(q, kn, vn, kc, vc, hd, scale, scores + (size_t)h * ctx, pos, clen, n_c,
                      out + h * hd, chunk0, cstep, cpart + (size_t)h * nch * (hd + 2),
                      cnt + h, part, red);
        return;
    }
    float* sc = scores + (size_t)h * ctx;
    const float mx = block_reduce(att_scores(q, kn, kc, hd, scale, sc, pos, 0, len), red, true);
    float sum = 0.f;
    for (int j = tid; j < len; j += bd) {
        const float e = expf(sc[j] - mx);
        sc[j] = e;
        sum += e;
    }
    sum = block_reduce(sum, red, false);
    for (int j = tid; j < len; j += bd) sc[j] = round_f16(sc[j] / sum);
    __syncthreads();
    att_weighted_v(sc, vn, vc, hd, pos, 0, len, part, out + h * hd);
}

// Grouped attention: the same arithmetic as `attend`, for `ng` (at most ATT_GROUP_MAX)
// query heads h0.. of one KV group in one block, so that each cached K and V row is
// read once for all of them instead of once per head. Every head's scores, maxima,
// sums, weights, weighted-V partial sums and chunk combination are computed by the same
// operations in the same order as `attend` computes them for that head alone (the same
// threads take the same positions; the block reductions run head by head), so the
// results are bit-identical to the per-head kernels' (checked on an H100 by `candela
// doctor` with CANDELA_CUDA_ATT_GROUP=1, groups of 3, 4 and 4 + 3 heads).
// Dynamic shared memory:
// (ATT_GROUP_MAX + 2) * hd + ATT_GROUP_MAX * 8 * blockDim.x floats.
#define ATT_GROUP_MAX 4

// att_scores for heads q + h * hd (h < ng): their rows of sc are `ctx` apart; each
// head's thread max goes to mx[h].
__device__ __forceinline__ void att_scores_g(const float* q, int ng, const float* kn,
                                             const __half* __restrict__ kc, int hd,
                                             float scale, float* __restrict__ sc, int ctx,
                                             int pos, int j0, int j1, float* mx) {
    const int nc = hd / 8;
#pragma unroll
    for (int h = 0; h < ATT_GROUP_MAX; ++h) mx[h] = -INFINITY;
    for (int j = j0 + (int)threadIdx.x; j < j1; j += blockDim.x) {
        float acc[ATT_GROUP_MAX][8];
#pragma unroll
        for (int h = 0; h < ATT_GROUP_MAX; ++h)
#pragma unroll
            for (int l = 0; l < 8; ++l) acc[h][l] = 0.f;
        if (j == pos) {
            for (int c = 0; c < nc; ++c) {
#pragma unroll
                for (int h = 0; h < ATT_GROUP_MAX; ++h) {
                    if (h >= ng) break;
#pragma unroll
                    for (int l = 0; l < 8; ++l)
                        acc[h][l] = fmaf(q[h * hd + c * 8 + l], kn[c * 8 + l], acc[h][l]);
                }
            }
        } else {
            const uint4* kr = (const uint4*)(kc + (size_t)j * hd);
#pragma unroll 4
            for (int c = 0; c < nc; ++c) {
                const uint4 raw = kr[c];
                const __half2* hv = (const __half2*)&raw;
#pragma unroll
                for (int l = 0; l < 4; ++l) {
                    const float2 f = __half22float2(hv[l]);
#pragma unroll
                    for (int h = 0; h < ATT_GROUP_MAX; ++h) {
                        if (h >= ng) break;
                        const float* qh = q + h * hd + c * 8;
                        acc[h][2 * l] = fmaf(qh[2 * l], f.x, acc[h][2 * l]);
                        acc[h][2 * l + 1] = fmaf(qh[2 * l + 1], f.y, acc[h][2 * l + 1]);
                    }
                }
            }
        }
#pragma unroll
        for (int h = 0; h < ATT_GROUP_MAX; ++h) {
            if (h >= ng) break;
            const float s = (((acc[h][0] + acc[h][4]) + (acc[h][2] + acc[h][6])) +
                             ((acc[h][1] + acc[h][5]) + (acc[h][3] + acc[h][7]))) * scale;
            sc[(size_t)h * ctx + j] = s;
            mx[h] = fmaxf(mx[h], s);
        }
    }
}

// att_weighted_v for heads h < ng (weights in sc rows `ctx` apart, results to
// dst + h * dstride); pm holds ng * 8 * blockDim.x floats.
__device__ __forceinline__ void att_weighted_v_g(const float* __restrict__ sc, int ctx, int ng,
                                                 const float* vn,
                                                 const __half* __restrict__ vc, int hd,
                                                 int pos, int j0, int j1, float* pm,
                                                 float* __restrict__ dst, size_t dstride) {
    const int tid = threadIdx.x, bd = blockDim.x, nc = hd / 8;
    const int c = tid % nc, gi = tid / nc, ngp = bd / nc;
    float acc[ATT_GROUP_MAX][8];
#pragma unroll
    for (int h = 0; h < ATT_GROUP_MAX; ++h)
#pragma unroll
        for (int l = 0; l < 8; ++l) acc[h][l] = 0.f;
#pragma unroll 2
    for (int j = j0 + gi; j < j1; j += ngp) {
        if (j == pos) {
#pragma unroll
            for (int h = 0; h < ATT_GROUP_MAX; ++h) {
                if (h >= ng) break;
                const float w = sc[(size_t)h * ctx + j];
#pragma unroll
                for (int l = 0; l < 8; ++l) acc[h][l] = fmaf(w, vn[c * 8 + l], acc[h][l]);
            }
        } else {
            const uint4 raw = ((const uint4*)(vc + (size_t)j * hd))[c];
            const __half2* hv = (const __half2*)&raw;
            float w[ATT_GROUP_MAX];
#pragma unroll
            for (int h = 0; h < ATT_GROUP_MAX; ++h) w[h] = h < ng ? sc[(size_t)h * ctx + j] : 0.f;
#pragma unroll
            for (int l = 0; l < 4; ++l) {
                const float2 f = __half22float2(hv[l]);
#pragma unroll
                for (int h = 0; h < ATT_GROUP_MAX; ++h) {
                    if (h >= ng) break;
                    acc[h][2 * l] = fmaf(w[h], f.x, acc[h][2 * l]);
                    acc[h][2 * l + 1] = fmaf(w[h], f.y, acc[h][2 * l + 1]);
                }
            }
        }
    }
    const int ph = ngp * hd;  // one head's partial sums
#pragma unroll
    for (int h = 0; h < ATT_GROUP_MAX; ++h) {
        if (h >= ng) break;
#pragma unroll
        for (int l = 0; l < 8; ++l) pm[h * ph + gi * hd + c * 8 + l] = acc[h][l];
    }
    __syncthreads();
    for (int h = 0; h < ng; ++h) {
        for (int d = tid; d < hd; d += bd) {
            float o = 0.f;
            for (int p = 0; p < ngp; ++p) o += pm[h * ph + p * hd + d];
            dst[h * dstride + d] = o;
        }
    }
}

// `attend` for query heads h0 .. h0 + ng - 1 (one KV group's, ng <= ATT_GROUP_MAX);
// `write`: this block writes the new K/V (the first block of the group's first heads).
__device__ void attend_group(const float* __restrict__ qkv,
                             const unsigned long long* __restrict__ step, int layer,
                             int n_layers, int nh, int nkvh, int hd,
                             const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                             int neox, float scale, float* __restrict__ scores, int ctx,
                             float* __restrict__ out, int h0, int ng, bool write, int chunk0,
                             int cstep, int nch, float* __restrict__ cpart,
                             unsigned* __restrict__ cnt) {
    DYN_SMEM(float, sm);
    __shared__ float red[32];
    __shared__ unsigned last[ATT_GROUP_MAX];
    float* q = sm;
    float* kn = sm + ATT_GROUP_MAX * hd;
    float* vn = kn + hd;
    float* pm = vn + hd;
    const int group = nh / nkvh;
    const int g = h0 / group;
    const AttSpan a = att_span(step, layer, n_layers, g, hd, nch);
    if (chunk0 >= a.n_c) return;  // the whole block: this length has no such chunk
    const int pos = a.pos, len = a.len, clen = a.clen, n_c = a.n_c;
    __half* kc = a.kc;
    __half* vc = a.vc;
    att_new_qkv(qkv, h0, ng, g, nh, nkvh, hd, cos_t, sin_t, neox, pos, q, kn, vn,
                write && chunk0 == 0, kc, vc);
    const int tid = threadIdx.x, bd = blockDim.x;
    float* sc = scores + (size_t)h0 * ctx;
    float mx[ATT_GROUP_MAX], sum[ATT_GROUP_MAX];
    if (n_c == 1) {
        att_scores_g(q, ng, kn, kc, hd, scale, sc, ctx, pos, 0, len, mx);
#pragma unroll
        for (int h = 0; h < ATT_GROUP_MAX; ++h) {
            if (h >= ng) break;  // ng is the same for the whole block
            mx[h] = block_reduce(mx[h], red, true);
        }
#pragma unroll
        for (int h = 0; h < ATT_GROUP_MAX; ++h) sum[h] = 0.f;
        for (int j = tid; j < len; j += bd) {
#pragma unroll
            for (int h = 0; h < ATT_GROUP_MAX; ++h) {
                if (h >= ng) break;
                const float e = expf(sc[(size_t)h * ctx + j] - mx[h]);
                sc[(size_t)h * ctx + j] = e;
                sum[h] += e;
            }
        }
#pragma unroll
        for (int h = 0; h < ATT_GROUP_MAX; ++h) {
            if (h >= ng) break;  // ng is the same for the whole block
            sum[h] = block_reduce(sum[h], red, false);
        }
        for (int j = tid; j < len; j += bd) {
#pragma unroll
            for (int h = 0; h < ATT_GROUP_MAX; ++h) {
                if (h >= ng) break;
                sc[(size_t)h * ctx + j] = round_f16(sc[(size_t)h * ctx + j] / sum[h]);
            }
        }
        __syncthreads();
        att_weighted_v_g(sc, ctx, ng, vn, vc, hd, pos, 0, len, pm, out + (size_t)h0 * hd, hd);
        return;
    }
    const size_t hstride = (size_t)nch * (hd + 2);  // a head's chunk slots
    float* hp = cpart + (size_t)h0 * hstride;
    unsigned done = 0;
    for (int ch = chunk0; ch < n_c; ch += cstep) {
        const int j0 = ch * clen, j1 = min(len, j0 + clen);
        att_scores_g(q, ng, kn, kc, hd, scale, sc, ctx, pos, j0, j1, mx);
#pragma unroll
        for (int h = 0; h < ATT_GROUP_MAX; ++h) {
            if (h >= ng) break;  // ng is the same for the whole block
            mx[h] = block_reduce(mx[h], red, true);
        }
#pragma unroll
        for (int h = 0; h < ATT_GROUP_MAX; ++h) sum[h] = 0.f;
        for (int j = j0 + tid; j < j1; j += bd) {
#pragma unroll
            for (int h = 0; h < ATT_GROUP_MAX; ++h) {
                if (h >= ng) break;
                const float e = expf(sc[(size_t)h * ctx + j] - mx[h]);
                sc[(size_t)h * ctx + j] = round_f16(e);
                sum[h] += e;
            }
        }
        // Their barriers order the weights' writes too.
#pragma unroll
        for (int h = 0; h < ATT_GROUP_MAX; ++h) {
            if (h >= ng) break;  // ng is the same for the whole block
            sum[h] = block_reduce(sum[h], red, false);
        }
        float* cp = hp + (size_t)ch * (hd + 2);
        att_weighted_v_g(sc, ctx, ng, vn, vc, hd, pos, j0, j1, pm, cp, hstride);
        if (tid == 0) {
#pragma unroll
            for (int h = 0; h < ATT_GROUP_MAX; ++h) {
                if (h >= ng) break;
                cp[h * hstride + hd] = mx[h];
                cp[h * hstride + hd + 1] = sum[h];
            }
        }
        __syncthreads();  // pm is free again
        ++done;
    }
    att_tickets_combine(hp, hstride, n_c, hd, out + (size_t)h0 * hd, cnt + h0, ng, done, last);
}

// Grid nh * nch: head blockIdx.x / nch, chunk blockIdx.x % nch (see attend).
extern "C" __global__ void attention(const float* __restrict__ qkv,
                                     const unsigned long long* __restrict__ step, int layer,
                                     int n_layers, int nh, int nkvh, int hd,
                                     const float* __restrict__ cos_t,
                                     const float* __restrict__ sin_t, int neox, float scale,
                                     float* __restrict__ scores, int ctx,
                                     float* __restrict__ out, int nch, float* __restrict__ part,
                                     unsigned* __restrict__ cnt) {
    pdl_launch_dependents();
    pdl_wait();
    attend(qkv, step, layer, n_layers, nh, nkvh, hd, cos_t, sin_t, neox, scale, scores, ctx,
           out, blockIdx.x / nch, true, blockIdx.x % nch, nch, nch, part, cnt);
}

#include "batch.cuh"
#include "attn_tc.cuh"
#include "prefill.cuh"
#include "tc.cuh"
#include "sum8.cuh"
