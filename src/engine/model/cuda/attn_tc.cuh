// Decode attention on the tensor cores (included by decode.cu; compute capability 8.0 and
// later): one block of ATC_WARPS warps per KV group of a sequence (and, past
// `min_chunk` positions, per position chunk: cut as `attend` cuts them, in chunks of at
// least `min_chunk` positions, a multiple of 64 from 64 to ATT_MIN_CHUNK), the
// group's query heads (at most 16) as the rows of m16n8k16 f16 products, so each cached
// K and V row is read once for the whole group and the dot products run on the tensor
// cores instead of in eight-lane FMA chains.
//
// The warps take 16-position tiles of the chunk in turn (warp w: tiles w, w + ATC_WARPS,
// ...), each keeping its own running max, sum and f32 output (flash attention's online
// softmax: the weights exp(s - m) rounded to f16 against the warp's running max, the
// output rescaled when the max grows); the block then combines its warps in warp order,
// and the chunks combine as `attend`'s do (att_combine, in chunk order). The arithmetic
// is a function of the sequence's length alone (not of the grid or of the other
// sequences of a batch), so batched steps give the single-stream kernel's bits. It sums
// in another order than `attend` (the tensor cores' own order within a product), so the
// two agree to rounding.
//
// Fragment layouts (PTX m16n8k16, lane = 4 * gq + t):
// - scores S = Q K^T: A = Q (rows: heads, k: head dimensions), B = K^T (n: positions).
//   The k index is permuted so that each lane reads 16 contiguous bytes of a K row: in
//   k-steps 2u and 2u + 1, lane t's k values 2t, 2t + 1, 2t + 8, 2t + 9 are the head
//   dimensions 32u + 8t + 4e + 0..3 (e = the step's parity); Q's A fragments use the
//   same map. B column n (lanes 4n..4n + 3) is position tile + n.
// - output O = P V: A = P (the scores' C fragments of the tile's two 8-position halves,
//   rounded to f16: flash attention's register reuse), B = V (k: positions, n: head
//   dimensions). The n index is permuted so that lane gq reads the dimensions
//   gq * J .. gq * J + J - 1 (J = HD / 8) of each V row it needs: column 8j + c of the
//   output is dimension c * J + j.
// Masked positions (past the chunk) read zeros for K and V and score -inf.

#include "mma.cuh"

#define ATC_WARPS 4
#define ATC_THREADS (ATC_WARPS * 32)
#define ATC_ROWS 16

#if __CUDA_ARCH__ >= 800

