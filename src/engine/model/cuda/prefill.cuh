// Wide prefill kernels: a long prompt chunk of one sequence (T consecutive positions) as
// a GEMM per projection on tensor cores (included by decode.cu).
//
// quant_rows quantizes the T rows of activations once into global memory (quantize_cols'
// arithmetic and layout, 8 rows per block); gemm_* then multiply them with a weight
// matrix by int8 mma (m16n8k16: one 16-element half-block of 16 weight rows against 8
// token rows), applying each half-block's scales to its integer sums in f32 — the
// single-stream kernels' per-half-block arithmetic, summed in K order per output rather
// than split over lanes, so results agree with the decode kernels to rounding. The
// attention runs in flash.cu's kernel on Q rows roped by q_rope_rows. Needs sm_80 (the
// host side checks); older cards prefill long prompts on the tensor path.

#include "mma.cuh"

#define PF_ROWS 8      // activation rows a quant_rows block takes
#define GEMM_ROWS 64   // weight rows (outputs) of a gemm block: 16 per warp
#define GEMM_TOKS 32   // token rows of a gemm block: 4 tiles of 8

// xq (T, K) int8 and xds (T, K/32) pairs of the T rows of x (rows K floats apart),
// RMS-normalized first when `norm`; grid ceil(T / PF_ROWS), 256 threads.
template <int KIND>
__device__ void quant_rows(const float* __restrict__ x, const float* __restrict__ norm, float eps,
                           int K, int T, int8_t* __restrict__ xq, float2* __restrict__ xds) {
    __shared__ float part[PF_ROWS * 8];
    __shared__ float mrow[PF_ROWS];
    const int r0 = blockIdx.x * PF_ROWS;
    const int cn = min(PF_ROWS, T - r0);
    if (cn <= 0) return;
    quantize_cols<KIND>(x + (size_t)r0 * K, norm, eps, K, cn, xq + (size_t)r0 * K,
                        xds + (size_t)r0 * (K / QK), part, mrow);
}

#if __CUDA_ARCH__ >= 800 && !defined(CANDELA_EMU)
// c (16x8, s32) = a (16x16, s8, row) * b (16x8, s8, col).
__device__ __forceinline__ void mma_s8(int* c, int a0, int a1, int b0) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%7,%7,%7,%7};\n"
        : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
        : "r"(a0), "r"(a1), "r"(b0), "r"(0));
}
#endif

// A nibble kind's A-fragment word from the 4 bytes h*8 + 4*(t&1).. of its half-block's
// row: the low (t < 2) or high nibbles, Q4_0's offset by -8.
template <int KIND>
__device__ __forceinline__ int nibble_word(unsigned w, int t) {
    const unsigned nib = (w >> (4 * (t >> 1))) & 0x0f0f0f0fu;
    return KIND == KIND_Q4_0 ? (int)__vsub4(nib, 0x08080808u) : (int)nib;
}

// The A-fragment word of weight row `row` for half-block h of block b: k = 4t..4t+3 of
// the half-block in the order its activations are stored (quantize_cols): for nibble
// kinds elements h*8..h*8+7 (low nibbles of bytes h*8..h*8+7) then 16+h*8..16+h*8+7 (their
// high nibbles); for KIND_Q8_0 bytes h*16..h*16+15. Q4_0's nibbles come offset by -8.
template <int KIND>
__device__ __forceinline__ int a_word(const uint8_t* __restrict__ qs, int nb, int row, int b,
                                      int h, int t) {
    if (KIND == KIND_Q8_0) {
        return __ldg((const int*)(qs + ((size_t)row * nb + b) * 32 + h * 16 + 4 * t));
    }
    return nibble_word<KIND>(
        __ldg((const unsigned*)(qs + ((size_t)row * nb + b) * 16 + h * 8 + 4 * (t & 1))), t);
}

// a_word from a block's bytes staged in shared memory (`wb`: the block's values as in qs).
template <int KIND>
__device__ __forceinline__ int a_word_staged(const uint8_t* wb, int h, int t) {
    if (KIND == KIND_Q8_0) return *(const int*)(wb + h * 16 + 4 * t);
    return nibble_word<KIND>(*(const unsigned*)(wb + h * 8 + 4 * (t & 1)), t);
}

