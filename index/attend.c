/* attend.c — attention of query tokens over pooled memory K/V (SEMANTICS
 * "Attention"), float32, numerically stable.
 *
 * One task per (token t, kv head h, slice of up to HB query heads of group h):
 * the heads of one group share K[:, h] and V[:, h], so each row is read once per
 * slice rather than once per head. Rows go in blocks of RB: the block's logits
 * first, then one rescale of the running sum to the new max (flash-attention
 * style), then the exp-weighted V rows. SIMD dot/axpy come from the detected
 * ISA's table.
 */
#include "kernels_impl.h"

#include <math.h>
#include <string.h>

#define HB 8  /* query heads per task */
#define RB 64 /* rows per block */
#define DMAX 256

typedef struct {
    const float *q, *k, *v;
    uint32_t T, Hq, H, D, G, nslice;
    size_t R;
    float scale;
    float *out, *lse;
    const msa__kern_ops_t *ops;
} attend_job_t;

static void attend_task(void *arg, size_t task, unsigned worker)
{
    const attend_job_t *a = arg;
    const uint32_t D = a->D, G = a->G, H = a->H, Hq = a->Hq;
    const uint32_t slice = (uint32_t)(task % a->nslice);
    const uint32_t h = (uint32_t)(task / a->nslice % H);
    const uint32_t t = (uint32_t)(task / a->nslice / H);
    const uint32_t j0 = h * G + slice * HB;
    const uint32_t nh = G - slice * HB < HB ? G - slice * HB : HB;
    const size_t ld = (size_t)H * D;

    float acc[HB][DMAX];
    float m[HB], l[HB], lg[HB][RB];
    for (uint32_t g = 0; g < nh; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
        memset(acc[g], 0, D * sizeof(float));
    }
    const float *qt = a->q + ((size_t)t * Hq + j0) * D;
    for (size_t r0 = 0; r0 < a->R; r0 += RB) {
        const uint32_t nr = a->R - r0 < RB ? (uint32_t)(a->R - r0) : RB;
        for (uint32_t g = 0; g < nh; g++) {
            float bm = -INFINITY;
            for (uint32_t i = 0; i < nr; i++) {
                const float x = a->scale * a->ops->dot(qt + (size_t)g * D,
                                                       a->k + (r0 + i) * ld + (size_t)h * D, D);
                lg[g][i] = x;
                bm = x > bm ? x : bm;
            }
            if (bm > m[g]) {
                /* exp(-inf) = 0 covers the first block. */
                const float c = expf(m[g] - bm);
                l[g] *= c;
                for (uint32_t d = 0; d < D; d++)
                    acc[g][d] *= c;
                m[g] = bm;
            }
            for (uint32_t i = 0; i < nr; i++)
                lg[g][i] = m[g] == -INFINITY ? 0.0f : expf(lg[g][i] - m[g]);
        }
        for (uint32_t i = 0; i < nr; i++) {
            const float *vr = a->v + (r0 + i) * ld + (size_t)h * D;
            for (uint32_t g = 0; g < nh; g++) {
                l[g] += lg[g][i];
                a->ops->axpy(lg[g][i], vr, acc[g], D);
            }
        }
    }
    for (uint32_t g = 0; g < nh; g++) {
        const size_t o = (size_t)t * Hq + j0 + g;
        float *dst = a->out + o * D;
        if (a->R == 0 || !(l[g] > 0.0f)) {
            memset(dst, 0, D * sizeof(float));
            a->lse[o] = -INFINITY;
            continue;
        }
        const float inv = 1.0f / l[g];
        for (uint32_t d = 0; d < D; d++)
            dst[d] = acc[g][d] * inv;
        a->lse[o] = m[g] + logf(l[g]);
    }
}

void msa_idx_attend(const float *q, uint32_t T, uint32_t Hq, uint32_t H, uint32_t D,
                    const float *k, const float *v, size_t R, float scale, float *out, float *lse,
                    struct msa_idx_pool *pool)
{
    msa_assert(H > 0 && Hq % H == 0 && D > 0 && D <= DMAX);
    const uint32_t G = Hq / H;
    attend_job_t a = {
        .q = q, .k = k, .v = v, .T = T, .Hq = Hq, .H = H, .D = D, .G = G,
        .nslice = (G + HB - 1) / HB, .R = R, .scale = scale, .out = out, .lse = lse,
        .ops = msa__kern_ops(msa_idx_isa_detect()),
    };
    const size_t ntasks = (size_t)T * H * a.nslice;
    msa_idx_pool_run(pool, ntasks, attend_task, &a);
}
