/* methods.c — request decoding, proto <-> engine conversion and response
 * encoding for every RPC of msad (see methods.h).
 *
 * Sections: helpers; conversions; Memory service; Admin service; Health;
 * the method table.
 *
 * Validation split: this file checks only what the engine cannot see after
 * conversion (malformed bytes, enum values outside the proto's range, tensor
 * rank beyond MSA_TENSOR_MAX_DIMS, schema arrays larger than the C struct).
 * Everything else (shapes, dtypes, ids, layers, names) is the engine's job,
 * and its messages are passed through unchanged.
 */
#include "methods.h"
#include "rpc_lists.h"

#include "health.pb-c.h"
#include "memory.pb-c.h"
#include "msa_alloc.h"
#include "msa_clock.h"
#include "msa_log.h"
#include "wire.pb-c.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ==== helpers ================================================================ */

int64_t msa__rpc_now_ms(void)
{
    return msa_clock_ms();
}

#define OOM(st) msa_status_set((st), MSA_ENOMEM, "out of memory building the message")

/* One varint at p[*i..len); 0 when truncated. */
static int varint(const uint8_t *p, size_t len, size_t *i, uint64_t *out)
{
    uint64_t v = 0;
    for (unsigned shift = 0; shift < 64 && *i < len; shift += 7) {
        uint8_t b = p[(*i)++];
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return 1;
        }
    }
    return 0;
}

/* Walks the wire bytes of a message of descriptor d and refuses a string
 * field that holds a NUL byte: protobuf-c hands strings to C NUL-terminated,
 * so "c\0junk" would silently act on "c". path (capacity cap) is the field
 * path so far; it is restored on return. Malformed bytes are left to unpack. */
static int nul_walk(const ProtobufCMessageDescriptor *d, const uint8_t *p, size_t len, char *path,
                    size_t cap, int depth, msa_status_t *st)
{
    unsigned seen[64] = {0}; /* per field: entries so far, for "ops[3]" */
    size_t i = 0;
    while (i < len) {
        uint64_t key, flen;
        if (!varint(p, len, &i, &key)) return MSA_OK;
        switch (key & 7) {
        case 0:
            if (!varint(p, len, &i, &flen)) return MSA_OK;
            continue;
        case 1:
            i += 8;
            continue;
        case 5:
            i += 4;
            continue;
        case 2:
            if (!varint(p, len, &i, &flen) || flen > len - i) return MSA_OK;
            break;
        default:
            return MSA_OK;
        }
        size_t start = i;
        i += flen;
        const ProtobufCFieldDescriptor *f =
            key >> 3 <= UINT32_MAX
                ? protobuf_c_message_descriptor_get_field(d, (unsigned)(key >> 3))
                : NULL;
        if (!f || (f->type != PROTOBUF_C_TYPE_STRING && f->type != PROTOBUF_C_TYPE_MESSAGE))
            continue;
        size_t fi = (size_t)(f - d->fields);
        unsigned k = fi < 64 ? seen[fi]++ : 0;
        size_t pl = strlen(path);
        if (f->label == PROTOBUF_C_LABEL_REPEATED)
            snprintf(path + pl, cap - pl, "%s%s[%u]", pl ? "." : "", f->name, k);
        else
            snprintf(path + pl, cap - pl, "%s%s", pl ? "." : "", f->name);
        int rc = MSA_OK;
        if (f->type == PROTOBUF_C_TYPE_STRING) {
            if (memchr(p + start, 0, flen))
                rc = msa_status_set(
                    st, MSA_EINVAL,
                    "%s: contains a NUL byte at offset %zu; names and strings "
                    "may not",
                    path, (size_t)((const uint8_t *)memchr(p + start, 0, flen) - (p + start)));
        } else if (depth < 32) {
            rc = nul_walk(f->descriptor, p + start, flen, path, cap, depth + 1, st);
        }
        path[pl] = '\0';
        if (rc) return rc;
    }
    return MSA_OK;
}

/* Unpacks req into the call's arena. Malformed bytes -> INVALID_ARGUMENT;
 * so is a NUL inside any string field (a name cut short would act on another
 * object). Out of memory while unpacking is MSA_ENOMEM, not the client's fault. */
static int unpack(const msa_rpc_req_t *req, const ProtobufCMessageDescriptor *d,
                  ProtobufCMessage **out, msa_status_t *st)
{
    *out = protobuf_c_message_unpack(d, &req->arena->pb, req->len, req->data);
    /* wire.proto's messages are msad's private view of the public ones. */
    const char *name = strncmp(d->name, "msa.v1.wire.", 12) == 0 ? d->name + 12 : d->name;
    if (!*out && req->arena->oom)
        return msa_status_set(st, MSA_ENOMEM, "request: out of memory unpacking the message");
    if (!*out)
        return msa_status_set(st, MSA_EINVAL, "request: malformed %s%s message (%zu bytes)",
                              name == d->name ? "" : "msa.v1.", name, req->len);
    char path[256] = "";
    return nul_walk(d, req->data, req->len, path, sizeof(path), 0, st);
}

/* Packs m into a malloc'd buffer, refusing responses above the send limit so
 * that the client gets a clear RESOURCE_EXHAUSTED instead of a reset. */
static int pack(const msa_rpc_ctx_t *ctx, const ProtobufCMessage *m, msa_rpc_reply_t *rep,
                msa_status_t *st)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    if (n > ctx->max_send)
        return msa_status_set(st, MSA_EFULL,
                              "response: %zu bytes exceeds the message limit of %zu bytes "
                              "(--max-message-mb); ask for less per call",
                              n, ctx->max_send);
    uint8_t *buf = msa_malloc(n ? n : 1);
    if (!buf) return OOM(st);
    size_t w = protobuf_c_message_pack(m, buf);
    msa_assert(w == n);
    rep->data = buf;
    rep->len = n;
    return MSA_OK;
}

