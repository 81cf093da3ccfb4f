/* test_gpu_dev.c — the device layer's kernel contract (gpu/dev.h) through the
 * public API, against independent references written here (no index/ code):
 * score for every key dtype x plan x query reduce over odd shapes (D not a
 * multiple of 8 or 32, nrows not a multiple of 32, several queries per call)
 * on both score paths, and select (visibility, excludes, chunk max/mean, NaN,
 * ties by doc id, k = 1/16/1024, n_ent < k, n_ent = 0) compared exactly.
 *
 * Which device: argument `sim` or `cuda` (or env MSA_TEST_DEV), default sim.
 * CTest runs both: test_gpu_dev (sim) and test_gpu_dev_cuda, which exits 77
 * (skip) without a CUDA device. The CUDA paths are forced by opening two
 * devices: one with gemm_min_cols = 1 (cuBLAS whenever work holds a tile)
 * and one with a huge value (fused / generic kernels only).
 *
 * Score tolerance: |got - ref| <= 1e-4 * M + 1e-30, where M (per row and
 * query) is the largest sum over heads of sum_d |scale * key * q| over the
 * columns, i.e. the magnitude any float32 summation order works with. The
 * reference is fp64 over keys already rounded to their dtype, so only the
 * kernel's float32 accumulation (and the GEMM path's hi/lo query split,
 * ~2^-16 relative for BF16) remains. Select is compared exactly: the doc
 * scores follow the contract's float32 order of operations.
 */
#include "dev.h"
#include "harness.h"
#include "ref_util.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool g_cuda;         /* device under test */
static msa_dev_t *g_dev[2]; /* [0] GEMM-forced, [1] GEMM-never (same for sim) */
static const char *const g_path_name[2] = {"gemm", "fused"};

/* Independent dtype codecs: ref_util.h. */

static size_t dt_size(msa_dtype_t dt)
{
    return dt == MSA_DT_F32 ? 4 : dt == MSA_DT_I8 ? 1 : 2;
}

/* ==== device helpers ======================================================== */

static void *dev_upload(msa_dev_t *d, const void *src, size_t n)
{
    void *p = NULL;
    if (msa_dev_malloc(d, n ? n : 1, &p) != MSA_OK) return NULL;
    msa_dev_lane_t *l = msa_dev_lane_acquire(d);
    int rc = msa_dev_h2d(l, p, src, n);
    if (rc == MSA_OK) rc = msa_dev_lane_sync(l);
    msa_dev_lane_release(l);
    if (rc != MSA_OK) {
        msa_dev_free(d, p);
        return NULL;
    }
    return p;
}

static int dev_download(msa_dev_t *d, void *dst, const void *src, size_t n)
{
    msa_dev_lane_t *l = msa_dev_lane_acquire(d);
    int rc = msa_dev_d2h(l, dst, src, n);
    if (rc == MSA_OK) rc = msa_dev_lane_sync(l);
    msa_dev_lane_release(l);
    return rc;
}

/* ==== score ================================================================= */

typedef struct {
    msa_dtype_t dt;
    msa_dev_plan_t plan;
    msa_query_reduce_t qr;
    uint32_t H, D, G, Tp, ncol, nq, nrows;
    size_t ld;
    double qmag;   /* query values are uniform in [-qmag, qmag] */
    int work_mode; /* 0 whole lane scratch, 1 a few tiles' worth, 2 NULL */
} score_case_t;

/* fp64 reference of one (query, row) and its magnitude M. */
static double ref_score(const score_case_t *c, const double *kd, const float *cols, uint32_t i,
                        uint32_t r, double *mag)
{
    const uint32_t H = c->H, D = c->D, nc = c->ncol;
    double *C = malloc((size_t)H * nc * sizeof *C), *A = malloc((size_t)H * nc * sizeof *A);
    for (uint32_t h = 0; h < H; h++) {
        for (uint32_t cc = 0; cc < nc; cc++) {
            const float *q = cols + (((size_t)i * H + h) * nc + cc) * D;
            const double *k = kd + ((size_t)r * H + h) * D;
            double s = 0, a = 0;
            for (uint32_t d = 0; d < D; d++) {
                s += k[d] * q[d];
                a += fabs(k[d] * q[d]);
            }
            C[h * nc + cc] = s;
            A[h * nc + cc] = a;
        }
    }
    double m = 0;
    for (uint32_t cc = 0; cc < nc; cc++) {
        double a = 0;
        for (uint32_t h = 0; h < H; h++) a += A[h * nc + cc];
        m = fmax(m, a);
    }
    *mag = m;
    double score;
    if (c->plan == MSA_DEV_PLAN_GENERAL) {
        const uint32_t T = nc / c->G;
        double acc = c->qr == MSA_QUERY_MAX ? -INFINITY : 0.0;
        for (uint32_t t = 0; t < T; t++) {
            double mx = -INFINITY;
            for (uint32_t h = 0; h < H; h++)
                for (uint32_t g = 0; g < c->G; g++) mx = fmax(mx, C[h * nc + t * c->G + g]);
            acc = c->qr == MSA_QUERY_MAX ? fmax(acc, mx) : acc + mx;
        }
        score = c->qr == MSA_QUERY_MAX ? acc : acc / T;
    } else {
        const uint32_t ncv = c->plan == MSA_DEV_PLAN_LINEAR ? 1 : nc;
        score = -INFINITY;
        for (uint32_t cc = 0; cc < ncv; cc++) {
            double s = 0;
            for (uint32_t h = 0; h < H; h++) s += C[h * nc + cc];
            score = fmax(score, s);
        }
    }
    free(C);
    free(A);
    return score;
}

