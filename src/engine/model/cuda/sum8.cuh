// Sums in eight parts (`CANDELA_CUDA_SUM8=1`, cards of compute capability 8.0 and
// later; included by decode.cu after tc.cuh): a second order of the projections' f32
// arithmetic, shared by a single-stream mat-vec (mv8_*, mvq8_*) and a batched
// tensor-core mat-mat (s8_*) so that batched steps stay bit for bit the single-stream
// ones, shaped for the tensor cores rather than for a warp per row.
//
// The order: a row's 32-value blocks b are summed in eight parts, part p taking the
// blocks b = p, p + 8, p + 16, ... in increasing order. Each block adds to its part
//   nibble kinds: z = fma(wd * xd, s, z), then z = fma(wm, xs, z) for Q4_1 and Q4_K
//                 (s: the integer dot of the block's 32 values; Q4_0's offset of 8 taken
//                 out in integers);
//   KIND_Q8_0:    z = fma(w0 * xd, s0, z), then z = fma(w1 * xd, s1, z) (each half of the
//                 block with its own scale: Q6_K's sub-blocks);
// and the parts are added as ((z0 + z4) + (z2 + z6)) + ((z1 + z5) + (z3 + z7)) (a
// shuffle tree over 8 lanes, or the warps of a block through shared memory; float
// addition commutes, so both give these bits). Against the 32-lane order of rows_dot a
// block's scales are applied once instead of once per half, and an output has 8 partial
// sums instead of 32, so that a tensor-core block can hold many rows' sums in registers
// and read each staged column of activations for all of them.
//
// mv8: a warp takes 4 rows, 8 lanes a row (lane 8 r + p: part p of row r); the block's
// 16 bytes of nibbles (or 32 of Q8_0) in one load. s8: a block of 8 warps takes 16 RT
// rows (of each of R matrices) and 8 NT columns; warp w is part w: it multiplies the
// blocks w, w + 8, ... of its rows against the columns with m16n8k32 (Q8_0: two
// m16n8k16, one a half), rounds of RB blocks staged through shared memory by cp.async
// (two to four rounds in flight).

#define S8_PARTS 8

// Block b of weight row `row` as stored (16 bytes of nibbles, or Q8_0's 32 bytes in w
// and w8) and its scale pair.
template <int KIND>
struct S8Block {
    uint4 w;
    uint4 w8;  // Q8_0: the second 16 bytes
    float2 sc;
};

template <int KIND>
__device__ __forceinline__ S8Block<KIND> s8_load(const uint8_t* __restrict__ qs,
                                                 const float2* __restrict__ dm, int row,
                                                 int nb, int b) {
    S8Block<KIND> r;
    if (KIND == KIND_Q8_0) {
        const uint4* p = (const uint4*)(qs + ((size_t)row * nb + b) * 32);
        r.w = __ldg(p);
        r.w8 = __ldg(p + 1);
        r.sc = __ldg(dm + (size_t)row * nb + b);
    } else {
        r.w = __ldg((const uint4*)(qs + ((size_t)row * nb + b) * 16));
        const uint8_t* srow = (const uint8_t*)dm + (size_t)row * scale_bytes<KIND>(nb);
        r.sc = nibble_pair<KIND>(dm + (size_t)row * nb, srow, nb, b);
    }
    return r;
}

__device__ __forceinline__ int dot16(int4 w, int4 a, int s) {
    s = __dp4a(w.x, a.x, s);
    s = __dp4a(w.y, a.y, s);
    s = __dp4a(w.z, a.z, s);
    return __dp4a(w.w, a.w, s);
}

