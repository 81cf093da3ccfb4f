/* engine_probe.c — runs a JSON script of engine calls against a real engine
 * (daemon/engine.h) in-process and writes what came back as JSON + .npy files.
 * tests/test_engine.py drives it and compares the answers with tests/oracle.py.
 *
 * Usage: engine_probe SCRIPT.json OUT_DIR
 *
 * Script: {"data_dir": "...", "backup_dir": "...", "backend": "cpu"|"auto"|"cuda",
 *          "threads": 2, "nosync": true, "map_size": bytes, "min_seq_wait_ms": ms,
 *          "ops": [OP, ...]}
 * Relative .npy paths in the script are relative to the script's directory.
 * Output: OUT_DIR/results.json = {"results": [RESULT, ...]}; each RESULT has
 * "op", "code" ("OK", "EINVAL", ...), "msg", and the op's fields; tensors are
 * written as OUT_DIR/r<op>_... .npy and named relative to OUT_DIR.
 *
 * A tensor in a script is "file.npy", or {"npy": "file.npy", "dtype": "F16"|4,
 * "shape": [..], "truncate": bytes, "extra": bytes} to build inputs .npy cannot
 * express (wrong dtype label, byte length or shape). Ids are JSON numbers or
 * decimal strings (for values above 2^53). dtypes and enums are names or numbers.
 *
 * OPs: create {name, schema}, drop {name}, describe {name}, list_collections,
 *   write {collection, model, ops: [{put: {id, text, metadata, tokens, raw,
 *     layers: [{layer, k, v, router_k}]}, | delete: id, | unset: true,
 *     expect_version, expect_absent}]},
 *   route {collection, model, top_k, exclude_ids, min_seq, layers: [{layer, routing_q}]},
 *   attend {... route fields, doc_ids, scale, out_dtype, layers: [{layer, routing_q, q}]},
 *   get {collection, ids, with_text, with_metadata, with_tensors, layers, min_seq},
 *   list {collection, after_id, limit}, stats, backup {name, compact},
 *   verify {collection}, reopen {data_dir}, seq.
 */
#include "engine.h"
#include "npy.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ==== small helpers ================================================================ */

static char g_script_dir[4096];
static char g_out_dir[4096];

/* Allocations that live until the current op is done. */
typedef struct {
    void **p;
    size_t n, cap;
} arena_t;

static void *arena_keep(arena_t *a, void *p)
{
    if (!p) {
        fprintf(stderr, "engine_probe: out of memory\n");
        exit(3);
    }
    if (a->n == a->cap) {
        a->cap = a->cap ? 2 * a->cap : 64;
        a->p = realloc(a->p, a->cap * sizeof *a->p);
        if (!a->p) exit(3);
    }
    a->p[a->n++] = p;
    return p;
}

static void *arena_calloc(arena_t *a, size_t n, size_t sz)
{
    return arena_keep(a, calloc(n ? n : 1, sz ? sz : 1));
}

static void arena_reset(arena_t *a)
{
    for (size_t i = 0; i < a->n; i++) free(a->p[i]);
    a->n = 0;
}

static const cJSON *jget(const cJSON *o, const char *k)
{
    return o ? cJSON_GetObjectItemCaseSensitive(o, k) : NULL;
}

static uint64_t ju64(const cJSON *v, uint64_t dflt)
{
    if (!v) return dflt;
    if (cJSON_IsString(v)) return strtoull(v->valuestring, NULL, 10);
    if (cJSON_IsNumber(v))
        return v->valuedouble < 0 ? (uint64_t)(int64_t)v->valuedouble : (uint64_t)v->valuedouble;
    if (cJSON_IsBool(v)) return cJSON_IsTrue(v) ? 1 : 0;
    return dflt;
}

static uint64_t jget_u64(const cJSON *o, const char *k, uint64_t dflt)
{
    return ju64(jget(o, k), dflt);
}

static bool jget_bool(const cJSON *o, const char *k)
{
    const cJSON *v = jget(o, k);
    return v && (cJSON_IsTrue(v) || (cJSON_IsNumber(v) && v->valuedouble != 0));
}

static const char *jget_str(const cJSON *o, const char *k, const char *dflt)
{
    const cJSON *v = jget(o, k);
    return cJSON_IsString(v) ? v->valuestring : dflt;
}

/* An enum value: a number, or a name from names[] (index = value). */
static int jget_enum(const cJSON *o, const char *k, const char *const *names, int n, int dflt)
{
    const cJSON *v = jget(o, k);
    if (!v) return dflt;
    if (cJSON_IsNumber(v)) return (int)v->valuedouble;
    if (cJSON_IsString(v))
        for (int i = 0; i < n; i++)
            if (names[i] && strcmp(names[i], v->valuestring) == 0) return i;
    fprintf(stderr, "engine_probe: bad value for %s\n", k);
    exit(2);
}

