/* test_tensor.c — storage/tensor.c and storage/schema.c: F16/BF16 conversions
 * against independently computed bit patterns, pooling, normalisation,
 * quantisation, validation messages, schema rules and the schema encoding.
 *
 * The reference conversions here are written differently from tensor.c on
 * purpose: to_f32 uses ldexp() on the decoded fields, and from_f32 finds the
 * nearest representable value by searching the (exhaustively decoded) table of
 * all 65536 values, so a shared misunderstanding cannot hide.
 */
#include "harness.h"
#include "schema.h"
#include "tensor.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint32_t fbits(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

static float bitsf(uint32_t u)
{
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* ==== independent references ================================================== */

/* IEEE binary16 decoded with ldexp: value = (-1)^s * m * 2^(e - 25) etc. */
static double ref_f16_value(uint16_t h)
{
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v;
    if (e == 31)
        v = m ? NAN : INFINITY;
    else if (e == 0)
        v = ldexp((double)m, -24);
    else
        v = ldexp((double)(m + 1024), e - 25);
    return s ? -v : v;
}

/* bfloat16 decoded from its fields: 8 exponent bits (bias 127), 7 mantissa bits. */
static double ref_bf16_value(uint16_t h)
{
    int s = h >> 15, e = (h >> 7) & 255, m = h & 127;
    double v;
    if (e == 255)
        v = m ? NAN : INFINITY;
    else if (e == 0)
        v = ldexp((double)m, -133);
    else
        v = ldexp((double)(m + 128), e - 134);
    return s ? -v : v;
}

/* Nearest-even rounding of a finite double to a format, found by search over
 * the non-negative finite codes 0..maxcode (ascending in value). The value
 * beyond the top is the next power of two (the "code" after max); reaching
 * it or its halfway point rounds to Inf. */
static uint16_t ref_round(double x, double (*value)(uint16_t), uint16_t maxcode, uint16_t infcode)
{
    uint16_t sign = signbit(x) ? 0x8000 : 0;
    double a = fabs(x);
    /* binary search for the largest code with value <= a */
    int lo = 0, hi = maxcode;
    if (a >= value(maxcode)) {
        lo = maxcode;
    } else {
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (value((uint16_t)mid) <= a)
                lo = mid;
            else
                hi = mid - 1;
        }
    }
    double below = value((uint16_t)lo);
    if (below == a) return (uint16_t)(sign | lo);
    double above = (lo == maxcode) ? 2.0 * value(maxcode) - value((uint16_t)(maxcode - 1)) +
                                         0.0 /* next step beyond max */
                                   : value((uint16_t)(lo + 1));
    /* Past max the next "value" is max + ulp (= 2^(emax+1)); it encodes as Inf. */
    uint16_t up = (lo == maxcode) ? infcode : (uint16_t)(lo + 1);
    double d1 = a - below, d2 = above - a;
    if (d1 < d2) return (uint16_t)(sign | lo);
    if (d2 < d1) return (uint16_t)(sign | up);
    return (uint16_t)(sign | ((lo & 1) ? up : lo));
}

static uint16_t ref_f32_to_f16(float x)
{
    return ref_round(x, ref_f16_value, 0x7bff, 0x7c00);
}
static uint16_t ref_f32_to_bf16(float x)
{
    return ref_round(x, ref_bf16_value, 0x7f7f, 0x7f80);
}

/* ==== conversions ============================================================= */

TEST(f16_to_f32_exhaustive)
{
    for (uint32_t h = 0; h < 65536; h++) {
        float got = msa_f16_to_f32((uint16_t)h);
        double want = ref_f16_value((uint16_t)h);
        if (isnan(want)) {
            CHECK(isnan(got));
            CHECK_EQ_U(fbits(got) >> 31, h >> 15);             /* sign kept */
            CHECK_EQ_U((fbits(got) >> 13) & 0x3ff, h & 0x3ff); /* payload kept */
        } else {
            if ((double)got != want) fprintf(stderr, "h=0x%04x\n", h);
            CHECK((double)got == want);
            CHECK_EQ_U(fbits(got) >> 31, h >> 15); /* -0 stays -0 */
        }
    }
}

TEST(bf16_to_f32_exhaustive)
{
    for (uint32_t h = 0; h < 65536; h++) {
        float got = msa_bf16_to_f32((uint16_t)h);
        double want = ref_bf16_value((uint16_t)h);
        if (isnan(want)) {
            CHECK(isnan(got));
        } else {
            if ((double)got != want) fprintf(stderr, "h=0x%04x\n", h);
            CHECK((double)got == want);
            CHECK_EQ_U(fbits(got) >> 31, h >> 15);
        }
    }
}

/* Every f16 value, the exact midpoints between neighbours, and the floats one
 * ulp either side of each midpoint: every rounding decision the format has. */
