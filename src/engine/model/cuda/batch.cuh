// Batched decode kernels: one step for B sequences at once (included by decode.cu).
//
// The batched step buffer (u64 words) holds the number of sequences `n` in word 0, then
// one record per sequence laid out like the single-stream step buffer (token, pos, cap,
// K pointers, V pointers) at word 1 + b * stride. A graph is captured per batch-size
// bucket; `n` (at most the bucket) is read at run time, so a bucket's graph serves any
// batch up to its size without re-capture.
//
// Activations are rows of B: x is (B, K), outputs (B, N). Each weight row is read once
// per column chunk (all B columns in one chunk for the model sizes the fused path takes)
// and dotted with every column's quantized activations from shared memory. Per column
// the arithmetic is the single-stream kernels' own (the same RMS sum order, the same
// lane split of a row and the same reductions), so a batched step gives the same logits
// bit for bit as one sequence stepped alone.

#define BSTEP_N 0
#define BSTEP_REC 1
// Columns a warp dots against one weight row at a time (registers per lane).
#define COLS 8
// Most columns quantized into shared memory at once (static reduction scratch).
#define MAX_CH 64

// Dot weight row `row` with `cnt` (<= COLS) columns of quantized activations; `*y` gets
// the sum of the column this lane holds afterwards (see lane_col).
template <int KIND>
__device__ __forceinline__ void row_dot_cols(const uint8_t* __restrict__ qs,
                                             const float2* __restrict__ dm, int row, int nb,
                                             int K, const int8_t* sq, const float* sd,
                                             const float* ss, int cnt, int lane,
                                             float* y) {
    float acc[COLS];
#pragma unroll
    for (int c = 0; c < COLS; ++c) acc[c] = 0.f;
    const float2* wdm = dm + (size_t)row * nb;
    if (KIND == KIND_Q8_0) {
        const uint8_t* wq = qs + (size_t)row * nb * 32;
        for (int i = lane; i < nb * 2; i += 32) {
            const int b = i >> 1, h = i & 1;
            const int4 w = __ldg((const int4*)(wq + b * 32 + h * 16));
            const float2 wds = wdm[b];
            const float wd = h ? wds.y : wds.x;
#pragma unroll
            for (int c = 0; c < COLS; ++c) {
                if (c < cnt) {
                    const int* a = (const int*)(sq + c * K + b * 32 + h * 16);
                    int s = __dp4a(w.x, a[0], 0);
                    s = __dp4a(w.y, a[1], s);
                    s = __dp4a(w.z, a[2], s);
                    s = __dp4a(w.w, a[3], s);
                    acc[c] += wd * sd[c * nb + b] * (float)s;
                }
            }
        }
    } else {
        const uint8_t* wq = qs + (size_t)row * nb * 16;
        const uint8_t* srow = (const uint8_t*)dm + (size_t)row * scale_bytes<KIND>(nb);
        for (int i = lane; i < nb * 2; i += 32) {
            const int b = i >> 1, h = i & 1;
            const uint2 w = __ldg((const uint2*)(wq + b * 16 + h * 8));
            const int w0 = (int)(w.x & 0x0f0f0f0fu), w1 = (int)(w.y & 0x0f0f0f0fu);
            const int w2 = (int)((w.x >> 4) & 0x0f0f0f0fu), w3 = (int)((w.y >> 4) & 0x0f0f0f0fu);
            const float2 sc = nibble_pair<KIND>(wdm, srow, nb, b);
#pragma unroll
            for (int c = 0; c < COLS; ++c) {
                if (c < cnt) {
                    const int* lo = (const int*)(sq + c * K + b * 32 + h * 8);
                    const int* hi = (const int*)(sq + c * K + b * 32 + 16 + h * 8);
                    int s = __dp4a(w0, lo[0], 0);
                    s = __dp4a(w1, lo[1], s);
                    s = __dp4a(w2, hi[0], s);
                    s = __dp4a(w3, hi[1], s);
                    if (KIND == KIND_Q4_0) {
                        int sy = __dp4a(0x01010101, lo[0], 0);
                        sy = __dp4a(0x01010101, lo[1], sy);
                        sy = __dp4a(0x01010101, hi[0], sy);
                        sy = __dp4a(0x01010101, hi[1], sy);
                        acc[c] += sc.x * sd[c * nb + b] * (float)(s - 8 * sy);
                    } else {
                        acc[c] += sc.x * sd[c * nb + b] * (float)s;
                        if (h == 0) acc[c] += sc.y * ss[c * nb + b];
                    }
                }
            }
        }
    }
    // Reduce the COLS partial sums over the warp in 4 + 2 + 1 + 1 + 1 shuffles instead of
    // 5 per column: at offsets 16, 8 and 4 each lane keeps half of its columns and adds
    // its partner's half of them, then offsets 2 and 1 sum as warp_sum does. Every column
    // gets the same pairing tree as warp_sum (offsets 16, 8, 4, 2, 1), so the same bits.
    // Afterwards lane l holds column ((l >> 4) & 1) * 4 + ((l >> 3) & 1) * 2 + ((l >> 2) & 1).
    const bool u16 = lane & 16, u8 = lane & 8, u4 = lane & 4;
    float r4[4], r2[2], r1;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float keep = u16 ? acc[j + 4] : acc[j];
        const float send = u16 ? acc[j] : acc[j + 4];
        r4[j] = keep + __shfl_xor_sync(0xffffffffu, send, 16);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const float keep = u8 ? r4[j + 2] : r4[j];
        const float send = u8 ? r4[j] : r4[j + 2];
        r2[j] = keep + __shfl_xor_sync(0xffffffffu, send, 8);
    }
    {
        const float keep = u4 ? r2[1] : r2[0];
        const float send = u4 ? r2[0] : r2[1];
        r1 = keep + __shfl_xor_sync(0xffffffffu, send, 4);
    }
    r1 += __shfl_xor_sync(0xffffffffu, r1, 2);
    r1 += __shfl_xor_sync(0xffffffffu, r1, 1);
    *y = r1;
    (void)cnt;
}

