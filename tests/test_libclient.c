/* test_libclient.c — libmsaclient against a real msad on loopback.
 *
 * Starts build/bin/msad (next to this binary, or $MSA_BIN/msad) on a temp data dir with
 * --listen 127.0.0.1:0 and --max-message-mb 1, reads "msad: listening on ADDR", then
 * drives every RPC of msa.v1.Memory and msa.v1.Admin plus the health check: answers are
 * checked against an fp64 reference computed here from the stored tensors, error
 * statuses against SEMANTICS.md's table, the batch writer's splitting against the 1 MiB
 * limit, deadlines, concurrent calls on one connection, and bearer-token scopes (a
 * second daemon with a tokens file). Exit 77 (skip) when msad is not built.
 */
/* Checks carry on after a failure (the case's later cleanup still runs); OK()
 * ends the case. */
#define MSA_TEST_KEEP_GOING
#include "harness.h"
#include "msaclient.h"
#include "tensor.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ======================================================================================
 * Checks of client calls (on top of harness.h)
 * ==================================================================================== */

/* True once main has started msad and connected cli; the cases that talk to it
 * skip themselves otherwise. */
static bool have_msad;
#define NEED_DAEMON()                                \
    do {                                             \
        if (!have_msad) TEST_SKIP("msad not built"); \
    } while (0)

/* A call that must succeed; on failure prints the status and skips the rest of the case. */
#define OK(call)                                                                                \
    do {                                                                                        \
        int rc_ = (call);                                                                       \
        if (rc_ != MSA_OK) {                                                                    \
            FAILF("%s failed: %d %s: %s", #call, rc_, msa_cli_grpc_name(st.grpc_code), st.msg); \
            return; /* even with MSA_TEST_KEEP_GOING */                                         \
        }                                                                                       \
    } while (0)
/* A call that must fail with a given gRPC status. */
#define EXPECT_STATUS(call, grpc)                                                            \
    do {                                                                                     \
        int rc_ = (call);                                                                    \
        if (rc_ == MSA_OK || st.grpc_code != (grpc) || rc_ != msa_cli_err_from_grpc(grpc) || \
            st.code != rc_) {                                                                \
            FAILF("%s: want %s, got rc %d %s: %s", #call, msa_cli_grpc_name(grpc), rc_,      \
                  msa_cli_grpc_name(st.grpc_code), st.msg);                                  \
        }                                                                                    \
    } while (0)

/* ======================================================================================
 * Daemon
 * ==================================================================================== */

typedef struct daemon {
    pid_t pid;
    char addr[256];
    char dir[PATH_MAX];
} daemon_t;

static char msad_path[PATH_MAX + 16];

static bool find_msad(void)
{
    const char *bin = getenv("MSA_BIN");
    if (bin) {
        snprintf(msad_path, sizeof msad_path, "%s/msad", bin);
        if (access(msad_path, X_OK) == 0) return true;
    }
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) return false;
    self[n] = '\0';
    char *slash = strrchr(self, '/');
    if (!slash) return false;
    *slash = '\0';
    snprintf(msad_path, sizeof msad_path, "%s/msad", self);
    return access(msad_path, X_OK) == 0;
}

/* Starts msad with extra args; returns false when it did not announce its address. */
static bool daemon_start(daemon_t *d, const char *const *extra)
{
    if (!msa_test_tmpdir(d->dir, sizeof d->dir, "libclient")) return false;
    char data[PATH_MAX + 16], backups[PATH_MAX + 16], log[PATH_MAX + 16];
    snprintf(data, sizeof data, "%s/data", d->dir);
    snprintf(backups, sizeof backups, "%s/backups", d->dir);
    snprintf(log, sizeof log, "%s/msad.log", d->dir);
    mkdir(backups, 0755);
    int p[2];
    if (pipe(p)) return false;
    const char *argv[32] = {
        msad_path, "--data",       data,    "--listen",  "127.0.0.1:0", "--max-message-mb",
        "1",       "--backup-dir", backups, "--backend", "cpu",         "--threads",
        "2"};
    int n = 13;
    for (int i = 0; extra && extra[i]; i++) argv[n++] = extra[i];
    argv[n] = NULL;
    d->pid = fork();
    if (d->pid == 0) {
        dup2(p[1], STDOUT_FILENO);
        FILE *lf = fopen(log, "w");
        if (lf) dup2(fileno(lf), STDERR_FILENO);
        close(p[0]);
        close(p[1]);
        execv(msad_path, (char *const *)argv);
        _exit(127);
    }
    close(p[1]);
    FILE *f = fdopen(p[0], "r");
    char line[512];
    bool ok = false;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "msad: listening on %255s", d->addr) == 1) {
            ok = true;
            break;
        }
    }
    /* Keep the pipe open (a closed stdout could SIGPIPE the daemon): leak f on purpose;
     * the process exits soon after. */
    if (!ok) {
        fprintf(stderr, "msad did not start; log in %s\n", log);
        kill(d->pid, SIGKILL);
        waitpid(d->pid, NULL, 0);
    }
    return ok;
}

static int daemon_stop(daemon_t *d)
{
    int status = 0;
    kill(d->pid, SIGTERM);
    waitpid(d->pid, &status, 0);
    if (getenv("MSA_KEEP_TMP"))
        fprintf(stderr, "data left in %s\n", d->dir);
    else
        msa_test_rmtree(d->dir);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* ======================================================================================
 * Shared state and helpers
 * ==================================================================================== */

static daemon_t dmn;
static msa_cli_t *cli;

enum { H = 2, HQ = 4, D = 8, P = 4, NL = 2 };
static const uint32_t LAYERS[NL] = {0, 3};
static const char *COLL = "libclient";

static uint64_t rng = 88172645463325252ull;
static float frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}
static void fill(float *p, size_t n)
{
    for (size_t i = 0; i < n; i++) p[i] = frand();
}

