/* store_docs.c — collections and documents inside a store txn (store.h):
 * create/drop/list collections, put/delete/list documents with their text,
 * metadata and K/V/R blocks, and the per-collection counters they keep.
 */
#include "store_impl.h"

#include <stdlib.h>
#include <string.h>

/* ==== counters =============================================================== */

static uint64_t sub_sat(uint64_t a, uint64_t b)
{
    return a > b ? a - b : 0;
}

/* Adds (sign > 0) or removes (sign < 0) one document's share of the counters.
 * Removal saturates at zero so a damaged counter cannot wrap to 2^64; verify
 * reports the mismatch. */
static void coll_account(msa_coll_rec_t *c, const msa_doc_rec_t *d, int sign)
{
    uint64_t bytes = d->tensor_bytes + d->text_bytes + d->metadata_bytes;
    if (sign > 0) {
        c->documents += 1;
        c->chunks += d->chunks;
        c->tokens += d->tokens;
        c->bytes += bytes;
    } else {
        c->documents = sub_sat(c->documents, 1);
        c->chunks = sub_sat(c->chunks, d->chunks);
        c->tokens = sub_sat(c->tokens, d->tokens);
        c->bytes = sub_sat(c->bytes, bytes);
    }
}

/* ==== collections ============================================================ */

static int name_lookup(msa_store_t *s, MDB_txn *txn, const char *name, uint32_t *id)
{
    size_t n = strlen(name);
    if (n == 0 || n > MSA_MAX_NAME_LEN) return MSA_ENOTFOUND;
    MDB_val k = mval(name, n), v;
    int rc = mdb_get(txn, s->st_names, &k, &v);
    if (rc) return msa__store_xlate(s, rc);
    if (v.mv_size != 4) return MSA_ECORRUPT;
    *id = get_le32(v.mv_data);
    return MSA_OK;
}

int msa_store_coll_create(msa_store_txn_t *w, const char *name, const msa_schema_t *schema,
                          uint64_t seq, msa_coll_rec_t *out)
{
    msa_assert(w->tx_write);
    msa_store_t *s = w->tx_store;
    MDB_txn *txn = msa__store_cur(w);
    int rc = msa__store_level_err(w);
    if (rc) return rc;
    size_t nlen = strlen(name);
    if (nlen == 0 || nlen > MSA_MAX_NAME_LEN) return MSA_EINVAL;
    uint32_t id = 0;
    rc = name_lookup(s, txn, name, &id);
    if (rc == MSA_OK) return MSA_EEXIST;
    if (rc != MSA_ENOTFOUND) return rc;
    uint64_t next = 0;
    if ((rc = msa__store_meta_get_u64(s, txn, KEY_NEXT_COLL, 4, &next))) return rc;
    if (next == 0 || next >= UINT32_MAX) return MSA_EFULL;

    msa_coll_rec_t c;
    memset(&c, 0, sizeof c);
    c.id = (uint32_t)next;
    memcpy(c.name, name, nlen);
    c.created_seq = seq;
    c.schema = *schema;
    uint8_t idbuf[4];
    put_le32(idbuf, c.id);
    MDB_val k = mval(name, nlen), v = mval(idbuf, 4);
    if ((rc = msa__store_xlate(s, mdb_put(txn, s->st_names, &k, &v, MDB_NOOVERWRITE))) ||
        (rc = msa__store_coll_put_txn(s, txn, &c)) ||
        (rc = msa__store_meta_put_u64(s, txn, KEY_NEXT_COLL, 4, next + 1)))
        goto fail;
    if (out) *out = c;
    return MSA_OK;

fail:
    return msa__store_poison(w, rc);
}