// The column whose sum lane `lane` holds after row_dot_cols.
__device__ __forceinline__ int lane_col(int lane) {
    return ((lane >> 4) & 1) * 4 + ((lane >> 3) & 1) * 2 + ((lane >> 2) & 1);
}

// out(B, rows) = q8(norm(x(B, K))) · W^T with the single-stream epilogues (MODE_*);
// out's rows are `ld` floats apart (a part of a stacked matrix writes its columns of a
// wider output; `bias` is then offset to the part's first row too). `ch` columns are
// quantized into shared memory at a time (dynamic shared memory: ch * (K + 8 * K/32)
// bytes). 256 threads.
template <int KIND, int MODE>
__device__ void matmat(const unsigned long long* __restrict__ step,
                       const float* __restrict__ x, const float* __restrict__ norm, float eps,
                       int K, const uint8_t* __restrict__ qs, const float2* __restrict__ dm,
                       const float* __restrict__ bias, int N, float* __restrict__ out, int ld,
                       int ch) {
    extern __shared__ int smem_i[];
    __shared__ float part[MAX_CH * 8];
    __shared__ float mrow[MAX_CH];
    const int nb = K / QK;
    int8_t* sq = (int8_t*)smem_i;
    float* sd = (float*)(sq + (size_t)ch * K);
    float* ss = sd + ch * nb;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int rows = MODE == MODE_SWIGLU ? N / 2 : N;
    pdl_launch_dependents();
    {
        const int r = blockIdx.x * nw + warp;
        const int qb = KIND == KIND_Q8_0 ? 32 : 16;
        if (r < rows) {
            for (int t = 0; t < (MODE == MODE_SWIGLU ? 2 : 1); ++t) {
                const size_t row = (size_t)r + (size_t)t * rows;
                const uint8_t* wq = qs + row * nb * qb;
                for (int off = lane * 128; off < nb * qb; off += 32 * 128) prefetch_l2(wq + off);
                const uint8_t* wd = (const uint8_t*)dm + row * scale_bytes<KIND>(nb);
                for (int off = lane * 128; off < scale_bytes<KIND>(nb); off += 32 * 128)
                    prefetch_l2(wd + off);
            }
        }
    }
    pdl_wait();
    const int n = (int)step[BSTEP_N];
    for (int c0 = 0; c0 < n; c0 += ch) {
        const int cn = min(ch, n - c0);
        const float* xc = x + (size_t)c0 * K;
        if (norm != nullptr) {
            // Per column, the single-stream block_reduce's order: a strided sum per
            // thread, a warp butterfly, then the warps' sums in warp order.
#pragma unroll 4
            for (int c = 0; c < cn; ++c) {
                float s2 = 0.f;
                for (int i = threadIdx.x; i < K; i += blockDim.x) {
                    const float v = xc[(size_t)c * K + i];
                    s2 = __fadd_rn(s2, __fmul_rn(v, v));
                }
                s2 = warp_sum(s2);
                if (lane == 0) part[c * 8 + warp] = s2;
            }
            __syncthreads();
            for (int c = warp; c < cn; c += nw) {
                float t = lane < nw ? part[c * 8 + lane] : 0.f;
                t = warp_sum(t);
                if (lane == 0) mrow[c] = sqrtf(t / (float)K + eps);
            }
            __syncthreads();
        }
        const int nblk = cn * nb;
        for (int j0 = warp; j0 < nblk; j0 += 4 * nw) {
          float vs[4];
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            const int j = j0 + t * nw;
            vs[t] = j < nblk ? xc[(size_t)j * QK + lane] : 0.f;
          }
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            const int j = j0 + t * nw;
            if (j >= nblk) break;
            const int c = j / nb, b = j - c * nb;
            float v = vs[t];
            if (norm != nullptr) v = __fmul_rn(v / mrow[c], norm[b * QK + lane]);
            const float amax = warp_max(fabsf(v));
            const float d = amax / 127.f;
            const float id = amax != 0.f ? 127.f / amax : 0.f;
            const int q = __float2int_rn(__fmul_rn(v, id));
            sq[c * K + b * QK + lane] = (int8_t)q;
            const int sum = warp_sum_i(q);
            if (lane == 0) {
                sd[c * nb + b] = round_f16(d);
                ss[c * nb + b] = round_f16(__fmul_rn(d, (float)sum));
            }
          }
        }
        __syncthreads();
        for (int r = blockIdx.x * nw + warp; r < rows; r += gridDim.x * nw) {
            for (int g = 0; g < cn; g += COLS) {
                const int cnt = min(COLS, cn - g);
                float y, u = 0.f;
                row_dot_cols<KIND>(qs, dm, r, nb, K, sq + g * K, sd + g * nb, ss + g * nb, cnt,
                                   lane, &y);
                if (MODE == MODE_SWIGLU)
                    row_dot_cols<KIND>(qs, dm, r + rows, nb, K, sq + g * K, sd + g * nb,
                                       ss + g * nb, cnt, lane, &u);
                const int c = lane_col(lane);
                if ((lane & 3) == 0 && c < cnt) {
                    float* o = out + (size_t)(c0 + g + c) * ld + r;
                    if (MODE == MODE_SWIGLU) {
                        *o = __fmul_rn(y / (1.f + expf(-y)), u);
                    } else if (MODE == MODE_ADD) {
                        *o += y;
                    } else {
                        *o = bias != nullptr ? y + bias[r] : y;
                    }
                }
            }
        }
        __syncthreads();  // the next chunk overwrites the shared activations
    }
}

