/* rpc_lists.h — the lists of msad's surface, each written once as an X-macro
 * and expanded wherever a table, an enum or a switch needs it (libuv's
 * UV_ERRNO_MAP idea). Adding a method, a status code or a counter is one line
 * here; nothing else lists them by hand.
 *
 *   MSA_RPC_METHODS      RPC methods: path, name, scope, poller, handler
 *                        -> rpc/methods.c (the server's table and the metric
 *                        names), client/msaclient.c (registered calls)
 *   MSA_RPC_GRPC_CODES   gRPC status codes: number, name, the MSA_E* code a
 *                        client maps it to -> rpc/metrics.c (names),
 *                        client/msaclient.c (names, msa_cli_err_from_grpc)
 *   MSA_RPC_STATS_FIELDS engine figures that are StatsResponse fields
 *   MSA_RPC_ENGINE_COUNTERS, MSA_RPC_GPU_COUNTERS, MSA_RPC_SERVER_COUNTERS
 *                        counters of the StatsResponse.counters map with
 *                        their /metrics families -> rpc/metrics.c, and
 *                        rpc/methods.c (Stats) through it
 *
 * The header depends on nothing: the names in the lists (handlers, scopes,
 * MSA_E* codes, struct fields) are resolved where a list is expanded.
 */
#ifndef MSA_RPC_LISTS_H
#define MSA_RPC_LISTS_H

/* X(ID, path, name, scope, on_poller, handler)
 * ID: the client's enum tag (M_<ID>); name: metrics, counters and logs;
 * scope: MSA_RPC_SCOPE_<scope> needed (SEMANTICS "Security defaults");
 * on_poller: cheap and never blocking (no fsync, no min_seq wait, no
 * compute): answered on the completion-queue thread without a hand-off.
 * The order is the order of the per-method metrics. ReleaseSnapshot ends a
 * lease a read call took: the caller's own scope sufficed to take it. */
#define MSA_RPC_METHODS(X)                                                                      \
    X(CREATE, "/msa.v1.Memory/CreateCollection", "CreateCollection", ADMIN, false,              \
      h_create_collection)                                                                      \
    X(DROP, "/msa.v1.Memory/DropCollection", "DropCollection", ADMIN, false, h_drop_collection) \
    X(LISTCOLL, "/msa.v1.Memory/ListCollections", "ListCollections", READ, false,               \
      h_list_collections)                                                                       \
    X(DESCRIBE, "/msa.v1.Memory/DescribeCollection", "DescribeCollection", READ, false,         \
      h_describe_collection)                                                                    \
    X(WRITE, "/msa.v1.Memory/Write", "Write", WRITE, false, h_write)                            \
    X(GET, "/msa.v1.Memory/Get", "Get", READ, false, h_get)                                     \
    X(LIST, "/msa.v1.Memory/List", "List", READ, false, h_list)                                 \
    X(ROUTE, "/msa.v1.Memory/Route", "Route", READ, false, h_route)                             \
    X(ATTEND, "/msa.v1.Memory/Attend", "Attend", READ, false, h_attend)                         \
    X(STATS, "/msa.v1.Memory/Stats", "Stats", READ, false, h_stats)                             \
    X(RELEASE, "/msa.v1.Memory/ReleaseSnapshot", "ReleaseSnapshot", READ, false,                \
      h_release_snapshot)                                                                       \
    X(BACKUP, "/msa.v1.Admin/Backup", "Backup", ADMIN, false, h_backup)                         \
    X(VERIFY, "/msa.v1.Admin/Verify", "Verify", ADMIN, false, h_verify)                         \
    X(HEALTH, "/grpc.health.v1.Health/Check", "HealthCheck", NONE, true, h_health_check)

/* X(number, NAME, msa_code): every gRPC status code, in number order, with
 * the MSA_E* code a client turns it into (codes outside the list: UNKNOWN
 * and MSA_EINTERNAL). The server's direction (MSA_E* -> gRPC) is
 * msa_rpc_grpc_status in rpc/server.c: several engine codes share a status. */
