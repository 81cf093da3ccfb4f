/* test_alloc_faults.c — allocation failures are errors, never crashes or leaks.
 *
 * Every heap allocation of our own code goes through storage/msa_alloc.h,
 * whose test hook fails the Nth allocation. Each case runs one operation with
 * N = 1, 2, ... until it completes without the injected failure having been
 * reached, and checks for every N that the call returned (an error, or OK
 * where the failure was absorbed), that no result is left half-built, and
 * that the store and the index still agree afterwards (msa_engine_verify). The
 * operations: an engine open, an engine write, Route, Attend and Get, and the
 * Write and Route RPC handlers from the protobuf-c bytes (decoding into the
 * call's arena, conversion to engine structs, the engine call, the reply).
 *
 * ops/test runs this binary under ASan with leak detection on (the rest of
 * the ASan suite runs with detect_leaks=0): a failure path that forgets to
 * free something fails the run. The engine is called through engine.h only;
 * its calls are msa_engine_* (a rename is a sed).
 */
/* Checks run inside the fault loops and helpers: count failures and carry on,
 * so a failed check never leaves the injector armed. */
#define MSA_TEST_KEEP_GOING
#include "harness.h"

#include "arena.h"
#include "engine.h"
#include "memory.pb-c.h"
#include "methods.h"
#include "metrics.h"
#include "msa_alloc.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { D = 4, H = 1, HQ = 2, P = 2, TOKENS = 4, C = 2, LAYER = 3 };

/* Upper bound on N: an operation that still reaches its Nth allocation after
 * this many is not converging (the test would otherwise spin forever). */
#define MAX_N 5000

static char g_dir[200], g_data[300];
static msa_engine_t *eng;
static int g_restarts;           /* engine restarts after a fault broke it (writes only) */
static uint64_t g_next_id = 100; /* a fresh document id per faulted write */

static msa_schema_t test_schema(void)
{
    msa_schema_t s;
    memset(&s, 0, sizeof s);
    s.n_layers = 1;
    s.layers[0] = LAYER;
    s.kv_heads = H;
    s.query_heads = HQ;
    s.head_dim = D;
    s.chunk_tokens = P;
    s.kv_dtype = MSA_DT_F32;
    s.routing_dtype = MSA_DT_F32;
    s.separate_router_keys = true;
    s.similarity = MSA_SIM_DOT;
    s.head_reduce = MSA_HEAD_MEAN;
    s.query_reduce = MSA_QUERY_MAX;
    s.chunk_reduce = MSA_CHUNK_MAX;
    s.default_top_k = 4;
    return s;
}

static msa_engine_config_t test_config(const char *dir)
{
    msa_engine_config_t cfg = {.data_dir = dir,
                               .backend = MSA_BACKEND_CPU,
                               .threads = 1,
                               .nosync = true,
                               .check_on_start = MSA_STORE_CHECK_OFF};
    return cfg;
}

static float g_kv[C * H * D], g_rk[C * H * D], g_q[1 * HQ * D];

static msa_tensor_t f32(const float *data, uint32_t a, uint32_t b)
{
    return (msa_tensor_t){.dtype = MSA_DT_F32,
                          .ndim = 3,
                          .shape = {a, b, D},
                          .data = data,
                          .nbytes = (size_t)a * b * D * sizeof(float)};
}

/* Puts document id into "af" (text, metadata and one layer). */
static int write_doc(uint64_t id, msa_status_t *st)
{
    msa_engine_layer_kv_t lk = {
        .layer = LAYER, .k = f32(g_kv, C, H), .v = f32(g_kv, C, H), .router_k = f32(g_rk, C, H)};
    msa_engine_write_op_t op;
    memset(&op, 0, sizeof op);
    op.kind = MSA_OP_PUT;
    op.put = (msa_engine_doc_t){.id = id,
                                .text = "text",
                                .text_len = 4,
                                .metadata = "{}",
                                .metadata_len = 2,
                                .tokens = TOKENS,
                                .n_layers = 1,
                                .layers = &lk};
    msa_engine_write_req_t req = {.collection = "af", .n_ops = 1, .ops = &op};
    msa_engine_write_result_t *res = NULL;
    int rc = msa_engine_write(eng, &req, &res, st);
    msa_engine_write_result_free(res);
    return rc;
}

/* Whether document id is stored (MSA_ENOTFOUND: no), checked through Get. */
static int doc_present(uint64_t id, bool *present, msa_status_t *st)
{
    msa_engine_get_req_t gr = {.collection = "af", .n_ids = 1, .ids = &id, .with_tensors = true};
    msa_engine_get_result_t *g = NULL;
    int rc = msa_engine_get(eng, &gr, &g, st);
    *present = rc == MSA_OK;
    msa_engine_get_result_free(g);
    return rc == MSA_ENOTFOUND ? MSA_OK : rc;
}

