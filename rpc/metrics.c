/* metrics.c — counters, histograms, Prometheus text and the HTTP endpoint
 * (see metrics.h). */
#include "metrics.h"

#include "connlimit.h"
#include "msa_log.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* Upper bounds in seconds; chosen to cover a 50 us empty call up to a 10 s
 * fsync storm. */
static const double bucket_le[MSA_RPC_N_BUCKETS] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                                                    0.005,  0.01,    0.025,  0.05,  0.1,
                                                    0.25,   0.5,     1.0,    2.5,   10.0};

static const char *const code_names[MSA_RPC_N_CODES] = {
#define X(n, name, msa) [n] = #name,
    MSA_RPC_GRPC_CODES(X)
#undef X
};

const char *msa_rpc_code_name(int code)
{
    if (code < 0 || code >= MSA_RPC_N_CODES) return "UNKNOWN";
    return code_names[code];
}

int msa_rpc_metrics_init(msa_rpc_metrics_t *mx, size_t n_methods, const char *const *names)
{
    memset(mx, 0, sizeof(*mx));
    mx->m = calloc(n_methods ? n_methods : 1, sizeof(*mx->m));
    if (!mx->m) return MSA_ENOMEM;
    mx->n_methods = n_methods;
    mx->names = names;
    for (size_t i = 0; i < n_methods; i++) {
        for (int c = 0; c < MSA_RPC_N_CODES; c++) atomic_init(&mx->m[i].by_code[c], 0);
        for (int b = 0; b <= MSA_RPC_N_BUCKETS; b++) atomic_init(&mx->m[i].buckets[b], 0);
        atomic_init(&mx->m[i].sum_us, 0);
    }
    return MSA_OK;
}

void msa_rpc_metrics_free(msa_rpc_metrics_t *mx)
{
    if (!mx) return;
    free(mx->m);
    mx->m = NULL;
    mx->n_methods = 0;
}

void msa_rpc_metrics_record(msa_rpc_metrics_t *mx, size_t method, int code, uint64_t ns)
{
    if (method >= mx->n_methods) return;
    if (code < 0 || code >= MSA_RPC_N_CODES) code = 2; /* UNKNOWN */
    msa_rpc_method_metrics_t *m = &mx->m[method];
    atomic_fetch_add_explicit(&m->by_code[code], 1, memory_order_relaxed);
    double s = (double)ns * 1e-9;
    int b = 0;
    while (b < MSA_RPC_N_BUCKETS && s > bucket_le[b]) b++;
    atomic_fetch_add_explicit(&m->buckets[b], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&m->sum_us, ns / 1000, memory_order_relaxed);
}

static uint64_t ld(const _Atomic uint64_t *p)
{
    return atomic_load_explicit((_Atomic uint64_t *)p, memory_order_relaxed);
}

void msa_rpc_metrics_counters(const msa_rpc_metrics_t *mx, const msa_engine_stats_result_t *es,
                              void (*fn)(void *arg, const char *key, uint64_t value), void *arg)
{
    char key[96];
    uint64_t by_code[MSA_RPC_N_CODES] = {0};
    for (size_t i = 0; i < mx->n_methods; i++) {
        uint64_t req = 0, err = 0;
        for (int c = 0; c < MSA_RPC_N_CODES; c++) {
            uint64_t v = ld(&mx->m[i].by_code[c]);
            req += v;
            if (c) err += v;
            by_code[c] += v;
        }
        snprintf(key, sizeof(key), "requests.%s", mx->names[i]);
        fn(arg, key, req);
        snprintf(key, sizeof(key), "errors.%s", mx->names[i]);
        fn(arg, key, err);
    }
    for (int c = 1; c < MSA_RPC_N_CODES; c++) {
        if (!by_code[c]) continue;
        snprintf(key, sizeof(key), "status.%s", code_names[c]);
        fn(arg, key, by_code[c]);
    }
#define X(kind, key, family, help, field) fn(arg, key, ld(&mx->field));
    MSA_RPC_SERVER_COUNTERS(X)
#undef X
    if (es) {
#define X(kind, key, family, help, field) fn(arg, key, (uint64_t)es->field);
        MSA_RPC_ENGINE_COUNTERS(X)
        if (es->n_gpu) {
            MSA_RPC_GPU_COUNTERS(X)
        }
#undef X
    }
}

