/* A range of Llama-family decoder layers for one step in one call (float32 activations, CPU, one rank): the
 * same C kernels in the same order as the per-op path in llama.py, so the same values bit for bit, without a
 * return to Python between ops (~15 ms of a ~130 ms batch-64 decode step there). Built by native.py.
 * A bfloat16 model (Step.bf16) runs the same way on float32 buffers that are rounded to bfloat16 wherever its
 * tensors are stored in bf16 (after each linear, rotary, attention, residual add and norm), with a bf16 KV cache
 * and its linears on linear_bf16.c (VDPBF16PS): bf16 values, float32 accumulation, no Python between ops.
 *
 * layers   [n_layers, LAYER_PTRS] int64: each layer's tensor addresses (the enum below) and its linears' weight
 *          formats: -1 for float32 packed for linear_f32, -2 for bfloat16 packed for linear_bf16, quant_linear.c's
 *          format code of GGUF rows as stored,
 *          or QUANT_PANELS + that code for weights repacked into quant_panels.c's k-major panels;
 *          qkv bias may be 0 (NULL)
 * x        [T, H]  in: the stage's input hidden states; out: the last layer's output
 * residual [T, H]  in (has_residual): the residual stream; out: the residual after the last layer
 * Step     shapes, positions, KV slots, attention metadata and scratch buffers (see native_decoder.py); with
 *          TP > 1, the callback that all-reduces x after o_proj and down_proj (row-parallel, no bias)
 */
#include <stdint.h>
#include <string.h>
#include <omp.h>

void rms_norm_f32(const float *x, const float *residual, const float *weight, float *out, float *residual_out,
                  int64_t T, int64_t H, float eps, int threads);
void rotary_f32(const float *x, const int64_t *positions, const float *cos_table, const float *sin_table,
                float *out, int64_t T, int64_t H, int64_t D, int64_t row_stride, int threads);
void silu_mul_f32(const float *gate_up, float *out, int64_t T, int64_t I, int64_t row_stride, int threads);
int64_t kv_write_f32(const float *k, int64_t k_stride, const float *v, int64_t v_stride, const int64_t *slots,
                     float *k_cache, float *v_cache, int64_t T, int64_t row, int64_t num_slots, int threads);
void paged_decode_f32(const float *q, const float *k_cache, const float *v_cache, const int64_t *slots,
                      const int64_t *lens, float *out, int64_t B, int64_t Hq, int64_t Hk, int64_t D, int64_t L,
                      float scale, int threads);
void prefill_attention_f32(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                           const int64_t *segs, int64_t N, const int64_t *slots, float *out, int64_t Hq,
                           int64_t Hk, int64_t D, float scale, int threads);
void linear_f32(const float *x, int64_t ldx, const float *w, const float *bias, float *out, int64_t ldo,
                int64_t M, int64_t N, int64_t K, int threads);
void linear_silu_f32(const float *x, int64_t ldx, const float *w, float *out, int64_t ldo, int64_t M, int64_t I,
                     int64_t K, int threads);
int quant_linear_f32(const float *x, int64_t ldx, const uint8_t *w, int64_t ldw, const float *scales,
                     const float *bias, float *out, int64_t ldo, int64_t M, int64_t N, int64_t K, int fmt, int threads);
int64_t quant_row_bytes(int fmt, int64_t K);
int quant_panels_linear_f32(const float *x, int64_t ldx, const uint8_t *w, const float *bias, float *out,
                            int64_t ldo, int64_t M, int64_t N, int64_t K, int fmt, int threads);
int linear_bf16(const float *x, int64_t ldx, const uint16_t *w, const float *bias, float *out, int64_t ldo,
                int64_t M, int64_t N, int64_t K, int threads);
int64_t kv_write_bf16(const float *k, int64_t k_stride, const float *v, int64_t v_stride, const int64_t *slots,
                      uint16_t *k_cache, uint16_t *v_cache, int64_t T, int64_t row, int64_t num_slots, int threads);
