/* msad.c — the daemon's entry point: options, logging, engine, gRPC server,
 * metrics endpoint, and the signal-driven shutdown.
 *
 * Exit codes: 0 after a clean stop (SIGTERM/SIGINT) or --help/--version;
 * 2 for bad options or unreadable option files (config, tokens, TLS);
 * 1 when the store, the listen addresses or the metrics port fail at start.
 *
 * Signals: a handler only writes the signal number to a pipe that the main
 * thread reads (self-pipe), so no work happens in signal context. Blocking
 * the signals and sigwait would not do: libraries start threads before main
 * (OpenBLAS's pool), and a signal delivered to one of those would take its
 * default action and kill the daemon mid-write.
 */
#include "auth.h"
#include "config.h"
#include "engine.h"
#include "metrics.h"
#include "msa_err.h"
#include "msa_log.h"
#include "server.h"

#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define EXIT_USAGE 2

/* The self-pipe: written by on_signal, read by main. */
static int sig_pipe[2] = {-1, -1};

static void on_signal(int sig) {
    int saved = errno;
    unsigned char b = (unsigned char)sig;
    ssize_t n = write(sig_pipe[1], &b, 1); /* full pipe: a signal is already pending */
    (void)n;
    errno = saved;
}

static int install_signals(void) {
    if (pipe(sig_pipe) != 0) return -1;
    for (int i = 0; i < 2; i++) {
        fcntl(sig_pipe[i], F_SETFD, FD_CLOEXEC);
    }
    fcntl(sig_pipe[1], F_SETFL, O_NONBLOCK);
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGTERM, &sa, NULL) || sigaction(SIGINT, &sa, NULL) ||
        sigaction(SIGHUP, &sa, NULL))
        return -1;
    signal(SIGPIPE, SIG_IGN);
    return 0;
}

/* Blocks until SIGTERM or SIGINT; returns it. */
static int wait_stop_signal(void) {
    for (;;) {
        unsigned char b;
        ssize_t n = read(sig_pipe[0], &b, 1);
        if (n < 0 && errno == EINTR) continue;
        if (n != 1) {
            msa_log(MSA_LOG_ERROR, "signal pipe: %s; shutting down",
                    n < 0 ? strerror(errno) : "closed");
            return SIGTERM;
        }
        if (b == SIGHUP) {
            msa_log(MSA_LOG_INFO, "SIGHUP ignored (restart to reload the configuration)");
            continue;
        }
        return b;
    }
}

/* Reads a whole (small, PEM) file; NULL with st set on failure. */
static char *read_file(const char *path, const char *what, msa_status_t *st) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        msa_status_set(st, MSA_EIO, "%s %s: %s", what, path, strerror(errno));
        return NULL;
    }
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 4096 + 1 > cap) {
            cap = cap ? 2 * cap : 8192;
            if (cap > (64u << 20)) {
                msa_status_set(st, MSA_EINVAL, "%s %s: larger than 64 MiB", what, path);
                goto fail;
            }
            char *nb = realloc(buf, cap);
            if (!nb) {
                msa_status_set(st, MSA_ENOMEM, "%s %s: out of memory", what, path);
                goto fail;
            }
            buf = nb;
        }
        size_t n = fread(buf + len, 1, cap - len - 1, f);
        len += n;
        if (n == 0) break;
    }
    if (ferror(f)) {
        msa_status_set(st, MSA_EIO, "%s %s: read error", what, path);
        goto fail;
    }
    fclose(f);
    buf[len] = '\0';
    return buf;
fail:
    free(buf);
    fclose(f);
    return NULL;
}

static void log_host(const char *backend) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    double gib = (pages > 0 && psz > 0) ? (double)pages * (double)psz / (1024.0 * 1024 * 1024) : 0;
    msa_log(MSA_LOG_INFO, "backend %s; devices: host cpu (%ld cores, %.1f GiB)%s", backend, cores,
            gib, strcmp(backend, "cuda") == 0 ? " + CUDA (see the engine's device log)" : "");
}

