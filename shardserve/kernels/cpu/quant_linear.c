/* y = x W^T (+ b) on weights kept in GGUF block formats (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) or int8 with per-row
 * scales (I8), dequantized in registers: x is quantized to int8 per 32-block, the integer dots run on AVX512-VNNI.
 * Built by native.py with gcc -O3 -fopenmp.
 *
 * w        [N, row_bytes]  row stride ldw (bytes): each row is K / block_elems blocks laid out as in a GGUF file
 *                          (ggml's block_q8_0 .. block_q6_K), or K int8 for I8 with scales [N] (float32)
 * x        [M, K]          row stride ldx;  bias [N] or NULL;  out [M, N] row stride ldo
 *
 * Activations: each row of x once per call, per 32-block along K: d = absmax / 127, q = rint(x / d) in int8, and
 * per 4-element lane the sum of q (the offset correction). The kernel walks K in pairs of 32-blocks (64 bytes =
 * one zmm): the weights of the pair decode to unsigned bytes u with w = ws * (u - OFFSET) + wm per 4-byte lane,
 * vpdpbusd(-OFFSET * lanesum, u, q) is the exact integer dot per lane, and per lane
 *     acc += float(dot) * (ws * d)  (+ wm * d * lanesum for the formats with a min)
 * in float32 with explicit FMAs, reduced in a fixed order at the end of the row. Every row of x goes through the
 * same operations whatever M, the tile it lands in and the thread count, so its result is bitwise the same.
 * Threads (OpenMP) take disjoint ranges of weight rows; each weight row is decoded once per tile of up to 8 rows
 * of x, the tiles outermost so their activations stay in L1. Without AVX512-VNNI a scalar path emulates the same 16 lanes (same integer sums, same float operations).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#ifdef __AVX512VNNI__
#include <immintrin.h>
#endif

enum { Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, I8, NFMT };
static const int BLOCK_ELEMS[NFMT] = {32, 32, 32, 256, 256, 256, 1};
static const int BLOCK_BYTES[NFMT] = {34, 18, 20, 144, 176, 210, 1};
static const int OFFSET[NFMT] = {128, 8, 0, 0, 0, 32, 128};   /* u - OFFSET is the signed integer weight */
#define HAS_MIN(f) ((f) == Q4_1 || (f) == Q4_K || (f) == Q5_K)

/* 1 where the VNNI path is compiled in, 0 for the scalar fallback. */
int quant_linear_vnni(void) {
#ifdef __AVX512VNNI__
    return 1;
#else
    return 0;
#endif
}

