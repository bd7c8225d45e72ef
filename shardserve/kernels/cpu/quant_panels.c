/* y = x W^T (+ b) on GGUF Q8_0 / Q4_0 / Q4_1 weights repacked once (quant_panels.repack) into k-major panels of
 * 16 output rows, the same bytes as the GGUF rows (compact), with float32 activations.
 * Built by native.py with gcc -O3 -fopenmp.
 *
 * Packed layout: panel p (output rows 16p .. 16p + 15, zero rows past N) is K / 32 blocks, block b (elements
 * 32b .. 32b + 31) holding the 16 rows' fields of that GGUF block in the order
 *   Q8_0: d[16] (fp16), then q[k][16] (int8) for k = 0 .. 31                                  (16 * 34 bytes)
 *   Q4_0: d[16] (fp16), then byte[j][16] for j = 0 .. 15: q[2j] | q[2j + 1] << 4 (unsigned)   (16 * 18 bytes)
 *   Q4_1: d[16], m[16] (fp16), then byte[j][16] as Q4_0                                       (16 * 20 bytes)
 * so one k across the panel's 16 rows is one 16-byte load, widened to 32-bit lanes, converted and scaled by the
 * block's 16-lane d (+ m) vector: exactly gguf.quants.dequantize's float32 values (d * q, d * (q - 8) and
 * d * q + m are exact or rounded once: d has 11 significant bits, q at most 8).
 *
 * x [M, K] row stride ldx;  bias [N] or NULL;  out [M, N] row stride ldo.
 * Summation order, fixed per output: y[m, n] = one float32 FMA chain acc = fma(x[m, k], w[n, k], acc) over
 * ascending k from acc = 0, then acc + bias[n]. Every path (register tiles for M < 4, the decoded-buffer tiles for
 * M >= 4, any thread count: threads take disjoint panel ranges, the scalar fallback) does exactly those
 * operations, so a result is bitwise independent of M, the threads and the other rows.
 *
 * M < 4 (decode steps): R rows x NP panels of accumulators, decoding each k of NP panels in registers and
 * broadcasting x[r, k] (NP independent chains hide the FMA latency; each panel's stream is software-prefetched
 * QP_PFD blocks ahead, which the NP concurrent streams need to reach the row kernel's bandwidth). M >= 4: per thread, each group of 3 panels
 * is decoded once per chunk of MC rows into a float32 buffer [3][K][16] (L2) and linear_f32's register tile of
 * 8 rows x 3 panels runs over it, prefetching the next group's packed bytes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__F16C__)
#define QP_AVX512 1
#include <immintrin.h>
#endif

enum { QP_Q8_0 = 0, QP_Q4_0 = 1, QP_Q4_1 = 2 };            /* quant_linear.c's codes */
static const int QP_BLOCK_BYTES[3] = {34, 18, 20};
#define QP_MC 256        /* rows per chunk in the buffered path */
#define QP_GROUP 3       /* panels per group in the buffered path */
#ifndef QP_PFD
#define QP_PFD 4         /* software prefetch distance of the direct path, in blocks (4-bit formats) */
#endif
#ifndef QP_PFD8
#define QP_PFD8 6        /* the same for Q8_0 */
#endif
#ifndef QP_NP1
#define QP_NP1 6         /* panels per register tile of the direct path for one row (4-bit formats) */
#endif
#ifndef QP_PFLOC
#define QP_PFLOC 1       /* its locality hint (to L2) */
#endif
#ifndef QP_NP1_8
#define QP_NP1_8 4       /* the same for Q8_0 */
#endif

int quant_panels_avx512(void) {
#ifdef QP_AVX512
    return 1;
#else
    return 0;
#endif
}

/* w[16 r + lane][k] of block `blk` (32 elements) as float32: the exact dequantized value. */
static inline float qp_weight(int fmt, const uint8_t *blk, int r, int kk) {
    const float d = half_to_float(blk + 2 * r);
    if (fmt == QP_Q8_0) return d * (float)(int8_t)blk[32 + 16 * kk + r];
    const uint8_t byte = blk[(fmt == QP_Q4_1 ? 64 : 32) + 16 * (kk >> 1) + r];
    const int q = (kk & 1) ? byte >> 4 : byte & 15;
    if (fmt == QP_Q4_0) return d * (float)(q - 8);
    return fmaf(d, (float)q, half_to_float(blk + 32 + 2 * r));
}

