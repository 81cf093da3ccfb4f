/* dev_sim.c — the simulated device (msa_dev_config_t.sim; msad and the test
 * tools map MSA_GPU_SIM=1 onto it): the device layer's contract implemented
 * on the host, so the CUDA backend's host logic (mirrors, shards, paging,
 * coalescing, K/V cache, merges) runs in the CPU test suite.
 *
 * "Device memory" is host memory capped at cfg.sim_mem_bytes per device
 * (default 4 GiB; pages never touched cost nothing) so out-of-memory paths can
 * be exercised; copies are memcpy (completed at once, so lane_sync has nothing
 * to wait for); kernels are plain loops that follow dev.h word for word. Never
 * a serving backend. cfg.sim_fault makes every kernel call after the first
 * cfg.sim_fail_after fail with MSA_EINTERNAL, as a sticky CUDA error would
 * (fault-injection tests). The lane pool is dev.c's.
 */
#include "dev_impl.h"

#include "msa_log.h"
#include "tensor.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A simulated lane has nothing of its own: scratch and staging sit in the head. */
struct msa_dev_lane {
    msa_dev_lane_head_t head; /* must stay first (dev.c casts) */
};

struct msa_dev {
    msa_dev_head_t head; /* must stay first (dev.c casts) */
    int ordinal;
    bool fault; /* inject a fault after fail_after kernel calls */
    uint64_t fail_after;
    atomic_uint_fast64_t kernel_calls;
    size_t mem_cap, mem_used; /* bytes of simulated device memory */
    pthread_mutex_t lock;     /* mem_used */
};

/* Every simulated allocation carries its size in front, for the memory cap. */
typedef struct alloc_hdr {
    size_t bytes;
    size_t pad[7]; /* keeps the payload 64-byte aligned */
} alloc_hdr_t;

static int sim_count(const msa_dev_config_t *cfg, char *why, size_t len)
{
    int n = cfg->sim_devices ? cfg->sim_devices : 1;
    if (n <= 0 && why && len) snprintf(why, len, "MSA_GPU_SIM_DEVICES=0");
    return n > 0 ? n : 0;
}

static int sim_dmalloc(msa_dev_t *d, size_t bytes, void **out)
{
    *out = NULL;
    pthread_mutex_lock(&d->lock);
    bool fits = bytes <= d->mem_cap - d->mem_used;
    if (fits) d->mem_used += bytes;
    pthread_mutex_unlock(&d->lock);
    if (!fits) return MSA_ENOMEM;
    alloc_hdr_t *h = aligned_alloc(64, (sizeof *h + bytes + 63) / 64 * 64);
    if (!h) {
        pthread_mutex_lock(&d->lock);
        d->mem_used -= bytes;
        pthread_mutex_unlock(&d->lock);
        return MSA_ENOMEM;
    }
    h->bytes = bytes;
    *out = h + 1;
    return MSA_OK;
}

static void sim_dfree(msa_dev_t *d, void *p)
{
    alloc_hdr_t *h = (alloc_hdr_t *)p - 1;
    pthread_mutex_lock(&d->lock);
    d->mem_used -= h->bytes;
    pthread_mutex_unlock(&d->lock);
    free(h);
}

static int sim_lane_open(msa_dev_lane_t *l, size_t scratch, size_t staging)
{
    l->head.scratch_bytes = scratch;
    l->head.staging_bytes = staging;
    int rc = scratch ? sim_dmalloc(l->head.dev, scratch, &l->head.scratch_d) : MSA_OK;
    l->head.staging_h = staging ? malloc(staging) : NULL;
    return rc ? rc : staging && !l->head.staging_h ? MSA_ENOMEM : MSA_OK;
}

static void sim_lane_close(msa_dev_lane_t *l)
{
    if (l->head.scratch_d) sim_dfree(l->head.dev, l->head.scratch_d);
    free(l->head.staging_h);
}

static void sim_close(msa_dev_t *d)
{
    msa__dev_pool_close(d);
    pthread_mutex_destroy(&d->lock);
    free(d);
}