int msa_store_coll_drop(msa_store_txn_t *w, const char *name, msa_coll_rec_t *out)
{
    msa_assert(w->tx_write);
    msa_store_t *s = w->tx_store;
    MDB_txn *txn = msa__store_cur(w);
    int rc = msa__store_level_err(w);
    if (rc) return rc;
    uint32_t id = 0;
    msa_coll_rec_t c;
    if ((rc = name_lookup(s, txn, name, &id))) return rc;
    if ((rc = msa__store_coll_get_id_txn(s, txn, id, &c))) return rc;

    uint8_t prefix[4], idkey[4];
    put_be32(prefix, id);
    memcpy(idkey, prefix, 4);
    MDB_val nk = mval(name, strlen(name)), ik = mval(idkey, 4);
    if ((rc = msa__store_del_prefix(s, txn, s->st_blocks, prefix, 4)) ||
        (rc = msa__store_del_prefix(s, txn, s->st_text, prefix, 4)) ||
        (rc = msa__store_del_prefix(s, txn, s->st_metadata, prefix, 4)) ||
        (rc = msa__store_del_prefix(s, txn, s->st_docs, prefix, 4)) ||
        (rc = msa__store_xlate(s, mdb_del(txn, s->st_names, &nk, NULL))) ||
        (rc = msa__store_xlate(s, mdb_del(txn, s->st_colls, &ik, NULL))))
        goto fail;
    if (out) *out = c;
    return MSA_OK;

fail:
    return msa__store_poison(w, rc);
}

int msa_store_coll_get(msa_store_txn_t *t, const char *name, msa_coll_rec_t *out)
{
    uint32_t id = 0;
    int rc = name_lookup(t->tx_store, msa__store_cur(t), name, &id);
    if (rc) return rc;
    return msa__store_coll_get_id_txn(t->tx_store, msa__store_cur(t), id, out);
}

int msa_store_coll_get_by_id(msa_store_txn_t *t, uint32_t id, msa_coll_rec_t *out)
{
    return msa__store_coll_get_id_txn(t->tx_store, msa__store_cur(t), id, out);
}

int msa_store_coll_foreach(msa_store_txn_t *t, int (*fn)(void *arg, const msa_coll_rec_t *c),
                           void *arg)
{
    msa_store_t *s = t->tx_store;
    MDB_cursor *c = NULL;
    int rc = mdb_cursor_open(msa__store_cur(t), s->st_colls, &c);
    if (rc) return msa__store_xlate(s, rc);
    MDB_val k, v;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        msa_coll_rec_t rec;
        int r = msa__store_coll_decode(&k, &v, &rec);
        if (r) {
            mdb_cursor_close(c);
            return r;
        }
        if ((r = fn(arg, &rec))) {
            mdb_cursor_close(c);
            return r;
        }
    }
    mdb_cursor_close(c);
    return rc == MDB_NOTFOUND ? MSA_OK : msa__store_xlate(s, rc);
}

/* ==== documents ============================================================== */

int msa_store_doc_get(msa_store_txn_t *t, uint32_t coll_id, uint64_t doc_id, msa_doc_rec_t *out)
{
    return msa__store_doc_get_txn(t->tx_store, msa__store_cur(t), coll_id, doc_id, out);
}

/* Puts bytes under key, or removes the key when there are none, so empty text
 * and metadata cost nothing. */
static int put_or_del(msa_store_t *s, MDB_txn *txn, MDB_dbi dbi, unsigned tag, const uint8_t *key,
                      const void *data, size_t len)
{
    MDB_val k = mval(key, DOC_KEY_LEN);
    if (len == 0) {
        int rc = mdb_del(txn, dbi, &k, NULL);
        return rc == MDB_NOTFOUND ? MSA_OK : msa__store_xlate(s, rc);
    }
    return msa__store_val_put(s, txn, dbi, tag, &k, data, len);
}

