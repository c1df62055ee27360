// CUDA's built-ins for the host emulation tests (`*_emu.cpp`, run by `cargo test` through
// src/engine/model/cuda_emu.rs): the kernels' own sources compile as C++20 on the CPU
// with CANDELA_EMU defined (as compute capability 8.0, so the tensor-core kernels are
// in). A block runs as blockDim.x OS threads; warp shuffles and mma products are
// warp-wide exchanges (every lane of the warp must reach them, as on the GPU with full
// masks), in the PTX fragment layouts; __syncthreads is a barrier; cp.async copies at
// once; blocks run one after another (every other launch from the last block back, so
// that no block can count on another having run). Proves index arithmetic and
// synchronization and the bits of integer sums, not speed or the GPU's rounding of
// `expf` and friends. Needs `_Float16` (GCC 12 or later on x86-64).

#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#define CANDELA_EMU
#define __CUDA_ARCH__ 800
#define __device__
#define __host__
#define __forceinline__ inline
#define __global__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;

typedef _Float16 __half;
struct __half2 {
    __half x, y;
};
struct uint4 {
    uint32_t x, y, z, w;
};
struct int4 {
    int x, y, z, w;
};
struct int2 {
    int x, y;
};
struct uint2 {
    uint32_t x, y;
};
struct float2 {
    float x, y;
};
struct float4 {
    float x, y, z, w;
};
struct uchar2 {
    unsigned char x, y;
};
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uchar2 make_uchar2(unsigned char x, unsigned char y) { return {x, y}; }

inline __half __float2half_rn(float f) { return (__half)f; }
inline float __half2float(__half h) { return (float)h; }
inline __half2 __floats2half2_rn(float a, float b) { return {(__half)a, (__half)b}; }
inline float2 __half22float2(__half2 h) { return {(float)h.x, (float)h.y}; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline int __float2int_rn(float f) { return (int)std::nearbyint(f); }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
template <class T>
inline T __ldg(const T* p) {
    return *p;
}
inline float __ldcg(const float* p) { return *p; }
inline void __threadfence() {}
[[noreturn]] inline void __trap() { std::abort(); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    return std::atomic_ref<unsigned>(*p).fetch_add(v);
}
inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; ++i) c += (int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i));
    return c;
}
inline unsigned __vsub4(unsigned a, unsigned b) {
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= (((a >> (8 * i)) - (b >> (8 * i))) & 0xffu) << (8 * i);
    return r;
}
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
    const uint64_t b = (uint64_t)x | ((uint64_t)y << 32);
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) r |= (uint32_t)((b >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}

// A block in flight: its barrier, its dynamic shared memory, and per warp an exchange
// area for shuffles and products.
struct EmuWarp {
    std::barrier<> bar{32};
    uint32_t v[32];
    uint32_t a[32][4], b[32][2];
    // Barriers of the lane groups that shuffle under narrower masks.
    std::mutex mu;
    std::map<unsigned, std::unique_ptr<std::barrier<>>> groups;
    std::barrier<>& group(unsigned mask) {
        if (mask == 0xffffffffu) return bar;
        std::lock_guard<std::mutex> l(mu);
        auto& g = groups[mask];
        if (!g) g = std::make_unique<std::barrier<>>(__builtin_popcount(mask));
        return *g;
    }
};
struct EmuBlock {
    explicit EmuBlock(int threads) : bar(threads), warps(threads / 32) {}
    std::barrier<> bar;
    std::vector<EmuWarp> warps;
    std::vector<uint8_t> smem;
};
inline thread_local EmuBlock* emu_block = nullptr;

#define DYN_SMEM(T, name) T* name = (T*)emu_block->smem.data()
inline unsigned dyn_smem() { return (unsigned)emu_block->smem.size(); }
inline void __syncthreads() { emu_block->bar.arrive_and_wait(); }

inline EmuWarp& emu_warp() { return emu_block->warps[threadIdx.x >> 5]; }

// A shuffle among the lanes of `mask` (each of them must reach it; the partner must be
// one of them).
inline uint32_t emu_shfl_xor(unsigned mask, uint32_t v, int o) {
    const int lane = threadIdx.x & 31;
    EmuWarp& w = emu_warp();
    if (!(mask >> lane & 1u) || !(mask >> (lane ^ o) & 1u)) {
        std::fprintf(stderr, "shuffle outside its mask %08x (lane %d, xor %d)\n", mask, lane, o);
        std::abort();
    }
    std::barrier<>& bar = w.group(mask);
    w.v[lane] = v;
    bar.arrive_and_wait();
    const uint32_t r = w.v[lane ^ o];
    bar.arrive_and_wait();
    return r;
}
inline float __shfl_xor_sync(unsigned m, float v, int o) {
    return __int_as_float((int)emu_shfl_xor(m, (uint32_t)__float_as_int(v), o));
}
inline int __shfl_xor_sync(unsigned m, int v, int o) { return (int)emu_shfl_xor(m, (uint32_t)v, o); }

// The warp's A and B fragments side by side, for a lane to compute its own C entries.
inline EmuWarp& emu_mma_in(const uint32_t* a, int na, uint32_t b0, uint32_t b1) {
    const int lane = threadIdx.x & 31;
    EmuWarp& w = emu_warp();
    for (int i = 0; i < na; ++i) w.a[lane][i] = a[i];
    w.b[lane][0] = b0;
    w.b[lane][1] = b1;
    w.bar.arrive_and_wait();
    return w;
}

inline float emu_half(uint32_t r, int hi) {
    const uint16_t bits = hi ? (uint16_t)(r >> 16) : (uint16_t)r;
    __half h;
    std::memcpy(&h, &bits, 2);
    return (float)h;
}

// c (16x8, f32) += a (16x16, f16, row) * b (16x8, f16, col): lane 4g + t holds A (g,
// 2t..) (g + 8, 2t..) (g, 2t + 8..) (g + 8, 2t + 8..), B (2t.., g) (2t + 8.., g), C (g,
// 2t..) (g + 8, 2t..).
inline void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    EmuWarp& w = emu_mma_in(a, 4, b0, b1);
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    for (int e = 0; e < 4; ++e) {
        const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
        double s = 0;
        for (int k = 0; k < 16; ++k) {
            const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
            const float av = emu_half(w.a[(row % 8) * 4 + (k % 8) / 2][reg], k & 1);
            const float bv = emu_half(w.b[col * 4 + (k % 8) / 2][k >= 8 ? 1 : 0], k & 1);
            s += (double)av * bv;
        }
        c[e] = (float)(s + c[e]);
    }
    w.bar.arrive_and_wait();
}

