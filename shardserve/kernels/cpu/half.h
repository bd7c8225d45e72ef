/* 16-bit floats: IEEE half-precision scales, as GGUF blocks store them, to float32 (exact); bfloat16 to and from
 * float32 (round to nearest even). */
#ifndef SHARDSERVE_HALF_H
#define SHARDSERVE_HALF_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

/* The half at p (little-endian, any alignment): F16C's conversion where the CPU has it, else the same value by
 * hand (subnormals, infinities and NaNs included). */
static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023;
    if (exp == 0) {
        const float f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    const uint32_t bits = sign | (exp == 31 ? 0x7f800000u | (man << 13) : ((exp + 112) << 23) | (man << 13));
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* bfloat16 bits -> float32 (exact: the high half of the float). */
static inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* float32 -> bfloat16 bits, rounded to nearest even as torch's .to(torch.bfloat16) does (a NaN stays a NaN). */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* f rounded to the nearest bfloat16, as a float32. */
static inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

#endif
