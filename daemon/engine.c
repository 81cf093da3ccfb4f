/* engine.c — storage + routing index + compute behind one object.
 *
 * Write path: the caller's thread validates the request and prepares every
 * tensor in its stored form (pooling, dtype rounding, router rows for the
 * index), then queues it. One writer thread takes every queued request,
 * applies each inside its own savepoint of ONE LMDB write txn (a failing
 * request is rolled back alone), commits once (one fsync for the group),
 * applies the rows to the index, publishes the new commit seq and answers.
 *
 * Read path: register a snapshot (LMDB read txn + its commit seq) with the
 * index, wait until the index has applied that seq, route over the rows
 * visible at it, read the selected documents' K/V from the same txn, attend.
 */
#define _GNU_SOURCE /* asprintf */
#include "engine.h"

#include "dev.h"
#include "gpu.h"
#include "index.h"
#include "kernels.h"
#include "lease.h"
#include "msa_alloc.h"
#include "msa_clock.h"
#include "msa_log.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#define MAX_QUERY_TOKENS 65536  /* T per layer; larger queries are INVALID_ARGUMENT */
#define MAX_LIST_LIMIT 100000
/* Defaults of the request limits in msa_srv_config_t (0 there = these). */
#define DEF_MAX_WRITE_OPS 4096
#define DEF_MAX_TEXT_BYTES (16u << 20)
#define DEF_MAX_METADATA_BYTES (1u << 20)
#define DEF_MAX_IDS 100000
#define ID_MAX ((uint64_t)1 << 63) /* ids are 1..2^63-1 */
#define DEF_MAX_HELD_SNAPSHOTS 256
#define DEF_MAX_SNAPSHOT_HOLD_MS 60000

/* ==== the engine ============================================================ */

typedef enum { WQ_WRITE = 1, WQ_CREATE, WQ_DROP } wq_kind_t;

/* One document of a put, in its stored form. */
typedef struct prep_doc {
    uint32_t chunks;
    uint64_t tensor_bytes;
    uint8_t *buf;                 /* every block's bytes */
    msa_store_block_t *blocks;
    size_t n_blocks;
    float *router;                /* [L][chunks][W] stored router keys as float32 */
    const float **router_rows;    /* per layer position into router */
} prep_doc_t;

/* A request queued for the writer; lives on the caller's stack. */
typedef struct wq_item {
    wq_kind_t kind;
    const char *name;             /* collection */
    uint32_t coll_id;             /* as validated; the writer re-checks it */
    const msa_schema_t *schema;   /* create */
    const msa_write_req_t *req;   /* write */
    prep_doc_t *prep;             /* per op (NULL entries for deletes) */
    /* results */
    int rc;
    msa_status_t *st;
    uint64_t seq;
    uint64_t *versions;
    msa_coll_rec_t coll;
    bool done;
    struct wq_item *next;
} wq_item_t;

struct msa_engine {
    msa_srv_config_t cfg;         /* copy; strings below are owned copies */
    char *data_dir;
    char *backup_dir;
    msa_store_t *store;
    msa_idx_t *idx;
    char backend[16];             /* "cpu" or "cuda" */
    msa_gpu_t *gpu;               /* CUDA backend, NULL on the CPU backend */
    /* writer */
    pthread_t writer;
    pthread_mutex_t q_lock;
    pthread_cond_t q_cond;        /* work queued, or stop */
    pthread_cond_t done_cond;     /* some request finished */
    wq_item_t *q_head, *q_tail;
    bool writer_stop;
    pthread_mutex_t pause_lock;   /* held by the writer per group; Verify holds it to freeze writes */
    /* lifecycle */
    atomic_bool shutting_down;
    atomic_bool broken;
    atomic_int inflight;          /* public calls in progress */
    atomic_uint submitted;        /* requests handed to the writer, not yet answered */
    atomic_uint seq_waiters;      /* read calls waiting for a min_seq */
    /* counters */
    _Atomic uint64_t n_writes, n_groups, n_routes, n_attends, n_gets, n_lists;
    msa__lease_table_t *leases;   /* held snapshots (lease.h) */
};

/* Commit rate assumed when deciding whether a min_seq is reachable in time. */
#define MIN_SEQ_COMMITS_PER_MS 1000

static int64_t mono_ms(void)
{
    return msa_clock_ms();
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Every public call brackets itself with enter/leave so close can wait. */
static int enter(msa_engine_t *e, msa_status_t *st)
{
    msa_status_clear(st);
    atomic_fetch_add(&e->inflight, 1);
    if (atomic_load(&e->shutting_down)) {
        atomic_fetch_sub(&e->inflight, 1);
        return msa_status_set(st, MSA_EUNAVAIL, "msad is shutting down");
    }
    if (atomic_load(&e->broken)) {
        atomic_fetch_sub(&e->inflight, 1);
        return msa_status_set(st, MSA_EBROKEN, "engine is broken after an internal failure; restart msad");
    }
    return MSA_OK;
}

static int leave(msa_engine_t *e, int rc)
{
    atomic_fetch_sub(&e->inflight, 1);
    return rc;
}

/* Gives a bare error code a message when the callee left none. */
static int fill_status(msa_status_t *st, int rc, const char *what)
{
    if (rc && st && st->code == MSA_OK) msa_status_set(st, rc, "%s: %s", what, msa_strerror(rc));
    return rc;
}

/* ==== validation helpers ====================================================== */

static bool valid_utf8(const unsigned char *s, size_t n, size_t *bad)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (!len || i + len > n) goto fail;
        uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1f) : len == 3 ? (c & 0x0f) : (c & 0x07);
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80) goto fail;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        /* Overlong forms, surrogates and values past U+10FFFF are not UTF-8. */
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
            cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            goto fail;
        i += len;
    }
    return true;
fail:
    *bad = i;
    return false;
}

static int check_model(const msa_schema_t *s, const char *model, msa_status_t *st)
{
    if (model && model[0] && strcmp(model, s->model) != 0)
        return msa_status_set(st, MSA_EPRECOND,
                              "model: \"%s\" differs from the collection's model \"%s\" "
                              "(latents from another encoder)",
                              model, s->model);
    return MSA_OK;
}

static int check_id(uint64_t id, const char *path, msa_status_t *st)
{
    if (id == 0 || id >= ID_MAX)
        return msa_status_set(st, MSA_EINVAL, "%s: %llu is out of range 1..2^63-1", path,
                              (unsigned long long)id);
    return MSA_OK;
}

/* Finds the collection by name in txn t; NOT_FOUND names it. */
static int find_coll(msa_store_txn_t *t, const char *name, msa_coll_rec_t *out, msa_status_t *st)
{
    if (!name || !name[0]) return msa_status_set(st, MSA_EINVAL, "collection: empty name");
    int rc = msa_schema_validate_name(name, "collection", st);
    if (rc) return rc;
    rc = msa_store_coll_get(t, name, out);
    if (rc == MSA_ENOTFOUND)
        return msa_status_set(st, MSA_ENOTFOUND, "collection \"%s\" not found", name);
    return fill_status(st, rc, "collection lookup");
}

/* ==== write preparation (caller's thread) ======================================== */

/* Leaves *p empty, so that msa_srv_write's cleanup may free it again after
 * prep_put failed and freed it already. */
static void prep_free(prep_doc_t *p)
{
    if (!p) return;
    free(p->buf);
    free(p->blocks);
    free(p->router);
    free(p->router_rows);
    memset(p, 0, sizeof *p);
}

/* Converts one validated tensor ([N or C][H][D], any float dtype) to float32
 * pooled rows [C][W]: raw tensors are mean-pooled per chunk of P tokens. */
static int pooled_f32(const msa_tensor_t *t, bool raw, uint32_t tokens, uint32_t P, uint32_t W,
                      float *out)
{
    size_t n = (size_t)t->shape[0] * W;
    if (!raw) {
        msa_tensor_to_f32(t->dtype, t->data, n, out);
        return MSA_OK;
    }
    float *tmp = msa_malloc(n * sizeof *tmp);
    if (!tmp) return MSA_ENOMEM;
    msa_tensor_to_f32(t->dtype, t->data, n, tmp);
    msa_tensor_pool(tmp, tokens, W, P, out);
    free(tmp);
    return MSA_OK;
}

/* Validates op i's document against the schema and builds its stored blocks
 * and index rows. Messages carry the path "ops[i].put...". */
static int prep_put(const msa_coll_rec_t *coll, const msa_doc_t *d, size_t i, prep_doc_t *p,
                    msa_status_t *st)
{
    const msa_schema_t *s = &coll->schema;
    char path[128], fpath[192];
    snprintf(path, sizeof path, "ops[%zu].put", i);
    memset(p, 0, sizeof *p);
    snprintf(fpath, sizeof fpath, "%s.id", path);
    int rc = check_id(d->id, fpath, st);
    if (rc) return rc;
    if (d->tokens == 0)
        return msa_status_set(st, MSA_EINVAL, "%s.tokens: 0, want > 0", path);
    size_t bad;
    if (d->text_len && !valid_utf8((const unsigned char *)d->text, d->text_len, &bad))
        return msa_status_set(st, MSA_EINVAL, "%s.text: invalid UTF-8 at byte %zu", path, bad);
    if (d->n_layers != s->n_layers)
        return msa_status_set(st, MSA_EINVAL, "%s.layers: %u layers, want %u (one per schema layer)",
                              path, d->n_layers, s->n_layers);

    uint32_t H = s->kv_heads, D = s->head_dim, W = H * D, P = s->chunk_tokens;
    uint32_t C = (uint32_t)(((uint64_t)d->tokens + P - 1) / P);
    uint32_t want[3] = {d->raw ? d->tokens : C, H, D};
    const msa_layer_kv_t *by_pos[MSA_MAX_LAYERS] = {0};
    for (uint32_t l = 0; l < d->n_layers; l++) {
        const msa_layer_kv_t *lk = &d->layers[l];
        int pos = msa_schema_layer_pos(s, lk->layer);
        if (pos < 0)
            return msa_status_set(st, MSA_EINVAL,
                                  "%s.layers[%u].layer: %u is not a memory layer of collection \"%s\"",
                                  path, l, lk->layer, coll->name);
        if (by_pos[pos])
            return msa_status_set(st, MSA_EINVAL, "%s.layers[%u].layer: duplicate layer %u", path,
                                  l, lk->layer);
        by_pos[pos] = lk;
        snprintf(fpath, sizeof fpath, "%s.layers[%u].k", path, l);
        if ((rc = msa_tensor_validate(&lk->k, MSA_DT_UNSPECIFIED, 3, want, fpath, st))) return rc;
        snprintf(fpath, sizeof fpath, "%s.layers[%u].v", path, l);
        if ((rc = msa_tensor_validate(&lk->v, MSA_DT_UNSPECIFIED, 3, want, fpath, st))) return rc;
        bool has_r = lk->router_k.data != NULL || lk->router_k.ndim != 0;
        if (s->separate_router_keys && !has_r)
            return msa_status_set(st, MSA_EINVAL,
                                  "%s.layers[%u].router_k: missing; collection \"%s\" has "
                                  "separate_router_keys",
                                  path, l, coll->name);
        if (!s->separate_router_keys && has_r)
            return msa_status_set(st, MSA_EINVAL,
                                  "%s.layers[%u].router_k: given, but collection \"%s\" routes on K "
                                  "(separate_router_keys = false)",
                                  path, l, coll->name);
        if (has_r) {
            snprintf(fpath, sizeof fpath, "%s.layers[%u].router_k", path, l);
            if ((rc = msa_tensor_validate(&lk->router_k, MSA_DT_UNSPECIFIED, 3, want, fpath, st)))
                return rc;
        }
    }

    /* Stored forms: K and V in kv_dtype, router keys in their store dtype. */
    msa_dtype_t kvt = s->kv_dtype, rt = msa_schema_router_store_dtype(s);
    size_t rows = (size_t)C * W, kv_bytes = rows * msa_dtype_size(kvt);
    size_t r_bytes = s->separate_router_keys ? rows * msa_dtype_size(rt) : 0;
    size_t per_layer = 2 * kv_bytes + r_bytes, L = s->n_layers;
    p->chunks = C;
    p->n_blocks = L * (s->separate_router_keys ? 3 : 2);
    p->tensor_bytes = per_layer * L;
    p->buf = msa_malloc(p->tensor_bytes ? p->tensor_bytes : 1);
    p->blocks = msa_calloc(p->n_blocks, sizeof *p->blocks);
    p->router = msa_malloc(L * rows * sizeof(float));
    p->router_rows = msa_calloc(L, sizeof *p->router_rows);
    float *tmp = msa_malloc(rows * sizeof(float));
    if (!p->buf || !p->blocks || !p->router || !p->router_rows || !tmp) {
        free(tmp);
        prep_free(p);
        return msa_status_set(st, MSA_ENOMEM, "%s: out of memory preparing %zu bytes", path,
                              (size_t)p->tensor_bytes);
    }
    uint8_t *w = p->buf;
    size_t b = 0;
    for (size_t l = 0; l < L; l++) {
        const msa_layer_kv_t *lk = by_pos[l];
        float *router = p->router + l * rows;
        p->router_rows[l] = router;
        const msa_tensor_t *src[3] = {&lk->k, &lk->v, &lk->router_k};
        for (int kind = 0; kind < (s->separate_router_keys ? 3 : 2); kind++) {
            msa_dtype_t dt = kind == MSA_BLOCK_R ? rt : kvt;
            bool copied = !d->raw && src[kind]->dtype == dt;
            if (copied) {
                /* Already in its stored form (validated finite): a float32
                 * round trip would return the same bits, so copy them. */
                memcpy(w, src[kind]->data, rows * msa_dtype_size(dt));
            } else {
                rc = pooled_f32(src[kind], d->raw, d->tokens, P, W, tmp);
                if (rc) break;
                msa_tensor_from_f32(dt, tmp, rows, w);
            }
            /* Finite input can still store Inf: a float32 pooling sum that
             * overflows, or a value beyond F16/BF16 range. Stored Inf would
             * reach the index (NaN after COSINE, UB in I8 quantisation; found
             * by fuzz_rpc), so it is refused like Inf sent by the client. */
            long nf = copied ? -1 : msa_tensor_find_nonfinite(dt, w, rows);
            if (nf >= 0) {
                static const char *const kname[3] = {"k", "v", "router_k"};
                free(tmp);
                prep_free(p);
                return msa_status_set(st, MSA_EINVAL,
                                      "%s.layers[%u].%s: element %ld is out of %s range after %s",
                                      path, (unsigned)(lk - d->layers), kname[kind], nf,
                                      msa_dtype_name(dt),
                                      d->raw ? "mean-pooling in float32" : "rounding");
            }
            /* The index routes on the keys as stored, not on the client's originals. */
            bool routes_here = kind == (s->separate_router_keys ? MSA_BLOCK_R : MSA_BLOCK_K);
            if (routes_here) msa_tensor_to_f32(dt, w, rows, router);
            size_t len = rows * msa_dtype_size(dt);
            p->blocks[b++] = (msa_store_block_t){.layer_pos = (uint16_t)l, .kind = (uint8_t)kind,
                                                 .data = w, .len = len};
            w += len;
        }
        if (rc) break;
    }
    free(tmp);
    if (rc) {
        prep_free(p);
        return msa_status_set(st, rc, "%s: %s", path, msa_strerror(rc));
    }
    return MSA_OK;
}

