/* Matrix products on GGUF blocks as they are, by ggml's CPU kernels (the llamacpp extra).
 *
 * ggml (llama.cpp's tensor library, shipped inside llama-cpp-python) has dot products for every
 * GGUF block type against activations quantized to a matching 8-bit type (Q4_1 rows against
 * Q8_1, Q8_0 against Q8_0, K-quants against Q8_K). Its public CPU API hands them out as function
 * pointers (ggml_get_type_traits_cpu), so this file loads the library at run time with dlopen
 * (nothing links against it), quantizes each activation row once, and runs one dot product per
 * (weight row, activation row), split over torch's own OpenMP threads (GOMP_parallel from the
 * libgomp torch already loaded: no second thread pool competes for the cores).
 *
 * The products are also registered as torch operators (specontext::ggml_mm_,
 * specontext::ggml_rows_) through torch's stable C ABI (aoti_torch_library_*), so a graph
 * compiled ahead of time calls them directly (model/aot_step.py).
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

enum { GGML_Q8_0 = 8, MAX_TYPE = 64, CHUNK_ROWS = 16 };

static const struct ggml_cpu_traits *(*cpu_traits)(int type);
static const struct ggml_traits *(*base_traits)(int type);
static void (*gomp_parallel)(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags);
static int (*omp_thread_num)(void);
static int (*omp_num_threads)(void);
static pthread_mutex_t init_lock = PTHREAD_MUTEX_INITIALIZER;
static int loaded;

/* torch's stable C ABI (torch/csrc/inductor/aoti_torch/c/shim.h) */
typedef void *tensor_handle;
typedef void *library_handle;
static int32_t (*lib_init_def)(const char *, const char *, uint32_t, library_handle *);
static int32_t (*lib_init_impl)(const char *, const char *, const char *, uint32_t, library_handle *);
static int32_t (*lib_def)(library_handle, const char *);
static int32_t (*lib_impl)(library_handle, const char *, void (*)(uint64_t *, uint64_t, uint64_t));
static int32_t (*tensor_data)(tensor_handle, void **);
static int32_t (*tensor_sizes)(tensor_handle, int64_t **);
static int32_t (*tensor_dim)(tensor_handle, int64_t *);
static int32_t (*tensor_free)(tensor_handle);

static size_t row_bytes(int type, int64_t ne) {
    const struct ggml_traits *t = base_traits(type);
    return (size_t)(ne / t->blck_size) * t->type_size;
}

