/* backend.c — the CUDA backend's host logic: device mirrors of the index's
 * routing keys (shards, lazy sync, LRU paging, streaming), coalesced query
 * passes, and Attend through the K/V block cache. See backend.h.
 *
 * Locks, in the order they may be taken:
 *   the index's collection rwlock (held shared by every route call: the index
 *   cannot change while a query runs, which is what makes lazy sync exact)
 *   -> mirror->lock (rwlock: exclusive to sync or evict, shared to query)
 *   -> mirror->qlock (coalescing queue)
 *   -> one device lane at a time, or several in device order (a pass)
 *   -> g->lock (mirror map, LRU, arenas, counters; never held while waiting).
 * Eviction takes other mirrors' locks with trywrlock only, so it never waits.
 */
#include "backend.h"

#include "arena.h"
#include "dev.h"
#include "kvcache.h"
#include "msa_clock.h"
#include "msa_log.h"
#include "nccl_comm.h"
#include "tensor.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_DEVICES 16
#define MAX_BATCH 16 /* queries per coalesced pass */
#define ALIGN 256

typedef struct gdev {
    msa_dev_t *dev;
    msa_dev_info_t info;
    void *route_base; /* device region of the routing arena */
    msa_gpu_arena_t *route_arena;
    void *cache_base;
    msa_gpu_kvcache_t *cache;
    uint64_t scratch_bytes; /* lanes' scratch, for memory_used */
} gdev_t;

/* One shard of one mirror: rows [0, n_rows) of its device buffers. */
typedef struct shard {
    unsigned dev;                           /* index into g->dev */
    uint64_t keys_off, scales_off, ent_off; /* arena offsets, MSA_GPU_ARENA_NONE if none */
    uint32_t cap_rows, cap_ent;
    uint32_t n_rows, n_ent;
    uint32_t *hidx; /* host entry index of each device entry */
} shard_t;

/* A query waiting in a coalescing queue; the pass's leader fills rc/out. */
typedef struct waiter {
    const msa_idx_scorer_t *scorer;
    msa_idx_colplan_t plan;
    uint64_t snapshot;
    const uint64_t *excl;
    size_t n_excl;
    uint32_t top_k;
    bool chunk_mean;
    msa_idx_hit_t *out;
    uint32_t *n_out;
    int rc;
    bool done;
    struct waiter *next;
} waiter_t;

typedef struct mirror {
    uint32_t coll, layer;
    pthread_rwlock_t lock;
    /* under lock (exclusive to change): */
    bool resident;
    uint64_t layout_gen, delete_gen;
    size_t synced_ent;
    uint64_t bytes; /* device bytes held */
    shard_t *sh;    /* [g->n_shards] */
    /* under g->lock: */
    uint64_t last_use;   /* LRU tick */
    int64_t last_use_ms; /* monotonic time of that use */
    /* coalescing, under qlock: */
    pthread_mutex_t qlock;
    pthread_cond_t qcond;
    waiter_t *pending;
    unsigned n_pending;
    bool leading;
    atomic_uint users; /* route calls of this mirror inside the backend */
    struct mirror *next;
} mirror_t;

struct msa_gpu {
    msa_gpu_config_t cfg;
    gdev_t dev[MAX_DEVICES];
    unsigned n_dev, n_shards;
    pthread_mutex_t lock;
    mirror_t *mirrors;
    uint64_t tick;
    void *link; /* NCCL communicator over the GPUs (>= 2 real GPUs), or NULL */
    _Atomic uint64_t n_routes, n_streamed, n_fallback, n_batches, n_coalesced, n_page_in,
        n_page_out, n_syncs, n_att_dev, n_att_fallback;
    _Atomic uint64_t pinned_bytes; /* host memory pinned for the index's row arrays */
    uint64_t pinned_cap;           /* at most this much (half the host's memory) */
    atomic_bool warned_fallback;
    atomic_bool disabled; /* set by a device failure: everything goes to the CPU */
};

/* A device error (not lack of room) may leave the CUDA context unusable (a
 * sticky error): the backend switches itself off and the CPU answers from
 * then on, exactly. A restart of msad tries the device again. */
static void device_failed(msa_gpu_t *g, const char *what, int rc)
{
    if (rc != MSA_EINTERNAL || atomic_exchange(&g->disabled, true)) return;
    msa_log(MSA_LOG_ERROR,
            "gpu: device error in %s (%s): the CUDA backend is off; Route and Attend are served "
            "by the CPU until msad restarts (Stats gpu.disabled = 1)",
            what, msa_strerror(rc));
}

static size_t align_up(size_t n)
{
    return (n + ALIGN - 1) / ALIGN * ALIGN;
}

static void *dptr(void *base, uint64_t off)
{
    return (char *)base + off;
}

/* ==== open / close ============================================================ */

static int dev_setup(msa_gpu_t *g, unsigned i, char *why, size_t len)
{
    gdev_t *d = &g->dev[i];
    unsigned lanes = g->cfg.lanes ? g->cfg.lanes : 4;
    uint64_t scratch = g->cfg.lane_scratch ? g->cfg.lane_scratch : (256ull << 20);
    int rc = msa_dev_open(&g->cfg.dev, (int)i, lanes, scratch, 8u << 20, &d->dev);
    if (rc) {
        snprintf(why, len, "device %u: cannot open with %u lanes of %llu MiB scratch (%s)", i,
                 lanes, (unsigned long long)(scratch >> 20), msa_strerror(rc));
        return rc;
    }
    d->scratch_bytes = (uint64_t)lanes * scratch;
    msa_dev_get_info(d->dev, &d->info);
    uint64_t route = g->cfg.routing_bytes ? g->cfg.routing_bytes : d->info.free_bytes / 100 * 75;
    uint64_t cache = g->cfg.cache_off     ? 0
                     : g->cfg.cache_bytes ? g->cfg.cache_bytes
                                          : d->info.free_bytes / 100 * 12;
    if (route == 0 || route + cache > d->info.free_bytes) {
        snprintf(why, len,
                 "device %u (%s): routing budget %.2f GiB + cache %.2f GiB > %.2f GiB free", i,
                 d->info.name, route / 1073741824.0, cache / 1073741824.0,
                 d->info.free_bytes / 1073741824.0);
        return MSA_ENOMEM;
    }
    if ((rc = msa_dev_malloc(d->dev, route, &d->route_base)) ||
        (rc = msa_gpu_arena_create(route, &d->route_arena))) {
        snprintf(why, len, "device %u: cannot reserve %.2f GiB for routing keys", i,
                 route / 1073741824.0);
        return rc;
    }
    if ((cache && (rc = msa_dev_malloc(d->dev, cache, &d->cache_base))) ||
        (rc = msa_gpu_kvcache_create(d->cache_base, cache, &d->cache))) {
        snprintf(why, len, "device %u: cannot reserve %.2f GiB for the K/V cache", i,
                 cache / 1073741824.0);
        return rc;
    }
    msa_log(MSA_LOG_INFO,
            "gpu: device %u %s: %.1f GiB, routing arena %.2f GiB, K/V cache %.2f GiB, %u lanes x "
            "%llu MiB scratch, %u shard%s",
            i, d->info.name, d->info.total_bytes / 1073741824.0, route / 1073741824.0,
            cache / 1073741824.0, lanes, (unsigned long long)(scratch >> 20), g->cfg.shards_per_gpu,
            g->cfg.shards_per_gpu == 1 ? "" : "s");
    return MSA_OK;
}

static void mirror_release_buffers(msa_gpu_t *g, mirror_t *m);

static void mirror_destroy(msa_gpu_t *g, mirror_t *m)
{
    mirror_release_buffers(g, m);
    for (unsigned s = 0; s < g->n_shards; s++) free(m->sh[s].hidx);
    free(m->sh);
    pthread_rwlock_destroy(&m->lock);
    pthread_mutex_destroy(&m->qlock);
    pthread_cond_destroy(&m->qcond);
    free(m);
}