// One block of a row into its part z (the order above); xq: the column's 32 quantized
// values of the block (quantize_cols' layout: a nibble kind's elements 0-7, 16-23, 8-15,
// 24-31, matching the low then high nibbles of bytes 0-7, then of bytes 8-15), ds: their
// (scale, scale * sum).
template <int KIND>
__device__ __forceinline__ float s8_add(float z, const S8Block<KIND>& wb, const int8_t* xq,
                                        float2 ds) {
    const int4 a0 = *(const int4*)xq, a1 = *(const int4*)(xq + 16);
    const float2 sc = wb.sc;
    if (KIND == KIND_Q8_0) {
        const int4 w0 = make_int4((int)wb.w.x, (int)wb.w.y, (int)wb.w.z, (int)wb.w.w);
        const int4 w1 = make_int4((int)wb.w8.x, (int)wb.w8.y, (int)wb.w8.z, (int)wb.w8.w);
        const int s0 = dot16(w0, a0, 0), s1 = dot16(w1, a1, 0);
        z = __fmaf_rn(__fmul_rn(sc.x, ds.x), (float)s0, z);
        return __fmaf_rn(__fmul_rn(sc.y, ds.x), (float)s1, z);
    }
    const unsigned m = 0x0f0f0f0fu;
    const uint4 w = wb.w;
    const int4 w0 = make_int4((int)(w.x & m), (int)(w.y & m), (int)((w.x >> 4) & m),
                              (int)((w.y >> 4) & m));
    const int4 w1 = make_int4((int)(w.z & m), (int)(w.w & m), (int)((w.z >> 4) & m),
                              (int)((w.w >> 4) & m));
    int s = dot16(w1, a1, dot16(w0, a0, 0));
    if (KIND == KIND_Q4_0) {
        const int4 one = make_int4(0x01010101, 0x01010101, 0x01010101, 0x01010101);
        s -= 8 * dot16(one, a1, dot16(one, a0, 0));
    }
    z = __fmaf_rn(__fmul_rn(sc.x, ds.x), (float)s, z);
    if (KIND == KIND_Q4_1 || KIND == KIND_Q4_K) z = __fmaf_rn(sc.y, ds.y, z);
    return z;
}

// Before a mat-vec waits for its input: each warp starts its first 4 rows (and their `up`
// twins) into L2, 8 lanes a row.
template <int KIND, int MODE>
__device__ __forceinline__ void mv_prefetch8(const uint8_t* __restrict__ qs,
                                             const float2* __restrict__ dm, int nb, int rows) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int r = 4 * (blockIdx.x * nw + warp) + (lane >> 3);
    if (r < rows) {
        for (int t = 0; t < (MODE == MODE_SWIGLU ? 2 : 1); ++t)
            prefetch_row<KIND>(qs, dm, nb, (size_t)r + (size_t)t * rows, lane & 7, 8);
    }
}

// The single-stream rows: each warp of the grid takes 4 rows at a time (grid-stride),
// against the activations in shared memory (sq, sds). A lane has U blocks of a row in
// flight at once (a row's part has nb / 8 of them: 16 on rows of 4,096).
template <int KIND, int MODE>
__device__ __forceinline__ void mv_rows8(const int8_t* sq, const float2* sds, int K,
                                         const uint8_t* __restrict__ qs,
                                         const float2* __restrict__ dm,
                                         const float* __restrict__ bias, int rows,
                                         float* __restrict__ out) {
    constexpr int R = MODE == MODE_SWIGLU ? 2 : 1;
    constexpr int U = R == 1 ? 8 : 2;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int p = lane & 7, rr = lane >> 3;
    const int nb = K / QK;
    for (int q = blockIdx.x * nw + warp; 4 * q < rows; q += gridDim.x * nw) {
        const int r = min(4 * q + rr, rows - 1);
        float z[R];
#pragma unroll
        for (int m = 0; m < R; ++m) z[m] = 0.f;
        for (int b0 = p; b0 < nb; b0 += S8_PARTS * U) {
            S8Block<KIND> wb[U][R];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int b = min(b0 + S8_PARTS * u, nb - 1);  // past the end: not added
#pragma unroll
                for (int m = 0; m < R; ++m) wb[u][m] = s8_load<KIND>(qs, dm, r + m * rows, nb, b);
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int b = b0 + S8_PARTS * u;
                if (b < nb) {
#pragma unroll
                    for (int m = 0; m < R; ++m)
                        z[m] = s8_add<KIND>(z[m], wb[u][m], sq + b * QK, sds[b]);
                }
            }
        }
#pragma unroll
        for (int o = 4; o > 0; o >>= 1)
#pragma unroll
            for (int m = 0; m < R; ++m) z[m] = z[m] + __shfl_xor_sync(0xffffffffu, z[m], o);
        const int ro = 4 * q + rr;
        if (p == 0 && ro < rows) store_out<MODE>(out + ro, z[0], z[R - 1], bias, ro);
    }
}

