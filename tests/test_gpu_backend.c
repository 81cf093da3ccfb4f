/* test_gpu_backend.c — the CUDA backend's host logic (gpu/backend.c) on the
 * simulated device, driven through the index (msa_idx_route with the backend
 * installed as accelerator) and msa_gpu_attend, and checked against a brute
 * force reference written here from the keys the test inserted:
 *
 *   - MVCC churn: puts, replacements, deletes and re-inserts of the same ids,
 *     compaction while old snapshots stay open; every held snapshot is routed
 *     after every step on 2 simulated GPUs x 3 shards (mirror sync: appends,
 *     deleted-seq re-uploads, rebuilds after compaction);
 *   - paging: a routing budget that holds about one layer, so mirrors evict
 *     each other and queries stream;
 *   - concurrency: reader threads route random held snapshots (coalescing on)
 *     while a writer thread churns and compacts, with a budget small enough
 *     that mirrors page out under the readers;
 *   - a device fault (cfg.dev.sim_fault): the backend switches off and
 *     the CPU answers exactly;
 *   - Attend: concurrent calls over the same documents (concurrent misses of
 *     one key), blocks homed on two GPUs, a tiny K/V cache.
 *
 * Reference: score(d) = max over rows r and tokens t of
 * (1/Hq) sum_j dot(q[t,j], k[r, j/G]) (DOT, HEAD_MEAN, QUERY_MAX, CHUNK_MAX,
 * F32 keys), computed in double over the versions visible at the snapshot.
 */
#define _GNU_SOURCE
#define MSA_TEST_KEEP_GOING
#include "harness.h"

#include "backend.h"
#include "index.h"
#include "msa_clock.h"
#include "tensor.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { L = 2, H = 2, HQ = 4, D = 8, W = H * D, MAXROWS = 5, T = 2, COLL = 7 };
#define LIVE UINT64_MAX

/* I8 routing: the index holds keys quantised per (row, head); the reference
 * scores the dequantised keys (what the index stores), so the check is about
 * the backend (scales on the device, mirrors), not about quantisation. */
static bool g_i8;
/* Row arrays from the backend's (pinned) host allocator, every size pinned. */
static bool g_pinned;

/* ---- the model: every version ever written ------------------------------------ */

typedef struct version {
    uint64_t doc, created, deleted;
    uint32_t nrows;
    float *rows[L]; /* [nrows][W] */
} version_t;

typedef struct model {
    pthread_mutex_t mu;
    version_t *v;
    size_t n, cap;
    uint64_t seq; /* last applied */
} model_t;

/* xorshift64; every caller (thread) keeps its own state. */
static uint64_t rnd_r(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}
static float frand_r(uint64_t *s)
{
    return (float)((rnd_r(s) >> 11) * (1.0 / 9007199254740992.0)) * 2 - 1;
}

static msa_schema_t schema(void)
{
    msa_schema_t s;
    memset(&s, 0, sizeof s);
    s.n_layers = L;
    s.layers[0] = 3;
    s.layers[1] = 9;
    s.kv_heads = H;
    s.query_heads = HQ;
    s.head_dim = D;
    s.chunk_tokens = 4;
    s.kv_dtype = MSA_DT_F32;
    s.routing_dtype = g_i8 ? MSA_DT_I8 : MSA_DT_F32;
    s.separate_router_keys = true;
    s.similarity = MSA_SIM_DOT;
    s.head_reduce = MSA_HEAD_MEAN;
    s.query_reduce = MSA_QUERY_MAX;
    s.chunk_reduce = MSA_CHUNK_MAX;
    s.default_top_k = 4;
    return s;
}

/* Writer side: model and index together, then publish. Caller serialises. */
static void do_put(model_t *m, msa_idx_t *x, msa_idx_coll_t *c, uint64_t doc, uint64_t *rs)
{
    uint64_t seq = m->seq + 1;
    version_t nv = {
        .doc = doc, .created = seq, .deleted = LIVE, .nrows = 1 + (uint32_t)(rnd_r(rs) % MAXROWS)};
    for (int l = 0; l < L; l++) {
        nv.rows[l] = malloc(nv.nrows * W * sizeof(float));
        for (uint32_t i = 0; i < nv.nrows * W; i++) nv.rows[l][i] = frand_r(rs);
    }
    const float *rows[L] = {nv.rows[0], nv.rows[1]};
    CHECK_OK(msa_idx_doc_put(c, doc, seq, nv.nrows, rows));
    if (g_i8) /* the reference keeps what the index holds */
        for (int l = 0; l < L; l++)
            for (uint32_t r = 0; r < nv.nrows; r++) {
                int8_t qk[W];
                float sc[H];
                float *row = nv.rows[l] + (size_t)r * W;
                msa_tensor_quantize_i8(row, H, D, qk, sc);
                for (int i = 0; i < W; i++) row[i] = qk[i] * sc[i / D];
            }
    pthread_mutex_lock(&m->mu);
    for (size_t i = 0; i < m->n; i++)
        if (m->v[i].doc == doc && m->v[i].deleted == LIVE) m->v[i].deleted = seq;
    if (m->n == m->cap) {
        m->cap = m->cap ? 2 * m->cap : 256;
        m->v = realloc(m->v, m->cap * sizeof *m->v);
    }
    m->v[m->n++] = nv;
    m->seq = seq;
    pthread_mutex_unlock(&m->mu);
    msa_idx_publish(x, seq);
}

