// The host emulation tests of the projections' shared parts (after emu.h and decode.cu):
// random weights in the fused path's repacked layouts, random inputs, the columns
// quantized once, and a run over every layout and epilogue.

#pragma once

// A matrix of `rows` rows of K values: qs (16 bytes of nibbles, or 32 signed bytes, a
// 32-value block) and dm (a row's scales: per block an f32 pair, or Q4_K's super-block
// pairs then each block's 6-bit (sc, m) bytes).
struct EmuWeights {
    int rows, K, nb;
    std::vector<uint8_t> qs, dm;
};

template <int KIND>
EmuWeights emu_weights(int rows, int K, std::mt19937& rng) {
    EmuWeights w{rows, K, K / QK, {}, {}};
    const int qb = KIND == KIND_Q8_0 ? 32 : 16;
    std::uniform_int_distribution<int> byte(0, 255);
    w.qs.resize((size_t)rows * w.nb * qb);
    for (auto& b : w.qs) b = (uint8_t)byte(rng);
    std::uniform_real_distribution<float> sc(-0.02f, 0.02f);
    w.dm.resize((size_t)rows * scale_bytes<KIND>(w.nb));
    for (int r = 0; r < rows; ++r) {
        uint8_t* row = w.dm.data() + (size_t)r * scale_bytes<KIND>(w.nb);
        if (KIND == KIND_Q4_K) {
            float* dd = (float*)row;
            for (int s = 0; s < w.nb / 8; ++s) {
                dd[2 * s] = std::fabs(sc(rng)) * 0.1f;
                dd[2 * s + 1] = -std::fabs(sc(rng)) * 0.1f;
            }
            uint8_t* sm = row + w.nb;
            for (int b = 0; b < 2 * w.nb; ++b) sm[b] = (uint8_t)(byte(rng) & 63);
        } else {
            float* f = (float*)row;
            for (int b = 0; b < 2 * w.nb; ++b) f[b] = sc(rng);
        }
    }
    return w;
}

// `cols` input columns of K values (room for 32), the RMS norm's weights, a bias (store)
// and the outputs' starting values (add: a residual; else zeros), `rows` a column.
struct EmuInputs {
    std::vector<float> x, norm, bias, init;
};

template <int MODE>
EmuInputs emu_inputs(int K, int rows, int cols, std::mt19937& rng) {
    std::normal_distribution<float> nd(0.f, 1.f);
    EmuInputs in;
    in.x.resize((size_t)32 * K);
    for (auto& v : in.x) v = nd(rng);
    in.norm.resize(K);
    for (auto& v : in.norm) v = 1.f + 0.1f * nd(rng);
    if (MODE == MODE_STORE) {
        in.bias.resize(rows);
        for (auto& v : in.bias) v = nd(rng);
    }
    in.init.assign((size_t)cols * rows, 0.f);
    if (MODE == MODE_ADD)
        for (auto& v : in.init) v = nd(rng);
    return in;
}

inline const char* emu_kind_name(int k) {
    static const char* n[] = {"q4_0", "q4_1", "q8_0", "q4_k"};
    return n[k];
}

// The step's `cols` columns of x quantized once for a KIND mat-mat (`qcols_*`, as a
// batched step does), into q and ds (room for `bucket` columns).
template <int KIND>
void emu_qcols(const std::vector<unsigned long long>& step, const EmuInputs& in, int K,
               int bucket, std::vector<int8_t>& q, std::vector<float2>& ds) {
    const float eps = 1e-5f;
    q.assign((size_t)bucket * K, 0);
    ds.assign((size_t)bucket * (K / QK), float2{0.f, 0.f});
    auto* f = KIND == KIND_Q4_0   ? qcols_q4_0
              : KIND == KIND_Q4_1 ? qcols_q4_1
              : KIND == KIND_Q8_0 ? qcols_q8_0
                                  : qcols_q4_k;
    emu_launch({(unsigned)bucket, 1, 0}, 256, 0, [&] {
        f(step.data(), in.x.data(), in.norm.data(), eps, K, q.data(), ds.data());
    });
}

// Each of the `cols` columns alone through the single-stream mat-vec (`matvec`: S8, the
// eight-part order of mv8_*, else mv_*'s): the outputs (`rows` a column) from in.init.
template <int KIND, int MODE, bool S8>
std::vector<float> emu_single(const EmuWeights& w, const EmuInputs& in, int cols, int rows) {
    const int K = w.K;
    const float* b = in.bias.empty() ? nullptr : in.bias.data();
    std::vector<float> out = in.init;
    for (int c = 0; c < cols; ++c) {
        emu_launch({3, 1, 0}, 256, (size_t)K + 8 * (K / QK), [&] {
            matvec<KIND, MODE, S8>(in.x.data() + (size_t)c * K, in.norm.data(), 1e-5f, K,
                                   w.qs.data(), (const float2*)w.dm.data(), b, w.rows,
                                   out.data() + (size_t)c * rows);
        });
    }
    return out;
}

// C::template run<KIND, MODE>(rng) for every weight layout and epilogue; then the
// verdict from `failures`: exit status 1 after printing the count, else 0 after `ok`.
template <class C, int KIND>
void emu_every_mode(std::mt19937& rng) {
    C::template run<KIND, MODE_STORE>(rng);
    C::template run<KIND, MODE_ADD>(rng);
    C::template run<KIND, MODE_SWIGLU>(rng);
}

template <class C>
int emu_every_layout(std::mt19937& rng, const int& failures, const char* ok) {
    emu_every_mode<C, KIND_Q4_0>(rng);
    emu_every_mode<C, KIND_Q4_1>(rng);
    emu_every_mode<C, KIND_Q8_0>(rng);
    emu_every_mode<C, KIND_Q4_K>(rng);
    if (failures) {
        std::printf("%d failure(s)\n", failures);
        return 1;
    }
    std::printf("%s\n", ok);
    return 0;
}

