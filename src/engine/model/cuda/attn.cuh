// Decode attention pieces shared by the per-head, grouped and tensor-core kernels
// (included by decode.cu after STEP_* and round_f16).

#pragma once

// Split over positions (nch > 1, contexts past ATT_MIN_CHUNK): a length is cut into
// chunks of attn_chunk_len(len, nch) positions, a function of the length alone, so that
// the single-stream and batched kernels cut a sequence the same way whatever their grid.
// Each chunk's scores, max m, sum l of exp(s - m) and the f16-rounded weights exp(s - m)
// times V go to `cpart` (per head nch slots of hd + 2 floats); the block that finishes a
// head's last chunk (a ticket in `cnt`, reset after) combines them in chunk order:
// sum_c exp(m_c - M) o_c / sum_c exp(m_c - M) l_c. A block takes the chunks chunk0,
// chunk0 + cstep, ... of head h. A length of one chunk takes the unsplit code.
#define ATT_MIN_CHUNK 256
#define ATT_MAX_CHUNKS 16
__device__ __forceinline__ int attn_chunk_len(int len, int nch, int min_chunk = ATT_MIN_CHUNK) {
    const int c = (((len + nch - 1) / nch) + 63) & ~63;
    return c > min_chunk ? c : min_chunk;
}

// The combination of a head's n_c chunk results in hp (slots of hd + 2 floats: the
// weighted V sums, max, sum) into out, by the block whose ticket completed the head:
// sum_c exp(m_c - M) o_c / sum_c exp(m_c - M) l_c, in chunk order; resets the head's
// ticket count hc for the next launch.
__device__ __forceinline__ void att_combine(const float* hp, int n_c, int hd,
                                            float* __restrict__ out, unsigned* hc) {
    __shared__ float wgt[ATT_MAX_CHUNKS + 1];
    const int tid = threadIdx.x, bd = blockDim.x;
    __threadfence();
    if (tid == 0) {
        float m = -INFINITY;
        for (int ch = 0; ch < n_c; ++ch) m = fmaxf(m, __ldcg(hp + (size_t)ch * (hd + 2) + hd));
        float l = 0.f;
        for (int ch = 0; ch < n_c; ++ch) {
            const float* cp = hp + (size_t)ch * (hd + 2);
            const float w = expf(__ldcg(cp + hd) - m);
            wgt[ch] = w;
            l = fmaf(w, __ldcg(cp + hd + 1), l);
        }
        wgt[ATT_MAX_CHUNKS] = l;
        *hc = 0;  // for the next launch (which waits for this one to finish)
    }
    __syncthreads();
    const float l = wgt[ATT_MAX_CHUNKS];
    for (int d = tid; d < hd; d += bd) {
        float o = 0.f;
        for (int ch = 0; ch < n_c; ++ch) o = fmaf(wgt[ch], __ldcg(hp + (size_t)ch * (hd + 2) + d), o);
        out[d] = o / l;
    }
}

// Where a decode step's attention for KV group `g` reads: the step's position, its
// length in chunks of `clen` (`n_c` of them; one when `nch` is 1; chunks of at least
// `min_chunk` positions) and the group's cached K and V rows of `layer`.
struct AttSpan {
    int pos, len, clen, n_c;
    __half* kc;
    __half* vc;
};

__device__ __forceinline__ AttSpan att_span(const unsigned long long* __restrict__ step,
                                            int layer, int n_layers, int g, int hd, int nch,
                                            int min_chunk = ATT_MIN_CHUNK) {
    AttSpan a;
    a.pos = (int)step[STEP_POS];
    a.len = a.pos + 1;
    a.clen = nch > 1 ? attn_chunk_len(a.len, nch, min_chunk) : a.len;
    a.n_c = (a.len + a.clen - 1) / a.clen;
    const size_t cap = (size_t)step[STEP_CAP];
    a.kc = (__half*)step[STEP_PTRS + layer] + (size_t)g * cap * hd;
    a.vc = (__half*)step[STEP_PTRS + n_layers + layer] + (size_t)g * cap * hd;
    return a;
}

// The step's new query, key and value for attention at position pos: RoPE on query heads
// h0 .. h0 + ng - 1 (into q, hd apart) and on KV group g's key (into kn), the group's
// value into vn, all rounded to f16; then, where `write`, the new K/V into the cache
// slot pos of kc/vc. Ends with the block's barrier before the write.
__device__ __forceinline__ void att_new_qkv(const float* __restrict__ qkv, int h0, int ng,
                                            int g, int nh, int nkvh, int hd,
                                            const float* __restrict__ cos_t,
                                            const float* __restrict__ sin_t, int neox, int pos,
                                            float* q, float* kn, float* vn, bool write,
                                            __half* __restrict__ kc, __half* __restrict__ vc) {
    const int half = hd / 2;
    const int nq = nh * hd, nkv = nkvh * hd;
    const float* cs = cos_t + (size_t)pos * half;
    const float* sn = sin_t + (size_t)pos * half;
    const int tid = threadIdx.x, bd = blockDim.x;
    for (int i = tid; i < half; i += bd) {
        const int a = neox ? i : 2 * i;
        const int b = neox ? i + half : 2 * i + 1;
        const float c = cs[i], s = sn[i];
        for (int h = 0; h < ng; ++h) {
            const float x0 = qkv[(h0 + h) * hd + a], x1 = qkv[(h0 + h) * hd + b];
            q[h * hd + a] = round_f16(__fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s)));
            q[h * hd + b] = round_f16(__fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c)));
        }
        const float k0 = qkv[nq + g * hd + a], k1 = qkv[nq + g * hd + b];
        kn[a] = round_f16(__fsub_rn(__fmul_rn(k0, c), __fmul_rn(k1, s)));
        kn[b] = round_f16(__fadd_rn(__fmul_rn(k0, s), __fmul_rn(k1, c)));
    }
    for (int d = tid; d < hd; d += bd) vn[d] = round_f16(qkv[nq + nkv + g * hd + d]);
    __syncthreads();
    if (write) {
        for (int d = tid; d < hd; d += bd) {
            kc[(size_t)pos * hd + d] = __float2half_rn(kn[d]);
            vc[(size_t)pos * hd + d] = __float2half_rn(vn[d]);
        }
    }
}

// After a block's chunks of heads h0 .. h0 + ng - 1 (ng <= 32; `done` of them each, their
// slots `hstride` floats apart from hp): for each head, the block whose ticket in `cnt`
// brings its count to n_c combines its chunks into out (rows hd apart). `last` holds ng
// flags in shared memory.
__device__ __forceinline__ void att_tickets_combine(const float* hp, size_t hstride, int n_c,
                                                    int hd, float* __restrict__ out,
                                                    unsigned* __restrict__ cnt, int ng,
                                                    unsigned done, unsigned* last) {
    __threadfence();
    __syncthreads();
    const int tid = threadIdx.x;
    if (tid < ng) last[tid] = atomicAdd(cnt + tid, done) + done == (unsigned)n_c;
    __syncthreads();
    for (int h = 0; h < ng; ++h) {
        if (!last[h]) continue;
        att_combine(hp + (size_t)h * hstride, n_c, hd, out + (size_t)h * hd, cnt + h);
        __syncthreads();  // its weights are read before the next head's combination writes them
    }
}

