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
 * this runs at 195-214 GFLOP/s with weights cold against oneDNN's 164-190 (benchmarks/kernels.py).
 */
/* -std=c11 turns off contracting a * b + c into one FMA; the GEMM is FMA-bound, so this file turns it back on. */
#pragma GCC optimize("fp-contract=fast")

#include <stdint.h>
#include <string.h>
#include <omp.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));     /* unaligned access */

#define ROWS 8          /* rows of the register tile */
#define GROUP 3         /* panels of the register tile */
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

/* Rows [m0, m0 + ROWS) (clamped to M) x NP panels from p0; prefetches `lines` cache lines from `next`. */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t ldx, const float *w,
                                                       const float *bias, float *out, int64_t ldo, int64_t M,
                                                       int64_t N, int64_t K, int64_t m0, int64_t p0,
                                                       const char *next, int64_t lines, const int NP) {
    const float *xr[ROWS];
    for (int r = 0; r < ROWS; r++) xr[r] = x + (m0 + r < M ? m0 + r : M - 1) * ldx;
    const float *wp = w + p0 * K * 16;
    v16 acc[ROWS][GROUP];
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < NP; c++) acc[r][c] = (v16){0};
    for (int64_t k = 0; k < K; k++) {
        if (k < lines) __builtin_prefetch(next + k * 64, 0, 2);
        v16 b[GROUP];
        for (int c = 0; c < NP; c++) b[c] = *(const v16 *)(wp + (c * K + k) * 16);
#pragma GCC unroll 8
        for (int r = 0; r < ROWS; r++) {
            const float a = xr[r][k];
            for (int c = 0; c < NP; c++) acc[r][c] += a * b[c];
        }
    }
    for (int r = 0; r < ROWS && m0 + r < M; r++)
        for (int c = 0; c < NP; c++) store_row(out + (m0 + r) * ldo, acc[r][c], bias, (p0 + c) * 16, N);
}

void linear_f32(const float *x, int64_t ldx, const float *w, const float *bias, float *out, int64_t ldo,
                int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t P = (N + 15) / 16, groups = (P + GROUP - 1) / GROUP;
#pragma omp parallel num_threads(threads) if (M * N * K >= 1 << 16)
    {
        const int th = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t g0 = groups * th / T, g1 = groups * (th + 1) / T;
        for (int64_t c0 = 0; c0 < M; c0 += MC) {
            const int64_t c1 = c0 + MC < M ? c0 + MC : M;
            for (int64_t g = g0; g < g1; g++) {
                const int64_t p0 = g * GROUP, np = P - p0 < GROUP ? P - p0 : GROUP;
                /* the next group's panels: np_next * K lines of 64 bytes, spread over the first row blocks */
                const int64_t np_next = g + 1 < g1 ? (P - p0 - GROUP < GROUP ? P - p0 - GROUP : GROUP) : 0;
                const char *next = (const char *)(w + (p0 + GROUP) * K * 16);
                int64_t left = np_next * K;
                for (int64_t m0 = c0; m0 < c1; m0 += ROWS) {
                    const int64_t lines = left < K ? left : K;
                    if (np == 3) tile(x, ldx, w, bias, out, ldo, c1, N, K, m0, p0, next, lines, 3);
                    else if (np == 2) tile(x, ldx, w, bias, out, ldo, c1, N, K, m0, p0, next, lines, 2);
                    else tile(x, ldx, w, bias, out, ldo, c1, N, K, m0, p0, next, lines, 1);
                    next += lines * 64;
                    left -= lines;
                }
            }
        }
    }
}
