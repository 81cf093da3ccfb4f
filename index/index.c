/* index.c — routing index: rows per (collection, layer), document versions
 * with MVCC seqs, snapshot registry, compaction, and the CPU Route scan.
 */
#define _GNU_SOURCE /* pthread_rwlockattr_setkind_np */
#include "index.h"

#include "msa_alloc.h"
#include "msa_log.h"
#include "tensor.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LIVE UINT64_MAX      /* deleted seq of a live version */
#define SCAN_BLOCK_ROWS 1024 /* rows scored per kernel call: fits L2 with the queries */

typedef msa_idx_entry_t entry_t;

struct msa_idx_coll {
    msa_idx_t *owner;
    uint32_t id;
    msa_schema_t schema;
    atomic_int refs;       /* the map's reference + readers' */
    uint64_t dropped_seq;  /* LIVE until dropped; writer thread only */
    pthread_rwlock_t lock; /* guards everything below */
    uint32_t width;        /* H*D values per row */
    msa_dtype_t key_dtype; /* dtype of rows: routing dtype */
    size_t row_bytes;      /* width * element size */
    uint8_t **rows;        /* [n_layers] -> [cap_rows][row_bytes] */
    float **scales;        /* [n_layers] -> [cap_rows][H]; I8 only */
    size_t n_rows, cap_rows;
    entry_t *ent; /* in row order */
    size_t n_ent, cap_ent;
    uint64_t *h_key; /* open addressing doc -> live entry; key 0 = empty */
    uint32_t *h_val;
    size_t h_cap, h_count;
    uint64_t dead_rows;       /* rows of deleted versions not yet compacted */
    uint64_t compact_horizon; /* horizon of the last pass (writer thread only) */
    uint32_t max_entry_rows;
    uint64_t layout_gen; /* bumped when compaction moves rows */
    uint64_t delete_gen; /* bumped when an entry's deleted seq changes */
};

struct msa_idx {
    msa_idx_pool_t *pool;
    msa_isa_t isa;
    pthread_mutex_t lock; /* collection map and snapshot registry */
    msa_idx_coll_t **colls;
    size_t n_colls, cap_colls;
    uint64_t *snaps; /* open snapshots (a multiset) */
    size_t n_snaps, cap_snaps;
    pthread_mutex_t pub_lock;
    pthread_cond_t pub_cond;  /* signalled on publish */
    _Atomic uint64_t applied; /* last commit seq applied to the index */
    msa_idx_accel_t accel;    /* route/forget NULL: CPU only */
    msa_idx_host_alloc_t mem; /* row arrays' allocator (malloc by default) */
};

static void *mem_alloc(const msa_idx_t *x, size_t bytes)
{
    return x->mem.alloc ? x->mem.alloc(x->mem.ctx, bytes) : msa_malloc(bytes);
}

static void mem_free(const msa_idx_t *x, void *p)
{
    if (!p) return;
    if (x->mem.free)
        x->mem.free(x->mem.ctx, p);
    else
        free(p);
}

/* A row array of new_bytes holding the first keep bytes of old (freed); NULL
 * on failure (old stays). Not realloc: the allocator may be pinned memory. */
static void *mem_grow(const msa_idx_t *x, void *old, size_t keep, size_t new_bytes)
{
    void *n = mem_alloc(x, new_bytes);
    if (!n) return NULL;
    if (keep) memcpy(n, old, keep);
    mem_free(x, old);
    return n;
}

/* ==== index lifetime ===================================================== */

int msa_idx_create(unsigned threads, msa_isa_t isa, msa_idx_t **out)
{
    msa_idx_t *x = msa_calloc(1, sizeof *x);
    if (!x) return MSA_ENOMEM;
    int rc = msa_idx_pool_create(threads, &x->pool);
    if (rc) {
        free(x);
        return rc;
    }
    x->isa = isa;
    pthread_mutex_init(&x->lock, NULL);
    pthread_mutex_init(&x->pub_lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&x->pub_cond, &ca);
    pthread_condattr_destroy(&ca);
    *out = x;
    return MSA_OK;
}