/* Runs one case on both devices and compares every score. */
static void run_score_case(const score_case_t *c)
{
    const uint32_t H = c->H, D = c->D;
    const size_t W = (size_t)H * D, nk = (size_t)c->nrows * W;
    const size_t ncols_f = (size_t)c->nq * H * c->ncol * D;
    void *keys = malloc(nk * dt_size(c->dt) + 1);
    double *kd = malloc(nk * sizeof *kd + 1);
    float *scales = malloc((size_t)c->nrows * H * sizeof(float) + 4);
    float *cols = malloc(ncols_f * sizeof(float));
    float *got = malloc((size_t)c->nq * c->ld * sizeof(float));
    /* Keys rounded to the dtype first: the reference sees the stored values. */
    for (size_t x = 0; x < nk; x++) {
        double v = urand();
        if (fabs(v) < 0.01) v = v < 0 ? -0.01 : 0.01; /* f16 normal range */
        switch (c->dt) {
        case MSA_DT_F32:
            ((float *)keys)[x] = (float)v;
            kd[x] = (float)v;
            break;
        case MSA_DT_F16:
            ((uint16_t *)keys)[x] = to_f16((float)v);
            kd[x] = from_f16(((uint16_t *)keys)[x]);
            break;
        case MSA_DT_BF16:
            ((uint16_t *)keys)[x] = to_bf16((float)v);
            kd[x] = from_bf16(((uint16_t *)keys)[x]);
            break;
        default: {
            int8_t q = (int8_t)((int)(rnd() % 255) - 127);
            ((int8_t *)keys)[x] = q;
            kd[x] = q;
        }
        }
    }
    if (c->dt == MSA_DT_I8) {
        for (size_t rh = 0; rh < (size_t)c->nrows * H; rh++) {
            scales[rh] = (float)(0.001 + 0.02 * fabs(urand()));
            for (uint32_t d = 0; d < D; d++) kd[rh * D + d] *= scales[rh];
        }
    }
    for (size_t x = 0; x < ncols_f; x++) cols[x] = (float)(urand() * c->qmag);

    char what[256];
    snprintf(
        what, sizeof what,
        "dt=%d plan=%d qr=%d H=%u D=%u G=%u T'=%u ncol=%u nq=%u nrows=%u ld=%zu qmag=%g work=%d",
        (int)c->dt, (int)c->plan, (int)c->qr, H, D, c->G, c->Tp, c->ncol, c->nq, c->nrows, c->ld,
        c->qmag, c->work_mode);

    for (int path = 0; path < 2; path++) {
        msa_dev_t *d = g_dev[path];
        void *keys_d = dev_upload(d, keys, nk * dt_size(c->dt));
        float *scales_d =
            c->dt == MSA_DT_I8 ? dev_upload(d, scales, (size_t)c->nrows * H * sizeof(float)) : NULL;
        float *cols_d = dev_upload(d, cols, ncols_f * sizeof(float));
        float *scores_d = NULL;
        int rc = msa_dev_malloc(d, (size_t)c->nq * c->ld * sizeof(float), (void **)&scores_d);
        CHECK_MSG(keys_d && cols_d && rc == MSA_OK && (scales_d || c->dt != MSA_DT_I8), "%s", what);
        msa_dev_lane_t *l = msa_dev_lane_acquire(d);
        size_t wb = 0;
        void *work = msa_dev_lane_scratch(l, &wb);
        if (c->work_mode == 1) {
            /* Enough for the GEMM's fixed part and ~40 rows: several tiles. */
            size_t n2 = (size_t)c->nq * c->ncol * 2;
            size_t want =
                W * n2 * 4 + (size_t)H * n2 * 4 + 4096 + 40 * ((size_t)H * n2 * 4 + W * 2);
            wb = want < wb ? want : wb;
        } else if (c->work_mode == 2) {
            work = NULL;
            wb = 0;
        }
        msa_dev_score_args_t a = {.keys = keys_d,
                                  .scales = scales_d,
                                  .key_dtype = c->dt,
                                  .nrows = c->nrows,
                                  .H = H,
                                  .D = D,
                                  .plan = c->plan,
                                  .ncol = c->ncol,
                                  .G = c->G,
                                  .query_reduce = c->qr,
                                  .cols = cols_d,
                                  .nq = c->nq,
                                  .scores = scores_d,
                                  .ld = c->ld,
                                  .work = work,
                                  .work_bytes = wb};
        rc = msa_dev_score(l, &a);
        if (rc == MSA_OK) rc = msa_dev_lane_sync(l);
        msa_dev_lane_release(l);
        CHECK_MSG(rc == MSA_OK, "score rc %s on %s path: %s", msa_errname(rc), g_path_name[path],
                  what);
        CHECK_OK(dev_download(d, got, scores_d, (size_t)c->nq * c->ld * sizeof(float)));
        int bad = 0;
        for (uint32_t i = 0; i < c->nq && bad < 3; i++) {
            for (uint32_t r = 0; r < c->nrows && bad < 3; r++) {
                double mag, ref = ref_score(c, kd, cols, i, r, &mag);
                double g = got[(size_t)i * c->ld + r], tol = 1e-4 * mag + 1e-30;
                if (!(fabs(g - ref) <= tol)) {
                    bad++;
                    CHECK_NEAR_MSG(g, ref, tol, "query %u row %u, %s path: %s", i, r,
                                   g_path_name[path], what);
                }
            }
        }
        msa_dev_free(d, scores_d);
        msa_dev_free(d, cols_d);
        msa_dev_free(d, scales_d);
        msa_dev_free(d, keys_d);
        if (bad) break;
    }
    free(keys);
    free(kd);
    free(scales);
    free(cols);
    free(got);
}

