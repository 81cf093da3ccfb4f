/* bench_gpu_route.c — routing on the CUDA device through gpu/dev.h at MSA-4B
 * shapes (18 layers, H = 8 kv heads, Hq = 32, D = 128, P = 64 tokens per
 * router row): score + select top-16 per layer, against the HBM read floor
 * measured in the same run.
 *
 *   bench_gpu_route [--quick]     (--quick skips 100M tokens)
 *
 * Exits 77 without a CUDA device. Prints human-readable lines and, per
 * measurement, one line "JSON {...}" for scripts.
 *
 * What is measured:
 *   - HBM read bandwidth: a read-reduce kernel (16-byte loads, xor-reduced)
 *     over a 2 GiB buffer, best of 5; floor(ms) = key bytes / that bandwidth.
 *   - 10M tokens (156,250 rows per layer, 320 MB BF16 per layer): 18 separate
 *     layer buffers generated on the device. 100M tokens (1,562,500 rows, 3.2 GB
 *     per layer, 57.6 GB in all): ONE layer buffer generated once and scored 18
 *     times (same bytes moved per layer; L2 is far smaller than a layer).
 *   - Plans: LINEAR (HEAD_MEAN + QUERY_MEAN: one folded column per head, fused
 *     kernel) and MAXVEC (HEAD_MEAN + QUERY_MAX, T = 64 columns: GEMM path).
 *   - Documents of 1 row (one entry per row) and of 16 rows.
 *   - Concurrency (10M, LINEAR): 8 host threads each on its own lane vs one
 *     query, and nq = 8 queries batched into one score pass.
 *   - I8 keys quantised on the device from the same F32 keys as the BF16
 *     ones: time vs BF16 (LINEAR) and recall@16 of I8 and BF16 vs F32 scoring.
 *   - Fused vs GEMM crossover on one 10M layer (MAXVEC, ncol 1..64): two
 *     opens of the device with gemm_min_cols = 1e9 (fused; generic beyond
 *     16 columns) and = 1 (GEMM).
 */
#include "dev.h"
#include "msa_clock.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef MSA_HAVE_CUDA
int main(void)
{
    printf("skipped: built without CUDA\n");
    return 77;
}
#else
#include "dev_cuda_impl.h"

#include <pthread.h>
#include <time.h>

#define LAYERS 18
#define NH 8
#define HD 128
#define RW (NH * HD)
#define TQ 64
#define TOPK 16
#define NTHREADS 8

static double g_bw; /* GB/s */

static double now_ms(void)
{
    return (double)msa_clock_ns() * 1e-6;
}

#define TRY(expr)                                                                            \
    do {                                                                                     \
        int rc_ = (expr);                                                                    \
        if (rc_ != MSA_OK) {                                                                 \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, msa_errname(rc_)); \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

static void *dmalloc(msa_dev_t *d, size_t n)
{
    void *p = NULL;
    TRY(msa_dev_malloc(d, n, &p));
    return p;
}

/* Host-random query columns (uniform [-1, 1)) uploaded to the device. */
static float *make_cols(msa_dev_t *d, msa_dev_lane_t *l, size_t n, uint64_t seed)
{
    float *h = malloc(n * sizeof *h), *dv = dmalloc(d, n * sizeof *h);
    uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        h[i] = (float)((double)(s >> 11) / 4503599627370496.0 - 1.0);
    }
    TRY(msa_dev_h2d(l, dv, h, n * sizeof *h));
    TRY(msa_dev_lane_sync(l));
    free(h);
    return dv;
}

