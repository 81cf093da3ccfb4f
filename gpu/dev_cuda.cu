// dev_cuda.cu — the CUDA device of dev.h: device selection, lanes (stream +
// cuBLAS handle; scratch and pinned staging), memory and copies, the one
// CUDA/cuBLAS error translation (cuda_status.h), and the ops table. The lane pool is dev.c's;
// the ops live in route_score.cu, route_select.cu and attend.cu.
//
// Every entry point calls cudaSetDevice(ordinal) first: callers are arbitrary
// daemon threads, and the current device is per thread. Nothing here aborts:
// a CUDA failure is logged once (statement, function, line) and comes back as
// MSA_ENOMEM (allocation) or MSA_EINTERNAL.
//
// Settings come from msa_dev_config_t at open (sync_check, gemm_min_cols; see
// dev.h); nothing here reads the environment.
#include "dev_cuda_impl.h"

#include "msa_log.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// Default GEMM threshold in columns (nq * ncol); see the file comment.
static const uint32_t kGemmMinColsDefault = 17;
// cuBLAS workspace per lane (Hopper guidance is up to 32 MiB; our GEMMs are
// skinny, 8 MiB is plenty) so cuBLAS never allocates on the request path.
static const size_t kBlasWorkspace = 8u << 20;

/* ==== error translation ====================================================== */

extern "C" int msa__cuda_status_rt(cudaError_t e, const char *stmt, const char *func, int line)
{
    if (e == cudaSuccess) return MSA_OK;
    msa_log(MSA_LOG_ERROR, "cuda: %s failed in %s (line %d): %s: %s", stmt, func, line,
            cudaGetErrorName(e), cudaGetErrorString(e));
    return e == cudaErrorMemoryAllocation ? MSA_ENOMEM : MSA_EINTERNAL;
}

extern "C" int msa__cuda_status_blas(cublasStatus_t e, const char *stmt, const char *func, int line)
{
    if (e == CUBLAS_STATUS_SUCCESS) return MSA_OK;
    msa_log(MSA_LOG_ERROR, "cublas: %s failed in %s (line %d): %s", stmt, func, line,
            cublasGetStatusString(e));
    return e == CUBLAS_STATUS_ALLOC_FAILED ? MSA_ENOMEM : MSA_EINTERNAL;
}

int msa__cuda_after_launch(struct msa_dev_lane *l, const char *what, const char *func, int line)
{
    int rc = msa__cuda_status(cudaGetLastError(), what, func, line);
    if (rc == MSA_OK && l->dv->sync_check)
        rc = msa__cuda_status(cudaStreamSynchronize(l->stream), what, func, line);
    return rc;
}

/* ==== device ================================================================= */

static int cuda_count(const msa_dev_config_t *cfg, char *why, size_t len)
{
    (void)cfg;
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        if (why && len) snprintf(why, len, "cudaGetDeviceCount: %s", cudaGetErrorString(e));
        cudaGetLastError(); // clear it, so later calls on this thread start clean
        return 0;
    }
    if (n == 0 && why && len) snprintf(why, len, "no CUDA device");
    return n;
}

// The CUDA part of a lane, in reverse order of lane_open; safe on a lane
// lane_open left half done (or never saw: all zero).
static void cuda_lane_close(msa_dev_lane_t *l)
{
    if (l->stream) cudaStreamSynchronize(l->stream);
    if (l->blas) cublasDestroy(l->blas);
    if (l->stream) cudaStreamDestroy(l->stream);
    if (l->blas_ws_d) cudaFree(l->blas_ws_d);
    if (l->head.scratch_d) cudaFree(l->head.scratch_d);
    if (l->head.staging_h) cudaFreeHost(l->head.staging_h);
}

// Called by the pool (dev.c) for each lane, with the device current.
static int cuda_lane_open(msa_dev_lane_t *l, size_t scratch, size_t staging)
{
    l->dv = l->head.dev;
    MSA_CK(cudaStreamCreateWithFlags(&l->stream, cudaStreamNonBlocking));
    MSA_CK(cublasCreate(&l->blas));
    MSA_CK(cublasSetStream(l->blas, l->stream));
    // The workspace must be set after the stream: setting a stream resets it.
    MSA_CK(cudaMalloc(&l->blas_ws_d, kBlasWorkspace));
    l->blas_ws_bytes = kBlasWorkspace;
    MSA_CK(cublasSetWorkspace(l->blas, l->blas_ws_d, l->blas_ws_bytes));
    if (scratch) MSA_CK(cudaMalloc(&l->head.scratch_d, scratch));
    l->head.scratch_bytes = scratch;
    if (staging) MSA_CK(cudaMallocHost(&l->head.staging_h, staging));
    l->head.staging_bytes = staging;
    return MSA_OK;
}

