/* test_gpu_attend.c — the device attention (dev.h msa_dev_attend; on CUDA the
 * kernels of gpu/attend.cu) against an independent float64 reference
 * written here (not msa_idx_attend), through the public device API: open,
 * lane, h2d of q and K/V blocks, attend, d2h, sync.
 *
 *   test_gpu_attend [case...]       the CUDA device (exit 77 without one)
 *   test_gpu_attend sim [case...]   the simulated device (dev_sim.c)
 *
 * Shapes: T = 1..70, GQA group G = Hq/H of 1..4 (and 4 at Hq = 32), D in
 * {3, 32, 64, 100, 101, 128, 256}; K/V in several separately allocated blocks
 * of different sizes, including blocks of 0 rows (NULL pointers), R = 0 and no
 * blocks at all; dtypes F32/F16/BF16 (inputs are rounded to the dtype here, so
 * the reference sees exactly what the device sees); logits of several hundred
 * (positive and all-negative: a kernel that does not subtract the running
 * max overflows or underflows); the work space full, absent (one split) and
 * small (a few splits).
 *
 * Tolerance. The device computes in float32. A logit is a D-term dot product:
 * its rounding error is at most about D * 2^-24 * B, where B = scale * sum_d
 * |q_d k_d| bounds it; we allow e = 1e-5 * B (D <= 256 makes the worst case
 * 1.5e-5 B, the typical one ~ sqrt(D) * 6e-8 B = 1e-6 B). An error e in the
 * logits moves lse by at most e and the softmax weights by a factor e^(+-e),
 * hence out by at most about 2e * max|V|. On top, the sums over R <= ~4000
 * rows in float32 allow a relative 1e-4. So:
 *   |lse - ref| <= 2e + 1e-4,   |out - ref| <= (2e + 1e-4) * max|V| + 1e-6.
 * With R = 0 the results must be exact: lse = -inf, out = 0. Output buffers
 * carry a guard tail that must stay untouched.
 */
/* A failed check must not skip the cleanup (an unreleased lane would hang the
 * next case): checks are counted and the case carries on. */
#define MSA_TEST_KEEP_GOING
#include "harness.h"

#include "dev.h"
#include "tensor.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BLOCKS 8
#define GUARD 64 /* floats after out and lse that must stay untouched */
#define SENTINEL 7777.0f
#define LANE_SCRATCH ((size_t)64 << 20) /* work space of the lane */

static bool g_sim; /* testing the simulated device */
static msa_dev_t *g_dev;

typedef enum { WORK_FULL = 0, WORK_NONE, WORK_SMALL } work_mode_t;

typedef struct attend_case {
    uint32_t T, Hq, H, D;
    msa_dtype_t dt;
    int nb; /* blocks (may be 0) */
    uint32_t rows[MAX_BLOCKS];
    float amp;         /* |q|, |k| up to amp (1 unless testing big logits) */
    bool all_negative; /* q >= 0, k <= 0: every logit is very negative */
    float scale;       /* 0: 1/sqrt(D) */
    work_mode_t work;
} attend_case_t;

/* xorshift64*: deterministic randomness in [-1, 1). */
static uint64_t g_rng = 88172645463325252ULL;
static double urand(void)
{
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return (double)((g_rng * 0x2545f4914f6cdd1dULL) >> 11) / 4503599627370496.0 - 1.0;
}

/* Rounds n float32 values to dt in place and writes the dt encoding to enc. */
static void round_to(msa_dtype_t dt, float *x, size_t n, void *enc)
{
    msa_tensor_from_f32(dt, x, n, enc);
    msa_tensor_to_f32(dt, enc, n, x);
}

/* ---- the float64 reference ------------------------------------------------------ */

/* k, v: [R][H][D] float32 (already rounded to the dtype). Writes ref_out
 * [T][Hq][D], ref_lse [T][Hq], and per (t, j) the logit bound B = scale *
 * max_r sum_d |q_d k_d| and vmax = max |V| over its kv head's rows. */
