/* engine.h — the memory engine that msad runs: storage + routing index +
 * compute backend behind one object, with the write path (validate, group
 * commit, index apply, publish) and the read path (snapshot, route, read K/V,
 * attend). No network code: rpc/ maps protobuf onto these structs.
 *
 * Threads: every msa_srv_* call is safe from any number of threads at once.
 * Writes are queued to one internal writer thread; a call returns when its
 * request is durable (or has failed, having written nothing). Every error
 * comes back as an MSA_E* code plus a message in *st that names the field.
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

typedef enum { MSA_BACKEND_AUTO = 0, MSA_BACKEND_CPU = 1, MSA_BACKEND_CUDA = 2 } msa_backend_kind_t;

typedef struct msa_srv_config {
    const char *data_dir;         /* LMDB directory (created when missing) */
    msa_backend_kind_t backend;   /* auto: CUDA when a usable GPU exists, else CPU */
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
    uint32_t max_query_tokens;    /* T per layer of Route/Attend (0 = 65536) */
    uint32_t max_write_ops;       /* ops per WriteRequest (0 = 4096) */
    uint32_t max_text_bytes;      /* Document.text per document (0 = 16 MiB) */
    uint32_t max_metadata_bytes;  /* Document.metadata per document (0 = 1 MiB) */
    uint32_t max_ids;             /* GetRequest.ids, exclude_ids per request (0 = 100000) */
    /* Held snapshots (snapshot leases). */
    uint32_t max_held_snapshots;  /* held at once (0 = 256; at most half of max_readers) */
    uint32_t max_snapshot_hold_ms;/* hold_snapshot_ms limit (0 = 60000) */
    /* Integrity walk of data.mdb in a child process before anything is served
     * (msa_store_check_file): full (0, the default), quick or off. */
    msa_store_check_t check_on_start;
    /* CUDA backend (used when the backend is cuda, or auto with a GPU). */
    msa_gpu_config_t gpu;
} msa_srv_config_t;

/* ---- lifecycle ---------------------------------------------------------- */

/* Checks the data file (cfg.check_on_start), opens the store, rebuilds the
 * index from it (progress in the log), picks the backend, starts the writer.
 * Errors: as msa_store_check_file and msa_store_open (MSA_ECORRUPT for a
 * damaged file, also when a block the index needs fails its checksum),
 * MSA_EUNAVAIL when --backend cuda finds no usable GPU (cfg.gpu.dev.sim puts
 * the simulated test device of gpu/dev_sim.c in its place; msad sets it from
 * MSA_GPU_SIM=1, see msa_dev_config_env). */
int msa_srv_open(const msa_srv_config_t *cfg, msa_engine_t **out, msa_status_t *st);
/* Stops accepting new calls (they get MSA_EUNAVAIL), drains queued writes,
 * waits for calls in flight, then closes everything. NULL is a no-op. */
void msa_srv_close(msa_engine_t *e);
/* Makes later calls fail with MSA_EUNAVAIL ("shutting down") while queued
 * writes still commit; msa_srv_close finishes the job. */
void msa_srv_shutdown_begin(msa_engine_t *e);
/* "cpu" or "cuda". */
const char *msa_srv_backend_name(const msa_engine_t *e);
uint64_t msa_srv_commit_seq(const msa_engine_t *e);

/* ---- collections ---------------------------------------------------------- */

typedef struct msa_coll_info {
    char name[MSA_MAX_NAME_LEN + 1];
    msa_schema_t schema;
    uint64_t documents, chunks, tokens, bytes, created_seq;
} msa_coll_info_t;

/* schema: proto defaults are applied to a copy, then validated. */
int msa_srv_create_collection(msa_engine_t *e, const char *name, const msa_schema_t *schema,
                              msa_coll_info_t *out, msa_status_t *st);
int msa_srv_drop_collection(msa_engine_t *e, const char *name, uint64_t *commit_seq,
                            msa_status_t *st);
int msa_srv_describe_collection(msa_engine_t *e, const char *name, msa_coll_info_t *out,
                                msa_status_t *st);
/* *out is malloc'd (free()); *n entries in id order. */
int msa_srv_list_collections(msa_engine_t *e, msa_coll_info_t **out, size_t *n, msa_status_t *st);

/* ---- writes ----------------------------------------------------------------- */

typedef struct msa_layer_kv {
    uint32_t layer;          /* model layer index, one of schema.layers */
    msa_tensor_t k, v;       /* [C,H,D] pooled or [N,H,D] raw */
    msa_tensor_t router_k;   /* same; data == NULL and ndim == 0 when absent */
} msa_layer_kv_t;

