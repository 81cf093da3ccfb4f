/* engine_write.c — the write path (engine.h, "the write path"): requests
 * validated and prepared on the caller's thread, queued to the one writer
 * thread, applied in a savepoint each inside one LMDB write txn, committed as
 * a group (one fsync), applied to the index and published; collections are
 * created and dropped through the same queue.
 */
#define _GNU_SOURCE /* asprintf */
#include "engine_impl.h"

/* ==== write queue ==== */

typedef enum { WQ_WRITE = 1, WQ_CREATE, WQ_DROP } wq_kind_t;

/* One document of a put, in its stored form. */
typedef struct prep_doc {
    uint32_t chunks;
    uint64_t tensor_bytes;
    uint8_t *buf; /* every block's bytes */
    msa_store_block_t *blocks;
    size_t n_blocks;
    float *router;             /* [L][chunks][W] stored router keys as float32 */
    const float **router_rows; /* per layer position into router */
} prep_doc_t;

/* A request queued for the writer; lives on the caller's stack. */
typedef struct msa__engine_wq_item {
    wq_kind_t kind;
    const char *name;                  /* collection */
    uint32_t coll_id;                  /* as validated; the writer re-checks it */
    const msa_schema_t *schema;        /* create */
    const msa_engine_write_req_t *req; /* write */
    prep_doc_t *prep;                  /* per op (NULL entries for deletes) */
    /* results */
    int rc;
    msa_status_t *st;
    uint64_t seq;
    uint64_t *versions;
    msa_coll_rec_t coll;
    bool done;
    struct msa__engine_wq_item *next;
} wq_item_t;

/* ==== write preparation (caller's thread) ======================================== */

/* Leaves *p empty, so that msa_engine_write's cleanup may free it again after
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
static int prep_put(const msa_coll_rec_t *coll, const msa_engine_doc_t *d, size_t i, prep_doc_t *p,
                    msa_status_t *st)
{
    const msa_schema_t *s = &coll->schema;
    char path[128], fpath[192];
    snprintf(path, sizeof path, "ops[%zu].put", i);
    memset(p, 0, sizeof *p);
    snprintf(fpath, sizeof fpath, "%s.id", path);
    int rc = msa__engine_check_id(d->id, fpath, st);
    if (rc) return rc;
    if (d->tokens == 0) return msa_status_set(st, MSA_EINVAL, "%s.tokens: 0, want > 0", path);
    size_t bad;
    if (d->text_len && !msa__engine_valid_utf8((const unsigned char *)d->text, d->text_len, &bad))
        return msa_status_set(st, MSA_EINVAL, "%s.text: invalid UTF-8 at byte %zu", path, bad);
    if (d->n_layers != s->n_layers)
        return msa_status_set(st, MSA_EINVAL,
                              "%s.layers: %u layers, want %u (one per schema layer)", path,
                              d->n_layers, s->n_layers);

    uint32_t H = s->kv_heads, D = s->head_dim, W = H * D, P = s->chunk_tokens;
    uint32_t C = (uint32_t)(((uint64_t)d->tokens + P - 1) / P);
    uint32_t want[3] = {d->raw ? d->tokens : C, H, D};
    const msa_engine_layer_kv_t *by_pos[MSA_MAX_LAYERS] = {0};
    for (uint32_t l = 0; l < d->n_layers; l++) {
        const msa_engine_layer_kv_t *lk = &d->layers[l];
        int pos = msa_schema_layer_pos(s, lk->layer);
        if (pos < 0)
            return msa_status_set(
                st, MSA_EINVAL,
                "%s.layers[%u].layer: %u is not a memory layer of collection \"%s\"", path, l,
                lk->layer, coll->name);
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
            return msa_status_set(
                st, MSA_EINVAL,
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
        const msa_engine_layer_kv_t *lk = by_pos[l];
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
                return msa_status_set(
                    st, MSA_EINVAL, "%s.layers[%u].%s: element %ld is out of %s range after %s",
                    path, (unsigned)(lk - d->layers), kname[kind], nf, msa_dtype_name(dt),
                    d->raw ? "mean-pooling in float32" : "rounding");
            }
            /* The index routes on the keys as stored, not on the client's originals. */
            bool routes_here = kind == (s->separate_router_keys ? MSA_BLOCK_R : MSA_BLOCK_K);
            if (routes_here) msa_tensor_to_f32(dt, w, rows, router);
            size_t len = rows * msa_dtype_size(dt);
            p->blocks[b++] = (msa_store_block_t){
                .layer_pos = (uint16_t)l, .kind = (uint8_t)kind, .data = w, .len = len};
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
        const msa_engine_write_op_t *op = &it->req->ops[i];
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
            return msa_status_set(
                it->st, MSA_EPRECOND,
                "ops[%zu].expect_version: document %llu is at version %llu, want %llu", i,
                (unsigned long long)id, (unsigned long long)(exists ? old.version : 0),
                (unsigned long long)op->expect_version);
        if (op->kind == MSA_OP_DELETE) {
            if (!exists)
                return msa_status_set(it->st, MSA_ENOTFOUND,
                                      "ops[%zu].delete_id: document %llu not found", i,
                                      (unsigned long long)id);
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
        const msa_engine_write_op_t *op = &it->req->ops[i];
        if (op->kind == MSA_OP_DELETE)
            rc = msa_idx_doc_delete(c, op->delete_id, it->seq);
        else
            rc = msa_idx_doc_put(c, op->put.id, it->seq, it->prep[i].chunks,
                                 it->prep[i].router_rows);
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
            rc = it->rc; /* the txn is unusable: the whole group retries or fails */
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
    msa__engine_lease_revoke_all(e->leases, "map growth");
    int rc = grow(e->store);
    msa__engine_lease_resume(e->leases);
    return rc;
}

