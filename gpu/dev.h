/* dev.h — the device layer under the CUDA backend: device memory, pinned host
 * memory, copies on per-request lanes (a stream + scratch + cuBLAS handle), and
 * the kernels (routing scores, document select + top-k, attention).
 *
 * Two implementations share this contract:
 *   dev_cuda.cu   the GPU (nvcc, cuBLAS);
 *   dev_sim.c     a host simulation with the same semantics (memory is host
 *                 memory, kernels are plain C loops), picked by
 *                 msa_dev_config_t.sim so that the backend's host logic
 *                 (mirrors, shards, paging, coalescing, K/V cache) runs in the
 *                 CPU test suite. It is a test device, never a serving backend:
 *                 msad logs it loudly.
 * dev.c holds what they share: the dispatch, the lane pool, the config.
 *
 * Kernel contracts (both implementations, float32 accumulation):
 *
 *   score: for each query i < nq and row r < nrows of a key buffer
 *     C[h][c]  = scale(r,h) * sum_d key[r,h,d] * cols_i[h][c][d]
 *                (scale(r,h) = scales[r*H+h] for I8 keys, else 1)
 *     LINEAR   score = sum_h C[h][0]                      (ncol = 1)
 *     MAXVEC   score = max_c sum_h C[h][c]                (ncol = T')
 *     GENERAL  m_t = max_{h,g} C[h][t*G+g]  (ncol = T'*G)
 *              score = max_t m_t (QUERY_MAX) | mean_t m_t (QUERY_MEAN; LAST has T' = 1)
 *     scores[i*ld + r] = score (NaN allowed; select turns it into -inf)
 *
 *   select: per query, for each entry e (a document version) visible at the
 *     snapshot (created <= snapshot < deleted), nrows > 0, doc not in the
 *     sorted exclude list: doc score = max (or mean, chunk_mean) of
 *     scores[row0 - row_base .. + nrows); NaN -> -inf. Returns the top_k best
 *     (higher score, then smaller doc id), best first, in host memory.
 *
 *   attend: SEMANTICS "Attention" over R rows of K/V gathered from blocks:
 *     q [T][Hq][D] f32; blocks of rows [n][H][D] in kv_dtype; out [T][Hq][D]
 *     f32, lse [T][Hq] (natural log; -inf and 0 output when R = 0).
 *
 * Every op has one shape: msa_dev_<op>(lane, &args), where the lane brings the
 * stream (never stream 0; plus a cuBLAS handle and pinned staging) and args,
 * the op's descriptor, brings the device scratch (work, work_bytes).
 *
 * Threads: a msa_dev_t is shared; a lane is used by one thread at a time
 * (msa_dev_lane_acquire hands them out, blocking when all are busy).
 */
#ifndef MSA_GPU_DEV_H
#define MSA_GPU_DEV_H

#include "kernels.h"
#include "msa_err.h"
#include "schema.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct msa_dev msa_dev_t;
typedef struct msa_dev_lane msa_dev_lane_t;

/* How devices are opened. Zero is the default of every field, so a zeroed
 * config opens the CUDA devices with the usual settings. It travels down from
 * the engine's config (msa_engine_config_t.gpu.dev) through the backend's
 * (msa_gpu_config_t.dev); only the outermost layer (msad's options, the test
 * tools) may fill it from the environment, with msa_dev_config_env. */
typedef struct msa_dev_config {
    bool sim;                /* the simulated device of dev_sim.c (tests only) */
    int sim_devices;         /* sim: devices offered; 0 = 1, < 0 = none */
    uint64_t sim_mem_bytes;  /* sim: device memory of each; 0 = 4 GiB */
    bool sim_fault;          /* sim: inject a sticky fault: every kernel call after */
    uint64_t sim_fail_after; /*   the first sim_fail_after fails with MSA_EINTERNAL */
    bool sync_check;         /* CUDA: sync the stream after every launch, so an
                                  * asynchronous fault is reported by the launch that
                                  * caused it (debugging; slow) */
    uint32_t gemm_min_cols;  /* CUDA: score uses cuBLAS when nq * ncol >= this; 0 = 17
                                  * (up to 16 columns stream through the fused kernel);
                                  * 1 forces GEMM whenever the work space allows */
} msa_dev_config_t;

