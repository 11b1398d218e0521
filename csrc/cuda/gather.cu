// CUDA gather/scatter/plane copies of fixed-size rows by index: one launch per
// call, plus a cudaMemcpyAsync loop for plane copies to compare against.
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

// The same flat loop over (plane, index, word), plane outermost, so that
// consecutive threads still copy consecutive words of one row. A copy whose
// src or dst row is out of range is skipped, in every plane.
template <typename Word>
__global__ void copy_rows_planes_kernel(
    const char *__restrict__ src, int64_t src_plane_stride_bytes, int64_t src_row_stride_bytes,
    int64_t num_src_rows, const int64_t *__restrict__ src_indices, char *__restrict__ dst,
    int64_t dst_plane_stride_bytes, int64_t dst_row_stride_bytes, int64_t num_dst_rows,
    const int64_t *__restrict__ dst_indices, int64_t num_indices, int64_t num_copies,
    int64_t words_per_row) {
    const int64_t num_words = num_copies * words_per_row;
    const int64_t step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < num_words; k += step) {
        const int64_t copy = k / words_per_row;
        const int64_t word = k - copy * words_per_row;
        const int64_t plane = copy / num_indices;
        const int64_t i = copy - plane * num_indices;
        const int64_t src_row = src_indices[i];
        const int64_t dst_row = dst_indices[i];
        if (src_row < 0 || src_row >= num_src_rows || dst_row < 0 || dst_row >= num_dst_rows)
            continue;
        reinterpret_cast<Word *>(dst + plane * dst_plane_stride_bytes +
                                 dst_row * dst_row_stride_bytes)[word] =
            reinterpret_cast<const Word *>(src + plane * src_plane_stride_bytes +
                                           src_row * src_row_stride_bytes)[word];
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

// How a flat (row copy, word) grid-stride kernel is launched.
struct LaunchPlan {
    int word_bytes;        // the widest of 16/8/4/2/1 that divides `layout` below
    int64_t words_per_row;
    unsigned grid;         // blocks of kThreadsPerBlock
};

// `layout` ORs together every pointer, stride and row size the kernel adds up,
// so a Word dividing it keeps every access aligned.
int plan_launch(const char *fn, int device, uintptr_t layout, int64_t num_copies,
                int64_t row_bytes, LaunchPlan *plan) {
    int num_sms = 0, max_threads_per_sm = 0;
    cudaError_t err;
    if ((err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device)) !=
            cudaSuccess ||
        (err = cudaDeviceGetAttribute(&max_threads_per_sm,
                                      cudaDevAttrMaxThreadsPerMultiProcessor, device)) !=
            cudaSuccess)
        return cuda_fail(fn, "cudaDeviceGetAttribute", err);
    plan->word_bytes = layout % 16 == 0 ? 16 : layout % 8 == 0 ? 8 : layout % 4 == 0 ? 4
                       : layout % 2 == 0 ? 2 : 1;
    plan->words_per_row = row_bytes / plan->word_bytes;
    // One full wave of resident blocks is enough for a grid-stride copy; more
    // blocks only add scheduling work.
    const int64_t blocks_needed = (num_copies * plan->words_per_row + kThreadsPerBlock - 1) /
                                  kThreadsPerBlock;
    const int64_t blocks_resident = (int64_t)num_sms * (max_threads_per_sm / kThreadsPerBlock);
    plan->grid = (unsigned)(blocks_needed < blocks_resident ? blocks_needed : blocks_resident);
    return SPC_OK;
}

// Calls launch(Word{}) with the Word type of width word_bytes.
template <typename Launch>
void with_word(int word_bytes, Launch &&launch) {
    switch (word_bytes) {
    case 16: launch(uint4{}); break;
    case 8: launch(uint2{}); break;
    case 4: launch(uint32_t{}); break;
    case 2: launch(uint16_t{}); break;
    default: launch(uint8_t{}); break;
    }
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
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return cuda_fail(fn, "cudaGetDevice", err);
    const void *src_dev = nullptr, *dst_dev = nullptr, *indices_dev = nullptr;
    if ((status = device_view(fn, "src", src, device, &src_dev)) != SPC_OK ||
        (status = device_view(fn, "dst", dst, device, &dst_dev)) != SPC_OK ||
        (status = device_view(fn, "indices", indices, device, &indices_dev)) != SPC_OK)
        return status;
    const uintptr_t layout = (uintptr_t)src_dev | (uintptr_t)dst_dev |
                             (uintptr_t)src_row_stride_bytes | (uintptr_t)dst_row_stride_bytes |
                             (uintptr_t)row_bytes;
    LaunchPlan plan;
    if ((status = plan_launch(fn, device, layout, num_indices, row_bytes, &plan)) != SPC_OK)
        return status;

    const char *s = (const char *)src_dev;
    const int64_t *idx = (const int64_t *)indices_dev;
    char *d = (char *)dst_dev;
    cudaStream_t st = (cudaStream_t)stream;
    with_word(plan.word_bytes, [&](auto word) {
        copy_rows_kernel<decltype(word), kScatter><<<plan.grid, kThreadsPerBlock, 0, st>>>(
            s, src_row_stride_bytes, idx, num_indices, d, dst_row_stride_bytes, num_rows,
            plan.words_per_row);
    });
    err = cudaGetLastError();
    return err == cudaSuccess ? SPC_OK : cuda_fail(fn, "kernel launch", err);
}

