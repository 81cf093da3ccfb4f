/* engine.h — the memory engine that msad runs: storage + routing index +
 * compute backend behind one object, with the write path (validate, group
 * commit, index apply, publish) and the read path (snapshot, route, read K/V,
 * attend). No network code: rpc/ maps protobuf onto these structs. This header
 * is the engine's manual; docs/SEMANTICS.md is the contract it implements.
 *
 * Names. The module is daemon/ and its one name is "engine": the object is
 * msa_engine_t, every public call msa_engine_*, every public type
 * msa_engine_*_t (enum values stay MSA_*). Internals shared between the
 * engine's files (engine_impl.h, lease.h) are msa__engine_*.
 *
 * One call shape. Every call that can fail is
 *     int msa_engine_<call>(msa_engine_t *e, <inputs>,
 *                           msa_engine_<call>_result_t **out, msa_status_t *st);
 * It returns MSA_OK, or an MSA_E* code with a message in *st that names the
 * field ("ops[3].put.layers[2].k: ..."). On success *out is a result
 * allocated by the call and owned by the caller until
 * msa_engine_<call>_result_free(*out) (NULL is a no-op); on failure *out is
 * NULL and nothing was written. Inputs are borrowed for the call only. Calls
 * without a result (none today) would take no out parameter.
 *
 * Errors every call may return, besides its own: MSA_EUNAVAIL ("msad is
 * shutting down", after msa_engine_shutdown_begin), MSA_EBROKEN (an earlier
 * internal failure left the engine unusable: restart), MSA_ENOMEM.
 *
 * Threads. Every msa_engine_* call is safe from any number of threads at
 * once. Writes are queued to one internal writer thread (group commit); a
 * write returns when its request is durable (or has failed, having written
 * nothing). Reads run on the caller's thread (Route's layers on the compute
 * pool). A result is plain memory the caller owns: read it from any thread.
 * Free a Get result on the thread that called Get (it ends that call's read
 * snapshot, see msa_engine_get_result_t); any other result on any thread.
 *
 * Sections: configuration and lifecycle; collections; the write path; the
 * read path (snapshots, Route, Attend, Get, List); held snapshots; admin
 * (Stats, Backup, Verify).
 */
#ifndef MSA_ENGINE_H
#define MSA_ENGINE_H

#include "backend.h"
#include "msa_err.h"
#include "schema.h"
#include "store.h"
#include "tensor.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct msa_engine msa_engine_t;

/* ==== configuration and lifecycle ========================================== */

typedef enum {
    MSA_BACKEND_AUTO = 0,
    MSA_BACKEND_CPU = 1,
    MSA_BACKEND_CUDA = 2
} msa_engine_backend_t;

typedef struct msa_engine_config {
    const char *data_dir;         /* LMDB directory (created when missing) */
    msa_engine_backend_t backend; /* auto: CUDA when a usable GPU exists, else CPU */
    unsigned threads;             /* compute threads (0 = online CPUs) */
    bool nosync;                  /* --sync nosync: commits not fsync'd */
    uint64_t map_size;            /* initial LMDB map bytes (0 = default) */
    uint64_t map_max;             /* LMDB map limit bytes (0 = default) */
    unsigned max_readers;         /* concurrent read snapshots (0 = 1024) */
    const char *backup_dir;       /* Backup writes only here (NULL: backups refused) */
    unsigned group_commit_max;    /* requests per LMDB txn at most (0 = 256) */
    uint32_t min_seq_wait_ms;     /* min_seq wait limit (0 = 5000) */
    uint32_t max_min_seq_waiters; /* calls waiting for min_seq at once (0 = 8); more:
                                      MSA_EFULL, so waits cannot take every handler */
    /* Request limits (INVALID_ARGUMENT naming the field when exceeded). */
    uint32_t max_query_tokens;   /* T per layer of Route/Attend (0 = 65536) */
    uint32_t max_write_ops;      /* ops per WriteRequest (0 = 4096) */
    uint32_t max_text_bytes;     /* Document.text per document (0 = 16 MiB) */
    uint32_t max_metadata_bytes; /* Document.metadata per document (0 = 1 MiB) */
    uint32_t max_ids;            /* GetRequest.ids, exclude_ids per request (0 = 100000) */
    /* Held snapshots (snapshot leases). */
    uint32_t max_held_snapshots;   /* held at once (0 = 256; at most half of max_readers) */
    uint32_t max_snapshot_hold_ms; /* hold_snapshot_ms limit (0 = 60000) */
    /* Integrity walk of data.mdb in a child process before anything is served
     * (msa_store_check_file): full (0, the default), quick or off. */
    msa_store_check_t check_on_start;
    /* CUDA backend (used when the backend is cuda, or auto with a GPU). */
    msa_gpu_config_t gpu;
} msa_engine_config_t;