static const char *const DTYPES[] = {"DTYPE_UNSPECIFIED", "F32", "F16", "BF16", "I8"};
static const char *const SIMS[] = {"COSINE", "DOT"};
static const char *const HEADS[] = {"HEAD_MEAN", "HEAD_MAX"};
static const char *const QUERIES[] = {"QUERY_MAX", "QUERY_MEAN", "QUERY_LAST"};
static const char *const CHUNKS[] = {"CHUNK_MAX", "CHUNK_MEAN"};

static cJSON *jid(uint64_t v)
{
    char buf[32];
    snprintf(buf, sizeof buf, "%" PRIu64, v);
    return cJSON_CreateRaw(buf);
}

static void jadd_u64(cJSON *o, const char *k, uint64_t v)
{
    cJSON_AddItemToObject(o, k, jid(v));
}

static cJSON *jstr_n(const void *p, size_t n)
{
    /* Text and metadata come back as strings (tests use UTF-8) and as hex. */
    char *s = malloc(n + 1);
    if (!s) exit(3);
    if (n) memcpy(s, p, n);
    s[n] = '\0';
    cJSON *r = cJSON_CreateString(s);
    free(s);
    return r;
}

static cJSON *jhex(const void *p, size_t n)
{
    char *s = malloc(2 * n + 1);
    if (!s) exit(3);
    for (size_t i = 0; i < n; i++) snprintf(s + 2 * i, 3, "%02x", ((const uint8_t *)p)[i]);
    s[2 * n] = '\0';
    cJSON *r = cJSON_CreateString(s);
    free(s);
    return r;
}

/* ==== tensors in and out =============================================================== */

/* Loads a tensor spec into *t; the data lives in the arena. Returns false (and
 * leaves t empty) for a null/missing spec. */
static bool load_tensor(const cJSON *spec, arena_t *a, msa_tensor_t *t)
{
    memset(t, 0, sizeof *t);
    if (!spec || cJSON_IsNull(spec)) return false;
    const char *file = cJSON_IsString(spec) ? spec->valuestring : jget_str(spec, "npy", NULL);
    if (!file) {
        fprintf(stderr, "engine_probe: tensor spec without npy\n");
        exit(2);
    }
    char path[8192];
    if (file[0] == '/')
        snprintf(path, sizeof path, "%s", file);
    else
        snprintf(path, sizeof path, "%s/%s", g_script_dir, file);
    msa_cli_npy_t arr;
    msa_status_t st;
    if (msa_cli_npy_read(path, &arr, &st) != MSA_OK) {
        fprintf(stderr, "engine_probe: %s\n", st.msg);
        exit(2);
    }
    arena_keep(a, arr.data ? arr.data : malloc(1));
    *t = msa_cli_npy_tensor(&arr);
    if (cJSON_IsObject(spec)) {
        const cJSON *dt = jget(spec, "dtype");
        if (dt) t->dtype = (msa_dtype_t)jget_enum(spec, "dtype", DTYPES, 5, 0);
        const cJSON *sh = jget(spec, "shape");
        if (cJSON_IsArray(sh)) {
            t->ndim = (uint32_t)cJSON_GetArraySize(sh);
            if (t->ndim > MSA_TENSOR_MAX_DIMS) t->ndim = MSA_TENSOR_MAX_DIMS;
            for (uint32_t i = 0; i < t->ndim; i++)
                t->shape[i] = (uint32_t)ju64(cJSON_GetArrayItem(sh, (int)i), 0);
        }
        uint64_t trunc = jget_u64(spec, "truncate", 0);
        t->nbytes = trunc > t->nbytes ? 0 : t->nbytes - trunc;
        uint64_t extra = jget_u64(spec, "extra", 0);
        if (extra) {
            uint8_t *b = arena_calloc(a, t->nbytes + extra, 1);
            memcpy(b, t->data, t->nbytes);
            t->data = b;
            t->nbytes += extra;
        }
        if (jget_bool(spec, "null_data")) t->data = NULL;
    }
    return true;
}

/* Writes a tensor as OUT_DIR/<name>.npy; returns the file name (a JSON string). */
static cJSON *save_tensor(const char *name, msa_dtype_t dt, uint32_t ndim, const uint32_t *shape,
                          const void *data, size_t nbytes)
{
    char path[8192], file[512];
    snprintf(file, sizeof file, "%s.npy", name);
    snprintf(path, sizeof path, "%s/%s", g_out_dir, file);
    msa_status_t st;
    if (msa_cli_npy_write(path, dt, ndim, shape, data, nbytes, &st) != MSA_OK) {
        /* A tensor the codec refuses (e.g. wrong byte count from the engine) is
         * a finding: report it instead of a file. */
        return cJSON_CreateString(st.msg);
    }
    return cJSON_CreateString(file);
}

