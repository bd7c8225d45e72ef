/* y = x W^T (+ b) on weights kept in GGUF block formats (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) or int8 with per-row
 * scales (I8), with the activations in float32: each weight block is decoded in registers to exactly the float32
 * values of gguf.quants.dequantize (d * q + m and friends are exact in float32: the products have at most 24
 * significant bits, so one FMA rounds once, as numpy does), and x * w accumulates with float32 FMAs.
 * Built by native.py with gcc -O3 -fopenmp.
 *
 * w        [N, row_bytes]  row stride ldw (bytes): each row is K / block_elems blocks laid out as in a GGUF file
 *                          (ggml's block_q8_0 .. block_q6_K), or K int8 for I8 with scales [N] (float32)
 * x        [M, K]          row stride ldx;  bias [N] or NULL;  out [M, N] row stride ldo
 *
 * Summation order, fixed per output element: 16 lanes, lane l accumulates x[k] w[k] for k = l (mod 16) in
 * ascending k with FMAs (zero-masked past K for I8), then the lanes are summed pairwise as (i, i + 8), (i, i + 4),
 * (i, i + 2), (0, 1); I8 multiplies that sum by the row's scale; then + bias. Every row of x goes through the same
 * operations whatever M, the register tile it lands in and the thread count, so its result is bitwise the same.
 *
 * Decoding: 4-bit formats index a 16-float table per (sub-)block, table[q] = fma(d, q, m), with vpermps (Q5_K:
 * a 32-float table with vpermt2ps), on the bytes widened to 32-bit lanes (the permutes read only the low index
 * bits, so the high nibble is a shift away); Q8_0 / Q6_K / I8 convert the integers and multiply / FMA.
 * Direct path (M < BUF_MIN_M, the decode steps): tiles of R rows of x x NT weight rows (1 x 4, 2 x 4) decode
 * each 16-weight vector in registers and feed it to R FMAs. Buffered path (M >= BUF_MIN_M): the weights are
 * decoded once per chunk of MC rows of x into an L1 buffer of float32 rows and 4 x 3 register tiles run over it
 * (see buffered()). Both give the same values in the same order. Threads (OpenMP) take disjoint ranges of weight
 * rows. Without AVX-512 a scalar path does the same operations (direct path only).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "half.h"
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__F16C__)
#define QL_AVX512 1
#include <immintrin.h>
#endif

enum { Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, I8, NFMT };
static const int BLOCK_ELEMS[NFMT] = {32, 32, 32, 256, 256, 256, 1};
static const int BLOCK_BYTES[NFMT] = {34, 18, 20, 144, 176, 210, 1};
static const int OFFSET[NFMT] = {128, 8, 0, 0, 0, 32, 128};   /* u - OFFSET is the signed integer weight */
#define HAS_MIN(f) ((f) == Q4_1 || (f) == Q4_K || (f) == Q5_K)

/* 1 where the AVX-512 path is compiled in, 0 for the scalar fallback (same values). */
int quant_linear_avx512(void) {
#ifdef QL_AVX512
    return 1;
#else
    return 0;
#endif
}

/* The 6-bit sub-block scales and mins of block_q4_K / block_q5_K (ggml's get_scale_min_k4). */
static inline void scale_min_k4(const uint8_t *s, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (uint8_t)((s[j + 8] & 0x0F) | ((s[j] >> 6) << 4));
        mn[j + 4] = (uint8_t)((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
    }
}

/* v[0..15] summed as (i, i + 8), (i, i + 4), (i, i + 2), (0, 1): the order of the AVX-512 reduction below. */
static inline float sum16(const float *v) {
    float a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) a[i] = v[i] + v[i + 8];
    for (int i = 0; i < 4; i++) b[i] = a[i] + a[i + 4];
    for (int i = 0; i < 2; i++) c[i] = b[i] + b[i + 2];
    return c[0] + c[1];
}

