/* msaclient.c — libmsaclient on the gRPC core C API. See msaclient.h for the contract.
 *
 * Longer than ~900 lines on purpose: the shared library is this one file plus
 * storage/msa_err.c (client/CMakeLists.txt), one module with one prefix
 * (msa_cli_), mostly one short wrapper per RPC.
 *
 * One grpc_channel per msa_cli_t; methods are registered on it once at connect. Each
 * call makes its own pluck completion queue and runs the whole unary exchange as one
 * batch (send metadata + message + close, receive metadata + message + status), so
 * calls from many threads never share mutable state.
 */
#include "msaclient.h"

#include "health.pb-c.h"
#include "rpc_lists.h" /* the methods and status codes, kept once */
#include "tensor.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ======================================================================================
 * Status helpers
 * ==================================================================================== */

/* Names and client codes of the gRPC status codes: MSA_RPC_GRPC_CODES. */
static const char *const grpc_names[] = {
#define X(n, name, msa) [n] = #name,
    MSA_RPC_GRPC_CODES(X)
#undef X
};
static const int grpc_errs[] = {
#define X(n, name, msa) [n] = msa,
    MSA_RPC_GRPC_CODES(X)
#undef X
};
#define N_GRPC_CODES (sizeof grpc_names / sizeof grpc_names[0])

const char *msa_cli_grpc_name(int grpc_code)
{
    if (grpc_code < 0 || (size_t)grpc_code >= N_GRPC_CODES) return "UNKNOWN";
    return grpc_names[grpc_code];
}

int msa_cli_err_from_grpc(int g)
{
    if (g < 0 || (size_t)g >= N_GRPC_CODES) return MSA_EINTERNAL;
    return grpc_errs[g];
}

