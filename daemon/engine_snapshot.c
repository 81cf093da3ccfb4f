/* engine_snapshot.c — read snapshots: an LMDB read txn plus its commit
 * seq, registered with the index (min_seq waits included), and held snapshots
 * (lease.h) borrowed by the calls that name them and adopted by the calls
 * that ask for a hold.
 */
#define _GNU_SOURCE /* asprintf */
#include "engine_impl.h"

/* ==== snapshots ==================================================================== */

typedef struct begin_ctx {
    msa_engine_t *e;
    msa__engine_snap_t *s;
} begin_ctx_t;

static int begin_read_ctx(void *arg, uint64_t *seq)
{
    begin_ctx_t *b = arg;
    int rc = msa_store_read_begin(b->e->store, &b->s->txn);
    if (rc) return rc;
    *seq = msa_store_txn_seq(b->s->txn);
    return MSA_OK;
}

void msa__engine_snap_close(msa_engine_t *e, msa__engine_snap_t *s)
{
    if (s->ic) msa_idx_coll_release(s->ic);
    if (s->lease) {
        if (s->lease_locked) msa__engine_lease_unlock(s->lease);
        msa__engine_lease_put(e->leases, s->lease);
        s->txn = NULL; /* the lease's */
    }
    if (s->txn) msa_store_abort(s->txn);
    if (s->registered) msa_idx_snap_unregister(e->idx, s->seq);
    memset(s, 0, sizeof *s);
}

/* Resolves the collection `name` (NULL: none) in the opened snapshot s and
 * takes its index handle; on failure closes s. A collection dropped after the
 * snapshot's seq stays in the index while that snapshot is registered, so a
 * held snapshot older than a drop still finds it. */
static int resolve_coll(msa_engine_t *e, const char *name, msa__engine_snap_t *s, msa_status_t *st)
{
    if (!name) return MSA_OK;
    int rc = msa__engine_find_coll(s->txn, name, &s->coll, st);
    if (rc == MSA_OK) {
        s->ic = msa_idx_coll_acquire(e->idx, s->coll.id);
        if (!s->ic)
            rc =
                msa_status_set(st, MSA_EINTERNAL, "collection \"%s\" missing from the index", name);
    }
    if (rc) msa__engine_snap_close(e, s);
    return rc;
}

/* Opens a snapshot that includes min_seq (waiting up to the configured limit
 * or the deadline) and, when name is given, resolves the collection in it. */
int msa__engine_snap_open(msa_engine_t *e, const char *name, uint64_t min_seq, int64_t deadline_ms,
                          msa__engine_snap_t *s, msa_status_t *st)
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
            return msa_status_set(
                st, MSA_ETIMEOUT, "min_seq: commit %llu not reached in time (commit seq is %llu)",
                (unsigned long long)min_seq, (unsigned long long)msa_idx_applied(e->idx));
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
    return resolve_coll(e, name, s, st);
}

/* ---- held snapshots (lease.h) ---- */

/* Ends a held snapshot for good (the lease table's close callback). */
void msa__engine_lease_close(void *ctx, msa_store_txn_t *txn, uint64_t seq)
{
    msa_engine_t *e = ctx;
    msa_store_abort(txn);
    msa_idx_snap_unregister(e->idx, seq);
}

/* msa__engine_snap_open for the reads that take snapshot_seq and hold_snapshot_ms (Route,
 * Attend, Get, List): snapshot_seq != 0 borrows that held snapshot (see
 * msa__engine_lease_borrow) and resolves the collection in it. */
int msa__engine_snap_open_at(msa_engine_t *e, const char *name, uint64_t min_seq,
                             int64_t deadline_ms, uint64_t snapshot_seq, uint32_t hold_ms,
                             msa__engine_snap_t *s, msa_status_t *st)
{
    memset(s, 0, sizeof *s);
    s->e = e;
    if (hold_ms > e->cfg.max_snapshot_hold_ms)
        return msa_status_set(st, MSA_EINVAL,
                              "hold_snapshot_ms: %u ms, at most %u (--max-snapshot-hold-ms); "
                              "renew the lease instead",
                              hold_ms, e->cfg.max_snapshot_hold_ms);
    if (!snapshot_seq) return msa__engine_snap_open(e, name, min_seq, deadline_ms, s, st);
    if (min_seq > snapshot_seq)
        return msa_status_set(st, MSA_EINVAL,
                              "min_seq: %llu is after snapshot_seq %llu (a held snapshot "
                              "never moves)",
                              (unsigned long long)min_seq, (unsigned long long)snapshot_seq);
    if (deadline_ms > 0 && mono_ms() > deadline_ms)
        return msa_status_set(st, MSA_ETIMEOUT, "deadline passed before the call started");
    int rc = msa__engine_lease_borrow(e->leases, snapshot_seq, &s->lease, &s->txn, st);
    if (rc) return rc;
    s->lease_locked = true;
    s->seq = snapshot_seq;
    return resolve_coll(e, name, s, st);
}

/* After a read succeeded: hold_ms != 0 starts a lease on the snapshot it read
 * (or renews the one it borrowed). The snapshot then belongs to the lease and
 * s only counts as its user; msa__engine_snap_close still ends s. Errors: MSA_EFULL at
 * --max-held-snapshots (s unchanged). */
int msa__engine_snap_hold(msa_engine_t *e, msa__engine_snap_t *s, uint32_t hold_ms,
                          msa_status_t *st)
{
    if (!hold_ms) return MSA_OK;
    if (s->lease) {
        msa__engine_lease_renew(e->leases, s->lease, hold_ms);
        return MSA_OK;
    }
    msa__engine_lease_t *h = NULL;
    int rc = msa__engine_lease_adopt(e->leases, &s->txn, s->seq, hold_ms, &h, st);
    if (rc == MSA_OK && h) {
        s->lease = h; /* took s->txn and the index registration */
        s->registered = false;
        s->lease_locked = false;
    }
    return rc;
}

/* The call is done with the txn but still reads views into the snapshot (Get). */
void msa__engine_snap_unlock(msa__engine_snap_t *s)
{
    if (s->lease && s->lease_locked) msa__engine_lease_unlock(s->lease);
    s->lease_locked = false;
}
