/* index.h — the in-memory routing index: per collection and memory layer, the
 * router-key rows of every document version in the routing dtype (normalised
 * at insert for COSINE, quantised per (row, head) for I8), a table of document
 * versions with created/deleted commit seqs (MVCC), snapshot registry and
 * compaction, and Route over a snapshot on the CPU backend.
 *
 * Threads: one writer (the engine's commit thread) calls the mutating
 * functions; any number of readers route concurrently. A per-collection
 * writer-preferring rwlock guards the arrays: readers hold it shared for one
 * scan, the writer exclusively for an append/delete/compaction (microseconds
 * per document; compaction is rare and bounded by the collection's size).
 */
#ifndef MSA_INDEX_H
#define MSA_INDEX_H

#include "kernels.h"
#include "msa_err.h"
#include "schema.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct msa_idx msa_idx_t;
typedef struct msa_idx_coll msa_idx_coll_t;

/* threads: compute threads (0 = online CPUs). isa: kernels to use. */
int msa_idx_create(unsigned threads, msa_isa_t isa, msa_idx_t **out);
void msa_idx_destroy(msa_idx_t *x);
msa_idx_pool_t *msa_idx_get_pool(msa_idx_t *x);
msa_isa_t msa_idx_get_isa(const msa_idx_t *x);

/* ---- collections ------------------------------------------------------------ */

/* Adds an empty collection created at created_seq. MSA_EEXIST, MSA_ENOMEM. */
int msa_idx_coll_add(msa_idx_t *x, uint32_t coll_id, const msa_schema_t *schema);
/* Marks the collection dropped at seq; it disappears once no snapshot older
 * than seq is open (msa_idx_compact). */
void msa_idx_coll_drop(msa_idx_t *x, uint32_t coll_id, uint64_t seq);
/* A counted reference (NULL when absent); release with msa_idx_coll_release. */
msa_idx_coll_t *msa_idx_coll_acquire(msa_idx_t *x, uint32_t coll_id);
void msa_idx_coll_release(msa_idx_coll_t *c);

/* ---- writer side -------------------------------------------------------------- */

/* Inserts (or replaces: the live version is deleted at seq first) the document
 * doc_id with nrows rows per layer. rows[l] is [nrows][H*D] float32 holding
 * the STORED router keys of layer position l (already rounded to their stored
 * dtype). The index normalises (COSINE) and converts to the routing dtype.
 * MSA_ENOMEM leaves the collection unchanged. */
int msa_idx_doc_put(msa_idx_coll_t *c, uint64_t doc_id, uint64_t seq, uint32_t nrows,
                    const float *const *rows);
/* Deletes the live version of doc_id at seq. MSA_ENOTFOUND when none. */
int msa_idx_doc_delete(msa_idx_coll_t *c, uint64_t doc_id, uint64_t seq);
/* Publishes seq as applied: readers waiting for it proceed. */
void msa_idx_publish(msa_idx_t *x, uint64_t seq);
uint64_t msa_idx_applied(msa_idx_t *x);
/* Waits until applied >= seq or the monotonic deadline (ms; 0 = none) passes;
 * MSA_ETIMEOUT then. */
int msa_idx_wait_applied(msa_idx_t *x, uint64_t seq, int64_t deadline_ms);
/* Physically removes versions (and dropped collections) no open snapshot can
 * see any more, when worthwhile (>= 1/4 of a collection's rows are dead) or
 * when force is set. Writer thread only. Returns rows removed. */
size_t msa_idx_compact(msa_idx_t *x, bool force);

/* ---- snapshots ------------------------------------------------------------------ */

/* Registers an open snapshot. begin_fn must return the snapshot's seq (the
 * engine begins its LMDB read txn there), which must be at least the applied
 * seq at the time of the call. It runs outside the registry lock, while a
 * placeholder (the applied seq) already holds compaction back, so compaction
 * can never remove rows the snapshot may see. */
int msa_idx_snap_register(msa_idx_t *x, int (*begin_fn)(void *arg, uint64_t *seq), void *arg,
                          uint64_t *seq);
void msa_idx_snap_unregister(msa_idx_t *x, uint64_t seq);

/* ---- readers -------------------------------------------------------------------- */

