// Batched mat-mat on tensor cores (included by decode.cu after prefill.cuh): the batched
// step's projections as int8 mma (m16n8k16: one half-block of 16 weight rows against 8
// columns), giving bit for bit the sums of the dp4a kernels (rows_dot) and so of the
// single-stream mat-vec.
//
// rows_dot splits a row over the 32 lanes of a warp: lane j sums the half-blocks
// i = j, j + 32, j + 64, ... in that order (each half-block's integer dot product, then
// its scales, rows_dot's f32 arithmetic), and the warp adds the 32 lane sums in
// warp_sum's tree (partners 16 apart first, then 8, 4, 2, 1). Here a block of W warps
// takes 16 rows and 8 (or 32) columns: warp w takes the half-blocks i = w (mod W) in
// increasing order, keeping one sum per lane j = i mod 32 it stands for (32 / W of
// them), so each of those sums is the lane's own; then the warp adds its lanes' sums in
// the tree's order (the partners 16, ..., W apart), and the block adds the warps' results
// in the rest of the tree through shared memory. The integer dot product of a
// half-block is exact either way, and the f32 steps are the same operations on the same
// values in the same order. Needs sm_80.

// The end of a W-warp block's sums and its epilogue: each warp holds LPW lane sums per
// (matrix, column tile, accumulator) for lanes j = warp + W l; the tree's partners 16,
// ..., W apart are lane sums LPW / 2, ..., 1 apart in l (added in the warp), then
// partners W / 2, ..., 1 apart are warps (added through `red`: W / 2 * R * NT * 32 * 4
// floats of shared memory, free for it); warp 0 stores rows r0 + g (+ 8) of columns
// c0 + 8 j + 2 t (+ 1) with store_out<MODE>.
template <int MODE, int R, int LPW, int W, int NT>
__device__ __forceinline__ void tc_finish(float (&acc)[R][LPW][NT][4], float* red_mem, int warp,
                                          int lane, int r0, int c0, int rows, int n,
                                          float* __restrict__ out, int ld,
                                          const float* __restrict__ bias) {
    float(*red)[R][NT][32][4] = (float(*)[R][NT][32][4])red_mem;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int o = LPW / 2; o > 0; o >>= 1)
#pragma unroll
        for (int l = 0; l < o; ++l)
#pragma unroll
            for (int m = 0; m < R; ++m)
#pragma unroll
                for (int j = 0; j < NT; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[m][l][j][e] = acc[m][l][j][e] + acc[m][l + o][j][e];
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) {
        if (warp >= o && warp < 2 * o) {
#pragma unroll
            for (int m = 0; m < R; ++m)
#pragma unroll
                for (int j = 0; j < NT; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) red[warp - o][m][j][lane][e] = acc[m][0][j][e];
        }
        __syncthreads();
        if (warp < o) {
#pragma unroll
            for (int m = 0; m < R; ++m)
#pragma unroll
                for (int j = 0; j < NT; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        acc[m][0][j][e] = acc[m][0][j][e] + red[warp][m][j][lane][e];
        }
        __syncthreads();
    }
    if (warp != 0) return;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = r0 + g + 8 * (e >> 1);
            const int col = c0 + 8 * j + 2 * t + (e & 1);
            if (r >= rows || col >= n) continue;
            store_out<MODE>(out + (size_t)col * ld + r, acc[0][0][j][e], acc[R - 1][0][j][e],
                            bias, r);
        }
}

