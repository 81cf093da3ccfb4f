/* dev_impl.h — internals of the device layer: the table each implementation
 * (dev_cuda.cu, dev_sim.c) fills, and the header every lane starts with.
 * Only gpu/dev*.c* include it; dev.c dispatches the public calls through it.
 */
#ifndef MSA_GPU_DEV_IMPL_H
#define MSA_GPU_DEV_IMPL_H

#include "dev.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct msa_dev_ops {
    int (*count)(char *why, size_t len);
    int (*open)(int ordinal, unsigned lanes, size_t lane_scratch, size_t lane_staging,
                msa_dev_t **out);
    void (*close)(msa_dev_t *d);
    void (*get_info)(const msa_dev_t *d, msa_dev_info_t *out);
    int (*dmalloc)(msa_dev_t *d, size_t bytes, void **out);
    void (*dfree)(msa_dev_t *d, void *p);
    msa_dev_lane_t *(*lane_acquire)(msa_dev_t *d);
    void (*lane_release)(msa_dev_lane_t *l);
    void *(*lane_scratch)(msa_dev_lane_t *l, size_t *bytes);
    void *(*lane_staging)(msa_dev_lane_t *l, size_t *bytes);
    int (*h2d)(msa_dev_lane_t *l, void *dst, const void *src, size_t n);
    int (*d2h)(msa_dev_lane_t *l, void *dst, const void *src, size_t n);
    int (*d2d)(msa_dev_lane_t *l, void *dst, const void *src, size_t n);
    int (*lane_sync)(msa_dev_lane_t *l);
    int (*peer_copy)(msa_dev_lane_t *dst_lane, void *dst, msa_dev_lane_t *src_lane,
                     const void *src, size_t n, void *link);
    int (*score)(msa_dev_lane_t *l, const msa_dev_score_args_t *a);
    int (*select)(msa_dev_lane_t *l, const msa_dev_select_args_t *a);
    int (*attend)(msa_dev_lane_t *l, const msa_dev_attend_args_t *a);
    int (*host_alloc)(msa_dev_t *d, size_t bytes, void **out);
    void (*host_free)(msa_dev_t *d, void *p);
} msa_dev_ops_t;

/* Every msa_dev_t and msa_dev_lane_t of an implementation starts with these. */
typedef struct msa_dev_head {
    const msa_dev_ops_t *ops;
} msa_dev_head_t;

typedef struct msa_dev_lane_head {
    msa_dev_t *dev;
} msa_dev_lane_head_t;

extern const msa_dev_ops_t msa__dev_sim_ops;
#ifdef MSA_HAVE_CUDA
extern const msa_dev_ops_t msa__dev_cuda_ops;
/* dev_cuda_peer.cu: the CUDA peer copy (NCCL when linked, else cudaMemcpyPeer). */
int msa__cuda_peer_copy(msa_dev_lane_t *dst_lane, void *dst, msa_dev_lane_t *src_lane,
                        const void *src, size_t n, void *link);
#endif

/* Scratch bytes select needs (one formula for both implementations). */
size_t msa__dev_select_work(uint32_t n_ent, uint32_t top_k);

#ifdef __cplusplus
}
#endif
#endif
