/*
 * specontext native library: the one public header.
 *
 * The region between SPC_CDEF_BEGIN and SPC_CDEF_END is read verbatim by
 * specontext/native.py and handed to cffi's parser, so it holds plain C
 * declarations only: no macros, attributes or preprocessor lines.
 *
 * Conventions for every copy function:
 *   - A "row" is row_bytes contiguous bytes; consecutive rows of a buffer are
 *     *_row_stride_bytes apart (stride >= row_bytes, so rows never overlap).
 *   - Indices are int64 row numbers; the index list itself is contiguous.
 *   - indices may be NULL only when num_indices == 0; src and dst only when
 *     num_indices == 0 or row_bytes == 0 (no byte is read or written).
 *   - src and dst must not overlap.
 *   - The return value is an spc_status; on failure spc_last_error() holds a
 *     one-line detail for the calling thread.
 */
#ifndef SPECONTEXT_H
#define SPECONTEXT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The library is built with hidden visibility; only this API is exported. */
#pragma GCC visibility push(default)

/* SPC_CDEF_BEGIN */

/* Bumped on any change to the declarations below; native.py refuses a library
 * whose spc_abi_version() differs from the header it parsed. */
enum { SPC_ABI_VERSION = 2 };

enum spc_status {
    SPC_OK = 0,
    SPC_ERR_INVALID_ARGUMENT = 1, /* NULL pointer, negative size, row_bytes > stride, pageable host memory for a kernel */
    SPC_ERR_INDEX = 2,            /* an index outside [0, num_rows); nothing was copied */
    SPC_ERR_CUDA_UNAVAILABLE = 3, /* built without CUDA, or no driver / no device */
    SPC_ERR_CUDA = 4              /* a CUDA runtime call or kernel launch failed */
};

/* Returns SPC_ABI_VERSION as compiled into the library. */
int spc_abi_version(void);

/* Returns a static name for a status code ("unknown status" if not one). */
const char *spc_status_string(int status /* in */);

/* Returns the detail of the last failing call on this thread ("" if none).
 * Valid until the next library call on the same thread. */
const char *spc_last_error(void);

/* Returns 1 if built with CUDA and at least one device is usable, else 0.
 * Safe without a driver: it never aborts. */
int spc_cuda_available(void);

/* ---- Host copies (multi-threaded, CPU memory) ----------------------------
 * num_threads <= 0 picks a count from the copy size and the CPUs this process
 * may run on; a positive count is used as given (capped at num_indices).
 * Every index is validated before any byte is written. */

/* dst row i = src row indices[i], for i in [0, num_indices). Indices may repeat. */
int spc_gather_rows(
    const void *src,              /* in  [num_src_rows, row_bytes] bytes, row stride src_row_stride_bytes */
    int64_t src_row_stride_bytes, /* in  bytes between consecutive src rows, >= row_bytes */
    int64_t num_src_rows,         /* in  rows in src, >= 0 */
    const int64_t *indices,       /* in  [num_indices] row numbers in [0, num_src_rows) */
    int64_t num_indices,          /* in  >= 0 */
    void *dst,                    /* out [num_indices, row_bytes] bytes, row stride dst_row_stride_bytes */
    int64_t dst_row_stride_bytes, /* in  bytes between consecutive dst rows, >= row_bytes */
    int64_t row_bytes,            /* in  bytes copied per row, >= 0 */
    int num_threads               /* in  worker threads; <= 0 chooses */
);

/* dst row indices[i] = src row i, for i in [0, num_indices). Indices must be
 * unique: with duplicates, which source row lands is unspecified. Rows of dst
 * not named in indices are left untouched. */
int spc_scatter_rows(
    const void *src,              /* in    [num_indices, row_bytes] bytes, row stride src_row_stride_bytes */
    int64_t src_row_stride_bytes, /* in    bytes between consecutive src rows, >= row_bytes */
    const int64_t *indices,       /* in    [num_indices] unique row numbers in [0, num_dst_rows) */
    int64_t num_indices,          /* in    >= 0 */
    void *dst,                    /* inout [num_dst_rows, row_bytes] bytes, row stride dst_row_stride_bytes */
    int64_t dst_row_stride_bytes, /* in    bytes between consecutive dst rows, >= row_bytes */
    int64_t num_dst_rows,         /* in    rows in dst, >= 0 */
    int64_t row_bytes,            /* in    bytes copied per row, >= 0 */
    int num_threads               /* in    worker threads; <= 0 chooses */
);

/* For every plane p in [0, num_planes) and i in [0, num_indices):
 *   dst plane p, row dst_indices[i] = src plane p, row src_indices[i].
 * Plane p of src starts at (char *)src + p * src_plane_stride_bytes, likewise
 * for dst: one call moves the same row diff through many equally laid out
 * buffers (elastic KV loading: every offloaded layer's K and V share it).
 * Every index of both lists is validated before any byte is written.
 * dst_indices must be unique: with repeats, which source row lands is
 * unspecified. Planes of one buffer must not overlap each other. */