void msa_gpu_close(msa_gpu_t *g)
{
    if (!g) return;
    while (g->mirrors) {
        mirror_t *m = g->mirrors;
        g->mirrors = m->next;
        mirror_destroy(g, m);
    }
    for (unsigned i = 0; i < g->n_dev; i++) {
        gdev_t *d = &g->dev[i];
        msa_gpu_kvcache_destroy(d->cache);
        msa_gpu_arena_destroy(d->route_arena);
        if (d->dev) {
            msa_dev_free(d->dev, d->cache_base);
            msa_dev_free(d->dev, d->route_base);
            msa_dev_close(d->dev);
        }
    }
#ifdef MSA_HAVE_CUDA
    msa_gpu_nccl_close(g->link);
#endif
    pthread_mutex_destroy(&g->lock);
    free(g);
}

int msa_gpu_open(const msa_gpu_config_t *cfg, msa_gpu_t **out, char *why, size_t len)
{
    *out = NULL;
    char reason[256] = "";
    int n = msa_dev_count(&cfg->dev, reason, sizeof reason);
    if (n <= 0) {
        snprintf(why, len, "no usable GPU (%s)", reason);
        return MSA_EUNAVAIL;
    }
    if (cfg->shards_per_gpu == 0 || cfg->shards_per_gpu > 64) {
        snprintf(why, len, "gpu-shards: %u, want 1..64", cfg->shards_per_gpu);
        return MSA_EINVAL;
    }
    msa_gpu_t *g = calloc(1, sizeof *g);
    if (!g) return MSA_ENOMEM;
    g->cfg = *cfg;
    pthread_mutex_init(&g->lock, NULL);
    g->n_dev = n > MAX_DEVICES ? MAX_DEVICES : (unsigned)n;
    int rc = MSA_OK;
    for (unsigned i = 0; i < g->n_dev && rc == MSA_OK; i++) rc = dev_setup(g, i, why, len);
    if (rc) {
        msa_gpu_close(g);
        return rc;
    }
    g->n_shards = g->n_dev * cfg->shards_per_gpu;
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    g->pinned_cap = pages > 0 && psz > 0 ? (uint64_t)pages * (uint64_t)psz / 2 : 0;
#ifdef MSA_HAVE_CUDA
    if (!cfg->dev.sim && g->n_dev >= 2) {
        char nwhy[256] = "";
        msa_gpu_nccl_t *nc = NULL;
        if (msa_gpu_nccl_open((int)g->n_dev, &nc, nwhy, sizeof nwhy) == MSA_OK)
            g->link = nc;
        else
            msa_log(MSA_LOG_WARN, "gpu: no NCCL (%s): K/V blocks move between GPUs by peer copy",
                    nwhy);
    }
#endif
    *out = g;
    return MSA_OK;
}

/* ==== arena allocation with LRU eviction ======================================= */

static void shard_free(msa_gpu_t *g, shard_t *s, size_t row_bytes, uint32_t H)
{
    msa_gpu_arena_t *a = g->dev[s->dev].route_arena;
    if (s->keys_off != MSA_GPU_ARENA_NONE)
        msa_gpu_arena_free(a, s->keys_off, (uint64_t)s->cap_rows * row_bytes);
    if (s->scales_off != MSA_GPU_ARENA_NONE)
        msa_gpu_arena_free(a, s->scales_off, (uint64_t)s->cap_rows * H * sizeof(float));
    if (s->ent_off != MSA_GPU_ARENA_NONE)
        msa_gpu_arena_free(a, s->ent_off, (uint64_t)s->cap_ent * sizeof(msa_dev_entry_t));
    s->keys_off = s->scales_off = s->ent_off = MSA_GPU_ARENA_NONE;
    s->cap_rows = s->cap_ent = s->n_rows = s->n_ent = 0;
}

/* Row sizes of a mirror are remembered at its first sync. */
typedef struct mirror_shape {
    size_t row_bytes;
    uint32_t H;
    bool i8;
} mirror_shape_t;

static mirror_shape_t *shape_of(mirror_t *m);

/* Frees every device buffer of m (caller holds m->lock exclusively or m is
 * unreachable). Takes g->lock. */
static void mirror_release_buffers(msa_gpu_t *g, mirror_t *m)
{
    mirror_shape_t *sp = shape_of(m);
    pthread_mutex_lock(&g->lock);
    for (unsigned s = 0; s < g->n_shards; s++) shard_free(g, &m->sh[s], sp->row_bytes, sp->H);
    m->bytes = 0;
    m->resident = false;
    m->synced_ent = 0;
    pthread_mutex_unlock(&g->lock);
}

/* Allocates n bytes in device d's routing arena, evicting least recently used
 * mirrors other than self that nobody is using and that were not used within
 * cfg.evict_grace_ms. MSA_GPU_ARENA_NONE when even
 * that cannot make room. Takes g->lock. */
static int64_t mono_ms(void)
{
    return msa_clock_ms();
}

static uint64_t route_alloc(msa_gpu_t *g, unsigned d, uint64_t n, mirror_t *self)
{
    int64_t now = mono_ms();
    pthread_mutex_lock(&g->lock);
    uint64_t off;
    while ((off = msa_gpu_arena_alloc(g->dev[d].route_arena, n)) == MSA_GPU_ARENA_NONE) {
        mirror_t *victim = NULL;
        for (mirror_t *m = g->mirrors; m; m = m->next) {
            if (m == self || m->bytes == 0) continue;
            /* A layer in use within the grace period stays: when the hot
             * set exceeds the budget, evicting it would make every query
             * upload layers in a cycle (LRU's worst case); streaming the
             * newcomer costs one pass instead. */
            if (now - m->last_use_ms < (int64_t)g->cfg.evict_grace_ms) continue;
            if (!victim || m->last_use < victim->last_use) {
                if (pthread_rwlock_trywrlock(&m->lock) != 0) continue;
                if (victim) pthread_rwlock_unlock(&victim->lock);
                victim = m;
            }
        }
        if (!victim) break;
        mirror_shape_t *sp = shape_of(victim);
        for (unsigned s = 0; s < g->n_shards; s++)
            shard_free(g, &victim->sh[s], sp->row_bytes, sp->H);
        victim->bytes = 0;
        victim->resident = false;
        victim->synced_ent = 0;
        pthread_rwlock_unlock(&victim->lock);
        atomic_fetch_add(&g->n_page_out, 1);
        msa_log(MSA_LOG_DEBUG, "gpu: paged out collection %u layer %u (LRU)", victim->coll,
                victim->layer);
    }
    pthread_mutex_unlock(&g->lock);
    return off;
}

/* ==== mirrors ======================================================================== */

/* The shape lives right after the mirror struct (allocated together). */
static mirror_shape_t *shape_of(mirror_t *m)
{
    return (mirror_shape_t *)(void *)(m + 1);
}

static mirror_t *mirror_get(msa_gpu_t *g, uint32_t coll, uint32_t layer)
{
    pthread_mutex_lock(&g->lock);
    mirror_t *m = g->mirrors;
    while (m && !(m->coll == coll && m->layer == layer)) m = m->next;
    if (!m) {
        m = calloc(1, sizeof *m + sizeof(mirror_shape_t));
        shard_t *sh = m ? calloc(g->n_shards, sizeof *sh) : NULL;
        if (!sh) {
            free(m);
            pthread_mutex_unlock(&g->lock);
            return NULL;
        }
        m->coll = coll;
        m->layer = layer;
        m->sh = sh;
        for (unsigned s = 0; s < g->n_shards; s++) {
            sh[s].dev = s % g->n_dev;
            sh[s].keys_off = sh[s].scales_off = sh[s].ent_off = MSA_GPU_ARENA_NONE;
        }
        pthread_rwlock_init(&m->lock, NULL);
        pthread_mutex_init(&m->qlock, NULL);
        pthread_cond_init(&m->qcond, NULL);
        m->next = g->mirrors;
        g->mirrors = m;
    }
    m->last_use = ++g->tick;
    m->last_use_ms = mono_ms();
    pthread_mutex_unlock(&g->lock);
    return m;
}