static const uint32_t kHs[] = {1, 2, 3, 8};
static const uint32_t kDs[] = {3, 8, 16, 20, 64, 96, 128, 256};
static const uint32_t kRows[] = {1, 31, 77, 200, 333};

/* Random shape for dtype x plan; the row count shrinks to keep the CPU
 * reference (and the simulated device) fast. */
static score_case_t random_case(msa_dtype_t dt, msa_dev_plan_t plan, int idx)
{
    score_case_t c = {.dt = dt, .plan = plan, .qmag = 1.0};
    c.H = kHs[rnd() % 4];
    c.D = kDs[rnd() % 8];
    c.G = 1 + (uint32_t)(rnd() % 4);
    c.nq = 1 + (uint32_t)(rnd() % 3);
    c.qr = rnd() % 2 ? MSA_QUERY_MAX : MSA_QUERY_MEAN;
    /* Alternate few columns (fused zone) and many (GEMM zone). */
    c.Tp = idx % 2 ? 1 + (uint32_t)(rnd() % 70) : 1 + (uint32_t)(rnd() % 4);
    if (plan == MSA_DEV_PLAN_LINEAR) {
        c.Tp = 1;
        c.ncol = 1;
    } else if (plan == MSA_DEV_PLAN_MAXVEC) {
        c.ncol = c.Tp;
    } else {
        c.ncol = c.Tp * c.G;
    }
    c.nrows = kRows[rnd() % 5];
    while (c.nrows > 1 && (double)c.nrows * c.H * c.D * c.ncol * c.nq > 4e6)
        c.nrows = c.nrows / 2 + 1;
    c.ld = c.nq > 1 ? c.nrows + (uint32_t)(rnd() % 5) : c.nrows;
    c.work_mode = idx % 3;
    return c;
}

TEST(score_all_dtypes_plans)
{
    const msa_dtype_t dts[4] = {MSA_DT_F32, MSA_DT_F16, MSA_DT_BF16, MSA_DT_I8};
    const msa_dev_plan_t plans[3] = {MSA_DEV_PLAN_LINEAR, MSA_DEV_PLAN_MAXVEC,
                                     MSA_DEV_PLAN_GENERAL};
    int idx = 0;
    for (int t = 0; t < 4; t++)
        for (int p = 0; p < 3; p++)
            for (int rep = 0; rep < 4; rep++, idx++) {
                score_case_t c = random_case(dts[t], plans[p], idx);
                int before = msa_test_nfail;
                run_score_case(&c);
                if (msa_test_nfail != before) return;
            }
}

