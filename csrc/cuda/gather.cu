// CUDA gather/scatter of fixed-size rows by index: one launch per call.
#include <cuda_runtime.h>
#include <stdint.h>

#include "specontext.h"
#include "internal.h"

namespace {

constexpr int kThreadsPerBlock = 256;

// Flat grid-stride loop over (row, word) pairs: consecutive threads copy
// consecutive words of one row, so both sides are coalesced, and rows of any
// length (one word or thousands) keep every thread busy in a single launch.
// Word is the widest type that divides every pointer, stride and row size.
template <typename Word, bool kScatter>
__global__ void copy_rows_kernel(const char *__restrict__ src, int64_t src_row_stride_bytes,
                                 const int64_t *__restrict__ indices, int64_t num_indices,
                                 char *__restrict__ dst, int64_t dst_row_stride_bytes,
                                 int64_t num_rows, int64_t words_per_row) {
    const int64_t num_words = num_indices * words_per_row;
    const int64_t step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < num_words; k += step) {
        const int64_t i = k / words_per_row;
        const int64_t word = k - i * words_per_row;
        const int64_t row = indices[i];
        // Checking on the host would cost a sync per call; skipping keeps a bad
        // index from touching memory outside the buffers the caller declared.
        if (row < 0 || row >= num_rows) continue;
        const int64_t src_row = kScatter ? i : row;
        const int64_t dst_row = kScatter ? row : i;
        reinterpret_cast<Word *>(dst + dst_row * dst_row_stride_bytes)[word] =
            reinterpret_cast<const Word *>(src + src_row * src_row_stride_bytes)[word];
    }
}

// The plane copy: the same (src row -> dst row) list through num_planes buffers, one launch.
// Flat grid-stride loop over (plane, entry, word); an entry with either index out of range
// ("nothing to fetch" is -1) is skipped.
template <typename Word>
__global__ void copy_planes_kernel(const char *__restrict__ src, int64_t src_plane_stride_bytes,
                                   int64_t src_row_stride_bytes, int64_t num_src_rows,
                                   const int64_t *__restrict__ src_indices, char *__restrict__ dst,
                                   int64_t dst_plane_stride_bytes, int64_t dst_row_stride_bytes,
                                   int64_t num_dst_rows, const int64_t *__restrict__ dst_indices,
                                   int64_t num_indices, int64_t num_planes, int64_t words_per_row) {
    const int64_t per_plane = num_indices * words_per_row;
    const int64_t num_words = num_planes * per_plane;
    const int64_t step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < num_words; k += step) {
        const int64_t p = k / per_plane;
        const int64_t rest = k - p * per_plane;
        const int64_t i = rest / words_per_row;
        const int64_t word = rest - i * words_per_row;
        const int64_t s = src_indices[i], d = dst_indices[i];
        if (s < 0 || s >= num_src_rows || d < 0 || d >= num_dst_rows) continue;
        reinterpret_cast<Word *>(dst + p * dst_plane_stride_bytes + d * dst_row_stride_bytes)[word] =
            reinterpret_cast<const Word *>(src + p * src_plane_stride_bytes + s * src_row_stride_bytes)[word];
    }
}

int cuda_fail(const char *fn, const char *call, cudaError_t err) {
    (void)cudaGetLastError();  // clear it so the next call does not report it again
    const int status = (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver)
                           ? SPC_ERR_CUDA_UNAVAILABLE
                           : SPC_ERR_CUDA;
    return spc_fail(status, "%s: %s failed: %s (%s)", fn, call, cudaGetErrorName(err),
                    cudaGetErrorString(err));
}

// Maps `ptr` to the address a kernel on `device` must use. Device and managed
// memory pass through; pinned host memory maps to its device alias (equal to
// ptr under UVA for cudaHostAlloc, possibly not for cudaHostRegister memory);
// pageable host memory cannot be read by a kernel at all.
int device_view(const char *fn, const char *name, const void *ptr, int device,
                const void **out) {
    cudaPointerAttributes attr;
    cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
    if (err != cudaSuccess) return cuda_fail(fn, "cudaPointerGetAttributes", err);
    if (attr.type == cudaMemoryTypeUnregistered || attr.devicePointer == nullptr)
        return spc_fail(SPC_ERR_INVALID_ARGUMENT,
                        "%s: %s is pageable host memory; use device memory or pin it", fn, name);
    if (attr.type == cudaMemoryTypeDevice && attr.device != device)
        return spc_fail(SPC_ERR_INVALID_ARGUMENT, "%s: %s lives on device %d, launching on %d", fn,
                        name, attr.device, device);
    *out = attr.devicePointer;
    return SPC_OK;
}