TEST(f32_to_f16_boundaries)
{
    for (uint32_t h = 0; h < 0x7c00; h++) {
        for (int s = 0; s < 2; s++) {
            uint16_t code = (uint16_t)(h | (s ? 0x8000 : 0));
            float v = msa_f16_to_f32(code);
            CHECK_EQ_U(msa_f32_to_f16(v), code); /* round trip */
            double next = (h == 0x7bff) ? 65536.0 : ref_f16_value((uint16_t)(h + 1));
            double mid = (fabs((double)v) + next) / 2.0;
            float m = (float)(s ? -mid : mid);
            CHECK((double)fabsf(m) == mid); /* midpoints are exact in f32 */
            float probes[3] = {m, nextafterf(m, 0.0f), nextafterf(m, s ? -INFINITY : INFINITY)};
            for (int k = 0; k < 3; k++) {
                uint16_t got = msa_f32_to_f16(probes[k]);
                uint16_t want = ref_f32_to_f16(probes[k]);
                if (got != want)
                    fprintf(stderr, "x=%.9g (0x%08x) got 0x%04x want 0x%04x\n", probes[k],
                            fbits(probes[k]), got, want);
                CHECK_EQ_U(got, want);
            }
        }
    }
}

TEST(f32_to_bf16_boundaries)
{
    for (uint32_t h = 0; h < 0x7f80; h++) {
        for (int s = 0; s < 2; s++) {
            uint16_t code = (uint16_t)(h | (s ? 0x8000 : 0));
            float v = msa_bf16_to_f32(code);
            CHECK_EQ_U(msa_f32_to_bf16(v), code);
            /* midpoint bits: v's bits + 0x8000 (exact for every finite code) */
            float m = bitsf(fbits(v) + 0x8000u);
            float probes[3] = {m, bitsf(fbits(m) - 1u), bitsf(fbits(m) + 1u)};
            for (int k = 0; k < 3; k++) {
                uint16_t got = msa_f32_to_bf16(probes[k]);
                uint16_t want = ref_f32_to_bf16(probes[k]);
                if (got != want)
                    fprintf(stderr, "x=%.9g (0x%08x) got 0x%04x want 0x%04x\n", probes[k],
                            fbits(probes[k]), got, want);
                CHECK_EQ_U(got, want);
            }
        }
    }
}

/* A pseudo-random sweep over all f32 bit patterns (every exponent). */
TEST(f32_random_vs_reference)
{
    uint64_t st = 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < 2000000; i++) {
        st ^= st << 13, st ^= st >> 7, st ^= st << 17;
        uint32_t u = (uint32_t)(st >> 16);
        float x = bitsf(u);
        if (isnan(x) || isinf(x)) continue;
        CHECK_EQ_U(msa_f32_to_f16(x), ref_f32_to_f16(x));
        CHECK_EQ_U(msa_f32_to_bf16(x), ref_f32_to_bf16(x));
    }
}

TEST(conversion_edge_cases)
{
    /* f16 */
    CHECK_EQ_U(msa_f32_to_f16(0.0f), 0x0000);
    CHECK_EQ_U(msa_f32_to_f16(-0.0f), 0x8000);
    CHECK_EQ_U(msa_f32_to_f16(1.0f), 0x3c00);
    CHECK_EQ_U(msa_f32_to_f16(65504.0f), 0x7bff);
    CHECK_EQ_U(msa_f32_to_f16(65519.99f), 0x7bff);
    CHECK_EQ_U(msa_f32_to_f16(65520.0f), 0x7c00); /* halfway, max is odd -> Inf */
    CHECK_EQ_U(msa_f32_to_f16(-1e10f), 0xfc00);
    CHECK_EQ_U(msa_f32_to_f16(INFINITY), 0x7c00);
    CHECK_EQ_U(msa_f32_to_f16(-INFINITY), 0xfc00);
    CHECK_EQ_U(msa_f32_to_f16(ldexpf(1.0f, -24)), 0x0001); /* smallest subnormal */
    CHECK_EQ_U(msa_f32_to_f16(ldexpf(1.0f, -25)), 0x0000); /* halfway to 0 -> even 0 */
    CHECK_EQ_U(msa_f32_to_f16(ldexpf(1.5f, -25)), 0x0001);
    CHECK_EQ_U(msa_f32_to_f16(ldexpf(3.0f, -25)), 0x0002);            /* 1.5 ulp -> even 2 */
    CHECK_EQ_U(msa_f32_to_f16(ldexpf(1.0f, -14)), 0x0400);            /* smallest normal */
    CHECK_EQ_U(msa_f32_to_f16(ldexpf(1023.5f, -24)), 0x0400);         /* rounds up into normal */
    CHECK_EQ_U(msa_f32_to_f16(1.0f + ldexpf(1.0f, -11)), 0x3c00);     /* tie to even (down) */
    CHECK_EQ_U(msa_f32_to_f16(1.0f + 3 * ldexpf(1.0f, -11)), 0x3c02); /* tie to even (up) */
    CHECK_EQ_U(msa_f32_to_f16(ldexpf(1.0f, -30)), 0x0000);
    uint16_t hn = msa_f32_to_f16(NAN);
    CHECK((hn & 0x7c00) == 0x7c00 && (hn & 0x3ff) != 0);
    hn = msa_f32_to_f16(bitsf(0xff800001u)); /* signalling NaN, low payload only */
    CHECK((hn & 0x7c00) == 0x7c00 && (hn & 0x3ff) != 0 && (hn & 0x8000));
    /* bf16 */
    CHECK_EQ_U(msa_f32_to_bf16(1.0f), 0x3f80);
    CHECK_EQ_U(msa_f32_to_bf16(-0.0f), 0x8000);
    CHECK_EQ_U(msa_f32_to_bf16(bitsf(0x3f808000u)), 0x3f80); /* tie, even down */
    CHECK_EQ_U(msa_f32_to_bf16(bitsf(0x3f818000u)), 0x3f82); /* tie, even up */
    CHECK_EQ_U(msa_f32_to_bf16(bitsf(0x3f808001u)), 0x3f81);
    CHECK_EQ_U(msa_f32_to_bf16(bitsf(0x7f7fffffu)), 0x7f80); /* FLT_MAX overflows to Inf */
    CHECK_EQ_U(msa_f32_to_bf16(bitsf(0x7f7f7fffu)), 0x7f7f);
    CHECK_EQ_U(msa_f32_to_bf16(INFINITY), 0x7f80);
    CHECK_EQ_U(msa_f32_to_bf16(bitsf(0x00000001u)), 0x0000); /* tiny subnormal */
    CHECK_EQ_U(msa_f32_to_bf16(bitsf(0x00008000u)), 0x0000); /* tie to even 0 */
    CHECK_EQ_U(msa_f32_to_bf16(bitsf(0x00018000u)), 0x0002);
    uint16_t bn = msa_f32_to_bf16(bitsf(0x7f800001u)); /* NaN whose payload is all low */
    CHECK((bn & 0x7f80) == 0x7f80 && (bn & 0x7f) != 0);
    CHECK(isnan(msa_bf16_to_f32(msa_f32_to_bf16(NAN))));
}