/* Pair p (64 elements) of weight row w: u[64] unsigned bytes, ws[16] / wm[16] per lane. */
static inline void decode_pair(int fmt, const uint8_t *w, int64_t p, int64_t K, uint8_t *u, float *ws, float *wm) {
    for (int i = 0; i < 64; i++) u[i] = 0x80;
    for (int l = 0; l < 16; l++) ws[l] = wm[l] = 0.0f;
    if (fmt == Q8_0 || fmt == Q4_0 || fmt == Q4_1) {
        for (int h = 0; h < 2 && 2 * p + h < K / 32; h++) {
            const uint8_t *b = w + (2 * p + h) * BLOCK_BYTES[fmt];
            for (int l = 0; l < 8; l++) {
                ws[8 * h + l] = half_to_float(b);
                if (fmt == Q4_1) wm[8 * h + l] = half_to_float(b + 2);
            }
            for (int i = 0; i < 32; i++) {
                if (fmt == Q8_0) u[32 * h + i] = b[2 + i] ^ 0x80;
                else {
                    const uint8_t byte = b[(fmt == Q4_1 ? 4 : 2) + (i & 15)];
                    u[32 * h + i] = i < 16 ? byte & 15 : byte >> 4;
                }
            }
        }
    } else if (fmt == Q4_K || fmt == Q5_K) {
        const uint8_t *b = w + (p >> 2) * BLOCK_BYTES[fmt];
        const int j = (int)(p & 3);
        const float d = half_to_float(b), dmin = half_to_float(b + 2);
        uint8_t sc[8], mn[8];
        scale_min_k4(b + 4, sc, mn);
        const uint8_t *qs = b + (fmt == Q4_K ? 16 : 48) + 32 * j;
        for (int h = 0; h < 2; h++) {
            const int s = 2 * j + h;
            for (int l = 0; l < 8; l++) {
                ws[8 * h + l] = d * (float)sc[s];
                wm[8 * h + l] = -(dmin * (float)mn[s]);
            }
            for (int i = 0; i < 32; i++) {
                uint8_t v = h ? qs[i] >> 4 : qs[i] & 15;
                if (fmt == Q5_K) v |= ((b[16 + i] >> s) & 1) << 4;
                u[32 * h + i] = v;
            }
        }
    } else if (fmt == Q6_K) {
        const uint8_t *b = w + (p >> 2) * 210;
        const int j = (int)(p & 3), h = j >> 1, odd = j & 1;
        const float d = half_to_float(b + 208);
        for (int l = 0; l < 16; l++) ws[l] = d * (float)(int8_t)b[192 + 4 * j + l / 4];
        for (int i = 0; i < 64; i++) {
            const uint8_t lo = odd ? b[64 * h + i] >> 4 : b[64 * h + i] & 15;
            const int c = 2 * odd + i / 32;
            u[i] = (uint8_t)(lo | (((b[128 + 32 * h + (i & 31)] >> (2 * c)) & 3) << 4));
        }
    } else {
        for (int i = 0; i < 64 && 64 * p + i < K; i++) u[i] = w[64 * p + i] ^ 0x80;
    }
}

#ifdef QL_AVX512

/* the lane sum in sum16's order */
static inline float hsum(__m512 v) {
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    b = _mm_add_ss(b, _mm_shuffle_ps(b, b, 1));
    return _mm_cvtss_f32(b);
}

/* Weight bytes prefetched ahead of the decoding in the direct path (the rows stream from DRAM at M = 1). */
#define PF_AHEAD 8192

/* The accumulators' type: a plain vector (__m512 may alias anything, which would keep them in memory). */
typedef float acc_t __attribute__((vector_size(64)));
typedef float accu_t __attribute__((vector_size(64), aligned(4)));

static inline __m512i widen16(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }

/* acc[r * NT + n] = the 16 lane sums of x row xr[r] times weight row wr[n] (I8: before the scale).
 * R = 0 (NT = 1): decode row wr[0] to float32 dst [K] instead (I8: the integers). */
