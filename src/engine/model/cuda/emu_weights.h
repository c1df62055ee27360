// Random weights in the fused path's repacked layouts and random inputs, for the host
// emulation tests of the projections (after emu.h and decode.cu).

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
