/* config.c — flags and config file of msad (see config.h). One table drives
 * the flag parser, the config-file parser and --help. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

typedef enum {
    O_CONFIG,
    O_DATA,
    O_LISTEN,
    O_BACKEND,
    O_THREADS,
    O_HANDLERS,
    O_MAX_QUEUE,
    O_MAX_QUEUE_MB,
    O_MAX_CONN,
    O_IDLE_TIMEOUT,
    O_HANDSHAKE_TIMEOUT,
    O_MAX_WAITERS,
    O_TOKENS,
    O_TLS_CERT,
    O_TLS_KEY,
    O_TLS_CA,
    O_BACKUP,
    O_MAX_MSG,
    O_MAX_QTOK,
    O_MAX_OPS,
    O_MAX_TEXT,
    O_MAX_META,
    O_MAX_IDS,
    O_MAX_HELD,
    O_MAX_HOLD_MS,
    O_SYNC,
    O_MAP_MAX,
    O_MAP_MB,
    O_MAP_MAX_MB,
    O_MAX_READERS,
    O_CHECK,
    O_GRACE,
    O_METRICS,
    O_GPU_SHARDS,
    O_GPU_ROUTING_GB,
    O_GPU_ROUTING_MB,
    O_GPU_CACHE_GB,
    O_GPU_CACHE_MB,
    O_GPU_COALESCE,
    O_GPU_GRACE,
    O_GPU_LANES,
    O_GPU_SCRATCH,
    O_LOG_LEVEL,
    O_LOG_FORMAT,
    O_HELP,
    O_VERSION,
    O_COUNT
} opt_id_t;

typedef struct optdef {
    const char *name; /* flag without "--", and the config-file key */
    const char *arg;  /* NULL: no value */
    const char *help;
} optdef_t;