/* Checks the data file (cfg.check_on_start), opens the store, rebuilds the
 * index from it (progress in the log), picks the backend, starts the writer.
 * cfg is copied (strings too). *out: the engine, owned by the caller until
 * msa_engine_close.
 * Errors: as msa_store_check_file and msa_store_open (MSA_ECORRUPT for a
 * damaged file, also when a block the index needs fails its checksum),
 * MSA_EUNAVAIL when --backend cuda finds no usable GPU (cfg.gpu.dev.sim puts
 * the simulated test device of gpu/dev_sim.c in its place; msad sets it from
 * MSA_GPU_SIM=1, see msa_dev_config_env). */
int msa_engine_open(const msa_engine_config_t *cfg, msa_engine_t **out, msa_status_t *st);
/* Stops accepting new calls (they get MSA_EUNAVAIL), drains queued writes,
 * waits for calls in flight, then closes everything. Results still held by
 * callers must have been freed. NULL is a no-op. */
void msa_engine_close(msa_engine_t *e);
/* Makes later calls fail with MSA_EUNAVAIL ("shutting down") while queued
 * writes still commit; msa_engine_close finishes the job. Any thread. */
void msa_engine_shutdown_begin(msa_engine_t *e);
/* "cpu" or "cuda"; static storage, valid while e is open. */
const char *msa_engine_backend_name(const msa_engine_t *e);
/* The last commit seq applied to the index (what a new snapshot reads). */
uint64_t msa_engine_commit_seq(const msa_engine_t *e);

/* ==== collections ============================================================ */

typedef struct msa_engine_coll_info {
    char name[MSA_MAX_NAME_LEN + 1];
    msa_schema_t schema;
    uint64_t documents, chunks, tokens, bytes, created_seq;
} msa_engine_coll_info_t;

typedef struct msa_engine_create_collection_result {
    msa_engine_coll_info_t info; /* as created (defaults applied) */
} msa_engine_create_collection_result_t;

/* Creates a collection through the writer (one commit seq). schema: proto
 * defaults are applied to a copy, then validated.
 * Errors: MSA_EINVAL (name or schema, naming the field), MSA_EEXIST,
 * MSA_EFULL (store full). */
int msa_engine_create_collection(msa_engine_t *e, const char *name, const msa_schema_t *schema,
                                 msa_engine_create_collection_result_t **out, msa_status_t *st);
void msa_engine_create_collection_result_free(msa_engine_create_collection_result_t *r);

typedef struct msa_engine_drop_collection_result {
    uint64_t commit_seq; /* the seq of the drop */
} msa_engine_drop_collection_result_t;

/* Drops a collection and every document in it (one commit seq).
 * Errors: MSA_EINVAL (name), MSA_ENOTFOUND. */
int msa_engine_drop_collection(msa_engine_t *e, const char *name,
                               msa_engine_drop_collection_result_t **out, msa_status_t *st);
void msa_engine_drop_collection_result_free(msa_engine_drop_collection_result_t *r);