static bool mirror_fresh(const mirror_t *m, const msa_idx_layer_view_t *v)
{
    return m->resident && m->layout_gen == v->layout_gen && m->delete_gen == v->delete_gen &&
           m->synced_ent == v->n_ent;
}

/* Grows shard s so that it holds rows more rows and ents more entries,
 * copying what it has. MSA_EFULL when the arena cannot make room (s is left
 * as it was), a device error when a copy failed (the new ranges are given
 * back, the old ones kept). */
static int shard_reserve(msa_gpu_t *g, mirror_t *m, shard_t *s, msa_dev_lane_t *lane, uint32_t rows,
                         uint32_t ents)
{
    mirror_shape_t *sp = shape_of(m);
    gdev_t *d = &g->dev[s->dev];
    const uint64_t row_dev = sp->row_bytes + (sp->i8 ? sp->H * sizeof(float) : 0);
    /* Sums in 64 bits: n_rows + rows (both uint32) may wrap, which would
     * skip the growth and let the append write past the buffer. */
    if ((uint64_t)s->n_rows + rows > s->cap_rows || s->keys_off == MSA_GPU_ARENA_NONE) {
        uint64_t cap = ((uint64_t)s->n_rows + rows) * 5 / 4 + 64;
        if (cap > UINT32_MAX) return MSA_EFULL;
        uint64_t k = route_alloc(g, s->dev, cap * sp->row_bytes, m);
        uint64_t sc =
            sp->i8 ? route_alloc(g, s->dev, cap * sp->H * sizeof(float), m) : MSA_GPU_ARENA_NONE;
        int rc =
            (k == MSA_GPU_ARENA_NONE || (sp->i8 && sc == MSA_GPU_ARENA_NONE)) ? MSA_EFULL : MSA_OK;
        if (rc == MSA_OK && s->keys_off != MSA_GPU_ARENA_NONE) {
            rc = msa_dev_d2d(lane, dptr(d->route_base, k), dptr(d->route_base, s->keys_off),
                             (size_t)s->n_rows * sp->row_bytes);
            if (rc == MSA_OK && sp->i8)
                rc = msa_dev_d2d(lane, dptr(d->route_base, sc), dptr(d->route_base, s->scales_off),
                                 (size_t)s->n_rows * sp->H * sizeof(float));
            /* The old ranges are reused only after the copies ran. */
            int sync = msa_dev_lane_sync(lane);
            if (rc == MSA_OK) rc = sync;
        }
        pthread_mutex_lock(&g->lock);
        if (rc != MSA_OK) {
            if (k != MSA_GPU_ARENA_NONE) msa_gpu_arena_free(d->route_arena, k, cap * sp->row_bytes);
            if (sc != MSA_GPU_ARENA_NONE)
                msa_gpu_arena_free(d->route_arena, sc, cap * sp->H * sizeof(float));
            pthread_mutex_unlock(&g->lock);
            return rc;
        }
        if (s->keys_off != MSA_GPU_ARENA_NONE) {
            msa_gpu_arena_free(d->route_arena, s->keys_off, (uint64_t)s->cap_rows * sp->row_bytes);
            if (sp->i8)
                msa_gpu_arena_free(d->route_arena, s->scales_off,
                                   (uint64_t)s->cap_rows * sp->H * sizeof(float));
            m->bytes -= (uint64_t)s->cap_rows * row_dev;
        }
        s->keys_off = k;
        s->scales_off = sc;
        s->cap_rows = (uint32_t)cap;
        m->bytes += cap * row_dev;
        pthread_mutex_unlock(&g->lock);
    }
    if ((uint64_t)s->n_ent + ents > s->cap_ent || s->ent_off == MSA_GPU_ARENA_NONE) {
        uint64_t cap = ((uint64_t)s->n_ent + ents) * 5 / 4 + 64;
        if (cap > UINT32_MAX) return MSA_EFULL;
        uint32_t *hidx = realloc(s->hidx, cap * sizeof *hidx);
        if (!hidx) return MSA_ENOMEM;
        s->hidx = hidx;
        uint64_t e = route_alloc(g, s->dev, cap * sizeof(msa_dev_entry_t), m);
        if (e == MSA_GPU_ARENA_NONE) return MSA_EFULL;
        int rc = MSA_OK;
        if (s->ent_off != MSA_GPU_ARENA_NONE) {
            rc = msa_dev_d2d(lane, dptr(d->route_base, e), dptr(d->route_base, s->ent_off),
                             (size_t)s->n_ent * sizeof(msa_dev_entry_t));
            int sync = msa_dev_lane_sync(lane);
            if (rc == MSA_OK) rc = sync;
        }
        pthread_mutex_lock(&g->lock);
        if (rc != MSA_OK) {
            msa_gpu_arena_free(d->route_arena, e, cap * sizeof(msa_dev_entry_t));
            pthread_mutex_unlock(&g->lock);
            return rc;
        }
        if (s->ent_off != MSA_GPU_ARENA_NONE) {
            msa_gpu_arena_free(d->route_arena, s->ent_off,
                               (uint64_t)s->cap_ent * sizeof(msa_dev_entry_t));
            m->bytes -= (uint64_t)s->cap_ent * sizeof(msa_dev_entry_t);
        }
        s->ent_off = e;
        s->cap_ent = (uint32_t)cap;
        m->bytes += cap * sizeof(msa_dev_entry_t);
        pthread_mutex_unlock(&g->lock);
    }
    return MSA_OK;
}

/* Uploads device entries [from, s->n_ent) of shard s, rebuilt from the host
 * entries through the lane's pinned staging (synchronised per chunk, since the
 * staging is reused). Device row0 is the entry's row in the shard buffer. */
static int shard_upload_entries(msa_gpu_t *g, shard_t *s, msa_dev_lane_t *lane,
                                const msa_idx_layer_view_t *v, uint32_t from,
                                const uint32_t *local_row0)
{
    size_t cap;
    msa_dev_entry_t *st = msa_dev_lane_staging(lane, &cap);
    cap /= sizeof *st;
    gdev_t *d = &g->dev[s->dev];
    msa_dev_entry_t *dst = dptr(d->route_base, s->ent_off);
    for (uint32_t i = from; i < s->n_ent;) {
        uint32_t n = s->n_ent - i < cap ? s->n_ent - i : (uint32_t)cap;
        for (uint32_t j = 0; j < n; j++) {
            const msa_idx_entry_t *e = &v->ent[s->hidx[i + j]];
            st[j] = (msa_dev_entry_t){.doc = e->doc,
                                      .created = e->created,
                                      .deleted = e->deleted,
                                      .row0 = local_row0[i + j],
                                      .nrows = e->nrows};
        }
        int rc = msa_dev_h2d(lane, dst + i, st, n * sizeof *st);
        if (rc == MSA_OK) rc = msa_dev_lane_sync(lane);
        if (rc) return rc;
        i += n;
    }
    return MSA_OK;
}

/* Local row0 of every device entry of shard s (prefix sums of nrows). */
static uint32_t *shard_row0s(const shard_t *s, const msa_idx_layer_view_t *v)
{
    uint32_t *r = malloc((s->n_ent ? s->n_ent : 1) * sizeof *r);
    if (!r) return NULL;
    uint32_t at = 0;
    for (uint32_t i = 0; i < s->n_ent; i++) {
        r[i] = at;
        at += v->ent[s->hidx[i]].nrows;
    }
    return r;
}

