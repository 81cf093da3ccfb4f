/* tensor.c — dtypes, F16/BF16 conversions, pooling, normalisation,
 * quantisation and validation (see tensor.h for the contracts).
 *
 * Numerics decided here, and what every other module (and tests/oracle.py)
 * relies on:
 *   - F16/BF16 rounding is IEEE round-to-nearest-even done with integer bit
 *     operations (no dependence on the compiler's _Float16 or the FPU mode).
 *     NaN stays NaN (quiet, sign and top payload bits kept); finite values that
 *     round past the largest finite value become +-Inf, as IEEE says.
 *   - Pooling sums the tokens of a chunk in float32, in token order, and divides
 *     the float32 sum by the float32 token count (SEMANTICS "Pooling").
 *   - L2 normalisation computes the sum of squares and the norm in double and
 *     each quotient x / norm in double, then rounds once to float32.
 *   - I8 quantisation works in float32: scale = max|x| / 127, q = x / scale
 *     rounded half away from zero (roundf), clamped to [-127, 127].
 * The host is little-endian (checked at compile time), so F32 tensors are read
 * with memcpy.
 */
#include "tensor.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "msad assumes a little-endian host (tensors are little-endian on the wire and on disk)"
#endif

/* ==== dtypes ================================================================ */

size_t msa_dtype_size(msa_dtype_t dt)
{
    switch (dt) {
    case MSA_DT_F32:
        return 4;
    case MSA_DT_F16:
    case MSA_DT_BF16:
        return 2;
    case MSA_DT_I8:
        return 1;
    default:
        return 0;
    }
}

const char *msa_dtype_name(msa_dtype_t dt)
{
    switch (dt) {
    case MSA_DT_UNSPECIFIED:
        return "DTYPE_UNSPECIFIED";
    case MSA_DT_F32:
        return "F32";
    case MSA_DT_F16:
        return "F16";
    case MSA_DT_BF16:
        return "BF16";
    case MSA_DT_I8:
        return "I8";
    }
    return "?";
}

/* ==== scalar conversions ===================================================== */

static inline uint32_t f32_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static inline float bits_f32(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* msa_f32_to_bf16 and msa_bf16_to_f32 are inline in tensor.h. */

uint16_t msa_f32_to_f16(float x)
{
    uint32_t u = f32_bits(x);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;

    if (a >= 0x7f800000u) {
        if (a == 0x7f800000u) return (uint16_t)(sign | 0x7c00u); /* Inf */
        /* NaN: quiet bit set, top payload bits kept. */
        return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x03ffu));
    }
    /* 65520 = 0x477ff000 is halfway between 65504 (max, odd mantissa) and
     * 2^16; ties-to-even and everything above round to Inf. */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);

    if (a < 0x38800000u) {
        /* Below the smallest normal 2^-14: a subnormal in units of 2^-24.
         * 2^-25 (0x33000000) is the halfway point to 0 and rounds to even 0. */
        if (a <= 0x33000000u) return sign;
        uint32_t e = a >> 23;                         /* 102..112 */
        uint32_t m = (a & 0x007fffffu) | 0x00800000u; /* value = m * 2^(e-150) */
        uint32_t shift = 126u - e;                    /* 14..24 */
        uint32_t r = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (r & 1u))) r++; /* may become 0x400: min normal */
        return (uint16_t)(sign | r);
    }

    uint32_t e = (a >> 23) - 112u; /* 1..30 */
    uint32_t m = a & 0x007fffffu;
    uint32_t r = (e << 10) | (m >> 13);
    uint32_t rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++; /* carry into exponent is right */
    return (uint16_t)(sign | r);
}

float msa_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x03ffu;
    if (e == 0x1fu) return bits_f32(sign | 0x7f800000u | (m << 13)); /* Inf / NaN */
    if (e == 0) {
        if (m == 0) return bits_f32(sign);
        /* Subnormal: normalise the mantissa. value = m * 2^-24. */
        uint32_t ee = 113u; /* exponent field of 2^-14 */
        while (!(m & 0x0400u)) {
            m <<= 1;
            ee--;
        }
        m &= 0x03ffu;
        return bits_f32(sign | (ee << 23) | (m << 13));
    }
    return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

/* ==== bulk conversions ======================================================= */

