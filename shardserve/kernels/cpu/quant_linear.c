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
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
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

static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#ifdef QL_AVX512
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

/* Weight bytes prefetched ahead of the decoding in the small-M path (the rows stream from DRAM at M = 1). */
#define PF_AHEAD 8192

/* Permutation indices of the 16 x 32 byte transpose (init_indices, run once at load). */
static int16_t IDX2[2][32];    /* vpermt2w: word 2k + s <- source s, word pos(16h + k)  (h = 0, 1) */
static int32_t IDX3[2][16];    /* vpermt2d: dword 2k + s <- source s, dword 8g + k      (g = 0, 1) */
static int64_t IDX4[2][8];     /* vpermt2q: qword 2k + s <- source s, qword 4f + k      (f = 0, 1) */

/* word position of k in a row pair after the byte unpacks of transpose_store: k 0-7, 16-23, 8-15, 24-31 */
static inline int pair_pos(int k) { return (k & 7) | ((k & 8) << 1) | ((k & 16) >> 1); }

__attribute__((constructor)) static void init_indices(void) {
    for (int h = 0; h < 2; h++)
        for (int k = 0; k < 16; k++)
            for (int s = 0; s < 2; s++) IDX2[h][2 * k + s] = (int16_t)(32 * s + pair_pos(16 * h + k));
    for (int g = 0; g < 2; g++)
        for (int k = 0; k < 8; k++)
            for (int s = 0; s < 2; s++) IDX3[g][2 * k + s] = 16 * s + 8 * g + k;
    for (int f = 0; f < 2; f++)
        for (int k = 0; k < 4; k++)
            for (int s = 0; s < 2; s++) IDX4[f][2 * k + s] = 8 * s + 4 * f + k;
}

/* q[r] = 32 signed bytes (the integer weights of one 32-element (sub-)block) of rows r = 0..15 -> ut[16 k + r]. */
static inline void transpose_store(const __m256i q[16], int8_t *ut) {
    __m512i z[8], d[4][2], qq[2][2][2];
    for (int i = 0; i < 8; i++) {   /* word k of z[i] = (row 2i, row 2i + 1) at k, in pair_pos order */
        const __m256i lo = _mm256_unpacklo_epi8(q[2 * i], q[2 * i + 1]);
        const __m256i hi = _mm256_unpackhi_epi8(q[2 * i], q[2 * i + 1]);
        z[i] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    }
    for (int h = 0; h < 2; h++) {
        const __m512i ix = _mm512_loadu_si512(IDX2[h]);
        for (int j = 0; j < 4; j++) d[j][h] = _mm512_permutex2var_epi16(z[2 * j], ix, z[2 * j + 1]);
    }
    for (int g = 0; g < 2; g++) {
        const __m512i ix = _mm512_loadu_si512(IDX3[g]);
        for (int i = 0; i < 2; i++)
            for (int h = 0; h < 2; h++) qq[i][h][g] = _mm512_permutex2var_epi32(d[2 * i][h], ix, d[2 * i + 1][h]);
    }
    for (int f = 0; f < 2; f++) {
        const __m512i ix = _mm512_loadu_si512(IDX4[f]);
        for (int h = 0; h < 2; h++)
            for (int g = 0; g < 2; g++)
                _mm512_storeu_si512(ut + 16 * (16 * h + 8 * g + 4 * f),
                                    _mm512_permutex2var_epi64(qq[0][h][g], ix, qq[1][h][g]));
    }
}