void paged_decode_bf16(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *slots,
                       const int64_t *lens, float *out, int64_t B, int64_t Hq, int64_t Hk, int64_t D, int64_t L,
                       float scale, int threads);
void prefill_attention_bf16(const float *q, int64_t q_stride, const uint16_t *k_cache, const uint16_t *v_cache,
                            const int64_t *segs, int64_t N, const int64_t *slots, float *out, int64_t Hq,
                            int64_t Hk, int64_t D, float scale, int threads);
void round_bf16_rows(float *x, int64_t T, int64_t cols, int64_t ld, int threads);
void add_round_bf16(const float *x, float *residual, int64_t T, int64_t H, int threads);
#define QUANT_PANELS 100   /* native_decoder.QUANT_PANELS */
#define LINEAR_BF16 (-2)   /* native_decoder.LINEAR_BF16 */

enum { IN_NORM, POST_NORM, QKV_W, QKV_B, O_W, GATE_UP_W, DOWN_W, K_CACHE, V_CACHE,
       QKV_F, O_F, GATE_UP_F, DOWN_F, LAYER_PTRS };

/* out = x W^T (+ bias) for a weight in format fmt (-1: linear_f32's panels; -2: linear_bf16's; >= QUANT_PANELS:
 * quant_panels.c). Returns 0, or 1 when the kernel failed (its scratch could not be allocated): the caller
 * finishes the layers (row streams meet at a barrier per layer) and reports it after. */
static int linear(int64_t fmt, const float *x, int64_t ldx, const void *w, const float *bias, float *out,
                  int64_t ldo, int64_t M, int64_t N, int64_t K, int th) {
    if (fmt == LINEAR_BF16) return linear_bf16(x, ldx, (const uint16_t *)w, bias, out, ldo, M, N, K, th) != 0;
    if (fmt < 0) {
        linear_f32(x, ldx, (const float *)w, bias, out, ldo, M, N, K, th);
        return 0;
    }
    if (fmt >= QUANT_PANELS)
        return quant_panels_linear_f32(x, ldx, (const uint8_t *)w, bias, out, ldo, M, N, K, (int)(fmt - QUANT_PANELS),
                                       th) != 0;
    return quant_linear_f32(x, ldx, (const uint8_t *)w, quant_row_bytes((int)fmt, K), NULL, bias, out, ldo, M, N,
                            K, (int)fmt, th) != 0;
}

typedef struct {
    int64_t T, H, Hq, Hk, D, I, num_slots;        /* tokens, hidden, heads, kv heads, head dim, intermediate */
    float eps, scale;
    int64_t threads, fused_silu;                  /* fused_silu: gate_up packed for linear_silu_f32 */
    int64_t bf16;                                 /* a bf16 model: bf16 KV cache, buffers rounded to bf16 */
    const int64_t *positions, *slot_mapping;      /* [T] */
    const float *cos, *sin;                       /* [max_positions, D / 2] */
    int64_t num_decode, decode_width;             /* decode rows come first: B, and L of decode_slots */
    const int64_t *decode_slots, *decode_lens;    /* [B, L], [B] */
    int64_t num_segs;                             /* prefill chunks (prefill_attention_f32's segs / slots) */
    const int64_t *segs, *seg_slots;
    int (*all_reduce)(float *x, int64_t rows, int64_t cols);  /* TP > 1: sums x over the group, 0 on success */
    int64_t skip_unsampled, num_keep;             /* 1: the last layer finishes only rows keep[0 .. num_keep) */
    const int64_t *keep, *keep_segs;              /* ascending rows; segs cut to those rows (sampled_row_segs) */
    float *h, *qkv, *q, *k, *attn, *gate_up, *act;    /* scratch: [T, H], [T, Nqkv], [T, Hq D], [T, Hk D],
                                                         [T, Hq D], [T, 2 I], [T, I] */
} Step;

