// Host emulation of the decode attention kernels through decode.cu itself, for machines
// without a GPU (emu.h says how). For head sizes 64 and 128, groups of 1 to 16 query
// heads, lengths around the tile and chunk edges, whole and split over position chunks
// (of at least 256 positions, and for the tensor-core kernels also of at least 64):
// - the tensor-core kernels (attn_tc.cuh): each head's output against a double-precision
//   softmax(q·K^T·scale)·V over the same f16 values (within the f16 rounding of the
//   weights), the new K/V in the cache, the chunk tickets reset, and the batched kernel
//   (several sequences, 1 to all blocks a group, the new K/V written or already there)
//   bit for bit against the single-stream one;
// - on some of the same shapes, the per-head kernels (`attention`, `attention_b`) and the
//   grouped one (`attention_bg`): against the reference, and batched and grouped bit for
//   bit against single-stream.
// Run by `cargo test` (src/engine/model/cuda_emu.rs); exits non-zero after reporting every
// failure.

#include "emu.h"
#include "decode.cu"

struct Seq {
    int pos;
    std::vector<__half> k, v;  // (nkvh, cap, hd) of layer 0
    std::vector<float> qkv;    // (nh + 2 nkvh) * hd
    std::vector<unsigned long long> step;
};

static int failures = 0;
// The tensor-core kernels' least chunk length (their last argument).
static int min_chunk = ATT_MIN_CHUNK;

static void fail(const char* what, int hd, int ng, int len, int nch) {
    std::printf("FAIL %s: hd %d, %d heads a group, length %d, %d chunk(s), chunks of >= %d\n",
                what, hd, ng, len, nch, min_chunk);
    ++failures;
}

// The per-head and grouped kernels on the same sequences (their new K/V already in the
// caches, the same values): single-stream against the reference, batched and grouped
// against single-stream bit for bit.
template <int HD>
static void check_heads(std::vector<Seq>& seqs, const std::vector<std::vector<double>>& refs,
                        const std::vector<unsigned long long>& bstep,
                        const std::vector<float>& bqkv, int ng, int nkvh, int nch, int ctx,
                        const std::vector<float>& cos_t, const std::vector<float>& sin_t,
                        float scale) {
    const int nh = ng * nkvh, threads = 256, stride = 5;
    const int n = (int)seqs.size();
    std::vector<std::vector<float>> single(n);
    for (int b = 0; b < n; ++b) {
        Seq& s = seqs[b];
        std::vector<float> out((size_t)nh * HD, NAN), part((size_t)nh * nch * (HD + 2), NAN),
            scores((size_t)nh * ctx);
        std::vector<unsigned> cnt(nh, 0);
        emu_launch({(unsigned)(nh * nch), 1, 0}, threads, 4 * (3 * HD + 8 * threads), [&] {
            attention(s.qkv.data(), s.step.data(), 0, 1, nh, nkvh, HD, cos_t.data(), sin_t.data(),
                      0, scale, scores.data(), ctx, out.data(), nch, part.data(), cnt.data());
        });
        double worst = 0;
        for (size_t i = 0; i < out.size(); ++i) worst = std::max(worst, std::fabs(refs[b][i] - out[i]));
        if (!(worst < 4e-3)) {
            std::printf("  largest error %g\n", worst);
            fail("per-head kernel against the reference", HD, ng, s.pos + 1, nch);
        }
        single[b] = out;
    }
    const int bucket = n + 1;
    auto batched = [&](bool grouped, int hb) {
        std::vector<float> out((size_t)bucket * nh * HD, NAN),
            part((size_t)bucket * nh * nch * (HD + 2), NAN), scores((size_t)bucket * nh * ctx);
        std::vector<unsigned> cnt((size_t)bucket * nh, 0);
        const int nsub = (ng + ATT_GROUP_MAX - 1) / ATT_GROUP_MAX;
        const int gs = (ng + nsub - 1) / nsub;
        const int units = grouped ? nkvh * nsub : nh;
        const size_t smem = grouped ? 4 * ((ATT_GROUP_MAX + 2) * HD + ATT_GROUP_MAX * 8 * threads)
                                    : 4 * (3 * HD + 8 * threads);
        emu_launch({(unsigned)(units * hb), (unsigned)bucket, 0}, threads, smem, [&] {
            if (grouped)
                attention_bg(bqkv.data(), bstep.data(), stride, 0, 1, nh, nkvh, HD, cos_t.data(),
                             sin_t.data(), 0, scale, scores.data(), ctx, out.data(), 0, nch, hb,
                             part.data(), cnt.data(), gs, nsub);
            else
                attention_b(bqkv.data(), bstep.data(), stride, 0, 1, nh, nkvh, HD, cos_t.data(),
                            sin_t.data(), 0, scale, scores.data(), ctx, out.data(), 0, nch, hb,
                            part.data(), cnt.data());
        });
        for (int b = 0; b < n; ++b) {
            if (std::memcmp(out.data() + (size_t)b * nh * HD, single[b].data(),
                            sizeof(float) * nh * HD)) {
                std::printf("  %s, %d block(s) a unit\n", grouped ? "grouped" : "per head", hb);
                fail("batched per-head kernels against single-stream bits", HD, ng,
                     seqs[b].pos + 1, nch);
            }
        }
    };
    for (int hb : {1, nch}) {
        batched(false, hb);
        batched(true, hb);
    }
}