static inline __attribute__((always_inline)) void tile(const int fmt, const int R, const int NT,
                                                       const float *const *xr, const uint8_t *const *wr, int64_t K,
                                                       acc_t *acc, float *dst) {
    for (int i = 0; i < R * NT; i++) acc[i] = (acc_t){0};
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 iota16 = _mm512_add_ps(iota, _mm512_set1_ps(16.0f));
#define FMA_ROWS(OFF, WV)                                                                                     \
    if (R == 0) _mm512_storeu_ps(dst + (OFF), WV[0]);                                                         \
    for (int r = 0; r < R; r++) {                                                                             \
        const __m512 xv = (__m512) * (const accu_t *)(xr[r] + (OFF));                                         \
        for (int n = 0; n < NT; n++)                                                                          \
            acc[r * NT + n] = (acc_t)_mm512_fmadd_ps(xv, WV[n], (__m512)acc[r * NT + n]);                     \
    }
    if (fmt == I8) {
        for (int64_t k = 0; k < K; k += 16) {
            __m512 wv[4];
            if (k + 16 <= K) {
                for (int n = 0; n < NT && R > 0; n++) __builtin_prefetch(wr[n] + k + PF_AHEAD, 0, 0);
                for (int n = 0; n < NT; n++)
                    wv[n] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(wr[n] + k))));
                FMA_ROWS(k, wv)
            } else {   /* the last partial vector: zero-masked */
                const __mmask16 mk = (__mmask16)((1u << (K - k)) - 1);
                for (int n = 0; n < NT; n++)
                    wv[n] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, wr[n] + k)));
                if (R == 0) _mm512_mask_storeu_ps(dst + k, mk, wv[0]);
                for (int r = 0; r < R; r++) {
                    const __m512 xv = _mm512_maskz_loadu_ps(mk, xr[r] + k);
                    for (int n = 0; n < NT; n++)
                        acc[r * NT + n] = (acc_t)_mm512_fmadd_ps(xv, wv[n], (__m512)acc[r * NT + n]);
                }
            }
        }
    } else if (fmt == Q8_0 || fmt == Q4_0 || fmt == Q4_1) {
        const int bb = BLOCK_BYTES[fmt];
        for (int64_t b = 0; b < K / 32; b++) {
            for (int h = 0; h < 2; h++) {
                __m512 wv[4];
                for (int n = 0; n < NT; n++) {
                    const uint8_t *p = wr[n] + b * bb;
                    if (R > 0 && h == 0) __builtin_prefetch(p + PF_AHEAD, 0, 0);
                    const __m512 d = _mm512_set1_ps(half_to_float(p));
                    if (fmt == Q8_0) {
                        const __m128i raw = _mm_loadu_si128((const __m128i *)(p + 2 + 16 * h));
                        wv[n] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw)), d);
                    } else {
                        const __m512 m = fmt == Q4_1 ? _mm512_set1_ps(half_to_float(p + 2))
                                                     : _mm512_mul_ps(d, _mm512_set1_ps(-8.0f));
                        const __m512 t = _mm512_fmadd_ps(d, iota, m);           /* table[q] = d q + m */
                        const __m512i q = widen16(p + (fmt == Q4_1 ? 4 : 2));
                        wv[n] = _mm512_permutexvar_ps(h ? _mm512_srli_epi32(q, 4) : q, t);
                    }
                }
                FMA_ROWS(32 * b + 16 * h, wv)
            }
        }
    } else if (fmt == Q4_K || fmt == Q5_K) {
        const int bb = BLOCK_BYTES[fmt], qoff = fmt == Q4_K ? 16 : 48;
        for (int64_t sb = 0; sb < K / 256; sb++) {
            float sc[4][8], mn[4][8];
            for (int n = 0; n < NT; n++) {
                const uint8_t *p = wr[n] + sb * bb;
                for (int l = 0; l < bb && R > 0; l += 64) __builtin_prefetch(p + PF_AHEAD + l, 0, 0);
                const float d = half_to_float(p), dmin = half_to_float(p + 2);
                uint8_t s8[8], m8[8];
                scale_min_k4(p + 4, s8, m8);
                for (int s = 0; s < 8; s++) {
                    sc[n][s] = d * (float)s8[s];
                    mn[n][s] = -(dmin * (float)m8[s]);
                }
            }
#pragma GCC unroll 2
            for (int s = 0; s < 8; s++) {
                const __m128i hs = _mm_cvtsi32_si128(s), ns = _mm_cvtsi32_si128(4 * (s & 1));
                for (int h = 0; h < 2; h++) {
                    __m512 wv[4];
                    for (int n = 0; n < NT; n++) {
                        const uint8_t *p = wr[n] + sb * bb;
                        const __m512 t = _mm512_fmadd_ps(_mm512_set1_ps(sc[n][s]), iota, _mm512_set1_ps(mn[n][s]));
                        const __m512i q = _mm512_srl_epi32(widen16(p + qoff + 32 * (s / 2) + 16 * h), ns);
                        if (fmt == Q4_K) {
                            wv[n] = _mm512_permutexvar_ps(q, t);
                        } else {
                            const __m512 t2 = _mm512_fmadd_ps(_mm512_set1_ps(sc[n][s]), iota16,
                                                              _mm512_set1_ps(mn[n][s]));
                            /* bit s of qh -> bit 4 of the table index: c ? b : a (0xD8) */
                            const __m512i qh = _mm512_srl_epi32(_mm512_slli_epi32(widen16(p + 16 + 16 * h), 4), hs);
                            const __m512i i5 = _mm512_ternarylogic_epi32(q, qh, _mm512_set1_epi32(0x10), 0xD8);
                            wv[n] = _mm512_permutex2var_ps(t, i5, t2);
                        }
                    }
                    FMA_ROWS(256 * sb + 32 * s + 16 * h, wv)
                }
            }
        }
    } else {   /* Q6_K */
        for (int64_t sb = 0; sb < K / 256; sb++) {
            float dsc[4][16];
            for (int n = 0; n < NT; n++) {
                const uint8_t *p = wr[n] + sb * 210;
                for (int l = 0; l < 210 && R > 0; l += 64) __builtin_prefetch(p + PF_AHEAD + l, 0, 0);
                const float d = half_to_float(p + 208);
                for (int i = 0; i < 16; i++) dsc[n][i] = d * (float)(int8_t)p[192 + i];
            }
#pragma GCC unroll 2
            for (int s = 0; s < 8; s++) {
                const int hh = s / 4, c = s % 4;
                const __m128i ls = _mm_cvtsi32_si128(4 * (c >> 1)), hs = _mm_cvtsi32_si128(2 * c);
                for (int h = 0; h < 2; h++) {
                    __m512 wv[4];
                    for (int n = 0; n < NT; n++) {
                        const uint8_t *p = wr[n] + sb * 210;
                        const __m512i ql = _mm512_srl_epi32(widen16(p + 64 * hh + 32 * (c & 1) + 16 * h), ls);
                        /* bits 2c, 2c + 1 of qh -> bits 4, 5; q = ql & 0x0F | qh (0xEC) */
                        __m512i qh = _mm512_srl_epi32(_mm512_slli_epi32(widen16(p + 128 + 32 * hh + 16 * h), 4), hs);
                        qh = _mm512_and_si512(qh, _mm512_set1_epi32(0x30));
                        const __m512i q = _mm512_ternarylogic_epi32(ql, qh, _mm512_set1_epi32(0x0F), 0xEC);
                        const float ds = dsc[n][2 * s + h];
                        wv[n] = _mm512_fmadd_ps(_mm512_set1_ps(ds), _mm512_cvtepi32_ps(q), _mm512_set1_ps(-32.0f * ds));
                    }
                    FMA_ROWS(256 * sb + 32 * s + 16 * h, wv)
                }
            }
        }
    }