static const optdef_t defs[O_COUNT] = {
    [O_CONFIG] = {"config", "FILE", "read `key = value` lines with the keys below (flags win)"},
    [O_DATA] = {"data", "DIR", "data directory (default " MSA_RPC_DEFAULT_DATA ")"},
    [O_LISTEN] = {"listen", "ADDR",
                  "HOST:PORT or unix:/path; repeatable (default " MSA_RPC_DEFAULT_LISTEN ")"},
    [O_BACKEND] = {"backend", "auto|cpu|cuda", "compute backend (default auto)"},
    [O_THREADS] = {"threads", "N",
                   "completion-queue threads and engine compute threads (default: one per core)"},
    [O_HANDLERS] = {"handlers", "N", "request handler threads (default max(16, 4 x threads))"},
    [O_MAX_QUEUE] = {"max-queue", "N",
                     "calls waiting for a handler before RESOURCE_EXHAUSTED (default 4096)"},
    [O_MAX_QUEUE_MB] = {"max-queue-mb", "N",
                        "request bytes of the waiting calls, MiB, before RESOURCE_EXHAUSTED "
                        "(default 1024)"},
    [O_MAX_CONN] = {"max-connections", "N",
                    "client connections at once; past it a new one is refused with an HTTP/2 "
                    "GOAWAY (default 1024, never more than `ulimit -n` less 256)"},
    [O_IDLE_TIMEOUT] = {"idle-timeout", "SECONDS",
                        "close a client connection without calls for this long (default 300)"},
    [O_HANDSHAKE_TIMEOUT] = {"handshake-timeout", "SECONDS",
                             "close a connection that has not finished its TLS and HTTP/2 setup "
                             "within this (default 10)"},
    [O_MAX_WAITERS] = {"max-min-seq-waiters", "N",
                       "read calls waiting at once for a min_seq commit; more get "
                       "RESOURCE_EXHAUSTED (default 8; keep below --handlers)"},
    [O_TOKENS] = {"tokens-file", "FILE", "bearer tokens, one `token read|write|admin` per line"},
    [O_TLS_CERT] = {"tls-cert", "FILE", "TLS certificate chain (PEM); needs --tls-key"},
    [O_TLS_KEY] = {"tls-key", "FILE", "TLS private key (PEM)"},
    [O_TLS_CA] = {"tls-client-ca", "FILE", "require client certificates signed by this CA"},
    [O_BACKUP] = {"backup-dir", "DIR", "directory for Backup (default: backups refused)"},
    [O_MAX_MSG] = {"max-message-mb", "N", "largest request/response in MiB (default 256)"},
    [O_MAX_QTOK] = {"max-query-tokens", "N",
                    "query tokens per layer of Route/Attend (default 65536)"},
    [O_MAX_OPS] = {"max-write-ops", "N", "ops per Write request (default 4096)"},
    [O_MAX_TEXT] = {"max-text-bytes", "N", "text bytes per document (default 16777216 = 16 MiB)"},
    [O_MAX_META] = {"max-metadata-bytes", "N",
                    "metadata bytes per document (default 1048576 = 1 MiB)"},
    [O_MAX_IDS] = {"max-ids", "N", "ids of a Get, exclude_ids of a Route/Attend (default 100000)"},
    [O_MAX_HELD] = {"max-held-snapshots", "N",
                    "snapshots held at once by hold_snapshot_ms leases; at most half of "
                    "--max-readers (default 256)"},
    [O_MAX_HOLD_MS] = {"max-snapshot-hold-ms", "N",
                       "longest hold_snapshot_ms a call may ask for (default 60000)"},
    [O_SYNC] = {"sync", "full|nosync", "fsync every commit (full, default) or not"},
    [O_MAP_MAX] = {"map-max-gb", "N", "LMDB map size limit in GiB (default: engine's)"},
    [O_MAP_MB] = {"map-mb", "N", "initial LMDB map size in MiB (default: engine's)"},
    [O_MAP_MAX_MB] = {"map-max-mb", "N",
                      "LMDB map size limit in MiB; wins over --map-max-gb (default: engine's)"},
    [O_MAX_READERS] = {"max-readers", "N",
                       "LMDB reader slots: concurrent read snapshots (default 1024)"},
    [O_CHECK] = {"check-on-start", "full|quick|off",
                 "walk data.mdb in a child process before serving and refuse a damaged "
                 "file: full also checks every value's checksum (~0.1 s per GB cached, "
                 "disk read speed otherwise), quick only the tree pages (default full)"},
    [O_GRACE] = {"shutdown-grace", "SECONDS",
                 "on SIGTERM, cancel calls still running after this (default 30)"},
    [O_METRICS] = {"metrics", "ADDR", "serve Prometheus metrics on HOST:PORT (/metrics)"},
    [O_GPU_SHARDS] = {"gpu-shards", "N",
                      "cuda: shards per GPU the routing keys are split into (default 1)"},
    [O_GPU_ROUTING_GB] = {"gpu-routing-gb", "N",
                          "cuda: routing keys resident per GPU, GiB; least recently used "
                          "layers past it are streamed from host memory (default 75% of free)"},
    [O_GPU_ROUTING_MB] = {"gpu-routing-mb", "N", "cuda: as --gpu-routing-gb in MiB (wins)"},
    [O_GPU_CACHE_GB] = {"gpu-cache-gb", "N",
                        "cuda: K/V block cache per GPU, GiB (default 12% of free)"},
    [O_GPU_CACHE_MB] = {"gpu-cache-mb", "N", "cuda: as --gpu-cache-gb in MiB (wins)"},
    [O_GPU_COALESCE] = {"gpu-coalesce-us", "N",
                        "cuda: longest wait to batch concurrent queries of one layer into one "
                        "pass, microseconds; only while other queries are in flight (default 100)"},
    [O_GPU_GRACE] = {"gpu-evict-grace-ms", "N",
                     "cuda: a layer queried within this is not paged out for another; "
                     "past the budget newcomers are streamed instead (default 1000)"},
    [O_GPU_LANES] = {"gpu-lanes", "N", "cuda: concurrent device streams per GPU (default 4)"},
    [O_GPU_SCRATCH] = {"gpu-scratch-mb", "N", "cuda: device scratch per stream, MiB (default 256)"},
    [O_LOG_LEVEL] = {"log-level", "LEVEL", "debug|info|warn|error (default info)"},
    [O_LOG_FORMAT] = {"log-format", "text|json", "log line format (default text)"},
    [O_HELP] = {"help", NULL, "print this help and exit"},
    [O_VERSION] = {"version", NULL, "print the version and exit"},
};

