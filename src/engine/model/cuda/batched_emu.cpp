// Host emulation of the default batched projections through decode.cu itself, for
// machines without a GPU (emu.h says how). The invariant that makes batched decode steps
// bit-identical to single-stream ones by default: for every weight layout (Q4_0, Q4_1,
// the 8-bit layout, Q4_K) and epilogue (store, add, SwiGLU), each batched mat-mat gives
// every column exactly the bits of the single-stream mat-vec (`matvec`, as `mv_*` runs
// it) on that column alone: the dp4a kernels quantizing in every block (`mm_*`, 8 and 32
// columns at a time) and on columns quantized once (`mmq_*`), and the tensor-core ones
// (`tc_*` 8 columns, `tc32_*` 32, `tcs_*` staged 8, `tcs32_*`/`tcs32w_*`/`tcs32p_*`
// staged 32 in their three staging shapes, `tcs16_*` staged 16). Random weights and
// inputs; row and column counts that leave partial tiles. Run by `cargo test`
// (src/engine/model/cuda_emu.rs); exits non-zero after reporting every failure.

#include "emu.h"
#include "decode.cu"

#include "emu_proj.h"

static int failures = 0;

template <int KIND, int MODE>
static void check(std::mt19937& rng) {
    const int K = KIND == KIND_Q4_K ? 768 : 576, rows = 40, cols = 19;
    const EmuWeights w = emu_weights<KIND>(MODE == MODE_SWIGLU ? 2 * rows : rows, K, rng);
    const EmuInputs in = emu_inputs<MODE>(K, rows, cols, rng);
    const float eps = 1e-5f;
    const float* b = in.bias.empty() ? nullptr : in.bias.data();
    const float2* dm = (const float2*)w.dm.data();
    const int nb = K / QK;
    const std::vector<float> single = emu_single<KIND, MODE, false>(w, in, cols, rows);
    std::vector<unsigned long long> step(1, (unsigned long long)cols);
    const int bucket = 32;
    std::vector<int8_t> q;
    std::vector<float2> ds;
    emu_qcols<KIND>(step, in, K, bucket, q, ds);
    auto compare = [&](const char* what, const std::vector<float>& out) {
        if (std::memcmp(out.data(), single.data(), sizeof(float) * (size_t)cols * rows) != 0) {
            std::printf("FAIL %s %s mode %d against the single-stream mat-vec\n", what,
                        emu_kind_name(KIND), MODE);
            ++failures;
        }
    };
    constexpr int R = MODE == MODE_SWIGLU ? 2 : 1;
    const unsigned row_tiles = (rows + 15) / 16;
    // dp4a: 8 and 32 columns at a time, quantized in every block (all columns in shared
    // memory at once) and on the columns quantized once.
    {
        const size_t colb = (size_t)K + 8 * nb;
        std::vector<float> out = in.init;
        emu_launch({3, 1, 0}, 256, (size_t)cols * colb, [&] {
            matmat<KIND, MODE, 8>(step.data(), in.x.data(), in.norm.data(), eps, K, w.qs.data(),
                                  dm, b, w.rows, out.data(), rows, cols);
        });
        compare("mm (8 columns)", out);
        out = in.init;
        emu_launch({3, 1, 0}, 256, (size_t)cols * colb, [&] {
            matmat<KIND, MODE, 32>(step.data(), in.x.data(), in.norm.data(), eps, K, w.qs.data(),
                                   dm, b, w.rows, out.data(), rows, cols);
        });
        compare("mm32", out);
        out = in.init;
        emu_launch({3, 1, 0}, 256, (size_t)cols * colb, [&] {
            matmat<KIND, MODE, 8>(step.data(), nullptr, nullptr, 0.f, K, w.qs.data(), dm, b,
                                  w.rows, out.data(), rows, cols, q.data(), ds.data());
        });
        compare("mmq", out);
    }
    // Tensor cores.
    {
        std::vector<float> out = in.init;
        emu_launch({(unsigned)((cols + 7) / 8), row_tiles, 0}, 256, 0, [&] {
            tc_matmat<KIND, MODE, 8, 1>(step.data(), K, w.qs.data(), dm, b, w.rows, out.data(),
                                        rows, q.data(), ds.data());
        });
        compare("tc", out);
        out = in.init;
        emu_launch({(unsigned)((cols + 31) / 32), row_tiles, 0}, 512, 0, [&] {
            tc_matmat<KIND, MODE, 16, 4>(step.data(), K, w.qs.data(), dm, b, w.rows,
                                         out.data(), rows, q.data(), ds.data());
        });
        compare("tc32", out);
        out = in.init;
        emu_launch({(unsigned)((cols + 7) / 8), row_tiles, 0}, 256, 0, [&] {
            tcs_matmat<KIND, MODE>(step.data(), K, w.qs.data(), dm, b, w.rows, out.data(), rows,
                                   q.data(), ds.data());
        });
        compare("tcs", out);
        constexpr int QB = KIND == KIND_Q8_0 ? 32 : 16;
        auto staged = [&]<int RB, int NS, int NT>(const char* what) {
            std::vector<float> o = in.init;
            const size_t smem = (size_t)NS * tcs32_stage_bytes(QB, R, RB, 8 * NT);
            emu_launch({(unsigned)((cols + 8 * NT - 1) / (8 * NT)), row_tiles, 0}, 512, smem, [&] {
                DYN_SMEM(uint8_t, dsmem);
                tcs32_matmat<KIND, MODE, RB, NS, NT>(step.data(), K, w.qs.data(), dm, b, w.rows,
                                                     o.data(), rows, q.data(), ds.data(), dsmem);
            });
            compare(what, o);
        };
        staged.template operator()<8, 2, 4>("tcs32");
        staged.template operator()<16, 2, 4>("tcs32w");
        staged.template operator()<8, 4, 4>("tcs32p");
        staged.template operator()<16, 2, 2>("tcs16");
    }
}

struct Check {
    template <int KIND, int MODE>
    static void run(std::mt19937& rng) {
        check<KIND, MODE>(rng);
    }
};

int main() {
    std::mt19937 rng(5);
    return emu_every_layout<Check>(rng, failures,
                                   "default projections: every batched kernel bit-identical to single-stream");
}
