// Batched decode kernels: one step for B sequences at once (included by decode.cu).
//
// The batched step buffer (u64 words) holds the number of sequences `n` in word 0, then
// one record per sequence laid out like the single-stream step buffer (token, pos, cap,
// K pointers, V pointers) at word 1 + b * stride. A graph is captured per batch-size
// bucket; `n` (at most the bucket) is read at run time, so a bucket's graph serves any
// batch up to its size without re-capture.
//
// Activations are rows of B: x is (B, K), outputs (B, N). Each block quantizes a chunk
// of columns into shared memory (a thread per 32-block), then each warp reads a weight
// row once and dots it with 8 (mm_*) or 32 (mm32_*) columns at a time. Per column the
// arithmetic is the single-stream kernels' own (the same RMS sum order, the same lane
// split of a row and the same reductions), so a batched step gives the same logits bit
// for bit as one sequence stepped alone. The same step prefills a prompt: its records
// are then consecutive positions of one sequence (kv_write_b puts every position's K/V
// in the cache before attention reads it).

#define BSTEP_N 0
#define BSTEP_REC 1
// Most columns quantized into shared memory at once (static reduction scratch).
#define MAX_CH 64

// out(B, rows) = q8(norm(x(B, K))) · W^T with the single-stream epilogues (MODE_*);
// out's rows are `ld` floats apart (a part of a stacked matrix writes its columns of a
// wider output; `bias` is then offset to the part's first row too). `ch` columns are
// quantized into shared memory at a time (dynamic shared memory: ch * (K + 8 * K/32)
// bytes), and a warp dots each of its rows with N of them at once. 256 threads.
template <int KIND, int MODE, int N>
__device__ void matmat(const unsigned long long* __restrict__ step,
                       const float* __restrict__ x, const float* __restrict__ norm, float eps,
                       int K, const uint8_t* __restrict__ qs, const float2* __restrict__ dm,
                       const float* __restrict__ bias, int Nrows, float* __restrict__ out,
                       int ld, int ch, const int8_t* __restrict__ pq = nullptr,
                       const float2* __restrict__ pds = nullptr) {
    DYN_SMEM(int4, smem_v);
    __shared__ float part[MAX_CH * 8];
    __shared__ float mrow[MAX_CH];
    const int nb = K / QK;
    int8_t* sq = (int8_t*)smem_v;
    float2* sds = (float2*)(sq + (size_t)ch * K);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int rows = MODE == MODE_SWIGLU ? Nrows / 2 : Nrows;
    pdl_launch_dependents();
    mv_prefetch<KIND, MODE>(qs, dm, nb, rows);
    pdl_wait();
    const int n = (int)step[BSTEP_N];
    const int lanes_per_col = 32 / N;
    for (int c0 = 0; c0 < n; c0 += ch) {
        const int cn = min(ch, n - c0);
        if (pq != nullptr) {
            // Quantized once a step (qcols_*): copied in.
            load_cols(pq + (size_t)c0 * K, pds + (size_t)c0 * nb, K, cn, sq, sds);
        } else {
            quantize_cols<KIND>(x + (size_t)c0 * K, norm, eps, K, cn, sq, sds, part, mrow);
        }
        const int c = held_col<N>(lane);
        for (int r = blockIdx.x * nw + warp; r < rows; r += gridDim.x * nw) {
            for (int g = 0; g < cn; g += N) {
                const int cnt = min(N, cn - g);
                float y, u = 0.f;
                rows_dot<KIND, N, MODE == MODE_SWIGLU ? 2 : 1>(
                    qs, dm, r, r + rows, nb, K, sq + (size_t)g * K, sds + g * nb, cnt, lane, &y,
                    &u);
                if ((lane & (lanes_per_col - 1)) == 0 && c < cnt) {
                    store_out<MODE>(out + (size_t)(c0 + g + c) * ld + r, y, u, bias, r);
                }
            }
        }
        __syncthreads();  // the next chunk overwrites the shared activations
    }
}

// mm_* take 8 columns of a chunk at a time, mm32_* 32 (wider batches); mmq_* 8 at a time
// of the columns qcols_* quantized once (pq, pds: no quantization per block).
#define MATMAT_ONE(NAME)                                                                    \
    extern "C" __global__ void __launch_bounds__(256) NAME(                                 \
        const unsigned long long* __restrict__ step, const float* __restrict__ x,          \
        const float* __restrict__ norm, float eps, int K, const uint8_t* __restrict__ qs,  \
        const float2* __restrict__ dm, const float* __restrict__ bias, int Nr,             \
        float* __restrict__ out, int ld, int ch)