/* ---- Prometheus text ------------------------------------------------------ */

/* One family of one sample, from a line of rpc_lists.h: kind "COUNTER" or
 * "GAUGE"; key (the Stats counter, or the StatsResponse field) ends the HELP
 * text as "[Stats: key]", the rule tests/test_daemon.py checks. */
static void family_line(FILE *f, const char *kind, const char *family, const char *help,
                        const char *key, uint64_t v)
{
    const char *type = strcmp(kind, "COUNTER") == 0 ? "counter" : "gauge";
    fprintf(f, "# HELP msad_%s %s [Stats: %s]\n# TYPE msad_%s %s\nmsad_%s %llu\n", family, help,
            key, family, type, family, (unsigned long long)v);
}

char *msa_rpc_metrics_render(const msa_rpc_metrics_t *mx, msa_engine_t *e, size_t *len)
{
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    if (!f) return NULL;

    fprintf(f, "# HELP msad_requests_total RPCs answered, by method and status code.\n"
               "# TYPE msad_requests_total counter\n");
    for (size_t i = 0; i < mx->n_methods; i++) {
        for (int c = 0; c < MSA_RPC_N_CODES; c++) {
            uint64_t v = ld(&mx->m[i].by_code[c]);
            /* OK always appears so that rate() has a series from the start. */
            if (v || c == 0)
                fprintf(f, "msad_requests_total{method=\"%s\",code=\"%s\"} %llu\n", mx->names[i],
                        code_names[c], (unsigned long long)v);
        }
    }
    fprintf(f, "# HELP msad_errors_total RPCs answered with a non-OK status, by code.\n"
               "# TYPE msad_errors_total counter\n");
    for (int c = 1; c < MSA_RPC_N_CODES; c++) {
        uint64_t v = 0;
        for (size_t i = 0; i < mx->n_methods; i++) v += ld(&mx->m[i].by_code[c]);
        fprintf(f, "msad_errors_total{code=\"%s\"} %llu\n", code_names[c], (unsigned long long)v);
    }
    fprintf(f, "# HELP msad_request_duration_seconds Time from call arrival to status sent.\n"
               "# TYPE msad_request_duration_seconds histogram\n");
    for (size_t i = 0; i < mx->n_methods; i++) {
        uint64_t cum = 0;
        for (int b = 0; b <= MSA_RPC_N_BUCKETS; b++) {
            cum += ld(&mx->m[i].buckets[b]);
            if (b < MSA_RPC_N_BUCKETS)
                fprintf(f, "msad_request_duration_seconds_bucket{method=\"%s\",le=\"%g\"} %llu\n",
                        mx->names[i], bucket_le[b], (unsigned long long)cum);
            else
                fprintf(f, "msad_request_duration_seconds_bucket{method=\"%s\",le=\"+Inf\"} %llu\n",
                        mx->names[i], (unsigned long long)cum);
        }
        fprintf(f, "msad_request_duration_seconds_sum{method=\"%s\"} %.6f\n", mx->names[i],
                (double)ld(&mx->m[i].sum_us) * 1e-6);
        fprintf(f, "msad_request_duration_seconds_count{method=\"%s\"} %llu\n", mx->names[i],
                (unsigned long long)cum);
    }
    fprintf(f,
            "# HELP msad_connections Client connections open now, and the cap.\n"
            "# TYPE msad_connections gauge\nmsad_connections %llu\n"
            "# TYPE msad_connections_max gauge\nmsad_connections_max %u\n"
            "# HELP msad_connections_refused_total Connections closed at accept: past "
            "--max-connections or out of file descriptors.\n"
            "# TYPE msad_connections_refused_total counter\nmsad_connections_refused_total %llu\n",
            (unsigned long long)msa_rpc_conn_open(), msa_rpc_conn_max(),
            (unsigned long long)msa_rpc_conn_refused());
#define X(kind, key, family, help, field) family_line(f, #kind, family, help, key, ld(&mx->field));
    MSA_RPC_SERVER_COUNTERS(X)
#undef X

    msa_engine_stats_result_t *res = NULL, es;
    msa_status_t st;
    msa_status_clear(&st);
    if (e && msa_engine_stats(e, &res, &st) == MSA_OK) {
        es = *res;
        msa_engine_stats_result_free(res);
        es.backend[sizeof(es.backend) - 1] = '\0';
        fprintf(f,
                "# TYPE msad_build_info gauge\nmsad_build_info{version=\"%s\",backend=\"%s\"} 1\n",
                MSA_VERSION, es.backend);
#define X(field, family, help) family_line(f, "GAUGE", family, help, #field, es.field);
        MSA_RPC_STATS_FIELDS(X)
#undef X
#define X(kind, key, family, help, field) \
    family_line(f, #kind, family, help, key, (uint64_t)es.field);
        MSA_RPC_ENGINE_COUNTERS(X)
        if (es.n_gpu) {
            MSA_RPC_GPU_COUNTERS(X)
        }
#undef X
        if (es.n_gpu) {
            fprintf(f, "# HELP msad_gpu_memory_bytes Device memory by use.\n"
                       "# TYPE msad_gpu_memory_bytes gauge\n");
            for (unsigned i = 0; i < es.n_gpu; i++) {
                const msa_gpu_device_stats_t *d = &es.gpu_dev[i];
                fprintf(f, "msad_gpu_memory_bytes{device=\"%u\",use=\"routing\"} %llu\n", i,
                        (unsigned long long)d->routing_bytes);
                fprintf(f, "msad_gpu_memory_bytes{device=\"%u\",use=\"cache\"} %llu\n", i,
                        (unsigned long long)d->cache_bytes);
                fprintf(f, "msad_gpu_memory_bytes{device=\"%u\",use=\"reserved\"} %llu\n", i,
                        (unsigned long long)d->memory_used);
            }
        }
    }
    if (fclose(f) != 0) {
        free(buf);
        return NULL;
    }
    *len = n;
    return buf;
}

/* ---- HTTP endpoint (libmicrohttpd) ------------------------------------------ */

struct msa_rpc_http {
    struct MHD_Daemon *d;
    char bound[300]; /* "HOST:PORT" as bound */
    const msa_rpc_metrics_t *mx;
    msa_engine_t *e;
    _Atomic(msa_rpc_probe_fn) probe;
    void *_Atomic probe_arg;
};

void msa_rpc_http_set_probe(msa_rpc_http_t *h, msa_rpc_probe_fn fn, void *arg)
{
    atomic_store(&h->probe_arg, arg);
    atomic_store(&h->probe, fn);
}

/* /healthz: liveness as a load balancer or systemd watchdog sees it. */
static enum MHD_Result healthz(msa_rpc_http_t *h, struct MHD_Connection *conn)
{
    char msg[400] = "ok";
    int rc = MSA_OK;
    msa_rpc_probe_fn fn = atomic_load(&h->probe);
    if (fn) rc = fn(atomic_load(&h->probe_arg), msg, sizeof(msg) - 1);
    size_t n = strlen(msg);
    msg[n++] = '\n';
    struct MHD_Response *resp = MHD_create_response_from_buffer(n, msg, MHD_RESPMEM_MUST_COPY);
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", "text/plain; charset=utf-8");
    enum MHD_Result ret =
        MHD_queue_response(conn, rc == MSA_OK ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE, resp);
    MHD_destroy_response(resp);
    return ret;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    msa_rpc_http_t *h = cls;
    struct MHD_Response *resp;
    enum MHD_Result ret;
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        static const char msg[] = "method not allowed\n";
        resp =
            MHD_create_response_from_buffer(sizeof(msg) - 1, (void *)msg, MHD_RESPMEM_PERSISTENT);
        if (!resp) return MHD_NO;
        ret = MHD_queue_response(conn, MHD_HTTP_METHOD_NOT_ALLOWED, resp);
        MHD_destroy_response(resp);
        return ret;
    }
    if (strcmp(url, "/healthz") == 0) return healthz(h, conn);
    if (strcmp(url, "/metrics") != 0 && strcmp(url, "/") != 0) {
        static const char msg[] = "not found; try /metrics or /healthz\n";
        resp =
            MHD_create_response_from_buffer(sizeof(msg) - 1, (void *)msg, MHD_RESPMEM_PERSISTENT);
        if (!resp) return MHD_NO;
        ret = MHD_queue_response(conn, MHD_HTTP_NOT_FOUND, resp);
        MHD_destroy_response(resp);
        return ret;
    }
    size_t len = 0;
    char *text = msa_rpc_metrics_render(h->mx, h->e, &len);
    if (!text) return MHD_NO;
    resp = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(text);
        return MHD_NO;
    }
    MHD_add_response_header(resp, "Content-Type", "text/plain; version=0.0.4; charset=utf-8");
    ret = MHD_queue_response(conn, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp);
    return ret;
}