static int reserve_revoking(msa_engine_t *e, bool on)
{
    msa__engine_lease_revoke_all(e->leases, "map growth");
    int rc = msa_store_reserve(e->store, on);
    msa__engine_lease_resume(e->leases);
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
            it->next = group; /* msa__engine_writer_main walks the list afterwards */
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
                msa_status_set(it->st, rc,
                               "store full: the LMDB map reached its limit or the disk "
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

void *msa__engine_writer_main(void *arg)
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
     * commit not yet applied belongs to a counted request (see msa__engine_snap_open). */
    atomic_fetch_add(&e->submitted, 1);
    pthread_mutex_lock(&e->q_lock);
    if (e->q_tail)
        e->q_tail->next = it;
    else
        e->q_head = it;
    e->q_tail = it;
    pthread_cond_signal(&e->q_cond);
    while (!it->done) pthread_cond_wait(&e->done_cond, &e->q_lock);
    pthread_mutex_unlock(&e->q_lock);
    atomic_fetch_sub(&e->submitted, 1);
    return it->rc;
}

/* ==== collections ===================================================================== */

static void info_from_rec(const msa_coll_rec_t *c, msa_engine_coll_info_t *out)
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

static int create_collection_into(msa_engine_t *e, const char *name, const msa_schema_t *schema,
                                  msa_engine_coll_info_t *out, msa_status_t *st)
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

static int drop_collection_into(msa_engine_t *e, const char *name, uint64_t *commit_seq,
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
        msa_log(MSA_LOG_INFO, "collection \"%s\" dropped (seq %llu)", name,
                (unsigned long long)it.seq);
    }
    return leave(e, rc);
}

static int describe_collection_into(msa_engine_t *e, const char *name, msa_engine_coll_info_t *out,
                                    msa_status_t *st)
{
    int rc = enter(e, st);
    if (rc) return rc;
    msa__engine_snap_t s;
    rc = msa__engine_snap_open(e, name, 0, 0, &s, st);
    if (rc == MSA_OK) {
        info_from_rec(&s.coll, out);
        msa__engine_snap_close(e, &s);
    }
    return leave(e, rc);
}

typedef struct coll_list {
    msa_engine_coll_info_t *v;
    size_t n, cap;
} coll_list_t;

static int collect_coll(void *arg, const msa_coll_rec_t *c)
{
    coll_list_t *l = arg;
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 8;
        msa_engine_coll_info_t *n = msa_realloc(l->v, cap * sizeof *n);
        if (!n) return MSA_ENOMEM;
        l->v = n;
        l->cap = cap;
    }
    info_from_rec(c, &l->v[l->n++]);
    return 0;
}

static int list_collections_into(msa_engine_t *e, msa_engine_coll_info_t **out, size_t *n,
                                 msa_status_t *st)
{
    int rc = enter(e, st);
    if (rc) return rc;
    msa__engine_snap_t s;
    coll_list_t l = {0};
    rc = msa__engine_snap_open(e, NULL, 0, 0, &s, st);
    if (rc == MSA_OK) {
        rc = fill_status(st, msa_store_coll_foreach(s.txn, collect_coll, &l), "list collections");
        msa__engine_snap_close(e, &s);
    }
    if (rc)
        free(l.v);
    else {
        *out = l.v;
        *n = l.n;
    }
    return leave(e, rc);
}

int msa_engine_create_collection(msa_engine_t *e, const char *name, const msa_schema_t *schema,
                                 msa_engine_create_collection_result_t **out, msa_status_t *st)
{
    *out = NULL;
    msa_engine_create_collection_result_t *r = msa__engine_result_new(sizeof *r, st);
    if (!r) return MSA_ENOMEM;
    int rc = create_collection_into(e, name, schema, &r->info, st);
    if (rc)
        msa_engine_create_collection_result_free(r);
    else
        *out = r;
    return rc;
}

void msa_engine_create_collection_result_free(msa_engine_create_collection_result_t *r)
{
    if (!r) return;
    free(r);
}

