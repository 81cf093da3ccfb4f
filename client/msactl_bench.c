/* msactl_bench.c — `msactl bench`: synthetic collection, batch-writer ingest, then Route
 * and Attend latency (p50/p99) and throughput at several concurrencies, next to the RPC
 * floor (an empty Stats call) and the memory-bandwidth floor of the routing scan.
 *
 * Threads share the one connection (libmsaclient is thread-safe) and one read-only
 * request message per operation.
 */
#include "msactl.h"

#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char BENCH_HELP[] =
    "usage: msactl bench [OPTIONS] [SCHEMA FLAGS]\n"
    "\n"
    "Creates (or with --reuse tops up) a collection of random pooled documents, ingests it\n"
    "with the batch writer, then measures Route and Attend (all layers in one call) at\n"
    "each concurrency: p50/p99/mean latency and requests per second. Also reports the RPC\n"
    "floor (round trip of an empty Stats call) and the bandwidth floor of one routing scan\n"
    "(router-key bytes / --mem-bw-gbps).\n"
    "\n"
    "  --collection NAME     [msactl_bench]\n"
    "  --tokens N            store size in tokens [1048576]\n"
    "  --doc-tokens N        tokens per document [1024]\n"
    "  --query-tokens T      query tokens per layer [64]\n"
    "  --query-dtype T       f32|f16|bf16 of routing_q and q [bf16]\n"
    "  --top-k K             [16]\n"
    "  --concurrency LIST    threads per level, e.g. 1,4,16 [1,4,16]\n"
    "  --duration S          seconds per level [3]\n"
    "  --requests N          at most N requests per level (0 = until --duration) [0]\n"
    "  --warmup N            unmeasured calls before measuring [3]\n"
    "  --ops LIST            route,attend [route,attend]\n"
    "  --batch-mb N          write batch size [32]\n"
    "  --mem-bw-gbps G       memory bandwidth for the floor [15]\n"
    "  --seed N              random seed [1]\n"
    "  --reuse               use an existing collection, adding documents up to --tokens\n"
    "  --keep                keep the collection afterwards (default: drop it, unless reused)\n"
    "Schema flags as for `collections create`; defaults are MSA-4B's: --layers 0-17\n"
    "--kv-heads 8 --query-heads 32 --head-dim 128 --chunk-tokens 64 --kv-dtype bf16\n"
    "--routing-dtype bf16 --separate-router-keys.\n"
    "\n"
    "Output: a table, or with --json one object: shape, store, ingest, rpc_floor,\n"
    "bandwidth_floor, route[] and attend[] (one entry per concurrency).\n";

/* ======================================================================================
 * Random data
 * ==================================================================================== */

static uint64_t rng_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

/* Uniform in [-1, 1): cheap and enough to spread routing scores. */
static void fill(float *p, size_t n, uint64_t *s)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (float)((double)(rng_next(s) >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}

/* ======================================================================================
 * Measurement
 * ==================================================================================== */

typedef struct lat {
    double *v;
    size_t n, cap;
} lat_t;

static void lat_add(lat_t *l, double ms)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 1024;
        l->v = realloc(l->v, l->cap * sizeof *l->v);
        if (!l->v) abort();
    }
    l->v[l->n++] = ms;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(const double *sorted, size_t n, double p)
{
    if (n == 0) return 0;
    double r = p * (double)(n - 1);
    size_t i = (size_t)r;
    double f = r - (double)i;
    return i + 1 < n ? sorted[i] * (1 - f) + sorted[i + 1] * f : sorted[i];
}

typedef enum { OP_STATS, OP_ROUTE, OP_ATTEND } op_t;

typedef struct job {
    msa_cli_t *c;
    op_t op;
    const void *req;
    double end;               /* monotonic deadline of the level */
    uint64_t max_requests;    /* per level, shared budget */
    _Atomic uint64_t *issued; /* requests started in this level */
    lat_t lat;                /* this thread's latencies (ms) */
    msa_cli_status_t st;      /* first error */
    int rc;
} job_t;