static msa_dev_entry_t *make_entries(msa_dev_t *d, msa_dev_lane_t *l, uint32_t rows, uint32_t ds,
                                     uint32_t *n_ent)
{
    uint32_t n = (rows + ds - 1) / ds;
    msa_dev_entry_t *h = malloc((size_t)n * sizeof *h), *dv = dmalloc(d, (size_t)n * sizeof *h);
    for (uint32_t e = 0; e < n; e++) {
        uint32_t r0 = e * ds;
        h[e] = (msa_dev_entry_t){.doc = 1000 + e,
                                 .created = 0,
                                 .deleted = UINT64_MAX,
                                 .row0 = r0,
                                 .nrows = rows - r0 < ds ? rows - r0 : ds};
    }
    TRY(msa_dev_h2d(l, dv, h, (size_t)n * sizeof *h));
    TRY(msa_dev_lane_sync(l));
    free(h);
    *n_ent = n;
    return dv;
}

/* One query (or nq batched) over all layers: score + select top-16 per layer
 * per query. keys[L] (L < LAYERS) may repeat one buffer. */
typedef struct {
    msa_dev_t *dev;
    msa_dev_lane_t *lane; /* NULL: acquire one */
    const void *const *keys;
    const float *const *scales;
    msa_dtype_t dt;
    uint32_t rows;
    msa_dev_plan_t plan;
    uint32_t ncol, nq;
    const float *cols;
    const msa_dev_entry_t *ent;
    uint32_t n_ent;
    float *scores; /* [nq][rows] */
    void *sel_work;
    size_t sel_bytes;
    msa_idx_hit_t hits[LAYERS][TOPK]; /* query 0's hits per layer */
    double ms;
} query_t;

static void run_query(query_t *q)
{
    msa_dev_lane_t *l = q->lane ? q->lane : msa_dev_lane_acquire(q->dev);
    size_t wb;
    void *work = msa_dev_lane_scratch(l, &wb);
    double t0 = now_ms();
    for (int L = 0; L < LAYERS; L++) {
        msa_dev_score_args_t a = {.keys = q->keys[L],
                                  .scales = q->scales ? q->scales[L] : NULL,
                                  .key_dtype = q->dt,
                                  .nrows = q->rows,
                                  .H = NH,
                                  .D = HD,
                                  .plan = q->plan,
                                  .ncol = q->ncol,
                                  .G = 1,
                                  .query_reduce = MSA_QUERY_MAX,
                                  .cols = q->cols,
                                  .nq = q->nq,
                                  .scores = q->scores,
                                  .ld = q->rows,
                                  .work = work,
                                  .work_bytes = wb};
        TRY(msa_dev_score(l, &a));
        for (uint32_t i = 0; i < q->nq; i++) {
            msa_idx_hit_t hits[TOPK];
            uint32_t n = 0;
            msa_dev_select_args_t s = {.scores = q->scores + (size_t)i * q->rows,
                                       .ent = q->ent,
                                       .n_ent = q->n_ent,
                                       .snapshot = 1,
                                       .top_k = TOPK,
                                       .work = q->sel_work,
                                       .work_bytes = q->sel_bytes,
                                       .out = hits,
                                       .n_out = &n};
            TRY(msa_dev_select(l, &s));
            if (i == 0) memcpy(q->hits[L], hits, sizeof hits);
        }
    }
    TRY(msa_dev_lane_sync(l));
    q->ms = now_ms() - t0;
    if (!q->lane) msa_dev_lane_release(l);
}

/* Best of reps after one warm-up. */
static double time_query(query_t *q, int reps)
{
    run_query(q);
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        run_query(q);
        if (q->ms < best) best = q->ms;
    }
    q->ms = best;
    return best;
}

