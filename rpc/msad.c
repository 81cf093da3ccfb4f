/* msad.c — the daemon's entry point: options, logging, engine, gRPC server,
 * metrics endpoint, and the signal-driven shutdown.
 *
 * Exit codes: 0 after a clean stop (SIGTERM/SIGINT) or --help/--version;
 * 2 for bad options or unreadable option files (config, tokens, TLS), a TLS
 * key that does not match its certificate, a --backup-dir that cannot be
 * created (systemd then does not restart-loop on a configuration error);
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
#include "connlimit.h"
#include "engine.h"
#include "metrics.h"
#include "msa_err.h"
#include "msa_log.h"
#include "server.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define EXIT_USAGE 2

/* The self-pipe: written by on_signal, read by main. */
static int sig_pipe[2] = {-1, -1};

static void on_signal(int sig)
{
    int saved = errno;
    unsigned char b = (unsigned char)sig;
    ssize_t n = write(sig_pipe[1], &b, 1); /* full pipe: a signal is already pending */
    (void)n;
    errno = saved;
}

static int install_signals(void)
{
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
static int wait_stop_signal(void)
{
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
static char *read_file(const char *path, const char *what, msa_status_t *st)
{
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

/* The last OpenSSL error as text ("" when none). */
static const char *ssl_err(char *buf, size_t n)
{
    unsigned long e = ERR_get_error();
    buf[0] = '\0';
    if (e) ERR_error_string_n(e, buf, n);
    ERR_clear_error();
    return buf;
}

/* Checks the TLS files before gRPC sees them: gRPC only says "cannot bind"
 * about a bad certificate or a key of another certificate. st names the
 * file and what is wrong. */
static int check_tls(const char *cert_path, const char *cert, const char *key_path, const char *key,
                     const char *ca_path, const char *ca, msa_status_t *st)
{
    char eb[256];
    int rc = MSA_OK;
    X509 *x = NULL;
    EVP_PKEY *pk = NULL;
    BIO *b = BIO_new_mem_buf(cert, -1);
    if (!b || !(x = PEM_read_bio_X509(b, NULL, NULL, NULL))) {
        rc = msa_status_set(st, MSA_EINVAL, "--tls-cert %s: no PEM certificate in it (%s)",
                            cert_path, ssl_err(eb, sizeof(eb)));
        goto fail;
    }
    BIO_free(b);
    b = BIO_new_mem_buf(key, -1);
    if (!b || !(pk = PEM_read_bio_PrivateKey(b, NULL, NULL, NULL))) {
        rc = msa_status_set(st, MSA_EINVAL,
                            "--tls-key %s: no PEM private key in it, or it is encrypted (%s)",
                            key_path, ssl_err(eb, sizeof(eb)));
        goto fail;
    }
    if (X509_check_private_key(x, pk) != 1) {
        rc = msa_status_set(st, MSA_EINVAL,
                            "--tls-key %s: does not belong to the certificate in --tls-cert %s",
                            key_path, cert_path);
        goto fail;
    }
    if (ca) {
        BIO_free(b);
        X509 *c = NULL;
        b = BIO_new_mem_buf(ca, -1);
        if (!b || !(c = PEM_read_bio_X509(b, NULL, NULL, NULL))) {
            rc = msa_status_set(st, MSA_EINVAL, "--tls-client-ca %s: no PEM certificate in it (%s)",
                                ca_path, ssl_err(eb, sizeof(eb)));
            goto fail;
        }
        X509_free(c);
    }
fail:
    BIO_free(b);
    X509_free(x);
    EVP_PKEY_free(pk);
    ERR_clear_error();
    return rc;
}

/* --backup-dir must exist or be creatable (its parent exists): found at
 * start, not at the first Backup. */
static int check_backup_dir(const char *dir, msa_status_t *st)
{
    struct stat sb;
    if (stat(dir, &sb) == 0) {
        if (!S_ISDIR(sb.st_mode))
            return msa_status_set(st, MSA_EINVAL, "--backup-dir %s: not a directory", dir);
        return MSA_OK;
    }
    if (mkdir(dir, 0700) != 0)
        return msa_status_set(st, MSA_EINVAL, "--backup-dir %s: cannot create it: %s", dir,
                              strerror(errno));
    return MSA_OK;
}

/* True for addresses only this host can reach (loopback, unix sockets). */
static int is_local_listen(const char *a)
{
    if (!strncmp(a, "unix:", 5)) return 1;
    if (!strncmp(a, "127.", 4) || !strncmp(a, "localhost:", 10) || !strncmp(a, "[::1]:", 6))
        return 1;
    return 0;
}

static int probe(void *arg, char *msg, size_t n)
{
    return msa_rpc_server_probe(arg, 2000, msg, n);
}

static void log_host(const char *backend)
{
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    double gib = (pages > 0 && psz > 0) ? (double)pages * (double)psz / (1024.0 * 1024 * 1024) : 0;
    msa_log(MSA_LOG_INFO, "backend %s; devices: host cpu (%ld cores, %.1f GiB)%s", backend, cores,
            gib, strcmp(backend, "cuda") == 0 ? " + CUDA (see the engine's device log)" : "");
}

int main(int argc, char **argv)
{
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
        if (check_tls(o.tls_cert, cert, o.tls_key, key, o.tls_client_ca, ca, &st) != MSA_OK) {
            fprintf(stderr, "msad: %s\n", st.msg);
            exit_code = EXIT_USAGE;
            goto fail;
        }
    }
    if (o.backup_dir && check_backup_dir(o.backup_dir, &st) != MSA_OK) {
        fprintf(stderr, "msad: %s\n", st.msg);
        exit_code = EXIT_USAGE;
        goto fail;
    }

    /* From here on SIGTERM/SIGINT mean "shut down cleanly", even while the
     * store opens: the main thread sees them once the server is up. */
    if (install_signals() != 0) {
        fprintf(stderr, "msad: cannot install signal handlers: %s\n", strerror(errno));
        goto fail;
    }

    msa_log(MSA_LOG_INFO, "msad %s starting: data %s, sync %s", MSA_VERSION, o.data_dir,
            o.nosync ? "nosync" : "full");
    /* Every client connection is a descriptor: take what the hard limit allows. */
    msa_log(MSA_LOG_INFO, "file limit %llu descriptors",
            (unsigned long long)msa_rpc_conn_raise_nofile());
    if (!auth && !cert)
        for (size_t i = 0; i < o.n_listen; i++)
            if (!is_local_listen(o.listen[i]))
                msa_log(MSA_LOG_WARN,
                        "--listen %s: reachable from other hosts with neither --tokens-file nor "
                        "--tls-cert: anyone who can reach it may read, write and drop data",
                        o.listen[i]);
    msa_engine_config_t cfg;
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
    cfg.max_min_seq_waiters = o.max_min_seq_waiters;
    cfg.check_on_start = o.check_on_start;
    cfg.gpu.shards_per_gpu = o.gpu_shards;
    cfg.gpu.routing_bytes =
        o.gpu_routing_mb ? (uint64_t)o.gpu_routing_mb << 20 : (uint64_t)o.gpu_routing_gb << 30;
    if (o.gpu_cache_mb != UINT_MAX)
        cfg.gpu.cache_bytes = (uint64_t)o.gpu_cache_mb << 20;
    else if (o.gpu_cache_gb != UINT_MAX)
        cfg.gpu.cache_bytes = (uint64_t)o.gpu_cache_gb << 30;
    cfg.gpu.cache_off =
        cfg.gpu.cache_bytes == 0 && (o.gpu_cache_mb != UINT_MAX || o.gpu_cache_gb != UINT_MAX);
    cfg.gpu.coalesce_us = o.gpu_coalesce_us;
    cfg.gpu.evict_grace_ms = o.gpu_evict_grace_ms;
    cfg.gpu.lanes = o.gpu_lanes;
    cfg.gpu.lane_scratch = (uint64_t)o.gpu_scratch_mb << 20;
    cfg.gpu.dev = o.gpu_dev;
    if (msa_engine_open(&cfg, &engine, &st) != MSA_OK) {
        msa_log(MSA_LOG_ERROR, "cannot open the engine on %s: %s", o.data_dir, st.msg);
        fprintf(stderr, "msad: %s\n", st.msg);
        goto fail;
    }
    log_host(msa_engine_backend_name(engine));
    msa_log(MSA_LOG_INFO, "store at commit %llu",
            (unsigned long long)msa_engine_commit_seq(engine));
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
                                .tls_client_ca_pem = ca,
                                .max_connections = o.max_connections,
                                .idle_timeout_ms = o.idle_timeout_s * 1000u,
                                .handshake_timeout_ms = o.handshake_timeout_s * 1000u};
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
    if (http) msa_rpc_http_set_probe(http, probe, srv);
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
    msa_engine_shutdown_begin(engine);
    msa_engine_close(engine);
    engine = NULL;
    msa_log(MSA_LOG_DEBUG, "shutdown: engine closed");
    msa_log(MSA_LOG_INFO, "stopped cleanly");
    exit_code = 0;

fail:
    msa_rpc_http_stop(http);
    msa_rpc_server_destroy(srv);
    if (engine) {
        msa_engine_shutdown_begin(engine);
        msa_engine_close(engine);
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