static bool do_delete(model_t *m, msa_idx_t *x, msa_idx_coll_t *c, uint64_t doc)
{
    uint64_t seq = m->seq + 1;
    bool live = false;
    pthread_mutex_lock(&m->mu);
    for (size_t i = 0; i < m->n; i++) live |= m->v[i].doc == doc && m->v[i].deleted == LIVE;
    pthread_mutex_unlock(&m->mu);
    if (!live) return false;
    CHECK_OK(msa_idx_doc_delete(c, doc, seq));
    pthread_mutex_lock(&m->mu);
    for (size_t i = 0; i < m->n; i++)
        if (m->v[i].doc == doc && m->v[i].deleted == LIVE) m->v[i].deleted = seq;
    m->seq = seq;
    pthread_mutex_unlock(&m->mu);
    msa_idx_publish(x, seq);
    return true;
}

static void model_free(model_t *m)
{
    for (size_t i = 0; i < m->n; i++)
        for (int l = 0; l < L; l++) free(m->v[i].rows[l]);
    free(m->v);
    pthread_mutex_destroy(&m->mu);
}

/* Reference score of one version for query q [T][HQ][D]. */
static double ref_score(const version_t *v, int l, const float *q)
{
    const int G = HQ / H;
    double best = -INFINITY;
    for (uint32_t r = 0; r < v->nrows; r++)
        for (int t = 0; t < T; t++) {
            double s = 0;
            for (int j = 0; j < HQ; j++)
                for (int d = 0; d < D; d++)
                    s += (double)q[(t * HQ + j) * D + d] * v->rows[l][r * W + (j / G) * D + d];
            s /= HQ;
            if (s > best) best = s;
        }
    return best;
}

static bool in_list(const uint64_t *x, size_t n, uint64_t id)
{
    for (size_t i = 0; i < n; i++)
        if (x[i] == id) return true;
    return false;
}

static int cmp_desc(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x > y ? -1 : x < y;
}

/* Checks hits of a route at snap against the model: each hit is a version
 * visible at snap, not excluded, scored as the reference scores it, in order,
 * and the k-th best reference score matches (nothing better was missed). */
static int check_route(model_t *m, int l, const float *q, uint64_t snap, const uint64_t *excl,
                       size_t n_excl, uint32_t k, const msa_idx_hit_t *hits, uint32_t n,
                       const char *what)
{
    int bad = 0;
    pthread_mutex_lock(&m->mu);
    double *ref = malloc((m->n + 1) * sizeof *ref);
    size_t nref = 0;
    for (size_t i = 0; i < m->n; i++) {
        const version_t *v = &m->v[i];
        if (v->created <= snap && snap < v->deleted && !in_list(excl, n_excl, v->doc))
            ref[nref++] = ref_score(v, l, q);
    }
    qsort(ref, nref, sizeof *ref, cmp_desc);
    uint32_t want = nref < k ? (uint32_t)nref : k;
    if (n != want) {
        FAILF("%s: snap %llu layer %d: %u hits, want %u", what, (unsigned long long)snap, l, n,
              want);
        bad++;
    }
    for (uint32_t h = 0; h < n && h < want && !bad; h++) {
        const version_t *hit = NULL;
        for (size_t i = 0; i < m->n; i++) {
            const version_t *v = &m->v[i];
            if (v->doc == hits[h].id && v->created <= snap && snap < v->deleted) hit = v;
        }
        if (!hit || in_list(excl, n_excl, hits[h].id)) {
            FAILF("%s: snap %llu layer %d: hit %u doc %llu is not visible/allowed", what,
                  (unsigned long long)snap, l, h, (unsigned long long)hits[h].id);
            bad++;
            break;
        }
        double rs = ref_score(hit, l, q);
        double tol = 1e-4 * (1 + fabs(rs));
        if (fabs(hits[h].score - rs) > tol || fabs(hits[h].score - ref[h]) > tol) {
            FAILF("%s: snap %llu layer %d: hit %u doc %llu score %.7g, its reference %.7g, rank "
                  "reference %.7g",
                  what, (unsigned long long)snap, l, h, (unsigned long long)hits[h].id,
                  (double)hits[h].score, rs, ref[h]);
            bad++;
        }
    }
    free(ref);
    pthread_mutex_unlock(&m->mu);
    MSA_TEST_COUNT_();
    return bad;
}

