// Causal attention for prompt prefill on the tensor path, flash-attention style: a
// block takes 64 query rows of one KV head (the rows of its query heads, position-major,
// so a block spans few positions), walks the cache in tiles of 64 keys held in shared
// memory, and keeps a running max and sum per row, so the (rows x keys) score matrix is
// never written out. Products run on tensor cores (mma m16n8k16, f16 in, f32 out): Q
// rounded to f16 like the f16 cache, scores in f32, the softmax weights rounded to f16
// for the product with V, as ggml's flash attention does. Needs sm_80 or newer; on older
// cards the tensor path keeps its matmul-softmax-matmul attention.
//
//   q  f32: query row i of head h at i * q_row + h * q_head (the new positions' queries,
//      after RoPE; (n_heads, n, HD) contiguous on the tensor path, (n, n_heads * HD) rows
//      in the fused prefill)
//   k, v  (n_kv, hs) f16: slot j of KV head h at h * hs + j * HD   the cache (written)
//   y  (n, n_heads * HD) f32                      the attention output
//   query row i sits at position pos + i; cache slot j holds position start + j; a query
//   sees slots j < len with start + j <= its position (and, with window > 0, start + j >
//   its position - window).

#ifndef CANDELA_EMU
#include <cuda_fp16.h>
#endif
#include <stdint.h>

namespace {

constexpr int BQ = 64;  // query rows per block (16 per warp)
constexpr int BK = 64;  // keys per tile

#include "mma.cuh"

template <int HD>
__device__ void flash_prefill(const float* __restrict__ q, const __half* __restrict__ k,
                              const __half* __restrict__ v, float* __restrict__ y, int n,
                              int n_rep, int len, int pos, int start, int window, long long hs,
                              float scale, int q_row, int q_head) {
#if __CUDA_ARCH__ >= 800
    constexpr int KS = HD + 8;  // halfs per K row in shared memory (padding: no conflicts)
    constexpr int VS = BK + 8;  // halfs per row of V transposed (one row per dimension)
    __shared__ __align__(16) __half ks[BK * KS];
    __shared__ __align__(16) __half vt[HD * VS];

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, t = lane & 3;
    const int kvh = blockIdx.y;
    const int n_heads = gridDim.y * n_rep;
    const int rows = n * n_rep;
    const int rb = blockIdx.x * BQ;       // the block's first row
    const int r0 = rb + warp * 16;        // the warp's first row
    const __half* kh = k + (long long)kvh * hs;
    const __half* vh = v + (long long)kvh * hs;

    // This thread's two rows (g and g + 8 of the warp's 16): position and query head.
    int row_pos[2];
    bool row_ok[2];
    #pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        int r = r0 + g + 8 * hr;
        row_ok[hr] = r < rows;
        row_pos[hr] = pos + (row_ok[hr] ? r / n_rep : 0);
    }

