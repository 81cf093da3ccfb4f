/* lease.h — held snapshots (snapshot leases): read snapshots kept open past
 * the call that read them, keyed by commit seq, so that later calls naming
 * that seq read exactly the same versions (docs/SEMANTICS.md, "Held snapshots").
 * The table owns each held snapshot's LMDB read txn (detached from the thread
 * that began it) and, through the close callback, its index registration.
 *
 * Threads: every function is safe from any thread. A borrowed snapshot serves
 * one thread at a time (its txn allows no more). A reaper thread ends expired
 * leases within LEASE_REAP_MS even when no call comes.
 */
#ifndef MSA_LEASE_H
#define MSA_LEASE_H

#include "msa_err.h"
#include "store.h"

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct msa__engine_lease_table msa__engine_lease_table_t;
typedef struct msa__engine_lease msa__engine_lease_t; /* one held snapshot */

typedef struct msa__engine_lease_stats {
    uint64_t held;     /* snapshots held now */
    uint64_t granted;  /* leases granted (a call with hold_snapshot_ms and no snapshot_seq) */
    uint64_t renewed;  /* leases renewed (hold_snapshot_ms with snapshot_seq) */
    uint64_t released; /* leases ended by ReleaseSnapshot */
    uint64_t expired;  /* held snapshots closed because their lease ran out */
    uint64_t revoked;  /* held snapshots closed by the server (map growth) */
} msa__engine_lease_stats_t;

/* Ends a held snapshot for good: aborts txn and unregisters seq from the
 * index. Called without the table's lock, on any thread. */
typedef void (*msa__engine_lease_close_fn)(void *ctx, msa_store_txn_t *txn, uint64_t seq);

/* max_held: snapshots held at once. Starts the reaper. MSA_ENOMEM, MSA_EINTERNAL. */
int msa__engine_lease_table_create(uint32_t max_held, msa__engine_lease_close_fn close_fn,
                                   void *ctx, msa__engine_lease_table_t **out);
/* Stops the reaper and closes every held snapshot. Callers must have put back
 * every borrowed one. NULL is a no-op. */
void msa__engine_lease_table_destroy(msa__engine_lease_table_t *L);

/* Borrows the held snapshot seq for one call: counts the caller as a user
 * (the snapshot stays open until msa__engine_lease_put) and locks it for the
 * caller's thread; *txn is its read txn. MSA_EPRECOND (st names snapshot_seq)
 * when no lease on seq is held: never held, expired, released or revoked. */
int msa__engine_lease_borrow(msa__engine_lease_table_t *L, uint64_t seq, msa__engine_lease_t **out,
                             msa_store_txn_t **txn, msa_status_t *st);
/* The caller is done with the txn (other threads may borrow it now) but
 * still reads views into the snapshot's pages: it stays a user. */
void msa__engine_lease_unlock(msa__engine_lease_t *h);
/* Drops the caller's use (after msa__engine_lease_unlock when it borrowed); a
 * snapshot that left the table meanwhile is closed by the last user. */
void msa__engine_lease_put(msa__engine_lease_table_t *L, msa__engine_lease_t *h);
/* Extends the lease to at least now + hold_ms. No-op when it ended meanwhile. */
void msa__engine_lease_renew(msa__engine_lease_table_t *L, msa__engine_lease_t *h,
                             uint32_t hold_ms);

/* Grants a lease on the snapshot (txn, seq) a call just read:
 * - a lease on seq is held already: it gains a holder and the later expiry;
 *   *txn stays the caller's and *out = NULL;
 * - adoption is paused (map growth in progress): the lease is granted and at
 *   once revoked; *txn stays the caller's and *out = NULL;
 * - otherwise the table takes *txn (*txn = NULL) and the caller's index
 *   registration, and *out is the new held snapshot with the caller counted
 *   as its user (unlocked): msa__engine_lease_put it when done.
 * MSA_EFULL (st names --max-held-snapshots) when the table is full. */
int msa__engine_lease_adopt(msa__engine_lease_table_t *L, msa_store_txn_t **txn, uint64_t seq,
                            uint32_t hold_ms, msa__engine_lease_t **out, msa_status_t *st);
/* Ends one holder's lease on seq; the snapshot closes when none is left
 * (once its users are done). false when no lease on seq is held. */
bool msa__engine_lease_release(msa__engine_lease_table_t *L, uint64_t seq);

/* Revokes every held snapshot (later borrows get MSA_EPRECOND "released by
 * the server: why") and pauses adoption until msa__engine_lease_resume, so that a
 * map grow waiting for open snapshots is not stalled by leases. why: static. */
void msa__engine_lease_revoke_all(msa__engine_lease_table_t *L, const char *why);
void msa__engine_lease_resume(msa__engine_lease_table_t *L);

void msa__engine_lease_get_stats(msa__engine_lease_table_t *L, msa__engine_lease_stats_t *out);

#ifdef __cplusplus
}
#endif
#endif
