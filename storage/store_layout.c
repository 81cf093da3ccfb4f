/* store_layout.c — the store's on-disk layout: keys, the checksummed value
 * framing (8-byte header with a CRC32C over key, header and payload) and the
 * collection and document records. Pure codecs plus msa__store_val_put, which
 * frames a value in place inside LMDB's reserved page. Byte-order helpers and
 * the layout constants live in store_impl.h.
 */
#include "store_impl.h"

#include "crc32c.h"

#include <string.h>

/* ==== keys =================================================================== */

void msa__store_doc_key(uint8_t k[DOC_KEY_LEN], uint32_t coll_id, uint64_t doc_id)
{
    put_be32(k, coll_id);
    put_be64(k + 4, doc_id);
}

void msa__store_block_key(uint8_t k[BLOCK_KEY_LEN], uint32_t coll_id, uint64_t doc_id,
                          uint16_t layer_pos, uint8_t kind)
{
    msa__store_doc_key(k, coll_id, doc_id);
    put_be16(k + 12, layer_pos);
    k[14] = kind;
}

/* ==== checksummed values ====================================================== */

/* Every value of collections, docs, text, metadata and blocks is stored as
 *   u32 crc32c (LE) | u8 VAL_VERSION | u8 tag | u16 0 | payload
 * where the CRC covers the key, header bytes 4..7 and the payload: a value
 * moved to another key, or a page of it overwritten, no longer matches. The
 * header is 8 bytes so the payload keeps the 8-byte alignment of an overflow
 * page's data (LMDB aligns values in leaf pages only to 2 bytes; readers copy
 * or convert through memcpy-based code either way). meta and coll_names keep
 * plain values: tiny, read on every txn begin, and checked by verify. */
static uint32_t val_crc(const MDB_val *k, const uint8_t *hdr, const void *payload, size_t len)
{
    uint32_t c = msa_crc32c(0, k->mv_data, k->mv_size);
    c = msa_crc32c(c, hdr + 4, VAL_HDR - 4);
    return msa_crc32c(c, payload, len);
}

/* Stores header + payload under k, writing straight into the page LMDB
 * reserves (no staging copy), then checksums what landed there. */
int msa__store_val_put(msa_store_t *s, MDB_txn *txn, MDB_dbi dbi, unsigned tag, const MDB_val *k,
                       const void *payload, size_t len)
{
    MDB_val v = {VAL_HDR + len, NULL};
    int rc = mdb_put(txn, dbi, (MDB_val *)k, &v, MDB_RESERVE);
    if (rc) return msa__store_xlate(s, rc);
    uint8_t *p = v.mv_data;
    p[4] = VAL_VERSION;
    p[5] = (uint8_t)tag;
    p[6] = p[7] = 0;
    if (len) memcpy(p + VAL_HDR, payload, len);
    put_le32(p, val_crc(k, p, p + VAL_HDR, len));
    return MSA_OK;
}

/* Why a stored value fails its check, or NULL when it is sound; *out is then
 * its payload. */
const char *msa__store_val_check(unsigned tag, const MDB_val *k, const MDB_val *v, MDB_val *out)
{
    const uint8_t *p = v->mv_data;
    if (v->mv_size < VAL_HDR) return "value shorter than its header";
    if (p[4] != VAL_VERSION || p[5] != tag || p[6] || p[7]) return "value header damaged";
    size_t len = v->mv_size - VAL_HDR;
    if (get_le32(p) != val_crc(k, p, p + VAL_HDR, len)) return "checksum mismatch";
    if (out) *out = mval(p + VAL_HDR, len);
    return NULL;
}

int msa__store_val_open(unsigned tag, const MDB_val *k, const MDB_val *v, MDB_val *out)
{
    return msa__store_val_check(tag, k, v, out) ? MSA_ECORRUPT : MSA_OK;
}

/* Collection record v1: u8 version, u32 id, u64 created_seq, u64 documents,
 * chunks, tokens, bytes, u8 name_len, name, u32 schema_len, schema encoding.
 * Returns the encoded length; buf holds COLL_REC_MAX bytes. */