/* ==== records to JSON ================================================================== */

static cJSON *schema_json(const msa_schema_t *s)
{
    cJSON *o = cJSON_CreateObject();
    cJSON *l = cJSON_AddArrayToObject(o, "layers");
    for (uint32_t i = 0; i < s->n_layers && i < MSA_MAX_LAYERS; i++)
        cJSON_AddItemToArray(l, cJSON_CreateNumber(s->layers[i]));
    cJSON_AddNumberToObject(o, "kv_heads", s->kv_heads);
    cJSON_AddNumberToObject(o, "query_heads", s->query_heads);
    cJSON_AddNumberToObject(o, "head_dim", s->head_dim);
    cJSON_AddNumberToObject(o, "chunk_tokens", s->chunk_tokens);
    cJSON_AddStringToObject(o, "kv_dtype", msa_dtype_name(s->kv_dtype));
    cJSON_AddStringToObject(o, "routing_dtype", msa_dtype_name(s->routing_dtype));
    cJSON_AddBoolToObject(o, "separate_router_keys", s->separate_router_keys);
    cJSON_AddNumberToObject(o, "similarity", s->similarity);
    cJSON_AddNumberToObject(o, "head_reduce", s->head_reduce);
    cJSON_AddNumberToObject(o, "query_reduce", s->query_reduce);
    cJSON_AddNumberToObject(o, "chunk_reduce", s->chunk_reduce);
    cJSON_AddNumberToObject(o, "default_top_k", s->default_top_k);
    cJSON_AddStringToObject(o, "model", s->model);
    return o;
}

static cJSON *coll_json(const msa_engine_coll_info_t *c)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "name", c->name);
    cJSON_AddItemToObject(o, "schema", schema_json(&c->schema));
    jadd_u64(o, "documents", c->documents);
    jadd_u64(o, "chunks", c->chunks);
    jadd_u64(o, "tokens", c->tokens);
    jadd_u64(o, "bytes", c->bytes);
    jadd_u64(o, "created_seq", c->created_seq);
    return o;
}

static cJSON *doc_json(const msa_doc_rec_t *d)
{
    cJSON *o = cJSON_CreateObject();
    jadd_u64(o, "id", d->id);
    jadd_u64(o, "version", d->version);
    cJSON_AddNumberToObject(o, "tokens", d->tokens);
    cJSON_AddNumberToObject(o, "chunks", d->chunks);
    jadd_u64(o, "created_seq", d->created_seq);
    jadd_u64(o, "updated_seq", d->updated_seq);
    cJSON_AddNumberToObject(o, "updated_unix_ms", (double)d->updated_unix_ms);
    jadd_u64(o, "text_bytes", d->text_bytes);
    jadd_u64(o, "metadata_bytes", d->metadata_bytes);
    jadd_u64(o, "tensor_bytes", d->tensor_bytes);
    return o;
}

static cJSON *ids_json(const uint64_t *ids, size_t n)
{
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; i < n; i++) cJSON_AddItemToArray(a, jid(ids[i]));
    return a;
}

static cJSON *scores_json(const float *s, size_t n)
{
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; s && i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber((double)s[i]));
    return a;
}

/* ==== ops ============================================================================ */

typedef struct {
    msa_engine_config_t cfg;
    char data_dir[4096];
    char backup_dir[4096];
    msa_engine_t *e;
} probe_t;

static uint64_t *ids_from(const cJSON *arr, arena_t *a, size_t *n)
{
    *n = cJSON_IsArray(arr) ? (size_t)cJSON_GetArraySize(arr) : 0;
    uint64_t *ids = arena_calloc(a, *n, sizeof *ids);
    for (size_t i = 0; i < *n; i++) ids[i] = ju64(cJSON_GetArrayItem(arr, (int)i), 0);
    return ids;
}

