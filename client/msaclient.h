/* msaclient.h — libmsaclient: the C client of msad (services msa.v1.Memory and msa.v1.Admin).
 *
 * Owns one gRPC channel per connection object (msa_cli_t). Every call is blocking and
 * thread-safe: any number of threads may issue calls on one msa_cli_t at once (each call
 * has its own completion queue). The wire contract is memory.proto + SEMANTICS.md; this
 * header is the manual of the C side.
 *
 * Layers:
 *   1. Connection: msa_cli_connect / msa_cli_close, options for address, deadline, bearer
 *      token, TLS roots and message limits.
 *   2. Low-level RPCs: one function per method, taking a protobuf-c request struct (from
 *      "memory.pb-c.h", generated from rpc/memory.proto) and returning a newly allocated
 *      protobuf-c response that the caller frees with msa_cli_free().
 *   3. Convenience: tensors from float arrays (F32 -> F16/BF16, round to nearest even),
 *      an owned document builder, simple wrappers (create/drop/delete/...), and a batch
 *      writer that splits large writes into requests under the message limit.
 *
 * Errors. Every function that can fail returns MSA_OK (0) or a negative MSA_E* code from
 * msa_err.h and, when `st` is not NULL, fills *st with that code, the gRPC status code
 * (GRPC_STATUS_*, e.g. 3 = INVALID_ARGUMENT; msa_cli_grpc_name() spells it) and the
 * server's message. Failures detected on the client (bad arguments, unreadable files)
 * report INVALID_ARGUMENT / MSA_EINVAL, allocation failures RESOURCE_EXHAUSTED /
 * MSA_ENOMEM, a server that cannot be reached UNAVAILABLE / MSA_EUNAVAIL. On failure no
 * output pointer is set (outputs are NULL / left unchanged).
 *
 * Mapping of gRPC codes to MSA codes: INVALID_ARGUMENT, OUT_OF_RANGE -> EINVAL;
 * NOT_FOUND -> ENOTFOUND; ALREADY_EXISTS -> EEXIST; FAILED_PRECONDITION, ABORTED ->
 * EPRECOND; RESOURCE_EXHAUSTED -> EFULL; UNAUTHENTICATED -> EUNAUTH; PERMISSION_DENIED ->
 * EPERM; UNAVAILABLE, CANCELLED -> EUNAVAIL; DEADLINE_EXCEEDED -> ETIMEOUT; DATA_LOSS ->
 * ECORRUPT; everything else -> EINTERNAL.
 *
 * Deadlines. Every RPC takes `timeout_ms`: > 0 is this call's deadline in milliseconds,
 * 0 uses the connection's default (msa_cli_set_timeout), < 0 means no deadline.
 */
#ifndef MSA_CLIENT_H
#define MSA_CLIENT_H

#include "memory.pb-c.h"
#include "msa_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MSA_CLI_DEFAULT_ADDR "127.0.0.1:7420"
#define MSA_CLI_DEFAULT_TIMEOUT_MS 30000
#define MSA_CLI_DEFAULT_MAX_MESSAGE (256u << 20) /* bytes; the daemon's default limit */

/* ======================================================================================
 * Status
 * ==================================================================================== */

typedef struct msa_cli_status {
    int code;                     /* MSA_OK or a negative MSA_E* code (msa_err.h) */
    int grpc_code;                /* gRPC status code: 0 OK ... 16 UNAUTHENTICATED */
    char msg[MSA_STATUS_MSG_MAX]; /* the server's message, or the client's; "" when OK */
} msa_cli_status_t;

/* "OK", "CANCELLED", ..., "UNAUTHENTICATED"; "UNKNOWN" for codes out of range. */
const char *msa_cli_grpc_name(int grpc_code);
/* The MSA_E* code a gRPC status code maps to (see the table above). */
int msa_cli_err_from_grpc(int grpc_code);

/* ======================================================================================
 * Connection
 * ==================================================================================== */

typedef struct msa_cli msa_cli_t;

typedef struct msa_cli_options {
    const char *addr;        /* "host:port", "unix:/path" or any gRPC target; NULL = default */
    const char *token;       /* bearer token sent as "authorization: Bearer <token>"; NULL = none */
    const char *token_file;  /* used when token is NULL: first line of this file, trimmed */
    const char *tls_ca_file; /* PEM root certificates; non-NULL turns TLS on */
    bool tls;                /* TLS with the system roots even without tls_ca_file */
    const char *tls_server_name; /* overrides the name checked in the server's certificate */
    int64_t timeout_ms;          /* default deadline per call; 0 = 30 s; < 0 = none */
    size_t max_message_bytes;    /* largest message sent or received; 0 = 256 MiB */
} msa_cli_options_t;

/* Fills *opt with the defaults (all zero / NULL). */
void msa_cli_options_init(msa_cli_options_t *opt);