TEST(bulk_conversions)
{
    float src[7] = {0.0f, -1.5f, 3.14159265f, 1e-8f, 65000.0f, -2.0e5f, 0.333333f};
    uint16_t h[7], b[7];
    float back[7], f[7];
    msa_tensor_from_f32(MSA_DT_F16, src, 7, h);
    msa_tensor_from_f32(MSA_DT_BF16, src, 7, b);
    for (int i = 0; i < 7; i++) {
        CHECK_EQ_U(h[i], msa_f32_to_f16(src[i]));
        CHECK_EQ_U(b[i], msa_f32_to_bf16(src[i]));
    }
    msa_tensor_to_f32(MSA_DT_F16, h, 7, back);
    for (int i = 0; i < 7; i++) CHECK(back[i] == msa_f16_to_f32(h[i]));
    msa_tensor_to_f32(MSA_DT_BF16, b, 7, back);
    for (int i = 0; i < 7; i++) CHECK(back[i] == msa_bf16_to_f32(b[i]));
    msa_tensor_from_f32(MSA_DT_F32, src, 7, f);
    CHECK(memcmp(f, src, sizeof f) == 0);
    msa_tensor_to_f32(MSA_DT_F32, f, 7, back);
    CHECK(memcmp(back, src, sizeof f) == 0);
    int8_t i8[3] = {-127, 0, 5};
    msa_tensor_to_f32(MSA_DT_I8, i8, 3, back);
    CHECK(back[0] == -127.0f && back[1] == 0.0f && back[2] == 5.0f);
}

TEST(dtype_names)
{
    CHECK_EQ_U(msa_dtype_size(MSA_DT_F32), 4);
    CHECK_EQ_U(msa_dtype_size(MSA_DT_F16), 2);
    CHECK_EQ_U(msa_dtype_size(MSA_DT_BF16), 2);
    CHECK_EQ_U(msa_dtype_size(MSA_DT_I8), 1);
    CHECK_EQ_U(msa_dtype_size(MSA_DT_UNSPECIFIED), 0);
    CHECK_EQ_U(msa_dtype_size((msa_dtype_t)9), 0);
    CHECK_STR(msa_dtype_name(MSA_DT_BF16), "BF16");
    CHECK_STR(msa_dtype_name(MSA_DT_UNSPECIFIED), "DTYPE_UNSPECIFIED");
    CHECK_STR(msa_dtype_name((msa_dtype_t)9), "?");
}

TEST(find_nonfinite)
{
    float f[4] = {1, 2, 3, 4};
    CHECK(msa_tensor_find_nonfinite(MSA_DT_F32, f, 4) == -1);
    f[2] = -INFINITY;
    CHECK(msa_tensor_find_nonfinite(MSA_DT_F32, f, 4) == 2);
    f[1] = NAN;
    CHECK(msa_tensor_find_nonfinite(MSA_DT_F32, f, 4) == 1);
    uint16_t h[3] = {0x3c00, 0x7bff, 0xfe00};
    CHECK(msa_tensor_find_nonfinite(MSA_DT_F16, h, 2) == -1);
    CHECK(msa_tensor_find_nonfinite(MSA_DT_F16, h, 3) == 2);
    uint16_t b[3] = {0x3f80, 0x7f7f, 0x7f80};
    CHECK(msa_tensor_find_nonfinite(MSA_DT_BF16, b, 2) == -1);
    CHECK(msa_tensor_find_nonfinite(MSA_DT_BF16, b, 3) == 2);
    int8_t q[2] = {-128, 127};
    CHECK(msa_tensor_find_nonfinite(MSA_DT_I8, q, 2) == -1);
    /* all 65536 codes: non-finite iff the exponent is all ones */
    for (uint32_t c = 0; c < 65536; c++) {
        uint16_t v = (uint16_t)c;
        CHECK((msa_tensor_find_nonfinite(MSA_DT_F16, &v, 1) == 0) == !isfinite(ref_f16_value(v)));
        CHECK((msa_tensor_find_nonfinite(MSA_DT_BF16, &v, 1) == 0) == !isfinite(ref_bf16_value(v)));
    }
}