#undef FMA_ROWS
}

/* acc[r * NT + n] += the same lane products on weight rows already decoded to float32 (wf[n] [K]), continuing
 * from acc: the same operations in the same order as tile, so chunks of K (multiples of 16) give bitwise the same
 * lane sums. */
static inline __attribute__((always_inline)) void ftile(const int R, const int NT, const float *const *xr,
                                                        const float *const *wf, int64_t K, acc_t *acc) {
    
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        /* R <= 4 rows of x in registers, each weight vector loaded once */
        /* (the empty asm pins each loaded vector to a register: gcc would otherwise reload it for every FMA) */
        __m512 x0 = (__m512) * (const accu_t *)(xr[0] + k), x1 = x0, x2 = x0, x3 = x0;
        if (R > 1) x1 = (__m512) * (const accu_t *)(xr[R > 1 ? 1 : 0] + k);
        if (R > 2) x2 = (__m512) * (const accu_t *)(xr[R > 2 ? 2 : 0] + k);
        if (R > 3) x3 = (__m512) * (const accu_t *)(xr[R > 3 ? 3 : 0] + k);
        __asm__("" : "+v"(x0), "+v"(x1), "+v"(x2), "+v"(x3));
        for (int n = 0; n < NT; n++) {
            __m512 wv = (__m512) * (const accu_t *)(wf[n] + k);
            __asm__("" : "+v"(wv));
            acc[n] = (acc_t)_mm512_fmadd_ps(x0, wv, (__m512)acc[n]);
            if (R > 1) acc[NT + n] = (acc_t)_mm512_fmadd_ps(x1, wv, (__m512)acc[NT + n]);
            if (R > 2) acc[2 * NT + n] = (acc_t)_mm512_fmadd_ps(x2, wv, (__m512)acc[2 * NT + n]);
            if (R > 3) acc[3 * NT + n] = (acc_t)_mm512_fmadd_ps(x3, wv, (__m512)acc[3 * NT + n]);
        }
    }
    if (k < K) {   /* I8's last partial vector, zero-masked as in tile */
        const __mmask16 mk = (__mmask16)((1u << (K - k)) - 1);
        for (int n = 0; n < NT; n++) {
            const __m512 wv = _mm512_maskz_loadu_ps(mk, wf[n] + k);
            for (int r = 0; r < R; r++)
                acc[r * NT + n] =
                    (acc_t)_mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, xr[r] + k), wv, (__m512)acc[r * NT + n]);
        }
    }
}