// mv8_* and mvq8_*: mv_* and mvq_* (decode.cu's matvec) with rows in this order.
#define MATVEC8_ENTRY(KIND, KNAME, MODE, MNAME)                                             \
    extern "C" __global__ void mv8_##KNAME##_##MNAME(                                       \
        const float* __restrict__ x, const float* __restrict__ norm, float eps, int K,      \
        const uint8_t* __restrict__ qs, const float2* __restrict__ dm,                      \
        const float* __restrict__ bias, int N, float* __restrict__ out) {                   \
        matvec<KIND, MODE, true>(x, norm, eps, K, qs, dm, bias, N, out);                    \
    }                                                                                       \
    extern "C" __global__ void mvq8_##KNAME##_##MNAME(                                      \
        const int8_t* __restrict__ q, const float2* __restrict__ ds, int K,                 \
        const uint8_t* __restrict__ qs, const float2* __restrict__ dm,                      \
        const float* __restrict__ bias, int N, float* __restrict__ out) {                   \
        matvec<KIND, MODE, true>(nullptr, nullptr, 0.f, K, qs, dm, bias, N, out, q, ds);    \
    }
#define MATVEC8_ENTRIES(KIND, KNAME)                                                        \
    MATVEC8_ENTRY(KIND, KNAME, MODE_STORE, store)                                           \
    MATVEC8_ENTRY(KIND, KNAME, MODE_ADD, add)                                               \
    MATVEC8_ENTRY(KIND, KNAME, MODE_SWIGLU, swiglu)

MATVEC8_ENTRIES(KIND_Q4_0, q4_0)
MATVEC8_ENTRIES(KIND_Q4_1, q4_1)
MATVEC8_ENTRIES(KIND_Q8_0, q8_0)
MATVEC8_ENTRIES(KIND_Q4_K, q4_k)

// ---------------------------------------------------------------------------------
// s8_*: the batched mat-mat in this order on tensor cores.

#if __CUDA_ARCH__ >= 800 && !defined(CANDELA_EMU)
// c (16x8, s32) = a (16x32, s8, row) * b (32x8, s8, col).
__device__ __forceinline__ void mma_s8_k32(int* c, const int (&a)[4], const int (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%10,%10,%10};\n"
        : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(0));
}
#endif

// Byte layout of one stage buffer (batch_plan::s8_stage_bytes mirrors it): RR staged
// weight rows (R matrices of 16 RT rows) of RB blocks, each row padded by 16 bytes; their
// scales (Q4_K: per row the round's super-block pairs, then the blocks' 6-bit byte pairs
// padded by 8 bytes; else per row RB + 1 pairs); NC columns of RB blocks of activations,
// each padded by 16 bytes; their scale pairs, RB + 1 a column. The paddings put the 8
// rows (columns) a fragment load reads in different banks.
template <int KIND, int RR, int NC, int RB>
struct S8Layout {
    static constexpr int QB = KIND == KIND_Q8_0 ? 32 : 16;
    static constexpr int WROW = RB * QB + 16;
    static constexpr int KDDROW = (RB / 8) * 8;
    static constexpr int KSMROW = RB * 2 + 8;
    static constexpr int WSCROW = (RB + 1) * 8;
    static constexpr int SC = RR * WROW;
    static constexpr int KSM = SC + RR * KDDROW;
    static constexpr int SCB = KIND == KIND_Q4_K ? RR * KDDROW + RR * KSMROW : RR * WSCROW;
    static constexpr int ACT = (SC + SCB + 15) / 16 * 16;
    static constexpr int AROW = RB * QK + 16;
    static constexpr int ASCROW = (RB + 1) * 8;
    static constexpr int ASC = ACT + NC * AROW;
    static constexpr int BYTES = (ASC + NC * ASCROW + 15) / 16 * 16;
};

// The rounds' blocks of a kind: Q4_K's rounds cover whole super-blocks (8 blocks).
template <int KIND>
__host__ __device__ constexpr int s8_round_blocks() {
    return KIND == KIND_Q8_0 ? 8 : 16;
}

// Stage buffers of a tile of R matrices' 16 RT rows by 8 NT columns (batch_plan::s8_stages):
// small tiles do little between rounds, so more rounds' copies are in flight while one is
// multiplied (4 buffers for 1 or 2 tiles of 16 by 8, 3 for 4, 2 for 8 and more).
__host__ __device__ constexpr int s8_stages(int r, int rt, int nt) {
    return r * rt * nt <= 2 ? 4 : (r * rt * nt <= 4 ? 3 : 2);
}