static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#ifdef __AVX512VNNI__
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023;
    if (exp == 0) {
        const float f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    const uint32_t bits = sign | (exp == 31 ? 0x7f800000u | (man << 13) : ((exp + 112) << 23) | (man << 13));
    float f;
    memcpy(&f, &bits, 4);
    return f;
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

/* The activations as the kernel reads them, in groups of 8 rows of x (G rows in the last group): for pair p
 * (64 elements of K) and row r of group g, 256 bytes at act + g 8 np 256 + (p G + r) 256, so a tile's rows are
 * adjacent and a group is contiguous (no cache-set aliasing): q int8 [64], d float [16] (the 32-block's scale per
 * lane), corr int32 [16] (-OFFSET * lane sum), dsum float [16] (d * lane sum, for the mins); zero past K. */
#define ACT_Q 0
#define ACT_D 64
#define ACT_CORR 128
#define ACT_DSUM 192
static void quantize_row(const float *x, int64_t K, int64_t pstride, int offset, uint8_t *act) {
    for (int64_t b = 0; b < (K + 63) / 64 * 2; b++) {
        uint8_t *base = act + (b / 2) * pstride;
        int8_t *q = (int8_t *)(base + ACT_Q) + 32 * (b & 1);
        float *d = (float *)(base + ACT_D) + 8 * (b & 1), *dsum = (float *)(base + ACT_DSUM) + 8 * (b & 1);
        int32_t *corr = (int32_t *)(base + ACT_CORR) + 8 * (b & 1);
        float v[32], amax = 0.0f;
        for (int i = 0; i < 32; i++) {
            const int64_t k = 32 * b + i;
            v[i] = k < K ? x[k] : 0.0f;
            amax = fmaxf(amax, fabsf(v[i]));
        }
        const float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int i = 0; i < 32; i++) {
            float r = rintf(v[i] * inv);
            r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
            q[i] = (int8_t)r;
        }
        for (int l = 0; l < 8; l++) {
            const int32_t s = q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3];
            d[l] = scale;
            corr[l] = -offset * s;
            dsum[l] = scale * (float)s;
        }
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

#ifdef __AVX512VNNI__

static inline float hsum(__m512 v) {
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    b = _mm_add_ss(b, _mm_shuffle_ps(b, b, 1));
    return _mm_cvtss_f32(b);
}

/* res[r] = sum over lanes for R rows of x (act at row m0, pair stride pstride bytes) against one weight row w. */
static inline __attribute__((always_inline)) void tile(const int fmt, const int R, const uint8_t *w,
                                                       const uint8_t *act, int64_t pstride, int64_t K, int64_t Kp,
                                                       float *res) {
    const int64_t np = Kp / 64, nb = K / 32;
    __m512 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const __m512i m4 = _mm512_set1_epi8(0x0F), x80 = _mm512_set1_epi8((char)0x80);
    const __m512i shift_hi = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);    /* 0 | 4 */
    const long long f4 = 0x0004000400040004LL;
    const __m512i shift_q4 = _mm512_set_epi64(f4, f4, 0, 0, f4, f4, 0, 0);   /* 128-bit lanes: 0, 4, 0, 4 (epi16) */
    const __m512i pair_idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i quad_idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m512i bit_base = _mm512_inserti64x4(_mm512_set1_epi8(1), _mm256_set1_epi8(2), 1);
    __m512 sv = _mm512_setzero_ps(), mv = _mm512_setzero_ps();
    __m512i qh = _mm512_setzero_si512();
    for (int64_t p = 0; p < np; p++) {
        __m512i wu;
        __m512 ws = _mm512_setzero_ps(), wm = _mm512_setzero_ps();
        if (fmt == Q8_0 || fmt == Q4_0 || fmt == Q4_1) {
            const int bb = BLOCK_BYTES[fmt], two = 2 * p + 1 < nb;
            const uint8_t *b0 = w + 2 * p * bb, *b1 = b0 + bb;
            const float d0 = half_to_float(b0), d1 = two ? half_to_float(b1) : 0.0f;
            ws = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d0), _mm512_set1_ps(d1));
            if (fmt == Q8_0) {
                const __m256i lo = _mm256_loadu_si256((const __m256i *)(b0 + 2));
                const __m256i hi = two ? _mm256_loadu_si256((const __m256i *)(b1 + 2)) : _mm256_setzero_si256();
                wu = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), x80);
            } else {
                const int off = fmt == Q4_1 ? 4 : 2;
                const __m128i lo = _mm_loadu_si128((const __m128i *)(b0 + off));
                const __m128i hi = two ? _mm_loadu_si128((const __m128i *)(b1 + off)) : _mm_setzero_si128();
                __m512i t = _mm512_castsi128_si512(lo);
                t = _mm512_inserti32x4(t, lo, 1);
                t = _mm512_inserti32x4(t, hi, 2);
                t = _mm512_inserti32x4(t, hi, 3);
                wu = _mm512_and_si512(_mm512_srlv_epi16(t, shift_q4), m4);
                if (fmt == Q4_1) {
                    const float m0 = half_to_float(b0 + 2), m1 = two ? half_to_float(b1 + 2) : 0.0f;
                    wm = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(m0), _mm512_set1_ps(m1));
                }
            }
        } else if (fmt == Q4_K || fmt == Q5_K) {
            const uint8_t *b = w + (p >> 2) * BLOCK_BYTES[fmt];
            const int j = (int)(p & 3);
            if (j == 0) {
                const float d = half_to_float(b), dmin = half_to_float(b + 2);
                uint8_t sc[8], mn[8];
                scale_min_k4(b + 4, sc, mn);
                float s16[16] = {0}, m16[16] = {0};
                for (int s = 0; s < 8; s++) {
                    s16[s] = d * (float)sc[s];
                    m16[s] = -(dmin * (float)mn[s]);
                }
                sv = _mm512_loadu_ps(s16);
                mv = _mm512_loadu_ps(m16);
                if (fmt == Q5_K) qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 16)));
            }
            const __m512i idx = _mm512_add_epi32(pair_idx, _mm512_set1_epi32(2 * j));
            ws = _mm512_permutexvar_ps(idx, sv);
            wm = _mm512_permutexvar_ps(idx, mv);
            const uint8_t *qs = b + (fmt == Q4_K ? 16 : 48) + 32 * j;
            const __m512i t = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)qs));
            wu = _mm512_and_si512(_mm512_srlv_epi16(t, shift_hi), m4);
            if (fmt == Q5_K) {
                const __mmask64 hb = _mm512_test_epi8_mask(qh, _mm512_sll_epi16(bit_base, _mm_cvtsi32_si128(2 * j)));
                wu = _mm512_mask_add_epi8(wu, hb, wu, _mm512_set1_epi8(16));
            }
        } else if (fmt == Q6_K) {
            const uint8_t *b = w + (p >> 2) * 210;
            const int j = (int)(p & 3), h = j >> 1, odd = j & 1;
            if (j == 0) {
                const __m512i s = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 192)));
                sv = _mm512_mul_ps(_mm512_set1_ps(half_to_float(b + 208)), _mm512_cvtepi32_ps(s));
            }
            ws = _mm512_permutexvar_ps(_mm512_add_epi32(quad_idx, _mm512_set1_epi32(4 * j)), sv);
            const __m512i l = _mm512_loadu_si512((const void *)(b + 64 * h));
            const __m512i lo = _mm512_and_si512(odd ? _mm512_srli_epi16(l, 4) : l, m4);
            const __m512i hq = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h)));
            const __m512i hs = _mm512_add_epi16(shift_hi, _mm512_set1_epi16((short)(4 * odd)));   /* 4odd | 4odd+4 */
            const __m512i hs2 = _mm512_sub_epi16(hs, _mm512_srli_epi16(shift_hi, 1));            /* 4odd | 4odd+2 */
            const __m512i hb = _mm512_and_si512(_mm512_srlv_epi16(hq, hs2), _mm512_set1_epi8(3));
            wu = _mm512_or_si512(lo, _mm512_slli_epi16(hb, 4));
        } else {   /* I8 */
            const int64_t left = K - 64 * p;
            const __mmask64 k = left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
            wu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(k, w + 64 * p), x80);
        }
        const uint8_t *a = act + p * pstride;
        for (int r = 0; r < R; r++) {
            const uint8_t *ar = a + 256 * r;
            const __m512i c = HAS_MIN(fmt) ? _mm512_setzero_si512() : _mm512_load_si512(ar + ACT_CORR);
            const __m512i dot = _mm512_dpbusd_epi32(c, wu, _mm512_load_si512(ar + ACT_Q));
            const __m512 d = _mm512_load_ps((const float *)(ar + ACT_D));
            const __m512 s = fmt == I8 ? d : _mm512_mul_ps(ws, d);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[r]);
            if (HAS_MIN(fmt)) acc[r] = _mm512_fmadd_ps(wm, _mm512_load_ps((const float *)(ar + ACT_DSUM)), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) res[r] = hsum(acc[r]);
}