/* Appends host entries [e0, e1) (contiguous rows) to shard s. */
static int shard_append(msa_gpu_t *g, mirror_t *m, shard_t *s, msa_dev_lane_t *lane,
                        const msa_idx_layer_view_t *v, size_t e0, size_t e1)
{
    mirror_shape_t *sp = shape_of(m);
    uint64_t rows = 0;
    for (size_t e = e0; e < e1; e++) rows += v->ent[e].nrows;
    if (rows > UINT32_MAX) return MSA_EFULL;
    int rc = shard_reserve(g, m, s, lane, (uint32_t)rows, (uint32_t)(e1 - e0));
    if (rc) return rc;
    gdev_t *d = &g->dev[s->dev];
    uint64_t r0 = v->ent[e0].row0;
    rc = msa_dev_h2d(lane,
                     (char *)dptr(d->route_base, s->keys_off) + (size_t)s->n_rows * sp->row_bytes,
                     v->rows + r0 * sp->row_bytes, (size_t)rows * sp->row_bytes);
    if (rc == MSA_OK && sp->i8)
        rc = msa_dev_h2d(lane,
                         (float *)dptr(d->route_base, s->scales_off) + (size_t)s->n_rows * sp->H,
                         v->scales + r0 * sp->H, (size_t)rows * sp->H * sizeof(float));
    if (rc) return rc;
    for (size_t e = e0; e < e1; e++) s->hidx[s->n_ent++] = (uint32_t)e;
    s->n_rows += (uint32_t)rows;
    return MSA_OK;
}

/* Brings m in step with the index view (caller holds m->lock exclusively and
 * the collection's read lock). On MSA_EFULL the mirror is left non-resident
 * (the query streams); other errors are device failures. */
static int mirror_sync(msa_gpu_t *g, mirror_t *m, const msa_idx_layer_view_t *v)
{
    mirror_shape_t *sp = shape_of(m);
    bool full = !m->resident || m->layout_gen != v->layout_gen || v->n_ent < m->synced_ent;
    if (full) {
        mirror_release_buffers(g, m);
        for (unsigned s = 0; s < g->n_shards; s++) m->sh[s].n_ent = m->sh[s].n_rows = 0;
        sp->row_bytes = v->row_bytes;
        sp->H = v->schema->kv_heads;
        sp->i8 = v->key_dtype == MSA_DT_I8;
        atomic_fetch_add(&g->n_page_in, 1);
    }
    atomic_fetch_add(&g->n_syncs, 1);
    uint32_t old_ent[MAX_DEVICES * 64];
    for (unsigned s = 0; s < g->n_shards; s++) old_ent[s] = m->sh[s].n_ent;

    /* New entries: a rebuild splits them into contiguous runs of about equal
     * rows, one per shard; appends go as one run to the smallest shard. */
    size_t e = m->synced_ent;
    uint64_t total = 0;
    for (size_t i = e; i < v->n_ent; i++) total += v->ent[i].nrows;
    int rc = MSA_OK;
    for (unsigned k = 0; k < g->n_shards && e < v->n_ent && rc == MSA_OK; k++) {
        unsigned target = k;
        size_t end = v->n_ent;
        if (!full) {
            for (unsigned s = 1; s < g->n_shards; s++)
                if (m->sh[s].n_rows < m->sh[target].n_rows) target = s;
            k = g->n_shards; /* one run */
        } else if (k + 1 < g->n_shards) {
            uint64_t want = total / g->n_shards, got = 0;
            end = e;
            while (end < v->n_ent && (got < want || end == e)) got += v->ent[end++].nrows;
        }
        shard_t *s = &m->sh[target];
        msa_dev_lane_t *lane = msa_dev_lane_acquire(g->dev[s->dev].dev);
        rc = shard_append(g, m, s, lane, v, e, end);
        /* Always drain: a failed append may have queued copies into ranges
         * that are about to be given back. */
        int sync = msa_dev_lane_sync(lane);
        if (rc == MSA_OK) rc = sync;
        msa_dev_lane_release(lane);
        e = end;
    }
    /* Entry tables: all of them when deleted seqs changed, else the new tail. */
    bool deletes = full || m->delete_gen != v->delete_gen;
    for (unsigned s = 0; s < g->n_shards && rc == MSA_OK; s++) {
        shard_t *sh = &m->sh[s];
        uint32_t from = deletes ? 0 : old_ent[s];
        if (from == sh->n_ent) continue;
        if (sh->ent_off == MSA_GPU_ARENA_NONE) continue;
        uint32_t *row0 = shard_row0s(sh, v);
        if (!row0) {
            rc = MSA_ENOMEM;
            break;
        }
        msa_dev_lane_t *lane = msa_dev_lane_acquire(g->dev[sh->dev].dev);
        rc = shard_upload_entries(g, sh, lane, v, from, row0);
        msa_dev_lane_release(lane);
        free(row0);
    }
    if (rc) {
        mirror_release_buffers(g, m);
        return rc;
    }
    m->resident = true;
    m->layout_gen = v->layout_gen;
    m->delete_gen = v->delete_gen;
    m->synced_ent = v->n_ent;
    return MSA_OK;
}

/* ==== device passes ===================================================================== */

typedef struct carve {
    char *base;
    size_t at, cap;
} carve_t;

static void *carve(carve_t *c, size_t n)
{
    n = align_up(n ? n : 1);
    if (c->at + n > c->cap) return NULL;
    void *p = c->base + c->at;
    c->at += n;
    return p;
}

static msa_dev_plan_t dev_plan(int plan)
{
    return plan == 2 ? MSA_DEV_PLAN_GENERAL : plan == 1 ? MSA_DEV_PLAN_MAXVEC : MSA_DEV_PLAN_LINEAR;
}

/* Columns of every query of the batch, [nq][H][ncol][D], in host memory. */
static float *batch_columns(waiter_t *const *w, unsigned nq, size_t *bytes)
{
    const msa_idx_colplan_t *p = &w[0]->plan;
    size_t per = (size_t)p->H * p->ncol * p->D;
    float *cols = malloc(nq * per * sizeof *cols);
    if (!cols) return NULL;
    for (unsigned i = 0; i < nq; i++) msa_idx_scorer_columns(w[i]->scorer, cols + i * per);
    *bytes = nq * per * sizeof *cols;
    return cols;
}

static void score_args(const msa_idx_colplan_t *p, msa_dtype_t dt, unsigned nq,
                       msa_dev_score_args_t *a)
{
    *a = (msa_dev_score_args_t){.key_dtype = dt,
                                .H = p->H,
                                .D = p->D,
                                .plan = dev_plan(p->plan),
                                .ncol = p->ncol,
                                .G = p->G,
                                .query_reduce = p->query_reduce,
                                .nq = nq};
}

/* Merges one shard's hits of one query into its running top-k. */
static void merge_hits(msa_idx_topk_t *tk, const msa_idx_hit_t *h, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) msa_idx_topk_push(tk, h[i].score, h[i].id);
}

/* Scratch of one device lane for a pass: the batch's columns and excludes,
 * the scores of every shard on the device, the select work, and what is left
 * for the GEMM path. */
typedef struct pass_dev {
    msa_dev_lane_t *lane;
    float *cols;
    const uint64_t *excl[MAX_BATCH];
    float *scores[64]; /* per local shard (s / n_dev) */
    void *sel_work;
    size_t sel_bytes;
    void *gemm_work;
    size_t gemm_bytes;
} pass_dev_t;