static void report(const char *what, const char *tokens, const char *plan, const char *dt,
                   uint32_t ds, uint32_t nq, double ms, double key_bytes)
{
    double floor_ms = key_bytes / (g_bw * 1e9) * 1e3;
    printf("%-26s tokens=%-5s plan=%-6s dt=%-4s rows/doc=%-2u nq=%u  %8.2f ms  floor %7.2f ms  "
           "ratio %.2f\n",
           what, tokens, plan, dt, ds, nq, ms, floor_ms, ms / floor_ms);
    printf("JSON {\"bench\":\"gpu_route\",\"what\":\"%s\",\"tokens\":\"%s\",\"plan\":\"%s\","
           "\"dtype\":\"%s\",\"rows_per_doc\":%u,\"nq\":%u,\"layers\":%d,\"ms\":%.4f,"
           "\"floor_ms\":%.4f,\"ratio\":%.3f,\"key_bytes\":%.0f,\"hbm_gbps\":%.1f}\n",
           what, tokens, plan, dt, ds, nq, LAYERS, ms, floor_ms, ms / floor_ms, key_bytes, g_bw);
    fflush(stdout);
}

typedef struct {
    query_t *q;
} thr_arg_t;
static void *thr_main(void *p)
{
    run_query(((thr_arg_t *)p)->q);
    return NULL;
}

static double recall(const msa_idx_hit_t (*a)[TOPK], const msa_idx_hit_t (*b)[TOPK])
{
    double tot = 0;
    for (int L = 0; L < LAYERS; L++) {
        int hit = 0;
        for (int i = 0; i < TOPK; i++)
            for (int j = 0; j < TOPK; j++) hit += a[L][i].id == b[L][j].id;
        tot += hit / (double)TOPK;
    }
    return tot / LAYERS;
}

/* One token scale: the plan x rows/doc table, then (10M only) concurrency,
 * I8, and the crossover. */