static int begin_applied(void *arg, uint64_t *seq)
{
    *seq = msa_idx_applied(arg);
    return MSA_OK;
}

static void random_query(float *q, uint64_t *rs)
{
    for (int i = 0; i < T * HQ * D; i++) q[i] = frand_r(rs);
}

/* One route at snap with random excludes and top_k, checked. */
static int route_and_check(model_t *m, msa_idx_t *x, msa_idx_coll_t *c, uint64_t snap, uint64_t *rs,
                           uint64_t max_doc, const char *what)
{
    float q[T * HQ * D];
    random_query(q, rs);
    uint64_t excl[3];
    size_t n_excl = rnd_r(rs) % 4;
    for (size_t i = 0; i < n_excl; i++) excl[i] = 1 + rnd_r(rs) % max_doc;
    uint32_t k = 1 + (uint32_t)(rnd_r(rs) % 12);
    int l = (int)(rnd_r(rs) % L);
    msa_idx_hit_t hits[16];
    uint32_t n = 0;
    msa_idx_route_args_t a = {.layer_pos = (uint32_t)l,
                              .q = q,
                              .T = T,
                              .snapshot = snap,
                              .exclude = excl,
                              .n_exclude = n_excl,
                              .top_k = k};
    int rc = msa_idx_route(x, c, &a, hits, &n);
    if (rc != MSA_OK) {
        FAILF("%s: route rc %s", what, msa_strerror(rc));
        return 1;
    }
    return check_route(m, l, q, snap, excl, n_excl, k, hits, n, what);
}

/* ---- fixtures ------------------------------------------------------------------- */

typedef struct fixture {
    msa_idx_t *x;
    msa_idx_coll_t *c;
    msa_gpu_t *g;
    model_t m;
} fixture_t;

static int fixture_open(fixture_t *f, unsigned devices, const msa_gpu_config_t *cfg)
{
    memset(f, 0, sizeof *f);
    pthread_mutex_init(&f->m.mu, NULL);
    msa_gpu_config_t c = *cfg;
    c.dev.sim_devices = (int)devices;
    char why[256] = "";
    int rc = msa_gpu_open(&c, &f->g, why, sizeof why);
    if (rc) {
        FAILF("msa_gpu_open: %s (%s)", msa_strerror(rc), why);
        return rc;
    }
    CHECK_OK(msa_idx_create(2, msa_idx_isa_detect(), &f->x));
    if (g_pinned) {
        msa_idx_host_alloc_t ha;
        msa_gpu_host_allocator(f->g, &ha);
        msa_idx_set_host_alloc(f->x, &ha);
    }
    msa_schema_t s = schema();
    CHECK_OK(msa_idx_coll_add(f->x, COLL, &s));
    f->c = msa_idx_coll_acquire(f->x, COLL);
    msa_idx_accel_t acc;
    msa_gpu_accel(f->g, &acc);
    msa_idx_set_accel(f->x, &acc);
    return MSA_OK;
}

static void fixture_close(fixture_t *f)
{
    msa_idx_coll_release(f->c);
    msa_idx_set_accel(f->x, NULL);
    msa_idx_destroy(f->x);
    msa_gpu_stats_t st;
    msa_gpu_get_stats(f->g, &st);
    CHECK_EQ_U(st.pinned_bytes, 0); /* every pinned array went back */
    msa_gpu_close(f->g);
    model_free(&f->m);
}

static msa_gpu_config_t base_cfg(void)
{
    return (msa_gpu_config_t){.dev = {.sim = true},
                              .shards_per_gpu = 1,
                              .routing_bytes = 64u << 20,
                              .cache_bytes = 8u << 20,
                              .lanes = 2,
                              .lane_scratch = 4u << 20};
}

/* ---- MVCC churn on one thread ------------------------------------------------------ */