static const char *opt_str(const char *s)
{
    return (s && *s) ? s : NULL;
}
static const char *str(const char *s)
{
    return s ? s : "";
}

/* Unknown enum values survive protobuf-c decoding as plain ints. */
static int check_enum(int v, int max, const char *st_fmt, msa_status_t *st, ...)
    __attribute__((format(printf, 3, 5)));
static int check_enum(int v, int max, const char *path_fmt, msa_status_t *st, ...)
{
    if (v >= 0 && v <= max) return MSA_OK;
    char path[160];
    va_list ap;
    va_start(ap, st);
    vsnprintf(path, sizeof(path), path_fmt, ap);
    va_end(ap);
    return msa_status_set(st, MSA_EINVAL, "%s: unknown enum value %d (0..%d)", path, v, max);
}

/* ==== conversions ============================================================ */

/* A proto Tensor as a borrowed engine view. An absent tensor (t == NULL)
 * becomes data NULL, ndim 0, which the engine reports as missing. */
static int tensor_in(const Msa__V1__Tensor *t, msa_tensor_t *out, const char *path,
                     msa_status_t *st)
{
    memset(out, 0, sizeof(*out));
    if (!t) return MSA_OK;
    int rc = check_enum((int)t->dtype, MSA__V1__DTYPE__I8, "%s.dtype", st, path);
    if (rc) return rc;
    if (t->n_shape > MSA_TENSOR_MAX_DIMS)
        return msa_status_set(st, MSA_EINVAL, "%s.shape: %zu dimensions, at most %d", path,
                              t->n_shape, MSA_TENSOR_MAX_DIMS);
    out->dtype = (msa_dtype_t)t->dtype;
    out->ndim = (uint32_t)t->n_shape;
    for (size_t i = 0; i < t->n_shape; i++) out->shape[i] = t->shape[i];
    out->data = t->data.data;
    out->nbytes = t->data.len;
    /* A present but empty tensor still counts as present. */
    if (!out->data && (out->ndim || out->dtype)) out->data = "";
    return MSA_OK;
}

/* An engine tensor as a proto Tensor whose data borrows the engine's bytes. */
static Msa__V1__Tensor *tensor_out(msa_rpc_arena_t *a, msa_dtype_t dt, const uint32_t *shape,
                                   uint32_t ndim, const void *data, size_t nbytes)
{
    Msa__V1__Tensor *t = msa_rpc_arena_alloc(a, sizeof(*t));
    uint32_t *sh = msa_rpc_arena_alloc(a, sizeof(uint32_t) * (ndim ? ndim : 1));
    if (!t || !sh) return NULL;
    msa__v1__tensor__init(t);
    t->dtype = (Msa__V1__DType)dt;
    memcpy(sh, shape, sizeof(uint32_t) * ndim);
    t->n_shape = ndim;
    t->shape = sh;
    t->data.data = (uint8_t *)data;
    t->data.len = nbytes;
    return t;
}

static int schema_in(const Msa__V1__CollectionSchema *p, msa_schema_t *s, msa_status_t *st)
{
    memset(s, 0, sizeof(*s));
    if (!p) return msa_status_set(st, MSA_EINVAL, "schema: missing");
    if (p->n_layers > MSA_MAX_LAYERS)
        return msa_status_set(st, MSA_EINVAL, "schema.layers: %zu entries, at most %d", p->n_layers,
                              MSA_MAX_LAYERS);
    int rc;
    if ((rc = check_enum((int)p->kv_dtype, MSA__V1__DTYPE__I8, "schema.kv_dtype", st)) ||
        (rc = check_enum((int)p->routing_dtype, MSA__V1__DTYPE__I8, "schema.routing_dtype", st)) ||
        (rc = check_enum((int)p->similarity, MSA__V1__SIMILARITY__DOT, "schema.similarity", st)) ||
        (rc = check_enum((int)p->head_reduce, MSA__V1__HEAD_REDUCE__HEAD_MAX, "schema.head_reduce",
                         st)) ||
        (rc = check_enum((int)p->query_reduce, MSA__V1__QUERY_REDUCE__QUERY_LAST,
                         "schema.query_reduce", st)) ||
        (rc = check_enum((int)p->chunk_reduce, MSA__V1__CHUNK_REDUCE__CHUNK_MEAN,
                         "schema.chunk_reduce", st)))
        return rc;
    size_t mlen = strlen(str(p->model));
    if (mlen > MSA_MAX_MODEL_LEN)
        return msa_status_set(st, MSA_EINVAL, "schema.model: %zu bytes, at most %d", mlen,
                              MSA_MAX_MODEL_LEN);
    s->n_layers = (uint32_t)p->n_layers;
    for (size_t i = 0; i < p->n_layers; i++) s->layers[i] = p->layers[i];
    s->kv_heads = p->kv_heads;
    s->query_heads = p->query_heads;
    s->head_dim = p->head_dim;
    s->chunk_tokens = p->chunk_tokens;
    s->kv_dtype = (msa_dtype_t)p->kv_dtype;
    s->routing_dtype = (msa_dtype_t)p->routing_dtype;
    s->separate_router_keys = p->separate_router_keys;
    s->similarity = (msa_similarity_t)p->similarity;
    s->head_reduce = (msa_head_reduce_t)p->head_reduce;
    s->query_reduce = (msa_query_reduce_t)p->query_reduce;
    s->chunk_reduce = (msa_chunk_reduce_t)p->chunk_reduce;
    s->default_top_k = p->default_top_k;
    memcpy(s->model, str(p->model), mlen + 1);
    return MSA_OK;
}

