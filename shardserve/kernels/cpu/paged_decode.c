/* Paged decode attention in float32 over a float32 or bfloat16 KV cache (paged_decode_f32 / paged_decode_bf16):
 * one query token per sequence attends over its context, reading K/V rows in place from the block cache (no
 * gathered copy); bfloat16 rows are widened exactly as they are read, so both give the same values for the same
 * cached numbers. Built by native.py with gcc -O3 -fopenmp.
 *
 * q        [B, Hq, D]   query of each decode sequence (Hq = Hk * G; query heads of one kv head are adjacent)
 * k_cache  [S, Hk, D]   this rank's K cache, S = num_blocks * block_size slots; v_cache likewise
 * slots    [B, L]       KV slot of each context position (row b valid up to lens[b])
 * lens     [B]          context length of each sequence (>= 1)
 * out      [B, Hq, D]
 * Each thread takes a run of consecutive sequences holding its share of the context tokens. For each it reads
 * every context slot's whole K row (all kv heads, contiguous) once, then each V row, prefetching rows a few
 * tokens ahead into L1: a block's rows are contiguous but blocks are scattered, so the hardware prefetcher
 * loses the stream at every block edge. Meanwhile it prefetches the next sequence's K and V into L2 (~300 KB
 * at SmolLM2 shapes, L2 holds it), which keeps many more memory requests in flight: 25% faster than
 * prefetching only the current rows, same results bit for bit. That prefetch is spread over both the K and
 * the V pass (the V pass reads from L2 and would otherwise leave memory idle): 1.23 -> 0.91 ms per layer with
 * both threads attending (B=64, context 192, cold), equal on one thread. When D is a multiple of 16 the dot products and
 * the V accumulation run on 16-float vectors (GCC vector extensions: AVX-512, or split into narrower registers).
 * At batch 64 x context 192 (SmolLM2 shapes) this is memory-bound: ~20 GB/s of K/V on 2 cores.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "cpu_math.h"

static inline float hsum16(v16 x) {
    x += __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    x += __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    x += __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    x += __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return x[0];
}

#define AI static inline __attribute__((always_inline))

/* a[0:n] . b[0:n], b a cache row's elements from b0 */
AI float dot(const float *restrict a, const void *restrict b, int64_t b0, int64_t n, int bf16) {
    if ((n & 15) == 0) {
        v16 acc = load16(a) * load16_kv(b, b0, bf16);
        for (int64_t i = 16; i < n; i += 16) acc += load16(a + i) * load16_kv(b, b0 + i, bf16);
        return hsum16(acc);
    }
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += a[i] * load_kv(b, b0 + i, bf16);
    return s;
}

/* o[0:n] += p * v[v0 : v0 + n] */
AI void axpy(float *restrict o, float p, const void *restrict v, int64_t v0, int64_t n, int bf16) {
    if ((n & 15) == 0) {
        for (int64_t i = 0; i < n; i += 16) store16(o + i, load16(o + i) + p * load16_kv(v, v0 + i, bf16));
        return;
    }
    for (int64_t i = 0; i < n; i++) o[i] += p * load_kv(v, v0 + i, bf16);
}

/* Prefetch a whole K or V row (all kv heads) ahead of use: rows of one block are contiguous, blocks are not. */
static inline void prefetch_row(const char *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i);
}

#define PREFETCH_AHEAD 6

/* Prefetch into L2 (not L1) rows [from, to) of the next sequence's K and V, while this one computes. */
static inline void prefetch_next(const char *k_cache, const char *v_cache, const int64_t *sl, int64_t from,
                                 int64_t to, int64_t bytes) {
    for (int64_t t = from; t < to; t++)
        for (int64_t i = 0; i < bytes; i += 64) {
            __builtin_prefetch(k_cache + sl[t] * bytes + i, 0, 2);
            __builtin_prefetch(v_cache + sl[t] * bytes + i, 0, 2);
        }
}

/* The sequences [*first, *last) of thread th of T: consecutive, holding about 1/T of all context tokens. */
static void token_share(const int64_t *lens, int64_t B, int th, int T, int64_t *first, int64_t *last) {
    int64_t total = 0, before = 0;
    for (int64_t b = 0; b < B; b++) total += lens[b];
    *first = B, *last = B;
    for (int64_t b = 0; b < B; b++) {
        const int64_t owner = (before + lens[b] / 2) * T / (total > 0 ? total : 1);    /* by its middle token */
        if (owner == th && *first == B) *first = b;
        if (owner > th) { *last = b; break; }
        before += lens[b];
    }
    if (*first == B) *last = B;
}