/* Sets *st from a gRPC code and a printf message; returns the MSA code. */
__attribute__((format(printf, 3, 4))) static int fail(msa_cli_status_t *st, int grpc_code,
                                                      const char *fmt, ...)
{
    int code = msa_cli_err_from_grpc(grpc_code);
    if (st) {
        st->code = code;
        st->grpc_code = grpc_code;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(st->msg, sizeof st->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}

static int ok(msa_cli_status_t *st)
{
    if (st) {
        st->code = MSA_OK;
        st->grpc_code = 0;
        st->msg[0] = '\0';
    }
    return MSA_OK;
}

static int nomem(msa_cli_status_t *st)
{
    fail(st, GRPC_STATUS_RESOURCE_EXHAUSTED, "client: out of memory");
    if (st) st->code = MSA_ENOMEM;
    return MSA_ENOMEM;
}

/* ======================================================================================
 * Connection
 * ==================================================================================== */

/* The methods and their paths: MSA_RPC_METHODS, the server's list. */
enum {
#define X(id, path, name, scope, poller, fn) M_##id,
    MSA_RPC_METHODS(X)
#undef X
        M_COUNT
};
static const char *const method_names[M_COUNT] = {
#define X(id, path, name, scope, poller, fn) path,
    MSA_RPC_METHODS(X)
#undef X
};

struct msa_cli {
    grpc_channel *ch;           /* thread-safe; owns the connections */
    void *reg[M_COUNT];         /* registered method handles */
    char *addr;                 /* target, owned */
    char *auth;                 /* "Bearer <token>" or NULL, owned */
    size_t auth_len;            /* bytes of auth */
    _Atomic int64_t timeout_ms; /* default deadline; < 0 = none */
    size_t max_msg;             /* bytes, both directions */
};

void msa_cli_options_init(msa_cli_options_t *opt)
{
    memset(opt, 0, sizeof *opt);
}

/* Reads a whole file into a NUL-terminated buffer. */
static int read_file(const char *path, char **out, size_t *len, msa_cli_status_t *st)
{
    FILE *f = fopen(path, "rb");
    if (!f) return fail(st, GRPC_STATUS_INVALID_ARGUMENT, "%s: %s", path, strerror(errno));
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    if (!buf) {
        fclose(f);
        return nomem(st);
    }
    for (;;) {
        if (n + 1 >= cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                fclose(f);
                return nomem(st);
            }
            buf = nb;
            cap *= 2;
        }
        size_t r = fread(buf + n, 1, cap - n - 1, f);
        if (r == 0) break;
        n += r;
    }
    int err = ferror(f);
    fclose(f);
    if (err) {
        free(buf);
        return fail(st, GRPC_STATUS_INVALID_ARGUMENT, "%s: read error", path);
    }
    buf[n] = '\0';
    *out = buf;
    if (len) *len = n;
    return MSA_OK;
}

int msa_cli_connect(const msa_cli_options_t *opt, msa_cli_t **out, msa_cli_status_t *st)
{
    msa_cli_options_t defaults;
    if (!opt) {
        msa_cli_options_init(&defaults);
        opt = &defaults;
    }
    msa_cli_t *c = calloc(1, sizeof *c);
    if (!c) return nomem(st);
    int rc;
    char *ca = NULL;
    grpc_channel_credentials *creds = NULL;

    c->addr = strdup(opt->addr && *opt->addr ? opt->addr : MSA_CLI_DEFAULT_ADDR);
    if (!c->addr) {
        rc = nomem(st);
        goto fail;
    }
    atomic_store(&c->timeout_ms,
                 opt->timeout_ms == 0 ? MSA_CLI_DEFAULT_TIMEOUT_MS : opt->timeout_ms);
    c->max_msg = opt->max_message_bytes ? opt->max_message_bytes : MSA_CLI_DEFAULT_MAX_MESSAGE;
    if (c->max_msg > (size_t)INT32_MAX) c->max_msg = INT32_MAX;

    /* Bearer token: given, or the first line of token_file. */
    char *tok_buf = NULL;
    const char *tok = opt->token;
    if (!tok && opt->token_file) {
        if ((rc = read_file(opt->token_file, &tok_buf, NULL, st)) != MSA_OK) goto fail;
        char *p = tok_buf;
        while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n') p++;
        size_t l = strcspn(p, "\r\n");
        while (l > 0 && (p[l - 1] == ' ' || p[l - 1] == '\t')) l--;
        p[l] = '\0';
        memmove(tok_buf, p, l + 1);
        tok = tok_buf;
        if (!*tok) {
            free(tok_buf);
            rc = fail(st, GRPC_STATUS_INVALID_ARGUMENT, "%s: empty token file", opt->token_file);
            goto fail;
        }
    }
    if (tok) {
        size_t l = strlen(tok);
        c->auth = malloc(l + 8);
        if (!c->auth) {
            free(tok_buf);
            rc = nomem(st);
            goto fail;
        }
        memcpy(c->auth, "Bearer ", 7);
        memcpy(c->auth + 7, tok, l + 1);
        c->auth_len = l + 7;
    }
    free(tok_buf);

    grpc_init();
    if (opt->tls_ca_file || opt->tls) {
        if (opt->tls_ca_file && (rc = read_file(opt->tls_ca_file, &ca, NULL, st)) != MSA_OK) {
            grpc_shutdown();
            goto fail;
        }
        creds = grpc_ssl_credentials_create(ca, NULL, NULL, NULL);
    } else {
        creds = grpc_insecure_credentials_create();
    }
    grpc_arg args[3];
    size_t nargs = 0;
    args[nargs].type = GRPC_ARG_INTEGER;
    args[nargs].key = (char *)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[nargs++].value.integer = (int)c->max_msg;
    args[nargs].type = GRPC_ARG_INTEGER;
    args[nargs].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[nargs++].value.integer = (int)c->max_msg;
    if (opt->tls_server_name) {
        args[nargs].type = GRPC_ARG_STRING;
        args[nargs].key = (char *)GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
        args[nargs++].value.string = (char *)opt->tls_server_name;
    }
    grpc_channel_args cargs = {.num_args = nargs, .args = args};
    c->ch = grpc_channel_create(c->addr, creds, &cargs);
    grpc_channel_credentials_release(creds);
    free(ca);
    if (!c->ch) {
        grpc_shutdown();
        rc = fail(st, GRPC_STATUS_INVALID_ARGUMENT, "cannot create a channel to %s", c->addr);
        goto fail;
    }
    for (int i = 0; i < M_COUNT; i++)
        c->reg[i] = grpc_channel_register_call(c->ch, method_names[i], NULL, NULL);
    *out = c;
    return ok(st);

fail:
    free(c->auth);
    free(c->addr);
    free(c);
    return rc;
}

void msa_cli_close(msa_cli_t *c)
{
    if (!c) return;
    grpc_channel_destroy(c->ch);
    grpc_shutdown();
    free(c->auth);
    free(c->addr);
    free(c);
}

void msa_cli_set_timeout(msa_cli_t *c, int64_t timeout_ms)
{
    atomic_store(&c->timeout_ms, timeout_ms == 0 ? MSA_CLI_DEFAULT_TIMEOUT_MS : timeout_ms);
}
int64_t msa_cli_timeout(const msa_cli_t *c)
{
    return atomic_load(&((msa_cli_t *)c)->timeout_ms);
}
size_t msa_cli_max_message(const msa_cli_t *c)
{
    return c->max_msg;
}
const char *msa_cli_addr(const msa_cli_t *c)
{
    return c->addr;
}

void msa_cli_free(void *msg)
{
    if (msg) protobuf_c_message_free_unpacked((ProtobufCMessage *)msg, NULL);
}

/* ======================================================================================
 * The unary call
 * ==================================================================================== */

static int do_call(msa_cli_t *c, void *reg, const char *method, const ProtobufCMessage *req,
                   const ProtobufCMessageDescriptor *resp_desc, ProtobufCMessage **out,
                   int64_t timeout_ms, msa_cli_status_t *st)
{
    if (!c || !req || !resp_desc || !out)
        return fail(st, GRPC_STATUS_INVALID_ARGUMENT, "client: NULL argument");
    if (timeout_ms == 0) timeout_ms = atomic_load(&c->timeout_ms);
    gpr_timespec deadline = timeout_ms < 0
                                ? gpr_inf_future(GPR_CLOCK_REALTIME)
                                : gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                               gpr_time_from_millis(timeout_ms, GPR_TIMESPAN));

    size_t len = protobuf_c_message_get_packed_size(req);
    grpc_slice req_slice = grpc_slice_malloc(len);
    protobuf_c_message_pack(req, GRPC_SLICE_START_PTR(req_slice));
    grpc_byte_buffer *send_buf = grpc_raw_byte_buffer_create(&req_slice, 1);
    grpc_slice_unref(req_slice);

    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    grpc_call *call;
    if (reg) {
        call = grpc_channel_create_registered_call(c->ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, reg,
                                                   deadline, NULL);
    } else {
        call =
            grpc_channel_create_call(c->ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
                                     grpc_slice_from_static_string(method), NULL, deadline, NULL);
    }

    grpc_metadata md;
    size_t n_md = 0;
    if (c->auth) {
        md.key = grpc_slice_from_static_string("authorization");
        md.value = grpc_slice_from_static_buffer(c->auth, c->auth_len);
        n_md = 1;
    }
    grpc_metadata_array initial_md, trailing_md;
    grpc_metadata_array_init(&initial_md);
    grpc_metadata_array_init(&trailing_md);
    grpc_byte_buffer *recv_buf = NULL;
    grpc_status_code status = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    const char *error_string = NULL;

    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = n_md;
    ops[0].data.send_initial_metadata.metadata = n_md ? &md : NULL;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send_buf;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &initial_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &recv_buf;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &trailing_md;
    ops[5].data.recv_status_on_client.status = &status;
    ops[5].data.recv_status_on_client.status_details = &details;
    ops[5].data.recv_status_on_client.error_string = &error_string;

    int rc;
    void *tag = (void *)ops;
    grpc_call_error ce = grpc_call_start_batch(call, ops, 6, tag, NULL);
    if (ce != GRPC_CALL_OK) {
        rc = fail(st, GRPC_STATUS_INTERNAL, "client: grpc_call_start_batch failed (%d)", (int)ce);
        goto done;
    }
    grpc_event ev = grpc_completion_queue_pluck(cq, tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (ev.type != GRPC_OP_COMPLETE) {
        rc = fail(st, GRPC_STATUS_INTERNAL, "client: completion queue failed (%d)", (int)ev.type);
        goto done;
    }
    if (status != GRPC_STATUS_OK) {
        size_t dl = GRPC_SLICE_LENGTH(details);
        if (dl == 0 && error_string) {
            rc = fail(st, status, "%s", error_string);
        } else {
            rc = fail(st, status, "%.*s", (int)dl, (const char *)GRPC_SLICE_START_PTR(details));
        }
        goto done;
    }
    if (!recv_buf) {
        rc = fail(st, GRPC_STATUS_INTERNAL, "%s: OK status without a response message", method);
        goto done;
    }
    {
        grpc_byte_buffer_reader reader;
        if (!grpc_byte_buffer_reader_init(&reader, recv_buf)) {
            rc = fail(st, GRPC_STATUS_INTERNAL, "%s: cannot read the response", method);
            goto done;
        }
        grpc_slice all = grpc_byte_buffer_reader_readall(&reader);
        grpc_byte_buffer_reader_destroy(&reader);
        ProtobufCMessage *m = protobuf_c_message_unpack(resp_desc, NULL, GRPC_SLICE_LENGTH(all),
                                                        GRPC_SLICE_START_PTR(all));
        grpc_slice_unref(all);
        if (!m) {
            rc = fail(st, GRPC_STATUS_INTERNAL, "%s: malformed response (%s)", method,
                      resp_desc->name);
            goto done;
        }
        *out = m;
        rc = ok(st);
    }

done:
    if (recv_buf) grpc_byte_buffer_destroy(recv_buf);
    grpc_byte_buffer_destroy(send_buf);
    grpc_slice_unref(details);
    gpr_free((void *)error_string);
    grpc_metadata_array_destroy(&initial_md);
    grpc_metadata_array_destroy(&trailing_md);
    grpc_call_unref(call);
    grpc_completion_queue_shutdown(cq);
    grpc_completion_queue_destroy(cq);
    return rc;
}

int msa_cli_call(msa_cli_t *c, const char *method, const ProtobufCMessage *req,
                 const ProtobufCMessageDescriptor *resp_desc, ProtobufCMessage **out,
                 int64_t timeout_ms, msa_cli_status_t *st)
{
    if (!method || method[0] != '/')
        return fail(st, GRPC_STATUS_INVALID_ARGUMENT,
                    "client: method must be \"/pkg.Service/Method\"");
    void *reg = NULL;
    for (int i = 0; i < M_COUNT && c; i++)
        if (strcmp(method, method_names[i]) == 0) reg = c->reg[i];
    return do_call(c, reg, method, req, resp_desc, out, timeout_ms, st);
}

#define MSA_CLI_RPC(fn, m, ReqT, RespT, resp_desc)                                                \
    int fn(msa_cli_t *c, const ReqT *req, RespT **out, int64_t timeout_ms, msa_cli_status_t *st)  \
    {                                                                                             \
        ProtobufCMessage *r = NULL;                                                               \
        int rc = do_call(c, c ? c->reg[m] : NULL, method_names[m], (const ProtobufCMessage *)req, \
                         &resp_desc, &r, timeout_ms, st);                                         \
        if (rc == MSA_OK) *out = (RespT *)r;                                                      \
        return rc;                                                                                \
    }

MSA_CLI_RPC(msa_cli_create_collection, M_CREATE, Msa__V1__CreateCollectionRequest,
            Msa__V1__CollectionInfo, msa__v1__collection_info__descriptor)
MSA_CLI_RPC(msa_cli_drop_collection, M_DROP, Msa__V1__DropCollectionRequest,
            Msa__V1__DropCollectionResponse, msa__v1__drop_collection_response__descriptor)
MSA_CLI_RPC(msa_cli_list_collections, M_LISTCOLL, Msa__V1__ListCollectionsRequest,
            Msa__V1__ListCollectionsResponse, msa__v1__list_collections_response__descriptor)
MSA_CLI_RPC(msa_cli_describe_collection, M_DESCRIBE, Msa__V1__DescribeCollectionRequest,
            Msa__V1__CollectionInfo, msa__v1__collection_info__descriptor)
MSA_CLI_RPC(msa_cli_write, M_WRITE, Msa__V1__WriteRequest, Msa__V1__WriteResponse,
            msa__v1__write_response__descriptor)
MSA_CLI_RPC(msa_cli_get, M_GET, Msa__V1__GetRequest, Msa__V1__GetResponse,
            msa__v1__get_response__descriptor)
MSA_CLI_RPC(msa_cli_list, M_LIST, Msa__V1__ListRequest, Msa__V1__ListResponse,
            msa__v1__list_response__descriptor)
MSA_CLI_RPC(msa_cli_route, M_ROUTE, Msa__V1__RouteRequest, Msa__V1__RouteResponse,
            msa__v1__route_response__descriptor)
MSA_CLI_RPC(msa_cli_attend, M_ATTEND, Msa__V1__AttendRequest, Msa__V1__AttendResponse,
            msa__v1__attend_response__descriptor)
MSA_CLI_RPC(msa_cli_stats, M_STATS, Msa__V1__StatsRequest, Msa__V1__StatsResponse,
            msa__v1__stats_response__descriptor)
MSA_CLI_RPC(msa_cli_backup, M_BACKUP, Msa__V1__BackupRequest, Msa__V1__BackupResponse,
            msa__v1__backup_response__descriptor)
MSA_CLI_RPC(msa_cli_verify, M_VERIFY, Msa__V1__VerifyRequest, Msa__V1__VerifyResponse,
            msa__v1__verify_response__descriptor)
MSA_CLI_RPC(msa_cli_release_snapshot, M_RELEASE, Msa__V1__ReleaseSnapshotRequest,
            Msa__V1__ReleaseSnapshotResponse, msa__v1__release_snapshot_response__descriptor)

int msa_cli_health(msa_cli_t *c, const char *service, bool *serving, int64_t timeout_ms,
                   msa_cli_status_t *st)
{
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = (char *)(service ? service : "");
    ProtobufCMessage *r = NULL;
    int rc = do_call(c, c ? c->reg[M_HEALTH] : NULL, method_names[M_HEALTH],
                     (const ProtobufCMessage *)&req,
                     &grpc__health__v1__health_check_response__descriptor, &r, timeout_ms, st);
    if (rc != MSA_OK) return rc;
    if (serving)
        *serving = ((Grpc__Health__V1__HealthCheckResponse *)r)->status ==
                   GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
    protobuf_c_message_free_unpacked(r, NULL);
    return MSA_OK;
}

/* ======================================================================================
 * Tensors
 *
 * Own conversions rather than storage/tensor.c so that libmsaclient.so depends on
 * nothing of the daemon's (LMDB, BLAS); same rounding rules as tensor.h.
 * ==================================================================================== */

static uint32_t f2u(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}
static float u2f(uint32_t u)
{
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* The server's own rounding (storage/tensor.h, inline: this library links no
 * tensor.c), so client-side conversion matches the stored bits exactly. */
uint16_t msa_cli_f32_to_bf16(float x)
{
    return msa_f32_to_bf16(x);
}

float msa_cli_bf16_to_f32(uint16_t h)
{
    return msa_bf16_to_f32(h);
}

uint16_t msa_cli_f32_to_f16(float x)
{
    uint32_t u = f2u(x);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;  /* NaN */
    if (a >= 0x477ff000u) return sign | 0x7c00u; /* rounds to >= 65536: Inf */
    if (a < 0x38800000u) {                       /* below 2^-14: subnormal or 0 */
        if (a < 0x33000000u) return sign;        /* < 2^-25: rounds to 0 */
        uint32_t e = a >> 23;
        uint32_t m = (a & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - e; /* 14 + (113 - e) - 1 ... */
        /* value = m * 2^(e-150); subnormal unit = 2^-24 -> q = m >> (126 - e) */
        uint32_t q = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return sign | (uint16_t)q;
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u); /* round mantissa to 10 bits */
    r -= 0x38000000u;                           /* rebias 127 -> 15 */
    return sign | (uint16_t)(r >> 13);
}

float msa_cli_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu;
    if (e == 0) {
        float v = (float)m * (1.0f / 16777216.0f); /* m * 2^-24 */
        return sign ? -v : v;
    }
    if (e == 31) return u2f(sign | 0x7f800000u | (m << 13));
    return u2f(sign | ((e + 112) << 23) | (m << 13));
}

size_t msa_cli_dtype_size(Msa__V1__DType dt)
{
    switch (dt) {
    case MSA__V1__DTYPE__F32:
        return 4;
    case MSA__V1__DTYPE__F16:
    case MSA__V1__DTYPE__BF16:
        return 2;
    case MSA__V1__DTYPE__I8:
        return 1;
    default:
        return 0;
    }
}

Msa__V1__DType msa_cli_dtype_parse(const char *s)
{
    if (!s) return MSA__V1__DTYPE__DTYPE_UNSPECIFIED;
    if (!strcasecmp(s, "f32") || !strcasecmp(s, "float32") || !strcasecmp(s, "float"))
        return MSA__V1__DTYPE__F32;
    if (!strcasecmp(s, "f16") || !strcasecmp(s, "float16") || !strcasecmp(s, "half"))
        return MSA__V1__DTYPE__F16;
    if (!strcasecmp(s, "bf16") || !strcasecmp(s, "bfloat16")) return MSA__V1__DTYPE__BF16;
    if (!strcasecmp(s, "i8") || !strcasecmp(s, "int8")) return MSA__V1__DTYPE__I8;
    return MSA__V1__DTYPE__DTYPE_UNSPECIFIED;
}

const char *msa_cli_dtype_name(Msa__V1__DType dt)
{
    switch (dt) {
    case MSA__V1__DTYPE__F32:
        return "F32";
    case MSA__V1__DTYPE__F16:
        return "F16";
    case MSA__V1__DTYPE__BF16:
        return "BF16";
    case MSA__V1__DTYPE__I8:
        return "I8";
    default:
        return "DTYPE_UNSPECIFIED";
    }
}

size_t msa_cli_tensor_numel(const Msa__V1__Tensor *t)
{
    if (!t || t->n_shape == 0) return 0;
    size_t n = 1;
    for (size_t i = 0; i < t->n_shape; i++) n *= t->shape[i];
    return n;
}

static int tensor_alloc(Msa__V1__Tensor *t, Msa__V1__DType dt, const uint32_t *shape, size_t ndim,
                        size_t *numel, msa_cli_status_t *st)
{
    size_t es = msa_cli_dtype_size(dt);
    if (es == 0 || dt == MSA__V1__DTYPE__I8)
        return fail(st, GRPC_STATUS_INVALID_ARGUMENT, "tensor: dtype %d: want F32, F16 or BF16",
                    (int)dt);
    if (ndim == 0 || ndim > 8)
        return fail(st, GRPC_STATUS_INVALID_ARGUMENT, "tensor: rank %zu: want 1..8", ndim);
    size_t n = 1;
    for (size_t i = 0; i < ndim; i++) n *= shape[i];
    msa__v1__tensor__init(t);
    t->shape = malloc(ndim * sizeof *t->shape);
    t->data.data = malloc(n * es > 0 ? n * es : 1);
    if (!t->shape || !t->data.data) {
        free(t->shape);
        free(t->data.data);
        msa__v1__tensor__init(t);
        return nomem(st);
    }
    memcpy(t->shape, shape, ndim * sizeof *shape);
    t->n_shape = ndim;
    t->dtype = dt;
    t->data.len = n * es;
    *numel = n;
    return MSA_OK;
}

int msa_cli_tensor_from_f32(Msa__V1__Tensor *t, Msa__V1__DType dt, const uint32_t *shape,
                            size_t ndim, const float *src, msa_cli_status_t *st)
{
    size_t n;
    int rc = tensor_alloc(t, dt, shape, ndim, &n, st);
    if (rc != MSA_OK) return rc;
    if (dt == MSA__V1__DTYPE__F32) {
        memcpy(t->data.data, src, n * 4);
    } else {
        uint16_t *d = (uint16_t *)t->data.data;
        if (dt == MSA__V1__DTYPE__BF16)
            for (size_t i = 0; i < n; i++) d[i] = msa_cli_f32_to_bf16(src[i]);
        else
            for (size_t i = 0; i < n; i++) d[i] = msa_cli_f32_to_f16(src[i]);
    }
    return ok(st);
}

int msa_cli_tensor_from_raw(Msa__V1__Tensor *t, Msa__V1__DType dt, const uint32_t *shape,
                            size_t ndim, const void *data, size_t nbytes, msa_cli_status_t *st)
{
    size_t n;
    int rc = tensor_alloc(t, dt, shape, ndim, &n, st);
    if (rc != MSA_OK) return rc;
    if (nbytes != t->data.len) {
        size_t want = t->data.len;
        msa_cli_tensor_clear(t);
        return fail(st, GRPC_STATUS_INVALID_ARGUMENT, "tensor: %zu bytes, want %zu", nbytes, want);
    }
    memcpy(t->data.data, data, nbytes);
    return ok(st);
}

void msa_cli_tensor_clear(Msa__V1__Tensor *t)
{
    if (!t) return;
    free(t->shape);
    free(t->data.data);
    msa__v1__tensor__init(t);
}

int msa_cli_tensor_to_f32(const Msa__V1__Tensor *t, float *dst, msa_cli_status_t *st)
{
    size_t n = msa_cli_tensor_numel(t);
    size_t es = msa_cli_dtype_size(t->dtype);
    if (es == 0 || t->dtype == MSA__V1__DTYPE__I8)
        return fail(st, GRPC_STATUS_INVALID_ARGUMENT, "tensor: dtype %s: want F32, F16 or BF16",
                    msa_cli_dtype_name(t->dtype));
    if (t->data.len != n * es)
        return fail(st, GRPC_STATUS_INVALID_ARGUMENT, "tensor: %zu bytes, want %zu", t->data.len,
                    n * es);
    if (t->dtype == MSA__V1__DTYPE__F32) {
        memcpy(dst, t->data.data, n * 4);
    } else {
        const uint8_t *s = t->data.data;
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            dst[i] =
                t->dtype == MSA__V1__DTYPE__BF16 ? msa_cli_bf16_to_f32(h) : msa_cli_f16_to_f32(h);
        }
    }
    return ok(st);
}