typedef struct msa_engine_describe_collection_result {
    msa_engine_coll_info_t info; /* at the latest snapshot */
} msa_engine_describe_collection_result_t;

/* Errors: MSA_EINVAL (name), MSA_ENOTFOUND. */
int msa_engine_describe_collection(msa_engine_t *e, const char *name,
                                   msa_engine_describe_collection_result_t **out, msa_status_t *st);
void msa_engine_describe_collection_result_free(msa_engine_describe_collection_result_t *r);

typedef struct msa_engine_list_collections_result {
    size_t n;                      /* entries of colls */
    msa_engine_coll_info_t *colls; /* in id order; owned by the result */
} msa_engine_list_collections_result_t;

int msa_engine_list_collections(msa_engine_t *e, msa_engine_list_collections_result_t **out,
                                msa_status_t *st);
void msa_engine_list_collections_result_free(msa_engine_list_collections_result_t *r);

/* ==== the write path ========================================================== */

/* A write is validated on the caller's thread against the collection's schema
 * and every tensor is prepared in its stored form (raw token rows pooled in
 * float32, rounding to the collection's dtype once). It is then queued to the
 * writer thread, which applies each queued request inside its own savepoint of
 * one LMDB write txn (a failing request is rolled back alone), commits the
 * group with one fsync, applies the rows to the index, publishes the commit
 * seq and answers. Every committed request gets its own commit seq. */

typedef struct msa_engine_layer_kv {
    uint32_t layer;        /* model layer index, one of schema.layers */
    msa_tensor_t k, v;     /* [C,H,D] pooled or [N,H,D] raw */
    msa_tensor_t router_k; /* same; data == NULL and ndim == 0 when absent */
} msa_engine_layer_kv_t;

typedef struct msa_engine_doc {
    uint64_t id; /* 1..2^63-1 */
    const char *text;
    size_t text_len;
    const void *metadata;
    size_t metadata_len;
    uint32_t tokens;
    bool raw; /* layers hold raw token rows, pooled by the engine */
    uint32_t n_layers;
    const msa_engine_layer_kv_t *layers;
} msa_engine_doc_t;

typedef enum { MSA_OP_PUT = 1, MSA_OP_DELETE = 2 } msa_engine_op_kind_t;

typedef struct msa_engine_write_op {
    msa_engine_op_kind_t kind; /* 0 (op not set) is INVALID_ARGUMENT */
    msa_engine_doc_t put;
    uint64_t delete_id;
    uint64_t expect_version;
    bool expect_absent;
} msa_engine_write_op_t;

typedef struct msa_engine_write_req {
    const char *collection;
    const char *model; /* NULL or "" = no check */
    size_t n_ops;
    const msa_engine_write_op_t *ops;
} msa_engine_write_req_t;

typedef struct msa_engine_write_result {
    uint64_t commit_seq;
    uint64_t *versions; /* n_versions (= n_ops) entries, owned by the result; 0 for deletes */
    size_t n_versions;
} msa_engine_write_result_t;

/* Validates, queues for group commit, waits until durable. Nothing is written
 * unless every op applies. Tensors are read in place (zero-copy) during the
 * call. Errors per docs/SEMANTICS.md (Write): MSA_EINVAL (naming the field;
 * also --max-write-ops, --max-text-bytes, --max-metadata-bytes),
 * MSA_ENOTFOUND (collection; delete of an absent document), MSA_EPRECOND
 * (model, expect_version), MSA_EEXIST (expect_absent), MSA_EFULL (store
 * full: the map is at its limit), MSA_ECORRUPT. */
int msa_engine_write(msa_engine_t *e, const msa_engine_write_req_t *req,
                     msa_engine_write_result_t **out, msa_status_t *st);
void msa_engine_write_result_free(msa_engine_write_result_t *r);

/* ==== the read path ============================================================ */