/* Closes and reopens the engine on the same data (a restart of msad). */
static void restart(void)
{
    msa_engine_close(eng);
    eng = NULL;
    msa_engine_config_t cfg = test_config(g_data);
    msa_status_t st;
    CHECK_MSG(msa_engine_open(&cfg, &eng, &st) == MSA_OK, "reopen: %s", st.msg);
    g_restarts++;
}

/* After a faulted write, document id is stored iff the write said OK; with
 * after_commit, a failure may also come after the engine committed (the RPC
 * reply could not be built: the client sees an error for a durable write, as
 * with a reply lost on the network), so a failed write may be stored, but
 * only whole (Get with tensors and verify pass). A failure to apply a
 * committed write to the index marks the engine broken (STYLE.md rule 5:
 * MSA_EBROKEN until a restart, which rebuilds the index from the store), so a
 * broken engine is restarted and checked again. */
static void check_written(const char *what, uint64_t n, int rc, uint64_t id, bool after_commit)
{
    msa_status_t st;
    bool present = false;
    int prc = doc_present(id, &present, &st);
    if (prc == MSA_EBROKEN) {
        CHECK_MSG(rc == MSA_OK, "%s, N=%llu: failed (%s) and broke the engine", what,
                  (unsigned long long)n, msa_errname(rc));
        restart();
        if (!eng) return;
        prc = doc_present(id, &present, &st);
    }
    CHECK_MSG(prc == MSA_OK, "%s, N=%llu: get: %s", what, (unsigned long long)n, st.msg);
    if (after_commit && rc != MSA_OK && present) return;
    CHECK_MSG(present == (rc == MSA_OK), "%s, N=%llu: %s but the document is %s", what,
              (unsigned long long)n, msa_errname(rc), present ? "stored" : "absent");
}

/* The store and the index agree, and the store is sound. */
static void check_consistent(const char *after, uint64_t n)
{
    msa_status_t st;
    msa_engine_verify_result_t *v = NULL;
    int rc = msa_engine_verify(eng, "af", &v, &st);
    CHECK_MSG(rc == MSA_OK, "%s, N=%llu: verify: %s", after, (unsigned long long)n, st.msg);
    for (size_t i = 0; v && i < v->n_problems; i++)
        msa_test_fail_(__FILE__, __LINE__, "%s, N=%llu: %s", after, (unsigned long long)n,
                       v->problems[i]);
    msa_engine_verify_result_free(v);
}

/* A faulted call's code: OK (the failure was absorbed) or an error that says
 * so; never a code that marks the engine or the data broken. */
static bool clean_error(int rc)
{
    return rc == MSA_OK || rc == MSA_ENOMEM || rc == MSA_EFULL || rc == MSA_EIO ||
           rc == MSA_EINTERNAL;
}

/* Runs op with the Nth allocation failing, N = 1.. until op no longer reaches
 * it; op returns an MSA code. Returns the number of faulted runs. */
#define FAULT_LOOP(what, n, rc, op, after_each)                                       \
    for (uint64_t n = 1;; n++) {                                                      \
        if (n > MAX_N) {                                                              \
            FAILF("%s: still allocating after %d faulted runs", what, MAX_N);         \
            break;                                                                    \
        }                                                                             \
        msa_alloc_fail_nth(n);                                                        \
        int rc = (op);                                                                \
        bool fired_ = msa_alloc_fired();                                              \
        msa_alloc_fail_nth(0);                                                        \
        if (!fired_) {                                                                \
            CHECK_MSG(rc == MSA_OK, "%s without a fault: %s", what, msa_errname(rc)); \
            printf("%s: %llu faulted runs\n", what, (unsigned long long)n - 1);       \
            break;                                                                    \
        }                                                                             \
        CHECK_MSG(clean_error(rc), "%s, N=%llu: %s", what, (unsigned long long)n,     \
                  msa_errname(rc));                                                   \
        after_each;                                                                   \
    }

/* ==== cases ================================================================== */

/* Opening an engine on a fresh directory; a failed open leaves nothing open. */
TEST(engine_open)
{
    char sub[300];
    static int k;
    FAULT_LOOP("open", n, rc, ({
                   snprintf(sub, sizeof sub, "%s/open%d", g_dir, k++);
                   msa_engine_config_t cfg = test_config(sub);
                   msa_engine_t *e = NULL;
                   msa_status_t st;
                   int r_ = msa_engine_open(&cfg, &e, &st);
                   if (r_ != MSA_OK) CHECK_MSG(e == NULL, "failed open returned an engine");
                   msa_engine_close(e);
                   r_;
               }),
               (void)0);
}