/* Layers over rows [r0, r1) of the step, which hold decode rows [d0, d1) and prefill chunks [c0, c1), on
 * `th` threads per kernel. Returns the number of KV slots outside the cache (their writes are skipped), or -1
 * when a TP all-reduce failed (the layers stop there). */
/* Moves the kept rows of [r0, r1) (keep[*k0 .. *k1)) to the front of attn and residual; returns how many. */
static int64_t gather_kept(const Step *s, int64_t r0, int64_t r1, float *attn, float *residual, int64_t nq,
                           int64_t H, int64_t *k0, int64_t *k1) {
    *k0 = 0;
    while (*k0 < s->num_keep && s->keep[*k0] < r0) (*k0)++;
    *k1 = *k0;
    while (*k1 < s->num_keep && s->keep[*k1] < r1) (*k1)++;
    for (int64_t j = 0; j < *k1 - *k0; j++) {     /* ascending: a row never lands on one still to be moved */
        const int64_t row = s->keep[*k0 + j] - r0;
        if (row == j) continue;
        memcpy(attn + j * nq, attn + row * nq, sizeof(float) * (size_t)nq);
        memcpy(residual + j * H, residual + row * H, sizeof(float) * (size_t)H);
    }
    return *k1 - *k0;
}

/* The inverse for x and residual: compact row j back to its place (descending, for the same reason). */
static void scatter_kept(const Step *s, int64_t r0, float *x, float *residual, int64_t H, int64_t k0, int64_t k1) {
    for (int64_t j = k1 - k0 - 1; j >= 0; j--) {
        const int64_t row = s->keep[k0 + j] - r0;
        if (row == j) continue;
        memcpy(x + row * H, x + j * H, sizeof(float) * (size_t)H);
        memcpy(residual + row * H, residual + j * H, sizeof(float) * (size_t)H);
    }
}

/* A bf16 model's tensor is stored in bf16: its [rows, cols] buffer (row stride ld) rounded in place. */
static void as_bf16(const Step *s, float *x, int64_t rows, int64_t cols, int64_t ld, int th) {
    if (s->bf16) round_bf16_rows(x, rows, cols, ld, th);
}

/* h = norm(x + residual) * weight and residual = x + residual (rows T); without has_residual the sum is x. */
static void add_norm(const Step *s, const float *weight, const float *x, float *residual, float *h, int64_t T,
                     int has_residual, int th) {
    const int64_t H = s->H;
    if (!has_residual) {                          /* the first layer: its input is the residual */
        memcpy(residual, x, sizeof(float) * (size_t)(T * H));
        rms_norm_f32(x, NULL, weight, h, NULL, T, H, s->eps, th);
    } else if (s->bf16) {                         /* the bf16 sum is rounded before the norm reads it */
        add_round_bf16(x, residual, T, H, th);
        rms_norm_f32(residual, NULL, weight, h, NULL, T, H, s->eps, th);
    } else {
        rms_norm_f32(x, residual, weight, h, residual, T, H, s->eps, th);
    }
    as_bf16(s, h, T, H, H, th);
}

/* Layers over rows [r0, r1) of the step, which hold decode rows [d0, d1) and prefill chunks [c0, c1), on
 * `th` threads per kernel. With skip_unsampled, the last layer writes every row's K/V but runs attention,
 * o_proj and the MLP only for the kept (sampled) rows: nothing reads the others' outputs. Returns the number
 * of KV slots outside the cache (their writes are skipped). */