/* 16-bit codes (F16 or BF16, by the converter) to and from f32; the codes may be
 * unaligned. Inlined where called, so cv becomes a direct call (-O2 code is the
 * same as with one loop per dtype). */
static inline void codes16_to_f32(const uint8_t *p, size_t n, float (*cv)(uint16_t), float *dst)
{
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        dst[i] = cv(h);
    }
}

static inline void f32_to_codes16(const float *src, size_t n, uint16_t (*cv)(float), uint8_t *p)
{
    for (size_t i = 0; i < n; i++) {
        uint16_t h = cv(src[i]);
        memcpy(p + 2 * i, &h, 2);
    }
}

void msa_tensor_to_f32(msa_dtype_t dt, const void *src, size_t n, float *dst)
{
    const uint8_t *p = src;
    switch (dt) {
    case MSA_DT_F32:
        memmove(dst, src, n * sizeof(float));
        return;
    case MSA_DT_F16:
        codes16_to_f32(p, n, msa_f16_to_f32, dst);
        return;
    case MSA_DT_BF16:
        codes16_to_f32(p, n, msa_bf16_to_f32, dst);
        return;
    case MSA_DT_I8:
        /* Plain integer values (no scale): handy for tests and dumps. */
        for (size_t i = 0; i < n; i++) dst[i] = (float)(int8_t)p[i];
        return;
    default:
        msa_assert(!"msa_tensor_to_f32: unknown dtype");
    }
}

void msa_tensor_from_f32(msa_dtype_t dt, const float *src, size_t n, void *dst)
{
    uint8_t *p = dst;
    switch (dt) {
    case MSA_DT_F32:
        memmove(dst, src, n * sizeof(float));
        return;
    case MSA_DT_F16:
        f32_to_codes16(src, n, msa_f32_to_f16, p);
        return;
    case MSA_DT_BF16:
        f32_to_codes16(src, n, msa_f32_to_bf16, p);
        return;
    default:
        msa_assert(!"msa_tensor_from_f32: dtype must be F32, F16 or BF16");
    }
}

/* The first of n 16-bit codes whose exponent field (exp_mask) is all ones, or -1. */
/* Finds the first element whose exponent bits are all ones (Inf or NaN).
 * Blocks of 64 are tested with a branch-free OR that the compiler vectorises;
 * only a block with a hit is searched element by element. */
#define NONFINITE_BLOCK 64
#define DEFINE_FIND_EXP_ALL_ONES(name, type)                          \
    static long name(const uint8_t *p, size_t n, type exp_mask)       \
    {                                                                 \
        size_t i = 0;                                                 \
        for (; i + NONFINITE_BLOCK <= n; i += NONFINITE_BLOCK) {      \
            unsigned hit = 0;                                         \
            for (size_t j = 0; j < NONFINITE_BLOCK; j++) {            \
                type h;                                               \
                memcpy(&h, p + sizeof(type) * (i + j), sizeof(type)); \
                hit |= (h & exp_mask) == exp_mask;                    \
            }                                                         \
            if (hit) break;                                           \
        }                                                             \
        for (; i < n; i++) {                                          \
            type h;                                                   \
            memcpy(&h, p + sizeof(type) * i, sizeof(type));           \
            if ((h & exp_mask) == exp_mask) return (long)i;           \
        }                                                             \
        return -1;                                                    \
    }
DEFINE_FIND_EXP_ALL_ONES(find_exp_all_ones16, uint16_t)
DEFINE_FIND_EXP_ALL_ONES(find_exp_all_ones32, uint32_t)

long msa_tensor_find_nonfinite(msa_dtype_t dt, const void *data, size_t n)
{
    const uint8_t *p = data;
    switch (dt) {
    case MSA_DT_F32:
        return find_exp_all_ones32(p, n, 0x7f800000u);
    case MSA_DT_F16:
        return find_exp_all_ones16(p, n, 0x7c00u);
    case MSA_DT_BF16:
        return find_exp_all_ones16(p, n, 0x7f80u);
    default:
        return -1; /* I8 and unknown dtypes have no non-finite values */
    }
}

/* ==== pooling, normalisation, quantisation ==================================== */

