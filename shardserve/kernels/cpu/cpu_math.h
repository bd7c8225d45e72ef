/* Vector types and vectorizable float32 math shared by the C kernels. */
#ifndef SHARDSERVE_CPU_MATH_H
#define SHARDSERVE_CPU_MATH_H

#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));                   /* 16 floats: one AVX-512 register */
typedef float v16u __attribute__((vector_size(64), aligned(4)));      /* the same, for unaligned access */

static inline v16 load16(const float *p) { return *(const v16u *)p; }
static inline void store16(float *p, v16 x) { *(v16u *)p = x; }

/* KV cache rows are float32 or bfloat16 (bf16 = 1): element i of a row, and 16 elements from i, as float32 (a
 * bfloat16 is the high half of its float, so widening is exact). Callers pass bf16 as a constant into
 * always-inline code, so each cache type gets its own loop. */
typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
static inline v16 load16_kv(const void *row, int64_t i, int bf16) {
    if (bf16) return (v16)(__builtin_convertvector(*(const u16x16 *)((const uint16_t *)row + i), u32x16) << 16);
    return load16((const float *)row + i);
}
static inline float load_kv(const void *row, int64_t i, int bf16) {
    if (!bf16) return ((const float *)row)[i];
    const uint32_t bits = (uint32_t)((const uint16_t *)row)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* exp(x), Cephes-style 2^n * p(r) with x clamped to [-87, 88]: |rel err| < 2e-7, vectorizes under omp simd. */
static inline float exp_clamped(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;          /* 2^n as float bits */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#endif