// Releases what open created, in reverse order; safe on a partly opened device.
static void cuda_close(msa_dev_t *d)
{
    cudaSetDevice(d->ordinal);
    msa__dev_pool_close(d);
    cudaGetLastError(); // errors on the way down have nowhere to go
    free(d);
}

static int cuda_open(const msa_dev_config_t *cfg, int ordinal, unsigned lanes, size_t lane_scratch,
                     size_t lane_staging, msa_dev_t **out)
{
    *out = NULL;
    int n = cuda_count(cfg, NULL, 0);
    if (ordinal < 0 || ordinal >= n) return n ? MSA_EINVAL : MSA_EUNAVAIL;
    msa_dev_t *d = (msa_dev_t *)calloc(1, sizeof *d);
    if (!d) return MSA_ENOMEM;
    d->head.ops = &msa__dev_cuda_ops;
    d->ordinal = ordinal;
    d->sync_check = cfg->sync_check;
    d->gemm_min_cols = cfg->gemm_min_cols ? cfg->gemm_min_cols : kGemmMinColsDefault;

    int rc = MSA_CK_RC(cudaSetDevice(ordinal));
    if (rc == MSA_OK) rc = MSA_CK_RC(cudaGetDeviceProperties(&d->prop, ordinal));
    size_t free_b = 0, total_b = 0;
    if (rc == MSA_OK) rc = MSA_CK_RC(cudaMemGetInfo(&free_b, &total_b));
    if (rc == MSA_OK)
        rc = msa__dev_pool_open(d, lanes, sizeof(struct msa_dev_lane), lane_scratch, lane_staging);
    if (rc == MSA_OK) rc = msa__cuda_score_init(d);
    if (rc != MSA_OK) {
        cuda_close(d);
        return rc;
    }
    snprintf(d->info.name, sizeof d->info.name, "%s", d->prop.name);
    d->info.ordinal = ordinal;
    d->info.sim = false;
    d->info.total_bytes = total_b;
    d->info.free_bytes = free_b;
    msa_log(MSA_LOG_INFO, "cuda: opened device %d (%s, sm_%d%d, %d SMs, %.1f GiB) with %u lanes",
            ordinal, d->prop.name, d->prop.major, d->prop.minor, d->prop.multiProcessorCount,
            (double)total_b / (1u << 30), lanes);
    *out = d;
    return MSA_OK;
}

static void cuda_get_info(const msa_dev_t *d, msa_dev_info_t *out)
{
    *out = d->info;
}

static int cuda_dmalloc(msa_dev_t *d, size_t bytes, void **out)
{
    *out = NULL;
    MSA_CK(cudaSetDevice(d->ordinal));
    MSA_CK(cudaMalloc(out, bytes ? bytes : 1));
    return MSA_OK;
}

static void cuda_dfree(msa_dev_t *d, void *p)
{
    if (cudaSetDevice(d->ordinal) == cudaSuccess) MSA_CK_RC(cudaFree(p));
}

// Pinned host memory, portable across every device of the process.
static int cuda_host_alloc(msa_dev_t *d, size_t bytes, void **out)
{
    *out = NULL;
    MSA_CK(cudaSetDevice(d->ordinal));
    cudaError_t e = cudaHostAlloc(out, bytes ? bytes : 1, cudaHostAllocPortable);
    if (e != cudaSuccess) {
        cudaGetLastError(); /* not sticky: the caller falls back to pageable memory */
        *out = NULL;
        return MSA_ENOMEM;
    }
    return MSA_OK;
}

static void cuda_host_free(msa_dev_t *d, void *p)
{
    (void)d;
    MSA_CK_RC(cudaFreeHost(p));
}

/* ==== copies ================================================================= */

static int copy(msa_dev_lane_t *l, void *dst, const void *src, size_t n, cudaMemcpyKind kind)
{
    MSA_CK(cudaSetDevice(l->dv->ordinal));
    MSA_CK(cudaMemcpyAsync(dst, src, n, kind, l->stream));
    return MSA_OK;
}

static int cuda_h2d(msa_dev_lane_t *l, void *dst, const void *src, size_t n)
{
    return copy(l, dst, src, n, cudaMemcpyHostToDevice);
}
static int cuda_d2h(msa_dev_lane_t *l, void *dst, const void *src, size_t n)
{
    return copy(l, dst, src, n, cudaMemcpyDeviceToHost);
}
static int cuda_d2d(msa_dev_lane_t *l, void *dst, const void *src, size_t n)
{
    return copy(l, dst, src, n, cudaMemcpyDeviceToDevice);
}

