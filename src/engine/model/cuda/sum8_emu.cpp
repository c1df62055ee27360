// Host emulation of the eight-part projections (sum8.cuh) through decode.cu itself, for
// machines without a GPU (emu.h says how). The invariant that makes batched decode steps
// bit-identical to single-stream ones: for every weight layout (Q4_0, Q4_1, the 8-bit
// layout, Q4_K) and epilogue (store, add, SwiGLU), the batched tensor-core mat-mat
// `s8_matmat` (on the columns `qcols_*` quantized once) at tiles of 16 to 64 rows by 8 to
// 32 columns gives each column exactly the bits of the single-stream mat-vec (`matvec`
// in the eight-part order, as `mv8_*` runs it) on that column alone. Random weights and
// inputs; rows whose blocks do not split evenly into the eight parts, row and column
// counts that leave partial tiles. Run by `cargo test` (src/engine/model/cuda_emu.rs);
// exits non-zero after reporting every failure.

#include "emu.h"
#include "decode.cu"

static int failures = 0;

template <int KIND>
struct Weights {
    int rows, K, nb;  // rows of the matrix (both halves for SwiGLU)
    std::vector<uint8_t> qs, dm;
};

template <int KIND>
static Weights<KIND> weights(int rows, int K, std::mt19937& rng) {
    Weights<KIND> w{rows, K, K / QK, {}, {}};
    const int qb = KIND == KIND_Q8_0 ? 32 : 16;
    std::uniform_int_distribution<int> byte(0, 255);
    w.qs.resize((size_t)rows * w.nb * qb);
    for (auto& b : w.qs) b = (uint8_t)byte(rng);
    std::uniform_real_distribution<float> sc(-0.02f, 0.02f);
    w.dm.resize((size_t)rows * scale_bytes<KIND>(w.nb));
    for (int r = 0; r < rows; ++r) {
        uint8_t* row = w.dm.data() + (size_t)r * scale_bytes<KIND>(w.nb);
        if (KIND == KIND_Q4_K) {
            // Per super-block (d, -dmin) as f32, then each block's 6-bit (sc, m).
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

static const char* kind_name(int k) {
    static const char* n[] = {"q4_0", "q4_1", "q8_0", "q4_k"};
    return n[k];
}

template <int KIND, int MODE, int RT, int NT>
static void check_tile(const Weights<KIND>& w, int cols, const std::vector<float>& x,
                       const std::vector<float>& norm, const std::vector<float>& bias,
                       const std::vector<float>& init, const std::vector<float>& single) {
    const int K = w.K, nb = w.nb;
    const int rows = MODE == MODE_SWIGLU ? w.rows / 2 : w.rows;
    const float eps = 1e-5f;
    std::vector<unsigned long long> step(1, (unsigned long long)cols);
    const int bucket = ((cols + 7) / 8) * 8;
    // The columns quantized once, as a batched step does.
    std::vector<int8_t> q((size_t)bucket * K);
    std::vector<float2> ds((size_t)bucket * nb);
    emu_launch({(unsigned)bucket, 1, 0}, 256, 0, [&] {
        if (KIND == KIND_Q4_0) qcols_q4_0(step.data(), x.data(), norm.data(), eps, K, q.data(), ds.data());
        if (KIND == KIND_Q4_1) qcols_q4_1(step.data(), x.data(), norm.data(), eps, K, q.data(), ds.data());
        if (KIND == KIND_Q8_0) qcols_q8_0(step.data(), x.data(), norm.data(), eps, K, q.data(), ds.data());
        if (KIND == KIND_Q4_K) qcols_q4_k(step.data(), x.data(), norm.data(), eps, K, q.data(), ds.data());
    });
    constexpr int R = MODE == MODE_SWIGLU ? 2 : 1;
    using L = S8Layout<KIND, R * 16 * RT, 8 * NT, s8_round_blocks<KIND>()>;
    const size_t smem = (size_t)s8_stages(R, RT, NT) * L::BYTES;
    std::vector<float> out = init;
    const float* b = bias.empty() ? nullptr : bias.data();
    const Dim3 grid{(unsigned)((cols + 8 * NT - 1) / (8 * NT)), (unsigned)((rows + 16 * RT - 1) / (16 * RT)), 0};
    emu_launch(grid, 256, smem, [&] {
        DYN_SMEM(uint8_t, dsmem);
        s8_matmat<KIND, MODE, RT, NT>(step.data(), K, w.qs.data(), (const float2*)w.dm.data(), b,
                                      w.rows, out.data(), rows, q.data(), ds.data(), dsmem);
    });
    if (std::memcmp(out.data(), single.data(), sizeof(float) * (size_t)cols * rows) != 0) {
        std::printf("FAIL s8 %s mode %d tile %dx%d against mv8\n", kind_name(KIND), MODE, 16 * RT,
                    8 * NT);
        ++failures;
    }
}

template <int KIND, int MODE>
static void check(std::mt19937& rng) {
    // Rows of 18 blocks (SmolLM2's 576: the eight parts get 3 or 2 blocks each) or, for
    // Q4_K's 8-block super-blocks, 24.
    const int K = KIND == KIND_Q4_K ? 768 : 576, rows = 88, cols = 11;
    const Weights<KIND> w = weights<KIND>(MODE == MODE_SWIGLU ? 2 * rows : rows, K, rng);
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<float> x((size_t)16 * K * 4), norm(K), bias, init((size_t)cols * rows, 0.f);
    for (auto& v : x) v = nd(rng);
    for (auto& v : norm) v = 1.f + 0.1f * nd(rng);
    if (MODE == MODE_STORE) {
        bias.resize(rows);
        for (auto& v : bias) v = nd(rng);
    }
    if (MODE == MODE_ADD)
        for (auto& v : init) v = nd(rng);
    const float eps = 1e-5f;
    const float* b = bias.empty() ? nullptr : bias.data();
    // Each column alone through the single-stream mat-vec.
    std::vector<float> single = init;
    const size_t smem = (size_t)K + 8 * (K / QK);
    for (int c = 0; c < cols; ++c) {
        emu_launch({3, 1, 0}, 256, smem, [&] {
            matvec<KIND, MODE, true>(x.data() + (size_t)c * K, norm.data(), eps, K, w.qs.data(),
                                     (const float2*)w.dm.data(), b, w.rows,
                                     single.data() + (size_t)c * rows);
        });
    }
    check_tile<KIND, MODE, 1, 1>(w, cols, x, norm, bias, init, single);
    check_tile<KIND, MODE, 2, 2>(w, cols, x, norm, bias, init, single);
    check_tile<KIND, MODE, 1, 4>(w, cols, x, norm, bias, init, single);
    if constexpr (MODE != MODE_SWIGLU) check_tile<KIND, MODE, 4, 1>(w, cols, x, norm, bias, init, single);
}

template <int KIND>
static void check_kind(std::mt19937& rng) {
    check<KIND, MODE_STORE>(rng);
    check<KIND, MODE_ADD>(rng);
    check<KIND, MODE_SWIGLU>(rng);
}

int main() {
    std::mt19937 rng(11);
    check_kind<KIND_Q4_0>(rng);
    check_kind<KIND_Q4_1>(rng);
    check_kind<KIND_Q8_0>(rng);
    check_kind<KIND_Q4_K>(rng);
    if (failures) {
        std::printf("%d failure(s)\n", failures);
        return 1;
    }
    std::printf("eight-part projections: batched bit-identical to single-stream in every case\n");
    return 0;
}