int msa_store_doc_put(msa_store_txn_t *w, uint32_t coll_id, const msa_doc_rec_t *rec,
                      const void *text, size_t text_len, const void *meta, size_t meta_len,
                      const msa_store_block_t *blocks, size_t n_blocks)
{
    msa_assert(w->tx_write);
    msa_store_t *s = w->tx_store;
    MDB_txn *txn = msa__store_cur(w);
    int rc = msa__store_level_err(w);
    if (rc) return rc;
    msa_coll_rec_t c;
    if ((rc = msa__store_coll_get_id_txn(s, txn, coll_id, &c))) return rc;
    for (size_t i = 0; i < n_blocks; i++) {
        if (blocks[i].layer_pos >= c.schema.n_layers || blocks[i].kind > MSA_BLOCK_R ||
            (blocks[i].len > 0 && !blocks[i].data))
            return MSA_EINVAL;
    }
    msa_doc_rec_t old;
    rc = msa__store_doc_get_txn(s, txn, coll_id, rec->id, &old);
    if (rc == MSA_OK)
        coll_account(&c, &old, -1);
    else if (rc != MSA_ENOTFOUND)
        return rc;

    uint8_t key[DOC_KEY_LEN], bkey[BLOCK_KEY_LEN], buf[DOC_REC_LEN];
    msa__store_doc_key(key, coll_id, rec->id);
    msa__store_doc_encode(rec, buf);
    MDB_val k = mval(key, DOC_KEY_LEN);
    /* The prefix delete also clears blocks that a damaged store left behind
     * without a record, so a put always leaves exactly the blocks it names. */
    if ((rc = msa__store_del_prefix(s, txn, s->st_blocks, key, DOC_KEY_LEN)) ||
        (rc = msa__store_val_put(s, txn, s->st_docs, TAG_DOC, &k, buf, DOC_REC_LEN)) ||
        (rc = put_or_del(s, txn, s->st_text, TAG_TEXT, key, text, text_len)) ||
        (rc = put_or_del(s, txn, s->st_metadata, TAG_META, key, meta, meta_len)))
        goto fail;
    for (size_t i = 0; i < n_blocks; i++) {
        msa__store_block_key(bkey, coll_id, rec->id, blocks[i].layer_pos, blocks[i].kind);
        MDB_val bk = mval(bkey, BLOCK_KEY_LEN);
        if ((rc = msa__store_val_put(s, txn, s->st_blocks, TAG_BLOCK, &bk, blocks[i].data,
                                     blocks[i].len)))
            goto fail;
    }
    coll_account(&c, rec, +1);
    if ((rc = msa__store_coll_put_txn(s, txn, &c))) goto fail;
    return MSA_OK;

fail:
    return msa__store_poison(w, rc);
}

int msa_store_doc_delete(msa_store_txn_t *w, uint32_t coll_id, uint64_t doc_id)
{
    msa_assert(w->tx_write);
    msa_store_t *s = w->tx_store;
    MDB_txn *txn = msa__store_cur(w);
    int rc = msa__store_level_err(w);
    if (rc) return rc;
    msa_coll_rec_t c;
    msa_doc_rec_t old;
    if ((rc = msa__store_coll_get_id_txn(s, txn, coll_id, &c))) return rc;
    if ((rc = msa__store_doc_get_txn(s, txn, coll_id, doc_id, &old))) return rc;
    coll_account(&c, &old, -1);

    uint8_t key[DOC_KEY_LEN];
    msa__store_doc_key(key, coll_id, doc_id);
    MDB_val k = mval(key, DOC_KEY_LEN);
    if ((rc = msa__store_del_prefix(s, txn, s->st_blocks, key, DOC_KEY_LEN)) ||
        (rc = put_or_del(s, txn, s->st_text, TAG_TEXT, key, NULL, 0)) ||
        (rc = put_or_del(s, txn, s->st_metadata, TAG_META, key, NULL, 0)) ||
        (rc = msa__store_xlate(s, mdb_del(txn, s->st_docs, &k, NULL))) ||
        (rc = msa__store_coll_put_txn(s, txn, &c)))
        goto fail;
    return MSA_OK;

fail:
    return msa__store_poison(w, rc);
}

/* Walks the documents of one collection from id `from` upward; fn returns
 * non-zero to stop, and that value is returned. */
static int doc_walk(msa_store_txn_t *t, uint32_t coll_id, uint64_t from,
                    int (*fn)(void *arg, const msa_doc_rec_t *d), void *arg)
{
    msa_store_t *s = t->tx_store;
    MDB_cursor *c = NULL;
    int rc = mdb_cursor_open(msa__store_cur(t), s->st_docs, &c);
    if (rc) return msa__store_xlate(s, rc);
    uint8_t key[DOC_KEY_LEN];
    msa__store_doc_key(key, coll_id, from);
    MDB_val k = mval(key, DOC_KEY_LEN), v;
    int r = MSA_OK;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        if (k.mv_size != DOC_KEY_LEN || get_be32(k.mv_data) != coll_id) break;
        msa_doc_rec_t d;
        if ((r = msa__store_doc_decode(&k, &v, &d)) || (r = fn(arg, &d))) break;
    }
    mdb_cursor_close(c);
    if (r) return r;
    return rc == 0 || rc == MDB_NOTFOUND ? MSA_OK : msa__store_xlate(s, rc);
}