static int pass_dev_setup(msa_gpu_t *g, mirror_t *m, unsigned d, waiter_t *const *w, unsigned nq,
                          const float *cols_h, size_t cols_bytes, pass_dev_t *p)
{
    size_t cap;
    carve_t cv = {.base = msa_dev_lane_scratch(p->lane, &cap), .cap = cap};
    if (!(p->cols = carve(&cv, cols_bytes))) return MSA_EUNAVAIL;
    int rc = msa_dev_h2d(p->lane, p->cols, cols_h, cols_bytes);
    uint32_t kmax = 1, emax = 0;
    for (unsigned i = 0; i < nq && rc == MSA_OK; i++) {
        kmax = w[i]->top_k > kmax ? w[i]->top_k : kmax;
        p->excl[i] = NULL;
        if (!w[i]->n_excl) continue;
        uint64_t *x = carve(&cv, w[i]->n_excl * sizeof *x);
        if (!x) return MSA_EUNAVAIL;
        p->excl[i] = x;
        rc = msa_dev_h2d(p->lane, x, w[i]->excl, w[i]->n_excl * sizeof *x);
    }
    for (unsigned s = d, j = 0; s < g->n_shards && rc == MSA_OK; s += g->n_dev, j++) {
        const shard_t *sh = &m->sh[s];
        p->scores[j] = NULL;
        if (!sh->n_ent) continue;
        emax = sh->n_ent > emax ? sh->n_ent : emax;
        if (!(p->scores[j] = carve(&cv, (size_t)nq * sh->n_rows * sizeof(float))))
            return MSA_EUNAVAIL;
    }
    p->sel_bytes = msa_dev_select_work(emax, kmax);
    if (!(p->sel_work = carve(&cv, p->sel_bytes))) return MSA_EUNAVAIL;
    p->gemm_work = cv.base + cv.at;
    p->gemm_bytes = cv.cap - cv.at;
    return rc;
}

/* One pass over the resident shards for nq compatible queries (same plan and
 * column count). Caller holds m->lock shared and m is fresh. Sets every
 * waiter's rc (and its hits when MSA_OK). */
static void run_batch(msa_gpu_t *g, mirror_t *m, msa_dtype_t key_dtype, waiter_t *const *w,
                      unsigned nq)
{
    mirror_shape_t *sp = shape_of(m);
    size_t cols_bytes = 0;
    float *cols_h = batch_columns(w, nq, &cols_bytes);
    msa_idx_hit_t *heaps = malloc((size_t)nq * MSA_MAX_TOP_K * sizeof *heaps);
    msa_idx_hit_t *hits = malloc(MSA_MAX_TOP_K * sizeof *hits);
    msa_idx_topk_t tk[MAX_BATCH];
    pass_dev_t pd[MAX_DEVICES];
    memset(pd, 0, sizeof pd);
    int rc = (cols_h && heaps && hits) ? MSA_OK : MSA_ENOMEM;
    for (unsigned i = 0; i < nq && rc == MSA_OK; i++)
        msa_idx_topk_init(&tk[i], heaps + (size_t)i * MSA_MAX_TOP_K, w[i]->top_k);

    /* Scores: one lane per device, taken in device order (passes never
     * deadlock on lanes); kernels of all devices queue before any select. */
    for (unsigned d = 0; d < g->n_dev && rc == MSA_OK; d++) {
        bool used = false;
        for (unsigned s = d; s < g->n_shards; s += g->n_dev) used |= m->sh[s].n_ent > 0;
        if (!used) continue;
        pd[d].lane = msa_dev_lane_acquire(g->dev[d].dev);
        rc = pass_dev_setup(g, m, d, w, nq, cols_h, cols_bytes, &pd[d]);
        for (unsigned s = d, j = 0; s < g->n_shards && rc == MSA_OK; s += g->n_dev, j++) {
            const shard_t *sh = &m->sh[s];
            if (!sh->n_ent) continue;
            msa_dev_score_args_t a;
            score_args(&w[0]->plan, key_dtype, nq, &a);
            a.keys = dptr(g->dev[d].route_base, sh->keys_off);
            a.scales = sp->i8 ? dptr(g->dev[d].route_base, sh->scales_off) : NULL;
            a.nrows = sh->n_rows;
            a.cols = pd[d].cols;
            a.scores = pd[d].scores[j];
            a.ld = sh->n_rows;
            a.work = pd[d].gemm_work;
            a.work_bytes = pd[d].gemm_bytes;
            rc = msa_dev_score(pd[d].lane, &a);
        }
    }
    /* Selects: synchronous per shard while the other devices keep computing;
     * each shard's candidates merge into the query's top-k on the host. */
    for (unsigned s = 0; s < g->n_shards && rc == MSA_OK; s++) {
        const shard_t *sh = &m->sh[s];
        pass_dev_t *p = &pd[sh->dev];
        if (!sh->n_ent) continue;
        for (unsigned i = 0; i < nq && rc == MSA_OK; i++) {
            uint32_t n = 0;
            msa_dev_select_args_t a = {.scores = p->scores[s / g->n_dev] + (size_t)i * sh->n_rows,
                                       .ent = dptr(g->dev[sh->dev].route_base, sh->ent_off),
                                       .n_ent = sh->n_ent,
                                       .snapshot = w[i]->snapshot,
                                       .exclude = p->excl[i],
                                       .n_exclude = (uint32_t)w[i]->n_excl,
                                       .chunk_mean = w[i]->chunk_mean,
                                       .top_k = w[i]->top_k,
                                       .work = p->sel_work,
                                       .work_bytes = p->sel_bytes,
                                       .out = hits,
                                       .n_out = &n};
            rc = msa_dev_select(p->lane, &a);
            if (rc == MSA_OK) merge_hits(&tk[i], hits, n);
        }
    }
    for (unsigned d = 0; d < g->n_dev; d++) {
        /* On failure copies from cols_h/excludes may still be queued: drain
         * before the host buffers are freed (dev.h: valid until sync). */
        if (rc != MSA_OK && pd[d].lane) msa_dev_lane_sync(pd[d].lane);
        msa_dev_lane_release(pd[d].lane);
    }
    bool split = rc == MSA_EUNAVAIL && nq > 1;
    for (unsigned i = 0; i < nq && !split; i++) {
        w[i]->rc = rc;
        if (rc == MSA_OK) *w[i]->n_out = msa_idx_topk_finish(&tk[i], w[i]->out);
    }
    free(cols_h);
    free(heaps);
    free(hits);
    /* The scores of a coalesced batch grow with nq: a batch whose scratch
     * does not fit one lane (MSA_EUNAVAIL from pass_dev_setup) runs as two
     * smaller passes instead of sending every query of it to the CPU, which
     * would make coalescing turn load into fallbacks. A single query that
     * does not fit still falls back. */
    if (split) {
        run_batch(g, m, key_dtype, w, nq / 2);
        run_batch(g, m, key_dtype, w + nq / 2, nq - nq / 2);
        return;
    }
    atomic_fetch_add(&g->n_batches, 1);
    if (nq > 1) atomic_fetch_add(&g->n_coalesced, nq);
}

/* A query whose layer is not resident: host rows stream through the device
 * in tiles (exact, just slower); the entry table goes up with host row
 * numbers. MSA_EUNAVAIL when the lane's scratch cannot hold the layer's
 * scores and entries (the CPU answers then). */
