/* Host gather/scatter of fixed-size rows by index, split across pthreads. */
#define _GNU_SOURCE /* sched_getaffinity / CPU_COUNT */
#include <pthread.h>
#include <sched.h>
#include <string.h>
#include <unistd.h>

#include "specontext.h"
#include "internal.h"

/* Auto mode gives each thread at least this many bytes. Creating and joining
 * a pthread costs ~35 us (measured on a 2-core Xeon VM), about what one core
 * needs to gather 150-250 KB of random 256-byte rows (4-6 GB/s per core). On
 * that machine a second thread broke even at ~2 MiB moved (1 MiB each) and
 * halved the time from ~8 MiB up; below that, spawning only adds latency. */
#define MIN_BYTES_PER_THREAD (1 << 20)

/* Auto mode stops here: a handful of cores already saturate DRAM bandwidth
 * for memcpy, and more threads only add spawn cost and contention. */
#define MAX_AUTO_THREADS 8

/* Hard cap on explicit requests, which size the stack array below. */
#define MAX_THREADS 64

typedef struct {
    const char *src;
    int64_t src_row_stride_bytes;
    const int64_t *indices;
    char *dst;
    int64_t dst_row_stride_bytes;
    int64_t row_bytes;
    int is_scatter; /* indices address dst rows instead of src rows */
    int64_t begin, end; /* this worker's slice of [0, num_indices) */
} copy_job;

static void *run_copy_job(void *arg) {
    const copy_job *job = (const copy_job *)arg;
    for (int64_t i = job->begin; i < job->end; ++i) {
        int64_t src_row = job->is_scatter ? i : job->indices[i];
        int64_t dst_row = job->is_scatter ? job->indices[i] : i;
        memcpy(job->dst + dst_row * job->dst_row_stride_bytes,
               job->src + src_row * job->src_row_stride_bytes, (size_t)job->row_bytes);
    }
    return NULL;
}

