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

#ifdef __cplusplus
}
#endif

#endif /* SPECONTEXT_INTERNAL_H */
