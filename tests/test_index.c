/* test_index.c — the routing index alone: MVCC visibility by commit seq,
 * compaction that keeps what open snapshots can see, dropped collections,
 * exclude lists, ties, and COSINE normalisation at insert. Expected scores
 * are computed here by hand (tiny vectors), not by the kernels under test.
 */
/* Checks also run in route(), which returns a value: a failed one is counted
 * and the case carries on. */
#define MSA_TEST_KEEP_GOING
#include "harness.h"
#include "index.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* H = 1, Hq = 1, D = 2, DOT, HEAD_MEAN, QUERY_MAX, CHUNK_MAX, F32 rows. */
static msa_schema_t schema(msa_similarity_t sim, msa_dtype_t rt)
{
    msa_schema_t s;
    memset(&s, 0, sizeof s);
    s.n_layers = 1;
    s.kv_heads = 1;
    s.query_heads = 1;
    s.head_dim = 2;
    s.chunk_tokens = 1;
    s.kv_dtype = MSA_DT_F32;
    s.routing_dtype = rt;
    s.similarity = sim;
    s.default_top_k = 16;
    return s;
}

static void put(msa_idx_coll_t *c, uint64_t id, uint64_t seq, float x, float y)
{
    float row[2] = {x, y};
    const float *rows[1] = {row};
    CHECK_MSG(msa_idx_doc_put(c, id, seq, 1, rows) == MSA_OK, "put %llu", (unsigned long long)id);
}

/* Routes with q = (1, 0) at snapshot; returns hits written to out. */
static uint32_t route(msa_idx_t *x, msa_idx_coll_t *c, uint64_t snap, const uint64_t *ex,
                      size_t nex, uint32_t k, msa_idx_hit_t *out)
{
    float q[2] = {1.0f, 0.0f};
    msa_idx_route_args_t a = {.layer_pos = 0,
                              .q = q,
                              .T = 1,
                              .snapshot = snap,
                              .exclude = ex,
                              .n_exclude = nex,
                              .top_k = k};
    uint32_t n = 0;
    CHECK_RC(msa_idx_route(x, c, &a, out, &n), MSA_OK);
    return n;
}

static int begin_at(void *arg, uint64_t *seq)
{
    *seq = *(uint64_t *)arg;
    return MSA_OK;
}

TEST(mvcc_and_compaction)
{
    msa_idx_t *x;
    CHECK_RC(msa_idx_create(2, msa_idx_isa_detect(), &x), MSA_OK);
    msa_schema_t s = schema(MSA_SIM_DOT, MSA_DT_F32);
    CHECK_RC(msa_idx_coll_add(x, 1, &s), MSA_OK);
    CHECK_RC(msa_idx_coll_add(x, 1, &s), MSA_EEXIST);
    msa_idx_coll_t *c = msa_idx_coll_acquire(x, 1);
    put(c, 5, 1, 3.0f, 0.0f);
    put(c, 6, 2, 2.0f, 9.0f);
    msa_idx_publish(x, 2);

    /* A reader holds snapshot 2 while doc 5 is replaced and doc 6 deleted. */
    uint64_t held = 2, got = 0;
    CHECK_MSG(msa_idx_snap_register(x, begin_at, &held, &got) == MSA_OK && got == 2,
              "register: got %llu", (unsigned long long)got);
    put(c, 5, 3, 1.0f, 0.0f);
    CHECK_RC(msa_idx_doc_delete(c, 6, 4), MSA_OK);
    CHECK_RC(msa_idx_doc_delete(c, 6, 5), MSA_ENOTFOUND);
    msa_idx_publish(x, 4);
    msa_idx_compact(x, true);

    msa_idx_hit_t h[8];
    uint32_t n = route(x, c, 2, NULL, 0, 8, h);
    CHECK_MSG(n == 2, "snapshot 2 sees %u docs, want 2", n);
    CHECK_MSG(n == 2 && h[0].id == 5 && h[0].score == 3.0f && h[1].id == 6 && h[1].score == 2.0f,
              "snapshot 2: got %llu:%g %llu:%g", (unsigned long long)h[0].id, h[0].score,
              (unsigned long long)h[1].id, h[1].score);
    n = route(x, c, 1, NULL, 0, 8, h);
    CHECK_MSG(n == 1 && h[0].id == 5 && h[0].score == 3.0f, "snapshot 1 sees only the first doc");
    n = route(x, c, 4, NULL, 0, 8, h);
    CHECK_MSG(n == 1 && h[0].id == 5 && h[0].score == 1.0f, "snapshot 4: replaced doc, %u hits", n);
    msa_idx_coll_stats_t st;
    msa_idx_coll_stats(c, &st);
    CHECK_MSG(st.rows == 3, "rows kept for the open snapshot: %llu", (unsigned long long)st.rows);

    /* Once the reader is gone, compaction drops the dead versions. */
    msa_idx_snap_unregister(x, 2);
    size_t removed = msa_idx_compact(x, true);
    msa_idx_coll_stats(c, &st);
    CHECK_MSG(removed == 2 && st.rows == 1 && st.live_docs == 1, "removed %zu, rows %llu", removed,
              (unsigned long long)st.rows);
    n = route(x, c, 4, NULL, 0, 8, h);
    CHECK_MSG(n == 1 && h[0].id == 5 && h[0].score == 1.0f, "after compaction");
    CHECK_MSG(msa_idx_doc_rows(c, 5) == 1 && msa_idx_doc_rows(c, 6) == -1, "doc rows");

    /* Dropped collections disappear only after older snapshots close. */
    held = 4;
    CHECK_RC(msa_idx_snap_register(x, begin_at, &held, &got), MSA_OK);
    msa_idx_coll_drop(x, 1, 5);
    msa_idx_publish(x, 5);
    msa_idx_compact(x, false);
    msa_idx_coll_t *again = msa_idx_coll_acquire(x, 1);
    CHECK_MSG(again != NULL, "dropped collection vanished under an open snapshot");
    msa_idx_coll_release(again);
    msa_idx_snap_unregister(x, 4);
    msa_idx_compact(x, false);
    again = msa_idx_coll_acquire(x, 1);
    CHECK_MSG(again == NULL, "dropped collection still mapped");
    msa_idx_coll_release(again);
    msa_idx_coll_release(c);
    msa_idx_destroy(x);
}