#define MSA_RPC_GRPC_CODES(X)               \
    X(0, OK, MSA_OK)                        \
    X(1, CANCELLED, MSA_EUNAVAIL)           \
    X(2, UNKNOWN, MSA_EINTERNAL)            \
    X(3, INVALID_ARGUMENT, MSA_EINVAL)      \
    X(4, DEADLINE_EXCEEDED, MSA_ETIMEOUT)   \
    X(5, NOT_FOUND, MSA_ENOTFOUND)          \
    X(6, ALREADY_EXISTS, MSA_EEXIST)        \
    X(7, PERMISSION_DENIED, MSA_EPERM)      \
    X(8, RESOURCE_EXHAUSTED, MSA_EFULL)     \
    X(9, FAILED_PRECONDITION, MSA_EPRECOND) \
    X(10, ABORTED, MSA_EPRECOND)            \
    X(11, OUT_OF_RANGE, MSA_EINVAL)         \
    X(12, UNIMPLEMENTED, MSA_EINTERNAL)     \
    X(13, INTERNAL, MSA_EINTERNAL)          \
    X(14, UNAVAILABLE, MSA_EUNAVAIL)        \
    X(15, DATA_LOSS, MSA_ECORRUPT)          \
    X(16, UNAUTHENTICATED, MSA_EUNAUTH)

/* ---- counters --------------------------------------------------------------------------------
 * Rule: every entry is one StatsResponse field or counter AND one /metrics
 * family msad_<family>, whose HELP text ends with "[Stats: <key>]" so that a
 * reader (and tests/test_daemon.py) can find one from the other. kind:
 * COUNTER (monotonic; the family ends in _total) or GAUGE. field: a member of
 * the struct the list is expanded over (msa_engine_stats_result_t for the
 * engine and GPU lists, msa_rpc_metrics_t for the server list). */

/* X(field, family, help): StatsResponse.<field>, gauge msad_<family>. */
#define MSA_RPC_STATS_FIELDS(X)                                           \
    X(commit_seq, "commit_seq", "Last committed sequence number.")        \
    X(store_bytes, "store_bytes", "Size of the LMDB data file in bytes.") \
    X(collections, "collections", "Collections in the store.")            \
    X(documents, "documents", "Live documents over all collections.")     \
    X(chunks, "chunks", "Pooled chunks over all collections (index rows per layer).")

/* X(kind, key, family, help, field): StatsResponse.counters[key]. */
#define MSA_RPC_ENGINE_COUNTERS(X)                                                                \
    X(COUNTER, "engine.writes", "engine_writes_total", "Write requests committed by the engine.", \
      writes)                                                                                     \
    X(COUNTER, "engine.write_groups", "engine_write_groups_total",                                \
      "Group commits (LMDB transactions).", write_groups)                                         \
    X(COUNTER, "engine.routes", "engine_routes_total", "Route calls served by the engine.",       \
      routes)                                                                                     \
    X(COUNTER, "engine.attends", "engine_attends_total", "Attend calls served by the engine.",    \
      attends)                                                                                    \
    X(COUNTER, "engine.gets", "engine_gets_total", "Get calls served by the engine.", gets)       \
    X(COUNTER, "engine.lists", "engine_lists_total", "List calls served by the engine.", lists)   \
    X(GAUGE, "engine.index_bytes", "index_bytes", "Routing rows resident in host memory, bytes.", \
      index_bytes)                                                                                \
    X(GAUGE, "engine.snapshots_held", "snapshots_held",                                           \
      "Held snapshots (snapshot leases) open now.", snapshots_held)                               \
    X(COUNTER, "engine.snapshot_leases_granted", "snapshot_leases_granted_total",                 \
      "Snapshot leases granted (hold_snapshot_ms).", leases_granted)                              \
    X(COUNTER, "engine.snapshot_leases_renewed", "snapshot_leases_renewed_total",                 \
      "Snapshot leases renewed by a call on a held snapshot.", leases_renewed)                    \
    X(COUNTER, "engine.snapshot_leases_released", "snapshot_leases_released_total",               \
      "Snapshot leases ended by ReleaseSnapshot.", leases_released)                               \
    X(COUNTER, "engine.snapshot_leases_expired", "snapshot_leases_expired_total",                 \
      "Held snapshots closed because their lease ran out.", leases_expired)                       \
    X(COUNTER, "engine.snapshot_leases_revoked", "snapshot_leases_revoked_total",                 \
      "Held snapshots closed by the server (map growth).", leases_revoked)

