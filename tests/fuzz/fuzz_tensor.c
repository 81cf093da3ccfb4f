/* fuzz_tensor.c — libFuzzer target for the tensor codec, schemas and .npy.
 *
 * Input: one selector byte, then the operand bytes. Beyond "no crash, no leak,
 * no UB", each case checks a property the rest of msad relies on:
 *   0 msa_schema_decode on arbitrary bytes; a decoded schema validates and
 *     re-encodes to a fixed point (encode(decode(encode(s))) == encode(s)).
 *   1 msa_tensor_validate with a fuzzed dtype, rank and shape; an accepted
 *     tensor has exactly prod(shape) * size bytes, all finite, and converts
 *     to float32 and back to the same bytes.
 *   2 scalar conversions: F16 and BF16 -> F32 -> F16/BF16 is the identity
 *     (NaN stays NaN), and F32 -> F16/BF16 rounding is idempotent.
 *   3 msa_tensor_pool over fuzzed N, W, P.
 *   4 msa_tensor_l2_normalize: finite non-zero vectors come out with norm 1.
 *   5 msa_tensor_quantize_i8: |q| <= 127; with finite values 0 <= scale < Inf.
 *   6 msa_cli_npy_parse on arbitrary bytes; an accepted array re-encodes and
 *     parses back to the same dtype, shape and data.
 *   7 msa_tensor_shape_str into buffers of every small length.
 */