/* The documents written in test_write, kept for the reference computations. */
enum { NDOC = 6 };
static const uint32_t DOC_TOKENS[NDOC] = {4, 7, 8, 13, 1, 16};
static float *doc_k[NDOC][NL], *doc_v[NDOC][NL];
static uint32_t doc_c[NDOC];

static void schema_small(Msa__V1__CollectionSchema *s, uint32_t *layers)
{
    msa_cli_schema_init(s);
    memcpy(layers, LAYERS, sizeof LAYERS);
    s->n_layers = NL;
    s->layers = layers;
    s->kv_heads = H;
    s->query_heads = HQ;
    s->head_dim = D;
    s->chunk_tokens = P;
    s->kv_dtype = MSA__V1__DTYPE__F32;
    s->routing_dtype = MSA__V1__DTYPE__F32;
}

static msa_cli_doc_t *make_doc(uint64_t id, uint32_t tokens, float **ks, float **vs, uint32_t *C)
{
    msa_cli_status_t st;
    msa_cli_doc_t *d;
    uint32_t c = (tokens + P - 1) / P;
    if (msa_cli_doc_new(id, tokens, false, &d, &st)) return NULL;
    for (int l = 0; l < NL; l++) {
        float *k = malloc(sizeof(float) * c * H * D), *v = malloc(sizeof(float) * c * H * D);
        fill(k, (size_t)c * H * D);
        fill(v, (size_t)c * H * D);
        if (msa_cli_doc_add_layer_f32(d, LAYERS[l], MSA__V1__DTYPE__F32, c, H, D, k, v, NULL, &st))
            return NULL;
        if (ks) {
            ks[l] = k;
            vs[l] = v;
        } else {
            free(k);
            free(v);
        }
    }
    if (C) *C = c;
    return d;
}

/* fp64 routing score of one document (COSINE, HEAD_MEAN, QUERY_MAX, CHUNK_MAX). */
static double ref_score(const float *q, uint32_t T, const float *k, uint32_t C)
{
    double best = -INFINITY;
    for (uint32_t r = 0; r < C; r++) {
        double qmax = -INFINITY;
        for (uint32_t t = 0; t < T; t++) {
            double hsum = 0;
            for (uint32_t j = 0; j < HQ; j++) {
                const float *qv = q + ((size_t)t * HQ + j) * D;
                const float *kv = k + ((size_t)r * H + j / (HQ / H)) * D;
                double dot = 0, nq = 0, nk = 0;
                for (int x = 0; x < D; x++) {
                    dot += (double)qv[x] * kv[x];
                    nq += (double)qv[x] * qv[x];
                    nk += (double)kv[x] * kv[x];
                }
                hsum += (nq > 0 && nk > 0) ? dot / sqrt(nq) / sqrt(nk) : 0;
            }
            double s = hsum / HQ;
            if (s > qmax) qmax = s;
        }
        if (qmax > best) best = qmax;
    }
    return best;
}

/* ======================================================================================
 * Cases
 * ==================================================================================== */

TEST(tensor_conversions)
{
    /* Our rounding must equal storage/tensor.h's (the server's) bit for bit. */
    float special[] = {0.0f,    -0.0f,       1.0f,        -1.5f,      65504.0f, 65520.0f, 65519.0f,
                       1e-8f,   6.0e-8f,     5.96e-8f,    2.98e-8f,   3.0e-5f,  6.1e-5f,  1e30f,
                       -1e-30f, 3.14159265f, 1.00390625f, 1.0078125f, INFINITY, -INFINITY};
    for (size_t i = 0; i < sizeof special / sizeof *special; i++) {
        CHECK_EQ_U(msa_cli_f32_to_bf16(special[i]), msa_f32_to_bf16(special[i]));
        CHECK_EQ_U(msa_cli_f32_to_f16(special[i]), msa_f32_to_f16(special[i]));
    }
    uint64_t s = 12345;
    for (int i = 0; i < 200000; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        uint32_t u = (uint32_t)(s >> 32);
        float x;
        memcpy(&x, &u, 4);
        if (isnan(x)) continue;
        uint16_t a = msa_cli_f32_to_bf16(x), b = msa_f32_to_bf16(x);
        uint16_t c = msa_cli_f32_to_f16(x), e = msa_f32_to_f16(x);
        if (a != b || c != e) {
            FAILF("conversion mismatch for %a: bf16 %04x/%04x f16 %04x/%04x", (double)x, a, b, c,
                  e);
            break;
        }
    }
    for (uint32_t h = 0; h < 65536; h++) {
        float a = msa_cli_f16_to_f32((uint16_t)h), b = msa_f16_to_f32((uint16_t)h);
        float c = msa_cli_bf16_to_f32((uint16_t)h), e = msa_bf16_to_f32((uint16_t)h);
        if (!((a == b || (isnan(a) && isnan(b))) && (c == e || (isnan(c) && isnan(e))))) {
            FAILF("decode mismatch for %04x", h);
            break;
        }
    }
    /* Tensor round trip through the helpers. */
    msa_cli_status_t st;
    float src[6] = {1, 2.5f, -3, 0.1f, 1e-3f, 7};
    uint32_t shape[2] = {2, 3};
    Msa__V1__Tensor t;
    OK(msa_cli_tensor_from_f32(&t, MSA__V1__DTYPE__BF16, shape, 2, src, &st));
    CHECK_EQ_U(t.data.len, 12);
    CHECK_EQ_U(msa_cli_tensor_numel(&t), 6);
    float back[6];
    OK(msa_cli_tensor_to_f32(&t, back, &st));
    for (int i = 0; i < 6; i++) CHECK_NEAR(back[i], src[i], fabs(src[i]) * 0.008);
    t.data.len = 11;
    EXPECT_STATUS(msa_cli_tensor_to_f32(&t, back, &st), 3);
    t.data.len = 12;
    msa_cli_tensor_clear(&t);
    CHECK(t.shape == NULL && t.data.data == NULL);
    EXPECT_STATUS(msa_cli_tensor_from_f32(&t, MSA__V1__DTYPE__I8, shape, 2, src, &st), 3);
    CHECK_EQ_U(msa_cli_dtype_parse("bfloat16"), MSA__V1__DTYPE__BF16);
    CHECK_EQ_U(msa_cli_dtype_parse("F16"), MSA__V1__DTYPE__F16);
    CHECK_EQ_U(msa_cli_dtype_parse("nope"), MSA__V1__DTYPE__DTYPE_UNSPECIFIED);
    CHECK(!strcmp(msa_cli_grpc_name(5), "NOT_FOUND"));
    CHECK(!strcmp(msa_cli_grpc_name(99), "UNKNOWN"));
}