template <int KIND, int MODE, int RT, int NT>
__device__ void s8_matmat(const unsigned long long* __restrict__ step, int K,
                          const uint8_t* __restrict__ qs, const float2* __restrict__ dm,
                          const float* __restrict__ bias, int Nrows, float* __restrict__ out,
                          int ld, const int8_t* __restrict__ pq, const float2* __restrict__ pds,
                          uint8_t* smem) {
#if __CUDA_ARCH__ >= 800
    constexpr int R = MODE == MODE_SWIGLU ? 2 : 1;
    constexpr int ROWS = 16 * RT, RR = R * ROWS, NC = 8 * NT;
    constexpr int RB = s8_round_blocks<KIND>();
    constexpr int NS = s8_stages(R, RT, NT);
    using L = S8Layout<KIND, RR, NC, RB>;
    constexpr int QB = L::QB;
    static_assert(4 * R * RT * NT * 32 * 4 * (int)sizeof(float) <= NS * L::BYTES,
                  "the reduction reuses the stage buffers");
    const int nb = K / QK;
    const int rows = MODE == MODE_SWIGLU ? Nrows / 2 : Nrows;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int c0 = blockIdx.x * NC;
    const int r0 = blockIdx.y * ROWS;
    pdl_launch_dependents();
    // The weights of round k into buffer k % NS (rows past the end repeat the last one).
    auto stage_w = [&](int k) {
        uint8_t* s = smem + (k % NS) * L::BYTES;
        const int b0 = k * RB, nbk = min(RB, nb - b0);
        constexpr int CH = RB * QB / 16;  // 16-byte chunks of a row's round
        for (int c = threadIdx.x; c < RR * CH; c += blockDim.x) {
            const int sr = c / CH, ch = c % CH;
            if (ch * 16 >= nbk * QB) continue;
            const int r = min(r0 + sr % ROWS, rows - 1) + (sr / ROWS) * rows;
            cp_async16(s + sr * L::WROW + ch * 16, qs + ((size_t)r * nb + b0) * QB + ch * 16);
        }
        if (KIND == KIND_Q4_K) {
            // Per row the super-block pairs (8 bytes each) and the blocks' byte pairs (8
            // bytes: 4 blocks a copy).
            constexpr int SB = RB / 8, PARTS = SB + RB / 4;
            for (int c = threadIdx.x; c < RR * PARTS; c += blockDim.x) {
                const int sr = c / PARTS, part = c % PARTS;
                const int r = min(r0 + sr % ROWS, rows - 1) + (sr / ROWS) * rows;
                const uint8_t* srow = (const uint8_t*)dm + (size_t)r * scale_bytes<KIND>(nb);
                if (part < SB) {
                    if (8 * part < nbk)
                        cp_async8(s + L::SC + sr * L::KDDROW + 8 * part,
                                  srow + 8 * ((b0 >> 3) + part));
                } else {
                    const int q = part - SB;
                    if (4 * q < nbk)
                        cp_async8(s + L::KSM + sr * L::KSMROW + 8 * q, srow + nb + 2 * b0 + 8 * q);
                }
            }
        } else {
            for (int c = threadIdx.x; c < RR * RB; c += blockDim.x) {
                const int sr = c / RB, bb = c % RB;
                if (bb >= nbk) continue;
                const int r = min(r0 + sr % ROWS, rows - 1) + (sr / ROWS) * rows;
                cp_async8(s + L::SC + sr * L::WSCROW + bb * 8, dm + (size_t)r * nb + b0 + bb);
            }
        }
    };
    // The step's activations of round k (columns past the step's n repeat its last).
    auto stage_a = [&](int k, int n) {
        uint8_t* s = smem + (k % NS) * L::BYTES;
        const int b0 = k * RB, nbk = min(RB, nb - b0);
        for (int c = threadIdx.x; c < NC * RB * 2; c += blockDim.x) {
            const int cc = c / (RB * 2), ch = c % (RB * 2);
            if (ch >= nbk * 2) continue;
            const int col = min(c0 + cc, n - 1);
            cp_async16(s + L::ACT + cc * L::AROW + ch * 16, pq + (size_t)col * K + b0 * QK + ch * 16);
        }
        for (int c = threadIdx.x; c < NC * RB; c += blockDim.x) {
            const int cc = c / RB, bb = c % RB;
            if (bb >= nbk) continue;
            const int col = min(c0 + cc, n - 1);
            cp_async8(s + L::ASC + cc * L::ASCROW + bb * 8, pds + (size_t)col * nb + b0 + bb);
        }
    };
    const int rounds = (nb + RB - 1) / RB;
    const int n = staged_start<NS>(stage_w, stage_a, step, c0, r0, rows, rounds);
    if (n == 0) return;
    float acc[R][RT][NT][4];
#pragma unroll
    for (int m = 0; m < R; ++m)
#pragma unroll
        for (int rt = 0; rt < RT; ++rt)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[m][rt][j][e] = 0.f;
    for (int k = 0; k < rounds; ++k) {
        staged_next<NS>(stage_w, stage_a, k, rounds, n);
        const uint8_t* s = smem + (k % NS) * L::BYTES;
#pragma unroll
        for (int i = 0; i < RB / S8_PARTS; ++i) {
            const int bl = warp + S8_PARTS * i;  // this part's next block of the round
            if (k * RB + bl >= nb) continue;
            // The columns' fragments: values k = 4t.. and 16 + 4t.. of column g of each
            // tile, and the scale pairs of the columns 2t, 2t + 1 this lane holds sums of.
            int bf[NT][2];
            float2 d[NT][2];
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const uint8_t* ab = s + L::ACT + (8 * j + g) * L::AROW + bl * QK;
                bf[j][0] = *(const int*)(ab + 4 * t);
                bf[j][1] = *(const int*)(ab + 16 + 4 * t);
#pragma unroll
                for (int q = 0; q < 2; ++q)
                    d[j][q] = *(const float2*)(s + L::ASC + (8 * j + 2 * t + q) * L::ASCROW + bl * 8);
            }
#pragma unroll
            for (int m = 0; m < R; ++m) {
#pragma unroll
                for (int rt = 0; rt < RT; ++rt) {
                    // Rows g and g + 8 of the tile: A fragment words (k = 4t.. of rows g,
                    // g + 8, then k = 16 + 4t.. of both) and scale pairs.
                    int a[4];
                    float2 sc[2];
#pragma unroll
                    for (int q = 0; q < 2; ++q) {
                        const int sr = m * ROWS + rt * 16 + g + 8 * q;
                        const uint8_t* wb = s + sr * L::WROW + bl * QB;
                        a[q] = a_word_staged<KIND>(wb, 0, t);
                        a[2 + q] = a_word_staged<KIND>(wb, 1, t);
                        if (KIND == KIND_Q4_K) {
                            sc[q] = q4k_pair(
                                *(const float2*)(s + L::SC + sr * L::KDDROW + (bl >> 3) * 8),
                                *(const uchar2*)(s + L::KSM + sr * L::KSMROW + bl * 2));
                        } else {
                            sc[q] = *(const float2*)(s + L::SC + sr * L::WSCROW + bl * 8);
                        }
                    }
#pragma unroll
                    for (int j = 0; j < NT; ++j) {
                        float* z = acc[m][rt][j];
                        if (KIND == KIND_Q8_0) {
                            int c0h[4], c1h[4];
                            mma_s8(c0h, a[0], a[1], bf[j][0]);
                            mma_s8(c1h, a[2], a[3], bf[j][1]);
#pragma unroll
                            for (int e = 0; e < 4; ++e) {
                                const float xd = d[j][e & 1].x;
                                z[e] = __fmaf_rn(__fmul_rn(sc[e >> 1].x, xd), i2f_exact(c0h[e]), z[e]);
                                z[e] = __fmaf_rn(__fmul_rn(sc[e >> 1].y, xd), i2f_exact(c1h[e]), z[e]);
                            }
                        } else {
                            int c[4];
                            mma_s8_k32(c, a, bf[j]);
#pragma unroll
                            for (int e = 0; e < 4; ++e) {
                                const float2 w = sc[e >> 1], x = d[j][e & 1];
                                z[e] = __fmaf_rn(__fmul_rn(w.x, x.x), i2f_exact(c[e]), z[e]);
                                if (KIND == KIND_Q4_1 || KIND == KIND_Q4_K)
                                    z[e] = __fmaf_rn(w.y, x.y, z[e]);
                            }
                        }
                    }
                }
            }
        }
        __syncthreads();  // the next round's copies go into this buffer
    }
    // The parts' tree through shared memory (the stage buffers are free): warps o .. 2o - 1
    // hand their sums to warps 0 .. o - 1, which add them (z_w + z_{w + o}).
    constexpr int NA = R * RT * NT * 4;
    float* red = (float*)smem;  // [4][NA][32]
    float* flat = &acc[0][0][0][0];