static int sim_open(const msa_dev_config_t *cfg, int ordinal, unsigned lanes, size_t lane_scratch,
                    size_t lane_staging, msa_dev_t **out)
{
    if (ordinal < 0 || ordinal >= sim_count(cfg, NULL, 0)) return MSA_EINVAL;
    msa_dev_t *d = calloc(1, sizeof *d);
    if (!d) return MSA_ENOMEM;
    d->head.ops = &msa__dev_sim_ops;
    d->ordinal = ordinal;
    d->mem_cap = cfg->sim_mem_bytes ? cfg->sim_mem_bytes : (size_t)4096 << 20;
    d->fault = cfg->sim_fault;
    d->fail_after = cfg->sim_fail_after;
    pthread_mutex_init(&d->lock, NULL);
    int rc = msa__dev_pool_open(d, lanes, sizeof(struct msa_dev_lane), lane_scratch, lane_staging);
    if (rc != MSA_OK) {
        sim_close(d);
        return rc;
    }
    *out = d;
    return MSA_OK;
}

static void sim_get_info(const msa_dev_t *d, msa_dev_info_t *out)
{
    memset(out, 0, sizeof *out);
    snprintf(out->name, sizeof out->name, "simulated device %d (host memory)", d->ordinal);
    out->ordinal = d->ordinal;
    out->sim = true;
    out->total_bytes = d->mem_cap;
    out->free_bytes = d->mem_cap - d->mem_used;
}

static int sim_copy(msa_dev_lane_t *l, void *dst, const void *src, size_t n)
{
    (void)l;
    memmove(dst, src, n);
    return MSA_OK;
}

static int sim_peer_copy(msa_dev_lane_t *dst_lane, void *dst, msa_dev_lane_t *src_lane,
                         const void *src, size_t n, void *link)
{
    (void)link;
    if (dst_lane->head.dev == src_lane->head.dev) return MSA_EINVAL;
    memmove(dst, src, n);
    return MSA_OK;
}

static int sim_lane_sync(msa_dev_lane_t *l)
{
    (void)l;
    return MSA_OK;
}

/* ==== kernels ============================================================== */

/* The fault injection of cfg.sim_fault (MSA_GPU_SIM_FAIL_AFTER). */
static int injected_fault(msa_dev_lane_t *l, const char *what)
{
    msa_dev_t *d = l->head.dev;
    if (!d->fault || atomic_fetch_add(&d->kernel_calls, 1) < d->fail_after) return MSA_OK;
    msa_log(MSA_LOG_ERROR, "simulated device %d: injected fault in %s", d->ordinal, what);
    return MSA_EINTERNAL;
}

static float key_value(msa_dtype_t dt, const void *keys, size_t i)
{
    switch (dt) {
    case MSA_DT_F32:
        return ((const float *)keys)[i];
    case MSA_DT_F16:
        return msa_f16_to_f32(((const uint16_t *)keys)[i]);
    case MSA_DT_BF16:
        return msa_bf16_to_f32(((const uint16_t *)keys)[i]);
    default:
        return (float)((const int8_t *)keys)[i];
    }
}

static int sim_score(msa_dev_lane_t *l, const msa_dev_score_args_t *a)
{
    if (injected_fault(l, "score")) return MSA_EINTERNAL;
    const uint32_t H = a->H, D = a->D, nc = a->ncol;
    if (!H || !D || !nc || (a->key_dtype == MSA_DT_I8 && !a->scales) ||
        (a->plan == MSA_DEV_PLAN_GENERAL && (!a->G || nc % a->G)))
        return MSA_EINVAL;
    float *C = malloc((size_t)H * nc * sizeof *C);
    if (!C) return MSA_ENOMEM;
    for (uint32_t i = 0; i < a->nq; i++) {
        const float *cols = a->cols + (size_t)i * H * nc * D;
        for (uint32_t r = 0; r < a->nrows; r++) {
            for (uint32_t h = 0; h < H; h++) {
                float sc = a->key_dtype == MSA_DT_I8 ? a->scales[(size_t)r * H + h] : 1.0f;
                for (uint32_t c = 0; c < nc; c++) {
                    const float *q = cols + ((size_t)h * nc + c) * D;
                    float s = 0.0f;
                    for (uint32_t d = 0; d < D; d++)
                        s += key_value(a->key_dtype, a->keys, ((size_t)r * H + h) * D + d) * q[d];
                    C[h * nc + c] = sc * s;
                }
            }
            float score;
            if (a->plan == MSA_DEV_PLAN_GENERAL) {
                uint32_t T = nc / a->G;
                float acc = a->query_reduce == MSA_QUERY_MAX ? -INFINITY : 0.0f;
                for (uint32_t t = 0; t < T; t++) {
                    float m = -INFINITY;
                    for (uint32_t h = 0; h < H; h++)
                        for (uint32_t g = 0; g < a->G; g++) {
                            float x = C[h * nc + t * a->G + g];
                            m = (x > m || x != x) ? x : m;
                        }
                    if (a->query_reduce == MSA_QUERY_MAX)
                        acc = (m > acc || m != m) ? m : acc;
                    else
                        acc += m;
                }
                score = a->query_reduce == MSA_QUERY_MAX ? acc : acc / (float)T;
            } else {
                score = -INFINITY;
                uint32_t ncv = a->plan == MSA_DEV_PLAN_LINEAR ? 1 : nc;
                for (uint32_t c = 0; c < ncv; c++) {
                    float s = 0.0f;
                    for (uint32_t h = 0; h < H; h++) s += C[h * nc + c];
                    score = (s > score || s != s) ? s : score;
                }
            }
            a->scores[(size_t)i * a->ld + r] = score;
        }
    }
    free(C);
    return MSA_OK;
}

