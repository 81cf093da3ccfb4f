/* dev_cuda_impl.h — internals of the CUDA device (dev_cuda.cu and the op
 * files route_score.cu, route_select.cu, attend.cu): the device and lane
 * structs, the launch check (errors: cuda_status.h), the op entry
 * points the ops table calls (one shape for all: lane + descriptor), and a few
 * bench-only helpers (device-side data generation, a bandwidth probe).
 *
 * Not a public header. The C part (bench helpers) may be included from C
 * files; the structs and macros need CUDA C++ and sit behind __CUDACC__.
 * Threads: a lane is used by one thread at a time (dev.h); the device struct
 * is read-only after open except for the lane pool (dev.c's, in the head).
 */
#ifndef MSA_GPU_DEV_CUDA_IMPL_H
#define MSA_GPU_DEV_CUDA_IMPL_H

#include "dev_impl.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __CUDACC__
#include "cuda_status.h"

/* One lane: a stream of its own (non-blocking, never stream 0), a cuBLAS
 * handle bound to it with a workspace of its own (so cuBLAS never allocates
 * on the request path); device scratch and pinned host staging sit in the
 * head (the pool's part, dev_impl.h). */
struct msa_dev_lane {
    msa_dev_lane_head_t head; /* must stay first (dev.c casts) */
    struct msa_dev *dv;       /* owner, typed */
    cudaStream_t stream;
    cublasHandle_t blas;
    void *blas_ws_d; /* cuBLAS workspace, blas_ws_bytes */
    size_t blas_ws_bytes;
};

struct msa_dev {
    msa_dev_head_t head; /* must stay first (dev.c casts); holds the lane pool */
    int ordinal;
    cudaDeviceProp prop;
    msa_dev_info_t info;
    bool sync_check;        /* cfg.sync_check: sync after every launch */
    uint32_t gemm_min_cols; /* score: GEMM path when nq*ncol >= this (cfg.gemm_min_cols) */
};

/* CUDA, cuBLAS and NCCL statuses: MSA_CK / MSA_CK_RC of cuda_status.h. */

/* After a kernel launch: cudaGetLastError, and with sync_check a stream sync,
 * both translated. `what` names the kernel in the log. */
int msa__cuda_after_launch(struct msa_dev_lane *l, const char *what, const char *func, int line);
#define MSA_CK_LAUNCH(l, what)                                                \
    do {                                                                      \
        int ck_rc_ = msa__cuda_after_launch((l), (what), __func__, __LINE__); \
        if (ck_rc_ != MSA_OK) return ck_rc_;                                  \
    } while (0)

/* ---- ops: int msa__cuda_<op>(lane, &descriptor) ----------------------------------
 * Each queues its kernels on the lane's stream (cudaSetDevice is done by the
 * caller, dev_cuda.cu), takes its device scratch from the descriptor's
 * work/work_bytes, checks every launch with MSA_CK_LAUNCH and translates
 * every CUDA/cuBLAS status with MSA_CK / MSA_CK_RC. A bad descriptor is
 * MSA_EINVAL (logged), never a crash. */

/* route_score.cu: sets the kernels' shared-memory limits (once per open). */
int msa__cuda_score_init(struct msa_dev *d);
/* route_score.cu: the score contract of dev.h, queued on l's stream. */
int msa__cuda_score(struct msa_dev_lane *l, const msa_dev_score_args_t *a);
/* route_select.cu: the select contract of dev.h; synchronous. */
int msa__cuda_select(struct msa_dev_lane *l, const msa_dev_select_args_t *a);

/* Largest head dimension the attention kernels take. */
#define MSA_CUDA_ATTEND_MAX_D 256
/* attend.cu: the attend contract of dev.h (SEMANTICS "Attention"), queued on
 * l's stream: flash-decoding over K/V gathered from device blocks, GQA, fp32
 * online softmax. All pointers in a, and those inside a->blocks, are device
 * pointers; blocks with nrows = 0 may have NULL k/v. a->work (a->work_bytes
 * bytes, may be NULL) holds the partial results of the row splits: with less
 * of it the rows are split fewer ways (down to one, which needs no work at
 * all), so it only affects speed. MSA_EINVAL (logged, nothing queued) for
 * H = 0, Hq not a multiple of H, D = 0 or D > MSA_CUDA_ATTEND_MAX_D, kv_dtype
 * not F32/F16/BF16, a NULL pointer the shape needs; T = 0 or Hq = 0 queues
 * nothing and returns MSA_OK. */
int msa__cuda_attend(struct msa_dev_lane *l, const msa_dev_attend_args_t *a);
#endif /* __CUDACC__ */

#ifdef __cplusplus
extern "C" {
#endif

/* ---- bench helpers (tests/bench_gpu_route.c); queued on the lane's stream ---- */

/* dst[i] = uniform in [lo, hi) from a counter-based hash of (seed, i), for
 * dt F32, F16 or BF16 (rounded to nearest even). MSA_EINVAL for another dt. */
int msa__cuda_fill_uniform(msa_dev_lane_t *l, void *dst, size_t n, msa_dtype_t dt, uint64_t seed,
                           float lo, float hi);
/* dst = src (n float32 values) converted to dt (F32, F16, BF16). */
int msa__cuda_convert(msa_dev_lane_t *l, const float *src, void *dst, size_t n, msa_dtype_t dt);
/* Symmetric int8 per (row, head), as msa_tensor_quantize_i8: for nrows rows of
 * H*D float32, q = round(x / s), s = max|x[h,:]| / 127 (0 -> 0). */
int msa__cuda_quantize_i8(msa_dev_lane_t *l, const float *src, size_t nrows, uint32_t H, uint32_t D,
                          int8_t *dst, float *scales);
/* Reads bytes (a multiple of 16) of device memory at src with a read-reduce
 * kernel, reps times, and returns the best read bandwidth in GB/s (1e9 B/s),
 * timed with CUDA events on the lane's stream. Synchronous. */
int msa__cuda_read_bw(msa_dev_lane_t *l, const void *src, size_t bytes, int reps, double *gbps);

#ifdef __cplusplus
}
#endif
#endif
