/* engine.c — storage + routing index + compute behind one object: its
 * lifecycle and config (open, shutdown, close) and the validation shared by
 * both paths. The paths themselves: engine_write.c, engine_snapshot.c,
 * engine_read.c, engine_admin.c (see engine_impl.h).
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
#include "engine_impl.h"

void *msa__engine_result_new(size_t size, msa_status_t *st)
{
    void *r = msa_calloc(1, size);
    if (!r) msa_status_set(st, MSA_ENOMEM, "out of memory");
    return r;
}

/* ==== validation helpers ====================================================== */

bool msa__engine_valid_utf8(const unsigned char *s, size_t n, size_t *bad)
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

int msa__engine_check_model(const msa_schema_t *s, const char *model, msa_status_t *st)
{
    if (model && model[0] && strcmp(model, s->model) != 0)
        return msa_status_set(st, MSA_EPRECOND,
                              "model: \"%s\" differs from the collection's model \"%s\" "
                              "(latents from another encoder)",
                              model, s->model);
    return MSA_OK;
}

int msa__engine_check_id(uint64_t id, const char *path, msa_status_t *st)
{
    if (id == 0 || id >= ID_MAX)
        return msa_status_set(st, MSA_EINVAL, "%s: %llu is out of range 1..2^63-1", path,
                              (unsigned long long)id);
    return MSA_OK;
}

/* Finds the collection by name in txn t; NOT_FOUND names it. */
int msa__engine_find_coll(msa_store_txn_t *t, const char *name, msa_coll_rec_t *out,
                          msa_status_t *st)
{
    if (!name || !name[0]) return msa_status_set(st, MSA_EINVAL, "collection: empty name");
    int rc = msa_schema_validate_name(name, "collection", st);
    if (rc) return rc;
    rc = msa_store_coll_get(t, name, out);
    if (rc == MSA_ENOTFOUND)
        return msa_status_set(st, MSA_ENOTFOUND, "collection \"%s\" not found", name);
    return fill_status(st, rc, "collection lookup");
}

/* ==== lifecycle ===================================================================== */

typedef struct rebuild_ctx {
    msa_engine_t *e;
    msa_store_txn_t *txn;
    const msa_coll_rec_t *coll;
    msa_idx_coll_t *ic;
    float *rows;     /* [L][max chunks][W] scratch */
    size_t rows_cap; /* floats */
    uint64_t done, total;
    int64_t last_log;
    int rc;
    msa_status_t *st; /* names the document at fault */
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

static char *dup_or_null(const char *s)
{
    return s ? msa_strdup(s) : NULL;
}

int msa_engine_open(const msa_engine_config_t *cfg, msa_engine_t **out, msa_status_t *st)
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
            msa_log(MSA_LOG_WARN,
                    "--max-held-snapshots %u lowered to %u: half the %u LMDB reader "
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
    if (!e->data_dir || (cfg->backup_dir && !e->backup_dir)) {
        rc = msa_status_set(st, MSA_ENOMEM, "engine: out of memory");
        goto fail;
    }

    char why[256] = "";
    if (!e->cfg.gpu.shards_per_gpu) e->cfg.gpu.shards_per_gpu = 1;
    int gpus = msa_dev_count(&e->cfg.gpu.dev, why, sizeof why);
    snprintf(e->backend, sizeof e->backend, "cpu");
    if (cfg->backend == MSA_BACKEND_CUDA || (cfg->backend == MSA_BACKEND_AUTO && gpus > 0)) {
        char gwhy[256] = "";
        rc = gpus > 0 ? msa_gpu_open(&e->cfg.gpu, &e->gpu, gwhy, sizeof gwhy) : MSA_EUNAVAIL;
        if (rc && cfg->backend == MSA_BACKEND_CUDA) {
            rc = msa_status_set(st, rc == MSA_ENOMEM ? MSA_EFULL : MSA_EUNAVAIL, "backend cuda: %s",
                                gpus > 0 ? gwhy : why);
            goto fail;
        }
        if (rc)
            msa_log(MSA_LOG_WARN, "backend auto: CUDA backend unusable (%s); using the CPU", gwhy);
        else
            snprintf(e->backend, sizeof e->backend, "cuda");
    }
    if (e->cfg.gpu.dev.sim && e->gpu)
        msa_log(MSA_LOG_WARN, "backend: cuda on the SIMULATED device (MSA_GPU_SIM=1): a test "
                              "device that computes on the host; never use it to serve");
    msa_log(MSA_LOG_INFO, "backend: %s (%s; %d CUDA device%s%s%s)", e->backend,
            msa_idx_isa_name(msa_idx_isa_detect()), gpus, gpus == 1 ? "" : "s", gpus ? "" : ": ",
            gpus ? "" : why);

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
    msa_store_opts_t so = {.map_size = cfg->map_size,
                           .map_max = cfg->map_max,
                           .max_readers = cfg->max_readers,
                           .nosync = cfg->nosync};
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
    rc = msa__engine_lease_table_create(e->cfg.max_held_snapshots, msa__engine_lease_close, e,
                                        &e->leases);
    if (rc) {
        msa_status_set(st, rc, "held snapshots: %s", msa_strerror(rc));
        goto fail;
    }
    if (e->gpu) {
        msa_idx_accel_t acc;
        msa_gpu_accel(e->gpu, &acc);
        msa_idx_set_accel(e->idx, &acc);
    }
    if (pthread_create(&e->writer, NULL, msa__engine_writer_main, e) != 0) {
        rc = msa_status_set(st, MSA_EINTERNAL, "cannot start the writer thread");
        goto fail;
    }
    *out = e;
    return MSA_OK;
fail:
    msa__engine_lease_table_destroy(e->leases);
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

void msa_engine_shutdown_begin(msa_engine_t *e)
{
    if (e) atomic_store(&e->shutting_down, true);
}

void msa_engine_close(msa_engine_t *e)
{
    if (!e) return;
    msa_engine_shutdown_begin(e);
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
    msa__engine_lease_table_destroy(e->leases); /* closes every held snapshot */
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

const char *msa_engine_backend_name(const msa_engine_t *e)
{
    return e->backend;
}

uint64_t msa_engine_commit_seq(const msa_engine_t *e)
{
    return msa_idx_applied(e->idx);
}
