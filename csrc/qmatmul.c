/* Products with weights kept quantized, on float32 activations, on a CPU.
 *
 * int4: each weight row is groups of 32 values q in 0..15, the group's value (q - 8) * scale + zero,
 * one float32 scale and zero per group. A group is 16 bytes: byte 4 a + b (a, b in 0..3) holds
 * value 8 b + a in its low nibble and value 8 b + a + 4 in its high one. Read as four little-endian
 * 32-bit words broadcast to both halves of an AVX2 register, each lane then finds its eight values
 * by shifts alone (lane l reads word l % 4, its values 8 v + l in nibble 2 v + l / 4), without the
 * byte shuffles GGUF's order (value b low, b + 16 high) needs: 19% faster products on one core of
 * the AVX2 machine (by hand, [1, 576] x [576, 3072]).
 * int8: each row is groups of 32 values q in -128..127, the value q * scale, one float32 scale per
 * group (GGUF's Q8_0, with its scale widened to float32).
 *
 * A product accumulates sum(q x) per group in float32 and adds scale times it (and zero times the
 * group's sum of x): the arithmetic of the float32 product with the dequantized weight, in another
 * order. torch's own weight-only kernels take bfloat16 activations to be fast on these CPUs, and
 * return bfloat16; this keeps float32 throughout. Rows are split over torch's OpenMP threads; on
 * x86 with AVX2 and FMA eight values at a time, elsewhere (or when forced) plain loops.
 *
 * Registered as the torch operators specontext::q4_mm_, q8_mm_ and q4_dequantize_ (torch_abi.c).
 */
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

enum { GROUP = 32, TOKENS = 4 /* activation rows sharing one unpacking of a weight row */ };
#define LOW(i) (8 * ((i) % 4) + (i) / 4) /* the value in byte i's low nibble (its high one: + 4) */

static int force_plain;

void spc_qmm_force_plain(int plain) { force_plain = plain != 0; }


struct qmm_job {
    const uint8_t *w;      /* int4: [N, K / 2] bytes; int8: [N, K] int8 */
    const float *scale;    /* [N, K / GROUP] */
    const float *zero;     /* int4: [N, K / GROUP]; int8: NULL */
    const float *x;        /* [M, K] */
    const float *xsum;     /* int4: [M, K / GROUP] sums of x over each group */
    float *y;              /* [M, N] */
    int64_t M, N, K;
    void (*rows)(const struct qmm_job *, int64_t n0, int64_t n1, int64_t t0, int64_t tn); /* the loops */
};

#ifdef SPC_X86
/* rows [n0, n1) for activation rows [t0, t0 + tn), tn <= TOKENS */
__attribute__((target("avx2,fma"))) static void q4_rows_avx2(const struct qmm_job *j, int64_t n0, int64_t n1,
                                                             int64_t t0, int64_t tn) {
    const int64_t groups = j->K / GROUP;
    const __m256i low = _mm256_set1_epi32(0x0F), upper = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = j->w + n * (j->K / 2);
        const float *s = j->scale + n * groups, *z = j->zero + n * groups;
        __m256 acc[TOKENS];
        float bias[TOKENS] = {0};
        for (int64_t t = 0; t < tn; t++) acc[t] = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; g++, w += GROUP / 2) {
            __m256i b = _mm256_srlv_epi32(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)w)), upper);
            __m256 q0 = _mm256_cvtepi32_ps(_mm256_and_si256(b, low));
            __m256 q1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(b, 8), low));
            __m256 q2 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(b, 16), low));
            __m256 q3 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(b, 24), low));
            __m256 sv = _mm256_set1_ps(s[g]);
            float m = z[g] - 8.0f * s[g]; /* value = q s + m */
            for (int64_t t = 0; t < tn; t++) {
                const float *x = j->x + (t0 + t) * j->K + g * GROUP;
                __m256 d = _mm256_mul_ps(q0, _mm256_loadu_ps(x));
                d = _mm256_fmadd_ps(q1, _mm256_loadu_ps(x + 8), d);
                d = _mm256_fmadd_ps(q2, _mm256_loadu_ps(x + 16), d);
                d = _mm256_fmadd_ps(q3, _mm256_loadu_ps(x + 24), d);
                acc[t] = _mm256_fmadd_ps(sv, d, acc[t]);
                bias[t] += m * j->xsum[(t0 + t) * groups + g];
            }
        }
        for (int64_t t = 0; t < tn; t++) j->y[(t0 + t) * j->N + n] = spc_hsum8(acc[t]) + bias[t];
    }
}