int msa_cli_tensor_to_f32_alloc(const Msa__V1__Tensor *t, float **out, size_t *n,
                                msa_cli_status_t *st)
{
    size_t cnt = msa_cli_tensor_numel(t);
    float *buf = malloc(cnt ? cnt * sizeof *buf : 1);
    if (!buf) return nomem(st);
    int rc = msa_cli_tensor_to_f32(t, buf, st);
    if (rc != MSA_OK) {
        free(buf);
        return rc;
    }
    *out = buf;
    if (n) *n = cnt;
    return MSA_OK;
}

/* ======================================================================================
 * Documents
 * ==================================================================================== */

struct msa_cli_doc {
    Msa__V1__Document msg; /* every pointer inside is owned */
    size_t cap_layers;     /* allocated entries of msg.layers */
};

int msa_cli_doc_new(uint64_t id, uint32_t tokens, bool raw, msa_cli_doc_t **out,
                    msa_cli_status_t *st)
{
    msa_cli_doc_t *d = calloc(1, sizeof *d);
    if (!d) return nomem(st);
    msa__v1__document__init(&d->msg);
    d->msg.id = id;
    d->msg.tokens = tokens;
    d->msg.raw = raw;
    *out = d;
    return ok(st);
}

static void layer_free(Msa__V1__LayerKV *l)
{
    if (!l) return;
    if (l->k) msa_cli_tensor_clear(l->k);
    if (l->v) msa_cli_tensor_clear(l->v);
    if (l->router_k) msa_cli_tensor_clear(l->router_k);
    free(l->k);
    free(l->v);
    free(l->router_k);
    free(l);
}