// out(n, ld): the step's n columns (activations quantized once a step by qcols_*: `pq`,
// `pds`) times the weight's rows, with matmat's epilogues. A block of W warps (8 or 16)
// takes 16 rows and NT tiles of 8 columns; warp w sums the half-blocks i = w (mod W),
// keeping the 32 / W lane sums it stands for. Grid (ceil(bucket / (8 NT)),
// ceil(rows / 16)): the column tiles of a row tile run side by side and share its
// weights in L2. 32 W threads.
template <int KIND, int MODE, int W, int NT>
__device__ void tc_matmat(const unsigned long long* __restrict__ step, int K,
                          const uint8_t* __restrict__ qs, const float2* __restrict__ dm,
                          const float* __restrict__ bias, int Nrows, float* __restrict__ out,
                          int ld, const int8_t* __restrict__ pq,
                          const float2* __restrict__ pds) {
#if __CUDA_ARCH__ >= 800
    constexpr int R = MODE == MODE_SWIGLU ? 2 : 1;
    constexpr int LPW = 32 / W;  // lane sums a warp keeps
    // Half-blocks loaded ahead of their sums (registers: fewer for more matrices or
    // column tiles).
    constexpr int LA = R * NT >= 4 ? 1 : (R * NT == 2 ? (LPW >= 2 ? 2 : 1) : LPW);
    static_assert(LPW % LA == 0, "loads ahead must divide the lane sums");
    __shared__ float red[W / 2][R][NT][32][4];
    const int nb = K / QK, nh = 2 * nb;
    const int rows = MODE == MODE_SWIGLU ? Nrows / 2 : Nrows;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int c0 = blockIdx.x * 8 * NT;
    const int r0 = blockIdx.y * 16;
    pdl_launch_dependents();
    if (warp < 8) {
        // Weights do not depend on the previous kernel: each half-warp of the first 8
        // warps starts one of the block's rows (and its `up` twin) into L2 before
        // waiting for the activations.
        const int r = r0 + 2 * warp + (lane >> 4);
        if (r < rows) {
            for (int m = 0; m < R; ++m)
                prefetch_row<KIND>(qs, dm, nb, (size_t)r + (size_t)m * rows, lane & 15, 16);
        }
    }
    pdl_wait();
    const int n = (int)step[BSTEP_N];
    if (c0 >= n || r0 >= rows) return;  // the whole block
    // This lane's weight rows (g and g + 8 of the 16, for each of R matrices) and columns
    // (per tile its b-fragment column, and the two of the accumulators it holds); rows
    // and columns past the end repeat a valid one and are not stored.
    int wr[R][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = min(r0 + g + 8 * i, rows - 1);
#pragma unroll
        for (int m = 0; m < R; ++m) wr[m][i] = r + m * rows;
    }
    int colb[NT], ca[NT], cb[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        colb[j] = min(c0 + 8 * j + g, n - 1);
        ca[j] = min(c0 + 8 * j + 2 * t, n - 1);
        cb[j] = min(c0 + 8 * j + 2 * t + 1, n - 1);
    }
    float acc[R][LPW][NT][4] = {};
    for (int i0 = warp; i0 < nh; i0 += 32) {
#pragma unroll
        for (int l0 = 0; l0 < LPW; l0 += LA) {
            // Every load first (past the row's end: its last half-block again, not
            // summed), so that they are in flight together.
            int bw[LA][NT], a[LA][R][2];
            float2 d[LA][NT][2], sc[LA][R][2];
#pragma unroll
            for (int l = 0; l < LA; ++l) {
                const int i = min(i0 + W * (l0 + l), nh - 1);
                const int b = i >> 1, h = i & 1;
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    bw[l][j] =
                        *(const int*)(pq + (size_t)colb[j] * K + b * QK + h * 16 + 4 * t);
                    d[l][j][0] = pds[(size_t)ca[j] * nb + b];
                    d[l][j][1] = pds[(size_t)cb[j] * nb + b];
                }
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
                const int i = i0 + W * (l0 + l);  // lane warp + W * (l0 + l)'s next
                if (i >= nh) continue;
                const int h = i & 1;
#pragma unroll
                for (int m = 0; m < R; ++m) {
#pragma unroll
                    for (int j = 0; j < NT; ++j) {
                        int c[4];
                        mma_s8(c, a[l][m][0], a[l][m][1], bw[l][j]);
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            mma_scale_add<KIND>(acc[m][l0 + l][j][e], sc[l][m][e >> 1],
                                                d[l][j][e & 1], h, c[e]);
                        }
                    }
                }
            }
        }
    }
    tc_finish<MODE, R, LPW, W, NT>(acc, &red[0][0][0][0][0], warp, lane, r0, c0, rows, n, out,
                                   ld, bias);
#else
    __trap();
#endif
}