static void coll_free(msa_idx_coll_t *c)
{
    const msa_idx_t *x = c->owner;
    if (x->accel.forget) x->accel.forget(x->accel.ctx, c->id);
    for (uint32_t l = 0; l < c->schema.n_layers; l++) {
        mem_free(x, c->rows[l]);
        if (c->scales) mem_free(x, c->scales[l]);
    }
    free(c->rows);
    free(c->scales);
    free(c->ent);
    free(c->h_key);
    free(c->h_val);
    pthread_rwlock_destroy(&c->lock);
    free(c);
}

void msa_idx_destroy(msa_idx_t *x)
{
    if (!x) return;
    for (size_t i = 0; i < x->n_colls; i++) msa_idx_coll_release(x->colls[i]);
    free(x->colls);
    free(x->snaps);
    msa_idx_pool_destroy(x->pool);
    pthread_mutex_destroy(&x->lock);
    pthread_mutex_destroy(&x->pub_lock);
    pthread_cond_destroy(&x->pub_cond);
    free(x);
}

msa_idx_pool_t *msa_idx_get_pool(msa_idx_t *x)
{
    return x->pool;
}
msa_isa_t msa_idx_get_isa(const msa_idx_t *x)
{
    return x->isa;
}

void msa_idx_set_host_alloc(msa_idx_t *x, const msa_idx_host_alloc_t *a)
{
    x->mem = a ? *a : (msa_idx_host_alloc_t){0};
}

void msa_idx_set_accel(msa_idx_t *x, const msa_idx_accel_t *accel)
{
    x->accel = accel ? *accel : (msa_idx_accel_t){0};
}

/* ==== collections ========================================================== */

int msa_idx_coll_add(msa_idx_t *x, uint32_t coll_id, const msa_schema_t *schema)
{
    msa_idx_coll_t *c = msa_calloc(1, sizeof *c);
    if (!c) return MSA_ENOMEM;
    c->owner = x;
    c->id = coll_id;
    c->schema = *schema;
    atomic_init(&c->refs, 1);
    c->dropped_seq = LIVE;
    c->width = schema->kv_heads * schema->head_dim;
    c->key_dtype = schema->routing_dtype;
    c->row_bytes = (size_t)c->width * msa_dtype_size(c->key_dtype);
    c->rows = msa_calloc(schema->n_layers, sizeof *c->rows);
    if (c->key_dtype == MSA_DT_I8) c->scales = msa_calloc(schema->n_layers, sizeof *c->scales);
    if (!c->rows || (c->key_dtype == MSA_DT_I8 && !c->scales)) {
        free(c->rows);
        free(c->scales);
        free(c);
        return MSA_ENOMEM;
    }
    /* Writers must not starve behind a stream of scans. */
    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&c->lock, &ra);
    pthread_rwlockattr_destroy(&ra);

    pthread_mutex_lock(&x->lock);
    int rc = MSA_OK;
    for (size_t i = 0; i < x->n_colls; i++)
        if (x->colls[i]->id == coll_id) rc = MSA_EEXIST;
    if (rc == MSA_OK && x->n_colls == x->cap_colls) {
        size_t cap = x->cap_colls ? 2 * x->cap_colls : 8;
        msa_idx_coll_t **n = msa_realloc(x->colls, cap * sizeof *n);
        if (!n)
            rc = MSA_ENOMEM;
        else {
            x->colls = n;
            x->cap_colls = cap;
        }
    }
    if (rc == MSA_OK) x->colls[x->n_colls++] = c;
    pthread_mutex_unlock(&x->lock);
    if (rc) coll_free(c);
    return rc;
}

void msa_idx_coll_drop(msa_idx_t *x, uint32_t coll_id, uint64_t seq)
{
    pthread_mutex_lock(&x->lock);
    for (size_t i = 0; i < x->n_colls; i++)
        if (x->colls[i]->id == coll_id) x->colls[i]->dropped_seq = seq;
    pthread_mutex_unlock(&x->lock);
}