static int op_create(probe_t *p, const cJSON *op, cJSON *res, msa_status_t *st)
{
    const cJSON *js = jget(op, "schema");
    msa_schema_t s;
    memset(&s, 0, sizeof s);
    const cJSON *layers = jget(js, "layers");
    s.n_layers = cJSON_IsArray(layers) ? (uint32_t)cJSON_GetArraySize(layers) : 0;
    for (uint32_t i = 0; i < s.n_layers && i < MSA_MAX_LAYERS; i++)
        s.layers[i] = (uint32_t)ju64(cJSON_GetArrayItem(layers, (int)i), 0);
    /* more than MSA_MAX_LAYERS: keep the count so validation sees it */
    s.kv_heads = (uint32_t)jget_u64(js, "kv_heads", 0);
    s.query_heads = (uint32_t)jget_u64(js, "query_heads", 0);
    s.head_dim = (uint32_t)jget_u64(js, "head_dim", 0);
    s.chunk_tokens = (uint32_t)jget_u64(js, "chunk_tokens", 0);
    s.kv_dtype = (msa_dtype_t)jget_enum(js, "kv_dtype", DTYPES, 5, 0);
    s.routing_dtype = (msa_dtype_t)jget_enum(js, "routing_dtype", DTYPES, 5, 0);
    s.separate_router_keys = jget_bool(js, "separate_router_keys");
    s.similarity = (msa_similarity_t)jget_enum(js, "similarity", SIMS, 2, 0);
    s.head_reduce = (msa_head_reduce_t)jget_enum(js, "head_reduce", HEADS, 2, 0);
    s.query_reduce = (msa_query_reduce_t)jget_enum(js, "query_reduce", QUERIES, 3, 0);
    s.chunk_reduce = (msa_chunk_reduce_t)jget_enum(js, "chunk_reduce", CHUNKS, 2, 0);
    s.default_top_k = (uint32_t)jget_u64(js, "default_top_k", 0);
    const char *model = jget_str(js, "model", "");
    if (strlen(model) > MSA_MAX_MODEL_LEN)
        memcpy(s.model, model, sizeof s.model); /* unterminated on purpose: too long */
    else
        snprintf(s.model, sizeof s.model, "%s", model);
    msa_engine_create_collection_result_t *out = NULL;
    int rc = msa_engine_create_collection(p->e, jget_str(op, "name", ""), &s, &out, st);
    if (rc == MSA_OK) cJSON_AddItemToObject(res, "info", coll_json(&out->info));
    msa_engine_create_collection_result_free(out);
    return rc;
}

static int op_write(probe_t *p, const cJSON *op, cJSON *res, arena_t *a, msa_status_t *st)
{
    const cJSON *ops = jget(op, "ops");
    size_t n = cJSON_IsArray(ops) ? (size_t)cJSON_GetArraySize(ops) : 0;
    msa_engine_write_op_t *w = arena_calloc(a, n, sizeof *w);
    for (size_t i = 0; i < n; i++) {
        const cJSON *o = cJSON_GetArrayItem(ops, (int)i);
        w[i].expect_version = jget_u64(o, "expect_version", 0);
        w[i].expect_absent = jget_bool(o, "expect_absent");
        const cJSON *put = jget(o, "put");
        if (put) {
            w[i].kind = MSA_OP_PUT;
            msa_engine_doc_t *d = &w[i].put;
            d->id = jget_u64(put, "id", 0);
            const char *text = jget_str(put, "text", "");
            d->text = text;
            d->text_len = strlen(text);
            const char *meta = jget_str(put, "metadata", "");
            d->metadata = meta;
            d->metadata_len = strlen(meta);
            d->tokens = (uint32_t)jget_u64(put, "tokens", 0);
            d->raw = jget_bool(put, "raw");
            const cJSON *ls = jget(put, "layers");
            d->n_layers = cJSON_IsArray(ls) ? (uint32_t)cJSON_GetArraySize(ls) : 0;
            msa_engine_layer_kv_t *lk = arena_calloc(a, d->n_layers, sizeof *lk);
            for (uint32_t j = 0; j < d->n_layers; j++) {
                const cJSON *l = cJSON_GetArrayItem(ls, (int)j);
                lk[j].layer = (uint32_t)jget_u64(l, "layer", 0);
                load_tensor(jget(l, "k"), a, &lk[j].k);
                load_tensor(jget(l, "v"), a, &lk[j].v);
                load_tensor(jget(l, "router_k"), a, &lk[j].router_k);
            }
            d->layers = lk;
        } else if (jget(o, "delete")) {
            w[i].kind = MSA_OP_DELETE;
            w[i].delete_id = jget_u64(o, "delete", 0);
        } else {
            w[i].kind = (msa_engine_op_kind_t)0; /* "op not set" */
        }
    }
    msa_engine_write_req_t req = {.collection = jget_str(op, "collection", ""),
                                  .model = jget_str(op, "model", NULL),
                                  .n_ops = n,
                                  .ops = w};
    msa_engine_write_result_t *out = NULL;
    int rc = msa_engine_write(p->e, &req, &out, st);
    if (rc == MSA_OK) {
        jadd_u64(res, "commit_seq", out->commit_seq);
        cJSON_AddItemToObject(res, "versions", ids_json(out->versions, out->n_versions));
    }
    msa_engine_write_result_free(out);
    return rc;
}

static msa_engine_layer_query_t *queries_from(const cJSON *layers, arena_t *a, uint32_t *n)
{
    *n = cJSON_IsArray(layers) ? (uint32_t)cJSON_GetArraySize(layers) : 0;
    msa_engine_layer_query_t *q = arena_calloc(a, *n, sizeof *q);
    for (uint32_t i = 0; i < *n; i++) {
        const cJSON *l = cJSON_GetArrayItem(layers, (int)i);
        q[i].layer = (uint32_t)jget_u64(l, "layer", 0);
        load_tensor(jget(l, "routing_q"), a, &q[i].routing_q);
        load_tensor(jget(l, "q"), a, &q[i].q);
    }
    return q;
}