static void reference(const attend_case_t *c, float scale, const float *q, const float *k,
                      const float *v, size_t R, double *ref_out, double *ref_lse, double *bound,
                      double *vmax)
{
    const uint32_t T = c->T, Hq = c->Hq, H = c->H, D = c->D, G = Hq / H;
    double *logit = malloc((R ? R : 1) * sizeof *logit);
    for (uint32_t t = 0; t < T; t++) {
        for (uint32_t j = 0; j < Hq; j++) {
            const uint32_t h = j / G;
            const float *qv = q + ((size_t)t * Hq + j) * D;
            const size_t o = (size_t)t * Hq + j;
            double m = -INFINITY, B = 0.0, vm = 0.0;
            for (size_t r = 0; r < R; r++) {
                const float *kr = k + (r * H + h) * D;
                double dot = 0.0, absdot = 0.0;
                for (uint32_t d = 0; d < D; d++) {
                    dot += (double)qv[d] * kr[d];
                    absdot += fabs((double)qv[d] * kr[d]);
                }
                logit[r] = (double)scale * dot;
                m = logit[r] > m ? logit[r] : m;
                B = fabs(scale) * absdot > B ? fabs(scale) * absdot : B;
                for (uint32_t d = 0; d < D; d++) {
                    double a = fabs((double)v[(r * H + h) * D + d]);
                    vm = a > vm ? a : vm;
                }
            }
            bound[o] = B;
            vmax[o] = vm;
            double *out = ref_out + o * D;
            for (uint32_t d = 0; d < D; d++) out[d] = 0.0;
            if (R == 0) {
                ref_lse[o] = -INFINITY;
                continue;
            }
            double sum = 0.0;
            for (size_t r = 0; r < R; r++) {
                const double p = exp(logit[r] - m);
                sum += p;
                const float *vr = v + (r * H + h) * D;
                for (uint32_t d = 0; d < D; d++) out[d] += p * vr[d];
            }
            for (uint32_t d = 0; d < D; d++) out[d] /= sum;
            ref_lse[o] = m + log(sum);
        }
    }
    free(logit);
}

/* ---- one case through the device API ------------------------------------------- */

static void *dmalloc(size_t bytes)
{
    void *p = NULL;
    int rc = msa_dev_malloc(g_dev, bytes, &p);
    CHECK_MSG(rc == MSA_OK && p, "msa_dev_malloc(%zu): %s", bytes, msa_errname(rc));
    return rc == MSA_OK ? p : NULL;
}