typedef struct msa_idx_route_args {
    uint32_t layer_pos; /* index into schema.layers */
    const float *q;     /* [T][Hq][D] routing queries as sent */
    uint32_t T;
    uint64_t snapshot;       /* visible iff created <= snapshot < deleted */
    const uint64_t *exclude; /* ids never selected (any order) */
    size_t n_exclude;
    uint32_t top_k; /* 1..MSA_MAX_TOP_K */
} msa_idx_route_args_t;

/* Top-k documents of one layer, best first (ties: smaller id). out has room
 * for top_k hits; *n_out = min(top_k, visible candidates). */
int msa_idx_route(msa_idx_t *x, msa_idx_coll_t *c, const msa_idx_route_args_t *a,
                  msa_idx_hit_t *out, uint32_t *n_out);

typedef struct msa_idx_coll_stats {
    uint64_t live_docs; /* versions not deleted */
    uint64_t versions;  /* entries incl. deleted, not yet compacted */
    uint64_t rows;      /* rows per layer incl. dead ones */
    uint64_t bytes;     /* host memory of rows + scales + tables */
} msa_idx_coll_stats_t;

void msa_idx_coll_stats(msa_idx_coll_t *c, msa_idx_coll_stats_t *out);
/* Rows of the live version of doc_id, or -1 (verify). */
long msa_idx_doc_rows(msa_idx_coll_t *c, uint64_t doc_id);
/* Bytes of every collection's rows and tables. */
uint64_t msa_idx_bytes(msa_idx_t *x);

/* ---- accelerator hook (the CUDA backend) ----------------------------------------- */

/* One document version: its rows are [row0, row0 + nrows) in every layer. */
typedef struct msa_idx_entry {
    uint64_t doc;
    uint64_t created; /* commit seq that wrote this version */
    uint64_t deleted; /* commit seq that replaced/deleted it, UINT64_MAX if none */
    uint64_t row0;
    uint32_t nrows;
} msa_idx_entry_t;

/* What an accelerator sees of one (collection, layer) while msa_idx_route holds
 * the collection's read lock: borrowed, valid only during the hook call. */
typedef struct msa_idx_layer_view {
    uint32_t coll_id;
    const msa_schema_t *schema;
    uint32_t layer_pos;
    msa_dtype_t key_dtype; /* routing dtype of rows */
    size_t row_bytes;      /* H*D elements of key_dtype */
    const uint8_t *rows;   /* [n_rows][row_bytes] */
    const float *scales;   /* [n_rows][H] for I8, else NULL */
    size_t n_rows;
    const msa_idx_entry_t *ent; /* in row order */
    size_t n_ent;
    uint64_t layout_gen; /* changes whenever rows move (compaction) */
    uint64_t delete_gen; /* changes whenever an entry's deleted seq changes */
} msa_idx_layer_view_t;

typedef struct msa_idx_accel {
    void *ctx;
    /* Routes one layer. excl: sorted. Returns MSA_OK with the hits, MSA_EUNAVAIL
     * to let the CPU scan answer instead, or another error for the caller. */
    int (*route)(void *ctx, const msa_idx_layer_view_t *v, const msa_idx_scorer_t *s,
                 uint64_t snapshot, const uint64_t *excl, size_t n_excl, uint32_t top_k,
                 msa_idx_hit_t *out, uint32_t *n_out);
    /* The collection left the index for good: forget its state. */
    void (*forget)(void *ctx, uint32_t coll_id);
} msa_idx_accel_t;

/* Where the row arrays (keys, I8 scales) live: by default malloc; the CUDA
 * backend hands out pinned host memory so that layers paged out of the GPU
 * stream back by DMA. alloc returns NULL on failure. Install before any
 * collection is added; the allocator must outlive the index. */
typedef struct msa_idx_host_alloc {
    void *ctx;
    void *(*alloc)(void *ctx, size_t bytes);
    void (*free)(void *ctx, void *p);
} msa_idx_host_alloc_t;

void msa_idx_set_host_alloc(msa_idx_t *x, const msa_idx_host_alloc_t *a);

/* Installs (or with NULL removes) the accelerator; call before serving. */
void msa_idx_set_accel(msa_idx_t *x, const msa_idx_accel_t *accel);

#ifdef __cplusplus
}
#endif
#endif