static void read_common(const cJSON *op, msa_engine_read_common_t *c)
{
    c->collection = jget_str(op, "collection", "");
    c->model = jget_str(op, "model", NULL);
    c->min_seq = jget_u64(op, "min_seq", 0);
    c->deadline_ms = 0;
}

static int op_route(probe_t *p, const cJSON *op, cJSON *res, arena_t *a, msa_status_t *st)
{
    msa_engine_route_req_t req;
    memset(&req, 0, sizeof req);
    read_common(op, &req.c);
    req.layers = queries_from(jget(op, "layers"), a, &req.n_layers);
    req.top_k = (uint32_t)jget_u64(op, "top_k", 0);
    req.exclude_ids = ids_from(jget(op, "exclude_ids"), a, &req.n_exclude);
    msa_engine_route_result_t *out = NULL;
    int rc = msa_engine_route(p->e, &req, &out, st);
    if (rc == MSA_OK && out) {
        jadd_u64(res, "snapshot_seq", out->snapshot_seq);
        cJSON *ls = cJSON_AddArrayToObject(res, "layers");
        for (uint32_t i = 0; i < out->n_layers; i++) {
            const msa_engine_layer_route_t *l = &out->layers[i];
            cJSON *o = cJSON_CreateObject();
            cJSON_AddNumberToObject(o, "layer", l->layer);
            cJSON_AddItemToObject(o, "doc_ids", ids_json(l->doc_ids, l->n));
            cJSON_AddItemToObject(o, "scores", scores_json(l->scores, l->n));
            cJSON_AddItemToArray(ls, o);
        }
    }
    msa_engine_route_result_free(out);
    return rc;
}

static int op_attend(probe_t *p, const cJSON *op, int idx, cJSON *res, arena_t *a, msa_status_t *st)
{
    msa_engine_attend_req_t req;
    memset(&req, 0, sizeof req);
    read_common(op, &req.c);
    req.layers = queries_from(jget(op, "layers"), a, &req.n_layers);
    req.top_k = (uint32_t)jget_u64(op, "top_k", 0);
    req.exclude_ids = ids_from(jget(op, "exclude_ids"), a, &req.n_exclude);
    req.doc_ids = ids_from(jget(op, "doc_ids"), a, &req.n_doc_ids);
    const cJSON *sc = jget(op, "scale");
    req.scale = cJSON_IsNumber(sc) ? (float)sc->valuedouble : 0.0f;
    req.out_dtype = (msa_dtype_t)jget_enum(op, "out_dtype", DTYPES, 5, 0);
    msa_engine_attend_result_t *out = NULL;
    int rc = msa_engine_attend(p->e, &req, &out, st);
    if (rc == MSA_OK && out) {
        jadd_u64(res, "snapshot_seq", out->snapshot_seq);
        cJSON_AddStringToObject(res, "out_dtype", msa_dtype_name(out->out_dtype));
        cJSON *ls = cJSON_AddArrayToObject(res, "layers");
        for (uint32_t i = 0; i < out->n_layers; i++) {
            const msa_engine_layer_attention_t *l = &out->layers[i];
            cJSON *o = cJSON_CreateObject();
            cJSON_AddNumberToObject(o, "layer", l->layer);
            cJSON_AddItemToObject(o, "doc_ids", ids_json(l->doc_ids, l->n));
            if (l->scores)
                cJSON_AddItemToObject(o, "scores", scores_json(l->scores, l->n));
            else
                cJSON_AddItemToObject(o, "scores", cJSON_CreateNull());
            char name[128];
            uint32_t sh[3] = {l->T, l->Hq, l->D};
            snprintf(name, sizeof name, "r%d_l%u_out", idx, l->layer);
            cJSON_AddItemToObject(o, "out",
                                  save_tensor(name, out->out_dtype, 3, sh, l->out, l->out_bytes));
            snprintf(name, sizeof name, "r%d_l%u_lse", idx, l->layer);
            cJSON_AddItemToObject(
                o, "lse",
                save_tensor(name, MSA_DT_F32, 2, sh, l->lse, (size_t)l->T * l->Hq * sizeof(float)));
            cJSON_AddItemToArray(ls, o);
        }
    }
    msa_engine_attend_result_free(out);
    return rc;
}