typedef struct msa_doc {
    uint64_t id;
    const char *text;
    size_t text_len;
    const void *metadata;
    size_t metadata_len;
    uint32_t tokens;
    bool raw;
    uint32_t n_layers;
    const msa_layer_kv_t *layers;
} msa_doc_t;

typedef enum { MSA_OP_PUT = 1, MSA_OP_DELETE = 2 } msa_op_kind_t;

typedef struct msa_write_op {
    msa_op_kind_t kind;      /* 0 (op not set) is INVALID_ARGUMENT */
    msa_doc_t put;
    uint64_t delete_id;
    uint64_t expect_version;
    bool expect_absent;
} msa_write_op_t;

typedef struct msa_write_req {
    const char *collection;
    const char *model;       /* NULL or "" = no check */
    size_t n_ops;
    const msa_write_op_t *ops;
} msa_write_req_t;

typedef struct msa_write_result {
    uint64_t commit_seq;
    uint64_t *versions;      /* n_ops entries, malloc'd (free()); 0 for deletes */
    size_t n_versions;
} msa_write_result_t;

/* Validates, queues for group commit, waits until durable. Nothing is written
 * unless every op applies. Errors per SEMANTICS table. */
int msa_srv_write(msa_engine_t *e, const msa_write_req_t *req, msa_write_result_t *out,
                  msa_status_t *st);

/* ---- reads ------------------------------------------------------------------- */

typedef struct msa_layer_query {
    uint32_t layer;
    msa_tensor_t routing_q;  /* [T,Hq,D] */
    msa_tensor_t q;          /* [T,Hq,D]; Attend only */
} msa_layer_query_t;

typedef struct msa_read_common {
    const char *collection;
    const char *model;
    uint64_t min_seq;
    int64_t deadline_ms;     /* CLOCK_MONOTONIC ms; 0 = none */
    uint64_t snapshot_seq;   /* != 0: read this held snapshot (MSA_EPRECOND when not held) */
    uint32_t hold_ms;        /* != 0: hold the snapshot read this long after answering */
} msa_read_common_t;

typedef struct msa_route_req {
    msa_read_common_t c;
    uint32_t n_layers;
    const msa_layer_query_t *layers;
    uint32_t top_k;          /* 0 = schema default */
    size_t n_exclude;
    const uint64_t *exclude_ids;
} msa_route_req_t;

typedef struct msa_layer_route {
    uint32_t layer;
    uint32_t n;
    uint64_t *doc_ids;       /* best first */
    float *scores;
} msa_layer_route_t;

typedef struct msa_route_result {
    uint64_t snapshot_seq;
    uint32_t n_layers;
    msa_layer_route_t *layers;
} msa_route_result_t;

int msa_srv_route(msa_engine_t *e, const msa_route_req_t *req, msa_route_result_t **out,
                  msa_status_t *st);
void msa_srv_route_result_free(msa_route_result_t *r);

typedef struct msa_attend_req {
    msa_read_common_t c;
    uint32_t n_layers;
    const msa_layer_query_t *layers;
    uint32_t top_k;
    size_t n_exclude;
    const uint64_t *exclude_ids;
    size_t n_doc_ids;        /* > 0: attend over exactly these, skip routing */
    const uint64_t *doc_ids;
    float scale;             /* 0 = 1/sqrt(D) */
    msa_dtype_t out_dtype;   /* 0 = F32; F16 or BF16 */
} msa_attend_req_t;

typedef struct msa_layer_attention {
    uint32_t layer;
    uint32_t n;
    uint64_t *doc_ids;
    float *scores;           /* NULL when doc_ids were given */
    uint32_t T, Hq, D;
    void *out;               /* [T,Hq,D] in out_dtype */
    size_t out_bytes;
    float *lse;              /* [T,Hq] */
} msa_layer_attention_t;

typedef struct msa_attend_result {
    uint64_t snapshot_seq;
    msa_dtype_t out_dtype;
    uint32_t n_layers;
    msa_layer_attention_t *layers;
} msa_attend_result_t;

int msa_srv_attend(msa_engine_t *e, const msa_attend_req_t *req, msa_attend_result_t **out,
                   msa_status_t *st);
void msa_srv_attend_result_free(msa_attend_result_t *r);

