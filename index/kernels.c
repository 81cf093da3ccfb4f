/* kernels.c — ISA detection and dispatch, the prepared scorer, and the scalar
 * reference path of the routing kernels.
 *
 * How scoring works: the scorer turns the client's queries into a set of
 * prepared float32 (or bf16 hi/lo) vectors once, laid out for the chosen ISA, and
 * msa_idx_scorer_run streams the rows in tiles of MSA__NK rows through the ISA's
 * tile function (a small register-blocked GEMM: MSA__NK keys x a few queries per
 * pass, keys converted once per pass). Three plans:
 *
 *   LINEAR   HEAD_MEAN and (QUERY_MEAN, QUERY_LAST, or T == 1): exact algebra
 *            folds heads (and tokens) into ONE vector of H*D values,
 *            qv[h][:] = sum_{t, j in group h} q'[t, j, :] / (Hq * T'), so each
 *            row costs one dot product in H*D dims: a pure streaming pass.
 *   MAXVEC   HEAD_MEAN + QUERY_MAX: T vectors of H*D values (group-summed per
 *            token, / Hq); out[r] = max over t of the dots (GEMM + max epilogue).
 *   GENERAL  HEAD_MAX: per kv head h the T*G query vectors of D values of that
 *            group; max over j, then the query reduce over t.
 *
 * I8 keys have one scale per (row, head), so for them the H*D vectors of the
 * first two plans are cut into H segments of D and the per-head dots are
 * scaled before they are summed.
 */
#include "kernels_impl.h"
#include "msa_alloc.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ==== ISA detection ======================================================== */

static const char *const isa_names[] = {"scalar", "avx2", "avx512", "avx512bf16"};

const char *msa_idx_isa_name(msa_isa_t isa)
{
    if ((unsigned)isa > MSA_ISA_AVX512BF16) return "?";
    return isa_names[isa];
}

/* clang before 16 does not know "f16c" in __builtin_cpu_supports (the fuzz
 * build uses clang): read CPUID.1:ECX instead. The OS state F16C needs is the
 * AVX state, which the avx2 check before it already covers. */
#if defined(__clang__)
#include <cpuid.h>
static bool has_f16c(void)
{
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}
#else
static bool has_f16c(void)
{
    return __builtin_cpu_supports("f16c");
}
#endif

/* libgcc's __builtin_cpu_supports checks the OS xsave state (XCR0) before it
 * reports AVX / AVX-512 features, so a feature seen here is usable. */
bool msa_idx_isa_supported(msa_isa_t isa)
{
    __builtin_cpu_init();
    switch (isa) {
    case MSA_ISA_SCALAR:
        return true;
    case MSA_ISA_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
    case MSA_ISA_AVX512:
        return msa_idx_isa_supported(MSA_ISA_AVX2) && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512dq");
    case MSA_ISA_AVX512BF16:
        return msa_idx_isa_supported(MSA_ISA_AVX512) && __builtin_cpu_supports("avx512bf16");
    }
    return false;
}

msa_isa_t msa_idx_isa_detect(void)
{
    msa_isa_t best = MSA_ISA_SCALAR;
    for (int i = MSA_ISA_AVX512BF16; i > MSA_ISA_SCALAR; i--) {
        if (msa_idx_isa_supported((msa_isa_t)i)) {
            best = (msa_isa_t)i;
            break;
        }
    }
    /* MSA_ISA may only lower the level: a higher or unknown name is ignored. */
    const char *env = getenv("MSA_ISA");
    if (env && *env) {
        for (int i = 0; i <= MSA_ISA_AVX512BF16; i++) {
            if (strcasecmp(env, isa_names[i]) == 0 && i < (int)best) best = (msa_isa_t)i;
        }
    }
    return best;
}

