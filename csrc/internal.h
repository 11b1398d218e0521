/* Helpers shared by the host and CUDA translation units; not part of the API. */
#ifndef SPECONTEXT_INTERNAL_H
#define SPECONTEXT_INTERNAL_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Records the detail spc_last_error() returns on this thread; returns status
 * so callers can write `return spc_fail(SPC_ERR_..., "...", ...)`. */
int spc_fail(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Empties the detail; every public entry point calls it first, so a stale
 * message never outlives the call that produced it. */
void spc_clear_error(void);

/* Argument checks shared by the gather/scatter entry points, host and CUDA
 * alike, so both reject exactly the same inputs. `fn` names the caller. */
int spc_check_copy_args(const char *fn, const void *src, int64_t src_row_stride_bytes,
                        const int64_t *indices, int64_t num_indices, const void *dst,
                        int64_t dst_row_stride_bytes, int64_t num_rows, int64_t row_bytes);

/* The same for the *_rows_planes entry points, plus the plane checks: sizes,
 * strides, NULLs, planes that overlap, and a plane-row count that overflows. */
int spc_check_planes_args(const char *fn, const void *src, int64_t src_plane_stride_bytes,
                          int64_t src_row_stride_bytes, int64_t num_src_rows,
                          const int64_t *src_indices, const void *dst,
                          int64_t dst_plane_stride_bytes, int64_t dst_row_stride_bytes,
                          int64_t num_dst_rows, const int64_t *dst_indices, int64_t num_indices,
                          int64_t num_planes, int64_t row_bytes);

/* SPC_ERR_INDEX naming `name`[i] for the first index outside [0, num_rows),
 * else SPC_OK. Reads host memory; every host copy runs it before writing. */
int spc_check_indices(const char *fn, const char *name, const int64_t *indices,
                      int64_t num_indices, int64_t num_rows);

/* ---- torch operators from C (torch_abi.c) ---- */

/* fn = the function `name` in the library `handle` (NULL if absent), in the form POSIX gives
 * for dlsym's function pointers (ISO C has no object-to-function pointer conversion). */
#define SPC_DLSYM(fn, handle, name) (*(void **)(&(fn)) = dlsym((handle), (name)))
enum { SPC_MAX_DIM = 8 };
enum { SPC_FLOAT32, SPC_INT64, SPC_UINT8, SPC_BOOL, SPC_INT8, SPC_DTYPES }; /* the dtypes operators check for */

/* A tensor argument as an operator receives it. */
struct spc_tensor {
    void *data;
    int64_t dim, numel;
    int64_t sizes[SPC_MAX_DIM], strides[SPC_MAX_DIM]; /* strides in elements */
};

/* Resolves torch's stable C ABI and OpenMP in the already loaded libtorch_cpu (once). */
int spc_torch_load(const char *torch_cpu_path);

/* Defines specontext::<schema> and registers `kernel` (a boxed kernel: the stack holds each
 * argument, tensors as owned handles the kernel releases) for CPU tensors. */
int spc_torch_register(const char *name, const char *schema, void (*kernel)(uint64_t *, uint64_t, uint64_t));

/* Fills `out` from a tensor handle; 0 if torch refused, the tensor has too many dims or its
 * dtype is not `dtype` (an SPC_FLOAT32 ... value). */
int spc_torch_tensor(void *handle, int dtype, struct spc_tensor *out);

/* Whether the tensor's elements are numel consecutive elements in row-major order. */
int spc_contiguous(const struct spc_tensor *t);

/* Releases a tensor handle an operator received. */
void spc_torch_release(void *handle);

/* Runs fn(data) on each of torch's OpenMP threads (once, on this thread, when work_items <= 1 or
 * no OpenMP was found); inside, spc_thread_index() / spc_thread_count() split the work. */
void spc_parallel(void (*fn)(void *), void *data, int64_t work_items);
int spc_thread_index(void);
int spc_thread_count(void);

/* The sum of an AVX2 register's eight floats (attention.c, qmatmul.c). */
#if (defined(__x86_64__) || defined(__i386__)) && !defined(__CUDACC__)
#include <immintrin.h>
__attribute__((target("avx2,fma"))) static inline float spc_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
#endif

#ifdef __cplusplus
}
#endif

#endif /* SPECONTEXT_INTERNAL_H */
