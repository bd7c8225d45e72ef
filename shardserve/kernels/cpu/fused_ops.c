/* Fused float32 element-wise kernels for the CPU: RMSNorm (+ residual add), rotary embedding, SiLU(gate) * up.
 * Each replaces 3-8 torch ops and their temporaries with one pass over the rows. Built by native.py with
 * gcc -O3 -fno-trapping-math -fopenmp -std=c11 (no fp contraction, so each product and sum rounds as torch's
 * separate ops do; no trapping math, so the clamps and floor in cpu_math.h vectorize).
 * Rows are independent: parallel over rows when there is enough work.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_math.h"
#include "half.h"

#define PARALLEL_MIN_ELEMS 32768

/* x, residual [T, H] (residual may be NULL) -> out = weight * norm(s), residual_out = s, where s = x + residual
 * (or x alone). norm(s) = s / sqrt(mean(s^2) + eps). residual_out may be NULL when residual is. */
void rms_norm_f32(const float *x, const float *residual, const float *weight, float *out, float *residual_out,
                  int64_t T, int64_t H, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (T * H >= PARALLEL_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * H;
        float *o = out + t * H;
        const float *s = xr;
        if (residual) {
            float *ro = residual_out + t * H;
            const float *rr = residual + t * H;
#pragma omp simd
            for (int64_t i = 0; i < H; i++) ro[i] = xr[i] + rr[i];
            s = ro;
        }
        float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
        for (int64_t i = 0; i < H; i++) sq += s[i] * s[i];
        const float r = 1.0f / sqrtf(sq / (float)H + eps);
#pragma omp simd
        for (int64_t i = 0; i < H; i++) o[i] = weight[i] * (s[i] * r);
    }
}

/* Rotate-half RoPE. x[t, h, :] at x + t * row_stride + h * D (a view into the fused qkv output);
 * cos/sin [max_pos, D/2]; positions [T] -> out [T, H, D] contiguous. */
void rotary_f32(const float *x, const int64_t *positions, const float *cos_table, const float *sin_table, float *out,
                int64_t T, int64_t H, int64_t D, int64_t row_stride, int threads) {
    const int64_t half = D / 2;
#pragma omp parallel for num_threads(threads) schedule(static) if (T * H * D >= PARALLEL_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_table + positions[t] * half, *s = sin_table + positions[t] * half;
        for (int64_t h = 0; h < H; h++) {
            const float *x1 = x + t * row_stride + h * D, *x2 = x1 + half;
            float *o1 = out + (t * H + h) * D, *o2 = o1 + half;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                o1[i] = x1[i] * c[i] - x2[i] * s[i];
                o2[i] = x2[i] * c[i] + x1[i] * s[i];
            }
        }
    }
}

/* o[0:n] = silu(g) * u. Kept out of line: inlined into the row loop below, GCC 12 vectorizes it ~3x worse. */
__attribute__((noinline)) static void silu_mul_row(const float *restrict g, const float *restrict u,
                                                   float *restrict o, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) o[i] = g[i] / (1.0f + exp_clamped(-g[i])) * u[i];
}

/* The same for linear_f32.c's fused gate_up epilogue, so both round alike. */
void silu_mul_span(const float *g, const float *u, float *out, int64_t n) { silu_mul_row(g, u, out, n); }

/* gate_up [T, 2I] (row stride row_stride; gate = first I columns, up = next I) -> out [T, I] = silu(gate) * up. */
void silu_mul_f32(const float *gate_up, float *out, int64_t T, int64_t I, int64_t row_stride, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (T * I >= PARALLEL_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++)
        silu_mul_row(gate_up + t * row_stride, gate_up + t * row_stride + I, out + t * I, I);
}

/* k_cache[slots[t]] = k[t], v_cache[slots[t]] = v[t] for t < T: rows of `row` floats (row strides k_stride,
 * v_stride: views into the fused qkv output are fine), stored as float32, or (bf16) rounded to the nearest
 * bfloat16. Caches hold num_slots rows. Returns the number of slots outside [0, num_slots), which are skipped
 * (the caller raises). */
