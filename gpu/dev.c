/* dev.c — dispatches the device layer's public calls to the implementation a
 * device was opened with (CUDA or the host simulation). */
#include "dev_impl.h"

#include <stdio.h>

static const msa_dev_ops_t *impl(bool sim)
{
#ifdef MSA_HAVE_CUDA
    return sim ? &msa__dev_sim_ops : &msa__dev_cuda_ops;
#else
    return sim ? &msa__dev_sim_ops : NULL;
#endif
}

#define OPS(d) (((const msa_dev_head_t *)(const void *)(d))->ops)
#define LANE_OPS(l) OPS(((const msa_dev_lane_head_t *)(const void *)(l))->dev)

int msa_dev_count(bool sim, char *why, size_t len)
{
    const msa_dev_ops_t *o = impl(sim);
    if (!o) {
        if (why && len) snprintf(why, len, "msad was built without CUDA");
        return 0;
    }
    return o->count(why, len);
}

int msa_dev_open(bool sim, int ordinal, unsigned lanes, size_t lane_scratch, size_t lane_staging,
                 msa_dev_t **out)
{
    const msa_dev_ops_t *o = impl(sim);
    *out = NULL;
    if (!o) return MSA_EUNAVAIL;
    if (lanes == 0) return MSA_EINVAL;
    return o->open(ordinal, lanes, lane_scratch, lane_staging, out);
}

void msa_dev_close(msa_dev_t *d)
{
    if (d) OPS(d)->close(d);
}

void msa_dev_get_info(const msa_dev_t *d, msa_dev_info_t *out) { OPS(d)->get_info(d, out); }
int msa_dev_malloc(msa_dev_t *d, size_t bytes, void **out) { return OPS(d)->dmalloc(d, bytes, out); }
void msa_dev_free(msa_dev_t *d, void *p)
{
    if (p) OPS(d)->dfree(d, p);
}

int msa_dev_host_alloc(msa_dev_t *d, size_t bytes, void **out)
{
    return OPS(d)->host_alloc(d, bytes, out);
}
void msa_dev_host_free(msa_dev_t *d, void *p)
{
    if (p) OPS(d)->host_free(d, p);
}

msa_dev_lane_t *msa_dev_lane_acquire(msa_dev_t *d) { return OPS(d)->lane_acquire(d); }
void msa_dev_lane_release(msa_dev_lane_t *l)
{
    if (l) LANE_OPS(l)->lane_release(l);
}
msa_dev_t *msa_dev_lane_dev(msa_dev_lane_t *l) { return ((msa_dev_lane_head_t *)(void *)l)->dev; }
void *msa_dev_lane_scratch(msa_dev_lane_t *l, size_t *bytes) { return LANE_OPS(l)->lane_scratch(l, bytes); }
void *msa_dev_lane_staging(msa_dev_lane_t *l, size_t *bytes) { return LANE_OPS(l)->lane_staging(l, bytes); }
int msa_dev_h2d(msa_dev_lane_t *l, void *dst, const void *src, size_t n)
{
    return n ? LANE_OPS(l)->h2d(l, dst, src, n) : MSA_OK;
}
int msa_dev_d2h(msa_dev_lane_t *l, void *dst, const void *src, size_t n)
{
    return n ? LANE_OPS(l)->d2h(l, dst, src, n) : MSA_OK;
}
int msa_dev_d2d(msa_dev_lane_t *l, void *dst, const void *src, size_t n)
{
    return n ? LANE_OPS(l)->d2d(l, dst, src, n) : MSA_OK;
}
int msa_dev_lane_sync(msa_dev_lane_t *l) { return LANE_OPS(l)->lane_sync(l); }
int msa_dev_peer_copy(msa_dev_lane_t *dst_lane, void *dst, msa_dev_lane_t *src_lane,
                      const void *src, size_t n, void *link)
{
    if (LANE_OPS(dst_lane) != LANE_OPS(src_lane)) return MSA_EINVAL;
    return n ? LANE_OPS(dst_lane)->peer_copy(dst_lane, dst, src_lane, src, n, link) : MSA_OK;
}
int msa_dev_score(msa_dev_lane_t *l, const msa_dev_score_args_t *a) { return LANE_OPS(l)->score(l, a); }
int msa_dev_select(msa_dev_lane_t *l, const msa_dev_select_args_t *a) { return LANE_OPS(l)->select(l, a); }
int msa_dev_attend(msa_dev_lane_t *l, const msa_dev_attend_args_t *a) { return LANE_OPS(l)->attend(l, a); }

/* Ordered score keys (n_ent x 4 bytes) + top_k hits (16 bytes) + a 4 KiB tail
 * for state and alignment, each rounded to 256 B: both implementations carve
 * their scratch this way. */
size_t msa__dev_select_work(uint32_t n_ent, uint32_t top_k)
{
    size_t r = 256;
    size_t a = ((size_t)n_ent * 4 + r - 1) / r * r;
    size_t c = ((size_t)top_k * 16 + r - 1) / r * r;
    return a + c + 4096;
}

size_t msa_dev_select_work(uint32_t n_ent, uint32_t top_k) { return msa__dev_select_work(n_ent, top_k); }