// (float)c for |c| < 2^22 (every sum of an mma here), without the conversion unit (I2F
// runs at an eighth of the FP32 rate on Hopper, and the mat-mats convert every output's
// sum of every block): c added to the bits of 1.5 * 2^23 gives the float 1.5 * 2^23 + c,
// and taking 1.5 * 2^23 away leaves c; both steps are exact, so the bits are (float)c's.
__device__ __forceinline__ float i2f_exact(int c) {
    return __fsub_rn(__int_as_float(0x4B400000 + c), 12582912.f);
}

// One mma accumulator's f32 steps for half-block h, rows_dot's to the bit: z += (weight
// scale * activation scale) * the integer sum c, and for the kinds with an offset, once a
// block (h == 0), weight offset * activation sum term. w: the weight's (scale, offset) or
// Q8_0's two half scales; x: the activations' (scale, scale * sum).
template <int KIND>
__device__ __forceinline__ void mma_scale_add(float& z, float2 w, float2 x, int h, int c) {
    const float wd = KIND == KIND_Q8_0 ? (h ? w.y : w.x) : w.x;
    z = __fmaf_rn(__fmul_rn(wd, x.x), i2f_exact(c), z);
    if ((KIND == KIND_Q4_1 || KIND == KIND_Q4_K) && h == 0) z = __fmaf_rn(w.y, x.y, z);
}

// out(T, ld) rows of tokens: out[tok][r] for the weight's rows r (MODE_SWIGLU: gate rows
// 0..rows/2, up rows after them, out[tok][r] = silu(gate_r) * up_r). Grid
// (ceil(rows / GEMM_ROWS), ceil(T / GEMM_TOKS)), 128 threads.
template <int KIND, int MODE>
__device__ void gemm(const int8_t* __restrict__ xq, const float2* __restrict__ xds, int K, int T,
                     const uint8_t* __restrict__ qs, const float2* __restrict__ dm,
                     const float* __restrict__ bias, int Nrows, float* __restrict__ out, int ld) {
#if __CUDA_ARCH__ >= 800
    constexpr int R = MODE == MODE_SWIGLU ? 2 : 1;
    constexpr int NT = GEMM_TOKS / 8;
    const int nb = K / QK;
    const int rows = MODE == MODE_SWIGLU ? Nrows / 2 : Nrows;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int r0 = blockIdx.x * GEMM_ROWS + warp * 16;
    const int tok0 = blockIdx.y * GEMM_TOKS;
    if (r0 >= rows) return;
    // This lane's weight rows (g and g + 8 of the warp's 16, for each of R matrices) and
    // token rows (those of b-fragment words, and of the accumulators it holds).
    int wr[R][2];
    bool wok[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = r0 + g + 8 * i;
        wok[i] = r < rows;
#pragma unroll
        for (int m = 0; m < R; ++m) wr[m][i] = (wok[i] ? r : r0) + m * rows;
    }
    float acc[R][NT][4];
#pragma unroll
    for (int m = 0; m < R; ++m)
#pragma unroll
        for (int j = 0; j < NT; ++j) acc[m][j][0] = acc[m][j][1] = acc[m][j][2] = acc[m][j][3] = 0.f;
    for (int b = 0; b < nb; ++b) {
        float2 sc[R][2];
#pragma unroll
        for (int m = 0; m < R; ++m)
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                if (KIND == KIND_Q8_0) {
                    sc[m][i] = __ldg(dm + (size_t)wr[m][i] * nb + b);
                } else {
                    const uint8_t* srow = (const uint8_t*)dm + (size_t)wr[m][i] * scale_bytes<KIND>(nb);
                    sc[m][i] = nibble_pair<KIND>(dm + (size_t)wr[m][i] * nb, srow, nb, b);
                }
            }
        float2 xd[NT][2];
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int tok = min(tok0 + j * 8 + 2 * t + e, T - 1);
                xd[j][e] = xds[(size_t)tok * nb + b];
            }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            int bw[NT];
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int tok = min(tok0 + j * 8 + g, T - 1);
                bw[j] = *(const int*)(xq + (size_t)tok * K + b * QK + h * 16 + 4 * t);
            }
