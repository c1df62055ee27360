// Host emulation of the tensor-core decode attention (attn_tc.cuh), for machines without
// a GPU: the kernel's own source, compiled by a C++20 compiler with CUDA's built-ins
// emulated — a block's threads as OS threads, warp shuffles and m16n8k16 products as
// warp-wide exchanges (the PTX fragment layouts), __syncthreads as a block barrier,
// blocks run one after another. Checks, for head sizes 64 and 128, groups of 1 to 16
// query heads, lengths around the tile and chunk edges, whole and split over position
// chunks: each head's output against a double-precision softmax(q·K^T·scale)·V over the
// same f16 values (within the f16 rounding of the weights), and the batched kernel's
// output (several sequences, blocks per group from 1 to all chunks) bit for bit against
// the single-stream kernel's. Run by `cargo test` (src/engine/model/cuda_emu.rs); exits
// non-zero after reporting every failure. Built with -fno-strict-aliasing: the kernel reads
// f16 cache rows as 16-byte words, as CUDA code does.

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

// ---- CUDA built-ins -------------------------------------------------------------------
#define ATC_EMULATE
#define __device__
#define __forceinline__ inline
#define __global__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static

struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};
thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim, gridDim;

typedef _Float16 __half;
struct __half2 {
    __half x, y;
};
struct uint4 {
    uint32_t x, y, z, w;
};
struct float2 {
    float x, y;
};
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }
inline __half __float2half_rn(float f) { return (__half)f; }
inline float __half2float(__half h) { return (float)h; }
inline __half2 __floats2half2_rn(float a, float b) { return {(__half)a, (__half)b}; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __ldcg(const float* p) { return *p; }
inline void __threadfence() {}
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    return std::atomic_ref<unsigned>(*p).fetch_add(v);
}
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
    const uint64_t b = (uint64_t)x | ((uint64_t)y << 32);
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) r |= (uint32_t)((b >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}
inline void pdl_wait() {}
inline void pdl_launch_dependents() {}
inline float round_f16(float x) { return (float)(__half)x; }

// A block in flight: its barrier, and per warp an exchange area for shuffles and products.
struct Warp {
    std::barrier<> bar{32};
    float f[32];
    uint32_t a[32][4], b[32][2];
};
struct Block {
    explicit Block(int threads) : bar(threads), warps(threads / 32) {}
    std::barrier<> bar;
    std::vector<Warp> warps;
    std::vector<float> smem;
};
thread_local Block* cur = nullptr;

inline float* atc_emu_smem() { return cur->smem.data(); }
inline void __syncthreads() { cur->bar.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
    const int lane = threadIdx.x & 31;
    Warp& w = cur->warps[threadIdx.x >> 5];
    w.f[lane] = v;
    w.bar.arrive_and_wait();
    const float r = w.f[lane ^ o];
    w.bar.arrive_and_wait();
    return r;
}

inline float half_of(uint32_t r, int hi) {
    const uint16_t bits = hi ? (uint16_t)(r >> 16) : (uint16_t)r;
    __half h;
    std::memcpy(&h, &bits, 2);
    return (float)h;
}

// c (16x8) += a (16x16, row) * b (16x8, col), the PTX m16n8k16 f16 fragment layouts:
// lane 4g + t holds A (g, 2t..) (g + 8, 2t..) (g, 2t + 8..) (g + 8, 2t + 8..), B (2t..,
// g) (2t + 8.., g), C (g, 2t..) (g + 8, 2t..).
inline void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    const int lane = threadIdx.x & 31;
    Warp& w = cur->warps[threadIdx.x >> 5];
    for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i];
    w.b[lane][0] = b0;
    w.b[lane][1] = b1;
    w.bar.arrive_and_wait();
    auto A = [&](int row, int k) {
        const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
        return half_of(w.a[(row % 8) * 4 + (k % 8) / 2][reg], k & 1);
    };
    auto B = [&](int k, int col) {
        return half_of(w.b[col * 4 + (k % 8) / 2][k >= 8 ? 1 : 0], k & 1);
    };
    const int g = lane >> 2, t = lane & 3;
    for (int e = 0; e < 4; ++e) {
        const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
        double s = 0;
        for (int k = 0; k < 16; ++k) s += (double)A(row, k) * B(k, col);
        c[e] = (float)(s + c[e]);
    }
    w.bar.arrive_and_wait();
}

// ---- the kernel ----------------------------------------------------------------------
#define STEP_TOKEN 0
#define STEP_POS 1
#define STEP_CAP 2
#define STEP_PTRS 3
#define BSTEP_N 0
#define BSTEP_REC 1
#include "attn.cuh"
#include "attn_tc.cuh"