/* ==== the writer thread ============================================================ */

/* Applies one write request inside the current savepoint. */
static int apply_write(msa_store_txn_t *w, wq_item_t *it, uint64_t seq)
{
    msa_coll_rec_t coll;
    int rc = msa_store_coll_get(w, it->name, &coll);
    if (rc == MSA_ENOTFOUND || (rc == MSA_OK && coll.id != it->coll_id))
        return msa_status_set(it->st, MSA_ENOTFOUND, "collection \"%s\" not found", it->name);
    if (rc) return fill_status(it->st, rc, "collection lookup");
    int64_t now = wall_ms();
    for (size_t i = 0; i < it->req->n_ops; i++) {
        const msa_write_op_t *op = &it->req->ops[i];
        uint64_t id = op->kind == MSA_OP_PUT ? op->put.id : op->delete_id;
        msa_doc_rec_t old;
        rc = msa_store_doc_get(w, coll.id, id, &old);
        bool exists = rc == MSA_OK;
        if (rc && rc != MSA_ENOTFOUND) return fill_status(it->st, rc, "document lookup");
        if (op->expect_absent && exists)
            return msa_status_set(it->st, MSA_EEXIST,
                                  "ops[%zu].expect_absent: document %llu exists (version %llu)", i,
                                  (unsigned long long)id, (unsigned long long)old.version);
        if (op->expect_version && (!exists || old.version != op->expect_version))
            return msa_status_set(it->st, MSA_EPRECOND,
                                  "ops[%zu].expect_version: document %llu is at version %llu, want %llu",
                                  i, (unsigned long long)id,
                                  (unsigned long long)(exists ? old.version : 0),
                                  (unsigned long long)op->expect_version);
        if (op->kind == MSA_OP_DELETE) {
            if (!exists)
                return msa_status_set(it->st, MSA_ENOTFOUND, "ops[%zu].delete_id: document %llu not found",
                                      i, (unsigned long long)id);
            rc = msa_store_doc_delete(w, coll.id, id);
            if (rc) return fill_status(it->st, rc, "delete");
            it->versions[i] = 0;
            continue;
        }
        const prep_doc_t *p = &it->prep[i];
        msa_doc_rec_t rec = {
            .id = id,
            .version = exists ? old.version + 1 : 1,
            .tokens = op->put.tokens,
            .chunks = p->chunks,
            .created_seq = exists ? old.created_seq : seq,
            .updated_seq = seq,
            .updated_unix_ms = now,
            .text_bytes = op->put.text_len,
            .metadata_bytes = op->put.metadata_len,
            .tensor_bytes = p->tensor_bytes,
        };
        rc = msa_store_doc_put(w, coll.id, &rec, op->put.text, op->put.text_len, op->put.metadata,
                               op->put.metadata_len, p->blocks, p->n_blocks);
        if (rc) return fill_status(it->st, rc, "put");
        it->versions[i] = rec.version;
    }
    return MSA_OK;
}

static int apply_item(msa_engine_t *e, msa_store_txn_t *w, wq_item_t *it, uint64_t seq)
{
    switch (it->kind) {
    case WQ_CREATE: {
        int rc = msa_store_coll_create(w, it->name, it->schema, seq, &it->coll);
        if (rc == MSA_EEXIST)
            return msa_status_set(it->st, rc, "collection \"%s\" already exists", it->name);
        return fill_status(it->st, rc, "create collection");
    }
    case WQ_DROP: {
        int rc = msa_store_coll_drop(w, it->name, &it->coll);
        if (rc == MSA_ENOTFOUND)
            return msa_status_set(it->st, rc, "collection \"%s\" not found", it->name);
        return fill_status(it->st, rc, "drop collection");
    }
    case WQ_WRITE:
        return apply_write(w, it, seq);
    }
    return MSA_EINTERNAL;
}

/* Applies a committed request to the index. Failure here means the index no
 * longer matches the store: the engine is marked broken (restart rebuilds). */
static int index_item(msa_engine_t *e, wq_item_t *it)
{
    switch (it->kind) {
    case WQ_CREATE:
        return msa_idx_coll_add(e->idx, it->coll.id, &it->coll.schema);
    case WQ_DROP:
        msa_idx_coll_drop(e->idx, it->coll.id, it->seq);
        return MSA_OK;
    case WQ_WRITE:
        break;
    }
    msa_idx_coll_t *c = msa_idx_coll_acquire(e->idx, it->coll_id);
    if (!c) return MSA_EINTERNAL;
    int rc = MSA_OK;
    for (size_t i = 0; i < it->req->n_ops && rc == MSA_OK; i++) {
        const msa_write_op_t *op = &it->req->ops[i];
        if (op->kind == MSA_OP_DELETE)
            rc = msa_idx_doc_delete(c, op->delete_id, it->seq);
        else
            rc = msa_idx_doc_put(c, op->put.id, it->seq, it->prep[i].chunks, it->prep[i].router_rows);
    }
    msa_idx_coll_release(c);
    return rc;
}

/* Commits one group; returns MSA_EFULL when the map must grow first. */
static int commit_group(msa_engine_t *e, wq_item_t *group)
{
    msa_store_txn_t *w = NULL;
    int rc = msa_store_write_begin(e->store, &w);
    if (rc) return rc;
    uint64_t seq = msa_store_last_seq(e->store);
    for (wq_item_t *it = group; it; it = it->next) {
        msa_status_clear(it->st);
        it->rc = msa_store_savepoint_begin(w);
        if (it->rc == MSA_OK) {
            it->rc = apply_item(e, w, it, seq + 1);
            int end = msa_store_savepoint_end(w, it->rc == MSA_OK);
            if (it->rc == MSA_OK) it->rc = end;
        }
        if (it->rc == MSA_EFULL || it->rc == MSA_EBROKEN || it->rc == MSA_EIO) {
            rc = it->rc;  /* the txn is unusable: the whole group retries or fails */
            msa_store_abort(w);
            return rc;
        }
        if (it->rc == MSA_OK) it->seq = ++seq;
    }
    if (seq == msa_store_last_seq(e->store)) {
        msa_store_abort(w); /* nothing to commit: every request failed */
        return MSA_OK;
    }
    return msa_store_commit(w, seq);
}

/* True when every request of the group only removes data (deletes, drops):
 * such a group may use the store's reserve when the map is full. */
static bool group_frees_only(const wq_item_t *group)
{
    for (const wq_item_t *it = group; it; it = it->next) {
        if (it->kind == WQ_CREATE) return false;
        if (it->kind == WQ_WRITE)
            for (size_t i = 0; i < it->req->n_ops; i++)
                if (it->req->ops[i].kind != MSA_OP_DELETE) return false;
    }
    return true;
}

/* Remapping waits for every open snapshot to end: held snapshots end first
 * (revoked), or a lease would stall the writer, and every reader queued
 * behind the pending remap, until it expires. */
static int grow_revoking(msa_engine_t *e, int (*grow)(msa_store_t *))
{
    msa__lease_revoke_all(e->leases, "map growth");
    int rc = grow(e->store);
    msa__lease_resume(e->leases);
    return rc;
}

static int reserve_revoking(msa_engine_t *e, bool on)
{
    msa__lease_revoke_all(e->leases, "map growth");
    int rc = msa_store_reserve(e->store, on);
    msa__lease_resume(e->leases);
    return rc;
}

/* Commits a group, growing the map as needed. At the map limit (MSA_EFULL):
 * one empty commit makes the pages freed by the last commit reusable (LMDB
 * reuses a commit's freed pages only after the next commit, so right after
 * a delete the space it freed is not yet usable); a group that only deletes
 * may then use the store's reserve, so a full store can always free space. */
static int commit_growing(msa_engine_t *e, wq_item_t *group)
{
    bool touched = false, reserved = false;
    int rc;
    for (;;) {
        rc = commit_group(e, group);
        if (rc != MSA_EFULL) break;
        /* The map is full: grow it (waits for open snapshots) and retry. */
        if (grow_revoking(e, msa_store_grow) == MSA_OK) {
            msa_log(MSA_LOG_INFO, "store: map grown; retrying a group of writes");
            continue;
        }
        if (!touched) {
            touched = true;
            msa_store_txn_t *w = NULL;
            if (msa_store_write_begin(e->store, &w) == MSA_OK &&
                msa_store_commit(w, msa_store_last_seq(e->store)) == MSA_OK) {
                msa_log(MSA_LOG_INFO, "store full: empty commit to reuse freed pages; retrying");
                continue;
            }
        }
        if (!reserved && group_frees_only(group) && reserve_revoking(e, true) == MSA_OK) {
            reserved = true;
            msa_log(MSA_LOG_WARN, "store full: deletes use the map's reserve");
            continue;
        }
        break;
    }
    if (reserved) reserve_revoking(e, false);
    return rc;
}

static void process_group(msa_engine_t *e, wq_item_t *group)
{
    pthread_mutex_lock(&e->pause_lock);
    int rc = commit_growing(e, group);
    if (rc == MSA_EFULL && group->next) {
        /* Full: the group failed as a whole; give each request its own
         * chance, so that a delete is not refused for a put beside it. */
        pthread_mutex_unlock(&e->pause_lock);
        while (group) {
            wq_item_t *it = group;
            group = it->next;
            it->next = NULL;
            process_group(e, it);
            it->next = group;   /* writer_main walks the list afterwards */
        }
        return;
    }
    if (rc == MSA_OK) {
        uint64_t last = 0;
        for (wq_item_t *it = group; it; it = it->next) {
            if (it->rc != MSA_OK) continue;
            if (index_item(e, it) != MSA_OK) {
                atomic_store(&e->broken, true);
                msa_log(MSA_LOG_ERROR, "index apply failed at seq %llu; engine marked broken",
                        (unsigned long long)it->seq);
            }
            last = it->seq;
        }
        if (last) msa_idx_publish(e->idx, last);
        msa_idx_compact(e->idx, false);
    } else {
        for (wq_item_t *it = group; it; it = it->next) {
            it->rc = rc;
            if (rc == MSA_EFULL)
                msa_status_set(it->st, rc, "store full: the LMDB map reached its limit or the disk "
                                           "is full; free space (delete documents), raise the map "
                                           "limit (--map-max-mb) or free disk space");
            else
                msa_status_set(it->st, rc, "commit failed: %s", msa_strerror(rc));
        }
        if (rc == MSA_EBROKEN) atomic_store(&e->broken, true);
        msa_log(MSA_LOG_ERROR, "write group failed: %s", msa_strerror(rc));
    }
    atomic_fetch_add(&e->n_groups, 1);
    pthread_mutex_unlock(&e->pause_lock);
}