TEST(ties_exclude_topk)
{
    msa_idx_t *x;
    CHECK_RC(msa_idx_create(2, msa_idx_isa_detect(), &x), MSA_OK);
    msa_schema_t s = schema(MSA_SIM_DOT, MSA_DT_F32);
    msa_idx_coll_add(x, 2, &s);
    msa_idx_coll_t *c = msa_idx_coll_acquire(x, 2);
    /* 3000 documents: scores id % 7, so many ties broken by smaller id. */
    for (uint64_t id = 1; id <= 3000; id++) put(c, 3001 - id, 1, (float)((3001 - id) % 7), 0.f);
    msa_idx_publish(x, 1);
    msa_idx_hit_t h[1024];
    uint64_t ex[2] = {6, 13};
    uint32_t n = route(x, c, 1, ex, 2, 5, h);
    CHECK_MSG(n == 5, "n %u", n);
    uint64_t want[5] = {20, 27, 34, 41, 48}; /* score 6, smallest ids, 6 and 13 excluded */
    for (uint32_t i = 0; i < 5 && n == 5; i++)
        CHECK_MSG(h[i].id == want[i] && h[i].score == 6.0f, "hit %u: %llu:%g, want %llu:6", i,
                  (unsigned long long)h[i].id, h[i].score, (unsigned long long)want[i]);
    n = route(x, c, 1, NULL, 0, 1024, h);
    CHECK_MSG(n == 1024, "top 1024: %u", n);
    bool ordered = true;
    for (uint32_t i = 1; i < n; i++)
        if (h[i].score > h[i - 1].score || (h[i].score == h[i - 1].score && h[i].id < h[i - 1].id))
            ordered = false;
    CHECK_MSG(ordered, "top-1024 not ordered by score then id");
    n = route(x, c, 0, NULL, 0, 10, h);
    CHECK_MSG(n == 0, "snapshot 0 sees nothing: %u", n);
    msa_idx_coll_release(c);
    msa_idx_destroy(x);
}

TEST(cosine_normalises_at_insert)
{
    msa_dtype_t dts[4] = {MSA_DT_F32, MSA_DT_F16, MSA_DT_BF16, MSA_DT_I8};
    for (int d = 0; d < 4; d++) {
        msa_idx_t *x;
        CHECK_RC(msa_idx_create(1, msa_idx_isa_detect(), &x), MSA_OK);
        msa_schema_t s = schema(MSA_SIM_COSINE, dts[d]);
        msa_idx_coll_add(x, 3, &s);
        msa_idx_coll_t *c = msa_idx_coll_acquire(x, 3);
        put(c, 1, 1, 30.0f, 40.0f); /* cos with (1,0) = 0.6 */
        put(c, 2, 1, 0.0f, 0.0f);   /* zero stays zero: score 0 */
        put(c, 3, 1, -5.0f, 0.0f);  /* -1 */
        msa_idx_publish(x, 1);
        msa_idx_hit_t h[4];
        uint32_t n = route(x, c, 1, NULL, 0, 4, h);
        double tol = dts[d] == MSA_DT_F32 ? 1e-6 : 1e-2;
        CHECK_MSG(n == 3 && h[0].id == 1 && fabs(h[0].score - 0.6) < tol && h[1].id == 2 &&
                      h[1].score == 0.0f && h[2].id == 3 && fabs(h[2].score + 1.0) < tol,
                  "dtype %s: %llu:%g %llu:%g %llu:%g", msa_dtype_name(dts[d]),
                  (unsigned long long)h[0].id, h[0].score, (unsigned long long)h[1].id, h[1].score,
                  (unsigned long long)h[2].id, h[2].score);
        msa_idx_coll_release(c);
        msa_idx_destroy(x);
    }
}

static const msa_test_t tests[] = {
    TEST_ENTRY(mvcc_and_compaction),
    TEST_ENTRY(ties_exclude_topk),
    TEST_ENTRY(cosine_normalises_at_insert),
};

int main(int argc, char **argv)
{
    return msa_test_run(tests, sizeof tests / sizeof tests[0], argc, argv);
}