// Run `body` for every block of `grid` (one after another, every other launch from the
// last block back: no block may count on another having run), `threads` threads a block.
static unsigned launches = 0;
template <class F>
void launch(Dim3 grid, int threads, size_t smem_floats, F body) {
    blockDim = {(unsigned)threads, 1, 1};
    gridDim = grid;
    const bool back = launches++ % 2 == 0;
    for (unsigned iy = 0; iy < grid.y; ++iy) {
        for (unsigned ix = 0; ix < grid.x; ++ix) {
            const unsigned by = back ? grid.y - 1 - iy : iy, bx = back ? grid.x - 1 - ix : ix;
            Block blk(threads);
            blk.smem.assign(smem_floats, NAN);
            std::vector<std::thread> ts;
            for (int i = 0; i < threads; ++i) {
                ts.emplace_back([&, i] {
                    threadIdx = {(unsigned)i, 0, 0};
                    blockIdx = {bx, by, 0};
                    cur = &blk;
                    body();
                });
            }
            for (auto& t : ts) t.join();
        }
    }
}

// ---- the check -----------------------------------------------------------------------
struct Seq {
    int pos;
    std::vector<__half> k, v;  // (nkvh, cap, hd) of layer 0
    std::vector<float> qkv;    // (nh + 2 nkvh) * hd
    std::vector<unsigned long long> step;
};

static int failures = 0;

static void fail(const char* what, int hd, int ng, int len, int nch) {
    std::printf("FAIL %s: hd %d, %d heads a group, length %d, %d chunk(s)\n", what, hd, ng, len,
                nch);
    ++failures;
}