inline int emu_s8(uint32_t r, int i) { return (int)(int8_t)(r >> (8 * i)); }

// c (16x8, s32) = a (16x16, s8, row) * b (16x8, s8, col): lane 4g + t holds A (g,
// 4t..4t+3) (g + 8, 4t..), B (4t..4t+3, g), C (g, 2t..) (g + 8, 2t..).
inline void mma_s8(int* c, int a0, int a1, int b0) {
    const uint32_t a[2] = {(uint32_t)a0, (uint32_t)a1};
    EmuWarp& w = emu_mma_in(a, 2, (uint32_t)b0, 0);
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    for (int e = 0; e < 4; ++e) {
        const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
        int s = 0;
        for (int k = 0; k < 16; ++k)
            s += emu_s8(w.a[(row % 8) * 4 + k / 4][row >= 8 ? 1 : 0], k % 4) *
                 emu_s8(w.b[col * 4 + k / 4][0], k % 4);
        c[e] = s;
    }
    w.bar.arrive_and_wait();
}

// c (16x8, s32) = a (16x32, s8, row) * b (32x8, s8, col): A (g, 4t..) (g + 8, 4t..) (g,
// 16 + 4t..) (g + 8, 16 + 4t..), B (4t.., g) (16 + 4t.., g).
inline void mma_s8_k32(int* c, const int (&a)[4], const int (&b)[2]) {
    const uint32_t av[4] = {(uint32_t)a[0], (uint32_t)a[1], (uint32_t)a[2], (uint32_t)a[3]};
    EmuWarp& w = emu_mma_in(av, 4, (uint32_t)b[0], (uint32_t)b[1]);
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    for (int e = 0; e < 4; ++e) {
        const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
        int s = 0;
        for (int k = 0; k < 32; ++k) {
            const int reg = (row >= 8 ? 1 : 0) + (k >= 16 ? 2 : 0);
            s += emu_s8(w.a[(row % 8) * 4 + (k % 16) / 4][reg], k % 4) *
                 emu_s8(w.b[col * 4 + (k % 16) / 4][k >= 16 ? 1 : 0], k % 4);
        }
        c[e] = s;
    }
    w.bar.arrive_and_wait();
}

inline void cp_async16(void* s, const void* g) { std::memcpy(s, g, 16); }
inline void cp_async8(void* s, const void* g) { std::memcpy(s, g, 8); }
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}

// Run `body` for every block of `grid`, `threads` threads a block, `smem` bytes of
// dynamic shared memory (filled with 0xff bytes: NaN floats, so reading what nobody wrote
// shows).
inline unsigned emu_launches = 0;
template <class F>
void emu_launch(Dim3 grid, int threads, size_t smem, F body) {
    blockDim = {(unsigned)threads, 1, 1};
    gridDim = grid;
    const bool back = emu_launches++ % 2 == 0;
    for (unsigned iy = 0; iy < grid.y; ++iy) {
        for (unsigned ix = 0; ix < grid.x; ++ix) {
            const unsigned by = back ? grid.y - 1 - iy : iy, bx = back ? grid.x - 1 - ix : ix;
            EmuBlock blk(threads);
            blk.smem.assign(smem, 0xff);
            std::vector<std::thread> ts;
            for (int i = 0; i < threads; ++i) {
                ts.emplace_back([&, i] {
                    threadIdx = {(unsigned)i, 0, 0};
                    blockIdx = {bx, by, 0};
                    emu_block = &blk;
                    body();
                });
            }
            for (auto& t : ts) t.join();
        }
    }
}