/* The scalar path: the same FMAs in the same order, one output at a time. */
static void qp_scalar(const float *x, int64_t ldx, const uint8_t *w, const float *bias, float *out, int64_t ldo,
                      int64_t M, int64_t N, int64_t K, int fmt, int threads) {
    const int64_t nb = K / 32, pbytes = nb * 16 * QP_BLOCK_BYTES[fmt];
#pragma omp parallel for num_threads(threads) schedule(static) if (M * N * K >= 1 << 16)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *panel = w + (n / 16) * pbytes;
        const int r = (int)(n % 16);
        for (int64_t m = 0; m < M; m++) {
            const float *xr = x + m * ldx;
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = panel + b * 16 * QP_BLOCK_BYTES[fmt];
                for (int kk = 0; kk < 32; kk++) acc = fmaf(xr[32 * b + kk], qp_weight(fmt, blk, r, kk), acc);
            }
            out[m * ldo + n] = bias ? acc + bias[n] : acc;
        }
    }
}

#ifdef QP_AVX512
#define AI static inline __attribute__((always_inline))

AI void qp_store(float *o, __m512 acc, const float *bias, int64_t col, int64_t N) {
    const int64_t left = N - col;
    const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    if (bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, bias + col));
    _mm512_mask_storeu_ps(o + col, mask, acc);
}

/* Block scale / min vectors of one panel block: wd = d, wm = m (Q4_1), -8 d (Q4_0), unused (Q8_0). */
AI void qp_scales(int fmt, const uint8_t *blk, __m512 *wd, __m512 *wm) {
    *wd = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
    if (fmt == QP_Q4_1) *wm = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32)));
    else if (fmt == QP_Q4_0) *wm = _mm512_mul_ps(*wd, _mm512_set1_ps(-8.0f));
    else *wm = _mm512_setzero_ps();
}

/* Decoded weights of k = 2j, 2j + 1 (4-bit formats) or k = j (Q8_0) of one panel block. */
AI void qp_decode(int fmt, const uint8_t *blk, int j, __m512 wd, __m512 wm, __m512 *w0, __m512 *w1) {
    if (fmt == QP_Q8_0) {
        const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 32 + 16 * j)));
        *w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(q), wd);
    } else {
        const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + (fmt == QP_Q4_1 ? 64 : 32)
                                                                               + 16 * j)));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(u, _mm512_set1_epi32(15)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(u, 4));
        *w0 = _mm512_fmadd_ps(lo, wd, wm);      /* exact: d * q + m (Q4_1), d * q - 8 d = d * (q - 8) (Q4_0) */
        *w1 = _mm512_fmadd_ps(hi, wd, wm);
    }
}

/* Direct tile: rows xr[0 .. R) x panels p0 .. p0 + NP; accumulators in registers. */
AI void qp_direct(const int fmt, const int R, const int NP, const float *const *xr, const uint8_t *w,
                         int64_t pbytes, const float *bias, float *out, int64_t ldo, int64_t N, int64_t K,
                         int64_t p0) {
    const int bb = QP_BLOCK_BYTES[fmt];
    const int64_t nb = K / 32;
    __m512 acc[3][8];
#pragma GCC unroll 3
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int c = 0; c < NP; c++) acc[r][c] = _mm512_setzero_ps();
    const uint8_t *base = w + p0 * pbytes;
    for (int64_t b = 0; b < nb; b++) {
        __m512 wd[8], wm[8];
#pragma GCC unroll 8
        for (int c = 0; c < NP; c++) {
            /* QP_PFD blocks ahead in each panel's stream (past a panel's end: the next panel's start) */
            const char *ahead = (const char *)(base + c * pbytes + (b + (fmt == QP_Q8_0 ? QP_PFD8 : QP_PFD)) * 16 * bb);
            for (int l = 0; l < 16 * bb; l += 64) __builtin_prefetch(ahead + l, 0, QP_PFLOC);
            qp_scales(fmt, base + c * pbytes + b * 16 * bb, &wd[c], &wm[c]);
        }
        const int64_t k0 = 32 * b;
        if (fmt == QP_Q8_0) {
            for (int j = 0; j < 32; j++) {
                __m512 w0[8], w1;
#pragma GCC unroll 8
                for (int c = 0; c < NP; c++) qp_decode(fmt, base + c * pbytes + b * 16 * bb, j, wd[c], wm[c], &w0[c], &w1);
#pragma GCC unroll 3
                for (int r = 0; r < R; r++) {
                    const __m512 a = _mm512_set1_ps(xr[r][k0 + j]);
#pragma GCC unroll 8
                    for (int c = 0; c < NP; c++) acc[r][c] = _mm512_fmadd_ps(a, w0[c], acc[r][c]);
                }
            }
        } else {
            for (int j = 0; j < 16; j++) {
                __m512 w0[8], w1[8];
#pragma GCC unroll 8
                for (int c = 0; c < NP; c++)
                    qp_decode(fmt, base + c * pbytes + b * 16 * bb, j, wd[c], wm[c], &w0[c], &w1[c]);
#pragma GCC unroll 3
                for (int r = 0; r < R; r++) {
                    const __m512 a = _mm512_set1_ps(xr[r][k0 + 2 * j]);
#pragma GCC unroll 8
                    for (int c = 0; c < NP; c++) acc[r][c] = _mm512_fmadd_ps(a, w0[c], acc[r][c]);
                }
#pragma GCC unroll 3
                for (int r = 0; r < R; r++) {
                    const __m512 a = _mm512_set1_ps(xr[r][k0 + 2 * j + 1]);
#pragma GCC unroll 8
                    for (int c = 0; c < NP; c++) acc[r][c] = _mm512_fmadd_ps(a, w1[c], acc[r][c]);
                }
            }
        }
    }
