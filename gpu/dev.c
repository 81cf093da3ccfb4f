/* dev.c — what the two devices share: dispatch of the device layer's public
 * calls to the implementation a device was opened with (CUDA or the host
 * simulation), the lane pool, the select scratch formula, and the mapping of
 * the environment onto msa_dev_config_t. */
#include "dev_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const msa_dev_ops_t *impl(const msa_dev_config_t *cfg)
{
#ifdef MSA_HAVE_CUDA
    return cfg->sim ? &msa__dev_sim_ops : &msa__dev_cuda_ops;
#else
    return cfg->sim ? &msa__dev_sim_ops : NULL;
#endif
}

#define HEAD(d) ((msa_dev_head_t *)(void *)(d))
#define OPS(d) (((const msa_dev_head_t *)(const void *)(d))->ops)
#define LANE(l) ((msa_dev_lane_head_t *)(void *)(l))
#define LANE_OPS(l) OPS(LANE(l)->dev)

/* ==== config ==================================================================== */

static uint64_t env_u64(const char *name, uint64_t dflt)
{
    const char *s = getenv(name);
    if (!s || !*s) return dflt;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    return *end ? dflt : (uint64_t)v;
}

void msa_dev_config_env(msa_dev_config_t *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    const char *sim = getenv("MSA_GPU_SIM");
    cfg->sim = sim && !strcmp(sim, "1");
    int n = (int)env_u64("MSA_GPU_SIM_DEVICES", 1);
    cfg->sim_devices = n > 0 ? n : -1;
    /* 0 MiB is a device without memory: 1 byte, as 0 would mean the default. */
    uint64_t mem = env_u64("MSA_GPU_SIM_MEM_MB", 4096) << 20;
    cfg->sim_mem_bytes = mem ? mem : 1;
    const char *fa = getenv("MSA_GPU_SIM_FAIL_AFTER");
    long after = fa && *fa ? atol(fa) : -1;
    cfg->sim_fault = after >= 0;
    cfg->sim_fail_after = after >= 0 ? (uint64_t)after : 0;
    cfg->sync_check = env_u64("MSA_GPU_SYNC_CHECK", 0) != 0;
    uint64_t mc = env_u64("MSA_GPU_GEMM_MIN_COLS", 17);
    cfg->gemm_min_cols = mc > UINT32_MAX ? UINT32_MAX : (uint32_t)(mc ? mc : 1);
}

/* ==== lane pool ================================================================= */

static msa_dev_lane_t *pool_lane(msa_dev_pool_t *p, unsigned i)
{
    return (msa_dev_lane_t *)(void *)(p->lanes + (size_t)i * p->lane_size);
}

int msa__dev_pool_open(msa_dev_t *d, unsigned n, size_t lane_size, size_t scratch, size_t staging)
{
    msa_dev_pool_t *p = &HEAD(d)->pool;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->lane_free, NULL);
    p->ready = true;
    p->lanes = calloc(n, lane_size);
    if (!p->lanes) return MSA_ENOMEM;
    p->lane_size = lane_size;
    p->n = n;
    for (unsigned i = 0; i < n; i++) {
        msa_dev_lane_t *l = pool_lane(p, i);
        LANE(l)->dev = d;
        int rc = OPS(d)->lane_open(l, scratch, staging);
        if (rc != MSA_OK) return rc;
    }
    return MSA_OK;
}

void msa__dev_pool_close(msa_dev_t *d)
{
    msa_dev_pool_t *p = &HEAD(d)->pool;
    if (!p->ready) return;
    for (unsigned i = 0; i < p->n; i++) OPS(d)->lane_close(pool_lane(p, i));
    free(p->lanes);
    pthread_cond_destroy(&p->lane_free);
    pthread_mutex_destroy(&p->mu);
    memset(p, 0, sizeof *p);
}