TEST(unreachable)
{
    msa_cli_status_t st;
    msa_cli_options_t o;
    msa_cli_options_init(&o);
    o.addr = "127.0.0.1:1";
    o.timeout_ms = 3000;
    msa_cli_t *c;
    OK(msa_cli_connect(&o, &c, &st));
    Msa__V1__StatsRequest req = MSA__V1__STATS_REQUEST__INIT;
    Msa__V1__StatsResponse *r = NULL;
    EXPECT_STATUS(msa_cli_stats(c, &req, &r, 0, &st), 14);
    CHECK(r == NULL);
    msa_cli_close(c);
    o.token_file = "/nonexistent/token";
    EXPECT_STATUS(msa_cli_connect(&o, &c, &st), 3);
}

TEST(collections)
{
    NEED_DAEMON();
    msa_cli_status_t st;
    Msa__V1__CollectionSchema s;
    uint32_t layers[NL];
    schema_small(&s, layers);
    Msa__V1__CollectionInfo *ci;
    OK(msa_cli_collection_create(cli, COLL, &s, &ci, &st));
    CHECK(!strcmp(ci->name, COLL));
    CHECK(ci->schema && ci->schema->kv_heads == H && ci->schema->n_layers == NL);
    CHECK_EQ_U(ci->documents, 0);
    msa_cli_free(ci);

    EXPECT_STATUS(msa_cli_collection_create(cli, COLL, &s, NULL, &st), 6); /* ALREADY_EXISTS */
    EXPECT_STATUS(msa_cli_collection_create(cli, "bad/name", &s, NULL, &st), 3);
    s.query_heads = 3; /* not a multiple of H */
    EXPECT_STATUS(msa_cli_collection_create(cli, "other", &s, NULL, &st), 3);
    CHECK(strstr(st.msg, "query_heads") != NULL);
    s.query_heads = HQ;
    EXPECT_STATUS(msa_cli_collection_describe(cli, "missing", NULL, &st), 5);

    /* A second collection to list and drop, through the low-level calls. */
    Msa__V1__CreateCollectionRequest cr = MSA__V1__CREATE_COLLECTION_REQUEST__INIT;
    cr.name = "to_drop";
    cr.schema = &s;
    OK(msa_cli_create_collection(cli, &cr, &ci, 0, &st));
    msa_cli_free(ci);
    Msa__V1__ListCollectionsRequest lr = MSA__V1__LIST_COLLECTIONS_REQUEST__INIT;
    Msa__V1__ListCollectionsResponse *l;
    OK(msa_cli_list_collections(cli, &lr, &l, 0, &st));
    int seen = 0;
    for (size_t i = 0; i < l->n_collections; i++)
        seen +=
            !strcmp(l->collections[i]->name, COLL) + !strcmp(l->collections[i]->name, "to_drop");
    CHECK_EQ_U(seen, 2);
    msa_cli_free(l);
    Msa__V1__DescribeCollectionRequest dr = MSA__V1__DESCRIBE_COLLECTION_REQUEST__INIT;
    dr.name = "to_drop";
    OK(msa_cli_describe_collection(cli, &dr, &ci, 0, &st));
    CHECK_EQ_U(ci->schema->head_dim, D);
    CHECK_EQ_U(ci->schema->kv_dtype, MSA__V1__DTYPE__F32);
    msa_cli_free(ci);
    uint64_t seq = 0;
    OK(msa_cli_collection_drop(cli, "to_drop", &seq, &st));
    CHECK(seq > 0);
    EXPECT_STATUS(msa_cli_collection_drop(cli, "to_drop", NULL, &st), 5);
}

