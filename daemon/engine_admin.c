/* engine_admin.c — Stats, ReleaseSnapshot, Backup and Verify (engine.h,
 * "admin").
 */
#define _GNU_SOURCE /* asprintf */
#include "engine_impl.h"

/* ==== Stats / Backup / Verify =================================================================== */

typedef struct sum_ctx {
    msa_engine_stats_result_t *s;
} sum_ctx_t;

static int sum_coll(void *arg, const msa_coll_rec_t *c)
{
    msa_engine_stats_result_t *s = ((sum_ctx_t *)arg)->s;
    s->collections++;
    s->documents += c->documents;
    s->chunks += c->chunks;
    return 0;
}

static int stats_into(msa_engine_t *e, msa_engine_stats_result_t *out, msa_status_t *st)
{
    int rc = enter(e, st);
    if (rc) return rc;
    memset(out, 0, sizeof *out);
    msa__engine_snap_t s;
    rc = msa__engine_snap_open(e, NULL, 0, 0, &s, st);
    if (rc) return leave(e, rc);
    sum_ctx_t ctx = {out};
    rc = fill_status(st, msa_store_coll_foreach(s.txn, sum_coll, &ctx), "stats");
    out->commit_seq = s.seq;
    msa__engine_snap_close(e, &s);
    snprintf(out->backend, sizeof out->backend, "%s", e->backend);
    out->store_bytes = msa_store_file_bytes(e->store);
    out->index_bytes = msa_idx_bytes(e->idx);
    out->writes = atomic_load(&e->n_writes);
    out->write_groups = atomic_load(&e->n_groups);
    out->routes = atomic_load(&e->n_routes);
    out->attends = atomic_load(&e->n_attends);
    out->gets = atomic_load(&e->n_gets);
    out->lists = atomic_load(&e->n_lists);
    msa__engine_lease_stats_t ls;
    msa__engine_lease_get_stats(e->leases, &ls);
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

static int release_snapshot_into(msa_engine_t *e, uint64_t snapshot_seq, bool *released,
                                 msa_status_t *st)
{
    *released = false;
    int rc = enter(e, st);
    if (rc) return rc;
    if (!snapshot_seq)
        return leave(e, msa_status_set(st, MSA_EINVAL,
                                       "snapshot_seq: 0, want the seq of a held "
                                       "snapshot"));
    *released = msa__engine_lease_release(e->leases, snapshot_seq);
    return leave(e, MSA_OK);
}

static int backup_into(msa_engine_t *e, const char *name, bool compact, uint64_t *seq,
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
        return leave(e,
                     msa_status_set(st, MSA_EINVAL, "name: %zu bytes, at most 255", strlen(name)));
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
        if (asprintf(&msg,
                     "collection \"%s\" document %llu: index has %ld rows, store has %u chunks",
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
                     c->name, (unsigned long long)is.live_docs,
                     (unsigned long long)c->documents) < 0)
            msg = NULL;
        add_problem(v, msg);
    }
    int rc = msa_store_doc_foreach(v->txn, c->id, verify_doc, v);
    msa_idx_coll_release(v->ic);
    return rc;
}

static int verify_into(msa_engine_t *e, const char *collection, uint64_t *docs_checked,
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
        rc = msa__engine_find_coll(t, only, &c, st);
        coll_id = c.id;
    }
    if (rc == MSA_OK) {
        rc = msa_store_verify(e->store, coll_id, docs_checked, problems, n_problems);
        fill_status(st, rc, "verify");
    }
    if (rc == MSA_OK) {
        verify_ctx_t v = {
            .e = e, .txn = t, .problems = problems, .n_problems = n_problems, .only = only};
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

int msa_engine_stats(msa_engine_t *e, msa_engine_stats_result_t **out, msa_status_t *st)
{
    *out = NULL;
    msa_engine_stats_result_t *r = msa__engine_result_new(sizeof *r, st);
    if (!r) return MSA_ENOMEM;
    int rc = stats_into(e, r, st);
    if (rc)
        msa_engine_stats_result_free(r);
    else
        *out = r;
    return rc;
}

void msa_engine_stats_result_free(msa_engine_stats_result_t *r)
{
    if (!r) return;
    free(r);
}

int msa_engine_release_snapshot(msa_engine_t *e, uint64_t snapshot_seq,
                                msa_engine_release_snapshot_result_t **out, msa_status_t *st)
{
    *out = NULL;
    msa_engine_release_snapshot_result_t *r = msa__engine_result_new(sizeof *r, st);
    if (!r) return MSA_ENOMEM;
    int rc = release_snapshot_into(e, snapshot_seq, &r->released, st);
    if (rc)
        msa_engine_release_snapshot_result_free(r);
    else
        *out = r;
    return rc;
}

void msa_engine_release_snapshot_result_free(msa_engine_release_snapshot_result_t *r)
{
    if (!r) return;
    free(r);
}

int msa_engine_backup(msa_engine_t *e, const char *name, bool compact,
                      msa_engine_backup_result_t **out, msa_status_t *st)
{
    *out = NULL;
    msa_engine_backup_result_t *r = msa__engine_result_new(sizeof *r, st);
    if (!r) return MSA_ENOMEM;
    int rc = backup_into(e, name, compact, &r->seq, &r->bytes, st);
    if (rc)
        msa_engine_backup_result_free(r);
    else
        *out = r;
    return rc;
}

void msa_engine_backup_result_free(msa_engine_backup_result_t *r)
{
    if (!r) return;
    free(r);
}

int msa_engine_verify(msa_engine_t *e, const char *collection, msa_engine_verify_result_t **out,
                      msa_status_t *st)
{
    *out = NULL;
    msa_engine_verify_result_t *r = msa__engine_result_new(sizeof *r, st);
    if (!r) return MSA_ENOMEM;
    int rc = verify_into(e, collection, &r->docs_checked, &r->problems, &r->n_problems, st);
    if (rc)
        msa_engine_verify_result_free(r);
    else
        *out = r;
    return rc;
}

void msa_engine_verify_result_free(msa_engine_verify_result_t *r)
{
    if (!r) return;
    msa_store_problems_free(r->problems, r->n_problems);
    free(r);
}
