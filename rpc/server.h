/* server.h — msad's gRPC face: a server on the gRPC core C API that serves
 * msa.v1.Memory, msa.v1.Admin and grpc.health.v1.Health/Check over an engine.
 *
 * Threads. N completion-queue threads ("pollers", default one per core), each
 * with its own completion queue and its own requested calls for every method.
 * A poller never runs engine work: when a call arrives (metadata only) it
 * checks shutdown and the token, then receives the payload (so a refused
 * caller's body is never buffered), then hands the call to a pool of handler threads
 * (default 4 per poller, at least 16) through a bounded queue (full ->
 * RESOURCE_EXHAUSTED "too many concurrent requests"). A handler decodes,
 * calls the engine (which may block: Write waits for its group commit's
 * fsync, reads may wait for min_seq), encodes and starts the reply batch; the
 * batch completes on the call's poller, which records metrics and frees the
 * call. So a slow fsync or min_seq wait occupies one handler thread, never a
 * poller, and the other handlers keep serving (min_seq waiters are capped by
 * the engine, so waits never take every handler).
 *
 * Connections: at most max_connections (connlimit.h), idle ones closed after
 * idle_timeout_ms, unfinished setups after handshake_timeout_ms; bytes
 * received on all connections are bounded by a gRPC resource quota of
 * max_queue_bytes + max_message. Health checks are answered on
 * the poller itself, so probes work even when every handler is busy.
 *
 * Lifecycle: _start (listening, threads running) -> _shutdown -> _destroy.
 * Shutdown has two phases. Lame duck: new calls get UNAVAILABLE ("msad is
 * shutting down"), health answers NOT_SERVING, calls already accepted run to
 * completion (at least 100 ms, at most the grace period). Then
 * grpc_server_shutdown_and_notify stops accepting, idle connections are
 * closed, threads are joined. Calls still running after the grace period are
 * cancelled.
 */
#ifndef MSA_RPC_SERVER_H
#define MSA_RPC_SERVER_H

#include "auth.h"
#include "engine.h"
#include "metrics.h"
#include "msa_err.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct msa_rpc_server msa_rpc_server_t;

typedef struct msa_rpc_server_opts {
    const char *const *listen; /* "HOST:PORT" or "unix:/path"; port 0 picks a free one */
    size_t n_listen;
    unsigned pollers;           /* completion-queue threads (0 = online CPUs) */
    unsigned handlers;          /* handler threads (0 = max(16, 4 * pollers)) */
    unsigned max_queue;         /* calls waiting for a handler at most (0 = 4096) */
    uint64_t max_queue_bytes;   /* their request bytes at most (0 = 1 GiB) */
    size_t max_message;         /* bytes, both directions (0 = 256 MiB; at most 2 GiB - 1) */
    const msa_rpc_auth_t *auth; /* NULL: no tokens required; borrowed for the server's life */
    const char *tls_cert_pem;   /* PEM contents; NULL: plaintext */
    const char *tls_key_pem;
    const char *tls_client_ca_pem; /* non-NULL: clients must present a certificate it signed */
    unsigned max_connections;      /* client connections at once; past it refused (0 = 1024,
                                      never more than the fd limit allows) */
    unsigned idle_timeout_ms;      /* close a connection without calls after this (0 = 300 s) */
    unsigned handshake_timeout_ms; /* close a connection not through TLS + HTTP/2 setup after
                                      this (0 = 10 s) */
} msa_rpc_server_opts_t;

/* Maps an MSA_E* code to its gRPC status code: the one place where this
 * happens (SEMANTICS "Validation and errors"). */
int msa_rpc_grpc_status(int msa_code);

/* Creates the server, binds every listen address and starts the threads.
 * Bound addresses (with the real port when 0 was asked) are available from
 * msa_rpc_server_bound. Errors: MSA_EIO (cannot bind: st names the address),
 * MSA_EINVAL (bad option), MSA_ENOMEM. The engine is borrowed and must
 * outlive the server. */
int msa_rpc_server_start(msa_engine_t *e, const msa_rpc_server_opts_t *o, msa_rpc_server_t **out,
                         msa_status_t *st);

/* The i-th bound address as printed in the "listening on" line, or NULL. */
const char *msa_rpc_server_bound(const msa_rpc_server_t *s, size_t i);

const msa_rpc_metrics_t *msa_rpc_server_metrics(const msa_rpc_server_t *s);

/* The connection cap in force (after the fd-limit clamp). */
unsigned msa_rpc_server_max_connections(const msa_rpc_server_t *s);

/* Liveness, for /healthz: opens a fresh connection to the first listen
 * address and waits up to timeout_ms for the accept loop to take it (any
 * accept counts, a refusal past the cap too). Returns MSA_OK, or
 * MSA_EUNAVAIL with why in msg (not accepting, shutting down). */
int msa_rpc_server_probe(msa_rpc_server_t *s, int timeout_ms, char *msg, size_t msg_len);

/* Graceful stop: no new connections or calls (late arrivals get
 * UNAVAILABLE), calls in flight run to completion; after grace_ms the rest are
 * cancelled. Returns when every thread has been joined. The engine is not
 * touched: close it afterwards. Idempotent. */
void msa_rpc_server_shutdown(msa_rpc_server_t *s, int grace_ms);

/* Shuts down when still running, then frees everything. NULL is a no-op. */
void msa_rpc_server_destroy(msa_rpc_server_t *s);

#ifdef __cplusplus
}
#endif
#endif
