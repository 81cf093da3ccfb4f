/* server.c — the gRPC core server of msad (see server.h for the thread model).
 *
 * Sections: status mapping; calls (state machine); handler pool; pollers;
 * start; shutdown.
 *
 * A call's life:
 *   WAIT  requested with grpc_server_request_registered_call (metadata
 *         only); its tag completes on the poller of its completion queue.
 *         The poller requests a replacement and checks shutdown and auth from
 *         the initial metadata, before a byte of the payload is read.
 *   RECV  the payload is being received; its completion runs the handler
 *         inline (health) or queues it for a handler.
 *   SEND  the reply batch (initial metadata, message, status, recv close)
 *         was started; its completion frees the call on the poller.
 * Every path ends in reply(), which starts the SEND batch exactly once.
 */
#include "server.h"

#include "arena.h"
#include "connlimit.h"
#include "methods.h"
#include "msa_clock.h"
#include "msa_log.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

#include <errno.h>
#include <netdb.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define REQUESTS_PER_METHOD 4 /* outstanding requested calls per method and CQ */
#define DEFAULT_MAX_MESSAGE (256u << 20)
/* Shutdown answers new calls UNAVAILABLE for at least this long before gRPC
 * stops accepting: a client that sends its next call right after its last
 * answer then gets UNAVAILABLE (retryable) rather than the CANCELLED that gRPC
 * gives streams racing its GOAWAY. */
#define LAME_DUCK_MIN_MS 100

/* ==== status mapping ============================================================ */

int msa_rpc_grpc_status(int msa_code)
{
    switch (msa_code) {
    case MSA_OK:
        return GRPC_STATUS_OK;
    case MSA_EINVAL:
        return GRPC_STATUS_INVALID_ARGUMENT;
    case MSA_ENOTFOUND:
        return GRPC_STATUS_NOT_FOUND;
    case MSA_EEXIST:
        return GRPC_STATUS_ALREADY_EXISTS;
    case MSA_EPRECOND:
        return GRPC_STATUS_FAILED_PRECONDITION;
    case MSA_EFULL:
        return GRPC_STATUS_RESOURCE_EXHAUSTED;
    case MSA_ENOMEM:
        return GRPC_STATUS_RESOURCE_EXHAUSTED;
    case MSA_EUNAUTH:
        return GRPC_STATUS_UNAUTHENTICATED;
    case MSA_EPERM:
        return GRPC_STATUS_PERMISSION_DENIED;
    case MSA_EUNAVAIL:
        return GRPC_STATUS_UNAVAILABLE;
    case MSA_ETIMEOUT:
        return GRPC_STATUS_DEADLINE_EXCEEDED;
    /* Stored bytes that fail their checksum: unrecoverable loss of data. */
    case MSA_ECORRUPT:
        return GRPC_STATUS_DATA_LOSS;
    case MSA_EINTERNAL:
    case MSA_EBROKEN:
    case MSA_EIO:
    default:
        return GRPC_STATUS_INTERNAL;
    }
}

/* ==== types ======================================================================= */

enum { CALL_WAIT = 1, CALL_RECV = 2, CALL_SEND = 3 };

typedef struct poller poller_t;

typedef struct call {
    int state; /* CALL_WAIT / CALL_RECV / CALL_SEND */
    msa_rpc_server_t *srv;
    poller_t *pl;  /* whose CQ the call is bound to */
    size_t method; /* index into msa__rpc_methods */
    uint64_t id;   /* request id for logs */
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_byte_buffer *payload; /* request; NULL when none arrived */
    uint64_t queued_bytes;     /* payload bytes counted in the queue's budget */
    grpc_byte_buffer *resp;    /* response; NULL on error */
    grpc_slice details;        /* status message */
    int code;                  /* gRPC status sent */
    int cancelled;             /* from RECV_CLOSE_ON_SERVER */
    int active;                /* passed the gate: counted in srv->active */
    int64_t t0_ns;             /* arrival, CLOCK_MONOTONIC */
    msa_rpc_arena_t arena;
    struct call *next; /* handler queue link */
} call_t;

struct poller {
    msa_rpc_server_t *srv;
    grpc_completion_queue *cq;
    pthread_t thread;
    int started;
};

struct msa_rpc_server {
    msa_engine_t *engine;
    grpc_server *server;
    void **method_tags; /* per method, from grpc_server_register_method */
    poller_t *pollers;
    unsigned n_pollers;
    pthread_t *handlers;
    unsigned n_handlers;
    unsigned n_handlers_started;
    unsigned max_queue;
    uint64_t max_queue_bytes;
    unsigned max_conn;          /* client connections at once (connlimit) */
    grpc_resource_quota *quota; /* receive memory of all connections */
    const msa_rpc_auth_t *auth;
    msa_rpc_metrics_t metrics;
    msa_rpc_ctx_t ctx;
    char **bound; /* printable bound addresses */
    size_t n_bound;
    atomic_int draining;         /* shutdown began: new calls UNAVAILABLE, health NOT_SERVING */
    atomic_int stopping;         /* gRPC shutdown began: no re-requests */
    atomic_uint_fast64_t active; /* calls past the gate, not yet answered */
    atomic_uint_fast64_t next_id;

    /* handler queue */
    pthread_mutex_t q_mu;
    pthread_cond_t q_cv;
    call_t *q_head, *q_tail;
    size_t q_len;
    uint64_t q_bytes; /* request bytes of the queued calls */
    int q_quit;       /* handlers exit once the queue is empty */