static int cuda_lane_sync(msa_dev_lane_t *l)
{
    MSA_CK(cudaSetDevice(l->dv->ordinal));
    MSA_CK(cudaStreamSynchronize(l->stream));
    return MSA_OK;
}

/* ==== ops (entry points) ==================================================== */

// Every op has the same shape: make the lane's device current, then the op
// (lane + descriptor) from its own file.
template <class Args>
static int run_op(int (*op)(msa_dev_lane_t *, const Args *), msa_dev_lane_t *l, const Args *a)
{
    MSA_CK(cudaSetDevice(l->dv->ordinal));
    return op(l, a);
}

static int cuda_score(msa_dev_lane_t *l, const msa_dev_score_args_t *a)
{
    return run_op(msa__cuda_score, l, a);
}

static int cuda_select(msa_dev_lane_t *l, const msa_dev_select_args_t *a)
{
    return run_op(msa__cuda_select, l, a);
}

static int cuda_attend(msa_dev_lane_t *l, const msa_dev_attend_args_t *a)
{
    return run_op(msa__cuda_attend, l, a);
}

extern "C" const msa_dev_ops_t msa__dev_cuda_ops = {
    cuda_count, cuda_open,       cuda_close,     cuda_get_info,  cuda_dmalloc,
    cuda_dfree, cuda_host_alloc, cuda_host_free, cuda_lane_open, cuda_lane_close,
    cuda_h2d,   cuda_d2h,        cuda_d2d,       cuda_lane_sync, msa__cuda_peer_copy,
    cuda_score, cuda_select,     cuda_attend,
};

/* ==== bench helpers ========================================================== */

// splitmix64: a counter-based generator, so every element is independent of
// the launch geometry and the data is reproducible from the seed.
__device__ __forceinline__ uint64_t mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

__device__ __forceinline__ void store_as(msa_dtype_t dt, void *dst, size_t i, float v)
{
    if (dt == MSA_DT_F32)
        ((float *)dst)[i] = v;
    else if (dt == MSA_DT_F16)
        ((__half *)dst)[i] = __float2half_rn(v);
    else
        ((__nv_bfloat16 *)dst)[i] = __float2bfloat16_rn(v);
}

__global__ void fill_uniform_kernel(void *dst, size_t n, msa_dtype_t dt, uint64_t seed, float lo,
                                    float hi)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float u = (float)(mix64(seed ^ (i * 0xd1b54a32d192ed03ull)) >> 40) * (1.0f / 16777216.0f);
        store_as(dt, dst, i, lo + (hi - lo) * u);
    }
}

__global__ void convert_kernel(const float *src, void *dst, size_t n, msa_dtype_t dt)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        store_as(dt, dst, i, src[i]);
}

// One warp per (row, head): max |x| by shuffles, then the rounded quotients.
__global__ void quantize_i8_kernel(const float *src, size_t nrh, uint32_t D, int8_t *dst,
                                   float *scales)
{
    const unsigned lane = threadIdx.x & 31;
    for (size_t w = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32; w < nrh;
         w += (size_t)gridDim.x * blockDim.x / 32) {
        const float *x = src + w * D;
        float m = 0.0f;
        for (uint32_t d = lane; d < D; d += 32) m = fmaxf(m, fabsf(x[d]));
        for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        const float s = m / 127.0f;
        for (uint32_t d = lane; d < D; d += 32) {
            // roundf (halves away from zero) and NaN -> 0, as the host's
            // msa_tensor_quantize_i8; rintf would round halves to even.
            // (fmaxf would turn a NaN into -127, so test it first.)
            const float r = s > 0.0f ? roundf(x[d] / s) : 0.0f;
            dst[w * D + d] = r == r ? (int8_t)fminf(127.0f, fmaxf(-127.0f, r)) : 0;
        }
        if (lane == 0) scales[w] = s;
    }
}

// Each thread sums 16-byte words, several loads in flight; the block's sum is
// written so the compiler cannot drop the loads.
__global__ void read_reduce_kernel(const uint4 *src, size_t n, unsigned *sink)
{
    unsigned acc = 0;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        uint4 a = src[i], b = src[i + stride], c = src[i + 2 * stride], e = src[i + 3 * stride];
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ e.x ^ e.y ^
               e.z ^ e.w;
    }
    for (; i < n; i += stride) acc ^= src[i].x ^ src[i].y ^ src[i].z ^ src[i].w;
    if (acc == 0x9e3779b9u) atomicAdd(sink, 1u); // practically never; keeps the loads alive
}