#define MATMAT_ENTRY(KIND, KNAME, MODE, MNAME)                                              \
    MATMAT_ONE(mm_##KNAME##_##MNAME) {                                                      \
        matmat<KIND, MODE, 8>(step, x, norm, eps, K, qs, dm, bias, Nr, out, ld, ch);        \
    }                                                                                       \
    MATMAT_ONE(mm32_##KNAME##_##MNAME) {                                                    \
        matmat<KIND, MODE, 32>(step, x, norm, eps, K, qs, dm, bias, Nr, out, ld, ch);       \
    }                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) mmq_##KNAME##_##MNAME(                \
        const unsigned long long* __restrict__ step, int K, const uint8_t* __restrict__ qs, \
        const float2* __restrict__ dm, const float* __restrict__ bias, int Nr,             \
        float* __restrict__ out, int ld, const int8_t* __restrict__ pq,                    \
        const float2* __restrict__ pds, int ch) {                                           \
        matmat<KIND, MODE, 8>(step, nullptr, nullptr, 0.f, K, qs, dm, bias, Nr, out, ld, ch, \
                              pq, pds);                                                     \
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

// The step's n columns of x (rows K floats apart), RMS-normalized first when `norm`,
// quantized for a KIND mat-mat (quantize_cols' values and layout) into q (n x K int8)
// and ds (n x K/32 pairs): once a step, for every block of the mat-mat that follows.
// One block of 256 threads per column (grid: the bucket).
#define QCOLS_ENTRY(KIND, KNAME)                                                            \
    extern "C" __global__ void __launch_bounds__(256) qcols_##KNAME(                        \
        const unsigned long long* __restrict__ step, const float* __restrict__ x,          \
        const float* __restrict__ norm, float eps, int K, int8_t* __restrict__ q,          \
        float2* __restrict__ ds) {                                                          \
        __shared__ float part[8];                                                           \
        __shared__ float mrow[1];                                                           \
        pdl_launch_dependents();                                                            \
        pdl_wait();                                                                         \
        const int c = blockIdx.x;                                                           \
        if (c >= (int)step[BSTEP_N]) return;                                                \
        const int nb = K / QK;                                                              \
        quantize_cols<KIND>(x + (size_t)c * K, norm, eps, K, 1, q + (size_t)c * K,         \
                            ds + (size_t)c * nb, part, mrow);                               \
    }

QCOLS_ENTRY(KIND_Q4_0, q4_0)
QCOLS_ENTRY(KIND_Q4_1, q4_1)
QCOLS_ENTRY(KIND_Q8_0, q8_0)
QCOLS_ENTRY(KIND_Q4_K, q4_k)

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

// RoPE on the new K of KV head blockIdx.x of record blockIdx.y, and its K and V written
// to the record's cache at its position as f16: the values attend writes. A prefill step
// (the records are positions of one sequence) runs this first, so that every position of
// the step is in the cache before attention_b (with write = 0) reads it.
extern "C" __global__ void kv_write_b(const float* __restrict__ qkv,
                                      const unsigned long long* __restrict__ step, int stride,
                                      int layer, int n_layers, int nh, int nkvh, int hd,
                                      const float* __restrict__ cos_t,
                                      const float* __restrict__ sin_t, int neox) {
    pdl_launch_dependents();
    pdl_wait();
    const int b = blockIdx.y;
    if (b >= (int)step[BSTEP_N]) return;
    const unsigned long long* rec = step + BSTEP_REC + (size_t)b * stride;
    const int g = blockIdx.x;
    const int pos = (int)rec[STEP_POS];
    const size_t cap = (size_t)rec[STEP_CAP];
    __half* kc = (__half*)rec[STEP_PTRS + layer] + (size_t)g * cap * hd;
    __half* vc = (__half*)rec[STEP_PTRS + n_layers + layer] + (size_t)g * cap * hd;
    const size_t qkv_w = (size_t)(nh + 2 * nkvh) * hd;
    const float* row = qkv + b * qkv_w;
    const int nq = nh * hd, nkv = nkvh * hd, half = hd / 2;
    const float* cs = cos_t + (size_t)pos * half;
    const float* sn = sin_t + (size_t)pos * half;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const int a = neox ? i : 2 * i;
        const int bb = neox ? i + half : 2 * i + 1;
        const float c = cs[i], s = sn[i];
        const float k0 = row[nq + g * hd + a], k1 = row[nq + g * hd + bb];
        kc[(size_t)pos * hd + a] = __float2half_rn(__fsub_rn(__fmul_rn(k0, c), __fmul_rn(k1, s)));
        kc[(size_t)pos * hd + bb] = __float2half_rn(__fadd_rn(__fmul_rn(k0, s), __fmul_rn(k1, c)));
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x)
        vc[(size_t)pos * hd + d] = __float2half_rn(row[nq + nkv + g * hd + d]);
}

