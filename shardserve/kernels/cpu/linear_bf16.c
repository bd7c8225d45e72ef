/* y = x W^T (+ b) on bfloat16 weights packed in k-pair panels, activations taken as bfloat16, products summed in
 * float32 by VDPBF16PS (AVX512-BF16). Built by native.py with gcc -O3 -fopenmp.
 *
 * w        [P, K2, 16, 2] bf16 (K2 = ceil(K / 2)): panel p, pair j holds (w[n, 2j], w[n, 2j + 1]) for the 16 rows
 *          n = 16p .. 16p + 15, one 64-byte vector (zero past N and K); pack with bf16_linear.pack
 * x        [M, K] float32, row stride ldx, rounded to bfloat16 (nearest even) once per call: exact when x already
 *          holds bfloat16 values, as it does in a bf16 model;  bias [N] float32 or NULL;  out [M, N] float32
 * Summation order, fixed per output: acc = 0, then acc = vdpbf16ps(acc, w pair j, x pair j) for ascending j, then
 * acc + bias[n]. Every tile shape and thread count does exactly that, so a result is bitwise independent of M, the
 * threads and the other rows.
 * Threads take contiguous runs of panel groups (disjoint weights) and prefetch the next group into L2 while the
 * current one runs. M >= 4: rows in chunks of MC, register tiles of 8 rows x 3 panels (24 accumulators, one
 * broadcast x pair times one panel vector per instruction: 32 products). M < 4 (decode): tiles of M rows x 6
 * panels, so six weight streams are in flight: SmolLM2's 30 layers of M = 1 products with the weights cold run at
 * ~51 GB/s on 2 threads here (against ~41 GB/s for linear_f32 on the float32 weights); 4 or 8 panels, and software
 * prefetch of the tile's own streams, measured no faster.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "half.h"
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define LB_AVX512BF16 1
#include <immintrin.h>
#endif

#define LB_MC 256        /* rows per chunk */

/* 1 where the kernels were compiled for AVX512-BF16; elsewhere linear_bf16 does nothing and returns -1. */
int linear_bf16_supported(void) {
#ifdef LB_AVX512BF16
    return 1;
#else
    return 0;
#endif
}

#ifdef LB_AVX512BF16
#define AI static inline __attribute__((always_inline))

/* Rows [m0, m0 + R) x panels [p0, p0 + NP) (rows past `rows` and panels past `np` are computed on repeats and not
 * stored); prefetches `lines` 64-byte lines from `next`. */
AI void lb_tile(const int R, const int NP, const uint32_t *xb, int64_t K2, const uint16_t *w, const float *bias,
                float *out, int64_t ldo, int64_t N, int64_t m0, int64_t rows, int64_t p0, int64_t np,
                const char *next, int64_t lines) {
    const uint32_t *xr[8];
    for (int r = 0; r < R; r++) xr[r] = xb + (m0 + (r < rows ? r : rows - 1)) * K2;
    const __m512i *wp[8];
    for (int c = 0; c < NP; c++) wp[c] = (const __m512i *)(w + (p0 + (c < np ? c : np - 1)) * K2 * 32);
    __m512 acc[8][6];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 6
        for (int c = 0; c < NP; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < K2; j++) {
        if (j < lines) __builtin_prefetch(next + j * 64, 0, 2);
        __m512bh b[6];
#pragma GCC unroll 6
        for (int c = 0; c < NP; c++) b[c] = (__m512bh)_mm512_loadu_si512(wp[c] + j);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)xr[r][j]);
#pragma GCC unroll 6
            for (int c = 0; c < NP; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], b[c], a);
        }
    }
    for (int r = 0; r < R && r < rows; r++)
        for (int c = 0; c < NP && c < np; c++) {
            const int64_t col = (p0 + c) * 16, left = N - col;
            const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            __m512 v = acc[r][c];
            if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + col));
            _mm512_mask_storeu_ps(out + (m0 + r) * ldo + col, mask, v);
        }
}