#pragma unroll
            for (int m = 0; m < R; ++m) {
                const int a0 = a_word<KIND>(qs, nb, wr[m][0], b, h, t);
                const int a1 = a_word<KIND>(qs, nb, wr[m][1], b, h, t);
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    int c[4];
                    mma_s8(c, a0, a1, bw[j]);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        mma_scale_add<KIND>(acc[m][j][e], sc[m][e >> 1], xd[j][e & 1], h, c[e]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = r0 + g + 8 * (e >> 1);
            const int tok = tok0 + j * 8 + 2 * t + (e & 1);
            if (r >= rows || tok >= T) continue;
            store_out<MODE>(out + (size_t)tok * ld + r, acc[0][j][e], acc[R - 1][j][e], bias, r);
        }
#else
    __trap();
#endif
}

#define PREFILL_ENTRY(KIND, KNAME)                                                           \
    extern "C" __global__ void __launch_bounds__(256) quant_rows_##KNAME(                     \
        const float* __restrict__ x, const float* __restrict__ norm, float eps, int K, int T, \
        int8_t* __restrict__ xq, float2* __restrict__ xds) {                                  \
        quant_rows<KIND>(x, norm, eps, K, T, xq, xds);                                        \
    }                                                                                        \
    GEMM_ENTRY(KIND, KNAME, MODE_STORE, store)                                               \
    GEMM_ENTRY(KIND, KNAME, MODE_ADD, add)                                                   \
    GEMM_ENTRY(KIND, KNAME, MODE_SWIGLU, swiglu)

#define GEMM_ENTRY(KIND, KNAME, MODE, MNAME)                                                 \
    extern "C" __global__ void __launch_bounds__(128) gemm_##KNAME##_##MNAME(                 \
        const int8_t* __restrict__ xq, const float2* __restrict__ xds, int K, int T,          \
        const uint8_t* __restrict__ qs, const float2* __restrict__ dm,                        \
        const float* __restrict__ bias, int N, float* __restrict__ out, int ld) {             \
        gemm<KIND, MODE>(xq, xds, K, T, qs, dm, bias, N, out, ld);                            \
    }

PREFILL_ENTRY(KIND_Q4_0, q4_0)
PREFILL_ENTRY(KIND_Q4_1, q4_1)
PREFILL_ENTRY(KIND_Q8_0, q8_0)
PREFILL_ENTRY(KIND_Q4_K, q4_k)

// qr (T, nh * hd): the T rows' queries (from qkv rows, `qkv_w` floats apart) with RoPE at
// their positions pos0 + row, as attend computes them. Grid (nh, T), 64 threads.
extern "C" __global__ void q_rope_rows(const float* __restrict__ qkv, int qkv_w, int pos0,
                                       int nh, int hd, const float* __restrict__ cos_t,
                                       const float* __restrict__ sin_t, int neox,
                                       float* __restrict__ qr) {
    const int h = blockIdx.x, row = blockIdx.y;
    const int half = hd / 2;
    const float* q = qkv + (size_t)row * qkv_w + h * hd;
    float* o = qr + (size_t)row * nh * hd + h * hd;
    const float* cs = cos_t + (size_t)(pos0 + row) * half;
    const float* sn = sin_t + (size_t)(pos0 + row) * half;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const int a = neox ? i : 2 * i;
        const int b = neox ? i + half : 2 * i + 1;
        const float c = cs[i], s = sn[i];
        const float x0 = q[a], x1 = q[b];
        o[a] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
        o[b] = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
    }
}

// ---------------------------------------------------------------------------------------
// Wide prefill on f16 GEMMs (wide.rs, `WideGemm::F16`, the default; the int8 GEMMs above
// read weights straight from global memory for every 32 rows and scale every 16-value
// half-block's sum in f32, which measured slower at every size): a pass dequantizes each projection's
// weights into an f16 matrix, converts its input rows to f16 (RMS-normalized first where
// the layer norms them) and multiplies the two with cublasGemmEx (f16 in, f32 sums and
// out); SwiGLU and the Q|K|V bias run after it. The activations are rounded to f16 rather
// than quantized to 8 bits, so results agree with the decode kernels to rounding.

// xh (T, K) f16 from x (T, K) f32, each row RMS-normalized by `norm` first unless null
// (the decode kernels' v / sqrt(mean(v^2) + eps) * g). Grid T, 256 threads.
extern "C" __global__ void __launch_bounds__(256) wh_rows(const float* __restrict__ x,
                                                        const float* __restrict__ norm,
                                                        float eps, int K,
                                                        __half* __restrict__ xh) {
    __shared__ float red[32];
    const float* xr = x + (size_t)blockIdx.x * K;
    __half* o = xh + (size_t)blockIdx.x * K;
    float m = 1.f;
    if (norm != nullptr) {
        const float s = block_reduce(sumsq_one(xr, K, threadIdx.x, blockDim.x), red, false);
        m = sqrtf(s / (float)K + eps);
    }
    for (int i = threadIdx.x; i < K; i += blockDim.x) {
        const float v = norm != nullptr ? __fmul_rn(xr[i] / m, norm[i]) : xr[i];
        o[i] = __float2half_rn(v);
    }
}

