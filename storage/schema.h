/* schema.h — a collection's schema (memory.proto CollectionSchema) in C, its
 * validation with field-naming messages, and its durable encoding.
 *
 * Pure functions; safe from any thread. The encoding is explicit little-endian
 * with a format version, so a store written by one build opens in another.
 */
#ifndef MSA_SCHEMA_H
#define MSA_SCHEMA_H

#include "msa_err.h"
#include "tensor.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MSA_MAX_LAYERS 256    /* memory layers per collection */
#define MSA_MAX_MODEL_LEN 255 /* bytes of the encoder identity */
#define MSA_MAX_NAME_LEN 64   /* collection name: [A-Za-z0-9_.-]{1,64} */
#define MSA_MAX_TOP_K 1024

/* Values match memory.proto's enums. */
typedef enum { MSA_SIM_COSINE = 0, MSA_SIM_DOT = 1 } msa_similarity_t;
typedef enum { MSA_HEAD_MEAN = 0, MSA_HEAD_MAX = 1 } msa_head_reduce_t;
typedef enum { MSA_QUERY_MAX = 0, MSA_QUERY_MEAN = 1, MSA_QUERY_LAST = 2 } msa_query_reduce_t;
typedef enum { MSA_CHUNK_MAX = 0, MSA_CHUNK_MEAN = 1 } msa_chunk_reduce_t;

typedef struct msa_schema {
    uint32_t n_layers;
    uint32_t layers[MSA_MAX_LAYERS]; /* ascending, unique model layer indices */
    uint32_t kv_heads;               /* H  (1..64) */
    uint32_t query_heads;            /* Hq (multiple of H, up to 256) */
    uint32_t head_dim;               /* D  (1..256) */
    uint32_t chunk_tokens;           /* P  (1..4096) */
    msa_dtype_t kv_dtype;            /* F32/F16/BF16 after defaults */
    msa_dtype_t routing_dtype;       /* F32/F16/BF16/I8 after defaults */
    bool separate_router_keys;
    msa_similarity_t similarity;
    msa_head_reduce_t head_reduce;
    msa_query_reduce_t query_reduce;
    msa_chunk_reduce_t chunk_reduce;
    uint32_t default_top_k; /* 1..1024 after defaults */
    char model[MSA_MAX_MODEL_LEN + 1];
} msa_schema_t;

/* Applies the proto defaults in place: kv_dtype/routing_dtype 0 -> BF16,
 * default_top_k 0 -> 16. */
void msa_schema_apply_defaults(msa_schema_t *s);

/* Validates a schema after defaults. Messages name the field with the given
 * prefix (e.g. "schema"): "schema.query_heads: 12 is not a multiple of
 * kv_heads 8". Returns MSA_OK or MSA_EINVAL. */
int msa_schema_validate(const msa_schema_t *s, const char *prefix, msa_status_t *st);

/* Validates a collection name ([A-Za-z0-9_.-]{1,64}); field names the field. */
int msa_schema_validate_name(const char *name, const char *field, msa_status_t *st);

/* Returns the position of model layer `layer` in s->layers, or -1. */
int msa_schema_layer_pos(const msa_schema_t *s, uint32_t layer);

/* The dtype router keys are STORED in (SEMANTICS routing step 2): routing_dtype,
 * or kv_dtype when routing_dtype is I8. */
msa_dtype_t msa_schema_router_store_dtype(const msa_schema_t *s);

/* Encoded size is at most MSA_SCHEMA_ENC_MAX bytes. */
#define MSA_SCHEMA_ENC_MAX (64 + 4 * MSA_MAX_LAYERS + MSA_MAX_MODEL_LEN + 1)
/* Writes the encoding to buf (>= MSA_SCHEMA_ENC_MAX bytes); returns its length. */
size_t msa_schema_encode(const msa_schema_t *s, uint8_t *buf);
/* Decodes; MSA_ECORRUPT when the bytes are not a valid encoding. */
int msa_schema_decode(const uint8_t *buf, size_t len, msa_schema_t *out);

#ifdef __cplusplus
}
#endif
#endif
