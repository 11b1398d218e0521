/* Built instead of gather.cu when no CUDA toolkit is used, so the library
 * exports the same symbols either way and the binding never branches on how
 * it was built: callers just get SPC_ERR_CUDA_UNAVAILABLE. */
#include "specontext.h"
#include "internal.h"

#define BUILT_WITHOUT_CUDA "library built without CUDA (no toolkit at build time, or SPECONTEXT_CUDA=OFF)"

int spc_cuda_available(void) {
    spc_fail(SPC_ERR_CUDA_UNAVAILABLE, "spc_cuda_available: " BUILT_WITHOUT_CUDA);
    return 0;
}

int spc_cuda_compiled(void) { return 0; }

const char *spc_cuda_archs(void) { return ""; }

int spc_cuda_gather_rows(const void *src, int64_t src_row_stride_bytes, int64_t num_src_rows,
                         const int64_t *indices, int64_t num_indices, void *dst,
                         int64_t dst_row_stride_bytes, int64_t row_bytes, void *stream) {
    (void)src, (void)src_row_stride_bytes, (void)num_src_rows, (void)indices, (void)num_indices;
    (void)dst, (void)dst_row_stride_bytes, (void)row_bytes, (void)stream;
    return spc_fail(SPC_ERR_CUDA_UNAVAILABLE, "spc_cuda_gather_rows: " BUILT_WITHOUT_CUDA);
}

int spc_cuda_scatter_rows(const void *src, int64_t src_row_stride_bytes, const int64_t *indices,
                          int64_t num_indices, void *dst, int64_t dst_row_stride_bytes,
                          int64_t num_dst_rows, int64_t row_bytes, void *stream) {
    (void)src, (void)src_row_stride_bytes, (void)indices, (void)num_indices, (void)dst;
    (void)dst_row_stride_bytes, (void)num_dst_rows, (void)row_bytes, (void)stream;
    return spc_fail(SPC_ERR_CUDA_UNAVAILABLE, "spc_cuda_scatter_rows: " BUILT_WITHOUT_CUDA);
}

int spc_cuda_copy_rows_planes(const void *src, int64_t src_plane_stride_bytes,
                              int64_t src_row_stride_bytes, int64_t num_src_rows,
                              const int64_t *src_indices, void *dst,
                              int64_t dst_plane_stride_bytes, int64_t dst_row_stride_bytes,
                              int64_t num_dst_rows, const int64_t *dst_indices,
                              int64_t num_indices, int64_t num_planes, int64_t row_bytes,
                              void *stream) {
    (void)src, (void)src_plane_stride_bytes, (void)src_row_stride_bytes, (void)num_src_rows;
    (void)src_indices, (void)dst, (void)dst_plane_stride_bytes, (void)dst_row_stride_bytes;
    (void)num_dst_rows, (void)dst_indices, (void)num_indices, (void)num_planes, (void)row_bytes;
    (void)stream;
    return spc_fail(SPC_ERR_CUDA_UNAVAILABLE, "spc_cuda_copy_rows_planes: " BUILT_WITHOUT_CUDA);
}

int spc_cuda_memcpy_rows_planes(const void *src, int64_t src_plane_stride_bytes,
                                int64_t src_row_stride_bytes, int64_t num_src_rows,
                                const int64_t *src_indices, void *dst,
                                int64_t dst_plane_stride_bytes, int64_t dst_row_stride_bytes,
                                int64_t num_dst_rows, const int64_t *dst_indices,
                                int64_t num_indices, int64_t num_planes, int64_t row_bytes,
                                void *stream) {
    (void)src, (void)src_plane_stride_bytes, (void)src_row_stride_bytes, (void)num_src_rows;
    (void)src_indices, (void)dst, (void)dst_plane_stride_bytes, (void)dst_row_stride_bytes;
    (void)num_dst_rows, (void)dst_indices, (void)num_indices, (void)num_planes, (void)row_bytes;
    (void)stream;
    return spc_fail(SPC_ERR_CUDA_UNAVAILABLE, "spc_cuda_memcpy_rows_planes: " BUILT_WITHOUT_CUDA);
}