// Attention for query head blockIdx.x / hb of sequence blockIdx.y, over that sequence's
// own cache and length (the single-stream kernel's body, cut into the same position
// chunks: the block takes chunks blockIdx.x % hb, + hb, ...); qkv is (B, qkv_w), out (B,
// nh*hd), scores (B, nh, ctx), part (B, nh, nch, hd + 2), cnt (B, nh). `write`: the new
// K/V go to the cache here (a decode step); 0 when kv_write_b put them there (a prefill
// step).
extern "C" __global__ void attention_b(const float* __restrict__ qkv,
                                       const unsigned long long* __restrict__ step, int stride,
                                       int layer, int n_layers, int nh, int nkvh, int hd,
                                       const float* __restrict__ cos_t,
                                       const float* __restrict__ sin_t, int neox, float scale,
                                       float* __restrict__ scores, int ctx,
                                       float* __restrict__ out, int write, int nch, int hb,
                                       float* __restrict__ part, unsigned* __restrict__ cnt) {
    pdl_launch_dependents();
    pdl_wait();
    const int b = blockIdx.y;
    if (b >= (int)step[BSTEP_N]) return;
    const size_t qkv_w = (size_t)(nh + 2 * nkvh) * hd;
    attend(qkv + b * qkv_w, step + BSTEP_REC + (size_t)b * stride, layer, n_layers, nh, nkvh,
           hd, cos_t, sin_t, neox, scale, scores + (size_t)b * nh * ctx, ctx,
           out + (size_t)b * nh * hd, blockIdx.x / hb, write != 0, blockIdx.x % hb, hb, nch,
           part + (size_t)b * nh * nch * (hd + 2), cnt + (size_t)b * nh);
}

// attention_b with the query heads of each KV group taken together (attend_group, the
// same results): block x of sequence blockIdx.y takes unit x / hb (KV group unit / nsub,
// its query heads from (unit % nsub) * gs, at most gs of them) and chunks x % hb, + hb, ...
extern "C" __global__ void attention_bg(const float* __restrict__ qkv,
                                        const unsigned long long* __restrict__ step, int stride,
                                        int layer, int n_layers, int nh, int nkvh, int hd,
                                        const float* __restrict__ cos_t,
                                        const float* __restrict__ sin_t, int neox, float scale,
                                        float* __restrict__ scores, int ctx,
                                        float* __restrict__ out, int write, int nch, int hb,
                                        float* __restrict__ part, unsigned* __restrict__ cnt,
                                        int gs, int nsub) {
    pdl_launch_dependents();
    pdl_wait();
    const int b = blockIdx.y;
    if (b >= (int)step[BSTEP_N]) return;
    const size_t qkv_w = (size_t)(nh + 2 * nkvh) * hd;
    const int unit = blockIdx.x / hb, s = unit % nsub;
    const int group = nh / nkvh;
    const int h0 = (unit / nsub) * group + s * gs;
    const int ng = min(gs, group - s * gs);
    attend_group(qkv + b * qkv_w, step + BSTEP_REC + (size_t)b * stride, layer, n_layers, nh,
                 nkvh, hd, cos_t, sin_t, neox, scale, scores + (size_t)b * nh * ctx, ctx,
                 out + (size_t)b * nh * hd, h0, ng, write != 0 && s == 0, blockIdx.x % hb, hb,
                 nch, part + (size_t)b * nh * nch * (hd + 2), cnt + (size_t)b * nh);
}