static inline __m256i nib_lo(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(15)); }
static inline __m256i nib_hi(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(15)); }
static inline __m256i load32(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* T[16 j + r] = exact float32 weight (I8: the integer) of row wr[r], element k0 + j, for j < kl (16 rows = one
 * panel of outputs, transposed). k0 is a multiple of the format's block; kl is too except I8's last chunk. */
static inline __attribute__((always_inline)) void decode_panel(const int fmt, const uint8_t *const *wr, int64_t k0,
                                                               int64_t kl, float *T, int pf) {
    int8_t ut[32 * 16] __attribute__((aligned(64)));
    __m256i q[16];
    const int be = BLOCK_ELEMS[fmt], bb = BLOCK_BYTES[fmt];
#define CONVERT(J0, N, W)                                                                                    \
    for (int j = 0; j < (N); j++) {                                                                          \
        const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *)(ut + 16 * j)))); \
        _mm512_store_ps(T + 16 * ((J0) + j), W);                                                             \
    }
    if (fmt == I8) {
        for (int64_t j0 = 0; j0 < kl; j0 += 32) {
            const int64_t n = kl - j0 < 32 ? kl - j0 : 32;
            const __mmask32 mk = n == 32 ? 0xFFFFFFFFu : (__mmask32)((1u << n) - 1);
            for (int r = 0; r < 16; r++) {
                if (pf) __builtin_prefetch(wr[r] + k0 + j0 + PF_AHEAD, 0, 0);
                q[r] = _mm256_maskz_loadu_epi8(mk, wr[r] + k0 + j0);
            }
            transpose_store(q, ut);
            CONVERT(j0, n, f)
        }
    } else if (fmt == Q8_0 || fmt == Q4_0 || fmt == Q4_1) {
        for (int64_t j0 = 0; j0 < kl; j0 += 32) {
            const int64_t off = (k0 + j0) / 32 * bb;
            uint16_t dh[16], mh[16];
            for (int r = 0; r < 16; r++) {
                const uint8_t *p = wr[r] + off;
                if (pf) __builtin_prefetch(p + PF_AHEAD, 0, 0);
                memcpy(dh + r, p, 2);
                if (fmt == Q8_0) {
                    q[r] = load32(p + 2);
                } else {
                    memcpy(mh + r, p + 2, 2);
                    const __m128i v = _mm_loadu_si128((const __m128i *)(p + (fmt == Q4_1 ? 4 : 2)));
                    const __m256i w2 = _mm256_inserti128_si256(_mm256_castsi128_si256(v), v, 1);
                    /* low nibbles are elements 0-15, high nibbles 16-31 */
                    const __m256i lo = nib_lo(w2), hi = nib_hi(w2);
                    q[r] = _mm256_blend_epi32(lo, hi, 0xF0);
                    if (fmt == Q4_0) q[r] = _mm256_sub_epi8(q[r], _mm256_set1_epi8(8));
                }
            }
            transpose_store(q, ut);
            const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)dh));
            if (fmt == Q4_1) {
                const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)mh));
                CONVERT(j0, 32, _mm512_fmadd_ps(d, f, m))
            } else {
                CONVERT(j0, 32, _mm512_mul_ps(d, f))
            }
        }
    } else if (fmt == Q4_K || fmt == Q5_K) {
        const int qoff = fmt == Q4_K ? 16 : 48;
        for (int64_t j0 = 0; j0 < kl; j0 += 256) {
            const int64_t off = (k0 + j0) / 256 * bb;
            float sc[8][16] __attribute__((aligned(64))), mn[8][16] __attribute__((aligned(64)));
            for (int r = 0; r < 16; r++) {
                const uint8_t *p = wr[r] + off;
                for (int l = 0; l < bb && pf; l += 64) __builtin_prefetch(p + PF_AHEAD + l, 0, 0);
                const float dd = half_to_float(p), dmin = half_to_float(p + 2);
                uint8_t s8[8], m8[8];
                scale_min_k4(p + 4, s8, m8);
                for (int s = 0; s < 8; s++) {
                    sc[s][r] = dd * (float)s8[s];
                    mn[s][r] = -(dmin * (float)m8[s]);
                }
            }
            for (int s = 0; s < 8; s++) {
                for (int r = 0; r < 16; r++) {
                    const uint8_t *p = wr[r] + off;
                    const __m256i v = load32(p + qoff + 32 * (s / 2));
                    q[r] = s & 1 ? nib_hi(v) : nib_lo(v);
                    if (fmt == Q5_K) {
                        const __m256i h = _mm256_and_si256(_mm256_srli_epi16(load32(p + 16), s), _mm256_set1_epi8(1));
                        q[r] = _mm256_or_si256(q[r], _mm256_slli_epi16(h, 4));
                    }
                }
                transpose_store(q, ut);
                const __m512 d = _mm512_load_ps(sc[s]), m = _mm512_load_ps(mn[s]);
                CONVERT(j0 + 32 * s, 32, _mm512_fmadd_ps(d, f, m))
            }
        }
    } else {   /* Q6_K */
        for (int64_t j0 = 0; j0 < kl; j0 += 256) {
            const int64_t off = (k0 + j0) / 256 * bb;
            float dsc[16][16] __attribute__((aligned(64)));
            for (int r = 0; r < 16; r++) {
                const uint8_t *p = wr[r] + off;
                for (int l = 0; l < bb && pf; l += 64) __builtin_prefetch(p + PF_AHEAD + l, 0, 0);
                const float dd = half_to_float(p + 208);
                for (int i = 0; i < 16; i++) dsc[i][r] = dd * (float)(int8_t)p[192 + i];
            }
            for (int s = 0; s < 8; s++) {
                const int hh = s / 4, c = s % 4;
                for (int r = 0; r < 16; r++) {
                    const uint8_t *p = wr[r] + off;
                    const __m256i l = load32(p + 64 * hh + 32 * (c & 1));
                    const __m256i lo = c >> 1 ? nib_hi(l) : nib_lo(l);
                    const __m256i h = _mm256_and_si256(_mm256_srli_epi16(load32(p + 128 + 32 * hh), 2 * c),
                                                       _mm256_set1_epi8(3));
                    q[r] = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(h, 4)), _mm256_set1_epi8(32));
                }
                transpose_store(q, ut);
                const __m512 d0 = _mm512_load_ps(dsc[2 * s]), d1 = _mm512_load_ps(dsc[2 * s + 1]);
                CONVERT(j0 + 32 * s, 16, _mm512_mul_ps(d0, f))
                for (int j = 16; j < 32; j++) {
                    const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *)(ut + 16 * j))));
                    _mm512_store_ps(T + 16 * (j0 + 32 * s + j), _mm512_mul_ps(d1, f));
                }
            }
        }
    }
    (void)be;
