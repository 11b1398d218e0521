/* Decode attention on a CPU: one query token over a float32 KV cache, every query head of a KV
 * head reading that head's K and V rows once.
 *
 * Work is split over (KV head, chunk of CHUNK positions) items on torch's OpenMP threads; each item
 * keeps, per query head, the running maximum, the sum of exponentials and the weighted sum of V
 * rows of its chunk, and the chunks are combined at the end (the same arithmetic as a flash
 * decoding step). On x86 with AVX2 and FMA the dot products, exponentials and V sums run eight
 * floats at a time; elsewhere plain loops do the same.
 *
 * Registered as the torch operator specontext::decode_attention_ (torch_abi.c), so the ahead-of-
 * time decode step calls it in place of torch's flash attention.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "specontext.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SPC_X86 1
#endif

enum { CHUNK = 256, MAX_R = 16, MAX_D = 256 };

struct attn_job {
    const float *q; int64_t q_head_stride;          /* [H, D] */
    const float *k, *v; int64_t kv_head_stride[2], kv_row_stride[2]; /* [G, S, D] each (row elements contiguous) */
    const uint8_t *mask; int64_t mask_head_stride;   /* [S] or [G, S] (stride S), 1 = attend; NULL: all */
    float *out;                                      /* [H, D] contiguous */
    int64_t G, R, S, D, chunks;
    float scale;
    float *partial;                                  /* [G, chunks, R, D + 2]: acc, max, sum */
    int avx2;
};

#ifdef SPC_X86
__attribute__((target("avx2,fma"))) static __m256 exp8(__m256 x) {
    /* e^x = 2^n e^r, n = round(x log2 e), |r| <= ln2 / 2; a degree-6 polynomial for e^r */
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* scores[r][j] = scale q_r . k_j for the chunk's positions */
__attribute__((target("avx2,fma"))) static void scores_avx2(const struct attn_job *j, int64_t g, int64_t p0,
                                                            int64_t n, float *scores) {
    const float *k = j->k + g * j->kv_head_stride[0] + p0 * j->kv_row_stride[0];
    for (int64_t i = 0; i < n; i++, k += j->kv_row_stride[0])
        for (int64_t r = 0; r < j->R; r++) {
            const float *q = j->q + (g * j->R + r) * j->q_head_stride;
            __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(k));
            for (int64_t d = 8; d < j->D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), acc);
            scores[r * CHUNK + i] = spc_hsum8(acc) * j->scale;
        }
}

/* p = e^(s - m) in place (masked positions hold -inf and give 0); returns their sum */
__attribute__((target("avx2,fma"))) static float exp_sum_avx2(float *s, int64_t n, float m) {
    __m256 sum = _mm256_setzero_ps(), mv = _mm256_set1_ps(m);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(s + i);
        __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-FLT_MAX), _CMP_GE_OQ);
        __m256 p = _mm256_and_ps(exp8(_mm256_sub_ps(x, mv)), keep);
        _mm256_storeu_ps(s + i, p);
        sum = _mm256_add_ps(sum, p);
    }
    float total = spc_hsum8(sum);
    for (; i < n; i++) total += (s[i] = s[i] == -INFINITY ? 0.0f : expf(s[i] - m));
    return total;
}

/* acc_r += sum_i p_r[i] v_i */
__attribute__((target("avx2,fma"))) static void weighted_v_avx2(const struct attn_job *j, int64_t g, int64_t p0,
                                                                int64_t n, const float *p, float *acc, int64_t acc_stride) {
    const float *v = j->v + g * j->kv_head_stride[1] + p0 * j->kv_row_stride[1];
    for (int64_t d = 0; d < j->D; d += 8) {
        __m256 a[MAX_R];
        for (int64_t r = 0; r < j->R; r++) a[r] = _mm256_setzero_ps();
        const float *vd = v + d;
        for (int64_t i = 0; i < n; i++, vd += j->kv_row_stride[1]) {
            __m256 x = _mm256_loadu_ps(vd);
            for (int64_t r = 0; r < j->R; r++) a[r] = _mm256_fmadd_ps(_mm256_set1_ps(p[r * CHUNK + i]), x, a[r]);
        }
        for (int64_t r = 0; r < j->R; r++) _mm256_storeu_ps(acc + r * acc_stride + d, a[r]);
    }
}
#endif

static void scores_plain(const struct attn_job *j, int64_t g, int64_t p0, int64_t n, float *scores) {
    const float *k = j->k + g * j->kv_head_stride[0] + p0 * j->kv_row_stride[0];
    for (int64_t i = 0; i < n; i++, k += j->kv_row_stride[0])
        for (int64_t r = 0; r < j->R; r++) {
            const float *q = j->q + (g * j->R + r) * j->q_head_stride;
            float acc = 0.0f;
            for (int64_t d = 0; d < j->D; d++) acc += q[d] * k[d];
            scores[r * CHUNK + i] = acc * j->scale;
        }
}