/* Borrows s (layers, model) until the response is packed. */
static Msa__V1__CollectionSchema *schema_out(msa_rpc_arena_t *a, const msa_schema_t *s)
{
    Msa__V1__CollectionSchema *p = msa_rpc_arena_alloc(a, sizeof(*p));
    if (!p) return NULL;
    msa__v1__collection_schema__init(p);
    p->n_layers = s->n_layers;
    p->layers = (uint32_t *)s->layers;
    p->kv_heads = s->kv_heads;
    p->query_heads = s->query_heads;
    p->head_dim = s->head_dim;
    p->chunk_tokens = s->chunk_tokens;
    p->kv_dtype = (Msa__V1__DType)s->kv_dtype;
    p->routing_dtype = (Msa__V1__DType)s->routing_dtype;
    p->separate_router_keys = s->separate_router_keys;
    p->similarity = (Msa__V1__Similarity)s->similarity;
    p->head_reduce = (Msa__V1__HeadReduce)s->head_reduce;
    p->query_reduce = (Msa__V1__QueryReduce)s->query_reduce;
    p->chunk_reduce = (Msa__V1__ChunkReduce)s->chunk_reduce;
    p->default_top_k = s->default_top_k;
    p->model = (char *)s->model;
    return p;
}

static int coll_info_out(msa_rpc_arena_t *a, const msa_engine_coll_info_t *ci,
                         Msa__V1__CollectionInfo *p)
{
    msa__v1__collection_info__init(p);
    p->name = (char *)ci->name;
    p->schema = schema_out(a, &ci->schema);
    if (!p->schema) return MSA_ENOMEM;
    p->documents = ci->documents;
    p->chunks = ci->chunks;
    p->tokens = ci->tokens;
    p->bytes = ci->bytes;
    p->created_seq = ci->created_seq;
    return MSA_OK;
}

static void doc_info_out(const msa_doc_rec_t *r, Msa__V1__DocumentInfo *p)
{
    msa__v1__document_info__init(p);
    p->id = r->id;
    p->version = r->version;
    p->tokens = r->tokens;
    p->chunks = r->chunks;
    p->created_seq = r->created_seq;
    p->updated_seq = r->updated_seq;
    p->updated_unix_ms = r->updated_unix_ms;
    p->text_bytes = r->text_bytes;
    p->metadata_bytes = r->metadata_bytes;
}

/* Route/Attend layers -> engine queries (views into the request). */
static int queries_in(msa_rpc_arena_t *a, Msa__V1__LayerQuery **layers, size_t n, bool with_q,
                      msa_engine_layer_query_t **out, msa_status_t *st)
{
    msa_engine_layer_query_t *q = msa_rpc_arena_calloc(a, n ? n : 1, sizeof(*q));
    if (!q) return OOM(st);
    char path[64];
    for (size_t i = 0; i < n; i++) {
        const Msa__V1__LayerQuery *l = layers[i];
        q[i].layer = l->layer;
        snprintf(path, sizeof(path), "layers[%zu].routing_q", i);
        int rc = tensor_in(l->routing_q, &q[i].routing_q, path, st);
        if (rc) return rc;
        if (with_q) {
            snprintf(path, sizeof(path), "layers[%zu].q", i);
            rc = tensor_in(l->q, &q[i].q, path, st);
            if (rc) return rc;
        }
    }
    *out = q;
    return MSA_OK;
}

/* ==== Memory service ========================================================== */

static int h_create_collection(const msa_rpc_ctx_t *ctx, const msa_rpc_req_t *req,
                               msa_rpc_reply_t *rep, msa_status_t *st)
{
    ProtobufCMessage *m;
    int rc = unpack(req, &msa__v1__create_collection_request__descriptor, &m, st);
    if (rc) return rc;
    const Msa__V1__CreateCollectionRequest *r = (const void *)m;
    msa_schema_t *schema = msa_rpc_arena_alloc(req->arena, sizeof(*schema));
    if (!schema) return OOM(st);
    if ((rc = schema_in(r->schema, schema, st))) return rc;
    msa_engine_create_collection_result_t *res = NULL;
    rc = msa_engine_create_collection(ctx->engine, str(r->name), schema, &res, st);
    if (rc) return rc;
    Msa__V1__CollectionInfo out;
    if (coll_info_out(req->arena, &res->info, &out))
        rc = OOM(st);
    else
        rc = pack(ctx, &out.base, rep, st);
    msa_engine_create_collection_result_free(res);
    return rc;
}

static int h_drop_collection(const msa_rpc_ctx_t *ctx, const msa_rpc_req_t *req,
                             msa_rpc_reply_t *rep, msa_status_t *st)
{
    ProtobufCMessage *m;
    int rc = unpack(req, &msa__v1__drop_collection_request__descriptor, &m, st);
    if (rc) return rc;
    const Msa__V1__DropCollectionRequest *r = (const void *)m;
    Msa__V1__DropCollectionResponse out = MSA__V1__DROP_COLLECTION_RESPONSE__INIT;
    msa_engine_drop_collection_result_t *res = NULL;
    rc = msa_engine_drop_collection(ctx->engine, str(r->name), &res, st);
    if (rc) return rc;
    out.commit_seq = res->commit_seq;
    msa_engine_drop_collection_result_free(res);
    return pack(ctx, &out.base, rep, st);
}

