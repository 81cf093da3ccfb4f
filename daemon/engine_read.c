/* engine_read.c — the read path (engine.h, "the read path"): query
 * validation, Route (CPU or CUDA backend, stored-key rerank), Attend (K/V
 * gathered from the same snapshot), Get (zero-copy views kept open by the
 * result) and List.
 */
#define _GNU_SOURCE /* asprintf */
#include "engine_impl.h"

/* ==== reads: query validation ==================================================================== */

/* Validates the layers of a Route/Attend request; fills positions and float32
 * copies of routing_q (need_route) and q (need_q). Buffers are freed by caller. */
typedef struct query_set {
    uint32_t n;
    int pos[MSA_MAX_LAYERS];
    uint32_t T[MSA_MAX_LAYERS];
    float *rq[MSA_MAX_LAYERS];
    float *q[MSA_MAX_LAYERS];
} query_set_t;

static void query_set_free(query_set_t *qs)
{
    for (uint32_t i = 0; i < qs->n; i++) {
        free(qs->rq[i]);
        free(qs->q[i]);
    }
}

static int tensor_f32(const msa_tensor_t *t, float **out, msa_status_t *st, const char *path)
{
    size_t n = (size_t)t->shape[0] * t->shape[1] * t->shape[2];
    *out = msa_malloc(n * sizeof(float));
    if (!*out) return msa_status_set(st, MSA_ENOMEM, "%s: out of memory", path);
    msa_tensor_to_f32(t->dtype, t->data, n, *out);
    return MSA_OK;
}

static int prep_queries(const msa_schema_t *s, const char *cname, uint32_t n_layers,
                        const msa_engine_layer_query_t *layers, bool need_route, bool need_q,
                        uint32_t max_t, query_set_t *qs, msa_status_t *st)
{
    memset(qs, 0, sizeof *qs);
    if (n_layers == 0)
        return msa_status_set(st, MSA_EINVAL, "layers: empty; name at least one layer");
    if (n_layers > s->n_layers)
        return msa_status_set(st, MSA_EINVAL, "layers: %u given, collection has %u", n_layers,
                              s->n_layers);
    char path[96];
    for (uint32_t i = 0; i < n_layers; i++) {
        const msa_engine_layer_query_t *lq = &layers[i];
        int pos = msa_schema_layer_pos(s, lq->layer);
        if (pos < 0)
            return msa_status_set(st, MSA_EINVAL,
                                  "layers[%u].layer: %u is not a memory layer of collection \"%s\"",
                                  i, lq->layer, cname);
        for (uint32_t j = 0; j < i; j++)
            if (qs->pos[j] == pos)
                return msa_status_set(st, MSA_EINVAL, "layers[%u].layer: duplicate layer %u", i,
                                      lq->layer);
        qs->pos[i] = pos;
        qs->n = i + 1;
        uint32_t want[3] = {0, s->query_heads, s->head_dim};
        int rc;
        if (need_route) {
            snprintf(path, sizeof path, "layers[%u].routing_q", i);
            if ((rc = msa_tensor_validate(&lq->routing_q, MSA_DT_UNSPECIFIED, 3, want, path, st)))
                return rc;
            qs->T[i] = lq->routing_q.shape[0];
            if ((rc = tensor_f32(&lq->routing_q, &qs->rq[i], st, path))) return rc;
        }
        if (need_q) {
            snprintf(path, sizeof path, "layers[%u].q", i);
            if (need_route) want[0] = qs->T[i];
            if ((rc = msa_tensor_validate(&lq->q, MSA_DT_UNSPECIFIED, 3, want, path, st)))
                return rc;
            qs->T[i] = lq->q.shape[0];
            if ((rc = tensor_f32(&lq->q, &qs->q[i], st, path))) return rc;
        }
        if (qs->T[i] == 0 || qs->T[i] > max_t)
            return msa_status_set(st, MSA_EINVAL,
                                  "layers[%u].%s: %u query tokens, want 1..%u (--max-query-tokens)",
                                  i, need_route ? "routing_q" : "q", qs->T[i], max_t);
    }
    return MSA_OK;
}

static int check_top_k(const msa_schema_t *s, uint32_t top_k, uint32_t *k, msa_status_t *st)
{
    if (top_k > MSA_MAX_TOP_K)
        return msa_status_set(st, MSA_EINVAL, "top_k: %u, at most %d", top_k, MSA_MAX_TOP_K);
    *k = top_k ? top_k : s->default_top_k;
    return MSA_OK;
}

/* Routes one validated layer query over the snapshot. */
/* I8 re-rank: candidates per wanted hit, and at least this many extra. */
#define RERANK_FACTOR 4
#define RERANK_MIN_EXTRA 16