int spc_copy_rows_planes(
    const void *src,                /* in    [num_planes][num_src_rows, row_bytes], strides below */
    int64_t src_plane_stride_bytes, /* in    bytes between consecutive src planes */
    int64_t src_row_stride_bytes,   /* in    bytes between consecutive src rows, >= row_bytes */
    int64_t num_src_rows,           /* in    rows per src plane, >= 0 */
    const int64_t *src_indices,     /* in    [num_indices] row numbers in [0, num_src_rows) */
    void *dst,                      /* inout [num_planes][num_dst_rows, row_bytes] */
    int64_t dst_plane_stride_bytes, /* in    bytes between consecutive dst planes */
    int64_t dst_row_stride_bytes,   /* in    bytes between consecutive dst rows, >= row_bytes */
    int64_t num_dst_rows,           /* in    rows per dst plane, >= 0 */
    const int64_t *dst_indices,     /* in    [num_indices] unique row numbers in [0, num_dst_rows) */
    int64_t num_indices,            /* in    >= 0 */
    int64_t num_planes,             /* in    >= 0 */
    int64_t row_bytes,              /* in    bytes copied per row, >= 0 */
    int num_threads                 /* in    worker threads; <= 0 chooses */
);

/* ---- CUDA copies (one kernel launch, asynchronous on `stream`) -----------
 * src, dst and indices may each be device memory of the current device or
 * pinned (page-locked) host memory; pageable host memory is rejected.
 * Indices are NOT validated on the host (that would need a sync): a row whose
 * index is out of range is skipped by the kernel, so memory outside the
 * declared buffers is never touched. `stream` is a cudaStream_t (NULL: the
 * legacy default stream). The caller keeps all buffers alive until the stream
 * reaches this copy. Without CUDA these return SPC_ERR_CUDA_UNAVAILABLE. */

/* dst row i = src row indices[i]; same arguments as spc_gather_rows. */
int spc_cuda_gather_rows(
    const void *src,              /* in  [num_src_rows, row_bytes] bytes, row stride src_row_stride_bytes */
    int64_t src_row_stride_bytes, /* in  >= row_bytes */
    int64_t num_src_rows,         /* in  >= 0 */
    const int64_t *indices,       /* in  [num_indices] row numbers; out-of-range rows are skipped */
    int64_t num_indices,          /* in  >= 0 */
    void *dst,                    /* out [num_indices, row_bytes] bytes, row stride dst_row_stride_bytes */
    int64_t dst_row_stride_bytes, /* in  >= row_bytes */
    int64_t row_bytes,            /* in  >= 0 */
    void *stream                  /* in  cudaStream_t of the current device */
);

/* dst row indices[i] = src row i; same arguments as spc_scatter_rows. */
int spc_cuda_scatter_rows(
    const void *src,              /* in    [num_indices, row_bytes] bytes, row stride src_row_stride_bytes */
    int64_t src_row_stride_bytes, /* in    >= row_bytes */
    const int64_t *indices,       /* in    [num_indices] unique row numbers; out-of-range rows are skipped */
    int64_t num_indices,          /* in    >= 0 */
    void *dst,                    /* inout [num_dst_rows, row_bytes] bytes, row stride dst_row_stride_bytes */
    int64_t dst_row_stride_bytes, /* in    >= row_bytes */
    int64_t num_dst_rows,         /* in    >= 0 */
    int64_t row_bytes,            /* in    >= 0 */
    void *stream                  /* in    cudaStream_t of the current device */
);

/* spc_copy_rows_planes as one kernel launch on `stream`: src/dst/indices are
 * device or pinned host memory (e.g. pinned host KV -> device slots). An
 * entry whose src or dst index is out of range (e.g. -1, "nothing to fetch")
 * is skipped, so a fixed-length list needs no host sync to compact it. */
int spc_cuda_copy_rows_planes(
    const void *src,                /* in    [num_planes][num_src_rows, row_bytes] */
    int64_t src_plane_stride_bytes, /* in */
    int64_t src_row_stride_bytes,   /* in    >= row_bytes */
    int64_t num_src_rows,           /* in    >= 0 */
    const int64_t *src_indices,     /* in    [num_indices]; out-of-range entries are skipped */
    void *dst,                      /* inout [num_planes][num_dst_rows, row_bytes] */
    int64_t dst_plane_stride_bytes, /* in */
    int64_t dst_row_stride_bytes,   /* in    >= row_bytes */
    int64_t num_dst_rows,           /* in    >= 0 */
    const int64_t *dst_indices,     /* in    [num_indices] unique; out-of-range entries are skipped */
    int64_t num_indices,            /* in    >= 0 */
    int64_t num_planes,             /* in    >= 0 */
    int64_t row_bytes,              /* in    >= 0 */
    void *stream                    /* in    cudaStream_t of the current device */
);

/* SPC_CDEF_END */

#pragma GCC visibility pop

#ifdef __cplusplus
}
#endif

#endif /* SPECONTEXT_H */