template <int HD>
static void check(int ng, int nkvh, std::vector<int> lens, int nch, std::mt19937& rng) {
    const int nh = ng * nkvh, qkv_w = (nh + 2 * nkvh) * HD, half = HD / 2;
    int maxlen = *std::max_element(lens.begin(), lens.end());
    const int cap = maxlen + 5, ctx = cap;
    std::normal_distribution<float> nd(0.f, 1.f);
    // RoPE tables for every position (neox off).
    std::vector<float> cos_t((size_t)ctx * half), sin_t((size_t)ctx * half);
    for (int p = 0; p < ctx; ++p)
        for (int i = 0; i < half; ++i) {
            const double th = p * std::pow(10000.0, -2.0 * i / HD);
            cos_t[(size_t)p * half + i] = (float)std::cos(th);
            sin_t[(size_t)p * half + i] = (float)std::sin(th);
        }
    const float scale = 1.f / std::sqrt((float)HD);
    std::vector<Seq> seqs(lens.size());
    for (size_t b = 0; b < lens.size(); ++b) {
        Seq& s = seqs[b];
        s.pos = lens[b] - 1;
        s.k.resize((size_t)nkvh * cap * HD);
        s.v.resize((size_t)nkvh * cap * HD);
        for (auto& x : s.k) x = (__half)(nd(rng) * 2.f);
        for (auto& x : s.v) x = (__half)nd(rng);
        s.qkv.resize(qkv_w);
        for (auto& x : s.qkv) x = nd(rng) * 2.f;
        s.step = {0, (unsigned long long)s.pos, (unsigned long long)cap,
                  (unsigned long long)(uintptr_t)s.k.data(),
                  (unsigned long long)(uintptr_t)s.v.data()};
    }
    const size_t smem = (size_t)ATC_ROWS * HD + 2 * HD + 2 * ATC_WARPS * ATC_ROWS +
                        (size_t)ATC_WARPS * ng * HD;
    std::vector<std::vector<float>> single(seqs.size());
    for (size_t b = 0; b < seqs.size(); ++b) {
        Seq& s = seqs[b];
        std::vector<float> out((size_t)nh * HD, NAN), part((size_t)nh * nch * (HD + 2), NAN);
        std::vector<unsigned> cnt(nh, 0);
        launch({(unsigned)(nkvh * nch), 1, 0}, ATC_THREADS, smem, [&] {
            (HD == 64 ? attention_tc64 : attention_tc128)(
                s.qkv.data(), s.step.data(), 0, 1, nh, nkvh, HD, cos_t.data(), sin_t.data(), 0,
                scale, nullptr, ctx, out.data(), nch, part.data(), cnt.data());
        });
        if (std::any_of(cnt.begin(), cnt.end(), [](unsigned c) { return c != 0; }))
            fail("tickets not reset", HD, ng, lens[b], nch);
        // The reference: the new K/V (RoPE'd, f16) at pos, softmax in double.
        const int len = lens[b];
        double worst = 0;
        for (int h = 0; h < nh; ++h) {
            const int g = h / ng;
            std::vector<double> q(HD), kn(HD), vn(HD);
            const float* qh = s.qkv.data() + h * HD;
            const float* kh = s.qkv.data() + nh * HD + g * HD;
            const float* vh = s.qkv.data() + (nh + nkvh) * HD + g * HD;
            for (int i = 0; i < half; ++i) {
                const float c = cos_t[(size_t)s.pos * half + i], sn = sin_t[(size_t)s.pos * half + i];
                q[2 * i] = round_f16(qh[2 * i] * c - qh[2 * i + 1] * sn);
                q[2 * i + 1] = round_f16(qh[2 * i] * sn + qh[2 * i + 1] * c);
                kn[2 * i] = round_f16(kh[2 * i] * c - kh[2 * i + 1] * sn);
                kn[2 * i + 1] = round_f16(kh[2 * i] * sn + kh[2 * i + 1] * c);
            }
            for (int d = 0; d < HD; ++d) vn[d] = round_f16(vh[d]);
            std::vector<double> sc(len);
            double m = -INFINITY;
            for (int j = 0; j < len; ++j) {
                double dot = 0;
                for (int d = 0; d < HD; ++d) {
                    const double kv = j == s.pos ? kn[d] : (double)s.k[((size_t)g * cap + j) * HD + d];
                    dot += q[d] * kv;
                }
                sc[j] = dot * scale;
                m = std::max(m, sc[j]);
            }
            double l = 0;
            for (int j = 0; j < len; ++j) l += (sc[j] = std::exp(sc[j] - m));
            for (int d = 0; d < HD; ++d) {
                double o = 0;
                for (int j = 0; j < len; ++j) {
                    const double vv = j == s.pos ? vn[d] : (double)s.v[((size_t)g * cap + j) * HD + d];
                    o += sc[j] * vv;
                }
                worst = std::max(worst, std::fabs(o / l - out[(size_t)h * HD + d]));
            }
            // The new K/V went to the cache.
            for (int d = 0; d < HD; ++d) {
                if ((double)s.k[((size_t)g * cap + s.pos) * HD + d] != kn[d] ||
                    (double)s.v[((size_t)g * cap + s.pos) * HD + d] != vn[d]) {
                    fail("new K/V not in the cache", HD, ng, len, nch);
                    break;
                }
            }
        }
        // The weights are rounded to f16 (relative 2^-11) and V is about 1.
        if (!(worst < 4e-3)) {
            std::printf("  largest error %g\n", worst);
            fail("output against the reference", HD, ng, len, nch);
        }
        single[b] = out;
    }
    // Batched: every sequence in one launch, for each number of blocks a group.
    const int stride = 3 + 2;
    std::vector<unsigned long long> bstep(1 + seqs.size() * stride);
    bstep[0] = seqs.size();
    for (size_t b = 0; b < seqs.size(); ++b)
        std::copy(seqs[b].step.begin(), seqs[b].step.end(), bstep.begin() + 1 + b * stride);
    std::vector<float> bqkv;
    for (auto& s : seqs) bqkv.insert(bqkv.end(), s.qkv.begin(), s.qkv.end());
    // Every count of blocks a group with the new K/V written by the kernel (a decode
    // step), then all chunks' blocks with it already in the cache (a prefill step).
    std::vector<std::pair<int, int>> runs;
    for (int hb = 1; hb <= nch; hb *= 2) runs.push_back({hb, 1});
    if (runs.back().first != nch) runs.push_back({nch, 1});
    runs.push_back({nch, 0});
    for (auto [hb, write] : runs) {
        const int bucket = (int)seqs.size() + 1;  // one record past the count: skipped
        std::vector<float> out((size_t)bucket * nh * HD, NAN),
            part((size_t)bucket * nh * nch * (HD + 2), NAN);
        std::vector<unsigned> cnt((size_t)bucket * nh, 0);
        launch({(unsigned)(nkvh * hb), (unsigned)bucket, 0}, ATC_THREADS, smem, [&] {
            (HD == 64 ? attention_btc64 : attention_btc128)(
                bqkv.data(), bstep.data(), stride, 0, 1, nh, nkvh, HD, cos_t.data(), sin_t.data(),
                0, scale, nullptr, ctx, out.data(), write, nch, hb, part.data(), cnt.data());
        });
        for (size_t b = 0; b < seqs.size(); ++b) {
            if (std::memcmp(out.data() + b * nh * HD, single[b].data(), sizeof(float) * nh * HD)) {
                std::printf("  %d block(s) a group, write %d\n", hb, write);
                fail("batched against single-stream bits", HD, ng, lens[b], nch);
            }
        }
    }
}

int main() {
    std::mt19937 rng(7);
    const int lens[] = {1, 2, 15, 16, 17, 63, 64, 65, 200, 256, 257, 300, 700};
    for (int len : lens) {
        for (int nch : {1, 4}) {
            check<64>(3, 2, {len, std::max(1, len - 7)}, nch, rng);
            check<128>(4, 2, {len, std::max(1, len - 3)}, nch, rng);
        }
    }
    for (int ng : {1, 7, 9, 16}) {
        check<64>(ng, 1, {300, 40}, 4, rng);
        check<128>(ng, 1, {300, 40}, 4, rng);
    }
    if (failures) {
        std::printf("%d failure(s)\n", failures);
        return 1;
    }
    std::printf("tensor-core decode attention: all checks passed\n");
    return 0;
}