void msa_rpc_opts_usage(FILE *f)
{
    fprintf(f, "usage: msad [OPTIONS]\n\n"
               "The MSA memory daemon: a persistent, transactional store of pooled K/V\n"
               "memory with top-k routing and attention, served over gRPC (msa.v1).\n\n"
               "options:\n");
    for (int i = 0; i < O_COUNT; i++) {
        char left[64];
        snprintf(left, sizeof(left), "--%s%s%s", defs[i].name, defs[i].arg ? " " : "",
                 defs[i].arg ? defs[i].arg : "");
        fprintf(f, "  %-30s %s\n", left, defs[i].help);
    }
    fprintf(f, "\nSIGTERM/SIGINT stop accepting calls, finish those in flight and queued\n"
               "writes, close the store and exit 0. Bad options exit 2.\n");
}

static int find_opt(const char *name, size_t len)
{
    for (int i = 0; i < O_COUNT; i++)
        if (strlen(defs[i].name) == len && !strncmp(defs[i].name, name, len)) return i;
    return -1;
}

static int parse_uint(const char *src, const char *v, unsigned lo, unsigned hi, unsigned *out,
                      msa_status_t *st)
{
    char *end = NULL;
    errno = 0;
    unsigned long x = strtoul(v, &end, 10);
    if (!*v || *end || errno || v[0] == '-')
        return msa_status_set(st, MSA_EINVAL, "%s: '%s' is not a number", src, v);
    if (x < lo || x > hi)
        return msa_status_set(st, MSA_EINVAL, "%s: %lu is out of range %u..%u", src, x, lo, hi);
    *out = (unsigned)x;
    return MSA_OK;
}

static int set_str(char **dst, const char *v, const char *src, msa_status_t *st)
{
    if (!*v) return msa_status_set(st, MSA_EINVAL, "%s: empty value", src);
    char *s = strdup(v);
    if (!s) return msa_status_set(st, MSA_ENOMEM, "out of memory");
    free(*dst);
    *dst = s;
    return MSA_OK;
}

