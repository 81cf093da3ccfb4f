/* topk.c — bounded selection of the k best hits (higher score, then smaller id).
 *
 * A binary min-heap on "worse": the root is the worst hit kept, so a new hit
 * costs one comparison when it does not qualify (the common case in a scan)
 * and O(log k) when it does. NaN scores are taken as -inf so the order stays
 * total.
 */
#include "kernels.h"

#include <math.h>

/* True when a ranks below b. */
static inline bool worse(const msa_idx_hit_t *a, const msa_idx_hit_t *b)
{
    return a->score < b->score || (a->score == b->score && a->id > b->id);
}

static void sift_down(msa_idx_hit_t *h, uint32_t n, uint32_t i)
{
    msa_idx_hit_t x = h[i];
    for (;;) {
        uint32_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && worse(&h[c + 1], &h[c])) c++;
        if (!worse(&h[c], &x)) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
}

void msa_idx_topk_init(msa_idx_topk_t *t, msa_idx_hit_t *storage, uint32_t k)
{
    t->heap = storage;
    t->n = 0;
    t->k = k;
}

void msa_idx_topk_push(msa_idx_topk_t *t, float score, uint64_t id)
{
    msa_idx_hit_t x = {score != score ? -INFINITY : score, id};
    if (t->n < t->k) {
        uint32_t i = t->n++;
        while (i > 0) {
            uint32_t p = (i - 1) / 2;
            if (!worse(&x, &t->heap[p])) break;
            t->heap[i] = t->heap[p];
            i = p;
        }
        t->heap[i] = x;
    } else if (t->k > 0 && worse(&t->heap[0], &x)) {
        t->heap[0] = x;
        sift_down(t->heap, t->n, 0);
    }
}

void msa_idx_topk_merge(msa_idx_topk_t *dst, const msa_idx_topk_t *src)
{
    for (uint32_t i = 0; i < src->n; i++)
        msa_idx_topk_push(dst, src->heap[i].score, src->heap[i].id);
}

uint32_t msa_idx_topk_finish(msa_idx_topk_t *t, msa_idx_hit_t *out)
{
    /* Pop the worst repeatedly, filling out from the back. */
    uint32_t n = t->n;
    msa_idx_hit_t *h = t->heap;
    for (uint32_t m = n; m > 0; m--) {
        out[m - 1] = h[0];
        h[0] = h[m - 1];
        sift_down(h, m - 1, 0);
    }
    t->n = 0;
    return n;
}

float msa_idx_chunk_reduce(const float *s, size_t n, bool mean)
{
    if (n == 0) return -INFINITY;
    float best = s[0];
    if (mean) {
        float sum = 0.0f;
        for (size_t r = 0; r < n; r++) sum += s[r];
        best = sum / (float)n;
    } else {
        for (size_t r = 1; r < n; r++) best = s[r] > best ? s[r] : best;
    }
    return isnan(best) ? -INFINITY : best;
}