/* The thin mapping of the environment onto *cfg, for the outermost layer
 * only (msad's options, test tools); every field is set, an unset variable
 * gives the default:
 *   MSA_GPU_SIM=1             sim
 *   MSA_GPU_SIM_DEVICES=n     sim_devices (default 1; 0: none)
 *   MSA_GPU_SIM_MEM_MB=n      sim_mem_bytes (default 4096 MiB)
 *   MSA_GPU_SIM_FAIL_AFTER=n  sim_fault, sim_fail_after (negative: no fault)
 *   MSA_GPU_SYNC_CHECK=1      sync_check
 *   MSA_GPU_GEMM_MIN_COLS=n   gemm_min_cols (default 17; 0 counts as 1) */
void msa_dev_config_env(msa_dev_config_t *cfg);

typedef struct msa_dev_info {
    char name[128];
    int ordinal;
    bool sim;
    size_t total_bytes; /* device memory */
    size_t free_bytes;  /* at open */
} msa_dev_info_t;

/* Devices the implementation cfg picks offers: CUDA devices, or (sim)
 * cfg->sim_devices. 0 with a reason in why when none; never aborts (no GPU or
 * no driver is 0, not an error). */
int msa_dev_count(const msa_dev_config_t *cfg, char *why, size_t len);

/* Opens device ordinal with `lanes` lanes of lane_scratch bytes of device
 * scratch and lane_staging bytes of pinned host staging each. */
int msa_dev_open(const msa_dev_config_t *cfg, int ordinal, unsigned lanes, size_t lane_scratch,
                 size_t lane_staging, msa_dev_t **out);
void msa_dev_close(msa_dev_t *d);
void msa_dev_get_info(const msa_dev_t *d, msa_dev_info_t *out);

/* Device memory: startup only (arenas are carved from it; the request path
 * never allocates). MSA_ENOMEM when the device cannot provide it. */
int msa_dev_malloc(msa_dev_t *d, size_t bytes, void **out);
void msa_dev_free(msa_dev_t *d, void *p);

/* Pinned (page-locked, portable) host memory, so copies from it run by DMA
 * at full bus speed and truly asynchronously; the simulation uses malloc.
 * MSA_ENOMEM when it cannot be had (callers fall back to malloc). */
int msa_dev_host_alloc(msa_dev_t *d, size_t bytes, void **out);
void msa_dev_host_free(msa_dev_t *d, void *p);

/* ---- lanes ---------------------------------------------------------------------- */

msa_dev_lane_t *msa_dev_lane_acquire(msa_dev_t *d);
void msa_dev_lane_release(msa_dev_lane_t *l);
msa_dev_t *msa_dev_lane_dev(msa_dev_lane_t *l);
/* Device scratch and pinned host staging of the lane (sizes as opened). */
void *msa_dev_lane_scratch(msa_dev_lane_t *l, size_t *bytes);
void *msa_dev_lane_staging(msa_dev_lane_t *l, size_t *bytes);

/* Asynchronous copies on the lane's stream (host memory must stay valid until
 * msa_dev_lane_sync; pinned staging makes them truly asynchronous). */
int msa_dev_h2d(msa_dev_lane_t *l, void *dst, const void *src, size_t n);
int msa_dev_d2h(msa_dev_lane_t *l, void *dst, const void *src, size_t n);
int msa_dev_d2d(msa_dev_lane_t *l, void *dst, const void *src, size_t n);
/* Waits for everything queued on the lane. MSA_EINTERNAL on a device error
 * (the message is logged). */
int msa_dev_lane_sync(msa_dev_lane_t *l);

/* Queues a copy of n bytes from src, device memory of src_lane's device, to
 * dst on dst_lane's device (another device of the same implementation): the
 * data is at dst once dst_lane's stream reaches this point; the source must be
 * complete before the call and stay unchanged until then. link: the NCCL
 * communicator of gpu/nccl_comm.h (CUDA; NULL: cudaMemcpyPeerAsync), ignored
 * by the simulation. */
