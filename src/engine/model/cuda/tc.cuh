// Batched mat-mat on tensor cores (included by decode.cu after prefill.cuh): the batched
// step's projections as int8 mma (m16n8k16: one half-block of 16 weight rows against 8
// columns), giving bit for bit the sums of the dp4a kernels (rows_dot) and so of the
// single-stream mat-vec.
//
// rows_dot splits a row over the 32 lanes of a warp: lane j sums the half-blocks
// i = j, j + 32, j + 64, ... in that order (each half-block's integer dot product, then
// its scales, rows_dot's f32 arithmetic), and the warp adds the 32 lane sums in
// warp_sum's tree (partners 16 apart first, then 8, 4, 2, 1). Here a block of TC_W
// warps takes 16 rows and 8 columns: warp w takes the half-blocks i = w (mod TC_W) in
// increasing order, keeping one sum per lane j = i mod 32 it stands for (TC_LEAVES of
// them), so each of those sums is the lane's own; then the warp adds its lanes' sums in
// the tree's order (partners 16 and 8 apart), and the block adds the warps' results in
// the rest of the tree (4, 2, 1) through shared memory. The integer dot product of a
// half-block is exact either way, and the f32 steps are the same operations on the same
// values in the same order. Needs sm_80.

#define TC_W 8                    // warps of a block
#define TC_LEAVES (32 / TC_W)     // lane sums a warp keeps

// out(n, ld): the step's n columns (activations quantized once a step by qcols_*: `pq`,
// `pds`) times the weight's rows, with matmat's epilogues. Grid (ceil(bucket / 8),
// ceil(rows / 16)): the column tiles of a row tile run side by side and share its
// weights in L2. 256 threads.
template <int KIND, int MODE>
__device__ void tc_matmat(const unsigned long long* __restrict__ step, int K,
                          const uint8_t* __restrict__ qs, const float2* __restrict__ dm,
                          const float* __restrict__ bias, int Nrows, float* __restrict__ out,
                          int ld, const int8_t* __restrict__ pq,
                          const float2* __restrict__ pds) {
#if __CUDA_ARCH__ >= 800
    constexpr int R = MODE == MODE_SWIGLU ? 2 : 1;
    __shared__ float red[TC_W / 2][R][32][4];
    const int nb = K / QK, nh = 2 * nb;
    const int rows = MODE == MODE_SWIGLU ? Nrows / 2 : Nrows;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int c0 = blockIdx.x * 8;
    const int r0 = blockIdx.y * 16;
    pdl_launch_dependents();
    {
        // Weights do not depend on the previous kernel: each half-warp starts one of the
        // block's rows (and its `up` twin) into L2 before waiting for the activations.
        const int r = r0 + 2 * warp + (lane >> 4);
        const int qb = KIND == KIND_Q8_0 ? 32 : 16;
        if (r < rows) {
            for (int m = 0; m < R; ++m) {
                const size_t row = (size_t)r + (size_t)m * rows;
                const uint8_t* wq = qs + row * nb * qb;
                for (int off = (lane & 15) * 128; off < nb * qb; off += 16 * 128)
                    prefetch_l2(wq + off);
                const uint8_t* wd = (const uint8_t*)dm + row * scale_bytes<KIND>(nb);
                for (int off = (lane & 15) * 128; off < scale_bytes<KIND>(nb); off += 16 * 128)
                    prefetch_l2(wd + off);
            }
        }
    }
    pdl_wait();
    const int n = (int)step[BSTEP_N];
    if (c0 >= n || r0 >= rows) return;  // the whole block
    // This lane's weight rows (g and g + 8 of the 16, for each of R matrices) and columns
    // (its b-fragment column, and the two of the accumulators it holds); rows and columns
    // past the end repeat a valid one and are not stored.
    int wr[R][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = min(r0 + g + 8 * i, rows - 1);
#pragma unroll
        for (int m = 0; m < R; ++m) wr[m][i] = r + m * rows;
    }
    const int colb = min(c0 + g, n - 1);
    const int ca = min(c0 + 2 * t, n - 1), cb = min(c0 + 2 * t + 1, n - 1);
    float acc[R][TC_LEAVES][4];
#pragma unroll
    for (int m = 0; m < R; ++m)
#pragma unroll
        for (int l = 0; l < TC_LEAVES; ++l)
            acc[m][l][0] = acc[m][l][1] = acc[m][l][2] = acc[m][l][3] = 0.f;
    // Half-blocks loaded ahead of their sums: all TC_LEAVES of an i0, or for SwiGLU's
    // two matrices half of them at a time (registers).
    constexpr int LA = R == 2 ? TC_LEAVES / 2 : TC_LEAVES;
    for (int i0 = warp; i0 < nh; i0 += 32) {
#pragma unroll
        for (int l0 = 0; l0 < TC_LEAVES; l0 += LA) {
            // Every load first (past the row's end: its last half-block again, not
            // summed), so that they are in flight together.
            int bw[LA], a[LA][R][2];
            float2 d[LA][2], sc[LA][R][2];
#pragma unroll
            for (int l = 0; l < LA; ++l) {
                const int i = min(i0 + TC_W * (l0 + l), nh - 1);
                const int b = i >> 1, h = i & 1;
                bw[l] = *(const int*)(pq + (size_t)colb * K + b * QK + h * 16 + 4 * t);
                d[l][0] = pds[(size_t)ca * nb + b];
                d[l][1] = pds[(size_t)cb * nb + b];
#pragma unroll
                for (int m = 0; m < R; ++m) {
#pragma unroll
                    for (int k = 0; k < 2; ++k) {
                        if (KIND == KIND_Q8_0) {
                            sc[l][m][k] = __ldg(dm + (size_t)wr[m][k] * nb + b);
                        } else {
                            const uint8_t* srow =
                                (const uint8_t*)dm + (size_t)wr[m][k] * scale_bytes<KIND>(nb);
                            sc[l][m][k] =
                                nibble_pair<KIND>(dm + (size_t)wr[m][k] * nb, srow, nb, b);
                        }
                        a[l][m][k] = a_word<KIND>(qs, nb, wr[m][k], b, h, t);
                    }
                }
            }
#pragma unroll
            for (int l = 0; l < LA; ++l) {
                const int i = i0 + TC_W * (l0 + l);  // lane warp + TC_W * (l0 + l)'s next
                if (i >= nh) continue;
                const int h = i & 1;
#pragma unroll
                for (int m = 0; m < R; ++m) {
                    int c[4];
                    mma_s8(c, a[l][m][0], a[l][m][1], bw[l]);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const float2 w = sc[l][m][e >> 1];
                        const float2 x = d[l][e & 1];
                        const float wd = KIND == KIND_Q8_0 ? (h ? w.y : w.x) : w.x;
                        float& z = acc[m][l0 + l][e];
                        z = __fmaf_rn(__fmul_rn(wd, x.x), (float)c[e], z);
                        if ((KIND == KIND_Q4_1 || KIND == KIND_Q4_K) && h == 0)
                            z = __fmaf_rn(w.y, x.y, z);
                    }
                }
            }
        }
    }
    // The warp's lanes j = warp + 8l (l = 0..3): partners 16 apart (l, l + 2), then 8.
    static_assert(TC_LEAVES == 4, "the in-warp tree below is written for 4 lane sums");
    float v[R][4];