    /* shutdown notification (tag completes on pollers[0]) */
    pthread_mutex_t sd_mu;
    pthread_cond_t sd_cv;
    int sd_done;
    char sd_tag; /* its address is the tag */
    int shut;    /* msa_rpc_server_shutdown finished */
};

static int64_t now_ns(void)
{
    return msa_clock_ns();
}

/* grpc's deadline -> the engine's CLOCK_MONOTONIC milliseconds (0 = none).
 * Converted through "time left" so that gRPC's clock bases do not matter. */
static int64_t deadline_ms(gpr_timespec d)
{
    if (d.tv_sec == INT64_MAX || gpr_time_cmp(d, gpr_inf_future(d.clock_type)) == 0) return 0;
    gpr_timespec left = gpr_time_sub(d, gpr_now(d.clock_type));
    int64_t ms = gpr_time_to_millis(left);
    if (ms > (int64_t)365 * 24 * 3600 * 1000) return 0; /* effectively none */
    int64_t dl = msa__rpc_now_ms() + ms;
    return dl > 0 ? dl : 1;
}

/* ==== calls ========================================================================== */

static void call_free(call_t *c)
{
    if (c->call) grpc_call_unref(c->call);
    grpc_metadata_array_destroy(&c->md);
    if (c->payload) grpc_byte_buffer_destroy(c->payload);
    if (c->resp) grpc_byte_buffer_destroy(c->resp);
    grpc_slice_unref(c->details);
    msa_rpc_arena_reset(&c->arena);
    free(c);
}

/* Requests one more call of `method` on poller pl's CQ. */
static void request_call(msa_rpc_server_t *s, poller_t *pl, size_t method)
{
    if (atomic_load(&s->stopping)) return;
    call_t *c = calloc(1, sizeof(*c));
    if (!c) {
        msa_log(MSA_LOG_ERROR, "out of memory requesting a call of %s",
                msa__rpc_methods[method].name);
        return;
    }
    c->state = CALL_WAIT;
    c->srv = s;
    c->pl = pl;
    c->method = method;
    c->details = grpc_empty_slice();
    grpc_metadata_array_init(&c->md);
    msa_rpc_arena_init(&c->arena);
    grpc_call_error err = grpc_server_request_registered_call(
        s->server, s->method_tags[method], &c->call, &c->deadline, &c->md, NULL, pl->cq, pl->cq, c);
    if (err != GRPC_CALL_OK) {
        /* Only expected while shutting down. */
        if (!atomic_load(&s->stopping))
            msa_log(MSA_LOG_ERROR, "grpc_server_request_registered_call(%s): error %d",
                    msa__rpc_methods[method].name, (int)err);
        c->call = NULL;
        call_free(c);
    }
}

static int log_level_for(int code)
{
    switch (code) {
    case GRPC_STATUS_INTERNAL:
    case GRPC_STATUS_UNKNOWN:
    case GRPC_STATUS_DATA_LOSS:
        return MSA_LOG_ERROR;
    case GRPC_STATUS_RESOURCE_EXHAUSTED:
    case GRPC_STATUS_UNAVAILABLE:
        return MSA_LOG_WARN;
    case GRPC_STATUS_UNAUTHENTICATED:
    case GRPC_STATUS_PERMISSION_DENIED:
        return MSA_LOG_INFO;
    default:
        return MSA_LOG_DEBUG; /* the client's mistake; the client got the message */
    }
}

/* Sends the reply: status from rc/st, message from c->resp when rc is OK.
 * This is where an engine error becomes an RPC status, so it is logged here. */
static void reply(call_t *c, int rc, const msa_status_t *st)
{
    msa_rpc_server_t *s = c->srv;
    c->code = msa_rpc_grpc_status(rc);
    if (rc != MSA_OK) {
        const char *msg = (st && st->msg[0]) ? st->msg : msa_strerror(rc);
        msa_log(log_level_for(c->code), "req %llu %s: %s: %s", (unsigned long long)c->id,
                msa__rpc_methods[c->method].name, msa_rpc_code_name(c->code), msg);
        grpc_slice_unref(c->details);
        c->details = grpc_slice_from_copied_string(msg);
        if (c->resp) {
            grpc_byte_buffer_destroy(c->resp);
            c->resp = NULL;
        }
    }
    grpc_op ops[4];
    memset(ops, 0, sizeof(ops));
    size_t n = 0;
    ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[n].data.send_initial_metadata.count = 0;
    n++;
    if (c->resp) {
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = c->resp;
        n++;
    }
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.trailing_metadata_count = 0;
    ops[n].data.send_status_from_server.status = (grpc_status_code)c->code;
    ops[n].data.send_status_from_server.status_details = &c->details;
    n++;
    ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[n].data.recv_close_on_server.cancelled = &c->cancelled;
    n++;
    c->state = CALL_SEND;
    grpc_call_error err = grpc_call_start_batch(c->call, ops, n, c, NULL);
    if (err != GRPC_CALL_OK) {
        /* No completion will come: account and free here. */
        msa_log(MSA_LOG_ERROR, "req %llu %s: grpc_call_start_batch: error %d",
                (unsigned long long)c->id, msa__rpc_methods[c->method].name, (int)err);
        msa_rpc_metrics_record(&s->metrics, c->method, c->code, (uint64_t)(now_ns() - c->t0_ns));
        atomic_fetch_sub(&s->metrics.inflight, 1);
        if (c->active) atomic_fetch_sub(&s->active, 1);
        call_free(c);
    }
}