msa_idx_coll_t *msa_idx_coll_acquire(msa_idx_t *x, uint32_t coll_id)
{
    msa_idx_coll_t *found = NULL;
    pthread_mutex_lock(&x->lock);
    for (size_t i = 0; i < x->n_colls; i++) {
        if (x->colls[i]->id == coll_id) {
            found = x->colls[i];
            atomic_fetch_add(&found->refs, 1);
            break;
        }
    }
    pthread_mutex_unlock(&x->lock);
    return found;
}

void msa_idx_coll_release(msa_idx_coll_t *c)
{
    if (c && atomic_fetch_sub(&c->refs, 1) == 1) coll_free(c);
}

/* ==== doc id -> live entry map (linear probing, backward-shift delete) ==== */

static size_t hash_slot(uint64_t key, size_t cap)
{
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdULL;
    key ^= key >> 33;
    return (size_t)key & (cap - 1);
}

static long map_find(const msa_idx_coll_t *c, uint64_t doc)
{
    if (!c->h_cap) return -1;
    for (size_t i = hash_slot(doc, c->h_cap);; i = (i + 1) & (c->h_cap - 1)) {
        if (c->h_key[i] == doc) return (long)c->h_val[i];
        if (c->h_key[i] == 0) return -1;
    }
}

/* Inserts or overwrites; capacity must already allow one more key. */
static void map_set(msa_idx_coll_t *c, uint64_t doc, uint32_t ent)
{
    size_t i = hash_slot(doc, c->h_cap);
    while (c->h_key[i] != 0 && c->h_key[i] != doc) i = (i + 1) & (c->h_cap - 1);
    if (c->h_key[i] == 0) c->h_count++;
    c->h_key[i] = doc;
    c->h_val[i] = ent;
}

static void map_del(msa_idx_coll_t *c, uint64_t doc)
{
    if (!c->h_cap) return;
    size_t mask = c->h_cap - 1, i = hash_slot(doc, c->h_cap);
    while (c->h_key[i] != doc) {
        if (c->h_key[i] == 0) return;
        i = (i + 1) & mask;
    }
    /* Backward shift keeps every probe chain unbroken without tombstones. */
    for (size_t j = (i + 1) & mask; c->h_key[j] != 0; j = (j + 1) & mask) {
        size_t home = hash_slot(c->h_key[j], c->h_cap);
        if (((j - home) & mask) >= ((j - i) & mask)) {
            c->h_key[i] = c->h_key[j];
            c->h_val[i] = c->h_val[j];
            i = j;
        }
    }
    c->h_key[i] = 0;
    c->h_count--;
}

/* Rehashes into cap slots (a power of two > count). */
static int map_rebuild(msa_idx_coll_t *c, size_t cap)
{
    uint64_t *k = msa_calloc(cap, sizeof *k);
    uint32_t *v = msa_calloc(cap, sizeof *v);
    if (!k || !v) {
        free(k);
        free(v);
        return MSA_ENOMEM;
    }
    free(c->h_key);
    free(c->h_val);
    c->h_key = k;
    c->h_val = v;
    c->h_cap = cap;
    c->h_count = 0;
    for (size_t e = 0; e < c->n_ent; e++)
        if (c->ent[e].deleted == LIVE) map_set(c, c->ent[e].doc, (uint32_t)e);
    return MSA_OK;
}

/* ==== writer side =========================================================== */

/* Grows every array so that one more version of nrows rows fits. Nothing is
 * changed on failure except capacities. */