#pragma unroll
    for (int m = 0; m < R; ++m)
#pragma unroll
        for (int e = 0; e < 4; ++e)
            v[m][e] = (acc[m][0][e] + acc[m][2][e]) + (acc[m][1][e] + acc[m][3][e]);
    // Across warps: partners 4 apart, then 2, then 1.
#pragma unroll
    for (int o = TC_W / 2; o > 0; o >>= 1) {
        if (warp >= o && warp < 2 * o) {
#pragma unroll
            for (int m = 0; m < R; ++m)
#pragma unroll
                for (int e = 0; e < 4; ++e) red[warp - o][m][lane][e] = v[m][e];
        }
        __syncthreads();
        if (warp < o) {
#pragma unroll
            for (int m = 0; m < R; ++m)
#pragma unroll
                for (int e = 0; e < 4; ++e) v[m][e] = v[m][e] + red[warp][m][lane][e];
        }
        __syncthreads();
    }
    if (warp != 0) return;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int r = r0 + g + 8 * (e >> 1);
        const int col = c0 + 2 * t + (e & 1);
        if (r >= rows || col >= n) continue;
        store_out<MODE>(out + (size_t)col * ld + r, v[0][e], v[R - 1][e], bias, r);
    }
#else
    __trap();
#endif
}

// SwiGLU's two weight matrices keep twice the loads in flight; at most 128 registers a
// thread there, so that two blocks share a multiprocessor.
#define TC_ENTRY(KIND, KNAME, MODE, MNAME, MINB)                                             \
    extern "C" __global__ void __launch_bounds__(256, MINB) tc_##KNAME##_##MNAME(            \
        const unsigned long long* __restrict__ step, int K, const uint8_t* __restrict__ qs,  \
        const float2* __restrict__ dm, const float* __restrict__ bias, int N,                \
        float* __restrict__ out, int ld, const int8_t* __restrict__ pq,                      \
        const float2* __restrict__ pds) {                                                    \
        tc_matmat<KIND, MODE>(step, K, qs, dm, bias, N, out, ld, pq, pds);                   \
    }
#define TC_ENTRIES(KIND, KNAME)                                                              \
    TC_ENTRY(KIND, KNAME, MODE_STORE, store, 1)                                              \
    TC_ENTRY(KIND, KNAME, MODE_ADD, add, 1)                                                  \
    TC_ENTRY(KIND, KNAME, MODE_SWIGLU, swiglu, 2)

TC_ENTRIES(KIND_Q4_0, q4_0)
TC_ENTRIES(KIND_Q4_1, q4_1)
TC_ENTRIES(KIND_Q8_0, q8_0)
TC_ENTRIES(KIND_Q4_K, q4_k)