/* Runs one case; failures are reported through the harness. */
static void run_case(const attend_case_t *c, const char *name)
{
    const uint32_t T = c->T, Hq = c->Hq, H = c->H, D = c->D;
    const size_t TH = (size_t)T * Hq, esz = msa_dtype_size(c->dt), w = (size_t)H * D;
    const float scale = c->scale != 0.0f ? c->scale : 1.0f / sqrtf((float)D);
    size_t R = 0;
    for (int b = 0; b < c->nb; b++) R += c->rows[b];

    /* Host inputs: q float32; K/V rounded to the dtype, encoded per block and
     * concatenated as float32 for the reference. */
    float *q = malloc(TH * D * sizeof *q);
    float *k = malloc((R ? R : 1) * w * sizeof *k), *v = malloc((R ? R : 1) * w * sizeof *v);
    void *enc_k = malloc((R ? R : 1) * w * esz), *enc_v = malloc((R ? R : 1) * w * esz);
    float *out = malloc((TH * D + GUARD) * sizeof *out), *lse = malloc((TH + GUARD) * sizeof *lse);
    double *ref_out = malloc(TH * D * sizeof *ref_out), *ref_lse = malloc(TH * sizeof *ref_lse);
    double *bound = malloc(TH * sizeof *bound), *vmax = malloc(TH * sizeof *vmax);
    if (!(q && k && v && enc_k && enc_v && out && lse && ref_out && ref_lse && bound && vmax)) {
        FAILF("%s: out of host memory", name);
        goto free_host;
    }
    for (size_t i = 0; i < TH * D; i++) {
        q[i] = (float)(c->amp * urand());
        if (c->all_negative) q[i] = fabsf(q[i]);
    }
    for (size_t i = 0; i < R * w; i++) {
        k[i] = (float)(c->amp * urand());
        if (c->all_negative) k[i] = -fabsf(k[i]);
        v[i] = (float)urand();
    }
    round_to(c->dt, k, R * w, enc_k);
    round_to(c->dt, v, R * w, enc_v);
    for (size_t i = 0; i < TH * D + GUARD; i++) out[i] = SENTINEL;
    for (size_t i = 0; i < TH + GUARD; i++) lse[i] = SENTINEL;

    /* Device buffers: every block separately (not contiguous), 0-row blocks NULL. */
    msa_dev_lane_t *l = msa_dev_lane_acquire(g_dev);
    float *q_d = dmalloc(TH * D * sizeof(float) + 4);
    float *out_d = dmalloc((TH * D + GUARD) * sizeof(float));
    float *lse_d = dmalloc((TH + GUARD) * sizeof(float));
    msa_dev_kv_block_t blk[MAX_BLOCKS];
    msa_dev_kv_block_t *blk_d = dmalloc(sizeof blk);
    void *kb_d[MAX_BLOCKS] = {0}, *vb_d[MAX_BLOCKS] = {0};
    size_t row0 = 0;
    for (int b = 0; b < c->nb; b++) {
        const size_t n = (size_t)c->rows[b] * w * esz;
        if (n) {
            kb_d[b] = dmalloc(n);
            vb_d[b] = dmalloc(n);
            if (kb_d[b] && vb_d[b]) {
                CHECK_OK(msa_dev_h2d(l, kb_d[b], (char *)enc_k + row0 * w * esz, n));
                CHECK_OK(msa_dev_h2d(l, vb_d[b], (char *)enc_v + row0 * w * esz, n));
            }
        }
        blk[b] = (msa_dev_kv_block_t){.k = kb_d[b], .v = vb_d[b], .nrows = c->rows[b]};
        row0 += c->rows[b];
    }
    if (!q_d || !out_d || !lse_d || !blk_d) goto done;
    CHECK_OK(msa_dev_h2d(l, q_d, q, TH * D * sizeof(float)));
    CHECK_OK(msa_dev_h2d(l, blk_d, blk, sizeof blk));
    CHECK_OK(msa_dev_h2d(l, out_d, out, (TH * D + GUARD) * sizeof(float)));
    CHECK_OK(msa_dev_h2d(l, lse_d, lse, (TH + GUARD) * sizeof(float)));

    size_t scratch_bytes = 0;
    void *scratch = msa_dev_lane_scratch(l, &scratch_bytes);
    msa_dev_attend_args_t a = {
        .q = q_d,
        .T = T,
        .Hq = Hq,
        .H = H,
        .D = D,
        .scale = scale,
        .kv_dtype = c->dt,
        .blocks = c->nb ? blk_d : NULL,
        .n_blocks = (uint32_t)c->nb,
        .out = out_d,
        .lse = lse_d,
        .work = scratch,
        .work_bytes = scratch_bytes,
    };
    if (c->work == WORK_NONE) {
        a.work = NULL;
        a.work_bytes = 0;
    } else if (c->work == WORK_SMALL) {
        /* About three splits' partials (acc, max, sum per query vector). */
        size_t small = 3 * TH * (D + 2) * sizeof(float) + 100;
        a.work_bytes = small < scratch_bytes ? small : scratch_bytes;
    }
    int rc = msa_dev_attend(l, &a);
    CHECK_MSG(rc == MSA_OK, "%s: attend: %s", name, msa_errname(rc));
    CHECK_OK(msa_dev_d2h(l, out, out_d, (TH * D + GUARD) * sizeof(float)));
    CHECK_OK(msa_dev_d2h(l, lse, lse_d, (TH + GUARD) * sizeof(float)));
    CHECK_OK(msa_dev_lane_sync(l));
    if (rc != MSA_OK) goto done;

    reference(c, scale, q, k, v, R, ref_out, ref_lse, bound, vmax);
    int bad = 0;
    for (size_t o = 0; o < TH && bad < 5; o++) {
        const size_t t = o / Hq, j = o % Hq;
        if (R == 0) {
            CHECK_MSG(isinf(lse[o]) && lse[o] < 0, "%s: R=0 lse[t=%zu][j=%zu] = %g, want -inf",
                      name, t, j, lse[o]);
            for (uint32_t d = 0; d < D; d++)
                if (out[o * D + d] != 0.0f) {
                    FAILF("%s: R=0 out[t=%zu][j=%zu][%u] = %g, want 0", name, t, j, d,
                          out[o * D + d]);
                    bad++;
                    break;
                }
            continue;
        }
        const double e = 1e-5 * bound[o];
        const double tol_lse = 2 * e + 1e-4, tol_out = (2 * e + 1e-4) * vmax[o] + 1e-6;
        if (!(fabs(lse[o] - ref_lse[o]) <= tol_lse)) {
            FAILF("%s: lse[t=%zu][j=%zu] = %.9g, want %.9g (tol %.3g)", name, t, j, lse[o],
                  ref_lse[o], tol_lse);
            bad++;
        }
        for (uint32_t d = 0; d < D; d++) {
            if (!(fabs(out[o * D + d] - ref_out[o * D + d]) <= tol_out)) {
                FAILF("%s: out[t=%zu][j=%zu][%u] = %.9g, want %.9g (tol %.3g)", name, t, j, d,
                      out[o * D + d], ref_out[o * D + d], tol_out);
                bad++;
                break;
            }
        }
    }
    for (size_t i = 0; i < GUARD; i++) {
        if (out[TH * D + i] != SENTINEL || lse[TH + i] != SENTINEL) {
            FAILF("%s: wrote past the end of out or lse (guard %zu)", name, i);
            break;
        }
    }
    MSA_TEST_COUNT_();

done:
    for (int b = 0; b < c->nb; b++) {
        msa_dev_free(g_dev, kb_d[b]);
        msa_dev_free(g_dev, vb_d[b]);
    }
    msa_dev_free(g_dev, blk_d);
    msa_dev_free(g_dev, lse_d);
    msa_dev_free(g_dev, out_d);
    msa_dev_free(g_dev, q_d);
    msa_dev_lane_release(l);
free_host:
    free(vmax);
    free(bound);
    free(ref_lse);
    free(ref_out);
    free(lse);
    free(out);
    free(enc_v);
    free(enc_k);
    free(v);
    free(k);
    free(q);
}