/* Decodes nothing itself: flattens the payload, runs the method's handler and
 * replies. Runs on a handler thread (or on the poller for on_poller methods). */
static void handle(call_t *c)
{
    msa_rpc_server_t *s = c->srv;
    const msa_rpc_method_t *m = &msa__rpc_methods[c->method];
    msa_status_t st;
    msa_status_clear(&st);
    int rc;
    grpc_slice flat = grpc_empty_slice();

    int64_t dl = deadline_ms(c->deadline);
    if (dl && msa__rpc_now_ms() >= dl) {
        rc = msa_status_set(&st, MSA_ETIMEOUT, "deadline passed before the call was handled");
        goto done;
    }
    if (!c->payload) {
        rc = msa_status_set(&st, MSA_EINVAL, "request: no message received");
        goto done;
    }
    /* One contiguous buffer for protobuf-c. A single uncompressed slice is
     * used as it is; anything else is copied once. */
    if (c->payload->type == GRPC_BB_RAW && c->payload->data.raw.compression == GRPC_COMPRESS_NONE &&
        c->payload->data.raw.slice_buffer.count == 1) {
        flat = grpc_slice_ref(c->payload->data.raw.slice_buffer.slices[0]);
    } else {
        grpc_byte_buffer_reader rd;
        if (!grpc_byte_buffer_reader_init(&rd, c->payload)) {
            rc = msa_status_set(&st, MSA_EINVAL, "request: cannot decompress the message");
            goto done;
        }
        flat = grpc_byte_buffer_reader_readall(&rd);
        grpc_byte_buffer_reader_destroy(&rd);
    }
    atomic_fetch_add_explicit(&s->metrics.bytes_in, GRPC_SLICE_LENGTH(flat), memory_order_relaxed);

    msa_rpc_req_t req = {.data = GRPC_SLICE_START_PTR(flat),
                         .len = GRPC_SLICE_LENGTH(flat),
                         .deadline_ms = dl,
                         .arena = &c->arena};
    msa_rpc_reply_t rep = {NULL, 0};
    rc = m->fn(&s->ctx, &req, &rep, &st);
    if (rc == MSA_OK) {
        /* The packed buffer becomes the slice: no copy on the way out. */
        grpc_slice out = grpc_slice_new(rep.data, rep.len, free);
        c->resp = grpc_raw_byte_buffer_create(&out, 1);
        grpc_slice_unref(out);
        atomic_fetch_add_explicit(&s->metrics.bytes_out, rep.len, memory_order_relaxed);
    } else {
        free(rep.data);
        if (rc == MSA_ETIMEOUT && !st.msg[0])
            msa_status_set(&st, MSA_ETIMEOUT, "deadline exceeded");
    }
done:
    grpc_slice_unref(flat);
    /* The request's unpacked form is no longer needed; the response owns its
     * bytes. Free the arena now rather than after the send completes. */
    msa_rpc_arena_reset(&c->arena);
    reply(c, rc, &st);
}

/* Finds the authorization header among the request metadata. */
static const grpc_slice *find_auth(const grpc_metadata_array *md)
{
    for (size_t i = 0; i < md->count; i++)
        if (grpc_slice_str_cmp(md->metadata[i].key, "authorization") == 0)
            return &md->metadata[i].value;
    return NULL;
}

/* ==== handler pool ====================================================================== */

/* Queues c for a handler; MSA_EFULL when the queue is at its limit in calls
 * or in request bytes. The byte budget bounds what queued requests hold in
 * memory however large each one is (up to --max-message-mb). */
static int enqueue(msa_rpc_server_t *s, call_t *c, msa_status_t *st)
{
    uint64_t bytes = c->payload ? (uint64_t)grpc_byte_buffer_length(c->payload) : 0;
    pthread_mutex_lock(&s->q_mu);
    if (s->q_len >= s->max_queue) {
        pthread_mutex_unlock(&s->q_mu);
        return msa_status_set(
            st, MSA_EFULL, "too many concurrent requests (%u queued); retry later", s->max_queue);
    }
    /* One call always fits an empty queue, so a large request still runs. */
    if (s->q_len && s->q_bytes + bytes > s->max_queue_bytes) {
        uint64_t held = s->q_bytes;
        pthread_mutex_unlock(&s->q_mu);
        return msa_status_set(
            st, MSA_EFULL,
            "too many concurrent requests: %llu bytes of requests queued, this one "
            "%llu, limit %llu (--max-queue-mb); retry later",
            (unsigned long long)held, (unsigned long long)bytes,
            (unsigned long long)s->max_queue_bytes);
    }
    c->next = NULL;
    c->queued_bytes = bytes;
    if (s->q_tail)
        s->q_tail->next = c;
    else
        s->q_head = c;
    s->q_tail = c;
    s->q_len++;
    s->q_bytes += bytes;
    atomic_fetch_add(&s->metrics.queued, 1);
    atomic_fetch_add(&s->metrics.queued_bytes, bytes);
    pthread_cond_signal(&s->q_cv);
    pthread_mutex_unlock(&s->q_mu);
    return MSA_OK;
}