static int h_list_collections(const msa_rpc_ctx_t *ctx, const msa_rpc_req_t *req,
                              msa_rpc_reply_t *rep, msa_status_t *st)
{
    ProtobufCMessage *m;
    int rc = unpack(req, &msa__v1__list_collections_request__descriptor, &m, st);
    if (rc) return rc;
    msa_engine_list_collections_result_t *res = NULL;
    rc = msa_engine_list_collections(ctx->engine, &res, st);
    if (rc) return rc;
    const msa_engine_coll_info_t *cs = res->colls;
    size_t n = res->n;
    Msa__V1__ListCollectionsResponse out = MSA__V1__LIST_COLLECTIONS_RESPONSE__INIT;
    Msa__V1__CollectionInfo *items = msa_rpc_arena_alloc(req->arena, sizeof(*items) * (n ? n : 1));
    Msa__V1__CollectionInfo **ptrs = msa_rpc_arena_alloc(req->arena, sizeof(*ptrs) * (n ? n : 1));
    if (!items || !ptrs) {
        rc = OOM(st);
        goto fail;
    }
    for (size_t i = 0; i < n; i++) {
        if (coll_info_out(req->arena, &cs[i], &items[i])) {
            rc = OOM(st);
            goto fail;
        }
        ptrs[i] = &items[i];
    }
    out.n_collections = n;
    out.collections = ptrs;
    rc = pack(ctx, &out.base, rep, st);
fail:
    msa_engine_list_collections_result_free(res);
    return rc;
}

static int h_describe_collection(const msa_rpc_ctx_t *ctx, const msa_rpc_req_t *req,
                                 msa_rpc_reply_t *rep, msa_status_t *st)
{
    ProtobufCMessage *m;
    int rc = unpack(req, &msa__v1__describe_collection_request__descriptor, &m, st);
    if (rc) return rc;
    const Msa__V1__DescribeCollectionRequest *r = (const void *)m;
    msa_engine_describe_collection_result_t *res = NULL;
    rc = msa_engine_describe_collection(ctx->engine, str(r->name), &res, st);
    if (rc) return rc;
    Msa__V1__CollectionInfo out;
    if (coll_info_out(req->arena, &res->info, &out))
        rc = OOM(st);
    else
        rc = pack(ctx, &out.base, rep, st);
    msa_engine_describe_collection_result_free(res);
    return rc;
}

static int h_write(const msa_rpc_ctx_t *ctx, const msa_rpc_req_t *req, msa_rpc_reply_t *rep,
                   msa_status_t *st)
{
    ProtobufCMessage *m;
    /* The wire form keeps text as bytes: a NUL inside it is data. */
    int rc = unpack(req, &msa__v1__wire__write_request__descriptor, &m, st);
    if (rc) return rc;
    const Msa__V1__Wire__WriteRequest *r = (const void *)m;
    msa_rpc_arena_t *a = req->arena;
    msa_engine_write_op_t *ops = msa_rpc_arena_calloc(a, r->n_ops ? r->n_ops : 1, sizeof(*ops));
    if (!ops) return OOM(st);
    char path[96];
    for (size_t i = 0; i < r->n_ops; i++) {
        const Msa__V1__Wire__WriteOp *po = r->ops[i];
        msa_engine_write_op_t *o = &ops[i];
        o->expect_version = po->expect_version;
        o->expect_absent = po->expect_absent;
        if (po->op_case == MSA__V1__WIRE__WRITE_OP__OP_DELETE_ID) {
            o->kind = MSA_OP_DELETE;
            o->delete_id = po->delete_id;
        } else if (po->op_case == MSA__V1__WIRE__WRITE_OP__OP_PUT) {
            o->kind = MSA_OP_PUT;
            const Msa__V1__Wire__Document *d = po->put;
            if (!d) continue; /* an empty put: the engine names what is missing */
            msa_engine_doc_t *doc = &o->put;
            doc->id = d->id;
            doc->text = d->text.data ? (const char *)d->text.data : "";
            doc->text_len = d->text.len;
            doc->metadata = d->metadata.data;
            doc->metadata_len = d->metadata.len;
            doc->tokens = d->tokens;
            doc->raw = d->raw;
            doc->n_layers = (uint32_t)d->n_layers;
            msa_engine_layer_kv_t *ls =
                msa_rpc_arena_calloc(a, d->n_layers ? d->n_layers : 1, sizeof(*ls));
            if (!ls) return OOM(st);
            for (size_t j = 0; j < d->n_layers; j++) {
                const Msa__V1__LayerKV *pl = d->layers[j];
                ls[j].layer = pl->layer;
                snprintf(path, sizeof(path), "ops[%zu].put.layers[%zu].k", i, j);
                if ((rc = tensor_in(pl->k, &ls[j].k, path, st))) return rc;
                snprintf(path, sizeof(path), "ops[%zu].put.layers[%zu].v", i, j);
                if ((rc = tensor_in(pl->v, &ls[j].v, path, st))) return rc;
                snprintf(path, sizeof(path), "ops[%zu].put.layers[%zu].router_k", i, j);
                if ((rc = tensor_in(pl->router_k, &ls[j].router_k, path, st))) return rc;
            }
            doc->layers = ls;
        } else {
            o->kind = 0; /* the engine answers "ops[i]: no op set" */
        }
    }
    msa_engine_write_req_t wr = {.collection = str(r->collection),
                                 .model = opt_str(r->model),
                                 .n_ops = r->n_ops,
                                 .ops = ops};
    msa_engine_write_result_t *res = NULL;
    rc = msa_engine_write(ctx->engine, &wr, &res, st);
    if (rc) return rc;
    Msa__V1__WriteResponse out = MSA__V1__WRITE_RESPONSE__INIT;
    out.commit_seq = res->commit_seq;
    out.n_versions = res->n_versions;
    out.versions = res->versions;
    rc = pack(ctx, &out.base, rep, st);
    msa_engine_write_result_free(res);
    return rc;
}