__attribute__((target("avx2,fma"))) static void q8_rows_avx2(const struct qmm_job *j, int64_t n0, int64_t n1,
                                                             int64_t t0, int64_t tn) {
    const int64_t groups = j->K / GROUP;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *w = (const int8_t *)j->w + n * j->K;
        const float *s = j->scale + n * groups;
        __m256 acc[TOKENS];
        for (int64_t t = 0; t < tn; t++) acc[t] = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; g++, w += GROUP) {
            __m256 q[4];
            for (int i = 0; i < 4; i++)
                q[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + 8 * i))));
            __m256 sv = _mm256_set1_ps(s[g]);
            for (int64_t t = 0; t < tn; t++) {
                const float *x = j->x + (t0 + t) * j->K + g * GROUP;
                __m256 d = _mm256_mul_ps(q[0], _mm256_loadu_ps(x));
                d = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(x + 8), d);
                d = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(x + 16), d);
                d = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(x + 24), d);
                acc[t] = _mm256_fmadd_ps(sv, d, acc[t]);
            }
        }
        for (int64_t t = 0; t < tn; t++) j->y[(t0 + t) * j->N + n] = spc_hsum8(acc[t]);
    }
}
#endif

static void q4_rows_plain(const struct qmm_job *j, int64_t n0, int64_t n1, int64_t t0, int64_t tn) {
    const int64_t groups = j->K / GROUP;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = j->w + n * (j->K / 2);
        for (int64_t t = t0; t < t0 + tn; t++) {
            const float *x = j->x + t * j->K;
            float total = 0.0f;
            for (int64_t g = 0; g < groups; g++) {
                const uint8_t *b = w + g * (GROUP / 2);
                float d = 0.0f, s = j->scale[n * groups + g];
                for (int i = 0; i < GROUP / 2; i++) /* byte 4 a + b: values 8 b + a and 8 b + a + 4 */
                    d += (float)(b[i] & 0x0F) * x[g * GROUP + LOW(i)] + (float)(b[i] >> 4) * x[g * GROUP + LOW(i) + 4];
                total += s * d + (j->zero[n * groups + g] - 8.0f * s) * j->xsum[t * groups + g];
            }
            j->y[t * j->N + n] = total;
        }
    }
}

static void q8_rows_plain(const struct qmm_job *j, int64_t n0, int64_t n1, int64_t t0, int64_t tn) {
    const int64_t groups = j->K / GROUP;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *w = (const int8_t *)j->w + n * j->K;
        for (int64_t t = t0; t < t0 + tn; t++) {
            const float *x = j->x + t * j->K;
            float total = 0.0f;
            for (int64_t g = 0; g < groups; g++) {
                float d = 0.0f;
                for (int i = 0; i < GROUP; i++) d += (float)w[g * GROUP + i] * x[g * GROUP + i];
                total += j->scale[n * groups + g] * d;
            }
            j->y[t * j->N + n] = total;
        }
    }
}

typedef void (*rows_fn)(const struct qmm_job *, int64_t, int64_t, int64_t, int64_t);