void msa_cli_doc_free(msa_cli_doc_t *d)
{
    if (!d) return;
    for (size_t i = 0; i < d->msg.n_layers; i++) layer_free(d->msg.layers[i]);
    free(d->msg.layers);
    if (d->msg.text != protobuf_c_empty_string) free(d->msg.text);
    free(d->msg.metadata.data);
    free(d);
}

int msa_cli_doc_set_text(msa_cli_doc_t *d, const char *text, size_t len, msa_cli_status_t *st)
{
    if (len == (size_t)-1) len = strlen(text);
    char *s = malloc(len + 1);
    if (!s) return nomem(st);
    memcpy(s, text, len);
    s[len] = '\0';
    if (d->msg.text != protobuf_c_empty_string) free(d->msg.text);
    d->msg.text = s;
    return ok(st);
}

int msa_cli_doc_set_metadata(msa_cli_doc_t *d, const void *meta, size_t len, msa_cli_status_t *st)
{
    uint8_t *b = malloc(len ? len : 1);
    if (!b) return nomem(st);
    if (len) memcpy(b, meta, len);
    free(d->msg.metadata.data);
    d->msg.metadata.data = b;
    d->msg.metadata.len = len;
    return ok(st);
}

int msa_cli_doc_add_layer(msa_cli_doc_t *d, uint32_t layer, Msa__V1__Tensor *k, Msa__V1__Tensor *v,
                          Msa__V1__Tensor *router_k, msa_cli_status_t *st)
{
    Msa__V1__LayerKV *l = calloc(1, sizeof *l);
    Msa__V1__Tensor *tk = malloc(sizeof *tk), *tv = malloc(sizeof *tv), *tr = NULL;
    bool has_r = router_k && router_k->n_shape > 0;
    if (has_r) tr = malloc(sizeof *tr);
    if (!l || !tk || !tv || (has_r && !tr) ||
        (d->msg.n_layers == d->cap_layers &&
         !(d->msg.layers =
               realloc(d->msg.layers, (d->cap_layers = d->cap_layers * 2 + 4) * sizeof(void *))))) {
        free(l);
        free(tk);
        free(tv);
        free(tr);
        msa_cli_tensor_clear(k);
        msa_cli_tensor_clear(v);
        msa_cli_tensor_clear(router_k);
        return nomem(st);
    }
    msa__v1__layer_kv__init(l);
    l->layer = layer;
    *tk = *k;
    *tv = *v;
    msa__v1__tensor__init(k);
    msa__v1__tensor__init(v);
    l->k = tk;
    l->v = tv;
    if (has_r) {
        *tr = *router_k;
        msa__v1__tensor__init(router_k);
        l->router_k = tr;
    }
    d->msg.layers[d->msg.n_layers++] = l;
    return ok(st);
}

