/* attend.c — attention of query tokens over pooled memory K/V (SEMANTICS
 * "Attention"), float32, numerically stable.
 *
 * Per kv head h the query heads of its group share K[:, h] and V[:, h], so the
 * work is two small GEMMs per head: S = scale * Q_h K_h^T and O = softmax(S) V_h.
 * One task per (kv head, block of QB query vectors (t, g)) gathers them and
 * walks the rows in blocks of RB with an online softmax (flash-attention
 * style): S_blk by sgemm, the running max/sum per query rescaled when the max
 * grows, then acc += exp(S_blk - max) V_blk by sgemm. OpenBLAS does the GEMMs
 * single-threaded inside each task (our pool parallelises over tasks); at
 * MSA-4B shapes this runs near the sgemm peak where a dot/axpy loop per row
 * reached about a quarter of it. Scratch is bounded by QB*(RB + 2*D + 2)
 * floats (at most 264 KiB) per task, whatever the number of selected rows.
 */
#include "kernels_impl.h"
#include "msa_alloc.h"

#include <cblas.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define QB 64  /* query vectors (token, head of the group) per task */
#define RB 512 /* memory rows per block */

/* OpenBLAS must not start its own threads under ours. */
extern void openblas_set_num_threads(int n);
static pthread_once_t blas_once = PTHREAD_ONCE_INIT;
static void blas_single_thread(void)
{
    openblas_set_num_threads(1);
}

typedef struct {
    const float *q, *k, *v;
    uint32_t T, Hq, H, D, G, nqb;
    size_t R;
    float scale;
    float *out, *lse;
    int failed; /* set (atomically) when a task could not get scratch */
} attend_job_t;

static void attend_task(void *arg, size_t task, unsigned worker)
{
    attend_job_t *a = arg;
    const uint32_t D = a->D, G = a->G, Hq = a->Hq;
    const uint32_t h = (uint32_t)(task / a->nqb);
    const size_t i0 = (task % a->nqb) * QB, nvec = (size_t)a->T * G;
    const uint32_t M = (uint32_t)(nvec - i0 < QB ? nvec - i0 : QB); /* vector i: t = i/G, g = i%G */
    const int ld = (int)(a->H * D);
    const float *kh = a->k + (size_t)h * D, *vh = a->v + (size_t)h * D;

    float *qm = msa_malloc(((size_t)M * D * 2 + (size_t)M * RB + 2 * (size_t)M) * sizeof(float));
    if (!qm) {
        __atomic_store_n(&a->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    float *acc = qm + (size_t)M * D, *s = acc + (size_t)M * D, *mx = s + (size_t)M * RB,
          *sum = mx + M;
    for (uint32_t i = 0; i < M; i++) {
        const size_t t = (i0 + i) / G, g = (i0 + i) % G;
        memcpy(qm + (size_t)i * D, a->q + (t * Hq + (size_t)h * G + g) * D, D * sizeof(float));
    }
    memset(acc, 0, (size_t)M * D * sizeof(float));
    for (uint32_t i = 0; i < M; i++) {
        mx[i] = -INFINITY;
        sum[i] = 0.0f;
    }
    for (size_t r0 = 0; r0 < a->R; r0 += RB) {
        const int nr = (int)(a->R - r0 < RB ? a->R - r0 : RB);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, nr, (int)D, a->scale, qm,
                    (int)D, kh + r0 * (size_t)ld, ld, 0.0f, s, nr);
        for (uint32_t i = 0; i < M; i++) {
            float *si = s + (size_t)i * nr, bm = mx[i];
            for (int r = 0; r < nr; r++) bm = si[r] > bm ? si[r] : bm;
            if (bm > mx[i]) {
                /* exp(-inf) = 0 covers the first block. */
                const float c = expf(mx[i] - bm);
                sum[i] *= c;
                float *ai = acc + (size_t)i * D;
                for (uint32_t d = 0; d < D; d++) ai[d] *= c;
                mx[i] = bm;
            }
            float part = 0.0f;
            for (int r = 0; r < nr; r++) {
                si[r] = expf(si[r] - mx[i]);
                part += si[r];
            }
            sum[i] += part;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)M, (int)D, nr, 1.0f, s, nr,
                    vh + r0 * (size_t)ld, ld, 1.0f, acc, (int)D);
    }
    for (uint32_t i = 0; i < M; i++) {
        const size_t t = (i0 + i) / G, j = (size_t)h * G + (i0 + i) % G;
        const size_t o = t * Hq + j;
        float *dst = a->out + o * D;
        if (a->R == 0 || !(sum[i] > 0.0f)) {
            memset(dst, 0, D * sizeof(float));
            a->lse[o] = -INFINITY;
            continue;
        }
        const float inv = 1.0f / sum[i];
        for (uint32_t d = 0; d < D; d++) dst[d] = acc[(size_t)i * D + d] * inv;
        a->lse[o] = mx[i] + logf(sum[i]);
    }
    free(qm);
    (void)worker;
}

int msa_idx_attend(const float *q, uint32_t T, uint32_t Hq, uint32_t H, uint32_t D, const float *k,
                   const float *v, size_t R, float scale, float *out, float *lse,
                   struct msa_idx_pool *pool)
{
    msa_assert(H > 0 && Hq % H == 0 && D > 0 && D <= 256);
    pthread_once(&blas_once, blas_single_thread);
    attend_job_t a = {
        .q = q,
        .k = k,
        .v = v,
        .T = T,
        .Hq = Hq,
        .H = H,
        .D = D,
        .G = Hq / H,
        .nqb = (uint32_t)(((size_t)T * (Hq / H) + QB - 1) / QB),
        .R = R,
        .scale = scale,
        .out = out,
        .lse = lse,
    };
    const size_t ntasks = (size_t)H * a.nqb;
    if (pool)
        msa_idx_pool_run(pool, ntasks, attend_task, &a);
    else
        for (size_t t = 0; t < ntasks; t++) attend_task(&a, t, 0);
    return a.failed ? MSA_ENOMEM : MSA_OK;
}