struct list_ctx {
    msa_doc_rec_t *out;
    uint32_t limit, n;
    bool more;
};

static int list_one(void *arg, const msa_doc_rec_t *d)
{
    struct list_ctx *l = arg;
    if (l->n == l->limit) {
        l->more = true;
        return 1;
    }
    l->out[l->n++] = *d;
    return 0;
}

int msa_store_doc_list(msa_store_txn_t *t, uint32_t coll_id, uint64_t after_id, uint32_t limit,
                       msa_doc_rec_t *out, uint32_t *n_out, uint64_t *next_after)
{
    *n_out = 0;
    *next_after = 0;
    msa_coll_rec_t c;
    int rc = msa__store_coll_get_id_txn(t->tx_store, msa__store_cur(t), coll_id, &c);
    if (rc) return rc;
    if (limit == 0 || after_id == UINT64_MAX) return MSA_OK;
    struct list_ctx l = {out, limit, 0, false};
    rc = doc_walk(t, coll_id, after_id + 1, list_one, &l);
    if (rc < 0) return rc;
    *n_out = l.n;
    if (l.more) *next_after = out[l.n - 1].id;
    return MSA_OK;
}

int msa_store_doc_foreach(msa_store_txn_t *t, uint32_t coll_id,
                          int (*fn)(void *arg, const msa_doc_rec_t *d), void *arg)
{
    msa_coll_rec_t c;
    int rc = msa__store_coll_get_id_txn(t->tx_store, msa__store_cur(t), coll_id, &c);
    if (rc) return rc;
    return doc_walk(t, coll_id, 0, fn, arg);
}

/* Text and metadata of a document that has none are empty views, not
 * ENOTFOUND: the keys are simply not stored. ENOTFOUND means no document. */
static int bytes_get(msa_store_txn_t *t, MDB_dbi dbi, unsigned tag, uint32_t coll_id,
                     uint64_t doc_id, msa_store_view_t *out)
{
    msa_store_t *s = t->tx_store;
    uint8_t key[DOC_KEY_LEN];
    msa__store_doc_key(key, coll_id, doc_id);
    MDB_val k = mval(key, DOC_KEY_LEN), v;
    out->data = NULL;
    out->len = 0;
    int rc = mdb_get(msa__store_cur(t), dbi, &k, &v);
    if (rc == MDB_NOTFOUND) {
        rc = mdb_get(msa__store_cur(t), s->st_docs, &k, &v);
        return msa__store_xlate(s, rc);
    }
    if (rc) return msa__store_xlate(s, rc);
    MDB_val pv;
    if ((rc = msa__store_val_open(tag, &k, &v, &pv))) return rc;
    out->data = pv.mv_data;
    out->len = pv.mv_size;
    return MSA_OK;
}

int msa_store_text_get(msa_store_txn_t *t, uint32_t coll_id, uint64_t doc_id, msa_store_view_t *out)
{
    return bytes_get(t, t->tx_store->st_text, TAG_TEXT, coll_id, doc_id, out);
}

int msa_store_meta_get(msa_store_txn_t *t, uint32_t coll_id, uint64_t doc_id, msa_store_view_t *out)
{
    return bytes_get(t, t->tx_store->st_metadata, TAG_META, coll_id, doc_id, out);
}

int msa_store_block_get(msa_store_txn_t *t, uint32_t coll_id, uint64_t doc_id, uint16_t layer_pos,
                        msa_block_kind_t kind, msa_store_view_t *out)
{
    msa_store_t *s = t->tx_store;
    uint8_t key[BLOCK_KEY_LEN];
    msa__store_block_key(key, coll_id, doc_id, layer_pos, (uint8_t)kind);
    MDB_val k = mval(key, BLOCK_KEY_LEN), v;
    int rc = mdb_get(msa__store_cur(t), s->st_blocks, &k, &v);
    if (rc) return msa__store_xlate(s, rc);
    MDB_val pv;
    if ((rc = msa__store_val_open(TAG_BLOCK, &k, &v, &pv))) return rc;
    out->data = pv.mv_data;
    out->len = pv.mv_size;
    return MSA_OK;
}
