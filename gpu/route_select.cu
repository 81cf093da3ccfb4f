// route_select.cu — the select kernel of dev.h on the GPU: per entry (document
// version) a doc score, then the EXACT top-k (higher score, then smaller doc
// id) for k <= MSA_MAX_TOP_K, handed back in host memory, best first.
//
// How: every entry gets a 96-bit key, (ordered score bits : ~doc), so that a
// larger key is a better hit and no two distinct (score, doc) share a key; an
// invalid entry gets key 0 (the ordered score is never 0: -inf maps to
// 0x007fffff). A radix select then finds the k-th largest key 8 bits at a
// time, most significant first: a histogram pass over the entries that match
// the prefix found so far, and a one-thread pick that walks the 256 bins from
// the top until k is reached. It stops early (later passes return at once)
// as soon as every entry left in the chosen bin is needed, which after the
// 4 score bytes is the rule unless exact score ties straddle the k-th place;
// the doc bytes then settle those ties by smaller id. A compaction pass takes
// every entry above the prefix and the needed number of entries equal to it
// (exactly k, or every valid entry when fewer), the <= k hits go to the host
// through the lane's pinned staging, and the host sorts them (k <= 1024).
//
// Scratch (work): the ordered score keys [n_ent] u32, the <= k hits, and a
// small state block in the 4096-byte tail; this fits msa_dev_select_work.
// The doc bytes are read from the entries themselves, only in the (rare)
// passes that reach them.
#include "dev_cuda_impl.h"

#include "msa_log.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