static int one_call(msa_cli_t *c, op_t op, const void *req, msa_cli_status_t *st)
{
    int rc;
    if (op == OP_STATS) {
        Msa__V1__StatsResponse *r;
        rc = msa_cli_stats(c, req, &r, 0, st);
        if (!rc) msa_cli_free(r);
    } else if (op == OP_ROUTE) {
        Msa__V1__RouteResponse *r;
        rc = msa_cli_route(c, req, &r, 0, st);
        if (!rc) msa_cli_free(r);
    } else {
        Msa__V1__AttendResponse *r;
        rc = msa_cli_attend(c, req, &r, 0, st);
        if (!rc) msa_cli_free(r);
    }
    return rc;
}

static void *worker(void *arg)
{
    job_t *j = arg;
    for (;;) {
        if (ctl_now() >= j->end) break;
        if (j->max_requests && atomic_fetch_add(j->issued, 1) >= j->max_requests) break;
        double t0 = ctl_now();
        if ((j->rc = one_call(j->c, j->op, j->req, &j->st)) != MSA_OK) break;
        lat_add(&j->lat, (ctl_now() - t0) * 1e3);
    }
    return NULL;
}

typedef struct level {
    unsigned conc;
    uint64_t requests;
    double seconds, p50, p99, mean, min, max, rps;
} level_t;

/* Runs one level; returns MSA_OK or the first error (in *st). */
static int run_level(msa_cli_t *c, op_t op, const void *req, unsigned conc, double duration,
                     uint64_t max_requests, level_t *out, msa_cli_status_t *st)
{
    job_t *jobs = calloc(conc, sizeof *jobs);
    pthread_t *th = calloc(conc, sizeof *th);
    _Atomic uint64_t issued = 0;
    double t0 = ctl_now();
    for (unsigned i = 0; i < conc; i++) {
        jobs[i] = (job_t){.c = c,
                          .op = op,
                          .req = req,
                          .end = t0 + duration,
                          .max_requests = max_requests,
                          .issued = &issued};
        pthread_create(&th[i], NULL, worker, &jobs[i]);
    }
    lat_t all = {0};
    int rc = MSA_OK;
    for (unsigned i = 0; i < conc; i++) {
        pthread_join(th[i], NULL);
        if (jobs[i].rc && rc == MSA_OK) {
            rc = jobs[i].rc;
            *st = jobs[i].st;
        }
        for (size_t k = 0; k < jobs[i].lat.n; k++) lat_add(&all, jobs[i].lat.v[k]);
        free(jobs[i].lat.v);
    }
    double wall = ctl_now() - t0;
    free(jobs);
    free(th);
    memset(out, 0, sizeof *out);
    out->conc = conc;
    out->requests = all.n;
    out->seconds = wall;
    if (all.n) {
        qsort(all.v, all.n, sizeof *all.v, cmp_d);
        double sum = 0;
        for (size_t k = 0; k < all.n; k++) sum += all.v[k];
        out->p50 = pct(all.v, all.n, 0.5);
        out->p99 = pct(all.v, all.n, 0.99);
        out->mean = sum / (double)all.n;
        out->min = all.v[0];
        out->max = all.v[all.n - 1];
        out->rps = (double)all.n / wall;
    }
    free(all.v);
    return rc;
}

static cJSON *level_json(const level_t *l)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "concurrency", l->conc);
    jadd_u64(o, "requests", l->requests);
    cJSON_AddNumberToObject(o, "seconds", l->seconds);
    cJSON_AddNumberToObject(o, "p50_ms", l->p50);
    cJSON_AddNumberToObject(o, "p99_ms", l->p99);
    cJSON_AddNumberToObject(o, "mean_ms", l->mean);
    cJSON_AddNumberToObject(o, "min_ms", l->min);
    cJSON_AddNumberToObject(o, "max_ms", l->max);
    cJSON_AddNumberToObject(o, "throughput_rps", l->rps);
    return o;
}

/* ======================================================================================
 * bench
 * ==================================================================================== */

typedef struct ingest_cb {
    ctl_t *ctl;
    uint64_t tokens_done, tokens_total, doc_tokens, n_docs; /* tokens; documents */
} ingest_cb_t;

static void on_commit(void *ud, const Msa__V1__WriteResponse *resp, uint64_t first_op, size_t n_ops)
{
    ingest_cb_t *cb = ud;
    cb->tokens_done += (uint64_t)n_ops * cb->doc_tokens;
    if (first_op + n_ops == cb->n_docs) cb->tokens_done = cb->tokens_total;
    ctl_progress(cb->ctl, "ingest", cb->tokens_done, cb->tokens_total);
}