static inline __attribute__((always_inline)) int64_t kv_write(const float *k, int64_t k_stride, const float *v,
                                                              int64_t v_stride, const int64_t *slots, void *k_cache,
                                                              void *v_cache, int64_t T, int64_t row,
                                                              int64_t num_slots, int threads, const int bf16) {
    int64_t bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : bad) if (T * row >= PARALLEL_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        const int64_t s = slots[t];
        if (s < 0 || s >= num_slots) {
            bad++;
            continue;
        }
        const float *kr = k + t * k_stride, *vr = v + t * v_stride;
        if (!bf16) {
            memcpy((float *)k_cache + s * row, kr, sizeof(float) * (size_t)row);
            memcpy((float *)v_cache + s * row, vr, sizeof(float) * (size_t)row);
            continue;
        }
        uint16_t *kc = (uint16_t *)k_cache + s * row, *vc = (uint16_t *)v_cache + s * row;
#pragma omp simd
        for (int64_t i = 0; i < row; i++) {
            kc[i] = float_to_bf16(kr[i]);
            vc[i] = float_to_bf16(vr[i]);
        }
    }
    return bad;
}

int64_t kv_write_f32(const float *k, int64_t k_stride, const float *v, int64_t v_stride, const int64_t *slots,
                     float *k_cache, float *v_cache, int64_t T, int64_t row, int64_t num_slots, int threads) {
    return kv_write(k, k_stride, v, v_stride, slots, k_cache, v_cache, T, row, num_slots, threads, 0);
}

int64_t kv_write_bf16(const float *k, int64_t k_stride, const float *v, int64_t v_stride, const int64_t *slots,
                      uint16_t *k_cache, uint16_t *v_cache, int64_t T, int64_t row, int64_t num_slots, int threads) {
    return kv_write(k, k_stride, v, v_stride, slots, k_cache, v_cache, T, row, num_slots, threads, 1);
}

/* x[t, 0:cols] (row stride ld) rounded in place to the nearest bfloat16, for t < T: where a bf16 model's tensor
 * would be stored in bf16, the one-call decoder rounds its float32 buffer. */
void round_bf16_rows(float *x, int64_t T, int64_t cols, int64_t ld, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (T * cols >= PARALLEL_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        float *r = x + t * ld;
#pragma omp simd
        for (int64_t i = 0; i < cols; i++) r[i] = round_bf16(r[i]);
    }
}

/* residual = round_bf16(x + residual) over T rows of H (a bf16 model's residual add). */
void add_round_bf16(const float *x, float *residual, int64_t T, int64_t H, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (T * H >= PARALLEL_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * H;
        float *r = residual + t * H;
#pragma omp simd
        for (int64_t i = 0; i < H; i++) r[i] = round_bf16(xr[i] + r[i]);
    }
}

/* Index of the first maximum of x[0:n], torch.argmax's answer: NaN counts as the maximum (its first one wins).
 * One vectorized pass finds the maximum and whether a NaN is present, a second finds where it first occurs. */
__attribute__((noinline)) int64_t argmax_row_f32(const float *restrict x, int64_t n) {   /* greedy_head.c uses it too */
    float m = x[0];
    int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t i = 0; i < n; i++) {
        m = x[i] > m ? x[i] : m;
        nan |= x[i] != x[i];
    }
    for (int64_t i0 = 0; i0 < n; i0 += 64) {               /* a vectorized test per 64, then the exact index */
        const int64_t end = i0 + 64 < n ? i0 + 64 : n;
        int hit = 0;
#pragma omp simd reduction(| : hit)
        for (int64_t i = i0; i < end; i++) hit |= nan ? x[i] != x[i] : x[i] == m;
        if (hit)
            for (int64_t i = i0; i < end; i++)
                if (nan ? x[i] != x[i] : x[i] == m) return i;
    }
    return 0;
}

/* x [T, V] (row stride row_stride) -> out [T]: argmax of each row. */
void argmax_rows_f32(const float *x, int64_t row_stride, int64_t T, int64_t V, int64_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (T * V >= PARALLEL_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) out[t] = argmax_row_f32(x + t * row_stride, V);
}