/* Fixed shapes that hit each kernel's corners: the fused fast path (D/8 a
 * divisor or multiple of 32, H*D/8 not a multiple of 32), the generic kernel
 * (D = 3, 20, 96), GEMM tiling, MSA-like shapes, LAST as T' = 1, and large
 * query magnitudes (the F16 GEMM path must not overflow its half columns). */
TEST(score_fixed_shapes)
{
    const score_case_t cases[] = {
        {MSA_DT_BF16, MSA_DEV_PLAN_LINEAR, MSA_QUERY_MEAN, 8, 128, 1, 1, 1, 1, 100, 100, 1, 0},
        {MSA_DT_BF16, MSA_DEV_PLAN_LINEAR, MSA_QUERY_MEAN, 8, 128, 1, 1, 1, 8, 70, 75, 1, 0},
        {MSA_DT_BF16, MSA_DEV_PLAN_MAXVEC, MSA_QUERY_MAX, 8, 128, 1, 64, 64, 1, 90, 90, 1, 1},
        {MSA_DT_I8, MSA_DEV_PLAN_MAXVEC, MSA_QUERY_MAX, 8, 128, 1, 16, 16, 1, 65, 65, 1, 0},
        {MSA_DT_F16, MSA_DEV_PLAN_GENERAL, MSA_QUERY_MEAN, 2, 64, 4, 3, 12, 1, 45, 45, 1, 0},
        {MSA_DT_F32, MSA_DEV_PLAN_GENERAL, MSA_QUERY_MAX, 3, 512, 2, 2, 4, 2, 33, 40, 1, 1},
        {MSA_DT_F32, MSA_DEV_PLAN_MAXVEC, MSA_QUERY_MAX, 3, 8, 1, 5, 5, 3, 97, 101, 1, 0},
        {MSA_DT_I8, MSA_DEV_PLAN_GENERAL, MSA_QUERY_MAX, 5, 16, 3, 2, 6, 1, 63, 63, 1, 0},
        {MSA_DT_BF16, MSA_DEV_PLAN_GENERAL, MSA_QUERY_LAST, 4, 32, 2, 1, 2, 2, 50, 52, 1, 0},
        {MSA_DT_F16, MSA_DEV_PLAN_MAXVEC, MSA_QUERY_MAX, 2, 20, 1, 40, 40, 1, 70, 70, 1, 1},
        {MSA_DT_I8, MSA_DEV_PLAN_LINEAR, MSA_QUERY_MEAN, 1, 3, 1, 1, 1, 4, 129, 130, 1, 2},
        {MSA_DT_BF16, MSA_DEV_PLAN_MAXVEC, MSA_QUERY_MAX, 3, 96, 1, 18, 18, 1, 61, 61, 1, 0},
        {MSA_DT_F16, MSA_DEV_PLAN_MAXVEC, MSA_QUERY_MAX, 4, 64, 1, 24, 24, 1, 50, 50, 1e5, 0},
        {MSA_DT_F16, MSA_DEV_PLAN_LINEAR, MSA_QUERY_MEAN, 4, 64, 1, 1, 1, 1, 50, 50, 1e5, 0},
        {MSA_DT_F32, MSA_DEV_PLAN_MAXVEC, MSA_QUERY_MAX, 1, 256, 1, 70, 70, 1, 35, 35, 1, 1},
        {MSA_DT_BF16, MSA_DEV_PLAN_GENERAL, MSA_QUERY_MEAN, 8, 128, 4, 16, 64, 1, 40, 40, 1, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int before = msa_test_nfail;
        run_score_case(&cases[i]);
        if (msa_test_nfail != before) return;
    }
}

TEST(score_edges)
{
    msa_dev_t *d = g_dev[0];
    msa_dev_lane_t *l = msa_dev_lane_acquire(d);
    float dummy = 0;
    /* nrows = 0 and nq = 0 queue nothing (NULL buffers are fine then). */
    msa_dev_score_args_t a = {.key_dtype = MSA_DT_F32,
                              .H = 1,
                              .D = 4,
                              .plan = MSA_DEV_PLAN_LINEAR,
                              .ncol = 1,
                              .G = 1,
                              .nq = 1,
                              .ld = 0,
                              .scores = &dummy};
    CHECK_OK(msa_dev_score(l, &a));
    /* GENERAL with ncol not a multiple of G, or G = 0; I8 without scales. */
    a.nrows = 0;
    a.plan = MSA_DEV_PLAN_GENERAL;
    a.ncol = 3;
    a.G = 2;
    CHECK_RC(msa_dev_score(l, &a), MSA_EINVAL);
    a.G = 0;
    CHECK_RC(msa_dev_score(l, &a), MSA_EINVAL);
    a.plan = MSA_DEV_PLAN_LINEAR;
    a.ncol = 1;
    a.G = 1;
    a.key_dtype = MSA_DT_I8;
    a.nrows = 1;
    a.keys = &dummy; /* never read: the call is refused first */
    a.cols = &dummy;
    CHECK_RC(msa_dev_score(l, &a), MSA_EINVAL);
    CHECK_OK(msa_dev_lane_sync(l));
    msa_dev_lane_release(l);
}

/* ==== select ================================================================ */

typedef struct {
    uint32_t n_ent, top_k;
    bool chunk_mean;
    int score_kind; /* 0 few distinct values (ties), 1 continuous, 2 all equal */
    int doc_kind;   /* 0 random 64-bit, 1 shared high bytes (ties settle in low bytes) */
    uint32_t row_base;
} select_case_t;

static int cmp_hit_ref(const void *x, const void *y)
{
    const msa_idx_hit_t *a = x, *b = y;
    if (a->score != b->score) return a->score > b->score ? -1 : 1;
    return a->id < b->id ? -1 : a->id > b->id ? 1 : 0;
}
static int cmp_u64(const void *x, const void *y)
{
    uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
    return a < b ? -1 : a > b;
}

static void run_select_case(const select_case_t *c)
{
    const uint32_t n = c->n_ent;
    msa_dev_entry_t *ent = calloc(n + 1, sizeof *ent);
    uint32_t nrows_total = 0;
    const uint64_t snapshot = 5;
    for (uint32_t e = 0; e < n; e++) {
        ent[e].doc = c->doc_kind ? 0xabcd000000000000ull + (uint64_t)(e * 7919u % (n + 13)) * 3 +
                                       ((uint64_t)e << 40)
                                 : rnd();
        ent[e].created = rnd() % 8; /* 6, 7: not yet created at 5 */
        ent[e].deleted = rnd() % 4 ? UINT64_MAX : ent[e].created + 1 + rnd() % 6;
        ent[e].nrows = rnd() % 10 == 0 ? 0 : 1 + (uint32_t)(rnd() % 4);
        ent[e].row0 = c->row_base + nrows_total;
        nrows_total += ent[e].nrows;
    }
    float *scores = malloc(((size_t)nrows_total + 1) * sizeof *scores);
    for (uint32_t r = 0; r < nrows_total; r++) {
        if (c->score_kind == 0)
            scores[r] = (float)((int)(rnd() % 9) - 4) * 0.5f;
        else if (c->score_kind == 1)
            scores[r] = (float)urand() * 100.0f;
        else
            scores[r] = 1.25f;
    }
    /* A few single-row docs with NaN or -inf (both read as -inf). */
    for (uint32_t e = 0; e < n; e += 37) {
        if (ent[e].nrows == 1) scores[ent[e].row0 - c->row_base] = e % 2 ? NAN : -INFINITY;
    }
    /* Excludes: every ~5th doc, sorted, plus one id no entry has. */
    uint32_t n_ex = 0;
    uint64_t *ex = malloc(((size_t)n / 5 + 2) * sizeof *ex);
    for (uint32_t e = 0; e < n; e += 5) ex[n_ex++] = ent[e].doc;
    ex[n_ex++] = 42;
    qsort(ex, n_ex, sizeof *ex, cmp_u64);

    /* Reference: the contract in float32, then a sort. */
    msa_idx_hit_t *ref = malloc(((size_t)n + 1) * sizeof *ref);
    uint32_t nref = 0;
    for (uint32_t e = 0; e < n; e++) {
        const msa_dev_entry_t *en = &ent[e];
        if (!(en->created <= snapshot && snapshot < en->deleted) || en->nrows == 0) continue;
        if (bsearch(&en->doc, ex, n_ex, sizeof *ex, cmp_u64)) continue;
        const float *s = scores + (en->row0 - c->row_base);
        float best = s[0];
        if (c->chunk_mean) {
            float sum = 0.0f;
            for (uint32_t r = 0; r < en->nrows; r++) sum += s[r];
            best = sum / (float)en->nrows;
        } else {
            for (uint32_t r = 1; r < en->nrows; r++) best = s[r] > best ? s[r] : best;
        }
        if (isnan(best)) best = -INFINITY;
        ref[nref].score = best;
        ref[nref].id = en->doc;
        nref++;
    }
    qsort(ref, nref, sizeof *ref, cmp_hit_ref);
    const uint32_t want = nref < c->top_k ? nref : c->top_k;

    char what[160];
    snprintf(what, sizeof what, "n_ent=%u k=%u mean=%d scores=%d docs=%d row_base=%u valid=%u", n,
             c->top_k, c->chunk_mean, c->score_kind, c->doc_kind, c->row_base, nref);
    msa_dev_t *d = g_dev[0];
    float *scores_d = dev_upload(d, scores, (size_t)nrows_total * sizeof *scores);
    msa_dev_entry_t *ent_d = dev_upload(d, ent, (size_t)n * sizeof *ent);
    uint64_t *ex_d = dev_upload(d, ex, (size_t)n_ex * sizeof *ex);
    size_t wb = msa_dev_select_work(n, c->top_k);
    void *work = NULL;
    CHECK_OK(msa_dev_malloc(d, wb, &work));
    CHECK_MSG(scores_d && ent_d && ex_d, "%s", what);
    msa_idx_hit_t *out = malloc(((size_t)c->top_k + 1) * sizeof *out);
    uint32_t n_out = 12345;
    msa_dev_lane_t *l = msa_dev_lane_acquire(d);
    msa_dev_select_args_t a = {.scores = scores_d,
                               .row_base = c->row_base,
                               .ent = ent_d,
                               .n_ent = n,
                               .snapshot = snapshot,
                               .exclude = ex_d,
                               .n_exclude = n_ex,
                               .chunk_mean = c->chunk_mean,
                               .top_k = c->top_k,
                               .work = work,
                               .work_bytes = wb,
                               .out = out,
                               .n_out = &n_out};
    int rc = msa_dev_select(l, &a);
    msa_dev_lane_release(l);
    CHECK_MSG(rc == MSA_OK, "select rc %s: %s", msa_errname(rc), what);
    CHECK_MSG(n_out == want, "n_out %u want %u: %s", n_out, want, what);
    for (uint32_t i = 0; i < want; i++) {
        CHECK_MSG(out[i].id == ref[i].id && out[i].score == ref[i].score,
                  "hit %u: got (%.9g, %llx) want (%.9g, %llx): %s", i, out[i].score,
                  (unsigned long long)out[i].id, ref[i].score, (unsigned long long)ref[i].id, what);
    }
    msa_dev_free(d, work);
    msa_dev_free(d, ex_d);
    msa_dev_free(d, ent_d);
    msa_dev_free(d, scores_d);
    free(out);
    free(ref);
    free(ex);
    free(scores);
    free(ent);
}

TEST(select_exact_topk)
{
    const uint32_t ns[] = {1, 5, 31, 100, 1000, 5000, 40000};
    const uint32_t ks[] = {1, 16, 1024};
    for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++) {
        for (size_t j = 0; j < 3; j++) {
            for (int kind = 0; kind < 3; kind++) {
                select_case_t c = {ns[i],
                                   ks[j],
                                   (i + j + kind) % 2 == 1,
                                   kind,
                                   (int)((i + kind) % 2),
                                   (uint32_t)(i * 3)};
                int before = msa_test_nfail;
                run_select_case(&c);
                if (msa_test_nfail != before) return;
            }
        }
    }
}