static unsigned grid_for(const msa_dev_t *d, size_t n, unsigned block)
{
    size_t g = (n + block - 1) / block, cap = (size_t)d->prop.multiProcessorCount * 16;
    return (unsigned)(g < 1 ? 1 : g > cap ? cap : g);
}

extern "C" int msa__cuda_fill_uniform(msa_dev_lane_t *l, void *dst, size_t n, msa_dtype_t dt,
                                      uint64_t seed, float lo, float hi)
{
    if (dt != MSA_DT_F32 && dt != MSA_DT_F16 && dt != MSA_DT_BF16) return MSA_EINVAL;
    if (!n) return MSA_OK;
    MSA_CK(cudaSetDevice(l->dv->ordinal));
    fill_uniform_kernel<<<grid_for(l->dv, n, 256), 256, 0, l->stream>>>(dst, n, dt, seed, lo, hi);
    MSA_CK_LAUNCH(l, "fill_uniform_kernel");
    return MSA_OK;
}

extern "C" int msa__cuda_convert(msa_dev_lane_t *l, const float *src, void *dst, size_t n,
                                 msa_dtype_t dt)
{
    if (dt != MSA_DT_F32 && dt != MSA_DT_F16 && dt != MSA_DT_BF16) return MSA_EINVAL;
    if (!n) return MSA_OK;
    MSA_CK(cudaSetDevice(l->dv->ordinal));
    convert_kernel<<<grid_for(l->dv, n, 256), 256, 0, l->stream>>>(src, dst, n, dt);
    MSA_CK_LAUNCH(l, "convert_kernel");
    return MSA_OK;
}

extern "C" int msa__cuda_quantize_i8(msa_dev_lane_t *l, const float *src, size_t nrows, uint32_t H,
                                     uint32_t D, int8_t *dst, float *scales)
{
    if (!H || !D) return MSA_EINVAL;
    if (!nrows) return MSA_OK;
    MSA_CK(cudaSetDevice(l->dv->ordinal));
    size_t nrh = nrows * H;
    quantize_i8_kernel<<<grid_for(l->dv, nrh * 32, 256), 256, 0, l->stream>>>(src, nrh, D, dst,
                                                                              scales);
    MSA_CK_LAUNCH(l, "quantize_i8_kernel");
    return MSA_OK;
}

extern "C" int msa__cuda_read_bw(msa_dev_lane_t *l, const void *src, size_t bytes, int reps,
                                 double *gbps)
{
    *gbps = 0.0;
    if (bytes < 16 || bytes % 16 || reps < 1) return MSA_EINVAL;
    MSA_CK(cudaSetDevice(l->dv->ordinal));
    cudaEvent_t e0 = NULL, e1 = NULL;
    unsigned *sink = NULL;
    int rc = MSA_CK_RC(cudaEventCreate(&e0));
    if (rc == MSA_OK) rc = MSA_CK_RC(cudaEventCreate(&e1));
    if (rc == MSA_OK) rc = MSA_CK_RC(cudaMalloc(&sink, sizeof *sink));
    const unsigned grid = (unsigned)l->dv->prop.multiProcessorCount * 8;
    for (int r = 0; r <= reps && rc == MSA_OK; r++) { // r = 0 warms up
        rc = MSA_CK_RC(cudaEventRecord(e0, l->stream));
        if (rc != MSA_OK) break;
        read_reduce_kernel<<<grid, 256, 0, l->stream>>>((const uint4 *)src, bytes / 16, sink);
        rc = msa__cuda_after_launch(l, "read_reduce_kernel", __func__, __LINE__);
        if (rc == MSA_OK) rc = MSA_CK_RC(cudaEventRecord(e1, l->stream));
        if (rc == MSA_OK) rc = MSA_CK_RC(cudaEventSynchronize(e1));
        float ms = 0.0f;
        if (rc == MSA_OK) rc = MSA_CK_RC(cudaEventElapsedTime(&ms, e0, e1));
        if (rc == MSA_OK && r > 0 && ms > 0.0f) {
            double g = (double)bytes / (ms * 1e-3) / 1e9;
            if (g > *gbps) *gbps = g;
        }
    }
    if (sink) cudaFree(sink);
    if (e1) cudaEventDestroy(e1);
    if (e0) cudaEventDestroy(e0);
    return rc;
}