// Dynamic shared memory (floats): the group's queries (ATC_ROWS * HD), new K and V (2 *
// HD), each warp's max and sum per row (2 * ATC_WARPS * ATC_ROWS) and output rows
// (ATC_WARPS * ng * HD).
template <int HD>
__device__ void attend_tc(const float* __restrict__ qkv,
                          const unsigned long long* __restrict__ step, int layer, int n_layers,
                          int nh, int nkvh, const float* __restrict__ cos_t,
                          const float* __restrict__ sin_t, int neox, float scale,
                          float* __restrict__ out, int g, bool write, int chunk0, int cstep,
                          int nch, float* __restrict__ cpart, unsigned* __restrict__ cnt,
                          int min_chunk) {
    constexpr int KS = HD / 16;  // k-steps of a score product
    constexpr int KU = HD / 32;  // 16-byte K loads a position row per lane
    constexpr int J = HD / 8;    // 8-column output tiles; V values a lane reads a row
    constexpr int VW = J / 2;    // their 32-bit words
    DYN_SMEM(float, sm);
    __shared__ unsigned last[ATC_ROWS];
    const int ng = nh / nkvh;  // the group's query heads (<= ATC_ROWS, checked by the host)
    const int h0 = g * ng;
    float* q = sm;
    float* kn = q + ATC_ROWS * HD;
    float* vn = kn + HD;
    float* wm = vn + HD;
    float* wl = wm + ATC_WARPS * ATC_ROWS;
    float* wo = wl + ATC_WARPS * ATC_ROWS;
    const AttSpan a = att_span(step, layer, n_layers, g, HD, nch, min_chunk);
    if (chunk0 >= a.n_c) return;  // the whole block: this length has no such chunk
    const int pos = a.pos, len = a.len, clen = a.clen, n_c = a.n_c;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gq = lane >> 2, t = lane & 3;
    // The block whose chunks include the last writes the new K/V and reads them back
    // from the cache (visible to the block after the barrier); no other block reads
    // that slot.
    const bool writer = write && chunk0 == (n_c - 1) % cstep;
    att_new_qkv(qkv, h0, ng, g, nh, nkvh, HD, cos_t, sin_t, neox, pos, q, kn, vn, writer, a.kc,
                a.vc);
    __syncthreads();
    // Q's A fragments (rows past the group's heads zero), kept for every tile.
    uint32_t qa[KS][4];
#pragma unroll
    for (int s = 0; s < KS; ++s) {
        const int d = (s >> 1) * 32 + t * 8 + (s & 1) * 4;
        const float* r0 = q + gq * HD + d;
        const float* r1 = q + (gq + 8) * HD + d;
        const bool v0 = gq < ng, v1 = gq + 8 < ng;
        qa[s][0] = v0 ? pack_half2(r0[0], r0[1]) : 0u;
        qa[s][1] = v1 ? pack_half2(r1[0], r1[1]) : 0u;
        qa[s][2] = v0 ? pack_half2(r0[2], r0[3]) : 0u;
        qa[s][3] = v1 ? pack_half2(r1[2], r1[3]) : 0u;
    }
    const __half* kc = a.kc;
    const __half* vc = a.vc;
    const size_t hstride = (size_t)nch * (HD + 2);  // a head's chunk slots
    unsigned done = 0;
    for (int ch = chunk0; ch < n_c; ch += cstep) {
        const int j0 = ch * clen, j1 = min(len, j0 + clen);
        float mrun[2] = {-INFINITY, -INFINITY}, lrun[2] = {0.f, 0.f};
        float o[J][4];
#pragma unroll
        for (int j = 0; j < J; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
        for (int base = j0 + warp * 16; base < j1; base += ATC_WARPS * 16) {
            // K rows base + gq and base + 8 + gq; V rows base + 2t, + 1, + 8, + 9.
            uint4 kr[2][KU];
            uint4 vr[4][(VW + 3) / 4];
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                const int p = base + nt * 8 + gq;
                const uint4* src = (const uint4*)(kc + (size_t)p * HD);
#pragma unroll
                for (int u = 0; u < KU; ++u)
                    kr[nt][u] = p < j1 ? src[u * 4 + t] : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int p = base + 2 * t + (i & 1) + (i >> 1) * 8;
                const uint4* src = (const uint4*)(vc + (size_t)p * HD + gq * J);
#pragma unroll
                for (int w = 0; w < (VW + 3) / 4; ++w)
                    vr[i][w] = p < j1 ? src[w] : make_uint4(0u, 0u, 0u, 0u);
            }
            // Scores of the two 8-position halves.
            float c[2][4];
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
#pragma unroll
                for (int s = 0; s < KS; ++s) {
                    const uint4 k4 = kr[nt][s >> 1];
                    if (s & 1)
                        mma16816(c[nt], qa[s], k4.z, k4.w);
                    else
                        mma16816(c[nt], qa[s], k4.x, k4.y);
                }
            }
            // Scale and mask (columns 2t, 2t + 1 of each half); the rows' tile max.
            float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int p = base + nt * 8 + 2 * t + (e & 1);
                    c[nt][e] = p < j1 ? c[nt][e] * scale : -INFINITY;
                    mx[e >> 1] = fmaxf(mx[e >> 1], c[nt][e]);
                }
            }
            float alpha[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                const float m = fmaxf(mrun[r], mx[r]);  // finite: base < j1
                alpha[r] = expf(mrun[r] - m);
                mrun[r] = m;
            }
            // Weights exp(s - m): summed as computed, multiplied as f16.
            float ls[2] = {0.f, 0.f};
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    c[nt][e] = expf(c[nt][e] - mrun[e >> 1]);
                    ls[e >> 1] += c[nt][e];
                }
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) lrun[r] = fmaf(lrun[r], alpha[r], ls[r]);
            const uint32_t pa[4] = {pack_half2(c[0][0], c[0][1]), pack_half2(c[0][2], c[0][3]),
                                    pack_half2(c[1][0], c[1][1]), pack_half2(c[1][2], c[1][3])};
            const uint32_t* v32[4] = {(const uint32_t*)vr[0], (const uint32_t*)vr[1],
                                      (const uint32_t*)vr[2], (const uint32_t*)vr[3]};
