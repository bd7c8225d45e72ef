/* Greedy tokens of a float32 LM head, exact, through a bfloat16 screen: argmax_v of x . w_v without all V logits in
 * float32. Built by native.py with gcc -O3 -fopenmp; only where the compiler targets AVX512-BF16.
 *
 * 1. Approximate logits a_v = bf16(x) . bf16(w_v), float32 accumulation (VDPBF16PS: twice the FMA rate).
 * 2. A bound |a_v - f_v| <= eps_v, where f_v is the float32 logit linear_f32 computes: rounding x and w to bf16
 *    (relative 2^-8 each), the two float32 sums (K terms each) and denormals flushed, all below
 *    c * ||x|| * ||w_v|| + tiny (Cauchy-Schwarz; c and the weight norms `cw` come from greedy_head.py).
 * 3. L = max_v (a_v - eps_v) <= f of that v, so no v with a_v + eps_v < L can be the argmax. Each 16-column
 *    panel keeps only max(a_v + eps_v) over its columns; the panels reaching L (about two per row for SmolLM2)
 *    get every column's f_v exactly, recomputed with the very FMA sequence of linear_f32.c's tiles (bit-identical
 *    values), and the first maximum among them wins, as in torch.argmax.
 * A row with a non-finite value anywhere takes the float32 panels for every column (same answer as argmax over
 * the full logits, NaN included).
 *
 * wb  [P, K2, 16, 2] bf16   panel p: columns 16p .. 16p + 15, one (k = 2i, 2i + 1) pair per column per row i
 * w   [P, K, 16] float32    the same columns in linear_f32's panels (native_linear.pack)
 * cw  [P * 16]              c * ||w_v|| (rounded up) + 2^-50
 * x   [M, K] row stride ldx; columns >= N (panel padding, other ranks' vocab) never win.
 * scratch: xb [M, K2] (x in bf16 pairs), nx [M], upper [min(M, MC), P], lower [threads, MC], row [threads, P * 16],
 *          bad [M] bytes.
 */
#pragma GCC optimize("fp-contract=fast")   /* the exact recompute must fuse a * b + c as linear_f32.c does */

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

#include "cpu_math.h"