/* The AVX2 loops where the CPU has AVX2 and FMA (and they are not forced off), else the plain ones. */
static rows_fn pick(rows_fn avx2, rows_fn plain) {
#ifdef SPC_X86
    if (!force_plain && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return avx2;
#else
    (void)avx2;
#endif
    return plain;
}

/* This thread's share of the rows, TOKENS activation rows at a time, on the job's loops. */
static void product_part(void *arg) {
    const struct qmm_job *j = arg;
    int64_t nth = spc_thread_count(), ith = spc_thread_index();
    int64_t n0 = j->N * ith / nth, n1 = j->N * (ith + 1) / nth;
    for (int64_t t0 = 0; t0 < j->M; t0 += TOKENS) j->rows(j, n0, n1, t0, j->M - t0 < TOKENS ? j->M - t0 : TOKENS);
}

#ifdef SPC_X86
#define Q4_AVX2 q4_rows_avx2
#define Q8_AVX2 q8_rows_avx2
#else
#define Q4_AVX2 NULL
#define Q8_AVX2 NULL
#endif

static int check_shape(const char *fn, const void *w, const float *scale, const float *x, const float *y, int64_t n,
                       int64_t k, int64_t m) {
    if (!w || !scale || !x || !y || n <= 0 || m <= 0 || k <= 0 || k % GROUP)
        return spc_fail(SPC_ERR_INVALID_ARGUMENT, "%s: NULL buffer or bad shape (n %lld, k %lld, m %lld; k must be a "
                        "positive multiple of %d)", fn, (long long)n, (long long)k, (long long)m, GROUP);
    return SPC_OK;
}

int spc_q4_mm(const uint8_t *w, const float *scale, const float *zero, int64_t n, int64_t k, const float *x,
              int64_t m, float *y) {
    spc_clear_error();
    int status = check_shape("spc_q4_mm", w, scale, x, y, n, k, m);
    if (status != SPC_OK) return status;
    if (!zero) return spc_fail(SPC_ERR_INVALID_ARGUMENT, "spc_q4_mm: NULL zero");
    int64_t groups = k / GROUP;
    float *xsum = malloc((size_t)(m * groups) * sizeof(float));
    if (!xsum) return spc_fail(SPC_ERR_INVALID_ARGUMENT, "spc_q4_mm: out of memory");
    for (int64_t t = 0; t < m; t++)
        for (int64_t g = 0; g < groups; g++) {
            float total = 0.0f;
            for (int i = 0; i < GROUP; i++) total += x[t * k + g * GROUP + i];
            xsum[t * groups + g] = total;
        }
    struct qmm_job j = {.w = w, .scale = scale, .zero = zero, .x = x, .xsum = xsum, .y = y, .M = m, .N = n, .K = k,
                        .rows = pick(Q4_AVX2, q4_rows_plain)};
    spc_parallel(product_part, &j, n);
    free(xsum);
    return SPC_OK;
}

int spc_q8_mm(const int8_t *w, const float *scale, int64_t n, int64_t k, const float *x, int64_t m, float *y) {
    spc_clear_error();
    int status = check_shape("spc_q8_mm", w, scale, x, y, n, k, m);
    if (status != SPC_OK) return status;
    struct qmm_job j = {.w = (const uint8_t *)w, .scale = scale, .x = x, .y = y, .M = m, .N = n, .K = k,
                        .rows = pick(Q8_AVX2, q8_rows_plain)};
    spc_parallel(product_part, &j, n);
    return SPC_OK;
}

struct deq_job { const uint8_t *w; const float *scale, *zero; float *out; int64_t N, K; };

/* (q - 8) s + z rounded once per operation, as the float32 reference (QuantizedWeight.dequantize) */
__attribute__((optimize("fp-contract=off"))) static void q4_dequantize_part(void *arg) {
    const struct deq_job *j = arg;
    int64_t nth = spc_thread_count(), ith = spc_thread_index(), groups = j->K / GROUP;
    for (int64_t n = j->N * ith / nth; n < j->N * (ith + 1) / nth; n++)
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *b = j->w + n * (j->K / 2) + g * (GROUP / 2);
            float s = j->scale[n * groups + g], z = j->zero[n * groups + g], *o = j->out + n * j->K + g * GROUP;
            for (int i = 0; i < GROUP / 2; i++) {
                o[LOW(i)] = ((float)(b[i] & 0x0F) - 8.0f) * s + z;
                o[LOW(i) + 4] = ((float)(b[i] >> 4) - 8.0f) * s + z;
            }
        }
}

int spc_q4_dequantize(const uint8_t *w, const float *scale, const float *zero, int64_t n, int64_t k, float *out) {
    spc_clear_error();
    if (!w || !scale || !zero || !out || n <= 0 || k <= 0 || k % GROUP)
        return spc_fail(SPC_ERR_INVALID_ARGUMENT, "spc_q4_dequantize: NULL buffer or bad shape (n %lld, k %lld)",
                        (long long)n, (long long)k);
    struct deq_job j = {.w = w, .scale = scale, .zero = zero, .out = out, .N = n, .K = k};
    spc_parallel(q4_dequantize_part, &j, n);
    return SPC_OK;
}

/* ---- torch operators ------------------------------------------------------------------------- */

static int64_t rows_of(const struct spc_tensor *t) {
    return t->dim && t->sizes[t->dim - 1] ? t->numel / t->sizes[t->dim - 1] : -1;
}

static void poison(const struct spc_tensor *out) {
    if (spc_contiguous(out)) /* else its elements are not numel floats in a row: leave it */
        for (int64_t i = 0; i < out->numel; i++) ((float *)out->data)[i] = NAN;
}

/* Whether out [.., N] and x [.., K] (same rows) fit a weight of N rows, K values and scales
 * [N, K / GROUP] (and zeros the same), all contiguous. */
static int fits(const struct spc_tensor *out, const struct spc_tensor *x, const struct spc_tensor *w, int64_t w_cols,
                const struct spc_tensor *scale, const struct spc_tensor *zero) {
    if (x->dim < 1 || out->dim < 1 || w->dim != 2 || scale->dim != 2) return 0;
    int64_t n = w->sizes[0], k = x->sizes[x->dim - 1];
    return rows_of(x) > 0 && rows_of(x) == rows_of(out) && out->sizes[out->dim - 1] == n && k % GROUP == 0 &&
           w_cols == k && scale->sizes[0] == n && scale->sizes[1] == k / GROUP &&
           (!zero || (zero->dim == 2 && zero->sizes[0] == n && zero->sizes[1] == k / GROUP && spc_contiguous(zero))) &&
           spc_contiguous(out) && spc_contiguous(x) && spc_contiguous(w) && spc_contiguous(scale);
}