/* res[r * NT + n] = the lane sums of tile (I8: before the scale) */
#define TILE_RES(F, R, NT, XR, WR, K, RES)                                                                    \
    do {                                                                                                      \
        acc_t acc_[R * NT];                                                                                   \
        tile(F, R, NT, XR, WR, K, acc_, NULL);                                                                \
        for (int i = 0; i < R * NT; i++) RES[i] = hsum((__m512)acc_[i]);                                      \
    } while (0)

#else   /* scalar fallback: the same lanes and operations as the AVX-512 path */

static float dot_scalar(int fmt, const float *x, const uint8_t *w, int64_t K) {
    float acc[16] = {0}, ws[16], wm[16];
    uint8_t u[64];
    for (int64_t p = 0; p < (K + 63) / 64; p++) {
        decode_pair(fmt, w, p, K, u, ws, wm);
        const int64_t end = K - 64 * p < 64 ? K - 64 * p : 64;
        for (int64_t e = 0; e < end; e++) {
            float v = (float)((int)u[e] - OFFSET[fmt]);
            if (fmt != I8) v = HAS_MIN(fmt) ? ws[e / 4] * v + wm[e / 4] : ws[e / 4] * v;
            acc[e % 16] = fmaf(x[64 * p + e], v, acc[e % 16]);
        }
    }
    return sum16(acc);
}

/* res[r * NT + n] = the dot of x row xr[r] and weight row wr[n] (I8: before the scale) */
#define TILE_RES(F, R, NT, XR, WR, K, RES)                                                                    \
    for (int r = 0; r < R; r++)                                                                               \
        for (int c = 0; c < NT; c++) RES[r * NT + c] = dot_scalar(F, XR[r], WR[c], K);