/* A read registers a snapshot (an LMDB read txn plus its commit seq S) with
 * the index, waits until the index has applied S (min_seq: up to
 * cfg.min_seq_wait_ms, then MSA_ETIMEOUT), routes over the rows visible at S
 * (created_seq <= S < deleted_seq), reads the selected documents' K/V from the
 * same txn and attends, so the versions routed to are the versions attended
 * over. Every read result carries its snapshot_seq. */

typedef struct msa_engine_layer_query {
    uint32_t layer;
    msa_tensor_t routing_q; /* [T,Hq,D] */
    msa_tensor_t q;         /* [T,Hq,D]; Attend only */
} msa_engine_layer_query_t;

/* What every Route/Attend request shares. */
typedef struct msa_engine_read_common {
    const char *collection;
    const char *model;     /* NULL or "" = no check */
    uint64_t min_seq;      /* wait until this seq is readable */
    int64_t deadline_ms;   /* CLOCK_MONOTONIC ms; 0 = none */
    uint64_t snapshot_seq; /* != 0: read this held snapshot (MSA_EPRECOND when not held) */
    uint32_t hold_ms;      /* != 0: hold the snapshot read this long after answering */
} msa_engine_read_common_t;

/* ---- Route ---- */

typedef struct msa_engine_route_req {
    msa_engine_read_common_t c;
    uint32_t n_layers;
    const msa_engine_layer_query_t *layers;
    uint32_t top_k; /* 0 = schema default */
    size_t n_exclude;
    const uint64_t *exclude_ids;
} msa_engine_route_req_t;

typedef struct msa_engine_layer_route {
    uint32_t layer;
    uint32_t n;
    uint64_t *doc_ids; /* best first */
    float *scores;
} msa_engine_layer_route_t;

typedef struct msa_engine_route_result {
    uint64_t snapshot_seq;
    uint32_t n_layers;
    msa_engine_layer_route_t *layers; /* request order; owned by the result */
} msa_engine_route_result_t;

/* Top-k documents per requested layer over the whole collection at one
 * snapshot. Errors: MSA_EINVAL (layers, shapes, top_k, limits, naming the
 * field), MSA_ENOTFOUND, MSA_EPRECOND (model; snapshot_seq not held),
 * MSA_ETIMEOUT (min_seq or deadline), MSA_EFULL (min_seq waiters, held
 * snapshots), MSA_ECORRUPT. */
int msa_engine_route(msa_engine_t *e, const msa_engine_route_req_t *req,
                     msa_engine_route_result_t **out, msa_status_t *st);
void msa_engine_route_result_free(msa_engine_route_result_t *r);

/* ---- Attend ---- */

typedef struct msa_engine_attend_req {
    msa_engine_read_common_t c;
    uint32_t n_layers;
    const msa_engine_layer_query_t *layers;
    uint32_t top_k;
    size_t n_exclude;
    const uint64_t *exclude_ids;
    size_t n_doc_ids; /* > 0: attend over exactly these, skip routing */
    const uint64_t *doc_ids;
    float scale;           /* 0 = 1/sqrt(D) */
    msa_dtype_t out_dtype; /* 0 = F32; F16 or BF16 */
} msa_engine_attend_req_t;

typedef struct msa_engine_layer_attention {
    uint32_t layer;
    uint32_t n;
    uint64_t *doc_ids;
    float *scores; /* NULL when doc_ids were given */
    uint32_t T, Hq, D;
    void *out; /* [T,Hq,D] in out_dtype */
    size_t out_bytes;
    float *lse; /* [T,Hq] */
} msa_engine_layer_attention_t;

typedef struct msa_engine_attend_result {
    uint64_t snapshot_seq;
    msa_dtype_t out_dtype;
    uint32_t n_layers;
    msa_engine_layer_attention_t *layers; /* request order; owned by the result */
} msa_engine_attend_result_t;