/* Splits "HOST:PORT", "[V6]:PORT", ":PORT" or "PORT" into a socket address. */
static int parse_addr(const char *addr, struct sockaddr_storage *ss, socklen_t *sl,
                      msa_status_t *st)
{
    char host[256] = "127.0.0.1";
    const char *port;
    const char *colon = strrchr(addr, ':');
    if (addr[0] == '[') {
        const char *end = strchr(addr, ']');
        if (!end || end[1] != ':' || (size_t)(end - addr - 1) >= sizeof(host))
            return msa_status_set(st, MSA_EINVAL, "--metrics: bad address '%s'", addr);
        memcpy(host, addr + 1, (size_t)(end - addr - 1));
        host[end - addr - 1] = '\0';
        port = end + 2;
    } else if (colon) {
        if ((size_t)(colon - addr) >= sizeof(host))
            return msa_status_set(st, MSA_EINVAL, "--metrics: bad address '%s'", addr);
        if (colon != addr) {
            memcpy(host, addr, (size_t)(colon - addr));
            host[colon - addr] = '\0';
        }
        port = colon + 1;
    } else {
        port = addr;
    }
    char *end = NULL;
    unsigned long p = strtoul(port, &end, 10);
    if (!*port || *end || p > 65535)
        return msa_status_set(st, MSA_EINVAL, "--metrics: bad port in '%s'", addr);
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    if (getaddrinfo(host, port, &hints, &res) != 0 || !res)
        return msa_status_set(st, MSA_EINVAL, "--metrics: cannot resolve host '%s'", host);
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *sl = res->ai_addrlen;
    freeaddrinfo(res);
    return MSA_OK;
}