/* Applies one option; src names it in messages ("--threads" or "FILE:LINE: threads"). */
static int apply(msa_rpc_opts_t *o, int id, const char *v, const char *src, msa_status_t *st)
{
    switch ((opt_id_t)id) {
    case O_CONFIG:
        return set_str(&o->config, v, src, st);
    case O_DATA:
        return set_str(&o->data_dir, v, src, st);
    case O_LISTEN: {
        if (!*v) return msa_status_set(st, MSA_EINVAL, "%s: empty address", src);
        if (strncmp(v, "unix:", 5) != 0 && !strchr(v, ':'))
            return msa_status_set(st, MSA_EINVAL, "%s: '%s', want HOST:PORT or unix:/path", src, v);
        if (strncmp(v, "unix:", 5) != 0) {
            /* gRPC would take the port modulo 65536: 99999 would bind 34463. */
            const char *port = strrchr(v, ':') + 1;
            char *end = NULL;
            errno = 0;
            unsigned long pn = strtoul(port, &end, 10);
            if (!*port || *end || errno || port[0] == '-' || port[0] == '+' || pn > 65535)
                return msa_status_set(st, MSA_EINVAL, "%s: '%s': port '%s', want 0..65535", src, v,
                                      port);
        }
        char **l = realloc(o->listen, (o->n_listen + 1) * sizeof(char *));
        if (!l) return msa_status_set(st, MSA_ENOMEM, "out of memory");
        o->listen = l;
        if (!(l[o->n_listen] = strdup(v))) return msa_status_set(st, MSA_ENOMEM, "out of memory");
        o->n_listen++;
        return MSA_OK;
    }
    case O_BACKEND:
        if (!strcmp(v, "auto"))
            o->backend = MSA_BACKEND_AUTO;
        else if (!strcmp(v, "cpu"))
            o->backend = MSA_BACKEND_CPU;
        else if (!strcmp(v, "cuda"))
            o->backend = MSA_BACKEND_CUDA;
        else
            return msa_status_set(st, MSA_EINVAL, "%s: '%s', want auto|cpu|cuda", src, v);
        return MSA_OK;
    case O_THREADS:
        return parse_uint(src, v, 0, 1024, &o->threads, st);
    case O_HANDLERS:
        return parse_uint(src, v, 0, 4096, &o->handlers, st);
    case O_MAX_QUEUE:
        return parse_uint(src, v, 0, 1u << 20, &o->max_queue, st);
    case O_MAX_QUEUE_MB:
        return parse_uint(src, v, 1, 1u << 20, &o->max_queue_mb, st);
    case O_MAX_CONN:
        return parse_uint(src, v, 1, 1u << 20, &o->max_connections, st);
    case O_IDLE_TIMEOUT:
        return parse_uint(src, v, 1, 86400 * 7, &o->idle_timeout_s, st);
    case O_HANDSHAKE_TIMEOUT:
        return parse_uint(src, v, 1, 3600, &o->handshake_timeout_s, st);
    case O_MAX_WAITERS:
        return parse_uint(src, v, 1, 1u << 16, &o->max_min_seq_waiters, st);
    case O_TOKENS:
        return set_str(&o->tokens_file, v, src, st);
    case O_TLS_CERT:
        return set_str(&o->tls_cert, v, src, st);
    case O_TLS_KEY:
        return set_str(&o->tls_key, v, src, st);
    case O_TLS_CA:
        return set_str(&o->tls_client_ca, v, src, st);
    case O_BACKUP:
        return set_str(&o->backup_dir, v, src, st);
    case O_MAX_MSG:
        return parse_uint(src, v, 1, 2047, &o->max_message_mb, st);
    case O_MAX_QTOK:
        return parse_uint(src, v, 1, 1u << 24, &o->max_query_tokens, st);
    case O_MAX_OPS:
        return parse_uint(src, v, 1, 1u << 24, &o->max_write_ops, st);
    case O_MAX_TEXT:
        return parse_uint(src, v, 1, 2047u << 20, &o->max_text_bytes, st);
    case O_MAX_META:
        return parse_uint(src, v, 1, 2047u << 20, &o->max_metadata_bytes, st);
    case O_MAX_IDS:
        return parse_uint(src, v, 1, 1u << 24, &o->max_ids, st);
    case O_MAX_HELD:
        return parse_uint(src, v, 1, 1u << 20, &o->max_held_snapshots, st);
    case O_MAX_HOLD_MS:
        return parse_uint(src, v, 1, 86400000, &o->max_snapshot_hold_ms, st);
    case O_SYNC:
        if (!strcmp(v, "full"))
            o->nosync = false;
        else if (!strcmp(v, "nosync"))
            o->nosync = true;
        else
            return msa_status_set(st, MSA_EINVAL, "%s: '%s', want full|nosync", src, v);
        return MSA_OK;
    case O_MAP_MAX:
        return parse_uint(src, v, 0, 1u << 20, &o->map_max_gb, st);
    case O_MAP_MB:
        return parse_uint(src, v, 0, 1u << 30, &o->map_mb, st);
    case O_MAP_MAX_MB:
        return parse_uint(src, v, 0, 1u << 30, &o->map_max_mb, st);
    case O_MAX_READERS:
        return parse_uint(src, v, 0, 1u << 20, &o->max_readers, st);
    case O_CHECK:
        if (!strcmp(v, "full"))
            o->check_on_start = MSA_STORE_CHECK_FULL;
        else if (!strcmp(v, "quick"))
            o->check_on_start = MSA_STORE_CHECK_QUICK;
        else if (!strcmp(v, "off"))
            o->check_on_start = MSA_STORE_CHECK_OFF;
        else
            return msa_status_set(st, MSA_EINVAL, "%s: '%s', want full|quick|off", src, v);
        return MSA_OK;
    case O_GRACE:
        return parse_uint(src, v, 1, 86400, &o->shutdown_grace_s, st);
    case O_METRICS:
        return set_str(&o->metrics, v, src, st);
    case O_GPU_SHARDS:
        return parse_uint(src, v, 1, 64, &o->gpu_shards, st);
    case O_GPU_ROUTING_GB:
        return parse_uint(src, v, 1, 1u << 16, &o->gpu_routing_gb, st);
    case O_GPU_ROUTING_MB:
        return parse_uint(src, v, 1, 1u << 26, &o->gpu_routing_mb, st);
    case O_GPU_CACHE_GB:
        return parse_uint(src, v, 0, 1u << 16, &o->gpu_cache_gb, st);
    case O_GPU_CACHE_MB:
        return parse_uint(src, v, 0, 1u << 26, &o->gpu_cache_mb, st);
    case O_GPU_COALESCE:
        return parse_uint(src, v, 0, 100000, &o->gpu_coalesce_us, st);
    case O_GPU_GRACE:
        return parse_uint(src, v, 0, 3600000, &o->gpu_evict_grace_ms, st);
    case O_GPU_LANES:
        return parse_uint(src, v, 1, 64, &o->gpu_lanes, st);
    case O_GPU_SCRATCH:
        return parse_uint(src, v, 16, 1u << 20, &o->gpu_scratch_mb, st);
    case O_LOG_LEVEL:
        if (strcmp(v, "debug") && strcmp(v, "info") && strcmp(v, "warn") && strcmp(v, "error") &&
            strcmp(v, "off"))
            return msa_status_set(st, MSA_EINVAL, "%s: '%s', want debug|info|warn|error|off", src,
                                  v);
        return set_str(&o->log_level, v, src, st);
    case O_LOG_FORMAT:
        if (!strcmp(v, "text"))
            o->log_json = false;
        else if (!strcmp(v, "json"))
            o->log_json = true;
        else
            return msa_status_set(st, MSA_EINVAL, "%s: '%s', want text|json", src, v);
        return MSA_OK;
    case O_HELP:
        o->action = MSA_RPC_HELP;
        return MSA_OK;
    case O_VERSION:
        o->action = MSA_RPC_VERSION;
        return MSA_OK;
    case O_COUNT:
        break;
    }
    return msa_status_set(st, MSA_EINVAL, "%s: unknown option", src);
}