static void churn(unsigned devices, const msa_gpu_config_t *cfg, int steps, const char *what,
                  bool expect_stream)
{
    fixture_t f;
    if (fixture_open(&f, devices, cfg)) return;
    uint64_t rs = 12345;
    enum { NSNAP = 6, MAXDOC = 60 };
    uint64_t snaps[NSNAP];
    int nsnap = 0;
    int bad = 0;
    for (int step = 0; step < steps && bad < 5; step++) {
        uint64_t op = rnd_r(&rs) % 10, doc = 1 + rnd_r(&rs) % MAXDOC;
        if (op < 6)
            do_put(&f.m, f.x, f.c, doc, &rs); /* new, replace or re-insert */
        else if (op < 9)
            do_delete(&f.m, f.x, f.c, doc);
        else
            msa_idx_compact(f.x, true); /* honours open snapshots */
        /* Hold some snapshots open across later writes and compactions. */
        if (rnd_r(&rs) % 4 == 0) {
            if (nsnap == NSNAP) {
                int i = (int)(rnd_r(&rs) % NSNAP);
                msa_idx_snap_unregister(f.x, snaps[i]);
                snaps[i] = snaps[--nsnap];
            }
            CHECK_OK(msa_idx_snap_register(f.x, begin_applied, f.x, &snaps[nsnap]));
            nsnap++;
        }
        bad += route_and_check(&f.m, f.x, f.c, f.m.seq, &rs, MAXDOC, what);
        for (int i = 0; i < nsnap; i++)
            bad += route_and_check(&f.m, f.x, f.c, snaps[i], &rs, MAXDOC, what);
    }
    for (int i = 0; i < nsnap; i++) msa_idx_snap_unregister(f.x, snaps[i]);
    msa_gpu_stats_t st;
    msa_gpu_get_stats(f.g, &st);
    CHECK_EQ_U(st.routes_fallback, 0);
    CHECK(st.routes_device > 0);
    CHECK(!st.disabled);
    if (g_pinned) CHECK(st.pinned_bytes > 0); /* the index's arrays came from the backend */
    if (expect_stream) {
        CHECK(st.routes_streamed > 0);
        CHECK(st.page_outs > 0);
    }
    fixture_close(&f);
}

TEST(churn_one_gpu)
{
    msa_gpu_config_t cfg = base_cfg();
    churn(1, &cfg, 400, "churn 1x1", false);
}

TEST(churn_two_gpus_three_shards)
{
    msa_gpu_config_t cfg = base_cfg();
    cfg.shards_per_gpu = 3;
    churn(2, &cfg, 400, "churn 2x3", false);
}

TEST(churn_i8_two_gpus_paging)
{
    /* I8 keys: scales travel with the keys (resident, grown, streamed). */
    g_i8 = true;
    msa_gpu_config_t cfg = base_cfg();
    cfg.shards_per_gpu = 2;
    cfg.routing_bytes = 8u << 10;
    churn(2, &cfg, 300, "churn i8", true);
    g_i8 = false;
}

TEST(churn_pinned_rows)
{
    /* The index's row arrays come from the backend's pinned allocator (the
     * simulation's pinned memory is malloc): growth copies, compaction moves
     * and streaming all read them. */
    g_pinned = true;
    msa_gpu_config_t cfg = base_cfg();
    cfg.pin_min_bytes = 1;
    cfg.routing_bytes = 16u << 10;
    churn(1, &cfg, 300, "churn pinned", true);
    g_pinned = false;
}

TEST(churn_paging)
{
    /* Each layer needs ~20-40 KiB of keys + entries: a 40 KiB budget holds
     * about one layer, so the two layers page each other out and stream. */
    msa_gpu_config_t cfg = base_cfg();
    cfg.routing_bytes = 16u << 10;
    churn(1, &cfg, 400, "churn paging", true);
}

/* ---- concurrency --------------------------------------------------------------------- */

typedef struct conc {
    fixture_t *f;
    atomic_bool stop;
    atomic_int bad;
    atomic_long routes;
    uint64_t seed;
} conc_t;

static void *reader_main(void *arg)
{
    conc_t *cc = arg;
    uint64_t rs = __atomic_add_fetch(&cc->seed, 7919, __ATOMIC_RELAXED);
    while (!atomic_load(&cc->stop) && atomic_load(&cc->bad) < 5) {
        uint64_t snap;
        if (msa_idx_snap_register(cc->f->x, begin_applied, cc->f->x, &snap) != MSA_OK) continue;
        /* Several routes at one snapshot, while the writer moves on. */
        for (int i = 0; i < 4; i++)
            atomic_fetch_add(&cc->bad,
                             route_and_check(&cc->f->m, cc->f->x, cc->f->c, snap, &rs, 40, "conc"));
        atomic_fetch_add(&cc->routes, 4);
        msa_idx_snap_unregister(cc->f->x, snap);
    }
    return NULL;
}