#pragma unroll
            for (int j = 0; j < J; ++j) {
                o[j][0] *= alpha[0];
                o[j][1] *= alpha[0];
                o[j][2] *= alpha[1];
                o[j][3] *= alpha[1];
                // Dimension gq * J + j of positions 2t, 2t + 1 (b0) and 2t + 8, 2t + 9 (b1).
                const unsigned sel = (j & 1) ? 0x7632u : 0x5410u;
                const uint32_t b0 = __byte_perm(v32[0][j >> 1], v32[1][j >> 1], sel);
                const uint32_t b1 = __byte_perm(v32[2][j >> 1], v32[3][j >> 1], sel);
                mma16816(o[j], pa, b0, b1);
            }
        }
        // The warps' partial results to shared memory: rows gq and gq + 8, sums over
        // the row's four lanes.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            lrun[r] += __shfl_xor_sync(0xffffffffu, lrun[r], 1);
            lrun[r] += __shfl_xor_sync(0xffffffffu, lrun[r], 2);
        }
        if (t == 0) {
            wm[warp * ATC_ROWS + gq] = mrun[0];
            wm[warp * ATC_ROWS + gq + 8] = mrun[1];
            wl[warp * ATC_ROWS + gq] = lrun[0];
            wl[warp * ATC_ROWS + gq + 8] = lrun[1];
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = gq + 8 * r;
            if (row < ng) {
                float* dst = wo + ((size_t)warp * ng + row) * HD;
#pragma unroll
                for (int j = 0; j < J; ++j) {
                    dst[(2 * t) * J + j] = o[j][2 * r];
                    dst[(2 * t + 1) * J + j] = o[j][2 * r + 1];
                }
            }
        }
        __syncthreads();
        // The chunk's result per head: the warps combined in warp order.
        for (int i = tid; i < ng * HD; i += blockDim.x) {
            const int h = i / HD, d = i % HD;
            float m = -INFINITY;
#pragma unroll
            for (int w = 0; w < ATC_WARPS; ++w) m = fmaxf(m, wm[w * ATC_ROWS + h]);
            float acc = 0.f, l = 0.f;
#pragma unroll
            for (int w = 0; w < ATC_WARPS; ++w) {
                const float f = expf(wm[w * ATC_ROWS + h] - m);
                acc = fmaf(f, wo[((size_t)w * ng + h) * HD + d], acc);
                l = fmaf(f, wl[w * ATC_ROWS + h], l);
            }
            if (n_c == 1) {
                out[(size_t)(h0 + h) * HD + d] = acc / l;
            } else {
                float* cp = cpart + (size_t)(h0 + h) * hstride + (size_t)ch * (HD + 2);
                cp[d] = acc;
                if (d == 0) {
                    cp[HD] = m;
                    cp[HD + 1] = l;
                }
            }
        }
        __syncthreads();  // wm, wl, wo are free again
        ++done;
    }
    if (n_c == 1) return;
    att_tickets_combine(cpart + (size_t)h0 * hstride, hstride, n_c, HD, out + (size_t)h0 * HD,
                        cnt + h0, ng, done, last);
}

// Single stream: grid nkvh * nch, KV group blockIdx.x / nch, chunk blockIdx.x % nch (the
// arguments of `attention`, scores, ctx and hd unused, then the least chunk length).
// Batched: grid (nkvh * hb, bucket), group blockIdx.x / hb of sequence blockIdx.y, chunks
// blockIdx.x % hb, + hb, ... (the arguments of `attention_b`, then the least chunk length).
#define ATTENTION_TC(HD)                                                                    \
    extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_tc##HD(             \
        const float* __restrict__ qkv, const unsigned long long* __restrict__ step,        \
        int layer, int n_layers, int nh, int nkvh, int hd, const float* __restrict__ cos_t, \
        const float* __restrict__ sin_t, int neox, float scale, float* __restrict__ scores, \
        int ctx, float* __restrict__ out, int nch, float* __restrict__ part,               \
        unsigned* __restrict__ cnt, int min_chunk) {                                        \
        pdl_launch_dependents();                                                            \
        pdl_wait();                                                                         \
        attend_tc<HD>(qkv, step, layer, n_layers, nh, nkvh, cos_t, sin_t, neox, scale, out, \
                      blockIdx.x / nch, true, blockIdx.x % nch, nch, nch, part, cnt,        \
                      min_chunk);                                                           \
    }                                                                                       \
    extern "C" __global__ void __launch_bounds__(ATC_THREADS) attention_btc##HD(            \
        const float* __restrict__ qkv, const unsigned long long* __restrict__ step,        \
        int stride, int layer, int n_layers, int nh, int nkvh, int hd,                     \
        const float* __restrict__ cos_t, const float* __restrict__ sin_t, int neox,        \
        float scale, float* __restrict__ scores, int ctx, float* __restrict__ out,         \
        int write, int nch, int hb, float* __restrict__ part, unsigned* __restrict__ cnt,  \
        int min_chunk) {                                                                    \
        pdl_launch_dependents();                                                            \
        pdl_wait();                                                                         \
        const int b = blockIdx.y;                                                           \
        if (b >= (int)step[BSTEP_N]) return;                                                \
        const size_t qkv_w = (size_t)(nh + 2 * nkvh) * HD;                                  \
        attend_tc<HD>(qkv + b * qkv_w, step + BSTEP_REC + (size_t)b * stride, layer,        \
                      n_layers, nh, nkvh, cos_t, sin_t, neox, scale,                        \
                      out + (size_t)b * nh * HD, blockIdx.x / hb, write != 0,               \
                      blockIdx.x % hb, hb, nch, part + (size_t)b * nh * nch * (HD + 2),     \
                      cnt + (size_t)b * nh, min_chunk);                                     \
    }

ATTENTION_TC(64)
ATTENTION_TC(128)

#endif
