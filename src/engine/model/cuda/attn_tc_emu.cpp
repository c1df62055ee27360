// Host emulation of the tensor-core decode attention (attn_tc.cuh), for machines without
// a GPU: the kernel's own source, compiled by a C++20 compiler with CUDA's built-ins
// emulated (emu.h: a block's threads as OS threads, warp shuffles and m16n8k16 products
// as warp-wide exchanges in the PTX fragment layouts, __syncthreads as a block barrier,
// blocks one after another). Checks, for head sizes 64 and 128, groups of 1 to 16
// query heads, lengths around the tile and chunk edges, whole and split over position
// chunks: each head's output against a double-precision softmax(q·K^T·scale)·V over the
// same f16 values (within the f16 rounding of the weights), and the batched kernel's
// output (several sequences, blocks per group from 1 to all chunks) bit for bit against
// the single-stream kernel's. Run by `cargo test` (src/engine/model/cuda_emu.rs); exits
// non-zero after reporting every failure. Built with -fno-strict-aliasing: the kernel reads
// f16 cache rows as 16-byte words, as CUDA code does.

#include "emu.h"

// decode.cu's, for attn.cuh and attn_tc.cuh alone.
inline void pdl_wait() {}
inline void pdl_launch_dependents() {}
inline float round_f16(float x) { return (float)(__half)x; }

// ---- the kernel ----------------------------------------------------------------------
#define STEP_TOKEN 0
#define STEP_POS 1
#define STEP_CAP 2
#define STEP_PTRS 3
#define BSTEP_N 0
#define BSTEP_REC 1
#include "attn.cuh"
#include "attn_tc.cuh"

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
        emu_launch({(unsigned)(nkvh * nch), 1, 0}, ATC_THREADS, 4 * smem, [&] {
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
        emu_launch({(unsigned)(nkvh * hb), (unsigned)bucket, 0}, ATC_THREADS, 4 * smem, [&] {
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