// tc_*: 8 warps, one tile of 8 columns (batches of up to 8); tc32_*: 16 warps, four
// tiles (32 columns: a row tile's weights read once for 32 sequences). SwiGLU's two
// weight matrices: at most 128 registers a thread, so that two blocks share a
// multiprocessor.
#define TC_ENTRY(NAME, KIND, MODE, W, NT, MINB)                                              \
    extern "C" __global__ void __launch_bounds__(32 * W, MINB) NAME(                         \
        const unsigned long long* __restrict__ step, int K, const uint8_t* __restrict__ qs,  \
        const float2* __restrict__ dm, const float* __restrict__ bias, int N,                \
        float* __restrict__ out, int ld, const int8_t* __restrict__ pq,                      \
        const float2* __restrict__ pds) {                                                    \
        tc_matmat<KIND, MODE, W, NT>(step, K, qs, dm, bias, N, out, ld, pq, pds);            \
    }
#define TC_ENTRIES(KIND, KNAME)                                                              \
    TC_ENTRY(tc_##KNAME##_store, KIND, MODE_STORE, 8, 1, 1)                                  \
    TC_ENTRY(tc_##KNAME##_add, KIND, MODE_ADD, 8, 1, 1)                                      \
    TC_ENTRY(tc_##KNAME##_swiglu, KIND, MODE_SWIGLU, 8, 1, 2)                                \
    TC_ENTRY(tc32_##KNAME##_store, KIND, MODE_STORE, 16, 4, 1)                               \
    TC_ENTRY(tc32_##KNAME##_add, KIND, MODE_ADD, 16, 4, 1)                                   \
    TC_ENTRY(tc32_##KNAME##_swiglu, KIND, MODE_SWIGLU, 16, 4, 1)

TC_ENTRIES(KIND_Q4_0, q4_0)
TC_ENTRIES(KIND_Q4_1, q4_1)
TC_ENTRIES(KIND_Q8_0, q8_0)
TC_ENTRIES(KIND_Q4_K, q4_k)

// ---------------------------------------------------------------------------------
// tcs_*: tc_*'s sums (8 warps, 16 rows, 8 columns, the same order and operations) with
// the weights staged through shared memory: each round of 16 blocks (32 half-blocks)
// of the block's 16 rows is copied in with cp.async (16 bytes a thread, coalesced;
// the scales as f32 pairs), double-buffered, so that the warps build their A fragments
// and scales from shared memory instead of issuing scattered 4-byte loads to L1.

#if __CUDA_ARCH__ >= 800 && !defined(CANDELA_EMU)
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async8(void* smem, const void* gmem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

// Bytes of dynamic shared memory the block was launched with.
#ifndef CANDELA_EMU
__device__ __forceinline__ unsigned dyn_smem() {
    unsigned r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}
#endif

// The round pipeline of the staged kernels (tcs32_*, sum8.cuh's s8_*), given their
// copies of round k into stage buffer k % NS: stage_w(k) the weights, stage_a(k, n) the
// step's activations. staged_start: round 0's weights before waiting for the previous
// kernel (they do not depend on it), then the step's column count n; when the block has
// work (column c0 < n, row r0 < rows), round 0's activations and rounds 1 .. NS - 2, a
// commit group a round (empty past the end). Returns n, or 0 for a block with none (its
// copies waited for).
template <int NS, class SW, class SA>
__device__ __forceinline__ int staged_start(const SW& stage_w, const SA& stage_a,
                                            const unsigned long long* __restrict__ step,
                                            int c0, int r0, int rows, int rounds) {
    stage_w(0);
    pdl_wait();
    const int n = (int)step[BSTEP_N];
    if (c0 >= n || r0 >= rows) {  // the whole block
        cp_async_commit();
        cp_async_wait<0>();
        return 0;
    }
    stage_a(0, n);
    cp_async_commit();
#pragma unroll
    for (int k = 1; k < NS - 1; ++k) {
        if (k < rounds) {
            stage_w(k);
            stage_a(k, n);
        }
        cp_async_commit();
    }
    return n;
}

// Before round k: round k + NS - 1 into the buffer round k - 1 used (free since the
// barrier after it), then wait for round k's copies.
template <int NS, class SW, class SA>
__device__ __forceinline__ void staged_next(const SW& stage_w, const SA& stage_a, int k,
                                            int rounds, int n) {
    if (k + NS - 1 < rounds) {
        stage_w(k + NS - 1);
        stage_a(k + NS - 1, n);
    }
    cp_async_commit();
    cp_async_wait<NS - 1>();
    __syncthreads();
}

#define TCS_BLOCKS 16  // 32-value blocks of a row a round stages

template <int KIND, int MODE>
__device__ void tcs_matmat(const unsigned long long* __restrict__ step, int K,
                           const uint8_t* __restrict__ qs, const float2* __restrict__ dm,
                           const float* __restrict__ bias, int Nrows, float* __restrict__ out,
                           int ld, const int8_t* __restrict__ pq,
                           const float2* __restrict__ pds) {
#if __CUDA_ARCH__ >= 800
    constexpr int R = MODE == MODE_SWIGLU ? 2 : 1;
    constexpr int QB = KIND == KIND_Q8_0 ? 32 : 16;  // bytes of a block's values
    constexpr int W = 8, LPW = 4;
    // Rows padded by 16 bytes (one f32 pair) so that the 8 rows a fragment load reads
    // fall in different banks.
    __shared__ __align__(16) uint8_t sw[2][R][16][TCS_BLOCKS * QB + 16];
    __shared__ float2 ssc[2][R][16][TCS_BLOCKS + 1];
    __shared__ float red[W / 2][R][32][4];
    const int nb = K / QK, nh = 2 * nb;
    const int rows = MODE == MODE_SWIGLU ? Nrows / 2 : Nrows;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int c0 = blockIdx.x * 8;
    const int r0 = blockIdx.y * 16;
    pdl_launch_dependents();
    // Stage round k (blocks 16k .. 16k + 15 of the 16 rows) into buffer k & 1: values by
    // 16-byte copies, scales as (scale, offset) pairs.
    auto stage = [&](int k) {
        const int b0 = k * TCS_BLOCKS;
        const int nbk = min(TCS_BLOCKS, nb - b0);
        constexpr int CH = TCS_BLOCKS * QB / 16;  // 16-byte chunks of a row's round
        for (int c = threadIdx.x; c < R * 16 * CH; c += blockDim.x) {
            const int m = c / (16 * CH), rr = (c / CH) % 16, ch = c % CH;
            if (ch * 16 >= nbk * QB) continue;
            const int r = min(r0 + rr, rows - 1) + m * rows;
            cp_async16(&sw[k & 1][m][rr][ch * 16], qs + ((size_t)r * nb + b0) * QB + ch * 16);
        }
        for (int c = threadIdx.x; c < R * 16 * TCS_BLOCKS; c += blockDim.x) {
            const int m = c / (16 * TCS_BLOCKS), rr = (c / TCS_BLOCKS) % 16, bb = c % TCS_BLOCKS;
            if (bb >= nbk) continue;
            const int r = min(r0 + rr, rows - 1) + m * rows;
            if (KIND == KIND_Q4_K) {
                const uint8_t* srow = (const uint8_t*)dm + (size_t)r * scale_bytes<KIND>(nb);
                ssc[k & 1][m][rr][bb] = nibble_pair<KIND>(dm + (size_t)r * nb, srow, nb, b0 + bb);
            } else {
                cp_async8(&ssc[k & 1][m][rr][bb], dm + (size_t)r * nb + b0 + bb);
            }
        }
        cp_async_commit();
    };
    // The weights do not depend on the previous kernel: the first round's copies start
    // before waiting for it.
    stage(0);
    pdl_wait();
    const int n = (int)step[BSTEP_N];
    if (c0 >= n || r0 >= rows) {  // the whole block
        cp_async_wait<0>();
        return;
    }
    const int colb = min(c0 + g, n - 1);
    const int ca = min(c0 + 2 * t, n - 1), cb = min(c0 + 2 * t + 1, n - 1);
    float acc[R][LPW][4];
#pragma unroll
    for (int m = 0; m < R; ++m)
#pragma unroll
        for (int l = 0; l < LPW; ++l) acc[m][l][0] = acc[m][l][1] = acc[m][l][2] = acc[m][l][3] = 0.f;
    const int rounds = (nb + TCS_BLOCKS - 1) / TCS_BLOCKS;
    for (int k = 0; k < rounds; ++k) {
        if (k + 1 < rounds) {
            stage(k + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const int buf = k & 1;
#pragma unroll
        for (int l = 0; l < LPW; ++l) {
            const int il = warp + W * l;  // the round's half-block: lane il's next
            const int i = 32 * k + il;
            if (i >= nh) continue;
            const int bl = il >> 1, h = il & 1, b = 32 * k / 2 + bl;
            const int bw = *(const int*)(pq + (size_t)colb * K + b * QK + h * 16 + 4 * t);
            const float2 d[2] = {pds[(size_t)ca * nb + b], pds[(size_t)cb * nb + b]};
#pragma unroll
            for (int m = 0; m < R; ++m) {
                int a[2];
                float2 sc[2];
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                    const uint8_t* wb = &sw[buf][m][g + 8 * q][bl * QB];
                    a[q] = a_word_staged<KIND>(wb, h, t);
                    sc[q] = ssc[buf][m][g + 8 * q][bl];
                }
                int c[4];
                mma_s8(c, a[0], a[1], bw);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    mma_scale_add<KIND>(acc[m][l][e], sc[e >> 1], d[e & 1], h, c[e]);
                }
            }
        }
        __syncthreads();  // the next round's copies go into this buffer
    }
    float v[R][4];
#pragma unroll
    for (int m = 0; m < R; ++m)
#pragma unroll
        for (int e = 0; e < 4; ++e)
            v[m][e] = (acc[m][0][e] + acc[m][2][e]) + (acc[m][1][e] + acc[m][3][e]);
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) {
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

#define TCS_ENTRY(KIND, KNAME, MODE, MNAME)                                                  \
    extern "C" __global__ void __launch_bounds__(256) tcs_##KNAME##_##MNAME(                 \
        const unsigned long long* __restrict__ step, int K, const uint8_t* __restrict__ qs,  \
        const float2* __restrict__ dm, const float* __restrict__ bias, int N,                \
        float* __restrict__ out, int ld, const int8_t* __restrict__ pq,                      \
        const float2* __restrict__ pds) {                                                    \
        tcs_matmat<KIND, MODE>(step, K, qs, dm, bias, N, out, ld, pq, pds);                  \
    }
#define TCS_ENTRIES(KIND, KNAME)                                                             \
    TCS_ENTRY(KIND, KNAME, MODE_STORE, store)                                                \
    TCS_ENTRY(KIND, KNAME, MODE_ADD, add)                                                    \
    TCS_ENTRY(KIND, KNAME, MODE_SWIGLU, swiglu)

TCS_ENTRIES(KIND_Q4_0, q4_0)
TCS_ENTRIES(KIND_Q4_1, q4_1)
TCS_ENTRIES(KIND_Q8_0, q8_0)
TCS_ENTRIES(KIND_Q4_K, q4_k)

// ---------------------------------------------------------------------------------
// tcs32_*: tc32_*'s sums (16 warps, 16 rows, 32 columns: four tiles of 8, the same order
// and operations) with everything a round reads staged through shared memory by
// cp.async, double-buffered: the weights' values and scales (Q4_K's raw super-block pair
// and 6-bit bytes, formed into (scale, offset) pairs as nibble_pair forms them when
// used) and the step's quantized activations and their scales. A round is 8 blocks (16
// half-blocks) of the 16 rows; warp w takes half-block w of each round, so over two
// rounds it stands for lanes w and w + 16 of the mat-vec's tree, as tc32's warps do.
// tcs32w_*: the same with rounds of 16 blocks (32 half-blocks): warp w takes half-blocks
// w and w + 16 of each round (lanes w and w + 16), half the rounds and barriers for
// twice the work between them (the default: 8-9 % faster on Llama-3-8B's shape on an
// H100). tcs32p_*: rounds of 8 with four stage buffers, three rounds' copies in flight
// while one is multiplied.

// A compile-time lane-sum index, for tcs32's half-block lambda.
template <int L>
struct LaneSum {
    static constexpr int value = L;
};

template <int KIND, int R, int RB, int NC = 32>
struct Tcs32Stage {
    static constexpr int QB = KIND == KIND_Q8_0 ? 32 : 16;
    // Rows padded by 16 bytes so that a fragment's 8 rows (columns) fall in different
    // banks.
    uint8_t w[R][16][RB * QB + 16];
    float2 wsc[R][16][RB];     // (scale, offset) or Q8_0's two half scales
    float2 kdd[R][16][RB / 8]; // Q4_K: the round's super-blocks' (d, -dmin)
    uchar2 ksm[R][16][RB];     // Q4_K: the blocks' 6-bit (sc, m)
    uint8_t act[NC][RB * QK + 16];  // NC columns: 32, or 16 (tcs16_*)
    float2 asc[NC][RB];
};

// Bytes of a Tcs32Stage, spelled out (the host computes the same to size tcs32w's
// dynamic shared memory; every part is a multiple of 16 bytes).
__host__ __device__ constexpr int tcs32_stage_bytes(int qb, int r, int rb, int nc) {
    return r * 16 * (rb * qb + 16) + r * 16 * rb * 8 + r * 16 * (rb / 8) * 8 + r * 16 * rb * 2 +
           nc * (rb * QK + 16) + nc * rb * 8;
}

template <int KIND, int MODE, int RB, int NS, int NT = 4>
__device__ void tcs32_matmat(const unsigned long long* __restrict__ step, int K,
                             const uint8_t* __restrict__ qs, const float2* __restrict__ dm,
                             const float* __restrict__ bias, int Nrows,
                             float* __restrict__ out, int ld, const int8_t* __restrict__ pq,
                             const float2* __restrict__ pds, uint8_t* smem) {
#if __CUDA_ARCH__ >= 800
    constexpr int R = MODE == MODE_SWIGLU ? 2 : 1;
    constexpr int W = 16, LPW = 32 / W, HB = 2 * RB, NC = 8 * NT;
    static_assert(RB == 8 || RB == 16, "rounds of 8 or 16 blocks");
    static_assert(NS >= 2 && NS <= 4, "two to four stage buffers");
    static_assert(NT == 2 || NT == 4, "16 or 32 columns");
    using St = Tcs32Stage<KIND, R, RB, NC>;
    constexpr int QB = St::QB;
    static_assert(sizeof(St) == tcs32_stage_bytes(QB, R, RB, NC), "the host's size of the stage");
    constexpr int RED = (W / 2) * R * NT * 32 * 4 * (int)sizeof(float);
    static_assert(RED <= NS * (int)sizeof(St), "the reduction reuses the stage buffers");
    St* stg = (St*)smem;
    const int nb = K / QK, nh = 2 * nb;
    const int rows = MODE == MODE_SWIGLU ? Nrows / 2 : Nrows;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int c0 = blockIdx.x * 8 * NT;
    const int r0 = blockIdx.y * 16;
    pdl_launch_dependents();
    // The weights of round k into buffer k % NS.
    auto stage_w = [&](int k) {
        St& s = stg[k % NS];
        const int b0 = k * RB, nbk = min(RB, nb - b0);
        constexpr int CH = RB * QB / 16;  // 16-byte chunks of a row's round
        for (int c = threadIdx.x; c < R * 16 * CH; c += blockDim.x) {
            const int m = c / (16 * CH), rr = (c / CH) % 16, ch = c % CH;
            if (ch * 16 >= nbk * QB) continue;
            const int r = min(r0 + rr, rows - 1) + m * rows;
            cp_async16(&s.w[m][rr][ch * 16], qs + ((size_t)r * nb + b0) * QB + ch * 16);
        }
        if (KIND == KIND_Q4_K) {
            // Per row: the super-block pairs (rounds are super-block aligned: 8 blocks a
            // super-block, K a multiple of 256) and the blocks' byte pairs, 8 bytes (4
            // blocks) a copy.
            constexpr int SB = RB / 8, PARTS = SB + RB / 4;
            for (int c = threadIdx.x; c < R * 16 * PARTS; c += blockDim.x) {
                const int m = c / (16 * PARTS), rr = (c / PARTS) % 16, part = c % PARTS;
                const int r = min(r0 + rr, rows - 1) + m * rows;
                const uint8_t* srow = (const uint8_t*)dm + (size_t)r * scale_bytes<KIND>(nb);
                if (part < SB) {
                    if (8 * part < nbk) cp_async8(&s.kdd[m][rr][part], srow + 8 * ((b0 >> 3) + part));
                } else {
                    const int q = part - SB;
                    if (4 * q < nbk) cp_async8(&s.ksm[m][rr][4 * q], srow + nb + 2 * b0 + 8 * q);
                }
            }
        } else {
            for (int c = threadIdx.x; c < R * 16 * RB; c += blockDim.x) {
                const int m = c / (16 * RB), rr = (c / RB) % 16, bb = c % RB;
                if (bb >= nbk) continue;
                const int r = min(r0 + rr, rows - 1) + m * rows;
                cp_async8(&s.wsc[m][rr][bb], dm + (size_t)r * nb + b0 + bb);
            }
        }
    };
    // The step's activations of round k (columns past the step's n repeat its last).
    auto stage_a = [&](int k, int n) {
        St& s = stg[k % NS];
        const int b0 = k * RB, nbk = min(RB, nb - b0);
        for (int c = threadIdx.x; c < NC * RB * 2; c += blockDim.x) {
            const int cc = c / (RB * 2), ch = c % (RB * 2);
            if (ch >= nbk * 2) continue;
            const int col = min(c0 + cc, n - 1);
            cp_async16(&s.act[cc][ch * 16], pq + (size_t)col * K + b0 * QK + ch * 16);
        }
        for (int c = threadIdx.x; c < NC * RB; c += blockDim.x) {
            const int cc = c / RB, bb = c % RB;
            if (bb >= nbk) continue;
            const int col = min(c0 + cc, n - 1);
            cp_async8(&s.asc[cc][bb], pds + (size_t)col * nb + b0 + bb);
        }
    };
    const int rounds = (nb + RB - 1) / RB;
    const int n = staged_start<NS>(stage_w, stage_a, step, c0, r0, rows, rounds);
    if (n == 0) return;
    float acc[R][LPW][NT][4] = {};
    // Half-block `il` of the staged round `s` (block il / 2, half il % 2) into the lane
    // sums acc[.][L] (L: the lane it stands for is w + 16 L).
    auto half = [&](const St& s, int il, auto lc) {
        constexpr int L = decltype(lc)::value;
        const int bl = il >> 1, h = il & 1;
        int a[R][2];
        float2 sc[R][2];
#pragma unroll
        for (int m = 0; m < R; ++m) {
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const uint8_t* wb = &s.w[m][g + 8 * q][bl * QB];
                a[m][q] = a_word_staged<KIND>(wb, h, t);
                if (KIND == KIND_Q4_K) {
                    // nibble_pair's arithmetic on the staged bytes.
                    sc[m][q] = q4k_pair(s.kdd[m][g + 8 * q][bl >> 3], s.ksm[m][g + 8 * q][bl]);
                } else {
                    sc[m][q] = s.wsc[m][g + 8 * q][bl];
                }
            }
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int bw = *(const int*)&s.act[8 * j + g][bl * QK + h * 16 + 4 * t];
            const float2 d[2] = {s.asc[8 * j + 2 * t][bl], s.asc[8 * j + 2 * t + 1][bl]};
#pragma unroll
            for (int m = 0; m < R; ++m) {
                int c[4];
                mma_s8(c, a[m][0], a[m][1], bw);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    mma_scale_add<KIND>(acc[m][L][j][e], sc[m][e >> 1], d[e & 1], h, c[e]);
                }
            }
        }
    };
    auto next = [&](int k) { staged_next<NS>(stage_w, stage_a, k, rounds, n); };
    if constexpr (RB == 8) {
        // Two rounds a turn, so that the lane a half-block stands for (w, then w + 16)
        // is known at compile time.
        for (int k0 = 0; k0 < rounds; k0 += 2) {
#pragma unroll
            for (int l = 0; l < 2; ++l) {
                const int k = k0 + l;
                if (k < rounds) {
                    next(k);
                    if (HB * k + warp < nh) {
                        if (l == 0)
                            half(stg[k % NS], warp, LaneSum<0>{});
                        else
                            half(stg[k % NS], warp, LaneSum<1>{});
                    }
                    __syncthreads();  // the next round's copies go into this buffer
                }
            }
        }
    } else {
        for (int k = 0; k < rounds; ++k) {
            next(k);
            if (HB * k + warp < nh) half(stg[k % NS], warp, LaneSum<0>{});
            if (HB * k + 16 + warp < nh)
                half(stg[k % NS], 16 + warp, LaneSum<1>{});
            __syncthreads();  // the next round's copies go into this buffer
        }
    }
    // The stage buffers are free now: the reduction's room.
    tc_finish<MODE, R, LPW, W, NT>(acc, (float*)smem, warp, lane, r0, c0, rows, n, out, ld, bias);
#else
    __trap();
#endif
}

// One matrix: at most 64 registers a thread, so that two blocks share a multiprocessor;
// SwiGLU's two: one block. tcs32_*: rounds of 8 blocks, two stage buffers (static shared
// memory); tcs32w_*: rounds of 16, two buffers; tcs32p_*: rounds of 8, four buffers (three
// rounds' copies in flight); tcs16_*: tcs32w_*'s rounds for 16 columns (two tiles of 8:
// batches of 9 to 16 no longer multiply 16 repeated columns), two blocks a multiprocessor
// for SwiGLU too (half the accumulators). The last three take NS stage buffers of
// dynamic shared memory (batch_plan::tcs32_stage_bytes each) and check that they got
// them.
#define TCS32_SIG(NAME, MINB)                                                                \
    extern "C" __global__ void __launch_bounds__(512, MINB) NAME(                            \
        const unsigned long long* __restrict__ step, int K, const uint8_t* __restrict__ qs,  \
        const float2* __restrict__ dm, const float* __restrict__ bias, int N,                \
        float* __restrict__ out, int ld, const int8_t* __restrict__ pq,                      \
        const float2* __restrict__ pds)
#define TCS32_DYN(NAME, KIND, MODE, MINB, RB, NS, NT)                                        \
    TCS32_SIG(NAME, MINB) {                                                                  \
        constexpr int R = MODE == MODE_SWIGLU ? 2 : 1;                                       \
        DYN_SMEM(uint8_t, dsmem);                                                            \
        if (dyn_smem() < NS * sizeof(Tcs32Stage<KIND, R, RB, 8 * NT>)) __trap();             \
        tcs32_matmat<KIND, MODE, RB, NS, NT>(step, K, qs, dm, bias, N, out, ld, pq, pds,     \
                                             dsmem);                                         \
    }
#define TCS32_ENTRY(KIND, KNAME, MODE, MNAME, MINB)                                          \
    TCS32_SIG(tcs32_##KNAME##_##MNAME, MINB) {                                               \
        constexpr int R = MODE == MODE_SWIGLU ? 2 : 1;                                       \
        __shared__ __align__(16) uint8_t smem[2 * sizeof(Tcs32Stage<KIND, R, 8>)];           \
        tcs32_matmat<KIND, MODE, 8, 2>(step, K, qs, dm, bias, N, out, ld, pq, pds, smem);    \
    }                                                                                        \
    TCS32_DYN(tcs32w_##KNAME##_##MNAME, KIND, MODE, MINB, 16, 2, 4)                          \
    TCS32_DYN(tcs32p_##KNAME##_##MNAME, KIND, MODE, MINB, 8, 4, 4)                           \
    TCS32_DYN(tcs16_##KNAME##_##MNAME, KIND, MODE, 2, 16, 2, 2)
#define TCS32_ENTRIES(KIND, KNAME)                                                           \
    TCS32_ENTRY(KIND, KNAME, MODE_STORE, store, 2)                                           \
    TCS32_ENTRY(KIND, KNAME, MODE_ADD, add, 2)                                               \
    TCS32_ENTRY(KIND, KNAME, MODE_SWIGLU, swiglu, 1)

TCS32_ENTRIES(KIND_Q4_0, q4_0)
TCS32_ENTRIES(KIND_Q4_1, q4_1)
TCS32_ENTRIES(KIND_Q8_0, q8_0)
TCS32_ENTRIES(KIND_Q4_K, q4_k)