static int run_streamed(msa_gpu_t *g, const msa_idx_layer_view_t *v, waiter_t *w)
{
    if (v->n_rows > UINT32_MAX || v->n_ent > UINT32_MAX) return MSA_EUNAVAIL;
    const uint32_t H = v->schema->kv_heads;
    const bool i8 = v->key_dtype == MSA_DT_I8;
    size_t cols_bytes = 0;
    waiter_t *const wl[1] = {w};
    float *cols_h = batch_columns(wl, 1, &cols_bytes);
    if (!cols_h) return MSA_ENOMEM;
    msa_dev_lane_t *lane = msa_dev_lane_acquire(g->dev[0].dev);
    size_t cap, stage_cap;
    carve_t cv = {.base = msa_dev_lane_scratch(lane, &cap), .cap = cap};
    msa_dev_entry_t *stage = msa_dev_lane_staging(lane, &stage_cap);
    stage_cap /= sizeof *stage;
    float *cols = carve(&cv, cols_bytes);
    uint64_t *excl = w->n_excl ? carve(&cv, w->n_excl * 8) : NULL;
    msa_dev_entry_t *ent = carve(&cv, v->n_ent * sizeof *ent);
    float *scores = carve(&cv, v->n_rows * sizeof(float));
    size_t sel_bytes = msa_dev_select_work((uint32_t)v->n_ent, w->top_k);
    void *sel = carve(&cv, sel_bytes);
    size_t per_row = v->row_bytes + (i8 ? H * sizeof(float) : 0);
    size_t tile_rows = cv.at < cv.cap ? (cv.cap - cv.at) / 2 / per_row : 0;
    int rc = (!cols || (w->n_excl && !excl) || !ent || !scores || !sel || tile_rows < 64)
                 ? MSA_EUNAVAIL
                 : MSA_OK;
    uint8_t *tile = rc ? NULL : carve(&cv, tile_rows * v->row_bytes);
    float *tile_sc = (rc || !i8) ? NULL : carve(&cv, tile_rows * H * sizeof(float));
    /* Alignment of the two carves can exceed the half left for tiles. */
    if (rc == MSA_OK && (!tile || (i8 && !tile_sc))) rc = MSA_EUNAVAIL;
    size_t gemm_bytes = cv.cap - cv.at;
    void *gemm = cv.base + cv.at;
    if (rc == MSA_OK) rc = msa_dev_h2d(lane, cols, cols_h, cols_bytes);
    if (rc == MSA_OK && excl) rc = msa_dev_h2d(lane, excl, w->excl, w->n_excl * 8);
    for (size_t i = 0; i < v->n_ent && rc == MSA_OK;) {
        size_t n = v->n_ent - i < stage_cap ? v->n_ent - i : stage_cap;
        for (size_t j = 0; j < n; j++) {
            const msa_idx_entry_t *e = &v->ent[i + j];
            stage[j] = (msa_dev_entry_t){.doc = e->doc,
                                         .created = e->created,
                                         .deleted = e->deleted,
                                         .row0 = (uint32_t)e->row0,
                                         .nrows = e->nrows};
        }
        rc = msa_dev_h2d(lane, ent + i, stage, n * sizeof *stage);
        if (rc == MSA_OK) rc = msa_dev_lane_sync(lane);
        i += n;
    }
    /* Tiles reuse one buffer: the stream orders each copy after the previous
     * tile's kernels. */
    for (size_t r0 = 0; r0 < v->n_rows && rc == MSA_OK; r0 += tile_rows) {
        size_t n = v->n_rows - r0 < tile_rows ? v->n_rows - r0 : tile_rows;
        rc = msa_dev_h2d(lane, tile, v->rows + r0 * v->row_bytes, n * v->row_bytes);
        if (rc == MSA_OK && i8)
            rc = msa_dev_h2d(lane, tile_sc, v->scales + r0 * H, n * H * sizeof(float));
        if (rc) break;
        msa_dev_score_args_t a;
        score_args(&w->plan, v->key_dtype, 1, &a);
        a.keys = tile;
        a.scales = tile_sc;
        a.nrows = (uint32_t)n;
        a.cols = cols;
        a.scores = scores + r0;
        a.ld = v->n_rows;
        a.work = gemm;
        a.work_bytes = gemm_bytes;
        rc = msa_dev_score(lane, &a);
    }
    uint32_t n_out = 0;
    if (rc == MSA_OK) {
        msa_dev_select_args_t a = {.scores = scores,
                                   .ent = ent,
                                   .n_ent = (uint32_t)v->n_ent,
                                   .snapshot = w->snapshot,
                                   .exclude = excl,
                                   .n_exclude = (uint32_t)w->n_excl,
                                   .chunk_mean = w->chunk_mean,
                                   .top_k = w->top_k,
                                   .work = sel,
                                   .work_bytes = sel_bytes,
                                   .out = w->out,
                                   .n_out = &n_out};
        rc = msa_dev_select(lane, &a);
    }
    /* A failed pass may leave copies from cols_h and the host rows queued:
     * drain before cols_h is freed and the caller lets the index change. */
    if (rc != MSA_OK) msa_dev_lane_sync(lane);
    msa_dev_lane_release(lane);
    if (rc == MSA_OK) *w->n_out = n_out;
    free(cols_h);
    return rc;
}

/* ==== coalescing ================================================================== */

static int64_t now_ns(void)
{
    return msa_clock_ns();
}

static bool compatible(const waiter_t *a, const waiter_t *b)
{
    return a->plan.plan == b->plan.plan && a->plan.ncol == b->plan.ncol;
}

/* Queues w on m; either becomes the leader of a pass (taking every compatible
 * waiter, after waiting up to coalesce_us for company when other routes of
 * this mirror are in flight) or waits until a leader has served it. Caller
 * holds m->lock shared, m fresh. */
static void coalesce_and_run(msa_gpu_t *g, mirror_t *m, msa_dtype_t key_dtype, waiter_t *w)
{
    pthread_mutex_lock(&m->qlock);
    w->next = m->pending;
    m->pending = w;
    m->n_pending++;
    pthread_cond_broadcast(&m->qcond);
    for (;;) {
        if (w->done) break;
        if (m->leading) {
            pthread_cond_wait(&m->qcond, &m->qlock);
            continue;
        }
        m->leading = true;
        /* Wait for company only when there can be any: routes of THIS
         * mirror that have not queued yet. (Counting every route in the
         * backend made each layer of a multi-layer Route, which the engine
         * runs side by side, wait out coalesce_us for company that could
         * never join a pass of another layer.) */
        if (g->cfg.coalesce_us && atomic_load(&m->users) > 1) {
            int64_t until = now_ns() + (int64_t)g->cfg.coalesce_us * 1000;
            while (m->n_pending < MAX_BATCH && atomic_load(&m->users) > m->n_pending) {
                int64_t left = until - now_ns();
                if (left <= 0) break;
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                ts.tv_nsec += left % 1000000000;
                ts.tv_sec += left / 1000000000 + ts.tv_nsec / 1000000000;
                ts.tv_nsec %= 1000000000;
                pthread_cond_timedwait(&m->qcond, &m->qlock, &ts);
            }
        }
        /* Take the leader's own kind of query: w if still pending, else the
         * oldest pending one. */
        waiter_t *batch[MAX_BATCH];
        unsigned nb = 0;
        waiter_t *first = w->done ? NULL : w;
        if (!first)
            for (waiter_t *x = m->pending; x; x = x->next) first = x;
        for (waiter_t **pp = &m->pending; *pp && nb < MAX_BATCH;) {
            waiter_t *x = *pp;
            if (first && compatible(x, first)) {
                batch[nb++] = x;
                *pp = x->next;
                m->n_pending--;
            } else {
                pp = &x->next;
            }
        }
        pthread_mutex_unlock(&m->qlock);
        if (nb) run_batch(g, m, key_dtype, batch, nb);
        pthread_mutex_lock(&m->qlock);
        for (unsigned i = 0; i < nb; i++) batch[i]->done = true;
        m->leading = false;
        pthread_cond_broadcast(&m->qcond);
    }
    /* This route no longer counts as possible company (accel_route took it
     * into m->users); a leader waiting for company re-checks now rather than
     * sleeping out coalesce_us for a query that has already been served. */
    atomic_fetch_sub(&m->users, 1);
    if (m->leading) pthread_cond_broadcast(&m->qcond);
    pthread_mutex_unlock(&m->qlock);
}

/* ==== the accelerator hook ==================================================================== */