TEST(write_get_list)
{
    NEED_DAEMON();
    msa_cli_status_t st;
    uint64_t seq = 0, ver = 0, prev_seq = 0;
    for (int i = 0; i < NDOC; i++) {
        msa_cli_doc_t *d = make_doc((uint64_t)i + 1, DOC_TOKENS[i], doc_k[i], doc_v[i], &doc_c[i]);
        CHECK(d != NULL);
        if (!d) return;
        char text[64];
        snprintf(text, sizeof text, "document %d", i + 1);
        OK(msa_cli_doc_set_text(d, text, (size_t)-1, &st));
        OK(msa_cli_doc_set_metadata(d, "\x01\x02meta", 6, &st));
        OK(msa_cli_put(cli, COLL, d, 0, true, &seq, &ver, &st));
        CHECK_EQ_U(ver, 1);
        CHECK(seq > prev_seq);
        prev_seq = seq;
        /* expect_absent on an existing id: ALREADY_EXISTS; stale version: FAILED_PRECONDITION */
        EXPECT_STATUS(msa_cli_put(cli, COLL, d, 0, true, NULL, NULL, &st), 6);
        EXPECT_STATUS(msa_cli_put(cli, COLL, d, 7, false, NULL, NULL, &st), 9);
        msa_cli_doc_free(d);
    }
    /* Replace doc 1 with the same tensors: version 2. */
    {
        msa_cli_doc_t *d;
        OK(msa_cli_doc_new(1, DOC_TOKENS[0], false, &d, &st));
        for (int l = 0; l < NL; l++)
            OK(msa_cli_doc_add_layer_f32(d, LAYERS[l], MSA__V1__DTYPE__F32, doc_c[0], H, D,
                                         doc_k[0][l], doc_v[0][l], NULL, &st));
        OK(msa_cli_doc_set_text(d, "document 1", (size_t)-1, &st));
        OK(msa_cli_doc_set_metadata(d, "\x01\x02meta", 6, &st));
        OK(msa_cli_put(cli, COLL, d, 1, false, &seq, &ver, &st));
        CHECK_EQ_U(ver, 2);
        msa_cli_doc_free(d);
    }
    /* Bad shape: INVALID_ARGUMENT naming the field; missing collection: NOT_FOUND. */
    {
        msa_cli_doc_t *d;
        OK(msa_cli_doc_new(99, 8, false, &d, &st));
        float z[3 * H * D];
        fill(z, 3 * H * D);
        for (int l = 0; l < NL; l++)
            OK(msa_cli_doc_add_layer_f32(d, LAYERS[l], MSA__V1__DTYPE__F32, 3, H, D, z, z, NULL,
                                         &st));
        EXPECT_STATUS(msa_cli_put(cli, COLL, d, 0, false, NULL, NULL, &st), 3);
        CHECK(strstr(st.msg, "layers") != NULL);
        EXPECT_STATUS(msa_cli_put(cli, "nope", d, 0, false, NULL, NULL, &st), 5);
        msa_cli_doc_free(d);
        /* id 0 */
        d = make_doc(0, 4, NULL, NULL, NULL);
        EXPECT_STATUS(msa_cli_put(cli, COLL, d, 0, false, NULL, NULL, &st), 3);
        msa_cli_doc_free(d);
    }

    /* Get: info, text, metadata and tensors exactly as written (F32 storage). */
    uint64_t ids[3] = {4, 1, 6};
    Msa__V1__GetRequest gr = MSA__V1__GET_REQUEST__INIT;
    gr.collection = (char *)COLL;
    gr.n_ids = 3;
    gr.ids = ids;
    gr.with_text = gr.with_metadata = gr.with_tensors = true;
    Msa__V1__GetResponse *g;
    OK(msa_cli_get(cli, &gr, &g, 0, &st));
    CHECK_EQ_U(g->n_records, 3);
    CHECK(g->snapshot_seq >= seq);
    for (size_t i = 0; i < g->n_records && i < 3; i++) {
        const Msa__V1__DocumentRecord *r = g->records[i];
        int di = (int)ids[i] - 1;
        CHECK_EQ_U(r->info->id, ids[i]);
        CHECK_EQ_U(r->info->tokens, DOC_TOKENS[di]);
        CHECK_EQ_U(r->info->chunks, doc_c[di]);
        CHECK_EQ_U(r->info->version, ids[i] == 1 ? 2 : 1);
        char want[64];
        snprintf(want, sizeof want, "document %d", di + 1);
        CHECK(!strcmp(r->document->text, want));
        CHECK(r->document->metadata.len == 6 &&
              !memcmp(r->document->metadata.data, "\x01\x02meta", 6));
        CHECK_EQ_U(r->document->n_layers, NL);
        for (size_t l = 0; l < r->document->n_layers; l++) {
            const Msa__V1__LayerKV *lk = r->document->layers[l];
            int li = lk->layer == LAYERS[0] ? 0 : 1;
            CHECK_EQ_U(lk->k->n_shape, 3);
            CHECK_EQ_U(lk->k->shape[0], doc_c[di]);
            float *k, *v;
            size_t n;
            OK(msa_cli_tensor_to_f32_alloc(lk->k, &k, &n, &st));
            OK(msa_cli_tensor_to_f32_alloc(lk->v, &v, &n, &st));
            CHECK_EQ_U(n, (size_t)doc_c[di] * H * D);
            CHECK(!memcmp(k, doc_k[di][li], n * 4));
            CHECK(!memcmp(v, doc_v[di][li], n * 4));
            free(k);
            free(v);
        }
    }
    msa_cli_free(g);
    ids[1] = 12345;
    EXPECT_STATUS(msa_cli_get(cli, &gr, &g, 0, &st), 5);

    /* List in pages of 4. */
    Msa__V1__ListRequest lr = MSA__V1__LIST_REQUEST__INIT;
    lr.collection = (char *)COLL;
    lr.limit = 4;
    Msa__V1__ListResponse *l;
    OK(msa_cli_list(cli, &lr, &l, 0, &st));
    CHECK_EQ_U(l->n_documents, 4);
    CHECK_EQ_U(l->documents[0]->id, 1);
    CHECK_EQ_U(l->next_after_id, 4);
    lr.after_id = l->next_after_id;
    msa_cli_free(l);
    OK(msa_cli_list(cli, &lr, &l, 0, &st));
    CHECK_EQ_U(l->n_documents, 2);
    CHECK_EQ_U(l->documents[0]->id, 5);
    CHECK_EQ_U(l->next_after_id, 0);
    msa_cli_free(l);
}