int msa_engine_drop_collection(msa_engine_t *e, const char *name,
                               msa_engine_drop_collection_result_t **out, msa_status_t *st)
{
    *out = NULL;
    msa_engine_drop_collection_result_t *r = msa__engine_result_new(sizeof *r, st);
    if (!r) return MSA_ENOMEM;
    int rc = drop_collection_into(e, name, &r->commit_seq, st);
    if (rc)
        msa_engine_drop_collection_result_free(r);
    else
        *out = r;
    return rc;
}

void msa_engine_drop_collection_result_free(msa_engine_drop_collection_result_t *r)
{
    if (!r) return;
    free(r);
}

int msa_engine_describe_collection(msa_engine_t *e, const char *name,
                                   msa_engine_describe_collection_result_t **out, msa_status_t *st)
{
    *out = NULL;
    msa_engine_describe_collection_result_t *r = msa__engine_result_new(sizeof *r, st);
    if (!r) return MSA_ENOMEM;
    int rc = describe_collection_into(e, name, &r->info, st);
    if (rc)
        msa_engine_describe_collection_result_free(r);
    else
        *out = r;
    return rc;
}

void msa_engine_describe_collection_result_free(msa_engine_describe_collection_result_t *r)
{
    if (!r) return;
    free(r);
}

int msa_engine_list_collections(msa_engine_t *e, msa_engine_list_collections_result_t **out,
                                msa_status_t *st)
{
    *out = NULL;
    msa_engine_list_collections_result_t *r = msa__engine_result_new(sizeof *r, st);
    if (!r) return MSA_ENOMEM;
    int rc = list_collections_into(e, &r->colls, &r->n, st);
    if (rc)
        msa_engine_list_collections_result_free(r);
    else
        *out = r;
    return rc;
}

void msa_engine_list_collections_result_free(msa_engine_list_collections_result_t *r)
{
    if (!r) return;
    free(r->colls);
    free(r);
}

/* ==== writes ============================================================================ */

static int write_into(msa_engine_t *e, const msa_engine_write_req_t *req,
                      msa_engine_write_result_t *out, msa_status_t *st)
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
        const msa_engine_doc_t *d = &req->ops[i].put;
        if (req->ops[i].kind != MSA_OP_PUT) continue;
        if (d->text_len > e->cfg.max_text_bytes)
            rc = msa_status_set(st, MSA_EINVAL,
                                "ops[%zu].put.text: %zu bytes, at most %u (--max-text-bytes)", i,
                                d->text_len, e->cfg.max_text_bytes);
        else if (d->metadata_len > e->cfg.max_metadata_bytes)
            rc = msa_status_set(
                st, MSA_EINVAL,
                "ops[%zu].put.metadata: %zu bytes, at most %u (--max-metadata-bytes)", i,
                d->metadata_len, e->cfg.max_metadata_bytes);
        if (rc) goto done;
    }
    /* Resolve the collection (the writer re-checks it by id at commit). */
    msa__engine_snap_t s;
    rc = msa__engine_snap_open(e, req->collection, 0, 0, &s, st);
    if (rc) goto done;
    coll = s.coll;
    msa__engine_snap_close(e, &s);
    if ((rc = msa__engine_check_model(&coll.schema, req->model, st))) goto done;

    prep = msa_calloc(req->n_ops, sizeof *prep);
    versions = msa_calloc(req->n_ops, sizeof *versions);
    if (!prep || !versions) {
        rc = msa_status_set(st, MSA_ENOMEM, "write: out of memory");
        goto done;
    }
    for (size_t i = 0; i < req->n_ops && rc == MSA_OK; i++) {
        const msa_engine_write_op_t *op = &req->ops[i];
        char path[64];
        if (op->kind == MSA_OP_PUT) {
            rc = prep_put(&coll, &op->put, i, &prep[i], st);
        } else if (op->kind == MSA_OP_DELETE) {
            snprintf(path, sizeof path, "ops[%zu].delete_id", i);
            rc = msa__engine_check_id(op->delete_id, path, st);
            if (rc == MSA_OK && op->expect_absent)
                rc = msa_status_set(st, MSA_EINVAL, "ops[%zu].expect_absent: only valid with put",
                                    i);
        } else {
            rc = msa_status_set(st, MSA_EINVAL, "ops[%zu]: neither put nor delete_id is set", i);
        }
    }
    if (rc) goto done;
    wq_item_t it = {.kind = WQ_WRITE,
                    .name = req->collection,
                    .coll_id = coll.id,
                    .req = req,
                    .prep = prep,
                    .st = st,
                    .versions = versions};
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

int msa_engine_write(msa_engine_t *e, const msa_engine_write_req_t *req,
                     msa_engine_write_result_t **out, msa_status_t *st)
{
    *out = NULL;
    msa_engine_write_result_t *r = msa__engine_result_new(sizeof *r, st);
    if (!r) return MSA_ENOMEM;
    int rc = write_into(e, req, r, st);
    if (rc)
        msa_engine_write_result_free(r);
    else
        *out = r;
    return rc;
}

void msa_engine_write_result_free(msa_engine_write_result_t *r)
{
    if (!r) return;
    free(r->versions);
    free(r);
}