static char *trim(char *s)
{
    while (*s && isspace((unsigned char)*s)) s++;
    char *e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1])) *--e = '\0';
    return s;
}

/* Applies the config file, skipping keys given as flags. */
static int read_config(msa_rpc_opts_t *o, const char *path, const bool *from_flags,
                       msa_status_t *st)
{
    FILE *f = fopen(path, "r");
    if (!f) return msa_status_set(st, MSA_EIO, "--config %s: %s", path, strerror(errno));
    int rc = MSA_OK;
    char *line = NULL;
    size_t cap = 0;
    unsigned lineno = 0;
    char src[PATH_MAX + 96];
    while (getline(&line, &cap, f) >= 0) {
        lineno++;
        char *p = trim(line);
        if (!*p || *p == '#') continue;
        char *eq = strchr(p, '=');
        if (!eq) {
            rc = msa_status_set(st, MSA_EINVAL, "%s:%u: want `key = value`", path, lineno);
            goto fail;
        }
        *eq = '\0';
        char *key = trim(p), *val = trim(eq + 1);
        size_t vl = strlen(val);
        if (vl >= 2 &&
            ((val[0] == '"' && val[vl - 1] == '"') || (val[0] == '\'' && val[vl - 1] == '\''))) {
            val[vl - 1] = '\0';
            val++;
        }
        int id = find_opt(key, strlen(key));
        snprintf(src, sizeof(src), "%s:%u: %s", path, lineno, key);
        if (id < 0 || id == O_CONFIG || id == O_HELP || id == O_VERSION) {
            rc = msa_status_set(st, MSA_EINVAL, "%s:%u: unknown key '%s'", path, lineno, key);
            goto fail;
        }
        if (from_flags[id]) continue;
        if ((rc = apply(o, id, val, src, st)) != MSA_OK) goto fail;
    }
    if (ferror(f)) rc = msa_status_set(st, MSA_EIO, "--config %s: read error", path);
fail:
    free(line);
    fclose(f);
    return rc;
}