int main(int argc, char **argv) {
    msa_rpc_opts_t o;
    msa_status_t st;
    msa_status_clear(&st);
    int exit_code = 1;
    msa_rpc_auth_t *auth = NULL;
    char *cert = NULL, *key = NULL, *ca = NULL;
    msa_engine_t *engine = NULL;
    msa_rpc_server_t *srv = NULL;
    msa_rpc_http_t *http = NULL;

    int rc = msa_rpc_opts_parse(argc, argv, &o, &st);
    if (rc != MSA_OK) {
        fprintf(stderr, "msad: %s (try --help)\n", st.msg);
        msa_rpc_opts_free(&o);
        return EXIT_USAGE;
    }
    if (o.action == MSA_RPC_HELP) {
        msa_rpc_opts_usage(stdout);
        msa_rpc_opts_free(&o);
        return 0;
    }
    if (o.action == MSA_RPC_VERSION) {
        printf("msad %s\n", MSA_VERSION);
        msa_rpc_opts_free(&o);
        return 0;
    }
    if (msa_log_setup(o.log_level, o.log_json) != MSA_OK) {
        fprintf(stderr, "msad: --log-level: '%s' unknown (try --help)\n", o.log_level);
        msa_rpc_opts_free(&o);
        return EXIT_USAGE;
    }

    /* Option files are part of the configuration: failing to read them is a
     * usage error (2), reported before anything is opened. */
    if (o.tokens_file && msa_rpc_auth_load(o.tokens_file, &auth, &st) != MSA_OK) {
        fprintf(stderr, "msad: --tokens-file: %s\n", st.msg);
        exit_code = EXIT_USAGE;
        goto fail;
    }
    if (o.tls_cert) {
        if (!(cert = read_file(o.tls_cert, "--tls-cert", &st)) ||
            !(key = read_file(o.tls_key, "--tls-key", &st)) ||
            (o.tls_client_ca && !(ca = read_file(o.tls_client_ca, "--tls-client-ca", &st)))) {
            fprintf(stderr, "msad: %s\n", st.msg);
            exit_code = EXIT_USAGE;
            goto fail;
        }
    }

    /* From here on SIGTERM/SIGINT mean "shut down cleanly", even while the
     * store opens: the main thread sees them once the server is up. */
    if (install_signals() != 0) {
        fprintf(stderr, "msad: cannot install signal handlers: %s\n", strerror(errno));
        goto fail;
    }

    msa_log(MSA_LOG_INFO, "msad %s starting: data %s, sync %s", MSA_VERSION, o.data_dir,
            o.nosync ? "nosync" : "full");
    msa_srv_config_t cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.data_dir = o.data_dir;
    cfg.backend = o.backend;
    cfg.threads = o.threads;
    cfg.nosync = o.nosync;
    cfg.map_max = (uint64_t)o.map_max_gb << 30;
    if (o.map_max_mb) cfg.map_max = (uint64_t)o.map_max_mb << 20;
    cfg.map_size = (uint64_t)o.map_mb << 20;
    cfg.max_readers = o.max_readers;
    cfg.backup_dir = o.backup_dir;
    cfg.max_query_tokens = o.max_query_tokens;
    cfg.max_write_ops = o.max_write_ops;
    cfg.max_text_bytes = o.max_text_bytes;
    cfg.max_metadata_bytes = o.max_metadata_bytes;
    cfg.max_ids = o.max_ids;
    cfg.max_held_snapshots = o.max_held_snapshots;
    cfg.max_snapshot_hold_ms = o.max_snapshot_hold_ms;
    cfg.check_on_start = o.check_on_start;
    cfg.gpu.shards_per_gpu = o.gpu_shards;
    cfg.gpu.routing_bytes = o.gpu_routing_mb ? (uint64_t)o.gpu_routing_mb << 20
                                             : (uint64_t)o.gpu_routing_gb << 30;
    if (o.gpu_cache_mb != UINT_MAX) cfg.gpu.cache_bytes = (uint64_t)o.gpu_cache_mb << 20;
    else if (o.gpu_cache_gb != UINT_MAX) cfg.gpu.cache_bytes = (uint64_t)o.gpu_cache_gb << 30;
    cfg.gpu.cache_off = cfg.gpu.cache_bytes == 0 &&
                        (o.gpu_cache_mb != UINT_MAX || o.gpu_cache_gb != UINT_MAX);
    cfg.gpu.coalesce_us = o.gpu_coalesce_us;
    cfg.gpu.evict_grace_ms = o.gpu_evict_grace_ms;
    cfg.gpu.lanes = o.gpu_lanes;
    cfg.gpu.lane_scratch = (uint64_t)o.gpu_scratch_mb << 20;
    cfg.gpu.dev = o.gpu_dev;
    if (msa_srv_open(&cfg, &engine, &st) != MSA_OK) {
        msa_log(MSA_LOG_ERROR, "cannot open the engine on %s: %s", o.data_dir, st.msg);
        fprintf(stderr, "msad: %s\n", st.msg);
        goto fail;
    }
    log_host(msa_srv_backend_name(engine));
    msa_log(MSA_LOG_INFO, "store at commit %llu", (unsigned long long)msa_srv_commit_seq(engine));
    if (auth) msa_log(MSA_LOG_INFO, "auth: %zu tokens", msa_rpc_auth_count(auth));

    msa_rpc_server_opts_t so = {.listen = (const char *const *)o.listen,
                                .n_listen = o.n_listen,
                                .pollers = o.threads,
                                .handlers = o.handlers,
                                .max_queue = o.max_queue,
                                .max_queue_bytes = (uint64_t)o.max_queue_mb << 20,
                                .max_message = (size_t)o.max_message_mb << 20,
                                .auth = auth,
                                .tls_cert_pem = cert,
                                .tls_key_pem = key,
                                .tls_client_ca_pem = ca};
    if (msa_rpc_server_start(engine, &so, &srv, &st) != MSA_OK) {
        msa_log(MSA_LOG_ERROR, "%s", st.msg);
        fprintf(stderr, "msad: %s\n", st.msg);
        goto fail;
    }
    if (o.metrics &&
        msa_rpc_http_start(o.metrics, msa_rpc_server_metrics(srv), engine, &http, &st) != MSA_OK) {
        msa_log(MSA_LOG_ERROR, "%s", st.msg);
        fprintf(stderr, "msad: %s\n", st.msg);
        goto fail;
    }
    for (size_t i = 0; msa_rpc_server_bound(srv, i); i++) {
        msa_log(MSA_LOG_INFO, "listening on %s%s", msa_rpc_server_bound(srv, i),
                cert ? " (TLS)" : "");
        printf("msad: listening on %s\n", msa_rpc_server_bound(srv, i));
    }
    if (http) {
        msa_log(MSA_LOG_INFO, "metrics on http://%s/metrics", msa_rpc_http_bound(http));
        printf("msad: metrics on %s\n", msa_rpc_http_bound(http));
    }
    fflush(stdout);

    int sig = wait_stop_signal();
    msa_log(MSA_LOG_INFO, "%s: shutting down (finishing calls in flight, grace %u s)",
            sig == SIGINT ? "SIGINT" : "SIGTERM", o.shutdown_grace_s);

    /* Order: stop the network (in-flight calls finish against a live engine),
     * then the metrics reader, then the engine (queued writes commit, the
     * store closes cleanly). */
    msa_rpc_server_shutdown(srv, (int)o.shutdown_grace_s * 1000);
    msa_log(MSA_LOG_DEBUG, "shutdown: rpc server stopped");
    msa_rpc_http_stop(http);
    http = NULL;
    msa_srv_shutdown_begin(engine);
    msa_srv_close(engine);
    engine = NULL;
    msa_log(MSA_LOG_DEBUG, "shutdown: engine closed");
    msa_log(MSA_LOG_INFO, "stopped cleanly");
    exit_code = 0;

fail:
    msa_rpc_http_stop(http);
    msa_rpc_server_destroy(srv);
    if (engine) {
        msa_srv_shutdown_begin(engine);
        msa_srv_close(engine);
    }
    msa_rpc_auth_free(auth);
    free(cert);
    if (key) {
        memset(key, 0, strlen(key));
        free(key);
    }
    free(ca);
    msa_rpc_opts_free(&o);
    return exit_code;
}