#else   /* scalar fallback: the same 16 lanes and operations as the AVX-512 path */

static void tile(const int fmt, const int R, const uint8_t *w, const uint8_t *act, int64_t pstride, int64_t K,
                 int64_t Kp, float *res) {
    float acc[8][16] = {{0}}, ws[16], wm[16];
    uint8_t u[64];
    for (int64_t p = 0; p < Kp / 64; p++) {
        decode_pair(fmt, w, p, K, u, ws, wm);
        for (int r = 0; r < R; r++) {
            const uint8_t *base = act + p * pstride + 256 * r;
            const int8_t *q = (const int8_t *)(base + ACT_Q);
            const float *d = (const float *)(base + ACT_D), *dsum = (const float *)(base + ACT_DSUM);
            const int32_t *corr = (const int32_t *)(base + ACT_CORR);
            for (int l = 0; l < 16; l++) {
                int32_t dot = HAS_MIN(fmt) ? 0 : corr[l];
                for (int i = 0; i < 4; i++) dot += (int32_t)u[4 * l + i] * q[4 * l + i];
                const float s = fmt == I8 ? d[l] : ws[l] * d[l];
                acc[r][l] = fmaf((float)dot, s, acc[r][l]);
                if (HAS_MIN(fmt)) acc[r][l] = fmaf(wm[l], dsum[l], acc[r][l]);
            }
        }
    }
    for (int r = 0; r < R; r++) res[r] = sum16(acc[r]);
}