static int accel_route(void *ctx, const msa_idx_layer_view_t *v, const msa_idx_scorer_t *s,
                       uint64_t snapshot, const uint64_t *excl, size_t n_excl, uint32_t top_k,
                       msa_idx_hit_t *out, uint32_t *n_out)
{
    msa_gpu_t *g = ctx;
    *n_out = 0;
    if (atomic_load(&g->disabled)) {
        atomic_fetch_add(&g->n_fallback, 1);
        return MSA_EUNAVAIL;
    }
    if (v->n_ent == 0) return MSA_OK;
    waiter_t w = {.scorer = s,
                  .snapshot = snapshot,
                  .excl = excl,
                  .n_excl = n_excl,
                  .top_k = top_k,
                  .chunk_mean = v->schema->chunk_reduce == MSA_CHUNK_MEAN,
                  .out = out,
                  .n_out = n_out};
    msa_idx_scorer_colplan(s, &w.plan);
    mirror_t *m = mirror_get(g, v->coll_id, v->layer_pos);
    if (!m) return MSA_EUNAVAIL;
    atomic_fetch_add(&m->users, 1);
    int rc = MSA_OK;
    bool streamed = false;
    pthread_rwlock_rdlock(&m->lock);
    for (int attempt = 0; !mirror_fresh(m, v); attempt++) {
        pthread_rwlock_unlock(&m->lock);
        pthread_rwlock_wrlock(&m->lock);
        if (!mirror_fresh(m, v)) rc = mirror_sync(g, m, v);
        pthread_rwlock_unlock(&m->lock);
        pthread_rwlock_rdlock(&m->lock);
        /* Out of room (or evicted again by others under pressure): stream. */
        if (rc == MSA_EFULL || (rc == MSA_OK && attempt >= 2 && !mirror_fresh(m, v))) {
            streamed = true;
            rc = MSA_OK;
            break;
        }
        if (rc) break;
    }
    if (rc == MSA_OK && !streamed) {
        coalesce_and_run(g, m, v->key_dtype, &w); /* drops this route from m->users */
        rc = w.rc;
    } else {
        atomic_fetch_sub(&m->users, 1);
    }
    pthread_rwlock_unlock(&m->lock);
    if (rc == MSA_OK && streamed) {
        rc = run_streamed(g, v, &w);
        if (rc == MSA_OK) atomic_fetch_add(&g->n_streamed, 1);
    }
    if (rc == MSA_OK) {
        atomic_fetch_add(&g->n_routes, 1);
    } else {
        atomic_fetch_add(&g->n_fallback, 1);
        device_failed(g, "route", rc);
        if (!atomic_exchange(&g->warned_fallback, true)) {
            msa_log(MSA_LOG_WARN,
                    "gpu: collection %u layer %u answered by the CPU (%s); further fallbacks are "
                    "counted in Stats (gpu_routes_fallback)",
                    v->coll_id, v->layer_pos, msa_strerror(rc));
        }
        rc = MSA_EUNAVAIL;
    }
    return rc;
}

static void accel_forget(void *ctx, uint32_t coll_id)
{
    msa_gpu_t *g = ctx;
    pthread_mutex_lock(&g->lock);
    mirror_t *gone = NULL;
    for (mirror_t **pp = &g->mirrors; *pp;) {
        mirror_t *m = *pp;
        if (m->coll == coll_id) {
            *pp = m->next;
            m->next = gone;
            gone = m;
        } else {
            pp = &m->next;
        }
    }
    pthread_mutex_unlock(&g->lock);
    while (gone) {
        mirror_t *m = gone;
        gone = m->next;
        mirror_destroy(g, m);
    }
    msa_gpu_forget_coll(g, coll_id);
}

void msa_gpu_accel(msa_gpu_t *g, msa_idx_accel_t *out)
{
    *out = (msa_idx_accel_t){.ctx = g, .route = accel_route, .forget = accel_forget};
}

/* ==== pinned host memory for the index ============================================================ */

/* Every array handed to the index starts with this header (64 bytes keep the
 * payload 64-byte aligned), so host_free knows how it was allocated. */
typedef struct host_hdr {
    uint64_t pinned_bytes; /* 0: malloc'd */
    uint64_t pad[7];
} host_hdr_t;

/* Arrays below cfg.pin_min_bytes (default 1 MiB) stay pageable: pinning
 * costs a system call and page locking per array, and small layers stream
 * fast either way. */
#define PIN_MIN_BYTES_DEFAULT (1u << 20)

static void *host_alloc(void *ctx, size_t bytes)
{
    msa_gpu_t *g = ctx;
    size_t total = sizeof(host_hdr_t) + bytes;
    host_hdr_t *h = NULL;
    const uint64_t pin_min = g->cfg.pin_min_bytes ? g->cfg.pin_min_bytes : PIN_MIN_BYTES_DEFAULT;
    if (bytes >= pin_min && atomic_fetch_add(&g->pinned_bytes, total) + total <= g->pinned_cap &&
        msa_dev_host_alloc(g->dev[0].dev, total, (void **)&h) == MSA_OK) {
        h->pinned_bytes = total;
        return h + 1;
    }
    if (bytes >= pin_min) atomic_fetch_sub(&g->pinned_bytes, total);
    h = aligned_alloc(64, (total + 63) / 64 * 64);
    if (!h) return NULL;
    h->pinned_bytes = 0;
    return h + 1;
}

static void host_free(void *ctx, void *p)
{
    msa_gpu_t *g = ctx;
    host_hdr_t *h = (host_hdr_t *)p - 1;
    if (h->pinned_bytes) {
        atomic_fetch_sub(&g->pinned_bytes, h->pinned_bytes);
        msa_dev_host_free(g->dev[0].dev, h);
    } else {
        free(h);
    }
}

void msa_gpu_host_allocator(msa_gpu_t *g, msa_idx_host_alloc_t *out)
{
    *out = (msa_idx_host_alloc_t){.ctx = g, .alloc = host_alloc, .free = host_free};
}

/* ==== stats ===================================================================================== */

void msa_gpu_get_stats(msa_gpu_t *g, msa_gpu_stats_t *out)
{
    memset(out, 0, sizeof *out);
    out->devices = g->n_dev;
    out->shards = g->n_shards;
    out->routes_device = atomic_load(&g->n_routes);
    out->routes_streamed = atomic_load(&g->n_streamed);
    out->routes_fallback = atomic_load(&g->n_fallback);
    out->batches = atomic_load(&g->n_batches);
    out->coalesced = atomic_load(&g->n_coalesced);
    out->page_ins = atomic_load(&g->n_page_in);
    out->page_outs = atomic_load(&g->n_page_out);
    out->syncs = atomic_load(&g->n_syncs);
    out->attends_device = atomic_load(&g->n_att_dev);
    out->attends_fallback = atomic_load(&g->n_att_fallback);
    out->disabled = atomic_load(&g->disabled);
    out->pinned_bytes = atomic_load(&g->pinned_bytes);
    for (unsigned i = 0; i < g->n_dev; i++) {
        msa_gpu_kvcache_stats_t cs;
        msa_gpu_kvcache_stats(g->dev[i].cache, &cs);
        out->cache_hits += cs.hits;
        out->cache_misses += cs.misses;
        out->cache_evictions += cs.evictions;
    }
}

void msa_gpu_get_device_stats(msa_gpu_t *g, unsigned i, msa_gpu_device_stats_t *out)
{
    memset(out, 0, sizeof *out);
    if (i >= g->n_dev) return;
    gdev_t *d = &g->dev[i];
    snprintf(out->name, sizeof out->name, "%s", d->info.name);
    out->memory_total = d->info.total_bytes;
    msa_gpu_kvcache_stats_t cs;
    msa_gpu_kvcache_stats(d->cache, &cs);
    pthread_mutex_lock(&g->lock);
    out->routing_bytes = msa_gpu_arena_used(d->route_arena);
    out->memory_used = msa_gpu_arena_size(d->route_arena) + cs.bytes_total + d->scratch_bytes;
    pthread_mutex_unlock(&g->lock);
    out->cache_bytes = cs.bytes_used;
}

/* ==== Attend ======================================================================================== */

void msa_gpu_forget_coll(msa_gpu_t *g, uint32_t coll_id)
{
    for (unsigned i = 0; i < g->n_dev; i++)
        msa_gpu_kvcache_invalidate_coll(g->dev[i].cache, coll_id);
}

/* Which GPU's cache holds a block: spread by a hash of its key, so the
 * caches of all GPUs add up (one GPU: always 0). */
static unsigned block_home(const msa_gpu_t *g, const msa_gpu_kvkey_t *k)
{
    if (g->n_dev == 1) return 0;
    uint64_t h = k->doc * 0x9E3779B97F4A7C15ull ^ ((uint64_t)k->coll << 32 | k->layer);
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 29;
    return (unsigned)(h % g->n_dev);
}