/* Creates a connection object. The channel connects lazily: an unreachable server shows
 * up as UNAVAILABLE on the first call, not here. opt may be NULL (all defaults); its
 * strings are copied. Errors: MSA_EINVAL (unreadable token/CA file, empty token),
 * MSA_ENOMEM. On success *out owns the channel until msa_cli_close(). */
int msa_cli_connect(const msa_cli_options_t *opt, msa_cli_t **out, msa_cli_status_t *st);

/* Closes the channel and frees c. No call may be in flight. NULL is a no-op. */
void msa_cli_close(msa_cli_t *c);

/* Sets the default deadline for later calls (same meaning as timeout_ms in the options). */
void msa_cli_set_timeout(msa_cli_t *c, int64_t timeout_ms);
int64_t msa_cli_timeout(const msa_cli_t *c);
/* The largest message this connection sends or accepts (bytes). */
size_t msa_cli_max_message(const msa_cli_t *c);
/* The target string the channel was made for. */
const char *msa_cli_addr(const msa_cli_t *c);

/* Frees any response returned by this library (a ProtobufCMessage). NULL is a no-op. */
void msa_cli_free(void *msg);

/* ======================================================================================
 * Low-level RPCs: request in (borrowed, not modified), *out = new response (caller frees
 * with msa_cli_free). Errors: whatever the server answers (see SEMANTICS.md's table),
 * plus UNAVAILABLE when it cannot be reached and DEADLINE_EXCEEDED when the deadline
 * passes.
 * ==================================================================================== */

int msa_cli_create_collection(msa_cli_t *c, const Msa__V1__CreateCollectionRequest *req,
                              Msa__V1__CollectionInfo **out, int64_t timeout_ms,
                              msa_cli_status_t *st);
int msa_cli_drop_collection(msa_cli_t *c, const Msa__V1__DropCollectionRequest *req,
                            Msa__V1__DropCollectionResponse **out, int64_t timeout_ms,
                            msa_cli_status_t *st);
int msa_cli_list_collections(msa_cli_t *c, const Msa__V1__ListCollectionsRequest *req,
                             Msa__V1__ListCollectionsResponse **out, int64_t timeout_ms,
                             msa_cli_status_t *st);
int msa_cli_describe_collection(msa_cli_t *c, const Msa__V1__DescribeCollectionRequest *req,
                                Msa__V1__CollectionInfo **out, int64_t timeout_ms,
                                msa_cli_status_t *st);
int msa_cli_write(msa_cli_t *c, const Msa__V1__WriteRequest *req, Msa__V1__WriteResponse **out,
                  int64_t timeout_ms, msa_cli_status_t *st);
int msa_cli_get(msa_cli_t *c, const Msa__V1__GetRequest *req, Msa__V1__GetResponse **out,
                int64_t timeout_ms, msa_cli_status_t *st);
int msa_cli_list(msa_cli_t *c, const Msa__V1__ListRequest *req, Msa__V1__ListResponse **out,
                 int64_t timeout_ms, msa_cli_status_t *st);
int msa_cli_route(msa_cli_t *c, const Msa__V1__RouteRequest *req, Msa__V1__RouteResponse **out,
                  int64_t timeout_ms, msa_cli_status_t *st);
int msa_cli_attend(msa_cli_t *c, const Msa__V1__AttendRequest *req, Msa__V1__AttendResponse **out,
                   int64_t timeout_ms, msa_cli_status_t *st);
int msa_cli_stats(msa_cli_t *c, const Msa__V1__StatsRequest *req, Msa__V1__StatsResponse **out,
                  int64_t timeout_ms, msa_cli_status_t *st);
int msa_cli_backup(msa_cli_t *c, const Msa__V1__BackupRequest *req, Msa__V1__BackupResponse **out,
                   int64_t timeout_ms, msa_cli_status_t *st);
int msa_cli_verify(msa_cli_t *c, const Msa__V1__VerifyRequest *req, Msa__V1__VerifyResponse **out,
                   int64_t timeout_ms, msa_cli_status_t *st);
/* Held snapshots: set hold_snapshot_ms on a Route/Attend/Get/List request to keep the
 * snapshot it read (the response's snapshot_seq), snapshot_seq on later ones to read it;
 * this ends the lease early (released = false when none was held). */
int msa_cli_release_snapshot(msa_cli_t *c, const Msa__V1__ReleaseSnapshotRequest *req,
                             Msa__V1__ReleaseSnapshotResponse **out, int64_t timeout_ms,
                             msa_cli_status_t *st);

/* The standard grpc.health.v1.Health/Check for `service` ("" = the whole server).
 * *serving = true when the answer is SERVING. */
int msa_cli_health(msa_cli_t *c, const char *service, bool *serving, int64_t timeout_ms,
                   msa_cli_status_t *st);