static void run_cases(const attend_case_t *cs, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char name[128];
        const attend_case_t *c = &cs[i];
        snprintf(name, sizeof name, "case %zu (T=%u Hq=%u H=%u D=%u %s, %d blocks%s)", i, c->T,
                 c->Hq, c->H, c->D, msa_dtype_name(c->dt), c->nb,
                 c->work == WORK_NONE    ? ", no work"
                 : c->work == WORK_SMALL ? ", small work"
                                         : "");
        int before = __atomic_load_n(&msa_test_nfail, __ATOMIC_SEQ_CST);
        run_case(c, name);
        if (__atomic_load_n(&msa_test_nfail, __ATOMIC_SEQ_CST) != before) return;
    }
}

#define NCASES(a) (sizeof(a) / sizeof((a)[0]))

/* ---- cases ------------------------------------------------------------------------ */

TEST(shapes_f32)
{
    static const attend_case_t cs[] = {
        {1, 1, 1, 64, MSA_DT_F32, 1, {10}, 1, false, 0, WORK_FULL},
        {3, 4, 2, 3, MSA_DT_F32, 4, {1, 0, 7, 33}, 1, false, 0, WORK_FULL},
        {70, 4, 1, 64, MSA_DT_F32, 3, {40, 0, 90}, 1, false, 0, WORK_FULL},
        {17, 8, 2, 101, MSA_DT_F32, 2, {31, 65}, 1, false, 0, WORK_FULL},
        {33, 3, 3, 32, MSA_DT_F32, 5, {1, 1, 1, 0, 64}, 1, false, 0.5f, WORK_FULL},
        {2, 2, 2, 256, MSA_DT_F32, 2, {33, 96}, 1, false, 0, WORK_FULL},
    };
    run_cases(cs, NCASES(cs));
}