#pragma GCC unroll 3
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int c = 0; c < NP; c++) qp_store(out + r * ldo, acc[r][c], bias, (p0 + c) * 16, N);
}

/* Panels [pa, pb) for R rows, NPMAX panels at a time, then 4 / 2 / 1. */
AI void qp_direct_range(const int fmt, const int R, const int NPMAX, const float *const *xr,
                               const uint8_t *w, int64_t pbytes, const float *bias, float *out, int64_t ldo,
                               int64_t N, int64_t K, int64_t pa, int64_t pe) {
    int64_t p = pa;
    for (; p + NPMAX <= pe; p += NPMAX) qp_direct(fmt, R, NPMAX, xr, w, pbytes, bias, out, ldo, N, K, p);
    if (NPMAX > 4 && p + 4 <= pe) { qp_direct(fmt, R, 4, xr, w, pbytes, bias, out, ldo, N, K, p); p += 4; }
    if (p + 2 <= pe) { qp_direct(fmt, R, 2, xr, w, pbytes, bias, out, ldo, N, K, p); p += 2; }
    if (p < pe) qp_direct(fmt, R, 1, xr, w, pbytes, bias, out, ldo, N, K, p);
}

static void qp_direct_fmt(const int fmt, const float *x, int64_t ldx, const uint8_t *w, int64_t pbytes,
                          const float *bias, float *out, int64_t ldo, int64_t M, int64_t N, int64_t K, int64_t pa,
                          int64_t pe) {
    for (int64_t m0 = 0; m0 < M; m0 += 3) {
        const int64_t R = M - m0 < 3 ? M - m0 : 3;
        const float *xr[3];
        for (int r = 0; r < 3; r++) xr[r] = x + (m0 + (r < R ? r : 0)) * ldx;
        float *o = out + m0 * ldo;
        if (R == 1) qp_direct_range(fmt, 1, fmt == QP_Q8_0 ? QP_NP1_8 : QP_NP1, xr, w, pbytes, bias, o, ldo, N, K, pa, pe);
        else if (R == 2) qp_direct_range(fmt, 2, 6, xr, w, pbytes, bias, o, ldo, N, K, pa, pe);
        else qp_direct_range(fmt, 3, 4, xr, w, pbytes, bias, o, ldo, N, K, pa, pe);
    }
}

/* Decodes panels p0 .. p0 + np (all of K) into buf [np][K][16]. */
AI void qp_decode_group_fmt(const int fmt, const uint8_t *w, int64_t pbytes, int64_t K, int64_t p0, int np,
                                   float *buf) {
    const int bb = QP_BLOCK_BYTES[fmt];
    for (int c = 0; c < np; c++) {
        const uint8_t *panel = w + (p0 + c) * pbytes;
        float *dst = buf + (int64_t)c * K * 16;
        for (int64_t b = 0; b < K / 32; b++) {
            const uint8_t *blk = panel + b * 16 * bb;
            __m512 wd, wm, w0, w1;
            qp_scales(fmt, blk, &wd, &wm);
            if (fmt == QP_Q8_0) {
#pragma GCC unroll 8
                for (int j = 0; j < 32; j++) {
                    qp_decode(fmt, blk, j, wd, wm, &w0, &w1);
                    _mm512_store_ps(dst + (32 * b + j) * 16, w0);
                }
            } else {
#pragma GCC unroll 8
                for (int j = 0; j < 16; j++) {
                    qp_decode(fmt, blk, j, wd, wm, &w0, &w1);
                    _mm512_store_ps(dst + (32 * b + 2 * j) * 16, w0);
                    _mm512_store_ps(dst + (32 * b + 2 * j + 1) * 16, w1);
                }
            }
        }
    }
}