static void *handler_main(void *arg)
{
    msa_rpc_server_t *s = arg;
    for (;;) {
        pthread_mutex_lock(&s->q_mu);
        while (!s->q_head && !s->q_quit) pthread_cond_wait(&s->q_cv, &s->q_mu);
        call_t *c = s->q_head;
        if (!c) { /* quit and drained */
            pthread_mutex_unlock(&s->q_mu);
            return NULL;
        }
        s->q_head = c->next;
        if (!s->q_head) s->q_tail = NULL;
        s->q_len--;
        s->q_bytes -= c->queued_bytes;
        atomic_fetch_sub(&s->metrics.queued, 1);
        atomic_fetch_sub(&s->metrics.queued_bytes, c->queued_bytes);
        pthread_mutex_unlock(&s->q_mu);
        handle(c);
    }
}

/* ==== pollers ============================================================================ */

/* A requested call arrived with its metadata: re-arm, gatekeep, then start
 * receiving the payload. Shutdown and the token are checked here, before any
 * of the payload is read: a refused caller's body stays in the client's
 * flow-control window and never in msad's memory. */
static void on_new_call(call_t *c)
{
    msa_rpc_server_t *s = c->srv;
    const msa_rpc_method_t *m = &msa__rpc_methods[c->method];
    msa_status_t st;
    msa_status_clear(&st);
    int rc;

    c->t0_ns = now_ns();
    c->id = atomic_fetch_add(&s->next_id, 1) + 1;
    atomic_fetch_add(&s->metrics.inflight, 1);
    request_call(s, c->pl, c->method);

    /* Health checks still answer while draining (NOT_SERVING). */
    if (atomic_load(&s->draining) && !m->on_poller) {
        rc = msa_status_set(&st, MSA_EUNAVAIL, "msad is shutting down");
        goto fail;
    }
    c->active = 1;
    atomic_fetch_add(&s->active, 1);
    if (s->auth && m->scope != MSA_RPC_SCOPE_NONE) {
        const grpc_slice *v = find_auth(&c->md);
        rc = msa_rpc_auth_check(s->auth, v ? (const char *)GRPC_SLICE_START_PTR(*v) : NULL,
                                v ? GRPC_SLICE_LENGTH(*v) : 0, m->scope, &st);
        if (rc) goto fail;
    }
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->payload;
    c->state = CALL_RECV;
    grpc_call_error err = grpc_call_start_batch(c->call, &op, 1, c, NULL);
    if (err != GRPC_CALL_OK) {
        rc = msa_status_set(&st, MSA_EINTERNAL, "grpc_call_start_batch(recv): error %d", (int)err);
        goto fail;
    }
    return;
fail:
    reply(c, rc, &st);
}

/* The payload arrived (or the client went away): dispatch. */
static void on_received(call_t *c, int success)
{
    msa_rpc_server_t *s = c->srv;
    const msa_rpc_method_t *m = &msa__rpc_methods[c->method];
    msa_status_t st;
    msa_status_clear(&st);
    int rc;
    if (!success) {
        rc = msa_status_set(&st, MSA_EINVAL, "request: the message could not be received");
        goto fail;
    }
    if (m->on_poller) {
        handle(c);
        return;
    }
    if ((rc = enqueue(s, c, &st)) != MSA_OK) {
        atomic_fetch_add(&s->metrics.busy_rejects, 1);
        goto fail;
    }
    return;
fail:
    reply(c, rc, &st);
}

static void on_sent(call_t *c)
{
    msa_rpc_server_t *s = c->srv;
    msa_rpc_metrics_record(&s->metrics, c->method, c->code, (uint64_t)(now_ns() - c->t0_ns));
    atomic_fetch_sub(&s->metrics.inflight, 1);
    if (c->active) atomic_fetch_sub(&s->active, 1);
    if (c->cancelled && c->code == GRPC_STATUS_OK)
        msa_log(MSA_LOG_DEBUG, "req %llu %s: cancelled by the client or its deadline",
                (unsigned long long)c->id, msa__rpc_methods[c->method].name);
    call_free(c);
}