TEST(shapes_f16)
{
    static const attend_case_t cs[] = {
        {5, 8, 2, 100, MSA_DT_F16, 4, {0, 50, 64, 1}, 1, false, 0, WORK_FULL},
        {1, 3, 1, 3, MSA_DT_F16, 1, {1}, 1, false, 0, WORK_FULL},
        {64, 4, 4, 128, MSA_DT_F16, 3, {100, 0, 28}, 1, false, 0, WORK_FULL},
        {9, 6, 2, 256, MSA_DT_F16, 3, {70, 1, 300}, 1, false, 0, WORK_FULL},
        {17, 8, 2, 101, MSA_DT_F16, 2, {300, 11}, 1, false, 0, WORK_NONE},
    };
    run_cases(cs, NCASES(cs));
}

TEST(shapes_bf16)
{
    static const attend_case_t cs[] = {
        {70, 6, 3, 128, MSA_DT_BF16, 6, {300, 0, 129, 31, 32, 33}, 1, false, 0, WORK_FULL},
        {2, 3, 1, 256, MSA_DT_BF16, 2, {200, 77}, 1, false, 0, WORK_FULL},
        {4, 4, 1, 64, MSA_DT_BF16, 8, {1, 2, 3, 4, 5, 6, 7, 8}, 1, false, 0, WORK_FULL},
        {1, 2, 2, 3, MSA_DT_BF16, 2, {0, 500}, 1, false, 0, WORK_SMALL},
    };
    run_cases(cs, NCASES(cs));
}

/* MSA-like decode and prefill shapes: Hq = 32, H = 8, D = 128, thousands of
 * rows, so the rows are split across many thread blocks; also with the work
 * space absent (one split) and small (a few splits). */
TEST(many_rows_and_splits)
{
    static const attend_case_t cs[] = {
        {1, 32, 8, 128, MSA_DT_BF16, 4, {2000, 1500, 0, 517}, 1, false, 0, WORK_FULL},
        {1, 32, 8, 128, MSA_DT_BF16, 4, {2000, 1500, 0, 517}, 1, false, 0, WORK_NONE},
        {1, 32, 8, 128, MSA_DT_F16, 4, {2000, 1500, 0, 517}, 1, false, 0, WORK_SMALL},
        {64, 32, 8, 128, MSA_DT_BF16, 4, {1000, 1000, 37, 1}, 1, false, 0, WORK_FULL},
        {3, 8, 8, 64, MSA_DT_F32, 1, {4000}, 1, false, 0, WORK_FULL},
    };
    run_cases(cs, NCASES(cs));
}

TEST(no_rows)
{
    static const attend_case_t cs[] = {
        {4, 4, 4, 64, MSA_DT_F32, 3, {0, 0, 0}, 1, false, 0, WORK_FULL},
        {4, 4, 4, 64, MSA_DT_F32, 3, {0, 0, 0}, 1, false, 0, WORK_NONE},
        {2, 2, 1, 128, MSA_DT_F16, 0, {0}, 1, false, 0, WORK_FULL},
        {70, 8, 2, 3, MSA_DT_BF16, 1, {0}, 1, false, 0, WORK_SMALL},
    };
    run_cases(cs, NCASES(cs));
}

/* Logits of several hundred: exp() of one overflows float32 (above ~88), and
 * with all of them very negative exp() underflows to 0; only a kernel that
 * subtracts the running max gets either right. */
TEST(large_logits)
{
    static const attend_case_t cs[] = {
        {3, 4, 2, 64, MSA_DT_F32, 3, {50, 0, 77}, 10, false, 1.0f, WORK_FULL},
        {3, 4, 2, 64, MSA_DT_F32, 3, {50, 0, 77}, 10, false, 1.0f, WORK_NONE},
        {5, 4, 1, 100, MSA_DT_F16, 2, {60, 900}, 10, true, 1.0f, WORK_FULL},
        {2, 8, 4, 128, MSA_DT_BF16, 2, {1000, 24}, 10, true, 1.0f, WORK_SMALL},
        {2, 8, 4, 128, MSA_DT_BF16, 2, {1000, 24}, 10, false, 1.0f, WORK_FULL},
    };
    run_cases(cs, NCASES(cs));
}

