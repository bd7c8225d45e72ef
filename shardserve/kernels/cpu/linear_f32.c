/* y = x W^T (+ b) in float32 on weights packed into 16-column panels, with the next panels prefetched.
 * Built by native.py with gcc -O3 -fopenmp.
 *
 * w        [P, K, 16]   packed weight: panel p holds output columns 16p .. 16p+15, one 16-float row per k
 *                       (zero past N); pack with native_linear.pack
 * x        [M, K]       row stride ldx;  bias [N] or NULL;  out [M, N] row stride ldo
 * Each thread takes a contiguous run of panel groups (GROUP panels = 48 columns), so the threads stream
 * disjoint weights. Rows go in chunks of MC (x's chunk stays in L2); within a chunk, each group's panels are
 * read once per 8-row block (they stay in L2 too) by a register tile of 8 rows x 3 panels (24 accumulators,
 * broadcast x times one panel row per FMA), and while the first blocks run the next group's panels are
 * prefetched into L2, so the weights never stall the FMAs cold from DRAM: at M=64 (a batch-64 decode step)
 * this runs at 195-214 GFLOP/s with weights cold against oneDNN's 164-190 (benchmarks/kernel_timings.py).
 */
/* -std=c11 turns off contracting a * b + c into one FMA; the GEMM is FMA-bound, so this file turns it back on. */
#pragma GCC optimize("fp-contract=fast")

#include <stdint.h>
#include <string.h>
#include <omp.h>

#include "cpu_math.h"

#define MC 256          /* rows per chunk */

