/* Causal prefill attention in float32 over a float32 or bfloat16 KV cache (prefill_attention_f32 / _bf16): every
 * prefill chunk of a step in one call, K/V read from the block cache (bfloat16 widened exactly as it is read).
 * Built by native.py with gcc -O3 -fopenmp.
 *
 * q        [T, Hq, D]   queries, row stride q_stride (the fused qkv output); a kv head's query heads adjacent
 * k_cache  [S, Hk, D]   this rank's K cache (S slots); v_cache likewise; the chunks' own K/V already written
 * segs     [N, 4]       per chunk: first query row in q/out, queries n, context length ctx, offset into slots
 * slots    [sum ctx]    KV slot of each context position of each chunk (cached prefix first, then the chunk)
 * out      [T, Hq, D]   contiguous; only the chunks' rows are written
 * Query i of a chunk sits at position ctx - n + i and sees keys 0 .. ctx - n + i.
 *
 * First each (chunk, kv head) copies its keys transposed into 16-key tiles (kt[tile][d][16]), so that a score
 * row for 16 keys is D broadcast-FMAs with no horizontal sum. Then work items (chunk, kv head, block of QBLOCK
 * queries) are handed out dynamically, largest first; ROWS query rows (query x head of the group) share each
 * tile load.
 * Scores past a row's causal limit are skipped by whole tiles and zeroed in the last one; the softmax runs over
 * each row's visible keys; P.V takes PV_ROWS rows at a time over V rows read in place. D must be a multiple of
 * 16 (the caller checks). About half the work of the full [n, ctx] products the batched-matmul path computes.
 */
/* -std=c11 turns off contracting a * b + c into one FMA; its products are FMA chains, so this file turns it back on. */
#pragma GCC optimize("fp-contract=fast")

#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "cpu_math.h"

#define QBLOCK 32       /* queries per work item */
#define ROWS 8          /* score rows per register tile: 8 accumulators, one K tile load each */
#define PV_ROWS 4       /* output rows per P.V pass: 4 rows x up to 4 vectors = 16 accumulators */

#define AI static inline __attribute__((always_inline))

static inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

typedef struct {
    const float *q;
    const void *k_cache, *v_cache;     /* [S, Hk, D] float32, or bfloat16 where the functions below get bf16 = 1 */
    const int64_t *slots;
    float *out;
    int64_t q_stride, Hq, Hk, G, D;
    float scale;
} Args;

typedef struct {
    int64_t start, n, ctx;      /* chunk */
    const int64_t *sl;          /* its context slots */
    const float *kt;            /* its keys of kv head h, transposed (transpose_keys) */
    int64_t h, i0, i1;          /* kv head, queries [i0, i1) */
} Item;

/* A chunk's keys [0, ctx) of kv head h, transposed into 16-key tiles; the last tile's tail is zero. */
AI void transpose_keys(const Args *a, const int64_t *sl, int64_t ctx, int64_t h, float *kt, const int bf16) {
    const int64_t D = a->D, row = a->Hk * D, tiles = (ctx + 15) / 16;
    memset(kt + (tiles - 1) * D * 16, 0, sizeof(float) * (size_t)(D * 16));
    for (int64_t j = 0; j < ctx; j++) {
        const int64_t k0 = sl[j] * row + h * D;
        float *dst = kt + (j / 16) * D * 16 + (j % 16);
        for (int64_t d = 0; d < D; d++) dst[d * 16] = load_kv(a->k_cache, k0 + d, bf16);
    }
}

/* scores[r][0 .. 16 * tiles) = scale * q_r . k for ROWS rows (rows past nrows repeat the last, unstored). */
static void score_rows(const float *const *qr, int64_t nrows, const float *kt, int64_t tiles, int64_t D,
                       float scale, float *scores, int64_t width) {
    for (int64_t t = 0; t < tiles; t++) {
        v16 acc[ROWS];
#pragma GCC unroll 8
        for (int r = 0; r < ROWS; r++) acc[r] = (v16){0};
        const float *tile = kt + t * D * 16;
        for (int64_t d = 0; d < D; d++) {
            const v16 kv = load16(tile + d * 16);
#pragma GCC unroll 8
            for (int r = 0; r < ROWS; r++) acc[r] += qr[r][d] * kv;
        }
        for (int64_t r = 0; r < nrows; r++) store16(scores + r * width + t * 16, acc[r] * scale);
    }
}