// The 32 values of block i (row i / nb, block i % nb) of a repacked matrix, in f16.
template <int KIND>
__device__ __forceinline__ void dequant_block(const uint8_t* __restrict__ qs,
                                              const float2* __restrict__ dm, int nb, size_t i,
                                              __half (&out)[QK]) {
    if (KIND == KIND_Q8_0) {
        const float2 s = __ldg(dm + i);
        __align__(16) int8_t q[QK];
        ((int4*)q)[0] = __ldg((const int4*)(qs + i * QK));
        ((int4*)q)[1] = __ldg((const int4*)(qs + i * QK) + 1);
#pragma unroll
        for (int j = 0; j < QK; ++j) out[j] = __float2half_rn((j < 16 ? s.x : s.y) * (float)q[j]);
    } else {
        const int row = (int)(i / nb), b = (int)(i % nb);
        const uint8_t* srow = (const uint8_t*)dm + (size_t)row * scale_bytes<KIND>(nb);
        const float2 s = nibble_pair<KIND>(dm + (size_t)row * nb, srow, nb, b);
        __align__(16) uint8_t q[16];
        *(int4*)q = __ldg((const int4*)(qs + i * 16));
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const int lo = q[j] & 15, hi = q[j] >> 4;
            if (KIND == KIND_Q4_0) {
                out[j] = __float2half_rn(s.x * (float)(lo - 8));
                out[16 + j] = __float2half_rn(s.x * (float)(hi - 8));
            } else {
                out[j] = __float2half_rn(__fmaf_rn(s.x, (float)lo, s.y));
                out[16 + j] = __float2half_rn(__fmaf_rn(s.x, (float)hi, s.y));
            }
        }
    }
}

// w (N, K) f16 from a repacked matrix: thread i takes block i (row i / nb, block i % nb)
// and writes its 32 values. Grid ceil(N * nb / 256), 256 threads.
template <int KIND>
__device__ void wh_dequant(const uint8_t* __restrict__ qs, const float2* __restrict__ dm, int N,
                           int nb, __half* __restrict__ w) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * nb) return;
    __align__(16) __half out[QK];
    dequant_block<KIND>(qs, dm, nb, i, out);
    int4* dst = (int4*)(w + i * QK);
#pragma unroll
    for (int e = 0; e < 4; ++e) dst[e] = ((const int4*)out)[e];
}

#define WH_DEQUANT(KIND, KNAME)                                                              \
    extern "C" __global__ void __launch_bounds__(256) wh_dequant_##KNAME(                     \
        const uint8_t* __restrict__ qs, const float2* __restrict__ dm, int N, int nb,         \
        __half* __restrict__ w) {                                                            \
        wh_dequant<KIND>(qs, dm, N, nb, w);                                                   \
    }
WH_DEQUANT(KIND_Q4_0, q4_0)
WH_DEQUANT(KIND_Q4_1, q4_1)
WH_DEQUANT(KIND_Q8_0, q8_0)
WH_DEQUANT(KIND_Q4_K, q4_k)

// act (T, F) f16 = silu(gate) * up from gu (T, 2F) f32 (gate columns 0..F, up after them),
// store_out's arithmetic. Grid (ceil(F / 256), T), 256 threads.
extern "C" __global__ void __launch_bounds__(256) wh_swiglu(const float* __restrict__ gu, int F,
                                                          __half* __restrict__ act) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= F) return;
    const float* r = gu + (size_t)blockIdx.y * 2 * F;
    act[(size_t)blockIdx.y * F + i] = __float2half_rn(silu_mul(r[i], r[F + i]));
}

// out[t][r] += bias[r] for r < rows of T rows `ld` floats apart. Grid (ceil(rows / 256), T).
extern "C" __global__ void __launch_bounds__(256) wh_bias(float* __restrict__ out, int ld,
                                                        const float* __restrict__ bias, int rows) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < rows) out[(size_t)blockIdx.y * ld + r] += bias[r];
}