static void concurrent(unsigned devices, const msa_gpu_config_t *cfg, int writes)
{
    fixture_t f;
    if (fixture_open(&f, devices, cfg)) return;
    conc_t cc = {.f = &f, .seed = 99};
    uint64_t rs = 4242;
    for (int i = 0; i < 20; i++) do_put(&f.m, f.x, f.c, 1 + rnd_r(&rs) % 40, &rs);
    enum { NR = 4 };
    pthread_t th[NR];
    for (int i = 0; i < NR; i++) pthread_create(&th[i], NULL, reader_main, &cc);
    for (int i = 0; i < writes && atomic_load(&cc.bad) < 5; i++) {
        uint64_t op = rnd_r(&rs) % 10, doc = 1 + rnd_r(&rs) % 40;
        if (op < 6)
            do_put(&f.m, f.x, f.c, doc, &rs);
        else if (op < 9)
            do_delete(&f.m, f.x, f.c, doc);
        else
            msa_idx_compact(f.x, true);
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
    atomic_store(&cc.stop, true);
    for (int i = 0; i < NR; i++) pthread_join(th[i], NULL);
    msa_gpu_stats_t st;
    msa_gpu_get_stats(f.g, &st);
    CHECK_EQ_I(atomic_load(&cc.bad), 0);
    CHECK(atomic_load(&cc.routes) > 0);
    CHECK_EQ_U(st.routes_fallback, 0);
    fixture_close(&f);
}

TEST(concurrent_coalesced)
{
    msa_gpu_config_t cfg = base_cfg();
    cfg.shards_per_gpu = 2;
    cfg.coalesce_us = 300;
    concurrent(2, &cfg, 600);
}

TEST(concurrent_paging)
{
    msa_gpu_config_t cfg = base_cfg();
    cfg.routing_bytes = 24u << 10;
    cfg.coalesce_us = 200;
    concurrent(1, &cfg, 600);
}

/* A layer whose scores fit a lane's scratch for one query but not for a
 * full coalesced batch: the batch must still be answered by the device
 * (split into passes that fit), not handed to the CPU wholesale. */
typedef struct burst {
    fixture_t *f;
    pthread_barrier_t *go;
    atomic_int *bad;
    uint64_t seed;
} burst_t;

static void *burst_main(void *arg)
{
    burst_t *b = arg;
    uint64_t rs = b->seed;
    pthread_barrier_wait(b->go);
    for (int i = 0; i < 20; i++)
        atomic_fetch_add(
            b->bad, route_and_check(&b->f->m, b->f->x, b->f->c, b->f->m.seq, &rs, 600, "burst"));
    return NULL;
}

TEST(coalesced_batch_larger_than_scratch)
{
    msa_gpu_config_t cfg = base_cfg();
    cfg.lane_scratch = 32u << 10;
    cfg.coalesce_us = 20000;
    cfg.lanes = 1;
    fixture_t f;
    if (fixture_open(&f, 1, &cfg)) return;
    uint64_t rs = 5;
    for (uint64_t d = 1; d <= 600; d++) do_put(&f.m, f.x, f.c, d, &rs);
    enum { NB = 8 };
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, NB);
    atomic_int bad = 0;
    burst_t b[NB];
    pthread_t th[NB];
    for (int i = 0; i < NB; i++) {
        b[i] = (burst_t){.f = &f, .go = &go, .bad = &bad, .seed = 77 + (uint64_t)i};
        pthread_create(&th[i], NULL, burst_main, &b[i]);
    }
    for (int i = 0; i < NB; i++) pthread_join(th[i], NULL);
    pthread_barrier_destroy(&go);
    msa_gpu_stats_t st;
    msa_gpu_get_stats(f.g, &st);
    CHECK_EQ_I(atomic_load(&bad), 0);
    CHECK(st.coalesced > 0);
    CHECK_EQ_U(st.routes_fallback, 0);
    fixture_close(&f);
}

/* Coalescing waits for company only when a query of the SAME layer may join:
 * one client routing both layers side by side (the engine's parallel layers)
 * must not wait out coalesce_us on every layer for company that cannot come. */
typedef struct lone {
    fixture_t *f;
    int layer;
    pthread_barrier_t *go;
    atomic_int *bad, *slow; /* routes that took > 50 ms */
} lone_t;

static void *lone_main(void *arg)
{
    lone_t *a = arg;
    uint64_t rs = 1000 + (uint64_t)a->layer;
    for (int i = 0; i < 10; i++) {
        pthread_barrier_wait(a->go);
        float q[T * HQ * D];
        random_query(q, &rs);
        msa_idx_hit_t hits[8];
        uint32_t n = 0;
        msa_idx_route_args_t ra = {
            .layer_pos = (uint32_t)a->layer, .q = q, .T = T, .snapshot = a->f->m.seq, .top_k = 8};
        int64_t t0 = msa_clock_ns();
        int rc = msa_idx_route(a->f->x, a->f->c, &ra, hits, &n);
        double secs = (double)(msa_clock_ns() - t0) * 1e-9;
        /* Half the coalescing wait: a route that waited it out for company is
         * unmistakable, while a plain route stays far below even under TSan on
         * two loaded cores (where 50 ms was not enough). */
        if (secs > 0.5) atomic_fetch_add(a->slow, 1);
        if (rc != MSA_OK ||
            check_route(&a->f->m, a->layer, q, a->f->m.seq, NULL, 0, 8, hits, n, "lone"))
            atomic_fetch_add(a->bad, 1);
    }
    return NULL;
}