namespace
{

constexpr int kBlock = 256;
constexpr int kPasses = 12; // 96 key bits, 8 per pass

// The select's bookkeeping on the device (in the tail of work).
struct SelState {
    uint32_t hist[256]; // histogram of the current pass
    uint32_t pref_hi;   // prefix of the k-th key: score bits
    uint32_t bits;      // leading key bits the prefix fixes
    uint64_t pref_lo;   //   ... and ~doc bits
    uint32_t k_rem;     // hits still needed among keys equal to the prefix
    uint32_t done;      // the prefix decides every hit
    uint32_t n_out;     // hits written by the compaction
    uint32_t n_eq;      // equal-to-prefix entries taken so far
};
static_assert(sizeof(SelState) + 256 <= 4096, "state must fit the tail of the select work");

// Maps a score to an unsigned key with the same order; NaN counts as -inf and
// -0 as +0 (they compare equal, so the doc id must decide between them).
__device__ __forceinline__ uint32_t order_key(float s)
{
    if (s != s) s = -INFINITY;
    if (s == 0.0f) s = 0.0f;
    const uint32_t u = __float_as_uint(s);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_score(uint32_t k)
{
    return (k & 0x80000000u) ? __uint_as_float(k & 0x7fffffffu) : __uint_as_float(~k);
}

__device__ bool excluded(const uint64_t *ex, uint32_t n, uint64_t doc)
{
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        const uint32_t mid = lo + (hi - lo) / 2;
        if (ex[mid] < doc)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && ex[lo] == doc;
}

struct SelParams {
    const float *scores;
    uint32_t row_base;
    const msa_dev_entry_t *ent;
    uint32_t n_ent;
    uint64_t snapshot;
    const uint64_t *exclude;
    uint32_t n_exclude;
    bool chunk_mean;
    uint32_t k;
    uint32_t *sk;        // [n_ent] ordered score keys, 0 = not a candidate
    msa_idx_hit_t *hits; // [k]
    SelState *st;
};

// One thread per entry: visibility, exclusion, and the doc score as the
// reference computes it (max from row 0 on with `>`, or float sum / nrows).
__global__ void doc_reduce_kernel(SelParams p)
{
    for (uint32_t e = blockIdx.x * blockDim.x + threadIdx.x; e < p.n_ent;
         e += gridDim.x * blockDim.x) {
        const msa_dev_entry_t en = p.ent[e];
        uint32_t key = 0;
        if (en.created <= p.snapshot && p.snapshot < en.deleted && en.nrows > 0 &&
            en.row0 >= p.row_base && !excluded(p.exclude, p.n_exclude, en.doc)) {
            const float *s = p.scores + (en.row0 - p.row_base);
            float best = s[0];
            if (p.chunk_mean) {
                float sum = 0.0f;
                for (uint32_t r = 0; r < en.nrows; r++) sum += s[r];
                best = sum / (float)en.nrows;
            } else {
                for (uint32_t r = 1; r < en.nrows; r++) best = s[r] > best ? s[r] : best;
            }
            key = order_key(best);
        }
        p.sk[e] = key;
    }
}

__global__ void init_state_kernel(SelState *st, uint32_t k)
{
    for (int i = threadIdx.x; i < 256; i += blockDim.x) st->hist[i] = 0;
    if (threadIdx.x == 0) {
        st->pref_hi = 0;
        st->pref_lo = 0;
        st->bits = 0;
        st->k_rem = k;
        st->done = 0;
        st->n_out = 0;
        st->n_eq = 0;
    }
}

// Compares the leading `bits` bits of key (hi : lo) with the prefix.
__device__ __forceinline__ int cmp_prefix(uint32_t hi, uint64_t lo, const SelState *st,
                                          uint32_t bits)
{
    if (bits == 0) return 0;
    if (bits <= 32) {
        const uint32_t a = hi >> (32 - bits), b = st->pref_hi >> (32 - bits);
        return a > b ? 1 : a < b ? -1 : 0;
    }
    if (hi != st->pref_hi) return hi > st->pref_hi ? 1 : -1;
    const uint32_t lb = bits - 32; // 1..64
    const uint64_t a = lo >> (64 - lb), b = st->pref_lo >> (64 - lb);
    return a > b ? 1 : a < b ? -1 : 0;
}

__device__ __forceinline__ uint32_t digit(uint32_t hi, uint64_t lo, int pass)
{
    return pass < 4 ? (hi >> (24 - 8 * pass)) & 255u
                    : (uint32_t)(lo >> (56 - 8 * (pass - 4))) & 255u;
}

// Histogram of digit `pass` over the candidates that match the prefix.
__global__ void __launch_bounds__(kBlock) hist_kernel(SelParams p, int pass)
{
    SelState *st = p.st;
    if (st->done) return; // uniform: written only by pick_kernel
    __shared__ uint32_t h[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) h[i] = 0;
    __syncthreads();
    const uint32_t bits = 8u * pass;
    for (uint32_t e = blockIdx.x * blockDim.x + threadIdx.x; e < p.n_ent;
         e += gridDim.x * blockDim.x) {
        const uint32_t hi = p.sk[e];
        if (!hi) continue;
        const uint64_t lo = pass >= 4 ? ~p.ent[e].doc : 0; // doc bytes only when needed
        if (cmp_prefix(hi, lo, st, bits) != 0) continue;
        atomicAdd(&h[digit(hi, lo, pass)], 1u);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
        if (h[i]) atomicAdd(&st->hist[i], h[i]);
}

// One thread: picks the bin that holds the k_rem-th largest remaining key.
__global__ void pick_kernel(SelState *st, int pass)
{
    if (threadIdx.x != 0 || st->done) return;
    if (pass == 0) {
        uint32_t total = 0;
        for (int b = 0; b < 256; b++) total += st->hist[b];
        if (total <= st->k_rem) { // every valid entry is a hit
            st->k_rem = total;
            st->done = 1;
        }
    }
    if (!st->done) {
        uint32_t cum = 0;
        for (int b = 255; b >= 0; b--) {
            const uint32_t c = st->hist[b];
            if (cum + c >= st->k_rem) {
                if (pass < 4)
                    st->pref_hi |= (uint32_t)b << (24 - 8 * pass);
                else
                    st->pref_lo |= (uint64_t)b << (56 - 8 * (pass - 4));
                st->bits = 8u * (pass + 1);
                st->k_rem -= cum; // the cum keys above bin b are hits
                if (c == st->k_rem) st->done = 1;
                break;
            }
            cum += c;
        }
    }
    for (int b = 0; b < 256; b++) st->hist[b] = 0;
}

// Takes every candidate above the prefix and k_rem of those equal to it.
__global__ void __launch_bounds__(kBlock) compact_kernel(SelParams p)
{
    SelState *st = p.st;
    const uint32_t bits = st->bits;
    for (uint32_t e = blockIdx.x * blockDim.x + threadIdx.x; e < p.n_ent;
         e += gridDim.x * blockDim.x) {
        const uint32_t hi = p.sk[e];
        if (!hi) continue;
        const uint64_t doc = p.ent[e].doc;
        const int c = cmp_prefix(hi, ~doc, st, bits);
        bool take = c > 0;
        if (c == 0) take = atomicAdd(&st->n_eq, 1u) < st->k_rem;
        if (take) {
            const uint32_t slot = atomicAdd(&st->n_out, 1u);
            if (slot < p.k) { // always true; guards the buffer regardless
                p.hits[slot].score = key_score(hi);
                p.hits[slot].id = doc;
            }
        }
    }
}

int cmp_hit(const void *x, const void *y)
{
    const msa_idx_hit_t *a = (const msa_idx_hit_t *)x, *b = (const msa_idx_hit_t *)y;
    if (a->score != b->score) return a->score > b->score ? -1 : 1;
    return a->id < b->id ? -1 : a->id > b->id ? 1 : 0;
}

size_t round256(size_t n)
{
    return (n + 255) / 256 * 256;
}

} // namespace

int msa__cuda_select(struct msa_dev_lane *l, const msa_dev_select_args_t *a)
{
    if (!a || !a->out || !a->n_out || a->top_k == 0 || a->top_k > MSA_MAX_TOP_K ||
        a->work_bytes < msa_dev_select_work(a->n_ent, a->top_k) || !a->work ||
        (a->n_ent && (!a->scores || !a->ent)) || (a->n_exclude && !a->exclude)) {
        msa_log(MSA_LOG_ERROR, "cuda select: bad arguments (top_k %u, n_ent %u, work %zu)",
                a ? a->top_k : 0, a ? a->n_ent : 0, a ? a->work_bytes : 0);
        return MSA_EINVAL;
    }
    *a->n_out = 0;
    if (a->n_ent == 0) return MSA_OK;

    // Carve: keys | hits | state (msa_dev_select_work's layout).
    // The base is rounded up to 16 bytes; the 4096-byte tail absorbs that.
    char *w = (char *)(((uintptr_t)a->work + 15) & ~(uintptr_t)15);
    const size_t keys_b = round256((size_t)a->n_ent * 4);
    const size_t hits_off = keys_b;
    const size_t hits_b = round256((size_t)a->top_k * 16);
    SelParams p = {a->scores,
                   a->row_base,
                   a->ent,
                   a->n_ent,
                   a->snapshot,
                   a->exclude,
                   a->n_exclude,
                   a->chunk_mean,
                   a->top_k,
                   (uint32_t *)w,
                   (msa_idx_hit_t *)(w + hits_off),
                   (SelState *)(w + hits_off + hits_b)};

    const size_t nb = ((size_t)a->n_ent + kBlock - 1) / kBlock;
    const size_t cap = (size_t)l->dv->prop.multiProcessorCount * 8;
    const unsigned grid = (unsigned)(nb < cap ? nb : cap);
    init_state_kernel<<<1, kBlock, 0, l->stream>>>(p.st, a->top_k);
    MSA_CK_LAUNCH(l, "init_state_kernel");
    doc_reduce_kernel<<<grid, kBlock, 0, l->stream>>>(p);
    MSA_CK_LAUNCH(l, "doc_reduce_kernel");
    for (int pass = 0; pass < kPasses; pass++) {
        hist_kernel<<<grid, kBlock, 0, l->stream>>>(p, pass);
        MSA_CK_LAUNCH(l, "hist_kernel");
        pick_kernel<<<1, 32, 0, l->stream>>>(p.st, pass);
        MSA_CK_LAUNCH(l, "pick_kernel");
    }
    compact_kernel<<<grid, kBlock, 0, l->stream>>>(p);
    MSA_CK_LAUNCH(l, "compact_kernel");

    // Hits and state are adjacent: one copy through the pinned staging (or,
    // when the lane has too little, a plain host buffer).
    const size_t bytes = hits_b + sizeof(SelState);
    void *host = l->head.staging_bytes >= bytes ? l->head.staging_h : malloc(bytes);
    if (!host) return MSA_ENOMEM;
    int rc = MSA_CK_RC(cudaMemcpyAsync(host, p.hits, bytes, cudaMemcpyDeviceToHost, l->stream));
    if (rc == MSA_OK) rc = MSA_CK_RC(cudaStreamSynchronize(l->stream));
    if (rc == MSA_OK) {
        SelState st;
        memcpy(&st, (const char *)host + hits_b, sizeof st);
        uint32_t n = st.n_out < a->top_k ? st.n_out : a->top_k;
        memcpy(a->out, host, (size_t)n * sizeof *a->out);
        qsort(a->out, n, sizeof *a->out, cmp_hit);
        *a->n_out = n;
    }
    if (host != l->head.staging_h) free(host);
    return rc;
}