static int reserve(msa_idx_coll_t *c, uint32_t nrows)
{
    uint32_t L = c->schema.n_layers, H = c->schema.kv_heads;
    if (c->n_rows + nrows > c->cap_rows) {
        size_t cap = c->cap_rows ? c->cap_rows : 64;
        while (cap < c->n_rows + nrows) cap *= 2;
        /* On a failure midway the layers grown so far keep their larger
         * arrays while cap_rows stays the old value: safe, only wasteful. */
        for (uint32_t l = 0; l < L; l++) {
            uint8_t *r =
                mem_grow(c->owner, c->rows[l], c->n_rows * c->row_bytes, cap * c->row_bytes);
            if (!r) return MSA_ENOMEM;
            c->rows[l] = r;
            if (c->scales) {
                size_t hs = (size_t)H * sizeof(float);
                float *s = mem_grow(c->owner, c->scales[l], c->n_rows * hs, cap * hs);
                if (!s) return MSA_ENOMEM;
                c->scales[l] = s;
            }
        }
        c->cap_rows = cap;
    }
    if (c->n_ent + 1 > c->cap_ent) {
        size_t cap = c->cap_ent ? 2 * c->cap_ent : 64;
        entry_t *e = msa_realloc(c->ent, cap * sizeof *e);
        if (!e) return MSA_ENOMEM;
        c->ent = e;
        c->cap_ent = cap;
    }
    if ((c->h_count + 1) * 2 > c->h_cap) {
        size_t cap = c->h_cap ? 2 * c->h_cap : 64;
        return map_rebuild(c, cap);
    }
    return MSA_OK;
}

/* Converts one stored router-key row to the index form at row slot r. */
static void store_row(msa_idx_coll_t *c, uint32_t l, size_t r, const float *src, float *tmp)
{
    uint32_t H = c->schema.kv_heads, D = c->schema.head_dim;
    memcpy(tmp, src, (size_t)c->width * sizeof(float));
    if (c->schema.similarity == MSA_SIM_COSINE) msa_tensor_l2_normalize(tmp, H, D);
    uint8_t *dst = c->rows[l] + r * c->row_bytes;
    if (c->key_dtype == MSA_DT_I8)
        msa_tensor_quantize_i8(tmp, H, D, (int8_t *)dst, c->scales[l] + r * H);
    else
        msa_tensor_from_f32(c->key_dtype, tmp, c->width, dst);
}

int msa_idx_doc_put(msa_idx_coll_t *c, uint64_t doc_id, uint64_t seq, uint32_t nrows,
                    const float *const *rows)
{
    float *tmp = msa_malloc((size_t)c->width * sizeof(float));
    if (!tmp) return MSA_ENOMEM;
    pthread_rwlock_wrlock(&c->lock);
    int rc = reserve(c, nrows);
    if (rc) goto fail;
    for (uint32_t l = 0; l < c->schema.n_layers; l++)
        for (uint32_t r = 0; r < nrows; r++)
            store_row(c, l, c->n_rows + r, rows[l] + (size_t)r * c->width, tmp);
    long old = map_find(c, doc_id);
    if (old >= 0) {
        c->ent[old].deleted = seq;
        c->dead_rows += c->ent[old].nrows;
        c->delete_gen++;
    }
    c->ent[c->n_ent] = (entry_t){
        .doc = doc_id, .created = seq, .deleted = LIVE, .row0 = c->n_rows, .nrows = nrows};
    map_set(c, doc_id, (uint32_t)c->n_ent);
    c->n_ent++;
    c->n_rows += nrows;
    if (nrows > c->max_entry_rows) c->max_entry_rows = nrows;
fail:
    pthread_rwlock_unlock(&c->lock);
    free(tmp);
    return rc;
}

int msa_idx_doc_delete(msa_idx_coll_t *c, uint64_t doc_id, uint64_t seq)
{
    pthread_rwlock_wrlock(&c->lock);
    long e = map_find(c, doc_id);
    if (e >= 0) {
        c->ent[e].deleted = seq;
        c->dead_rows += c->ent[e].nrows;
        c->delete_gen++;
        map_del(c, doc_id);
    }
    pthread_rwlock_unlock(&c->lock);
    return e >= 0 ? MSA_OK : MSA_ENOTFOUND;
}