TEST(coalesce_no_wait_across_layers)
{
    msa_gpu_config_t cfg = base_cfg();
    cfg.coalesce_us = 1000000; /* 1 s: a route that waits it out is unmistakable */
    fixture_t f;
    if (fixture_open(&f, 1, &cfg)) return;
    uint64_t rs = 9;
    /* Enough rows that the two threads' routes overlap after the barrier. */
    for (uint64_t d = 1; d <= 3000; d++) do_put(&f.m, f.x, f.c, d, &rs);
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, 2);
    atomic_int bad = 0, slow = 0;
    lone_t a[2];
    pthread_t th[2];
    for (int i = 0; i < 2; i++) {
        a[i] = (lone_t){.f = &f, .layer = i, .go = &go, .bad = &bad, .slow = &slow};
        pthread_create(&th[i], NULL, lone_main, &a[i]);
    }
    for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
    pthread_barrier_destroy(&go);
    msa_gpu_stats_t st;
    msa_gpu_get_stats(f.g, &st);
    CHECK_EQ_I(atomic_load(&bad), 0);
    CHECK_EQ_U(st.routes_fallback, 0);
    CHECK_MSG(atomic_load(&slow) == 0,
              "%d of 20 lone routes waited out coalesce_us for company from another layer",
              atomic_load(&slow));
    fixture_close(&f);
}

/* ---- device fault ---------------------------------------------------------------------- */

TEST(device_fault_falls_back)
{
    msa_gpu_config_t cfg = base_cfg();
    cfg.dev.sim_fault = true;
    cfg.dev.sim_fail_after = 25;
    cfg.shards_per_gpu = 2;
    fixture_t f;
    int rc = fixture_open(&f, 2, &cfg);
    if (rc) return;
    uint64_t rs = 777;
    int bad = 0;
    for (int step = 0; step < 120 && !bad; step++) {
        uint64_t doc = 1 + rnd_r(&rs) % 30;
        if (rnd_r(&rs) % 3)
            do_put(&f.m, f.x, f.c, doc, &rs);
        else
            do_delete(&f.m, f.x, f.c, doc);
        bad += route_and_check(&f.m, f.x, f.c, f.m.seq, &rs, 30, "fault");
    }
    msa_gpu_stats_t st;
    msa_gpu_get_stats(f.g, &st);
    CHECK(st.disabled);
    CHECK(st.routes_fallback > 0);
    fixture_close(&f);
}

/* ---- Attend ------------------------------------------------------------------------------ */

enum { AT_DOCS = 12, AT_T = 3 };

typedef struct at_data {
    float *k[AT_DOCS], *v[AT_DOCS];
    uint32_t rows[AT_DOCS];
    atomic_int loads;
} at_data_t;

static int at_load(void *arg, uint32_t i, const void **k, const void **v, uint32_t *nrows)
{
    const uint64_t *ids = ((void **)arg)[1];
    at_data_t *d = ((void **)arg)[0];
    uint64_t doc = ids[i];
    atomic_fetch_add(&d->loads, 1);
    *k = d->k[doc];
    *v = d->v[doc];
    *nrows = d->rows[doc];
    return MSA_OK;
}

static void ref_attend(const at_data_t *d, const uint64_t *ids, uint32_t n, const float *q,
                       float scale, double *out, double *lse)
{
    const int G = HQ / H;
    for (int t = 0; t < AT_T; t++)
        for (int j = 0; j < HQ; j++) {
            int h = j / G;
            double mx = -INFINITY;
            for (uint32_t b = 0; b < n; b++)
                for (uint32_t r = 0; r < d->rows[ids[b]]; r++) {
                    double s = 0;
                    for (int x = 0; x < D; x++)
                        s += (double)q[(t * HQ + j) * D + x] * d->k[ids[b]][(r * H + h) * D + x];
                    s *= scale;
                    if (s > mx) mx = s;
                }
            double sum = 0, acc[D] = {0};
            for (uint32_t b = 0; b < n; b++)
                for (uint32_t r = 0; r < d->rows[ids[b]]; r++) {
                    double s = 0;
                    for (int x = 0; x < D; x++)
                        s += (double)q[(t * HQ + j) * D + x] * d->k[ids[b]][(r * H + h) * D + x];
                    double w = exp(s * scale - mx);
                    sum += w;
                    for (int x = 0; x < D; x++) acc[x] += w * d->v[ids[b]][(r * H + h) * D + x];
                }
            lse[t * HQ + j] = n ? mx + log(sum) : -INFINITY;
            for (int x = 0; x < D; x++) out[(t * HQ + j) * D + x] = n ? acc[x] / sum : 0;
        }
}