int msa_rpc_opts_parse(int argc, char **argv, msa_rpc_opts_t *o, msa_status_t *st)
{
    memset(o, 0, sizeof(*o));
    o->backend = MSA_BACKEND_AUTO;
    o->max_message_mb = 256;
    o->shutdown_grace_s = 30;
    o->gpu_shards = 1;
    o->gpu_coalesce_us = 100;
    o->gpu_evict_grace_ms = 1000;
    o->gpu_cache_gb = o->gpu_cache_mb = UINT_MAX; /* unset: the engine's default */
    msa_dev_config_env(&o->gpu_dev);              /* tests: the simulated device, debugging knobs */
    bool from_flags[O_COUNT] = {false};
    int rc;

    /* Pass 1: syntax, and which keys the flags set. Pass 2 applies the config
     * file for the other keys, pass 3 the flags, so flags win. */
    for (int pass = 1; pass <= 3; pass += 2) {
        for (int i = 1; i < argc; i++) {
            const char *a = argv[i];
            if (strncmp(a, "--", 2) != 0 || a[2] == '\0')
                return msa_status_set(st, MSA_EINVAL, "unexpected argument '%s'", a);
            const char *name = a + 2, *eq = strchr(name, '=');
            size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
            int id = find_opt(name, nlen);
            if (id < 0)
                return msa_status_set(st, MSA_EINVAL, "unknown option '%.*s'", (int)(nlen + 2), a);
            const char *val = NULL;
            if (defs[id].arg) {
                if (eq)
                    val = eq + 1;
                else if (i + 1 < argc)
                    val = argv[++i];
                else
                    return msa_status_set(st, MSA_EINVAL, "--%s needs a value (%s)", defs[id].name,
                                          defs[id].arg);
            } else if (eq) {
                return msa_status_set(st, MSA_EINVAL, "--%s takes no value", defs[id].name);
            }
            if (pass == 1) {
                from_flags[id] = true;
                if (id == O_HELP || id == O_VERSION) {
                    o->action = id == O_HELP ? MSA_RPC_HELP : MSA_RPC_VERSION;
                    return MSA_OK;
                }
                if (id == O_CONFIG && (rc = apply(o, id, val, "--config", st))) return rc;
                continue;
            }
            char src[80];
            snprintf(src, sizeof(src), "--%s", defs[id].name);
            if ((rc = apply(o, id, val ? val : "", src, st)) != MSA_OK) return rc;
        }
        if (pass == 1 && o->config && (rc = read_config(o, o->config, from_flags, st)) != MSA_OK)
            return rc;
    }
    if (!o->n_listen && (rc = apply(o, O_LISTEN, MSA_RPC_DEFAULT_LISTEN, "default", st))) return rc;
    if (!o->data_dir && (rc = set_str(&o->data_dir, MSA_RPC_DEFAULT_DATA, "default", st)))
        return rc;
    if (!o->log_level && (rc = set_str(&o->log_level, "info", "default", st))) return rc;
    if (!!o->tls_cert != !!o->tls_key)
        return msa_status_set(st, MSA_EINVAL, "--tls-cert and --tls-key go together");
    if (o->tls_client_ca && !o->tls_cert)
        return msa_status_set(st, MSA_EINVAL, "--tls-client-ca needs --tls-cert and --tls-key");
    return MSA_OK;
}

void msa_rpc_opts_free(msa_rpc_opts_t *o)
{
    if (!o) return;
    for (size_t i = 0; i < o->n_listen; i++) free(o->listen[i]);
    free(o->listen);
    free(o->config);
    free(o->data_dir);
    free(o->tokens_file);
    free(o->tls_cert);
    free(o->tls_key);
    free(o->tls_client_ca);
    free(o->backup_dir);
    free(o->metrics);
    free(o->log_level);
    memset(o, 0, sizeof(*o));
}