#pragma unroll
    for (int o = S8_PARTS / 2; o > 0; o >>= 1) {
        if (warp >= o && warp < 2 * o) {
#pragma unroll
            for (int i = 0; i < NA; ++i) red[((warp - o) * NA + i) * 32 + lane] = flat[i];
        }
        __syncthreads();
        if (warp < o) {
#pragma unroll
            for (int i = 0; i < NA; ++i) flat[i] = flat[i] + red[(warp * NA + i) * 32 + lane];
        }
        __syncthreads();
    }
    if (warp != 0) return;
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = r0 + rt * 16 + g + 8 * (e >> 1);
                const int col = c0 + 8 * j + 2 * t + (e & 1);
                if (r >= rows || col >= n) continue;
                store_out<MODE>(out + (size_t)col * ld + r, acc[0][rt][j][e],
                                acc[R - 1][rt][j][e], bias, r);
            }
#else
    __trap();
#endif
}

// s8_<kind>_<mode>_r<RT>_c<NT> (16 RT rows, 8 NT columns a block): 256 threads, s8_stages
// stage buffers of dynamic shared memory (batch_plan::s8_stage_bytes each, checked). At most 128 registers a thread, so
// that two blocks share a multiprocessor.
#define S8_ENTRY(KIND, KNAME, MODE, MNAME, RT, NT)                                           \
    extern "C" __global__ void __launch_bounds__(256, 2)                                     \
        s8_##KNAME##_##MNAME##_r##RT##_c##NT(                                                \
            const unsigned long long* __restrict__ step, int K,                              \
            const uint8_t* __restrict__ qs, const float2* __restrict__ dm,                   \
            const float* __restrict__ bias, int N, float* __restrict__ out, int ld,          \
            const int8_t* __restrict__ pq, const float2* __restrict__ pds) {                 \
        constexpr int R = MODE == MODE_SWIGLU ? 2 : 1;                                       \
        DYN_SMEM(uint8_t, dsmem);                                                            \
        using L = S8Layout<KIND, R * 16 * RT, 8 * NT, s8_round_blocks<KIND>()>;              \
        if (dyn_smem() < s8_stages(R, RT, NT) * L::BYTES) __trap();                           \
        s8_matmat<KIND, MODE, RT, NT>(step, K, qs, dm, bias, N, out, ld, pq, pds, dsmem);    \
    }
