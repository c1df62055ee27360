// Single-stream mat-vec micro-benchmark: the fused decode's own kernels (decode.cu, included
// whole) on random weights of Llama-3-8B's and SmolLM2's projection shapes, each variant
// launched 40 times in one CUDA graph (with programmatic dependent launch, as the engine
// launches them) over four copies of the weights so that L2 does not keep them. Prints µs
// per launch and the weight bytes streamed per second, against a plain 16-byte read of the
// same quantized bytes. Build: scripts/cuda/mv_bench.sh; run on the GPU machine:
// `.device/m/mv_bench` (carry .device/m). Not part of the server.
#include "../../src/engine/model/cuda/decode.cu"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                                          \
    do {                                                                               \
        cudaError_t e_ = (x);                                                          \
        if (e_ != cudaSuccess) {                                                       \
            printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));          \
            exit(1);                                                                   \
        }                                                                              \
    } while (0)

// The quantized bytes read once, 16 at a time, four loads in flight per thread.
__global__ void stream_read(const int4* __restrict__ p, size_t n16, int* __restrict__ out) {
    int acc = 0;
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    const size_t st = (size_t)gridDim.x * blockDim.x;
    for (; i + 3 * st < n16; i += 4 * st) {
        const int4 a = __ldg(p + i), b = __ldg(p + i + st), c = __ldg(p + i + 2 * st),
                   d = __ldg(p + i + 3 * st);
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^
               d.y ^ d.z ^ d.w;
    }
    for (; i < n16; i += st) {
        const int4 a = __ldg(p + i);
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    if (acc == 0x12345678) out[0] = acc;
}

__device__ uint32_t mix(size_t i, uint32_t seed) {
    uint32_t h = (uint32_t)i * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    return h ^ (h >> 15);
}
__global__ void fill_bytes(uint8_t* p, size_t n, uint32_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        p[i] = (uint8_t)mix(i, seed);
}
__global__ void fill_f32(float* p, size_t n, uint32_t seed, float scale, float base) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        p[i] = base + scale * ((float)(mix(i, seed) & 0xffff) / 65536.f - 0.5f);
}
// A Q4_K row's scales: nb/8 f32 pairs (d, -dmin), then 2 nb bytes (sc, m).
__global__ void fix_q4k_scales(uint8_t* dm, int n, int nb) {
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < n; r += gridDim.x * blockDim.x) {
        float2* f = (float2*)(dm + (size_t)r * 3 * nb);
        for (int s = 0; s < nb / 8; ++s)
            f[s] = make_float2(0.001f * (1 + (r + s) % 7), -0.0005f * (1 + (r * 3 + s) % 5));
    }
}

struct Mat {
    uint8_t* qs;
    float2* dm;
    size_t qbytes, sbytes;
};

static Mat make_mat(int kind, int k, int n, uint32_t seed) {
    Mat m{};
    const int nb = k / QK;
    m.qbytes = (size_t)n * nb * (kind == KIND_Q8_0 ? 32 : 16);
    m.sbytes = (size_t)n * (kind == KIND_Q4_K ? 3 * nb : 8 * nb);
    CK(cudaMalloc(&m.qs, m.qbytes));
    CK(cudaMalloc(&m.dm, m.sbytes));
    fill_bytes<<<1024, 256>>>(m.qs, m.qbytes, seed);
    if (kind == KIND_Q4_K) {
        fill_bytes<<<1024, 256>>>((uint8_t*)m.dm, m.sbytes, seed * 7 + 1);
        fix_q4k_scales<<<256, 256>>>((uint8_t*)m.dm, n, nb);
    } else {
        fill_f32<<<1024, 256>>>((float*)m.dm, m.sbytes / 4, seed * 3 + 5, 0.002f, 0.f);
    }
    CK(cudaDeviceSynchronize());
    return m;
}

// One launch as the engine makes it: programmatic dependent launch on (Hopper).
static void launch(const void* f, int blocks, int threads, int smem, void** args,
                   cudaStream_t s) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    CK(cudaLaunchKernelExC(&cfg, f, args));
}