static int op_get(probe_t *p, const cJSON *op, int idx, cJSON *res, arena_t *a, msa_status_t *st)
{
    msa_engine_get_req_t req;
    memset(&req, 0, sizeof req);
    req.collection = jget_str(op, "collection", "");
    req.ids = ids_from(jget(op, "ids"), a, &req.n_ids);
    req.with_text = jget_bool(op, "with_text");
    req.with_metadata = jget_bool(op, "with_metadata");
    req.with_tensors = jget_bool(op, "with_tensors");
    size_t nl;
    uint64_t *l64 = ids_from(jget(op, "layers"), a, &nl);
    uint32_t *layers = arena_calloc(a, nl, sizeof *layers);
    for (size_t i = 0; i < nl; i++) layers[i] = (uint32_t)l64[i];
    req.n_layers = (uint32_t)nl;
    req.layers = layers;
    req.min_seq = jget_u64(op, "min_seq", 0);
    msa_engine_get_result_t *out = NULL;
    int rc = msa_engine_get(p->e, &req, &out, st);
    if (rc == MSA_OK && out) {
        jadd_u64(res, "snapshot_seq", out->snapshot_seq);
        cJSON *recs = cJSON_AddArrayToObject(res, "records");
        for (size_t i = 0; i < out->n_records; i++) {
            const msa_engine_get_record_t *r = &out->records[i];
            cJSON *o = cJSON_CreateObject();
            cJSON_AddItemToObject(o, "info", doc_json(&r->info));
            cJSON_AddItemToObject(o, "text", jstr_n(r->text.data, r->text.len));
            cJSON_AddItemToObject(o, "metadata", jstr_n(r->metadata.data, r->metadata.len));
            cJSON_AddItemToObject(o, "metadata_hex", jhex(r->metadata.data, r->metadata.len));
            cJSON *ls = cJSON_AddArrayToObject(o, "layers");
            for (uint32_t j = 0; j < r->n_layers; j++) {
                const msa_engine_get_layer_t *g = &r->layers[j];
                cJSON *lo = cJSON_CreateObject();
                cJSON_AddNumberToObject(lo, "layer", g->layer);
                const msa_tensor_t *ts[3] = {&g->k, &g->v, &g->router_k};
                const char *names[3] = {"k", "v", "router_k"};
                for (int k = 0; k < 3; k++) {
                    if (!ts[k]->data) {
                        cJSON_AddItemToObject(lo, names[k], cJSON_CreateNull());
                        continue;
                    }
                    char name[128];
                    snprintf(name, sizeof name, "r%d_d%zu_l%u_%s", idx, i, g->layer, names[k]);
                    cJSON_AddItemToObject(lo, names[k],
                                          save_tensor(name, ts[k]->dtype, ts[k]->ndim, ts[k]->shape,
                                                      ts[k]->data, ts[k]->nbytes));
                }
                cJSON_AddItemToArray(ls, lo);
            }
            cJSON_AddItemToArray(recs, o);
        }
    }
    msa_engine_get_result_free(out);
    return rc;
}

static int op_list(probe_t *p, const cJSON *op, cJSON *res, msa_status_t *st)
{
    msa_engine_list_req_t req = {.collection = jget_str(op, "collection", ""),
                                 .after_id = jget_u64(op, "after_id", 0),
                                 .limit = (uint32_t)jget_u64(op, "limit", 0)};
    msa_engine_list_result_t *out = NULL;
    int rc = msa_engine_list(p->e, &req, &out, st);
    if (rc == MSA_OK) {
        jadd_u64(res, "snapshot_seq", out->snapshot_seq);
        jadd_u64(res, "next_after_id", out->next_after_id);
        cJSON *docs = cJSON_AddArrayToObject(res, "docs");
        for (uint32_t i = 0; i < out->n; i++) cJSON_AddItemToArray(docs, doc_json(&out->docs[i]));
    }
    msa_engine_list_result_free(out);
    return rc;
}

static int op_stats(probe_t *p, cJSON *res, msa_status_t *st)
{
    msa_engine_stats_result_t *s = NULL;
    int rc = msa_engine_stats(p->e, &s, st);
    if (rc == MSA_OK) {
        cJSON_AddStringToObject(res, "backend", s->backend);
        jadd_u64(res, "commit_seq", s->commit_seq);
        jadd_u64(res, "store_bytes", s->store_bytes);
        jadd_u64(res, "collections", s->collections);
        jadd_u64(res, "documents", s->documents);
        jadd_u64(res, "chunks", s->chunks);
        jadd_u64(res, "index_bytes", s->index_bytes);
        jadd_u64(res, "writes", s->writes);
        jadd_u64(res, "routes", s->routes);
        jadd_u64(res, "attends", s->attends);
    }
    msa_engine_stats_result_free(s);
    return rc;
}

static int engine_open(probe_t *p, msa_status_t *st)
{
    p->cfg.data_dir = p->data_dir;
    p->cfg.backup_dir = p->backup_dir[0] ? p->backup_dir : NULL;
    return msa_engine_open(&p->cfg, &p->e, st);
}