int cmd_bench(ctl_t *ctl, int argc, char **argv)
{
    const char *coll = "msactl_bench", *v;
    uint64_t tokens = 1048576, seed = 1, max_requests = 0;
    uint32_t doc_tokens = 1024, qt = 64, top_k = 16, warmup = 3, batch_mb = 32;
    double duration = 3, bw = 15;
    Msa__V1__DType qdt = MSA__V1__DTYPE__BF16;
    bool reuse = false, keep = false, do_route = true, do_attend = true;
    uint64_t *conc = NULL;
    size_t n_conc = 0;
    Msa__V1__CollectionSchema schema;
    msa_cli_schema_init(&schema);
    static uint32_t default_layers[18] = {0, 1,  2,  3,  4,  5,  6,  7,  8,
                                          9, 10, 11, 12, 13, 14, 15, 16, 17};
    schema.n_layers = 18;
    schema.layers = default_layers;
    schema.kv_heads = 8;
    schema.query_heads = 32;
    schema.head_dim = 128;
    schema.separate_router_keys = true;
    for (int i = 1; i < argc; i++) {
        if (ctl_is_help(argv[i])) {
            fputs(BENCH_HELP, stdout);
            return EXIT_OK;
        }
        if (ctl_common_opt(ctl, argc, argv, &i)) continue;
        if (!strncmp(argv[i], "--layers", 8) && schema.layers == default_layers)
            schema.layers = NULL;
        if (ctl_schema_opt(&schema, argc, argv, &i)) continue;
        if (ctl_arg(argc, argv, &i, "--collection", &v))
            coll = v;
        else if (ctl_arg(argc, argv, &i, "--tokens", &v))
            tokens = ctl_u64("--tokens", v);
        else if (ctl_arg(argc, argv, &i, "--doc-tokens", &v))
            doc_tokens = ctl_u32("--doc-tokens", v);
        else if (ctl_arg(argc, argv, &i, "--query-tokens", &v))
            qt = ctl_u32("--query-tokens", v);
        else if (ctl_arg(argc, argv, &i, "--query-dtype", &v)) {
            qdt = msa_cli_dtype_parse(v);
            if (qdt == MSA__V1__DTYPE__DTYPE_UNSPECIFIED || qdt == MSA__V1__DTYPE__I8)
                return ctl_usage("--query-dtype: '%s': want f32, f16 or bf16", v);
        } else if (ctl_arg(argc, argv, &i, "--top-k", &v))
            top_k = ctl_u32("--top-k", v);
        else if (ctl_arg(argc, argv, &i, "--concurrency", &v))
            n_conc = ctl_u64_list("--concurrency", v, &conc);
        else if (ctl_arg(argc, argv, &i, "--duration", &v))
            duration = ctl_double("--duration", v);
        else if (ctl_arg(argc, argv, &i, "--requests", &v))
            max_requests = ctl_u64("--requests", v);
        else if (ctl_arg(argc, argv, &i, "--warmup", &v))
            warmup = ctl_u32("--warmup", v);
        else if (ctl_arg(argc, argv, &i, "--batch-mb", &v))
            batch_mb = ctl_u32("--batch-mb", v);
        else if (ctl_arg(argc, argv, &i, "--mem-bw-gbps", &v))
            bw = ctl_double("--mem-bw-gbps", v);
        else if (ctl_arg(argc, argv, &i, "--seed", &v))
            seed = ctl_u64("--seed", v);
        else if (ctl_arg(argc, argv, &i, "--ops", &v)) {
            do_route = strstr(v, "route") != NULL;
            do_attend = strstr(v, "attend") != NULL;
            if (!do_route && !do_attend)
                return ctl_usage("--ops: want route, attend or route,attend");
        } else if (!strcmp(argv[i], "--reuse"))
            reuse = true;
        else if (!strcmp(argv[i], "--keep"))
            keep = true;
        else
            return ctl_usage("bench: unknown argument %s (see msactl bench --help)", argv[i]);
    }
    static uint64_t default_conc[3] = {1, 4, 16};
    if (!conc) {
        conc = default_conc;
        n_conc = 3;
    }
    for (size_t i = 0; i < n_conc; i++)
        if (conc[i] == 0 || conc[i] > 1024)
            return ctl_usage("--concurrency: %" PRIu64 " out of 1..1024", conc[i]);
    if (doc_tokens == 0 || qt == 0 || tokens == 0) return ctl_usage("bench: sizes must be > 0");
    if (duration <= 0 && max_requests == 0)
        return ctl_usage("bench: --duration or --requests must be > 0");
    if (duration <= 0) duration = 1e9;
    if (!schema.layers || !schema.n_layers || !schema.kv_heads || !schema.query_heads ||
        !schema.head_dim || !schema.chunk_tokens)
        return ctl_usage("bench: incomplete schema");
    if (!seed) seed = 1;

    msa_cli_t *c = ctl_conn(ctl);
    msa_cli_status_t st;
    const uint32_t L = (uint32_t)schema.n_layers, H = schema.kv_heads, Hq = schema.query_heads,
                   D = schema.head_dim, P = schema.chunk_tokens;

    /* ---- collection ---------------------------------------------------------------- */
    Msa__V1__CollectionInfo *ci = NULL;
    bool existed = false;
    if (reuse) {
        int rc = msa_cli_collection_describe(c, coll, &ci, &st);
        if (rc == MSA_OK) {
            existed = true;
            const Msa__V1__CollectionSchema *s = ci->schema;
            if (!s || s->kv_heads != H || s->query_heads != Hq || s->head_dim != D ||
                s->chunk_tokens != P || s->n_layers != L)
                return ctl_usage(
                    "bench --reuse: collection %s has another shape; drop it or use --collection",
                    coll);
            schema.kv_dtype = s->kv_dtype;
            schema.routing_dtype = s->routing_dtype;
            schema.separate_router_keys = s->separate_router_keys;
            memcpy(schema.layers, s->layers, L * sizeof *schema.layers);
        } else if (rc != MSA_ENOTFOUND) {
            return ctl_fail(ctl, &st);
        }
    }
    if (!existed) {
        if (msa_cli_collection_create(c, coll, &schema, &ci, &st)) return ctl_fail(ctl, &st);
    }
    uint64_t have_tokens = ci->tokens, next_id = ci->documents + 1;
    msa_cli_free(ci);

    /* ---- ingest ---------------------------------------------------------------------- */
    uint64_t add = tokens > have_tokens ? tokens - have_tokens : 0;
    uint64_t n_docs = (add + doc_tokens - 1) / doc_tokens;
    double t_ing = ctl_now();
    uint64_t batches = 0, ops = 0, sent = 0, seq = 0;
    if (add) {
        msa_cli_writer_options_t wo = {0};
        ingest_cb_t cb = {
            .ctl = ctl, .tokens_total = add, .doc_tokens = doc_tokens, .n_docs = n_docs};
        wo.max_batch_bytes = (size_t)batch_mb << 20;
        if (wo.max_batch_bytes + (64u << 10) > msa_cli_max_message(c))
            wo.max_batch_bytes = msa_cli_max_message(c) - (64u << 10);
        wo.on_commit = on_commit;
        wo.ud = &cb;
        wo.timeout_ms = -1;
        msa_cli_writer_t *w;
        if (msa_cli_writer_open(c, coll, &wo, &w, &st)) return ctl_fail(ctl, &st);
        uint32_t maxC = (doc_tokens + P - 1) / P;
        size_t per = (size_t)maxC * H * D;
        float *k = malloc(per * sizeof *k), *vv = malloc(per * sizeof *vv),
              *r = malloc(per * sizeof *r);
        uint64_t rs = seed * 0x9E3779B97F4A7C15ull;
        Msa__V1__DType dt = schema.kv_dtype ? schema.kv_dtype : MSA__V1__DTYPE__BF16;
        ctl_progress(ctl, "ingest", 0, add);
        for (uint64_t d = 0; d < n_docs; d++) {
            uint32_t nt = (uint32_t)(d + 1 < n_docs ? doc_tokens : add - d * doc_tokens);
            uint32_t C = (nt + P - 1) / P;
            msa_cli_doc_t *doc;
            if (msa_cli_doc_new(next_id + d, nt, false, &doc, &st)) return ctl_fail(ctl, &st);
            for (uint32_t l = 0; l < L; l++) {
                size_t n = (size_t)C * H * D;
                fill(k, n, &rs);
                fill(vv, n, &rs);
                if (schema.separate_router_keys) fill(r, n, &rs);
                if (msa_cli_doc_add_layer_f32(doc, schema.layers[l], dt, C, H, D, k, vv,
                                              schema.separate_router_keys ? r : NULL, &st))
                    return ctl_fail(ctl, &st);
            }
            if (msa_cli_writer_put(w, &doc, 0, false, &st)) return ctl_fail(ctl, &st);
        }
        free(k);
        free(vv);
        free(r);
        if (msa_cli_writer_flush(w, &st)) return ctl_fail(ctl, &st);
        msa_cli_writer_counts(w, &batches, &ops, &sent, &seq);
        if (msa_cli_writer_close(w, &st)) return ctl_fail(ctl, &st);
        ctl_progress_end(ctl);
    }
    double ingest_s = ctl_now() - t_ing;

    /* ---- store facts ------------------------------------------------------------------ */
    if (msa_cli_collection_describe(c, coll, &ci, &st)) return ctl_fail(ctl, &st);
    uint64_t s_tokens = ci->tokens, s_docs = ci->documents, s_chunks = ci->chunks,
             s_bytes = ci->bytes;
    Msa__V1__DType rdt =
        ci->schema && ci->schema->routing_dtype ? ci->schema->routing_dtype : MSA__V1__DTYPE__BF16;
    msa_cli_free(ci);
    Msa__V1__StatsRequest sreq = MSA__V1__STATS_REQUEST__INIT;
    Msa__V1__StatsResponse *sr;
    if (msa_cli_stats(c, &sreq, &sr, 0, &st)) return ctl_fail(ctl, &st);
    char backend[64], version[64];
    snprintf(backend, sizeof backend, "%s", sr->backend);
    snprintf(version, sizeof version, "%s", sr->version);
    msa_cli_free(sr);
    double row_bytes = rdt == MSA__V1__DTYPE__I8 ? (double)H * D + 4.0 * H
                                                 : (double)H * D * (double)msa_cli_dtype_size(rdt);
    double scan_bytes = (double)s_chunks * L * row_bytes;
    double bw_floor_ms = scan_bytes / (bw * 1e9) * 1e3;

    /* ---- queries ---------------------------------------------------------------------- */
    uint64_t qs = (seed + 7) * 0xD1B54A32D192ED03ull;
    size_t qn = (size_t)qt * Hq * D;
    float *qf = malloc(qn * sizeof *qf);
    uint32_t qshape[3] = {qt, Hq, D};
    Msa__V1__LayerQuery *lq = calloc(L, sizeof *lq);
    Msa__V1__LayerQuery **lqp = calloc(L, sizeof *lqp);
    for (uint32_t l = 0; l < L; l++) {
        msa__v1__layer_query__init(&lq[l]);
        lq[l].layer = schema.layers[l];
        lq[l].routing_q = malloc(sizeof(Msa__V1__Tensor));
        lq[l].q = malloc(sizeof(Msa__V1__Tensor));
        fill(qf, qn, &qs);
        msa_cli_tensor_from_f32(lq[l].routing_q, qdt, qshape, 3, qf, &st);
        fill(qf, qn, &qs);
        msa_cli_tensor_from_f32(lq[l].q, qdt, qshape, 3, qf, &st);
        lqp[l] = &lq[l];
    }
    free(qf);
    Msa__V1__RouteRequest rreq = MSA__V1__ROUTE_REQUEST__INIT;
    rreq.collection = (char *)coll;
    rreq.n_layers = L;
    rreq.layers = lqp;
    rreq.top_k = top_k;
    Msa__V1__AttendRequest areq = MSA__V1__ATTEND_REQUEST__INIT;
    areq.collection = (char *)coll;
    areq.n_layers = L;
    areq.layers = lqp; /* routing_q + q */
    areq.top_k = top_k;
    /* Route ignores q; send it only for Attend. */
    Msa__V1__LayerQuery *rlq = calloc(L, sizeof *rlq);
    Msa__V1__LayerQuery **rlqp = calloc(L, sizeof *rlqp);
    for (uint32_t l = 0; l < L; l++) {
        rlq[l] = lq[l];
        rlq[l].q = NULL;
        rlqp[l] = &rlq[l];
    }
    rreq.layers = rlqp;

    /* ---- measure ---------------------------------------------------------------------- */
    int rc = EXIT_OK;
    level_t floor_l;
    for (uint32_t i = 0; i < warmup; i++)
        if (one_call(c, OP_STATS, &sreq, &st)) return ctl_fail(ctl, &st);
    if (run_level(c, OP_STATS, &sreq, 1, duration < 1 ? duration : 1, 2000, &floor_l, &st))
        return ctl_fail(ctl, &st);

    level_t *route_l = calloc(n_conc, sizeof *route_l),
            *attend_l = calloc(n_conc, sizeof *attend_l);
    for (int o = 0; o < 2; o++) {
        bool on = o == 0 ? do_route : do_attend;
        if (!on) continue;
        op_t op = o == 0 ? OP_ROUTE : OP_ATTEND;
        const void *req = o == 0 ? (const void *)&rreq : (const void *)&areq;
        for (uint32_t i = 0; i < warmup; i++)
            if (one_call(c, op, req, &st)) return ctl_fail(ctl, &st);
        for (size_t k = 0; k < n_conc; k++) {
            if (ctl->progress)
                fprintf(stderr, "\r\033[K%s at concurrency %" PRIu64 "...",
                        o == 0 ? "route" : "attend", conc[k]);
            if (run_level(c, op, req, (unsigned)conc[k], duration, max_requests,
                          o == 0 ? &route_l[k] : &attend_l[k], &st)) {
                if (ctl->progress) fputs("\r\033[K", stderr);
                return ctl_fail(ctl, &st);
            }
        }
        if (ctl->progress) fputs("\r\033[K", stderr);
    }
    size_t route_req_bytes = protobuf_c_message_get_packed_size((const ProtobufCMessage *)&rreq);
    size_t attend_req_bytes = protobuf_c_message_get_packed_size((const ProtobufCMessage *)&areq);

    /* ---- report ----------------------------------------------------------------------- */
    if (ctl->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "collection", coll);
        cJSON_AddStringToObject(j, "backend", backend);
        cJSON_AddStringToObject(j, "server_version", version);
        cJSON_AddStringToObject(j, "addr", msa_cli_addr(c));
        cJSON *sh = cJSON_AddObjectToObject(j, "shape");
        cJSON_AddNumberToObject(sh, "layers", L);
        cJSON_AddNumberToObject(sh, "kv_heads", H);
        cJSON_AddNumberToObject(sh, "query_heads", Hq);
        cJSON_AddNumberToObject(sh, "head_dim", D);
        cJSON_AddNumberToObject(sh, "chunk_tokens", P);
        cJSON_AddStringToObject(sh, "kv_dtype", msa_cli_dtype_name(schema.kv_dtype));
        cJSON_AddStringToObject(sh, "routing_dtype", msa_cli_dtype_name(rdt));
        cJSON_AddBoolToObject(sh, "separate_router_keys", schema.separate_router_keys);
        cJSON_AddNumberToObject(sh, "doc_tokens", doc_tokens);
        cJSON_AddNumberToObject(sh, "query_tokens", qt);
        cJSON_AddStringToObject(sh, "query_dtype", msa_cli_dtype_name(qdt));
        cJSON_AddNumberToObject(sh, "top_k", top_k);
        cJSON *so = cJSON_AddObjectToObject(j, "store");
        jadd_u64(so, "tokens", s_tokens);
        jadd_u64(so, "documents", s_docs);
        jadd_u64(so, "chunks", s_chunks);
        jadd_u64(so, "bytes", s_bytes);
        cJSON *in = cJSON_AddObjectToObject(j, "ingest");
        jadd_u64(in, "tokens_added", add);
        jadd_u64(in, "documents_added", ops);
        jadd_u64(in, "batches", batches);
        jadd_u64(in, "bytes_sent", sent);
        jadd_u64(in, "last_commit_seq", seq);
        cJSON_AddNumberToObject(in, "seconds", ingest_s);
        cJSON_AddNumberToObject(in, "tokens_per_s",
                                ingest_s > 0 && add ? (double)add / ingest_s : 0);
        cJSON *fl = cJSON_AddObjectToObject(j, "rpc_floor");
        cJSON_AddStringToObject(fl, "method", "Stats");
        jadd_u64(fl, "requests", floor_l.requests);
        cJSON_AddNumberToObject(fl, "p50_ms", floor_l.p50);
        cJSON_AddNumberToObject(fl, "p99_ms", floor_l.p99);
        cJSON_AddNumberToObject(fl, "mean_ms", floor_l.mean);
        cJSON *bf = cJSON_AddObjectToObject(j, "bandwidth_floor");
        cJSON_AddNumberToObject(bf, "routing_bytes_per_query", scan_bytes);
        cJSON_AddNumberToObject(bf, "gbps", bw);
        cJSON_AddNumberToObject(bf, "ms", bw_floor_ms);
        cJSON *rb = cJSON_AddObjectToObject(j, "request_bytes");
        jadd_u64(rb, "route", route_req_bytes);
        jadd_u64(rb, "attend", attend_req_bytes);
        cJSON *ra = cJSON_AddArrayToObject(j, "route");
        cJSON *aa = cJSON_AddArrayToObject(j, "attend");
        for (size_t k = 0; k < n_conc; k++) {
            if (do_route) cJSON_AddItemToArray(ra, level_json(&route_l[k]));
            if (do_attend) cJSON_AddItemToArray(aa, level_json(&attend_l[k]));
        }
        jprint(j);
    } else {
        char b1[32], b2[32];
        printf("bench %s on %s (backend %s, msad %s)\n", coll, msa_cli_addr(c), backend, version);
        printf("store: %" PRIu64 " tokens, %" PRIu64 " documents, %" PRIu64 " chunks, %s\n",
               s_tokens, s_docs, s_chunks, ctl_bytes(s_bytes, b1, sizeof b1));
        printf("shape: %u layers, H=%u Hq=%u D=%u P=%u, kv %s, routing %s%s; T=%u (%s), top_k=%u\n",
               L, H, Hq, D, P, msa_cli_dtype_name(schema.kv_dtype), msa_cli_dtype_name(rdt),
               schema.separate_router_keys ? ", router keys" : "", qt, msa_cli_dtype_name(qdt),
               top_k);
        if (add)
            printf("ingest: %" PRIu64 " tokens in %.2f s (%.0f tokens/s, %" PRIu64
                   " batches, %s)\n",
                   add, ingest_s, (double)add / (ingest_s > 0 ? ingest_s : 1), batches,
                   ctl_bytes(sent, b2, sizeof b2));
        printf("rpc floor (Stats): p50 %.3f ms, p99 %.3f ms\n", floor_l.p50, floor_l.p99);
        printf("bandwidth floor: %s of router keys per query -> %.3f ms at %.0f GB/s\n",
               ctl_bytes((uint64_t)scan_bytes, b2, sizeof b2), bw_floor_ms, bw);
        printf("request size: route %s, attend %s\n\n", ctl_bytes(route_req_bytes, b1, sizeof b1),
               ctl_bytes(attend_req_bytes, b2, sizeof b2));
        printf("%-7s %5s %9s %10s %10s %10s %10s\n", "OP", "CONC", "REQUESTS", "P50 ms", "P99 ms",
               "MEAN ms", "REQ/S");
        for (int o = 0; o < 2; o++) {
            if (!(o == 0 ? do_route : do_attend)) continue;
            for (size_t k = 0; k < n_conc; k++) {
                const level_t *l = o == 0 ? &route_l[k] : &attend_l[k];
                printf("%-7s %5u %9" PRIu64 " %10.3f %10.3f %10.3f %10.1f\n",
                       o == 0 ? "route" : "attend", l->conc, l->requests, l->p50, l->p99, l->mean,
                       l->rps);
            }
        }
    }

    /* ---- clean up ----------------------------------------------------------------------- */
    if (!keep && !reuse && msa_cli_collection_drop(c, coll, NULL, &st)) rc = ctl_fail(ctl, &st);
    for (uint32_t l = 0; l < L; l++) {
        msa_cli_tensor_clear(lq[l].routing_q);
        msa_cli_tensor_clear(lq[l].q);
        free(lq[l].routing_q);
        free(lq[l].q);
    }
    free(lq);
    free(lqp);
    free(rlq);
    free(rlqp);
    free(route_l);
    free(attend_l);
    if (schema.layers != default_layers) free(schema.layers);
    if (conc != default_conc) free(conc);
    return rc;
}
