/* Matrix products on GGUF blocks as they are, by ggml's CPU kernels (the llamacpp extra).
 *
 * ggml (llama.cpp's tensor library, shipped inside llama-cpp-python) has dot products for every
 * GGUF block type against activations quantized to a matching 8-bit type (Q4_1 rows against
 * Q8_1, Q8_0 against Q8_0, K-quants against Q8_K). Its public CPU API hands them out as function
 * pointers (ggml_get_type_traits_cpu), so this file loads the library at run time with dlopen
 * (nothing links against it), quantizes each activation row once, and runs one dot product per
 * (weight row, activation row), split over torch's own OpenMP threads (torch_abi.c).
 *
 * The products are also registered as torch operators (specontext::ggml_mm_,
 * specontext::ggml_rows_, torch_abi.c), so a graph compiled ahead of time calls them directly
 * (model/aot_step.py).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "specontext.h"

typedef void (*from_float_fn)(const float *x, void *y, int64_t k);
typedef void (*to_float_fn)(const void *x, float *y, int64_t k);
typedef void (*vec_dot_fn)(int n, float *s, size_t bs, const void *x, size_t bx, const void *y, size_t by, int nrc);

/* ggml-cpu.h and ggml.h, as published (checked against known values in spc_ggml_init). */
struct ggml_cpu_traits { from_float_fn from_float; vec_dot_fn vec_dot; int vec_dot_type; int64_t nrows; };
struct ggml_traits {
    const char *type_name; int64_t blck_size; int64_t blck_size_interleave; size_t type_size;
    _Bool is_quantized; to_float_fn to_float; from_float_fn from_float_ref;
};

enum { GGML_Q8_0 = 8, CHUNK_ROWS = 16 };

/* The weight types taken: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, BF16. Every ggml
 * build has them; ggml's trait tables are not bounds-checked (a number past its type count reads
 * outside them or asserts), so no other number ever reaches ggml. */
static const int weight_types[] = {0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30};

static const struct ggml_cpu_traits *(*cpu_traits)(int type);
static const struct ggml_traits *(*base_traits)(int type);
static pthread_mutex_t init_lock = PTHREAD_MUTEX_INITIALIZER;
static int loaded;

static size_t row_bytes(int type, int64_t ne) {
    const struct ggml_traits *t = base_traits(type);
    return (size_t)(ne / t->blck_size) * t->type_size;
}

static int type_usable(int type, int64_t k) {
    int known = 0;
    for (size_t i = 0; i < sizeof weight_types / sizeof weight_types[0]; i++) known |= weight_types[i] == type;
    if (!known) return 0;
    const struct ggml_cpu_traits *c = cpu_traits(type);
    const struct ggml_traits *t = base_traits(type);
    const struct ggml_traits *a = c && c->vec_dot ? base_traits(c->vec_dot_type) : NULL;
    return a && t->blck_size > 0 && a->blck_size > 0 && k > 0 && k % t->blck_size == 0 && k % a->blck_size == 0 &&
           k <= INT32_MAX && cpu_traits(c->vec_dot_type)->from_float != NULL;
}

int64_t spc_ggml_row_bytes(int type, int64_t ne) {
    if (!loaded || !type_usable(type, ne)) return 0;
    return (int64_t)row_bytes(type, ne);
}

/* ---- the product ---------------------------------------------------------------------------- */

struct mm_job {
    const uint8_t *w; size_t w_row; int type;
    const float *x; uint8_t *xq; size_t xq_row;
    float *y; int64_t M, N, K;
    vec_dot_fn dot; from_float_fn quantize;
    int phase; /* 0: quantize activation rows, 1: dot products */
};

static void mm_part(void *arg) {
    struct mm_job *j = arg;
    int nth = spc_thread_count(), ith = spc_thread_index();
    if (j->phase == 0) {
        for (int64_t m = ith; m < j->M; m += nth) j->quantize(j->x + m * j->K, j->xq + m * j->xq_row, j->K);
        return;
    }
    int64_t chunks = (j->N + CHUNK_ROWS - 1) / CHUNK_ROWS;
    int64_t c0 = chunks * ith / nth, c1 = chunks * (ith + 1) / nth;
    for (int64_t n0 = c0 * CHUNK_ROWS; n0 < c1 * CHUNK_ROWS && n0 < j->N; n0 += CHUNK_ROWS) {
        int64_t n1 = n0 + CHUNK_ROWS < j->N ? n0 + CHUNK_ROWS : j->N;
        for (int64_t m = 0; m < j->M; m++) /* a chunk of weight rows stays in cache across the tokens */
            for (int64_t n = n0; n < n1; n++)
                j->dot((int)j->K, j->y + m * j->N + n, 0, j->w + n * j->w_row, 0, j->xq + m * j->xq_row, 0, 1);
    }
}

