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
 *     num_indices == 0, row_bytes == 0 or num_planes == 0 (no byte is read or
 *     written).
 *   - src and dst must not overlap.
 *   - The *_rows_planes functions copy the same rows in each of num_planes
 *     planes (e.g. a layer's K and V); plane p of a buffer starts at
 *     (char *)buffer + p * *_plane_stride_bytes (any sign). The planes of one
 *     buffer must not overlap: they are either stacked (each plane's rows fit
 *     within |plane stride|) or interleaved (every plane's copy of a row fits
 *     within one row stride).
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
enum { SPC_ABI_VERSION = 6 };

enum spc_status {
    SPC_OK = 0,
    SPC_ERR_INVALID_ARGUMENT = 1, /* NULL pointer, negative size, row_bytes > stride, overlapping planes,
                                     pageable host memory for a kernel, device indices for a host loop */
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

/* The CUDA runtime version the kernels were compiled against (CUDART_VERSION,
 * e.g. 13000), or 0 if the library was built without CUDA. Needs no device. */
int spc_cuda_compiled(void);

/* The GPU architectures compiled in, as nvcc's __CUDA_ARCH_LIST__ gives them
 * (e.g. "750,800,900"), or "" if built without CUDA. Needs no device. */
const char *spc_cuda_archs(void);

/* ---- Host copies (multi-threaded, CPU memory) ----------------------------
 * num_threads <= 0 picks a count from the copy size and the CPUs this process
 * may run on; a positive count is used as given (capped at the number of row
 * copies, num_indices or num_planes * num_indices).
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
    const int64_t *indices,       /* in    [num_indices] unique rows in [0, num_dst_rows) */
    int64_t num_indices,          /* in    >= 0 */
    void *dst,                    /* inout [num_dst_rows, row_bytes] bytes, row stride dst_row_stride_bytes */
    int64_t dst_row_stride_bytes, /* in    bytes between consecutive dst rows, >= row_bytes */
    int64_t num_dst_rows,         /* in    rows in dst, >= 0 */
    int64_t row_bytes,            /* in    bytes copied per row, >= 0 */
    int num_threads               /* in    worker threads; <= 0 chooses */
);

/* For every plane p in [0, num_planes) and i in [0, num_indices):
 *   dst plane p, row dst_indices[i] = src plane p, row src_indices[i].
 * Elastic KV loading: one call moves a step's missing rows for a layer's K and
 * V planes. dst_indices must be unique: with duplicates, which source row
 * lands is unspecified. Rows of dst not named in dst_indices are untouched.
 * Work is split over the num_planes * num_indices row copies. When both row
 * strides equal row_bytes, a run of consecutive i whose src and dst rows both
 * ascend by one is copied by a single memcpy (block-granular loading). */
int spc_copy_rows_planes(
    const void *src,                /* in    [num_planes, num_src_rows, row_bytes] bytes; strides below */
    int64_t src_plane_stride_bytes, /* in    bytes between src planes (any sign; unused if num_planes <= 1) */
    int64_t src_row_stride_bytes,   /* in    bytes between consecutive src rows, >= row_bytes */
    int64_t num_src_rows,           /* in    rows per src plane, >= 0 */
    const int64_t *src_indices,     /* in    [num_indices] rows in [0, num_src_rows), repeats allowed */
    void *dst,                      /* inout [num_planes, num_dst_rows, row_bytes] bytes; strides below */
    int64_t dst_plane_stride_bytes, /* in    bytes between dst planes (any sign; unused if num_planes <= 1) */
    int64_t dst_row_stride_bytes,   /* in    bytes between consecutive dst rows, >= row_bytes */
    int64_t num_dst_rows,           /* in    rows per dst plane, >= 0 */
    const int64_t *dst_indices,     /* in    [num_indices] unique rows in [0, num_dst_rows) */
    int64_t num_indices,            /* in    >= 0 */
    int64_t num_planes,             /* in    >= 0 */
    int64_t row_bytes,              /* in    bytes copied per row, >= 0 */
    int num_threads                 /* in    worker threads; <= 0 chooses */
);

/* ---- CUDA copies (asynchronous on `stream`) -------------------------------
 * src, dst and indices may each be device memory of the current device or
 * pinned (page-locked) host memory; pageable host memory is rejected.
 * Except for spc_cuda_memcpy_rows_planes (below), each is one kernel launch,
 * and indices are NOT validated on the host (that would need a sync): a row
 * whose index is out of range is skipped by the kernel, so memory outside the
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

/* spc_copy_rows_planes as one kernel launch over every (plane, index, word);
 * same arguments, with `stream` instead of num_threads. A copy whose src or
 * dst index is out of range is skipped (in every plane). */
int spc_cuda_copy_rows_planes(
    const void *src,                /* in    [num_planes, num_src_rows, row_bytes] bytes; strides below */
    int64_t src_plane_stride_bytes, /* in    any sign; unused if num_planes <= 1 */
    int64_t src_row_stride_bytes,   /* in    >= row_bytes */
    int64_t num_src_rows,           /* in    >= 0 */
    const int64_t *src_indices,     /* in    [num_indices] rows; out-of-range copies are skipped */
    void *dst,                      /* inout [num_planes, num_dst_rows, row_bytes] bytes; strides below */
    int64_t dst_plane_stride_bytes, /* in    any sign; unused if num_planes <= 1 */
    int64_t dst_row_stride_bytes,   /* in    >= row_bytes */
    int64_t num_dst_rows,           /* in    >= 0 */
    const int64_t *dst_indices,     /* in    [num_indices] unique rows; out-of-range copies skipped */
    int64_t num_indices,            /* in    >= 0 */
    int64_t num_planes,             /* in    >= 0 */
    int64_t row_bytes,              /* in    >= 0 */
    void *stream                    /* in    cudaStream_t of the current device */
);

/* spc_copy_rows_planes as copy-engine transfers instead of a kernel, for
 * comparison: one cudaMemcpyAsync per plane and run of consecutive rows
 * (cudaMemcpy2DAsync when the run's rows are strided), issued in a plain
 * loop on `stream` (not CUDA 12.8+'s cudaMemcpyBatchAsync, whose signature
 * changed in CUDA 13, so any CUDA 12 toolkit builds it). Unlike the kernel it reads the indices on the HOST during the
 * call, so src_indices and dst_indices must be host memory (pinned or
 * pageable, not device memory); they are validated first (SPC_ERR_INDEX,
 * nothing enqueued). src and dst follow the rules above (device or pinned).
 * If a cudaMemcpy call fails, the copies enqueued before it still run. */
int spc_cuda_memcpy_rows_planes(
    const void *src,                /* in    [num_planes, num_src_rows, row_bytes] bytes; strides below */
    int64_t src_plane_stride_bytes, /* in    any sign; unused if num_planes <= 1 */
    int64_t src_row_stride_bytes,   /* in    >= row_bytes */
    int64_t num_src_rows,           /* in    >= 0 */
    const int64_t *src_indices,     /* in    [num_indices] HOST memory, rows in [0, num_src_rows) */
    void *dst,                      /* inout [num_planes, num_dst_rows, row_bytes] bytes; strides below */
    int64_t dst_plane_stride_bytes, /* in    any sign; unused if num_planes <= 1 */
    int64_t dst_row_stride_bytes,   /* in    >= row_bytes */
    int64_t num_dst_rows,           /* in    >= 0 */
    const int64_t *dst_indices,     /* in    [num_indices] HOST memory, unique rows in [0, num_dst_rows) */
    int64_t num_indices,            /* in    >= 0 */
    int64_t num_planes,             /* in    >= 0 */
    int64_t row_bytes,              /* in    >= 0 */
    void *stream                    /* in    cudaStream_t of the current device */
);

/* ---- GGUF blocks through ggml's CPU kernels (csrc/ggml.c) ---------------
 * ggml (from llama-cpp-python, the llamacpp extra) is loaded at run time;
 * `type` is a ggml type number (GGUF's tensor type: Q4_0 2, Q4_1 3, Q8_0 8,
 * Q4_K 12, ...). Products run on torch's OpenMP threads. */

/* Loads ggml from its two libraries and registers the torch operators
 * specontext::ggml_mm_ and specontext::ggml_rows_ through torch's stable C
 * ABI, found in torch_cpu_path (libtorch_cpu, already loaded by this
 * process). Once per process: later calls return SPC_OK and change nothing. */
int spc_ggml_init(
    const char *ggml_base_path,   /* in  libggml-base.so */
    const char *ggml_cpu_path,    /* in  libggml-cpu.so */
    const char *torch_cpu_path    /* in  libtorch_cpu.so */
);

/* 1 when torch's C ABI is loaded (spc_ggml_init or spc_attention_init) and
 * its OpenMP threads were found (work is split over them), else 0. */
int spc_torch_threaded(void);

/* Bytes of a row of ne values of `type`; 0 when ggml is not loaded or has no
 * CPU product for such rows (ne must be a whole number of blocks). */
int64_t spc_ggml_row_bytes(int type /* in */, int64_t ne /* in */);

/* y[i, j] = dot(w row j, x row i) for i < m, j < n, as llama.cpp computes it:
 * each x row is quantized to the type's 8-bit partner first. */
int spc_ggml_mm(
    const void *w,                /* in  [n, spc_ggml_row_bytes(type, k)] blocks */
    int type,                     /* in  ggml type of w */
    int64_t n,                    /* in  rows of w, > 0 */
    int64_t k,                    /* in  values per row */
    const float *x,               /* in  [m, k] float32, contiguous */
    int64_t m,                    /* in  > 0 */
    float *y                      /* out [m, n] float32, contiguous */
);

/* dst row i = row indices[i] of w, dequantized to float32. */
int spc_ggml_dequantize_rows(
    const void *w,                /* in  [num_rows, spc_ggml_row_bytes(type, k)] blocks */
    int type,                     /* in  ggml type of w */
    int64_t k,                    /* in  values per row */
    const int64_t *indices,       /* in  [num_indices] rows in [0, num_rows) */
    int64_t num_indices,          /* in  >= 0 */
    int64_t num_rows,             /* in  rows of w */
    float *dst                    /* out [num_indices, k] float32 */
);

/* ---- Decode attention on a CPU (csrc/attention.c) ---------------------------------------- */

/* Registers the torch operator specontext::decode_attention_ through torch's
 * stable C ABI, found in torch_cpu_path (libtorch_cpu, already loaded). */
int spc_attention_init(const char *torch_cpu_path /* in */);

/* One query token's attention over float32 K and V rows, on torch's OpenMP
 * threads: query head h reads KV head h / (num_heads / num_kv_heads), and
 * out[h] = sum_s softmax_s(scale q[h] . k[g, s]) v[g, s] over the positions
 * whose mask byte is nonzero (all when mask is NULL; KV head g reads the
 * bytes from g * mask_head_stride on, 0: one row for all); a head with no such
 * position gets zeros. Strides are in floats; each row's head_dim floats are
 * contiguous. */
int spc_decode_attention(
    const float *q,               /* in  [num_heads, head_dim], head stride q_head_stride */
    int64_t q_head_stride,        /* in  */
    const float *k,               /* in  [num_kv_heads, positions, head_dim] */
    int64_t k_head_stride,        /* in  */
    int64_t k_row_stride,         /* in  */
    const float *v,               /* in  [num_kv_heads, positions, head_dim] */
    int64_t v_head_stride,        /* in  */
    int64_t v_row_stride,         /* in  */
    const uint8_t *mask,          /* in  [positions] or [num_kv_heads, positions], or NULL */
    int64_t mask_head_stride,     /* in  0 (one row) or positions */
    float *out,                   /* out [num_heads, head_dim], contiguous */
    int64_t num_heads,            /* in  a multiple of num_kv_heads, at most 16 per KV head */
    int64_t num_kv_heads,         /* in  > 0 */
    int64_t positions,            /* in  > 0 */
    int64_t head_dim,             /* in  1..256 */
    float scale                   /* in  the scores' factor, usually 1 / sqrt(head_dim) */
);

/* ---- Products with weights kept quantized, on a CPU (csrc/qmatmul.c) -------------------- */

/* Registers the torch operators specontext::q4_mm_, q8_mm_ and q4_dequantize_
 * through torch's stable C ABI, found in torch_cpu_path (libtorch_cpu, already
 * loaded). */
int spc_qmm_init(const char *torch_cpu_path /* in */);

/* y[i, j] = sum_k x[i, k] W[j, k] in float32, W int4 in groups of 32 along k:
 * W[j, k] = (q - 8) scale[j, k / 32] + zero[j, k / 32], q in 0..15; byte 4 a + b
 * (a, b in 0..3) of a group's 16 holds value 8 b + a in its low nibble and
 * value 8 b + a + 4 in its high one.
 * Rows of W are split over torch's OpenMP threads. */
int spc_q4_mm(
    const uint8_t *w,             /* in  [n, k / 2] */
    const float *scale,           /* in  [n, k / 32] */
    const float *zero,            /* in  [n, k / 32] */
    int64_t n,                    /* in  > 0 */
    int64_t k,                    /* in  a positive multiple of 32 */
    const float *x,               /* in  [m, k] contiguous */
    int64_t m,                    /* in  > 0 */
    float *y                      /* out [m, n] contiguous */
);

/* The same with W int8 in groups of 32: W[j, k] = q scale[j, k / 32] (GGUF's Q8_0). */
int spc_q8_mm(
    const int8_t *w,              /* in  [n, k] */
    const float *scale,           /* in  [n, k / 32] */
    int64_t n,                    /* in  > 0 */
    int64_t k,                    /* in  a positive multiple of 32 */
    const float *x,               /* in  [m, k] contiguous */
    int64_t m,                    /* in  > 0 */
    float *y                      /* out [m, n] contiguous */
);

/* out = the int4 W of spc_q4_mm in float32, each value (q - 8) scale + zero
 * rounded as two float32 operations. */
int spc_q4_dequantize(
    const uint8_t *w,             /* in  [n, k / 2] */
    const float *scale,           /* in  [n, k / 32] */
    const float *zero,            /* in  [n, k / 32] */
    int64_t n,                    /* in  > 0 */
    int64_t k,                    /* in  a positive multiple of 32 */
    float *out                    /* out [n, k] */
);

/* 1: the products above run their portable loops even where AVX2 is there
 * (for tests of those loops); 0: the default. */
void spc_qmm_force_plain(int plain /* in */);

/* SPC_CDEF_END */

#pragma GCC visibility pop

#ifdef __cplusplus
}
#endif

#endif /* SPECONTEXT_H */