static int h_get(const msa_rpc_ctx_t *ctx, const msa_rpc_req_t *req, msa_rpc_reply_t *rep,
                 msa_status_t *st)
{
    ProtobufCMessage *m;
    int rc = unpack(req, &msa__v1__get_request__descriptor, &m, st);
    if (rc) return rc;
    const Msa__V1__GetRequest *r = (const void *)m;
    msa_rpc_arena_t *a = req->arena;
    msa_engine_get_req_t gr = {.collection = str(r->collection),
                               .n_ids = r->n_ids,
                               .ids = r->ids,
                               .with_text = r->with_text,
                               .with_metadata = r->with_metadata,
                               .with_tensors = r->with_tensors,
                               .n_layers = (uint32_t)r->n_layers,
                               .layers = r->layers,
                               .min_seq = r->min_seq,
                               .deadline_ms = req->deadline_ms,
                               .snapshot_seq = r->snapshot_seq,
                               .hold_ms = r->hold_snapshot_ms,
                               .skip_router_keys = r->skip_router_keys,
                               .max_bytes = ctx->max_send};
    msa_engine_get_result_t *res = NULL;
    rc = msa_engine_get(ctx->engine, &gr, &res, st);
    if (rc) return rc;

    /* The wire form: text as bytes, borrowed from the snapshot like the
     * tensors, so packing is the one copy of every byte. */
    Msa__V1__Wire__GetResponse out = MSA__V1__WIRE__GET_RESPONSE__INIT;
    size_t n = res->n_records;
    Msa__V1__Wire__DocumentRecord **recs = msa_rpc_arena_calloc(a, n ? n : 1, sizeof(*recs));
    if (!recs) goto oom;
    for (size_t i = 0; i < n; i++) {
        const msa_engine_get_record_t *g = &res->records[i];
        Msa__V1__Wire__DocumentRecord *dr = msa_rpc_arena_alloc(a, sizeof(*dr));
        Msa__V1__DocumentInfo *di = msa_rpc_arena_alloc(a, sizeof(*di));
        Msa__V1__Wire__Document *doc = msa_rpc_arena_alloc(a, sizeof(*doc));
        if (!dr || !di || !doc) goto oom;
        msa__v1__wire__document_record__init(dr);
        doc_info_out(&g->info, di);
        msa__v1__wire__document__init(doc);
        doc->id = g->info.id;
        doc->tokens = g->info.tokens;
        doc->raw = false;
        doc->text.data = (uint8_t *)g->text.data;
        doc->text.len = g->text.len;
        doc->metadata.data = (uint8_t *)g->metadata.data;
        doc->metadata.len = g->metadata.len;
        if (g->n_layers) {
            Msa__V1__LayerKV **ls = msa_rpc_arena_calloc(a, g->n_layers, sizeof(*ls));
            if (!ls) goto oom;
            for (uint32_t j = 0; j < g->n_layers; j++) {
                const msa_engine_get_layer_t *gl = &g->layers[j];
                Msa__V1__LayerKV *l = msa_rpc_arena_alloc(a, sizeof(*l));
                if (!l) goto oom;
                msa__v1__layer_kv__init(l);
                l->layer = gl->layer;
                l->k =
                    tensor_out(a, gl->k.dtype, gl->k.shape, gl->k.ndim, gl->k.data, gl->k.nbytes);
                l->v =
                    tensor_out(a, gl->v.dtype, gl->v.shape, gl->v.ndim, gl->v.data, gl->v.nbytes);
                if (!l->k || !l->v) goto oom;
                if (gl->router_k.data) {
                    l->router_k =
                        tensor_out(a, gl->router_k.dtype, gl->router_k.shape, gl->router_k.ndim,
                                   gl->router_k.data, gl->router_k.nbytes);
                    if (!l->router_k) goto oom;
                }
                ls[j] = l;
            }
            doc->n_layers = g->n_layers;
            doc->layers = ls;
        }
        dr->info = di;
        dr->document = doc;
        recs[i] = dr;
    }
    out.snapshot_seq = res->snapshot_seq;
    out.n_records = n;
    out.records = recs;
    /* Packing copies the snapshot's bytes; only then may the snapshot end. */
    rc = pack(ctx, &out.base, rep, st);
    msa_engine_get_result_free(res);
    return rc;
oom:
    msa_engine_get_result_free(res);
    return OOM(st);
}

