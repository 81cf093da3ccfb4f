/* schema.c — CollectionSchema defaults, validation and durable encoding.
 *
 * Encoding, version 1 (all integers little-endian, no padding):
 *   u8  version (1)
 *   u8  kv_dtype, u8 routing_dtype, u8 flags (bit 0: separate_router_keys)
 *   u8  similarity, u8 head_reduce, u8 query_reduce, u8 chunk_reduce
 *   u32 kv_heads, u32 query_heads, u32 head_dim, u32 chunk_tokens, u32 default_top_k
 *   u32 n_layers, then n_layers x u32 layer
 *   u8  model_len, then model_len bytes of model (no NUL)
 * Decoding checks the exact length, then validates the schema: a stored schema
 * that fails validation is reported as MSA_ECORRUPT.
 */
#include "schema.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#define SCHEMA_ENC_VERSION 1u
#define SCHEMA_FLAG_SEPARATE_ROUTER 0x01u

void msa_schema_apply_defaults(msa_schema_t *s)
{
    if (s->kv_dtype == MSA_DT_UNSPECIFIED) s->kv_dtype = MSA_DT_BF16;
    if (s->routing_dtype == MSA_DT_UNSPECIFIED) s->routing_dtype = MSA_DT_BF16;
    if (s->default_top_k == 0) s->default_top_k = 16;
}

/* ==== validation ============================================================= */

/* Returns true when s[0..len) is well-formed UTF-8 (no overlongs, no
 * surrogates, nothing above U+10FFFF). */
