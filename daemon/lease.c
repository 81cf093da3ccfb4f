/* lease.c — the table of held snapshots behind lease.h.
 *
 * One mutex guards the table (a short list: at most max_held entries, 256 by
 * default, so lookups scan it). Each held snapshot has its own mutex that a
 * borrower holds for the duration of its call, because an LMDB txn must be
 * used by one thread at a time. That txn crosses threads, against the rule
 * in STYLE.md that a txn never does: the env is opened with MDB_NOTLS, so a
 * read txn is tied to no thread, and the store detached its hold on the map
 * gate (msa_store_txn_detach). Lock order: table lock, never a snapshot's
 * mutex under it.
 *
 * An entry leaves the table (expired, released, revoked) at once, but its
 * txn is closed by the last user, so a call or a Get result reading it is
 * never pulled from under its feet. The reaper thread below closes expired
 * entries nobody uses.
 */
#include "lease.h"

#include "msa_alloc.h"
#include "msa_clock.h"
#include "msa_log.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LEASE_REAP_MS 200 /* longest reaper sleep: an expired lease closes within this */
#define GONE_RING 64      /* revoked seqs remembered for the error message */

struct msa__engine_lease {
    uint64_t seq;
    msa_store_txn_t *txn; /* detached read txn */
    pthread_mutex_t use;  /* held by the borrower using txn */
    uint32_t holders;     /* leases granted and not released */
    uint32_t users;       /* borrowers and adopting callers not yet put */
    int64_t expires_ms;   /* CLOCK_MONOTONIC ms */
    bool gone;            /* out of the table; the last user closes it */
    struct msa__engine_lease *next;
};

struct msa__engine_lease_table {
    pthread_mutex_t lock;
    pthread_cond_t cond; /* wakes the reaper: stop, or a new expiry */
    msa__engine_lease_t *head;
    uint32_t n, max;
    bool paused; /* adoption refused (revoked at once) while set */
    const char *pause_why;
    bool stop;
    pthread_t reaper;
    msa__engine_lease_close_fn close_fn;
    void *ctx;
    struct {
        uint64_t seq;
        const char *why;
    } ring[GONE_RING]; /* recently revoked seqs */
    unsigned ring_next;
    msa__engine_lease_stats_t stats; /* .held unused: n is the truth */
};

static int64_t now_ms(void)
{
    return msa_clock_ms();
}

/* Takes h out of the table (lock held). Returns h when nobody uses it, so
 * the caller closes it after unlocking; NULL when the last user will. */
static msa__engine_lease_t *unlink_lease(msa__engine_lease_table_t *L, msa__engine_lease_t *h)
{
    for (msa__engine_lease_t **p = &L->head; *p; p = &(*p)->next) {
        if (*p == h) {
            *p = h->next;
            break;
        }
    }
    h->next = NULL;
    h->gone = true;
    L->n--;
    return h->users == 0 ? h : NULL;
}

static void close_lease(msa__engine_lease_table_t *L, msa__engine_lease_t *h)
{
    L->close_fn(L->ctx, h->txn, h->seq);
    pthread_mutex_destroy(&h->use);
    free(h);
}

static void close_list(msa__engine_lease_table_t *L, msa__engine_lease_t *list)
{
    while (list) {
        msa__engine_lease_t *next = list->next;
        close_lease(L, list);
        list = next;
    }
}

/* Expires h when its lease ran out and no call uses it (lock held); pushes it
 * on *closing. A lease never expires under a call that reads it. */
static bool expire_if_due(msa__engine_lease_table_t *L, msa__engine_lease_t *h, int64_t now,
                          msa__engine_lease_t **closing)
{
    if (h->users > 0 || h->expires_ms > now) return false;
    L->stats.expired++;
    msa_log(MSA_LOG_DEBUG, "snapshot %llu: lease expired", (unsigned long long)h->seq);
    if (unlink_lease(L, h)) {
        h->next = *closing;
        *closing = h;
    }
    return true;
}

/* The live entry for seq (lock held), expiring it first when due. */
static msa__engine_lease_t *find(msa__engine_lease_table_t *L, uint64_t seq,
                                 msa__engine_lease_t **closing)
{
    for (msa__engine_lease_t *h = L->head; h; h = h->next) {
        if (h->seq != seq) continue;
        return expire_if_due(L, h, now_ms(), closing) ? NULL : h;
    }
    return NULL;
}