static int h_list(const msa_rpc_ctx_t *ctx, const msa_rpc_req_t *req, msa_rpc_reply_t *rep,
                  msa_status_t *st)
{
    ProtobufCMessage *m;
    int rc = unpack(req, &msa__v1__list_request__descriptor, &m, st);
    if (rc) return rc;
    const Msa__V1__ListRequest *r = (const void *)m;
    msa_engine_list_req_t lr = {.collection = str(r->collection),
                                .after_id = r->after_id,
                                .limit = r->limit,
                                .snapshot_seq = r->snapshot_seq,
                                .hold_ms = r->hold_snapshot_ms};
    msa_engine_list_result_t *res = NULL;
    rc = msa_engine_list(ctx->engine, &lr, &res, st);
    if (rc) return rc;
    Msa__V1__ListResponse out = MSA__V1__LIST_RESPONSE__INIT;
    Msa__V1__DocumentInfo *items =
        msa_rpc_arena_alloc(req->arena, sizeof(*items) * (res->n ? res->n : 1));
    Msa__V1__DocumentInfo **ptrs =
        msa_rpc_arena_alloc(req->arena, sizeof(*ptrs) * (res->n ? res->n : 1));
    if (!items || !ptrs) {
        rc = OOM(st);
        goto fail;
    }
    for (uint32_t i = 0; i < res->n; i++) {
        doc_info_out(&res->docs[i], &items[i]);
        ptrs[i] = &items[i];
    }
    out.n_documents = res->n;
    out.documents = ptrs;
    out.next_after_id = res->next_after_id;
    out.snapshot_seq = res->snapshot_seq;
    rc = pack(ctx, &out.base, rep, st);
fail:
    msa_engine_list_result_free(res);
    return rc;
}

static int h_route(const msa_rpc_ctx_t *ctx, const msa_rpc_req_t *req, msa_rpc_reply_t *rep,
                   msa_status_t *st)
{
    ProtobufCMessage *m;
    int rc = unpack(req, &msa__v1__route_request__descriptor, &m, st);
    if (rc) return rc;
    const Msa__V1__RouteRequest *r = (const void *)m;
    msa_rpc_arena_t *a = req->arena;
    msa_engine_layer_query_t *qs;
    if ((rc = queries_in(a, r->layers, r->n_layers, false, &qs, st))) return rc;
    msa_engine_route_req_t rr = {.c = {.collection = str(r->collection),
                                       .model = opt_str(r->model),
                                       .min_seq = r->min_seq,
                                       .deadline_ms = req->deadline_ms,
                                       .snapshot_seq = r->snapshot_seq,
                                       .hold_ms = r->hold_snapshot_ms},
                                 .n_layers = (uint32_t)r->n_layers,
                                 .layers = qs,
                                 .top_k = r->top_k,
                                 .n_exclude = r->n_exclude_ids,
                                 .exclude_ids = r->exclude_ids};
    msa_engine_route_result_t *res = NULL;
    rc = msa_engine_route(ctx->engine, &rr, &res, st);
    if (rc) return rc;
    Msa__V1__RouteResponse out = MSA__V1__ROUTE_RESPONSE__INIT;
    Msa__V1__LayerRoute *ls =
        msa_rpc_arena_alloc(a, sizeof(*ls) * (res->n_layers ? res->n_layers : 1));
    Msa__V1__LayerRoute **ptrs =
        msa_rpc_arena_alloc(a, sizeof(*ptrs) * (res->n_layers ? res->n_layers : 1));
    if (!ls || !ptrs) {
        rc = OOM(st);
        goto fail;
    }
    for (uint32_t i = 0; i < res->n_layers; i++) {
        const msa_engine_layer_route_t *lr = &res->layers[i];
        msa__v1__layer_route__init(&ls[i]);
        ls[i].layer = lr->layer;
        ls[i].n_doc_ids = lr->n;
        ls[i].doc_ids = lr->doc_ids;
        ls[i].n_scores = lr->scores ? lr->n : 0;
        ls[i].scores = lr->scores;
        ptrs[i] = &ls[i];
    }
    out.snapshot_seq = res->snapshot_seq;
    out.n_layers = res->n_layers;
    out.layers = ptrs;
    rc = pack(ctx, &out.base, rep, st);
fail:
    msa_engine_route_result_free(res);
    return rc;
}