/* ==== pooling, normalisation, quantisation ===================================== */

TEST(pool_odd)
{
    /* N = 7 tokens, W = 3, P = 3 -> chunks of 3, 3, 1 tokens. */
    float raw[7 * 3], out[3 * 3];
    for (int t = 0; t < 7; t++)
        for (int w = 0; w < 3; w++) raw[t * 3 + w] = (float)(t * 10 + w) * 0.1f + 0.01f * (float)w;
    msa_tensor_pool(raw, 7, 3, 3, out);
    for (int c = 0; c < 3; c++) {
        int t0 = c * 3, t1 = t0 + 3 < 7 ? t0 + 3 : 7;
        for (int w = 0; w < 3; w++) {
            float s = 0.0f; /* float32, in token order, then one division */
            for (int t = t0; t < t1; t++) s += raw[t * 3 + w];
            float want = s / (float)(t1 - t0);
            CHECK(fbits(out[c * 3 + w]) == fbits(want));
        }
    }
    /* P larger than N: one chunk, the mean of all. */
    float one[3];
    msa_tensor_pool(raw, 7, 3, 64, one);
    float s = 0.0f;
    for (int t = 0; t < 7; t++) s += raw[t * 3];
    CHECK(fbits(one[0]) == fbits(s / 7.0f));
    /* P = 1: a copy. */
    float cp[7 * 3];
    msa_tensor_pool(raw, 7, 3, 1, cp);
    CHECK(memcmp(cp, raw, sizeof cp) == 0);
    /* P = 5, N = 12 -> 5, 5, 2 */
    float r2[12], o2[3];
    for (int t = 0; t < 12; t++) r2[t] = (float)t;
    msa_tensor_pool(r2, 12, 1, 5, o2);
    CHECK(o2[0] == 2.0f && o2[1] == 7.0f && o2[2] == 10.5f);
}

TEST(l2_normalize)
{
    float x[3 * 4] = {3, 4, 0, 0, 0, 0, 0, 0, 1e-30f, 0, 0, 1e-30f};
    msa_tensor_l2_normalize(x, 3, 4);
    CHECK(x[0] == 0.6f && x[1] == 0.8f);
    for (int i = 4; i < 8; i++) CHECK(x[i] == 0.0f && !signbit(x[i])); /* zero stays zero */
    /* 1e-30^2 underflows in float32 but not in double */
    CHECK(fabsf(x[8] - 0.70710677f) < 1e-7f && fabsf(x[11] - 0.70710677f) < 1e-7f);
    float big[2] = {3.0f * 0x1p100f, 4.0f * 0x1p100f}; /* squares overflow float32, not double */
    msa_tensor_l2_normalize(big, 1, 2);
    CHECK(big[0] == 0.6f && big[1] == 0.8f);
    float d1[1] = {-5.0f};
    msa_tensor_l2_normalize(d1, 1, 1);
    CHECK(d1[0] == -1.0f);
}

TEST(quantize_i8)
{
    float x[2 * 4] = {1.0f, -0.5f, 0.25f, 0.0f, /* head 1 is zero */ 0, 0, 0, 0};
    int8_t q[8];
    float sc[2];
    msa_tensor_quantize_i8(x, 2, 4, q, sc);
    CHECK(sc[0] == 1.0f / 127.0f);
    CHECK(q[0] == 127 && q[1] == -64 && q[2] == 32 && q[3] == 0); /* -63.5 -> -64 (away) */
    CHECK(sc[1] == 0.0f);
    for (int i = 4; i < 8; i++) CHECK(q[i] == 0);
    float y[3] = {-2.0f, 1.0f, 0.01f};
    msa_tensor_quantize_i8(y, 1, 3, q, sc);
    CHECK(q[0] == -127 && q[1] == 64 && q[2] == 1); /* 63.5 -> 64; 0.635 -> 1 */
    CHECK(sc[0] == 2.0f / 127.0f);
}

/* ==== validation =============================================================== */

TEST(shape_str)
{
    char buf[64];
    uint32_t s[3] = {12, 8, 64};
    msa_tensor_shape_str(s, 3, buf, sizeof buf);
    CHECK_STR(buf, "[12,8,64]");
    msa_tensor_shape_str(s, 0, buf, sizeof buf);
    CHECK_STR(buf, "[]");
    msa_tensor_shape_str(s, 3, buf, 5);
    CHECK(strlen(buf) == 4);
    uint32_t big[4] = {4294967295u, 4294967295u, 4294967295u, 4294967295u};
    msa_tensor_shape_str(big, 4, buf, 16);
    CHECK(strlen(buf) == 15);
}