static void *reaper_main(void *arg)
{
    msa__engine_lease_table_t *L = arg;
    pthread_mutex_lock(&L->lock);
    while (!L->stop) {
        int64_t now = now_ms(), wake = now + LEASE_REAP_MS;
        msa__engine_lease_t *closing = NULL;
        for (msa__engine_lease_t *h = L->head, *next; h; h = next) {
            next = h->next;
            if (!expire_if_due(L, h, now, &closing) && h->users == 0 && h->expires_ms < wake)
                wake = h->expires_ms;
        }
        if (closing) {
            pthread_mutex_unlock(&L->lock);
            close_list(L, closing);
            pthread_mutex_lock(&L->lock);
            continue;
        }
        struct timespec ts = {.tv_sec = wake / 1000, .tv_nsec = (wake % 1000) * 1000000};
        pthread_cond_timedwait(&L->cond, &L->lock, &ts);
    }
    pthread_mutex_unlock(&L->lock);
    return NULL;
}

int msa__engine_lease_table_create(uint32_t max_held, msa__engine_lease_close_fn close_fn,
                                   void *ctx, msa__engine_lease_table_t **out)
{
    *out = NULL;
    msa__engine_lease_table_t *L = msa_calloc(1, sizeof *L);
    if (!L) return MSA_ENOMEM;
    L->max = max_held;
    L->close_fn = close_fn;
    L->ctx = ctx;
    pthread_mutex_init(&L->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&L->cond, &ca);
    pthread_condattr_destroy(&ca);
    if (pthread_create(&L->reaper, NULL, reaper_main, L) != 0) {
        pthread_cond_destroy(&L->cond);
        pthread_mutex_destroy(&L->lock);
        free(L);
        return MSA_EINTERNAL;
    }
    *out = L;
    return MSA_OK;
}

void msa__engine_lease_table_destroy(msa__engine_lease_table_t *L)
{
    if (!L) return;
    pthread_mutex_lock(&L->lock);
    L->stop = true;
    pthread_cond_signal(&L->cond);
    pthread_mutex_unlock(&L->lock);
    pthread_join(L->reaper, NULL);
    while (L->head) {
        msa__engine_lease_t *h = L->head;
        msa_assert(h->users == 0); /* every call and Get result ended first */
        unlink_lease(L, h);
        close_lease(L, h);
    }
    pthread_cond_destroy(&L->cond);
    pthread_mutex_destroy(&L->lock);
    free(L);
}

int msa__engine_lease_borrow(msa__engine_lease_table_t *L, uint64_t seq, msa__engine_lease_t **out,
                             msa_store_txn_t **txn, msa_status_t *st)
{
    *out = NULL;
    *txn = NULL;
    msa__engine_lease_t *closing = NULL;
    pthread_mutex_lock(&L->lock);
    msa__engine_lease_t *h = find(L, seq, &closing);
    const char *why = NULL;
    if (h) {
        h->users++;
    } else {
        for (unsigned i = 0; i < GONE_RING; i++)
            if (L->ring[i].why && L->ring[i].seq == seq) why = L->ring[i].why;
    }
    pthread_mutex_unlock(&L->lock);
    close_list(L, closing);
    if (!h) {
        if (why)
            return msa_status_set(st, MSA_EPRECOND,
                                  "snapshot_seq: snapshot %llu is not held: released by the "
                                  "server: %s",
                                  (unsigned long long)seq, why);
        return msa_status_set(st, MSA_EPRECOND,
                              "snapshot_seq: snapshot %llu is not held (expired or released; "
                              "hold one with hold_snapshot_ms)",
                              (unsigned long long)seq);
    }
    pthread_mutex_lock(&h->use);
    *out = h;
    *txn = h->txn;
    return MSA_OK;
}

void msa__engine_lease_unlock(msa__engine_lease_t *h)
{
    pthread_mutex_unlock(&h->use);
}

void msa__engine_lease_put(msa__engine_lease_table_t *L, msa__engine_lease_t *h)
{
    pthread_mutex_lock(&L->lock);
    msa_assert(h->users > 0);
    bool close_now = --h->users == 0 && h->gone;
    /* Its expiry may have passed during the call: let the reaper look now. */
    if (h->users == 0 && !h->gone) pthread_cond_signal(&L->cond);
    pthread_mutex_unlock(&L->lock);
    if (close_now) close_lease(L, h);
}