static void *writer_main(void *arg)
{
    msa_engine_t *e = arg;
    unsigned max = e->cfg.group_commit_max ? e->cfg.group_commit_max : 256;
    pthread_mutex_lock(&e->q_lock);
    for (;;) {
        while (!e->q_head && !e->writer_stop) pthread_cond_wait(&e->q_cond, &e->q_lock);
        if (!e->q_head) break; /* stop requested and the queue is drained */
        wq_item_t *group = e->q_head, *tail = group;
        for (unsigned n = 1; n < max && tail->next; n++) tail = tail->next;
        e->q_head = tail->next;
        if (!e->q_head) e->q_tail = NULL;
        tail->next = NULL;
        pthread_mutex_unlock(&e->q_lock);

        process_group(e, group);

        pthread_mutex_lock(&e->q_lock);
        for (wq_item_t *it = group; it; it = it->next) it->done = true;
        pthread_cond_broadcast(&e->done_cond);
    }
    pthread_mutex_unlock(&e->q_lock);
    return NULL;
}

/* Queues it and waits until the writer has answered it. */
static int submit(msa_engine_t *e, wq_item_t *it)
{
    it->next = NULL;
    it->done = false;
    /* Counted from before it is queued until after it is answered: every
     * commit not yet applied belongs to a counted request (see snap_open). */
    atomic_fetch_add(&e->submitted, 1);
    pthread_mutex_lock(&e->q_lock);
    if (e->q_tail) e->q_tail->next = it;
    else e->q_head = it;
    e->q_tail = it;
    pthread_cond_signal(&e->q_cond);
    while (!it->done) pthread_cond_wait(&e->done_cond, &e->q_lock);
    pthread_mutex_unlock(&e->q_lock);
    atomic_fetch_sub(&e->submitted, 1);
    return it->rc;
}

/* ==== snapshots ==================================================================== */

typedef struct snap {
    msa_engine_t *e;              /* owner: Get results close their snapshot later */
    msa_store_txn_t *txn;
    uint64_t seq;
    msa_coll_rec_t coll;
    msa_idx_coll_t *ic;
    bool registered;
    msa__lease_t *lease;          /* a held snapshot this call uses: txn is the lease's */
    bool lease_locked;            /* the lease's txn is still in use by this call */
} snap_t;

typedef struct begin_ctx {
    msa_engine_t *e;
    snap_t *s;
} begin_ctx_t;

static int begin_read_ctx(void *arg, uint64_t *seq)
{
    begin_ctx_t *b = arg;
    int rc = msa_store_read_begin(b->e->store, &b->s->txn);
    if (rc) return rc;
    *seq = msa_store_txn_seq(b->s->txn);
    return MSA_OK;
}

static void snap_close(msa_engine_t *e, snap_t *s)
{
    if (s->ic) msa_idx_coll_release(s->ic);
    if (s->lease) {
        if (s->lease_locked) msa__lease_unlock(s->lease);
        msa__lease_put(e->leases, s->lease);
        s->txn = NULL; /* the lease's */
    }
    if (s->txn) msa_store_abort(s->txn);
    if (s->registered) msa_idx_snap_unregister(e->idx, s->seq);
    memset(s, 0, sizeof *s);
}

/* Opens a snapshot that includes min_seq (waiting up to the configured limit
 * or the deadline) and, when name is given, resolves the collection in it. */
static int snap_open(msa_engine_t *e, const char *name, uint64_t min_seq, int64_t deadline_ms,
                     snap_t *s, msa_status_t *st)
{
    memset(s, 0, sizeof *s);
    s->e = e;
    if (min_seq && min_seq > msa_idx_applied(e->idx)) {
        /* "Far" means out of reach within the wait even if every request
         * the writer holds commits and new writes then commit at 1,000 per
         * millisecond (well above what LMDB commits): such a call can only
         * time out, so it is refused at once instead of holding a handler
         * for the whole wait. Read the pending count before `applied`: a
         * request finishing in between is then counted in `applied`. */
        uint32_t wait = e->cfg.min_seq_wait_ms ? e->cfg.min_seq_wait_ms : 5000;
        uint64_t pending = atomic_load(&e->submitted);
        uint64_t applied = msa_idx_applied(e->idx);
        uint64_t reach = applied + pending + (uint64_t)wait * MIN_SEQ_COMMITS_PER_MS;
        if (min_seq > reach)
            return msa_status_set(st, MSA_EPRECOND,
                                  "min_seq: commit %llu is out of reach (last commit %llu, %llu "
                                  "writes in progress; at most %llu within the %u ms wait)",
                                  (unsigned long long)min_seq, (unsigned long long)applied,
                                  (unsigned long long)pending, (unsigned long long)reach, wait);
        unsigned max_w = e->cfg.max_min_seq_waiters ? e->cfg.max_min_seq_waiters : 8;
        if (atomic_fetch_add(&e->seq_waiters, 1) >= max_w) {
            atomic_fetch_sub(&e->seq_waiters, 1);
            return msa_status_set(st, MSA_EFULL,
                                  "min_seq: %u calls already wait for a commit "
                                  "(--max-min-seq-waiters); retry later",
                                  max_w);
        }
        int64_t limit = mono_ms() + wait;
        if (deadline_ms > 0 && deadline_ms < limit) limit = deadline_ms;
        int wrc = msa_idx_wait_applied(e->idx, min_seq, limit);
        atomic_fetch_sub(&e->seq_waiters, 1);
        if (wrc != MSA_OK)
            return msa_status_set(st, MSA_ETIMEOUT,
                                  "min_seq: commit %llu not reached in time (commit seq is %llu)",
                                  (unsigned long long)min_seq,
                                  (unsigned long long)msa_idx_applied(e->idx));
    }
    if (deadline_ms > 0 && mono_ms() > deadline_ms)
        return msa_status_set(st, MSA_ETIMEOUT, "deadline passed before the call started");
    begin_ctx_t b = {e, s};
    int rc = msa_idx_snap_register(e->idx, begin_read_ctx, &b, &s->seq);
    if (rc == MSA_EFULL)
        return msa_status_set(st, rc, "too many concurrent readers (LMDB reader slots exhausted)");
    if (rc) return fill_status(st, rc, "snapshot");
    s->registered = true;
    /* The writer applies right after commit: this wait is microseconds. */
    msa_idx_wait_applied(e->idx, s->seq, 0);
    if (name) {
        rc = find_coll(s->txn, name, &s->coll, st);
        if (rc == MSA_OK) {
            s->ic = msa_idx_coll_acquire(e->idx, s->coll.id);
            if (!s->ic) rc = msa_status_set(st, MSA_EINTERNAL, "collection \"%s\" missing from the index", name);
        }
        if (rc) snap_close(e, s);
    }
    return rc;
}

/* ---- held snapshots (lease.h) ---- */

/* Ends a held snapshot for good (the lease table's close callback). */
static void lease_close(void *ctx, msa_store_txn_t *txn, uint64_t seq)
{
    msa_engine_t *e = ctx;
    msa_store_abort(txn);
    msa_idx_snap_unregister(e->idx, seq);
}

/* snap_open for the reads that take snapshot_seq and hold_snapshot_ms (Route,
 * Attend, Get, List): snapshot_seq != 0 borrows that held snapshot (see
 * msa__lease_borrow) and resolves the collection in it. */
static int snap_open_at(msa_engine_t *e, const char *name, uint64_t min_seq, int64_t deadline_ms,
                        uint64_t snapshot_seq, uint32_t hold_ms, snap_t *s, msa_status_t *st)
{
    memset(s, 0, sizeof *s);
    s->e = e;
    if (hold_ms > e->cfg.max_snapshot_hold_ms)
        return msa_status_set(st, MSA_EINVAL,
                              "hold_snapshot_ms: %u ms, at most %u (--max-snapshot-hold-ms); "
                              "renew the lease instead",
                              hold_ms, e->cfg.max_snapshot_hold_ms);
    if (!snapshot_seq) return snap_open(e, name, min_seq, deadline_ms, s, st);
    if (min_seq > snapshot_seq)
        return msa_status_set(st, MSA_EINVAL,
                              "min_seq: %llu is after snapshot_seq %llu (a held snapshot "
                              "never moves)",
                              (unsigned long long)min_seq, (unsigned long long)snapshot_seq);
    if (deadline_ms > 0 && mono_ms() > deadline_ms)
        return msa_status_set(st, MSA_ETIMEOUT, "deadline passed before the call started");
    int rc = msa__lease_borrow(e->leases, snapshot_seq, &s->lease, &s->txn, st);
    if (rc) return rc;
    s->lease_locked = true;
    s->seq = snapshot_seq;
    if (name) {
        rc = find_coll(s->txn, name, &s->coll, st);
        if (rc == MSA_OK) {
            /* A collection dropped after seq stays in the index while a
             * snapshot older than the drop is registered, as this one is. */
            s->ic = msa_idx_coll_acquire(e->idx, s->coll.id);
            if (!s->ic) rc = msa_status_set(st, MSA_EINTERNAL, "collection \"%s\" missing from the index", name);
        }
        if (rc) snap_close(e, s);
    }
    return rc;
}

/* After a read succeeded: hold_ms != 0 starts a lease on the snapshot it read
 * (or renews the one it borrowed). The snapshot then belongs to the lease and
 * s only counts as its user; snap_close still ends s. Errors: MSA_EFULL at
 * --max-held-snapshots (s unchanged). */
static int snap_hold(msa_engine_t *e, snap_t *s, uint32_t hold_ms, msa_status_t *st)
{
    if (!hold_ms) return MSA_OK;
    if (s->lease) {
        msa__lease_renew(e->leases, s->lease, hold_ms);
        return MSA_OK;
    }
    msa__lease_t *h = NULL;
    int rc = msa__lease_adopt(e->leases, &s->txn, s->seq, hold_ms, &h, st);
    if (rc == MSA_OK && h) {
        s->lease = h; /* took s->txn and the index registration */
        s->registered = false;
        s->lease_locked = false;
    }
    return rc;
}

/* The call is done with the txn but still reads views into the snapshot (Get). */
static void snap_unlock(snap_t *s)
{
    if (s->lease && s->lease_locked) msa__lease_unlock(s->lease);
    s->lease_locked = false;
}

/* ==== lifecycle ===================================================================== */

typedef struct rebuild_ctx {
    msa_engine_t *e;
    msa_store_txn_t *txn;
    const msa_coll_rec_t *coll;
    msa_idx_coll_t *ic;
    float *rows;                  /* [L][max chunks][W] scratch */
    size_t rows_cap;              /* floats */
    uint64_t done, total;
    int64_t last_log;
    int rc;
    msa_status_t *st;             /* names the document at fault */
} rebuild_ctx_t;

static int rebuild_doc(void *arg, const msa_doc_rec_t *d)
{
    rebuild_ctx_t *r = arg;
    const msa_schema_t *s = &r->coll->schema;
    size_t W = (size_t)s->kv_heads * s->head_dim, need = (size_t)s->n_layers * d->chunks * W;
    if (need > r->rows_cap) {
        float *n = msa_realloc(r->rows, need * sizeof *n);
        if (!n) return r->rc = MSA_ENOMEM;
        r->rows = n;
        r->rows_cap = need;
    }
    const float *ptrs[MSA_MAX_LAYERS];
    msa_block_kind_t kind = s->separate_router_keys ? MSA_BLOCK_R : MSA_BLOCK_K;
    msa_dtype_t dt = s->separate_router_keys ? msa_schema_router_store_dtype(s) : s->kv_dtype;
    for (uint32_t l = 0; l < s->n_layers; l++) {
        msa_store_view_t v;
        int rc = msa_store_block_get(r->txn, r->coll->id, d->id, (uint16_t)l, kind, &v);
        size_t n = (size_t)d->chunks * W;
        if (rc || v.len != n * msa_dtype_size(dt)) {
            msa_status_set(r->st, MSA_ECORRUPT,
                           "%s/data.mdb: index rebuild: collection \"%s\" document %llu layer %u "
                           "%c block: %s",
                           r->e->data_dir, r->coll->name, (unsigned long long)d->id, s->layers[l],
                           kind == MSA_BLOCK_R ? 'R' : 'K',
                           rc == MSA_ECORRUPT ? "stored data is damaged (checksum mismatch)"
                           : rc               ? msa_strerror(rc)
                                              : "has the wrong size");
            msa_log(MSA_LOG_ERROR, "%s", r->st->msg);
            return r->rc = MSA_ECORRUPT;
        }
        float *dst = r->rows + (size_t)l * d->chunks * W;
        msa_tensor_to_f32(dt, v.data, n, dst);
        ptrs[l] = dst;
    }
    int rc = msa_idx_doc_put(r->ic, d->id, d->updated_seq, d->chunks, ptrs);
    if (rc) return r->rc = rc;
    r->done++;
    int64_t now = mono_ms();
    if (now - r->last_log > 2000) {
        msa_log(MSA_LOG_INFO, "rebuild: collection \"%s\": %llu/%llu documents", r->coll->name,
                (unsigned long long)r->done, (unsigned long long)r->total);
        r->last_log = now;
    }
    return 0;
}