static int online_cpus(void) {
    /* The affinity mask, not the machine's CPU count, is what a container or
     * taskset actually lets us use. */
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

static int64_t choose_threads(int requested, int64_t num_indices, int64_t row_bytes) {
    int64_t n = requested;
    if (n <= 0) {
        int64_t by_size = num_indices * row_bytes / MIN_BYTES_PER_THREAD;
        n = online_cpus();
        if (n > MAX_AUTO_THREADS) n = MAX_AUTO_THREADS;
        if (n > by_size) n = by_size;
    }
    if (n > MAX_THREADS) n = MAX_THREADS;
    if (n > num_indices) n = num_indices;
    return n < 1 ? 1 : n;
}

static int copy_rows(const char *fn, const void *src, int64_t src_row_stride_bytes,
                     const int64_t *indices, int64_t num_indices, void *dst,
                     int64_t dst_row_stride_bytes, int64_t num_rows, int64_t row_bytes,
                     int num_threads, int is_scatter) {
    spc_clear_error();
    int status = spc_check_copy_args(fn, src, src_row_stride_bytes, indices, num_indices, dst,
                                     dst_row_stride_bytes, num_rows, row_bytes);
    if (status != SPC_OK) return status;
    /* One pass up front so a bad index leaves dst untouched, not half written. */
    for (int64_t i = 0; i < num_indices; ++i)
        if (indices[i] < 0 || indices[i] >= num_rows)
            return spc_fail(SPC_ERR_INDEX, "%s: indices[%lld]=%lld outside [0, %lld)", fn,
                            (long long)i, (long long)indices[i], (long long)num_rows);
    if (num_indices == 0 || row_bytes == 0) return SPC_OK;

    int64_t n = choose_threads(num_threads, num_indices, row_bytes);
    copy_job jobs[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t t = 0; t < n; ++t) {
        jobs[t] = (copy_job){(const char *)src, src_row_stride_bytes, indices, (char *)dst,
                             dst_row_stride_bytes, row_bytes, is_scatter,
                             num_indices * t / n, num_indices * (t + 1) / n};
    }
    /* Slice 0 runs on the caller. If the OS refuses a thread, its slice also
     * runs here: slower, but the copy still completes. */
    for (int64_t t = 1; t < n; ++t)
        started[t] = pthread_create(&threads[t], NULL, run_copy_job, &jobs[t]) == 0;
    run_copy_job(&jobs[0]);
    for (int64_t t = 1; t < n; ++t) {
        if (started[t]) pthread_join(threads[t], NULL);
        else run_copy_job(&jobs[t]);
    }
    return SPC_OK;
}

int spc_gather_rows(const void *src, int64_t src_row_stride_bytes, int64_t num_src_rows,
                    const int64_t *indices, int64_t num_indices, void *dst,
                    int64_t dst_row_stride_bytes, int64_t row_bytes, int num_threads) {
    return copy_rows("spc_gather_rows", src, src_row_stride_bytes, indices, num_indices, dst,
                     dst_row_stride_bytes, num_src_rows, row_bytes, num_threads, 0);
}

int spc_scatter_rows(const void *src, int64_t src_row_stride_bytes, const int64_t *indices,
                     int64_t num_indices, void *dst, int64_t dst_row_stride_bytes,
                     int64_t num_dst_rows, int64_t row_bytes, int num_threads) {
    return copy_rows("spc_scatter_rows", src, src_row_stride_bytes, indices, num_indices, dst,
                     dst_row_stride_bytes, num_dst_rows, row_bytes, num_threads, 1);
}

/* ---- planes: the same (src row -> dst row) list applied to many buffers ---- */

typedef struct {
    const char *src;
    int64_t src_plane_stride_bytes, src_row_stride_bytes;
    const int64_t *src_indices;
    char *dst;
    int64_t dst_plane_stride_bytes, dst_row_stride_bytes;
    const int64_t *dst_indices;
    int64_t num_indices, row_bytes;
    int64_t begin, end; /* this worker's slice of [0, num_planes * num_indices) */
} planes_job;

static void *run_planes_job(void *arg) {
    const planes_job *job = (const planes_job *)arg;
    for (int64_t k = job->begin; k < job->end; ++k) {
        const int64_t p = k / job->num_indices, i = k - p * job->num_indices;
        memcpy(job->dst + p * job->dst_plane_stride_bytes + job->dst_indices[i] * job->dst_row_stride_bytes,
               job->src + p * job->src_plane_stride_bytes + job->src_indices[i] * job->src_row_stride_bytes,
               (size_t)job->row_bytes);
    }
    return NULL;
}

int spc_check_planes_args(const char *fn, const void *src, int64_t src_row_stride_bytes, int64_t num_src_rows,
                          const int64_t *src_indices, const void *dst, int64_t dst_row_stride_bytes,
                          int64_t num_dst_rows, const int64_t *dst_indices, int64_t num_indices,
                          int64_t num_planes, int64_t row_bytes) {
    if (num_planes < 0 || num_src_rows < 0)
        return spc_fail(SPC_ERR_INVALID_ARGUMENT, "%s: sizes must be >= 0 (num_planes=%lld, num_src_rows=%lld)",
                        fn, (long long)num_planes, (long long)num_src_rows);
    int status = spc_check_copy_args(fn, src, src_row_stride_bytes, src_indices, num_indices, dst,
                                     dst_row_stride_bytes, num_dst_rows, row_bytes);
    if (status != SPC_OK) return status;
    if (num_indices > 0 && dst_indices == NULL)
        return spc_fail(SPC_ERR_INVALID_ARGUMENT, "%s: NULL dst_indices with num_indices=%lld", fn,
                        (long long)num_indices);
    return SPC_OK;
}

int spc_copy_rows_planes(const void *src, int64_t src_plane_stride_bytes, int64_t src_row_stride_bytes,
                         int64_t num_src_rows, const int64_t *src_indices, void *dst,
                         int64_t dst_plane_stride_bytes, int64_t dst_row_stride_bytes, int64_t num_dst_rows,
                         const int64_t *dst_indices, int64_t num_indices, int64_t num_planes,
                         int64_t row_bytes, int num_threads) {
    static const char fn[] = "spc_copy_rows_planes";
    spc_clear_error();
    int status = spc_check_planes_args(fn, src, src_row_stride_bytes, num_src_rows, src_indices, dst,
                                       dst_row_stride_bytes, num_dst_rows, dst_indices, num_indices,
                                       num_planes, row_bytes);
    if (status != SPC_OK) return status;
    for (int64_t i = 0; i < num_indices; ++i) {
        if (src_indices[i] < 0 || src_indices[i] >= num_src_rows)
            return spc_fail(SPC_ERR_INDEX, "%s: src_indices[%lld]=%lld outside [0, %lld)", fn, (long long)i,
                            (long long)src_indices[i], (long long)num_src_rows);
        if (dst_indices[i] < 0 || dst_indices[i] >= num_dst_rows)
            return spc_fail(SPC_ERR_INDEX, "%s: dst_indices[%lld]=%lld outside [0, %lld)", fn, (long long)i,
                            (long long)dst_indices[i], (long long)num_dst_rows);
    }
    const int64_t total = num_planes * num_indices;
    if (total == 0 || row_bytes == 0) return SPC_OK;

    int64_t n = choose_threads(num_threads, total, row_bytes);
    planes_job jobs[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t t = 0; t < n; ++t)
        jobs[t] = (planes_job){(const char *)src, src_plane_stride_bytes, src_row_stride_bytes, src_indices,
                               (char *)dst, dst_plane_stride_bytes, dst_row_stride_bytes, dst_indices,
                               num_indices, row_bytes, total * t / n, total * (t + 1) / n};
    for (int64_t t = 1; t < n; ++t)
        started[t] = pthread_create(&threads[t], NULL, run_planes_job, &jobs[t]) == 0;
    run_planes_job(&jobs[0]);
    for (int64_t t = 1; t < n; ++t) {
        if (started[t]) pthread_join(threads[t], NULL);
        else run_planes_job(&jobs[t]);
    }
    return SPC_OK;
}