static bool excluded(const uint64_t *ex, uint32_t n, uint64_t doc)
{
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (ex[mid] < doc)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && ex[lo] == doc;
}

static int sim_select(msa_dev_lane_t *l, const msa_dev_select_args_t *a)
{
    if (injected_fault(l, "select")) return MSA_EINTERNAL;
    if (a->top_k == 0 || a->top_k > MSA_MAX_TOP_K) return MSA_EINVAL;
    if (a->work_bytes < msa_dev_select_work(a->n_ent, a->top_k)) return MSA_EINVAL;
    msa_idx_topk_t tk;
    msa_idx_hit_t *heap = a->work; /* the heap lives in the lane's scratch, as on a GPU */
    msa_idx_topk_init(&tk, heap, a->top_k);
    for (uint32_t e = 0; e < a->n_ent; e++) {
        const msa_dev_entry_t *en = &a->ent[e];
        if (!(en->created <= a->snapshot && a->snapshot < en->deleted) || en->nrows == 0 ||
            excluded(a->exclude, a->n_exclude, en->doc))
            continue;
        const float *s = a->scores + (en->row0 - a->row_base);
        msa_idx_topk_push(&tk, msa_idx_chunk_reduce(s, en->nrows, a->chunk_mean), en->doc);
    }
    *a->n_out = msa_idx_topk_finish(&tk, a->out);
    return MSA_OK;
}

static int sim_attend(msa_dev_lane_t *l, const msa_dev_attend_args_t *a)
{
    if (injected_fault(l, "attend")) return MSA_EINTERNAL;
    size_t R = 0;
    for (uint32_t b = 0; b < a->n_blocks; b++) R += a->blocks[b].nrows;
    size_t w = (size_t)a->H * a->D;
    float *k = malloc((R ? R : 1) * w * sizeof *k);
    float *v = malloc((R ? R : 1) * w * sizeof *v);
    int rc = MSA_ENOMEM;
    if (k && v) {
        size_t off = 0;
        for (uint32_t b = 0; b < a->n_blocks; b++) {
            size_t n = (size_t)a->blocks[b].nrows * w;
            if (n == 0) continue; /* empty blocks may carry NULL pointers */
            msa_tensor_to_f32(a->kv_dtype, a->blocks[b].k, n, k + off);
            msa_tensor_to_f32(a->kv_dtype, a->blocks[b].v, n, v + off);
            off += n;
        }
        rc = msa_idx_attend(a->q, a->T, a->Hq, a->H, a->D, k, v, R, a->scale, a->out, a->lse, NULL);
    }
    free(k);
    free(v);
    return rc;
}

static int sim_host_alloc(msa_dev_t *d, size_t bytes, void **out)
{
    (void)d;
    *out = malloc(bytes ? bytes : 1);
    return *out ? MSA_OK : MSA_ENOMEM;
}

static void sim_host_free(msa_dev_t *d, void *p)
{
    (void)d;
    free(p);
}

const msa_dev_ops_t msa__dev_sim_ops = {
    .count = sim_count,
    .open = sim_open,
    .close = sim_close,
    .get_info = sim_get_info,
    .dmalloc = sim_dmalloc,
    .dfree = sim_dfree,
    .host_alloc = sim_host_alloc,
    .host_free = sim_host_free,
    .lane_open = sim_lane_open,
    .lane_close = sim_lane_close,
    .h2d = sim_copy,
    .d2h = sim_copy,
    .d2d = sim_copy,
    .lane_sync = sim_lane_sync,
    .peer_copy = sim_peer_copy,
    .score = sim_score,
    .select = sim_select,
    .attend = sim_attend,
};
