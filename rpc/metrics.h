/* metrics.h — request counters and latency histograms of msad, rendered as
 * Prometheus text (--metrics ADDR, served by libmicrohttpd) and as the
 * StatsResponse.counters map.
 *
 * Counters are atomics updated by whichever thread finishes a call; readers
 * (the HTTP thread, Stats) see a slightly moving but never torn picture. The
 * metrics object belongs to the rpc server; the HTTP endpoint borrows it.
 */
#ifndef MSA_RPC_METRICS_H
#define MSA_RPC_METRICS_H

#include "engine.h"
#include "msa_err.h"
#include "rpc_lists.h"

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MSA__RPC_ONE_CODE(n, name, msa) +1
#define MSA_RPC_N_CODES (0 MSA_RPC_GRPC_CODES(MSA__RPC_ONE_CODE)) /* gRPC status codes 0..16 */
#define MSA_RPC_N_BUCKETS 15 /* latency bucket bounds, plus +Inf */

typedef struct msa_rpc_method_metrics {
    _Atomic uint64_t by_code[MSA_RPC_N_CODES];       /* finished calls per status */
    _Atomic uint64_t buckets[MSA_RPC_N_BUCKETS + 1]; /* latency, not cumulative; last = +Inf */
    _Atomic uint64_t sum_us;                         /* latency sum, microseconds */
} msa_rpc_method_metrics_t;

typedef struct msa_rpc_metrics {
    size_t n_methods;
    const char *const *names;      /* method names, borrowed (static) */
    msa_rpc_method_metrics_t *m;   /* n_methods entries */
    _Atomic uint64_t inflight;     /* calls accepted and not yet answered */
    _Atomic uint64_t queued;       /* calls waiting for a handler thread */
    _Atomic uint64_t queued_bytes; /* their request bytes */
    _Atomic uint64_t busy_rejects; /* calls refused: handler queue full */
    _Atomic uint64_t bytes_in;     /* request payload bytes */
    _Atomic uint64_t bytes_out;    /* response payload bytes */
} msa_rpc_metrics_t;

/* "OK", "INVALID_ARGUMENT", ... for 0..16; "UNKNOWN" otherwise. */
const char *msa_rpc_code_name(int code);

int msa_rpc_metrics_init(msa_rpc_metrics_t *mx, size_t n_methods, const char *const *names);
void msa_rpc_metrics_free(msa_rpc_metrics_t *mx);
/* One finished call of method `method` with gRPC status `code` after `ns`. */
void msa_rpc_metrics_record(msa_rpc_metrics_t *mx, size_t method, int code, uint64_t ns);

/* Calls fn for every counter of the Stats map: "requests.<method>",
 * "errors.<method>", "status.<CODE>" (codes seen only), then the lists of
 * rpc_lists.h: MSA_RPC_SERVER_COUNTERS, and when es != NULL
 * MSA_RPC_ENGINE_COUNTERS and (n_gpu > 0) MSA_RPC_GPU_COUNTERS. */
void msa_rpc_metrics_counters(const msa_rpc_metrics_t *mx, const msa_engine_stats_result_t *es,
                              void (*fn)(void *arg, const char *key, uint64_t value), void *arg);

/* Prometheus text exposition (format 0.0.4); malloc'd, *len bytes; NULL when
 * out of memory. Engine gauges are included when e != NULL and answers. */
char *msa_rpc_metrics_render(const msa_rpc_metrics_t *mx, msa_engine_t *e, size_t *len);

/* The HTTP endpoint: GET /metrics (and /) on addr "HOST:PORT", ":PORT" or
 * "PORT" (host default 127.0.0.1; "[::1]:PORT" for IPv6). Runs its own
 * thread. Errors: MSA_EINVAL (bad address), MSA_EIO (cannot listen). */
typedef struct msa_rpc_http msa_rpc_http_t;
int msa_rpc_http_start(const char *addr, const msa_rpc_metrics_t *mx, msa_engine_t *e,
                       msa_rpc_http_t **out, msa_status_t *st);
/* Connections the HTTP endpoint holds at most; idle ones close after 5 s. */
#define MSA_RPC_HTTP_MAX_CONN 128

/* GET /healthz answers 200 with the probe's message when it returns MSA_OK,
 * else 503 (without a probe: 200 "ok" while the process runs). The probe
 * runs on the HTTP thread. */
typedef int (*msa_rpc_probe_fn)(void *arg, char *msg, size_t msg_len);
void msa_rpc_http_set_probe(msa_rpc_http_t *h, msa_rpc_probe_fn fn, void *arg);

/* The bound address as "HOST:PORT" (the real port when 0 was asked). */
const char *msa_rpc_http_bound(const msa_rpc_http_t *h);
/* Stops the thread and closes the socket. NULL is a no-op. */
void msa_rpc_http_stop(msa_rpc_http_t *h);

#ifdef __cplusplus
}
#endif
#endif