template <bool kScatter>
int launch_copy_rows(const char *fn, const void *src, int64_t src_row_stride_bytes,
                     const int64_t *indices, int64_t num_indices, void *dst,
                     int64_t dst_row_stride_bytes, int64_t num_rows, int64_t row_bytes,
                     void *stream) {
    spc_clear_error();
    int status = spc_check_copy_args(fn, src, src_row_stride_bytes, indices, num_indices, dst,
                                     dst_row_stride_bytes, num_rows, row_bytes);
    if (status != SPC_OK || num_indices == 0 || row_bytes == 0) return status;

    // Errors from unrelated earlier runtime calls must not be blamed on this launch.
    (void)cudaGetLastError();
    int device = 0, num_sms = 0, max_threads_per_sm = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return cuda_fail(fn, "cudaGetDevice", err);
    const void *src_dev = nullptr, *dst_dev = nullptr, *indices_dev = nullptr;
    if ((status = device_view(fn, "src", src, device, &src_dev)) != SPC_OK ||
        (status = device_view(fn, "dst", dst, device, &dst_dev)) != SPC_OK ||
        (status = device_view(fn, "indices", indices, device, &indices_dev)) != SPC_OK)
        return status;
    if ((err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device)) !=
            cudaSuccess ||
        (err = cudaDeviceGetAttribute(&max_threads_per_sm,
                                      cudaDevAttrMaxThreadsPerMultiProcessor, device)) !=
            cudaSuccess)
        return cuda_fail(fn, "cudaDeviceGetAttribute", err);

    const uintptr_t layout = (uintptr_t)src_dev | (uintptr_t)dst_dev |
                             (uintptr_t)src_row_stride_bytes | (uintptr_t)dst_row_stride_bytes |
                             (uintptr_t)row_bytes;
    const int word_bytes = layout % 16 == 0 ? 16 : layout % 8 == 0 ? 8 : layout % 4 == 0 ? 4
                                                 : layout % 2 == 0 ? 2 : 1;
    const int64_t words_per_row = row_bytes / word_bytes;
    // One full wave of resident blocks is enough for a grid-stride copy; more
    // blocks only add scheduling work.
    const int64_t blocks_needed = (num_indices * words_per_row + kThreadsPerBlock - 1) /
                                  kThreadsPerBlock;
    const int64_t blocks_resident = (int64_t)num_sms * (max_threads_per_sm / kThreadsPerBlock);
    const unsigned grid = (unsigned)(blocks_needed < blocks_resident ? blocks_needed
                                                                     : blocks_resident);

    const char *s = (const char *)src_dev;
    const int64_t *idx = (const int64_t *)indices_dev;
    char *d = (char *)dst_dev;
    cudaStream_t st = (cudaStream_t)stream;
#define SPC_LAUNCH(Word)                                                                       \
    copy_rows_kernel<Word, kScatter><<<grid, kThreadsPerBlock, 0, st>>>(                       \
        s, src_row_stride_bytes, idx, num_indices, d, dst_row_stride_bytes, num_rows,          \
        words_per_row)
    switch (word_bytes) {
    case 16: SPC_LAUNCH(uint4); break;
    case 8: SPC_LAUNCH(uint2); break;
    case 4: SPC_LAUNCH(uint32_t); break;
    case 2: SPC_LAUNCH(uint16_t); break;
    default: SPC_LAUNCH(uint8_t); break;
    }
#undef SPC_LAUNCH
    err = cudaGetLastError();
    return err == cudaSuccess ? SPC_OK : cuda_fail(fn, "kernel launch", err);
}