/* Shapes the device must refuse without crashing. CUDA only, and last in the
 * table: the simulated device takes the CPU kernel's path, which treats them
 * as bugs, so main leaves this case out with "sim". */
TEST(bad_shapes)
{
    msa_dev_lane_t *l = msa_dev_lane_acquire(g_dev);
    float *buf = dmalloc(1 << 16);
    if (!buf) {
        msa_dev_lane_release(l);
        return;
    }
    msa_dev_attend_args_t a = {
        .q = buf,
        .T = 1,
        .Hq = 2,
        .H = 1,
        .D = 257,
        .scale = 1.0f,
        .kv_dtype = MSA_DT_F32,
        .blocks = NULL,
        .n_blocks = 0,
        .out = buf + 1024,
        .lse = buf + 4096,
    };
    CHECK_RC(msa_dev_attend(l, &a), MSA_EINVAL); /* D > 256 */
    a.D = 0;
    CHECK_RC(msa_dev_attend(l, &a), MSA_EINVAL);
    a.D = 64;
    a.H = 0;
    CHECK_RC(msa_dev_attend(l, &a), MSA_EINVAL);
    a.H = 3; /* Hq = 2 is not a multiple */
    CHECK_RC(msa_dev_attend(l, &a), MSA_EINVAL);
    a.H = 1;
    a.kv_dtype = MSA_DT_I8;
    CHECK_RC(msa_dev_attend(l, &a), MSA_EINVAL);
    a.kv_dtype = MSA_DT_F32;
    a.n_blocks = 1; /* blocks NULL */
    CHECK_RC(msa_dev_attend(l, &a), MSA_EINVAL);
    a.n_blocks = 0;
    CHECK_OK(msa_dev_attend(l, &a)); /* R = 0 is fine */
    CHECK_OK(msa_dev_lane_sync(l));
    msa_dev_free(g_dev, buf);
    msa_dev_lane_release(l);
}

static const msa_test_t tests[] = {
    TEST_ENTRY(shapes_f32),           TEST_ENTRY(shapes_f16), TEST_ENTRY(shapes_bf16),
    TEST_ENTRY(many_rows_and_splits), TEST_ENTRY(no_rows),    TEST_ENTRY(large_logits),
    TEST_ENTRY(bad_shapes),
};

int main(int argc, char **argv)
{
    /* "sim" as the first argument picks the simulated device; the remaining
     * arguments name cases, as usual. */
    if (argc > 1 && strcmp(argv[1], "sim") == 0) {
        g_sim = true;
        argv[1] = argv[0];
        argv++;
        argc--;
    }
    msa_dev_config_t cfg; /* MSA_GPU_SYNC_CHECK=1 etc. still apply */
    msa_dev_config_env(&cfg);
    cfg.sim = g_sim;
    char why[256] = "";
    if (msa_dev_count(&cfg, why, sizeof why) <= 0) {
        printf("skipped: no %s device (%s)\n", g_sim ? "simulated" : "CUDA", why);
        return 77;
    }
    int rc = msa_dev_open(&cfg, 0, 1, LANE_SCRATCH, 1 << 20, &g_dev);
    if (rc != MSA_OK) {
        fprintf(stderr, "msa_dev_open(%s, 0): %s\n", g_sim ? "sim" : "cuda", msa_errname(rc));
        return 1;
    }
    msa_dev_info_t info;
    msa_dev_get_info(g_dev, &info);
    printf("device: %s%s\n", info.name, info.sim ? " (simulated)" : "");
    rc = msa_test_run(tests, NCASES(tests) - (g_sim ? 1 : 0), argc, argv);
    msa_dev_close(g_dev);
    return rc;
}