TEST(route_attend)
{
    NEED_DAEMON();
    msa_cli_status_t st;
    enum { T = 3 };
    float rq[NL][T * HQ * D], q[NL][T * HQ * D];
    uint32_t qs[3] = {T, HQ, D};
    Msa__V1__LayerQuery lq[NL], *lqp[NL];
    for (int l = 0; l < NL; l++) {
        fill(rq[l], T * HQ * D);
        fill(q[l], T * HQ * D);
        msa__v1__layer_query__init(&lq[l]);
        lq[l].layer = LAYERS[l];
        lq[l].routing_q = malloc(sizeof(Msa__V1__Tensor));
        lq[l].q = malloc(sizeof(Msa__V1__Tensor));
        OK(msa_cli_tensor_from_f32(lq[l].routing_q, MSA__V1__DTYPE__F32, qs, 3, rq[l], &st));
        OK(msa_cli_tensor_from_f32(lq[l].q, MSA__V1__DTYPE__F32, qs, 3, q[l], &st));
        lqp[l] = &lq[l];
    }
    uint64_t exclude[1] = {2};
    Msa__V1__RouteRequest rr = MSA__V1__ROUTE_REQUEST__INIT;
    rr.collection = (char *)COLL;
    rr.n_layers = NL;
    rr.layers = lqp;
    rr.top_k = 3;
    rr.n_exclude_ids = 1;
    rr.exclude_ids = exclude;
    Msa__V1__RouteResponse *r;
    OK(msa_cli_route(cli, &rr, &r, 0, &st));
    CHECK_EQ_U(r->n_layers, NL);
    for (size_t i = 0; i < r->n_layers; i++) {
        const Msa__V1__LayerRoute *lr = r->layers[i];
        int li = lr->layer == LAYERS[0] ? 0 : 1;
        /* reference: every doc but 2, sorted by score desc, ties by id */
        double sc[NDOC];
        int order[NDOC], n = 0;
        for (int dd = 0; dd < NDOC; dd++) {
            sc[dd] = ref_score(rq[li], T, doc_k[dd][li], doc_c[dd]);
            if (dd + 1 != 2) order[n++] = dd;
        }
        for (int a = 0; a < n; a++)
            for (int b = a + 1; b < n; b++)
                if (sc[order[b]] > sc[order[a]]) {
                    int t = order[a];
                    order[a] = order[b];
                    order[b] = t;
                }
        CHECK_EQ_U(lr->n_doc_ids, 3);
        CHECK_EQ_U(lr->n_scores, 3);
        for (size_t k = 0; k < lr->n_doc_ids && k < 3; k++) {
            CHECK_EQ_U(lr->doc_ids[k], order[k] + 1);
            CHECK_NEAR(lr->scores[k], sc[order[k]], 1e-4);
        }
    }
    msa_cli_free(r);

    /* Attend over explicit doc ids: out/lse against an fp64 reference. */
    uint64_t sel[2] = {3, 6};
    Msa__V1__AttendRequest ar = MSA__V1__ATTEND_REQUEST__INIT;
    ar.collection = (char *)COLL;
    ar.n_layers = NL;
    ar.layers = lqp;
    ar.n_doc_ids = 2;
    ar.doc_ids = sel;
    Msa__V1__AttendResponse *a;
    OK(msa_cli_attend(cli, &ar, &a, 0, &st));
    CHECK_EQ_U(a->n_layers, NL);
    double scale = 1.0 / sqrt((double)D);
    for (size_t i = 0; i < a->n_layers; i++) {
        const Msa__V1__LayerAttention *la = a->layers[i];
        int li = la->layer == LAYERS[0] ? 0 : 1;
        CHECK(la->out && la->lse);
        if (!la->out || !la->lse) continue;
        CHECK_EQ_U(la->out->dtype, MSA__V1__DTYPE__F32);
        CHECK_EQ_U(la->lse->n_shape, 2);
        float *out, *lse;
        size_t no, nl;
        OK(msa_cli_tensor_to_f32_alloc(la->out, &out, &no, &st));
        OK(msa_cli_tensor_to_f32_alloc(la->lse, &lse, &nl, &st));
        CHECK_EQ_U(no, T * HQ * D);
        CHECK_EQ_U(nl, T * HQ);
        for (int t = 0; t < T; t++)
            for (int j = 0; j < HQ; j++) {
                int h = j / (HQ / H);
                const float *qv = q[li] + ((size_t)t * HQ + j) * D;
                double m = -INFINITY, logit[64];
                int nr = 0;
                const float *vrow[64];
                for (int s = 0; s < 2; s++) {
                    int di = (int)sel[s] - 1;
                    for (uint32_t rr2 = 0; rr2 < doc_c[di]; rr2++) {
                        const float *kv = doc_k[di][li] + ((size_t)rr2 * H + h) * D;
                        double dot = 0;
                        for (int x = 0; x < D; x++) dot += (double)qv[x] * kv[x];
                        logit[nr] = scale * dot;
                        vrow[nr] = doc_v[di][li] + ((size_t)rr2 * H + h) * D;
                        if (logit[nr] > m) m = logit[nr];
                        nr++;
                    }
                }
                double sum = 0;
                for (int x = 0; x < nr; x++) sum += exp(logit[x] - m);
                double want_lse = m + log(sum);
                CHECK_NEAR(lse[t * HQ + j], want_lse, 1e-4);
                for (int x = 0; x < D; x++) {
                    double o = 0;
                    for (int y = 0; y < nr; y++) o += exp(logit[y] - want_lse) * vrow[y][x];
                    CHECK_NEAR(out[((size_t)t * HQ + j) * D + x], o, 1e-4);
                }
            }
        free(out);
        free(lse);
    }
    msa_cli_free(a);

    /* Attend with routing (top_k 2): the selected ids equal Route's. */
    ar.n_doc_ids = 0;
    ar.top_k = 2;
    ar.out_dtype = MSA__V1__DTYPE__BF16;
    OK(msa_cli_attend(cli, &ar, &a, 0, &st));
    rr.top_k = 2;
    rr.n_exclude_ids = 0;
    OK(msa_cli_route(cli, &rr, &r, 0, &st));
    for (size_t i = 0; i < a->n_layers && i < r->n_layers; i++) {
        CHECK_EQ_U(a->layers[i]->n_doc_ids, 2);
        CHECK_EQ_U(a->layers[i]->out->dtype, MSA__V1__DTYPE__BF16);
        for (size_t k = 0; k < 2 && k < a->layers[i]->n_doc_ids; k++)
            CHECK_EQ_U(a->layers[i]->doc_ids[k], r->layers[i]->doc_ids[k]);
    }
    msa_cli_free(a);
    msa_cli_free(r);

    /* Errors: unknown layer, top_k > 1024, missing doc id, wrong query shape. */
    lq[0].layer = 7;
    EXPECT_STATUS(msa_cli_route(cli, &rr, &r, 0, &st), 3);
    lq[0].layer = LAYERS[0];
    rr.top_k = 1025;
    EXPECT_STATUS(msa_cli_route(cli, &rr, &r, 0, &st), 3);
    rr.top_k = 2;
    uint64_t missing[1] = {777};
    ar.n_doc_ids = 1;
    ar.doc_ids = missing;
    EXPECT_STATUS(msa_cli_attend(cli, &ar, &a, 0, &st), 5);
    lq[1].routing_q->shape[2] = D / 2;
    EXPECT_STATUS(msa_cli_route(cli, &rr, &r, 0, &st), 3);
    lq[1].routing_q->shape[2] = D;
    /* min_seq ahead but within reach (msad refuses at once what no write could
     * reach in its 5 s wait): the server waits; our 300 ms deadline passes first. */
    rr.min_seq = 1u << 20;
    EXPECT_STATUS(msa_cli_route(cli, &rr, &r, 300, &st), 4);
    rr.min_seq = 0;
    for (int l = 0; l < NL; l++) {
        msa_cli_tensor_clear(lq[l].routing_q);
        msa_cli_tensor_clear(lq[l].q);
        free(lq[l].routing_q);
        free(lq[l].q);
    }
}