#undef CONVERT
}

/* The last step of every output: I8's scale, then the bias; masked to the columns < N. */
static inline __m512 finish(const int fmt, __m512 v, const float *scales, const float *bias, int64_t n,
                            __mmask16 mk) {
    if (fmt == I8) v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, scales + n), v);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, bias + n));
    return v;
}

static inline __mmask16 col_mask(int64_t n, int64_t N) {
    return N - n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1);
}

/* Small M (< BIG_M rows, the decode steps): each panel of 16 weight rows is decoded one unit (a block; 32
 * elements for the 32-element formats and I8, 256 for the K-quants) at a time into an L1 tile and every row of x
 * FMAs with it, the accumulators in registers over the whole of K. */
#define BIG_M 4
#define UNIT_MAX 256
static inline __attribute__((always_inline)) void small_m(const int fmt, const float *x, int64_t ldx,
                                                          const uint8_t *w, int64_t ldw, const float *scales,
                                                          const float *bias, float *out, int64_t ldo, int64_t M,
                                                          int64_t N, int64_t K, int64_t p0, int64_t p1) {
    float T[UNIT_MAX * 16] __attribute__((aligned(64)));
    const int64_t unit = fmt == I8 ? 32 : BLOCK_ELEMS[fmt] < 32 ? 32 : BLOCK_ELEMS[fmt];
    for (int64_t p = p0; p < p1; p++) {
        const int64_t n = 16 * p;
        const uint8_t *wr[16];
        for (int r = 0; r < 16; r++) wr[r] = w + (n + r < N ? n + r : N - 1) * ldw;
        __m512 acc[BIG_M - 1];
        for (int m = 0; m < BIG_M - 1; m++) acc[m] = _mm512_setzero_ps();
        for (int64_t k0 = 0; k0 < K; k0 += unit) {
            const int64_t kl = K - k0 < unit ? K - k0 : unit;
            decode_panel(fmt, wr, k0, kl, T, 1);
            const float *x0 = x + k0, *x1 = x0 + (M > 1 ? ldx : 0), *x2 = x0 + (M > 2 ? 2 * ldx : 0);
            if (M == 1) {
                for (int64_t j = 0; j < kl; j++)
                    acc[0] = _mm512_fmadd_ps(_mm512_set1_ps(x0[j]), _mm512_load_ps(T + 16 * j), acc[0]);
            } else if (M == 2) {
                for (int64_t j = 0; j < kl; j++) {
                    const __m512 wv = _mm512_load_ps(T + 16 * j);
                    acc[0] = _mm512_fmadd_ps(_mm512_set1_ps(x0[j]), wv, acc[0]);
                    acc[1] = _mm512_fmadd_ps(_mm512_set1_ps(x1[j]), wv, acc[1]);
                }
            } else {
                for (int64_t j = 0; j < kl; j++) {
                    const __m512 wv = _mm512_load_ps(T + 16 * j);
                    acc[0] = _mm512_fmadd_ps(_mm512_set1_ps(x0[j]), wv, acc[0]);
                    acc[1] = _mm512_fmadd_ps(_mm512_set1_ps(x1[j]), wv, acc[1]);
                    acc[2] = _mm512_fmadd_ps(_mm512_set1_ps(x2[j]), wv, acc[2]);
                }
            }
        }
        const __mmask16 mk = col_mask(n, N);
        for (int m = 0; m < M; m++)
            _mm512_mask_storeu_ps(out + m * ldo + n, mk, finish(fmt, acc[m], scales, bias, n, mk));
    }
}