void msa_idx_publish(msa_idx_t *x, uint64_t seq)
{
    pthread_mutex_lock(&x->pub_lock);
    atomic_store(&x->applied, seq);
    pthread_cond_broadcast(&x->pub_cond);
    pthread_mutex_unlock(&x->pub_lock);
}

uint64_t msa_idx_applied(msa_idx_t *x)
{
    return atomic_load(&x->applied);
}

int msa_idx_wait_applied(msa_idx_t *x, uint64_t seq, int64_t deadline_ms)
{
    if (atomic_load(&x->applied) >= seq) return MSA_OK;
    int rc = MSA_OK;
    pthread_mutex_lock(&x->pub_lock);
    while (atomic_load(&x->applied) < seq) {
        if (deadline_ms <= 0) {
            pthread_cond_wait(&x->pub_cond, &x->pub_lock);
            continue;
        }
        struct timespec ts = {.tv_sec = deadline_ms / 1000,
                              .tv_nsec = (deadline_ms % 1000) * 1000000};
        if (pthread_cond_timedwait(&x->pub_cond, &x->pub_lock, &ts) == ETIMEDOUT &&
            atomic_load(&x->applied) < seq) {
            rc = MSA_ETIMEOUT;
            break;
        }
    }
    pthread_mutex_unlock(&x->pub_lock);
    return rc;
}

/* ==== snapshots and compaction ================================================= */

/* begin_fn must not run under x->lock: it takes the store's gate, and readers
 * that hold the gate (an open read txn) take x->lock in msa_idx_coll_acquire.
 * With a map grow waiting on the gate (writer-preferring), those two orders
 * deadlock three threads (found by TSan, lock-order-inversion). So the slot is
 * first registered with a placeholder, the applied seq: commits are applied
 * only after they are durable, so a txn begun afterwards sees at least that
 * seq, and the placeholder holds compaction back at least as far as the real
 * seq will. The real seq replaces it once begin_fn returns. Entries are a
 * multiset of seqs, so replacing any entry equal to the placeholder is right. */
int msa_idx_snap_register(msa_idx_t *x, int (*begin_fn)(void *arg, uint64_t *seq), void *arg,
                          uint64_t *seq)
{
    pthread_mutex_lock(&x->lock);
    if (x->n_snaps == x->cap_snaps) {
        size_t cap = x->cap_snaps ? 2 * x->cap_snaps : 64;
        uint64_t *n = msa_realloc(x->snaps, cap * sizeof *n);
        if (!n) {
            pthread_mutex_unlock(&x->lock);
            return MSA_ENOMEM;
        }
        x->snaps = n;
        x->cap_snaps = cap;
    }
    uint64_t floor = atomic_load(&x->applied);
    x->snaps[x->n_snaps++] = floor;
    pthread_mutex_unlock(&x->lock);

    int rc = begin_fn(arg, seq);

    pthread_mutex_lock(&x->lock);
    for (size_t i = 0; i < x->n_snaps; i++) {
        if (x->snaps[i] == floor) {
            if (rc == MSA_OK)
                x->snaps[i] = *seq;
            else
                x->snaps[i] = x->snaps[--x->n_snaps];
            break;
        }
    }
    pthread_mutex_unlock(&x->lock);
    return rc;
}

void msa_idx_snap_unregister(msa_idx_t *x, uint64_t seq)
{
    pthread_mutex_lock(&x->lock);
    for (size_t i = 0; i < x->n_snaps; i++) {
        if (x->snaps[i] == seq) {
            x->snaps[i] = x->snaps[--x->n_snaps];
            break;
        }
    }
    pthread_mutex_unlock(&x->lock);
}

/* Removes the versions deleted at or before horizon: no open or future
 * snapshot can see them. Rows keep their order, so versions stay contiguous. */