int msa_cli_doc_add_layer_f32(msa_cli_doc_t *d, uint32_t layer, Msa__V1__DType dt, uint32_t rows,
                              uint32_t H, uint32_t D, const float *k, const float *v,
                              const float *router_k, msa_cli_status_t *st)
{
    uint32_t shape[3] = {rows, H, D};
    Msa__V1__Tensor tk, tv, tr;
    msa__v1__tensor__init(&tr);
    int rc = msa_cli_tensor_from_f32(&tk, dt, shape, 3, k, st);
    if (rc != MSA_OK) return rc;
    if ((rc = msa_cli_tensor_from_f32(&tv, dt, shape, 3, v, st)) != MSA_OK) {
        msa_cli_tensor_clear(&tk);
        return rc;
    }
    if (router_k && (rc = msa_cli_tensor_from_f32(&tr, dt, shape, 3, router_k, st)) != MSA_OK) {
        msa_cli_tensor_clear(&tk);
        msa_cli_tensor_clear(&tv);
        return rc;
    }
    return msa_cli_doc_add_layer(d, layer, &tk, &tv, router_k ? &tr : NULL, st);
}

Msa__V1__Document *msa_cli_doc_msg(msa_cli_doc_t *d)
{
    return &d->msg;
}

/* ======================================================================================
 * Convenience calls
 * ==================================================================================== */

