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

#include "emu_proj.h"

static int failures = 0;

template <int KIND, int MODE, int RT, int NT>
static void check_tile(const EmuWeights& w, int cols, const EmuInputs& in,
                       const std::vector<float>& single) {
    const int K = w.K;
    const int rows = MODE == MODE_SWIGLU ? w.rows / 2 : w.rows;
    std::vector<unsigned long long> step(1, (unsigned long long)cols);
    const int bucket = ((cols + 7) / 8) * 8;
    // The columns quantized once, as a batched step does.
    std::vector<int8_t> q;
    std::vector<float2> ds;
    emu_qcols<KIND>(step, in, K, bucket, q, ds);
    constexpr int R = MODE == MODE_SWIGLU ? 2 : 1;
    using L = S8Layout<KIND, R * 16 * RT, 8 * NT, s8_round_blocks<KIND>()>;
    const size_t smem = (size_t)s8_stages(R, RT, NT) * L::BYTES;
    std::vector<float> out = in.init;
    const float* b = in.bias.empty() ? nullptr : in.bias.data();
    const Dim3 grid{(unsigned)((cols + 8 * NT - 1) / (8 * NT)), (unsigned)((rows + 16 * RT - 1) / (16 * RT)), 0};
    emu_launch(grid, 256, smem, [&] {
        DYN_SMEM(uint8_t, dsmem);
        s8_matmat<KIND, MODE, RT, NT>(step.data(), K, w.qs.data(), (const float2*)w.dm.data(), b,
                                      w.rows, out.data(), rows, q.data(), ds.data(), dsmem);
    });
    if (std::memcmp(out.data(), single.data(), sizeof(float) * (size_t)cols * rows) != 0) {
        std::printf("FAIL s8 %s mode %d tile %dx%d against mv8\n", emu_kind_name(KIND), MODE, 16 * RT,
                    8 * NT);
        ++failures;
    }
}

template <int KIND, int MODE>
static void check(std::mt19937& rng) {
    // Rows of 18 blocks (SmolLM2's 576: the eight parts get 3 or 2 blocks each) or, for
    // Q4_K's 8-block super-blocks, 24.
    const int K = KIND == KIND_Q4_K ? 768 : 576, rows = 88, cols = 11;
    const EmuWeights w = emu_weights<KIND>(MODE == MODE_SWIGLU ? 2 * rows : rows, K, rng);
    const EmuInputs in = emu_inputs<MODE>(K, rows, cols, rng);
    const std::vector<float> single = emu_single<KIND, MODE, true>(w, in, cols, rows);
    check_tile<KIND, MODE, 1, 1>(w, cols, in, single);
    check_tile<KIND, MODE, 2, 2>(w, cols, in, single);
    check_tile<KIND, MODE, 1, 4>(w, cols, in, single);
    if constexpr (MODE != MODE_SWIGLU) check_tile<KIND, MODE, 4, 1>(w, cols, in, single);
}

struct Check {
    template <int KIND, int MODE>
    static void run(std::mt19937& rng) {
        check<KIND, MODE>(rng);
    }
};

int main() {
    std::mt19937 rng(11);
    return emu_every_layout<Check>(rng, failures,
                                   "eight-part projections: batched bit-identical to single-stream in every case");
}