static int type_usable(int type, int64_t k) {
    if (type < 0 || type >= MAX_TYPE) return 0;
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
    int nth = omp_num_threads ? omp_num_threads() : 1, ith = omp_thread_num ? omp_thread_num() : 0;
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

static void run_parallel(struct mm_job *j, int64_t work) {
    if (gomp_parallel && work > 1) gomp_parallel(mm_part, j, 0, 0); /* 0: torch's thread count */
    else mm_part(j);
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
    run_parallel(&j, m);
    j.phase = 1;
    run_parallel(&j, n);
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
static void poison(tensor_handle out) {
    float *p; int64_t dim, *sizes, numel = 1;
    if (tensor_data(out, (void **)&p) || tensor_dim(out, &dim) || tensor_sizes(out, &sizes)) return;
    for (int64_t i = 0; i < dim; i++) numel *= sizes[i];
    for (int64_t i = 0; i < numel; i++) p[i] = NAN;
}

static int shape2(tensor_handle t, int64_t *rows, int64_t *cols) {
    int64_t dim, *sizes;
    if (tensor_dim(t, &dim) || tensor_sizes(t, &sizes) || dim < 1) return 0;
    *cols = sizes[dim - 1];
    *rows = 1;
    for (int64_t i = 0; i + 1 < dim; i++) *rows *= sizes[i];
    return 1;
}

/* ggml_mm_(Tensor(a!) out, Tensor x, Tensor w, int type): out [.., N] float32 = x [.., K] float32 @ w^T,
 * w uint8 [N, row bytes]; all contiguous. */
static void op_mm(uint64_t *stack, uint64_t num_args, uint64_t num_outputs) {
    (void)num_args; (void)num_outputs;
    tensor_handle out = (tensor_handle)(uintptr_t)stack[0], x = (tensor_handle)(uintptr_t)stack[1],
                  w = (tensor_handle)(uintptr_t)stack[2];
    int type = (int)(int64_t)stack[3];
    int64_t m, k, m2, n, wn, wb;
    void *pw, *px, *py;
    int ok = shape2(x, &m, &k) && shape2(out, &m2, &n) && shape2(w, &wn, &wb) && m == m2 && wn == n &&
             !tensor_data(w, &pw) && !tensor_data(x, &px) && !tensor_data(out, &py) &&
             spc_ggml_row_bytes(type, k) == wb && spc_ggml_mm(pw, type, n, k, px, m, py) == SPC_OK;
    if (!ok) poison(out);
    tensor_free(out); tensor_free(x); tensor_free(w);
}

/* ggml_rows_(Tensor(a!) out, Tensor w, Tensor ids, int type): out [n, K] float32 = rows ids (int64 [n]) of w. */
static void op_rows(uint64_t *stack, uint64_t num_args, uint64_t num_outputs) {
    (void)num_args; (void)num_outputs;
    tensor_handle out = (tensor_handle)(uintptr_t)stack[0], w = (tensor_handle)(uintptr_t)stack[1],
                  ids = (tensor_handle)(uintptr_t)stack[2];
    int type = (int)(int64_t)stack[3];
    int64_t n, k, one, n_ids, wn, wb;
    void *pw, *pi, *po;
    int ok = shape2(out, &n, &k) && shape2(ids, &one, &n_ids) && shape2(w, &wn, &wb) && one * n_ids == n &&
             spc_ggml_row_bytes(type, k) == wb && !tensor_data(w, &pw) && !tensor_data(ids, &pi) &&
             !tensor_data(out, &po) && spc_ggml_dequantize_rows(pw, type, k, pi, n, wn, po) == SPC_OK;
    if (!ok) poison(out);
    tensor_free(out); tensor_free(w); tensor_free(ids);
}

static int register_ops(void *torch) {
    lib_init_def = (void *)dlsym(torch, "aoti_torch_library_init_def");
    lib_init_impl = (void *)dlsym(torch, "aoti_torch_library_init_impl");
    lib_def = (void *)dlsym(torch, "aoti_torch_library_def");
    lib_impl = (void *)dlsym(torch, "aoti_torch_library_impl");
    tensor_data = (void *)dlsym(torch, "aoti_torch_get_data_ptr");
    tensor_sizes = (void *)dlsym(torch, "aoti_torch_get_sizes");
    tensor_dim = (void *)dlsym(torch, "aoti_torch_get_dim");
    tensor_free = (void *)dlsym(torch, "aoti_torch_delete_tensor_object");
    if (!lib_init_def || !lib_init_impl || !lib_def || !lib_impl || !tensor_data || !tensor_sizes || !tensor_dim ||
        !tensor_free)
        return spc_fail(SPC_ERR_INVALID_ARGUMENT, "spc_ggml_init: this torch lacks the stable C ABI (aoti_torch_library_*)");
    library_handle def, impl; /* kept for the process's life: the operators stay registered */
    if (lib_init_def("specontext", __FILE__, __LINE__, &def) ||
        lib_def(def, "ggml_mm_(Tensor(a!) out, Tensor x, Tensor w, int type) -> ()") ||
        lib_def(def, "ggml_rows_(Tensor(a!) out, Tensor w, Tensor ids, int type) -> ()") ||
        lib_init_impl("specontext", "CPU", __FILE__, __LINE__, &impl) || lib_impl(impl, "ggml_mm_", op_mm) ||
        lib_impl(impl, "ggml_rows_", op_rows))
        return spc_fail(SPC_ERR_INVALID_ARGUMENT, "spc_ggml_init: torch refused the specontext::ggml_* operators");
    return SPC_OK;
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
    void (*cpu_init)(void) = (void (*)(void))dlsym(cpu, "ggml_cpu_init");
    cpu_traits = (void *)dlsym(cpu, "ggml_get_type_traits_cpu");
    base_traits = (void *)dlsym(base, "ggml_get_type_traits");
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
    void *torch = dlopen(torch_cpu_path, RTLD_NOW | RTLD_NOLOAD);
    if (!torch) {
        status = spc_fail(SPC_ERR_INVALID_ARGUMENT, "spc_ggml_init: torch is not loaded from %s", torch_cpu_path);
        goto done;
    }
    gomp_parallel = (void *)dlsym(torch, "GOMP_parallel"); /* torch's libgomp, found through its dependencies */
    omp_thread_num = (void *)dlsym(torch, "omp_get_thread_num");
    omp_num_threads = (void *)dlsym(torch, "omp_get_num_threads");
    if (!gomp_parallel || !omp_thread_num || !omp_num_threads) gomp_parallel = NULL; /* one thread */
    status = register_ops(torch);
    loaded = status == SPC_OK;
done:
    pthread_mutex_unlock(&init_lock);
    return status;
}

int spc_ggml_threaded(void) { return loaded && gomp_parallel != NULL; }