/* 1 where the compiler targets AVX-512 (32 vector registers hold the tile); elsewhere oneDNN is the better choice. */
int linear_f32_preferred(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

static inline void store_row(float *o, v16 acc, const float *bias, int64_t col, int64_t N) {
    if (bias) {
        float b[16] = {0};
        memcpy(b, bias + col, sizeof(float) * (size_t)(N - col < 16 ? N - col : 16));
        acc += *(const v16u *)b;
    }
    if (col + 16 <= N) {
        *(v16u *)(o + col) = acc;
    } else {
        float tmp[16];
        *(v16u *)tmp = acc;
        memcpy(o + col, tmp, sizeof(float) * (size_t)(N - col));
    }
}

/* out[m, 16j : 16j + 16] = silu(g) * u for one row, g and u [16]; in fused_ops.c (no FMA contraction there), so
 * it rounds exactly as silu_mul_f32 does. */
void silu_mul_span(const float *g, const float *u, float *out, int64_t n);

/* Rows [m0, m0 + R) (clamped to M) x NP panels from p0; prefetches `lines` cache lines from `next`.
 * SILU: the panels are (gate, up) pairs of a gate_up weight packed by native_linear.pack_gate_up, and the
 * pair's silu(gate) * up goes to output columns 16 (p0 + c) / 2 .. + 16 instead of both panels' products.
 * One function per (R, NP, SILU) (the macro below): accumulator arrays sized exactly, so they live in registers. */
#define TILE(NAME, R, NP, SILU)                                                                                   \
    static void NAME(const float *x, int64_t ldx, const float *w, const float *bias, float *out, int64_t ldo,     \
                     int64_t M, int64_t N, int64_t K, int64_t m0, int64_t p0, const char *next, int64_t lines) { \
        const float *xr[R];                                                                                       \
        for (int r = 0; r < R; r++) xr[r] = x + (m0 + r < M ? m0 + r : M - 1) * ldx;                              \
        const float *wp = w + p0 * K * 16;                                                                        \
        v16 acc[R][NP];                                                                                           \
        for (int r = 0; r < R; r++)                                                                               \
            for (int c = 0; c < NP; c++) acc[r][c] = (v16){0};                                                    \
        for (int64_t k = 0; k < K; k++) {                                                                         \
            if (k < lines) __builtin_prefetch(next + k * 64, 0, 2);                                               \
            v16 b[NP];                                                                                            \
            for (int c = 0; c < NP; c++) b[c] = *(const v16 *)(wp + (c * K + k) * 16);                            \
            _Pragma("GCC unroll 8")                                                                               \
            for (int r = 0; r < R; r++) {                                                                         \
                const float a = xr[r][k];                                                                         \
                for (int c = 0; c < NP; c++) acc[r][c] += a * b[c];                                               \
            }                                                                                                     \
        }                                                                                                         \
        for (int r = 0; r < R && m0 + r < M; r++) {                                                               \
            if (SILU) {                                                                                           \
                for (int c = 0; c + 1 < NP; c += 2) {                                                             \
                    float g[16], u[16];                                                                           \
                    *(v16u *)g = acc[r][c];                                                                       \
                    *(v16u *)u = acc[r][c + 1];                                                                   \
                    silu_mul_span(g, u, out + (m0 + r) * ldo + (p0 + c) / 2 * 16, 16);                            \
                }                                                                                                 \
            } else {                                                                                              \
                for (int c = 0; c < NP; c++) store_row(out + (m0 + r) * ldo, acc[r][c], bias, (p0 + c) * 16, N);  \
            }                                                                                                     \
        }                                                                                                         \
    }

TILE(tile_8x3, 8, 3, 0)
TILE(tile_8x2, 8, 2, 0)
TILE(tile_8x1, 8, 1, 0)
TILE(tile_silu_6x4, 6, 4, 1)
TILE(tile_silu_6x2, 6, 2, 1)

typedef void (*Tile)(const float *, int64_t, const float *, const float *, float *, int64_t, int64_t, int64_t,
                     int64_t, int64_t, int64_t, const char *, int64_t);

/* Threads take contiguous runs of GROUPP-panel groups; rows go in MC chunks and R-row tiles: `full` for a whole
 * group, `half` / `one` for a last group of 2 / 1 panels. */
static void run_gemm(const float *x, int64_t ldx, const float *w, const float *bias, float *out, int64_t ldo,
                     int64_t M, int64_t N, int64_t P, int64_t K, int threads, int R, int GROUPP, Tile full,
                     Tile half, Tile one) {
    const int64_t groups = (P + GROUPP - 1) / GROUPP;
#pragma omp parallel num_threads(threads) if (M * P * 16 * K >= 1 << 16)
    {
        const int th = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t g0 = groups * th / T, g1 = groups * (th + 1) / T;
        for (int64_t c0 = 0; c0 < M; c0 += MC) {
            const int64_t c1 = c0 + MC < M ? c0 + MC : M;
            for (int64_t g = g0; g < g1; g++) {
                const int64_t p0 = g * GROUPP, np = P - p0 < GROUPP ? P - p0 : GROUPP;
                const Tile tile = np == GROUPP ? full : (np == 2 ? half : one);
                /* the next group's panels: np_next * K lines of 64 bytes, spread over the first row blocks */
                const int64_t np_next = g + 1 < g1 ? (P - p0 - GROUPP < GROUPP ? P - p0 - GROUPP : GROUPP) : 0;
                const char *next = (const char *)(w + (p0 + GROUPP) * K * 16);
                int64_t left = np_next * K;
                for (int64_t m0 = c0; m0 < c1; m0 += R) {
                    const int64_t lines = left < K ? left : K;
                    tile(x, ldx, w, bias, out, ldo, c1, N, K, m0, p0, next, lines);
                    next += lines * 64;
                    left -= lines;
                }
            }
        }
    }
}

void linear_f32(const float *x, int64_t ldx, const float *w, const float *bias, float *out, int64_t ldo,
                int64_t M, int64_t N, int64_t K, int threads) {
    run_gemm(x, ldx, w, bias, out, ldo, M, N, (N + 15) / 16, K, threads, 8, 3, tile_8x3, tile_8x2, tile_8x1);
}

/* out [M, I] (row stride ldo) = silu(x Wg^T) * (x Wu^T), for a gate_up weight packed by
 * native_linear.pack_gate_up ((gate, up) panel pairs; I a multiple of 16). Tiles of 6 rows x 2 pairs. */
void linear_silu_f32(const float *x, int64_t ldx, const float *w, float *out, int64_t ldo, int64_t M, int64_t I,
                     int64_t K, int threads) {
    run_gemm(x, ldx, w, NULL, out, ldo, M, 2 * I, 2 * I / 16, K, threads, 6, 4, tile_silu_6x4, tile_silu_6x2,
             tile_silu_6x2);
}