// µs per repetition of `body(rep, stream)` captured REPS times in one graph (best of 5).
template <typename F>
static float time_graph(F body, cudaStream_t s) {
    const int REPS = 40;
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < REPS; ++i) body(i, s);
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    CK(cudaGraphLaunch(ge, s));
    CK(cudaStreamSynchronize(s));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    float best = 1e30f;
    for (int t = 0; t < 5; ++t) {
        CK(cudaEventRecord(a, s));
        CK(cudaGraphLaunch(ge, s));
        CK(cudaEventRecord(b, s));
        CK(cudaStreamSynchronize(s));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        best = fminf(best, ms * 1000.f / REPS);
    }
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
    return best;
}

static const void* mv_fn(int kind, int mode, bool pre) {
#define P(K, KN, M, MN)                                                                \
    if (kind == K && mode == M) return pre ? (const void*)mvq_##KN##_##MN : (const void*)mv_##KN##_##MN;
    P(KIND_Q4_1, q4_1, MODE_STORE, store)
    P(KIND_Q4_1, q4_1, MODE_ADD, add)
    P(KIND_Q4_1, q4_1, MODE_SWIGLU, swiglu)
    P(KIND_Q8_0, q8_0, MODE_STORE, store)
    P(KIND_Q8_0, q8_0, MODE_ADD, add)
    P(KIND_Q8_0, q8_0, MODE_SWIGLU, swiglu)
    P(KIND_Q4_K, q4_k, MODE_STORE, store)
    P(KIND_Q4_K, q4_k, MODE_ADD, add)
    P(KIND_Q4_K, q4_k, MODE_SWIGLU, swiglu)
#undef P
    return nullptr;
}