template <int HD>
static void check(int ng, int nkvh, std::vector<int> lens, int nch, std::mt19937& rng,
                  bool heads = false) {
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
    std::vector<std::vector<double>> refs(seqs.size());
    for (size_t b = 0; b < seqs.size(); ++b) {
        Seq& s = seqs[b];
        std::vector<float> out((size_t)nh * HD, NAN), part((size_t)nh * nch * (HD + 2), NAN);
        std::vector<unsigned> cnt(nh, 0);
        emu_launch({(unsigned)(nkvh * nch), 1, 0}, ATC_THREADS, 4 * smem, [&] {
            (HD == 64 ? attention_tc64 : attention_tc128)(
                s.qkv.data(), s.step.data(), 0, 1, nh, nkvh, HD, cos_t.data(), sin_t.data(), 0,
                scale, nullptr, ctx, out.data(), nch, part.data(), cnt.data(), min_chunk);
        });
        if (std::any_of(cnt.begin(), cnt.end(), [](unsigned c) { return c != 0; }))
            fail("tickets not reset", HD, ng, lens[b], nch);
        // The reference: the new K/V (RoPE'd, f16) at pos, softmax in double.
        const int len = lens[b];
        double worst = 0;
        std::vector<double> ref((size_t)nh * HD);
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
                ref[(size_t)h * HD + d] = o / l;
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
        refs[b] = std::move(ref);
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
                0, scale, nullptr, ctx, out.data(), write, nch, hb, part.data(), cnt.data(),
                min_chunk);
        });
        for (size_t b = 0; b < seqs.size(); ++b) {
            if (std::memcmp(out.data() + b * nh * HD, single[b].data(), sizeof(float) * nh * HD)) {
                std::printf("  %d block(s) a group, write %d\n", hb, write);
                fail("batched against single-stream bits", HD, ng, lens[b], nch);
            }
        }
    }
    if (heads) check_heads<HD>(seqs, refs, bstep, bqkv, ng, nkvh, nch, ctx, cos_t, sin_t, scale);
}

int main() {
    std::mt19937 rng(7);
    const int lens[] = {1, 15, 17, 64, 65, 257, 700};
    for (int len : lens) {
        for (int nch : {1, 4}) {
            check<64>(3, 2, {len, std::max(1, len - 7)}, nch, rng);
            check<128>(4, 2, {len, std::max(1, len - 3)}, nch, rng);
        }
    }
    // The most chunks a launch takes.
    check<64>(3, 1, {700, 130}, 16, rng);
    check<128>(4, 2, {1100, 300}, 16, rng);
    // The tensor-core kernels in chunks of at least 64 positions.
    min_chunk = 64;
    for (int len : {65, 130, 257, 700}) {
        check<64>(3, 2, {len, std::max(1, len - 7)}, 4, rng);
        check<128>(4, 2, {len, std::max(1, len - 3)}, 4, rng);
    }
    check<64>(3, 1, {700, 130}, 16, rng);
    check<128>(4, 2, {1100, 300}, 16, rng);
    min_chunk = ATT_MIN_CHUNK;
    // The per-head and grouped kernels too, on a few shapes (their blocks are 256 threads).
    check<64>(3, 2, {300, 21}, 4, rng, true);
    check<128>(7, 1, {700, 64}, 4, rng, true);
    check<128>(4, 2, {40, 1}, 1, rng, true);
    for (int ng : {1, 7, 9, 16}) {
        check<64>(ng, 1, {300, 40}, 4, rng);
        check<128>(ng, 1, {300, 40}, 4, rng);
    }
    if (failures) {
        std::printf("%d failure(s)\n", failures);
        return 1;
    }
    std::printf("decode attention: all checks passed\n");
    return 0;
}