/* CUDA backend only (n_gpu > 0). X(kind, key, family, help, field). */
#define MSA_RPC_GPU_COUNTERS(X)                                                                    \
    X(COUNTER, "gpu.routes_device", "gpu_routes_total",                                            \
      "Layer routes answered by the CUDA backend.", gpu.routes_device)                             \
    X(COUNTER, "gpu.routes_streamed", "gpu_routes_streamed_total",                                 \
      "Device routes whose keys were streamed from host memory.", gpu.routes_streamed)             \
    X(COUNTER, "gpu.routes_fallback", "gpu_routes_fallback_total",                                 \
      "Layer routes the CUDA backend handed to the CPU.", gpu.routes_fallback)                     \
    X(COUNTER, "gpu.passes", "gpu_passes_total", "Device passes over a layer's keys.",             \
      gpu.batches)                                                                                 \
    X(COUNTER, "gpu.coalesced", "gpu_coalesced_total",                                             \
      "Queries that shared a device pass with another.", gpu.coalesced)                            \
    X(COUNTER, "gpu.page_ins", "gpu_page_ins_total", "Layers made resident in device memory.",     \
      gpu.page_ins)                                                                                \
    X(COUNTER, "gpu.page_outs", "gpu_page_outs_total", "Layers evicted from device memory (LRU).", \
      gpu.page_outs)                                                                               \
    X(COUNTER, "gpu.syncs", "gpu_syncs_total",                                                     \
      "Device mirror updates (appends, deleted-seq uploads, rebuilds).", gpu.syncs)                \
    X(COUNTER, "gpu.cache_hits", "gpu_cache_hits_total", "K/V block cache hits.", gpu.cache_hits)  \
    X(COUNTER, "gpu.cache_misses", "gpu_cache_misses_total", "K/V block cache misses.",            \
      gpu.cache_misses)                                                                            \
    X(COUNTER, "gpu.cache_evictions", "gpu_cache_evictions_total", "K/V blocks evicted (LRU).",    \
      gpu.cache_evictions)                                                                         \
    X(COUNTER, "gpu.attends_device", "gpu_attends_total", "Attend layers computed on the device.", \
      gpu.attends_device)                                                                          \
    X(COUNTER, "gpu.attends_fallback", "gpu_attends_fallback_total",                               \
      "Attend layers handed to the CPU.", gpu.attends_fallback)                                    \
    X(GAUGE, "gpu.disabled", "gpu_disabled",                                                       \
      "1 once a device error switched the CUDA backend off.", gpu.disabled)                        \
    X(GAUGE, "gpu.pinned_host_bytes", "gpu_pinned_host_bytes",                                     \
      "Host memory pinned for the index's row arrays, bytes.", gpu.pinned_bytes)

/* The server's own counters (msa_rpc_metrics_t). X(kind, key, family, help, field). */
#define MSA_RPC_SERVER_COUNTERS(X)                                                             \
    X(GAUGE, "rpc.inflight", "inflight_requests", "Calls accepted and not yet answered.",      \
      inflight)                                                                                \
    X(GAUGE, "rpc.queued", "queued_requests", "Calls waiting for a handler thread.", queued)   \
    X(GAUGE, "rpc.queued_bytes", "queued_request_bytes", "Request bytes of the queued calls.", \
      queued_bytes)                                                                            \
    X(COUNTER, "rpc.busy_rejects", "busy_rejects_total", "Calls refused: handler queue full.", \
      busy_rejects)                                                                            \
    X(COUNTER, "rpc.bytes_in", "received_bytes_total", "Request payload bytes.", bytes_in)     \
    X(COUNTER, "rpc.bytes_out", "sent_bytes_total", "Response payload bytes.", bytes_out)

#endif