/* A write either commits whole (the document is there) or leaves nothing. */
TEST(engine_write)
{
    msa_status_t st;
    FAULT_LOOP("write", n, rc, write_doc(g_next_id, &st), ({
                   check_written("write", n, rc, g_next_id, false);
                   check_consistent("write", n);
                   g_next_id++;
               }));
    g_next_id++; /* the id the final, unfaulted write used */
    check_consistent("write", 0);
}

static msa_engine_layer_query_t g_lq;

TEST(route)
{
    msa_engine_route_req_t req = {
        .c = {.collection = "af"}, .n_layers = 1, .layers = &g_lq, .top_k = 4};
    msa_status_t st;
    FAULT_LOOP("route", n, rc, ({
                   msa_engine_route_result_t *r = NULL;
                   int r_ = msa_engine_route(eng, &req, &r, &st);
                   if (r_ != MSA_OK) CHECK_MSG(r == NULL, "failed route returned a result");
                   if (r_ == MSA_OK) CHECK_MSG(r->layers[0].n > 0, "route found nothing");
                   msa_engine_route_result_free(r);
                   r_;
               }),
               (void)0);
    check_consistent("route", 0);
}

TEST(attend)
{
    msa_engine_attend_req_t req = {
        .c = {.collection = "af"}, .n_layers = 1, .layers = &g_lq, .top_k = 4};
    msa_status_t st;
    FAULT_LOOP("attend", n, rc, ({
                   msa_engine_attend_result_t *r = NULL;
                   int r_ = msa_engine_attend(eng, &req, &r, &st);
                   if (r_ != MSA_OK) CHECK_MSG(r == NULL, "failed attend returned a result");
                   if (r_ == MSA_OK) CHECK_MSG(r->layers[0].n > 0, "attend found nothing");
                   msa_engine_attend_result_free(r);
                   r_;
               }),
               (void)0);
    check_consistent("attend", 0);
}

TEST(get)
{
    uint64_t ids[2] = {1, 2};
    msa_engine_get_req_t req = {.collection = "af",
                                .n_ids = 2,
                                .ids = ids,
                                .with_text = true,
                                .with_metadata = true,
                                .with_tensors = true};
    msa_status_t st;
    FAULT_LOOP("get", n, rc, ({
                   msa_engine_get_result_t *g = NULL;
                   int r_ = msa_engine_get(eng, &req, &g, &st);
                   if (r_ != MSA_OK) CHECK_MSG(g == NULL, "failed get returned a result");
                   if (r_ == MSA_OK) CHECK_EQ_U(g->n_records, 2);
                   msa_engine_get_result_free(g);
                   r_;
               }),
               (void)0);
    check_consistent("get", 0);
}

/* ==== RPC handlers: protobuf-c decoding into the arena, then the engine ====== */

static const msa_rpc_method_t *method(const char *name)
{
    for (size_t i = 0; i < msa__rpc_n_methods; i++)
        if (!strcmp(msa__rpc_methods[i].name, name)) return &msa__rpc_methods[i];
    return NULL;
}

static msa_rpc_metrics_t g_mx;
static atomic_int g_stopping;

/* Runs handler m on the packed request (data, len) in a fresh arena. */
static int call(const msa_rpc_method_t *m, const uint8_t *data, size_t len)
{
    msa_rpc_ctx_t ctx = {
        .engine = eng, .metrics = &g_mx, .max_send = 64u << 20, .stopping = &g_stopping};
    msa_rpc_arena_t arena;
    msa_rpc_arena_init(&arena);
    msa_rpc_req_t req = {.data = data, .len = len, .arena = &arena};
    msa_rpc_reply_t rep = {0};
    msa_status_t st;
    msa_status_clear(&st);
    int rc = m->fn(&ctx, &req, &rep, &st);
    if (rc == MSA_OK)
        CHECK_MSG(rep.data != NULL, "%s: OK without a reply", m->name);
    else
        CHECK_MSG(rep.data == NULL && st.msg[0], "%s: error %s with a reply or no message", m->name,
                  msa_errname(rc));
    free(rep.data);
    msa_rpc_arena_reset(&arena);
    return rc;
}

static Msa__V1__Tensor pb_tensor(const void *data, uint32_t *shape, size_t nbytes)
{
    Msa__V1__Tensor t = MSA__V1__TENSOR__INIT;
    t.dtype = MSA__V1__DTYPE__F32;
    t.n_shape = 3;
    t.shape = shape;
    t.data.data = (uint8_t *)data;
    t.data.len = nbytes;
    return t;
}