int msa_dev_peer_copy(msa_dev_lane_t *dst_lane, void *dst, msa_dev_lane_t *src_lane,
                      const void *src, size_t n, void *link);

/* ---- routing kernels ----------------------------------------------------------------- */

typedef enum {
    MSA_DEV_PLAN_LINEAR = 0,
    MSA_DEV_PLAN_MAXVEC = 1,
    MSA_DEV_PLAN_GENERAL = 2
} msa_dev_plan_t;

/* One document version as the device sees it (row0 is local to the shard's
 * key buffer). 32 bytes. */
typedef struct msa_dev_entry {
    uint64_t doc;
    uint64_t created;
    uint64_t deleted; /* UINT64_MAX while live */
    uint32_t row0;
    uint32_t nrows;
} msa_dev_entry_t;

typedef struct msa_dev_score_args {
    const void *keys;      /* device: nrows rows of H*D key_dtype values */
    const float *scales;   /* device: [nrows][H] for I8, else NULL */
    msa_dtype_t key_dtype; /* F32, F16, BF16, I8 */
    uint32_t nrows, H, D;
    msa_dev_plan_t plan;
    uint32_t ncol;                   /* columns per head per query */
    uint32_t G;                      /* query heads per kv head (GENERAL) */
    msa_query_reduce_t query_reduce; /* GENERAL: MAX or MEAN (LAST arrives as T' = 1) */
    const float *cols;               /* device: [nq][H][ncol][D] */
    uint32_t nq;
    float *scores; /* device: scores[i * ld + r] */
    size_t ld;
    void *work; /* device scratch for the GEMM path (may be NULL) */
    size_t work_bytes;
} msa_dev_score_args_t;

/* Queues the score kernel(s) on the lane. MSA_EINVAL for shapes it cannot run. */
int msa_dev_score(msa_dev_lane_t *l, const msa_dev_score_args_t *a);

typedef struct msa_dev_select_args {
    const float *scores; /* device: score of entry row r at scores[r - row_base] */
    uint32_t row_base;
    const msa_dev_entry_t *ent; /* device */
    uint32_t n_ent;
    uint64_t snapshot;
    const uint64_t *exclude; /* device, sorted ascending (may be NULL when n_exclude = 0) */
    uint32_t n_exclude;
    bool chunk_mean;
    uint32_t top_k; /* 1..MSA_MAX_TOP_K */
    void *work;     /* device scratch, at least msa_dev_select_work(n_ent, top_k) */
    size_t work_bytes;
    msa_idx_hit_t *out; /* host: top_k entries */
    uint32_t *n_out;    /* host */
} msa_dev_select_args_t;

size_t msa_dev_select_work(uint32_t n_ent, uint32_t top_k);
/* Runs doc reduce + top-k; synchronous (returns with *n_out hits in out).
 * Uses the lane's pinned staging (about top_k x 16 bytes + 64) to bring the
 * hits back: staging contents do not survive a select. */
int msa_dev_select(msa_dev_lane_t *l, const msa_dev_select_args_t *a);

/* ---- attention -------------------------------------------------------------------------- */

typedef struct msa_dev_kv_block {
    const void *k, *v; /* device: rows [nrows][H][D] of kv_dtype */
    uint32_t nrows;
} msa_dev_kv_block_t;

typedef struct msa_dev_attend_args {
    const float *q; /* device [T][Hq][D] */
    uint32_t T, Hq, H, D;
    float scale;
    msa_dtype_t kv_dtype;             /* F32, F16, BF16 */
    const msa_dev_kv_block_t *blocks; /* device array of n_blocks */
    uint32_t n_blocks;
    float *out;        /* device [T][Hq][D] */
    float *lse;        /* device [T][Hq] */
    void *work;        /* device scratch for the row splits (may be NULL: */
    size_t work_bytes; /*   fewer splits, same answer) */
} msa_dev_attend_args_t;

/* Queues the attention on the lane (contract above). MSA_EINVAL for shapes
 * it cannot run (D > 256 on CUDA, Hq not a multiple of H, ...). */
int msa_dev_attend(msa_dev_lane_t *l, const msa_dev_attend_args_t *a);

#ifdef __cplusplus
}
#endif
#endif