void msa_cli_schema_init(Msa__V1__CollectionSchema *s)
{
    msa__v1__collection_schema__init(s);
    s->kv_dtype = MSA__V1__DTYPE__BF16;
    s->routing_dtype = MSA__V1__DTYPE__BF16;
    s->chunk_tokens = 64;
}

int msa_cli_collection_create(msa_cli_t *c, const char *name,
                              const Msa__V1__CollectionSchema *schema,
                              Msa__V1__CollectionInfo **info, msa_cli_status_t *st)
{
    Msa__V1__CreateCollectionRequest req = MSA__V1__CREATE_COLLECTION_REQUEST__INIT;
    req.name = (char *)name;
    req.schema = (Msa__V1__CollectionSchema *)schema;
    Msa__V1__CollectionInfo *r = NULL;
    int rc = msa_cli_create_collection(c, &req, &r, 0, st);
    if (rc != MSA_OK) return rc;
    if (info)
        *info = r;
    else
        msa_cli_free(r);
    return MSA_OK;
}

int msa_cli_collection_drop(msa_cli_t *c, const char *name, uint64_t *commit_seq,
                            msa_cli_status_t *st)
{
    Msa__V1__DropCollectionRequest req = MSA__V1__DROP_COLLECTION_REQUEST__INIT;
    req.name = (char *)name;
    Msa__V1__DropCollectionResponse *r = NULL;
    int rc = msa_cli_drop_collection(c, &req, &r, 0, st);
    if (rc != MSA_OK) return rc;
    if (commit_seq) *commit_seq = r->commit_seq;
    msa_cli_free(r);
    return MSA_OK;
}