static void run_scale(msa_dev_t *dev, msa_dev_t *dev_fused, msa_dev_t *dev_gemm, uint64_t tokens,
                      bool small)
{
    const uint32_t rows = (uint32_t)(tokens / 64);
    const char *tname = small ? "10M" : "100M";
    const size_t kb = (size_t)rows * RW * 2; /* BF16 bytes per layer */
    msa_dev_lane_t *l = msa_dev_lane_acquire(dev);
    const void *keys[LAYERS];
    void *bufs[LAYERS] = {0};
    float *f32[LAYERS] = {0};
    double t0 = now_ms();
    for (int L = 0; L < LAYERS; L++) {
        if (small || L == 0) {
            bufs[L] = dmalloc(dev, kb);
            if (small) {
                /* F32 first (kept for the I8 / recall part), BF16 from it. */
                f32[L] = dmalloc(dev, (size_t)rows * RW * 4);
                TRY(msa__cuda_fill_uniform(l, f32[L], (size_t)rows * RW, MSA_DT_F32, 77 + L, -1,
                                           1));
                TRY(msa__cuda_convert(l, f32[L], bufs[L], (size_t)rows * RW, MSA_DT_BF16));
            } else {
                TRY(msa__cuda_fill_uniform(l, bufs[L], (size_t)rows * RW, MSA_DT_BF16, 77, -1, 1));
            }
        }
        keys[L] = small ? bufs[L] : bufs[0];
    }
    TRY(msa_dev_lane_sync(l));
    printf("%s tokens: %u rows/layer, keys generated on the device in %.0f ms (%s)\n", tname, rows,
           now_ms() - t0, small ? "18 layer buffers" : "one 3.2 GB layer buffer reused 18 times");

    float *cols_lin = make_cols(dev, l, (size_t)NTHREADS * RW, 1);
    float *cols_max = make_cols(dev, l, (size_t)RW * TQ, 2);
    float *scores = dmalloc(dev, (size_t)NTHREADS * rows * sizeof(float));
    const size_t selb = msa_dev_select_work(rows, TOPK);
    void *selw = dmalloc(dev, selb);
    const double bytes_all = (double)kb * LAYERS;

    query_t *q = calloc(1, sizeof *q);
    const uint32_t dss[2] = {1, 16};
    msa_dev_entry_t *ents[2];
    uint32_t n_ents[2];
    for (int di = 0; di < 2; di++) ents[di] = make_entries(dev, l, rows, dss[di], &n_ents[di]);
    for (int di = 0; di < 2; di++) {
        for (int p = 0; p < 2; p++) {
            *q = (query_t){.dev = dev,
                           .lane = l,
                           .keys = keys,
                           .dt = MSA_DT_BF16,
                           .rows = rows,
                           .plan = p ? MSA_DEV_PLAN_MAXVEC : MSA_DEV_PLAN_LINEAR,
                           .ncol = p ? TQ : 1,
                           .nq = 1,
                           .cols = p ? cols_max : cols_lin,
                           .ent = ents[di],
                           .n_ent = n_ents[di],
                           .scores = scores,
                           .sel_work = selw,
                           .sel_bytes = selb};
            time_query(q, 3);
            report("score+select", tname, p ? "MAXVEC" : "LINEAR", "BF16", dss[di], 1, q->ms,
                   bytes_all);
        }
    }

    if (small) {
        /* ---- concurrency: 8 threads x own lane, vs nq = 8 batched ---- */
        query_t *qs = calloc(NTHREADS, sizeof *qs);
        float *sc8[NTHREADS];
        void *sw8[NTHREADS];
        for (int t = 0; t < NTHREADS; t++) {
            sc8[t] = dmalloc(dev, (size_t)rows * sizeof(float));
            sw8[t] = dmalloc(dev, selb);
            qs[t] = (query_t){.dev = dev,
                              .lane = NULL,
                              .keys = keys,
                              .dt = MSA_DT_BF16,
                              .rows = rows,
                              .plan = MSA_DEV_PLAN_LINEAR,
                              .ncol = 1,
                              .nq = 1,
                              .cols = cols_lin + (size_t)t * RW,
                              .ent = ents[0],
                              .n_ent = n_ents[0],
                              .scores = sc8[t],
                              .sel_work = sw8[t],
                              .sel_bytes = selb};
        }
        msa_dev_lane_release(l); /* the threads take lanes of their own */
        double best = 1e30;
        for (int rep = 0; rep < 3; rep++) {
            pthread_t th[NTHREADS];
            thr_arg_t ta[NTHREADS];
            double t1 = now_ms();
            for (int t = 0; t < NTHREADS; t++) {
                ta[t].q = &qs[t];
                pthread_create(&th[t], NULL, thr_main, &ta[t]);
            }
            for (int t = 0; t < NTHREADS; t++) pthread_join(th[t], NULL);
            double ms = now_ms() - t1;
            best = ms < best ? ms : best;
        }
        report("8 threads x 8 lanes", tname, "LINEAR", "BF16", 1, 8, best, bytes_all * NTHREADS);
        l = msa_dev_lane_acquire(dev);
        *q = (query_t){.dev = dev,
                       .lane = l,
                       .keys = keys,
                       .dt = MSA_DT_BF16,
                       .rows = rows,
                       .plan = MSA_DEV_PLAN_LINEAR,
                       .ncol = 1,
                       .nq = NTHREADS,
                       .cols = cols_lin,
                       .ent = ents[0],
                       .n_ent = n_ents[0],
                       .scores = scores,
                       .sel_work = selw,
                       .sel_bytes = selb};
        time_query(q, 3);
        report("nq=8 batched, one pass", tname, "LINEAR", "BF16", 1, 8, q->ms, bytes_all);
        for (int t = 0; t < NTHREADS; t++) {
            msa_dev_free(dev, sc8[t]);
            msa_dev_free(dev, sw8[t]);
        }
        free(qs);

        /* ---- I8 vs BF16 vs F32: time and recall@16 (LINEAR, 1 row/doc) ---- */
        void *i8[LAYERS];
        float *scl[LAYERS];
        for (int L = 0; L < LAYERS; L++) {
            i8[L] = dmalloc(dev, (size_t)rows * RW);
            scl[L] = dmalloc(dev, (size_t)rows * NH * sizeof(float));
            TRY(msa__cuda_quantize_i8(l, f32[L], rows, NH, HD, i8[L], scl[L]));
        }
        TRY(msa_dev_lane_sync(l));
        static msa_idx_hit_t h_f32[LAYERS][TOPK], h_bf16[LAYERS][TOPK], h_i8[LAYERS][TOPK];
        const msa_dtype_t dts[3] = {MSA_DT_F32, MSA_DT_BF16, MSA_DT_I8};
        const char *dn[3] = {"F32", "BF16", "I8"};
        const double esz[3] = {4, 2, 1 + 4.0 / HD};
        for (int t = 0; t < 3; t++) {
            *q = (query_t){.dev = dev,
                           .lane = l,
                           .keys = t == 0   ? (const void *const *)f32
                                   : t == 1 ? keys
                                            : (const void *const *)i8,
                           .scales = t == 2 ? (const float *const *)scl : NULL,
                           .dt = dts[t],
                           .rows = rows,
                           .plan = MSA_DEV_PLAN_LINEAR,
                           .ncol = 1,
                           .nq = 1,
                           .cols = cols_lin,
                           .ent = ents[0],
                           .n_ent = n_ents[0],
                           .scores = scores,
                           .sel_work = selw,
                           .sel_bytes = selb};
            time_query(q, 3);
            report("key dtype", tname, "LINEAR", dn[t], 1, 1, q->ms,
                   (double)rows * RW * esz[t] * LAYERS);
            memcpy(t == 0 ? h_f32 : t == 1 ? h_bf16 : h_i8, q->hits, sizeof h_f32);
        }
        double r_bf16 = recall(h_f32, h_bf16), r_i8 = recall(h_f32, h_i8);
        printf("recall@16 vs F32 (LINEAR, 18 layers): BF16 %.4f  I8 %.4f\n", r_bf16, r_i8);
        printf("JSON {\"bench\":\"gpu_route\",\"what\":\"recall@16 vs F32\",\"tokens\":\"%s\","
               "\"plan\":\"LINEAR\",\"bf16\":%.4f,\"i8\":%.4f}\n",
               tname, r_bf16, r_i8);
        for (int L = 0; L < LAYERS; L++) {
            msa_dev_free(dev, i8[L]);
            msa_dev_free(dev, scl[L]);
        }

        /* ---- crossover: fused vs GEMM, score only, one layer, MAXVEC ---- */
        const uint32_t ncs[7] = {1, 2, 4, 8, 16, 32, 64};
        msa_dev_t *ds2[2] = {dev_fused, dev_gemm};
        const char *pn[2] = {"fused", "gemm"};
        for (int c = 0; c < 7; c++) {
            double ms2[2];
            for (int p = 0; p < 2; p++) {
                msa_dev_lane_t *l2 = msa_dev_lane_acquire(ds2[p]);
                size_t wb;
                void *work = msa_dev_lane_scratch(l2, &wb);
                msa_dev_score_args_t a = {.keys = keys[0],
                                          .key_dtype = MSA_DT_BF16,
                                          .nrows = rows,
                                          .H = NH,
                                          .D = HD,
                                          .plan = MSA_DEV_PLAN_MAXVEC,
                                          .ncol = ncs[c],
                                          .G = 1,
                                          .query_reduce = MSA_QUERY_MAX,
                                          .cols = cols_max,
                                          .nq = 1,
                                          .scores = scores,
                                          .ld = rows,
                                          .work = work,
                                          .work_bytes = wb};
                double bst = 1e30;
                for (int rep = 0; rep < 6; rep++) {
                    double t1 = now_ms();
                    TRY(msa_dev_score(l2, &a));
                    TRY(msa_dev_lane_sync(l2));
                    double ms = now_ms() - t1;
                    if (rep && ms < bst) bst = ms;
                }
                ms2[p] = bst;
                msa_dev_lane_release(l2);
            }
            double floor_ms = (double)kb / (g_bw * 1e9) * 1e3;
            printf("crossover ncol=%-2u  fused%s %7.3f ms  gemm %7.3f ms  floor %.3f ms  -> %s\n",
                   ncs[c], ncs[c] > 16 ? "(generic)" : "", ms2[0], ms2[1], floor_ms,
                   ms2[0] <= ms2[1] ? pn[0] : pn[1]);
            printf("JSON {\"bench\":\"gpu_route\",\"what\":\"crossover\",\"tokens\":\"%s\","
                   "\"plan\":\"MAXVEC\",\"dtype\":\"BF16\",\"ncol\":%u,\"fused_ms\":%.4f,"
                   "\"gemm_ms\":%.4f,\"floor_ms\":%.4f,\"fused_is_generic\":%s}\n",
                   tname, ncs[c], ms2[0], ms2[1], floor_ms, ncs[c] > 16 ? "true" : "false");
            fflush(stdout);
        }
    }

    for (int di = 0; di < 2; di++) msa_dev_free(dev, ents[di]);
    msa_dev_free(dev, selw);
    msa_dev_free(dev, scores);
    msa_dev_free(dev, cols_max);
    msa_dev_free(dev, cols_lin);
    for (int L = 0; L < LAYERS; L++) {
        msa_dev_free(dev, bufs[L]);
        msa_dev_free(dev, f32[L]);
    }
    free(q);
    msa_dev_lane_release(l);
}