void msa__engine_lease_renew(msa__engine_lease_table_t *L, msa__engine_lease_t *h, uint32_t hold_ms)
{
    pthread_mutex_lock(&L->lock);
    if (!h->gone) {
        int64_t until = now_ms() + hold_ms;
        if (until > h->expires_ms) h->expires_ms = until;
        L->stats.renewed++;
    }
    pthread_mutex_unlock(&L->lock);
}

static void remember_gone(msa__engine_lease_table_t *L, uint64_t seq, const char *why)
{
    L->ring[L->ring_next].seq = seq;
    L->ring[L->ring_next].why = why;
    L->ring_next = (L->ring_next + 1) % GONE_RING;
}

int msa__engine_lease_adopt(msa__engine_lease_table_t *L, msa_store_txn_t **txn, uint64_t seq,
                            uint32_t hold_ms, msa__engine_lease_t **out, msa_status_t *st)
{
    *out = NULL;
    msa__engine_lease_t *closing = NULL;
    int rc = MSA_OK;
    pthread_mutex_lock(&L->lock);
    int64_t until = now_ms() + hold_ms;
    msa__engine_lease_t *h = L->paused ? NULL : find(L, seq, &closing);
    if (L->paused) {
        /* A map grow is waiting for open snapshots: holding this one would
         * stall it (and every reader behind it) for the whole lease. */
        L->stats.granted++;
        L->stats.revoked++;
        remember_gone(L, seq, L->pause_why);
    } else if (h) {
        h->holders++;
        if (until > h->expires_ms) h->expires_ms = until;
        L->stats.granted++;
    } else if (L->n >= L->max) {
        rc = msa_status_set(st, MSA_EFULL,
                            "hold_snapshot_ms: %u snapshots are held already, the limit "
                            "(--max-held-snapshots); release some (ReleaseSnapshot) or hold "
                            "for less time",
                            L->n);
    } else if ((h = msa_calloc(1, sizeof *h)) == NULL) {
        rc = msa_status_set(st, MSA_ENOMEM, "hold_snapshot_ms: out of memory");
    } else if (msa_store_txn_detach(*txn) != MSA_OK) {
        /* Only when a grow is pending: as if revoked at once. */
        free(h);
        h = NULL;
        L->stats.granted++;
        L->stats.revoked++;
        remember_gone(L, seq, "map growth");
    } else {
        pthread_mutex_init(&h->use, NULL);
        h->seq = seq;
        h->txn = *txn;
        *txn = NULL;
        h->holders = 1;
        h->users = 1;
        h->expires_ms = until;
        h->next = L->head;
        L->head = h;
        L->n++;
        L->stats.granted++;
        for (unsigned i = 0; i < GONE_RING; i++)
            if (L->ring[i].seq == seq) L->ring[i].why = NULL;
        *out = h;
    }
    pthread_mutex_unlock(&L->lock);
    close_list(L, closing);
    return rc;
}

bool msa__engine_lease_release(msa__engine_lease_table_t *L, uint64_t seq)
{
    msa__engine_lease_t *closing = NULL, *done = NULL;
    pthread_mutex_lock(&L->lock);
    msa__engine_lease_t *h = find(L, seq, &closing);
    if (h) {
        L->stats.released++;
        if (--h->holders == 0) done = unlink_lease(L, h);
    }
    pthread_mutex_unlock(&L->lock);
    close_list(L, closing);
    if (done) close_lease(L, done);
    return h != NULL;
}

void msa__engine_lease_revoke_all(msa__engine_lease_table_t *L, const char *why)
{
    msa__engine_lease_t *closing = NULL;
    pthread_mutex_lock(&L->lock);
    L->paused = true;
    L->pause_why = why;
    uint32_t n = L->n;
    while (L->head) {
        msa__engine_lease_t *h = L->head;
        L->stats.revoked++;
        remember_gone(L, h->seq, why);
        if (unlink_lease(L, h)) {
            h->next = closing;
            closing = h;
        }
    }
    pthread_mutex_unlock(&L->lock);
    if (n) msa_log(MSA_LOG_INFO, "%u held snapshots revoked: %s", n, why);
    close_list(L, closing);
}

void msa__engine_lease_resume(msa__engine_lease_table_t *L)
{
    pthread_mutex_lock(&L->lock);
    L->paused = false;
    pthread_mutex_unlock(&L->lock);
}

void msa__engine_lease_get_stats(msa__engine_lease_table_t *L, msa__engine_lease_stats_t *out)
{
    pthread_mutex_lock(&L->lock);
    *out = L->stats;
    out->held = L->n;
    pthread_mutex_unlock(&L->lock);
}