/* Any unary method by full name ("/msa.v1.Memory/Stats"), for methods rpc/ adds later.
 * resp_desc is the descriptor of the response type. */
int msa_cli_call(msa_cli_t *c, const char *method, const ProtobufCMessage *req,
                 const ProtobufCMessageDescriptor *resp_desc, ProtobufCMessage **out,
                 int64_t timeout_ms, msa_cli_status_t *st);

/* ======================================================================================
 * Tensors
 * ==================================================================================== */

/* Rounding of float32 to F16/BF16: round to nearest even; NaN stays NaN; F16 overflow
 * becomes +-Inf (the server then rejects it as non-finite). */
uint16_t msa_cli_f32_to_bf16(float x);
float msa_cli_bf16_to_f32(uint16_t h);
uint16_t msa_cli_f32_to_f16(float x);
float msa_cli_f16_to_f32(uint16_t h);
/* Bytes per element of a wire dtype (F32 4, F16 2, BF16 2, I8 1), 0 for others. */
size_t msa_cli_dtype_size(Msa__V1__DType dt);

/* Fills *t (any state; previous contents are NOT freed) with a new tensor of dtype dt
 * (F32, F16 or BF16) and shape[0..ndim), converting n = prod(shape) floats from src.
 * t->shape and t->data.data are malloc'ed: release with msa_cli_tensor_clear().
 * Errors: MSA_EINVAL (dtype, ndim 0 or > 8), MSA_ENOMEM. */
int msa_cli_tensor_from_f32(Msa__V1__Tensor *t, Msa__V1__DType dt, const uint32_t *shape,
                            size_t ndim, const float *src, msa_cli_status_t *st);
/* Same from raw element bytes already in dtype dt (copied as they are). */
int msa_cli_tensor_from_raw(Msa__V1__Tensor *t, Msa__V1__DType dt, const uint32_t *shape,
                            size_t ndim, const void *data, size_t nbytes, msa_cli_status_t *st);
/* Frees what msa_cli_tensor_from_* allocated and resets *t to an empty tensor. */
void msa_cli_tensor_clear(Msa__V1__Tensor *t);
/* prod(shape), 0 for a tensor without shape. */
size_t msa_cli_tensor_numel(const Msa__V1__Tensor *t);
/* Converts t (F32, F16 or BF16, byte length checked) to prod(shape) floats at dst.
 * Errors: MSA_EINVAL (dtype, data length != numel * size). */
int msa_cli_tensor_to_f32(const Msa__V1__Tensor *t, float *dst, msa_cli_status_t *st);
/* Same into a new malloc'ed array (*out, caller frees with free()); *n = element count. */
int msa_cli_tensor_to_f32_alloc(const Msa__V1__Tensor *t, float **out, size_t *n,
                                msa_cli_status_t *st);

/* Parses "f32" / "F32" / "float32", "f16" / "float16", "bf16" / "bfloat16", "i8".
 * Returns DTYPE_UNSPECIFIED for anything else. */
Msa__V1__DType msa_cli_dtype_parse(const char *s);
/* "F32", "F16", "BF16", "I8" or "DTYPE_UNSPECIFIED". */
const char *msa_cli_dtype_name(Msa__V1__DType dt);

/* ======================================================================================
 * Documents (owned builder)
 * ==================================================================================== */

/* An owned Msa__V1__Document under construction: every string, byte array and tensor
 * inside is malloc'ed by the builder and freed by msa_cli_doc_free(). */
typedef struct msa_cli_doc msa_cli_doc_t;

/* New document with id (1..2^63-1), token count and raw flag (see memory.proto). */
int msa_cli_doc_new(uint64_t id, uint32_t tokens, bool raw, msa_cli_doc_t **out,
                    msa_cli_status_t *st);
void msa_cli_doc_free(msa_cli_doc_t *d);
/* Copies text (len bytes, or strlen when len == (size_t)-1) / metadata. */
int msa_cli_doc_set_text(msa_cli_doc_t *d, const char *text, size_t len, msa_cli_status_t *st);
int msa_cli_doc_set_metadata(msa_cli_doc_t *d, const void *meta, size_t len, msa_cli_status_t *st);
/* Adds one layer: k, v (and router_k when not NULL) are float32 [rows, H, D] (rows = C
 * pooled chunks, or N tokens when raw), converted to dt. Errors: MSA_EINVAL, MSA_ENOMEM. */
int msa_cli_doc_add_layer_f32(msa_cli_doc_t *d, uint32_t layer, Msa__V1__DType dt, uint32_t rows,
                              uint32_t H, uint32_t D, const float *k, const float *v,
                              const float *router_k, msa_cli_status_t *st);
/* Adds one layer from tensors the builder takes over: *k, *v, *router_k (router_k may be
 * NULL or empty) must come from msa_cli_tensor_from_*; on success and on failure they are
 * owned by the builder / freed, and reset to empty. */