typedef struct msa_get_req {
    const char *collection;
    size_t n_ids;
    const uint64_t *ids;
    bool with_text, with_metadata, with_tensors;
    uint32_t n_layers;       /* with_tensors: 0 = all */
    const uint32_t *layers;
    uint64_t min_seq;
    int64_t deadline_ms;
    uint64_t snapshot_seq;   /* as msa_read_common_t */
    uint32_t hold_ms;
    /* Bytes of text, metadata and tensors the records may hold in all
     * (0 = no limit): past it MSA_EFULL before anything more is read, so a
     * small request cannot build a huge response. */
    uint64_t max_bytes;
} msa_get_req_t;

/* Tensors of one layer of one record, zero-copy views into the snapshot. */
typedef struct msa_get_layer {
    uint32_t layer;
    msa_tensor_t k, v, router_k;   /* router_k.data NULL unless separate_router_keys */
} msa_get_layer_t;

typedef struct msa_get_record {
    msa_doc_rec_t info;
    msa_store_view_t text;         /* len 0 unless with_text */
    msa_store_view_t metadata;
    uint32_t n_layers;
    msa_get_layer_t *layers;
} msa_get_record_t;

/* The result keeps its read snapshot open so the views stay valid: free it
 * before the request ends. */
typedef struct msa_get_result {
    uint64_t snapshot_seq;
    size_t n_records;
    msa_get_record_t *records;     /* request order */
    void *priv;                    /* the snapshot */
} msa_get_result_t;

int msa_srv_get(msa_engine_t *e, const msa_get_req_t *req, msa_get_result_t **out,
                msa_status_t *st);
void msa_srv_get_result_free(msa_get_result_t *r);

typedef struct msa_list_req {
    const char *collection;
    uint64_t after_id;
    uint32_t limit;          /* 0 = 1000, at most 100000 */
    uint64_t snapshot_seq;   /* as msa_read_common_t */
    uint32_t hold_ms;
} msa_list_req_t;

typedef struct msa_list_result {
    uint64_t snapshot_seq;
    uint64_t next_after_id;
    uint32_t n;
    msa_doc_rec_t *docs;     /* malloc'd */
} msa_list_result_t;

int msa_srv_list(msa_engine_t *e, const msa_list_req_t *req, msa_list_result_t *out,
                 msa_status_t *st);
void msa_srv_list_result_free(msa_list_result_t *r);

/* ---- admin / stats ------------------------------------------------------------ */

typedef struct msa_srv_stats {
    char backend[16];
    uint64_t commit_seq, store_bytes, collections, documents, chunks;
    uint64_t index_bytes;    /* routing rows resident in host memory */
    uint64_t writes, write_groups, routes, attends, gets, lists;
    /* Held snapshots: held now; leases granted, renewed, released (by the
     * client), expired, revoked (by the server: map growth). */
    uint64_t snapshots_held, leases_granted, leases_renewed, leases_released, leases_expired,
        leases_revoked;
    /* CUDA backend only (n_gpu = 0 on the CPU backend). */
    unsigned n_gpu;
    msa_gpu_stats_t gpu;
    msa_gpu_device_stats_t gpu_dev[8];
} msa_srv_stats_t;

int msa_srv_stats(msa_engine_t *e, msa_srv_stats_t *out, msa_status_t *st);

/* ---- held snapshots ------------------------------------------------------------ */

/* Route, Attend, Get and List take snapshot_seq and hold_ms (hold_snapshot_ms):
 * hold_ms != 0 keeps the snapshot the call read open for hold_ms after it
 * answers (a lease; at most cfg.max_snapshot_hold_ms, else MSA_EINVAL; at
 * most cfg.max_held_snapshots held, else MSA_EFULL); snapshot_seq != 0 reads
 * that held snapshot (MSA_EPRECOND when it is not held; min_seq >
 * snapshot_seq is MSA_EINVAL), and with hold_ms renews its lease. Calls on
 * one held snapshot run one at a time. A map grow revokes every held
 * snapshot. See docs/SEMANTICS.md, "Held snapshots". */

/* Ends one lease on snapshot_seq before it expires; *released = false when
 * none is held. MSA_EINVAL for seq 0. */
int msa_srv_release_snapshot(msa_engine_t *e, uint64_t snapshot_seq, bool *released,
                             msa_status_t *st);

/* name: a plain file name inside cfg.backup_dir ('/' or ".." -> MSA_EINVAL). */
int msa_srv_backup(msa_engine_t *e, const char *name, bool compact, uint64_t *seq,
                   uint64_t *bytes, msa_status_t *st);
/* collection NULL or "" = all. *problems: see msa_store_verify; also checks the
 * index against the store (rows per document). */
int msa_srv_verify(msa_engine_t *e, const char *collection, uint64_t *docs_checked,
                   char ***problems, size_t *n_problems, msa_status_t *st);

#ifdef __cplusplus
}
#endif
#endif