TEST(delete)
{
    NEED_DAEMON();
    msa_cli_status_t st;
    uint64_t ids[2] = {5, 999};
    EXPECT_STATUS(msa_cli_delete(cli, COLL, ids, 2, NULL, &st), 5); /* atomic: 5 survives */
    Msa__V1__CollectionInfo *ci;
    OK(msa_cli_collection_describe(cli, COLL, &ci, &st));
    CHECK_EQ_U(ci->documents, NDOC);
    msa_cli_free(ci);
    uint64_t seq;
    OK(msa_cli_delete(cli, COLL, ids, 1, &seq, &st));
    OK(msa_cli_collection_describe(cli, COLL, &ci, &st));
    CHECK_EQ_U(ci->documents, NDOC - 1);
    msa_cli_free(ci);
    Msa__V1__GetRequest gr = MSA__V1__GET_REQUEST__INIT;
    gr.collection = (char *)COLL;
    gr.n_ids = 1;
    gr.ids = ids;
    Msa__V1__GetResponse *g;
    EXPECT_STATUS(msa_cli_get(cli, &gr, &g, 0, &st), 5);
}

/* A held snapshot: a List holds it, a later Put is invisible to a Get naming it. */
TEST(held_snapshot)
{
    NEED_DAEMON();
    msa_cli_status_t st;
    Msa__V1__ListRequest lr = MSA__V1__LIST_REQUEST__INIT;
    lr.collection = (char *)COLL;
    lr.hold_snapshot_ms = 10000;
    Msa__V1__ListResponse *l;
    OK(msa_cli_list(cli, &lr, &l, 0, &st));
    uint64_t held = l->snapshot_seq;
    msa_cli_free(l);
    msa_cli_doc_t *d = make_doc(77, 5, NULL, NULL, NULL);
    CHECK(d != NULL);
    uint64_t seq = 0;
    OK(msa_cli_put(cli, COLL, d, 0, true, &seq, NULL, &st));
    msa_cli_doc_free(d);
    CHECK(seq > held);
    uint64_t id = 77;
    Msa__V1__GetRequest gr = MSA__V1__GET_REQUEST__INIT;
    gr.collection = (char *)COLL;
    gr.n_ids = 1;
    gr.ids = &id;
    Msa__V1__GetResponse *g;
    OK(msa_cli_get(cli, &gr, &g, 0, &st));
    msa_cli_free(g);
    gr.snapshot_seq = held;
    EXPECT_STATUS(msa_cli_get(cli, &gr, &g, 0, &st), 5); /* not in the held snapshot */
    Msa__V1__ReleaseSnapshotRequest rr = MSA__V1__RELEASE_SNAPSHOT_REQUEST__INIT;
    rr.snapshot_seq = held;
    Msa__V1__ReleaseSnapshotResponse *rel;
    OK(msa_cli_release_snapshot(cli, &rr, &rel, 0, &st));
    CHECK(rel->released);
    msa_cli_free(rel);
    OK(msa_cli_release_snapshot(cli, &rr, &rel, 0, &st));
    CHECK(!rel->released);
    msa_cli_free(rel);
    EXPECT_STATUS(msa_cli_get(cli, &gr, &g, 0, &st), 9); /* FAILED_PRECONDITION: not held */
    CHECK(strstr(st.msg, "snapshot_seq") != NULL);
    OK(msa_cli_delete(cli, COLL, &id, 1, NULL, &st));
}

typedef struct commit_log {
    int calls;
    uint64_t ops;
    uint64_t expect_first;
    bool order_ok;
} commit_log_t;