static int rebuild_coll(void *arg, const msa_coll_rec_t *c)
{
    rebuild_ctx_t *r = arg;
    int rc = msa_idx_coll_add(r->e->idx, c->id, &c->schema);
    if (rc) return r->rc = rc;
    r->coll = c;
    r->ic = msa_idx_coll_acquire(r->e->idx, c->id);
    r->done = 0;
    r->total = c->documents;
    rc = msa_store_doc_foreach(r->txn, c->id, rebuild_doc, r);
    if (rc && r->st->code == MSA_OK)
        msa_status_set(r->st, rc,
                       "%s/data.mdb: index rebuild: collection \"%s\" after document %llu of "
                       "%llu: %s",
                       r->e->data_dir, c->name, (unsigned long long)r->done,
                       (unsigned long long)r->total,
                       rc == MSA_ECORRUPT ? "a document record is damaged" : msa_strerror(rc));
    msa_idx_coll_release(r->ic);
    r->ic = NULL;
    if (rc == MSA_OK)
        msa_log(MSA_LOG_INFO, "rebuild: collection \"%s\": %llu documents, %llu chunks per layer",
                c->name, (unsigned long long)c->documents, (unsigned long long)c->chunks);
    return rc ? rc : r->rc;
}

static int rebuild_index(msa_engine_t *e, msa_status_t *st)
{
    rebuild_ctx_t r = {.e = e, .last_log = mono_ms(), .st = st};
    int rc = msa_store_read_begin(e->store, &r.txn);
    if (rc) return fill_status(st, rc, "rebuild");
    int64_t t0 = mono_ms();
    uint64_t seq = msa_store_txn_seq(r.txn);
    rc = msa_store_coll_foreach(r.txn, rebuild_coll, &r);
    msa_store_abort(r.txn);
    free(r.rows);
    if (rc) {
        if (st->code == MSA_OK)
            msa_status_set(st, rc, "index rebuild failed: %s", msa_strerror(rc));
        return rc;
    }
    msa_idx_publish(e->idx, seq);
    msa_log(MSA_LOG_INFO, "rebuild: index ready at commit %llu in %lld ms (%.1f MiB)",
            (unsigned long long)seq, (long long)(mono_ms() - t0),
            (double)msa_idx_bytes(e->idx) / (1 << 20));
    return MSA_OK;
}

static char *dup_or_null(const char *s) { return s ? msa_strdup(s) : NULL; }

int msa_srv_open(const msa_srv_config_t *cfg, msa_engine_t **out, msa_status_t *st)
{
    msa_status_t local;
    if (!st) st = &local; /* the rebuild reads st back */
    msa_status_clear(st);
    msa_engine_t *e = msa_calloc(1, sizeof *e);
    if (!e) return msa_status_set(st, MSA_ENOMEM, "engine: out of memory");
    e->cfg = *cfg;
    if (!e->cfg.max_query_tokens) e->cfg.max_query_tokens = MAX_QUERY_TOKENS;
    if (!e->cfg.max_write_ops) e->cfg.max_write_ops = DEF_MAX_WRITE_OPS;
    if (!e->cfg.max_text_bytes) e->cfg.max_text_bytes = DEF_MAX_TEXT_BYTES;
    if (!e->cfg.max_metadata_bytes) e->cfg.max_metadata_bytes = DEF_MAX_METADATA_BYTES;
    if (!e->cfg.max_ids) e->cfg.max_ids = DEF_MAX_IDS;
    if (!e->cfg.max_held_snapshots) e->cfg.max_held_snapshots = DEF_MAX_HELD_SNAPSHOTS;
    if (!e->cfg.max_snapshot_hold_ms) e->cfg.max_snapshot_hold_ms = DEF_MAX_SNAPSHOT_HOLD_MS;
    {
        /* Each held snapshot takes an LMDB reader slot: leave half to calls. */
        uint32_t slots = cfg->max_readers ? cfg->max_readers : 1024;
        if (e->cfg.max_held_snapshots > slots / 2) {
            msa_log(MSA_LOG_WARN, "--max-held-snapshots %u lowered to %u: half the %u LMDB reader "
                                  "slots (--max-readers) stay for calls",
                    e->cfg.max_held_snapshots, slots / 2, slots);
            e->cfg.max_held_snapshots = slots / 2;
        }
    }
    e->data_dir = dup_or_null(cfg->data_dir ? cfg->data_dir : "./msa-data");
    e->backup_dir = dup_or_null(cfg->backup_dir);
    e->cfg.data_dir = e->data_dir;
    e->cfg.backup_dir = e->backup_dir;
    pthread_mutex_init(&e->q_lock, NULL);
    pthread_cond_init(&e->q_cond, NULL);
    pthread_cond_init(&e->done_cond, NULL);
    pthread_mutex_init(&e->pause_lock, NULL);
    int rc;
    if (!e->data_dir || (cfg->backup_dir && !e->backup_dir)) {
        rc = msa_status_set(st, MSA_ENOMEM, "engine: out of memory");
        goto fail;
    }

    char why[256] = "";
    const char *sim_env = getenv("MSA_GPU_SIM");
    e->cfg.gpu.sim = sim_env && !strcmp(sim_env, "1");
    if (!e->cfg.gpu.shards_per_gpu) e->cfg.gpu.shards_per_gpu = 1;
    int gpus = e->cfg.gpu.sim ? msa_dev_count(true, why, sizeof why)
                              : msa_gpu_device_count(why, sizeof why);
    snprintf(e->backend, sizeof e->backend, "cpu");
    if (cfg->backend == MSA_BACKEND_CUDA || (cfg->backend == MSA_BACKEND_AUTO && gpus > 0)) {
        char gwhy[256] = "";
        rc = gpus > 0 ? msa_gpu_open(&e->cfg.gpu, &e->gpu, gwhy, sizeof gwhy) : MSA_EUNAVAIL;
        if (rc && cfg->backend == MSA_BACKEND_CUDA) {
            rc = msa_status_set(st, rc == MSA_ENOMEM ? MSA_EFULL : MSA_EUNAVAIL,
                                "backend cuda: %s", gpus > 0 ? gwhy : why);
            goto fail;
        }
        if (rc)
            msa_log(MSA_LOG_WARN, "backend auto: CUDA backend unusable (%s); using the CPU", gwhy);
        else
            snprintf(e->backend, sizeof e->backend, "cuda");
    }
    if (e->cfg.gpu.sim && e->gpu)
        msa_log(MSA_LOG_WARN, "backend: cuda on the SIMULATED device (MSA_GPU_SIM=1): a test "
                              "device that computes on the host; never use it to serve");
    msa_log(MSA_LOG_INFO, "backend: %s (%s; %d CUDA device%s%s%s)", e->backend,
            msa_idx_isa_name(msa_idx_isa_detect()), gpus, gpus == 1 ? "" : "s",
            gpus ? "" : ": ", gpus ? "" : why);

    /* The walk runs in a child process before this one maps the file, so a
     * page that would crash LMDB crashes the child, and msad refuses to start. */
    if (cfg->check_on_start != MSA_STORE_CHECK_OFF) {
        int64_t t0 = mono_ms();
        uint64_t bytes = 0;
        rc = msa_store_check_file(e->data_dir, cfg->check_on_start, &bytes, st);
        if (rc) goto fail;
        if (bytes)
            msa_log(MSA_LOG_INFO, "check-on-start %s: %s/data.mdb (%.1f MiB) sound in %lld ms",
                    cfg->check_on_start == MSA_STORE_CHECK_QUICK ? "quick" : "full", e->data_dir,
                    (double)bytes / (1 << 20), (long long)(mono_ms() - t0));
    }
    msa_store_opts_t so = {.map_size = cfg->map_size, .map_max = cfg->map_max,
                           .max_readers = cfg->max_readers, .nosync = cfg->nosync};
    rc = msa_store_open(e->data_dir, &so, &e->store, st);
    if (rc) goto fail;
    rc = msa_idx_create(cfg->threads, msa_idx_isa_detect(), &e->idx);
    if (rc) {
        msa_status_set(st, rc, "index: %s", msa_strerror(rc));
        goto fail;
    }
    if (e->gpu) {
        /* Pinned row arrays: layers paged out of the GPU stream back by DMA. */
        msa_idx_host_alloc_t ha;
        msa_gpu_host_allocator(e->gpu, &ha);
        msa_idx_set_host_alloc(e->idx, &ha);
    }
    rc = rebuild_index(e, st);
    if (rc) goto fail;
    rc = msa__lease_table_create(e->cfg.max_held_snapshots, lease_close, e, &e->leases);
    if (rc) {
        msa_status_set(st, rc, "held snapshots: %s", msa_strerror(rc));
        goto fail;
    }
    if (e->gpu) {
        msa_idx_accel_t acc;
        msa_gpu_accel(e->gpu, &acc);
        msa_idx_set_accel(e->idx, &acc);
    }
    if (pthread_create(&e->writer, NULL, writer_main, e) != 0) {
        rc = msa_status_set(st, MSA_EINTERNAL, "cannot start the writer thread");
        goto fail;
    }
    *out = e;
    return MSA_OK;
fail:
    msa__lease_table_destroy(e->leases);
    /* The index first: its row arrays may be the backend's pinned memory. */
    if (e->idx) msa_idx_set_accel(e->idx, NULL);
    msa_idx_destroy(e->idx);
    msa_gpu_close(e->gpu);
    msa_store_close(e->store);
    free(e->data_dir);
    free(e->backup_dir);
    free(e);
    return rc;
}

void msa_srv_shutdown_begin(msa_engine_t *e)
{
    if (e) atomic_store(&e->shutting_down, true);
}

void msa_srv_close(msa_engine_t *e)
{
    if (!e) return;
    msa_srv_shutdown_begin(e);
    /* Calls in flight (including writes queued to the writer) finish first. */
    while (atomic_load(&e->inflight) > 0) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    pthread_mutex_lock(&e->q_lock);
    e->writer_stop = true;
    pthread_cond_signal(&e->q_cond);
    pthread_mutex_unlock(&e->q_lock);
    pthread_join(e->writer, NULL);
    msa__lease_table_destroy(e->leases); /* closes every held snapshot */
    msa_idx_set_accel(e->idx, NULL);
    msa_idx_destroy(e->idx); /* before the backend: pinned row arrays */
    msa_gpu_close(e->gpu);
    msa_store_close(e->store);
    pthread_mutex_destroy(&e->q_lock);
    pthread_cond_destroy(&e->q_cond);
    pthread_cond_destroy(&e->done_cond);
    pthread_mutex_destroy(&e->pause_lock);
    free(e->data_dir);
    free(e->backup_dir);
    free(e);
}

const char *msa_srv_backend_name(const msa_engine_t *e) { return e->backend; }

uint64_t msa_srv_commit_seq(const msa_engine_t *e) { return msa_idx_applied(e->idx); }

/* ==== collections ===================================================================== */

static void info_from_rec(const msa_coll_rec_t *c, msa_coll_info_t *out)
{
    memset(out, 0, sizeof *out);
    snprintf(out->name, sizeof out->name, "%s", c->name);
    out->schema = c->schema;
    out->documents = c->documents;
    out->chunks = c->chunks;
    out->tokens = c->tokens;
    out->bytes = c->bytes;
    out->created_seq = c->created_seq;
}

int msa_srv_create_collection(msa_engine_t *e, const char *name, const msa_schema_t *schema,
                              msa_coll_info_t *out, msa_status_t *st)
{
    int rc = enter(e, st);
    if (rc) return rc;
    msa_schema_t s = *schema;
    msa_schema_apply_defaults(&s);
    rc = msa_schema_validate_name(name, "name", st);
    if (rc == MSA_OK) rc = msa_schema_validate(&s, "schema", st);
    if (rc) return leave(e, rc);
    wq_item_t it = {.kind = WQ_CREATE, .name = name, .schema = &s, .st = st};
    rc = submit(e, &it);
    if (rc == MSA_OK) {
        info_from_rec(&it.coll, out);
        msa_log(MSA_LOG_INFO, "collection \"%s\" created (id %u, seq %llu)", name, it.coll.id,
                (unsigned long long)it.seq);
    }
    return leave(e, rc);
}