static int run_op(probe_t *p, const cJSON *op, int idx, cJSON *res, arena_t *a, msa_status_t *st)
{
    const char *kind = jget_str(op, "op", "");
    if (!p->e && strcmp(kind, "reopen") != 0)
        return msa_status_set(st, MSA_EUNAVAIL, "engine not open");
    if (!strcmp(kind, "create")) return op_create(p, op, res, st);
    if (!strcmp(kind, "drop")) {
        msa_engine_drop_collection_result_t *out = NULL;
        int rc = msa_engine_drop_collection(p->e, jget_str(op, "name", ""), &out, st);
        if (rc == MSA_OK) jadd_u64(res, "commit_seq", out->commit_seq);
        msa_engine_drop_collection_result_free(out);
        return rc;
    }
    if (!strcmp(kind, "describe")) {
        msa_engine_describe_collection_result_t *out = NULL;
        int rc = msa_engine_describe_collection(p->e, jget_str(op, "name", ""), &out, st);
        if (rc == MSA_OK) cJSON_AddItemToObject(res, "info", coll_json(&out->info));
        msa_engine_describe_collection_result_free(out);
        return rc;
    }
    if (!strcmp(kind, "list_collections")) {
        msa_engine_list_collections_result_t *out = NULL;
        int rc = msa_engine_list_collections(p->e, &out, st);
        if (rc == MSA_OK) {
            cJSON *arr = cJSON_AddArrayToObject(res, "collections");
            for (size_t i = 0; i < out->n; i++)
                cJSON_AddItemToArray(arr, coll_json(&out->colls[i]));
        }
        msa_engine_list_collections_result_free(out);
        return rc;
    }
    if (!strcmp(kind, "write")) return op_write(p, op, res, a, st);
    if (!strcmp(kind, "route")) return op_route(p, op, res, a, st);
    if (!strcmp(kind, "attend")) return op_attend(p, op, idx, res, a, st);
    if (!strcmp(kind, "get")) return op_get(p, op, idx, res, a, st);
    if (!strcmp(kind, "list")) return op_list(p, op, res, st);
    if (!strcmp(kind, "stats")) return op_stats(p, res, st);
    if (!strcmp(kind, "seq")) {
        jadd_u64(res, "commit_seq", msa_engine_commit_seq(p->e));
        return MSA_OK;
    }
    if (!strcmp(kind, "backup")) {
        msa_engine_backup_result_t *out = NULL;
        int rc =
            msa_engine_backup(p->e, jget_str(op, "name", ""), jget_bool(op, "compact"), &out, st);
        if (rc == MSA_OK) {
            jadd_u64(res, "snapshot_seq", out->seq);
            jadd_u64(res, "bytes", out->bytes);
        }
        msa_engine_backup_result_free(out);
        return rc;
    }
    if (!strcmp(kind, "verify")) {
        msa_engine_verify_result_t *out = NULL;
        int rc = msa_engine_verify(p->e, jget_str(op, "collection", ""), &out, st);
        if (rc == MSA_OK) {
            jadd_u64(res, "documents_checked", out->docs_checked);
            cJSON *arr = cJSON_AddArrayToObject(res, "problems");
            for (size_t i = 0; i < out->n_problems; i++)
                cJSON_AddItemToArray(arr, cJSON_CreateString(out->problems[i]));
        }
        msa_engine_verify_result_free(out);
        return rc;
    }
    if (!strcmp(kind, "reopen")) {
        msa_engine_close(p->e);
        p->e = NULL;
        const char *dir = jget_str(op, "data_dir", NULL);
        if (dir) snprintf(p->data_dir, sizeof p->data_dir, "%s", dir);
        return engine_open(p, st);
    }
    fprintf(stderr, "engine_probe: unknown op '%s'\n", kind);
    exit(2);
}