static int cmp_hit(const void *a, const void *b)
{
    const msa_idx_hit_t *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* Re-scores the n candidates of layer query i from their stored router keys
 * (the stored keys are the truth, SEMANTICS "Routing" step 2; I8 is only the
 * index's form of them) in float32, and sorts them best first. */
static int rerank_stored(msa_engine_t *e, msa__engine_snap_t *s, const query_set_t *qs, uint32_t i,
                         msa_idx_hit_t *hits, uint32_t n, msa_status_t *st)
{
    const msa_schema_t *sc = &s->coll.schema;
    const uint32_t H = sc->kv_heads, D = sc->head_dim;
    const bool cosine = sc->similarity == MSA_SIM_COSINE;
    const msa_block_kind_t kind = sc->separate_router_keys ? MSA_BLOCK_R : MSA_BLOCK_K;
    const msa_dtype_t dt = sc->kv_dtype; /* I8 routing: router keys stored in kv_dtype */
    const size_t row = (size_t)H * D;
    msa_idx_scorer_t *scorer = NULL;
    int rc =
        msa_idx_scorer_create(qs->rq[i], qs->T[i], sc->query_heads, H, D, cosine, sc->head_reduce,
                              sc->query_reduce, MSA_DT_F32, msa_idx_get_isa(e->idx), &scorer);
    if (rc) return msa_status_set(st, rc, "route: re-rank: %s", msa_strerror(rc));
    float *keys = NULL, *rs = NULL;
    size_t cap = 0;
    for (uint32_t c = 0; c < n && rc == MSA_OK; c++) {
        msa_store_view_t v;
        rc = msa_store_block_get(s->txn, s->coll.id, hits[c].id, (uint16_t)qs->pos[i], kind, &v);
        if (rc == MSA_OK && v.len % (row * msa_dtype_size(dt)) != 0) rc = MSA_ECORRUPT;
        if (rc) {
            msa_status_set(st, rc == MSA_ENOTFOUND ? MSA_EINTERNAL : rc,
                           "route: collection \"%s\" document %llu layer %u router block: %s",
                           s->coll.name, (unsigned long long)hits[c].id, sc->layers[qs->pos[i]],
                           rc == MSA_ECORRUPT ? "stored data is damaged" : msa_strerror(rc));
            break;
        }
        size_t rows = v.len / (row * msa_dtype_size(dt));
        if (rows > cap) {
            float *k2 = msa_realloc(keys, rows * row * sizeof *k2),
                  *r2 = msa_realloc(rs, rows * sizeof *r2);
            if (k2) keys = k2;
            if (r2) rs = r2;
            if (!k2 || !r2) {
                rc = msa_status_set(st, MSA_ENOMEM, "route: out of memory");
                break;
            }
            cap = rows;
        }
        msa_tensor_to_f32(dt, v.data, rows * row, keys);
        if (cosine) msa_tensor_l2_normalize(keys, rows * H, D);
        msa_idx_scorer_run(scorer, keys, NULL, rows, rs);
        hits[c].score = msa_idx_chunk_reduce(rs, rows, sc->chunk_reduce == MSA_CHUNK_MEAN);
    }
    if (rc == MSA_OK) qsort(hits, n, sizeof *hits, cmp_hit);
    free(keys);
    free(rs);
    msa_idx_scorer_destroy(scorer);
    return rc;
}

static int route_layer(msa_engine_t *e, msa__engine_snap_t *s, const query_set_t *qs, uint32_t i,
                       uint32_t k, const uint64_t *excl, size_t n_excl, uint64_t **ids,
                       float **scores, uint32_t *n, msa_status_t *st)
{
    msa_idx_hit_t *hits = msa_malloc(k * sizeof *hits);
    *ids = msa_malloc(k * sizeof **ids);
    *scores = msa_malloc(k * sizeof **scores);
    if (!hits || !*ids || !*scores) {
        free(hits);
        return msa_status_set(st, MSA_ENOMEM, "route: out of memory");
    }
    /* I8 keys are an approximation of the stored keys: ask the index for more
     * candidates and re-score them from the stored keys (rerank_stored). */
    const bool i8 = s->coll.schema.routing_dtype == MSA_DT_I8;
    uint32_t want = k;
    if (i8) {
        want = k * RERANK_FACTOR < k + RERANK_MIN_EXTRA ? k + RERANK_MIN_EXTRA : k * RERANK_FACTOR;
        if (want > MSA_MAX_TOP_K) want = MSA_MAX_TOP_K;
        msa_idx_hit_t *more = msa_realloc(hits, want * sizeof *hits);
        if (!more) {
            free(hits);
            return msa_status_set(st, MSA_ENOMEM, "route: out of memory");
        }
        hits = more;
    }
    msa_idx_route_args_t a = {.layer_pos = (uint32_t)qs->pos[i],
                              .q = qs->rq[i],
                              .T = qs->T[i],
                              .snapshot = s->seq,
                              .exclude = excl,
                              .n_exclude = n_excl,
                              .top_k = want};
    int rc = msa_idx_route(e->idx, s->ic, &a, hits, n);
    if (rc == MSA_OK && i8) {
        rc = rerank_stored(e, s, qs, i, hits, *n, st);
        if (rc) {
            free(hits);
            return rc;
        }
        if (*n > k) *n = k;
    }
    for (uint32_t h = 0; h < *n; h++) {
        (*ids)[h] = hits[h].id;
        (*scores)[h] = hits[h].score;
    }
    free(hits);
    return fill_status(st, rc, "route");
}

/* ==== Route ============================================================================================ */

typedef struct route_layers_ctx {
    msa_engine_t *e;
    msa__engine_snap_t *s;
    const query_set_t *qs;
    uint32_t k;
    const uint64_t *excl;
    size_t n_excl;
    msa_engine_route_result_t *r;
    msa_status_t *st; /* per layer */
    int *rc;          /* per layer */
} route_layers_ctx_t;

static void route_layer_task(void *arg, size_t i, unsigned worker)
{
    (void)worker;
    route_layers_ctx_t *c = arg;
    msa_engine_layer_route_t *lr = &c->r->layers[i];
    msa_status_clear(&c->st[i]);
    c->rc[i] = route_layer(c->e, c->s, c->qs, (uint32_t)i, c->k, c->excl, c->n_excl, &lr->doc_ids,
                           &lr->scores, &lr->n, &c->st[i]);
}

void msa_engine_route_result_free(msa_engine_route_result_t *r)
{
    if (!r) return;
    for (uint32_t i = 0; i < r->n_layers; i++) {
        free(r->layers[i].doc_ids);
        free(r->layers[i].scores);
    }
    free(r->layers);
    free(r);
}

int msa_engine_route(msa_engine_t *e, const msa_engine_route_req_t *req,
                     msa_engine_route_result_t **out, msa_status_t *st)
{
    int rc = enter(e, st);
    if (rc) return rc;
    *out = NULL;
    msa__engine_snap_t s;
    query_set_t qs = {0};
    msa_engine_route_result_t *r = NULL;
    rc = msa__engine_snap_open_at(e, req->c.collection, req->c.min_seq, req->c.deadline_ms,
                                  req->c.snapshot_seq, req->c.hold_ms, &s, st);
    if (rc) return leave(e, rc);
    uint32_t k = 0;
    if ((rc = msa__engine_check_model(&s.coll.schema, req->c.model, st))) goto done;
    if ((rc = check_top_k(&s.coll.schema, req->top_k, &k, st))) goto done;
    if (req->n_exclude > e->cfg.max_ids) {
        rc = msa_status_set(st, MSA_EINVAL, "exclude_ids: %zu ids, at most %u (--max-ids)",
                            req->n_exclude, e->cfg.max_ids);
        goto done;
    }
    if ((rc = prep_queries(&s.coll.schema, s.coll.name, req->n_layers, req->layers, true, false,
                           e->cfg.max_query_tokens, &qs, st)))
        goto done;
    r = msa_calloc(1, sizeof *r);
    if (!r || !(r->layers = msa_calloc(qs.n, sizeof *r->layers))) {
        rc = msa_status_set(st, MSA_ENOMEM, "route: out of memory");
        goto done;
    }
    r->snapshot_seq = s.seq;
    r->n_layers = qs.n;
    for (uint32_t i = 0; i < qs.n; i++) r->layers[i].layer = req->layers[i].layer;
    route_layers_ctx_t lc = {.e = e,
                             .s = &s,
                             .qs = &qs,
                             .k = k,
                             .excl = req->exclude_ids,
                             .n_excl = req->n_exclude,
                             .r = r,
                             .st = msa_calloc(qs.n, sizeof *lc.st),
                             .rc = msa_calloc(qs.n, sizeof(int))};
    if (!lc.st || !lc.rc) {
        free(lc.st);
        free(lc.rc);
        rc = msa_status_set(st, MSA_ENOMEM, "route: out of memory");
        goto done;
    }
    /* On the CUDA backend the layers go to the device side by side (each
     * layer is its own mirror and lane), so one layer's select latency hides
     * behind another's pass. Not with I8: its re-rank reads the snapshot's
     * LMDB txn, which serves one thread at a time. */
    if (e->gpu && qs.n > 1 && s.coll.schema.routing_dtype != MSA_DT_I8)
        msa_idx_pool_run(msa_idx_get_pool(e->idx), qs.n, route_layer_task, &lc);
    else
        for (uint32_t i = 0; i < qs.n; i++) route_layer_task(&lc, i, 0);
    /* The first failing layer in request order names the error. */
    for (uint32_t i = 0; i < qs.n && rc == MSA_OK; i++) {
        rc = lc.rc[i];
        if (rc) *st = lc.st[i];
    }
    free(lc.st);
    free(lc.rc);
    if (rc == MSA_OK) rc = msa__engine_snap_hold(e, &s, req->c.hold_ms, st);
done:
    query_set_free(&qs);
    msa__engine_snap_close(e, &s);
    if (rc)
        msa_engine_route_result_free(r);
    else {
        *out = r;
        atomic_fetch_add(&e->n_routes, 1);
    }
    return leave(e, rc);
}

/* ==== Attend ============================================================================================= */

void msa_engine_attend_result_free(msa_engine_attend_result_t *r)
{
    if (!r) return;
    for (uint32_t i = 0; i < r->n_layers; i++) {
        free(r->layers[i].doc_ids);
        free(r->layers[i].scores);
        free(r->layers[i].out);
        free(r->layers[i].lse);
    }
    free(r->layers);
    free(r);
}

/* Reads the stored K (kind 0) or V (kind 1) block of one document and layer
 * from the snapshot, checking its size against the schema. */
static int load_block(msa__engine_snap_t *s, int pos, uint64_t id, int kind, msa_store_view_t *view,
                      msa_status_t *st)
{
    const msa_schema_t *sc = &s->coll.schema;
    size_t row = (size_t)sc->kv_heads * sc->head_dim * msa_dtype_size(sc->kv_dtype);
    int rc =
        msa_store_block_get(s->txn, s->coll.id, id, (uint16_t)pos, (msa_block_kind_t)kind, view);
    const char *why =
        rc == MSA_ECORRUPT ? "stored data is damaged (checksum mismatch)" : msa_strerror(rc);
    if (rc == MSA_OK && view->len % row != 0) {
        rc = MSA_ECORRUPT;
        why = "has the wrong size";
    }
    if (rc)
        msa_status_set(st, rc == MSA_ENOTFOUND ? MSA_EINTERNAL : rc,
                       "attend: collection \"%s\" document %llu layer %u %c block: %s",
                       s->coll.name, (unsigned long long)id, sc->layers[pos], kind ? 'V' : 'K',
                       why);
    return rc;
}

/* Gathers the pooled K and V of the selected documents of one layer from the
 * snapshot into float32 [R][H][D] arrays. */
static int gather_kv(msa__engine_snap_t *s, int pos, const uint64_t *ids, uint32_t n, float **k,
                     float **v, size_t *R, msa_status_t *st)
{
    const msa_schema_t *sc = &s->coll.schema;
    size_t W = (size_t)sc->kv_heads * sc->head_dim, esz = msa_dtype_size(sc->kv_dtype), rows = 0;
    msa_store_view_t(*views)[2] = msa_calloc(n ? n : 1, sizeof *views);
    if (!views) return msa_status_set(st, MSA_ENOMEM, "attend: out of memory");
    int rc = MSA_OK;
    for (uint32_t i = 0; i < n && rc == MSA_OK; i++) {
        for (int kind = 0; kind < 2 && rc == MSA_OK; kind++)
            rc = load_block(s, pos, ids[i], kind, &views[i][kind], st);
        if (rc == MSA_OK) rows += views[i][0].len / (W * esz);
    }
    if (rc == MSA_OK) {
        *k = msa_malloc((rows ? rows : 1) * W * sizeof(float));
        *v = msa_malloc((rows ? rows : 1) * W * sizeof(float));
        if (!*k || !*v) rc = msa_status_set(st, MSA_ENOMEM, "attend: out of memory");
    }
    if (rc == MSA_OK) {
        size_t at = 0;
        for (uint32_t i = 0; i < n; i++) {
            size_t cnt = views[i][0].len / esz;
            msa_tensor_to_f32(sc->kv_dtype, views[i][0].data, cnt, *k + at);
            msa_tensor_to_f32(sc->kv_dtype, views[i][1].data, cnt, *v + at);
            at += cnt;
        }
        *R = rows;
    }
    free(views);
    return rc;
}

/* The CUDA backend's K/V loader: stored blocks straight from the snapshot. */
typedef struct gpu_load_ctx {
    msa__engine_snap_t *s;
    int pos;
    const uint64_t *ids;
    msa_status_t *st;
} gpu_load_ctx_t;

static int gpu_load(void *arg, uint32_t i, const void **k, const void **v, uint32_t *nrows)
{
    gpu_load_ctx_t *c = arg;
    const msa_schema_t *sc = &c->s->coll.schema;
    msa_store_view_t kv[2];
    for (int kind = 0; kind < 2; kind++) {
        int rc = load_block(c->s, c->pos, c->ids[i], kind, &kv[kind], c->st);
        if (rc) return rc;
    }
    size_t row = (size_t)sc->kv_heads * sc->head_dim * msa_dtype_size(sc->kv_dtype);
    *k = kv[0].data;
    *v = kv[1].data;
    *nrows = (uint32_t)(kv[0].len / row);
    return MSA_OK;
}

/* Attention of one layer on the CUDA backend through its K/V cache. Returns
 * MSA_EUNAVAIL when the device cannot take it (the CPU attends then). */
static int gpu_attend_layer(msa_engine_t *e, msa__engine_snap_t *s, int pos, const uint64_t *ids,
                            uint32_t n, const float *q, uint32_t T, float scale, float *o,
                            float *lse, msa_status_t *st)
{
    const msa_schema_t *sc = &s->coll.schema;
    uint64_t *versions = msa_malloc((n ? n : 1) * sizeof *versions);
    if (!versions) return msa_status_set(st, MSA_ENOMEM, "attend: out of memory");
    int rc = MSA_OK;
    for (uint32_t i = 0; i < n && rc == MSA_OK; i++) {
        msa_doc_rec_t d;
        rc = fill_status(st, msa_store_doc_get(s->txn, s->coll.id, ids[i], &d), "document lookup");
        versions[i] = d.updated_seq;
    }
    gpu_load_ctx_t lc = {.s = s, .pos = pos, .ids = ids, .st = st};
    msa_gpu_attend_args_t a = {.coll_id = s->coll.id,
                               .layer = (uint32_t)pos,
                               .docs = ids,
                               .versions = versions,
                               .n = n,
                               .load = gpu_load,
                               .load_arg = &lc,
                               .q = q,
                               .T = T,
                               .Hq = sc->query_heads,
                               .H = sc->kv_heads,
                               .D = sc->head_dim,
                               .scale = scale,
                               .kv_dtype = sc->kv_dtype,
                               .out = o,
                               .lse = lse};
    if (rc == MSA_OK) rc = msa_gpu_attend(e->gpu, &a);
    if (rc && rc != MSA_EUNAVAIL && st->code == MSA_OK)
        msa_status_set(st, rc, "attend: device: %s", msa_strerror(rc));
    free(versions);
    return rc;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* doc_ids given: every id valid, unique and visible in the snapshot. */
static int check_doc_ids(msa__engine_snap_t *s, const uint64_t *ids, size_t n, msa_status_t *st)
{
    if (n > MSA_MAX_TOP_K)
        return msa_status_set(st, MSA_EINVAL, "doc_ids: %zu ids, at most %d", n, MSA_MAX_TOP_K);
    uint64_t *sorted = msa_malloc(n * sizeof *sorted);
    if (!sorted) return msa_status_set(st, MSA_ENOMEM, "attend: out of memory");
    memcpy(sorted, ids, n * sizeof *sorted);
    qsort(sorted, n, sizeof *sorted, cmp_u64);
    int rc = MSA_OK;
    for (size_t i = 0; i < n && rc == MSA_OK; i++) {
        char path[48];
        snprintf(path, sizeof path, "doc_ids[%zu]", i);
        rc = msa__engine_check_id(ids[i], path, st);
        if (rc == MSA_OK && i && sorted[i] == sorted[i - 1])
            rc = msa_status_set(st, MSA_EINVAL, "doc_ids: id %llu listed twice",
                                (unsigned long long)sorted[i]);
    }
    free(sorted);
    for (size_t i = 0; i < n && rc == MSA_OK; i++) {
        msa_doc_rec_t d;
        rc = msa_store_doc_get(s->txn, s->coll.id, ids[i], &d);
        if (rc == MSA_ENOTFOUND)
            rc =
                msa_status_set(st, rc, "doc_ids[%zu]: document %llu not found in collection \"%s\"",
                               i, (unsigned long long)ids[i], s->coll.name);
        else
            fill_status(st, rc, "document lookup");
    }
    return rc;
}

int msa_engine_attend(msa_engine_t *e, const msa_engine_attend_req_t *req,
                      msa_engine_attend_result_t **out, msa_status_t *st)
{
    int rc = enter(e, st);
    if (rc) return rc;
    *out = NULL;
    msa__engine_snap_t s;
    query_set_t qs = {0};
    msa_engine_attend_result_t *r = NULL;
    float *k = NULL, *v = NULL, *o = NULL;
    rc = msa__engine_snap_open_at(e, req->c.collection, req->c.min_seq, req->c.deadline_ms,
                                  req->c.snapshot_seq, req->c.hold_ms, &s, st);
    if (rc) return leave(e, rc);
    const msa_schema_t *sc = &s.coll.schema;
    uint32_t topk = 0;
    bool given = req->n_doc_ids > 0;
    msa_dtype_t odt = req->out_dtype ? req->out_dtype : MSA_DT_F32;
    if ((rc = msa__engine_check_model(sc, req->c.model, st))) goto done;
    if ((rc = check_top_k(sc, req->top_k, &topk, st))) goto done;
    if (odt != MSA_DT_F32 && odt != MSA_DT_F16 && odt != MSA_DT_BF16) {
        rc = msa_status_set(st, MSA_EINVAL, "out_dtype: %s, want F32, F16 or BF16",
                            msa_dtype_name(odt));
        goto done;
    }
    if (!isfinite(req->scale) || req->scale < 0) {
        rc = msa_status_set(st, MSA_EINVAL, "scale: %g, want a finite value >= 0 (0 = 1/sqrt(D))",
                            (double)req->scale);
        goto done;
    }
    if (req->n_exclude > e->cfg.max_ids) {
        rc = msa_status_set(st, MSA_EINVAL, "exclude_ids: %zu ids, at most %u (--max-ids)",
                            req->n_exclude, e->cfg.max_ids);
        goto done;
    }
    if ((rc = prep_queries(sc, s.coll.name, req->n_layers, req->layers, !given, true,
                           e->cfg.max_query_tokens, &qs, st)))
        goto done;
    if (given && (rc = check_doc_ids(&s, req->doc_ids, req->n_doc_ids, st))) goto done;
    float scale = req->scale > 0 ? req->scale : 1.0f / sqrtf((float)sc->head_dim);
    r = msa_calloc(1, sizeof *r);
    if (!r || !(r->layers = msa_calloc(qs.n, sizeof *r->layers))) {
        rc = msa_status_set(st, MSA_ENOMEM, "attend: out of memory");
        goto done;
    }
    r->snapshot_seq = s.seq;
    r->out_dtype = odt;
    for (uint32_t i = 0; i < qs.n && rc == MSA_OK; i++) {
        msa_engine_layer_attention_t *la = &r->layers[r->n_layers++];
        la->layer = req->layers[i].layer;
        la->T = qs.T[i];
        la->Hq = sc->query_heads;
        la->D = sc->head_dim;
        if (given) {
            la->n = (uint32_t)req->n_doc_ids;
            la->doc_ids = msa_malloc(la->n * sizeof *la->doc_ids);
            if (!la->doc_ids) {
                rc = msa_status_set(st, MSA_ENOMEM, "attend: out of memory");
                break;
            }
            memcpy(la->doc_ids, req->doc_ids, la->n * sizeof *la->doc_ids);
        } else {
            rc = route_layer(e, &s, &qs, i, topk, req->exclude_ids, req->n_exclude, &la->doc_ids,
                             &la->scores, &la->n, st);
            if (rc) break;
        }
        size_t n_out = (size_t)la->T * la->Hq * la->D;
        o = msa_malloc(n_out * sizeof *o);
        la->lse = msa_malloc((size_t)la->T * la->Hq * sizeof *la->lse);
        la->out_bytes = n_out * msa_dtype_size(odt);
        la->out = msa_malloc(la->out_bytes);
        if (!o || !la->lse || !la->out) {
            rc = msa_status_set(st, MSA_ENOMEM, "attend: out of memory");
            break;
        }
        if (e->gpu) {
            rc = gpu_attend_layer(e, &s, qs.pos[i], la->doc_ids, la->n, qs.q[i], la->T, scale, o,
                                  la->lse, st);
            if (rc == MSA_OK) {
                msa_tensor_from_f32(odt, o, n_out, la->out);
                free(o);
                o = NULL;
                continue;
            }
            if (rc != MSA_EUNAVAIL) break;
            rc = MSA_OK;
        }
        size_t R = 0;
        rc = gather_kv(&s, qs.pos[i], la->doc_ids, la->n, &k, &v, &R, st);
        if (rc) break;
        if (msa_idx_attend(qs.q[i], la->T, sc->query_heads, sc->kv_heads, sc->head_dim, k, v, R,
                           scale, o, la->lse, msa_idx_get_pool(e->idx)) != MSA_OK) {
            rc = msa_status_set(st, MSA_ENOMEM, "attend: out of memory");
            break;
        }
        msa_tensor_from_f32(odt, o, n_out, la->out);
        free(k);
        free(v);
        free(o);
        k = v = o = NULL;
    }
    if (rc == MSA_OK) rc = msa__engine_snap_hold(e, &s, req->c.hold_ms, st);
done:
    free(k);
    free(v);
    free(o);
    query_set_free(&qs);
    msa__engine_snap_close(e, &s);
    if (rc)
        msa_engine_attend_result_free(r);
    else {
        *out = r;
        atomic_fetch_add(&e->n_attends, 1);
    }
    return leave(e, rc);
}

/* ==== Get / List ============================================================================================= */

void msa_engine_get_result_free(msa_engine_get_result_t *r)
{
    if (!r) return;
    for (size_t i = 0; i < r->n_records; i++) free(r->records[i].layers);
    free(r->records);
    msa__engine_snap_t *s = r->priv;
    if (s) {
        msa__engine_snap_close(s->e, s);
        free(s);
    }
    free(r);
}

static void view_tensor(msa_tensor_t *t, msa_dtype_t dt, uint32_t C, uint32_t H, uint32_t D,
                        msa_store_view_t v)
{
    *t =
        (msa_tensor_t){.dtype = dt, .ndim = 3, .shape = {C, H, D}, .data = v.data, .nbytes = v.len};
}

int msa_engine_get(msa_engine_t *e, const msa_engine_get_req_t *req, msa_engine_get_result_t **out,
                   msa_status_t *st)
{
    int rc = enter(e, st);
    if (rc) return rc;
    *out = NULL;
    if (req->n_ids > e->cfg.max_ids)
        return leave(e, msa_status_set(st, MSA_EINVAL, "ids: %zu ids, at most %u (--max-ids)",
                                       req->n_ids, e->cfg.max_ids));
    /* The snapshot lives in the result: its views point into it. */
    msa__engine_snap_t *s = msa_calloc(1, sizeof *s);
    msa_engine_get_result_t *r = msa_calloc(1, sizeof *r);
    if (!s || !r) {
        free(s);
        free(r);
        return leave(e, msa_status_set(st, MSA_ENOMEM, "get: out of memory"));
    }
    rc = msa__engine_snap_open_at(e, req->collection, req->min_seq, req->deadline_ms,
                                  req->snapshot_seq, req->hold_ms, s, st);
    if (rc) {
        free(s);
        free(r);
        return leave(e, rc);
    }
    r->priv = s;
    r->snapshot_seq = s->seq;
    const msa_schema_t *sc = &s->coll.schema;
    int pos[MSA_MAX_LAYERS];
    uint32_t nl = 0;
    if (req->with_tensors) {
        if (req->n_layers == 0) {
            for (uint32_t l = 0; l < sc->n_layers; l++) pos[nl++] = (int)l;
        } else {
            for (uint32_t l = 0; l < req->n_layers && rc == MSA_OK; l++) {
                int p = msa_schema_layer_pos(sc, req->layers[l]);
                if (p < 0)
                    rc = msa_status_set(st, MSA_EINVAL,
                                        "layers[%u]: %u is not a memory layer of collection \"%s\"",
                                        l, req->layers[l], s->coll.name);
                for (uint32_t j = 0; j < nl && rc == MSA_OK; j++)
                    if (pos[j] == p)
                        rc = msa_status_set(st, MSA_EINVAL, "layers[%u]: duplicate layer %u", l,
                                            req->layers[l]);
                if (rc == MSA_OK) pos[nl++] = p;
            }
        }
    }
    if (rc == MSA_OK && !(r->records = msa_calloc(req->n_ids ? req->n_ids : 1, sizeof *r->records)))
        rc = msa_status_set(st, MSA_ENOMEM, "get: out of memory");
    uint64_t bytes = 0; /* response bytes so far (req->max_bytes) */
    for (size_t i = 0; i < req->n_ids && rc == MSA_OK; i++) {
        msa_engine_get_record_t *g = &r->records[r->n_records++];
        char path[48];
        snprintf(path, sizeof path, "ids[%zu]", i);
        if ((rc = msa__engine_check_id(req->ids[i], path, st))) break;
        rc = msa_store_doc_get(s->txn, s->coll.id, req->ids[i], &g->info);
        if (rc == MSA_ENOTFOUND) {
            rc = msa_status_set(st, rc, "ids[%zu]: document %llu not found in collection \"%s\"", i,
                                (unsigned long long)req->ids[i], s->coll.name);
            break;
        }
        if (rc) {
            msa_status_set(st, rc, "get: collection \"%s\" document %llu record: %s", s->coll.name,
                           (unsigned long long)req->ids[i],
                           rc == MSA_ECORRUPT ? "stored data is damaged (checksum mismatch)"
                                              : msa_strerror(rc));
            break;
        }
        /* Count what this record brings before reading any of it: views
         * cost nothing, but the response packs every byte once per record.
         * A repeated id is answered at each of its positions (records come
         * in request order) and counted each time, so ids=[1]*300 of an
         * 8 MiB text stops at the limit instead of building 2.4 GB. */
        if (req->max_bytes) {
            uint64_t add = 64 + (req->with_text ? g->info.text_bytes : 0) +
                           (req->with_metadata ? g->info.metadata_bytes : 0);
            if (nl) {
                uint64_t per = (uint64_t)g->info.chunks * sc->kv_heads * sc->head_dim;
                uint64_t kvb = per * msa_dtype_size(sc->kv_dtype) * 2;
                if (sc->separate_router_keys && !req->skip_router_keys)
                    kvb += per * msa_dtype_size(msa_schema_router_store_dtype(sc));
                add += kvb * nl;
            }
            bytes += add;
            if (bytes > req->max_bytes) {
                rc = msa_status_set(st, MSA_EFULL,
                                    "response: more than %llu bytes by ids[%zu] (%zu of %zu "
                                    "records), over the message limit (--max-message-mb); ask for "
                                    "fewer ids or less per id",
                                    (unsigned long long)req->max_bytes, i, i + 1, req->n_ids);
                break;
            }
        }
        if (req->with_text && g->info.text_bytes &&
            (rc = msa_store_text_get(s->txn, s->coll.id, req->ids[i], &g->text)))
            msa_status_set(st, rc, "get: collection \"%s\" document %llu text: %s", s->coll.name,
                           (unsigned long long)req->ids[i],
                           rc == MSA_ECORRUPT ? "stored data is damaged (checksum mismatch)"
                                              : msa_strerror(rc));
        if (rc == MSA_OK && req->with_metadata && g->info.metadata_bytes &&
            (rc = msa_store_meta_get(s->txn, s->coll.id, req->ids[i], &g->metadata)))
            msa_status_set(st, rc, "get: collection \"%s\" document %llu metadata: %s",
                           s->coll.name, (unsigned long long)req->ids[i],
                           rc == MSA_ECORRUPT ? "stored data is damaged (checksum mismatch)"
                                              : msa_strerror(rc));
        if (rc == MSA_OK && nl) {
            g->layers = msa_calloc(nl, sizeof *g->layers);
            if (!g->layers) rc = msa_status_set(st, MSA_ENOMEM, "get: out of memory");
        }
        for (uint32_t l = 0; l < nl && rc == MSA_OK; l++) {
            msa_engine_get_layer_t *gl = &g->layers[g->n_layers++];
            gl->layer = sc->layers[pos[l]];
            msa_store_view_t kv[3] = {{0}};
            int kinds = sc->separate_router_keys && !req->skip_router_keys ? 3 : 2;
            for (int kind = 0; kind < kinds && rc == MSA_OK; kind++) {
                rc = msa_store_block_get(s->txn, s->coll.id, req->ids[i], (uint16_t)pos[l],
                                         (msa_block_kind_t)kind, &kv[kind]);
                if (rc)
                    msa_status_set(st, rc == MSA_ECORRUPT ? MSA_ECORRUPT : MSA_EINTERNAL,
                                   "get: collection \"%s\" document %llu layer %u %c block: %s",
                                   s->coll.name, (unsigned long long)req->ids[i], gl->layer,
                                   "KVR"[kind],
                                   rc == MSA_ECORRUPT ? "stored data is damaged (checksum mismatch)"
                                                      : msa_strerror(rc));
            }
            if (rc) break;
            uint32_t C = g->info.chunks, H = sc->kv_heads, D = sc->head_dim;
            view_tensor(&gl->k, sc->kv_dtype, C, H, D, kv[0]);
            view_tensor(&gl->v, sc->kv_dtype, C, H, D, kv[1]);
            if (kinds == 3)
                view_tensor(&gl->router_k, msa_schema_router_store_dtype(sc), C, H, D, kv[2]);
        }
    }
    if (rc == MSA_OK) rc = msa__engine_snap_hold(e, s, req->hold_ms, st);
    /* The views stay valid while the result keeps its use of the snapshot;
     * other calls may borrow a held one's txn meanwhile. */
    msa__engine_snap_unlock(s);
    if (rc) {
        msa_engine_get_result_free(r);
        return leave(e, rc);
    }
    *out = r;
    atomic_fetch_add(&e->n_gets, 1);
    return leave(e, MSA_OK);
}

static void list_result_clear(msa_engine_list_result_t *r)
{
    if (!r) return;
    free(r->docs);
    r->docs = NULL;
}

static int list_into(msa_engine_t *e, const msa_engine_list_req_t *req,
                     msa_engine_list_result_t *out, msa_status_t *st)
{
    int rc = enter(e, st);
    if (rc) return rc;
    memset(out, 0, sizeof *out);
    if (req->limit > MAX_LIST_LIMIT)
        return leave(
            e, msa_status_set(st, MSA_EINVAL, "limit: %u, at most %d", req->limit, MAX_LIST_LIMIT));
    uint32_t limit = req->limit ? req->limit : 1000;
    msa__engine_snap_t s;
    rc =
        msa__engine_snap_open_at(e, req->collection, 0, 0, req->snapshot_seq, req->hold_ms, &s, st);
    if (rc) return leave(e, rc);
    out->docs = msa_malloc(limit * sizeof *out->docs);
    if (!out->docs)
        rc = msa_status_set(st, MSA_ENOMEM, "list: out of memory");
    else
        rc = fill_status(st,
                         msa_store_doc_list(s.txn, s.coll.id, req->after_id, limit, out->docs,
                                            &out->n, &out->next_after_id),
                         "list");
    out->snapshot_seq = s.seq;
    if (rc == MSA_OK) rc = msa__engine_snap_hold(e, &s, req->hold_ms, st);
    msa__engine_snap_close(e, &s);
    if (rc)
        list_result_clear(out);
    else
        atomic_fetch_add(&e->n_lists, 1);
    return leave(e, rc);
}

int msa_engine_list(msa_engine_t *e, const msa_engine_list_req_t *req,
                    msa_engine_list_result_t **out, msa_status_t *st)
{
    *out = NULL;
    msa_engine_list_result_t *r = msa__engine_result_new(sizeof *r, st);
    if (!r) return MSA_ENOMEM;
    int rc = list_into(e, req, r, st);
    if (rc)
        msa_engine_list_result_free(r);
    else
        *out = r;
    return rc;
}

void msa_engine_list_result_free(msa_engine_list_result_t *r)
{
    if (!r) return;
    list_result_clear(r);
    free(r);
}