/* Routes (unless doc_ids are given), then attends over the selected
 * documents' pooled K/V read from the same snapshot; the output and its
 * log-sum-exp allow merging with local attention. Errors: as Route, and
 * MSA_ENOTFOUND for a doc_id not visible at the snapshot. */
int msa_engine_attend(msa_engine_t *e, const msa_engine_attend_req_t *req,
                      msa_engine_attend_result_t **out, msa_status_t *st);
void msa_engine_attend_result_free(msa_engine_attend_result_t *r);

/* ---- Get ---- */

typedef struct msa_engine_get_req {
    const char *collection;
    size_t n_ids;
    const uint64_t *ids;
    bool with_text, with_metadata, with_tensors;
    uint32_t n_layers; /* with_tensors: 0 = all */
    const uint32_t *layers;
    uint64_t min_seq;
    int64_t deadline_ms;
    uint64_t snapshot_seq; /* as msa_engine_read_common_t */
    uint32_t hold_ms;
    bool skip_router_keys; /* with_tensors: K and V only (router_k.data stays NULL) */
    /* Bytes of text, metadata and tensors the records may hold in all
     * (0 = no limit): past it MSA_EFULL before anything more is read, so a
     * small request cannot build a huge response. */
    uint64_t max_bytes;
} msa_engine_get_req_t;

/* Tensors of one layer of one record, zero-copy views into the snapshot. */
typedef struct msa_engine_get_layer {
    uint32_t layer;
    msa_tensor_t k, v, router_k; /* router_k.data NULL unless separate_router_keys */
} msa_engine_get_layer_t;

typedef struct msa_engine_get_record {
    msa_doc_rec_t info;
    msa_store_view_t text; /* len 0 unless with_text */
    msa_store_view_t metadata;
    uint32_t n_layers;
    msa_engine_get_layer_t *layers;
} msa_engine_get_record_t;

/* The result keeps its read snapshot open so that the views stay valid: free
 * it as soon as the answer is encoded (an open snapshot holds an LMDB reader
 * slot and keeps old pages from reuse). */
typedef struct msa_engine_get_result {
    uint64_t snapshot_seq;
    size_t n_records;
    msa_engine_get_record_t *records; /* request order */
    void *priv;                       /* the snapshot */
} msa_engine_get_result_t;

/* Documents by id, one record per requested id in request order (a repeated
 * id at each of its positions). Errors: MSA_EINVAL (ids, layers, --max-ids),
 * MSA_ENOTFOUND (collection, or an id not visible at the snapshot: the
 * message names ids[i]), MSA_EFULL (max_bytes), as Route for min_seq and held
 * snapshots, MSA_ECORRUPT. */
int msa_engine_get(msa_engine_t *e, const msa_engine_get_req_t *req, msa_engine_get_result_t **out,
                   msa_status_t *st);
void msa_engine_get_result_free(msa_engine_get_result_t *r);

/* ---- List ---- */

typedef struct msa_engine_list_req {
    const char *collection;
    uint64_t after_id;
    uint32_t limit;        /* 0 = 1000, at most 100000 */
    uint64_t snapshot_seq; /* as msa_engine_read_common_t */
    uint32_t hold_ms;
} msa_engine_list_req_t;

typedef struct msa_engine_list_result {
    uint64_t snapshot_seq;
    uint64_t next_after_id; /* 0: no more */
    uint32_t n;
    msa_doc_rec_t *docs; /* id order; owned by the result */
} msa_engine_list_result_t;

/* One page of document records in id order after after_id. Errors: MSA_EINVAL
 * (limit), MSA_ENOTFOUND, as Route for held snapshots. */
int msa_engine_list(msa_engine_t *e, const msa_engine_list_req_t *req,
                    msa_engine_list_result_t **out, msa_status_t *st);
void msa_engine_list_result_free(msa_engine_list_result_t *r);

/* ==== held snapshots ============================================================ */

