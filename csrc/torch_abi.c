/* torch operators from C: torch's stable C ABI (aoti_torch_*, torch/csrc/inductor/aoti_torch/c/shim.h)
 * and its OpenMP runtime, both found at run time in the libtorch_cpu this process already loaded.
 *
 * Operators registered here are dispatched like aten's (eager calls, torch.export, and graphs
 * compiled ahead of time call them by name), and their work runs on torch's own OpenMP threads
 * through GOMP_parallel, so no second thread pool competes with torch's for the cores.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>

#include "internal.h"
#include "specontext.h"

static int32_t (*lib_init_def)(const char *, const char *, uint32_t, void **);
static int32_t (*lib_init_impl)(const char *, const char *, const char *, uint32_t, void **);
static int32_t (*lib_def)(void *, const char *);
static int32_t (*lib_impl)(void *, const char *, void (*)(uint64_t *, uint64_t, uint64_t));
static int32_t (*get_data)(void *, void **);
static int32_t (*get_sizes)(void *, int64_t **);
static int32_t (*get_strides)(void *, int64_t **);
static int32_t (*get_dim)(void *, int64_t *);
static int32_t (*get_dtype)(void *, int32_t *);
static int32_t (*dtype_code[SPC_DTYPES])(void);
static const char *const dtype_names[SPC_DTYPES] = {"aoti_torch_dtype_float32", "aoti_torch_dtype_int64",
                                                   "aoti_torch_dtype_uint8", "aoti_torch_dtype_bool",
                                                   "aoti_torch_dtype_int8"};
static int32_t (*free_tensor)(void *);
static void (*gomp_parallel)(void (*)(void *), void *, unsigned, unsigned);
static int (*omp_thread)(void);
static int (*omp_threads)(void);
static void *def_lib, *impl_lib; /* kept for the process's life: the operators stay registered */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int loaded;

int spc_torch_load(const char *torch_cpu_path) {
    pthread_mutex_lock(&lock);
    int status = SPC_OK;
    if (loaded) goto done;
    void *torch = dlopen(torch_cpu_path, RTLD_NOW | RTLD_NOLOAD);
    if (!torch) {
        status = spc_fail(SPC_ERR_INVALID_ARGUMENT, "torch is not loaded from %s", torch_cpu_path);
        goto done;
    }
    SPC_DLSYM(lib_init_def, torch, "aoti_torch_library_init_def");
    SPC_DLSYM(lib_init_impl, torch, "aoti_torch_library_init_impl");
    SPC_DLSYM(lib_def, torch, "aoti_torch_library_def");
    SPC_DLSYM(lib_impl, torch, "aoti_torch_library_impl");
    SPC_DLSYM(get_data, torch, "aoti_torch_get_data_ptr");
    SPC_DLSYM(get_sizes, torch, "aoti_torch_get_sizes");
    SPC_DLSYM(get_strides, torch, "aoti_torch_get_strides");
    SPC_DLSYM(get_dim, torch, "aoti_torch_get_dim");
    SPC_DLSYM(free_tensor, torch, "aoti_torch_delete_tensor_object");
    SPC_DLSYM(get_dtype, torch, "aoti_torch_get_dtype");
    int dtypes_found = 1;
    for (int i = 0; i < SPC_DTYPES; i++) dtypes_found &= SPC_DLSYM(dtype_code[i], torch, dtype_names[i]) != NULL;
    if (!lib_init_def || !lib_init_impl || !lib_def || !lib_impl || !get_data || !get_sizes || !get_strides ||
        !get_dim || !free_tensor || !get_dtype || !dtypes_found) {
        status = spc_fail(SPC_ERR_INVALID_ARGUMENT, "this torch lacks the stable C ABI (aoti_torch_library_*)");
        goto done;
    }
    if (lib_init_def("specontext", __FILE__, __LINE__, &def_lib) ||
        lib_init_impl("specontext", "CPU", __FILE__, __LINE__, &impl_lib)) {
        status = spc_fail(SPC_ERR_INVALID_ARGUMENT, "torch refused the specontext operator library");
        goto done;
    }
    /* torch's libgomp, found through libtorch_cpu's dependencies; without it work runs on one thread */
    SPC_DLSYM(gomp_parallel, torch, "GOMP_parallel");
    SPC_DLSYM(omp_thread, torch, "omp_get_thread_num");
    SPC_DLSYM(omp_threads, torch, "omp_get_num_threads");
    if (!omp_thread || !omp_threads) gomp_parallel = NULL;
    loaded = 1;
done:
    pthread_mutex_unlock(&lock);
    return status;
}

int spc_torch_register(const char *name, const char *schema, void (*kernel)(uint64_t *, uint64_t, uint64_t)) {
    if (!loaded) return spc_fail(SPC_ERR_INVALID_ARGUMENT, "torch's C ABI is not loaded");
    if (lib_def(def_lib, schema) || lib_impl(impl_lib, name, kernel))
        return spc_fail(SPC_ERR_INVALID_ARGUMENT, "torch refused the operator specontext::%s", name);
    return SPC_OK;
}

int spc_torch_tensor(void *handle, int dtype, struct spc_tensor *out) {
    int64_t *sizes, *strides;
    int32_t code;
    if (get_dim(handle, &out->dim) || get_sizes(handle, &sizes) || get_strides(handle, &strides) ||
        get_data(handle, &out->data) || get_dtype(handle, &code) || out->dim > SPC_MAX_DIM || dtype < 0 ||
        dtype >= SPC_DTYPES || code != dtype_code[dtype]())
        return 0;
    out->numel = 1;
    for (int64_t i = 0; i < out->dim; i++) {
        out->sizes[i] = sizes[i];
        out->strides[i] = strides[i];
        out->numel *= sizes[i];
    }
    return 1;
}

void spc_torch_release(void *handle) { free_tensor(handle); }

int spc_contiguous(const struct spc_tensor *t) {
    int64_t expected = 1;
    for (int64_t i = t->dim - 1; i >= 0; i--) {
        if (t->sizes[i] != 1 && t->strides[i] != expected) return 0;
        expected *= t->sizes[i];
    }
    return 1;
}

void spc_parallel(void (*fn)(void *), void *data, int64_t work_items) {
    if (gomp_parallel && work_items > 1) gomp_parallel(fn, data, 0, 0); /* 0: torch's thread count */
    else fn(data);
}

int spc_thread_index(void) { return gomp_parallel ? omp_thread() : 0; }

int spc_thread_count(void) { return gomp_parallel ? omp_threads() : 1; }

int spc_torch_threaded(void) { return loaded && gomp_parallel != NULL; }