typedef struct at_thread {
    msa_gpu_t *g;
    at_data_t *d;
    atomic_int *bad;
    uint64_t seed;
} at_thread_t;

/* The attend call of these tests: collection COLL, F32 K/V, AT_T tokens. */
static msa_gpu_attend_args_t attend_args(uint32_t layer, const uint64_t *ids, const uint64_t *vers,
                                         uint32_t n, msa_gpu_kv_loader_t load, void *load_arg,
                                         const float *q, float scale, float *out, float *lse)
{
    return (msa_gpu_attend_args_t){.coll_id = COLL,
                                   .layer = layer,
                                   .docs = ids,
                                   .versions = vers,
                                   .n = n,
                                   .load = load,
                                   .load_arg = load_arg,
                                   .q = q,
                                   .T = AT_T,
                                   .Hq = HQ,
                                   .H = H,
                                   .D = D,
                                   .scale = scale,
                                   .kv_dtype = MSA_DT_F32,
                                   .out = out,
                                   .lse = lse};
}

static void *attend_main(void *arg)
{
    at_thread_t *a = arg;
    uint64_t rs = a->seed;
    for (int it = 0; it < 60 && atomic_load(a->bad) < 3; it++) {
        /* Overlapping document sets: threads miss the same keys together. */
        uint64_t ids[AT_DOCS], vers[AT_DOCS];
        uint32_t n = 1 + (uint32_t)(rnd_r(&rs) % 6);
        uint64_t first = rnd_r(&rs) % AT_DOCS;
        for (uint32_t i = 0; i < n; i++) {
            ids[i] = (first + i * 5) % AT_DOCS;
            vers[i] = 100 + ids[i];
        }
        float q[AT_T * HQ * D];
        for (int i = 0; i < AT_T * HQ * D; i++) q[i] = frand_r(&rs);
        float out[AT_T * HQ * D], lse[AT_T * HQ];
        void *la[2] = {a->d, ids};
        msa_gpu_attend_args_t at = attend_args(1, ids, vers, n, at_load, la, q, 0.3f, out, lse);
        int rc = msa_gpu_attend(a->g, &at);
        if (rc != MSA_OK) {
            FAILF("attend rc %s", msa_strerror(rc));
            atomic_fetch_add(a->bad, 1);
            continue;
        }
        double ro[AT_T * HQ * D], rl[AT_T * HQ];
        ref_attend(a->d, ids, n, q, 0.3f, ro, rl);
        for (int i = 0; i < AT_T * HQ; i++)
            if (fabs(lse[i] - rl[i]) > 1e-4) {
                FAILF("attend lse[%d] %.7g, want %.7g", i, (double)lse[i], rl[i]);
                atomic_fetch_add(a->bad, 1);
                break;
            }
        for (int i = 0; i < AT_T * HQ * D; i++)
            if (fabs(out[i] - ro[i]) > 1e-4) {
                FAILF("attend out[%d] %.7g, want %.7g", i, (double)out[i], ro[i]);
                atomic_fetch_add(a->bad, 1);
                break;
            }
        MSA_TEST_COUNT_();
    }
    return NULL;
}

/* Opens a backend on `devices` simulated GPUs with a K/V cache of
 * cache_bytes and makes AT_DOCS random documents; NULL when it cannot open. */
static msa_gpu_t *attend_setup(unsigned devices, uint64_t cache_bytes, uint64_t *rs, at_data_t *d)
{
    msa_gpu_config_t cfg = base_cfg();
    cfg.dev.sim_devices = devices == 2 ? 2 : 1;
    cfg.cache_bytes = cache_bytes;
    msa_gpu_t *g = NULL;
    char why[256];
    if (msa_gpu_open(&cfg, &g, why, sizeof why) != MSA_OK) {
        FAILF("open: %s", why);
        return NULL;
    }
    memset(d, 0, sizeof *d);
    for (int i = 0; i < AT_DOCS; i++) {
        d->rows[i] = 1 + (uint32_t)(rnd_r(rs) % 7);
        d->k[i] = malloc(d->rows[i] * W * sizeof(float));
        d->v[i] = malloc(d->rows[i] * W * sizeof(float));
        for (uint32_t x = 0; x < d->rows[i] * W; x++) {
            d->k[i][x] = frand_r(rs);
            d->v[i][x] = frand_r(rs);
        }
    }
    return g;
}