int main(int argc, char **argv)
{
    bool quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    char why[256] = "";
    msa_dev_config_t cfg; /* the CUDA device; MSA_GPU_SYNC_CHECK=1 still applies */
    msa_dev_config_env(&cfg);
    cfg.sim = false;
    if (msa_dev_count(&cfg, why, sizeof why) <= 0) {
        printf("skipped: no CUDA device (%s)\n", why);
        return 77;
    }
    const size_t scratch = 256u << 20;
    msa_dev_t *dev, *dev_fused, *dev_gemm;
    cfg.gemm_min_cols = 0; /* the default */
    TRY(msa_dev_open(&cfg, 0, NTHREADS, scratch, 1u << 20, &dev));
    cfg.gemm_min_cols = 1000000000;
    TRY(msa_dev_open(&cfg, 0, 1, scratch, 1u << 20, &dev_fused));
    cfg.gemm_min_cols = 1;
    TRY(msa_dev_open(&cfg, 0, 1, scratch, 1u << 20, &dev_gemm));
    msa_dev_info_t info;
    msa_dev_get_info(dev, &info);
    printf("device: %s, %.1f GiB (%.1f GiB free)\n", info.name, info.total_bytes / 1073741824.0,
           info.free_bytes / 1073741824.0);

    /* HBM read bandwidth: read-reduce kernel over 2 GiB, best of 5. */
    {
        const size_t n = (size_t)2 << 30;
        msa_dev_lane_t *l = msa_dev_lane_acquire(dev);
        void *buf = dmalloc(dev, n);
        TRY(msa__cuda_fill_uniform(l, buf, n / 4, MSA_DT_F32, 1, -1, 1));
        TRY(msa__cuda_read_bw(l, buf, n, 5, &g_bw));
        msa_dev_lane_release(l);
        msa_dev_free(dev, buf);
        printf("HBM read bandwidth (read-reduce kernel, 2 GiB, best of 5): %.1f GB/s\n", g_bw);
        printf("JSON {\"bench\":\"gpu_route\",\"what\":\"hbm_read_bw\",\"method\":\"read-reduce "
               "kernel\",\"bytes\":%zu,\"gbps\":%.1f}\n",
               n, g_bw);
    }
    run_scale(dev, dev_fused, dev_gemm, 10000000ull, true);
    if (!quick) run_scale(dev, dev_fused, dev_gemm, 100000000ull, false);
    msa_dev_close(dev_gemm);
    msa_dev_close(dev_fused);
    msa_dev_close(dev);
    return 0;
}
#endif