int msa_cli_collection_describe(msa_cli_t *c, const char *name, Msa__V1__CollectionInfo **info,
                                msa_cli_status_t *st)
{
    Msa__V1__DescribeCollectionRequest req = MSA__V1__DESCRIBE_COLLECTION_REQUEST__INIT;
    req.name = (char *)name;
    Msa__V1__CollectionInfo *r = NULL;
    int rc = msa_cli_describe_collection(c, &req, &r, 0, st);
    if (rc != MSA_OK) return rc;
    if (info)
        *info = r;
    else
        msa_cli_free(r);
    return MSA_OK;
}

int msa_cli_put(msa_cli_t *c, const char *collection, const msa_cli_doc_t *doc,
                uint64_t expect_version, bool expect_absent, uint64_t *commit_seq,
                uint64_t *version, msa_cli_status_t *st)
{
    Msa__V1__WriteOp op = MSA__V1__WRITE_OP__INIT;
    op.op_case = MSA__V1__WRITE_OP__OP_PUT;
    op.put = (Msa__V1__Document *)&doc->msg;
    op.expect_version = expect_version;
    op.expect_absent = expect_absent;
    Msa__V1__WriteOp *ops[1] = {&op};
    Msa__V1__WriteRequest req = MSA__V1__WRITE_REQUEST__INIT;
    req.collection = (char *)collection;
    req.n_ops = 1;
    req.ops = ops;
    Msa__V1__WriteResponse *r = NULL;
    int rc = msa_cli_write(c, &req, &r, 0, st);
    if (rc != MSA_OK) return rc;
    if (commit_seq) *commit_seq = r->commit_seq;
    if (version) *version = r->n_versions > 0 ? r->versions[0] : 0;
    msa_cli_free(r);
    return MSA_OK;
}

int msa_cli_delete(msa_cli_t *c, const char *collection, const uint64_t *ids, size_t n,
                   uint64_t *commit_seq, msa_cli_status_t *st)
{
    Msa__V1__WriteOp *opv = calloc(n ? n : 1, sizeof *opv);
    Msa__V1__WriteOp **ops = calloc(n ? n : 1, sizeof *ops);
    if (!opv || !ops) {
        free(opv);
        free(ops);
        return nomem(st);
    }
    for (size_t i = 0; i < n; i++) {
        msa__v1__write_op__init(&opv[i]);
        opv[i].op_case = MSA__V1__WRITE_OP__OP_DELETE_ID;
        opv[i].delete_id = ids[i];
        ops[i] = &opv[i];
    }
    Msa__V1__WriteRequest req = MSA__V1__WRITE_REQUEST__INIT;
    req.collection = (char *)collection;
    req.n_ops = n;
    req.ops = ops;
    Msa__V1__WriteResponse *r = NULL;
    int rc = msa_cli_write(c, &req, &r, 0, st);
    free(opv);
    free(ops);
    if (rc != MSA_OK) return rc;
    if (commit_seq) *commit_seq = r->commit_seq;
    msa_cli_free(r);
    return MSA_OK;
}

/* ======================================================================================
 * Batch writer
 * ==================================================================================== */

typedef struct wop {
    Msa__V1__WriteOp op;
    msa_cli_doc_t *doc; /* owned, for puts */
} wop_t;

struct msa_cli_writer {
    msa_cli_t *c;
    char *collection; /* owned */
    char *model;      /* owned */
    size_t max_bytes; /* packed request limit */
    size_t max_ops;   /* 0 = unlimited */
    int64_t timeout_ms;
    msa_cli_commit_cb on_commit;
    void *ud;
    wop_t **q; /* queued ops */
    size_t nq, capq;
    size_t q_bytes;    /* packed size of the request holding q */
    size_t base_bytes; /* packed size of the request without ops */
    uint64_t next_op;  /* lifetime index of q[0] */
    uint64_t batches, ops, bytes, last_seq;
    msa_cli_status_t err; /* first error; sticky */
};

/* Bytes an embedded message of n bytes adds to a repeated field: tag + varint length. */
static size_t field_overhead(size_t n)
{
    size_t v = 1;
    while (n >= 0x80) {
        n >>= 7;
        v++;
    }
    return 1 + v;
}

int msa_cli_writer_open(msa_cli_t *c, const char *collection, const msa_cli_writer_options_t *opt,
                        msa_cli_writer_t **out, msa_cli_status_t *st)
{
    msa_cli_writer_t *w = calloc(1, sizeof *w);
    if (!w) return nomem(st);
    w->c = c;
    w->collection = strdup(collection ? collection : "");
    w->model = strdup(opt && opt->model ? opt->model : "");
    if (!w->collection || !w->model) {
        free(w->collection);
        free(w->model);
        free(w);
        return nomem(st);
    }
    size_t lim = c->max_msg > (128u << 10) ? c->max_msg - (64u << 10) : c->max_msg / 2;
    w->max_bytes = opt && opt->max_batch_bytes ? opt->max_batch_bytes : lim;
    w->max_ops = opt ? opt->max_batch_ops : 0;
    w->timeout_ms = opt ? opt->timeout_ms : 0;
    w->on_commit = opt ? opt->on_commit : NULL;
    w->ud = opt ? opt->ud : NULL;
    Msa__V1__WriteRequest req = MSA__V1__WRITE_REQUEST__INIT;
    req.collection = w->collection;
    req.model = w->model;
    w->base_bytes = protobuf_c_message_get_packed_size((ProtobufCMessage *)&req);
    w->q_bytes = w->base_bytes;
    *out = w;
    return ok(st);
}