static void on_commit(void *ud, const Msa__V1__WriteResponse *resp, uint64_t first_op, size_t n_ops)
{
    commit_log_t *c = ud;
    if (first_op != c->expect_first || resp->n_versions != n_ops) c->order_ok = false;
    c->expect_first = first_op + n_ops;
    c->calls++;
    c->ops += n_ops;
}

TEST(batch_writer)
{
    NEED_DAEMON();
    msa_cli_status_t st;
    Msa__V1__CollectionSchema s;
    uint32_t layers[NL];
    schema_small(&s, layers);
    OK(msa_cli_collection_create(cli, "batch", &s, NULL, &st));
    /* One document of 64 tokens = 16 chunks x 2 layers x K,V x 2*8 floats = 4 KiB, ~4.2 KiB
     * packed; 600 documents ~ 2.5 MiB, over the daemon's 1 MiB limit. */
    enum { N = 600 };
    commit_log_t log = {.order_ok = true};
    msa_cli_writer_options_t wo = {
        .max_batch_bytes = 900 << 10, .on_commit = on_commit, .ud = &log};
    msa_cli_writer_t *w;
    OK(msa_cli_writer_open(cli, "batch", &wo, &w, &st));
    for (int i = 0; i < N; i++) {
        msa_cli_doc_t *d = make_doc((uint64_t)i + 1, 64, NULL, NULL, NULL);
        OK(msa_cli_writer_put(w, &d, 0, false, &st));
        CHECK(d == NULL);
    }
    OK(msa_cli_writer_delete(w, 17, 0, &st));
    OK(msa_cli_writer_flush(w, &st));
    uint64_t batches, ops, bytes, last;
    msa_cli_writer_counts(w, &batches, &ops, &bytes, &last);
    CHECK(batches >= 3);
    CHECK_EQ_U(ops, N + 1);
    CHECK(bytes > (2u << 20));
    CHECK(bytes / batches <= (900u << 10));
    CHECK(last > 0);
    CHECK_EQ_U(log.calls, batches);
    CHECK_EQ_U(log.ops, N + 1);
    CHECK(log.order_ok);
    OK(msa_cli_writer_close(w, &st));
    Msa__V1__CollectionInfo *ci;
    OK(msa_cli_collection_describe(cli, "batch", &ci, &st));
    CHECK_EQ_U(ci->documents, N - 1);
    CHECK_EQ_U(ci->tokens, (N - 1) * 64);
    msa_cli_free(ci);

    /* The same ops as one request exceed the daemon's limit: RESOURCE_EXHAUSTED. */
    wo.max_batch_bytes = 64u << 20;
    wo.on_commit = NULL;
    OK(msa_cli_writer_open(cli, "batch", &wo, &w, &st));
    for (int i = 0; i < N; i++) {
        msa_cli_doc_t *d = make_doc((uint64_t)i + 1000, 64, NULL, NULL, NULL);
        OK(msa_cli_writer_put(w, &d, 0, false, &st));
    }
    EXPECT_STATUS(msa_cli_writer_close(w, &st), 8);
    OK(msa_cli_collection_describe(cli, "batch", &ci, &st));
    CHECK_EQ_U(ci->documents, N - 1); /* nothing of the refused request */
    msa_cli_free(ci);

    /* A failing batch: the error is sticky and earlier batches stay committed. */
    wo.max_batch_bytes = 100u << 10;
    OK(msa_cli_writer_open(cli, "batch", &wo, &w, &st));
    for (int i = 0; i < 30; i++) {
        msa_cli_doc_t *d = make_doc((uint64_t)i + 5000, 64, NULL, NULL, NULL);
        OK(msa_cli_writer_put(w, &d, 0, false, &st));
    }
    OK(msa_cli_writer_flush(w, &st));
    OK(msa_cli_writer_delete(w, 424242, 0, &st)); /* missing id: NOT_FOUND at flush */
    EXPECT_STATUS(msa_cli_writer_flush(w, &st), 5);
    CHECK(strstr(st.msg, "batch") != NULL);
    EXPECT_STATUS(msa_cli_writer_delete(w, 5000, 0, &st), 5); /* refused: sticky */
    EXPECT_STATUS(msa_cli_writer_close(w, &st), 5);
    OK(msa_cli_collection_describe(cli, "batch", &ci, &st));
    CHECK_EQ_U(ci->documents, N - 1 + 30);
    msa_cli_free(ci);
}