int msa_srv_drop_collection(msa_engine_t *e, const char *name, uint64_t *commit_seq,
                            msa_status_t *st)
{
    int rc = enter(e, st);
    if (rc) return rc;
    rc = msa_schema_validate_name(name, "name", st);
    if (rc) return leave(e, rc);
    wq_item_t it = {.kind = WQ_DROP, .name = name, .st = st};
    rc = submit(e, &it);
    if (rc == MSA_OK) {
        *commit_seq = it.seq;
        msa_log(MSA_LOG_INFO, "collection \"%s\" dropped (seq %llu)", name, (unsigned long long)it.seq);
    }
    return leave(e, rc);
}

int msa_srv_describe_collection(msa_engine_t *e, const char *name, msa_coll_info_t *out,
                                msa_status_t *st)
{
    int rc = enter(e, st);
    if (rc) return rc;
    snap_t s;
    rc = snap_open(e, name, 0, 0, &s, st);
    if (rc == MSA_OK) {
        info_from_rec(&s.coll, out);
        snap_close(e, &s);
    }
    return leave(e, rc);
}

typedef struct coll_list {
    msa_coll_info_t *v;
    size_t n, cap;
} coll_list_t;

static int collect_coll(void *arg, const msa_coll_rec_t *c)
{
    coll_list_t *l = arg;
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 8;
        msa_coll_info_t *n = msa_realloc(l->v, cap * sizeof *n);
        if (!n) return MSA_ENOMEM;
        l->v = n;
        l->cap = cap;
    }
    info_from_rec(c, &l->v[l->n++]);
    return 0;
}

int msa_srv_list_collections(msa_engine_t *e, msa_coll_info_t **out, size_t *n, msa_status_t *st)
{
    int rc = enter(e, st);
    if (rc) return rc;
    snap_t s;
    coll_list_t l = {0};
    rc = snap_open(e, NULL, 0, 0, &s, st);
    if (rc == MSA_OK) {
        rc = fill_status(st, msa_store_coll_foreach(s.txn, collect_coll, &l), "list collections");
        snap_close(e, &s);
    }
    if (rc) free(l.v);
    else {
        *out = l.v;
        *n = l.n;
    }
    return leave(e, rc);
}

/* ==== writes ============================================================================ */

int msa_srv_write(msa_engine_t *e, const msa_write_req_t *req, msa_write_result_t *out,
                  msa_status_t *st)
{
    int rc = enter(e, st);
    if (rc) return rc;
    memset(out, 0, sizeof *out);
    prep_doc_t *prep = NULL;
    uint64_t *versions = NULL;
    msa_coll_rec_t coll;
    if (req->n_ops == 0) {
        rc = msa_status_set(st, MSA_EINVAL, "ops: empty; a write needs at least one op");
        goto done;
    }
    if (req->n_ops > e->cfg.max_write_ops) {
        rc = msa_status_set(st, MSA_EINVAL, "ops: %zu ops, at most %u per write (--max-write-ops)",
                            req->n_ops, e->cfg.max_write_ops);
        goto done;
    }
    for (size_t i = 0; i < req->n_ops; i++) {
        const msa_doc_t *d = &req->ops[i].put;
        if (req->ops[i].kind != MSA_OP_PUT) continue;
        if (d->text_len > e->cfg.max_text_bytes)
            rc = msa_status_set(st, MSA_EINVAL,
                                "ops[%zu].put.text: %zu bytes, at most %u (--max-text-bytes)", i,
                                d->text_len, e->cfg.max_text_bytes);
        else if (d->metadata_len > e->cfg.max_metadata_bytes)
            rc = msa_status_set(st, MSA_EINVAL,
                                "ops[%zu].put.metadata: %zu bytes, at most %u (--max-metadata-bytes)",
                                i, d->metadata_len, e->cfg.max_metadata_bytes);
        if (rc) goto done;
    }
    /* Resolve the collection (the writer re-checks it by id at commit). */
    snap_t s;
    rc = snap_open(e, req->collection, 0, 0, &s, st);
    if (rc) goto done;
    coll = s.coll;
    snap_close(e, &s);
    if ((rc = check_model(&coll.schema, req->model, st))) goto done;

    prep = msa_calloc(req->n_ops, sizeof *prep);
    versions = msa_calloc(req->n_ops, sizeof *versions);
    if (!prep || !versions) {
        rc = msa_status_set(st, MSA_ENOMEM, "write: out of memory");
        goto done;
    }
    for (size_t i = 0; i < req->n_ops && rc == MSA_OK; i++) {
        const msa_write_op_t *op = &req->ops[i];
        char path[64];
        if (op->kind == MSA_OP_PUT) {
            rc = prep_put(&coll, &op->put, i, &prep[i], st);
        } else if (op->kind == MSA_OP_DELETE) {
            snprintf(path, sizeof path, "ops[%zu].delete_id", i);
            rc = check_id(op->delete_id, path, st);
            if (rc == MSA_OK && op->expect_absent)
                rc = msa_status_set(st, MSA_EINVAL, "ops[%zu].expect_absent: only valid with put", i);
        } else {
            rc = msa_status_set(st, MSA_EINVAL, "ops[%zu]: neither put nor delete_id is set", i);
        }
    }
    if (rc) goto done;
    wq_item_t it = {.kind = WQ_WRITE, .name = req->collection, .coll_id = coll.id, .req = req,
                    .prep = prep, .st = st, .versions = versions};
    rc = submit(e, &it);
    if (rc == MSA_OK) {
        out->commit_seq = it.seq;
        out->versions = versions;
        out->n_versions = req->n_ops;
        versions = NULL;
        atomic_fetch_add(&e->n_writes, 1);
        msa_log(MSA_LOG_DEBUG, "write: collection \"%s\", %zu ops, seq %llu", req->collection,
                req->n_ops, (unsigned long long)it.seq);
    }
done:
    if (prep)
        for (size_t i = 0; i < req->n_ops; i++) prep_free(&prep[i]);
    free(prep);
    free(versions);
    return leave(e, rc);
}

/* ==== reads: query validation ==================================================================== */

/* Validates the layers of a Route/Attend request; fills positions and float32
 * copies of routing_q (need_route) and q (need_q). Buffers are freed by caller. */
typedef struct query_set {
    uint32_t n;
    int pos[MSA_MAX_LAYERS];
    uint32_t T[MSA_MAX_LAYERS];
    float *rq[MSA_MAX_LAYERS];
    float *q[MSA_MAX_LAYERS];
} query_set_t;

static void query_set_free(query_set_t *qs)
{
    for (uint32_t i = 0; i < qs->n; i++) {
        free(qs->rq[i]);
        free(qs->q[i]);
    }
}

static int tensor_f32(const msa_tensor_t *t, float **out, msa_status_t *st, const char *path)
{
    size_t n = (size_t)t->shape[0] * t->shape[1] * t->shape[2];
    *out = msa_malloc(n * sizeof(float));
    if (!*out) return msa_status_set(st, MSA_ENOMEM, "%s: out of memory", path);
    msa_tensor_to_f32(t->dtype, t->data, n, *out);
    return MSA_OK;
}

static int prep_queries(const msa_schema_t *s, const char *cname, uint32_t n_layers,
                        const msa_layer_query_t *layers, bool need_route, bool need_q,
                        uint32_t max_t, query_set_t *qs, msa_status_t *st)
{
    memset(qs, 0, sizeof *qs);
    if (n_layers == 0) return msa_status_set(st, MSA_EINVAL, "layers: empty; name at least one layer");
    if (n_layers > s->n_layers)
        return msa_status_set(st, MSA_EINVAL, "layers: %u given, collection has %u", n_layers,
                              s->n_layers);
    char path[96];
    for (uint32_t i = 0; i < n_layers; i++) {
        const msa_layer_query_t *lq = &layers[i];
        int pos = msa_schema_layer_pos(s, lq->layer);
        if (pos < 0)
            return msa_status_set(st, MSA_EINVAL,
                                  "layers[%u].layer: %u is not a memory layer of collection \"%s\"",
                                  i, lq->layer, cname);
        for (uint32_t j = 0; j < i; j++)
            if (qs->pos[j] == pos)
                return msa_status_set(st, MSA_EINVAL, "layers[%u].layer: duplicate layer %u", i,
                                      lq->layer);
        qs->pos[i] = pos;
        qs->n = i + 1;
        uint32_t want[3] = {0, s->query_heads, s->head_dim};
        int rc;
        if (need_route) {
            snprintf(path, sizeof path, "layers[%u].routing_q", i);
            if ((rc = msa_tensor_validate(&lq->routing_q, MSA_DT_UNSPECIFIED, 3, want, path, st)))
                return rc;
            qs->T[i] = lq->routing_q.shape[0];
            if ((rc = tensor_f32(&lq->routing_q, &qs->rq[i], st, path))) return rc;
        }
        if (need_q) {
            snprintf(path, sizeof path, "layers[%u].q", i);
            if (need_route) want[0] = qs->T[i];
            if ((rc = msa_tensor_validate(&lq->q, MSA_DT_UNSPECIFIED, 3, want, path, st))) return rc;
            qs->T[i] = lq->q.shape[0];
            if ((rc = tensor_f32(&lq->q, &qs->q[i], st, path))) return rc;
        }
        if (qs->T[i] == 0 || qs->T[i] > max_t)
            return msa_status_set(st, MSA_EINVAL,
                                  "layers[%u].%s: %u query tokens, want 1..%u (--max-query-tokens)",
                                  i, need_route ? "routing_q" : "q", qs->T[i], max_t);
    }
    return MSA_OK;
}

static int check_top_k(const msa_schema_t *s, uint32_t top_k, uint32_t *k, msa_status_t *st)
{
    if (top_k > MSA_MAX_TOP_K)
        return msa_status_set(st, MSA_EINVAL, "top_k: %u, at most %d", top_k, MSA_MAX_TOP_K);
    *k = top_k ? top_k : s->default_top_k;
    return MSA_OK;
}

/* Routes one validated layer query over the snapshot. */
/* I8 re-rank: candidates per wanted hit, and at least this many extra. */
#define RERANK_FACTOR 4
#define RERANK_MIN_EXTRA 16