/* Large M: each thread takes groups of GP panels (48 weight rows) and K in chunks of KC, decodes a group's chunk
 * once into buf [GP][KC][16] (L2) and runs 8-row x NP-panel register tiles (broadcast x, as linear_f32.c) over all
 * M rows; between chunks the partial sums wait in out (float32: exact), so every output is still one FMA chain. */
#define GP 3
#define KC 1024           /* a multiple of every block */
#define RT 8
static inline __attribute__((always_inline)) void big_tile(const int fmt, const int NP, const float *x,
                                                           int64_t ldx, const float *buf, const float *scales,
                                                           const float *bias, float *out, int64_t ldo, int64_t M,
                                                           int64_t N, int64_t m0, int64_t n0, int64_t k0,
                                                           int64_t kl, int first, int last) {
    const float *xr[RT];
    for (int r = 0; r < RT; r++) xr[r] = x + (m0 + r < M ? m0 + r : M - 1) * ldx + k0;
    __mmask16 mk[GP];
    for (int c = 0; c < NP; c++) mk[c] = n0 + 16 * c < N ? col_mask(n0 + 16 * c, N) : 0;
    __m512 acc[RT][GP];
    for (int r = 0; r < RT; r++)
        for (int c = 0; c < NP; c++)
            acc[r][c] = first ? _mm512_setzero_ps()
                              : _mm512_maskz_loadu_ps(mk[c], out + (m0 + r < M ? m0 + r : M - 1) * ldo + n0 + 16 * c);
    for (int64_t j = 0; j < kl; j++) {
        __m512 b[GP];
        for (int c = 0; c < NP; c++) b[c] = _mm512_load_ps(buf + (c * KC + j) * 16);
#pragma GCC unroll 8
        for (int r = 0; r < RT; r++) {
            const __m512 a = _mm512_set1_ps(xr[r][j]);
            for (int c = 0; c < NP; c++) acc[r][c] = _mm512_fmadd_ps(a, b[c], acc[r][c]);
        }
    }
    for (int r = 0; r < RT && m0 + r < M; r++)
        for (int c = 0; c < NP; c++) {
            const __m512 v = last ? finish(fmt, acc[r][c], scales, bias, n0 + 16 * c, mk[c]) : acc[r][c];
            _mm512_mask_storeu_ps(out + (m0 + r) * ldo + n0 + 16 * c, mk[c], v);
        }
}

static inline __attribute__((always_inline)) int big_m(const int fmt, const float *x, int64_t ldx, const uint8_t *w,
                                                       int64_t ldw, const float *scales, const float *bias,
                                                       float *out, int64_t ldo, int64_t M, int64_t N, int64_t K,
                                                       int64_t g0, int64_t g1) {
    const int64_t P = (N + 15) / 16;
    float *buf = aligned_alloc(64, (size_t)GP * KC * 16 * 4);
    if (buf == NULL) return -1;
    for (int64_t g = g0; g < g1; g++) {
        const int64_t p0 = g * GP, np = P - p0 < GP ? P - p0 : GP;
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int64_t kl = K - k0 < KC ? K - k0 : KC;
            for (int c = 0; c < np; c++) {
                const uint8_t *wr[16];
                for (int r = 0; r < 16; r++) {
                    const int64_t n = 16 * (p0 + c) + r;
                    wr[r] = w + (n < N ? n : N - 1) * ldw;
                }
                decode_panel(fmt, wr, k0, kl, buf + c * KC * 16, 0);
            }
            const int first = k0 == 0, last = k0 + kl == K;
            for (int64_t m0 = 0; m0 < M; m0 += RT) {
                if (np == 3)
                    big_tile(fmt, 3, x, ldx, buf, scales, bias, out, ldo, M, N, m0, 16 * p0, k0, kl, first, last);
                else if (np == 2)
                    big_tile(fmt, 2, x, ldx, buf, scales, bias, out, ldo, M, N, m0, 16 * p0, k0, kl, first, last);
                else
                    big_tile(fmt, 1, x, ldx, buf, scales, bias, out, ldo, M, N, m0, 16 * p0, k0, kl, first, last);
            }
        }
    }
    free(buf);
    return 0;
}