/* The products' operators: q4_mm_(Tensor(a!) out, Tensor x, Tensor w, Tensor scale, Tensor zero) and
 * q8_mm_(Tensor(a!) out, Tensor x, Tensor w, Tensor scale): out [.., N] = x [.., K] @ W^T with w uint8
 * [N, K / 2] (int4) or int8 [N, K] (int8), scale (and zero) float32 [N, K / 32]. */
static void product_op(uint64_t *stack, int int4) {
    struct spc_tensor out, x, w, scale, zero;
    int args = int4 ? 5 : 4;
    if (!spc_torch_tensor((void *)(uintptr_t)stack[0], SPC_FLOAT32, &out)) goto release;
    int ok = spc_torch_tensor((void *)(uintptr_t)stack[1], SPC_FLOAT32, &x) &&
             spc_torch_tensor((void *)(uintptr_t)stack[2], int4 ? SPC_UINT8 : SPC_INT8, &w) &&
             spc_torch_tensor((void *)(uintptr_t)stack[3], SPC_FLOAT32, &scale) &&
             (!int4 || spc_torch_tensor((void *)(uintptr_t)stack[4], SPC_FLOAT32, &zero)) &&
             fits(&out, &x, &w, w.dim == 2 ? (int4 ? 2 : 1) * w.sizes[1] : -1, &scale, int4 ? &zero : NULL);
    if (ok && int4)
        ok = spc_q4_mm(w.data, scale.data, zero.data, w.sizes[0], x.sizes[x.dim - 1], x.data, rows_of(&x),
                       out.data) == SPC_OK;
    else if (ok)
        ok = spc_q8_mm(w.data, scale.data, w.sizes[0], x.sizes[x.dim - 1], x.data, rows_of(&x), out.data) == SPC_OK;
    if (!ok) poison(&out);
release:
    for (int i = 0; i < args; i++) spc_torch_release((void *)(uintptr_t)stack[i]);
}

static void op_q4_mm(uint64_t *stack, uint64_t num_args, uint64_t num_outputs) {
    (void)num_args; (void)num_outputs;
    product_op(stack, 1);
}

static void op_q8_mm(uint64_t *stack, uint64_t num_args, uint64_t num_outputs) {
    (void)num_args; (void)num_outputs;
    product_op(stack, 0);
}

/* q4_dequantize_(Tensor(a!) out, Tensor w, Tensor scale, Tensor zero): out float32 [N, K]. */
static void op_q4_dequantize(uint64_t *stack, uint64_t num_args, uint64_t num_outputs) {
    (void)num_args; (void)num_outputs;
    struct spc_tensor out, w, scale, zero;
    if (!spc_torch_tensor((void *)(uintptr_t)stack[0], SPC_FLOAT32, &out)) goto release;
    int ok = spc_torch_tensor((void *)(uintptr_t)stack[1], SPC_UINT8, &w) &&
             spc_torch_tensor((void *)(uintptr_t)stack[2], SPC_FLOAT32, &scale) &&
             spc_torch_tensor((void *)(uintptr_t)stack[3], SPC_FLOAT32, &zero) &&
             out.dim == 2 && w.dim == 2 && scale.dim == 2 && zero.dim == 2 && out.sizes[1] % GROUP == 0 &&
             w.sizes[0] == out.sizes[0] && 2 * w.sizes[1] == out.sizes[1] && scale.sizes[0] == out.sizes[0] &&
             scale.sizes[1] == out.sizes[1] / GROUP && zero.sizes[0] == scale.sizes[0] && zero.sizes[1] == scale.sizes[1] &&
             spc_contiguous(&out) && spc_contiguous(&w) && spc_contiguous(&scale) && spc_contiguous(&zero) &&
             spc_q4_dequantize(w.data, scale.data, zero.data, out.sizes[0], out.sizes[1], out.data) == SPC_OK;
    if (!ok) poison(&out);
release:
    for (int i = 0; i < 4; i++) spc_torch_release((void *)(uintptr_t)stack[i]);
}

int spc_qmm_init(const char *torch_cpu_path) {
    spc_clear_error();
    static int registered;
    int status = spc_torch_load(torch_cpu_path);
    if (status == SPC_OK && !registered) {
        status = spc_torch_register("q4_mm_", "q4_mm_(Tensor(a!) out, Tensor x, Tensor w, Tensor scale, Tensor zero) -> ()",
                                    op_q4_mm);
        if (status == SPC_OK)
            status = spc_torch_register("q8_mm_", "q8_mm_(Tensor(a!) out, Tensor x, Tensor w, Tensor scale) -> ()",
                                        op_q8_mm);
        if (status == SPC_OK)
            status = spc_torch_register("q4_dequantize_", "q4_dequantize_(Tensor(a!) out, Tensor w, Tensor scale, "
                                        "Tensor zero) -> ()", op_q4_dequantize);
        registered = status == SPC_OK;
    }
    return status;
}