#endif

/* Rows [m0, m0 + R) of x against weight rows [n, n + NT) clamped to n_end (the rows past it are computed on the
 * last row and not stored). */
typedef void (*tile_fn)(const float *, int64_t, const uint8_t *, int64_t, const float *, const float *, float *,
                        int64_t, int64_t, int64_t, int64_t, int64_t);
#define TILE_FN(F, R, NT)                                                                                     \
    static void tile_##F##_##R(const float *x, int64_t ldx, const uint8_t *w, int64_t ldw, const float *scales, \
                               const float *bias, float *out, int64_t ldo, int64_t m0, int64_t n,             \
                               int64_t n_end, int64_t K) {                                                    \
        const float *xr[R];                                                                                   \
        const uint8_t *wr[NT];                                                                                \
        for (int r = 0; r < R; r++) xr[r] = x + (m0 + r) * ldx;                                               \
        for (int c = 0; c < NT; c++) wr[c] = w + (n + c < n_end ? n + c : n_end - 1) * ldw;                   \
        float res[R * NT];                                                                                    \
        TILE_RES(F, R, NT, xr, wr, K, res);                                                                   \
        for (int r = 0; r < R; r++)                                                                           \
            for (int c = 0; c < NT && n + c < n_end; c++) {                                                   \
                const float v = F == I8 ? scales[n + c] * res[r * NT + c] : res[r * NT + c];                 \
                out[(m0 + r) * ldo + n + c] = bias ? v + bias[n + c] : v;                                     \
            }                                                                                                 \
    }
#define NT_8 3
#define NT_4 4
#define NT_2 4
#define NT_1 4
#define GROUP 12          /* weight rows per group in the direct path: a multiple of every NT */
#define TILE_FNS(F) TILE_FN(F, 1, NT_1) TILE_FN(F, 2, NT_2) TILE_FN(F, 4, NT_4) TILE_FN(F, 8, NT_8)
TILE_FNS(Q8_0) TILE_FNS(Q4_0) TILE_FNS(Q4_1) TILE_FNS(Q4_K) TILE_FNS(Q5_K) TILE_FNS(Q6_K) TILE_FNS(I8)
#define TILE_ROW(F) {tile_##F##_1, tile_##F##_2, tile_##F##_4, tile_##F##_8}
static const tile_fn TILES[NFMT][4] = {TILE_ROW(Q8_0), TILE_ROW(Q4_0), TILE_ROW(Q4_1), TILE_ROW(Q4_K),
                                       TILE_ROW(Q5_K), TILE_ROW(Q6_K), TILE_ROW(I8)};
static const int TILE_NT[4] = {NT_1, NT_2, NT_4, NT_8};

#ifdef QL_AVX512
/* From BUF_MIN_M rows of x on, the weights are decoded once per chunk of MC rows of x rather than once per row
 * tile: each thread takes its weight rows G at a time and K in chunks of KC elements, decodes the G x KC chunk into
 * a float32 buffer (L1), and runs every R x NT tile of the MC rows over it (ftile), the x tile (R x KC) reused by
 * the G / NT weight tiles; the lane accumulators go to a scratch [MC, G] between K chunks (exact), and the lane
 * sums come out in the same order as in the direct path. */
#define BUF_MIN_M 4
#define KC 512            /* a multiple of 16 and of every block; GB x KC floats = 24 KiB */
#define GB 12             /* weight rows per group */
#define MC 64             /* rows of x per chunk */
#define NTF 3             /* weight rows per ftile (x rows: 4, 2 or 1; more spills registers) */
typedef void (*decode_fn)(const uint8_t *, int64_t, float *);
#define DECODE_FN(F)                                                                                          \
    static void decode_##F(const uint8_t *w, int64_t K, float *dst) {                                         \
        const uint8_t *wr[1] = {w};                                                                           \
        tile(F, 0, 1, NULL, wr, K, NULL, dst);                                                                \
    }