size_t msa__store_coll_encode(const msa_coll_rec_t *c, uint8_t *buf)
{
    size_t nlen = strnlen(c->name, MSA_MAX_NAME_LEN);
    uint8_t *p = buf;
    *p++ = COLL_REC_VERSION;
    put_le32(p, c->id), p += 4;
    put_le64(p, c->created_seq), p += 8;
    put_le64(p, c->documents), p += 8;
    put_le64(p, c->chunks), p += 8;
    put_le64(p, c->tokens), p += 8;
    put_le64(p, c->bytes), p += 8;
    *p++ = (uint8_t)nlen;
    memcpy(p, c->name, nlen), p += nlen;
    size_t slen = msa_schema_encode(&c->schema, p + 4);
    put_le32(p, (uint32_t)slen), p += 4 + slen;
    return (size_t)(p - buf);
}

int msa__store_coll_decode(const MDB_val *k, const MDB_val *sv, msa_coll_rec_t *out)
{
    MDB_val pv;
    if (msa__store_val_open(TAG_COLL, k, sv, &pv)) return MSA_ECORRUPT;
    const MDB_val *v = &pv;
    const uint8_t *p = v->mv_data;
    size_t len = v->mv_size;
    if (len < COLL_REC_FIXED || p[0] != COLL_REC_VERSION) return MSA_ECORRUPT;
    size_t nlen = p[COLL_REC_FIXED - 1];
    if (nlen == 0 || nlen > MSA_MAX_NAME_LEN || len < COLL_REC_FIXED + nlen + 4)
        return MSA_ECORRUPT;
    const uint8_t *sp = p + COLL_REC_FIXED + nlen;
    size_t slen = get_le32(sp);
    if (len != COLL_REC_FIXED + nlen + 4 + slen) return MSA_ECORRUPT;
    if (memchr(p + COLL_REC_FIXED, '\0', nlen)) return MSA_ECORRUPT;

    msa_coll_rec_t c;
    memset(&c, 0, sizeof c);
    if (msa_schema_decode(sp + 4, slen, &c.schema) != MSA_OK) return MSA_ECORRUPT;
    c.id = get_le32(p + 1);
    c.created_seq = get_le64(p + 5);
    c.documents = get_le64(p + 13);
    c.chunks = get_le64(p + 21);
    c.tokens = get_le64(p + 29);
    c.bytes = get_le64(p + 37);
    memcpy(c.name, p + COLL_REC_FIXED, nlen);
    c.name[nlen] = '\0';
    *out = c;
    return MSA_OK;
}

/* Document record v1: u8 version, u64 id, u64 version, u32 tokens, u32 chunks,
 * u64 created_seq, u64 updated_seq, i64 updated_unix_ms, u64 text_bytes,
 * u64 metadata_bytes, u64 tensor_bytes. */
void msa__store_doc_encode(const msa_doc_rec_t *d, uint8_t buf[DOC_REC_LEN])
{
    uint8_t *p = buf;
    *p++ = DOC_REC_VERSION;
    put_le64(p, d->id), p += 8;
    put_le64(p, d->version), p += 8;
    put_le32(p, d->tokens), p += 4;
    put_le32(p, d->chunks), p += 4;
    put_le64(p, d->created_seq), p += 8;
    put_le64(p, d->updated_seq), p += 8;
    put_le64(p, (uint64_t)d->updated_unix_ms), p += 8;
    put_le64(p, d->text_bytes), p += 8;
    put_le64(p, d->metadata_bytes), p += 8;
    put_le64(p, d->tensor_bytes), p += 8;
    msa_assert(p - buf == DOC_REC_LEN);
}

int msa__store_doc_decode(const MDB_val *k, const MDB_val *sv, msa_doc_rec_t *out)
{
    MDB_val pv;
    if (msa__store_val_open(TAG_DOC, k, sv, &pv)) return MSA_ECORRUPT;
    const MDB_val *v = &pv;
    const uint8_t *p = v->mv_data;
    if (v->mv_size != DOC_REC_LEN || p[0] != DOC_REC_VERSION) return MSA_ECORRUPT;
    p++;
    out->id = get_le64(p), p += 8;
    out->version = get_le64(p), p += 8;
    out->tokens = get_le32(p), p += 4;
    out->chunks = get_le32(p), p += 4;
    out->created_seq = get_le64(p), p += 8;
    out->updated_seq = get_le64(p), p += 8;
    out->updated_unix_ms = (int64_t)get_le64(p), p += 8;
    out->text_bytes = get_le64(p), p += 8;
    out->metadata_bytes = get_le64(p), p += 8;
    out->tensor_bytes = get_le64(p);
    return MSA_OK;
}
