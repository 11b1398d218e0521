/* Status strings, the per-thread error detail, and shared argument and index checks. */
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

/* Planes p != q of a buffer share no byte if the planes are stacked (one
 * plane's span, (num_rows - 1) * row_stride + row_bytes, fits in the plane
 * step) or interleaved (every plane's copy of a row, (num_planes - 1) * step +
 * row_bytes, fits in one row stride). Other layouts may also be disjoint, but
 * telling needs number theory, and no KV layout uses them. Written with
 * divisions so that no product can overflow. */
static int planes_disjoint(int64_t plane_stride_bytes, int64_t row_stride_bytes,
                           int64_t num_rows, int64_t num_planes, int64_t row_bytes) {
    if (num_planes <= 1 || num_rows == 0 || row_bytes == 0) return 1;
    if (plane_stride_bytes == INT64_MIN) return 0;
    const int64_t step = plane_stride_bytes < 0 ? -plane_stride_bytes : plane_stride_bytes;
    if (step < row_bytes) return 0;
    const int is_stacked = num_rows - 1 <= (step - row_bytes) / row_stride_bytes;
    const int is_interleaved = num_planes - 1 <= (row_stride_bytes - row_bytes) / step;
    return is_stacked || is_interleaved;
}

int spc_check_planes_args(const char *fn, const void *src, int64_t src_plane_stride_bytes,
                          int64_t src_row_stride_bytes, int64_t num_src_rows,
                          const int64_t *src_indices, const void *dst,
                          int64_t dst_plane_stride_bytes, int64_t dst_row_stride_bytes,
                          int64_t num_dst_rows, const int64_t *dst_indices, int64_t num_indices,
                          int64_t num_planes, int64_t row_bytes) {
    if (num_indices < 0 || num_planes < 0 || num_src_rows < 0 || num_dst_rows < 0 || row_bytes < 0)
        return spc_fail(SPC_ERR_INVALID_ARGUMENT,
                        "%s: sizes must be >= 0 (num_indices=%lld, num_planes=%lld, "
                        "num_src_rows=%lld, num_dst_rows=%lld, row_bytes=%lld)",
                        fn, (long long)num_indices, (long long)num_planes,
                        (long long)num_src_rows, (long long)num_dst_rows, (long long)row_bytes);
    if (src_row_stride_bytes < row_bytes || dst_row_stride_bytes < row_bytes)
        return spc_fail(SPC_ERR_INVALID_ARGUMENT,
                        "%s: row strides must be >= row_bytes=%lld (src %lld, dst %lld)", fn,
                        (long long)row_bytes, (long long)src_row_stride_bytes,
                        (long long)dst_row_stride_bytes);
    /* The workers and the kernel index the flat (plane, index) range. */
    if (num_planes > 0 && num_indices > INT64_MAX / num_planes)
        return spc_fail(SPC_ERR_INVALID_ARGUMENT,
                        "%s: num_planes=%lld * num_indices=%lld overflows int64", fn,
                        (long long)num_planes, (long long)num_indices);
    /* Overlapping dst planes would make the result depend on copy order, i.e.
     * on threading. src is held to the same rule: overlapping src planes (a
     * stride-0, expand()ed view) are almost surely a caller's layout bug. */
    const int is_src_ok = planes_disjoint(src_plane_stride_bytes, src_row_stride_bytes,
                                          num_src_rows, num_planes, row_bytes);
    const int is_dst_ok = planes_disjoint(dst_plane_stride_bytes, dst_row_stride_bytes,
                                          num_dst_rows, num_planes, row_bytes);
    if (!is_src_ok || !is_dst_ok)
        return spc_fail(SPC_ERR_INVALID_ARGUMENT,
                        "%s: %s planes overlap (plane stride %lld, row stride %lld, %lld rows "
                        "of %lld bytes, %lld planes)",
                        fn, is_src_ok ? "dst" : "src",
                        (long long)(is_src_ok ? dst_plane_stride_bytes : src_plane_stride_bytes),
                        (long long)(is_src_ok ? dst_row_stride_bytes : src_row_stride_bytes),
                        (long long)(is_src_ok ? num_dst_rows : num_src_rows), (long long)row_bytes,
                        (long long)num_planes);
    if (num_indices > 0 && (src_indices == NULL || dst_indices == NULL))
        return spc_fail(SPC_ERR_INVALID_ARGUMENT, "%s: NULL %s with num_indices=%lld", fn,
                        src_indices == NULL ? "src_indices" : "dst_indices",
                        (long long)num_indices);
    if (num_indices > 0 && num_planes > 0 && row_bytes > 0 && (src == NULL || dst == NULL))
        return spc_fail(SPC_ERR_INVALID_ARGUMENT, "%s: NULL %s with num_indices=%lld", fn,
                        src == NULL ? "src" : "dst", (long long)num_indices);
    return SPC_OK;
}

int spc_check_indices(const char *fn, const char *name, const int64_t *indices,
                      int64_t num_indices, int64_t num_rows) {
    for (int64_t i = 0; i < num_indices; ++i)
        if (indices[i] < 0 || indices[i] >= num_rows)
            return spc_fail(SPC_ERR_INDEX, "%s: %s[%lld]=%lld outside [0, %lld)", fn, name,
                            (long long)i, (long long)indices[i], (long long)num_rows);
    return SPC_OK;
}