static size_t compact_coll(msa_idx_coll_t *c, uint64_t horizon)
{
    pthread_rwlock_wrlock(&c->lock);
    size_t w_ent = 0, w_row = 0, removed = 0;
    uint32_t max_rows = 0;
    for (size_t e = 0; e < c->n_ent; e++) {
        entry_t en = c->ent[e];
        if (en.deleted <= horizon) {
            removed += en.nrows;
            continue;
        }
        if (en.row0 != w_row) {
            for (uint32_t l = 0; l < c->schema.n_layers; l++) {
                memmove(c->rows[l] + w_row * c->row_bytes, c->rows[l] + en.row0 * c->row_bytes,
                        (size_t)en.nrows * c->row_bytes);
                if (c->scales)
                    memmove(c->scales[l] + w_row * c->schema.kv_heads,
                            c->scales[l] + en.row0 * c->schema.kv_heads,
                            (size_t)en.nrows * c->schema.kv_heads * sizeof(float));
            }
        }
        en.row0 = w_row;
        c->ent[w_ent++] = en;
        w_row += en.nrows;
        if (en.nrows > max_rows) max_rows = en.nrows;
    }
    if (removed) {
        c->n_ent = w_ent;
        c->n_rows = w_row;
        c->dead_rows -= removed;
        c->max_entry_rows = max_rows;
        c->layout_gen++;
        /* Same capacity: cannot fail for lack of memory once allocated. */
        if (map_rebuild(c, c->h_cap ? c->h_cap : 64) != MSA_OK)
            msa_log(MSA_LOG_ERROR, "index: map rebuild failed after compaction of collection %u",
                    c->id);
    }
    pthread_rwlock_unlock(&c->lock);
    return removed;
}

size_t msa_idx_compact(msa_idx_t *x, bool force)
{
    pthread_mutex_lock(&x->lock);
    uint64_t horizon = atomic_load(&x->applied);
    for (size_t i = 0; i < x->n_snaps; i++)
        if (x->snaps[i] < horizon) horizon = x->snaps[i];
    /* Collections dropped before every open snapshot leave the map. */
    msa_idx_coll_t *gone[64];
    size_t n_gone = 0;
    for (size_t i = 0; i < x->n_colls && n_gone < 64;) {
        if (x->colls[i]->dropped_seq <= horizon) {
            gone[n_gone++] = x->colls[i];
            x->colls[i] = x->colls[--x->n_colls];
        } else {
            i++;
        }
    }
    size_t n = x->n_colls;
    msa_idx_coll_t **list = msa_malloc((n ? n : 1) * sizeof *list);
    if (list) {
        for (size_t i = 0; i < n; i++) {
            list[i] = x->colls[i];
            atomic_fetch_add(&list[i]->refs, 1);
        }
    }
    pthread_mutex_unlock(&x->lock);

    size_t removed = 0;
    for (size_t i = 0; i < n_gone; i++) msa_idx_coll_release(gone[i]);
    if (!list) return 0;
    for (size_t i = 0; i < n; i++) {
        msa_idx_coll_t *c = list[i];
        /* dead_rows only changes on this (the writer) thread: no lock needed to peek. */
        /* A pass at a horizon no later than the last one finds nothing: every
         * version deleted since was deleted after it. So a long-held snapshot
         * does not cost a write-locked scan per commit. */
        if (c->dead_rows && (force || c->dead_rows * 4 >= c->n_rows) &&
            (force || horizon > c->compact_horizon)) {
            removed += compact_coll(c, horizon);
            c->compact_horizon = horizon;
        }
        msa_idx_coll_release(c);
    }
    free(list);
    return removed;
}

/* ==== Route ======================================================================= */

typedef struct route_job {
    msa_idx_coll_t *c;
    const msa_idx_route_args_t *a;
    const msa_idx_scorer_t *scorer;
    const uint64_t *exclude; /* sorted */
    size_t n_exclude;
    size_t (*bounds)[2];  /* entry range per task */
    msa_idx_topk_t *topk; /* per task */
    msa_idx_hit_t *hits;  /* storage of the per-task heaps */
    float *scratch;       /* per task: block_rows floats */
    size_t block_rows;
} route_job_t;

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static bool is_excluded(const route_job_t *j, uint64_t doc)
{
    size_t lo = 0, hi = j->n_exclude;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (j->exclude[mid] < doc)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < j->n_exclude && j->exclude[lo] == doc;
}