static float exp_sum_plain(float *s, int64_t n, float m) {
    float total = 0.0f;
    for (int64_t i = 0; i < n; i++) total += (s[i] = s[i] == -INFINITY ? 0.0f : expf(s[i] - m));
    return total;
}

static void weighted_v_plain(const struct attn_job *j, int64_t g, int64_t p0, int64_t n, const float *p, float *acc,
                             int64_t acc_stride) {
    const float *v = j->v + g * j->kv_head_stride[1] + p0 * j->kv_row_stride[1];
    for (int64_t r = 0; r < j->R; r++) memset(acc + r * acc_stride, 0, (size_t)j->D * sizeof(float));
    for (int64_t i = 0; i < n; i++, v += j->kv_row_stride[1])
        for (int64_t r = 0; r < j->R; r++)
            for (int64_t d = 0; d < j->D; d++) acc[r * acc_stride + d] += p[r * CHUNK + i] * v[d];
}

static void attn_item(const struct attn_job *j, int64_t item) {
    int64_t g = item / j->chunks, c = item % j->chunks;
    int64_t p0 = c * CHUNK, n = j->S - p0 < CHUNK ? j->S - p0 : CHUNK;
    float scores[MAX_R * CHUNK];
#ifdef SPC_X86
    if (j->avx2) scores_avx2(j, g, p0, n, scores);
    else
#endif
        scores_plain(j, g, p0, n, scores);
    float *part = j->partial + item * j->R * (j->D + 2);
    for (int64_t r = 0; r < j->R; r++) {
        float *s = scores + r * CHUNK, m = -INFINITY;
        for (int64_t i = 0; i < n; i++) {
            if (j->mask && !j->mask[g * j->mask_head_stride + p0 + i]) s[i] = -INFINITY;
            m = s[i] > m ? s[i] : m;
        }
        float *out = part + r * (j->D + 2);
        out[j->D] = m;
        if (m == -INFINITY) { /* every position masked: nothing from this chunk */
            out[j->D + 1] = 0.0f;
            for (int64_t i = 0; i < n; i++) s[i] = 0.0f;
            continue;
        }
#ifdef SPC_X86
        out[j->D + 1] = j->avx2 ? exp_sum_avx2(s, n, m) : exp_sum_plain(s, n, m);
#else
        out[j->D + 1] = exp_sum_plain(s, n, m);
#endif
    }
#ifdef SPC_X86
    if (j->avx2) weighted_v_avx2(j, g, p0, n, scores, part, j->D + 2);
    else
#endif
        weighted_v_plain(j, g, p0, n, scores, part, j->D + 2);
}

static void attn_part(void *arg) {
    const struct attn_job *j = arg;
    int64_t items = j->G * j->chunks, nth = spc_thread_count(), ith = spc_thread_index();
    for (int64_t it = items * ith / nth; it < items * (ith + 1) / nth; it++) attn_item(j, it);
}

int spc_decode_attention(const float *q, int64_t q_head_stride, const float *k, int64_t k_head_stride,
                         int64_t k_row_stride, const float *v, int64_t v_head_stride, int64_t v_row_stride,
                         const uint8_t *mask, int64_t mask_head_stride, float *out, int64_t num_heads, int64_t num_kv_heads, int64_t positions,
                         int64_t head_dim, float scale) {
    spc_clear_error();
    if (!q || !k || !v || !out || num_kv_heads <= 0 || positions <= 0 || head_dim <= 0 ||
        num_heads % num_kv_heads || num_heads / num_kv_heads > MAX_R || head_dim > MAX_D)
        return spc_fail(SPC_ERR_INVALID_ARGUMENT, "spc_decode_attention: bad shape (H %lld, G %lld, S %lld, D %lld; "
                        "H must be a multiple of G, at most %d per KV head, D at most %d)", (long long)num_heads,
                        (long long)num_kv_heads, (long long)positions, (long long)head_dim, MAX_R, MAX_D);
    struct attn_job j = {.q = q, .q_head_stride = q_head_stride, .k = k, .v = v,
                         .kv_head_stride = {k_head_stride, v_head_stride}, .kv_row_stride = {k_row_stride, v_row_stride},
                         .mask = mask, .mask_head_stride = mask_head_stride, .out = out, .G = num_kv_heads, .R = num_heads / num_kv_heads, .S = positions,
                         .D = head_dim, .chunks = (positions + CHUNK - 1) / CHUNK, .scale = scale};
#ifdef SPC_X86
    j.avx2 = head_dim % 8 == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    int64_t items = j.G * j.chunks, part_size = j.R * (j.D + 2);
    j.partial = malloc((size_t)(items * part_size) * sizeof(float));
    if (!j.partial) return spc_fail(SPC_ERR_INVALID_ARGUMENT, "spc_decode_attention: out of memory");
    spc_parallel(attn_part, &j, items);
    for (int64_t g = 0; g < j.G; g++) /* combine the chunks */
        for (int64_t r = 0; r < j.R; r++) {
            float m = -INFINITY, total = 0.0f, *o = out + (g * j.R + r) * j.D;
            for (int64_t c = 0; c < j.chunks; c++) {
                float cm = j.partial[(g * j.chunks + c) * part_size + r * (j.D + 2) + j.D];
                m = cm > m ? cm : m;
            }
            memset(o, 0, (size_t)j.D * sizeof(float));
            if (m == -INFINITY) continue; /* no position to attend: zeros */
            for (int64_t c = 0; c < j.chunks; c++) {
                const float *pc = j.partial + (g * j.chunks + c) * part_size + r * (j.D + 2);
                if (pc[j.D] == -INFINITY) continue;
                float w = expf(pc[j.D] - m);
                total += w * pc[j.D + 1];
                for (int64_t d = 0; d < j.D; d++) o[d] += w * pc[d];
            }
            for (int64_t d = 0; d < j.D; d++) o[d] /= total;
        }
    free(j.partial);
    return SPC_OK;
}

