// Host emulation of the wide prefill kernels (prefill.cuh through decode.cu, emu.h says
// how), for machines without a GPU. A long prompt chunk's projections run as GEMMs over
// all its rows; each row must come out as the single-stream mat-vec (`matvec`, the decode
// kernels) gives it for that row alone. For every weight layout (Q4_0, Q4_1, the 8-bit
// layout, Q4_K) and epilogue (store with a bias, add to a residual, SwiGLU), on row and
// token counts that leave partial tiles:
// - the int8 GEMMs (`quant_rows_*` then `gemm_*`, RMS norm in): the same integer sums as
//   the mat-vec, summed in another order, so equal to f32 rounding;
// - the f16 GEMMs' parts (`wh_dequant_*` weights, `wh_rows` inputs, the product as cuBLAS
//   computes it (f16 in, f32 sums) done here in double, `wh_bias`, `wh_swiglu`): on
//   inputs that 8-bit quantization keeps exact, so only the weights' f16 rounding
//   separates them from the mat-vec; `wh_rows`' RMS norm against double precision;
// - `q_rope_rows` (both RoPE layouts) against the same arithmetic here, bit for bit.
// Run by `cargo test` (src/engine/model/cuda_emu.rs); exits non-zero after reporting every
// failure.

#include "emu.h"
#include "decode.cu"

#include "emu_proj.h"

static int failures = 0;

static void fail(const char* what, int kind, int mode, int T, double err) {
    std::printf("FAIL %s, %s mode %d, %d tokens: largest error %g\n", what, emu_kind_name(kind),
                mode, T, err);
    ++failures;
}

// The largest |a - b| / (1 + |b|) over n values (infinite where a is not finite).
static double worst_rel(const float* a, const float* b, size_t n) {
    double w = 0;
    for (size_t i = 0; i < n; ++i) {
        const double d = std::fabs((double)a[i] - b[i]) / (1.0 + std::fabs((double)b[i]));
        w = std::max(w, std::isfinite(a[i]) ? d : INFINITY);
    }
    return w;
}

template <int KIND>
static auto quant_rows_k() {
    return KIND == KIND_Q4_0   ? quant_rows_q4_0
           : KIND == KIND_Q4_1 ? quant_rows_q4_1
           : KIND == KIND_Q8_0 ? quant_rows_q8_0
                               : quant_rows_q4_k;
}