    // Q fragments for the whole head dimension, rounded to f16.
    uint32_t qa[HD / 16][4];
    #pragma unroll
    for (int c = 0; c < HD / 16; c++) {
        #pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            int r = r0 + g + 8 * hr;
            float2 lo = make_float2(0.f, 0.f), hi = make_float2(0.f, 0.f);
            if (r < rows) {
                const float* qr = q + (long long)(r / n_rep) * q_row +
                                  (long long)(kvh * n_rep + r % n_rep) * q_head;
                lo = *reinterpret_cast<const float2*>(qr + c * 16 + 2 * t);
                hi = *reinterpret_cast<const float2*>(qr + c * 16 + 8 + 2 * t);
            }
            qa[c][hr] = pack_half2(lo.x, lo.y);
            qa[c][2 + hr] = pack_half2(hi.x, hi.y);
        }
    }

    float o[HD / 8][4];
    #pragma unroll
    for (int d = 0; d < HD / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    // Slots this block can see: up to its last row's position, from its first row's
    // window start.
    const int last_row = min(rows, rb + BQ) - 1;
    const int kend = min(len, pos + last_row / n_rep - start + 1);
    int kbeg = 0;
    if (window > 0) kbeg = max(0, pos + rb / n_rep - window + 1 - start) / BK * BK;

    for (int kb = kbeg; kb < kend; kb += BK) {
        __syncthreads();
        // K tile, row-major: 16-byte loads, HD / 8 per key.
        for (int e = tid; e < BK * HD / 8; e += blockDim.x) {
            int j = e / (HD / 8), c8 = e % (HD / 8);
            int4 val = make_int4(0, 0, 0, 0);
            if (kb + j < kend) val = *reinterpret_cast<const int4*>(kh + (long long)(kb + j) * HD + c8 * 8);
            *reinterpret_cast<int4*>(&ks[j * KS + c8 * 8]) = val;
        }
        // V tile, transposed (a warp takes 32 consecutive keys of one 8-dimension group).
        for (int e = tid; e < BK * HD / 8; e += blockDim.x) {
            int j = e % BK, c8 = e / BK;
            int4 val = make_int4(0, 0, 0, 0);
            if (kb + j < kend) val = *reinterpret_cast<const int4*>(vh + (long long)(kb + j) * HD + c8 * 8);
            const __half* hv = reinterpret_cast<const __half*>(&val);
            #pragma unroll
            for (int d = 0; d < 8; d++) vt[(c8 * 8 + d) * VS + j] = hv[d];
        }
        __syncthreads();

        // Scores: 16 rows x 64 keys per warp.
        float s[BK / 8][4];
        #pragma unroll
        for (int nt = 0; nt < BK / 8; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
        #pragma unroll
        for (int c = 0; c < HD / 16; c++) {
            #pragma unroll
            for (int nt = 0; nt < BK / 8; nt++) {
                const __half* kr = &ks[(nt * 8 + g) * KS + c * 16 + 2 * t];
                uint32_t b0 = *reinterpret_cast<const uint32_t*>(kr);
                uint32_t b1 = *reinterpret_cast<const uint32_t*>(kr + 8);
                mma16816(s[nt], qa[c], b0, b1);
            }
        }
        // Scale and mask, then the running max and sum per row.
        #pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            float mx = -INFINITY;
            #pragma unroll
            for (int nt = 0; nt < BK / 8; nt++) {
                #pragma unroll
                for (int e = 0; e < 2; e++) {
                    int j = kb + nt * 8 + 2 * t + e;
                    int kp = start + j;
                    bool ok = row_ok[hr] && j < kend && kp <= row_pos[hr] &&
                              (window <= 0 || kp > row_pos[hr] - window);
                    float val = ok ? s[nt][2 * hr + e] * scale : -INFINITY;
                    s[nt][2 * hr + e] = val;
                    mx = fmaxf(mx, val);
                }
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
            float m_new = fmaxf(m[hr], mx);
            // Nothing seen yet (every slot masked so far): keep zeros, no NaN.
            float base = m_new == -INFINITY ? 0.f : m_new;
            float alpha = m[hr] == -INFINITY ? 0.f : expf(m[hr] - base);
            float sum = 0.f;
            #pragma unroll
            for (int nt = 0; nt < BK / 8; nt++) {
                #pragma unroll
                for (int e = 0; e < 2; e++) {
                    float p = expf(s[nt][2 * hr + e] - base);
                    s[nt][2 * hr + e] = p;
                    sum += p;
                }
            }
            sum += __shfl_xor_sync(0xffffffff, sum, 1);
            sum += __shfl_xor_sync(0xffffffff, sum, 2);
            l[hr] = l[hr] * alpha + sum;
            m[hr] = m_new;
            #pragma unroll
            for (int d = 0; d < HD / 8; d++) {
                o[d][2 * hr] *= alpha;
                o[d][2 * hr + 1] *= alpha;
            }
        }
        // Output += P V: P's accumulators become the A fragments, 16 keys at a time.
        #pragma unroll
        for (int kc = 0; kc < BK / 16; kc++) {
            uint32_t pa[4] = {
                pack_half2(s[2 * kc][0], s[2 * kc][1]),
                pack_half2(s[2 * kc][2], s[2 * kc][3]),
                pack_half2(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                pack_half2(s[2 * kc + 1][2], s[2 * kc + 1][3]),
            };
            #pragma unroll
            for (int d = 0; d < HD / 8; d++) {
                const __half* vr = &vt[(d * 8 + g) * VS + kc * 16 + 2 * t];
                uint32_t b0 = *reinterpret_cast<const uint32_t*>(vr);
                uint32_t b1 = *reinterpret_cast<const uint32_t*>(vr + 8);
                mma16816(o[d], pa, b0, b1);
            }
        }
    }

    #pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        int r = r0 + g + 8 * hr;
        if (r >= rows) continue;
        float inv = l[hr] > 0.f ? 1.f / l[hr] : 0.f;
        float* yr = y + (long long)(r / n_rep) * n_heads * HD + (kvh * n_rep + r % n_rep) * HD;
        #pragma unroll
        for (int d = 0; d < HD / 8; d++) {
            *reinterpret_cast<float2*>(yr + d * 8 + 2 * t) =
                make_float2(o[d][2 * hr] * inv, o[d][2 * hr + 1] * inv);
        }
    }
#else
    __trap();
#endif
}

}  // namespace

#define FLASH(HD)                                                                              \
    extern "C" __global__ void __launch_bounds__(128)                                         \
        flash_prefill_##HD(const float* q, const __half* k, const __half* v, float* y, int n, \
                           int n_rep, int len, int pos, int start, int window, long long hs,  \
                           float scale, int q_row, int q_head) {                              \
        flash_prefill<HD>(q, k, v, y, n, n_rep, len, pos, start, window, hs, scale, q_row,    \
                          q_head);                                                            \
    }

FLASH(64)
FLASH(128)