static bool utf8_valid(const unsigned char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t n;
        uint32_t cp;
        if (c >= 0xc2 && c <= 0xdf) {
            n = 1;
            cp = c & 0x1f;
        } else if (c >= 0xe0 && c <= 0xef) {
            n = 2;
            cp = c & 0x0f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            n = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (len - i - 1 < n) return false;
        for (size_t k = 1; k <= n; k++) {
            if ((s[i + k] & 0xc0) != 0x80) return false;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        if ((n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) || cp > 0x10ffff ||
            (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += n + 1;
    }
    return true;
}

static int check_range(msa_status_t *st, const char *prefix, const char *field, uint32_t v,
                       uint32_t lo, uint32_t hi)
{
    if (v < lo || v > hi)
        return msa_status_set(st, MSA_EINVAL, "%s.%s: %" PRIu32 ", want %" PRIu32 "..%" PRIu32,
                              prefix, field, v, lo, hi);
    return MSA_OK;
}

static int check_enum(msa_status_t *st, const char *prefix, const char *field, int v, int max,
                      const char *names)
{
    if (v < 0 || v > max)
        return msa_status_set(st, MSA_EINVAL, "%s.%s: unknown value %d, want %s", prefix, field, v,
                              names);
    return MSA_OK;
}

int msa_schema_validate(const msa_schema_t *s, const char *prefix, msa_status_t *st)
{
    int rc;
    if (!prefix) prefix = "schema";

    if (s->n_layers == 0)
        return msa_status_set(st, MSA_EINVAL, "%s.layers: empty, want at least one layer", prefix);
    if (s->n_layers > MSA_MAX_LAYERS)
        return msa_status_set(st, MSA_EINVAL, "%s.layers: %" PRIu32 " layers, want at most %d",
                              prefix, s->n_layers, MSA_MAX_LAYERS);
    for (uint32_t i = 1; i < s->n_layers; i++) {
        if (s->layers[i] <= s->layers[i - 1])
            return msa_status_set(st, MSA_EINVAL,
                                  "%s.layers[%" PRIu32 "]: %" PRIu32 " after %" PRIu32
                                  ", want ascending and unique",
                                  prefix, i, s->layers[i], s->layers[i - 1]);
    }

    if ((rc = check_range(st, prefix, "kv_heads", s->kv_heads, 1, 64))) return rc;
    if ((rc = check_range(st, prefix, "query_heads", s->query_heads, 1, 256))) return rc;
    if (s->query_heads % s->kv_heads != 0)
        return msa_status_set(st, MSA_EINVAL,
                              "%s.query_heads: %" PRIu32 " is not a multiple of kv_heads %" PRIu32,
                              prefix, s->query_heads, s->kv_heads);
    if ((rc = check_range(st, prefix, "head_dim", s->head_dim, 1, 256))) return rc;
    if ((rc = check_range(st, prefix, "chunk_tokens", s->chunk_tokens, 1, 4096))) return rc;

    switch ((int)s->kv_dtype) {
    case MSA_DT_F32:
    case MSA_DT_F16:
    case MSA_DT_BF16:
        break;
    case MSA_DT_I8:
        return msa_status_set(st, MSA_EINVAL,
                              "%s.kv_dtype: I8 is only a routing_dtype, want F32, F16 or BF16",
                              prefix);
    case MSA_DT_UNSPECIFIED:
        return msa_status_set(st, MSA_EINVAL,
                              "%s.kv_dtype: DTYPE_UNSPECIFIED, want F32, F16 or BF16", prefix);
    default:
        return msa_status_set(st, MSA_EINVAL,
                              "%s.kv_dtype: unknown value %d, want F32, F16 or BF16", prefix,
                              (int)s->kv_dtype);
    }
    switch ((int)s->routing_dtype) {
    case MSA_DT_F32:
    case MSA_DT_F16:
    case MSA_DT_BF16:
    case MSA_DT_I8:
        break;
    case MSA_DT_UNSPECIFIED:
        return msa_status_set(st, MSA_EINVAL,
                              "%s.routing_dtype: DTYPE_UNSPECIFIED, want F32, F16, BF16 or I8",
                              prefix);
    default:
        return msa_status_set(st, MSA_EINVAL,
                              "%s.routing_dtype: unknown value %d, want F32, F16, BF16 or I8",
                              prefix, (int)s->routing_dtype);
    }

    if ((rc = check_enum(st, prefix, "similarity", (int)s->similarity, MSA_SIM_DOT,
                         "COSINE or DOT")))
        return rc;
    if ((rc = check_enum(st, prefix, "head_reduce", (int)s->head_reduce, MSA_HEAD_MAX,
                         "HEAD_MEAN or HEAD_MAX")))
        return rc;
    if ((rc = check_enum(st, prefix, "query_reduce", (int)s->query_reduce, MSA_QUERY_LAST,
                         "QUERY_MAX, QUERY_MEAN or QUERY_LAST")))
        return rc;
    if ((rc = check_enum(st, prefix, "chunk_reduce", (int)s->chunk_reduce, MSA_CHUNK_MEAN,
                         "CHUNK_MAX or CHUNK_MEAN")))
        return rc;

    if ((rc = check_range(st, prefix, "default_top_k", s->default_top_k, 1, MSA_MAX_TOP_K)))
        return rc;

    const char *nul = memchr(s->model, '\0', sizeof s->model);
    if (!nul)
        return msa_status_set(st, MSA_EINVAL, "%s.model: longer than %d bytes", prefix,
                              MSA_MAX_MODEL_LEN);
    if (!utf8_valid((const unsigned char *)s->model, (size_t)(nul - s->model)))
        return msa_status_set(st, MSA_EINVAL, "%s.model: not valid UTF-8", prefix);

    msa_status_clear(st);
    return MSA_OK;
}

int msa_schema_validate_name(const char *name, const char *field, msa_status_t *st)
{
    if (!field) field = "name";
    if (!name || name[0] == '\0')
        return msa_status_set(st, MSA_EINVAL, "%s: empty, want [A-Za-z0-9_.-]{1,64}", field);
    size_t len = strnlen(name, MSA_MAX_NAME_LEN + 1);
    if (len > MSA_MAX_NAME_LEN)
        return msa_status_set(st, MSA_EINVAL, "%s: longer than %d bytes, want [A-Za-z0-9_.-]{1,64}",
                              field, MSA_MAX_NAME_LEN);
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)name[i];
        bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                  c == '_' || c == '.' || c == '-';
        if (!ok) {
            if (c > 0x20 && c < 0x7f)
                return msa_status_set(st, MSA_EINVAL,
                                      "%s: character '%c' at %zu, want [A-Za-z0-9_.-]{1,64}", field,
                                      c, i);
            return msa_status_set(st, MSA_EINVAL,
                                  "%s: byte 0x%02x at %zu, want [A-Za-z0-9_.-]{1,64}", field, c, i);
        }
    }
    msa_status_clear(st);
    return MSA_OK;
}

int msa_schema_layer_pos(const msa_schema_t *s, uint32_t layer)
{
    /* layers are ascending: binary search. */
    uint32_t lo = 0, hi = s->n_layers < MSA_MAX_LAYERS ? s->n_layers : MSA_MAX_LAYERS;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (s->layers[mid] == layer) return (int)mid;
        if (s->layers[mid] < layer)
            lo = mid + 1;
        else
            hi = mid;
    }
    return -1;
}

