/* bench_kernels.c — routing-score throughput per ISA and thread count, next to
 * the floors measured in the same process: memory bandwidth (a streaming read of
 * the same key array) and arithmetic peak (a tight FMA loop), plus a FAISS
 * IndexFlatIP proxy (OpenBLAS sgemm over float32 keys, as FAISS does for
 * nq >= 20, with a max epilogue instead of its heap).
 *
 * Shapes: MSA-4B, H = 8, Hq = 32, D = 128, BF16 keys, COSINE + HEAD_MEAN,
 * rows = 15625 * 18 (1M tokens / 64 per chunk, all 18 layers as one scan).
 *   QUERY_MAX, T = 64: 64 group-summed vectors of H*D per row (GEMM + max).
 *   QUERY_MEAN, T = 64: folded into one vector (pure streaming).
 *
 * usage: bench_kernels [--rows N] [--reps R] [--isa NAME] [--no-faiss]
 */
#include "bench_floor.h"
#include "kernels.h"
#include "kernels_impl.h"

#include <cblas.h>
#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- scoring ---------------------------------------------------------------- */

#define CHUNK 2048

typedef struct {
    const msa_idx_scorer_t *s;
    const uint16_t *rows;
    size_t nrows, rowlen;
    float *out;
} score_job_t;

static void score_task(void *arg, size_t task, unsigned w)
{
    score_job_t *j = arg;
    size_t r0 = task * CHUNK;
    size_t n = j->nrows - r0 < CHUNK ? j->nrows - r0 : CHUNK;
    msa_idx_scorer_run(j->s, j->rows + r0 * j->rowlen, NULL, n, j->out + r0);
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median_ms(double *t, int n)
{
    qsort(t, n, sizeof *t, cmp_d);
    return t[n / 2] * 1e3;
}

/* ---- FAISS proxy -------------------------------------------------------------- */

/* IndexFlatIP's search for nq >= 20 (exhaustive_inner_product_blas): sgemm of
 * the query block against 1024-row blocks of float32 keys, then an epilogue
 * over the block's scores (here the per-row max over the queries). */
static double faiss_proxy(const float *keys, size_t nrows, const float *q, int nq, int HD,
                          int threads, int reps, float *out)
{
    openblas_set_num_threads(threads);
    const size_t bs = 1024;
    float *ip = malloc(bs * nq * sizeof(float));
    double t[16];
    for (int rep = 0; rep <= reps; rep++) {
        double t0 = now_s();
        for (size_t r0 = 0; r0 < nrows; r0 += bs) {
            size_t n = nrows - r0 < bs ? nrows - r0 : bs;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, nq, HD, 1.0f,
                        keys + r0 * HD, HD, q, HD, 0.0f, ip, nq);
            for (size_t i = 0; i < n; i++) {
                float m = -INFINITY;
                for (int j = 0; j < nq; j++) m = ip[i * nq + j] > m ? ip[i * nq + j] : m;
                out[r0 + i] = m;
            }
        }
        if (rep > 0) t[rep - 1] = now_s() - t0;
    }
    free(ip);
    return median_ms(t, reps);
}