/* The packed WriteRequest puts document id (malloc'd bytes in *out). */
static size_t pack_write(uint64_t id, uint8_t **out)
{
    uint32_t shape[3] = {C, H, D};
    Msa__V1__Tensor k = pb_tensor(g_kv, shape, sizeof g_kv);
    Msa__V1__Tensor rk = pb_tensor(g_rk, shape, sizeof g_rk);
    Msa__V1__LayerKV lk = MSA__V1__LAYER_KV__INIT, *lkp = &lk;
    lk.layer = LAYER;
    lk.k = &k;
    lk.v = &k;
    lk.router_k = &rk;
    Msa__V1__Document doc = MSA__V1__DOCUMENT__INIT;
    doc.id = id;
    doc.text = "text";
    doc.tokens = TOKENS;
    doc.n_layers = 1;
    doc.layers = &lkp;
    Msa__V1__WriteOp op = MSA__V1__WRITE_OP__INIT, *opp = &op;
    op.op_case = MSA__V1__WRITE_OP__OP_PUT;
    op.put = &doc;
    Msa__V1__WriteRequest w = MSA__V1__WRITE_REQUEST__INIT;
    w.collection = "af";
    w.n_ops = 1;
    w.ops = &opp;
    size_t n = msa__v1__write_request__get_packed_size(&w);
    *out = malloc(n ? n : 1);
    msa__v1__write_request__pack(&w, *out);
    return n;
}

TEST(rpc_write)
{
    const msa_rpc_method_t *m = method("Write");
    CHECK_MSG(m != NULL, "no Write method");
    FAULT_LOOP("Write", n, rc, ({
                   uint8_t *buf = NULL;
                   size_t len = pack_write(g_next_id, &buf);
                   int r_ = call(m, buf, len);
                   free(buf);
                   r_;
               }),
               ({
                   check_written("Write", n, rc, g_next_id, true);
                   check_consistent("Write", n);
                   g_next_id++;
               }));
    g_next_id++;
    check_consistent("Write", 0);
}

TEST(rpc_route)
{
    const msa_rpc_method_t *m = method("Route");
    CHECK_MSG(m != NULL, "no Route method");
    uint32_t shape[3] = {1, HQ, D};
    Msa__V1__Tensor q = pb_tensor(g_q, shape, sizeof g_q);
    Msa__V1__LayerQuery lq = MSA__V1__LAYER_QUERY__INIT, *lqp = &lq;
    lq.layer = LAYER;
    lq.routing_q = &q;
    Msa__V1__RouteRequest r = MSA__V1__ROUTE_REQUEST__INIT;
    r.collection = "af";
    r.n_layers = 1;
    r.layers = &lqp;
    r.top_k = 4;
    size_t len = msa__v1__route_request__get_packed_size(&r);
    uint8_t *buf = malloc(len ? len : 1);
    msa__v1__route_request__pack(&r, buf);
    FAULT_LOOP("Route", n, rc, call(m, buf, len), (void)0);
    free(buf);
    check_consistent("Route", 0);
}

static const msa_test_t tests[] = {
    TEST_ENTRY(engine_open), TEST_ENTRY(engine_write), TEST_ENTRY(route),     TEST_ENTRY(attend),
    TEST_ENTRY(get),         TEST_ENTRY(rpc_write),    TEST_ENTRY(rpc_route),
};

int main(int argc, char **argv)
{
    if (!msa_test_tmpdir(g_dir, sizeof g_dir, "allocfault")) return 1;
    for (int i = 0; i < C * H * D; i++) g_kv[i] = 0.5f * (float)(i % 3), g_rk[i] = 1.0f;
    for (int i = 0; i < HQ * D; i++) g_q[i] = 1.0f;
    g_lq = (msa_engine_layer_query_t){.layer = LAYER, .routing_q = f32(g_q, 1, HQ)};
    g_lq.q = g_lq.routing_q;

    snprintf(g_data, sizeof g_data, "%s/data", g_dir);
    msa_engine_config_t cfg = test_config(g_data);
    msa_status_t st;
    msa_schema_t s = test_schema();
    msa_engine_create_collection_result_t *info = NULL;
    int rc = 1;
    if (msa_rpc_metrics_init(&g_mx, msa__rpc_n_methods, msa__rpc_method_names) != MSA_OK) {
        fprintf(stderr, "metrics init failed\n");
    } else if (msa_engine_open(&cfg, &eng, &st) != MSA_OK) {
        fprintf(stderr, "open: %s\n", st.msg);
    } else if (msa_engine_create_collection(eng, "af", &s, &info, &st) != MSA_OK ||
               write_doc(1, &st) != MSA_OK || write_doc(2, &st) != MSA_OK) {
        fprintf(stderr, "set-up: %s\n", st.msg);
    } else {
        rc = msa_test_run(tests, sizeof tests / sizeof tests[0], argc, argv);
        printf("engine restarts after a fault broke it: %d\n", g_restarts);
    }
    msa_engine_create_collection_result_free(info);
    msa_engine_close(eng);
    msa_rpc_metrics_free(&g_mx);
    msa_test_tmpdir_done(g_dir, rc);
    return rc;
}