TEST(select_edges)
{
    msa_dev_t *d = g_dev[0];
    msa_dev_lane_t *l = msa_dev_lane_acquire(d);
    size_t wb = msa_dev_select_work(64, 16);
    void *work = NULL;
    CHECK_OK(msa_dev_malloc(d, wb, &work));
    msa_idx_hit_t out[16];
    uint32_t n_out = 99;
    /* n_ent = 0: no hits. */
    msa_dev_select_args_t a = {
        .n_ent = 0, .top_k = 16, .work = work, .work_bytes = wb, .out = out, .n_out = &n_out};
    CHECK_OK(msa_dev_select(l, &a));
    CHECK_EQ_U(n_out, 0);
    /* top_k 0 or above MSA_MAX_TOP_K, work too small: refused. */
    a.top_k = 0;
    CHECK_RC(msa_dev_select(l, &a), MSA_EINVAL);
    a.top_k = MSA_MAX_TOP_K + 1;
    CHECK_RC(msa_dev_select(l, &a), MSA_EINVAL);
    /* All entries excluded: 0 hits. */
    msa_dev_entry_t ent[3] = {
        {10, 0, UINT64_MAX, 0, 1}, {11, 0, UINT64_MAX, 1, 1}, {12, 0, UINT64_MAX, 2, 1}};
    uint64_t ex[3] = {10, 11, 12};
    float sc[3] = {1, 2, 3};
    msa_dev_entry_t *ent_d = dev_upload(d, ent, sizeof ent);
    uint64_t *ex_d = dev_upload(d, ex, sizeof ex);
    float *sc_d = dev_upload(d, sc, sizeof sc);
    a = (msa_dev_select_args_t){.scores = sc_d,
                                .ent = ent_d,
                                .n_ent = 3,
                                .snapshot = 1,
                                .exclude = ex_d,
                                .n_exclude = 3,
                                .top_k = 16,
                                .work = work,
                                .work_bytes = wb,
                                .out = out,
                                .n_out = &n_out};
    CHECK_OK(msa_dev_select(l, &a));
    CHECK_EQ_U(n_out, 0);
    /* Without excludes: all three, best first. */
    a.n_exclude = 0;
    CHECK_OK(msa_dev_select(l, &a));
    CHECK_EQ_U(n_out, 3);
    CHECK_EQ_U(out[0].id, 12);
    CHECK_EQ_U(out[2].id, 10);
    a.work_bytes = msa_dev_select_work(3, 16) - 1;
    CHECK_RC(msa_dev_select(l, &a), MSA_EINVAL);
    msa_dev_lane_release(l);
    msa_dev_free(d, sc_d);
    msa_dev_free(d, ex_d);
    msa_dev_free(d, ent_d);
    msa_dev_free(d, work);
}

/* ==== lanes, copies ========================================================= */

TEST(lanes_and_copies)
{
    msa_dev_info_t info;
    msa_dev_get_info(g_dev[0], &info);
    printf("  device: %s (sim=%d, %.1f GiB)\n", info.name, info.sim,
           (double)info.total_bytes / (1u << 30));
    CHECK_EQ_I(info.sim, !g_cuda);
    msa_dev_lane_t *l1 = msa_dev_lane_acquire(g_dev[0]);
    msa_dev_lane_t *l2 = msa_dev_lane_acquire(g_dev[0]);
    CHECK(l1 != l2);
    CHECK(msa_dev_lane_dev(l1) == g_dev[0]);
    size_t sb = 0, hb = 0;
    CHECK(msa_dev_lane_scratch(l1, &sb) != NULL);
    char *st = msa_dev_lane_staging(l1, &hb);
    CHECK(st != NULL && hb >= 4096);
    /* h2d -> d2d -> d2h round trip through the pinned staging. */
    void *a = NULL, *b = NULL;
    CHECK_OK(msa_dev_malloc(g_dev[0], 4096, &a));
    CHECK_OK(msa_dev_malloc(g_dev[0], 4096, &b));
    for (int i = 0; i < 4096; i++) st[i] = (char)(i * 7);
    CHECK_OK(msa_dev_h2d(l1, a, st, 4096));
    CHECK_OK(msa_dev_d2d(l1, b, a, 4096));
    CHECK_OK(msa_dev_lane_sync(l1));
    memset(st, 0, 4096);
    CHECK_OK(msa_dev_d2h(l2, st, b, 4096));
    CHECK_OK(msa_dev_lane_sync(l2));
    int same = 1;
    for (int i = 0; i < 4096; i++) same &= st[i] == (char)(i * 7);
    CHECK(same);
    msa_dev_free(g_dev[0], a);
    msa_dev_free(g_dev[0], b);
    msa_dev_lane_release(l2);
    msa_dev_lane_release(l1);
}

/* The environment maps onto msa_dev_config_t as the device layer read it
 * before it took a config: defaults when unset, the same edge values. */
TEST(config_env)
{
    static const char *vars[] = {"MSA_GPU_SIM",        "MSA_GPU_SIM_DEVICES",
                                 "MSA_GPU_SIM_MEM_MB", "MSA_GPU_SIM_FAIL_AFTER",
                                 "MSA_GPU_SYNC_CHECK", "MSA_GPU_GEMM_MIN_COLS"};
    char *saved[6];
    for (int i = 0; i < 6; i++) {
        const char *v = getenv(vars[i]);
        saved[i] = v ? strdup(v) : NULL;
        unsetenv(vars[i]);
    }
    msa_dev_config_t c;
    msa_dev_config_env(&c);
    CHECK(!c.sim);
    CHECK_EQ_I(c.sim_devices, 1);
    CHECK_EQ_U(c.sim_mem_bytes, 4096ull << 20);
    CHECK(!c.sim_fault);
    CHECK(!c.sync_check);
    CHECK_EQ_U(c.gemm_min_cols, 17);

    setenv("MSA_GPU_SIM", "1", 1);
    setenv("MSA_GPU_SIM_DEVICES", "0", 1);
    setenv("MSA_GPU_SIM_MEM_MB", "64", 1);
    setenv("MSA_GPU_SIM_FAIL_AFTER", "0", 1);
    setenv("MSA_GPU_SYNC_CHECK", "1", 1);
    setenv("MSA_GPU_GEMM_MIN_COLS", "0", 1);
    msa_dev_config_env(&c);
    CHECK(c.sim);
    CHECK(c.sim_devices < 0);
    CHECK_EQ_U(c.sim_mem_bytes, 64ull << 20);
    CHECK(c.sim_fault);
    CHECK_EQ_U(c.sim_fail_after, 0);
    CHECK(c.sync_check);
    CHECK_EQ_U(c.gemm_min_cols, 1);
    char why[128] = "";
    CHECK_EQ_I(msa_dev_count(&c, why, sizeof why), 0);
    CHECK_STR(why, "MSA_GPU_SIM_DEVICES=0");

    setenv("MSA_GPU_SIM", "yes", 1);           /* only "1" switches it on */
    setenv("MSA_GPU_SIM_DEVICES", "3x", 1);    /* not a number: the default */
    setenv("MSA_GPU_SIM_FAIL_AFTER", "-1", 1); /* negative: no fault */
    msa_dev_config_env(&c);
    CHECK(!c.sim);
    CHECK_EQ_I(c.sim_devices, 1);
    CHECK(!c.sim_fault);
    /* A zeroed config is the defaults too. */
    msa_dev_config_t z = {.sim = true};
    CHECK_EQ_I(msa_dev_count(&z, why, sizeof why), 1);

    for (int i = 0; i < 6; i++) {
        if (saved[i])
            setenv(vars[i], saved[i], 1);
        else
            unsetenv(vars[i]);
        free(saved[i]);
    }
}

static const msa_test_t tests[] = {
    TEST_ENTRY(config_env),         TEST_ENTRY(lanes_and_copies),       TEST_ENTRY(score_edges),
    TEST_ENTRY(score_fixed_shapes), TEST_ENTRY(score_all_dtypes_plans), TEST_ENTRY(select_edges),
    TEST_ENTRY(select_exact_topk),
};

int main(int argc, char **argv)
{
    /* The device comes first (argument or MSA_TEST_DEV); the rest are case names. */
    const char *which = getenv("MSA_TEST_DEV");
    if (argc > 1 && (strcmp(argv[1], "sim") == 0 || strcmp(argv[1], "cuda") == 0)) {
        which = argv[1];
        argv[1] = argv[0];
        argv++;
        argc--;
    }
    g_cuda = which && strcmp(which, "cuda") == 0;
    msa_dev_config_t cfg; /* MSA_GPU_SYNC_CHECK=1 etc. still apply */
    msa_dev_config_env(&cfg);
    cfg.sim = !g_cuda;
    char why[256] = "";
    if (msa_dev_count(&cfg, why, sizeof why) <= 0) {
        printf("skipped: no %s device (%s)\n", g_cuda ? "CUDA" : "simulated", why);
        return 77;
    }
    /* Two opens of ordinal 0: GEMM whenever possible, and never. */
    const size_t scratch = 64u << 20, staging = 1u << 20;
    cfg.gemm_min_cols = 1;
    int rc = msa_dev_open(&cfg, 0, 2, scratch, staging, &g_dev[0]);
    cfg.gemm_min_cols = 1000000000;
    if (rc == MSA_OK) rc = msa_dev_open(&cfg, 0, 2, scratch, staging, &g_dev[1]);
    if (rc != MSA_OK) {
        fprintf(stderr, "msa_dev_open(%s): %s\n", g_cuda ? "cuda" : "sim", msa_errname(rc));
        msa_dev_close(g_dev[0]);
        return 1;
    }
    printf("device under test: %s\n", g_cuda ? "cuda" : "sim");
    int st = msa_test_run(tests, sizeof tests / sizeof tests[0], argc, argv);
    msa_dev_close(g_dev[1]);
    msa_dev_close(g_dev[0]);
    return st;
}