/* ==== main ============================================================================ */

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) {
        free(b);
        b = NULL;
    }
    if (b) b[n] = '\0';
    fclose(f);
    return b;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: engine_probe SCRIPT.json OUT_DIR\n");
        return 2;
    }
    char *text = slurp(argv[1]);
    if (!text) {
        fprintf(stderr, "engine_probe: %s: %s\n", argv[1], strerror(errno));
        return 2;
    }
    cJSON *script = cJSON_Parse(text);
    free(text);
    if (!script) {
        fprintf(stderr, "engine_probe: %s: not JSON\n", argv[1]);
        return 2;
    }
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s", argv[1]);
    snprintf(g_script_dir, sizeof g_script_dir, "%s", dirname(tmp));
    snprintf(g_out_dir, sizeof g_out_dir, "%s", argv[2]);

    probe_t p;
    memset(&p, 0, sizeof p);
    snprintf(p.data_dir, sizeof p.data_dir, "%s", jget_str(script, "data_dir", "data"));
    snprintf(p.backup_dir, sizeof p.backup_dir, "%s", jget_str(script, "backup_dir", ""));
    const char *backend = jget_str(script, "backend", "cpu");
    p.cfg.backend = !strcmp(backend, "auto")   ? MSA_BACKEND_AUTO
                    : !strcmp(backend, "cuda") ? MSA_BACKEND_CUDA
                                               : MSA_BACKEND_CPU;
    p.cfg.threads = (unsigned)jget_u64(script, "threads", 2);
    p.cfg.nosync = jget(script, "nosync") ? jget_bool(script, "nosync") : true;
    p.cfg.map_size = jget_u64(script, "map_size", 64ull << 20);
    p.cfg.min_seq_wait_ms = (uint32_t)jget_u64(script, "min_seq_wait_ms", 0);
    /* CUDA backend knobs (MSA_GPU_SIM=1 in the environment: the simulated device). */
    msa_dev_config_env(&p.cfg.gpu.dev);
    const cJSON *gpu = jget(script, "gpu");
    if (gpu) {
        p.cfg.gpu.shards_per_gpu = (unsigned)jget_u64(gpu, "shards", 1);
        p.cfg.gpu.routing_bytes = jget_u64(gpu, "routing_kb", 0) << 10;
        p.cfg.gpu.cache_bytes = jget_u64(gpu, "cache_kb", 0) << 10;
        p.cfg.gpu.cache_off = jget(gpu, "cache_kb") && !p.cfg.gpu.cache_bytes;
        p.cfg.gpu.coalesce_us = (unsigned)jget_u64(gpu, "coalesce_us", 100);
        p.cfg.gpu.evict_grace_ms = (unsigned)jget_u64(gpu, "evict_grace_ms", 0);
        p.cfg.gpu.lanes = (unsigned)jget_u64(gpu, "lanes", 0);
        p.cfg.gpu.lane_scratch = jget_u64(gpu, "scratch_kb", 0) << 10;
    }

    cJSON *results = cJSON_CreateObject();
    cJSON *arr = cJSON_AddArrayToObject(results, "results");
    msa_status_t st;
    msa_status_clear(&st);
    int rc = engine_open(&p, &st);
    cJSON_AddStringToObject(results, "open_code", msa_errname(rc));
    cJSON_AddStringToObject(results, "open_msg", st.msg);

    arena_t arena = {0};
    const cJSON *ops = jget(script, "ops");
    int idx = 0;
    const cJSON *op;
    cJSON_ArrayForEach(op, ops)
    {
        cJSON *res = cJSON_CreateObject();
        cJSON_AddStringToObject(res, "op", jget_str(op, "op", ""));
        msa_status_clear(&st);
        rc = run_op(&p, op, idx, res, &arena, &st);
        arena_reset(&arena);
        cJSON_AddStringToObject(res, "code", msa_errname(rc));
        cJSON_AddStringToObject(res, "msg", rc == MSA_OK ? "" : st.msg);
        cJSON_AddItemToArray(arr, res);
        idx++;
    }
    free(arena.p);
    if (p.e) {
        /* What the backend did, so tests can tell device answers from fallbacks. */
        msa_engine_stats_result_t *s = NULL;
        msa_status_clear(&st);
        if (msa_engine_stats(p.e, &s, &st) == MSA_OK && s->n_gpu) {
            cJSON *g = cJSON_AddObjectToObject(results, "gpu");
            jadd_u64(g, "routes_device", s->gpu.routes_device);
            jadd_u64(g, "routes_streamed", s->gpu.routes_streamed);
            jadd_u64(g, "routes_fallback", s->gpu.routes_fallback);
            jadd_u64(g, "batches", s->gpu.batches);
            jadd_u64(g, "coalesced", s->gpu.coalesced);
            jadd_u64(g, "page_ins", s->gpu.page_ins);
            jadd_u64(g, "page_outs", s->gpu.page_outs);
            jadd_u64(g, "syncs", s->gpu.syncs);
            jadd_u64(g, "cache_hits", s->gpu.cache_hits);
            jadd_u64(g, "cache_misses", s->gpu.cache_misses);
            jadd_u64(g, "cache_evictions", s->gpu.cache_evictions);
            jadd_u64(g, "attends_device", s->gpu.attends_device);
            jadd_u64(g, "attends_fallback", s->gpu.attends_fallback);
        }
        msa_engine_stats_result_free(s);
    }
    msa_engine_close(p.e);

    char path[8192];
    snprintf(path, sizeof path, "%s/results.json", g_out_dir);
    char *out = cJSON_Print(results);
    FILE *f = fopen(path, "w");
    if (!f || fputs(out, f) < 0 || fclose(f) != 0) {
        fprintf(stderr, "engine_probe: cannot write %s\n", path);
        return 2;
    }
    free(out);
    cJSON_Delete(results);
    cJSON_Delete(script);
    return 0;
}