static void *poller_main(void *arg)
{
    poller_t *pl = arg;
    msa_rpc_server_t *s = pl->srv;
    for (;;) {
        grpc_event ev =
            grpc_completion_queue_next(pl->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
        if (ev.type != GRPC_OP_COMPLETE) continue;
        if (ev.tag == &s->sd_tag) {
            pthread_mutex_lock(&s->sd_mu);
            s->sd_done = 1;
            pthread_cond_broadcast(&s->sd_cv);
            pthread_mutex_unlock(&s->sd_mu);
            continue;
        }
        call_t *c = ev.tag;
        if (c->state == CALL_WAIT) {
            if (!ev.success) { /* the server is shutting down: the request is void */
                call_free(c);
                continue;
            }
            on_new_call(c);
        } else if (c->state == CALL_RECV) {
            on_received(c, ev.success);
        } else {
            on_sent(c);
        }
    }
    return NULL;
}

/* ==== start ================================================================================ */

static unsigned online_cpus(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (unsigned)n : 1;
}

/* The file system path of a "unix:" address, or NULL. */
static const char *unix_path(const char *addr)
{
    if (strncmp(addr, "unix:", 5) != 0) return NULL;
    const char *p = addr + 5;
    if (p[0] == '/' && p[1] == '/') p += 2; /* unix:///abs/path */
    return p;
}

static int bind_all(msa_rpc_server_t *s, const msa_rpc_server_opts_t *o, msa_status_t *st)
{
    grpc_server_credentials *creds = NULL;
    if (o->tls_cert_pem || o->tls_key_pem) {
        if (!o->tls_cert_pem || !o->tls_key_pem)
            return msa_status_set(st, MSA_EINVAL, "TLS needs both --tls-cert and --tls-key");
        grpc_ssl_pem_key_cert_pair pair = {.private_key = o->tls_key_pem,
                                           .cert_chain = o->tls_cert_pem};
        creds = grpc_ssl_server_credentials_create_ex(
            o->tls_client_ca_pem, &pair, 1,
            o->tls_client_ca_pem ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                 : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
            NULL);
        if (!creds) return msa_status_set(st, MSA_EINVAL, "TLS: cannot build server credentials");
    }
    int rc = MSA_OK;
    s->bound = calloc(o->n_listen ? o->n_listen : 1, sizeof(char *));
    if (!s->bound) {
        rc = msa_status_set(st, MSA_ENOMEM, "out of memory");
        goto fail;
    }
    for (size_t i = 0; i < o->n_listen; i++) {
        const char *addr = o->listen[i];
        const char *upath = unix_path(addr);
        grpc_server_credentials *c = creds ? creds : grpc_insecure_server_credentials_create();
        /* The socket file is created by the bind: umask it to 0660 from the
         * start, so it is never briefly open to others before the chmod. */
        mode_t old_umask = upath ? umask(0117) : 0;
        int port = grpc_server_add_http2_port(s->server, addr, c);
        if (upath) umask(old_umask);
        if (!creds) grpc_server_credentials_release(c);
        if (port <= 0) {
            rc = msa_status_set(st, MSA_EIO,
                                "--listen %s: cannot bind (in use, bad address or "
                                "no permission)",
                                addr);
            goto fail;
        }
        char buf[600];
        if (upath) {
            /* Clients of the same group may connect; others may not. */
            if (chmod(upath, 0660) != 0)
                msa_log(MSA_LOG_WARN, "chmod 0660 %s: %s", upath, strerror(errno));
            snprintf(buf, sizeof(buf), "%s", addr);
        } else {
            /* Print the real port when 0 was asked. */
            const char *colon = strrchr(addr, ':');
            size_t hl = colon ? (size_t)(colon - addr) : strlen(addr);
            if (hl > 500) hl = 500;
            snprintf(buf, sizeof(buf), "%.*s:%d", (int)hl, addr, port);
        }
        s->bound[i] = strdup(buf);
        if (!s->bound[i]) {
            rc = msa_status_set(st, MSA_ENOMEM, "out of memory");
            goto fail;
        }
        s->n_bound = i + 1;
    }
fail:
    if (creds) grpc_server_credentials_release(creds);
    return rc;
}

/* Frees what start allocated, once the gRPC server is destroyed and every
 * thread has stopped; shared by start's failure path and destroy. */
static void release(msa_rpc_server_t *s)
{
    if (s->pollers)
        for (unsigned i = 0; i < s->n_pollers; i++)
            if (s->pollers[i].cq) grpc_completion_queue_destroy(s->pollers[i].cq);
    for (size_t i = 0; i < s->n_bound; i++) free(s->bound[i]);
    free(s->bound);
    free(s->method_tags);
    free(s->pollers);
    free(s->handlers);
    if (s->quota) grpc_resource_quota_unref(s->quota);
    msa_rpc_metrics_free(&s->metrics);
    pthread_mutex_destroy(&s->q_mu);
    pthread_cond_destroy(&s->q_cv);
    pthread_mutex_destroy(&s->sd_mu);
    pthread_cond_destroy(&s->sd_cv);
    free(s);
    grpc_shutdown();
}

int msa_rpc_server_start(msa_engine_t *e, const msa_rpc_server_opts_t *o, msa_rpc_server_t **out,
                         msa_status_t *st)
{
    int rc = MSA_OK;
    if (o->n_listen == 0) return msa_status_set(st, MSA_EINVAL, "no listen address");
    size_t max_msg = o->max_message ? o->max_message : DEFAULT_MAX_MESSAGE;
    if (max_msg > (size_t)INT32_MAX)
        return msa_status_set(st, MSA_EINVAL, "max message size %zu bytes: at most %d", max_msg,
                              INT32_MAX);

    grpc_init();
    msa_rpc_server_t *s = calloc(1, sizeof(*s));
    if (!s) {
        grpc_shutdown();
        return msa_status_set(st, MSA_ENOMEM, "out of memory");
    }
    s->engine = e;
    s->auth = o->auth;
    s->max_queue = o->max_queue ? o->max_queue : 4096;
    s->max_queue_bytes = o->max_queue_bytes ? o->max_queue_bytes : (1ull << 30);
    s->n_pollers = o->pollers ? o->pollers : online_cpus();
    s->n_handlers = o->handlers ? o->handlers : (4 * s->n_pollers < 16 ? 16 : 4 * s->n_pollers);
    atomic_init(&s->stopping, 0);
    atomic_init(&s->draining, 0);
    atomic_init(&s->active, 0);
    atomic_init(&s->next_id, 0);
    pthread_mutex_init(&s->q_mu, NULL);
    pthread_cond_init(&s->q_cv, NULL);
    pthread_mutex_init(&s->sd_mu, NULL);
    pthread_cond_init(&s->sd_cv, NULL);
    if (msa_rpc_metrics_init(&s->metrics, msa__rpc_n_methods, msa__rpc_method_names) != MSA_OK) {
        rc = msa_status_set(st, MSA_ENOMEM, "out of memory");
        goto fail;
    }
    s->ctx.engine = e;
    s->ctx.metrics = &s->metrics;
    s->ctx.max_send = max_msg;
    s->ctx.stopping = &s->draining;

    /* The connection cap: never so many that client sockets could take the
     * descriptors the store, backups and gRPC itself need. */
    uint64_t nofile = msa_rpc_conn_raise_nofile();
    uint64_t fd_cap = nofile > 2 * MSA_RPC_FD_RESERVE ? nofile - MSA_RPC_FD_RESERVE : nofile / 2;
    s->max_conn = o->max_connections ? o->max_connections : 1024;
    if (s->max_conn > fd_cap) {
        if (o->max_connections)
            msa_log(
                MSA_LOG_WARN,
                "--max-connections %u: the file limit (%llu, `ulimit -n`) leaves room for %llu; "
                "using %llu",
                o->max_connections, (unsigned long long)nofile, (unsigned long long)fd_cap,
                (unsigned long long)fd_cap);
        s->max_conn = (unsigned)fd_cap;
    }
    if (s->max_conn == 0) {
        rc = msa_status_set(st, MSA_EINVAL, "file limit %llu (`ulimit -n`): too low to serve",
                            (unsigned long long)nofile);
        goto fail;
    }
    unsigned idle_ms = o->idle_timeout_ms ? o->idle_timeout_ms : 300000;
    unsigned hs_ms = o->handshake_timeout_ms ? o->handshake_timeout_ms : 10000;

    grpc_arg args[6];
    memset(args, 0, sizeof(args));
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = (int)max_msg;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = (char *)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[1].value.integer = (int)max_msg;
    /* Without this a second daemon could bind the same port silently. */
    args[2].type = GRPC_ARG_INTEGER;
    args[2].key = (char *)GRPC_ARG_ALLOW_REUSEPORT;
    args[2].value.integer = 0;
    /* A connection that holds a slot without calls, or that never finishes
     * its TLS and HTTP/2 setup, is closed: idle sockets cannot pin the cap. */
    args[3].type = GRPC_ARG_INTEGER;
    args[3].key = (char *)GRPC_ARG_MAX_CONNECTION_IDLE_MS;
    args[3].value.integer = (int)(idle_ms > INT32_MAX ? INT32_MAX : idle_ms);
    args[4].type = GRPC_ARG_INTEGER;
    args[4].key = (char *)GRPC_ARG_SERVER_HANDSHAKE_TIMEOUT_MS;
    args[4].value.integer = (int)(hs_ms > INT32_MAX ? INT32_MAX : hs_ms);
    /* Bytes received on every connection together, queued or still
     * arriving: gRPC charges its read buffers to this quota and, past it,
     * shrinks flow-control windows and cancels the streams holding the most
     * (RESOURCE_EXHAUSTED). Room for the queue's budget plus one message
     * arriving, so the queue's own check (with its clearer message) comes
     * first. gRPC enforces it softly: test_hostile measures the overshoot. */
    s->quota = grpc_resource_quota_create("msad");
    grpc_resource_quota_resize(s->quota, (size_t)(s->max_queue_bytes + max_msg));
    args[5].type = GRPC_ARG_POINTER;
    args[5].key = (char *)GRPC_ARG_RESOURCE_QUOTA;
    args[5].value.pointer.p = s->quota;
    args[5].value.pointer.vtable = grpc_resource_quota_arg_vtable();
    grpc_channel_args cargs = {.num_args = 6, .args = args};
    s->server = grpc_server_create(&cargs, NULL);
    if (!s->server) {
        rc = msa_status_set(st, MSA_EINTERNAL, "grpc_server_create failed");
        goto fail;
    }
    s->method_tags = calloc(msa__rpc_n_methods, sizeof(void *));
    s->pollers = calloc(s->n_pollers, sizeof(poller_t));
    s->handlers = calloc(s->n_handlers, sizeof(pthread_t));
    if (!s->method_tags || !s->pollers || !s->handlers) {
        rc = msa_status_set(st, MSA_ENOMEM, "out of memory");
        goto fail;
    }
    for (size_t i = 0; i < msa__rpc_n_methods; i++) {
        s->method_tags[i] = grpc_server_register_method(s->server, msa__rpc_methods[i].path, NULL,
                                                        GRPC_SRM_PAYLOAD_NONE, 0);
        if (!s->method_tags[i]) {
            rc = msa_status_set(st, MSA_EINTERNAL, "cannot register %s", msa__rpc_methods[i].path);
            goto fail;
        }
    }
    for (unsigned i = 0; i < s->n_pollers; i++) {
        s->pollers[i].srv = s;
        s->pollers[i].cq = grpc_completion_queue_create_for_next(NULL);
        grpc_server_register_completion_queue(s->server, s->pollers[i].cq, NULL);
    }
    if ((rc = bind_all(s, o, st)) != MSA_OK) goto fail;
    if (msa_rpc_conn_arm(s->max_conn, o->tls_cert_pem == NULL) != 0) {
        rc = msa_status_set(st, MSA_ENOMEM, "out of memory (connection table)");
        goto fail;
    }
    grpc_server_start(s->server);

    for (unsigned i = 0; i < s->n_pollers; i++)
        for (size_t m = 0; m < msa__rpc_n_methods; m++)
            for (int k = 0; k < REQUESTS_PER_METHOD; k++) request_call(s, &s->pollers[i], m);
    for (unsigned i = 0; i < s->n_handlers; i++) {
        if (pthread_create(&s->handlers[i], NULL, handler_main, s) != 0) {
            rc = msa_status_set(st, MSA_ENOMEM, "cannot start handler thread %u", i);
            goto fail_running;
        }
        s->n_handlers_started++;
    }
    for (unsigned i = 0; i < s->n_pollers; i++) {
        if (pthread_create(&s->pollers[i].thread, NULL, poller_main, &s->pollers[i]) != 0) {
            rc = msa_status_set(st, MSA_ENOMEM, "cannot start poller thread %u", i);
            goto fail_running;
        }
        s->pollers[i].started = 1;
    }
    msa_log(MSA_LOG_INFO,
            "rpc: %u pollers, %u handlers, queue %u, max message %zu bytes, auth %s, tls %s",
            s->n_pollers, s->n_handlers, s->max_queue, max_msg, s->auth ? "tokens" : "off",
            o->tls_cert_pem ? (o->tls_client_ca_pem ? "mutual" : "on") : "off");
    msa_log(MSA_LOG_INFO,
            "rpc: at most %u connections (file limit %llu), idle ones closed after %u ms, "
            "setup within %u ms",
            s->max_conn, (unsigned long long)nofile, idle_ms, hs_ms);
    *out = s;
    return MSA_OK;

fail_running:
    msa_rpc_server_destroy(s);
    return rc;
fail:
    /* Nothing was started: tear down what exists. */
    if (s->server) {
        if (s->pollers && s->pollers[0].cq) {
            atomic_store(&s->stopping, 1);
            grpc_server_shutdown_and_notify(s->server, s->pollers[0].cq, &s->sd_tag);
            grpc_server_cancel_all_calls(s->server);
            for (unsigned i = 0; i < s->n_pollers; i++) {
                if (!s->pollers[i].cq) continue;
                grpc_completion_queue_shutdown(s->pollers[i].cq);
                for (;;) {
                    grpc_event ev = grpc_completion_queue_next(
                        s->pollers[i].cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
                    if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
                    if (ev.type == GRPC_OP_COMPLETE && ev.tag != &s->sd_tag) call_free(ev.tag);
                }
            }
        }
        grpc_server_destroy(s->server);
    }
    release(s);
    return rc;
}

const char *msa_rpc_server_bound(const msa_rpc_server_t *s, size_t i)
{
    return i < s->n_bound ? s->bound[i] : NULL;
}

const msa_rpc_metrics_t *msa_rpc_server_metrics(const msa_rpc_server_t *s)
{
    return &s->metrics;
}

unsigned msa_rpc_server_max_connections(const msa_rpc_server_t *s)
{
    return s->max_conn;
}

/* A socket connected (or connecting) to the bound address a; -1 on failure.
 * Wildcard hosts are probed on loopback. */
static int probe_connect(const char *a)
{
    const char *upath = unix_path(a);
    if (upath) {
        struct sockaddr_un un;
        memset(&un, 0, sizeof(un));
        un.sun_family = AF_UNIX;
        if (strlen(upath) >= sizeof(un.sun_path)) return -1;
        strcpy(un.sun_path, upath);
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0) return -1;
        if (connect(fd, (struct sockaddr *)&un, sizeof(un)) != 0 && errno != EINPROGRESS) {
            close(fd);
            return -1;
        }
        return fd;
    }
    const char *colon = strrchr(a, ':');
    if (!colon) return -1;
    char host[300];
    size_t hl = (size_t)(colon - a);
    if (hl >= sizeof(host)) return -1;
    memcpy(host, a, hl);
    host[hl] = '\0';
    char *h = host;
    if (h[0] == '[' && hl >= 2 && h[hl - 1] == ']') {
        h[hl - 1] = '\0';
        h++;
    }
    if (!*h || !strcmp(h, "0.0.0.0"))
        h = "127.0.0.1";
    else if (!strcmp(h, "::"))
        h = "::1";
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    if (getaddrinfo(h, colon + 1, &hints, &res) != 0 || !res) return -1;
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) != 0 && errno != EINPROGRESS) {
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd;
}