/* Route, Attend, Get and List take snapshot_seq and hold_ms (hold_snapshot_ms):
 * hold_ms != 0 keeps the snapshot the call read open for hold_ms after it
 * answers (a lease; at most cfg.max_snapshot_hold_ms, else MSA_EINVAL; at
 * most cfg.max_held_snapshots held, else MSA_EFULL); snapshot_seq != 0 reads
 * that held snapshot (MSA_EPRECOND when it is not held; min_seq >
 * snapshot_seq is MSA_EINVAL), and with hold_ms renews its lease. Calls on
 * one held snapshot run one at a time. A map grow revokes every held
 * snapshot. See docs/SEMANTICS.md, "Held snapshots". */

typedef struct msa_engine_release_snapshot_result {
    bool released; /* false when no lease on the seq was held */
} msa_engine_release_snapshot_result_t;

/* Ends one lease on snapshot_seq before it expires. MSA_EINVAL for seq 0. */
int msa_engine_release_snapshot(msa_engine_t *e, uint64_t snapshot_seq,
                                msa_engine_release_snapshot_result_t **out, msa_status_t *st);
void msa_engine_release_snapshot_result_free(msa_engine_release_snapshot_result_t *r);

/* ==== admin: Stats, Backup, Verify =============================================== */

typedef struct msa_engine_stats_result {
    char backend[16];
    uint64_t commit_seq, store_bytes, collections, documents, chunks;
    uint64_t index_bytes; /* routing rows resident in host memory */
    uint64_t writes, write_groups, routes, attends, gets, lists;
    /* Held snapshots: held now; leases granted, renewed, released (by the
     * client), expired, revoked (by the server: map growth). */
    uint64_t snapshots_held, leases_granted, leases_renewed, leases_released, leases_expired,
        leases_revoked;
    /* CUDA backend only (n_gpu = 0 on the CPU backend). */
    unsigned n_gpu;
    msa_gpu_stats_t gpu;
    msa_gpu_device_stats_t gpu_dev[8];
} msa_engine_stats_result_t;

/* A picture of the engine's counters and sizes (counters are read one by one:
 * not an atomic cut). rpc/metrics.h lists how each becomes a Stats counter
 * and a /metrics family. */
int msa_engine_stats(msa_engine_t *e, msa_engine_stats_result_t **out, msa_status_t *st);
void msa_engine_stats_result_free(msa_engine_stats_result_t *r);

typedef struct msa_engine_backup_result {
    uint64_t seq;   /* the commit seq the copy holds */
    uint64_t bytes; /* bytes written */
} msa_engine_backup_result_t;

/* Copies the store at one snapshot into cfg.backup_dir/name (compact: LMDB's
 * compacting copy). name: a plain file name ('/' or ".." -> MSA_EINVAL).
 * Errors: MSA_EPRECOND when backups are off (no cfg.backup_dir), MSA_EINVAL
 * (name), MSA_EEXIST (a file of that name exists), MSA_EIO (a failed copy
 * is removed). */
int msa_engine_backup(msa_engine_t *e, const char *name, bool compact,
                      msa_engine_backup_result_t **out, msa_status_t *st);
void msa_engine_backup_result_free(msa_engine_backup_result_t *r);

typedef struct msa_engine_verify_result {
    uint64_t docs_checked;
    size_t n_problems;
    char **problems; /* n_problems messages; owned by the result */
} msa_engine_verify_result_t;

/* Checks every stored value (see msa_store_verify) and the index against the
 * store (rows per document), with writes paused. collection NULL or "" = all.
 * Problems found are results, not errors. Errors: MSA_ENOTFOUND (collection). */
int msa_engine_verify(msa_engine_t *e, const char *collection, msa_engine_verify_result_t **out,
                      msa_status_t *st);
void msa_engine_verify_result_free(msa_engine_verify_result_t *r);

#ifdef __cplusplus
}
#endif
#endif