AI void paged_decode(const float *q, const char *k_cache, const char *v_cache, const int64_t *slots,
                     const int64_t *lens, float *out, int64_t B, int64_t Hq, int64_t Hk, int64_t D, int64_t L,
                     float scale, int threads, const int bf16) {
    /* a slot's K (or V) row: all kv heads, contiguous, of `bytes` bytes */
    const int64_t G = Hq / Hk, row = Hk * D, bytes = row * (bf16 ? 2 : 4);
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * (size_t)(Hq * L));    /* [Hq, n] of the current sequence */
        int64_t first, last;
        token_share(lens, B, omp_get_thread_num(), omp_get_num_threads(), &first, &last);
        for (int64_t b = first; b < last; b++) {
            const int64_t n = lens[b], *sl = slots + b * L;
            const int64_t next_n = b + 1 < last ? lens[b + 1] : 0, *next_sl = sl + L, half = next_n / 2;
            const float *qb = q + b * Hq * D;
            float *ob = out + b * Hq * D;
            for (int64_t t = 0; t < PREFETCH_AHEAD && t < n; t++) prefetch_row(k_cache + sl[t] * bytes, bytes);
            for (int64_t t = 0; t < n; t++) {
                const char *kr = k_cache + sl[t] * bytes;
                if (t + PREFETCH_AHEAD < n) prefetch_row(k_cache + sl[t + PREFETCH_AHEAD] * bytes, bytes);
                else if (t + PREFETCH_AHEAD - n < n) prefetch_row(v_cache + sl[t + PREFETCH_AHEAD - n] * bytes, bytes);
                prefetch_next(k_cache, v_cache, next_sl, t * half / n, (t + 1) * half / n, bytes);
                for (int64_t h = 0; h < Hk; h++)
                    for (int64_t g = 0; g < G; g++)
                        scores[(h * G + g) * n + t] = dot(qb + (h * G + g) * D, kr, h * D, D, bf16) * scale;
            }
            for (int64_t hq = 0; hq < Hq; hq++) {
                float *s = scores + hq * n, m = s[0], sum = 0.0f;
                for (int64_t t = 1; t < n; t++) m = s[t] > m ? s[t] : m;
#pragma omp simd reduction(+ : sum)
                for (int64_t t = 0; t < n; t++) {
                    s[t] = exp_clamped(s[t] - m);
                    sum += s[t];
                }
                const float inv = 1.0f / sum;
                for (int64_t t = 0; t < n; t++) s[t] *= inv;
            }
            memset(ob, 0, sizeof(float) * (size_t)(Hq * D));
            for (int64_t t = 0; t < n; t++) {
                const char *vr = v_cache + sl[t] * bytes;
                if (t + PREFETCH_AHEAD < n) prefetch_row(v_cache + sl[t + PREFETCH_AHEAD] * bytes, bytes);
                prefetch_next(k_cache, v_cache, next_sl, half + t * (next_n - half) / n,
                              half + (t + 1) * (next_n - half) / n, bytes);
                for (int64_t h = 0; h < Hk; h++)
                    for (int64_t g = 0; g < G; g++)
                        axpy(ob + (h * G + g) * D, scores[(h * G + g) * n + t], vr, h * D, D, bf16);
            }
        }
        free(scores);
    }
}

void paged_decode_f32(const float *q, const float *k_cache, const float *v_cache, const int64_t *slots,
                      const int64_t *lens, float *out, int64_t B, int64_t Hq, int64_t Hk, int64_t D, int64_t L,
                      float scale, int threads) {
    paged_decode(q, (const char *)k_cache, (const char *)v_cache, slots, lens, out, B, Hq, Hk, D, L, scale, threads, 0);
}

/* The same over a bfloat16 cache (k_cache, v_cache [S, Hk, D] bf16). */
void paged_decode_bf16(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *slots,
                       const int64_t *lens, float *out, int64_t B, int64_t Hq, int64_t Hk, int64_t D, int64_t L,
                       float scale, int threads) {
    paged_decode(q, (const char *)k_cache, (const char *)v_cache, slots, lens, out, B, Hq, Hk, D, L, scale, threads, 1);
}