/* In place: each row's visible scores -> exp(s - max), the rest of its tile and the next tile -> 0 (a P.V pass
 * reads up to 3 keys past its first row's limit); returns 1 / sum per row. Loops run over whole tiles, with the
 * invisible tail masked, so that they vectorize without a scalar remainder. */
static void softmax_rows(float *scores, int64_t width, const int64_t *visible, int64_t nrows, float *inv_sum) {
    for (int64_t r = 0; r < nrows; r++) {
        float *s = scores + r * width, m = -FLT_MAX, sum = 0.0f;
        const int64_t n = visible[r], tiles_end = round16(n), end = tiles_end + 16 < width ? tiles_end + 16 : width;
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < tiles_end; j++) {
            const float x = j < n ? s[j] : -FLT_MAX;
            m = x > m ? x : m;
        }
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < tiles_end; j++) {
            const float e = exp_clamped(s[j] - m);
            s[j] = j < n ? e : 0.0f;
            sum += s[j];
        }
        for (int64_t j = tiles_end; j < end; j++) s[j] = 0.0f;
        inv_sum[r] = 1.0f / sum;
    }
}

/* o_r[c0 .. c0 + 16 NC) = inv_sum_r * sum_j p_r[j] v_j over keys [0, kmax), for PV_ROWS rows at once. */
AI void pv_columns(const Args *a, const Item *it, const float *p, int64_t width, int64_t kmax,
                   const float *inv_sum, float *const *orow, int64_t nrows, int64_t c0, const int NC, const int bf16) {
    const int64_t row = a->Hk * a->D;
    v16 acc[PV_ROWS][4];
    for (int r = 0; r < PV_ROWS; r++)
        for (int c = 0; c < NC; c++) acc[r][c] = (v16){0};
    for (int64_t j = 0; j < kmax; j++) {
        const int64_t v0 = it->sl[j] * row + it->h * a->D + c0;
        v16 v[4];
        for (int c = 0; c < NC; c++) v[c] = load16_kv(a->v_cache, v0 + 16 * c, bf16);
#pragma GCC unroll 4
        for (int r = 0; r < PV_ROWS; r++) {
            const float pj = p[(r < nrows ? r : 0) * width + j];
            for (int c = 0; c < NC; c++) acc[r][c] += pj * v[c];
        }
    }
    for (int64_t r = 0; r < nrows; r++)
        for (int c = 0; c < NC; c++) store16(orow[r] + c0 + 16 * c, acc[r][c] * inv_sum[r]);
}

AI void run_item(const Args *a, const Item *it, float *scores, int64_t width, const int bf16) {
    const int64_t G = a->G, D = a->D, cached = it->ctx - it->n;
    const int64_t nrows = (it->i1 - it->i0) * G;
    const float *qr[QBLOCK * 64];
    float *orow[QBLOCK * 64], inv_sum[QBLOCK * 64];
    int64_t visible[QBLOCK * 64];
    for (int64_t r = 0; r < nrows; r++) {
        const int64_t i = it->i0 + r / G, head = it->h * G + r % G;
        qr[r] = a->q + (it->start + i) * a->q_stride + head * D;
        orow[r] = a->out + ((it->start + i) * a->Hq + head) * D;
        visible[r] = cached + i + 1;
    }
    for (int64_t r0 = 0; r0 < nrows; r0 += ROWS) {
        const int64_t rn = nrows - r0 < ROWS ? nrows - r0 : ROWS;
        const float *rows[ROWS];
        for (int64_t r = 0; r < ROWS; r++) rows[r] = qr[r0 + (r < rn ? r : rn - 1)];
        score_rows(rows, rn, it->kt, (visible[r0 + rn - 1] + 15) / 16, D, a->scale, scores + r0 * width, width);
    }
    softmax_rows(scores, width, visible, nrows, inv_sum);
    for (int64_t r0 = 0; r0 < nrows; r0 += PV_ROWS) {
        const int64_t rn = nrows - r0 < PV_ROWS ? nrows - r0 : PV_ROWS, keys = visible[r0 + rn - 1];
        const float *p = scores + r0 * width;
        if (D % 64 == 0)
            for (int64_t c0 = 0; c0 < D; c0 += 64)
                pv_columns(a, it, p, width, keys, inv_sum + r0, orow + r0, rn, c0, 4, bf16);
        else
            for (int64_t c0 = 0; c0 < D; c0 += 16)
                pv_columns(a, it, p, width, keys, inv_sum + r0, orow + r0, rn, c0, 1, bf16);
    }
}

