/* test_engine_mvcc.c — snapshot isolation and group commit of the engine,
 * in-process with a real LMDB directory and real threads.
 *
 * Every write request writes documents A and B together with the same
 * "generation" g: router keys = g, K = 0, V = g. A reader that routes and
 * attends in one call must therefore see A and B with equal scores (both from
 * the index at its snapshot) and an attention output equal to g = score / D
 * (V read from LMDB in the same snapshot): a torn read or an index/store
 * mismatch shows up as unequal scores or out != score / D. Deletes remove both
 * together, so a reader sees two documents or none.
 *
 * MSA_TEST_BACKEND=cuda runs the same on the CUDA backend (with MSA_GPU_SIM=1:
 * the simulated device): two shards, coalescing on, and a last case checks
 * that the device answered every route and attend and that concurrent routes
 * shared passes.
 */
/* Checks also run in the writer and reader threads: a failed one is counted
 * and the case carries on. */
#define MSA_TEST_KEEP_GOING
#include "engine.h"
#include "harness.h"
#include "tensor.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum { D = 4, H = 1, HQ = 2, P = 2, TOKENS = 3, C = 2, DOC_A = 11, DOC_B = 12 };

static char dir[PATH_MAX];
static msa_engine_t *eng;

/* The engine's stats by value: the tests read many fields. */
static int stats_copy(msa_engine_stats_result_t *out, msa_status_t *st)
{
    msa_engine_stats_result_t *r = NULL;
    memset(out, 0, sizeof *out);
    int rc = msa_engine_stats(eng, &r, st);
    if (rc == MSA_OK) *out = *r;
    msa_engine_stats_result_free(r);
    return rc;
}
static atomic_bool stop;
static atomic_long reads_checked, writes_done, empty_reads;