static void attend_case(unsigned devices, uint64_t cache_bytes)
{
    at_data_t d;
    uint64_t rs = 31337;
    msa_gpu_t *g = attend_setup(devices, cache_bytes, &rs, &d);
    if (!g) return;
    atomic_int bad = 0;
    enum { NT = 4 };
    at_thread_t ta[NT];
    pthread_t th[NT];
    for (int i = 0; i < NT; i++) {
        ta[i] = (at_thread_t){.g = g, .d = &d, .bad = &bad, .seed = 1000 + 17 * (uint64_t)i};
        pthread_create(&th[i], NULL, attend_main, &ta[i]);
    }
    for (int i = 0; i < NT; i++) pthread_join(th[i], NULL);
    msa_gpu_stats_t st;
    msa_gpu_get_stats(g, &st);
    CHECK_EQ_I(atomic_load(&bad), 0);
    CHECK_EQ_U(st.attends_fallback, 0);
    if (cache_bytes >= (1u << 20)) CHECK(st.cache_hits > 0);
    for (unsigned i = 0; i < st.devices; i++) {
        msa_gpu_device_stats_t ds;
        msa_gpu_get_device_stats(g, i, &ds);
        CHECK(ds.cache_bytes <= cache_bytes);
    }
    msa_gpu_close(g);
    for (int i = 0; i < AT_DOCS; i++) {
        free(d.k[i]);
        free(d.v[i]);
    }
}

/* A loader error mid-call is passed through and poisons nothing: blocks of
 * the failed call that were filled may be published, the failed one is not,
 * and the next call over the same documents is exact. */
static int fail_doc = -1;
static int at_load_failing(void *arg, uint32_t i, const void **k, const void **v, uint32_t *nrows)
{
    const uint64_t *ids = ((void **)arg)[1];
    if ((int)ids[i] == fail_doc) return MSA_ECORRUPT;
    return at_load(arg, i, k, v, nrows);
}

TEST(attend_loader_error)
{
    at_data_t d;
    uint64_t rs = 4711;
    msa_gpu_t *g = attend_setup(2, base_cfg().cache_bytes, &rs, &d);
    if (!g) return;
    uint64_t ids[6] = {1, 2, 3, 4, 5, 6}, vers[6];
    for (int i = 0; i < 6; i++) vers[i] = 500 + ids[i];
    float q[AT_T * HQ * D], out[AT_T * HQ * D], lse[AT_T * HQ];
    for (int i = 0; i < AT_T * HQ * D; i++) q[i] = frand_r(&rs);
    void *la[2] = {&d, ids};
    msa_gpu_attend_args_t at = attend_args(0, ids, vers, 6, at_load_failing, la, q, 0.5f, out, lse);
    fail_doc = 4;
    CHECK_RC(msa_gpu_attend(g, &at), MSA_ECORRUPT);
    fail_doc = -1;
    for (int round = 0; round < 2; round++) { /* misses, then hits */
        CHECK_OK(msa_gpu_attend(g, &at));
        double ro[AT_T * HQ * D], rl[AT_T * HQ];
        ref_attend(&d, ids, 6, q, 0.5f, ro, rl);
        for (int i = 0; i < AT_T * HQ; i++) CHECK_NEAR(lse[i], rl[i], 1e-4);
        for (int i = 0; i < AT_T * HQ * D; i++) CHECK_NEAR(out[i], ro[i], 1e-4);
    }
    msa_gpu_stats_t st;
    msa_gpu_get_stats(g, &st);
    CHECK(!st.disabled);
    CHECK(st.cache_hits >= 6);
    msa_gpu_close(g);
    for (int i = 0; i < AT_DOCS; i++) {
        free(d.k[i]);
        free(d.v[i]);
    }
}

TEST(attend_concurrent_two_gpus)
{
    attend_case(2, 1u << 20);
}
TEST(attend_tiny_cache)
{
    attend_case(2, 4096);
}

int main(int argc, char **argv)
{
    static const msa_test_t tests[] = {
        TEST_ENTRY(churn_one_gpu),
        TEST_ENTRY(churn_two_gpus_three_shards),
        TEST_ENTRY(churn_paging),
        TEST_ENTRY(churn_pinned_rows),
        TEST_ENTRY(churn_i8_two_gpus_paging),
        TEST_ENTRY(concurrent_coalesced),
        TEST_ENTRY(concurrent_paging),
        TEST_ENTRY(coalesced_batch_larger_than_scratch),
        TEST_ENTRY(coalesce_no_wait_across_layers),
        TEST_ENTRY(device_fault_falls_back),
        TEST_ENTRY(attend_concurrent_two_gpus),
        TEST_ENTRY(attend_tiny_cache),
        TEST_ENTRY(attend_loader_error),
    };
    return msa_test_run(tests, sizeof tests / sizeof tests[0], argc, argv);
}