AI void prefill_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                          const int64_t *segs, int64_t N, const int64_t *slots, float *out, int64_t Hq, int64_t Hk,
                          int64_t D, float scale, int threads, const int bf16) {
    const Args a = {q, k_cache, v_cache, slots, out, q_stride, Hq, Hk, Hq / Hk, D, scale};
    int64_t items = 0, width = 16, kt_floats = 0;
    int64_t *kt_at = malloc(sizeof(int64_t) * (size_t)N);     /* chunk s's transposed keys start here in kt */
    for (int64_t s = 0; s < N; s++) {
        const int64_t ctx16 = round16(segs[s * 4 + 2]);
        items += Hk * ((segs[s * 4 + 1] + QBLOCK - 1) / QBLOCK);
        width = ctx16 > width ? ctx16 : width;
        kt_at[s] = kt_floats;
        kt_floats += Hk * ctx16 * D;
    }
    float *kt = malloc(sizeof(float) * (size_t)kt_floats);    /* [chunk][kv head][tile][D][16] */
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t sh = 0; sh < N * Hk; sh++) {
            const int64_t s = sh / Hk, h = sh % Hk, ctx = segs[s * 4 + 2];
            if (segs[s * 4 + 1] > 0)              /* a chunk may carry no queries (see sampled_row_segs) */
                transpose_keys(&a, slots + segs[s * 4 + 3], ctx, h, kt + kt_at[s] + h * round16(ctx) * D, bf16);
        }
        float *scores = malloc(sizeof(float) * (size_t)(QBLOCK * a.G * width));
#pragma omp for schedule(dynamic, 1)
        for (int64_t idx = 0; idx < items; idx++) {
            int64_t s = 0, k = idx, blocks;
            for (;; s++) {                          /* the chunk, then (block, head) within it */
                blocks = (segs[s * 4 + 1] + QBLOCK - 1) / QBLOCK;
                if (k < Hk * blocks) break;
                k -= Hk * blocks;
            }
            const int64_t b = blocks - 1 - k / Hk, h = k % Hk, n = segs[s * 4 + 1], ctx = segs[s * 4 + 2];
            const Item it = {segs[s * 4], n, ctx, slots + segs[s * 4 + 3], kt + kt_at[s] + h * round16(ctx) * D,
                             h, b * QBLOCK, (b + 1) * QBLOCK < n ? (b + 1) * QBLOCK : n};   /* later blocks first */
            run_item(&a, &it, scores, width, bf16);
        }
        free(scores);
    }
    free(kt);
    free(kt_at);
}

void prefill_attention_f32(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                           const int64_t *segs, int64_t N, const int64_t *slots, float *out, int64_t Hq,
                           int64_t Hk, int64_t D, float scale, int threads) {
    prefill_attention(q, q_stride, k_cache, v_cache, segs, N, slots, out, Hq, Hk, D, scale, threads, 0);
}

/* The same over a bfloat16 cache. */
void prefill_attention_bf16(const float *q, int64_t q_stride, const uint16_t *k_cache, const uint16_t *v_cache,
                            const int64_t *segs, int64_t N, const int64_t *slots, float *out, int64_t Hq,
                            int64_t Hk, int64_t D, float scale, int threads) {
    prefill_attention(q, q_stride, k_cache, v_cache, segs, N, slots, out, Hq, Hk, D, scale, threads, 1);
}
