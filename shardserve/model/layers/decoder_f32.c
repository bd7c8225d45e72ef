/* A range of Llama-family decoder layers for one step in one call (float32, CPU, one TP rank): the same C
 * kernels in the same order as the per-op path in llama.py, so the same values bit for bit, without a return
 * to Python between ops (~15 ms of a ~130 ms batch-64 decode step there). Built by native.py.
 *
 * layers   [n_layers, LAYER_PTRS] int64: each layer's tensor addresses (the enum below); weights packed for
 *          linear_f32, qkv bias may be 0 (NULL)
 * x        [T, H]  in: the stage's input hidden states; out: the last layer's output
 * residual [T, H]  in (has_residual): the residual stream; out: the residual after the last layer
 * Step     shapes, positions, KV slots, attention metadata and scratch buffers (see native_decoder.py)
 */
#include <stdint.h>
#include <string.h>

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

enum { IN_NORM, POST_NORM, QKV_W, QKV_B, O_W, GATE_UP_W, DOWN_W, K_CACHE, V_CACHE, LAYER_PTRS };

typedef struct {
    int64_t T, H, Hq, Hk, D, I, num_slots;        /* tokens, hidden, heads, kv heads, head dim, intermediate */
    float eps, scale;
    int64_t threads;
    const int64_t *positions, *slot_mapping;      /* [T] */
    const float *cos, *sin;                       /* [max_positions, D / 2] */
    int64_t num_decode, decode_width;             /* decode rows come first: B, and L of decode_slots */
    const int64_t *decode_slots, *decode_lens;    /* [B, L], [B] */
    int64_t num_segs;                             /* prefill chunks (prefill_attention_f32's segs / slots) */
    const int64_t *segs, *seg_slots;
    float *h, *qkv, *q, *k, *attn, *gate_up, *act;    /* scratch: [T, H], [T, Nqkv], [T, Hq D], [T, Hk D],
                                                         [T, Hq D], [T, 2 I], [T, I] */
} Step;

/* Returns the number of KV slots outside the cache (their writes skipped; the caller raises). */
int64_t decoder_layers_f32(const int64_t *layers, int64_t n_layers, const Step *s, float *x, float *residual,
                           int has_residual) {
    const int64_t T = s->T, H = s->H, I = s->I, nq = s->Hq * s->D, nkv = s->Hk * s->D, nqkv = nq + 2 * nkv;
    const int th = (int)s->threads;
    int64_t bad = 0;
    for (int64_t l = 0; l < n_layers; l++) {
        const float *const *p = (const float *const *)(layers + l * LAYER_PTRS);
        float *k_cache = (float *)p[K_CACHE], *v_cache = (float *)p[V_CACHE];
        if (has_residual) {
            rms_norm_f32(x, residual, p[IN_NORM], s->h, residual, T, H, s->eps, th);
        } else {                                  /* the first layer: its input is the residual */
            memcpy(residual, x, sizeof(float) * (size_t)(T * H));
            rms_norm_f32(x, NULL, p[IN_NORM], s->h, NULL, T, H, s->eps, th);
            has_residual = 1;
        }
        linear_f32(s->h, H, p[QKV_W], p[QKV_B], s->qkv, nqkv, T, nqkv, H, th);
        rotary_f32(s->qkv, s->positions, s->cos, s->sin, s->q, T, s->Hq, s->D, nqkv, th);
        rotary_f32(s->qkv + nq, s->positions, s->cos, s->sin, s->k, T, s->Hk, s->D, nqkv, th);
        bad += kv_write_f32(s->k, nkv, s->qkv + nq + nkv, nqkv, s->slot_mapping, k_cache, v_cache, T, nkv,
                            s->num_slots, th);
        if (s->num_decode)
            paged_decode_f32(s->q, k_cache, v_cache, s->decode_slots, s->decode_lens, s->attn, s->num_decode,
                             s->Hq, s->Hk, s->D, s->decode_width, s->scale, th);
        if (s->num_segs)
            prefill_attention_f32(s->q, nq, k_cache, v_cache, s->segs, s->num_segs, s->seg_slots, s->attn, s->Hq,
                                  s->Hk, s->D, s->scale, th);
        linear_f32(s->attn, nq, p[O_W], NULL, x, H, T, H, nq, th);
        rms_norm_f32(x, residual, p[POST_NORM], s->h, residual, T, H, s->eps, th);
        linear_f32(s->h, H, p[GATE_UP_W], NULL, s->gate_up, 2 * I, T, 2 * I, H, th);
        silu_mul_f32(s->gate_up, s->act, T, I, 2 * I, th);
        linear_f32(s->act, I, p[DOWN_W], NULL, x, H, T, H, I, th);
    }
    return bad;
}