/* One tile of `rows` (<= R) rows: the R-row code for full tiles, an exact-height one for the last. */
AI void lb_rows(const int R, const int NP, const uint32_t *xb, int64_t K2, const uint16_t *w, const float *bias,
                float *out, int64_t ldo, int64_t N, int64_t m0, int64_t rows, int64_t p0, int64_t np,
                const char *next, int64_t lines) {
    switch (rows < R ? rows : R) {
    case 1: lb_tile(1, NP, xb, K2, w, bias, out, ldo, N, m0, rows, p0, np, next, lines); break;
    case 2: lb_tile(2, NP, xb, K2, w, bias, out, ldo, N, m0, rows, p0, np, next, lines); break;
    case 3: lb_tile(3, NP, xb, K2, w, bias, out, ldo, N, m0, rows, p0, np, next, lines); break;
    default: lb_tile(R, NP, xb, K2, w, bias, out, ldo, N, m0, rows, p0, np, next, lines); break;
    }
}

static void lb_gemm(const uint32_t *xb, int64_t K2, const uint16_t *w, const float *bias, float *out, int64_t ldo,
                    int64_t M, int64_t N, const int R, const int GROUP, int th, int T) {
    const int64_t P = (N + 15) / 16, groups = (P + GROUP - 1) / GROUP;
    const int64_t g0 = groups * th / T, g1 = groups * (th + 1) / T;
    for (int64_t c0 = 0; c0 < M; c0 += LB_MC) {
        const int64_t c1 = c0 + LB_MC < M ? c0 + LB_MC : M;
        for (int64_t g = g0; g < g1; g++) {
            const int64_t p0 = g * GROUP, np = P - p0 < GROUP ? P - p0 : GROUP;
            const int64_t np_next = g + 1 < g1 ? (P - p0 - GROUP < GROUP ? P - p0 - GROUP : GROUP) : 0;
            const char *next = (const char *)(w + (p0 + GROUP) * K2 * 32);
            int64_t left = np_next * K2;          /* the next group's lines, spread over this group's row tiles */
            for (int64_t m0 = c0; m0 < c1; m0 += R) {
                const int64_t lines = left < K2 ? left : K2;
                if (R == 8) lb_rows(8, 3, xb, K2, w, bias, out, ldo, N, m0, c1 - m0, p0, np, next, lines);
                else lb_rows(3, 6, xb, K2, w, bias, out, ldo, N, m0, c1 - m0, p0, np, next, lines);
                next += lines * 64;
                left -= lines;
            }
        }
    }
}
#endif

/* Returns 0, -1 without AVX512-BF16, or -2 when the bf16 copy of x could not be allocated. */
int linear_bf16(const float *x, int64_t ldx, const uint16_t *w, const float *bias, float *out, int64_t ldo,
                int64_t M, int64_t N, int64_t K, int threads) {
#ifdef LB_AVX512BF16
    const int64_t K2 = (K + 1) / 2;
    uint32_t *xb = malloc(sizeof(uint32_t) * (size_t)(M * K2 > 0 ? M * K2 : 1));   /* [M, K2] bf16 pairs */
    if (!xb) return -2;
    const int big = M * N * K >= 1 << 16;
#pragma omp parallel num_threads(threads) if (big)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            uint16_t *dst = (uint16_t *)(xb + m * K2);
            const float *src = x + m * ldx;
#pragma omp simd
            for (int64_t k = 0; k < K; k++) dst[k] = float_to_bf16(src[k]);   /* keeps subnormals, unlike VCVTNEPS2BF16 */
            if (K & 1) dst[K] = 0;
        }
        const int R = M >= 4 ? 8 : 3, GROUP = M >= 4 ? 3 : 6;
        lb_gemm(xb, K2, w, bias, out, ldo, M, N, R, GROUP, omp_get_thread_num(), omp_get_num_threads());
    }
    free(xb);
    return 0;
#else
    (void)x, (void)ldx, (void)w, (void)bias, (void)out, (void)ldo, (void)M, (void)N, (void)K, (void)threads;
    return -1;
#endif
}
