/* dev_impl.h — internals of the device layer: the table each implementation
 * (dev_cuda.cu, dev_sim.c) fills, the header every device and lane starts
 * with, and the lane pool both implementations share (dev.c).
 * Only gpu/dev*.c* and the CUDA op files include it; dev.c dispatches the
 * public calls through it.
 */
#ifndef MSA_GPU_DEV_IMPL_H
#define MSA_GPU_DEV_IMPL_H

#include "dev.h"

#include <pthread.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct msa_dev_ops {
    int (*count)(const msa_dev_config_t *cfg, char *why, size_t len);
    int (*open)(const msa_dev_config_t *cfg, int ordinal, unsigned lanes, size_t lane_scratch,
                size_t lane_staging, msa_dev_t **out);
    void (*close)(msa_dev_t *d);
    void (*get_info)(const msa_dev_t *d, msa_dev_info_t *out);
    int (*dmalloc)(msa_dev_t *d, size_t bytes, void **out);
    void (*dfree)(msa_dev_t *d, void *p);
    int (*host_alloc)(msa_dev_t *d, size_t bytes, void **out);
    void (*host_free)(msa_dev_t *d, void *p);
    /* The implementation's part of one lane (msa__dev_pool_open calls it with
     * head.dev set and the rest zeroed): its stream and handles, and the
     * head's scratch (scratch bytes of device memory) and staging (staging
     * bytes of pinned host memory; none when 0). */
    int (*lane_open)(msa_dev_lane_t *l, size_t scratch, size_t staging);
    /* Undoes lane_open; safe on a lane it left half done, or never saw. */
    void (*lane_close)(msa_dev_lane_t *l);
    int (*h2d)(msa_dev_lane_t *l, void *dst, const void *src, size_t n);
    int (*d2h)(msa_dev_lane_t *l, void *dst, const void *src, size_t n);
    int (*d2d)(msa_dev_lane_t *l, void *dst, const void *src, size_t n);
    int (*lane_sync)(msa_dev_lane_t *l);
    int (*peer_copy)(msa_dev_lane_t *dst_lane, void *dst, msa_dev_lane_t *src_lane, const void *src,
                     size_t n, void *link);
    int (*score)(msa_dev_lane_t *l, const msa_dev_score_args_t *a);
    int (*select)(msa_dev_lane_t *l, const msa_dev_select_args_t *a);
    int (*attend)(msa_dev_lane_t *l, const msa_dev_attend_args_t *a);
} msa_dev_ops_t;

/* Every msa_dev_lane_t of an implementation starts with this. */
typedef struct msa_dev_lane_head {
    msa_dev_t *dev;
    bool busy;       /* guarded by the pool's mu */
    void *scratch_d; /* device scratch, scratch_bytes */
    size_t scratch_bytes;
    void *staging_h; /* pinned host staging, staging_bytes */
    size_t staging_bytes;
} msa_dev_lane_head_t;

/* The lanes of one device: each serves one thread at a time; acquire blocks
 * while all are busy. */
typedef struct msa_dev_pool {
    bool ready; /* mu and lane_free initialised */
    pthread_mutex_t mu;
    pthread_cond_t lane_free;
    unsigned char *lanes; /* n lanes of lane_size bytes, each led by a msa_dev_lane_head_t */
    size_t lane_size;
    unsigned n;
} msa_dev_pool_t;

/* Every msa_dev_t of an implementation starts with this. */
typedef struct msa_dev_head {
    const msa_dev_ops_t *ops;
    msa_dev_pool_t pool;
} msa_dev_head_t;

/* Creates the pool of device d (head.ops set): n lanes of lane_size bytes,
 * each opened with ops->lane_open. On failure the pool stays for
 * msa__dev_pool_close to take down (the implementation's close calls it). */
int msa__dev_pool_open(msa_dev_t *d, unsigned n, size_t lane_size, size_t scratch, size_t staging);
/* Closes every lane (ops->lane_close) and frees the pool; a no-op on a pool
 * never opened. No lane may be in use. */
void msa__dev_pool_close(msa_dev_t *d);

extern const msa_dev_ops_t msa__dev_sim_ops;
#ifdef MSA_HAVE_CUDA
extern const msa_dev_ops_t msa__dev_cuda_ops;
/* dev_cuda_peer.cu: the CUDA peer copy (NCCL when linked, else cudaMemcpyPeer). */
int msa__cuda_peer_copy(msa_dev_lane_t *dst_lane, void *dst, msa_dev_lane_t *src_lane,
                        const void *src, size_t n, void *link);
#endif

#ifdef __cplusplus
}
#endif
#endif