int msa_rpc_server_probe(msa_rpc_server_t *s, int timeout_ms, char *msg, size_t msg_len)
{
    if (atomic_load(&s->draining)) {
        snprintf(msg, msg_len, "shutting down");
        return MSA_EUNAVAIL;
    }
    if (!s->n_bound) {
        snprintf(msg, msg_len, "not listening");
        return MSA_EUNAVAIL;
    }
    uint64_t seen = msa_rpc_conn_accepted() + msa_rpc_conn_refused();
    int fd = probe_connect(s->bound[0]);
    if (fd < 0) {
        snprintf(msg, msg_len, "cannot connect to %s: %s", s->bound[0], strerror(errno));
        return MSA_EUNAVAIL;
    }
    int64_t end = now_ns() + (int64_t)timeout_ms * 1000000;
    int ok = 0;
    while (!(ok = msa_rpc_conn_accepted() + msa_rpc_conn_refused() != seen) && now_ns() < end) {
        struct timespec ts = {0, 2 * 1000000};
        nanosleep(&ts, NULL);
    }
    close(fd);
    if (!ok) {
        snprintf(msg, msg_len, "listener %s did not accept a connection within %d ms", s->bound[0],
                 timeout_ms);
        return MSA_EUNAVAIL;
    }
    snprintf(msg, msg_len, "ok: %llu of %u connections open",
             (unsigned long long)msa_rpc_conn_open(), s->max_conn);
    return MSA_OK;
}