static int h_attend(const msa_rpc_ctx_t *ctx, const msa_rpc_req_t *req, msa_rpc_reply_t *rep,
                    msa_status_t *st)
{
    ProtobufCMessage *m;
    int rc = unpack(req, &msa__v1__attend_request__descriptor, &m, st);
    if (rc) return rc;
    const Msa__V1__AttendRequest *r = (const void *)m;
    msa_rpc_arena_t *a = req->arena;
    if ((rc = check_enum((int)r->out_dtype, MSA__V1__DTYPE__I8, "out_dtype", st))) return rc;
    msa_engine_layer_query_t *qs;
    if ((rc = queries_in(a, r->layers, r->n_layers, true, &qs, st))) return rc;
    msa_engine_attend_req_t ar = {.c = {.collection = str(r->collection),
                                        .model = opt_str(r->model),
                                        .min_seq = r->min_seq,
                                        .deadline_ms = req->deadline_ms,
                                        .snapshot_seq = r->snapshot_seq,
                                        .hold_ms = r->hold_snapshot_ms},
                                  .n_layers = (uint32_t)r->n_layers,
                                  .layers = qs,
                                  .top_k = r->top_k,
                                  .n_exclude = r->n_exclude_ids,
                                  .exclude_ids = r->exclude_ids,
                                  .n_doc_ids = r->n_doc_ids,
                                  .doc_ids = r->doc_ids,
                                  .scale = r->scale,
                                  .out_dtype = (msa_dtype_t)r->out_dtype};
    /* The output grows with T x Hq x D per layer (F32 doubles a BF16 query):
     * refuse before computing what could not be sent anyway. */
    uint64_t want = 0;
    size_t osz =
        r->out_dtype == MSA__V1__DTYPE__F16 || r->out_dtype == MSA__V1__DTYPE__BF16 ? 2 : 4;
    for (size_t i = 0; i < r->n_layers; i++) {
        const msa_tensor_t *q = &qs[i].q;
        if (q->ndim != 3) continue; /* the engine names the bad shape */
        uint64_t th = (uint64_t)q->shape[0] * q->shape[1];
        want += th * q->shape[2] * osz + th * 4 + 12u * 1024;
    }
    if (want > ctx->max_send)
        return msa_status_set(st, MSA_EFULL,
                              "response: out and lse of %zu layers need %llu bytes, over the "
                              "message limit of %zu bytes (--max-message-mb); send fewer query "
                              "tokens or layers per call",
                              r->n_layers, (unsigned long long)want, ctx->max_send);
    msa_engine_attend_result_t *res = NULL;
    rc = msa_engine_attend(ctx->engine, &ar, &res, st);
    if (rc) return rc;
    Msa__V1__AttendResponse out = MSA__V1__ATTEND_RESPONSE__INIT;
    uint32_t nl = res->n_layers;
    Msa__V1__LayerAttention *ls = msa_rpc_arena_alloc(a, sizeof(*ls) * (nl ? nl : 1));
    Msa__V1__LayerAttention **ptrs = msa_rpc_arena_alloc(a, sizeof(*ptrs) * (nl ? nl : 1));
    if (!ls || !ptrs) {
        rc = OOM(st);
        goto fail;
    }
    msa_dtype_t odt = res->out_dtype ? res->out_dtype : MSA_DT_F32;
    for (uint32_t i = 0; i < nl; i++) {
        const msa_engine_layer_attention_t *la = &res->layers[i];
        msa__v1__layer_attention__init(&ls[i]);
        ls[i].layer = la->layer;
        ls[i].n_doc_ids = la->n;
        ls[i].doc_ids = la->doc_ids;
        ls[i].n_scores = la->scores ? la->n : 0;
        ls[i].scores = la->scores;
        uint32_t oshape[3] = {la->T, la->Hq, la->D};
        uint32_t lshape[2] = {la->T, la->Hq};
        ls[i].out = tensor_out(a, odt, oshape, 3, la->out, la->out_bytes);
        ls[i].lse =
            tensor_out(a, MSA_DT_F32, lshape, 2, la->lse, (size_t)la->T * la->Hq * sizeof(float));
        if (!ls[i].out || !ls[i].lse) {
            rc = OOM(st);
            goto fail;
        }
        ptrs[i] = &ls[i];
    }
    out.snapshot_seq = res->snapshot_seq;
    out.n_layers = nl;
    out.layers = ptrs;
    rc = pack(ctx, &out.base, rep, st);
fail:
    msa_engine_attend_result_free(res);
    return rc;
}

typedef struct counters_acc {
    msa_rpc_arena_t *a;
    Msa__V1__StatsResponse__CountersEntry **v;
    size_t n, cap;
    int oom;
} counters_acc_t;

static void add_counter(void *arg, const char *key, uint64_t value)
{
    counters_acc_t *c = arg;
    if (c->oom) return;
    if (c->n == c->cap) {
        size_t cap = c->cap ? 2 * c->cap : 64;
        Msa__V1__StatsResponse__CountersEntry **v = msa_rpc_arena_alloc(c->a, cap * sizeof(*v));
        if (!v) {
            c->oom = 1;
            return;
        }
        if (c->n) memcpy(v, c->v, c->n * sizeof(*v));
        c->v = v;
        c->cap = cap;
    }
    Msa__V1__StatsResponse__CountersEntry *e = msa_rpc_arena_alloc(c->a, sizeof(*e));
    char *k = msa_rpc_arena_strndup(c->a, key, strlen(key));
    if (!e || !k) {
        c->oom = 1;
        return;
    }
    msa__v1__stats_response__counters_entry__init(e);
    e->key = k;
    e->value = value;
    c->v[c->n++] = e;
}

/* Host memory figures for the "cpu" device entry. */
static void host_memory(uint64_t *total, uint64_t *used)
{
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    *total = (pages > 0 && psz > 0) ? (uint64_t)pages * (uint64_t)psz : 0;
    *used = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f) {
        unsigned long size, rss;
        if (fscanf(f, "%lu %lu", &size, &rss) == 2 && psz > 0)
            *used = (uint64_t)rss * (uint64_t)psz;
        fclose(f);
    }
}

static int h_stats(const msa_rpc_ctx_t *ctx, const msa_rpc_req_t *req, msa_rpc_reply_t *rep,
                   msa_status_t *st)
{
    ProtobufCMessage *m;
    int rc = unpack(req, &msa__v1__stats_request__descriptor, &m, st);
    if (rc) return rc;
    msa_engine_stats_result_t *res = NULL;
    rc = msa_engine_stats(ctx->engine, &res, st);
    if (rc) return rc;
    /* A copy in the arena: the response points into it until it is packed. */
    msa_engine_stats_result_t *es = msa_rpc_arena_alloc(req->arena, sizeof(*es));
    if (es) *es = *res;
    msa_engine_stats_result_free(res);
    if (!es) return OOM(st);
    es->backend[sizeof(es->backend) - 1] = '\0';
    Msa__V1__StatsResponse out = MSA__V1__STATS_RESPONSE__INIT;
    out.version = (char *)MSA_VERSION;
    out.backend = es->backend;
#define X(field, family, help) out.field = es->field;
    MSA_RPC_STATS_FIELDS(X)
#undef X

    /* The host first (it holds the routing index on the CPU backend, and the
     * index's host copy on the CUDA backend), then every GPU. */
    size_t n_dev = 1 + es->n_gpu;
    Msa__V1__DeviceInfo *devs = msa_rpc_arena_alloc(req->arena, n_dev * sizeof(*devs));
    Msa__V1__DeviceInfo **devp = msa_rpc_arena_alloc(req->arena, n_dev * sizeof(*devp));
    if (!devs || !devp) return OOM(st);
    for (size_t i = 0; i < n_dev; i++) {
        msa__v1__device_info__init(&devs[i]);
        devp[i] = &devs[i];
    }
    devs[0].name = (char *)"cpu";
    host_memory(&devs[0].memory_total, &devs[0].memory_used);
    if (!strcmp(es->backend, "cpu")) devs[0].routing_bytes = es->index_bytes;
    for (unsigned i = 0; i < es->n_gpu; i++) {
        const msa_gpu_device_stats_t *g = &es->gpu_dev[i];
        devs[1 + i].name = (char *)g->name;
        devs[1 + i].memory_total = g->memory_total;
        devs[1 + i].memory_used = g->memory_used;
        devs[1 + i].routing_bytes = g->routing_bytes;
        devs[1 + i].cache_bytes = g->cache_bytes;
    }
    out.n_devices = n_dev;
    out.devices = devp;

    counters_acc_t acc = {.a = req->arena};
    msa_rpc_metrics_counters(ctx->metrics, es, add_counter, &acc);
    if (acc.oom) return OOM(st);
    out.n_counters = acc.n;
    out.counters = acc.v;
    return pack(ctx, &out.base, rep, st);
}