void msa_tensor_pool(const float *raw, uint32_t N, uint32_t W, uint32_t P, float *out)
{
    msa_assert(P > 0);
    uint32_t C = N / P + (N % P != 0);
    for (uint32_t c = 0; c < C; c++) {
        uint32_t t0 = c * P;
        uint32_t t1 = (N - t0 < P) ? N : t0 + P;
        float *o = out + (size_t)c * W;
        for (uint32_t w = 0; w < W; w++) o[w] = 0.0f;
        for (uint32_t t = t0; t < t1; t++) {
            const float *r = raw + (size_t)t * W;
            for (uint32_t w = 0; w < W; w++) o[w] += r[w];
        }
        float cnt = (float)(t1 - t0);
        for (uint32_t w = 0; w < W; w++) o[w] = o[w] / cnt;
    }
}

void msa_tensor_l2_normalize(float *x, size_t n, uint32_t d)
{
    for (size_t i = 0; i < n; i++) {
        float *v = x + i * (size_t)d;
        double ss = 0.0;
        for (uint32_t j = 0; j < d; j++) ss += (double)v[j] * (double)v[j];
        if (ss == 0.0) continue; /* zero stays zero */
        double norm = sqrt(ss);
        for (uint32_t j = 0; j < d; j++) v[j] = (float)((double)v[j] / norm);
    }
}

void msa_tensor_quantize_i8(const float *x, uint32_t H, uint32_t D, int8_t *q, float *scale)
{
    for (uint32_t h = 0; h < H; h++) {
        const float *xh = x + (size_t)h * D;
        int8_t *qh = q + (size_t)h * D;
        float amax = 0.0f;
        for (uint32_t i = 0; i < D; i++) {
            float a = fabsf(xh[i]);
            if (a > amax) amax = a;
        }
        float s = amax / 127.0f;
        scale[h] = s;
        if (s == 0.0f) {
            memset(qh, 0, D);
            continue;
        }
        for (uint32_t i = 0; i < D; i++) {
            float r = roundf(xh[i] / s);
            if (r > 127.0f) r = 127.0f;
            if (r < -127.0f) r = -127.0f;
            /* Only non-finite input (Inf / Inf) gets here as NaN; converting NaN
             * to int8_t is undefined behaviour, so it becomes 0. The engine
             * refuses non-finite keys before they reach the index. */
            if (r != r) r = 0.0f;
            qh[i] = (int8_t)r;
        }
    }
}

/* ==== validation ============================================================= */

void msa_tensor_shape_str(const uint32_t *shape, uint32_t ndim, char *buf, size_t len)
{
    if (!buf || len == 0) return;
    size_t o = 0;
    int w = snprintf(buf, len, "[");
    o = (w > 0 && (size_t)w < len) ? (size_t)w : len - 1;
    for (uint32_t i = 0; i < ndim && o < len - 1; i++) {
        w = snprintf(buf + o, len - o, "%s%" PRIu32, i ? "," : "", shape[i]);
        if (w < 0) break;
        o += (size_t)w < len - o ? (size_t)w : len - 1 - o;
    }
    if (o < len - 1) {
        snprintf(buf + o, len - o, "]");
    } else {
        buf[len - 1] = '\0';
    }
}

/* Like msa_tensor_shape_str, but a wanted extent of 0 ("any") prints as '*'. */
static void want_shape_str(const uint32_t *shape, uint32_t ndim, char *buf, size_t len)
{
    size_t o = 0;
    buf[0] = '\0';
    o += (size_t)snprintf(buf + o, len - o, "[");
    for (uint32_t i = 0; i < ndim && o < len; i++) {
        if (shape[i] == 0)
            o += (size_t)snprintf(buf + o, len - o, "%s*", i ? "," : "");
        else
            o += (size_t)snprintf(buf + o, len - o, "%s%" PRIu32, i ? "," : "", shape[i]);
    }
    if (o < len) snprintf(buf + o, len - o, "]");
}