msa_dtype_t msa_schema_router_store_dtype(const msa_schema_t *s)
{
    return s->routing_dtype == MSA_DT_I8 ? s->kv_dtype : s->routing_dtype;
}

/* ==== encoding =============================================================== */

static void put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

#define SCHEMA_ENC_FIXED 32u /* bytes before the layer list */

size_t msa_schema_encode(const msa_schema_t *s, uint8_t *buf)
{
    msa_assert(s->n_layers <= MSA_MAX_LAYERS);
    size_t mlen = strnlen(s->model, MSA_MAX_MODEL_LEN);
    uint8_t *p = buf;
    *p++ = SCHEMA_ENC_VERSION;
    *p++ = (uint8_t)s->kv_dtype;
    *p++ = (uint8_t)s->routing_dtype;
    *p++ = s->separate_router_keys ? SCHEMA_FLAG_SEPARATE_ROUTER : 0;
    *p++ = (uint8_t)s->similarity;
    *p++ = (uint8_t)s->head_reduce;
    *p++ = (uint8_t)s->query_reduce;
    *p++ = (uint8_t)s->chunk_reduce;
    put_u32(p, s->kv_heads), p += 4;
    put_u32(p, s->query_heads), p += 4;
    put_u32(p, s->head_dim), p += 4;
    put_u32(p, s->chunk_tokens), p += 4;
    put_u32(p, s->default_top_k), p += 4;
    put_u32(p, s->n_layers), p += 4;
    for (uint32_t i = 0; i < s->n_layers; i++) put_u32(p, s->layers[i]), p += 4;
    *p++ = (uint8_t)mlen;
    memcpy(p, s->model, mlen);
    p += mlen;
    msa_assert((size_t)(p - buf) <= MSA_SCHEMA_ENC_MAX);
    return (size_t)(p - buf);
}

int msa_schema_decode(const uint8_t *buf, size_t len, msa_schema_t *out)
{
    if (!buf || len < SCHEMA_ENC_FIXED + 1) return MSA_ECORRUPT;
    if (buf[0] != SCHEMA_ENC_VERSION) return MSA_ECORRUPT;
    if (buf[3] & ~SCHEMA_FLAG_SEPARATE_ROUTER) return MSA_ECORRUPT;
    uint32_t n = get_u32(buf + 28);
    if (n > MSA_MAX_LAYERS) return MSA_ECORRUPT;
    size_t off = SCHEMA_ENC_FIXED + 4u * (size_t)n;
    if (len < off + 1) return MSA_ECORRUPT;
    size_t mlen = buf[off];
    if (len != off + 1 + mlen) return MSA_ECORRUPT;
    if (memchr(buf + off + 1, '\0', mlen)) return MSA_ECORRUPT;

    msa_schema_t s;
    memset(&s, 0, sizeof s);
    s.kv_dtype = (msa_dtype_t)buf[1];
    s.routing_dtype = (msa_dtype_t)buf[2];
    s.separate_router_keys = (buf[3] & SCHEMA_FLAG_SEPARATE_ROUTER) != 0;
    s.similarity = (msa_similarity_t)buf[4];
    s.head_reduce = (msa_head_reduce_t)buf[5];
    s.query_reduce = (msa_query_reduce_t)buf[6];
    s.chunk_reduce = (msa_chunk_reduce_t)buf[7];
    s.kv_heads = get_u32(buf + 8);
    s.query_heads = get_u32(buf + 12);
    s.head_dim = get_u32(buf + 16);
    s.chunk_tokens = get_u32(buf + 20);
    s.default_top_k = get_u32(buf + 24);
    s.n_layers = n;
    for (uint32_t i = 0; i < n; i++) s.layers[i] = get_u32(buf + SCHEMA_ENC_FIXED + 4u * i);
    memcpy(s.model, buf + off + 1, mlen);
    s.model[mlen] = '\0';

    if (msa_schema_validate(&s, "schema", NULL) != MSA_OK) return MSA_ECORRUPT;
    *out = s;
    return MSA_OK;
}
