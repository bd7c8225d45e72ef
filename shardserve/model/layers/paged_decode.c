/* Paged decode attention, float32: one query token per sequence attends over its context, reading K/V rows
 * in place from the block cache (no gathered copy). Built by native_attention.py with gcc -O3 -fopenmp.
 *
 * q        [B, Hq, D]   query of each decode sequence (Hq = Hk * G; query heads of one kv head are adjacent)
 * k_cache  [S, Hk, D]   this rank's K cache, S = num_blocks * block_size slots; v_cache likewise
 * slots    [B, L]       KV slot of each context position (row b valid up to lens[b])
 * lens     [B]          context length of each sequence (>= 1)
 * out      [B, Hq, D]
 * Parallel over sequences: a task reads each context slot's whole K row (all kv heads, contiguous) once, then V.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* exp(x) for x <= 0 (softmax after subtracting the max), Cephes-style: 2^n * p(r), |rel err| < 2e-7. */
static inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale = { .i = ((int32_t)n + 127) << 23 };
    return p * scale.f;
}

static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

void paged_decode_f32(const float *q, const float *k_cache, const float *v_cache, const int64_t *slots,
                      const int64_t *lens, float *out, int64_t B, int64_t Hq, int64_t Hk, int64_t D, int64_t L,
                      float scale, int threads) {
    const int64_t G = Hq / Hk, row = Hk * D;      /* a slot's K (or V) row: all kv heads, contiguous */
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * (size_t)(Hq * L));    /* [Hq, n] of the current sequence */
        float *inv = malloc(sizeof(float) * (size_t)Hq);
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < B; b++) {
            const int64_t n = lens[b];
            const int64_t *sl = slots + b * L;
            const float *qb = q + b * Hq * D;
            for (int64_t t = 0; t < n; t++) {
                const float *kr = k_cache + sl[t] * row;
                if (t + 2 < n) __builtin_prefetch(k_cache + sl[t + 2] * row);
                for (int64_t hq = 0; hq < Hq; hq++) scores[hq * n + t] = dot(qb + hq * D, kr + (hq / G) * D, D) * scale;
            }
            for (int64_t hq = 0; hq < Hq; hq++) {
                float *s = scores + hq * n, m = s[0], sum = 0.0f;
                for (int64_t t = 1; t < n; t++) m = s[t] > m ? s[t] : m;
#pragma omp simd reduction(+ : sum)
                for (int64_t t = 0; t < n; t++) {
                    s[t] = exp_nonpos(s[t] - m);
                    sum += s[t];
                }
                inv[hq] = 1.0f / sum;
            }
            float *ob = out + b * Hq * D;
            memset(ob, 0, sizeof(float) * (size_t)(Hq * D));
            for (int64_t t = 0; t < n; t++) {
                const float *vr = v_cache + sl[t] * row;
                if (t + 2 < n) __builtin_prefetch(v_cache + sl[t + 2] * row);
                for (int64_t hq = 0; hq < Hq; hq++) {
                    const float p = scores[hq * n + t], *vh = vr + (hq / G) * D;
                    float *o = ob + hq * D;
#pragma omp simd
                    for (int64_t d = 0; d < D; d++) o[d] += p * vh[d];
                }
            }
            for (int64_t hq = 0; hq < Hq; hq++)
                for (int64_t d = 0; d < D; d++) ob[hq * D + d] *= inv[hq];
        }
        free(scores);
        free(inv);
    }
}
