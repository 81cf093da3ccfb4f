/* methods.h — the RPC methods of msad: one table row per method (path, scope,
 * handler), and the handlers that decode a request with protobuf-c, convert
 * it to the engine's structs (daemon/engine.h), call the engine and encode
 * the answer.
 *
 * Handlers run on any thread, many at once; each gets its own arena and owns
 * nothing beyond its call. Tensors are passed to the engine zero-copy: the
 * engine's msa_tensor_t views point into the unpacked request, and response
 * tensors point into the engine's results until the response is packed.
 */
#ifndef MSA_RPC_METHODS_H
#define MSA_RPC_METHODS_H

#include "arena.h"
#include "auth.h"
#include "engine.h"
#include "metrics.h"
#include "msa_err.h"

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* What every handler may read; owned by the server, read-only while serving. */
typedef struct msa_rpc_ctx {
    msa_engine_t *engine;
    const msa_rpc_metrics_t *metrics;
    size_t max_send;            /* response bytes at most (--max-message-mb) */
    const atomic_int *stopping; /* non-zero once shutdown began */
} msa_rpc_ctx_t;

/* One request as the handler sees it. */
typedef struct msa_rpc_req {
    const uint8_t *data; /* serialized request message */
    size_t len;
    int64_t deadline_ms;    /* CLOCK_MONOTONIC ms; 0 = none */
    msa_rpc_arena_t *arena; /* lives until the call is answered */
} msa_rpc_req_t;

/* The packed response: malloc'd, handed to gRPC without a copy. */
typedef struct msa_rpc_reply {
    uint8_t *data;
    size_t len;
} msa_rpc_reply_t;

/* Returns MSA_OK with *rep filled, or an MSA_E* code with st's message (and
 * rep empty). */
typedef int (*msa_rpc_handler_fn)(const msa_rpc_ctx_t *ctx, const msa_rpc_req_t *req,
                                  msa_rpc_reply_t *rep, msa_status_t *st);

typedef struct msa_rpc_method {
    const char *path;      /* "/msa.v1.Memory/Write" */
    const char *name;      /* "Write" (metrics, counters, logs) */
    msa_rpc_scope_t scope; /* token scope needed */
    bool on_poller;        /* cheap and never blocking: answered on the CQ thread */
    msa_rpc_handler_fn fn;
} msa_rpc_method_t;

extern const msa_rpc_method_t msa__rpc_methods[];
extern const size_t msa__rpc_n_methods;
extern const char *const msa__rpc_method_names[]; /* same order as msa__rpc_methods */

/* CLOCK_MONOTONIC in milliseconds (the engine's deadline clock). */
int64_t msa__rpc_now_ms(void);

#ifdef __cplusplus
}
#endif
#endif