template <int KIND, int MODE>
static auto gemm_k() {
#define PICK(K)                                                                              \
    (MODE == MODE_STORE ? gemm_##K##_store : MODE == MODE_ADD ? gemm_##K##_add : gemm_##K##_swiglu)
    return KIND == KIND_Q4_0   ? PICK(q4_0)
           : KIND == KIND_Q4_1 ? PICK(q4_1)
           : KIND == KIND_Q8_0 ? PICK(q8_0)
                               : PICK(q4_k);
#undef PICK
}

template <int KIND>
static auto wh_dequant_k() {
    return KIND == KIND_Q4_0   ? wh_dequant_q4_0
           : KIND == KIND_Q4_1 ? wh_dequant_q4_1
           : KIND == KIND_Q8_0 ? wh_dequant_q8_0
                               : wh_dequant_q4_k;
}

// T rows of K inputs: random normal, or (exact) values k / 64 with integer k in -127..127,
// 127 in every 32-value block and every block's sum of k under 2048 in magnitude, which
// 8-bit quantization (its scale 1/64, the scale times the sum exact in f16) and f16 keep
// as they are.
static std::vector<float> rows_of(int T, int K, bool exact, std::mt19937& rng) {
    std::vector<float> x((size_t)T * K);
    std::normal_distribution<float> nd(0.f, 1.f);
    std::uniform_int_distribution<int> q(-127, 127);
    for (size_t b = 0; b < x.size(); b += QK) {
        int sum;
        do {
            sum = 0;
            for (size_t i = b; i < b + QK; ++i) {
                const int k = i % QK == 5 ? (i % 2 ? 127 : -127) : q(rng);
                x[i] = exact ? (float)k / 64.f : nd(rng);
                sum += k;
            }
        } while (exact && std::abs(sum) >= 2048);
    }
    return x;
}

template <int KIND, int MODE>
static void check(int rows, int T, std::mt19937& rng) {
    const int K = KIND == KIND_Q4_K ? 768 : 576, nb = K / QK;
    constexpr int R = MODE == MODE_SWIGLU ? 2 : 1;
    const EmuWeights w = emu_weights<KIND>(R * rows, K, rng);
    const float2* dm = (const float2*)w.dm.data();
    const float eps = 1e-5f;
    for (bool exact : {false, true}) {
        // Inputs: T rows; the norm on for random rows, off for exact ones.
        EmuInputs in = emu_inputs<MODE>(K, rows, T, rng);
        in.x = rows_of(T, K, exact, rng);
        const float* norm = exact ? nullptr : in.norm.data();
        const float* b = in.bias.empty() ? nullptr : in.bias.data();
        // The reference: each row alone through the mat-vec.
        std::vector<float> single = in.init;
        for (int c = 0; c < T; ++c) {
            emu_launch({3, 1, 0}, 256, (size_t)K + 8 * nb, [&] {
                matvec<KIND, MODE, false>(in.x.data() + (size_t)c * K, norm, eps, K, w.qs.data(),
                                          dm, b, w.rows, single.data() + (size_t)c * rows);
            });
        }
        // The int8 GEMM.
        {
            std::vector<int8_t> xq((size_t)T * K);
            std::vector<float2> xds((size_t)T * nb);
            emu_launch({(unsigned)((T + PF_ROWS - 1) / PF_ROWS), 1, 0}, 256, 0, [&] {
                quant_rows_k<KIND>()(in.x.data(), norm, eps, K, T, xq.data(), xds.data());
            });
            std::vector<float> out = in.init;
            emu_launch({(unsigned)((rows + GEMM_ROWS - 1) / GEMM_ROWS),
                        (unsigned)((T + GEMM_TOKS - 1) / GEMM_TOKS), 0},
                       128, 0, [&] {
                           gemm_k<KIND, MODE>()(xq.data(), xds.data(), K, T, w.qs.data(), dm, b,
                                                w.rows, out.data(), rows);
                       });
            const double e = worst_rel(out.data(), single.data(), out.size());
            if (!(e < 1e-4)) fail(exact ? "int8 GEMM (no norm)" : "int8 GEMM", KIND, MODE, T, e);
        }
        // The f16 GEMM's parts.
        {
            std::vector<__half> xh((size_t)T * K);
            emu_launch({(unsigned)T, 1, 0}, 256, 0,
                       [&] { wh_rows(in.x.data(), norm, eps, K, xh.data()); });
            if (!exact) {
                // The RMS norm against double precision (the f16 rounding apart).
                double e = 0;
                for (int c = 0; c < T; ++c) {
                    const float* xr = in.x.data() + (size_t)c * K;
                    double ss = 0;
                    for (int i = 0; i < K; ++i) ss += (double)xr[i] * xr[i];
                    const double m = std::sqrt(ss / K + eps);
                    for (int i = 0; i < K; ++i) {
                        const double want = xr[i] / m * in.norm[i];
                        const double got = (double)xh[(size_t)c * K + i];
                        e = std::max(e, std::fabs(got - want) / (std::fabs(want) + 1e-3));
                    }
                }
                if (!(e < 1.5e-3)) fail("wh_rows against the RMS norm", KIND, MODE, T, e);
                continue;
            }
            std::vector<__half> wh((size_t)w.rows * K);
            emu_launch({(unsigned)(((size_t)w.rows * nb + 255) / 256), 1, 0}, 256, 0, [&] {
                wh_dequant_k<KIND>()(w.qs.data(), dm, w.rows, nb, wh.data());
            });
            // cuBLAS's product (f16 in, f32 out), added to the residual for MODE_ADD; gate
            // and up side by side for SwiGLU. With exact inputs only the weights' f16
            // rounding separates it from the mat-vec: at most 2^-11 * sum |w x| (plus f32
            // rounding) for an output.
            const int n_out = R * rows;
            std::vector<float> c((size_t)T * n_out);
            std::vector<double> bound((size_t)T * n_out);
            for (int t = 0; t < T; ++t)
                for (int r = 0; r < n_out; ++r) {
                    double s = 0, a = 0;
                    for (int i = 0; i < K; ++i) {
                        const double p =
                            (double)wh[(size_t)r * K + i] * (double)xh[(size_t)t * K + i];
                        s += p;
                        a += std::fabs(p);
                    }
                    c[(size_t)t * n_out + r] = (float)s;
                    bound[(size_t)t * n_out + r] = a * (1.0 / 2048 + 1e-6) + 1e-6;
                }
            std::vector<float> out = in.init;
            std::vector<double> tol(out.size());
            for (int t = 0; t < T; ++t)
                for (int r = 0; r < rows; ++r) {
                    const size_t o = (size_t)t * rows + r, i = (size_t)t * n_out + r;
                    if (MODE == MODE_SWIGLU) {
                        // silu(g) * u: |silu'| < 1.1; then the output's f16 rounding.
                        const double g = c[i], u = c[i + rows], bg = bound[i], bu = bound[i + rows];
                        const double sg = g / (1 + std::exp(-g));
                        tol[o] = 1.1 * (std::fabs(u) + bu) * bg + std::fabs(sg) * bu +
                                 std::fabs(single[o]) * (1.0 / 2048 + 1e-6) + 1e-6;
                    } else {
                        tol[o] = bound[i] + 1e-6 * std::fabs(single[o]);
                    }
                }
            if (MODE == MODE_SWIGLU) {
                std::vector<__half> act((size_t)T * rows);
                emu_launch({(unsigned)((rows + 255) / 256), (unsigned)T, 0}, 256, 0,
                           [&] { wh_swiglu(c.data(), rows, act.data()); });
                for (size_t i = 0; i < out.size(); ++i) out[i] = (float)act[i];
            } else if (MODE == MODE_ADD) {
                for (size_t i = 0; i < out.size(); ++i) out[i] += c[i];
            } else {
                out = c;
                emu_launch({(unsigned)((rows + 255) / 256), (unsigned)T, 0}, 256, 0,
                           [&] { wh_bias(out.data(), rows, b, rows); });
            }
            double e = 0;
            for (size_t i = 0; i < out.size(); ++i) {
                const double d = std::fabs((double)out[i] - single[i]);
                e = std::max(e, std::isfinite(out[i]) ? d / tol[i] : INFINITY);
            }
            if (!(e <= 1.0))
                fail("f16 GEMM parts (dequant, bias, SwiGLU): error / bound", KIND, MODE, T, e);
        }
    }
}

// q_rope_rows against RoPE here with the same roundings.
static void check_rope(int neox, std::mt19937& rng) {
    const int nh = 3, nkv = 1, hd = 64, half = hd / 2, T = 5, pos0 = 7;
    const int qkv_w = (nh + 2 * nkv) * hd;
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<float> qkv((size_t)T * qkv_w), cs((size_t)(pos0 + T) * half),
        sn((size_t)(pos0 + T) * half);
    for (auto& v : qkv) v = nd(rng);
    for (size_t i = 0; i < cs.size(); ++i) {
        cs[i] = std::cos(0.1f * (float)i);
        sn[i] = std::sin(0.1f * (float)i);
    }
    std::vector<float> qr((size_t)T * nh * hd, NAN);
    emu_launch({(unsigned)nh, (unsigned)T, 0}, 64, 0, [&] {
        q_rope_rows(qkv.data(), qkv_w, pos0, nh, hd, cs.data(), sn.data(), neox, qr.data());
    });
    for (int t = 0; t < T; ++t)
        for (int h = 0; h < nh; ++h)
            for (int i = 0; i < half; ++i) {
                const int a = neox ? i : 2 * i, bb = neox ? i + half : 2 * i + 1;
                const float* q = qkv.data() + (size_t)t * qkv_w + h * hd;
                const size_t at = (size_t)(pos0 + t) * half + i;
                const float c = cs[at], s = sn[at];
                const float want0 = q[a] * c - q[bb] * s, want1 = q[a] * s + q[bb] * c;
                const float* o = qr.data() + ((size_t)t * nh + h) * hd;
                if (o[a] != want0 || o[bb] != want1) {
                    std::printf("FAIL q_rope_rows (neox %d) at row %d head %d pair %d\n", neox, t,
                                h, i);
                    ++failures;
                    return;
                }
            }
}

struct Check {
    template <int KIND, int MODE>
    static void run(std::mt19937& rng) {
        // Partial row and token tiles; two token tiles once.
        check<KIND, MODE>(40, MODE == MODE_STORE ? 33 : 9, rng);
        if (MODE == MODE_STORE) check<KIND, MODE>(130, 5, rng);
    }
};

int main() {
    std::mt19937 rng(13);
    check_rope(0, rng);
    check_rope(1, rng);
    return emu_every_layout<Check>(
        rng, failures, "wide prefill: the int8 and f16 GEMMs' rows agree with the mat-vec");
}