TEST(validate_messages)
{
    msa_status_t st;
    uint16_t data[12 * 8 * 64];
    memset(data, 0, sizeof data);
    msa_tensor_t t = {
        .dtype = MSA_DT_F16, .ndim = 3, .shape = {12, 8, 64}, .data = data, .nbytes = sizeof data};
    uint32_t want[3] = {12, 8, 128};
    const char *p = "ops[3].put.layers[2].k";

    CHECK(msa_tensor_validate(&t, MSA_DT_F16, 3, want, p, &st) == MSA_EINVAL);
    CHECK_EQ_I(st.code, MSA_EINVAL);
    CHECK_STR(st.msg, "ops[3].put.layers[2].k: shape [12,8,64], want [12,8,128]");

    CHECK(msa_tensor_validate(&t, MSA_DT_BF16, 3, want, p, &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "ops[3].put.layers[2].k: dtype F16, want BF16");

    t.ndim = 2;
    CHECK(msa_tensor_validate(&t, MSA_DT_F16, 3, want, p, &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "ops[3].put.layers[2].k: rank 2, want 3");
    t.ndim = 3;

    want[2] = 64;
    t.nbytes = 1000;
    CHECK(msa_tensor_validate(&t, MSA_DT_F16, 3, want, p, &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "ops[3].put.layers[2].k: 1000 bytes, want 12288 for shape [12,8,64] F16");
    t.nbytes = sizeof data;

    CHECK(msa_tensor_validate(&t, MSA_DT_F16, 3, want, p, &st) == MSA_OK);
    CHECK_EQ_U(st.code, 0);
    CHECK_STR(st.msg, "");

    data[17] = 0x7e00; /* NaN */
    CHECK(msa_tensor_validate(&t, MSA_DT_F16, 3, want, p, &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "ops[3].put.layers[2].k: element 17 is NaN");
    data[17] = 0;
    data[5] = 0x7c00;
    CHECK(msa_tensor_validate(&t, MSA_DT_F16, 3, want, p, &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "ops[3].put.layers[2].k: element 5 is Inf");
    data[5] = 0xfc00;
    CHECK(msa_tensor_validate(&t, MSA_DT_F16, 3, want, p, &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "ops[3].put.layers[2].k: element 5 is -Inf");
    data[5] = 0;

    /* wildcards and "any float dtype" */
    uint32_t any_t[3] = {0, 8, 64};
    CHECK(msa_tensor_validate(&t, MSA_DT_UNSPECIFIED, 3, any_t, "layers[0].q", &st) == MSA_OK);
    uint32_t want_hq[3] = {0, 16, 64};
    CHECK(msa_tensor_validate(&t, MSA_DT_UNSPECIFIED, 3, want_hq, "layers[0].q", &st) ==
          MSA_EINVAL);
    CHECK_STR(st.msg, "layers[0].q: shape [12,8,64], want [*,16,64]");
    t.dtype = MSA_DT_I8;
    CHECK(msa_tensor_validate(&t, MSA_DT_UNSPECIFIED, 3, any_t, "q", &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "q: dtype I8, want F32, F16 or BF16");
    t.dtype = (msa_dtype_t)7;
    CHECK(msa_tensor_validate(&t, MSA_DT_UNSPECIFIED, 3, any_t, "q", &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "q: dtype 7 unknown, want F32, F16 or BF16");
    t.dtype = MSA_DT_UNSPECIFIED;
    CHECK(msa_tensor_validate(&t, MSA_DT_F32, 3, any_t, "q", &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "q: dtype DTYPE_UNSPECIFIED, want F32");
    t.dtype = MSA_DT_F16;

    /* empty tensors are refused even where the extent is free */
    t.shape[0] = 0;
    t.nbytes = 0;
    CHECK(msa_tensor_validate(&t, MSA_DT_F16, 3, any_t, "q", &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "q: shape [0,8,64] has no elements");

    /* data NULL counts as 0 bytes */
    t.shape[0] = 1;
    t.data = NULL;
    t.nbytes = 1024;
    CHECK(msa_tensor_validate(&t, MSA_DT_F16, 3, any_t, "q", &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "q: 0 bytes, want 1024 for shape [1,8,64] F16");

    /* products that overflow 64 bits */
    msa_tensor_t huge = {.dtype = MSA_DT_F32,
                         .ndim = 4,
                         .shape = {4294967295u, 4294967295u, 4294967295u, 2},
                         .data = data,
                         .nbytes = 8};
    CHECK(msa_tensor_validate(&huge, MSA_DT_F32, 4, NULL, "x", &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "x: shape [4294967295,4294967295,4294967295,2] is too large");

    /* rank guard: a garbage rank is reported before the shape is read */
    msa_tensor_t r9 = {.dtype = MSA_DT_F32, .ndim = 9, .data = data, .nbytes = 4};
    CHECK(msa_tensor_validate(&r9, MSA_DT_F32, 1, NULL, "x", &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "x: rank 9, want 1");

    /* F32 NaN position, BF16 Inf, null status pointer */
    float fd[6] = {0, 1, 2, 3, NAN, 5};
    msa_tensor_t tf = {.dtype = MSA_DT_F32, .ndim = 2, .shape = {2, 3}, .data = fd, .nbytes = 24};
    uint32_t w23[2] = {2, 3};
    CHECK(msa_tensor_validate(&tf, MSA_DT_F32, 2, w23, "v", &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "v: element 4 is NaN");
    CHECK(msa_tensor_validate(&tf, MSA_DT_F32, 2, w23, "v", NULL) == MSA_EINVAL);
    uint16_t bd[2] = {0x3f80, 0xff80};
    msa_tensor_t tb = {.dtype = MSA_DT_BF16, .ndim = 1, .shape = {2}, .data = bd, .nbytes = 4};
    CHECK(msa_tensor_validate(&tb, MSA_DT_BF16, 1, NULL, "r", &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "r: element 1 is -Inf");
}

/* ==== schema ==================================================================== */

static msa_schema_t good_schema(void)
{
    msa_schema_t s;
    memset(&s, 0, sizeof s);
    s.n_layers = 3;
    s.layers[0] = 2;
    s.layers[1] = 9;
    s.layers[2] = 17;
    s.kv_heads = 8;
    s.query_heads = 32;
    s.head_dim = 128;
    s.chunk_tokens = 64;
    snprintf(s.model, sizeof s.model, "EverMind-AI/MSA-4B@abc");
    msa_schema_apply_defaults(&s);
    return s;
}

#define SCHEMA_BAD(mutate, want_msg)                        \
    do {                                                    \
        msa_schema_t s_ = good_schema();                    \
        mutate;                                             \
        msa_status_t st_;                                   \
        int rc_ = msa_schema_validate(&s_, "schema", &st_); \
        CHECK_EQ_I(rc_, MSA_EINVAL);                        \
        CHECK_STR(st_.msg, want_msg);                       \
    } while (0)

TEST(schema_defaults)
{
    msa_schema_t s = good_schema();
    CHECK(s.kv_dtype == MSA_DT_BF16 && s.routing_dtype == MSA_DT_BF16);
    CHECK(s.default_top_k == 16);
    s.kv_dtype = MSA_DT_F16;
    s.default_top_k = 3;
    msa_schema_apply_defaults(&s);
    CHECK(s.kv_dtype == MSA_DT_F16 && s.default_top_k == 3);
    msa_status_t st;
    CHECK(msa_schema_validate(&s, "schema", &st) == MSA_OK);
    CHECK_STR(st.msg, "");
    CHECK(msa_schema_router_store_dtype(&s) == MSA_DT_BF16);
    s.routing_dtype = MSA_DT_I8;
    CHECK(msa_schema_router_store_dtype(&s) == MSA_DT_F16);
    s.routing_dtype = MSA_DT_F32;
    CHECK(msa_schema_router_store_dtype(&s) == MSA_DT_F32);
}

TEST(schema_rules)
{
    SCHEMA_BAD(s_.n_layers = 0, "schema.layers: empty, want at least one layer");
    SCHEMA_BAD(s_.n_layers = 257, "schema.layers: 257 layers, want at most 256");
    SCHEMA_BAD(s_.layers[2] = 9, "schema.layers[2]: 9 after 9, want ascending and unique");
    SCHEMA_BAD(s_.layers[1] = 1, "schema.layers[1]: 1 after 2, want ascending and unique");
    SCHEMA_BAD(s_.kv_heads = 0, "schema.kv_heads: 0, want 1..64");
    SCHEMA_BAD(s_.kv_heads = 65, "schema.kv_heads: 65, want 1..64");
    SCHEMA_BAD(s_.query_heads = 12, "schema.query_heads: 12 is not a multiple of kv_heads 8");
    SCHEMA_BAD(s_.query_heads = 4, "schema.query_heads: 4 is not a multiple of kv_heads 8");
    SCHEMA_BAD(s_.query_heads = 0, "schema.query_heads: 0, want 1..256");
    SCHEMA_BAD(s_.query_heads = 264, "schema.query_heads: 264, want 1..256");
    SCHEMA_BAD(s_.head_dim = 0, "schema.head_dim: 0, want 1..256");
    SCHEMA_BAD(s_.head_dim = 257, "schema.head_dim: 257, want 1..256");
    SCHEMA_BAD(s_.chunk_tokens = 0, "schema.chunk_tokens: 0, want 1..4096");
    SCHEMA_BAD(s_.chunk_tokens = 4097, "schema.chunk_tokens: 4097, want 1..4096");
    SCHEMA_BAD(s_.kv_dtype = MSA_DT_I8,
               "schema.kv_dtype: I8 is only a routing_dtype, want F32, F16 or BF16");
    SCHEMA_BAD(s_.kv_dtype = MSA_DT_UNSPECIFIED,
               "schema.kv_dtype: DTYPE_UNSPECIFIED, want F32, F16 or BF16");
    SCHEMA_BAD(s_.kv_dtype = (msa_dtype_t)5,
               "schema.kv_dtype: unknown value 5, want F32, F16 or BF16");
    SCHEMA_BAD(s_.routing_dtype = (msa_dtype_t)9,
               "schema.routing_dtype: unknown value 9, want F32, F16, BF16 or I8");
    SCHEMA_BAD(s_.routing_dtype = MSA_DT_UNSPECIFIED,
               "schema.routing_dtype: DTYPE_UNSPECIFIED, want F32, F16, BF16 or I8");
    SCHEMA_BAD(s_.similarity = (msa_similarity_t)2,
               "schema.similarity: unknown value 2, want COSINE or DOT");
    SCHEMA_BAD(s_.head_reduce = (msa_head_reduce_t)-1,
               "schema.head_reduce: unknown value -1, want HEAD_MEAN or HEAD_MAX");
    SCHEMA_BAD(s_.query_reduce = (msa_query_reduce_t)3,
               "schema.query_reduce: unknown value 3, want QUERY_MAX, QUERY_MEAN or QUERY_LAST");
    SCHEMA_BAD(s_.chunk_reduce = (msa_chunk_reduce_t)2,
               "schema.chunk_reduce: unknown value 2, want CHUNK_MAX or CHUNK_MEAN");
    SCHEMA_BAD(s_.default_top_k = 1025, "schema.default_top_k: 1025, want 1..1024");
    SCHEMA_BAD(s_.default_top_k = 0, "schema.default_top_k: 0, want 1..1024");
    SCHEMA_BAD(memset(s_.model, 'x', sizeof s_.model), "schema.model: longer than 255 bytes");
    SCHEMA_BAD(strcpy(s_.model, "bad\xc3("), "schema.model: not valid UTF-8");
    SCHEMA_BAD(strcpy(s_.model, "\xed\xa0\x80"), "schema.model: not valid UTF-8"); /* surrogate */
    SCHEMA_BAD(strcpy(s_.model, "\xc0\xaf"), "schema.model: not valid UTF-8");     /* overlong */

    /* limits that are allowed */
    msa_schema_t s = good_schema();
    msa_status_t st;
    s.kv_heads = 64;
    s.query_heads = 256;
    s.head_dim = 256;
    s.chunk_tokens = 4096;
    s.default_top_k = 1024;
    s.routing_dtype = MSA_DT_I8;
    s.similarity = MSA_SIM_DOT;
    s.head_reduce = MSA_HEAD_MAX;
    s.query_reduce = MSA_QUERY_LAST;
    s.chunk_reduce = MSA_CHUNK_MEAN;
    memset(s.model, 'm', MSA_MAX_MODEL_LEN);
    s.model[MSA_MAX_MODEL_LEN] = '\0';
    CHECK(msa_schema_validate(&s, "schema", &st) == MSA_OK);
    strcpy(s.model, "caf\xc3\xa9 \xf0\x9f\x98\x80");
    CHECK(msa_schema_validate(&s, "schema", &st) == MSA_OK);
    s.n_layers = MSA_MAX_LAYERS;
    for (uint32_t i = 0; i < MSA_MAX_LAYERS; i++) s.layers[i] = i * 3;
    CHECK(msa_schema_validate(&s, "schema", &st) == MSA_OK);
    s.kv_heads = 1;
    s.query_heads = 1;
    s.head_dim = 1;
    s.chunk_tokens = 1;
    s.default_top_k = 1;
    s.model[0] = '\0';
    CHECK(msa_schema_validate(&s, "schema", &st) == MSA_OK);
    /* a different prefix */
    s.head_dim = 0;
    CHECK(msa_schema_validate(&s, "req.schema", &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "req.schema.head_dim: 0, want 1..256");
}

TEST(schema_names)
{
    msa_status_t st;
    CHECK(msa_schema_validate_name("docs_v1.2-b", "name", &st) == MSA_OK);
    CHECK(msa_schema_validate_name("a", "name", &st) == MSA_OK);
    char n64[65];
    memset(n64, 'z', 64);
    n64[64] = '\0';
    CHECK(msa_schema_validate_name(n64, "name", &st) == MSA_OK);
    char n65[66];
    memset(n65, 'z', 65);
    n65[65] = '\0';
    CHECK(msa_schema_validate_name(n65, "name", &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "name: longer than 64 bytes, want [A-Za-z0-9_.-]{1,64}");
    CHECK(msa_schema_validate_name("", "collection", &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "collection: empty, want [A-Za-z0-9_.-]{1,64}");
    CHECK(msa_schema_validate_name(NULL, "collection", &st) == MSA_EINVAL);
    CHECK(msa_schema_validate_name("a/b", "name", &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "name: character '/' at 1, want [A-Za-z0-9_.-]{1,64}");
    CHECK(msa_schema_validate_name("a b", "name", &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "name: byte 0x20 at 1, want [A-Za-z0-9_.-]{1,64}");
    CHECK(msa_schema_validate_name("\xc3\xa9", "name", &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "name: byte 0xc3 at 0, want [A-Za-z0-9_.-]{1,64}");
}

TEST(schema_layer_pos)
{
    msa_schema_t s = good_schema();
    CHECK(msa_schema_layer_pos(&s, 2) == 0);
    CHECK(msa_schema_layer_pos(&s, 9) == 1);
    CHECK(msa_schema_layer_pos(&s, 17) == 2);
    CHECK(msa_schema_layer_pos(&s, 0) == -1);
    CHECK(msa_schema_layer_pos(&s, 10) == -1);
    CHECK(msa_schema_layer_pos(&s, 100) == -1);
    s.n_layers = 0;
    CHECK(msa_schema_layer_pos(&s, 2) == -1);
}

TEST(schema_encoding)
{
    msa_schema_t s = good_schema();
    s.kv_dtype = MSA_DT_F32;
    s.routing_dtype = MSA_DT_I8;
    s.separate_router_keys = true;
    s.similarity = MSA_SIM_DOT;
    s.head_reduce = MSA_HEAD_MAX;
    s.query_reduce = MSA_QUERY_MEAN;
    s.chunk_reduce = MSA_CHUNK_MEAN;
    s.default_top_k = 77;
    uint8_t buf[MSA_SCHEMA_ENC_MAX];
    size_t n = msa_schema_encode(&s, buf);
    CHECK(n == 32 + 12 + 1 + strlen(s.model));
    /* explicit little-endian layout */
    CHECK(buf[0] == 1 && buf[1] == MSA_DT_F32 && buf[2] == MSA_DT_I8 && buf[3] == 1);
    CHECK(buf[8] == 8 && buf[9] == 0 && buf[12] == 32 && buf[16] == 128 && buf[20] == 64);
    CHECK(buf[24] == 77 && buf[28] == 3 && buf[32] == 2 && buf[36] == 9 && buf[40] == 17);
    msa_schema_t d;
    memset(&d, 0xab, sizeof d);
    CHECK(msa_schema_decode(buf, n, &d) == MSA_OK);
    CHECK(d.n_layers == 3 && d.layers[0] == 2 && d.layers[1] == 9 && d.layers[2] == 17);
    CHECK(d.kv_heads == 8 && d.query_heads == 32 && d.head_dim == 128 && d.chunk_tokens == 64);
    CHECK(d.kv_dtype == MSA_DT_F32 && d.routing_dtype == MSA_DT_I8 && d.separate_router_keys);
    CHECK(d.similarity == MSA_SIM_DOT && d.head_reduce == MSA_HEAD_MAX);
    CHECK(d.query_reduce == MSA_QUERY_MEAN && d.chunk_reduce == MSA_CHUNK_MEAN);
    CHECK(d.default_top_k == 77);
    CHECK_STR(d.model, s.model);
    /* re-encoding gives the same bytes */
    uint8_t buf2[MSA_SCHEMA_ENC_MAX];
    CHECK(msa_schema_encode(&d, buf2) == n && memcmp(buf, buf2, n) == 0);

    /* largest schema fits */
    msa_schema_t big = good_schema();
    big.n_layers = MSA_MAX_LAYERS;
    for (uint32_t i = 0; i < MSA_MAX_LAYERS; i++) big.layers[i] = 1000 + i;
    memset(big.model, 'q', MSA_MAX_MODEL_LEN);
    big.model[MSA_MAX_MODEL_LEN] = '\0';
    size_t nb = msa_schema_encode(&big, buf);
    CHECK(nb <= MSA_SCHEMA_ENC_MAX);
    CHECK(msa_schema_decode(buf, nb, &d) == MSA_OK);
    CHECK(d.n_layers == MSA_MAX_LAYERS && d.layers[255] == 1255 && strlen(d.model) == 255);

    /* corrupt encodings */
    n = msa_schema_encode(&s, buf);
    for (size_t cut = 0; cut < n; cut++) CHECK(msa_schema_decode(buf, cut, &d) == MSA_ECORRUPT);
    CHECK(msa_schema_decode(NULL, 0, &d) == MSA_ECORRUPT);
    uint8_t bad[MSA_SCHEMA_ENC_MAX + 8];
    memcpy(bad, buf, n);
    bad[n] = 0;
    CHECK(msa_schema_decode(bad, n + 1, &d) == MSA_ECORRUPT); /* trailing byte */
    memcpy(bad, buf, n);
    bad[0] = 2;
    CHECK(msa_schema_decode(bad, n, &d) == MSA_ECORRUPT); /* unknown version */
    memcpy(bad, buf, n);
    bad[3] = 0x81;
    CHECK(msa_schema_decode(bad, n, &d) == MSA_ECORRUPT); /* unknown flag */
    memcpy(bad, buf, n);
    bad[1] = MSA_DT_I8;
    CHECK(msa_schema_decode(bad, n, &d) == MSA_ECORRUPT); /* invalid schema */
    memcpy(bad, buf, n);
    bad[36] = 1;
    CHECK(msa_schema_decode(bad, n, &d) == MSA_ECORRUPT); /* layers not ascending */
    memcpy(bad, buf, n);
    bad[28] = 0xff, bad[29] = 0xff, bad[30] = 0xff, bad[31] = 0xff;
    CHECK(msa_schema_decode(bad, n, &d) == MSA_ECORRUPT); /* huge layer count */
    memcpy(bad, buf, n);
    bad[45] = 0;
    CHECK(msa_schema_decode(bad, n, &d) == MSA_ECORRUPT); /* NUL inside model */
    /* random bytes never crash */
    uint64_t r = 12345;
    for (int i = 0; i < 20000; i++) {
        size_t len = (size_t)(r % 120);
        for (size_t k = 0; k < len; k++) {
            r ^= r << 13, r ^= r >> 7, r ^= r << 17;
            bad[k] = (uint8_t)r;
        }
        if (len > 0) bad[0] = 1;
        (void)msa_schema_decode(bad, len, &d);
        r ^= r << 13, r ^= r >> 7, r ^= r << 17;
    }
}

/* ==== main ====================================================================== */

static const msa_test_t tests[] = {
    TEST_ENTRY(f16_to_f32_exhaustive),
    TEST_ENTRY(bf16_to_f32_exhaustive),
    TEST_ENTRY(f32_to_f16_boundaries),
    TEST_ENTRY(f32_to_bf16_boundaries),
    TEST_ENTRY(f32_random_vs_reference),
    TEST_ENTRY(conversion_edge_cases),
    TEST_ENTRY(bulk_conversions),
    TEST_ENTRY(dtype_names),
    TEST_ENTRY(find_nonfinite),
    TEST_ENTRY(pool_odd),
    TEST_ENTRY(l2_normalize),
    TEST_ENTRY(quantize_i8),
    TEST_ENTRY(shape_str),
    TEST_ENTRY(validate_messages),
    TEST_ENTRY(schema_defaults),
    TEST_ENTRY(schema_rules),
    TEST_ENTRY(schema_names),
    TEST_ENTRY(schema_layer_pos),
    TEST_ENTRY(schema_encoding),
};

int main(int argc, char **argv)
{
    return msa_test_run(tests, sizeof tests / sizeof tests[0], argc, argv);
}