int spc_ggml_mm(const void *w, int type, int64_t n, int64_t k, const float *x, int64_t m, float *y) {
    spc_clear_error();
    if (!loaded) return spc_fail(SPC_ERR_INVALID_ARGUMENT, "spc_ggml_mm: ggml is not loaded (spc_ggml_init)");
    if (!w || !x || !y || n <= 0 || m <= 0)
        return spc_fail(SPC_ERR_INVALID_ARGUMENT, "spc_ggml_mm: NULL buffer or empty shape (n %lld, m %lld)",
                        (long long)n, (long long)m);
    if (!type_usable(type, k))
        return spc_fail(SPC_ERR_INVALID_ARGUMENT, "spc_ggml_mm: ggml type %d has no CPU product for rows of %lld",
                        type, (long long)k);
    const struct ggml_cpu_traits *c = cpu_traits(type);
    struct mm_job j = {.w = w, .w_row = row_bytes(type, k), .type = type, .x = x, .y = y, .M = m, .N = n, .K = k,
                       .dot = c->vec_dot, .quantize = cpu_traits(c->vec_dot_type)->from_float};
    j.xq_row = row_bytes(c->vec_dot_type, k);
    uint8_t stack_buf[16384];
    j.xq = (size_t)m * j.xq_row <= sizeof stack_buf ? stack_buf : malloc((size_t)m * j.xq_row);
    if (!j.xq) return spc_fail(SPC_ERR_INVALID_ARGUMENT, "spc_ggml_mm: out of memory");
    j.phase = 0;
    spc_parallel(mm_part, &j, m);
    j.phase = 1;
    spc_parallel(mm_part, &j, n);
    if (j.xq != stack_buf) free(j.xq);
    return SPC_OK;
}

int spc_ggml_dequantize_rows(const void *w, int type, int64_t k, const int64_t *indices, int64_t num_indices,
                             int64_t num_rows, float *dst) {
    spc_clear_error();
    if (!loaded) return spc_fail(SPC_ERR_INVALID_ARGUMENT, "spc_ggml_dequantize_rows: ggml is not loaded");
    if (!type_usable(type, k) || !base_traits(type)->to_float)
        return spc_fail(SPC_ERR_INVALID_ARGUMENT, "spc_ggml_dequantize_rows: ggml type %d cannot be read", type);
    int status = spc_check_indices("spc_ggml_dequantize_rows", "indices", indices, num_indices, num_rows);
    if (status != SPC_OK) return status;
    size_t rb = row_bytes(type, k);
    for (int64_t i = 0; i < num_indices; i++)
        base_traits(type)->to_float((const uint8_t *)w + (size_t)indices[i] * rb, dst + i * k, k);
    return SPC_OK;
}

/* ---- torch operators ------------------------------------------------------------------------- */

/* A bad call cannot raise through the C ABI; the Python wrappers check every argument first, and
 * this fills the output with NaN so a call that bypassed them cannot pass unnoticed. */
static void poison(const struct spc_tensor *out) {
    if (spc_contiguous(out))  /* else its elements are not numel floats in a row: leave it */
        for (int64_t i = 0; i < out->numel; i++) ((float *)out->data)[i] = NAN;
}

static int64_t rows_of(const struct spc_tensor *t) {
    return t->dim && t->sizes[t->dim - 1] ? t->numel / t->sizes[t->dim - 1] : -1; /* -1: no rows to match */
}

/* ggml_mm_(Tensor(a!) out, Tensor x, Tensor w, int type): out [.., N] float32 = x [.., K] float32 @ w^T,
 * w uint8 [N, row bytes]; all contiguous. */