int msa_rpc_http_start(const char *addr, const msa_rpc_metrics_t *mx, msa_engine_t *e,
                       msa_rpc_http_t **out, msa_status_t *st)
{
    struct sockaddr_storage ss;
    socklen_t sl = 0;
    int rc = parse_addr(addr, &ss, &sl, st);
    if (rc != MSA_OK) return rc;
    msa_rpc_http_t *h = calloc(1, sizeof(*h));
    if (!h) return msa_status_set(st, MSA_ENOMEM, "--metrics: out of memory");
    h->mx = mx;
    h->e = e;
    /* poll/epoll, not select: descriptor numbers grow past FD_SETSIZE when
     * many clients are connected, and select would refuse them. */
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_USE_ERROR_LOG;
    uint16_t port;
    if (ss.ss_family == AF_INET6) {
        flags |= MHD_USE_IPv6;
        port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    } else {
        port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    }
    h->d = MHD_start_daemon(flags, port, NULL, NULL, on_request, h, MHD_OPTION_SOCK_ADDR,
                            (struct sockaddr *)&ss, MHD_OPTION_CONNECTION_LIMIT,
                            (unsigned)MSA_RPC_HTTP_MAX_CONN, MHD_OPTION_CONNECTION_TIMEOUT,
                            (unsigned)5, MHD_OPTION_END);
    if (!h->d) {
        free(h);
        return msa_status_set(st, MSA_EIO, "--metrics: cannot listen on %s", addr);
    }
    /* Its connections are limited by MHD, not by --max-connections. */
    const union MHD_DaemonInfo *lfd = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_LISTEN_FD);
    if (lfd) msa_rpc_conn_exempt(lfd->listen_fd);
    char host[INET6_ADDRSTRLEN] = "?";
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
    if (di && di->port) port = di->port;
    if (ss.ss_family == AF_INET6) {
        inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, host, sizeof(host));
        snprintf(h->bound, sizeof(h->bound), "[%s]:%u", host, (unsigned)port);
    } else {
        inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, host, sizeof(host));
        snprintf(h->bound, sizeof(h->bound), "%s:%u", host, (unsigned)port);
    }
    *out = h;
    return MSA_OK;
}

const char *msa_rpc_http_bound(const msa_rpc_http_t *h)
{
    return h->bound;
}

void msa_rpc_http_stop(msa_rpc_http_t *h)
{
    if (!h) return;
    MHD_stop_daemon(h->d);
    free(h);
}