static int cmp_hit(const void *a, const void *b)
{
    const msa_idx_hit_t *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* Re-scores the n candidates of layer query i from their stored router keys
 * (the stored keys are the truth, SEMANTICS "Routing" step 2; I8 is only the
 * index's form of them) in float32, and sorts them best first. */
static int rerank_stored(msa_engine_t *e, snap_t *s, const query_set_t *qs, uint32_t i,
                         msa_idx_hit_t *hits, uint32_t n, msa_status_t *st)
{
    const msa_schema_t *sc = &s->coll.schema;
    const uint32_t H = sc->kv_heads, D = sc->head_dim;
    const bool cosine = sc->similarity == MSA_SIM_COSINE;
    const msa_block_kind_t kind = sc->separate_router_keys ? MSA_BLOCK_R : MSA_BLOCK_K;
    const msa_dtype_t dt = sc->kv_dtype; /* I8 routing: router keys stored in kv_dtype */
    const size_t row = (size_t)H * D;
    msa_idx_scorer_t *scorer = NULL;
    int rc = msa_idx_scorer_create(qs->rq[i], qs->T[i], sc->query_heads, H, D, cosine,
                                   sc->head_reduce, sc->query_reduce, MSA_DT_F32,
                                   msa_idx_get_isa(e->idx), &scorer);
    if (rc) return msa_status_set(st, rc, "route: re-rank: %s", msa_strerror(rc));
    float *keys = NULL, *rs = NULL;
    size_t cap = 0;
    for (uint32_t c = 0; c < n && rc == MSA_OK; c++) {
        msa_store_view_t v;
        rc = msa_store_block_get(s->txn, s->coll.id, hits[c].id, (uint16_t)qs->pos[i], kind, &v);
        if (rc == MSA_OK && v.len % (row * msa_dtype_size(dt)) != 0) rc = MSA_ECORRUPT;
        if (rc) {
            msa_status_set(st, rc == MSA_ENOTFOUND ? MSA_EINTERNAL : rc,
                           "route: collection \"%s\" document %llu layer %u router block: %s",
                           s->coll.name, (unsigned long long)hits[c].id, sc->layers[qs->pos[i]],
                           rc == MSA_ECORRUPT ? "stored data is damaged" : msa_strerror(rc));
            break;
        }
        size_t rows = v.len / (row * msa_dtype_size(dt));
        if (rows > cap) {
            float *k2 = msa_realloc(keys, rows * row * sizeof *k2), *r2 = msa_realloc(rs, rows * sizeof *r2);
            if (k2) keys = k2;
            if (r2) rs = r2;
            if (!k2 || !r2) {
                rc = msa_status_set(st, MSA_ENOMEM, "route: out of memory");
                break;
            }
            cap = rows;
        }
        msa_tensor_to_f32(dt, v.data, rows * row, keys);
        if (cosine) msa_tensor_l2_normalize(keys, rows * H, D);
        msa_idx_scorer_run(scorer, keys, NULL, rows, rs);
        hits[c].score = msa_idx_chunk_reduce(rs, rows, sc->chunk_reduce == MSA_CHUNK_MEAN);
    }
    if (rc == MSA_OK) qsort(hits, n, sizeof *hits, cmp_hit);
    free(keys);
    free(rs);
    msa_idx_scorer_destroy(scorer);
    return rc;
}

static int route_layer(msa_engine_t *e, snap_t *s, const query_set_t *qs, uint32_t i, uint32_t k,
                       const uint64_t *excl, size_t n_excl, uint64_t **ids, float **scores,
                       uint32_t *n, msa_status_t *st)
{
    msa_idx_hit_t *hits = msa_malloc(k * sizeof *hits);
    *ids = msa_malloc(k * sizeof **ids);
    *scores = msa_malloc(k * sizeof **scores);
    if (!hits || !*ids || !*scores) {
        free(hits);
        return msa_status_set(st, MSA_ENOMEM, "route: out of memory");
    }
    /* I8 keys are an approximation of the stored keys: ask the index for more
     * candidates and re-score them from the stored keys (rerank_stored). */
    const bool i8 = s->coll.schema.routing_dtype == MSA_DT_I8;
    uint32_t want = k;
    if (i8) {
        want = k * RERANK_FACTOR < k + RERANK_MIN_EXTRA ? k + RERANK_MIN_EXTRA : k * RERANK_FACTOR;
        if (want > MSA_MAX_TOP_K) want = MSA_MAX_TOP_K;
        msa_idx_hit_t *more = msa_realloc(hits, want * sizeof *hits);
        if (!more) {
            free(hits);
            return msa_status_set(st, MSA_ENOMEM, "route: out of memory");
        }
        hits = more;
    }
    msa_idx_route_args_t a = {.layer_pos = (uint32_t)qs->pos[i], .q = qs->rq[i], .T = qs->T[i],
                              .snapshot = s->seq, .exclude = excl, .n_exclude = n_excl,
                              .top_k = want};
    int rc = msa_idx_route(e->idx, s->ic, &a, hits, n);
    if (rc == MSA_OK && i8) {
        rc = rerank_stored(e, s, qs, i, hits, *n, st);
        if (rc) {
            free(hits);
            return rc;
        }
        if (*n > k) *n = k;
    }
    for (uint32_t h = 0; h < *n; h++) {
        (*ids)[h] = hits[h].id;
        (*scores)[h] = hits[h].score;
    }
    free(hits);
    return fill_status(st, rc, "route");
}

/* ==== Route ============================================================================================ */

typedef struct route_layers_ctx {
    msa_engine_t *e;
    snap_t *s;
    const query_set_t *qs;
    uint32_t k;
    const uint64_t *excl;
    size_t n_excl;
    msa_route_result_t *r;
    msa_status_t *st;             /* per layer */
    int *rc;                      /* per layer */
} route_layers_ctx_t;

static void route_layer_task(void *arg, size_t i, unsigned worker)
{
    (void)worker;
    route_layers_ctx_t *c = arg;
    msa_layer_route_t *lr = &c->r->layers[i];
    msa_status_clear(&c->st[i]);
    c->rc[i] = route_layer(c->e, c->s, c->qs, (uint32_t)i, c->k, c->excl, c->n_excl,
                           &lr->doc_ids, &lr->scores, &lr->n, &c->st[i]);
}

void msa_srv_route_result_free(msa_route_result_t *r)
{
    if (!r) return;
    for (uint32_t i = 0; i < r->n_layers; i++) {
        free(r->layers[i].doc_ids);
        free(r->layers[i].scores);
    }
    free(r->layers);
    free(r);
}

int msa_srv_route(msa_engine_t *e, const msa_route_req_t *req, msa_route_result_t **out,
                  msa_status_t *st)
{
    int rc = enter(e, st);
    if (rc) return rc;
    *out = NULL;
    snap_t s;
    query_set_t qs = {0};
    msa_route_result_t *r = NULL;
    rc = snap_open_at(e, req->c.collection, req->c.min_seq, req->c.deadline_ms,
                      req->c.snapshot_seq, req->c.hold_ms, &s, st);
    if (rc) return leave(e, rc);
    uint32_t k = 0;
    if ((rc = check_model(&s.coll.schema, req->c.model, st))) goto done;
    if ((rc = check_top_k(&s.coll.schema, req->top_k, &k, st))) goto done;
    if (req->n_exclude > e->cfg.max_ids) {
        rc = msa_status_set(st, MSA_EINVAL, "exclude_ids: %zu ids, at most %u (--max-ids)",
                            req->n_exclude, e->cfg.max_ids);
        goto done;
    }
    if ((rc = prep_queries(&s.coll.schema, s.coll.name, req->n_layers, req->layers, true, false,
                           e->cfg.max_query_tokens, &qs, st)))
        goto done;
    r = msa_calloc(1, sizeof *r);
    if (!r || !(r->layers = msa_calloc(qs.n, sizeof *r->layers))) {
        rc = msa_status_set(st, MSA_ENOMEM, "route: out of memory");
        goto done;
    }
    r->snapshot_seq = s.seq;
    r->n_layers = qs.n;
    for (uint32_t i = 0; i < qs.n; i++) r->layers[i].layer = req->layers[i].layer;
    route_layers_ctx_t lc = {.e = e, .s = &s, .qs = &qs, .k = k, .excl = req->exclude_ids,
                             .n_excl = req->n_exclude, .r = r,
                             .st = msa_calloc(qs.n, sizeof *lc.st), .rc = msa_calloc(qs.n, sizeof(int))};
    if (!lc.st || !lc.rc) {
        free(lc.st);
        free(lc.rc);
        rc = msa_status_set(st, MSA_ENOMEM, "route: out of memory");
        goto done;
    }
    /* On the CUDA backend the layers go to the device side by side (each
     * layer is its own mirror and lane), so one layer's select latency hides
     * behind another's pass. Not with I8: its re-rank reads the snapshot's
     * LMDB txn, which serves one thread at a time. */
    if (e->gpu && qs.n > 1 && s.coll.schema.routing_dtype != MSA_DT_I8)
        msa_idx_pool_run(msa_idx_get_pool(e->idx), qs.n, route_layer_task, &lc);
    else
        for (uint32_t i = 0; i < qs.n; i++) route_layer_task(&lc, i, 0);
    /* The first failing layer in request order names the error. */
    for (uint32_t i = 0; i < qs.n && rc == MSA_OK; i++) {
        rc = lc.rc[i];
        if (rc) *st = lc.st[i];
    }
    free(lc.st);
    free(lc.rc);
    if (rc == MSA_OK) rc = snap_hold(e, &s, req->c.hold_ms, st);
done:
    query_set_free(&qs);
    snap_close(e, &s);
    if (rc) msa_srv_route_result_free(r);
    else {
        *out = r;
        atomic_fetch_add(&e->n_routes, 1);
    }
    return leave(e, rc);
}

/* ==== Attend ============================================================================================= */

void msa_srv_attend_result_free(msa_attend_result_t *r)
{
    if (!r) return;
    for (uint32_t i = 0; i < r->n_layers; i++) {
        free(r->layers[i].doc_ids);
        free(r->layers[i].scores);
        free(r->layers[i].out);
        free(r->layers[i].lse);
    }
    free(r->layers);
    free(r);
}

/* Reads the stored K (kind 0) or V (kind 1) block of one document and layer
 * from the snapshot, checking its size against the schema. */
static int load_block(snap_t *s, int pos, uint64_t id, int kind, msa_store_view_t *view,
                      msa_status_t *st)
{
    const msa_schema_t *sc = &s->coll.schema;
    size_t row = (size_t)sc->kv_heads * sc->head_dim * msa_dtype_size(sc->kv_dtype);
    int rc = msa_store_block_get(s->txn, s->coll.id, id, (uint16_t)pos, (msa_block_kind_t)kind,
                                 view);
    const char *why = rc == MSA_ECORRUPT ? "stored data is damaged (checksum mismatch)"
                                         : msa_strerror(rc);
    if (rc == MSA_OK && view->len % row != 0) {
        rc = MSA_ECORRUPT;
        why = "has the wrong size";
    }
    if (rc)
        msa_status_set(st, rc == MSA_ENOTFOUND ? MSA_EINTERNAL : rc,
                       "attend: collection \"%s\" document %llu layer %u %c block: %s",
                       s->coll.name, (unsigned long long)id, sc->layers[pos], kind ? 'V' : 'K',
                       why);
    return rc;
}

/* Gathers the pooled K and V of the selected documents of one layer from the
 * snapshot into float32 [R][H][D] arrays. */
static int gather_kv(snap_t *s, int pos, const uint64_t *ids, uint32_t n, float **k, float **v,
                     size_t *R, msa_status_t *st)
{
    const msa_schema_t *sc = &s->coll.schema;
    size_t W = (size_t)sc->kv_heads * sc->head_dim, esz = msa_dtype_size(sc->kv_dtype), rows = 0;
    msa_store_view_t (*views)[2] = msa_calloc(n ? n : 1, sizeof *views);
    if (!views) return msa_status_set(st, MSA_ENOMEM, "attend: out of memory");
    int rc = MSA_OK;
    for (uint32_t i = 0; i < n && rc == MSA_OK; i++) {
        for (int kind = 0; kind < 2 && rc == MSA_OK; kind++)
            rc = load_block(s, pos, ids[i], kind, &views[i][kind], st);
        if (rc == MSA_OK) rows += views[i][0].len / (W * esz);
    }
    if (rc == MSA_OK) {
        *k = msa_malloc((rows ? rows : 1) * W * sizeof(float));
        *v = msa_malloc((rows ? rows : 1) * W * sizeof(float));
        if (!*k || !*v) rc = msa_status_set(st, MSA_ENOMEM, "attend: out of memory");
    }
    if (rc == MSA_OK) {
        size_t at = 0;
        for (uint32_t i = 0; i < n; i++) {
            size_t cnt = views[i][0].len / esz;
            msa_tensor_to_f32(sc->kv_dtype, views[i][0].data, cnt, *k + at);
            msa_tensor_to_f32(sc->kv_dtype, views[i][1].data, cnt, *v + at);
            at += cnt;
        }
        *R = rows;
    }
    free(views);
    return rc;
}

/* The CUDA backend's K/V loader: stored blocks straight from the snapshot. */
typedef struct gpu_load_ctx {
    snap_t *s;
    int pos;
    const uint64_t *ids;
    msa_status_t *st;
} gpu_load_ctx_t;

static int gpu_load(void *arg, uint32_t i, const void **k, const void **v, uint32_t *nrows)
{
    gpu_load_ctx_t *c = arg;
    const msa_schema_t *sc = &c->s->coll.schema;
    msa_store_view_t kv[2];
    for (int kind = 0; kind < 2; kind++) {
        int rc = load_block(c->s, c->pos, c->ids[i], kind, &kv[kind], c->st);
        if (rc) return rc;
    }
    size_t row = (size_t)sc->kv_heads * sc->head_dim * msa_dtype_size(sc->kv_dtype);
    *k = kv[0].data;
    *v = kv[1].data;
    *nrows = (uint32_t)(kv[0].len / row);
    return MSA_OK;
}

/* Attention of one layer on the CUDA backend through its K/V cache. Returns
 * MSA_EUNAVAIL when the device cannot take it (the CPU attends then). */
static int gpu_attend_layer(msa_engine_t *e, snap_t *s, int pos, const uint64_t *ids, uint32_t n,
                            const float *q, uint32_t T, float scale, float *o, float *lse,
                            msa_status_t *st)
{
    const msa_schema_t *sc = &s->coll.schema;
    uint64_t *versions = msa_malloc((n ? n : 1) * sizeof *versions);
    if (!versions) return msa_status_set(st, MSA_ENOMEM, "attend: out of memory");
    int rc = MSA_OK;
    for (uint32_t i = 0; i < n && rc == MSA_OK; i++) {
        msa_doc_rec_t d;
        rc = fill_status(st, msa_store_doc_get(s->txn, s->coll.id, ids[i], &d), "document lookup");
        versions[i] = d.updated_seq;
    }
    gpu_load_ctx_t lc = {.s = s, .pos = pos, .ids = ids, .st = st};
    msa_gpu_attend_args_t a = {.coll_id = s->coll.id, .layer = (uint32_t)pos, .docs = ids,
                               .versions = versions, .n = n, .load = gpu_load, .load_arg = &lc,
                               .q = q, .T = T, .Hq = sc->query_heads, .H = sc->kv_heads,
                               .D = sc->head_dim, .scale = scale, .kv_dtype = sc->kv_dtype,
                               .out = o, .lse = lse};
    if (rc == MSA_OK) rc = msa_gpu_attend(e->gpu, &a);
    if (rc && rc != MSA_EUNAVAIL && st->code == MSA_OK)
        msa_status_set(st, rc, "attend: device: %s", msa_strerror(rc));
    free(versions);
    return rc;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* doc_ids given: every id valid, unique and visible in the snapshot. */
static int check_doc_ids(snap_t *s, const uint64_t *ids, size_t n, msa_status_t *st)
{
    if (n > MSA_MAX_TOP_K)
        return msa_status_set(st, MSA_EINVAL, "doc_ids: %zu ids, at most %d", n, MSA_MAX_TOP_K);
    uint64_t *sorted = msa_malloc(n * sizeof *sorted);
    if (!sorted) return msa_status_set(st, MSA_ENOMEM, "attend: out of memory");
    memcpy(sorted, ids, n * sizeof *sorted);
    qsort(sorted, n, sizeof *sorted, cmp_u64);
    int rc = MSA_OK;
    for (size_t i = 0; i < n && rc == MSA_OK; i++) {
        char path[48];
        snprintf(path, sizeof path, "doc_ids[%zu]", i);
        rc = check_id(ids[i], path, st);
        if (rc == MSA_OK && i && sorted[i] == sorted[i - 1])
            rc = msa_status_set(st, MSA_EINVAL, "doc_ids: id %llu listed twice",
                                (unsigned long long)sorted[i]);
    }
    free(sorted);
    for (size_t i = 0; i < n && rc == MSA_OK; i++) {
        msa_doc_rec_t d;
        rc = msa_store_doc_get(s->txn, s->coll.id, ids[i], &d);
        if (rc == MSA_ENOTFOUND)
            rc = msa_status_set(st, rc, "doc_ids[%zu]: document %llu not found in collection \"%s\"",
                                i, (unsigned long long)ids[i], s->coll.name);
        else
            fill_status(st, rc, "document lookup");
    }
    return rc;
}

int msa_srv_attend(msa_engine_t *e, const msa_attend_req_t *req, msa_attend_result_t **out,
                   msa_status_t *st)
{
    int rc = enter(e, st);
    if (rc) return rc;
    *out = NULL;
    snap_t s;
    query_set_t qs = {0};
    msa_attend_result_t *r = NULL;
    float *k = NULL, *v = NULL, *o = NULL;
    rc = snap_open_at(e, req->c.collection, req->c.min_seq, req->c.deadline_ms,
                      req->c.snapshot_seq, req->c.hold_ms, &s, st);
    if (rc) return leave(e, rc);
    const msa_schema_t *sc = &s.coll.schema;
    uint32_t topk = 0;
    bool given = req->n_doc_ids > 0;
    msa_dtype_t odt = req->out_dtype ? req->out_dtype : MSA_DT_F32;
    if ((rc = check_model(sc, req->c.model, st))) goto done;
    if ((rc = check_top_k(sc, req->top_k, &topk, st))) goto done;
    if (odt != MSA_DT_F32 && odt != MSA_DT_F16 && odt != MSA_DT_BF16) {
        rc = msa_status_set(st, MSA_EINVAL, "out_dtype: %s, want F32, F16 or BF16",
                            msa_dtype_name(odt));
        goto done;
    }
    if (!isfinite(req->scale) || req->scale < 0) {
        rc = msa_status_set(st, MSA_EINVAL, "scale: %g, want a finite value >= 0 (0 = 1/sqrt(D))",
                            (double)req->scale);
        goto done;
    }
    if (req->n_exclude > e->cfg.max_ids) {
        rc = msa_status_set(st, MSA_EINVAL, "exclude_ids: %zu ids, at most %u (--max-ids)",
                            req->n_exclude, e->cfg.max_ids);
        goto done;
    }
    if ((rc = prep_queries(sc, s.coll.name, req->n_layers, req->layers, !given, true,
                           e->cfg.max_query_tokens, &qs, st)))
        goto done;
    if (given && (rc = check_doc_ids(&s, req->doc_ids, req->n_doc_ids, st))) goto done;
    float scale = req->scale > 0 ? req->scale : 1.0f / sqrtf((float)sc->head_dim);
    r = msa_calloc(1, sizeof *r);
    if (!r || !(r->layers = msa_calloc(qs.n, sizeof *r->layers))) {
        rc = msa_status_set(st, MSA_ENOMEM, "attend: out of memory");
        goto done;
    }
    r->snapshot_seq = s.seq;
    r->out_dtype = odt;
    for (uint32_t i = 0; i < qs.n && rc == MSA_OK; i++) {
        msa_layer_attention_t *la = &r->layers[r->n_layers++];
        la->layer = req->layers[i].layer;
        la->T = qs.T[i];
        la->Hq = sc->query_heads;
        la->D = sc->head_dim;
        if (given) {
            la->n = (uint32_t)req->n_doc_ids;
            la->doc_ids = msa_malloc(la->n * sizeof *la->doc_ids);
            if (!la->doc_ids) {
                rc = msa_status_set(st, MSA_ENOMEM, "attend: out of memory");
                break;
            }
            memcpy(la->doc_ids, req->doc_ids, la->n * sizeof *la->doc_ids);
        } else {
            rc = route_layer(e, &s, &qs, i, topk, req->exclude_ids, req->n_exclude, &la->doc_ids,
                             &la->scores, &la->n, st);
            if (rc) break;
        }
        size_t n_out = (size_t)la->T * la->Hq * la->D;
        o = msa_malloc(n_out * sizeof *o);
        la->lse = msa_malloc((size_t)la->T * la->Hq * sizeof *la->lse);
        la->out_bytes = n_out * msa_dtype_size(odt);
        la->out = msa_malloc(la->out_bytes);
        if (!o || !la->lse || !la->out) {
            rc = msa_status_set(st, MSA_ENOMEM, "attend: out of memory");
            break;
        }
        if (e->gpu) {
            rc = gpu_attend_layer(e, &s, qs.pos[i], la->doc_ids, la->n, qs.q[i], la->T, scale, o,
                                  la->lse, st);
            if (rc == MSA_OK) {
                msa_tensor_from_f32(odt, o, n_out, la->out);
                free(o);
                o = NULL;
                continue;
            }
            if (rc != MSA_EUNAVAIL) break;
            rc = MSA_OK;
        }
        size_t R = 0;
        rc = gather_kv(&s, qs.pos[i], la->doc_ids, la->n, &k, &v, &R, st);
        if (rc) break;
        if (msa_idx_attend(qs.q[i], la->T, sc->query_heads, sc->kv_heads, sc->head_dim, k, v, R,
                           scale, o, la->lse, msa_idx_get_pool(e->idx)) != MSA_OK) {
            rc = msa_status_set(st, MSA_ENOMEM, "attend: out of memory");
            break;
        }
        msa_tensor_from_f32(odt, o, n_out, la->out);
        free(k);
        free(v);
        free(o);
        k = v = o = NULL;
    }
    if (rc == MSA_OK) rc = snap_hold(e, &s, req->c.hold_ms, st);
done:
    free(k);
    free(v);
    free(o);
    query_set_free(&qs);
    snap_close(e, &s);
    if (rc) msa_srv_attend_result_free(r);
    else {
        *out = r;
        atomic_fetch_add(&e->n_attends, 1);
    }
    return leave(e, rc);
}

/* ==== Get / List ============================================================================================= */

void msa_srv_get_result_free(msa_get_result_t *r)
{
    if (!r) return;
    for (size_t i = 0; i < r->n_records; i++) free(r->records[i].layers);
    free(r->records);
    snap_t *s = r->priv;
    if (s) {
        snap_close(s->e, s);
        free(s);
    }
    free(r);
}

static void view_tensor(msa_tensor_t *t, msa_dtype_t dt, uint32_t C, uint32_t H, uint32_t D,
                        msa_store_view_t v)
{
    *t = (msa_tensor_t){.dtype = dt, .ndim = 3, .shape = {C, H, D}, .data = v.data, .nbytes = v.len};
}

int msa_srv_get(msa_engine_t *e, const msa_get_req_t *req, msa_get_result_t **out,
                msa_status_t *st)
{
    int rc = enter(e, st);
    if (rc) return rc;
    *out = NULL;
    if (req->n_ids > e->cfg.max_ids)
        return leave(e, msa_status_set(st, MSA_EINVAL, "ids: %zu ids, at most %u (--max-ids)",
                                       req->n_ids, e->cfg.max_ids));
    /* The snapshot lives in the result: its views point into it. */
    snap_t *s = msa_calloc(1, sizeof *s);
    msa_get_result_t *r = msa_calloc(1, sizeof *r);
    if (!s || !r) {
        free(s);
        free(r);
        return leave(e, msa_status_set(st, MSA_ENOMEM, "get: out of memory"));
    }
    rc = snap_open_at(e, req->collection, req->min_seq, req->deadline_ms, req->snapshot_seq,
                      req->hold_ms, s, st);
    if (rc) {
        free(s);
        free(r);
        return leave(e, rc);
    }
    r->priv = s;
    r->snapshot_seq = s->seq;
    const msa_schema_t *sc = &s->coll.schema;
    int pos[MSA_MAX_LAYERS];
    uint32_t nl = 0;
    if (req->with_tensors) {
        if (req->n_layers == 0) {
            for (uint32_t l = 0; l < sc->n_layers; l++) pos[nl++] = (int)l;
        } else {
            for (uint32_t l = 0; l < req->n_layers && rc == MSA_OK; l++) {
                int p = msa_schema_layer_pos(sc, req->layers[l]);
                if (p < 0)
                    rc = msa_status_set(st, MSA_EINVAL,
                                        "layers[%u]: %u is not a memory layer of collection \"%s\"", l,
                                        req->layers[l], s->coll.name);
                for (uint32_t j = 0; j < nl && rc == MSA_OK; j++)
                    if (pos[j] == p)
                        rc = msa_status_set(st, MSA_EINVAL, "layers[%u]: duplicate layer %u", l,
                                            req->layers[l]);
                if (rc == MSA_OK) pos[nl++] = p;
            }
        }
    }
    if (rc == MSA_OK && !(r->records = msa_calloc(req->n_ids ? req->n_ids : 1, sizeof *r->records)))
        rc = msa_status_set(st, MSA_ENOMEM, "get: out of memory");
    uint64_t bytes = 0; /* response bytes so far (req->max_bytes) */
    for (size_t i = 0; i < req->n_ids && rc == MSA_OK; i++) {
        msa_get_record_t *g = &r->records[r->n_records++];
        char path[48];
        snprintf(path, sizeof path, "ids[%zu]", i);
        if ((rc = check_id(req->ids[i], path, st))) break;
        rc = msa_store_doc_get(s->txn, s->coll.id, req->ids[i], &g->info);
        if (rc == MSA_ENOTFOUND) {
            rc = msa_status_set(st, rc, "ids[%zu]: document %llu not found in collection \"%s\"", i,
                                (unsigned long long)req->ids[i], s->coll.name);
            break;
        }
        if (rc) {
            msa_status_set(st, rc, "get: collection \"%s\" document %llu record: %s", s->coll.name,
                           (unsigned long long)req->ids[i],
                           rc == MSA_ECORRUPT ? "stored data is damaged (checksum mismatch)"
                                              : msa_strerror(rc));
            break;
        }
        /* Count what this record brings before reading any of it: views
         * cost nothing, but the response packs every byte once per record.
         * A repeated id is answered at each of its positions (records come
         * in request order) and counted each time, so ids=[1]*300 of an
         * 8 MiB text stops at the limit instead of building 2.4 GB. */
        if (req->max_bytes) {
            uint64_t add = 64 + (req->with_text ? g->info.text_bytes : 0) +
                           (req->with_metadata ? g->info.metadata_bytes : 0);
            if (nl) {
                uint64_t per = (uint64_t)g->info.chunks * sc->kv_heads * sc->head_dim;
                uint64_t kvb = per * msa_dtype_size(sc->kv_dtype) * 2;
                if (sc->separate_router_keys)
                    kvb += per * msa_dtype_size(msa_schema_router_store_dtype(sc));
                add += kvb * nl;
            }
            bytes += add;
            if (bytes > req->max_bytes) {
                rc = msa_status_set(st, MSA_EFULL,
                                    "response: more than %llu bytes by ids[%zu] (%zu of %zu "
                                    "records), over the message limit (--max-message-mb); ask for "
                                    "fewer ids or less per id",
                                    (unsigned long long)req->max_bytes, i, i + 1, req->n_ids);
                break;
            }
        }
        if (req->with_text && g->info.text_bytes &&
            (rc = msa_store_text_get(s->txn, s->coll.id, req->ids[i], &g->text)))
            msa_status_set(st, rc, "get: collection \"%s\" document %llu text: %s", s->coll.name,
                           (unsigned long long)req->ids[i],
                           rc == MSA_ECORRUPT ? "stored data is damaged (checksum mismatch)"
                                              : msa_strerror(rc));
        if (rc == MSA_OK && req->with_metadata && g->info.metadata_bytes &&
            (rc = msa_store_meta_get(s->txn, s->coll.id, req->ids[i], &g->metadata)))
            msa_status_set(st, rc, "get: collection \"%s\" document %llu metadata: %s",
                           s->coll.name, (unsigned long long)req->ids[i],
                           rc == MSA_ECORRUPT ? "stored data is damaged (checksum mismatch)"
                                              : msa_strerror(rc));
        if (rc == MSA_OK && nl) {
            g->layers = msa_calloc(nl, sizeof *g->layers);
            if (!g->layers) rc = msa_status_set(st, MSA_ENOMEM, "get: out of memory");
        }
        for (uint32_t l = 0; l < nl && rc == MSA_OK; l++) {
            msa_get_layer_t *gl = &g->layers[g->n_layers++];
            gl->layer = sc->layers[pos[l]];
            msa_store_view_t kv[3] = {{0}};
            int kinds = sc->separate_router_keys ? 3 : 2;
            for (int kind = 0; kind < kinds && rc == MSA_OK; kind++) {
                rc = msa_store_block_get(s->txn, s->coll.id, req->ids[i], (uint16_t)pos[l],
                                         (msa_block_kind_t)kind, &kv[kind]);
                if (rc)
                    msa_status_set(st, rc == MSA_ECORRUPT ? MSA_ECORRUPT : MSA_EINTERNAL,
                                   "get: collection \"%s\" document %llu layer %u %c block: %s",
                                   s->coll.name, (unsigned long long)req->ids[i], gl->layer,
                                   "KVR"[kind],
                                   rc == MSA_ECORRUPT ? "stored data is damaged (checksum mismatch)"
                                                      : msa_strerror(rc));
            }
            if (rc) break;
            uint32_t C = g->info.chunks, H = sc->kv_heads, D = sc->head_dim;
            view_tensor(&gl->k, sc->kv_dtype, C, H, D, kv[0]);
            view_tensor(&gl->v, sc->kv_dtype, C, H, D, kv[1]);
            if (kinds == 3) view_tensor(&gl->router_k, msa_schema_router_store_dtype(sc), C, H, D, kv[2]);
        }
    }
    if (rc == MSA_OK) rc = snap_hold(e, s, req->hold_ms, st);
    /* The views stay valid while the result keeps its use of the snapshot;
     * other calls may borrow a held one's txn meanwhile. */
    snap_unlock(s);
    if (rc) {
        msa_srv_get_result_free(r);
        return leave(e, rc);
    }
    *out = r;
    atomic_fetch_add(&e->n_gets, 1);
    return leave(e, MSA_OK);
}

void msa_srv_list_result_free(msa_list_result_t *r)
{
    if (!r) return;
    free(r->docs);
    r->docs = NULL;
}

int msa_srv_list(msa_engine_t *e, const msa_list_req_t *req, msa_list_result_t *out,
                 msa_status_t *st)
{
    int rc = enter(e, st);
    if (rc) return rc;
    memset(out, 0, sizeof *out);
    if (req->limit > MAX_LIST_LIMIT)
        return leave(e, msa_status_set(st, MSA_EINVAL, "limit: %u, at most %d", req->limit,
                                       MAX_LIST_LIMIT));
    uint32_t limit = req->limit ? req->limit : 1000;
    snap_t s;
    rc = snap_open_at(e, req->collection, 0, 0, req->snapshot_seq, req->hold_ms, &s, st);
    if (rc) return leave(e, rc);
    out->docs = msa_malloc(limit * sizeof *out->docs);
    if (!out->docs) rc = msa_status_set(st, MSA_ENOMEM, "list: out of memory");
    else
        rc = fill_status(st,
                         msa_store_doc_list(s.txn, s.coll.id, req->after_id, limit, out->docs,
                                            &out->n, &out->next_after_id),
                         "list");
    out->snapshot_seq = s.seq;
    if (rc == MSA_OK) rc = snap_hold(e, &s, req->hold_ms, st);
    snap_close(e, &s);
    if (rc) msa_srv_list_result_free(out);
    else atomic_fetch_add(&e->n_lists, 1);
    return leave(e, rc);
}

/* ==== Stats / Backup / Verify =================================================================== */

typedef struct sum_ctx {
    msa_srv_stats_t *s;
} sum_ctx_t;

static int sum_coll(void *arg, const msa_coll_rec_t *c)
{
    msa_srv_stats_t *s = ((sum_ctx_t *)arg)->s;
    s->collections++;
    s->documents += c->documents;
    s->chunks += c->chunks;
    return 0;
}

int msa_srv_stats(msa_engine_t *e, msa_srv_stats_t *out, msa_status_t *st)
{
    int rc = enter(e, st);
    if (rc) return rc;
    memset(out, 0, sizeof *out);
    snap_t s;
    rc = snap_open(e, NULL, 0, 0, &s, st);
    if (rc) return leave(e, rc);
    sum_ctx_t ctx = {out};
    rc = fill_status(st, msa_store_coll_foreach(s.txn, sum_coll, &ctx), "stats");
    out->commit_seq = s.seq;
    snap_close(e, &s);
    snprintf(out->backend, sizeof out->backend, "%s", e->backend);
    out->store_bytes = msa_store_file_bytes(e->store);
    out->index_bytes = msa_idx_bytes(e->idx);
    out->writes = atomic_load(&e->n_writes);
    out->write_groups = atomic_load(&e->n_groups);
    out->routes = atomic_load(&e->n_routes);
    out->attends = atomic_load(&e->n_attends);
    out->gets = atomic_load(&e->n_gets);
    out->lists = atomic_load(&e->n_lists);
    msa__lease_stats_t ls;
    msa__lease_get_stats(e->leases, &ls);
    out->snapshots_held = ls.held;
    out->leases_granted = ls.granted;
    out->leases_renewed = ls.renewed;
    out->leases_released = ls.released;
    out->leases_expired = ls.expired;
    out->leases_revoked = ls.revoked;
    if (e->gpu) {
        msa_gpu_get_stats(e->gpu, &out->gpu);
        out->n_gpu = out->gpu.devices < 8 ? out->gpu.devices : 8;
        for (unsigned i = 0; i < out->n_gpu; i++)
            msa_gpu_get_device_stats(e->gpu, i, &out->gpu_dev[i]);
    }
    return leave(e, rc);
}

int msa_srv_release_snapshot(msa_engine_t *e, uint64_t snapshot_seq, bool *released,
                             msa_status_t *st)
{
    *released = false;
    int rc = enter(e, st);
    if (rc) return rc;
    if (!snapshot_seq)
        return leave(e, msa_status_set(st, MSA_EINVAL, "snapshot_seq: 0, want the seq of a held "
                                                       "snapshot"));
    *released = msa__lease_release(e->leases, snapshot_seq);
    return leave(e, MSA_OK);
}

int msa_srv_backup(msa_engine_t *e, const char *name, bool compact, uint64_t *seq,
                   uint64_t *bytes, msa_status_t *st)
{
    int rc = enter(e, st);
    if (rc) return rc;
    if (!e->backup_dir)
        return leave(e, msa_status_set(st, MSA_EPRECOND,
                                       "backup: no backup directory configured (--backup-dir)"));
    if (!name || !name[0] || strchr(name, '/') || strstr(name, "..") || name[0] == '.')
        return leave(e, msa_status_set(st, MSA_EINVAL,
                                       "name: \"%s\" must be a plain file name (no '/', no '..')",
                                       name ? name : ""));
    if (strlen(name) > 255)
        return leave(e, msa_status_set(st, MSA_EINVAL, "name: %zu bytes, at most 255",
                                       strlen(name)));
    mkdir(e->backup_dir, 0700);
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", e->backup_dir, name);
    struct stat sb;
    if (stat(path, &sb) == 0)
        return leave(e, msa_status_set(st, MSA_EEXIST, "name: backup \"%s\" already exists", name));
    rc = msa_store_backup(e->store, path, compact, seq, bytes, st);
    if (rc == MSA_OK)
        msa_log(MSA_LOG_INFO, "backup \"%s\": commit %llu, %llu bytes", path,
                (unsigned long long)*seq, (unsigned long long)*bytes);
    return leave(e, fill_status(st, rc, "backup"));
}

typedef struct verify_ctx {
    msa_engine_t *e;
    msa_store_txn_t *txn;
    const msa_coll_rec_t *coll;
    msa_idx_coll_t *ic;
    char ***problems;
    size_t *n_problems;
    const char *only;
} verify_ctx_t;

static void add_problem(verify_ctx_t *v, char *msg)
{
    char **n = msa_realloc(*v->problems, (*v->n_problems + 1) * sizeof *n);
    if (!n || !msg) {
        free(msg);
        return;
    }
    n[(*v->n_problems)++] = msg;
    *v->problems = n;
}

static int verify_doc(void *arg, const msa_doc_rec_t *d)
{
    verify_ctx_t *v = arg;
    long rows = msa_idx_doc_rows(v->ic, d->id);
    if (rows != (long)d->chunks) {
        char *msg = NULL;
        if (asprintf(&msg, "collection \"%s\" document %llu: index has %ld rows, store has %u chunks",
                     v->coll->name, (unsigned long long)d->id, rows, d->chunks) < 0)
            msg = NULL;
        add_problem(v, msg);
    }
    return 0;
}

static int verify_coll(void *arg, const msa_coll_rec_t *c)
{
    verify_ctx_t *v = arg;
    if (v->only && strcmp(v->only, c->name) != 0) return 0;
    v->coll = c;
    v->ic = msa_idx_coll_acquire(v->e->idx, c->id);
    if (!v->ic) {
        char *msg = NULL;
        if (asprintf(&msg, "collection \"%s\": missing from the index", c->name) < 0) msg = NULL;
        add_problem(v, msg);
        return 0;
    }
    msa_idx_coll_stats_t is;
    msa_idx_coll_stats(v->ic, &is);
    if (is.live_docs != c->documents) {
        char *msg = NULL;
        if (asprintf(&msg, "collection \"%s\": index has %llu live documents, store has %llu",
                     c->name, (unsigned long long)is.live_docs, (unsigned long long)c->documents) < 0)
            msg = NULL;
        add_problem(v, msg);
    }
    int rc = msa_store_doc_foreach(v->txn, c->id, verify_doc, v);
    msa_idx_coll_release(v->ic);
    return rc;
}

int msa_srv_verify(msa_engine_t *e, const char *collection, uint64_t *docs_checked,
                   char ***problems, size_t *n_problems, msa_status_t *st)
{
    int rc = enter(e, st);
    if (rc) return rc;
    *problems = NULL;
    *n_problems = 0;
    *docs_checked = 0;
    const char *only = collection && collection[0] ? collection : NULL;
    /* Freeze writes so the index and the store describe the same commit. */
    pthread_mutex_lock(&e->pause_lock);
    uint32_t coll_id = 0;
    msa_store_txn_t *t = NULL;
    rc = msa_store_read_begin(e->store, &t);
    if (rc == MSA_OK && only) {
        msa_coll_rec_t c;
        rc = find_coll(t, only, &c, st);
        coll_id = c.id;
    }
    if (rc == MSA_OK) {
        rc = msa_store_verify(e->store, coll_id, docs_checked, problems, n_problems);
        fill_status(st, rc, "verify");
    }
    if (rc == MSA_OK) {
        verify_ctx_t v = {.e = e, .txn = t, .problems = problems, .n_problems = n_problems,
                          .only = only};
        rc = fill_status(st, msa_store_coll_foreach(t, verify_coll, &v), "verify index");
    }
    msa_store_abort(t);
    pthread_mutex_unlock(&e->pause_lock);
    if (rc) {
        msa_store_problems_free(*problems, *n_problems);
        *problems = NULL;
        *n_problems = 0;
    }
    return leave(e, fill_status(st, rc, "verify"));
}