DECODE_FN(Q8_0) DECODE_FN(Q4_0) DECODE_FN(Q4_1) DECODE_FN(Q4_K) DECODE_FN(Q5_K) DECODE_FN(Q6_K) DECODE_FN(I8)
static const decode_fn DECODE[NFMT] = {decode_Q8_0, decode_Q4_0, decode_Q4_1, decode_Q4_K, decode_Q5_K,
                                       decode_Q6_K, decode_I8};

/* x rows [m0, m0 + R) (columns k0 .. k0 + kl) against buffer rows [c0, c0 + NT) clamped to rows; the accumulators
 * of row m and buffer row c at scr[(m - mc) GB + c]. */
typedef void (*ftile_fn)(const float *, int64_t, const float *, int64_t, int64_t, int64_t, int64_t, acc_t *);
#define FTILE_FN(R, NT)                                                                                       \
    static void ftile_##R(const float *x, int64_t ldx, const float *buf, int64_t c0, int64_t rows, int64_t m,  \
                          int64_t kl, acc_t *scr) {                                                           \
        const float *xr[R], *wf[NT];                                                                          \
        for (int r = 0; r < R; r++) xr[r] = x + (m + r) * ldx;                                                \
        for (int c = 0; c < NT; c++) wf[c] = buf + (c0 + c < rows ? c0 + c : rows - 1) * KC;                  \
        acc_t acc[R * NT];                                                                                    \
        for (int r = 0; r < R; r++)                                                                           \
            for (int c = 0; c < NT; c++) acc[r * NT + c] = scr[r * GB + c0 + c];                              \
        ftile(R, NT, xr, wf, kl, acc);                                                                        \
        for (int r = 0; r < R; r++)                                                                           \
            for (int c = 0; c < NT; c++) scr[r * GB + c0 + c] = acc[r * NT + c];                              \
    }
FTILE_FN(1, NTF) FTILE_FN(2, NTF) FTILE_FN(4, NTF)
static const ftile_fn FTILES[3] = {ftile_1, ftile_2, ftile_4};

/* The buffered path for weight rows [n0, n1) (one thread). Returns -1 when the scratch does not fit. */
static int buffered(const float *x, int64_t ldx, const uint8_t *w, int64_t ldw, const float *scales,
                    const float *bias, float *out, int64_t ldo, int64_t M, int64_t n0, int64_t n1, int64_t K,
                    int fmt) {
    float *buf = aligned_alloc(64, (size_t)GB * KC * 4);
    acc_t *scr = aligned_alloc(64, (size_t)MC * GB * sizeof(acc_t));
    if (buf == NULL || scr == NULL) {
        free(buf);
        free(scr);
        return -1;
    }
    const int64_t be = BLOCK_ELEMS[fmt], bb = BLOCK_BYTES[fmt];
    for (int64_t g0 = n0; g0 < n1; g0 += GB) {
        const int64_t rows = n1 - g0 < GB ? n1 - g0 : GB;
        for (int64_t mc = 0; mc < M; mc += MC) {
            const int64_t mrows = M - mc < MC ? M - mc : MC;
            for (int64_t i = 0; i < mrows * GB; i++) scr[i] = (acc_t){0};
            for (int64_t k0 = 0; k0 < K; k0 += KC) {
                const int64_t kl = K - k0 < KC ? K - k0 : KC;
                for (int64_t c = 0; c < rows; c++)
                    DECODE[fmt](w + (g0 + c) * ldw + k0 / be * bb, kl, buf + c * KC);
                for (int64_t m0 = 0; m0 < mrows;) {
                    const int64_t left = mrows - m0;
                    const int sel = left >= 4 ? 2 : left >= 2 ? 1 : 0;
                    for (int64_t c0 = 0; c0 < rows; c0 += NTF)
                        FTILES[sel](x + k0, ldx, buf, c0, rows, mc + m0, kl, scr + m0 * GB);
                    m0 += 1 << sel;
                }
            }
            for (int64_t m = 0; m < mrows; m++)
                for (int64_t c = 0; c < rows; c++) {
                    const int64_t n = g0 + c;
                    const float v = hsum((__m512)scr[m * GB + c]), y = fmt == I8 ? scales[n] * v : v;
                    out[(mc + m) * ldo + n] = bias ? y + bias[n] : y;
                }
        }
    }
    free(buf);
    free(scr);
    return 0;
}
#else
#define BUF_MIN_M INT64_MAX
#endif