static int64_t run_rows(const int64_t *layers, int64_t n_layers, const Step *s, float *x_all, float *res_all,
                        int has_residual, int64_t r0, int64_t r1, int64_t d0, int64_t d1, int64_t c0, int64_t c1,
                        int th, int *failed) {
    const int64_t T = r1 - r0, H = s->H, I = s->I, nq = s->Hq * s->D, nkv = s->Hk * s->D, nqkv = nq + 2 * nkv;
    float *x = x_all + r0 * H, *residual = res_all + r0 * H, *h = s->h + r0 * H, *qkv = s->qkv + r0 * nqkv;
    float *q = s->q + r0 * nq, *k = s->k + r0 * nkv, *attn = s->attn + r0 * nq;
    float *gate_up = s->gate_up + r0 * 2 * I, *act = s->act + r0 * I;
    const int64_t *positions = s->positions + r0, *slot_mapping = s->slot_mapping + r0;
    int64_t bad = 0;
    for (int64_t l = 0; l < n_layers; l++) {
        const float *const *p = (const float *const *)(layers + l * LAYER_PTRS);
        const int64_t *fmt = layers + l * LAYER_PTRS;
        void *k_cache = (void *)p[K_CACHE], *v_cache = (void *)p[V_CACHE];
        const int skip = s->skip_unsampled && l == n_layers - 1;
        add_norm(s, p[IN_NORM], x, residual, h, T, has_residual, th);
        has_residual = 1;
        if (linear(fmt[QKV_F], h, H, p[QKV_W], p[QKV_B], qkv, nqkv, T, nqkv, H, th)) *failed = 1;
        as_bf16(s, qkv, T, nqkv, nqkv, th);
        rotary_f32(qkv, positions, s->cos, s->sin, q, T, s->Hq, s->D, nqkv, th);
        rotary_f32(qkv + nq, positions, s->cos, s->sin, k, T, s->Hk, s->D, nqkv, th);
        as_bf16(s, q, T, nq, nq, th);
        if (s->bf16)                              /* rounds k as it stores it */
            bad += kv_write_bf16(k, nkv, qkv + nq + nkv, nqkv, slot_mapping, k_cache, v_cache, T, nkv, s->num_slots,
                                 th);
        else
            bad += kv_write_f32(k, nkv, qkv + nq + nkv, nqkv, slot_mapping, k_cache, v_cache, T, nkv, s->num_slots,
                                th);
        const int64_t *dslots = s->decode_slots + d0 * s->decode_width, *dlens = s->decode_lens + d0;
        const int64_t *segs = (skip ? s->keep_segs : s->segs) + 4 * c0;   /* chunk rows are absolute: the step's */
        if (d1 > d0 && s->bf16)
            paged_decode_bf16(s->q + d0 * nq, k_cache, v_cache, dslots, dlens, s->attn + d0 * nq, d1 - d0, s->Hq,
                              s->Hk, s->D, s->decode_width, s->scale, th);
        else if (d1 > d0)
            paged_decode_f32(s->q + d0 * nq, k_cache, v_cache, dslots, dlens, s->attn + d0 * nq, d1 - d0, s->Hq,
                             s->Hk, s->D, s->decode_width, s->scale, th);
        if (c1 > c0 && s->bf16)
            prefill_attention_bf16(s->q, nq, k_cache, v_cache, segs, c1 - c0, s->seg_slots, s->attn, s->Hq, s->Hk,
                                   s->D, s->scale, th);
        else if (c1 > c0)
            prefill_attention_f32(s->q, nq, k_cache, v_cache, segs, c1 - c0, s->seg_slots, s->attn, s->Hq, s->Hk,
                                  s->D, s->scale, th);
        int64_t M = T, k0 = 0, k1 = 0;
        if (skip) M = gather_kept(s, r0, r1, attn, residual, nq, H, &k0, &k1);
        as_bf16(s, attn, M, nq, nq, th);
        if (linear(fmt[O_F], attn, nq, p[O_W], NULL, x, H, M, H, nq, th)) *failed = 1;
        if (s->all_reduce && s->all_reduce(x, M, H)) return -1;
        as_bf16(s, x, M, H, H, th);
        add_norm(s, p[POST_NORM], x, residual, h, M, 1, th);
        if (s->fused_silu) {
            linear_silu_f32(h, H, p[GATE_UP_W], act, I, M, I, H, th);
        } else {
            if (linear(fmt[GATE_UP_F], h, H, p[GATE_UP_W], NULL, gate_up, 2 * I, M, 2 * I, H, th)) *failed = 1;
            as_bf16(s, gate_up, M, 2 * I, 2 * I, th);
            silu_mul_f32(gate_up, act, M, I, 2 * I, th);
        }
        as_bf16(s, act, M, I, I, th);
        if (linear(fmt[DOWN_F], act, I, p[DOWN_W], NULL, x, H, M, H, I, th)) *failed = 1;
        if (s->all_reduce && s->all_reduce(x, M, H)) return -1;
        as_bf16(s, x, M, H, H, th);
        if (skip) scatter_kept(s, r0, x, residual, H, k0, k1);
        /* Streams start each layer together, so the second to read a weight mostly finds it in L3 (a layer's
         * weights are 14 MB at SmolLM2): without this each stream streams every weight from DRAM on its own.
         * Measured over three alternated pairs of full runs: 352.6 vs 349.1 tok/s, inside the noise. */
#pragma omp barrier
    }
    return bad;
}

