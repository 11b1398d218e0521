/* Status strings, the per-thread error detail, and shared argument checks. */
#include <stdarg.h>
#include <stdio.h>

#include "specontext.h"
#include "internal.h"

/* Thread-local so concurrent callers (cffi releases the GIL) never read each
 * other's detail; 256 bytes fits any message built below with room to spare. */
static _Thread_local char last_error[256];

int spc_abi_version(void) { return SPC_ABI_VERSION; }

const char *spc_status_string(int status) {
    switch (status) {
    case SPC_OK: return "ok";
    case SPC_ERR_INVALID_ARGUMENT: return "invalid argument";
    case SPC_ERR_INDEX: return "index out of range";
    case SPC_ERR_CUDA_UNAVAILABLE: return "CUDA unavailable";
    case SPC_ERR_CUDA: return "CUDA error";
    default: return "unknown status";
    }
}

const char *spc_last_error(void) { return last_error; }

void spc_clear_error(void) { last_error[0] = '\0'; }

int spc_fail(int status, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, args);
    va_end(args);
    return status;
}

int spc_check_copy_args(const char *fn, const void *src, int64_t src_row_stride_bytes,
                        const int64_t *indices, int64_t num_indices, const void *dst,
                        int64_t dst_row_stride_bytes, int64_t num_rows, int64_t row_bytes) {
    if (num_indices < 0 || num_rows < 0 || row_bytes < 0)
        return spc_fail(SPC_ERR_INVALID_ARGUMENT,
                        "%s: sizes must be >= 0 (num_indices=%lld, num_rows=%lld, row_bytes=%lld)",
                        fn, (long long)num_indices, (long long)num_rows, (long long)row_bytes);
    /* A stride below row_bytes would make rows overlap: a gather's writes or a
     * scatter's reads would then depend on copy order, i.e. on threading. */
    if (src_row_stride_bytes < row_bytes || dst_row_stride_bytes < row_bytes)
        return spc_fail(SPC_ERR_INVALID_ARGUMENT,
                        "%s: row strides must be >= row_bytes=%lld (src %lld, dst %lld)", fn,
                        (long long)row_bytes, (long long)src_row_stride_bytes,
                        (long long)dst_row_stride_bytes);
    /* Empty tensors often have no storage (data pointer NULL), so NULL rows
     * are fine when no byte would be read; indices are still validated. */
    if (num_indices > 0 && indices == NULL)
        return spc_fail(SPC_ERR_INVALID_ARGUMENT, "%s: NULL indices with num_indices=%lld", fn,
                        (long long)num_indices);
    if (num_indices > 0 && row_bytes > 0 && (src == NULL || dst == NULL))
        return spc_fail(SPC_ERR_INVALID_ARGUMENT, "%s: NULL %s with num_indices=%lld", fn,
                        src == NULL ? "src" : "dst", (long long)num_indices);
    return SPC_OK;
}