static bool candidate(const route_job_t *j, const entry_t *e)
{
    uint64_t s = j->a->snapshot;
    return e->created <= s && s < e->deleted && e->nrows > 0 && !is_excluded(j, e->doc);
}

/* Scores the candidate versions of one entry range block by block: runs of
 * adjacent candidates share one kernel call, skipped versions cost nothing. */
static void route_task(void *arg, size_t task, unsigned worker)
{
    route_job_t *j = arg;
    const msa_idx_coll_t *c = j->c;
    uint32_t l = j->a->layer_pos;
    bool chunk_mean = c->schema.chunk_reduce == MSA_CHUNK_MEAN;
    float *scores = j->scratch + task * j->block_rows;
    size_t e = j->bounds[task][0], end = j->bounds[task][1];
    while (e < end) {
        if (!candidate(j, &c->ent[e])) {
            e++;
            continue;
        }
        size_t first = e, rows = 0;
        while (e < end && candidate(j, &c->ent[e]) &&
               (rows == 0 || rows + c->ent[e].nrows <= j->block_rows)) {
            rows += c->ent[e].nrows;
            e++;
        }
        uint64_t row0 = c->ent[first].row0;
        msa_idx_scorer_run(j->scorer, c->rows[l] + row0 * c->row_bytes,
                           c->scales ? c->scales[l] + row0 * c->schema.kv_heads : NULL, rows,
                           scores);
        const float *s = scores;
        for (size_t k = first; k < e; k++) {
            uint32_t n = c->ent[k].nrows;
            msa_idx_topk_push(&j->topk[task], msa_idx_chunk_reduce(s, n, chunk_mean),
                              c->ent[k].doc);
            s += n;
        }
    }
}