int main(int argc, char **argv)
{
    size_t nrows = 15625 * 18;
    int reps = 5, faiss = 1, only_isa = -1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--rows") && i + 1 < argc)
            nrows = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--no-faiss"))
            faiss = 0;
        else if (!strcmp(argv[i], "--isa") && i + 1 < argc) {
            ++i;
            for (int k = 0; k <= MSA_ISA_AVX512BF16; k++)
                if (!strcmp(argv[i], msa_idx_isa_name((msa_isa_t)k))) only_isa = k;
        } else {
            fprintf(stderr, "usage: %s [--rows N] [--reps R] [--isa NAME] [--no-faiss]\n", argv[0]);
            return 2;
        }
    }
    if (reps < 1) reps = 1;
    if (reps > 15) reps = 15;
    const uint32_t H = 8, Hq = 32, D = 128, T = 64, HD = H * D;
    const size_t nel = nrows * HD;
    const size_t key_bytes = nel * 2;

    /* Normalised keys per (row, head), stored as bf16. */
    uint16_t *rows = aligned_alloc(64, (key_bytes + 63) / 64 * 64);
    float *q = malloc((size_t)T * Hq * D * sizeof(float));
    float *out = malloc(nrows * sizeof(float));
    if (!rows || !q || !out) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (size_t rh = 0; rh < nrows * H; rh++) {
        float x[128], nn = 0;
        for (uint32_t d = 0; d < D; d++) {
            x[d] = frand();
            nn += x[d] * x[d];
        }
        for (uint32_t d = 0; d < D; d++) rows[rh * D + d] = msa_f32_to_bf16(x[d] / sqrtf(nn));
    }
    for (size_t i = 0; i < (size_t)T * Hq * D; i++) q[i] = frand();

    msa_idx_pool_t *pool2;
    if (msa_idx_pool_create(1, &pool2) != MSA_OK) return 1;
    msa_idx_pool_t *pools[2] = {NULL, pool2}; /* 1 thread, 2 threads (1 worker + caller) */

    printf("bench_kernels: rows=%zu H=%u Hq=%u D=%u T=%u BF16 keys, COSINE+HEAD_MEAN; "
           "key bytes %.1f MB; detected isa %s\n",
           nrows, H, Hq, D, T, key_bytes / 1e6, msa_idx_isa_name(msa_idx_isa_detect()));
    double bw[2], peak[2], peak_bf[2];
    for (int p = 0; p < 2; p++) {
        bw[p] = measure_bw(pools[p], rows, key_bytes);
        peak[p] = msa_idx_isa_supported(MSA_ISA_AVX512) ? measure_peak(pools[p], 0) : 0;
        peak_bf[p] = msa_idx_isa_supported(MSA_ISA_AVX512BF16) ? measure_peak(pools[p], 1) : 0;
        printf("floor inputs, %d thread(s): stream read %.1f GB/s; fp32 FMA peak %.1f GMAC/s "
               "(AVX-512, 16 MAC/instr); vdpbf16ps peak %.1f GMAC/s (32 MAC/instr)\n",
               p + 1, bw[p] / 1e9, peak[p] / 1e9, peak_bf[p] / 1e9);
    }

    printf("\n%-16s %-10s %3s %9s %8s %8s %9s %9s %9s %7s\n", "case", "isa", "thr", "ms", "GB/s",
           "GMAC/s", "bw_floor", "cmp_floor", "floor_ms", "x_floor");
    struct {
        const char *name;
        msa_query_reduce_t qr;
    } cases[2] = {{"QUERY_MAX T=64", MSA_QUERY_MAX}, {"QUERY_MEAN T=64", MSA_QUERY_MEAN}};
    double best_qmax_ms[2] = {1e30, 1e30};
    for (int c = 0; c < 2; c++) {
        for (int isa = MSA_ISA_AVX512BF16; isa >= 0; isa--) {
            if (!msa_idx_isa_supported((msa_isa_t)isa) || (only_isa >= 0 && isa != only_isa))
                continue;
            for (int variant = 0; variant < (isa == MSA_ISA_AVX512BF16 ? 2 : 1); variant++) {
                msa_idx_scorer_t *s;
                if (msa_idx_scorer_create(q, T, Hq, H, D, true, MSA_HEAD_MEAN, cases[c].qr,
                                          MSA_DT_BF16, (msa_isa_t)isa, &s) != MSA_OK)
                    return 1;
                if (variant == 1) msa__scorer_set_bf16_terms(s, 1);
                const double nvec = cases[c].qr == MSA_QUERY_MAX ? T : 1;
                const double macs = (double)nrows * HD * nvec;
                for (int p = 0; p < 2; p++) {
                    score_job_t j = {
                        .s = s, .rows = rows, .nrows = nrows, .rowlen = HD, .out = out};
                    const size_t ntasks = (nrows + CHUNK - 1) / CHUNK;
                    /* The scalar path is slow on the GEMM case: fewer reps. */
                    int r = isa == MSA_ISA_SCALAR && nvec > 1 ? 1 : reps;
                    double t[16];
                    for (int rep = 0; rep <= r; rep++) {
                        double t0 = now_s();
                        msa_idx_pool_run(pools[p], ntasks, score_task, &j);
                        if (rep > 0) t[rep - 1] = now_s() - t0;
                    }
                    double ms = median_ms(t, r);
                    double pk = variant == 1 ? peak_bf[p] : peak[p];
                    double bwf = key_bytes / bw[p] * 1e3, cf = pk > 0 ? macs / pk * 1e3 : 0;
                    double fl = bwf > cf ? bwf : cf;
                    char nm[32];
                    snprintf(nm, sizeof nm, "%s%s", msa_idx_isa_name((msa_isa_t)isa),
                             variant ? "-x1" : "");
                    printf("%-16s %-13s %d %9.2f %8.2f %8.2f %9.2f %9.2f %9.2f %7.2f\n",
                           cases[c].name, nm, p + 1, ms, key_bytes / (ms * 1e-3) / 1e9,
                           macs / (ms * 1e-3) / 1e9, bwf, cf, fl, ms / fl);
                    if (c == 0 && variant == 0 && ms < best_qmax_ms[p]) best_qmax_ms[p] = ms;
                    fflush(stdout);
                }
                msa_idx_scorer_destroy(s);
            }
        }
    }

    if (faiss) {
        /* FAISS's input: float32 keys (2x the bytes) and the 64 group-summed
         * normalised query vectors (what the scorer computes internally). */
        float *keys = malloc(nel * sizeof(float));
        float *qg = calloc((size_t)T * HD, sizeof(float));
        if (!keys || !qg) {
            fprintf(stderr, "faiss proxy: out of memory\n");
            return 1;
        }
        for (size_t i = 0; i < nel; i++) keys[i] = msa_bf16_to_f32(rows[i]);
        for (uint32_t t = 0; t < T; t++)
            for (uint32_t jj = 0; jj < Hq; jj++) {
                const float *src = q + ((size_t)t * Hq + jj) * D;
                float nn = 0;
                for (uint32_t d = 0; d < D; d++) nn += src[d] * src[d];
                for (uint32_t d = 0; d < D; d++)
                    qg[(size_t)t * HD + (jj / (Hq / H)) * D + d] += src[d] / sqrtf(nn) / Hq;
            }
        printf("\nFAISS IndexFlatIP proxy (OpenBLAS sgemm, float32 keys %.1f MB, 1024-row blocks,"
               " max epilogue), QUERY_MAX T=64:\n",
               nel * 4 / 1e6);
        for (int p = 0; p < 2; p++) {
            double ms = faiss_proxy(keys, nrows, qg, T, (int)HD, p + 1, reps, out);
            printf("  %d thread(s): %.2f ms (%.2f GMAC/s); best msa kernel %.2f ms -> %.2fx "
                   "faster\n",
                   p + 1, ms, (double)nrows * HD * T / (ms * 1e-3) / 1e9, best_qmax_ms[p],
                   ms / best_qmax_ms[p]);
        }
        free(keys);
        free(qg);
    }
    msa_idx_pool_destroy(pool2);
    free(rows);
    free(q);
    free(out);
    return 0;
}