int greedy_head_supported(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

#ifdef __AVX512BF16__
#include <immintrin.h>

#define MC 64           /* rows per chunk: upper holds MC rows' panel bounds */
#define R 8             /* rows per register tile */
#define GROUPP 3        /* panels per register tile */

int64_t argmax_row_f32(const float *x, int64_t n);       /* fused_ops.c: first maximum, NaN wins */

static uint16_t to_bf16(float f) {                       /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Exact float32 logits of the 16 columns of panel p: acc += x_k * w[p, k, :] in k order, linear_f32's tile sequence. */
static v16 exact_panel(const float *x, const float *w, int64_t K, int64_t p) {
    const float *wp = w + p * K * 16;
    v16 acc = {0};
    for (int64_t k = 0; k < K; k++) acc += x[k] * load16(wp + k * 16);
    return acc;
}

/* Rows [m0, m0 + R) of the chunk starting at c0 (clamped to c1) x NP panels from p0: per (row, panel) the max over
 * valid columns of a + eps into upper, per row the max of a - eps into lower (this thread's); bad[m] on a non-finite.
 * Prefetches `lines` 64-byte lines from `next` into L2, two per k. */
#define TILE(NAME, NP)                                                                                            \
    static void NAME(const uint32_t *xb, int64_t K2, const uint16_t *wb, const float *cw, const float *nx,       \
                     float *upper, int64_t P, float *lower, unsigned char *bad, int64_t N, int64_t c0,        \
                     int64_t c1, int64_t m0, int64_t p0, const char *next, int64_t lines) {                      \
        const uint32_t *xr[R];                                                                                    \
        for (int r = 0; r < R; r++) xr[r] = xb + (m0 + r < c1 ? m0 + r : c1 - 1) * K2;                            \
        const uint16_t *wp = wb + p0 * K2 * 32;                                                                   \
        __m512 acc[R][NP];                                                                                        \
        for (int r = 0; r < R; r++)                                                                               \
            for (int c = 0; c < NP; c++) acc[r][c] = _mm512_setzero_ps();                                         \
        for (int64_t k = 0; k < K2; k++) {                                                                        \
            if (2 * k < lines) {                                                                                  \
                __builtin_prefetch(next + k * 128, 0, 2);                                                         \
                __builtin_prefetch(next + k * 128 + 64, 0, 2);                                                    \
            }                                                                                                     \
            __m512bh b[NP];                                                                                       \
            for (int c = 0; c < NP; c++) b[c] = (__m512bh)_mm512_load_si512((const void *)(wp + (c * K2 + k) * 32)); \
            _Pragma("GCC unroll 8")                                                                               \
            for (int r = 0; r < R; r++) {                                                                         \
                const __m512bh a = (__m512bh)_mm512_set1_epi32((int)xr[r][k]);                                    \
                for (int c = 0; c < NP; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);                    \
            }                                                                                                     \
        }                                                                                                         \
        for (int r = 0; r < R && m0 + r < c1; r++) {                                                              \
            const __m512 n = _mm512_set1_ps(nx[m0 + r]);                                                          \
            __m512 lo = _mm512_set1_ps(-INFINITY);                                                                \
            __mmask16 finite = 0xffff;                                                                            \
            for (int c = 0; c < NP; c++) {                                                                        \
                const int64_t col = (p0 + c) * 16;                                                                \
                const __mmask16 valid = col + 16 <= N ? 0xffff : (col >= N ? 0 : (__mmask16)((1u << (N - col)) - 1)); \
                const __m512 eps = _mm512_mul_ps(n, _mm512_loadu_ps(cw + col));                                  \
                lo = _mm512_mask_max_ps(lo, valid, lo, _mm512_sub_ps(acc[r][c], eps));                           \
                upper[(m0 + r - c0) * P + p0 + c] = _mm512_mask_reduce_max_ps(valid, _mm512_add_ps(acc[r][c], eps)); \
                finite &= _mm512_mask_cmp_ps_mask(valid, _mm512_abs_ps(acc[r][c]), _mm512_set1_ps(INFINITY),      \
                                                  _CMP_LT_OQ) | (__mmask16)~valid;                               \
            }                                                                                                     \
            const float l = _mm512_reduce_max_ps(lo);                                                             \
            if (l > lower[m0 + r - c0]) lower[m0 + r - c0] = l;                                                   \
            if (finite != 0xffff) bad[m0 + r] = 1;                                                                \
        }                                                                                                         \
    }

TILE(tile_8x3, 3)
TILE(tile_8x2, 2)
TILE(tile_8x1, 1)

/* Row m's answer from its panels' upper bounds `up` [P] and its lower bound L: every valid column's exact logit in
 * the panels reaching L, the first maximum among them. */
static void screen_row(const float *x, const float *w, const float *up, float L, int64_t N, int64_t P, int64_t K,
                       float *value, int64_t *index) {
    float best = -INFINITY;
    int64_t at = -1;
    for (int64_t p = 0; p < P; p++) {
        if (!(up[p] >= L)) continue;
        float f[16];
        store16(f, exact_panel(x, w, K, p));
        for (int64_t j = 0; j < 16 && p * 16 + j < N; j++)
            if (at < 0 || f[j] > best) best = f[j], at = p * 16 + j;
    }
    *value = best;
    *index = at;
}

/* Rows with a non-finite value: every column's exact logit into `row`, then the first maximum (NaN wins). */
static void full_row(const float *x, const float *w, int64_t N, int64_t P, int64_t K, float *row, float *value,
                     int64_t *index) {
    for (int64_t p = 0; p < P; p++) store16(row + p * 16, exact_panel(x, w, K, p));
    *index = argmax_row_f32(row, N);
    *value = row[*index];
}

/* Returns how many rows took the full float32 path. */
int64_t greedy_head_f32(const float *x, int64_t ldx, int64_t M, int64_t K, const uint16_t *wb, const float *w,
                        const float *cw, int64_t N, int64_t P, uint32_t *xb, float *nx, float *upper, float *lower,
                        float *row, unsigned char *bad, float *value, int64_t *index, int threads) {
    const int64_t K2 = (K + 1) / 2, groups = (P + GROUPP - 1) / GROUPP;
    int64_t full = 0;
    memset(bad, 0, (size_t)M);
#pragma omp parallel num_threads(threads) reduction(+ : full)
    {
        const int th = omp_get_thread_num(), T = omp_get_num_threads();
        float *mine = lower + th * MC;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {                 /* x in bf16 pairs (zero past K) and its norm */
            uint16_t *h = (uint16_t *)(xb + m * K2);
            const float *xr = x + m * ldx;
            double ss = 0.0;
            for (int64_t k = 0; k < K; k++) h[k] = to_bf16(xr[k]), ss += (double)xr[k] * xr[k];
            if (K & 1) h[K] = 0;
            /* rounded up; + 2^-50 with cw's 2^-50 covers the denormals VDPBF16PS flushes */
            nx[m] = (float)(sqrt(ss) * (1.0 + 0x1p-20)) + 0x1p-50f;
            if (!isfinite(nx[m])) bad[m] = 1;
        }
        for (int64_t c0 = 0; c0 < M; c0 += MC) {
            const int64_t c1 = c0 + MC < M ? c0 + MC : M;
            for (int64_t r = 0; r < MC; r++) mine[r] = -INFINITY;
            const int64_t g1 = groups * (th + 1) / T;
            for (int64_t g = groups * th / T; g < g1; g++) {
                const int64_t p0 = g * GROUPP, np = P - p0 < GROUPP ? P - p0 : GROUPP;
                /* the next group's panels (np_next * K2 lines), spread over the first row blocks as in linear_f32.c */
                const int64_t np_next = g + 1 < g1 ? (P - p0 - GROUPP < GROUPP ? P - p0 - GROUPP : GROUPP) : 0;
                const char *next = (const char *)(wb + (p0 + GROUPP) * K2 * 32);
                int64_t left = np_next * K2;
                for (int64_t m0 = c0; m0 < c1; m0 += R) {
                    const int64_t lines = left < 2 * K2 ? left : 2 * K2;
                    if (np == 3) tile_8x3(xb, K2, wb, cw, nx, upper, P, mine, bad, N, c0, c1, m0, p0, next, lines);
                    else if (np == 2) tile_8x2(xb, K2, wb, cw, nx, upper, P, mine, bad, N, c0, c1, m0, p0, next, lines);
                    else tile_8x1(xb, K2, wb, cw, nx, upper, P, mine, bad, N, c0, c1, m0, p0, next, lines);
                    next += lines * 64;
                    left -= lines;
                }
            }
#pragma omp barrier
#pragma omp for schedule(dynamic, 1)
            for (int64_t m = c0; m < c1; m++) {
                float L = -INFINITY;
                for (int t = 0; t < T; t++) L = lower[t * MC + m - c0] > L ? lower[t * MC + m - c0] : L;
                if (bad[m] || !isfinite(L)) {
                    full_row(x + m * ldx, w, N, P, K, row + th * P * 16, value + m, index + m);
                    full++;
                } else {
                    screen_row(x + m * ldx, w, upper + (m - c0) * P, L, N, P, K, value + m, index + m);
                }
            }                                             /* implicit barrier: upper is free for the next chunk */
        }
    }
    return full;
}
#else
int64_t greedy_head_f32(void) { return -1; }
#endif