int launch_copy_rows_planes(const void *src, int64_t src_plane_stride_bytes,
                            int64_t src_row_stride_bytes, int64_t num_src_rows,
                            const int64_t *src_indices, void *dst,
                            int64_t dst_plane_stride_bytes, int64_t dst_row_stride_bytes,
                            int64_t num_dst_rows, const int64_t *dst_indices,
                            int64_t num_indices, int64_t num_planes, int64_t row_bytes,
                            void *stream) {
    static const char fn[] = "spc_cuda_copy_rows_planes";
    spc_clear_error();
    int status = spc_check_planes_args(fn, src, src_plane_stride_bytes, src_row_stride_bytes,
                                       num_src_rows, src_indices, dst, dst_plane_stride_bytes,
                                       dst_row_stride_bytes, num_dst_rows, dst_indices,
                                       num_indices, num_planes, row_bytes);
    if (status != SPC_OK || num_indices == 0 || num_planes == 0 || row_bytes == 0) return status;

    (void)cudaGetLastError();
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return cuda_fail(fn, "cudaGetDevice", err);
    const void *src_dev = nullptr, *dst_dev = nullptr;
    const void *src_indices_dev = nullptr, *dst_indices_dev = nullptr;
    if ((status = device_view(fn, "src", src, device, &src_dev)) != SPC_OK ||
        (status = device_view(fn, "dst", dst, device, &dst_dev)) != SPC_OK ||
        (status = device_view(fn, "src_indices", src_indices, device, &src_indices_dev)) !=
            SPC_OK ||
        (status = device_view(fn, "dst_indices", dst_indices, device, &dst_indices_dev)) !=
            SPC_OK)
        return status;
    // A single plane's stride is never used; leave it out so it cannot narrow the word.
    const int64_t src_plane_step = num_planes > 1 ? src_plane_stride_bytes : 0;
    const int64_t dst_plane_step = num_planes > 1 ? dst_plane_stride_bytes : 0;
    const uintptr_t layout = (uintptr_t)src_dev | (uintptr_t)dst_dev |
                             (uintptr_t)src_plane_step | (uintptr_t)dst_plane_step |
                             (uintptr_t)src_row_stride_bytes | (uintptr_t)dst_row_stride_bytes |
                             (uintptr_t)row_bytes;
    const int64_t num_copies = num_planes * num_indices;
    LaunchPlan plan;
    if ((status = plan_launch(fn, device, layout, num_copies, row_bytes, &plan)) != SPC_OK)
        return status;

    const char *s = (const char *)src_dev;
    char *d = (char *)dst_dev;
    const int64_t *src_idx = (const int64_t *)src_indices_dev;
    const int64_t *dst_idx = (const int64_t *)dst_indices_dev;
    cudaStream_t st = (cudaStream_t)stream;
    with_word(plan.word_bytes, [&](auto word) {
        copy_rows_planes_kernel<decltype(word)><<<plan.grid, kThreadsPerBlock, 0, st>>>(
            s, src_plane_step, src_row_stride_bytes, num_src_rows, src_idx, d, dst_plane_step,
            dst_row_stride_bytes, num_dst_rows, dst_idx, num_indices, num_copies,
            plan.words_per_row);
    });
    err = cudaGetLastError();
    return err == cudaSuccess ? SPC_OK : cuda_fail(fn, "kernel launch", err);
}

// The memcpy path reads indices on the host, so they must not be device memory.
int require_host(const char *fn, const char *name, const void *ptr) {
    cudaPointerAttributes attr;
    cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
    if (err != cudaSuccess) return cuda_fail(fn, "cudaPointerGetAttributes", err);
    if (attr.type == cudaMemoryTypeDevice)
        return spc_fail(SPC_ERR_INVALID_ARGUMENT,
                        "%s: %s is device memory, but this copy reads indices on the host; "
                        "pass host (pinned or pageable) memory", fn, name);
    return SPC_OK;
}