static void qp_decode_group(int fmt, const uint8_t *w, int64_t pbytes, int64_t K, int64_t p0, int np, float *buf) {
    if (fmt == QP_Q8_0) qp_decode_group_fmt(QP_Q8_0, w, pbytes, K, p0, np, buf);
    else if (fmt == QP_Q4_0) qp_decode_group_fmt(QP_Q4_0, w, pbytes, K, p0, np, buf);
    else qp_decode_group_fmt(QP_Q4_1, w, pbytes, K, p0, np, buf);
}

/* linear_f32's tile on the decoded buffer: rows m0 .. m0 + 8 (clamped to M) x NP panels; prefetches `lines`
 * cache lines from `next`. */
AI void qp_tile(const int NP, const float *x, int64_t ldx, const float *buf, const float *bias, float *out,
                       int64_t ldo, int64_t M, int64_t N, int64_t K, int64_t m0, int64_t p0, const char *next,
                       int64_t lines) {
    const float *xr[8];
    for (int r = 0; r < 8; r++) xr[r] = x + (m0 + r < M ? m0 + r : M - 1) * ldx;
    __m512 acc[8][3];
#pragma GCC unroll 8
    for (int r = 0; r < 8; r++)
#pragma GCC unroll 3
        for (int c = 0; c < NP; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        if (k < lines) __builtin_prefetch(next + k * 64, 0, 2);
        __m512 b[3];
#pragma GCC unroll 3
        for (int c = 0; c < NP; c++) b[c] = _mm512_load_ps(buf + (c * K + k) * 16);
#pragma GCC unroll 8
        for (int r = 0; r < 8; r++) {
            const __m512 a = _mm512_set1_ps(xr[r][k]);
#pragma GCC unroll 3
            for (int c = 0; c < NP; c++) acc[r][c] = _mm512_fmadd_ps(a, b[c], acc[r][c]);
        }
    }
    for (int r = 0; r < 8 && m0 + r < M; r++)
#pragma GCC unroll 3
        for (int c = 0; c < NP; c++) qp_store(out + (m0 + r) * ldo, acc[r][c], bias, (p0 + c) * 16, N);
}

static void qp_tile3(const float *x, int64_t ldx, const float *buf, const float *bias, float *out, int64_t ldo,
                     int64_t M, int64_t N, int64_t K, int64_t m0, int64_t p0, const char *next, int64_t lines) {
    qp_tile(3, x, ldx, buf, bias, out, ldo, M, N, K, m0, p0, next, lines);
}
static void qp_tile2(const float *x, int64_t ldx, const float *buf, const float *bias, float *out, int64_t ldo,
                     int64_t M, int64_t N, int64_t K, int64_t m0, int64_t p0, const char *next, int64_t lines) {
    qp_tile(2, x, ldx, buf, bias, out, ldo, M, N, K, m0, p0, next, lines);
}
static void qp_tile1(const float *x, int64_t ldx, const float *buf, const float *bias, float *out, int64_t ldo,
                     int64_t M, int64_t N, int64_t K, int64_t m0, int64_t p0, const char *next, int64_t lines) {
    qp_tile(1, x, ldx, buf, bias, out, ldo, M, N, K, m0, p0, next, lines);
}

static __thread float *qp_buf;
static __thread size_t qp_cap;

static float *qp_thread_buffer(size_t floats) {
    if (qp_cap < floats) {
        free(qp_buf);
        qp_buf = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
        qp_cap = qp_buf ? floats : 0;
    }
    return qp_buf;
}
#endif