TEST(admin)
{
    NEED_DAEMON();
    msa_cli_status_t st;
    Msa__V1__StatsRequest sr = MSA__V1__STATS_REQUEST__INIT;
    Msa__V1__StatsResponse *s;
    OK(msa_cli_stats(cli, &sr, &s, 0, &st));
    CHECK(s->version && s->version[0]);
    CHECK(!strcmp(s->backend, "cpu"));
    CHECK(s->commit_seq > 0);
    CHECK(s->collections >= 2);
    CHECK(s->documents >= NDOC - 1);
    msa_cli_free(s);

    Msa__V1__BackupRequest br = MSA__V1__BACKUP_REQUEST__INIT;
    br.name = "snap1";
    Msa__V1__BackupResponse *b;
    OK(msa_cli_backup(cli, &br, &b, 0, &st));
    CHECK(b->bytes > 0);
    CHECK(b->snapshot_seq > 0);
    msa_cli_free(b);
    char path[PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/backups/snap1", dmn.dir);
    struct stat sb;
    CHECK(stat(path, &sb) == 0);
    br.name = "../escape";
    EXPECT_STATUS(msa_cli_backup(cli, &br, &b, 0, &st), 3);

    Msa__V1__VerifyRequest vr = MSA__V1__VERIFY_REQUEST__INIT;
    vr.collection = (char *)COLL;
    Msa__V1__VerifyResponse *v;
    OK(msa_cli_verify(cli, &vr, &v, 0, &st));
    CHECK_EQ_U(v->documents_checked, NDOC - 1);
    CHECK_EQ_U(v->n_problems, 0);
    msa_cli_free(v);
    vr.collection = "missing";
    EXPECT_STATUS(msa_cli_verify(cli, &vr, &v, 0, &st), 5);

    bool serving = false;
    OK(msa_cli_health(cli, "", &serving, 0, &st));
    CHECK(serving);
}

typedef struct par {
    int ok, n;
} par_t;

static void *par_worker(void *arg)
{
    par_t *p = arg;
    for (int i = 0; i < p->n; i++) {
        msa_cli_status_t st;
        Msa__V1__DescribeCollectionRequest r = MSA__V1__DESCRIBE_COLLECTION_REQUEST__INIT;
        r.name = (char *)COLL;
        Msa__V1__CollectionInfo *ci;
        if (msa_cli_describe_collection(cli, &r, &ci, 0, &st) == MSA_OK) {
            if (!strcmp(ci->name, COLL)) p->ok++;
            msa_cli_free(ci);
        }
    }
    return NULL;
}

TEST(concurrent)
{
    NEED_DAEMON();
    enum { NT = 8, NC = 40 };
    pthread_t th[NT];
    par_t p[NT];
    for (int i = 0; i < NT; i++) {
        p[i] = (par_t){0, NC};
        pthread_create(&th[i], NULL, par_worker, &p[i]);
    }
    int total = 0;
    for (int i = 0; i < NT; i++) {
        pthread_join(th[i], NULL);
        total += p[i].ok;
    }
    CHECK_EQ_U(total, NT * NC);
}

TEST(auth)
{
    NEED_DAEMON();
    msa_cli_status_t st;
    char tf[] = "/tmp/msa-tokens-XXXXXX";
    int fd = mkstemp(tf);
    CHECK(fd >= 0);
    if (fd < 0) return;
    const char *text = "# test tokens\nreadtok read\nadmintok admin\n";
    CHECK(write(fd, text, strlen(text)) == (ssize_t)strlen(text));
    close(fd);
    daemon_t d2;
    const char *extra[] = {"--tokens-file", tf, NULL};
    if (!daemon_start(&d2, extra)) {
        FAILF("the second msad (--tokens-file) did not start");
        unlink(tf);
        return;
    }
    msa_cli_options_t o;
    msa_cli_options_init(&o);
    o.addr = d2.addr;
    msa_cli_t *none, *rd, *ad;
    OK(msa_cli_connect(&o, &none, &st));
    o.token = "readtok";
    OK(msa_cli_connect(&o, &rd, &st));
    char af[] = "/tmp/msa-admintok-XXXXXX";
    fd = mkstemp(af);
    CHECK(write(fd, "  admintok \n", 12) == 12);
    close(fd);
    o.token = NULL;
    o.token_file = af;
    OK(msa_cli_connect(&o, &ad, &st));
    Msa__V1__ListCollectionsRequest lr = MSA__V1__LIST_COLLECTIONS_REQUEST__INIT;
    Msa__V1__ListCollectionsResponse *l;
    EXPECT_STATUS(msa_cli_list_collections(none, &lr, &l, 0, &st), 16);
    OK(msa_cli_list_collections(rd, &lr, &l, 0, &st));
    msa_cli_free(l);
    Msa__V1__CollectionSchema s;
    uint32_t layers[NL];
    schema_small(&s, layers);
    EXPECT_STATUS(msa_cli_collection_create(rd, "c", &s, NULL, &st), 7);
    OK(msa_cli_collection_create(ad, "c", &s, NULL, &st));
    msa_cli_close(none);
    msa_cli_close(rd);
    msa_cli_close(ad);
    unlink(af);
    unlink(tf);
    CHECK_EQ_U(daemon_stop(&d2), 0);
}

/* ======================================================================================
 * main
 * ==================================================================================== */

/* Last: msad shuts down cleanly on SIGTERM after all the above. */
TEST(daemon_exits_cleanly)
{
    NEED_DAEMON();
    msa_cli_close(cli);
    cli = NULL;
    have_msad = false;
    CHECK_EQ_I(daemon_stop(&dmn), 0);
}

static const msa_test_t TESTS[] = {
    TEST_ENTRY(tensor_conversions), TEST_ENTRY(unreachable),  TEST_ENTRY(collections),
    TEST_ENTRY(write_get_list),     TEST_ENTRY(route_attend), TEST_ENTRY(delete),
    TEST_ENTRY(held_snapshot),      TEST_ENTRY(batch_writer), TEST_ENTRY(admin),
    TEST_ENTRY(concurrent),         TEST_ENTRY(auth),         TEST_ENTRY(daemon_exits_cleanly),
};

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    if (find_msad()) {
        if (!daemon_start(&dmn, NULL)) return 1;
        msa_cli_options_t o;
        msa_cli_options_init(&o);
        o.addr = dmn.addr;
        o.timeout_ms = 20000;
        msa_cli_status_t st;
        if (msa_cli_connect(&o, &cli, &st)) {
            fprintf(stderr, "connect: %s\n", st.msg);
            return 1;
        }
        have_msad = true;
    }
    int rc = msa_test_run(TESTS, sizeof TESTS / sizeof *TESTS, argc, argv);
    if (have_msad) { /* daemon_exits_cleanly was not picked */
        msa_cli_close(cli);
        daemon_stop(&dmn);
    }
    for (int i = 0; i < NDOC; i++)
        for (int l = 0; l < NL; l++) {
            free(doc_k[i][l]);
            free(doc_v[i][l]);
        }
    return rc;
}
