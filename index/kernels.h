/* kernels.h — CPU compute kernels of the routing index: routing scores with
 * run-time SIMD dispatch, top-k selection, attention, and a thread pool.
 *
 * Stateless apart from the pool and the prepared scorer (both immutable while
 * in use, so any number of threads may share them). float32 accumulation
 * everywhere, as SEMANTICS.md requires.
 */
#ifndef MSA_KERNELS_H
#define MSA_KERNELS_H

#include "msa_err.h"
#include "schema.h"
#include "tensor.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- SIMD dispatch ------------------------------------------------------- */

typedef enum {
    MSA_ISA_SCALAR = 0,
    MSA_ISA_AVX2 = 1,       /* AVX2 + FMA + F16C */
    MSA_ISA_AVX512 = 2,     /* AVX-512 F/BW/VL/DQ */
    MSA_ISA_AVX512BF16 = 3, /* AVX-512 + BF16 dot products */
} msa_isa_t;

/* Best ISA this CPU supports (cpuid + OS xsave state). MSA_ISA env var
 * ("scalar", "avx2", "avx512", "avx512bf16") may force a lower one. */
msa_isa_t msa_idx_isa_detect(void);
/* True when this CPU can run isa. */
bool msa_idx_isa_supported(msa_isa_t isa);
const char *msa_idx_isa_name(msa_isa_t isa);

/* ---- routing scores ------------------------------------------------------ */

typedef struct msa_idx_scorer msa_idx_scorer_t;

/* Prepares the queries of one layer for scoring index rows.
 *   q: [T][Hq][D] float32 as the client sent it (caller keeps ownership).
 *   cosine: normalise each q[t,j] to unit L2 norm first (zero stays zero);
 *           keys are already normalised when stored.
 *   key_dtype: dtype of the rows (F32, F16, BF16, or I8 with per-head scales).
 * The scorer precomputes what its path needs (e.g. group-summed queries for
 * HEAD_MEAN, queries folded over t for QUERY_MEAN/QUERY_LAST).
 * Errors: MSA_EINVAL (bad sizes/enums), MSA_ENOMEM. */
int msa_idx_scorer_create(const float *q, uint32_t T, uint32_t Hq, uint32_t H, uint32_t D,
                          bool cosine, msa_head_reduce_t head_reduce,
                          msa_query_reduce_t query_reduce, msa_dtype_t key_dtype, msa_isa_t isa,
                          msa_idx_scorer_t **out);
void msa_idx_scorer_destroy(msa_idx_scorer_t *s);

/* The prepared queries in the per-head column form the device layer takes
 * (gpu/dev.h "score"): cols[h][c][d] float32, c < ncol. plan: 0 LINEAR (ncol 1),
 * 1 MAXVEC (ncol T'), 2 GENERAL (ncol T'*G); query_reduce as the scorer's (LAST
 * has already folded T' to 1). Exact: the same float32 values the CPU uses. */
typedef struct msa_idx_colplan {
    int plan;
    uint32_t H, D, G, ncol;
    msa_query_reduce_t query_reduce;
} msa_idx_colplan_t;

void msa_idx_scorer_colplan(const msa_idx_scorer_t *s, msa_idx_colplan_t *out);
/* Writes H*ncol*D floats. */
void msa_idx_scorer_columns(const msa_idx_scorer_t *s, float *cols);

/* For r < nrows: out[r] = query_reduce over t of head_reduce over j of
 *   dot(q'[t,j,:], key[r, j/G, :])   (G = Hq/H, q' normalised when cosine)
 * rows: nrows*H*D elements of key_dtype, row-major [r][h][d]; for I8 the key
 * value is int8 * scales[r*H + h] (scales is NULL otherwise).
 * A NaN result (possible only from overflowing finite inputs) is reported as
 * -INFINITY. Thread-safe for concurrent calls on one scorer. */
void msa_idx_scorer_run(const msa_idx_scorer_t *s, const void *rows, const float *scales,
                        size_t nrows, float *out);

/* Document score from its rows' scores (SEMANTICS "Routing" step 5): max, or
 * the float32 mean in row order (mean); NaN -> -INFINITY; n == 0 -> -INFINITY.
 * The CPU scan, the simulated device and the I8 re-rank all reduce this way. */
float msa_idx_chunk_reduce(const float *s, size_t n, bool mean);

/* ---- top-k ------------------------------------------------------------------ */

typedef struct msa_idx_hit {
    float score;
    uint64_t id;
} msa_idx_hit_t;

/* Keeps the k best hits: better = higher score, then smaller id. */
typedef struct msa_idx_topk {
    msa_idx_hit_t *heap; /* caller-provided storage of k entries */
    uint32_t n;
    uint32_t k;
} msa_idx_topk_t;

void msa_idx_topk_init(msa_idx_topk_t *t, msa_idx_hit_t *storage, uint32_t k);
void msa_idx_topk_push(msa_idx_topk_t *t, float score, uint64_t id);
/* Pushes every hit of src into dst. */
void msa_idx_topk_merge(msa_idx_topk_t *dst, const msa_idx_topk_t *src);
/* Writes the hits best first into out (t->n entries); t is left unusable. */
uint32_t msa_idx_topk_finish(msa_idx_topk_t *t, msa_idx_hit_t *out);

/* ---- attention -------------------------------------------------------------- */

/* SEMANTICS "Attention": q [T][Hq][D], k and v [R][H][D] float32;
 * out [T][Hq][D], lse [T][Hq] (natural log). R == 0: lse = -inf, out = 0.
 * Numerically stable (running max). Parallel over (kv head, query block) when
 * pool != NULL. Returns MSA_OK, or MSA_ENOMEM (out/lse then undefined). */
struct msa_idx_pool;
int msa_idx_attend(const float *q, uint32_t T, uint32_t Hq, uint32_t H, uint32_t D, const float *k,
                   const float *v, size_t R, float scale, float *out, float *lse,
                   struct msa_idx_pool *pool);

/* ---- thread pool -------------------------------------------------------------- */

typedef struct msa_idx_pool msa_idx_pool_t;

/* nthreads workers (0 = number of online CPUs). */
int msa_idx_pool_create(unsigned nthreads, msa_idx_pool_t **out);
void msa_idx_pool_destroy(msa_idx_pool_t *p);
unsigned msa_idx_pool_size(const msa_idx_pool_t *p);
/* Runs fn(arg, task, worker) for task in [0, ntasks) and returns when all are
 * done; worker < msa_idx_pool_size(p) + 1 names a per-call scratch slot (the
 * calling thread takes part as worker msa_idx_pool_size(p)). Safe to call from
 * several threads at once: jobs queue and each caller waits for its own. */
void msa_idx_pool_run(msa_idx_pool_t *p, size_t ntasks,
                      void (*fn)(void *arg, size_t task, unsigned worker), void *arg);

#ifdef __cplusplus
}
#endif
#endif
