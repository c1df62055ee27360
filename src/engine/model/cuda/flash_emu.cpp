// Host emulation of the prefill flash attention (flash.cu itself, emu.h says how), for
// machines without a GPU. For head sizes 64 and 128, 1 to 4 query heads a KV head, chunks
// of 1 to 150 new positions at the start of the cache or after earlier ones, a cache that
// starts past position 0 (a sliding window's ring), windows on and off, and both query
// layouts (the tensor path's head-major and the fused prefill's position-major rows):
// every output row against a double-precision causal softmax(q·K^T·scale)·V over the same
// f16 cache, with Q rounded to f16 as the kernel does (the softmax weights' f16 rounding
// is the tolerance). Run by `cargo test` (src/engine/model/cuda_emu.rs); exits non-zero
// after reporting every failure.

#include "emu.h"
#include "flash.cu"

static int failures = 0;

struct Case {
    int hd, n_rep, n_kv, n, pos, start, window;
    bool rows;  // position-major query rows (the fused prefill) or head-major (tensor path)
};

template <int HD>
static void check(const Case& c, std::mt19937& rng) {
    const int nh = c.n_kv * c.n_rep;
    // The cache holds positions start .. pos + n - 1 in slots 0 .. len - 1 (a few spare).
    const int len = c.pos + c.n - c.start, cap = len + 3;
    const long long hs = (long long)cap * HD;
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<__half> k((size_t)c.n_kv * hs), v((size_t)c.n_kv * hs);
    for (auto& x : k) x = (__half)(nd(rng) * 2.f);
    for (auto& x : v) x = (__half)nd(rng);
    std::vector<float> q((size_t)c.n * nh * HD);
    for (auto& x : q) x = nd(rng) * 2.f;
    const int q_row = c.rows ? nh * HD : HD;
    const int q_head = c.rows ? HD : c.n * HD;
    const float scale = 1.f / std::sqrt((float)HD);
    std::vector<float> y((size_t)c.n * nh * HD, NAN);
    const unsigned blocks = (unsigned)((c.n * c.n_rep + BQ - 1) / BQ);
    emu_launch({blocks, (unsigned)c.n_kv, 0}, 128, 0, [&] {
        (HD == 64 ? flash_prefill_64 : flash_prefill_128)(
            q.data(), k.data(), v.data(), y.data(), c.n, c.n_rep, len, c.pos, c.start, c.window,
            hs, scale, q_row, q_head);
    });
    double worst = 0;
    for (int i = 0; i < c.n; ++i) {
        const int p = c.pos + i;
        for (int h = 0; h < nh; ++h) {
            const int g = h / c.n_rep;
            const float* qh = q.data() + (size_t)i * q_row + (size_t)h * q_head;
            std::vector<double> sc;
            std::vector<int> slot;
            double m = -INFINITY;
            for (int j = 0; j < len; ++j) {
                const int kp = c.start + j;
                if (kp > p || (c.window > 0 && kp <= p - c.window)) continue;
                double dot = 0;
                for (int d = 0; d < HD; ++d)
                    dot += (double)(__half)qh[d] * (double)k[(size_t)g * hs + (size_t)j * HD + d];
                sc.push_back(dot * scale);
                slot.push_back(j);
                m = std::max(m, sc.back());
            }
            double l = 0;
            for (auto& s : sc) l += (s = std::exp(s - m));
            for (int d = 0; d < HD; ++d) {
                double o = 0;
                for (size_t e = 0; e < sc.size(); ++e)
                    o += sc[e] * (double)v[(size_t)g * hs + (size_t)slot[e] * HD + d];
                const float got = y[((size_t)i * nh + h) * HD + d];
                worst = std::max(worst, std::isfinite(got) ? std::fabs(o / l - got) : INFINITY);
            }
        }
    }
    // The weights are rounded to f16 (relative 2^-11) and V is about 1.
    if (!(worst < 4e-3)) {
        std::printf("FAIL hd %d, %d heads a KV head, %d KV heads, %d new at %d, cache from %d, "
                    "window %d, %s rows: largest error %g\n",
                    HD, c.n_rep, c.n_kv, c.n, c.pos, c.start, c.window,
                    c.rows ? "position-major" : "head-major", worst);
        ++failures;
    }
}

int main() {
    std::mt19937 rng(11);
    std::vector<Case> cases;
    for (int hd : {64, 128}) {
        for (bool rows : {false, true}) {
            // A whole prompt from position 0, around the 64-row and 64-key tile edges.
            for (int n : {1, 17, 64, 65, 150}) cases.push_back({hd, 1, 2, n, 0, 0, 0, rows});
            // Grouped queries: a block spans 64 / n_rep positions.
            cases.push_back({hd, 3, 2, 40, 0, 0, 0, rows});
            cases.push_back({hd, 4, 1, 70, 0, 0, 0, rows});
            // A chunk after earlier ones (the cache holds what came before).
            cases.push_back({hd, 4, 2, 33, 100, 0, 0, rows});
            cases.push_back({hd, 1, 1, 1, 200, 0, 0, rows});
            // Sliding windows: over the whole cache, and over a ring that starts later.
            cases.push_back({hd, 2, 2, 90, 0, 0, 32, rows});
            cases.push_back({hd, 2, 1, 50, 120, 70, 48, rows});
            cases.push_back({hd, 1, 2, 20, 300, 285, 16, rows});
        }
    }
    for (const Case& c : cases) {
        if (c.hd == 64)
            check<64>(c, rng);
        else
            check<128>(c, rng);
    }
    if (failures) {
        std::printf("%d failure(s) in %zu cases\n", failures, cases.size());
        return 1;
    }
    std::printf("prefill flash attention: %zu cases passed\n", cases.size());
    return 0;
}