/* One thread's share: output panels [16 t P / T ...) for small M, panel groups for large M. */
typedef int (*part_fn)(const float *, int64_t, const uint8_t *, int64_t, const float *, const float *, float *,
                       int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
#define PART_FN(F)                                                                                            \
    static int part_##F(const float *x, int64_t ldx, const uint8_t *w, int64_t ldw, const float *scales,     \
                        const float *bias, float *out, int64_t ldo, int64_t M, int64_t N, int64_t K, int64_t t, \
                        int64_t T) {                                                                          \
        const int64_t P = (N + 15) / 16;                                                                      \
        if (M < BIG_M) {                                                                                      \
            small_m(F, x, ldx, w, ldw, scales, bias, out, ldo, M, N, K, P * t / T, P * (t + 1) / T);          \
            return 0;                                                                                         \
        }                                                                                                     \
        const int64_t G = (P + GP - 1) / GP;                                                                  \
        return big_m(F, x, ldx, w, ldw, scales, bias, out, ldo, M, N, K, G * t / T, G * (t + 1) / T);         \
    }
PART_FN(Q8_0) PART_FN(Q4_0) PART_FN(Q4_1) PART_FN(Q4_K) PART_FN(Q5_K) PART_FN(Q6_K) PART_FN(I8)
static const part_fn PARTS[NFMT] = {part_Q8_0, part_Q4_0, part_Q4_1, part_Q4_K, part_Q5_K, part_Q6_K, part_I8};

#else   /* scalar fallback: the same FMA chains */

static int part_scalar(const float *x, int64_t ldx, const uint8_t *w, int64_t ldw, const float *scales,
                       const float *bias, float *out, int64_t ldo, int64_t M, int64_t N, int64_t K, int fmt,
                       int64_t t, int64_t T) {
    float *wf = malloc((size_t)K * sizeof(float));
    if (wf == NULL) return -1;
    const int64_t P = (N + 15) / 16;
    for (int64_t n = 16 * (P * t / T); n < 16 * (P * (t + 1) / T) && n < N; n++) {
        const uint8_t *row = w + n * ldw;
        if (fmt == I8) {
            for (int64_t k = 0; k < K; k++) wf[k] = (float)(int8_t)row[k];
        } else {
            uint8_t u[64];
            float ws[16], wm[16];
            for (int64_t p = 0; p < (K + 63) / 64; p++) {
                decode_pair(fmt, row, p, K, u, ws, wm);
                const int64_t end = K - 64 * p < 64 ? K - 64 * p : 64;
                for (int64_t e = 0; e < end; e++) {
                    const float v = (float)((int)u[e] - OFFSET[fmt]);
                    wf[64 * p + e] = HAS_MIN(fmt) ? fmaf(ws[e / 4], v, wm[e / 4]) : ws[e / 4] * v;
                }
            }
        }
        for (int64_t m = 0; m < M; m++) {
            const float *xr = x + m * ldx;
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc = fmaf(xr[k], wf[k], acc);
            if (fmt == I8) acc = scales[n] * acc;
            out[m * ldo + n] = bias ? acc + bias[n] : acc;
        }
    }
    free(wf);
    return 0;
}

#endif

/* out = x W^T (+ bias); fmt 0..6 = Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, I8 (scales [N] for I8, else NULL).
 * Returns 0, or -1 when K is not a multiple of the block, the format is unknown or the buffer does not fit. */
int quant_linear_f32(const float *x, int64_t ldx, const uint8_t *w, int64_t ldw, const float *scales,
                     const float *bias, float *out, int64_t ldo, int64_t M, int64_t N, int64_t K, int fmt,
                     int threads) {
    if (fmt < 0 || fmt >= NFMT || K <= 0 || K % BLOCK_ELEMS[fmt] != 0) return -1;
    if (M <= 0 || N <= 0) return 0;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
#ifdef QL_AVX512
        failed = PARTS[fmt](x, ldx, w, ldw, scales, bias, out, ldo, M, N, K, t, T) != 0;
#else
        failed = part_scalar(x, ldx, w, ldw, scales, bias, out, ldo, M, N, K, fmt, t, T) != 0;
#endif
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