static int h_release_snapshot(const msa_rpc_ctx_t *ctx, const msa_rpc_req_t *req,
                              msa_rpc_reply_t *rep, msa_status_t *st)
{
    ProtobufCMessage *m;
    int rc = unpack(req, &msa__v1__release_snapshot_request__descriptor, &m, st);
    if (rc) return rc;
    const Msa__V1__ReleaseSnapshotRequest *r = (const void *)m;
    Msa__V1__ReleaseSnapshotResponse out = MSA__V1__RELEASE_SNAPSHOT_RESPONSE__INIT;
    msa_engine_release_snapshot_result_t *res = NULL;
    rc = msa_engine_release_snapshot(ctx->engine, r->snapshot_seq, &res, st);
    if (rc) return rc;
    out.released = res->released;
    msa_engine_release_snapshot_result_free(res);
    return pack(ctx, &out.base, rep, st);
}

/* ==== Admin service ============================================================ */

static int h_backup(const msa_rpc_ctx_t *ctx, const msa_rpc_req_t *req, msa_rpc_reply_t *rep,
                    msa_status_t *st)
{
    ProtobufCMessage *m;
    int rc = unpack(req, &msa__v1__backup_request__descriptor, &m, st);
    if (rc) return rc;
    const Msa__V1__BackupRequest *r = (const void *)m;
    Msa__V1__BackupResponse out = MSA__V1__BACKUP_RESPONSE__INIT;
    msa_engine_backup_result_t *res = NULL;
    rc = msa_engine_backup(ctx->engine, str(r->name), r->compact, &res, st);
    if (rc) return rc;
    out.snapshot_seq = res->seq;
    out.bytes = res->bytes;
    msa_engine_backup_result_free(res);
    return pack(ctx, &out.base, rep, st);
}

static int h_verify(const msa_rpc_ctx_t *ctx, const msa_rpc_req_t *req, msa_rpc_reply_t *rep,
                    msa_status_t *st)
{
    ProtobufCMessage *m;
    int rc = unpack(req, &msa__v1__verify_request__descriptor, &m, st);
    if (rc) return rc;
    const Msa__V1__VerifyRequest *r = (const void *)m;
    Msa__V1__VerifyResponse out = MSA__V1__VERIFY_RESPONSE__INIT;
    msa_engine_verify_result_t *res = NULL;
    rc = msa_engine_verify(ctx->engine, opt_str(r->collection), &res, st);
    if (rc) return rc;
    out.documents_checked = res->docs_checked;
    out.n_problems = res->n_problems;
    out.problems = res->problems;
    rc = pack(ctx, &out.base, rep, st);
    msa_engine_verify_result_free(res);
    return rc;
}

/* ==== Health =================================================================== */

static int h_health_check(const msa_rpc_ctx_t *ctx, const msa_rpc_req_t *req, msa_rpc_reply_t *rep,
                          msa_status_t *st)
{
    ProtobufCMessage *m;
    int rc = unpack(req, &grpc__health__v1__health_check_request__descriptor, &m, st);
    if (rc) return rc;
    const Grpc__Health__V1__HealthCheckRequest *r = (const void *)m;
    const char *svc = str(r->service);
    /* The health protocol answers NOT_FOUND for services it does not know. */
    if (*svc && strcmp(svc, "msa.v1.Memory") != 0 && strcmp(svc, "msa.v1.Admin") != 0 &&
        strcmp(svc, "grpc.health.v1.Health") != 0)
        return msa_status_set(st, MSA_ENOTFOUND, "service: '%.64s' is not served here", svc);
    Grpc__Health__V1__HealthCheckResponse out = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    out.status = atomic_load(ctx->stopping)
                     ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING
                     : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
    return pack(ctx, &out.base, rep, st);
}

/* ==== the method table ========================================================== */

/* The table and the metric names come from MSA_RPC_METHODS (rpc_lists.h). */
const msa_rpc_method_t msa__rpc_methods[] = {
#define X(id, path, name, scope, poller, fn) {path, name, MSA_RPC_SCOPE_##scope, poller, fn},
    MSA_RPC_METHODS(X)
#undef X
};
const size_t msa__rpc_n_methods = sizeof(msa__rpc_methods) / sizeof(msa__rpc_methods[0]);

const char *const msa__rpc_method_names[] = {
#define X(id, path, name, scope, poller, fn) name,
    MSA_RPC_METHODS(X)
#undef X
};