#endif

typedef void (*tile_fn)(const uint8_t *, const uint8_t *, int64_t, int64_t, int64_t, float *);
#define TILE_FN(F, R)                                                                                         \
    static void tile_##F##_##R(const uint8_t *w, const uint8_t *act, int64_t ps, int64_t K, int64_t Kp,       \
                               float *res) { tile(F, R, w, act, ps, K, Kp, res); }
#define TILE_FNS(F) TILE_FN(F, 1) TILE_FN(F, 2) TILE_FN(F, 4) TILE_FN(F, 8)
TILE_FNS(Q8_0) TILE_FNS(Q4_0) TILE_FNS(Q4_1) TILE_FNS(Q4_K) TILE_FNS(Q5_K) TILE_FNS(Q6_K) TILE_FNS(I8)
#define TILE_ROW(F) {tile_##F##_1, tile_##F##_2, tile_##F##_4, tile_##F##_8}
static const tile_fn TILES[NFMT][4] = {TILE_ROW(Q8_0), TILE_ROW(Q4_0), TILE_ROW(Q4_1), TILE_ROW(Q4_K),
                                       TILE_ROW(Q5_K), TILE_ROW(Q6_K), TILE_ROW(I8)};

/* out = x W^T (+ bias); fmt 0..6 = Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, I8 (scales [N] for I8, else NULL).
 * Returns 0, or -1 when K is not a multiple of the block, the format is unknown or the scratch does not fit. */
int quant_linear_f32(const float *x, int64_t ldx, const uint8_t *w, int64_t ldw, const float *scales,
                     const float *bias, float *out, int64_t ldo, int64_t M, int64_t N, int64_t K, int fmt,
                     int threads) {
    if (fmt < 0 || fmt >= NFMT || K <= 0 || K % BLOCK_ELEMS[fmt] != 0) return -1;
    const int64_t Kp = (K + 63) / 64 * 64, np = Kp / 64;
    uint8_t *act = aligned_alloc(64, (size_t)(np * M * 256));
    if (act == NULL) return -1;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            const int64_t g = m / 8, rows = M - 8 * g < 8 ? M - 8 * g : 8;
            quantize_row(x + m * ldx, K, rows * 256, OFFSET[fmt], act + (g * 8 * np + m % 8) * 256);
        }
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t n0 = N * t / T, n1 = N * (t + 1) / T;
        /* row tiles outer: a tile's activations (R rows x 256 bytes per pair) stay in L1 while the thread's weight
         * rows (in L2 after the first tile) stream past them */
        for (int64_t m0 = 0; m0 < M;) {
            const int64_t left = M - m0;
            const int sel = left >= 8 ? 3 : left >= 4 ? 2 : left >= 2 ? 1 : 0, R = 1 << sel;
            const int64_t g = m0 / 8, rows = M - 8 * g < 8 ? M - 8 * g : 8;
            const uint8_t *a = act + (g * 8 * np + m0 % 8) * 256;
            for (int64_t n = n0; n < n1; n++) {
                float res[8];
                TILES[fmt][sel](w + n * ldw, a, rows * 256, K, Kp, res);
                const float b = bias ? bias[n] : 0.0f;
                for (int r = 0; r < R; r++)
                    out[(m0 + r) * ldo + n] = (fmt == I8 ? scales[n] * res[r] : res[r]) + b;
            }
            m0 += R;
        }
    }
    free(act);
    return 0;
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