int msa_tensor_validate(const msa_tensor_t *t, msa_dtype_t want_dtype, uint32_t ndim,
                        const uint32_t *want_shape, const char *path, msa_status_t *st)
{
    char have[80], want[80];
    msa_assert(ndim >= 1 && ndim <= MSA_TENSOR_MAX_DIMS);
    if (!path) path = "tensor";
    if (!t) return msa_status_set(st, MSA_EINVAL, "%s: missing", path);

    /* 1. dtype */
    if (want_dtype == MSA_DT_UNSPECIFIED) {
        if (t->dtype != MSA_DT_F32 && t->dtype != MSA_DT_F16 && t->dtype != MSA_DT_BF16) {
            if (msa_dtype_size(t->dtype) == 0 && t->dtype != MSA_DT_UNSPECIFIED)
                return msa_status_set(st, MSA_EINVAL, "%s: dtype %d unknown, want F32, F16 or BF16",
                                      path, (int)t->dtype);
            return msa_status_set(st, MSA_EINVAL, "%s: dtype %s, want F32, F16 or BF16", path,
                                  msa_dtype_name(t->dtype));
        }
    } else if (t->dtype != want_dtype) {
        if (msa_dtype_size(t->dtype) == 0 && t->dtype != MSA_DT_UNSPECIFIED)
            return msa_status_set(st, MSA_EINVAL, "%s: dtype %d unknown, want %s", path,
                                  (int)t->dtype, msa_dtype_name(want_dtype));
        return msa_status_set(st, MSA_EINVAL, "%s: dtype %s, want %s", path,
                              msa_dtype_name(t->dtype), msa_dtype_name(want_dtype));
    }

    /* 2. rank */
    if (t->ndim != ndim)
        return msa_status_set(st, MSA_EINVAL, "%s: rank %" PRIu32 ", want %" PRIu32, path, t->ndim,
                              ndim);

    /* 3. shape; a wanted 0 accepts any extent except 0 (an empty query or
     * tensor is never meaningful and would only reach the kernels as T = 0). */
    bool bad = false, zero = false;
    for (uint32_t i = 0; i < ndim; i++) {
        if (want_shape && want_shape[i] != 0 && t->shape[i] != want_shape[i]) bad = true;
        if (t->shape[i] == 0) zero = true;
    }
    if (bad || zero) {
        static const uint32_t any[MSA_TENSOR_MAX_DIMS] = {0, 0, 0, 0};
        msa_tensor_shape_str(t->shape, ndim, have, sizeof have);
        if (!bad) return msa_status_set(st, MSA_EINVAL, "%s: shape %s has no elements", path, have);
        want_shape_str(want_shape ? want_shape : any, ndim, want, sizeof want);
        return msa_status_set(st, MSA_EINVAL, "%s: shape %s, want %s", path, have, want);
    }

    /* 4. byte length. Four extents below 2^32 can overflow 64 bits, so the
     * products are checked. */
    uint64_t n = 1;
    for (uint32_t i = 0; i < ndim; i++) {
        if (__builtin_mul_overflow(n, (uint64_t)t->shape[i], &n)) {
            msa_tensor_shape_str(t->shape, ndim, have, sizeof have);
            return msa_status_set(st, MSA_EINVAL, "%s: shape %s is too large", path, have);
        }
    }
    uint64_t want_bytes;
    if (__builtin_mul_overflow(n, (uint64_t)msa_dtype_size(t->dtype), &want_bytes)) {
        msa_tensor_shape_str(t->shape, ndim, have, sizeof have);
        return msa_status_set(st, MSA_EINVAL, "%s: shape %s is too large", path, have);
    }
    size_t have_bytes = t->data ? t->nbytes : 0;
    if ((uint64_t)have_bytes != want_bytes) {
        msa_tensor_shape_str(t->shape, ndim, have, sizeof have);
        return msa_status_set(st, MSA_EINVAL, "%s: %zu bytes, want %" PRIu64 " for shape %s %s",
                              path, have_bytes, want_bytes, have, msa_dtype_name(t->dtype));
    }

    /* 5. finiteness */
    long bad_i = msa_tensor_find_nonfinite(t->dtype, t->data, (size_t)n);
    if (bad_i >= 0) {
        float v;
        const uint8_t *at = (const uint8_t *)t->data + (size_t)bad_i * msa_dtype_size(t->dtype);
        msa_tensor_to_f32(t->dtype, at, 1, &v);
        return msa_status_set(st, MSA_EINVAL, "%s: element %ld is %s", path, bad_i,
                              isnan(v) ? "NaN" : (v > 0 ? "Inf" : "-Inf"));
    }
    msa_status_clear(st);
    return MSA_OK;
}
