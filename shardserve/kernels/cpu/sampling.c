/* Top-k's and top-p's cuts for the sampler (sampler.py) without sorting the vocab, in place, rows in parallel.
 * Built by native.py with gcc -O3 -fopenmp.
 *
 * Top-k keeps the logits >= the k-th largest (ties with it kept), found by bisection over an order-preserving
 * uint32 key of the floats: the largest key with at least k logits at or above it.
 *
 * The nucleus keeps token v iff the mass of the tokens strictly more likely than v is below top_p: the most
 * likely tokens until their mass reaches top_p, tokens of equal probability kept or dropped together. That is
 * p >= t for the smallest t with mass(p > t) < top_p, found by bisection over t's float bits (non-negative floats
 * order as their bits). Only tokens above (total - top_p) / V can matter (the rest weigh less than total - top_p
 * together, so t is above them), and one pass gathers those first: typically hundreds of a 49K vocab.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static float from_bits(uint32_t b) {
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static uint32_t to_bits(float f) {
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    return b;
}

static double mass_above(const float *p, int64_t n, float t) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += p[i] > t ? (double)p[i] : 0.0;
    return s;
}

/* probs [R, V] (row stride ld, >= 0, finite), top_p [R]: zeroes, in place, each row's probs below its threshold
 * (written to threshold [R]; 0 where top_p >= 1: no cut). */
void top_p_filter_f32(float *probs, int64_t ld, int64_t R, int64_t V, const float *top_p, float *threshold,
                      int threads) {
#pragma omp parallel num_threads(threads) if (R > 1)
    {
        float *kept = malloc(sizeof(float) * (size_t)V);
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < R; r++) {
            float *p = probs + r * ld;
            double total = 0.0;
            float top = 0.0f;
#pragma omp simd reduction(+ : total) reduction(max : top)
            for (int64_t i = 0; i < V; i++) {
                total += p[i];
                top = p[i] > top ? p[i] : top;
            }
            const double floor = (total - top_p[r]) / (double)V;     /* the cut is above every p <= floor */
            if (top_p[r] >= 1.0f || floor <= 0.0) {               /* top_p >= 1 or the total: no cut */
                threshold[r] = 0.0f;
                continue;
            }
            float f = (float)floor;
            if ((double)f > floor) f = nextafterf(f, 0.0f);        /* rounded down: every p > floor is above it */
            const float *cand = p;                                 /* the tokens above f (all of them without memory) */
            int64_t n = V;
            if (kept) {
                n = 0;
                for (int64_t i = 0; i < V; i++)
                    if (p[i] > f) kept[n++] = p[i];
                cand = kept;
            }
            uint32_t lo = to_bits(f), hi = to_bits(top);           /* mass_above(top) = 0 < top_p */
            while (lo < hi) {
                const uint32_t mid = lo + (hi - lo) / 2;
                if (mass_above(cand, n, from_bits(mid)) < top_p[r]) hi = mid;
                else lo = mid + 1;
            }
            const float t = threshold[r] = from_bits(lo);
#pragma omp simd
            for (int64_t i = 0; i < V; i++) p[i] = p[i] < t ? 0.0f : p[i];
        }
        free(kept);
    }
}

static uint32_t order_key(float f) {                          /* float order as unsigned order (-0 below +0) */
    const uint32_t b = to_bits(f);
    return b & 0x80000000u ? ~b : b | 0x80000000u;
}

static float from_key(uint32_t key) {
    return from_bits(key & 0x80000000u ? key & 0x7fffffffu : ~key);
}

/* x [R, V] (row stride ld) logits, k [R]: rows with 0 < k < V get every logit below their k-th largest set to
 * -inf, in place. */
void top_k_filter_f32(float *x, int64_t ld, int64_t R, int64_t V, const int64_t *k, int threads) {
#pragma omp parallel num_threads(threads) if (R > 1)
    {
        uint32_t *keys = malloc(sizeof(uint32_t) * (size_t)V);
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < R; r++) {
            if (k[r] <= 0 || k[r] >= V || !keys) continue;
            float *row = x + r * ld;
            uint32_t lo = 0, hi = 0;                           /* count(keys >= lo) >= k; hi: the largest key */
            for (int64_t i = 0; i < V; i++) {
                keys[i] = order_key(row[i]);
                hi = keys[i] > hi ? keys[i] : hi;
            }
            int64_t n = V;                                     /* keys[0:n] hold every key >= lo */
            while (lo < hi) {                                  /* the largest key with count(keys >= key) >= k */
                const uint32_t mid = lo + (hi - lo) / 2 + 1;
                int32_t above = 0;
#pragma omp simd reduction(+ : above)
                for (int64_t i = 0; i < n; i++) above += keys[i] >= mid;
                if (above < k[r]) {
                    hi = mid - 1;
                    continue;
                }
                lo = mid;
                if (above <= n / 4) {                          /* keys below lo never count again: drop them */
                    int64_t m = 0;
                    for (int64_t i = 0; i < n; i++)
                        if (keys[i] >= lo) keys[m++] = keys[i];
                    n = m;
                }
            }
            const float kth = from_key(lo);
#pragma omp simd
            for (int64_t i = 0; i < V; i++) row[i] = row[i] < kth ? -INFINITY : row[i];
        }
        free(keys);
    }
}