/* Blocks until a lane is free (a lane serves one thread at a time). */
msa_dev_lane_t *msa_dev_lane_acquire(msa_dev_t *d)
{
    msa_dev_pool_t *p = &HEAD(d)->pool;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        for (unsigned i = 0; i < p->n; i++) {
            msa_dev_lane_t *l = pool_lane(p, i);
            if (!LANE(l)->busy) {
                LANE(l)->busy = true;
                pthread_mutex_unlock(&p->mu);
                return l;
            }
        }
        pthread_cond_wait(&p->lane_free, &p->mu);
    }
}

void msa_dev_lane_release(msa_dev_lane_t *l)
{
    if (!l) return;
    msa_dev_pool_t *p = &HEAD(LANE(l)->dev)->pool;
    pthread_mutex_lock(&p->mu);
    LANE(l)->busy = false;
    pthread_cond_signal(&p->lane_free);
    pthread_mutex_unlock(&p->mu);
}

msa_dev_t *msa_dev_lane_dev(msa_dev_lane_t *l)
{
    return LANE(l)->dev;
}

void *msa_dev_lane_scratch(msa_dev_lane_t *l, size_t *bytes)
{
    if (bytes) *bytes = LANE(l)->scratch_bytes;
    return LANE(l)->scratch_d;
}

void *msa_dev_lane_staging(msa_dev_lane_t *l, size_t *bytes)
{
    if (bytes) *bytes = LANE(l)->staging_bytes;
    return LANE(l)->staging_h;
}

/* ==== dispatch ================================================================== */

int msa_dev_count(const msa_dev_config_t *cfg, char *why, size_t len)
{
    const msa_dev_ops_t *o = impl(cfg);
    if (!o) {
        if (why && len) snprintf(why, len, "built without CUDA");
        return 0;
    }
    return o->count(cfg, why, len);
}

int msa_dev_open(const msa_dev_config_t *cfg, int ordinal, unsigned lanes, size_t lane_scratch,
                 size_t lane_staging, msa_dev_t **out)
{
    const msa_dev_ops_t *o = impl(cfg);
    *out = NULL;
    if (!o) return MSA_EUNAVAIL;
    if (lanes == 0) return MSA_EINVAL;
    return o->open(cfg, ordinal, lanes, lane_scratch, lane_staging, out);
}

void msa_dev_close(msa_dev_t *d)
{
    if (d) OPS(d)->close(d);
}

void msa_dev_get_info(const msa_dev_t *d, msa_dev_info_t *out)
{
    OPS(d)->get_info(d, out);
}
int msa_dev_malloc(msa_dev_t *d, size_t bytes, void **out)
{
    return OPS(d)->dmalloc(d, bytes, out);
}
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
int msa_dev_lane_sync(msa_dev_lane_t *l)
{
    return LANE_OPS(l)->lane_sync(l);
}
int msa_dev_peer_copy(msa_dev_lane_t *dst_lane, void *dst, msa_dev_lane_t *src_lane,
                      const void *src, size_t n, void *link)
{
    if (LANE_OPS(dst_lane) != LANE_OPS(src_lane)) return MSA_EINVAL;
    return n ? LANE_OPS(dst_lane)->peer_copy(dst_lane, dst, src_lane, src, n, link) : MSA_OK;
}
int msa_dev_score(msa_dev_lane_t *l, const msa_dev_score_args_t *a)
{
    return LANE_OPS(l)->score(l, a);
}
int msa_dev_select(msa_dev_lane_t *l, const msa_dev_select_args_t *a)
{
    return LANE_OPS(l)->select(l, a);
}
int msa_dev_attend(msa_dev_lane_t *l, const msa_dev_attend_args_t *a)
{
    return LANE_OPS(l)->attend(l, a);
}

/* Ordered score keys (n_ent x 4 bytes) + top_k hits (16 bytes) + a 4 KiB tail
 * for state and alignment, each rounded to 256 B: both implementations carve
 * their scratch this way. */
size_t msa_dev_select_work(uint32_t n_ent, uint32_t top_k)
{
    size_t r = 256;
    size_t a = ((size_t)n_ent * 4 + r - 1) / r * r;
    size_t c = ((size_t)top_k * 16 + r - 1) / r * r;
    return a + c + 4096;
}