/* decode_attention_(Tensor(a!) out, Tensor q, Tensor k, Tensor v, Tensor mask, float scale):
 * out [1, H, 1, D] float32 contiguous; q [1, H, 1, D]; k, v [1, G, S, D] float32 with unit stride
 * along D; mask bool, contiguous, with S elements (every head) or G x S (one row per KV head), 1 =
 * attend, or empty for every position. */
static void op_attention(uint64_t *stack, uint64_t num_args, uint64_t num_outputs) {
    (void)num_args; (void)num_outputs;
    struct spc_tensor out, q, k, v, mask;
    double scale;
    memcpy(&scale, &stack[5], sizeof scale);
    if (!spc_torch_tensor((void *)(uintptr_t)stack[0], SPC_FLOAT32, &out)) goto release;
    int ok = spc_torch_tensor((void *)(uintptr_t)stack[1], SPC_FLOAT32, &q) &&
             spc_torch_tensor((void *)(uintptr_t)stack[2], SPC_FLOAT32, &k) &&
             spc_torch_tensor((void *)(uintptr_t)stack[3], SPC_FLOAT32, &v) &&
             spc_torch_tensor((void *)(uintptr_t)stack[4], SPC_BOOL, &mask) &&
             q.dim == 4 && k.dim == 4 && v.dim == 4 && out.dim == 4 && spc_contiguous(&out) &&
             q.sizes[0] == 1 && q.sizes[2] == 1 && k.sizes[0] == 1 && v.sizes[0] == 1 &&
             out.sizes[0] == 1 && out.sizes[1] == q.sizes[1] && out.sizes[2] == 1 && out.sizes[3] == q.sizes[3] &&
             q.strides[3] == 1 && k.strides[3] == 1 && v.strides[3] == 1 &&
             k.sizes[3] == q.sizes[3] && v.sizes[1] == k.sizes[1] && v.sizes[2] == k.sizes[2] && v.sizes[3] == k.sizes[3] &&
             (mask.numel == 0 || ((mask.numel == k.sizes[2] || mask.numel == k.sizes[1] * k.sizes[2]) &&
                                  spc_contiguous(&mask))) &&
             spc_decode_attention(q.data, q.strides[1], k.data, k.strides[1], k.strides[2], v.data, v.strides[1],
                                  v.strides[2], mask.numel ? mask.data : NULL,
                                  mask.numel == k.sizes[2] ? 0 : k.sizes[2], out.data, q.sizes[1], k.sizes[1],
                                  k.sizes[2], k.sizes[3], (float)scale) == SPC_OK;
    if (!ok && spc_contiguous(&out)) /* else its elements are not numel floats in a row: leave it */
        for (int64_t i = 0; i < out.numel; i++) ((float *)out.data)[i] = NAN;
release:
    for (int i = 0; i < 5; i++) spc_torch_release((void *)(uintptr_t)stack[i]);
}

int spc_attention_init(const char *torch_cpu_path) {
    spc_clear_error();
    static int registered;
    int status = spc_torch_load(torch_cpu_path);
    if (status == SPC_OK && !registered) {
        status = spc_torch_register("decode_attention_", "decode_attention_(Tensor(a!) out, Tensor q, Tensor k, "
                                    "Tensor v, Tensor mask, float scale) -> ()", op_attention);
        registered = status == SPC_OK;
    }
    return status;
}