static int qp_run(const float *x, int64_t ldx, const uint8_t *w, const float *bias, float *out, int64_t ldo,
                  int64_t M, int64_t N, int64_t K, int fmt, int threads, int scalar) {
    if (fmt < 0 || fmt > 2 || K <= 0 || K % 32) return -1;
    if (M <= 0 || N <= 0) return 0;
    if (threads < 1) threads = 1;
    if (scalar) {
        qp_scalar(x, ldx, w, bias, out, ldo, M, N, K, fmt, threads);
        return 0;
    }
#ifndef QP_AVX512
    qp_scalar(x, ldx, w, bias, out, ldo, M, N, K, fmt, threads);
    return 0;
#else
    const int64_t P = (N + 15) / 16, pbytes = K / 32 * 16 * QP_BLOCK_BYTES[fmt];
    int failed = 0;
    if (M < 4) {
#pragma omp parallel num_threads(threads) if (M * N * K >= 1 << 16)
        {
            const int th = omp_get_thread_num(), T = omp_get_num_threads();
            const int64_t pa = P * th / T, pe = P * (th + 1) / T;
            if (fmt == QP_Q8_0) qp_direct_fmt(QP_Q8_0, x, ldx, w, pbytes, bias, out, ldo, M, N, K, pa, pe);
            else if (fmt == QP_Q4_0) qp_direct_fmt(QP_Q4_0, x, ldx, w, pbytes, bias, out, ldo, M, N, K, pa, pe);
            else qp_direct_fmt(QP_Q4_1, x, ldx, w, pbytes, bias, out, ldo, M, N, K, pa, pe);
        }
        return 0;
    }
    const int64_t groups = (P + QP_GROUP - 1) / QP_GROUP;
#pragma omp parallel num_threads(threads) if (M * N * K >= 1 << 16) reduction(| : failed)
    {
        const int th = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t g0 = groups * th / T, g1 = groups * (th + 1) / T;
        float *buf = g1 > g0 ? qp_thread_buffer((size_t)QP_GROUP * (size_t)K * 16) : NULL;
        if (g1 > g0 && !buf) failed = 1;
        else
            for (int64_t c0 = 0; c0 < M; c0 += QP_MC) {
                const int64_t c1 = c0 + QP_MC < M ? c0 + QP_MC : M;
                for (int64_t g = g0; g < g1; g++) {
                    const int64_t p0 = g * QP_GROUP;
                    const int np = (int)(P - p0 < QP_GROUP ? P - p0 : QP_GROUP);
                    qp_decode_group(fmt, w, pbytes, K, p0, np, buf);
                    /* the next group's packed bytes (this chunk's, or the next chunk's first group) */
                    const int64_t gn = g + 1 < g1 ? g + 1 : (c1 < M ? g0 : g1);
                    const int np_next = gn < g1 ? (int)(P - gn * QP_GROUP < QP_GROUP ? P - gn * QP_GROUP
                                                                                     : QP_GROUP) : 0;
                    const char *next = (const char *)(w + gn * QP_GROUP * pbytes);
                    int64_t left = np_next * pbytes / 64;
                    for (int64_t m0 = c0; m0 < c1; m0 += 8) {
                        const int64_t lines = left < K ? left : K;
                        if (np == 3) qp_tile3(x, ldx, buf, bias, out, ldo, c1, N, K, m0, p0, next, lines);
                        else if (np == 2) qp_tile2(x, ldx, buf, bias, out, ldo, c1, N, K, m0, p0, next, lines);
                        else qp_tile1(x, ldx, buf, bias, out, ldo, c1, N, K, m0, p0, next, lines);
                        next += lines * 64;
                        left -= lines;
                    }
                    /* the rest of the next group's bytes, when the chunk had too few row blocks */
                    for (int64_t i = 0; i < left; i++) __builtin_prefetch(next + i * 64, 0, 2);
                }
            }
    }
    return failed ? -2 : 0;
#endif
}

/* 0 on success, -1 for a bad format / K, -2 when a thread's decode buffer could not be allocated. */
int quant_panels_linear_f32(const float *x, int64_t ldx, const uint8_t *w, const float *bias, float *out,
                            int64_t ldo, int64_t M, int64_t N, int64_t K, int fmt, int threads) {
    return qp_run(x, ldx, w, bias, out, ldo, M, N, K, fmt, threads, 0);
}

/* The scalar fallback on any CPU (the tests compare it with the vector paths bitwise). */
int quant_panels_linear_scalar_f32(const float *x, int64_t ldx, const uint8_t *w, const float *bias, float *out,
                                   int64_t ldo, int64_t M, int64_t N, int64_t K, int fmt, int threads) {
    return qp_run(x, ldx, w, bias, out, ldo, M, N, K, fmt, threads, 1);
}