#define MATMAT_ENTRY(KIND, KNAME, MODE, MNAME)                                              \
    extern "C" __global__ void mm_##KNAME##_##MNAME(                                        \
        const unsigned long long* __restrict__ step, const float* __restrict__ x,          \
        const float* __restrict__ norm, float eps, int K, const uint8_t* __restrict__ qs,  \
        const float2* __restrict__ dm, const float* __restrict__ bias, int N,              \
        float* __restrict__ out, int ld, int ch) {                                          \
        matmat<KIND, MODE>(step, x, norm, eps, K, qs, dm, bias, N, out, ld, ch);            \
    }

MATMAT_ENTRY(KIND_Q4_0, q4_0, MODE_STORE, store)
MATMAT_ENTRY(KIND_Q4_0, q4_0, MODE_ADD, add)
MATMAT_ENTRY(KIND_Q4_0, q4_0, MODE_SWIGLU, swiglu)
MATMAT_ENTRY(KIND_Q4_1, q4_1, MODE_STORE, store)
MATMAT_ENTRY(KIND_Q4_1, q4_1, MODE_ADD, add)
MATMAT_ENTRY(KIND_Q4_1, q4_1, MODE_SWIGLU, swiglu)
MATMAT_ENTRY(KIND_Q8_0, q8_0, MODE_STORE, store)
MATMAT_ENTRY(KIND_Q8_0, q8_0, MODE_ADD, add)
MATMAT_ENTRY(KIND_Q8_0, q8_0, MODE_SWIGLU, swiglu)
MATMAT_ENTRY(KIND_Q4_K, q4_k, MODE_STORE, store)
MATMAT_ENTRY(KIND_Q4_K, q4_k, MODE_ADD, add)
MATMAT_ENTRY(KIND_Q4_K, q4_k, MODE_SWIGLU, swiglu)

// x(B, hidden) = the embedding rows of the step's tokens; grid (blocks, bucket).
extern "C" __global__ void embed_rows(const unsigned long long* __restrict__ step, int stride,
                                      const float* __restrict__ table, int hidden,
                                      float* __restrict__ x) {
    pdl_launch_dependents();
    pdl_wait();
    const int b = blockIdx.y;
    if (b >= (int)step[BSTEP_N]) return;
    const size_t t = (size_t)step[BSTEP_REC + (size_t)b * stride + STEP_TOKEN];
    float* xb = x + (size_t)b * hidden;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < hidden; i += gridDim.x * blockDim.x)
        xb[i] = table[t * hidden + i];
}

// Attention for query head blockIdx.x of sequence blockIdx.y, over that sequence's own
// cache and length (the single-stream kernel's body); qkv is (B, qkv_w), out (B, nh*hd),
// scores (B, nh, ctx).
extern "C" __global__ void attention_b(const float* __restrict__ qkv,
                                       const unsigned long long* __restrict__ step, int stride,
                                       int layer, int n_layers, int nh, int nkvh, int hd,
                                       const float* __restrict__ cos_t,
                                       const float* __restrict__ sin_t, int neox, float scale,
                                       float* __restrict__ scores, int ctx,
                                       float* __restrict__ out) {
    pdl_launch_dependents();
    pdl_wait();
    const int b = blockIdx.y;
    if (b >= (int)step[BSTEP_N]) return;
    const size_t qkv_w = (size_t)(nh + 2 * nkvh) * hd;
    attend(qkv + b * qkv_w, step + BSTEP_REC + (size_t)b * stride, layer, n_layers, nh, nkvh,
           hd, cos_t, sin_t, neox, scale, scores + (size_t)b * nh * ctx, ctx,
           out + (size_t)b * nh * hd, blockIdx.x);
}