#include "npy.h"
#include "schema.h"
#include "tensor.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond, ...)                                                                          \
    do {                                                                                          \
        if (!(cond)) {                                                                            \
            fprintf(stderr, "fuzz_tensor: %s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                                         \
            fputc('\n', stderr);                                                                  \
            abort();                                                                              \
        }                                                                                         \
    } while (0)

/* A little reader over the input: missing bytes read as zero. */
typedef struct rd {
    const uint8_t *p;
    size_t n;
} rd_t;

static uint8_t u8(rd_t *r)
{
    if (!r->n) return 0;
    r->n--;
    return *r->p++;
}
static uint32_t u32(rd_t *r)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v |= (uint32_t)u8(r) << (8 * i);
    return v;
}

/* n floats from the rest of the input (zero-padded), malloc'd. */
static float *floats(rd_t *r, size_t n, bool finite_only)
{
    float *x = calloc(n ? n : 1, sizeof(float));
    for (size_t i = 0; i < n && r->n; i++) {
        uint32_t u = u32(r);
        if (finite_only && (u & 0x7f800000u) == 0x7f800000u) u &= 0xff7fffffu;
        memcpy(&x[i], &u, 4);
    }
    return x;
}

static void case_schema(const uint8_t *d, size_t n)
{
    msa_schema_t s;
    if (msa_schema_decode(d, n, &s) != MSA_OK) return;
    msa_status_t st;
    CHECK(msa_schema_validate(&s, "schema", &st) == MSA_OK, "decoded schema invalid: %s", st.msg);
    uint8_t e1[MSA_SCHEMA_ENC_MAX], e2[MSA_SCHEMA_ENC_MAX];
    size_t n1 = msa_schema_encode(&s, e1);
    CHECK(n1 <= MSA_SCHEMA_ENC_MAX, "encoding of %zu bytes", n1);
    msa_schema_t s2;
    CHECK(msa_schema_decode(e1, n1, &s2) == MSA_OK, "re-encoded schema does not decode");
    size_t n2 = msa_schema_encode(&s2, e2);
    CHECK(n1 == n2 && !memcmp(e1, e2, n1), "encoding is not a fixed point");
    (void)msa_schema_layer_pos(&s, s.layers[0]);
    (void)msa_schema_router_store_dtype(&s);
}

static void case_validate(rd_t *r)
{
    msa_tensor_t t;
    memset(&t, 0, sizeof t);
    uint8_t b = u8(r);
    t.dtype = (msa_dtype_t)(b & 7); /* 0..7: includes unknown dtypes */
    /* The wanted dtype comes from a schema: always one msad knows. */
    msa_dtype_t want = (msa_dtype_t)(((b >> 3) & 7) % 5);
    uint8_t dims = u8(r);
    t.ndim = dims & 7; /* may exceed the wanted rank */
    uint32_t ndim = 1 + ((dims >> 3) & 3);
    bool big = dims & 0x80;
    uint32_t want_shape[MSA_TENSOR_MAX_DIMS];
    for (int i = 0; i < MSA_TENSOR_MAX_DIMS; i++) {
        t.shape[i] = big ? u32(r) : u8(r) % 9;
        want_shape[i] = u8(r) % 9;
    }
    if (t.ndim > MSA_TENSOR_MAX_DIMS) t.ndim = MSA_TENSOR_MAX_DIMS;
    t.data = r->n ? (const void *)r->p : NULL;
    t.nbytes = r->n;
    msa_status_t st;
    int rc = msa_tensor_validate(&t, want, ndim, (dims & 0x40) ? want_shape : NULL, "t", &st);
    if (rc != MSA_OK) {
        CHECK(rc == MSA_EINVAL && !strncmp(st.msg, "t: ", 3), "rc %d msg '%s'", rc, st.msg);
        return;
    }
    size_t count = 1;
    for (uint32_t i = 0; i < ndim; i++) count *= t.shape[i];
    size_t es = msa_dtype_size(t.dtype);
    CHECK(count * es == t.nbytes, "accepted %zu bytes for %zu elements of %zu", t.nbytes, count,
          es);
    CHECK(msa_tensor_find_nonfinite(t.dtype, t.data, count) < 0, "accepted a non-finite value");
    float *f = malloc(count * sizeof(float));
    msa_tensor_to_f32(t.dtype, t.data, count, f);
    for (size_t i = 0; i < count; i++) CHECK(isfinite(f[i]), "element %zu converts to %g", i, f[i]);
    void *back = malloc(t.nbytes ? t.nbytes : 1);
    if (t.dtype == MSA_DT_I8) /* I8 converts to plain integer values, with no way back */
        for (size_t i = 0; i < count; i++) ((int8_t *)back)[i] = (int8_t)f[i];
    else
        msa_tensor_from_f32(t.dtype, f, count, back);
    CHECK(!memcmp(back, t.data, t.nbytes), "%s -> F32 -> %s changed the bytes",
          msa_dtype_name(t.dtype), msa_dtype_name(t.dtype));
    free(back);
    free(f);
}

static void case_convert(rd_t *r)
{
    while (r->n >= 4) {
        uint32_t u = u32(r);
        uint16_t h = (uint16_t)u;
        float f = msa_f16_to_f32(h);
        uint16_t h2 = msa_f32_to_f16(f);
        if (isnan(f))
            CHECK((h2 & 0x7c00u) == 0x7c00u && (h2 & 0x3ffu), "F16 NaN %04x -> %04x", h, h2);
        else
            CHECK(h2 == h, "F16 %04x -> %g -> %04x", h, f, h2);
        float b = msa_bf16_to_f32(h);
        uint16_t b2 = msa_f32_to_bf16(b);
        if (isnan(b))
            CHECK((b2 & 0x7f80u) == 0x7f80u && (b2 & 0x7fu), "BF16 NaN %04x -> %04x", h, b2);
        else
            CHECK(b2 == h, "BF16 %04x -> %g -> %04x", h, b, b2);
        float x;
        memcpy(&x, &u, 4);
        uint16_t xh = msa_f32_to_f16(x), xb = msa_f32_to_bf16(x);
        CHECK(msa_f32_to_f16(msa_f16_to_f32(xh)) == xh || isnan(x), "F16 rounding of %g", x);
        CHECK(msa_f32_to_bf16(msa_bf16_to_f32(xb)) == xb || isnan(x), "BF16 rounding of %g", x);
        CHECK(isnan(x) == isnan(msa_f16_to_f32(xh)), "F16 NaN-ness of %g", x);
        CHECK(isnan(x) == isnan(msa_bf16_to_f32(xb)), "BF16 NaN-ness of %g", x);
    }
}

static void case_pool(rd_t *r)
{
    uint32_t N = 1 + u8(r) % 64, W = 1 + u8(r) % 32, P = 1 + u8(r) % 16;
    uint32_t C = (N + P - 1) / P;
    float *raw = floats(r, (size_t)N * W, false);
    float *out = malloc((size_t)C * W * sizeof(float));
    msa_tensor_pool(raw, N, W, P, out);
    free(out);
    free(raw);
}

static void case_l2(rd_t *r)
{
    uint32_t n = 1 + u8(r) % 8, d = 1 + u8(r) % 64;
    float *x = floats(r, (size_t)n * d, true);
    float *orig = malloc((size_t)n * d * sizeof(float));
    memcpy(orig, x, (size_t)n * d * sizeof(float));
    msa_tensor_l2_normalize(x, n, d);
    for (uint32_t i = 0; i < n; i++) {
        double ss = 0, ss0 = 0;
        for (uint32_t j = 0; j < d; j++) {
            ss += (double)x[i * d + j] * x[i * d + j];
            ss0 += (double)orig[i * d + j] * orig[i * d + j];
        }
        /* Vectors made only of the smallest subnormals lose precision in the
         * float32 quotients; anything with a normal-range norm must be exact. */
        if (ss0 == 0.0)
            CHECK(ss == 0.0, "zero vector changed");
        else if (sqrt(ss0) > 1e-30)
            CHECK(fabs(sqrt(ss) - 1.0) < 1e-5, "norm %g after normalising", sqrt(ss));
    }
    free(orig);
    free(x);
}

static void case_quantize(rd_t *r)
{
    uint8_t hb = u8(r);
    uint32_t H = 1 + hb % 8, D = 1 + u8(r) % 64;
    bool finite = !(hb & 0x80); /* else Inf and NaN too: no UB, q still in range */
    float *x = floats(r, (size_t)H * D, finite);
    int8_t *q = malloc((size_t)H * D);
    float *scale = malloc(H * sizeof(float));
    msa_tensor_quantize_i8(x, H, D, q, scale);
    for (uint32_t h = 0; h < H; h++) {
        if (finite) CHECK(scale[h] >= 0.0f && isfinite(scale[h]), "scale %g", scale[h]);
        for (uint32_t i = 0; i < D; i++) CHECK(q[h * D + i] >= -127, "q %d", q[h * D + i]);
    }
    free(scale);
    free(q);
    free(x);
}

static void case_npy(const uint8_t *d, size_t n)
{
    msa_cli_npy_t a;
    msa_status_t st;
    if (msa_cli_npy_parse(d, n, "f.npy", &a, &st) != MSA_OK) {
        CHECK(a.data == NULL, "data left on error");
        CHECK(!strncmp(st.msg, "f.npy: ", 7), "message '%s'", st.msg);
        return;
    }
    CHECK(a.nbytes == msa_cli_npy_count(&a) * msa_cli_npy_elem_size(a.dtype), "%zu bytes",
          a.nbytes);
    void *buf = NULL;
    size_t len = 0;
    CHECK(msa_cli_npy_encode(a.dtype, a.ndim, a.shape, a.data, a.nbytes, &buf, &len, &st) == MSA_OK,
          "re-encode: %s", st.msg);
    msa_cli_npy_t b;
    CHECK(msa_cli_npy_parse(buf, len, "g.npy", &b, &st) == MSA_OK, "re-parse: %s", st.msg);
    CHECK(a.dtype == b.dtype && a.ndim == b.ndim &&
              !memcmp(a.shape, b.shape, sizeof(uint32_t) * a.ndim) && a.nbytes == b.nbytes &&
              (!a.nbytes || !memcmp(a.data, b.data, a.nbytes)),
          "round trip changed the array");
    if (a.dtype != MSA_CLI_NPY_U64) (void)msa_cli_npy_tensor(&a);
    free(buf);
    msa_cli_npy_free(&b);
    msa_cli_npy_free(&a);
}

static void case_shape_str(rd_t *r)
{
    uint32_t shape[MSA_TENSOR_MAX_DIMS];
    uint32_t ndim = u8(r) % (MSA_TENSOR_MAX_DIMS + 1);
    for (int i = 0; i < MSA_TENSOR_MAX_DIMS; i++) shape[i] = u32(r);
    for (size_t len = 1; len <= 48; len++) {
        char *buf = malloc(len);
        msa_tensor_shape_str(shape, ndim, buf, len);
        CHECK(strlen(buf) < len, "unterminated in %zu bytes", len);
        free(buf);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    rd_t r = {data + 1, size - 1};
    switch (data[0] % 8) {
    case 0:
        case_schema(data + 1, size - 1);
        break;
    case 1:
        case_validate(&r);
        break;
    case 2:
        case_convert(&r);
        break;
    case 3:
        case_pool(&r);
        break;
    case 4:
        case_l2(&r);
        break;
    case 5:
        case_quantize(&r);
        break;
    case 6:
        case_npy(data + 1, size - 1);
        break;
    case 7:
        case_shape_str(&r);
        break;
    }
    return 0;
}