const msa__kern_ops_t *msa__kern_ops(msa_isa_t isa)
{
    switch (isa) {
    case MSA_ISA_AVX2:
        return &msa__ops_avx2;
    case MSA_ISA_AVX512:
        return &msa__ops_avx512;
    case MSA_ISA_AVX512BF16:
        return &msa__ops_avx512bf16;
    case MSA_ISA_SCALAR:
    default:
        return &msa__ops_scalar;
    }
}

/* ==== the scalar path ====================================================== */

/* The reference the SIMD paths are tested against (together with the test's
 * own double-precision oracle); plain loops, float32 accumulation. */
static inline float key_at(msa_dtype_t dt, const void *k, uint32_t l)
{
    switch (dt) {
    case MSA_DT_F32:
        return ((const float *)k)[l];
    case MSA_DT_F16:
        return msa__f16_f32(((const uint16_t *)k)[l]);
    case MSA_DT_BF16:
        return msa_bf16_to_f32(((const uint16_t *)k)[l]);
    default:
        return (float)((const int8_t *)k)[l];
    }
}

static inline void tile_scalar(msa_dtype_t dt, const float *q, size_t qstride, uint32_t nq,
                               const void *const *k, uint32_t L, float *acc, size_t ldacc)
{
    for (uint32_t i = 0; i < MSA__NK; i++) {
        for (uint32_t j = 0; j < nq; j++) {
            const float *qj = q + j * qstride;
            float s = 0.0f;
            for (uint32_t l = 0; l < L; l++) s += qj[l] * key_at(dt, k[i], l);
            acc[i * ldacc + j] = s;
        }
    }
}

static void tile_scalar_f32(const float *q, size_t qs, uint32_t nq, const void *const *k,
                            uint32_t L, float *acc, size_t ld)
{
    tile_scalar(MSA_DT_F32, q, qs, nq, k, L, acc, ld);
}
static void tile_scalar_f16(const float *q, size_t qs, uint32_t nq, const void *const *k,
                            uint32_t L, float *acc, size_t ld)
{
    tile_scalar(MSA_DT_F16, q, qs, nq, k, L, acc, ld);
}
static void tile_scalar_bf16(const float *q, size_t qs, uint32_t nq, const void *const *k,
                             uint32_t L, float *acc, size_t ld)
{
    tile_scalar(MSA_DT_BF16, q, qs, nq, k, L, acc, ld);
}
static void tile_scalar_i8(const float *q, size_t qs, uint32_t nq, const void *const *k, uint32_t L,
                           float *acc, size_t ld)
{
    tile_scalar(MSA_DT_I8, q, qs, nq, k, L, acc, ld);
}