/* out = x W^T (+ bias); fmt 0..6 = Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, I8 (scales [N] for I8, else NULL).
 * Returns 0, or -1 when K is not a multiple of the block, the format is unknown or the buffer does not fit. */
/* Bytes of one row of K weights in format fmt (K a multiple of its block). */
int64_t quant_row_bytes(int fmt, int64_t K) { return K / BLOCK_ELEMS[fmt] * BLOCK_BYTES[fmt]; }

int quant_linear_f32(const float *x, int64_t ldx, const uint8_t *w, int64_t ldw, const float *scales,
                     const float *bias, float *out, int64_t ldo, int64_t M, int64_t N, int64_t K, int fmt,
                     int threads) {
    if (fmt < 0 || fmt >= NFMT || K <= 0 || K % BLOCK_ELEMS[fmt] != 0) return -1;
    if (M <= 0 || N <= 0) return 0;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t n0 = N * t / T, n1 = N * (t + 1) / T;
#ifdef QL_AVX512
        if (M >= BUF_MIN_M && n1 > n0) {
            failed = buffered(x, ldx, w, ldw, scales, bias, out, ldo, M, n0, n1, K, fmt) != 0;
        } else
#endif
        {
            for (int64_t g0 = n0; g0 < n1; g0 += GROUP) {
                const int64_t g1 = g0 + GROUP < n1 ? g0 + GROUP : n1;
                for (int64_t m0 = 0; m0 < M;) {
                    const int64_t left = M - m0;
                    const int sel = left >= 8 ? 3 : left >= 4 ? 2 : left >= 2 ? 1 : 0;
                    for (int64_t n = g0; n < g1; n += TILE_NT[sel])
                        TILES[fmt][sel](x, ldx, w, ldw, scales, bias, out, ldo, m0, n, g1, K);
                    m0 += 1 << sel;
                }
            }
        }
    }
    return failed ? -1 : 0;
}

/* out[i, :] = row ids[i] of W dequantized to float32 [n, K] (bit-exact with ggml's dequantization), an embedding
 * lookup from a quantized table. Returns 0, or -1 for an unknown format or a K that is not a multiple of the block. */
int quant_dequant_rows_f32(const uint8_t *w, int64_t ldw, const float *scales, const int64_t *ids, int64_t n,
                           float *out, int64_t K, int fmt, int threads) {
    if (fmt < 0 || fmt >= NFMT || K <= 0 || K % BLOCK_ELEMS[fmt] != 0) return -1;
#pragma omp parallel for num_threads(threads) schedule(static) if (n * K >= (1 << 18))
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *row = w + ids[i] * ldw;
        float *o = out + i * K;
        if (fmt == I8) {
            for (int64_t k = 0; k < K; k++) o[k] = scales[ids[i]] * (float)(int8_t)row[k];
            continue;
        }
        uint8_t u[64];
        float ws[16], wm[16];
        for (int64_t p = 0; p < (K + 63) / 64; p++) {
            decode_pair(fmt, row, p, K, u, ws, wm);
            const int64_t end = K - 64 * p < 64 ? K - 64 * p : 64;
            for (int64_t e = 0; e < end; e++) {
                const float v = ws[e / 4] * (float)((int)u[e] - OFFSET[fmt]);
                o[64 * p + e] = HAS_MIN(fmt) ? v + wm[e / 4] : v;
            }
        }
    }
    return 0;
}