static msa_schema_t test_schema(void)
{
    msa_schema_t s;
    memset(&s, 0, sizeof s);
    s.n_layers = 1;
    s.layers[0] = 3;
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

static msa_tensor_t f32_tensor(const float *data, uint32_t rows)
{
    msa_tensor_t t = {.dtype = MSA_DT_F32,
                      .ndim = 3,
                      .shape = {rows, H, D},
                      .data = data,
                      .nbytes = (size_t)rows * H * D * sizeof(float)};
    return t;
}

/* Writes A and B into coll at generation g in one request (or deletes both):
 * layer 3 router keys and V = g, and with two layers also layer 5 = 2g. */
static int write_pair_to(const char *coll, int n_layers, float g, bool del, msa_status_t *st)
{
    float zeros[C * H * D] = {0}, gen[2][C * H * D];
    for (int i = 0; i < C * H * D; i++) {
        gen[0][i] = g;
        gen[1][i] = 2 * g;
    }
    msa_engine_layer_kv_t lk[2];
    for (int l = 0; l < 2; l++)
        lk[l] = (msa_engine_layer_kv_t){.layer = l ? 5 : 3,
                                        .k = f32_tensor(zeros, C),
                                        .v = f32_tensor(gen[l], C),
                                        .router_k = f32_tensor(gen[l], C)};
    msa_engine_write_op_t ops[2];
    memset(ops, 0, sizeof ops);
    for (int i = 0; i < 2; i++) {
        if (del) {
            ops[i].kind = MSA_OP_DELETE;
            ops[i].delete_id = i ? DOC_B : DOC_A;
        } else {
            ops[i].kind = MSA_OP_PUT;
            ops[i].put = (msa_engine_doc_t){.id = i ? DOC_B : DOC_A,
                                            .text = "pair",
                                            .text_len = 4,
                                            .tokens = TOKENS,
                                            .n_layers = (uint32_t)n_layers,
                                            .layers = lk};
        }
    }
    msa_engine_write_req_t req = {.collection = coll, .n_ops = 2, .ops = ops};
    msa_engine_write_result_t *res = NULL;
    int rc = msa_engine_write(eng, &req, &res, st);
    msa_engine_write_result_free(res);
    return rc;
}

static int write_pair(float g, bool del, msa_status_t *st)
{
    return write_pair_to("mvcc", 1, g, del, st);
}

/* A writer thread: id < 100 writes "mvcc" (one layer), id >= 100 "mvcc2"
 * (two layers). */
static void *writer(void *arg)
{
    long id = (long)arg;
    const bool two = id >= 100;
    for (long i = 0; !atomic_load(&stop); i++) {
        msa_status_t st;
        float g = (float)(1 + (id * 1000003 + i) % 997);
        /* Every 5th request deletes the pair; the next put re-inserts it. */
        int rc = write_pair_to(two ? "mvcc2" : "mvcc", two ? 2 : 1, g, i % 5 == 4, &st);
        CHECK_MSG(rc == MSA_OK || rc == MSA_ENOTFOUND, "write: %s", st.msg);
        if (!two) atomic_fetch_add(&writes_done, 1);
    }
    return NULL;
}

static void *reader(void *arg)
{
    (void)arg;
    float q[1 * HQ * D];
    for (int i = 0; i < HQ * D; i++) q[i] = 1.0f;
    msa_engine_layer_query_t lq = {.layer = 3};
    lq.routing_q = (msa_tensor_t){
        .dtype = MSA_DT_F32, .ndim = 3, .shape = {1, HQ, D}, .data = q, .nbytes = sizeof q};
    lq.q = lq.routing_q;
    while (!atomic_load(&stop)) {
        msa_engine_attend_req_t req = {
            .c = {.collection = "mvcc"}, .n_layers = 1, .layers = &lq, .top_k = 4};
        msa_engine_attend_result_t *r = NULL;
        msa_status_t st;
        int rc = msa_engine_attend(eng, &req, &r, &st);
        CHECK_MSG(rc == MSA_OK, "attend: %s", st.msg);
        if (rc) continue;
        msa_engine_layer_attention_t *la = &r->layers[0];
        CHECK_MSG(la->n == 0 || la->n == 2, "saw %u of the 2 documents written together", la->n);
        if (la->n == 2) {
            CHECK_MSG(la->scores[0] == la->scores[1], "A and B from different writes: %g vs %g",
                      la->scores[0], la->scores[1]);
            float g = la->scores[0] / D; /* HEAD_MEAN of dot(ones, g) */
            const float *out = la->out;
            for (int j = 0; j < HQ * D; j++)
                CHECK_MSG(fabsf(out[j] - g) <= 1e-5f * g, "attended V %g, routed generation %g",
                          out[j], g);
        } else {
            atomic_fetch_add(&empty_reads, 1);
        }
        msa_engine_attend_result_free(r);
        atomic_fetch_add(&reads_checked, 1);
    }
    return NULL;
}

/* A Get result pins its snapshot: its zero-copy views must not change while
 * later writes replace the documents. */
TEST(pinned_snapshot)
{
    msa_status_t st;
    CHECK_MSG(write_pair(7.0f, false, &st) == MSA_OK, "%s", st.msg);
    uint64_t ids[2] = {DOC_A, DOC_B};
    msa_engine_get_req_t gr = {
        .collection = "mvcc", .n_ids = 2, .ids = ids, .with_text = true, .with_tensors = true};
    msa_engine_get_result_t *g = NULL;
    CHECK_MSG(msa_engine_get(eng, &gr, &g, &st) == MSA_OK, "get: %s", st.msg);
    if (!g) return;
    uint64_t v0 = g->records[0].info.version;
    for (int i = 0; i < 20; i++)
        CHECK_MSG(write_pair(100.0f + i, false, &st) == MSA_OK, "%s", st.msg);
    float v0val; /* LMDB values are only 2-byte aligned: copy, don't cast */
    memcpy(&v0val, g->records[0].layers[0].v.data, sizeof v0val);
    CHECK_MSG(v0val == 7.0f, "pinned snapshot's V changed to %g", v0val);
    CHECK_MSG(g->records[0].info.version == v0, "version changed");
    msa_engine_get_result_free(g);
    msa_engine_get_result_t *g2 = NULL;
    CHECK_MSG(msa_engine_get(eng, &gr, &g2, &st) == MSA_OK, "get: %s", st.msg);
    if (g2) {
        CHECK_MSG(g2->records[0].info.version == v0 + 20, "version %llu, want %llu",
                  (unsigned long long)g2->records[0].info.version, (unsigned long long)(v0 + 20));
        msa_engine_get_result_free(g2);
    }
}

/* Writers and readers race for a few seconds: readers check every answer
 * (reader()), and concurrent writes must have been group-committed. */
TEST(readers_see_whole_writes)
{
    enum { WRITERS = 3, READERS = 3 };
    pthread_t w[WRITERS], r[READERS];
    for (long i = 0; i < WRITERS; i++) pthread_create(&w[i], NULL, writer, (void *)i);
    for (long i = 0; i < READERS; i++) pthread_create(&r[i], NULL, reader, NULL);
    sleep(3);
    atomic_store(&stop, true);
    for (int i = 0; i < WRITERS; i++) pthread_join(w[i], NULL);
    for (int i = 0; i < READERS; i++) pthread_join(r[i], NULL);

    msa_status_t st;
    msa_engine_stats_result_t stats = {0};
    CHECK_MSG(stats_copy(&stats, &st) == MSA_OK, "stats: %s", st.msg);
    printf("mvcc: %ld writes in %llu groups, %ld reads checked (%ld empty)\n",
           atomic_load(&writes_done), (unsigned long long)stats.write_groups,
           atomic_load(&reads_checked), atomic_load(&empty_reads));
    CHECK_MSG(atomic_load(&reads_checked) > 50, "too few reads to mean anything: %ld",
              atomic_load(&reads_checked));
    CHECK_MSG(stats.write_groups < (uint64_t)atomic_load(&writes_done),
              "group commit never grouped: %llu groups for %ld writes",
              (unsigned long long)stats.write_groups, atomic_load(&writes_done));
}

/* ---- held snapshots: many threads read one while writers write ---- */

static uint64_t held_seq;
static atomic_long held_checked, short_leases;

/* Attend at the held snapshot must see the pair at generation 5 however the
 * writers move on; a Get result kept open across other borrowers keeps V = 5. */
static void *held_reader(void *arg)
{
    long id = (long)arg;
    float q[1 * HQ * D];
    for (int i = 0; i < HQ * D; i++) q[i] = 1.0f;
    msa_engine_layer_query_t lq = {.layer = 3};
    lq.routing_q = (msa_tensor_t){
        .dtype = MSA_DT_F32, .ndim = 3, .shape = {1, HQ, D}, .data = q, .nbytes = sizeof q};
    lq.q = lq.routing_q;
    uint64_t ids[2] = {DOC_A, DOC_B};
    while (!atomic_load(&stop)) {
        msa_status_t st;
        msa_engine_attend_req_t req = {
            .c = {.collection = "mvcc", .snapshot_seq = held_seq, .hold_ms = id == 0 ? 20000 : 0},
            .n_layers = 1,
            .layers = &lq,
            .top_k = 4};
        msa_engine_attend_result_t *r = NULL;
        int rc = msa_engine_attend(eng, &req, &r, &st);
        CHECK_MSG(rc == MSA_OK, "attend at held %llu: %s", (unsigned long long)held_seq, st.msg);
        if (rc) continue;
        CHECK_MSG(r->snapshot_seq == held_seq, "answered from %llu, want held %llu",
                  (unsigned long long)r->snapshot_seq, (unsigned long long)held_seq);
        msa_engine_layer_attention_t *la = &r->layers[0];
        CHECK_MSG(la->n == 2 && la->scores[0] == 5.0f * D && la->scores[1] == 5.0f * D,
                  "held snapshot moved: %u docs, score %g", la->n, la->n ? la->scores[0] : 0.0f);
        if (la->n == 2)
            for (int j = 0; j < HQ * D; j++)
                CHECK_MSG(fabsf(((const float *)la->out)[j] - 5.0f) < 1e-5f, "held V %g",
                          ((const float *)la->out)[j]);
        msa_engine_attend_result_free(r);
        msa_engine_get_req_t gr = {.collection = "mvcc",
                                   .n_ids = 2,
                                   .ids = ids,
                                   .with_tensors = true,
                                   .snapshot_seq = held_seq};
        msa_engine_get_result_t *g = NULL;
        rc = msa_engine_get(eng, &gr, &g, &st);
        CHECK_MSG(rc == MSA_OK, "get at held: %s", st.msg);
        if (rc) continue;
        usleep(200); /* others borrow the snapshot while this result reads its pages */
        for (int i = 0; i < 2; i++) {
            float v;
            memcpy(&v, g->records[i].layers[0].v.data, sizeof v);
            CHECK_MSG(v == 5.0f, "held Get V %g", v);
        }
        msa_engine_get_result_free(g);
        atomic_fetch_add(&held_checked, 1);
    }
    return NULL;
}

/* Short leases on the newest snapshot: hold, read it again, then release
 * half and abandon half to the reaper (which closes them on its thread). */
static void *short_lease_taker(void *arg)
{
    (void)arg;
    for (long i = 0; !atomic_load(&stop); i++) {
        msa_status_t st;
        msa_engine_list_req_t lr = {.collection = "mvcc", .hold_ms = 30};
        msa_engine_list_result_t *res = NULL;
        int rc = msa_engine_list(eng, &lr, &res, &st);
        CHECK_MSG(rc == MSA_OK || rc == MSA_EFULL, "list hold: %s", st.msg);
        if (rc) continue;
        uint64_t seq = res->snapshot_seq;
        msa_engine_list_result_free(res);
        msa_engine_list_req_t again = {.collection = "mvcc", .snapshot_seq = seq};
        rc = msa_engine_list(eng, &again, &res, &st);
        /* Another thread's lease on the same seq may have been released. */
        CHECK_MSG(rc == MSA_OK || rc == MSA_EPRECOND, "list at %llu: %s", (unsigned long long)seq,
                  st.msg);
        if (rc == MSA_OK) msa_engine_list_result_free(res);
        /* A lease on the main held seq shares it: always give that one back. */
        if (i % 2 || seq == held_seq) {
            msa_engine_release_snapshot_result_t *rel = NULL;
            msa_engine_release_snapshot(eng, seq, &rel, &st);
            msa_engine_release_snapshot_result_free(rel);
        }
        atomic_fetch_add(&short_leases, 1);
        usleep(500);
    }
    return NULL;
}

TEST(held_snapshot_readers)
{
    msa_status_t st;
    CHECK_MSG(write_pair(5.0f, false, &st) == MSA_OK, "%s", st.msg);
    msa_engine_list_req_t lr = {.collection = "mvcc", .hold_ms = 20000};
    msa_engine_list_result_t *res = NULL;
    CHECK_MSG(msa_engine_list(eng, &lr, &res, &st) == MSA_OK, "hold: %s", st.msg);
    held_seq = res->snapshot_seq;
    msa_engine_list_result_free(res);
    atomic_store(&stop, false);
    enum { WRITERS = 2, READERS = 4, TAKERS = 2 };
    pthread_t w[WRITERS], r[READERS], t[TAKERS];
    for (long i = 0; i < WRITERS; i++) pthread_create(&w[i], NULL, writer, (void *)i);
    for (long i = 0; i < READERS; i++) pthread_create(&r[i], NULL, held_reader, (void *)i);
    for (long i = 0; i < TAKERS; i++) pthread_create(&t[i], NULL, short_lease_taker, NULL);
    sleep(2);
    atomic_store(&stop, true);
    for (int i = 0; i < WRITERS; i++) pthread_join(w[i], NULL);
    for (int i = 0; i < READERS; i++) pthread_join(r[i], NULL);
    for (int i = 0; i < TAKERS; i++) pthread_join(t[i], NULL);
    printf("held: %ld reads of held snapshot %llu checked, %ld short leases\n",
           atomic_load(&held_checked), (unsigned long long)held_seq, atomic_load(&short_leases));
    CHECK_MSG(atomic_load(&held_checked) > 20, "too few held reads: %ld",
              atomic_load(&held_checked));
    CHECK_MSG(msa_engine_commit_seq(eng) > held_seq + 20, "writers did not move on");
    msa_engine_release_snapshot_result_t *rel = NULL;
    CHECK_OK(msa_engine_release_snapshot(eng, held_seq, &rel, &st));
    CHECK(rel->released);
    msa_engine_release_snapshot_result_free(rel);
    msa_engine_route_req_t rr = {.c = {.collection = "mvcc", .snapshot_seq = held_seq}};
    msa_engine_route_result_t *rres = NULL;
    CHECK_RC(msa_engine_route(eng, &rr, &rres, &st), MSA_EPRECOND);
    CHECK_STR_HAS(st.msg, "snapshot_seq");
    /* The abandoned short leases expire (30 ms) and the reaper closes them. */
    msa_engine_stats_result_t s = {0};
    for (int i = 0; i < 50; i++) {
        CHECK_OK(stats_copy(&s, &st));
        if (s.snapshots_held == 0) break;
        usleep(50000);
    }
    CHECK_EQ_U(s.snapshots_held, 0);
    CHECK_MSG(s.leases_expired > 0, "no lease expired");
}

/* The store and the index agree after all that churn (and compaction). */
TEST(verify_after_churn)
{
    msa_status_t st;
    msa_engine_verify_result_t *v = NULL;
    CHECK_MSG(msa_engine_verify(eng, NULL, &v, &st) == MSA_OK, "verify: %s", st.msg);
    for (size_t i = 0; i < v->n_problems; i++) fprintf(stderr, "verify: %s\n", v->problems[i]);
    size_t n_problems = v->n_problems;
    msa_engine_verify_result_free(v);
    CHECK_MSG(n_problems == 0, "%zu verify problems", n_problems);
}

/* ---- two layers: Route runs the layers side by side on the CUDA backend ---- */

static atomic_long routes2_checked;

static void *reader2(void *arg)
{
    (void)arg;
    float q[1 * HQ * D];
    for (int i = 0; i < HQ * D; i++) q[i] = 1.0f;
    msa_engine_layer_query_t lq[2];
    memset(lq, 0, sizeof lq);
    for (int l = 0; l < 2; l++) {
        lq[l].layer = l ? 5 : 3;
        lq[l].routing_q = (msa_tensor_t){
            .dtype = MSA_DT_F32, .ndim = 3, .shape = {1, HQ, D}, .data = q, .nbytes = sizeof q};
    }
    while (!atomic_load(&stop)) {
        msa_engine_route_req_t req = {
            .c = {.collection = "mvcc2"}, .n_layers = 2, .layers = lq, .top_k = 4};
        msa_engine_route_result_t *r = NULL;
        msa_status_t st;
        int rc = msa_engine_route(eng, &req, &r, &st);
        CHECK_MSG(rc == MSA_OK, "route: %s", st.msg);
        if (rc) continue;
        msa_engine_layer_route_t *a = &r->layers[0], *b = &r->layers[1];
        CHECK_MSG(a->layer == 3 && b->layer == 5, "layers %u, %u", a->layer, b->layer);
        CHECK_MSG(a->n == b->n && (a->n == 0 || a->n == 2),
                  "layers of one Route saw %u and %u documents (one snapshot: equal, 0 or 2)", a->n,
                  b->n);
        if (a->n == 2 && b->n == 2) {
            CHECK_MSG(a->scores[0] == a->scores[1] && b->scores[0] == b->scores[1],
                      "A and B from different writes: %g/%g, %g/%g", a->scores[0], a->scores[1],
                      b->scores[0], b->scores[1]);
            CHECK_MSG(b->scores[0] == 2 * a->scores[0],
                      "layer 5 score %g is not twice layer 3's %g: layers from different "
                      "snapshots",
                      b->scores[0], a->scores[0]);
        }
        msa_engine_route_result_free(r);
        atomic_fetch_add(&routes2_checked, 1);
    }
    return NULL;
}

/* Multi-layer Routes (side by side on the CUDA backend: one mirror and lane
 * per layer) race writers: every layer answers from the one snapshot. */
TEST(multi_layer_routes)
{
    msa_schema_t s = test_schema();
    s.n_layers = 2;
    s.layers[1] = 5;
    msa_engine_create_collection_result_t *info = NULL;
    msa_status_t st;
    CHECK_MSG(msa_engine_create_collection(eng, "mvcc2", &s, &info, &st) == MSA_OK, "create: %s",
              st.msg);
    msa_engine_create_collection_result_free(info);
    atomic_store(&stop, false);
    enum { WRITERS = 2, READERS = 3 };
    pthread_t w[WRITERS], r[READERS];
    for (long i = 0; i < WRITERS; i++) pthread_create(&w[i], NULL, writer, (void *)(100 + i));
    for (long i = 0; i < READERS; i++) pthread_create(&r[i], NULL, reader2, NULL);
    sleep(2);
    atomic_store(&stop, true);
    for (int i = 0; i < WRITERS; i++) pthread_join(w[i], NULL);
    for (int i = 0; i < READERS; i++) pthread_join(r[i], NULL);
    printf("mvcc2: %ld two-layer routes checked\n", atomic_load(&routes2_checked));
    CHECK_MSG(atomic_load(&routes2_checked) > 50, "too few routes to mean anything: %ld",
              atomic_load(&routes2_checked));
}

static bool on_cuda;

/* CUDA backend only: the device answered, mirrors followed the churn. */
TEST(device_answered)
{
    msa_status_t st;
    msa_engine_stats_result_t s = {0};
    CHECK_MSG(stats_copy(&s, &st) == MSA_OK, "stats: %s", st.msg);
    printf("gpu: %llu device routes (%llu fallbacks) in %llu passes, %llu coalesced, %llu "
           "syncs, %llu attends (%llu fallbacks), cache %llu hits / %llu misses\n",
           (unsigned long long)s.gpu.routes_device, (unsigned long long)s.gpu.routes_fallback,
           (unsigned long long)s.gpu.batches, (unsigned long long)s.gpu.coalesced,
           (unsigned long long)s.gpu.syncs, (unsigned long long)s.gpu.attends_device,
           (unsigned long long)s.gpu.attends_fallback, (unsigned long long)s.gpu.cache_hits,
           (unsigned long long)s.gpu.cache_misses);
    CHECK_MSG(s.n_gpu > 0, "no device in the stats");
    CHECK_MSG(s.gpu.routes_device > 50, "only %llu routes on the device",
              (unsigned long long)s.gpu.routes_device);
    CHECK_MSG(s.gpu.routes_fallback == 0, "%llu routes fell back to the CPU",
              (unsigned long long)s.gpu.routes_fallback);
    CHECK_MSG(s.gpu.attends_fallback == 0, "%llu attends fell back to the CPU",
              (unsigned long long)s.gpu.attends_fallback);
    CHECK_MSG(s.gpu.syncs > 10, "mirrors synced only %llu times under churn",
              (unsigned long long)s.gpu.syncs);
    CHECK_MSG(s.gpu.coalesced > 0, "concurrent routes never shared a pass");
    CHECK_MSG(s.gpu.cache_hits > 0, "the K/V cache never hit");
}

static const msa_test_t tests[] = {
    TEST_ENTRY(pinned_snapshot),    TEST_ENTRY(readers_see_whole_writes),
    TEST_ENTRY(multi_layer_routes), TEST_ENTRY(held_snapshot_readers),
    TEST_ENTRY(verify_after_churn), TEST_ENTRY(device_answered),
};

int main(int argc, char **argv)
{
    if (!msa_test_tmpdir(dir, sizeof dir, "mvcc")) return 1;
    msa_engine_config_t cfg = {.data_dir = dir, .backend = MSA_BACKEND_CPU, .threads = 2};
    const char *be = getenv("MSA_TEST_BACKEND");
    if (be && !strcmp(be, "cuda")) {
        on_cuda = true;
        cfg.backend = MSA_BACKEND_CUDA;
        cfg.gpu = (msa_gpu_config_t){.shards_per_gpu = 2,
                                     .coalesce_us = 200,
                                     .lanes = 3,
                                     .lane_scratch = 16u << 20,
                                     .routing_bytes = 64u << 20,
                                     .cache_bytes = 16u << 20};
    }
    msa_dev_config_env(&cfg.gpu.dev); /* MSA_GPU_SIM=1: the simulated device */
    msa_status_t st;
    if (msa_engine_open(&cfg, &eng, &st) != MSA_OK) {
        fprintf(stderr, "open: %s\n", st.msg);
        return 1;
    }
    msa_schema_t s = test_schema();
    msa_engine_create_collection_result_t *info = NULL;
    int rc = 1;
    if (msa_engine_create_collection(eng, "mvcc", &s, &info, &st) == MSA_OK)
        /* device_answered (last) only means something on the CUDA backend. */
        rc = msa_test_run(tests, sizeof tests / sizeof tests[0] - (on_cuda ? 0 : 1), argc, argv);
    else
        fprintf(stderr, "create: %s\n", st.msg);
    msa_engine_create_collection_result_free(info);
    msa_engine_close(eng);

    msa_test_tmpdir_done(dir, rc);
    return rc;
}