/* ==== shutdown ================================================================================ */

/* Waits for the shutdown tag until deadline (CLOCK_REALTIME for the condvar);
 * returns 1 when it came. */
static int wait_shutdown_tag(msa_rpc_server_t *s, int ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&s->sd_mu);
    while (!s->sd_done) {
        if (pthread_cond_timedwait(&s->sd_cv, &s->sd_mu, &ts) == ETIMEDOUT) break;
    }
    int done = s->sd_done;
    pthread_mutex_unlock(&s->sd_mu);
    return done;
}

void msa_rpc_server_shutdown(msa_rpc_server_t *s, int grace_ms)
{
    if (!s || s->shut) return;
    /* Phase 1, lame duck: new calls get UNAVAILABLE while the calls already
     * past the gate run to completion (bounded by the grace period). */
    int64_t t0 = now_ns();
    int64_t end = t0 + (int64_t)(grace_ms > 0 ? grace_ms : 1) * 1000000;
    atomic_store(&s->draining, 1);
    while ((atomic_load(&s->active) > 0 && now_ns() < end) ||
           now_ns() < t0 + (int64_t)LAME_DUCK_MIN_MS * 1000000) {
        struct timespec ts = {0, 5 * 1000000};
        nanosleep(&ts, NULL);
    }
    /* Phase 2: no new connections or calls; requested calls fail; the tag
     * completes when every call in flight has finished and every connection
     * is gone. gRPC waits for clients to close idle connections after its
     * GOAWAY, which a client may take seconds to do: once no call of ours is
     * in flight, nothing is left to finish, so force the connections down.
     * Past the grace period, in-flight calls are cancelled too. */
    atomic_store(&s->stopping, 1);
    grpc_server_shutdown_and_notify(s->server, s->pollers[0].cq, &s->sd_tag);
    int forced = 0;
    while (!wait_shutdown_tag(s, 20)) {
        if (!forced && atomic_load(&s->metrics.inflight) == 0) {
            grpc_server_cancel_all_calls(s->server);
            forced = 1;
        } else if (!forced && now_ns() > end) {
            msa_log(MSA_LOG_WARN, "shutdown: %llu calls still running after %d ms; cancelling them",
                    (unsigned long long)atomic_load(&s->metrics.inflight), grace_ms);
            grpc_server_cancel_all_calls(s->server);
            forced = 1;
        }
    }
    /* Handlers: finish whatever is queued (nothing, by now) and exit. */
    pthread_mutex_lock(&s->q_mu);
    s->q_quit = 1;
    pthread_cond_broadcast(&s->q_cv);
    pthread_mutex_unlock(&s->q_mu);
    for (unsigned i = 0; i < s->n_handlers_started; i++) pthread_join(s->handlers[i], NULL);
    s->n_handlers_started = 0;
    /* Pollers: drain their queues and exit. */
    for (unsigned i = 0; i < s->n_pollers; i++) grpc_completion_queue_shutdown(s->pollers[i].cq);
    for (unsigned i = 0; i < s->n_pollers; i++) {
        if (s->pollers[i].started) pthread_join(s->pollers[i].thread, NULL);
        s->pollers[i].started = 0;
    }
    s->shut = 1;
}