/* First row of unit u: units are the decode rows, then the prefill chunks, in row order (T past the last). */
static int64_t unit_row(const Step *s, int64_t u) {
    if (u < s->num_decode) return u;
    return u - s->num_decode < s->num_segs ? s->segs[4 * (u - s->num_decode)] : s->T;
}

/* Runs the layers over all T rows. With `threads` or more units (decode rows and prefill chunks), each thread
 * takes a run of whole units holding about 1/threads of the rows and carries it through every layer on its
 * own, single-threaded kernels and no barrier between them: while one thread's attention waits on memory the
 * other's GEMMs keep the FMA units busy, and the per-kernel fork/join is gone. Rows do not interact inside a
 * layer, so the values are those of one pass over all rows. Fewer units (a batch-1 decode step): one pass,
 * every kernel on all threads. Under TP (all_reduce set) always one pass: the ranks' collectives must pair up.
 * Returns the number of KV slots outside the cache (the caller raises), -1 when an all-reduce failed, or -2
 * when a quantized linear could not allocate its scratch. */
int64_t decoder_layers_f32(const int64_t *layers, int64_t n_layers, const Step *s, float *x, float *residual,
                           int has_residual) {
    int failed = 0;
    const int64_t units = s->num_decode + s->num_segs;
    /* one stream under TP: every rank must call the group's all-reduces in the same order */
    const int streams = (int)(units < s->threads || s->all_reduce ? 1 : s->threads);
    if (streams == 1) {
        const int64_t bad = run_rows(layers, n_layers, s, x, residual, has_residual, 0, s->T, 0, s->num_decode, 0,
                                     s->num_segs, (int)s->threads, &failed);
        return failed ? -2 : bad;
    }
    int64_t bad = 0;
#pragma omp parallel num_threads(streams) reduction(+ : bad)
    {
        const int i = omp_get_thread_num();
        int64_t bounds[2];
        for (int e = 0; e < 2; e++) {             /* the unit starting nearest to row (i + e) T / streams */
            const int64_t target = (i + e) * s->T / streams;
            int64_t u = 0;
            while (u < units && unit_row(s, u) < target) u++;
            if (u > 0 && target - unit_row(s, u - 1) < unit_row(s, u) - target) u--;
            const int64_t lo = i + e, hi = units - (streams - i - e);     /* every stream keeps one unit */
            bounds[e] = u < lo ? lo : (u > hi ? hi : u);
        }
        const int64_t u0 = bounds[0], u1 = bounds[1], nd = s->num_decode;
        bad += run_rows(layers, n_layers, s, x, residual, has_residual, unit_row(s, u0), unit_row(s, u1),
                        u0 < nd ? u0 : nd, u1 < nd ? u1 : nd, (u0 > nd ? u0 : nd) - nd, (u1 > nd ? u1 : nd) - nd, 1,
                        &failed);        /* a benign race: threads only ever store 1 */
    }
    return failed ? -2 : bad;
}