int memcpy_rows_planes(const void *src, int64_t src_plane_stride_bytes,
                       int64_t src_row_stride_bytes, int64_t num_src_rows,
                       const int64_t *src_indices, void *dst, int64_t dst_plane_stride_bytes,
                       int64_t dst_row_stride_bytes, int64_t num_dst_rows,
                       const int64_t *dst_indices, int64_t num_indices, int64_t num_planes,
                       int64_t row_bytes, void *stream) {
    static const char fn[] = "spc_cuda_memcpy_rows_planes";
    spc_clear_error();
    int status = spc_check_planes_args(fn, src, src_plane_stride_bytes, src_row_stride_bytes,
                                       num_src_rows, src_indices, dst, dst_plane_stride_bytes,
                                       dst_row_stride_bytes, num_dst_rows, dst_indices,
                                       num_indices, num_planes, row_bytes);
    if (status != SPC_OK || num_indices == 0) return status;

    (void)cudaGetLastError();
    if ((status = require_host(fn, "src_indices", src_indices)) != SPC_OK ||
        (status = require_host(fn, "dst_indices", dst_indices)) != SPC_OK)
        return status;
    // Like the host copy, and unlike the kernel: nothing is enqueued unless
    // every index is in range.
    if ((status = spc_check_indices(fn, "src_indices", src_indices, num_indices, num_src_rows)) !=
            SPC_OK ||
        (status = spc_check_indices(fn, "dst_indices", dst_indices, num_indices, num_dst_rows)) !=
            SPC_OK)
        return status;
    if (num_planes == 0 || row_bytes == 0) return SPC_OK;

    // src and dst follow the kernel's rules (device memory of this device, or
    // pinned); pageable memory would make each copy synchronous. The copies
    // take the pointers as given: with cudaMemcpyDefault the runtime resolves
    // pinned host pointers itself.
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return cuda_fail(fn, "cudaGetDevice", err);
    const void *unused = nullptr;
    if ((status = device_view(fn, "src", src, device, &unused)) != SPC_OK ||
        (status = device_view(fn, "dst", dst, device, &unused)) != SPC_OK)
        return status;

    const bool is_packed = src_row_stride_bytes == row_bytes && dst_row_stride_bytes == row_bytes;
    cudaStream_t st = (cudaStream_t)stream;
    int64_t run = 1;
    for (int64_t i = 0; i < num_indices; i += run) {
        const int64_t src_row = src_indices[i], dst_row = dst_indices[i];
        // Runs of consecutive rows are one transfer each, strided or not: a
        // 2D copy takes a row pitch on either side.
        run = 1;
        while (i + run < num_indices && src_indices[i + run] == src_row + run &&
               dst_indices[i + run] == dst_row + run)
            ++run;
        const bool is_flat = run == 1 || is_packed;
        for (int64_t plane = 0; plane < num_planes; ++plane) {
            const char *from = (const char *)src + plane * src_plane_stride_bytes +
                               src_row * src_row_stride_bytes;
            char *to =
                (char *)dst + plane * dst_plane_stride_bytes + dst_row * dst_row_stride_bytes;
            err = is_flat ? cudaMemcpyAsync(to, from, (size_t)(run * row_bytes),
                                            cudaMemcpyDefault, st)
                          : cudaMemcpy2DAsync(to, (size_t)dst_row_stride_bytes, from,
                                              (size_t)src_row_stride_bytes, (size_t)row_bytes,
                                              (size_t)run, cudaMemcpyDefault, st);
            if (err != cudaSuccess)
                return cuda_fail(fn, is_flat ? "cudaMemcpyAsync" : "cudaMemcpy2DAsync", err);
        }
    }
    return SPC_OK;
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

int spc_cuda_compiled(void) { return CUDART_VERSION; }

#define SPC_STRINGIFY_(...) #__VA_ARGS__
#define SPC_STRINGIFY(...) SPC_STRINGIFY_(__VA_ARGS__)

const char *spc_cuda_archs(void) {
#ifdef __CUDA_ARCH_LIST__
    return SPC_STRINGIFY(__CUDA_ARCH_LIST__);
#else
    return "unknown (nvcc before 11.5 does not define __CUDA_ARCH_LIST__)";
#endif
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

int spc_cuda_copy_rows_planes(const void *src, int64_t src_plane_stride_bytes,
                              int64_t src_row_stride_bytes, int64_t num_src_rows,
                              const int64_t *src_indices, void *dst,
                              int64_t dst_plane_stride_bytes, int64_t dst_row_stride_bytes,
                              int64_t num_dst_rows, const int64_t *dst_indices,
                              int64_t num_indices, int64_t num_planes, int64_t row_bytes,
                              void *stream) {
    return launch_copy_rows_planes(src, src_plane_stride_bytes, src_row_stride_bytes,
                                   num_src_rows, src_indices, dst, dst_plane_stride_bytes,
                                   dst_row_stride_bytes, num_dst_rows, dst_indices, num_indices,
                                   num_planes, row_bytes, stream);
}

int spc_cuda_memcpy_rows_planes(const void *src, int64_t src_plane_stride_bytes,
                                int64_t src_row_stride_bytes, int64_t num_src_rows,
                                const int64_t *src_indices, void *dst,
                                int64_t dst_plane_stride_bytes, int64_t dst_row_stride_bytes,
                                int64_t num_dst_rows, const int64_t *dst_indices,
                                int64_t num_indices, int64_t num_planes, int64_t row_bytes,
                                void *stream) {
    return memcpy_rows_planes(src, src_plane_stride_bytes, src_row_stride_bytes, num_src_rows,
                              src_indices, dst, dst_plane_stride_bytes, dst_row_stride_bytes,
                              num_dst_rows, dst_indices, num_indices, num_planes, row_bytes,
                              stream);
}

}  // extern "C"