#define S8_COLS(KIND, KNAME, MODE, MNAME, RT)                                                \
    S8_ENTRY(KIND, KNAME, MODE, MNAME, RT, 1)                                                \
    S8_ENTRY(KIND, KNAME, MODE, MNAME, RT, 2)                                                \
    S8_ENTRY(KIND, KNAME, MODE, MNAME, RT, 4)
#define S8_ENTRIES(KIND, KNAME)                                                              \
    S8_COLS(KIND, KNAME, MODE_STORE, store, 1)                                               \
    S8_COLS(KIND, KNAME, MODE_STORE, store, 2)                                               \
    S8_COLS(KIND, KNAME, MODE_STORE, store, 4)                                               \
    S8_COLS(KIND, KNAME, MODE_ADD, add, 1)                                                   \
    S8_COLS(KIND, KNAME, MODE_ADD, add, 2)                                                   \
    S8_COLS(KIND, KNAME, MODE_ADD, add, 4)                                                   \
    S8_COLS(KIND, KNAME, MODE_SWIGLU, swiglu, 1)                                             \
    S8_COLS(KIND, KNAME, MODE_SWIGLU, swiglu, 2)

S8_ENTRIES(KIND_Q4_0, q4_0)
S8_ENTRIES(KIND_Q4_1, q4_1)
S8_ENTRIES(KIND_Q8_0, q8_0)
S8_ENTRIES(KIND_Q4_K, q4_k)