int msa_cli_doc_add_layer(msa_cli_doc_t *d, uint32_t layer, Msa__V1__Tensor *k, Msa__V1__Tensor *v,
                          Msa__V1__Tensor *router_k, msa_cli_status_t *st);
/* The protobuf-c view of the document (owned by d; valid until msa_cli_doc_free). */
Msa__V1__Document *msa_cli_doc_msg(msa_cli_doc_t *d);

/* ======================================================================================
 * Convenience calls (each one RPC; outputs may be NULL when not wanted)
 * ==================================================================================== */

/* Fills *s with the contract's defaults: BF16 storage and routing, COSINE, HEAD_MEAN,
 * QUERY_MAX, CHUNK_MAX, P = 64; layers/heads/dim left 0 for the caller. */
void msa_cli_schema_init(Msa__V1__CollectionSchema *s);

int msa_cli_collection_create(msa_cli_t *c, const char *name,
                              const Msa__V1__CollectionSchema *schema,
                              Msa__V1__CollectionInfo **info, msa_cli_status_t *st);
int msa_cli_collection_drop(msa_cli_t *c, const char *name, uint64_t *commit_seq,
                            msa_cli_status_t *st);
int msa_cli_collection_describe(msa_cli_t *c, const char *name, Msa__V1__CollectionInfo **info,
                                msa_cli_status_t *st);
/* One Write with one put op. expect_version 0 = unconditional. *version = version written. */
int msa_cli_put(msa_cli_t *c, const char *collection, const msa_cli_doc_t *doc,
                uint64_t expect_version, bool expect_absent, uint64_t *commit_seq,
                uint64_t *version, msa_cli_status_t *st);
/* One Write deleting ids[0..n) atomically. */
int msa_cli_delete(msa_cli_t *c, const char *collection, const uint64_t *ids, size_t n,
                   uint64_t *commit_seq, msa_cli_status_t *st);

/* ======================================================================================
 * Batch writer
 *
 * Collects put/delete ops and sends them as Write requests, each packed under the batch
 * limit. ATOMICITY HOLDS PER BATCH ONLY: each request commits all of its ops or none,
 * but a failure in batch k leaves batches 0..k-1 committed. A single op larger than the
 * limit is sent alone (the server then answers RESOURCE_EXHAUSTED if it exceeds its own
 * limit). After a failed flush the writer keeps the failed batch's ops dropped, reports
 * the error, and refuses further ops (returns the first error again).
 * ==================================================================================== */

typedef struct msa_cli_writer msa_cli_writer_t;

/* Called after every committed batch: ops [first_op, first_op + n_ops) of the writer's
 * lifetime, with the server's response (borrowed for the call). */
typedef void (*msa_cli_commit_cb)(void *ud, const Msa__V1__WriteResponse *resp, uint64_t first_op,
                                  size_t n_ops);

typedef struct msa_cli_writer_options {
    const char *model;      /* WriteRequest.model; NULL = "" */
    size_t max_batch_bytes; /* packed request limit; 0 = connection limit - 64 KiB */
    size_t max_batch_ops;   /* 0 = unlimited */
    int64_t timeout_ms;     /* per batch; 0 = connection default */
    msa_cli_commit_cb on_commit;
    void *ud;
} msa_cli_writer_options_t;

/* opt may be NULL (defaults). The collection name is copied. */
int msa_cli_writer_open(msa_cli_t *c, const char *collection, const msa_cli_writer_options_t *opt,
                        msa_cli_writer_t **out, msa_cli_status_t *st);
/* Queues a put and takes ownership of *doc (also on failure; *doc is set to NULL). May
 * send the batch before it when adding doc would pass the limit. */
int msa_cli_writer_put(msa_cli_writer_t *w, msa_cli_doc_t **doc, uint64_t expect_version,
                       bool expect_absent, msa_cli_status_t *st);
int msa_cli_writer_delete(msa_cli_writer_t *w, uint64_t id, uint64_t expect_version,
                          msa_cli_status_t *st);
/* Sends the queued ops (if any) as one request. */
int msa_cli_writer_flush(msa_cli_writer_t *w, msa_cli_status_t *st);
/* Counters since open: requests committed, ops committed, bytes sent, last commit_seq. */
void msa_cli_writer_counts(const msa_cli_writer_t *w, uint64_t *batches, uint64_t *ops,
                           uint64_t *bytes, uint64_t *last_commit_seq);
/* Flushes, then frees w (also when the flush fails: queued ops are then lost; the
 * error is returned). NULL is a no-op returning MSA_OK. */
int msa_cli_writer_close(msa_cli_writer_t *w, msa_cli_status_t *st);

#ifdef __cplusplus
}
#endif
#endif