/* Attention runs on GPU 0. Each block lives in the K/V cache of its home GPU
 * (block_home); a block cached on another GPU travels to GPU 0's scratch over
 * NCCL (or a peer copy). Misses are read through the caller's loader (LMDB,
 * inside its snapshot), copied to GPU 0 for this call and into a block of the
 * home cache, which is published once the copies completed. A block that
 * cannot be cached (cache full of pinned blocks, too large, cache off) goes
 * to GPU 0's scratch only. MSA_EUNAVAIL when GPU 0's scratch cannot hold the
 * call (the engine attends on the CPU then). */
int msa_gpu_attend(msa_gpu_t *g, const msa_gpu_attend_args_t *a)
{
    if (atomic_load(&g->disabled)) {
        atomic_fetch_add(&g->n_att_fallback, 1);
        return MSA_EUNAVAIL;
    }
    size_t esz = msa_dtype_size(a->kv_dtype), row = (size_t)a->H * a->D * esz;
    size_t nb = a->n ? a->n : 1;
    msa_gpu_kvblock_t **pin = calloc(nb, sizeof *pin);
    bool *fresh = calloc(nb, sizeof *fresh);
    unsigned *home = calloc(nb, sizeof *home);
    msa_dev_kv_block_t *desc = calloc(nb, sizeof *desc);
    if (!pin || !fresh || !home || !desc) {
        free(pin);
        free(fresh);
        free(home);
        free(desc);
        return MSA_ENOMEM;
    }
    /* Lanes of every GPU involved, taken in device order (as passes do). */
    msa_dev_lane_t *lane[MAX_DEVICES] = {0};
    bool need[MAX_DEVICES] = {true};
    for (uint32_t i = 0; i < a->n; i++) {
        msa_gpu_kvkey_t key = {
            .doc = a->docs[i], .version = a->versions[i], .coll = a->coll_id, .layer = a->layer};
        home[i] = block_home(g, &key);
        need[home[i]] = true;
    }
    for (unsigned d = 0; d < g->n_dev; d++)
        if (need[d]) lane[d] = msa_dev_lane_acquire(g->dev[d].dev);
    msa_dev_lane_t *l0 = lane[0];
    size_t cap;
    carve_t cv = {.base = msa_dev_lane_scratch(l0, &cap), .cap = cap};
    size_t qn = (size_t)a->T * a->Hq * a->D;
    float *q = carve(&cv, qn * sizeof(float));
    float *out = carve(&cv, qn * sizeof(float));
    float *lse = carve(&cv, (size_t)a->T * a->Hq * sizeof(float));
    msa_dev_kv_block_t *desc_d = carve(&cv, nb * sizeof *desc_d);
    int rc = (q && out && lse && desc_d) ? MSA_OK : MSA_EUNAVAIL;
    bool loader_failed = false;
    if (rc == MSA_OK) rc = msa_dev_h2d(l0, q, a->q, qn * sizeof(float));
    for (uint32_t i = 0; i < a->n && rc == MSA_OK; i++) {
        unsigned h = home[i];
        gdev_t *hd = &g->dev[h];
        msa_gpu_kvkey_t key = {
            .doc = a->docs[i], .version = a->versions[i], .coll = a->coll_id, .layer = a->layer};
        if (msa_gpu_kvcache_lookup(hd->cache, &key, &pin[i]) == MSA_OK) {
            void *kd = msa_gpu_kvblock_k(pin[i]), *vd = msa_gpu_kvblock_v(pin[i]);
            uint32_t nrows = msa_gpu_kvblock_nrows(pin[i]);
            size_t bytes = (size_t)nrows * row;
            if (h != 0 && bytes) {
                void *k0 = carve(&cv, bytes), *v0 = carve(&cv, bytes);
                if (!k0 || !v0) {
                    rc = MSA_EUNAVAIL;
                    break;
                }
                rc = msa_dev_peer_copy(l0, k0, lane[h], kd, bytes, g->link);
                if (rc == MSA_OK) rc = msa_dev_peer_copy(l0, v0, lane[h], vd, bytes, g->link);
                kd = k0;
                vd = v0;
            }
            desc[i] = (msa_dev_kv_block_t){kd, vd, nrows};
            continue;
        }
        const void *k, *v;
        uint32_t nrows = 0;
        if ((rc = a->load(a->load_arg, i, &k, &v, &nrows))) {
            loader_failed = true;
            break;
        }
        size_t bytes = (size_t)nrows * row;
        void *kd = NULL, *vd = NULL;
        if (bytes && msa_gpu_kvcache_insert(hd->cache, &key, nrows, bytes, &pin[i]) == MSA_OK) {
            /* Sources are the caller's snapshot (valid until it returns). */
            rc = msa_dev_h2d(lane[h], msa_gpu_kvblock_k(pin[i]), k, bytes);
            if (rc == MSA_OK) rc = msa_dev_h2d(lane[h], msa_gpu_kvblock_v(pin[i]), v, bytes);
            /* Only a block whose K and V copies were both queued may be
             * published (after the sync below): one whose fill failed to
             * queue is released unpublished, i.e. freed, even when the lanes
             * then sync cleanly (a non-sticky error). */
            fresh[i] = rc == MSA_OK;
            if (h == 0) {
                kd = msa_gpu_kvblock_k(pin[i]);
                vd = msa_gpu_kvblock_v(pin[i]);
            }
        }
        if (rc == MSA_OK && bytes && !kd) {
            kd = carve(&cv, bytes);
            vd = carve(&cv, bytes);
            if (!kd || !vd) rc = MSA_EUNAVAIL;
            if (rc == MSA_OK) rc = msa_dev_h2d(l0, kd, k, bytes);
            if (rc == MSA_OK) rc = msa_dev_h2d(l0, vd, v, bytes);
        }
        desc[i] = (msa_dev_kv_block_t){kd, vd, nrows};
    }
    if (rc == MSA_OK) rc = msa_dev_h2d(l0, desc_d, desc, a->n * sizeof *desc);
    if (rc == MSA_OK) {
        msa_dev_attend_args_t at = {.q = q,
                                    .T = a->T,
                                    .Hq = a->Hq,
                                    .H = a->H,
                                    .D = a->D,
                                    .scale = a->scale,
                                    .kv_dtype = a->kv_dtype,
                                    .blocks = desc_d,
                                    .n_blocks = a->n,
                                    .out = out,
                                    .lse = lse,
                                    .work = cv.base + cv.at,
                                    .work_bytes = cv.cap - cv.at};
        rc = msa_dev_attend(l0, &at);
    }
    if (rc == MSA_OK) rc = msa_dev_d2h(l0, a->out, out, qn * sizeof(float));
    if (rc == MSA_OK) rc = msa_dev_d2h(l0, a->lse, lse, (size_t)a->T * a->Hq * sizeof(float));
    /* Every lane drains before any block is published or unpinned. */
    int sync = MSA_OK;
    for (unsigned d = 0; d < g->n_dev; d++) {
        if (!lane[d]) continue;
        int s = msa_dev_lane_sync(lane[d]);
        if (sync == MSA_OK) sync = s;
    }
    if (rc == MSA_OK) rc = sync;
    for (uint32_t i = 0; i < a->n; i++) {
        if (!pin[i]) continue;
        msa_gpu_kvcache_t *c = g->dev[home[i]].cache;
        if (fresh[i] && sync == MSA_OK) msa_gpu_kvcache_ready(c, pin[i]);
        msa_gpu_kvcache_release(c, pin[i]);
    }
    for (unsigned d = 0; d < g->n_dev; d++) msa_dev_lane_release(lane[d]);
    free(pin);
    free(fresh);
    free(home);
    free(desc);
    if (!loader_failed) atomic_fetch_add(rc == MSA_OK ? &g->n_att_dev : &g->n_att_fallback, 1);
    if (!loader_failed && rc != MSA_OK) {
        device_failed(g, "attend", rc);
        rc = MSA_EUNAVAIL; /* the engine attends on the CPU */
    }
    return rc;
}
