/* engine_impl.h — what the engine's files share; not a public header (only
 * daemon/engine*.c include it; the contract is engine.h).
 *
 *   engine.c          lifecycle and config: open (check, store, index rebuild,
 *                     backend, writer), shutdown, close; shared validation
 *   engine_write.c    the write path: preparation on the caller's thread, the
 *                     writer thread and group commit, collections, Write
 *   engine_snapshot.c read snapshots: open at the latest or a min_seq, held
 *                     snapshots (leases, lease.h) borrowed and adopted
 *   engine_read.c     the read path: query validation, Route, Attend, Get, List
 *   engine_admin.c    Stats, ReleaseSnapshot, Backup, Verify
 *   lease.c           the held-snapshot table
 *
 * Shared non-static helpers are msa__engine_*. The few one-line helpers every
 * file needs (clocks, enter/leave, fill_status) are static inline here, so
 * that each call stays as cheap and as short as it was in one file.
 */
#ifndef MSA_ENGINE_IMPL_H
#define MSA_ENGINE_IMPL_H

#include "engine.h"

#include "dev.h"
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

#define MAX_QUERY_TOKENS 65536 /* T per layer; larger queries are INVALID_ARGUMENT */
#define MAX_LIST_LIMIT 100000
/* Defaults of the request limits in msa_engine_config_t (0 there = these). */
#define DEF_MAX_WRITE_OPS 4096
#define DEF_MAX_TEXT_BYTES (16u << 20)
#define DEF_MAX_METADATA_BYTES (1u << 20)
#define DEF_MAX_IDS 100000
#define ID_MAX ((uint64_t)1 << 63) /* ids are 1..2^63-1 */
#define DEF_MAX_HELD_SNAPSHOTS 256
#define DEF_MAX_SNAPSHOT_HOLD_MS 60000

/* Commit rate assumed when deciding whether a min_seq is reachable in time. */
#define MIN_SEQ_COMMITS_PER_MS 1000

/* A request queued for the writer (engine_write.c). */
struct msa__engine_wq_item;

struct msa_engine {
    msa_engine_config_t cfg; /* copy; strings below are owned copies */
    char *data_dir;
    char *backup_dir;
    msa_store_t *store;
    msa_idx_t *idx;
    char backend[16]; /* "cpu" or "cuda" */
    msa_gpu_t *gpu;   /* CUDA backend, NULL on the CPU backend */
    /* writer */
    pthread_t writer;
    pthread_mutex_t q_lock;
    pthread_cond_t q_cond;    /* work queued, or stop */
    pthread_cond_t done_cond; /* some request finished */
    struct msa__engine_wq_item *q_head, *q_tail;
    bool writer_stop;
    pthread_mutex_t pause_lock; /* held by the writer per group; Verify holds it to freeze writes */
    /* lifecycle */
    atomic_bool shutting_down;
    atomic_bool broken;
    atomic_int inflight;     /* public calls in progress */
    atomic_uint submitted;   /* requests handed to the writer, not yet answered */
    atomic_uint seq_waiters; /* read calls waiting for a min_seq */
    /* counters */
    _Atomic uint64_t n_writes, n_groups, n_routes, n_attends, n_gets, n_lists;
    msa__engine_lease_table_t *leases; /* held snapshots (lease.h) */
};

typedef struct msa__engine_snap {
    msa_engine_t *e; /* owner: Get results close their snapshot later */
    msa_store_txn_t *txn;
    uint64_t seq;
    msa_coll_rec_t coll;
    msa_idx_coll_t *ic;
    bool registered;
    msa__engine_lease_t *lease; /* a held snapshot this call uses: txn is the lease's */
    bool lease_locked;          /* the lease's txn is still in use by this call */
} msa__engine_snap_t;

/* ---- shared helpers (one-liners, inline) ---- */

static inline int64_t mono_ms(void)
{
    return msa_clock_ms();
}

static inline int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Every public call brackets itself with enter/leave so close can wait. */
static inline int enter(msa_engine_t *e, msa_status_t *st)
{
    msa_status_clear(st);
    atomic_fetch_add(&e->inflight, 1);
    if (atomic_load(&e->shutting_down)) {
        atomic_fetch_sub(&e->inflight, 1);
        return msa_status_set(st, MSA_EUNAVAIL, "msad is shutting down");
    }
    if (atomic_load(&e->broken)) {
        atomic_fetch_sub(&e->inflight, 1);
        return msa_status_set(st, MSA_EBROKEN,
                              "engine is broken after an internal failure; restart msad");
    }
    return MSA_OK;
}

static inline int leave(msa_engine_t *e, int rc)
{
    atomic_fetch_sub(&e->inflight, 1);
    return rc;
}

/* Gives a bare error code a message when the callee left none. */
static inline int fill_status(msa_status_t *st, int rc, const char *what)
{
    if (rc && st && st->code == MSA_OK) msa_status_set(st, rc, "%s: %s", what, msa_strerror(rc));
    return rc;
}

/* ---- engine.c ---- */

/* The one result shape of engine.h: every result is one zeroed allocation the
 * caller frees with the call's _result_free. NULL (st set) when out of memory. */
void *msa__engine_result_new(size_t size, msa_status_t *st);
/* false with *bad = the offending byte's offset when s[0..n) is not UTF-8. */
bool msa__engine_valid_utf8(const unsigned char *s, size_t n, size_t *bad);
/* MSA_EPRECOND when model is set and differs from the schema's. */
int msa__engine_check_model(const msa_schema_t *s, const char *model, msa_status_t *st);
/* MSA_EINVAL (naming path) unless 1 <= id < 2^63. */
int msa__engine_check_id(uint64_t id, const char *path, msa_status_t *st);
/* Finds the collection by name in txn t; NOT_FOUND names it. */
int msa__engine_find_coll(msa_store_txn_t *t, const char *name, msa_coll_rec_t *out,
                          msa_status_t *st);

/* ---- engine_write.c ---- */

/* The writer thread's body (arg: the engine); ends when writer_stop is set
 * and the queue is empty. */
void *msa__engine_writer_main(void *arg);

/* ---- engine_snapshot.c ---- */

/* Opens a read snapshot at the latest commit (or waits for min_seq until
 * deadline_ms) and, when name is set, resolves that collection in it. */
int msa__engine_snap_open(msa_engine_t *e, const char *name, uint64_t min_seq, int64_t deadline_ms,
                          msa__engine_snap_t *s, msa_status_t *st);
/* As msa__engine_snap_open, or the held snapshot snapshot_seq (hold_ms: see
 * engine.h, "held snapshots"). */
int msa__engine_snap_open_at(msa_engine_t *e, const char *name, uint64_t min_seq,
                             int64_t deadline_ms, uint64_t snapshot_seq, uint32_t hold_ms,
                             msa__engine_snap_t *s, msa_status_t *st);
/* Grants or renews the lease a call asked for with hold_ms != 0. */
int msa__engine_snap_hold(msa_engine_t *e, msa__engine_snap_t *s, uint32_t hold_ms,
                          msa_status_t *st);
/* The call is done with the txn of a borrowed held snapshot (views stay valid). */
void msa__engine_snap_unlock(msa__engine_snap_t *s);
void msa__engine_snap_close(msa_engine_t *e, msa__engine_snap_t *s);
/* The lease table's close callback: ends a held snapshot for good. */
void msa__engine_lease_close(void *ctx, msa_store_txn_t *txn, uint64_t seq);

#endif