int launch_copy_planes(const void *src, int64_t src_plane_stride_bytes, int64_t src_row_stride_bytes,
                       int64_t num_src_rows, const int64_t *src_indices, void *dst,
                       int64_t dst_plane_stride_bytes, int64_t dst_row_stride_bytes, int64_t num_dst_rows,
                       const int64_t *dst_indices, int64_t num_indices, int64_t num_planes, int64_t row_bytes,
                       void *stream) {
    static const char fn[] = "spc_cuda_copy_rows_planes";
    spc_clear_error();
    int status = spc_check_planes_args(fn, src, src_row_stride_bytes, num_src_rows, src_indices, dst,
                                       dst_row_stride_bytes, num_dst_rows, dst_indices, num_indices,
                                       num_planes, row_bytes);
    if (status != SPC_OK || num_indices == 0 || num_planes == 0 || row_bytes == 0) return status;

    (void)cudaGetLastError();
    int device = 0, num_sms = 0, max_threads_per_sm = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return cuda_fail(fn, "cudaGetDevice", err);
    const void *src_dev = nullptr, *dst_dev = nullptr, *si_dev = nullptr, *di_dev = nullptr;
    if ((status = device_view(fn, "src", src, device, &src_dev)) != SPC_OK ||
        (status = device_view(fn, "dst", dst, device, &dst_dev)) != SPC_OK ||
        (status = device_view(fn, "src_indices", src_indices, device, &si_dev)) != SPC_OK ||
        (status = device_view(fn, "dst_indices", dst_indices, device, &di_dev)) != SPC_OK)
        return status;
    if ((err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess ||
        (err = cudaDeviceGetAttribute(&max_threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device)) !=
            cudaSuccess)
        return cuda_fail(fn, "cudaDeviceGetAttribute", err);

    const uintptr_t layout = (uintptr_t)src_dev | (uintptr_t)dst_dev | (uintptr_t)src_row_stride_bytes |
                             (uintptr_t)dst_row_stride_bytes | (uintptr_t)src_plane_stride_bytes |
                             (uintptr_t)dst_plane_stride_bytes | (uintptr_t)row_bytes;
    const int word_bytes = layout % 16 == 0 ? 16 : layout % 8 == 0 ? 8 : layout % 4 == 0 ? 4
                                               : layout % 2 == 0 ? 2 : 1;
    const int64_t words_per_row = row_bytes / word_bytes;
    const int64_t blocks_needed = (num_planes * num_indices * words_per_row + kThreadsPerBlock - 1) /
                                  kThreadsPerBlock;
    const int64_t blocks_resident = (int64_t)num_sms * (max_threads_per_sm / kThreadsPerBlock);
    const unsigned grid = (unsigned)(blocks_needed < blocks_resident ? blocks_needed : blocks_resident);
    const char *s = (const char *)src_dev;
    char *d = (char *)dst_dev;
    const int64_t *si = (const int64_t *)si_dev, *di = (const int64_t *)di_dev;
    cudaStream_t st = (cudaStream_t)stream;
#define SPC_LAUNCH(Word)                                                                          \
    copy_planes_kernel<Word><<<grid, kThreadsPerBlock, 0, st>>>(                                 \
        s, src_plane_stride_bytes, src_row_stride_bytes, num_src_rows, si, d, dst_plane_stride_bytes, \
        dst_row_stride_bytes, num_dst_rows, di, num_indices, num_planes, words_per_row)
    switch (word_bytes) {
    case 16: SPC_LAUNCH(uint4); break;
    case 8: SPC_LAUNCH(uint2); break;
    case 4: SPC_LAUNCH(uint32_t); break;
    case 2: SPC_LAUNCH(uint16_t); break;
    default: SPC_LAUNCH(uint8_t); break;
    }
#undef SPC_LAUNCH
    err = cudaGetLastError();
    return err == cudaSuccess ? SPC_OK : cuda_fail(fn, "kernel launch", err);
}

}  // namespace

extern "C" {

int spc_cuda_available(void) {
    spc_clear_error();
    int num_devices = 0;
    cudaError_t err = cudaGetDeviceCount(&num_devices);
    if (err != cudaSuccess) {
        cuda_fail("spc_cuda_available", "cudaGetDeviceCount", err);
        return 0;
    }
    if (num_devices == 0) {
        spc_fail(SPC_ERR_CUDA_UNAVAILABLE, "spc_cuda_available: no CUDA device");
        return 0;
    }
    return 1;
}

int spc_cuda_gather_rows(const void *src, int64_t src_row_stride_bytes, int64_t num_src_rows,
                         const int64_t *indices, int64_t num_indices, void *dst,
                         int64_t dst_row_stride_bytes, int64_t row_bytes, void *stream) {
    return launch_copy_rows<false>("spc_cuda_gather_rows", src, src_row_stride_bytes, indices,
                                   num_indices, dst, dst_row_stride_bytes, num_src_rows,
                                   row_bytes, stream);
}

int spc_cuda_scatter_rows(const void *src, int64_t src_row_stride_bytes, const int64_t *indices,
                          int64_t num_indices, void *dst, int64_t dst_row_stride_bytes,
                          int64_t num_dst_rows, int64_t row_bytes, void *stream) {
    return launch_copy_rows<true>("spc_cuda_scatter_rows", src, src_row_stride_bytes, indices,
                                  num_indices, dst, dst_row_stride_bytes, num_dst_rows,
                                  row_bytes, stream);
}

int spc_cuda_copy_rows_planes(const void *src, int64_t src_plane_stride_bytes, int64_t src_row_stride_bytes,
                              int64_t num_src_rows, const int64_t *src_indices, void *dst,
                              int64_t dst_plane_stride_bytes, int64_t dst_row_stride_bytes, int64_t num_dst_rows,
                              const int64_t *dst_indices, int64_t num_indices, int64_t num_planes,
                              int64_t row_bytes, void *stream) {
    return launch_copy_planes(src, src_plane_stride_bytes, src_row_stride_bytes, num_src_rows, src_indices, dst,
                              dst_plane_stride_bytes, dst_row_stride_bytes, num_dst_rows, dst_indices, num_indices,
                              num_planes, row_bytes, stream);
}

}  // extern "C"