int main() {
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("%s, %d multiprocessors\n", prop.name, sms);
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    const int KMAX = 14336;
    float *x, *norm, *out;
    int8_t* q;
    float2* ds;
    int* sink;
    CK(cudaMalloc(&x, KMAX * 4));
    CK(cudaMalloc(&norm, KMAX * 4));
    CK(cudaMalloc(&out, 2 * 131072 * 4));
    CK(cudaMalloc(&q, 2 * KMAX));
    CK(cudaMalloc(&ds, KMAX / QK * sizeof(float2)));
    CK(cudaMalloc(&sink, 4));
    fill_f32<<<64, 256>>>(x, KMAX, 11, 2.f, 0.f);
    fill_f32<<<64, 256>>>(norm, KMAX, 12, 0.4f, 1.f);
    CK(cudaDeviceSynchronize());
    struct Case {
        const char* name;
        int kind, k, n, mode;
        bool norm;
    };
    const Case cases[] = {
        {"llama3-8b gate|up, Q4_K 4096 x 2*14336, swiglu", KIND_Q4_K, 4096, 28672, MODE_SWIGLU, true},
        {"llama3-8b down, Q4_K 14336 x 4096, add", KIND_Q4_K, 14336, 4096, MODE_ADD, false},
        {"llama3-8b down, 8-bit (Q6_K) 14336 x 4096, add", KIND_Q8_0, 14336, 4096, MODE_ADD, false},
        {"llama3-8b Q|K, Q4_K 4096 x 5120, store", KIND_Q4_K, 4096, 5120, MODE_STORE, true},
        {"llama3-8b V, 8-bit (Q6_K) 4096 x 1024, store", KIND_Q8_0, 4096, 1024, MODE_STORE, true},
        {"llama3-8b output proj., Q4_K 4096 x 4096, add", KIND_Q4_K, 4096, 4096, MODE_ADD, false},
        {"vocabulary, 8-bit 4096 x 49152, store", KIND_Q8_0, 4096, 49152, MODE_STORE, true},
        {"smollm2 gate|up, Q4_1 576 x 2*1536, swiglu", KIND_Q4_1, 576, 3072, MODE_SWIGLU, true},
        {"smollm2 down, Q4_1 1536 x 576, add", KIND_Q4_1, 1536, 576, MODE_ADD, false},
    };
    for (const Case& c : cases) {
        const int COPIES = 4;
        Mat m[COPIES];
        for (int i = 0; i < COPIES; ++i) m[i] = make_mat(c.kind, c.k, c.n, 100 + i);
        const double bytes = (double)m[0].qbytes + m[0].sbytes;
        const int rows = c.mode == MODE_SWIGLU ? c.n / 2 : c.n;
        const int smem = c.k + 8 * (c.k / QK);
        printf("== %s: %.1f MB a matrix\n", c.name, bytes / 1e6);
        auto report = [&](const char* v, float us) {
            printf("  %-58s %8.2f us  %6.0f GB/s\n", v, us, bytes / us / 1e3);
        };
        {
            const float us = time_graph(
                [&](int i, cudaStream_t st) {
                    stream_read<<<sms * 8, 256, 0, st>>>((const int4*)m[i % COPIES].qs,
                                                         m[i % COPIES].qbytes / 16, sink);
                },
                s);
            printf("  %-58s %8.2f us  %6.0f GB/s (the quantized bytes alone)\n",
                   "plain 16-byte read", us, m[0].qbytes / us / 1e3);
        }
        float eps = 1e-5f;
        int K = c.k, N = c.n;
        const float* nrm = c.norm ? norm : nullptr;
        const float* bias = nullptr;
        int8_t* qn = c.kind == KIND_Q8_0 ? nullptr : q;
        int8_t* q8 = c.kind == KIND_Q8_0 ? q + KMAX : nullptr;
        const int8_t* qin = c.kind == KIND_Q8_0 ? q8 : qn;
        void* qargs[] = {&x, &nrm, &eps, &K, &qn, &q8, &ds};
        const void* fq = (const void*)qact;
        const void* fqw = (const void*)qact_w;
        {
            // qact_w must write qact's bytes (both layouts at once, as the engine asks
            // where one input feeds nibble and 8-bit matrices).
            int8_t* qb = q;
            int8_t* q8b = q + KMAX;
            void* both[] = {&x, &nrm, &eps, &K, &qb, &q8b, &ds};
            const size_t nq = 2 * (size_t)KMAX, nd = (size_t)(K / QK) * sizeof(float2);
            std::vector<char> want(nq + nd), got(nq + nd);
            for (int which = 0; which < 2; ++which) {
                CK(cudaMemsetAsync(q, 0x55, nq, s));
                CK(cudaMemsetAsync(ds, 0x55, nd, s));
                launch(which ? fqw : fq, 1, which ? 1024 : 256, 0, both, s);
                CK(cudaStreamSynchronize(s));
                std::vector<char>& h = which ? got : want;
                CK(cudaMemcpy(h.data(), q, nq, cudaMemcpyDeviceToHost));
                CK(cudaMemcpy(h.data() + nq, ds, nd, cudaMemcpyDeviceToHost));
            }
            printf("  qact_w bytes %s qact's\n", want == got ? "equal" : "DIFFER FROM");
        }
        for (int pre = 0; pre < 4; ++pre) {
            // 0: each block quantizes; 1: qact, then the mat-vec (as the engine runs it);
            // 2: the mat-vec alone on input quantized once beforehand; 3: qact_w, then
            // the mat-vec.
            const void* f = mv_fn(c.kind, c.mode, pre > 0);
            CK(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
            if (pre == 2) {
                launch(fq, 1, 256, 0, qargs, s);
                CK(cudaStreamSynchronize(s));
            }
            for (int per : {2, 4, 8}) {
                const int blocks = std::min((rows + 7) / 8, sms * per);
                const float us = time_graph(
                    [&](int i, cudaStream_t st) {
                        Mat& mm = m[i % COPIES];
                        if (pre == 0) {
                            void* a[] = {&x, &nrm, &eps, &K, &mm.qs, &mm.dm, &bias, &N, &out};
                            launch(f, blocks, 256, smem, a, st);
                        } else {
                            if (pre == 1) launch(fq, 1, 256, 0, qargs, st);
                            if (pre == 3) launch(fqw, 1, 1024, 0, qargs, st);
                            void* a[] = {(void*)&qin, &ds, &K, &mm.qs, &mm.dm, &bias, &N, &out};
                            launch(f, blocks, 256, smem, a, st);
                        }
                    },
                    s);
                char name[96];
                snprintf(name, sizeof name, "%s, %d blocks a multiprocessor",
                         pre == 0   ? "mv_ (each block quantizes)"
                         : pre == 1 ? "qact + mvq_"
                         : pre == 2 ? "mvq_ alone (input quantized before)"
                                    : "qact_w + mvq_",
                         per);
                report(name, us);
            }
        }
        for (int i = 0; i < COPIES; ++i) {
            CK(cudaFree(m[i].qs));
            CK(cudaFree(m[i].dm));
        }
    }
    return 0;
}
