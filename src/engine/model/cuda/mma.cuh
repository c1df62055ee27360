// The f16 tensor-core product shared by flash.cu, prefill.cuh and attn_tc.cuh (sm_80 and
// later), and the packing of its f16 operands.
#pragma once

// Two f32 values rounded to an f16 pair in one register (low half: lo).
__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

#if __CUDA_ARCH__ >= 800 && !defined(CANDELA_EMU)
// c (16x8, f32) += a (16x16, f16, row) * b (16x8, f16, col).
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif
