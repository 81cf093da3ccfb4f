/* test_kernels.c — index/kernels.h against independent double-precision
 * references written here (they share no code with the kernels): routing
 * scores for every ISA this CPU runs x key dtype x head/query reduce x
 * cosine/dot over random odd shapes, top-k vs a sort, attention vs a two-pass
 * double softmax, and the thread pool under concurrent callers.
 */
#include "harness.h"
#include "kernels.h"
#include "ref_util.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint32_t pick(const uint32_t *v, size_t n)
{
    return v[rnd() % n];
}

/* Independent dtype codecs: ref_util.h. */

/* ==== ISA ================================================================== */

TEST(isa)
{
    msa_isa_t best = msa_idx_isa_detect();
    CHECK(msa_idx_isa_supported(best));
    CHECK(msa_idx_isa_supported(MSA_ISA_SCALAR));
    CHECK(strcmp(msa_idx_isa_name(MSA_ISA_AVX512BF16), "avx512bf16") == 0);
    setenv("MSA_ISA", "scalar", 1);
    CHECK_EQ_I(msa_idx_isa_detect(), MSA_ISA_SCALAR);
    setenv("MSA_ISA", "avx2", 1);
    CHECK_EQ_I(msa_idx_isa_detect(), best < MSA_ISA_AVX2 ? best : MSA_ISA_AVX2);
    setenv("MSA_ISA", "bogus", 1);
    CHECK_EQ_I(msa_idx_isa_detect(), best);
    unsetenv("MSA_ISA");
    for (int i = 0; i <= MSA_ISA_AVX512BF16; i++)
        printf("  isa %-10s %s\n", msa_idx_isa_name((msa_isa_t)i),
               msa_idx_isa_supported((msa_isa_t)i) ? "supported" : "not supported");
}

/* ==== routing scores ======================================================= */

typedef struct {
    uint32_t T, Hq, H, D;
    size_t n;
    bool cosine;
    msa_head_reduce_t hr;
    msa_query_reduce_t qr;
    msa_dtype_t dt;
    float *q;      /* [T][Hq][D] */
    void *rows;    /* stored keys */
    float *scales; /* I8 */
    double *kd;    /* stored keys as double [n][H][D] (scales applied) */
} case_t;

static size_t esz(msa_dtype_t dt)
{
    return dt == MSA_DT_F32 ? 4 : dt == MSA_DT_I8 ? 1 : 2;
}

static void make_case(case_t *c)
{
    const size_t HD = (size_t)c->H * c->D;
    c->q = malloc((size_t)c->T * c->Hq * c->D * sizeof(float));
    c->rows = malloc(c->n * HD * esz(c->dt) + 64);
    c->scales = malloc(c->n * c->H * sizeof(float));
    c->kd = malloc(c->n * HD * sizeof(double));
    for (size_t i = 0; i < (size_t)c->T * c->Hq * c->D; i++) c->q[i] = (float)(urand() * 2.0);
    /* Now and then a zero query vector (cosine must keep it zero). */
    if (c->T * c->Hq > 2 && rnd() % 3 == 0)
        memset(c->q + (rnd() % (c->T * c->Hq)) * c->D, 0, c->D * sizeof(float));
    double *x = malloc(c->D * sizeof(double));
    for (size_t r = 0; r < c->n; r++) {
        for (uint32_t h = 0; h < c->H; h++) {
            double nn = 0;
            for (uint32_t d = 0; d < c->D; d++) {
                double v = urand();
                if (fabs(v) < 0.01) v = v < 0 ? -0.01 : 0.01; /* stay in f16's normal range */
                x[d] = v;
                nn += v * v;
            }
            if (c->cosine)
                for (uint32_t d = 0; d < c->D; d++) x[d] /= sqrt(nn);
            size_t o = (r * c->H + h) * c->D;
            double *kd = c->kd + o;
            if (c->dt == MSA_DT_I8) {
                double mx = 0;
                for (uint32_t d = 0; d < c->D; d++) mx = fmax(mx, fabs(x[d]));
                float sc = (float)(mx / 127.0);
                c->scales[r * c->H + h] = sc;
                for (uint32_t d = 0; d < c->D; d++) {
                    int8_t qv = (int8_t)lrint(x[d] / sc);
                    ((int8_t *)c->rows)[o + d] = qv;
                    kd[d] = (double)qv * sc;
                }
            } else {
                for (uint32_t d = 0; d < c->D; d++) {
                    float f = (float)x[d];
                    if (c->dt == MSA_DT_F32) {
                        ((float *)c->rows)[o + d] = f;
                        kd[d] = f;
                    } else if (c->dt == MSA_DT_F16) {
                        uint16_t b = to_f16(f);
                        ((uint16_t *)c->rows)[o + d] = b;
                        kd[d] = from_f16(b);
                    } else {
                        uint16_t b = to_bf16(f);
                        ((uint16_t *)c->rows)[o + d] = b;
                        kd[d] = from_bf16(b);
                    }
                }
            }
        }
    }
    free(x);
}

static void free_case(case_t *c)
{
    free(c->q);
    free(c->rows);
    free(c->scales);
    free(c->kd);
}

/* out[r] per SEMANTICS routing steps 1-4 in double; bound[r] = max over (t, j)
 * of sum_d |q'||k| (the scale of rounding errors). */
static void ref_scores(const case_t *c, double *out, double *bound)
{
    const uint32_t G = c->Hq / c->H, T = c->T, Hq = c->Hq, D = c->D;
    double *qn = malloc((size_t)T * Hq * D * sizeof(double));
    for (size_t i = 0; i < (size_t)T * Hq; i++) {
        double nn = 0;
        for (uint32_t d = 0; d < D; d++) nn += (double)c->q[i * D + d] * c->q[i * D + d];
        double f = !c->cosine ? 1.0 : nn > 0 ? 1.0 / sqrt(nn) : 0.0;
        for (uint32_t d = 0; d < D; d++) qn[i * D + d] = c->q[i * D + d] * f;
    }
    for (size_t r = 0; r < c->n; r++) {
        double qacc = c->qr == MSA_QUERY_MAX ? -INFINITY : 0.0, b = 0;
        for (uint32_t t = 0; t < T; t++) {
            double hacc = c->hr == MSA_HEAD_MAX ? -INFINITY : 0.0;
            for (uint32_t j = 0; j < Hq; j++) {
                const double *k = c->kd + (r * c->H + j / G) * D;
                const double *qq = qn + ((size_t)t * Hq + j) * D;
                double s = 0, a = 0;
                for (uint32_t d = 0; d < D; d++) {
                    s += qq[d] * k[d];
                    a += fabs(qq[d] * k[d]);
                }
                b = fmax(b, a);
                hacc = c->hr == MSA_HEAD_MAX ? fmax(hacc, s) : hacc + s / Hq;
            }
            if (c->qr == MSA_QUERY_MAX)
                qacc = fmax(qacc, hacc);
            else if (c->qr == MSA_QUERY_MEAN)
                qacc += hacc / T;
            else if (t == T - 1)
                qacc = hacc;
        }
        out[r] = qacc;
        bound[r] = b;
    }
    free(qn);
}

static double g_worst[4][5]; /* worst |err| / bound per ISA and dtype */

static void check_case(const case_t *c, msa_isa_t isa, const double *ref, const double *bound)
{
    msa_idx_scorer_t *s = NULL;
    int rc = msa_idx_scorer_create(c->q, c->T, c->Hq, c->H, c->D, c->cosine, c->hr, c->qr, c->dt,
                                   isa, &s);
    CHECK_EQ_I(rc, MSA_OK);
    float *out = malloc((c->n + 1) * sizeof(float));
    out[c->n] = 12345.0f; /* canary */
    msa_idx_scorer_run(s, c->rows, c->dt == MSA_DT_I8 ? c->scales : NULL, c->n, out);
    CHECK(out[c->n] == 12345.0f);
    /* Tolerance relative to sum|q||k|: float32 accumulation over <= 1024 terms
     * stays below ~2e-7 here (2e-6 allowed); vdpbf16ps with the hi+lo bf16
     * query adds the split's error, <= 2^-18 per element (1e-5 allowed). */
    const double rel = isa == MSA_ISA_AVX512BF16 && c->dt == MSA_DT_BF16 ? 1e-5 : 2e-6;
    for (size_t r = 0; r < c->n; r++) {
        double err = fabs(out[r] - ref[r]);
        double e = bound[r] > 0 ? err / bound[r] : err;
        if (e > g_worst[isa][c->dt]) g_worst[isa][c->dt] = e;
        CHECK_NEAR_MSG(out[r], ref[r], rel * bound[r] + 1e-30,
                       "isa=%s dt=%d hr=%d qr=%d cos=%d T=%u Hq=%u H=%u D=%u n=%zu r=%zu",
                       msa_idx_isa_name(isa), c->dt, c->hr, c->qr, c->cosine, c->T, c->Hq, c->H,
                       c->D, c->n, r);
    }
    /* Scoring a sub-range at an odd offset gives the same numbers. */
    if (c->n > 3) {
        size_t off = 1 + rnd() % (c->n - 2);
        float *o2 = malloc((c->n - off) * sizeof(float));
        msa_idx_scorer_run(s, (const char *)c->rows + off * c->H * c->D * esz(c->dt),
                           c->dt == MSA_DT_I8 ? c->scales + off * c->H : NULL, c->n - off, o2);
        for (size_t r = off; r < c->n; r++)
            CHECK_NEAR_MSG(o2[r - off], out[r], 0.0, "sub-range r=%zu", r);
        free(o2);
    }
    free(out);
    msa_idx_scorer_destroy(s);
}

TEST(scores)
{
    static const uint32_t Ds[] = {1, 3, 17, 64, 100, 128};
    static const uint32_t Hs[] = {1, 2, 8};
    static const uint32_t Gs[] = {1, 4};
    static const uint32_t Ts[] = {1, 2, 5, 64};
    static const uint32_t Ns[] = {1, 7, 33, 1000};
    static const msa_dtype_t dts[] = {MSA_DT_F32, MSA_DT_F16, MSA_DT_BF16, MSA_DT_I8};
    int ncases = 0;
    for (int di = 0; di < 4; di++)
        for (int hr = 0; hr < 2; hr++)
            for (int qr = 0; qr < 3; qr++)
                for (int cos = 0; cos < 2; cos++)
                    for (int rep = 0; rep < 3; rep++) {
                        case_t c = {0};
                        /* Random shape, capped at ~2e7 reference MACs. */
                        do {
                            c.D = pick(Ds, 6);
                            c.H = pick(Hs, 3);
                            c.Hq = c.H * pick(Gs, 2);
                            c.T = pick(Ts, 4);
                            c.n = pick(Ns, 4);
                        } while ((double)c.n * c.T * c.Hq * c.D > 2e7);
                        /* The big shapes at least once per dtype. */
                        if (hr == 0 && qr == 0 && cos == 1 && rep == 0) {
                            c.D = 128, c.H = 8, c.Hq = 32, c.T = 5, c.n = 1000;
                        }
                        c.dt = dts[di];
                        c.hr = (msa_head_reduce_t)hr;
                        c.qr = (msa_query_reduce_t)qr;
                        c.cosine = cos;
                        make_case(&c);
                        double *ref = malloc(c.n * sizeof(double));
                        double *bound = malloc(c.n * sizeof(double));
                        ref_scores(&c, ref, bound);
                        for (int isa = 0; isa <= MSA_ISA_AVX512BF16; isa++) {
                            if (!msa_idx_isa_supported((msa_isa_t)isa)) continue;
                            int before = msa_test_nfail;
                            check_case(&c, (msa_isa_t)isa, ref, bound);
                            ncases++;
                            if (msa_test_nfail != before) break;
                        }
                        free(ref);
                        free(bound);
                        free_case(&c);
                        if (msa_test_nfail) return;
                    }
    printf("  %d scorer cases; worst |err|/sum|q||k| per isa (F32 F16 BF16 I8):\n", ncases);
    for (int isa = 0; isa <= MSA_ISA_AVX512BF16; isa++)
        if (msa_idx_isa_supported((msa_isa_t)isa))
            printf("    %-10s %.2e %.2e %.2e %.2e\n", msa_idx_isa_name((msa_isa_t)isa),
                   g_worst[isa][1], g_worst[isa][2], g_worst[isa][3], g_worst[isa][4]);
}

/* COSINE with an all-zero query: every score is exactly 0. */
TEST(zero_query)
{
    const uint32_t T = 3, Hq = 8, H = 2, D = 40;
    float q[3 * 8 * 40] = {0};
    uint16_t rows[5 * 2 * 40];
    for (size_t i = 0; i < 5 * 2 * 40; i++) rows[i] = to_bf16((float)urand());
    for (int isa = 0; isa <= MSA_ISA_AVX512BF16; isa++) {
        if (!msa_idx_isa_supported((msa_isa_t)isa)) continue;
        for (int hr = 0; hr < 2; hr++)
            for (int qr = 0; qr < 3; qr++) {
                msa_idx_scorer_t *s;
                CHECK_EQ_I(msa_idx_scorer_create(q, T, Hq, H, D, true, (msa_head_reduce_t)hr,
                                                 (msa_query_reduce_t)qr, MSA_DT_BF16,
                                                 (msa_isa_t)isa, &s),
                           MSA_OK);
                float out[5];
                msa_idx_scorer_run(s, rows, NULL, 5, out);
                for (int r = 0; r < 5; r++) CHECK_NEAR_MSG(out[r], 0.0, 0.0, "isa %d r %d", isa, r);
                msa_idx_scorer_destroy(s);
            }
    }
}

/* Overflowing finite inputs: inf + -inf = NaN must come out as -inf. */
TEST(nan)
{
    const float q[2] = {3e38f, 3e38f};
    const float rows[4] = {3e38f, -3e38f, 1.0f, 1.0f};
    for (int isa = 0; isa <= MSA_ISA_AVX512BF16; isa++) {
        if (!msa_idx_isa_supported((msa_isa_t)isa)) continue;
        for (int hr = 0; hr < 2; hr++) {
            msa_idx_scorer_t *s;
            CHECK_EQ_I(msa_idx_scorer_create(q, 1, 1, 1, 2, false, (msa_head_reduce_t)hr,
                                             MSA_QUERY_MAX, MSA_DT_F32, (msa_isa_t)isa, &s),
                       MSA_OK);
            float out[2];
            msa_idx_scorer_run(s, rows, NULL, 2, out);
            CHECK(out[0] == -INFINITY);
            CHECK(out[1] == INFINITY); /* 6e38 overflows to +inf: a real +inf */
            msa_idx_scorer_destroy(s);
        }
    }
}

TEST(scorer_einval)
{
    float q[16] = {0};
    msa_idx_scorer_t *s = (msa_idx_scorer_t *)1;
    CHECK_EQ_I(msa_idx_scorer_create(q, 0, 2, 1, 8, true, MSA_HEAD_MEAN, MSA_QUERY_MAX, MSA_DT_F32,
                                     MSA_ISA_SCALAR, &s),
               MSA_EINVAL);
    CHECK(s == NULL);
    CHECK_EQ_I(msa_idx_scorer_create(q, 1, 3, 2, 4, true, MSA_HEAD_MEAN, MSA_QUERY_MAX, MSA_DT_F32,
                                     MSA_ISA_SCALAR, &s),
               MSA_EINVAL);
    CHECK_EQ_I(msa_idx_scorer_create(q, 1, 2, 1, 8, true, MSA_HEAD_MEAN, MSA_QUERY_MAX,
                                     MSA_DT_UNSPECIFIED, MSA_ISA_SCALAR, &s),
               MSA_EINVAL);
    CHECK_EQ_I(msa_idx_scorer_create(q, 1, 2, 1, 8, true, (msa_head_reduce_t)7, MSA_QUERY_MAX,
                                     MSA_DT_F32, MSA_ISA_SCALAR, &s),
               MSA_EINVAL);
    CHECK_EQ_I(msa_idx_scorer_create(q, 1, 2, 1, 8, true, MSA_HEAD_MEAN, (msa_query_reduce_t)9,
                                     MSA_DT_F32, MSA_ISA_SCALAR, &s),
               MSA_EINVAL);
    msa_idx_scorer_destroy(NULL);
}

/* ==== top-k ================================================================ */

static int hit_cmp(const void *a, const void *b)
{
    const msa_idx_hit_t *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

TEST(topk)
{
    static const uint32_t ns[] = {0, 1, 5, 100, 3000};
    static const uint32_t ks[] = {0, 1, 3, 16, 100, 1024};
    for (int ni = 0; ni < 5; ni++)
        for (int ki = 0; ki < 6; ki++) {
            const uint32_t n = ns[ni], k = ks[ki];
            msa_idx_hit_t *all = malloc((n + 1) * sizeof *all);
            for (uint32_t i = 0; i < n; i++) {
                all[i].score = (float)(rnd() % 7) - 3.0f; /* many ties */
                all[i].id = (rnd() % 1000000) * 3000 + i; /* unique, random order */
            }
            msa_idx_hit_t *sorted = malloc((n + 1) * sizeof *sorted);
            memcpy(sorted, all, n * sizeof *all);
            qsort(sorted, n, sizeof *sorted, hit_cmp);
            const uint32_t want = n < k ? n : k;

            /* One heap, and three partial heaps merged. */
            msa_idx_hit_t *st = malloc((k + 1) * sizeof *st), *out = malloc((k + 1) * sizeof *out);
            msa_idx_hit_t *st2[3];
            msa_idx_topk_t t, parts[3];
            msa_idx_topk_init(&t, st, k);
            for (int p = 0; p < 3; p++) {
                st2[p] = malloc((k + 1) * sizeof **st2);
                msa_idx_topk_init(&parts[p], st2[p], k);
            }
            for (uint32_t i = 0; i < n; i++) {
                msa_idx_topk_push(&t, all[i].score, all[i].id);
                msa_idx_topk_push(&parts[rnd() % 3], all[i].score, all[i].id);
            }
            CHECK_EQ_I(msa_idx_topk_finish(&t, out), want);
            for (uint32_t i = 0; i < want; i++) {
                CHECK_EQ_I(out[i].id, sorted[i].id);
                CHECK(out[i].score == sorted[i].score);
            }
            msa_idx_topk_t m;
            msa_idx_topk_init(&m, st, k);
            for (int p = 0; p < 3; p++) msa_idx_topk_merge(&m, &parts[p]);
            CHECK_EQ_I(msa_idx_topk_finish(&m, out), want);
            for (uint32_t i = 0; i < want; i++) CHECK_EQ_I(out[i].id, sorted[i].id);
            for (int p = 0; p < 3; p++) free(st2[p]);
            free(st);
            free(out);
            free(all);
            free(sorted);
        }
    /* NaN ranks as -inf: below every finite score. */
    msa_idx_hit_t st[2], out[2];
    msa_idx_topk_t t;
    msa_idx_topk_init(&t, st, 2);
    msa_idx_topk_push(&t, NAN, 1);
    msa_idx_topk_push(&t, -1e30f, 2);
    msa_idx_topk_push(&t, -INFINITY, 0);
    CHECK_EQ_I(msa_idx_topk_finish(&t, out), 2);
    CHECK_EQ_I(out[0].id, 2);
    CHECK_EQ_I(out[1].id, 0); /* -inf tie with the NaN: smaller id wins */
}

/* ==== attention ============================================================ */

static void ref_attend(const float *q, uint32_t T, uint32_t Hq, uint32_t H, uint32_t D,
                       const float *k, const float *v, size_t R, double scale, double *out,
                       double *lse)
{
    const uint32_t G = Hq / H;
    double *lg = malloc((R + 1) * sizeof(double));
    for (uint32_t t = 0; t < T; t++)
        for (uint32_t j = 0; j < Hq; j++) {
            const float *qq = q + ((size_t)t * Hq + j) * D;
            double *o = out + ((size_t)t * Hq + j) * D;
            double mx = -INFINITY;
            for (size_t r = 0; r < R; r++) {
                const float *kk = k + (r * H + j / G) * D;
                double s = 0;
                for (uint32_t d = 0; d < D; d++) s += (double)qq[d] * kk[d];
                lg[r] = scale * s;
                mx = fmax(mx, lg[r]);
            }
            double sum = 0;
            for (size_t r = 0; r < R; r++) sum += exp(lg[r] - mx);
            for (uint32_t d = 0; d < D; d++) o[d] = 0;
            for (size_t r = 0; r < R; r++) {
                double w = exp(lg[r] - mx) / sum;
                const float *vv = v + (r * H + j / G) * D;
                for (uint32_t d = 0; d < D; d++) o[d] += w * vv[d];
            }
            lse[(size_t)t * Hq + j] = R ? mx + log(sum) : -INFINITY;
        }
    free(lg);
}

TEST(attend)
{
    msa_idx_pool_t *pool;
    CHECK_EQ_I(msa_idx_pool_create(3, &pool), MSA_OK);
    static const size_t Rs[] = {0, 1, 7, 100, 1000};
    static const uint32_t Ds[] = {1, 17, 64, 128};
    for (int it = 0; it < 24; it++) {
        const uint32_t H = pick((const uint32_t[]){1, 2, 8}, 3);
        const uint32_t Hq = H * pick((const uint32_t[]){1, 4, 12}, 3);
        const uint32_t T = pick((const uint32_t[]){1, 3}, 2), D = pick(Ds, 4);
        const size_t R = Rs[it % 5];
        /* Half the runs with large logits (|logit| up to ~1e3). */
        const float scale = it % 2 ? 1.0f / sqrtf((float)D) : 300.0f;
        float *q = malloc((size_t)T * Hq * D * sizeof(float));
        float *k = malloc((R * H * D + 1) * sizeof(float));
        float *v = malloc((R * H * D + 1) * sizeof(float));
        for (size_t i = 0; i < (size_t)T * Hq * D; i++) q[i] = (float)urand();
        for (size_t i = 0; i < R * H * D; i++) {
            k[i] = (float)urand() / sqrtf((float)D);
            v[i] = (float)urand();
        }
        double *ro = malloc((size_t)T * Hq * D * sizeof(double));
        double *rl = malloc((size_t)T * Hq * sizeof(double));
        float *o = malloc((size_t)T * Hq * D * sizeof(float));
        float *l = malloc((size_t)T * Hq * sizeof(float));
        ref_attend(q, T, Hq, H, D, k, v, R, scale, ro, rl);
        for (int use_pool = 0; use_pool < 2; use_pool++) {
            memset(o, 0xff, (size_t)T * Hq * D * sizeof(float)); /* NaN fill */
            CHECK_RC(msa_idx_attend(q, T, Hq, H, D, k, v, R, scale, o, l, use_pool ? pool : NULL),
                     MSA_OK);
            for (size_t i = 0; i < (size_t)T * Hq; i++) {
                if (R == 0)
                    CHECK(l[i] == -INFINITY);
                else
                    CHECK_NEAR_MSG(l[i], rl[i], 2e-5 * (1 + fabs(rl[i])) + 2e-6 * fabs(scale),
                                   "lse i=%zu R=%zu D=%u", i, R, D);
                for (uint32_t d = 0; d < D; d++)
                    CHECK_NEAR_MSG(o[i * D + d], ro[i * D + d], 1e-4 + 2e-6 * fabs(scale),
                                   "out i=%zu d=%u R=%zu D=%u scale=%g", i, d, R, D, scale);
            }
        }
        free(q);
        free(k);
        free(v);
        free(ro);
        free(rl);
        free(o);
        free(l);
    }
    msa_idx_pool_destroy(pool);
}

/* ==== pool ================================================================= */

typedef struct {
    atomic_int *hits;
    unsigned maxw;
    atomic_int bad;
    msa_idx_pool_t *pool;
    int nested;
} pool_arg_t;

static void pool_fn(void *arg, size_t task, unsigned worker)
{
    pool_arg_t *a = arg;
    atomic_fetch_add(&a->hits[task], 1);
    if (worker > a->maxw) atomic_fetch_add(&a->bad, 1);
    if (a->nested && task % 97 == 0) {
        /* A task that runs a job of its own on the same pool. */
        atomic_int h2[13] = {0};
        pool_arg_t b = {.hits = h2, .maxw = a->maxw};
        atomic_init(&b.bad, 0);
        msa_idx_pool_run(a->pool, 13, pool_fn, &b);
        for (int i = 0; i < 13; i++)
            if (atomic_load(&h2[i]) != 1) atomic_fetch_add(&a->bad, 1);
        atomic_fetch_add(&a->bad, atomic_load(&b.bad));
    }
}

typedef struct {
    msa_idx_pool_t *pool;
    int errors;
} caller_t;

static void *caller_main(void *arg)
{
    caller_t *c = arg;
    uint64_t seed = (uint64_t)(uintptr_t)c * 2654435761u + 1; /* per thread */
    for (int rep = 0; rep < 100; rep++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        size_t n = 1 + (seed >> 33) % 500;
        atomic_int *hits = calloc(n, sizeof *hits);
        pool_arg_t a = {.hits = hits,
                        .maxw = msa_idx_pool_size(c->pool),
                        .pool = c->pool,
                        .nested = rep % 10 == 0};
        atomic_init(&a.bad, 0);
        msa_idx_pool_run(c->pool, n, pool_fn, &a);
        for (size_t i = 0; i < n; i++)
            if (atomic_load(&hits[i]) != 1) c->errors++;
        c->errors += atomic_load(&a.bad);
        free(hits);
    }
    return NULL;
}

TEST(pool)
{
    msa_idx_pool_t *pool;
    CHECK_EQ_I(msa_idx_pool_create(3, &pool), MSA_OK);
    CHECK_EQ_I(msa_idx_pool_size(pool), 3);
    /* Many tasks from one caller: each runs exactly once, worker <= size. */
    const size_t n = 100000;
    atomic_int *hits = calloc(n, sizeof *hits);
    pool_arg_t a = {.hits = hits, .maxw = 3, .pool = pool};
    atomic_init(&a.bad, 0);
    msa_idx_pool_run(pool, n, pool_fn, &a);
    for (size_t i = 0; i < n; i++) CHECK_EQ_I(atomic_load(&hits[i]), 1);
    CHECK_EQ_I(atomic_load(&a.bad), 0);
    free(hits);
    /* Four concurrent callers, some with nested jobs. */
    pthread_t th[4];
    caller_t cs[4];
    for (int i = 0; i < 4; i++) {
        cs[i] = (caller_t){.pool = pool};
        CHECK_EQ_I(pthread_create(&th[i], NULL, caller_main, &cs[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        CHECK_EQ_I(cs[i].errors, 0);
    }
    msa_idx_pool_destroy(pool);
    /* NULL pool runs inline as worker 0. */
    atomic_int h1[5] = {0};
    pool_arg_t b = {.hits = h1, .maxw = 0};
    atomic_init(&b.bad, 0);
    msa_idx_pool_run(NULL, 5, pool_fn, &b);
    for (int i = 0; i < 5; i++) CHECK_EQ_I(atomic_load(&h1[i]), 1);
    CHECK_EQ_I(atomic_load(&b.bad), 0);
    msa_idx_pool_destroy(NULL);
}

/* ==== main ================================================================= */

static const msa_test_t tests[] = {
    TEST_ENTRY(isa),    TEST_ENTRY(scorer_einval), TEST_ENTRY(zero_query), TEST_ENTRY(nan),
    TEST_ENTRY(scores), TEST_ENTRY(topk),          TEST_ENTRY(attend),     TEST_ENTRY(pool),
};

int main(int argc, char **argv)
{
    return msa_test_run(tests, sizeof tests / sizeof tests[0], argc, argv);
}