static float dot_scalar(const float *a, const float *b, uint32_t n)
{
    float s = 0.0f;
    for (uint32_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static void axpy_scalar(float a, const float *x, float *y, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) y[i] += a * x[i];
}

const msa__kern_ops_t msa__ops_scalar = {
    .tile = {NULL, tile_scalar_f32, tile_scalar_f16, tile_scalar_bf16, tile_scalar_i8},
    .qfmt = {0, MSA__QF_F32, MSA__QF_F32, MSA__QF_F32, MSA__QF_F32},
    .dot = dot_scalar,
    .axpy = axpy_scalar,
};

/* ==== the prepared scorer ================================================== */

typedef enum { PLAN_LINEAR = 0, PLAN_MAXVEC, PLAN_GENERAL } plan_t;

struct msa_idx_scorer {
    uint32_t T, Hq, H, D, G;
    msa_head_reduce_t head_reduce;
    msa_query_reduce_t query_reduce;
    msa_dtype_t key_dtype;
    msa_isa_t isa;
    plan_t plan;
    msa__tile_fn tile;
    uint8_t qfmt;
    uint32_t nvec; /* LINEAR/MAXVEC: query vectors; GENERAL: tokens used (T') */
    uint32_t nseg; /* segments per vector: 1, or H for I8 (LINEAR/MAXVEC) */
    uint32_t L;    /* true length of one segment: H*D, or D */
    uint32_t Lp;   /* padded length (floats) of one segment */
    float *qf;     /* float32 vectors before formatting (kept for re-formatting) */
    float *qp;     /* prepared vectors in qfmt */
};

static uint32_t pad_up(uint32_t n, uint32_t m)
{
    return (n + m - 1) / m * m;
}

/* Writes one segment of L floats (src) in format f into dst (Lp floats' worth). */
static void format_segment(uint8_t f, const float *src, uint32_t L, uint32_t Lp, float *dst)
{
    switch (f) {
    case MSA__QF_F32:
        memcpy(dst, src, L * sizeof(float));
        memset(dst + L, 0, (Lp - L) * sizeof(float));
        break;
    case MSA__QF_F32_EO32:
    case MSA__QF_F32_EO16: {
        uint32_t B = f == MSA__QF_F32_EO32 ? 32 : 16;
        for (uint32_t b = 0; b < Lp; b += B) {
            for (uint32_t i = 0; i < B; i++) {
                uint32_t l = b + i;
                float x = l < L ? src[l] : 0.0f;
                dst[b + (i & 1u) * (B / 2) + i / 2] = x;
            }
        }
        break;
    }
    case MSA__QF_BF16X2:
    case MSA__QF_BF16X1: {
        uint16_t *d16 = (uint16_t *)(void *)dst;
        for (uint32_t b = 0; b < Lp; b += 32) {
            for (uint32_t i = 0; i < 32; i++) {
                uint32_t l = b + i;
                float x = l < L ? src[l] : 0.0f;
                uint16_t hi = msa_f32_to_bf16(x);
                uint16_t lo = f == MSA__QF_BF16X2 ? msa_f32_to_bf16(x - msa_bf16_to_f32(hi)) : 0;
                d16[2 * b + i] = hi;
                d16[2 * b + 32 + i] = lo;
            }
        }
        break;
    }
    }
}

static void format_all(msa_idx_scorer_t *s)
{
    size_t nsegs = (size_t)s->nvec * s->nseg;
    if (s->plan == PLAN_GENERAL) nsegs = (size_t)s->nvec * s->Hq;
    for (size_t i = 0; i < nsegs; i++)
        format_segment(s->qfmt, s->qf + i * s->Lp, s->L, s->Lp, s->qp + i * s->Lp);
}

int msa_idx_scorer_create(const float *q, uint32_t T, uint32_t Hq, uint32_t H, uint32_t D,
                          bool cosine, msa_head_reduce_t head_reduce,
                          msa_query_reduce_t query_reduce, msa_dtype_t key_dtype, msa_isa_t isa,
                          msa_idx_scorer_t **out)
{
    *out = NULL;
    if (!q || T == 0 || H == 0 || D == 0 || Hq == 0 || Hq % H != 0 ||
        (head_reduce != MSA_HEAD_MEAN && head_reduce != MSA_HEAD_MAX) ||
        (query_reduce != MSA_QUERY_MAX && query_reduce != MSA_QUERY_MEAN &&
         query_reduce != MSA_QUERY_LAST) ||
        key_dtype < MSA_DT_F32 || key_dtype > MSA_DT_I8 || (unsigned)isa > MSA_ISA_AVX512BF16 ||
        !msa_idx_isa_supported(isa))
        return MSA_EINVAL;
    /* Segment sizes are uint32 (H*D <= 64*256 in any valid schema). */
    if ((uint64_t)H * D > (1u << 24)) return MSA_EINVAL;

    msa_idx_scorer_t *s = msa_calloc(1, sizeof *s);
    if (!s) return MSA_ENOMEM;
    const msa__kern_ops_t *ops = msa__kern_ops(isa);
    s->T = T;
    s->Hq = Hq;
    s->H = H;
    s->D = D;
    s->G = Hq / H;
    s->head_reduce = head_reduce;
    s->query_reduce = query_reduce;
    s->key_dtype = key_dtype;
    s->isa = isa;
    s->tile = ops->tile[key_dtype];
    s->qfmt = ops->qfmt[key_dtype];
    const uint32_t G = s->G;
    const uint32_t HD = H * D;
    const uint32_t t0 = query_reduce == MSA_QUERY_LAST ? T - 1 : 0;
    const uint32_t Tu = T - t0; /* tokens used */
    const bool i8 = key_dtype == MSA_DT_I8;

    if (head_reduce == MSA_HEAD_MAX) {
        s->plan = PLAN_GENERAL;
        s->nvec = Tu;
        s->nseg = 1;
        s->L = D;
    } else {
        s->plan = (query_reduce == MSA_QUERY_MAX && Tu > 1) ? PLAN_MAXVEC : PLAN_LINEAR;
        s->nvec = s->plan == PLAN_MAXVEC ? Tu : 1;
        s->nseg = i8 ? H : 1;
        s->L = i8 ? D : HD;
    }
    s->Lp = pad_up(s->L, MSA__QPAD);
    size_t nsegs = s->plan == PLAN_GENERAL ? (size_t)Tu * Hq : (size_t)s->nvec * s->nseg;
    size_t nfl = nsegs * s->Lp;
    s->qf = msa_calloc(nfl, sizeof(float));
    s->qp = aligned_alloc(64, (nfl * sizeof(float) + 63) / 64 * 64);
    float *tmp = msa_malloc((size_t)D * sizeof(float));
    if (!s->qf || !s->qp || !tmp) {
        free(tmp);
        msa_idx_scorer_destroy(s);
        return MSA_ENOMEM;
    }

    /* qf: GENERAL layout [h][t][g][Lp]; LINEAR/MAXVEC layout [v][seg][Lp] where
     * one vector of H*D values either fills segment 0 (Lp >= H*D) or, for I8,
     * head h fills segment h. */
    const float inv = head_reduce == MSA_HEAD_MEAN
                          ? (float)(1.0 / ((double)Hq * (s->plan == PLAN_LINEAR ? Tu : 1)))
                          : 1.0f;
    for (uint32_t t = t0; t < T; t++) {
        for (uint32_t j = 0; j < Hq; j++) {
            const float *src = q + ((size_t)t * Hq + j) * D;
            double nn = 0.0;
            for (uint32_t d = 0; d < D; d++) nn += (double)src[d] * src[d];
            float f = 1.0f;
            if (cosine) f = nn > 0.0 ? (float)(1.0 / sqrt(nn)) : 0.0f;
            for (uint32_t d = 0; d < D; d++) tmp[d] = src[d] * f;
            uint32_t h = j / G, g = j % G, tu = t - t0;
            if (s->plan == PLAN_GENERAL) {
                float *dst = s->qf + (((size_t)h * Tu + tu) * G + g) * s->Lp;
                memcpy(dst, tmp, D * sizeof(float));
            } else {
                size_t v = s->plan == PLAN_MAXVEC ? tu : 0;
                float *dst = s->qf + v * s->nseg * s->Lp + (i8 ? (size_t)h * s->Lp : (size_t)h * D);
                for (uint32_t d = 0; d < D; d++) dst[d] += tmp[d];
            }
        }
    }
    free(tmp);
    if (s->plan != PLAN_GENERAL) {
        for (size_t i = 0; i < nfl; i++) s->qf[i] *= inv;
    }
    format_all(s);
    *out = s;
    return MSA_OK;
}

int msa__scorer_set_bf16_terms(msa_idx_scorer_t *s, int terms)
{
    if (!s || (s->qfmt != MSA__QF_BF16X2 && s->qfmt != MSA__QF_BF16X1) || terms < 1 || terms > 2)
        return MSA_EINVAL;
    s->qfmt = terms == 1 ? MSA__QF_BF16X1 : MSA__QF_BF16X2;
    s->tile = terms == 1 ? msa__tile_avx512bf16_x1 : msa__ops_avx512bf16.tile[MSA_DT_BF16];
    format_all(s);
    return MSA_OK;
}

void msa_idx_scorer_colplan(const msa_idx_scorer_t *s, msa_idx_colplan_t *out)
{
    out->plan = (int)s->plan;
    out->H = s->H;
    out->D = s->D;
    out->G = s->G;
    out->ncol = s->plan == PLAN_GENERAL ? s->nvec * s->G : s->nvec;
    out->query_reduce = s->query_reduce;
}

void msa_idx_scorer_columns(const msa_idx_scorer_t *s, float *cols)
{
    const uint32_t H = s->H, D = s->D;
    if (s->plan == PLAN_GENERAL) {
        /* qf is [h][t][g][Lp]: per head, T'*G consecutive vectors. */
        const uint32_t nc = s->nvec * s->G;
        for (uint32_t h = 0; h < H; h++)
            for (uint32_t c = 0; c < nc; c++)
                memcpy(cols + ((size_t)h * nc + c) * D, s->qf + ((size_t)h * nc + c) * s->Lp,
                       D * sizeof(float));
        return;
    }
    /* qf is [v][seg][Lp]: one H*D vector in segment 0, or (I8) head h in segment h. */
    const bool i8 = s->key_dtype == MSA_DT_I8;
    for (uint32_t h = 0; h < H; h++)
        for (uint32_t v = 0; v < s->nvec; v++) {
            const float *src =
                s->qf + (size_t)v * s->nseg * s->Lp + (i8 ? (size_t)h * s->Lp : (size_t)h * D);
            memcpy(cols + ((size_t)h * s->nvec + v) * D, src, D * sizeof(float));
        }
}

void msa_idx_scorer_destroy(msa_idx_scorer_t *s)
{
    if (!s) return;
    free(s->qf);
    free(s->qp);
    free(s);
}

/* ==== scoring ============================================================== */

/* Max that keeps a NaN once it has seen one (so overflow shows as -inf at the end). */
static inline float max_nan(float m, float x)
{
    return (x > m || x != x) ? x : m;
}

void msa_idx_scorer_run(const msa_idx_scorer_t *s, const void *rows, const float *scales,
                        size_t nrows, float *out)
{
    const msa_dtype_t dt = s->key_dtype;
    const size_t esz = dt == MSA_DT_F32 ? 4 : dt == MSA_DT_I8 ? 1 : 2;
    const uint32_t H = s->H, D = s->D, G = s->G, Lp = s->Lp;
    const size_t rowbytes = (size_t)H * D * esz;
    const bool i8 = dt == MSA_DT_I8;
    msa_assert(!i8 || scales);
    const char *base = rows;
    float acc[MSA__NK * MSA__QB];
    float res[MSA__NK];

    for (size_t r0 = 0; r0 < nrows; r0 += MSA__NK) {
        const uint32_t nk = nrows - r0 < MSA__NK ? (uint32_t)(nrows - r0) : MSA__NK;
        const void *kp[MSA__NK];
        const void *kh[MSA__NK];
        size_t ri[MSA__NK];
        for (uint32_t i = 0; i < MSA__NK; i++) {
            ri[i] = r0 + (i < nk ? i : nk - 1);
            kp[i] = base + ri[i] * rowbytes;
        }

        if (s->plan != PLAN_GENERAL) {
            for (uint32_t i = 0; i < MSA__NK; i++) res[i] = -INFINITY;
            for (uint32_t v0 = 0; v0 < s->nvec; v0 += MSA__QB) {
                const uint32_t nq = s->nvec - v0 < MSA__QB ? s->nvec - v0 : MSA__QB;
                const size_t vstride = (size_t)s->nseg * Lp;
                const float *qv = s->qp + (size_t)v0 * vstride;
                if (!i8) {
                    s->tile(qv, vstride, nq, kp, s->L, acc, MSA__QB);
                } else {
                    /* Per-head segments, each scaled by its row's scale. */
                    float part[MSA__NK * MSA__QB];
                    for (uint32_t h = 0; h < H; h++) {
                        for (uint32_t i = 0; i < MSA__NK; i++)
                            kh[i] = (const int8_t *)kp[i] + (size_t)h * D;
                        s->tile(qv + (size_t)h * Lp, vstride, nq, kh, D, h ? part : acc, MSA__QB);
                        for (uint32_t i = 0; i < MSA__NK; i++) {
                            const float sc = scales[ri[i] * H + h];
                            float *a = acc + i * MSA__QB;
                            if (h == 0) {
                                for (uint32_t j = 0; j < nq; j++) a[j] *= sc;
                            } else {
                                const float *p = part + i * MSA__QB;
                                for (uint32_t j = 0; j < nq; j++) a[j] += sc * p[j];
                            }
                        }
                    }
                }
                for (uint32_t i = 0; i < nk; i++) {
                    const float *a = acc + i * MSA__QB;
                    float m = res[i];
                    for (uint32_t j = 0; j < nq; j++) m = max_nan(m, a[j]);
                    res[i] = m;
                }
            }
        } else {
            /* HEAD_MAX: token blocks of TB tokens so that TB*G queries fit a tile
             * call; per block, max over all heads j, then the query reduce. */
            const uint32_t Tu = s->nvec;
            const uint32_t TB = G >= MSA__QB ? 1 : MSA__QB / G;
            float hm[MSA__NK * MSA__QB];
            for (uint32_t i = 0; i < MSA__NK; i++)
                res[i] = s->query_reduce == MSA_QUERY_MEAN ? 0.0f : -INFINITY;
            for (uint32_t tb = 0; tb < Tu; tb += TB) {
                const uint32_t nt = Tu - tb < TB ? Tu - tb : TB;
                for (uint32_t i = 0; i < MSA__NK * nt; i++) hm[i] = -INFINITY;
                for (uint32_t h = 0; h < H; h++) {
                    for (uint32_t i = 0; i < MSA__NK; i++)
                        kh[i] = (const char *)kp[i] + (size_t)h * D * esz;
                    const float *qh = s->qp + ((size_t)h * Tu + tb) * G * Lp;
                    /* G > MSA__QB: one token's group in several calls. */
                    for (uint32_t g0 = 0; g0 < nt * G; g0 += MSA__QB) {
                        const uint32_t nq = nt * G - g0 < MSA__QB ? nt * G - g0 : MSA__QB;
                        s->tile(qh + (size_t)g0 * Lp, Lp, nq, kh, D, acc, MSA__QB);
                        for (uint32_t i = 0; i < nk; i++) {
                            const float sc = i8 ? scales[ri[i] * H + h] : 1.0f;
                            const float *a = acc + i * MSA__QB;
                            float *m = hm + i * nt;
                            for (uint32_t j = 0; j < nq; j++) {
                                const uint32_t t = (g0 + j) / G;
                                m[t] = max_nan(m[t], a[j] * sc);
                            }
                        }
                    }
                }
                for (uint32_t i = 0; i < nk; i++) {
                    const float *m = hm + i * nt;
                    float r = res[i];
                    if (s->query_reduce == MSA_QUERY_MEAN) {
                        for (uint32_t t = 0; t < nt; t++) r += m[t];
                    } else {
                        for (uint32_t t = 0; t < nt; t++) r = max_nan(r, m[t]);
                    }
                    res[i] = r;
                }
            }
            if (s->query_reduce == MSA_QUERY_MEAN) {
                for (uint32_t i = 0; i < nk; i++) res[i] /= (float)Tu;
            }
        }
        for (uint32_t i = 0; i < nk; i++) out[r0 + i] = res[i] != res[i] ? -INFINITY : res[i];
    }
}