static void op_mm(uint64_t *stack, uint64_t num_args, uint64_t num_outputs) {
    (void)num_args; (void)num_outputs;
    struct spc_tensor out, x, w;
    int type = (int)(int64_t)stack[3];
    int got = spc_torch_tensor((void *)(uintptr_t)stack[0], SPC_FLOAT32, &out);
    if (!got) goto release;
    int ok = spc_torch_tensor((void *)(uintptr_t)stack[1], SPC_FLOAT32, &x) &&
             spc_torch_tensor((void *)(uintptr_t)stack[2], SPC_UINT8, &w) &&
             x.dim >= 1 && out.dim >= 1 && w.dim == 2 && rows_of(&x) > 0 && rows_of(&x) == rows_of(&out) &&
             w.sizes[0] == out.sizes[out.dim - 1] && spc_contiguous(&x) && spc_contiguous(&out) && spc_contiguous(&w) &&
             spc_ggml_row_bytes(type, x.sizes[x.dim - 1]) == w.sizes[1] &&
             spc_ggml_mm(w.data, type, w.sizes[0], x.sizes[x.dim - 1], x.data, rows_of(&x), out.data) == SPC_OK;
    if (!ok) poison(&out);
release:
    for (int i = 0; i < 3; i++) spc_torch_release((void *)(uintptr_t)stack[i]);
}

/* ggml_rows_(Tensor(a!) out, Tensor w, Tensor ids, int type): out [n, K] float32 = rows ids (int64 [n]) of w. */
static void op_rows(uint64_t *stack, uint64_t num_args, uint64_t num_outputs) {
    (void)num_args; (void)num_outputs;
    struct spc_tensor out, w, ids;
    int type = (int)(int64_t)stack[3];
    int got = spc_torch_tensor((void *)(uintptr_t)stack[0], SPC_FLOAT32, &out);
    if (!got) goto release;
    int ok = spc_torch_tensor((void *)(uintptr_t)stack[1], SPC_UINT8, &w) &&
             spc_torch_tensor((void *)(uintptr_t)stack[2], SPC_INT64, &ids) &&
             out.dim == 2 && w.dim == 2 && ids.numel == out.sizes[0] && spc_contiguous(&out) && spc_contiguous(&w) &&
             spc_contiguous(&ids) &&
             spc_ggml_row_bytes(type, out.sizes[1]) == w.sizes[1] &&
             spc_ggml_dequantize_rows(w.data, type, out.sizes[1], ids.data, ids.numel, w.sizes[0], out.data) == SPC_OK;
    if (!ok) poison(&out);
release:
    for (int i = 0; i < 3; i++) spc_torch_release((void *)(uintptr_t)stack[i]);
}

int spc_ggml_init(const char *ggml_base_path, const char *ggml_cpu_path, const char *torch_cpu_path) {
    spc_clear_error();
    pthread_mutex_lock(&init_lock);
    int status = SPC_OK;
    if (loaded) goto done;
    void *base = dlopen(ggml_base_path, RTLD_NOW | RTLD_LOCAL);
    void *cpu = base ? dlopen(ggml_cpu_path, RTLD_NOW | RTLD_LOCAL) : NULL;
    if (!cpu) {
        status = spc_fail(SPC_ERR_INVALID_ARGUMENT, "spc_ggml_init: %s", dlerror());
        goto done;
    }
    void (*cpu_init)(void);
    SPC_DLSYM(cpu_init, cpu, "ggml_cpu_init");
    SPC_DLSYM(cpu_traits, cpu, "ggml_get_type_traits_cpu");
    SPC_DLSYM(base_traits, base, "ggml_get_type_traits");
    if (!cpu_init || !cpu_traits || !base_traits) {
        status = spc_fail(SPC_ERR_INVALID_ARGUMENT, "spc_ggml_init: %s lacks ggml's CPU type traits", ggml_cpu_path);
        goto done;
    }
    cpu_init();
    const struct ggml_traits *q8 = base_traits(GGML_Q8_0);
    if (!q8 || !q8->type_name || strcmp(q8->type_name, "q8_0") != 0 || q8->blck_size != 32 || q8->type_size != 34 ||
        !cpu_traits(GGML_Q8_0)->vec_dot || cpu_traits(GGML_Q8_0)->vec_dot_type != GGML_Q8_0) {
        status = spc_fail(SPC_ERR_INVALID_ARGUMENT, "spc_ggml_init: %s's type tables are not laid out as ggml's "
                          "published headers say (another ggml version?)", ggml_cpu_path);
        goto done;
    }
    status = spc_torch_load(torch_cpu_path);
    if (status == SPC_OK)
        status = spc_torch_register("ggml_mm_", "ggml_mm_(Tensor(a!) out, Tensor x, Tensor w, int type) -> ()", op_mm);
    if (status == SPC_OK)
        status = spc_torch_register("ggml_rows_", "ggml_rows_(Tensor(a!) out, Tensor w, Tensor ids, int type) -> ()",
                                    op_rows);
    loaded = status == SPC_OK;
done:
    pthread_mutex_unlock(&init_lock);
    return status;
}