static void drop_queue(msa_cli_writer_t *w)
{
    for (size_t i = 0; i < w->nq; i++) {
        msa_cli_doc_free(w->q[i]->doc);
        free(w->q[i]);
    }
    w->next_op += w->nq;
    w->nq = 0;
    w->q_bytes = w->base_bytes;
}

int msa_cli_writer_flush(msa_cli_writer_t *w, msa_cli_status_t *st)
{
    if (w->err.code != MSA_OK) {
        if (st) *st = w->err;
        return w->err.code;
    }
    if (w->nq == 0) return ok(st);
    Msa__V1__WriteOp **ops = malloc(w->nq * sizeof *ops);
    if (!ops) return nomem(st);
    for (size_t i = 0; i < w->nq; i++) ops[i] = &w->q[i]->op;
    Msa__V1__WriteRequest req = MSA__V1__WRITE_REQUEST__INIT;
    req.collection = w->collection;
    req.model = w->model;
    req.n_ops = w->nq;
    req.ops = ops;
    Msa__V1__WriteResponse *r = NULL;
    int rc = msa_cli_write(w->c, &req, &r, w->timeout_ms, &w->err);
    free(ops);
    if (rc != MSA_OK) {
        /* Prefix the batch position; the message is cut to fit, never overflows. */
        char m[MSA_STATUS_MSG_MAX + 96];
        snprintf(m, sizeof m, "batch %llu (ops %llu..%llu): %s", (unsigned long long)w->batches,
                 (unsigned long long)w->next_op, (unsigned long long)(w->next_op + w->nq - 1),
                 w->err.msg);
        memcpy(w->err.msg, m, sizeof w->err.msg - 1);
        w->err.msg[sizeof w->err.msg - 1] = '\0';
        drop_queue(w);
        if (st) *st = w->err;
        return rc;
    }
    w->batches++;
    w->ops += w->nq;
    w->bytes += w->q_bytes;
    w->last_seq = r->commit_seq;
    if (w->on_commit) w->on_commit(w->ud, r, w->next_op, w->nq);
    msa_cli_free(r);
    drop_queue(w);
    return ok(st);
}

static int enqueue(msa_cli_writer_t *w, wop_t *o, msa_cli_status_t *st)
{
    size_t sz = protobuf_c_message_get_packed_size((ProtobufCMessage *)&o->op);
    size_t add = sz + field_overhead(sz);
    int rc;
    if (w->nq > 0 && (w->q_bytes + add > w->max_bytes || (w->max_ops && w->nq >= w->max_ops))) {
        if ((rc = msa_cli_writer_flush(w, st)) != MSA_OK) {
            msa_cli_doc_free(o->doc);
            free(o);
            return rc;
        }
    }
    if (w->nq == w->capq) {
        size_t nc = w->capq * 2 + 16;
        wop_t **nq = realloc(w->q, nc * sizeof *nq);
        if (!nq) {
            msa_cli_doc_free(o->doc);
            free(o);
            return nomem(st);
        }
        w->q = nq;
        w->capq = nc;
    }
    w->q[w->nq++] = o;
    w->q_bytes += add;
    return ok(st);
}

int msa_cli_writer_put(msa_cli_writer_t *w, msa_cli_doc_t **doc, uint64_t expect_version,
                       bool expect_absent, msa_cli_status_t *st)
{
    msa_cli_doc_t *d = *doc;
    *doc = NULL;
    if (w->err.code != MSA_OK) {
        msa_cli_doc_free(d);
        if (st) *st = w->err;
        return w->err.code;
    }
    wop_t *o = calloc(1, sizeof *o);
    if (!o) {
        msa_cli_doc_free(d);
        return nomem(st);
    }
    msa__v1__write_op__init(&o->op);
    o->op.op_case = MSA__V1__WRITE_OP__OP_PUT;
    o->op.put = &d->msg;
    o->op.expect_version = expect_version;
    o->op.expect_absent = expect_absent;
    o->doc = d;
    return enqueue(w, o, st);
}

int msa_cli_writer_delete(msa_cli_writer_t *w, uint64_t id, uint64_t expect_version,
                          msa_cli_status_t *st)
{
    if (w->err.code != MSA_OK) {
        if (st) *st = w->err;
        return w->err.code;
    }
    wop_t *o = calloc(1, sizeof *o);
    if (!o) return nomem(st);
    msa__v1__write_op__init(&o->op);
    o->op.op_case = MSA__V1__WRITE_OP__OP_DELETE_ID;
    o->op.delete_id = id;
    o->op.expect_version = expect_version;
    return enqueue(w, o, st);
}

void msa_cli_writer_counts(const msa_cli_writer_t *w, uint64_t *batches, uint64_t *ops,
                           uint64_t *bytes, uint64_t *last_commit_seq)
{
    if (batches) *batches = w->batches;
    if (ops) *ops = w->ops;
    if (bytes) *bytes = w->bytes;
    if (last_commit_seq) *last_commit_seq = w->last_seq;
}

int msa_cli_writer_close(msa_cli_writer_t *w, msa_cli_status_t *st)
{
    if (!w) return ok(st);
    int rc = msa_cli_writer_flush(w, st);
    drop_queue(w);
    free(w->q);
    free(w->collection);
    free(w->model);
    free(w);
    return rc;
}