void msa_rpc_server_destroy(msa_rpc_server_t *s)
{
    if (!s) return;
    if (!s->shut) {
        /* Threads may be partly started (failed start): make sure pollers
         * exist to receive the tag before waiting for it. */
        int any_poller = 0;
        for (unsigned i = 0; i < s->n_pollers; i++) any_poller |= s->pollers[i].started;
        if (any_poller && s->pollers[0].started) {
            msa_rpc_server_shutdown(s, 5000);
        } else {
            atomic_store(&s->stopping, 1);
            grpc_server_shutdown_and_notify(s->server, s->pollers[0].cq, &s->sd_tag);
            grpc_server_cancel_all_calls(s->server);
            pthread_mutex_lock(&s->q_mu);
            s->q_quit = 1;
            pthread_cond_broadcast(&s->q_cv);
            pthread_mutex_unlock(&s->q_mu);
            for (unsigned i = 0; i < s->n_handlers_started; i++) pthread_join(s->handlers[i], NULL);
            for (unsigned i = 0; i < s->n_pollers; i++) {
                grpc_completion_queue_shutdown(s->pollers[i].cq);
                if (s->pollers[i].started) {
                    pthread_join(s->pollers[i].thread, NULL);
                    continue;
                }
                for (;;) {
                    grpc_event ev = grpc_completion_queue_next(
                        s->pollers[i].cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
                    if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
                    if (ev.type == GRPC_OP_COMPLETE && ev.tag != &s->sd_tag) call_free(ev.tag);
                }
            }
            s->shut = 1;
        }
    }
    grpc_server_destroy(s->server);
    release(s);
}