int msa_idx_route(msa_idx_t *x, msa_idx_coll_t *c, const msa_idx_route_args_t *a,
                  msa_idx_hit_t *out, uint32_t *n_out)
{
    const msa_schema_t *sc = &c->schema;
    *n_out = 0;
    if (a->layer_pos >= sc->n_layers || a->top_k == 0 || a->top_k > MSA_MAX_TOP_K || a->T == 0)
        return MSA_EINVAL;
    int rc = MSA_OK;
    msa_idx_scorer_t *scorer = NULL;
    uint64_t *excl = NULL;
    route_job_t j = {.c = c, .a = a};
    rc = msa_idx_scorer_create(a->q, a->T, sc->query_heads, sc->kv_heads, sc->head_dim,
                               sc->similarity == MSA_SIM_COSINE, sc->head_reduce, sc->query_reduce,
                               c->key_dtype, x->isa, &scorer);
    if (rc) return rc;
    if (a->n_exclude) {
        excl = msa_malloc(a->n_exclude * sizeof *excl);
        if (!excl) {
            rc = MSA_ENOMEM;
            goto fail;
        }
        memcpy(excl, a->exclude, a->n_exclude * sizeof *excl);
        qsort(excl, a->n_exclude, sizeof *excl, cmp_u64);
    }
    j.scorer = scorer;
    j.exclude = excl;
    j.n_exclude = a->n_exclude;

    pthread_rwlock_rdlock(&c->lock);
    if (x->accel.route) {
        msa_idx_layer_view_t v = {.coll_id = c->id,
                                  .schema = sc,
                                  .layer_pos = a->layer_pos,
                                  .key_dtype = c->key_dtype,
                                  .row_bytes = c->row_bytes,
                                  .rows = c->rows[a->layer_pos],
                                  .scales = c->scales ? c->scales[a->layer_pos] : NULL,
                                  .n_rows = c->n_rows,
                                  .ent = c->ent,
                                  .n_ent = c->n_ent,
                                  .layout_gen = c->layout_gen,
                                  .delete_gen = c->delete_gen};
        rc = x->accel.route(x->accel.ctx, &v, scorer, a->snapshot, excl, a->n_exclude, a->top_k,
                            out, n_out);
        if (rc != MSA_EUNAVAIL) goto unlock;
        rc = MSA_OK;
    }
    /* Split the versions into tasks of about equal rows; a few per thread so
     * an uneven mix of deleted versions still balances. */
    unsigned workers = msa_idx_pool_size(x->pool) + 1;
    size_t want = c->n_rows / 4096 + 1;
    size_t ntasks = want < (size_t)workers * 4 ? want : (size_t)workers * 4;
    if (ntasks > c->n_ent) ntasks = c->n_ent ? c->n_ent : 1;
    j.block_rows = SCAN_BLOCK_ROWS > c->max_entry_rows ? SCAN_BLOCK_ROWS : c->max_entry_rows;
    j.bounds = msa_malloc(ntasks * sizeof *j.bounds);
    j.topk = msa_malloc(ntasks * sizeof *j.topk);
    j.hits = msa_malloc(ntasks * a->top_k * sizeof *j.hits);
    j.scratch = msa_malloc(ntasks * j.block_rows * sizeof(float));
    if (!j.bounds || !j.topk || !j.hits || !j.scratch) {
        rc = MSA_ENOMEM;
        goto unlock;
    }
    size_t e = 0, per = (c->n_rows + ntasks - 1) / ntasks;
    for (size_t t = 0; t < ntasks; t++) {
        j.bounds[t][0] = e;
        size_t rows = 0;
        while (e < c->n_ent && (rows < per || t == ntasks - 1)) rows += c->ent[e++].nrows;
        j.bounds[t][1] = e;
        msa_idx_topk_init(&j.topk[t], j.hits + t * a->top_k, a->top_k);
    }
    if (ntasks == 1)
        route_task(&j, 0, 0);
    else
        msa_idx_pool_run(x->pool, ntasks, route_task, &j);
    for (size_t t = 1; t < ntasks; t++) msa_idx_topk_merge(&j.topk[0], &j.topk[t]);
    *n_out = msa_idx_topk_finish(&j.topk[0], out);
unlock:
    pthread_rwlock_unlock(&c->lock);
fail:
    free(j.bounds);
    free(j.topk);
    free(j.hits);
    free(j.scratch);
    free(excl);
    msa_idx_scorer_destroy(scorer);
    return rc;
}

/* ==== stats ========================================================================= */

void msa_idx_coll_stats(msa_idx_coll_t *c, msa_idx_coll_stats_t *out)
{
    pthread_rwlock_rdlock(&c->lock);
    out->live_docs = c->h_count;
    out->versions = c->n_ent;
    out->rows = c->n_rows;
    size_t per_row = c->row_bytes + (c->scales ? c->schema.kv_heads * sizeof(float) : 0);
    out->bytes = (uint64_t)c->cap_rows * per_row * c->schema.n_layers +
                 c->cap_ent * sizeof(entry_t) + c->h_cap * (sizeof(uint64_t) + sizeof(uint32_t));
    pthread_rwlock_unlock(&c->lock);
}

long msa_idx_doc_rows(msa_idx_coll_t *c, uint64_t doc_id)
{
    pthread_rwlock_rdlock(&c->lock);
    long e = map_find(c, doc_id);
    long rows = e >= 0 ? (long)c->ent[e].nrows : -1;
    pthread_rwlock_unlock(&c->lock);
    return rows;
}

uint64_t msa_idx_bytes(msa_idx_t *x)
{
    uint64_t total = 0;
    pthread_mutex_lock(&x->lock);
    for (size_t i = 0; i < x->n_colls; i++) {
        msa_idx_coll_stats_t s;
        msa_idx_coll_stats(x->colls[i], &s);
        total += s.bytes;
    }
    pthread_mutex_unlock(&x->lock);
    return total;
}
