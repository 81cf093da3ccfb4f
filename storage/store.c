/* store.c — the LMDB store behind store.h.
 *
 * One environment per data directory, seven named databases, keys big-endian
 * and records explicit little-endian with a leading version byte. LMDB error
 * codes are translated here and nowhere else. A process-local rwlock (the
 * "gate") lets msa_store_grow remap the file while no transaction can point
 * into the old mapping.
 */
#define _GNU_SOURCE /* pthread_rwlockattr_setkind_np */

#include "store.h"

#include "crc32c.h"
#include "tensor.h"

#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

/* Format 2: every value of collections, docs, text, metadata and blocks starts
 * with an 8-byte checksum header (see "checksummed values" below). */
#define STORE_FORMAT 2u
#define COLL_REC_VERSION 1u
#define DOC_REC_VERSION 1u
#define DOC_REC_LEN 73u /* version byte + 8 u64/i64 + 2 u32 */
#define COLL_REC_FIXED 46u /* version, id, created_seq, 4 counters, name length */
#define DEFAULT_MAP_SIZE (1ull << 30)
#define DEFAULT_MAP_MAX (1ull << 40)
#define DEFAULT_MAX_READERS 1024u
#define MAX_DBS 16
#define DOC_KEY_LEN 12u   /* coll_id u32 + doc_id u64 */
#define BLOCK_KEY_LEN 15u /* + layer_pos u16 + kind u8 */
#define VERIFY_MAX_PROBLEMS 1000u
#define VAL_HDR 8u     /* u32 crc32c, u8 VAL_VERSION, u8 tag, u16 zero */
#define VAL_VERSION 1u

/* What a checksummed value holds; part of the header, so a value found under
 * a key of another database is caught even when its bytes are intact. */
enum { TAG_COLL = 1, TAG_DOC = 2, TAG_TEXT = 3, TAG_META = 4, TAG_BLOCK = 5 };

static const char KEY_FORMAT[] = "format";
static const char KEY_SEQ[] = "seq";
static const char KEY_NEXT_COLL[] = "next_coll";

struct msa_store {
    MDB_env *st_env;
    MDB_dbi st_meta;          /* "meta": format, seq, next_coll */
    MDB_dbi st_names;         /* "coll_names": name -> coll_id */
    MDB_dbi st_colls;         /* "collections": coll_id -> collection record */
    MDB_dbi st_docs;          /* "docs": (coll_id, doc_id) -> document record */
    MDB_dbi st_text;          /* "text": (coll_id, doc_id) -> bytes */
    MDB_dbi st_metadata;      /* "metadata": (coll_id, doc_id) -> bytes */
    MDB_dbi st_blocks;        /* "blocks": (coll_id, doc_id, layer_pos, kind) -> bytes */
    pthread_rwlock_t st_gate; /* shared by every txn, exclusive while the map is resized */
    /* Detached read txns (msa_store_txn_detach) hold no gate: the exclusive
     * side also waits until none is open, and refuses new ones meanwhile. */
    pthread_mutex_t st_detach_lock;
    pthread_cond_t st_detach_cond; /* st_detached dropped */
    uint32_t st_detached;     /* detached read txns open */
    bool st_closing;          /* the gate is (being) taken exclusively: no new detach */
    int st_lock_fd;           /* flock'd dir/msad.lock; -1 when read_only */
    bool st_read_only;
    uint64_t st_map_size;     /* bytes; changed only under the exclusive gate */
    uint64_t st_map_max;      /* bytes: the hard limit (configured map_max) */
    uint64_t st_map_soft;     /* bytes: growth for ordinary writes stops here; the
                               * rest (map_max - soft) is a reserve that only
                               * msa_store_reserve opens, so deletes can free space */
    _Atomic uint64_t st_last_seq; /* last committed seq, read by any thread */
    atomic_bool st_broken;    /* MDB_PANIC seen: every later txn gets MSA_EBROKEN */
    char *st_dir;
    char *st_data_path;       /* dir/data.mdb */
};

struct msa_store_txn {
    msa_store_t *tx_store;
    MDB_txn *tx_root;
    MDB_txn *tx_child;  /* the open savepoint, or NULL */
    bool tx_write;
    int tx_err;         /* first failure that left the root txn half-written */
    int tx_child_err;   /* the same for the open savepoint */
    uint64_t tx_seq;    /* snapshot seq (read) or last committed seq at begin (write) */
    bool tx_detached;   /* read txn whose gate hold belongs to no thread (msa_store_txn_detach) */
};

/* ==== errors ================================================================= */

/* The one place where LMDB's codes become ours. MDB_PANIC means the environment
 * can no longer be trusted, so it marks the store broken for every later txn. */
static int xlate(msa_store_t *s, int rc)
{
    switch (rc) {
    case MDB_SUCCESS:
        return MSA_OK;
    case MDB_MAP_FULL:
    case MDB_READERS_FULL:
    case MDB_TXN_FULL: /* too many dirty pages in one txn: also a resource limit */
    case ENOSPC:       /* the file system is full: the same to a client ("store full") */
    case EDQUOT:
        return MSA_EFULL;
    case MDB_NOTFOUND:
        return MSA_ENOTFOUND;
    case MDB_KEYEXIST:
        return MSA_EEXIST;
    case MDB_INVALID:
    case MDB_CORRUPTED:
    case MDB_VERSION_MISMATCH:
    case MDB_PAGE_NOTFOUND:
    case MDB_INCOMPATIBLE:
        return MSA_ECORRUPT;
    case MDB_PANIC:
        if (s) atomic_store(&s->st_broken, true);
        return MSA_EBROKEN;
    case ENOMEM:
        return MSA_ENOMEM;
    default:
        return MSA_EIO;
    }
}

/* ==== encoding =============================================================== */

static void put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_le32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static uint64_t get_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static void put_be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void put_be32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (24 - 8 * i));
}

static void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (56 - 8 * i));
}

static uint16_t get_be16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

static uint32_t get_be32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v = v << 8 | p[i];
    return v;
}

static uint64_t get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = v << 8 | p[i];
    return v;
}

static void doc_key(uint8_t k[DOC_KEY_LEN], uint32_t coll_id, uint64_t doc_id)
{
    put_be32(k, coll_id);
    put_be64(k + 4, doc_id);
}

static void block_key(uint8_t k[BLOCK_KEY_LEN], uint32_t coll_id, uint64_t doc_id,
                      uint16_t layer_pos, uint8_t kind)
{
    doc_key(k, coll_id, doc_id);
    put_be16(k + 12, layer_pos);
    k[14] = kind;
}

static MDB_val mval(const void *p, size_t n)
{
    MDB_val v = {n, (void *)p};
    return v;
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
static int val_put(msa_store_t *s, MDB_txn *txn, MDB_dbi dbi, unsigned tag, const MDB_val *k,
                   const void *payload, size_t len)
{
    MDB_val v = {VAL_HDR + len, NULL};
    int rc = mdb_put(txn, dbi, (MDB_val *)k, &v, MDB_RESERVE);
    if (rc) return xlate(s, rc);
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
static const char *val_check(unsigned tag, const MDB_val *k, const MDB_val *v, MDB_val *out)
{
    const uint8_t *p = v->mv_data;
    if (v->mv_size < VAL_HDR) return "value shorter than its header";
    if (p[4] != VAL_VERSION || p[5] != tag || p[6] || p[7]) return "value header damaged";
    size_t len = v->mv_size - VAL_HDR;
    if (get_le32(p) != val_crc(k, p, p + VAL_HDR, len)) return "checksum mismatch";
    if (out) *out = mval(p + VAL_HDR, len);
    return NULL;
}

static int val_open(unsigned tag, const MDB_val *k, const MDB_val *v, MDB_val *out)
{
    return val_check(tag, k, v, out) ? MSA_ECORRUPT : MSA_OK;
}

/* Collection record v1: u8 version, u32 id, u64 created_seq, u64 documents,
 * chunks, tokens, bytes, u8 name_len, name, u32 schema_len, schema encoding.
 * Returns the encoded length; buf holds COLL_REC_FIXED + 64 + 4 + MSA_SCHEMA_ENC_MAX. */
#define COLL_REC_MAX (COLL_REC_FIXED + MSA_MAX_NAME_LEN + 4 + MSA_SCHEMA_ENC_MAX)

static size_t coll_encode(const msa_coll_rec_t *c, uint8_t *buf)
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

static int coll_decode(const MDB_val *k, const MDB_val *sv, msa_coll_rec_t *out)
{
    MDB_val pv;
    if (val_open(TAG_COLL, k, sv, &pv)) return MSA_ECORRUPT;
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
static void doc_encode(const msa_doc_rec_t *d, uint8_t buf[DOC_REC_LEN])
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

static int doc_decode(const MDB_val *k, const MDB_val *sv, msa_doc_rec_t *out)
{
    MDB_val pv;
    if (val_open(TAG_DOC, k, sv, &pv)) return MSA_ECORRUPT;
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

/* ==== the gate =============================================================== */

/* A thread that already holds the gate shared must not ask for it again: with
 * a writer-preferring rwlock, the second request would wait behind a pending
 * grow that itself waits for the first hold, a deadlock. So each thread counts
 * its holds per store and takes the lock only on the first. Writer preference
 * is needed so a steady stream of readers cannot starve msa_store_grow. */
#define GATE_SLOTS 4

static _Thread_local struct {
    const msa_store_t *store;
    unsigned depth;
} gate_held[GATE_SLOTS];

static bool gate_held_by_me(const msa_store_t *s)
{
    for (int i = 0; i < GATE_SLOTS; i++)
        if (gate_held[i].store == s && gate_held[i].depth > 0) return true;
    return false;
}

static void gate_enter(msa_store_t *s)
{
    for (int i = 0; i < GATE_SLOTS; i++) {
        if (gate_held[i].store == s && gate_held[i].depth > 0) {
            gate_held[i].depth++;
            return;
        }
    }
    msa_assert(pthread_rwlock_rdlock(&s->st_gate) == 0);
    /* With every slot in use (txns on more than GATE_SLOTS stores at once) the
     * hold goes uncounted; it still balances because gate_leave then finds no
     * slot and unlocks. */
    for (int i = 0; i < GATE_SLOTS; i++) {
        if (gate_held[i].depth == 0) {
            gate_held[i].store = s;
            gate_held[i].depth = 1;
            return;
        }
    }
}

static void gate_leave(msa_store_t *s)
{
    for (int i = 0; i < GATE_SLOTS; i++) {
        if (gate_held[i].store == s && gate_held[i].depth > 0) {
            if (--gate_held[i].depth == 0) {
                gate_held[i].store = NULL;
                pthread_rwlock_unlock(&s->st_gate);
            }
            return;
        }
    }
    pthread_rwlock_unlock(&s->st_gate);
}

/* ==== small LMDB helpers ===================================================== */

/* Every operation goes to the savepoint while one is open: LMDB refuses the
 * parent of an open nested txn. */
static MDB_txn *cur(const msa_store_txn_t *t)
{
    return t->tx_child ? t->tx_child : t->tx_root;
}

/* Records a failure that may have left the current level half-written, so a
 * later commit (or savepoint keep) refuses it instead of persisting half an op. */
static int poison(msa_store_txn_t *t, int rc)
{
    if (rc == MSA_OK) return rc;
    if (t->tx_child) {
        if (!t->tx_child_err) t->tx_child_err = rc;
    } else if (!t->tx_err) {
        t->tx_err = rc;
    }
    return rc;
}

static int level_err(const msa_store_txn_t *t)
{
    return t->tx_child ? t->tx_child_err : t->tx_err;
}

static int meta_get_u64(msa_store_t *s, MDB_txn *txn, const char *key, size_t width,
                        uint64_t *out)
{
    MDB_val k = mval(key, strlen(key)), v;
    int rc = mdb_get(txn, s->st_meta, &k, &v);
    if (rc == MDB_NOTFOUND) return MSA_ECORRUPT; /* every store has all meta keys */
    if (rc) return xlate(s, rc);
    if (v.mv_size != width) return MSA_ECORRUPT;
    *out = width == 4 ? get_le32(v.mv_data) : get_le64(v.mv_data);
    return MSA_OK;
}

static int meta_put_u64(msa_store_t *s, MDB_txn *txn, const char *key, size_t width, uint64_t val)
{
    uint8_t buf[8];
    if (width == 4)
        put_le32(buf, (uint32_t)val);
    else
        put_le64(buf, val);
    MDB_val k = mval(key, strlen(key)), v = mval(buf, width);
    return xlate(s, mdb_put(txn, s->st_meta, &k, &v, 0));
}

/* Deletes every key of dbi that starts with prefix. After mdb_cursor_del the
 * cursor already rests on the next key, so the walk reads on from there; a
 * fresh seek confirms that the range is empty before it stops, which keeps the
 * result right even where LMDB's cursor state after a delete at a page edge
 * is not what this loop expects. */
static int del_prefix(msa_store_t *s, MDB_txn *txn, MDB_dbi dbi, const uint8_t *prefix,
                      size_t plen)
{
    MDB_cursor *c = NULL;
    int rc = mdb_cursor_open(txn, dbi, &c);
    if (rc) return xlate(s, rc);
    MDB_val k, v;
    bool seek = true;
    for (;;) {
        if (seek) {
            k = mval(prefix, plen);
            rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
        } else {
            rc = mdb_cursor_get(c, &k, &v, MDB_GET_CURRENT);
            if (rc == MDB_NOTFOUND || rc == EINVAL) {
                seek = true;
                continue;
            }
        }
        if (rc == MDB_NOTFOUND) {
            rc = MDB_SUCCESS;
            break;
        }
        if (rc) break;
        if (k.mv_size < plen || memcmp(k.mv_data, prefix, plen) != 0) {
            if (seek) break;
            seek = true;
            continue;
        }
        rc = mdb_cursor_del(c, 0);
        if (rc) break;
        seek = false;
    }
    mdb_cursor_close(c);
    return xlate(s, rc);
}

static int coll_get_id_txn(msa_store_t *s, MDB_txn *txn, uint32_t id, msa_coll_rec_t *out)
{
    uint8_t key[4];
    put_be32(key, id);
    MDB_val k = mval(key, 4), v;
    int rc = mdb_get(txn, s->st_colls, &k, &v);
    if (rc) return xlate(s, rc);
    rc = coll_decode(&k, &v, out);
    if (rc == MSA_OK && out->id != id) rc = MSA_ECORRUPT;
    return rc;
}

static int coll_put_txn(msa_store_t *s, MDB_txn *txn, const msa_coll_rec_t *c)
{
    uint8_t key[4], buf[COLL_REC_MAX];
    put_be32(key, c->id);
    MDB_val k = mval(key, 4);
    return val_put(s, txn, s->st_colls, TAG_COLL, &k, buf, coll_encode(c, buf));
}

static int doc_get_txn(msa_store_t *s, MDB_txn *txn, uint32_t coll_id, uint64_t doc_id,
                       msa_doc_rec_t *out)
{
    uint8_t key[DOC_KEY_LEN];
    doc_key(key, coll_id, doc_id);
    MDB_val k = mval(key, DOC_KEY_LEN), v;
    int rc = mdb_get(txn, s->st_docs, &k, &v);
    if (rc) return xlate(s, rc);
    return doc_decode(&k, &v, out);
}

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

/* ==== environment ============================================================ */

static char *path_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* mkdir -p with mode 0700 for the directories it creates. */
static int mkdir_p(const char *dir)
{
    char *tmp = strdup(dir);
    if (!tmp) return ENOMEM;
    int err = 0;
    for (char *p = tmp + 1; ; p++) {
        if (*p == '/' || *p == '\0') {
            char c = *p;
            *p = '\0';
            if (mkdir(tmp, 0700) != 0 && errno != EEXIST) {
                err = errno;
                break;
            }
            *p = c;
            if (c == '\0') break;
        }
    }
    free(tmp);
    if (err) return err;
    struct stat sb;
    if (stat(dir, &sb) != 0) return errno;
    return S_ISDIR(sb.st_mode) ? 0 : ENOTDIR;
}

static int open_dbi(msa_store_t *s, MDB_txn *txn, const char *name, unsigned flags, MDB_dbi *out,
                    msa_status_t *st)
{
    int rc = mdb_dbi_open(txn, name, flags, out);
    if (rc == MDB_NOTFOUND || rc == MDB_INCOMPATIBLE)
        return msa_status_set(st, MSA_ECORRUPT, "%s: not an msad store (database '%s' missing)",
                              s->st_data_path, name);
    if (rc)
        return msa_status_set(st, xlate(s, rc), "%s: cannot open database '%s': %s",
                              s->st_data_path, name, mdb_strerror(rc));
    return MSA_OK;
}

/* Opens the named databases, creating them and the meta keys in a new store,
 * and checks the format of an existing one. */
static int setup_dbs(msa_store_t *s, msa_status_t *st)
{
    MDB_txn *txn = NULL;
    int rc = mdb_txn_begin(s->st_env, NULL, s->st_read_only ? MDB_RDONLY : 0, &txn);
    if (rc) {
        rc = msa_status_set(st, xlate(s, rc), "%s: cannot begin txn: %s", s->st_data_path,
                            mdb_strerror(rc));
        goto fail;
    }
    bool fresh = false;
    rc = mdb_dbi_open(txn, "meta", 0, &s->st_meta);
    if (rc == MDB_NOTFOUND && !s->st_read_only) {
        /* A new environment has an empty main database. Anything else is some
         * other program's LMDB file, which must not be turned into a store. */
        MDB_dbi main_db;
        MDB_stat ms;
        rc = mdb_dbi_open(txn, NULL, 0, &main_db);
        if (rc == 0) rc = mdb_stat(txn, main_db, &ms);
        if (rc) {
            rc = msa_status_set(st, xlate(s, rc), "%s: %s", s->st_data_path, mdb_strerror(rc));
            goto fail;
        }
        if (ms.ms_entries != 0) {
            rc = msa_status_set(st, MSA_ECORRUPT, "%s: an LMDB file but not an msad store",
                                s->st_data_path);
            goto fail;
        }
        fresh = true;
        rc = mdb_dbi_open(txn, "meta", MDB_CREATE, &s->st_meta);
    }
    if (rc == MDB_NOTFOUND || rc == MDB_INCOMPATIBLE) {
        rc = msa_status_set(st, MSA_ECORRUPT, "%s: not an msad store (no meta database)",
                            s->st_data_path);
        goto fail;
    }
    if (rc) {
        rc = msa_status_set(st, xlate(s, rc), "%s: cannot open database 'meta': %s",
                            s->st_data_path, mdb_strerror(rc));
        goto fail;
    }

    unsigned flags = fresh ? MDB_CREATE : 0;
    if ((rc = open_dbi(s, txn, "coll_names", flags, &s->st_names, st)) ||
        (rc = open_dbi(s, txn, "collections", flags, &s->st_colls, st)) ||
        (rc = open_dbi(s, txn, "docs", flags, &s->st_docs, st)) ||
        (rc = open_dbi(s, txn, "text", flags, &s->st_text, st)) ||
        (rc = open_dbi(s, txn, "metadata", flags, &s->st_metadata, st)) ||
        (rc = open_dbi(s, txn, "blocks", flags, &s->st_blocks, st)))
        goto fail;

    if (fresh) {
        if ((rc = meta_put_u64(s, txn, KEY_FORMAT, 4, STORE_FORMAT)) ||
            (rc = meta_put_u64(s, txn, KEY_SEQ, 8, 0)) ||
            (rc = meta_put_u64(s, txn, KEY_NEXT_COLL, 4, 1))) {
            rc = msa_status_set(st, rc, "%s: cannot initialise the store: %s", s->st_data_path,
                                msa_strerror(rc));
            goto fail;
        }
    }
    uint64_t format = 0, seq = 0, next = 0;
    if ((rc = meta_get_u64(s, txn, KEY_FORMAT, 4, &format))) {
        rc = msa_status_set(st, rc, "%s: store format unreadable: %s", s->st_data_path,
                            msa_strerror(rc));
        goto fail;
    }
    if (format != STORE_FORMAT) {
        rc = msa_status_set(st, MSA_ECORRUPT, "%s: unsupported store format %llu",
                            s->st_data_path, (unsigned long long)format);
        goto fail;
    }
    if ((rc = meta_get_u64(s, txn, KEY_SEQ, 8, &seq)) ||
        (rc = meta_get_u64(s, txn, KEY_NEXT_COLL, 4, &next))) {
        rc = msa_status_set(st, rc, "%s: meta database damaged: %s", s->st_data_path,
                            msa_strerror(rc));
        goto fail;
    }
    atomic_store(&s->st_last_seq, seq);
    /* Commit keeps the dbi handles for later txns, also for a read-only txn. */
    rc = mdb_txn_commit(txn);
    txn = NULL;
    if (rc) {
        rc = msa_status_set(st, xlate(s, rc), "%s: cannot commit setup: %s", s->st_data_path,
                            mdb_strerror(rc));
        goto fail;
    }
    return MSA_OK;

fail:
    mdb_txn_abort(txn);
    return rc;
}

int msa_store_open(const char *dir, const msa_store_opts_t *opts, msa_store_t **out,
                   msa_status_t *st)
{
    msa_store_opts_t o = {0};
    if (opts) o = *opts;
    /* A limit below the default initial size caps the initial size (rather
     * than the limit being raised to the initial size below). */
    if (!o.map_size) o.map_size = (o.map_max && o.map_max < DEFAULT_MAP_SIZE) ? o.map_max : DEFAULT_MAP_SIZE;
    if (!o.map_max) o.map_max = DEFAULT_MAP_MAX;
    if (!o.max_readers) o.max_readers = DEFAULT_MAX_READERS;
    /* Page-size multiples keep LMDB's page arithmetic exact. */
    o.map_size = (o.map_size + 4095) & ~4095ull;
    o.map_max = (o.map_max + 4095) & ~4095ull;
    if (o.map_max < o.map_size) o.map_max = o.map_size;
    /* Reserve kept below the hard limit: map_max/16, at least 1 MiB (at most a
     * quarter of a small map), at most 64 MiB; page multiple. */
    uint64_t reserve = o.map_max / 16;
    if (reserve < (1ull << 20)) reserve = o.map_max / 4 < (1ull << 20) ? o.map_max / 4 : (1ull << 20);
    if (reserve > (64ull << 20)) reserve = 64ull << 20;
    reserve &= ~4095ull;
    uint64_t soft = o.map_max - reserve;
    if (o.map_size > soft) o.map_size = soft;

    *out = NULL;
    msa_status_clear(st);
    int rc;
    msa_store_t *s = calloc(1, sizeof *s);
    if (!s) return msa_status_set(st, MSA_ENOMEM, "out of memory opening %s", dir);
    s->st_lock_fd = -1;
    s->st_read_only = o.read_only;
    s->st_map_max = o.map_max;
    s->st_map_soft = soft;
    bool gate_init = false;

    s->st_dir = strdup(dir);
    s->st_data_path = path_join(dir, "data.mdb");
    if (!s->st_dir || !s->st_data_path) {
        rc = msa_status_set(st, MSA_ENOMEM, "out of memory opening %s", dir);
        goto fail;
    }

    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    rc = pthread_rwlock_init(&s->st_gate, &ra);
    pthread_rwlockattr_destroy(&ra);
    if (rc) {
        rc = msa_status_set(st, MSA_ENOMEM, "cannot create the store lock: %s", strerror(rc));
        goto fail;
    }
    pthread_mutex_init(&s->st_detach_lock, NULL);
    pthread_cond_init(&s->st_detach_cond, NULL);
    gate_init = true;

    if (!o.read_only) {
        int err = mkdir_p(dir);
        if (err) {
            rc = msa_status_set(st, MSA_EIO, "cannot create data dir %s: %s", dir, strerror(err));
            goto fail;
        }
        char *lock_path = path_join(dir, "msad.lock");
        if (!lock_path) {
            rc = msa_status_set(st, MSA_ENOMEM, "out of memory opening %s", dir);
            goto fail;
        }
        s->st_lock_fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        err = errno;
        free(lock_path);
        if (s->st_lock_fd < 0) {
            rc = msa_status_set(st, MSA_EIO, "cannot open %s/msad.lock: %s", dir, strerror(err));
            goto fail;
        }
        if (flock(s->st_lock_fd, LOCK_EX | LOCK_NB) != 0) {
            err = errno;
            if (err == EWOULDBLOCK)
                rc = msa_status_set(st, MSA_EIO, "data dir %s is in use by another msad", dir);
            else
                rc = msa_status_set(st, MSA_EIO, "cannot lock %s/msad.lock: %s", dir,
                                    strerror(err));
            goto fail;
        }
    } else {
        struct stat sb;
        if (stat(s->st_data_path, &sb) != 0) {
            rc = msa_status_set(st, MSA_EIO, "%s: %s", s->st_data_path, strerror(errno));
            goto fail;
        }
    }

    /* The map size is set after opening: LMDB then starts from the size the
     * file last had (it records grown sizes), and we raise it to map_size. */
    if ((rc = mdb_env_create(&s->st_env)) || (rc = mdb_env_set_maxdbs(s->st_env, MAX_DBS)) ||
        (rc = mdb_env_set_maxreaders(s->st_env, o.max_readers))) {
        rc = msa_status_set(st, xlate(s, rc), "%s: cannot set up LMDB: %s", dir, mdb_strerror(rc));
        goto fail;
    }
    /* LMDB would turn an empty data.mdb into a new, empty store: a store file
     * truncated to nothing must be refused, not silently served empty. (msad
     * never leaves one: LMDB writes the meta pages when it creates the file.) */
    {
        struct stat dsb;
        if (stat(s->st_data_path, &dsb) == 0 && S_ISREG(dsb.st_mode) && dsb.st_size == 0) {
            rc = msa_status_set(st, MSA_ECORRUPT,
                                "%s: empty file (0 bytes): truncated? Restore it from a backup, or "
                                "remove it to start an empty store", s->st_data_path);
            goto fail;
        }
    }
    unsigned flags = MDB_NOTLS | (o.nosync ? MDB_NOSYNC : 0) | (o.read_only ? MDB_RDONLY : 0);
    rc = mdb_env_open(s->st_env, dir, flags, 0600);
    if (rc) {
        int code = xlate(s, rc);
        if (code == MSA_ECORRUPT)
            rc = msa_status_set(st, code, "%s: not an LMDB store or damaged: %s", s->st_data_path,
                                mdb_strerror(rc));
        else
            rc = msa_status_set(st, code, "%s: cannot open: %s", s->st_data_path,
                                mdb_strerror(rc));
        goto fail;
    }

    /* A data file shorter than the pages its meta page claims would make LMDB
     * read past the end of the mapping (SIGBUS). Refuse it here instead. */
    MDB_envinfo info;
    MDB_stat ms;
    struct stat sb;
    if ((rc = mdb_env_info(s->st_env, &info)) || (rc = mdb_env_stat(s->st_env, &ms))) {
        rc = msa_status_set(st, xlate(s, rc), "%s: %s", s->st_data_path, mdb_strerror(rc));
        goto fail;
    }
    if (stat(s->st_data_path, &sb) != 0) {
        rc = msa_status_set(st, MSA_EIO, "%s: %s", s->st_data_path, strerror(errno));
        goto fail;
    }
    uint64_t need = ((uint64_t)info.me_last_pgno + 1) * ms.ms_psize;
    if ((uint64_t)sb.st_size < need) {
        rc = msa_status_set(st, MSA_ECORRUPT, "%s: truncated: %llu bytes, its pages need %llu",
                            s->st_data_path, (unsigned long long)sb.st_size,
                            (unsigned long long)need);
        goto fail;
    }
    if (!o.read_only && info.me_mapsize < o.map_size) {
        if ((rc = mdb_env_set_mapsize(s->st_env, (size_t)o.map_size)) ||
            (rc = mdb_env_info(s->st_env, &info))) {
            rc = msa_status_set(st, xlate(s, rc), "%s: cannot set the map size: %s",
                                s->st_data_path, mdb_strerror(rc));
            goto fail;
        }
    }
    s->st_map_size = info.me_mapsize;
    /* A map left larger than the soft limit (by msa_store_reserve, or an
     * earlier, larger limit) goes back to it where the used pages allow
     * (LMDB never shrinks below them), so ordinary writes keep off the reserve. */
    if (!o.read_only && s->st_map_size > s->st_map_soft &&
        mdb_env_set_mapsize(s->st_env, (size_t)s->st_map_soft) == 0 &&
        mdb_env_info(s->st_env, &info) == 0)
        s->st_map_size = info.me_mapsize;
    if (s->st_map_max < s->st_map_size) s->st_map_max = s->st_map_size;
    if (s->st_map_soft < s->st_map_size) s->st_map_soft = s->st_map_size;

    if ((rc = setup_dbs(s, st))) goto fail;
    *out = s;
    return MSA_OK;

fail:
    if (s->st_env) mdb_env_close(s->st_env);
    if (s->st_lock_fd >= 0) close(s->st_lock_fd);
    if (gate_init) {
        pthread_rwlock_destroy(&s->st_gate);
        pthread_mutex_destroy(&s->st_detach_lock);
        pthread_cond_destroy(&s->st_detach_cond);
    }
    free(s->st_dir);
    free(s->st_data_path);
    free(s);
    return rc;
}

void msa_store_close(msa_store_t *s)
{
    if (!s) return;
    mdb_env_close(s->st_env);
    /* The flock goes last, once nothing of this process touches the files. */
    if (s->st_lock_fd >= 0) close(s->st_lock_fd);
    pthread_rwlock_destroy(&s->st_gate);
    pthread_mutex_destroy(&s->st_detach_lock);
    pthread_cond_destroy(&s->st_detach_cond);
    free(s->st_dir);
    free(s->st_data_path);
    free(s);
}

uint64_t msa_store_file_bytes(const msa_store_t *s)
{
    struct stat sb;
    if (stat(s->st_data_path, &sb) != 0) return 0;
    return (uint64_t)sb.st_size;
}

uint64_t msa_store_last_seq(const msa_store_t *s)
{
    return atomic_load(&((msa_store_t *)s)->st_last_seq);
}

/* ==== transactions =========================================================== */

/* Takes the gate exclusively: every txn has ended, detached ones included,
 * and none begins until gate_open_all. */
static void gate_close_all(msa_store_t *s)
{
    pthread_mutex_lock(&s->st_detach_lock);
    s->st_closing = true;
    pthread_mutex_unlock(&s->st_detach_lock);
    msa_assert(pthread_rwlock_wrlock(&s->st_gate) == 0);
    pthread_mutex_lock(&s->st_detach_lock);
    while (s->st_detached > 0) pthread_cond_wait(&s->st_detach_cond, &s->st_detach_lock);
    pthread_mutex_unlock(&s->st_detach_lock);
}

static void gate_open_all(msa_store_t *s)
{
    pthread_mutex_lock(&s->st_detach_lock);
    s->st_closing = false;
    pthread_mutex_unlock(&s->st_detach_lock);
    pthread_rwlock_unlock(&s->st_gate);
}

/* Another process grew the map (only possible for a read-only store beside a
 * live msad): adopt the new size under the exclusive gate. */
static int adopt_map_size(msa_store_t *s)
{
    if (gate_held_by_me(s)) return MSA_EIO; /* cannot remap under our own txn */
    gate_close_all(s);
    int rc = mdb_env_set_mapsize(s->st_env, 0);
    if (rc == 0) {
        MDB_envinfo info;
        if (mdb_env_info(s->st_env, &info) == 0) s->st_map_size = info.me_mapsize;
    }
    gate_open_all(s);
    return xlate(s, rc);
}

/* Starts a top-level txn: the writer's (write) or a read snapshot, under the
 * shared gate, and reads its seq. A read begin that finds the map grown by
 * another process (MDB_MAP_RESIZED) adopts the new size and tries once more. */
static int txn_begin(msa_store_t *s, bool write, msa_store_txn_t **out)
{
    *out = NULL;
    if (write && s->st_read_only) return MSA_EINVAL;
    if (atomic_load(&s->st_broken)) return MSA_EBROKEN;
    msa_store_txn_t *t = calloc(1, sizeof *t);
    if (!t) return MSA_ENOMEM;
    t->tx_store = s;
    t->tx_write = write;
    int rc;
    for (int attempt = 0;; attempt++) {
        gate_enter(s);
        rc = mdb_txn_begin(s->st_env, NULL, write ? 0 : MDB_RDONLY, &t->tx_root);
        if (write || rc != MDB_MAP_RESIZED || attempt > 0) break;
        gate_leave(s);
        if ((rc = adopt_map_size(s))) {
            free(t);
            return rc;
        }
    }
    if (rc) {
        rc = xlate(s, rc);
        goto fail;
    }
    if ((rc = meta_get_u64(s, t->tx_root, KEY_SEQ, 8, &t->tx_seq))) goto fail;
    *out = t;
    return MSA_OK;

fail:
    if (t->tx_root) mdb_txn_abort(t->tx_root);
    gate_leave(s);
    free(t);
    return rc;
}

int msa_store_read_begin(msa_store_t *s, msa_store_txn_t **out)
{
    return txn_begin(s, false, out);
}

int msa_store_write_begin(msa_store_t *s, msa_store_txn_t **out)
{
    return txn_begin(s, true, out);
}

uint64_t msa_store_txn_seq(const msa_store_txn_t *t)
{
    return t->tx_seq;
}

static void txn_free(msa_store_txn_t *t)
{
    msa_store_t *s = t->tx_store;
    if (t->tx_detached) {
        pthread_mutex_lock(&s->st_detach_lock);
        s->st_detached--;
        pthread_cond_broadcast(&s->st_detach_cond);
        pthread_mutex_unlock(&s->st_detach_lock);
    } else {
        gate_leave(s);
    }
    free(t);
}

/* A detached txn gives its gate hold back (on the thread that took it: a
 * rwlock is released by its owner) and is counted in st_detached instead,
 * which the exclusive side waits on as well. It is counted before the hold
 * goes, so a remap can never slip in between. */
int msa_store_txn_detach(msa_store_txn_t *t)
{
    msa_assert(!t->tx_write);
    if (t->tx_detached) return MSA_OK;
    msa_store_t *s = t->tx_store;
    pthread_mutex_lock(&s->st_detach_lock);
    bool closing = s->st_closing;
    if (!closing) s->st_detached++;
    pthread_mutex_unlock(&s->st_detach_lock);
    if (closing) return MSA_EUNAVAIL;
    t->tx_detached = true;
    gate_leave(s);
    return MSA_OK;
}

/* Less than 64 MiB left for unprivileged writers on the data file's file system. */
static bool disk_nearly_full(const msa_store_t *s)
{
    struct statvfs sv;
    if (statvfs(s->st_dir, &sv) != 0) return false;
    return (uint64_t)sv.f_bavail * sv.f_frsize < (64ull << 20);
}

int msa_store_commit(msa_store_txn_t *t, uint64_t seq)
{
    msa_assert(t->tx_write);
    msa_assert(t->tx_child == NULL); /* a savepoint must be ended before commit */
    msa_store_t *s = t->tx_store;
    int rc = t->tx_err;
    if (rc) {
        mdb_txn_abort(t->tx_root);
        goto out;
    }
    if ((rc = meta_put_u64(s, t->tx_root, KEY_SEQ, 8, seq))) {
        mdb_txn_abort(t->tx_root);
        goto out;
    }
    /* mdb_txn_commit frees the txn on success and on failure alike. LMDB
     * reports a short write (a full file system) as EIO: when the file system
     * has (almost) no space left, that is "store full", not an I/O error. */
    int mrc = mdb_txn_commit(t->tx_root);
    rc = xlate(s, mrc);
    if (rc == MSA_EIO && disk_nearly_full(s)) rc = MSA_EFULL;
    if (rc == MSA_OK) atomic_store(&s->st_last_seq, seq);
out:
    txn_free(t);
    return rc;
}

void msa_store_abort(msa_store_txn_t *t)
{
    if (!t) return;
    if (t->tx_child) mdb_txn_abort(t->tx_child);
    mdb_txn_abort(t->tx_root);
    txn_free(t);
}

int msa_store_savepoint_begin(msa_store_txn_t *t)
{
    msa_assert(t->tx_write);
    msa_assert(t->tx_child == NULL); /* one level of nesting is all the engine needs */
    if (t->tx_err) return t->tx_err;
    int rc = mdb_txn_begin(t->tx_store->st_env, t->tx_root, 0, &t->tx_child);
    if (rc) {
        t->tx_child = NULL;
        return xlate(t->tx_store, rc);
    }
    t->tx_child_err = MSA_OK;
    return MSA_OK;
}

int msa_store_savepoint_end(msa_store_txn_t *t, bool keep)
{
    msa_assert(t->tx_write);
    msa_assert(t->tx_child != NULL);
    MDB_txn *child = t->tx_child;
    int err = t->tx_child_err;
    t->tx_child = NULL;
    t->tx_child_err = MSA_OK;
    if (!keep || err) {
        /* A failed savepoint is undone, never merged: the enclosing txn stays
         * as it was before savepoint_begin and remains usable. */
        mdb_txn_abort(child);
        return keep ? err : MSA_OK;
    }
    int rc = xlate(t->tx_store, mdb_txn_commit(child));
    /* A failed merge may leave the parent partly updated: refuse its commit. */
    return poison(t, rc);
}

int msa_store_grow(msa_store_t *s)
{
    if (s->st_read_only) return MSA_EINVAL;
    /* Growing under one's own txn would wait for itself forever. */
    msa_assert(!gate_held_by_me(s));
    /* Waits for every open read snapshot to end: readers that hold snapshots
     * delay growth, and new ones queue behind it (writer-preferring lock).
     * Detached (held) snapshots too: the engine revokes them first. */
    gate_close_all(s);
    int rc = MSA_OK;
    if (s->st_map_size >= s->st_map_soft) {
        rc = MSA_EFULL;
        goto out;
    }
    uint64_t next = s->st_map_size * 2;
    if (next > s->st_map_soft || next < s->st_map_size) next = s->st_map_soft;
    rc = mdb_env_set_mapsize(s->st_env, (size_t)next);
    if (rc) {
        rc = xlate(s, rc);
        goto out;
    }
    MDB_envinfo info;
    s->st_map_size = mdb_env_info(s->st_env, &info) == 0 ? info.me_mapsize : next;
out:
    gate_open_all(s);
    return rc;
}

int msa_store_reserve(msa_store_t *s, bool on)
{
    if (s->st_read_only) return MSA_EINVAL;
    msa_assert(!gate_held_by_me(s));
    gate_close_all(s);
    int rc = MSA_OK;
    uint64_t want = on ? s->st_map_max : s->st_map_soft;
    if (on && s->st_map_size >= want) {
        rc = MSA_EFULL; /* nothing left to open */
        goto out;
    }
    /* Closing: LMDB rounds a size below the used pages up to them. */
    rc = mdb_env_set_mapsize(s->st_env, (size_t)want);
    if (rc) {
        rc = xlate(s, rc);
        goto out;
    }
    MDB_envinfo info;
    s->st_map_size = mdb_env_info(s->st_env, &info) == 0 ? info.me_mapsize : want;
out:
    gate_open_all(s);
    return rc;
}

/* ==== collections ============================================================ */

static int name_lookup(msa_store_t *s, MDB_txn *txn, const char *name, uint32_t *id)
{
    size_t n = strlen(name);
    if (n == 0 || n > MSA_MAX_NAME_LEN) return MSA_ENOTFOUND;
    MDB_val k = mval(name, n), v;
    int rc = mdb_get(txn, s->st_names, &k, &v);
    if (rc) return xlate(s, rc);
    if (v.mv_size != 4) return MSA_ECORRUPT;
    *id = get_le32(v.mv_data);
    return MSA_OK;
}

int msa_store_coll_create(msa_store_txn_t *w, const char *name, const msa_schema_t *schema,
                          uint64_t seq, msa_coll_rec_t *out)
{
    msa_assert(w->tx_write);
    msa_store_t *s = w->tx_store;
    MDB_txn *txn = cur(w);
    int rc = level_err(w);
    if (rc) return rc;
    size_t nlen = strlen(name);
    if (nlen == 0 || nlen > MSA_MAX_NAME_LEN) return MSA_EINVAL;
    uint32_t id = 0;
    rc = name_lookup(s, txn, name, &id);
    if (rc == MSA_OK) return MSA_EEXIST;
    if (rc != MSA_ENOTFOUND) return rc;
    uint64_t next = 0;
    if ((rc = meta_get_u64(s, txn, KEY_NEXT_COLL, 4, &next))) return rc;
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
    if ((rc = xlate(s, mdb_put(txn, s->st_names, &k, &v, MDB_NOOVERWRITE))) ||
        (rc = coll_put_txn(s, txn, &c)) ||
        (rc = meta_put_u64(s, txn, KEY_NEXT_COLL, 4, next + 1)))
        goto fail;
    if (out) *out = c;
    return MSA_OK;

fail:
    return poison(w, rc);
}

int msa_store_coll_drop(msa_store_txn_t *w, const char *name, msa_coll_rec_t *out)
{
    msa_assert(w->tx_write);
    msa_store_t *s = w->tx_store;
    MDB_txn *txn = cur(w);
    int rc = level_err(w);
    if (rc) return rc;
    uint32_t id = 0;
    msa_coll_rec_t c;
    if ((rc = name_lookup(s, txn, name, &id))) return rc;
    if ((rc = coll_get_id_txn(s, txn, id, &c))) return rc;

    uint8_t prefix[4], idkey[4];
    put_be32(prefix, id);
    memcpy(idkey, prefix, 4);
    MDB_val nk = mval(name, strlen(name)), ik = mval(idkey, 4);
    if ((rc = del_prefix(s, txn, s->st_blocks, prefix, 4)) ||
        (rc = del_prefix(s, txn, s->st_text, prefix, 4)) ||
        (rc = del_prefix(s, txn, s->st_metadata, prefix, 4)) ||
        (rc = del_prefix(s, txn, s->st_docs, prefix, 4)) ||
        (rc = xlate(s, mdb_del(txn, s->st_names, &nk, NULL))) ||
        (rc = xlate(s, mdb_del(txn, s->st_colls, &ik, NULL))))
        goto fail;
    if (out) *out = c;
    return MSA_OK;

fail:
    return poison(w, rc);
}

int msa_store_coll_get(msa_store_txn_t *t, const char *name, msa_coll_rec_t *out)
{
    uint32_t id = 0;
    int rc = name_lookup(t->tx_store, cur(t), name, &id);
    if (rc) return rc;
    return coll_get_id_txn(t->tx_store, cur(t), id, out);
}

int msa_store_coll_get_by_id(msa_store_txn_t *t, uint32_t id, msa_coll_rec_t *out)
{
    return coll_get_id_txn(t->tx_store, cur(t), id, out);
}

int msa_store_coll_foreach(msa_store_txn_t *t,
                           int (*fn)(void *arg, const msa_coll_rec_t *c), void *arg)
{
    msa_store_t *s = t->tx_store;
    MDB_cursor *c = NULL;
    int rc = mdb_cursor_open(cur(t), s->st_colls, &c);
    if (rc) return xlate(s, rc);
    MDB_val k, v;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        msa_coll_rec_t rec;
        int r = coll_decode(&k, &v, &rec);
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
    return rc == MDB_NOTFOUND ? MSA_OK : xlate(s, rc);
}

/* ==== documents ============================================================== */

int msa_store_doc_get(msa_store_txn_t *t, uint32_t coll_id, uint64_t doc_id, msa_doc_rec_t *out)
{
    return doc_get_txn(t->tx_store, cur(t), coll_id, doc_id, out);
}

/* Puts bytes under key, or removes the key when there are none, so empty text
 * and metadata cost nothing. */
static int put_or_del(msa_store_t *s, MDB_txn *txn, MDB_dbi dbi, unsigned tag,
                      const uint8_t *key, const void *data, size_t len)
{
    MDB_val k = mval(key, DOC_KEY_LEN);
    if (len == 0) {
        int rc = mdb_del(txn, dbi, &k, NULL);
        return rc == MDB_NOTFOUND ? MSA_OK : xlate(s, rc);
    }
    return val_put(s, txn, dbi, tag, &k, data, len);
}

int msa_store_doc_put(msa_store_txn_t *w, uint32_t coll_id, const msa_doc_rec_t *rec,
                      const void *text, size_t text_len, const void *meta, size_t meta_len,
                      const msa_store_block_t *blocks, size_t n_blocks)
{
    msa_assert(w->tx_write);
    msa_store_t *s = w->tx_store;
    MDB_txn *txn = cur(w);
    int rc = level_err(w);
    if (rc) return rc;
    msa_coll_rec_t c;
    if ((rc = coll_get_id_txn(s, txn, coll_id, &c))) return rc;
    for (size_t i = 0; i < n_blocks; i++) {
        if (blocks[i].layer_pos >= c.schema.n_layers || blocks[i].kind > MSA_BLOCK_R ||
            (blocks[i].len > 0 && !blocks[i].data))
            return MSA_EINVAL;
    }
    msa_doc_rec_t old;
    rc = doc_get_txn(s, txn, coll_id, rec->id, &old);
    if (rc == MSA_OK)
        coll_account(&c, &old, -1);
    else if (rc != MSA_ENOTFOUND)
        return rc;

    uint8_t key[DOC_KEY_LEN], bkey[BLOCK_KEY_LEN], buf[DOC_REC_LEN];
    doc_key(key, coll_id, rec->id);
    doc_encode(rec, buf);
    MDB_val k = mval(key, DOC_KEY_LEN);
    /* The prefix delete also clears blocks that a damaged store left behind
     * without a record, so a put always leaves exactly the blocks it names. */
    if ((rc = del_prefix(s, txn, s->st_blocks, key, DOC_KEY_LEN)) ||
        (rc = val_put(s, txn, s->st_docs, TAG_DOC, &k, buf, DOC_REC_LEN)) ||
        (rc = put_or_del(s, txn, s->st_text, TAG_TEXT, key, text, text_len)) ||
        (rc = put_or_del(s, txn, s->st_metadata, TAG_META, key, meta, meta_len)))
        goto fail;
    for (size_t i = 0; i < n_blocks; i++) {
        block_key(bkey, coll_id, rec->id, blocks[i].layer_pos, blocks[i].kind);
        MDB_val bk = mval(bkey, BLOCK_KEY_LEN);
        if ((rc = val_put(s, txn, s->st_blocks, TAG_BLOCK, &bk, blocks[i].data, blocks[i].len)))
            goto fail;
    }
    coll_account(&c, rec, +1);
    if ((rc = coll_put_txn(s, txn, &c))) goto fail;
    return MSA_OK;

fail:
    return poison(w, rc);
}

int msa_store_doc_delete(msa_store_txn_t *w, uint32_t coll_id, uint64_t doc_id)
{
    msa_assert(w->tx_write);
    msa_store_t *s = w->tx_store;
    MDB_txn *txn = cur(w);
    int rc = level_err(w);
    if (rc) return rc;
    msa_coll_rec_t c;
    msa_doc_rec_t old;
    if ((rc = coll_get_id_txn(s, txn, coll_id, &c))) return rc;
    if ((rc = doc_get_txn(s, txn, coll_id, doc_id, &old))) return rc;
    coll_account(&c, &old, -1);

    uint8_t key[DOC_KEY_LEN];
    doc_key(key, coll_id, doc_id);
    MDB_val k = mval(key, DOC_KEY_LEN);
    if ((rc = del_prefix(s, txn, s->st_blocks, key, DOC_KEY_LEN)) ||
        (rc = put_or_del(s, txn, s->st_text, TAG_TEXT, key, NULL, 0)) ||
        (rc = put_or_del(s, txn, s->st_metadata, TAG_META, key, NULL, 0)) ||
        (rc = xlate(s, mdb_del(txn, s->st_docs, &k, NULL))) || (rc = coll_put_txn(s, txn, &c)))
        goto fail;
    return MSA_OK;

fail:
    return poison(w, rc);
}

/* Walks the documents of one collection from id `from` upward; fn returns
 * non-zero to stop, and that value is returned. */
static int doc_walk(msa_store_txn_t *t, uint32_t coll_id, uint64_t from,
                    int (*fn)(void *arg, const msa_doc_rec_t *d), void *arg)
{
    msa_store_t *s = t->tx_store;
    MDB_cursor *c = NULL;
    int rc = mdb_cursor_open(cur(t), s->st_docs, &c);
    if (rc) return xlate(s, rc);
    uint8_t key[DOC_KEY_LEN];
    doc_key(key, coll_id, from);
    MDB_val k = mval(key, DOC_KEY_LEN), v;
    int r = MSA_OK;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        if (k.mv_size != DOC_KEY_LEN || get_be32(k.mv_data) != coll_id) break;
        msa_doc_rec_t d;
        if ((r = doc_decode(&k, &v, &d)) || (r = fn(arg, &d))) break;
    }
    mdb_cursor_close(c);
    if (r) return r;
    return rc == 0 || rc == MDB_NOTFOUND ? MSA_OK : xlate(s, rc);
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
    int rc = coll_get_id_txn(t->tx_store, cur(t), coll_id, &c);
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
    int rc = coll_get_id_txn(t->tx_store, cur(t), coll_id, &c);
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
    doc_key(key, coll_id, doc_id);
    MDB_val k = mval(key, DOC_KEY_LEN), v;
    out->data = NULL;
    out->len = 0;
    int rc = mdb_get(cur(t), dbi, &k, &v);
    if (rc == MDB_NOTFOUND) {
        rc = mdb_get(cur(t), s->st_docs, &k, &v);
        return xlate(s, rc);
    }
    if (rc) return xlate(s, rc);
    MDB_val pv;
    if ((rc = val_open(tag, &k, &v, &pv))) return rc;
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
    block_key(key, coll_id, doc_id, layer_pos, (uint8_t)kind);
    MDB_val k = mval(key, BLOCK_KEY_LEN), v;
    int rc = mdb_get(cur(t), s->st_blocks, &k, &v);
    if (rc) return xlate(s, rc);
    MDB_val pv;
    if ((rc = val_open(TAG_BLOCK, &k, &v, &pv))) return rc;
    out->data = pv.mv_data;
    out->len = pv.mv_size;
    return MSA_OK;
}

/* ==== backup ================================================================= */

/* Reads the commit seq of a copy without taking it over as a store: a plain
 * read-only environment without a lock file, which nothing else shares. */
static int read_copy_seq(const char *path, uint64_t *seq, msa_status_t *st)
{
    MDB_env *env = NULL;
    MDB_txn *txn = NULL;
    MDB_dbi dbi;
    int rc;
    if ((rc = mdb_env_create(&env)) || (rc = mdb_env_set_maxdbs(env, MAX_DBS)) ||
        (rc = mdb_env_open(env, path, MDB_RDONLY | MDB_NOLOCK | MDB_NOTLS, 0600)) ||
        (rc = mdb_txn_begin(env, NULL, MDB_RDONLY, &txn)) ||
        (rc = mdb_dbi_open(txn, "meta", 0, &dbi))) {
        rc = msa_status_set(st, xlate(NULL, rc), "backup %s: cannot open the copy: %s", path,
                            mdb_strerror(rc));
        goto out;
    }
    MDB_val k = mval(KEY_SEQ, strlen(KEY_SEQ)), v;
    rc = mdb_get(txn, dbi, &k, &v);
    if (rc || v.mv_size != 8) {
        rc = msa_status_set(st, MSA_ECORRUPT, "backup %s: the copy has no commit seq", path);
        goto out;
    }
    *seq = get_le64(v.mv_data);
    rc = MSA_OK;
out:
    if (txn) mdb_txn_abort(txn);
    if (env) mdb_env_close(env);
    return rc;
}

int msa_store_backup(msa_store_t *s, const char *path, bool compact, uint64_t *seq,
                     uint64_t *bytes, msa_status_t *st)
{
    msa_status_clear(st);
    *seq = 0;
    *bytes = 0;
    if (mkdir(path, 0700) != 0) {
        int err = errno;
        return msa_status_set(st, err == EEXIST ? MSA_EEXIST : MSA_EIO, "backup %s: %s", path,
                              err == EEXIST ? "already exists" : strerror(err));
    }
    char *data = path_join(path, "data.mdb");
    if (!data) {
        rmdir(path);
        return msa_status_set(st, MSA_ENOMEM, "backup %s: out of memory", path);
    }
    /* The copy reads through the live mapping, so it holds the gate like any
     * reader: a concurrent grow must not remap under it. */
    /* The copy holds every document: readable by the daemon's user only
     * (LMDB's own copy would create it 0666 less the umask). */
    int fd = open(data, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        int rc = msa_status_set(st, MSA_EIO, "backup %s: %s", data, strerror(errno));
        free(data);
        rmdir(path);
        return rc;
    }
    gate_enter(s);
    int rc = mdb_env_copyfd2(s->st_env, fd, compact ? MDB_CP_COMPACT : 0);
    gate_leave(s);
    if (rc == 0 && fsync(fd) != 0) rc = errno;
    if (close(fd) != 0 && rc == 0) rc = errno;
    if (rc) {
        rc = msa_status_set(st, xlate(s, rc), "backup %s: copy failed: %s", path,
                            mdb_strerror(rc));
        goto fail;
    }
    if ((rc = read_copy_seq(path, seq, st))) goto fail;
    struct stat sb;
    if (stat(data, &sb) != 0) {
        rc = msa_status_set(st, MSA_EIO, "backup %s: %s", data, strerror(errno));
        goto fail;
    }
    *bytes = (uint64_t)sb.st_size;
    free(data);
    return MSA_OK;

fail:
    /* Leave nothing half-made behind, so the same name can be tried again. */
    unlink(data);
    rmdir(path);
    free(data);
    *seq = 0;
    return rc;
}

/* ==== verify ================================================================= */

typedef struct problems {
    char **v;
    size_t n, cap;
    uint64_t dropped; /* problems past VERIFY_MAX_PROBLEMS, counted only */
    bool oom;
} problems_t;

static void add_problem(problems_t *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A damaged store can have millions of problems; the first VERIFY_MAX_PROBLEMS
 * are kept verbatim and the rest counted into one closing line. */
static void add_problem(problems_t *p, const char *fmt, ...)
{
    if (p->oom) return;
    if (p->n >= VERIFY_MAX_PROBLEMS) {
        p->dropped++;
        return;
    }
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 16;
        char **nv = realloc(p->v, cap * sizeof *nv);
        if (!nv) {
            p->oom = true;
            return;
        }
        p->v = nv;
        p->cap = cap;
    }
    va_list ap;
    va_start(ap, fmt);
    int n = vasprintf(&p->v[p->n], fmt, ap);
    va_end(ap);
    if (n < 0) {
        p->oom = true;
        return;
    }
    p->n++;
}

static char kind_char(unsigned kind)
{
    return kind == MSA_BLOCK_K ? 'K' : kind == MSA_BLOCK_V ? 'V' : kind == MSA_BLOCK_R ? 'R' : '?';
}

typedef unsigned long long ull;

/* Checks the blocks of one document against its record and the schema;
 * returns the sum of their lengths through *sum. */
static int verify_blocks(msa_store_t *s, MDB_txn *txn, const msa_coll_rec_t *c,
                         const msa_doc_rec_t *d, bool check_crc, problems_t *p, uint64_t *sum)
{
    const msa_schema_t *sc = &c->schema;
    uint64_t row = (uint64_t)sc->kv_heads * sc->head_dim;
    uint64_t want[3] = {
        (uint64_t)d->chunks * row * msa_dtype_size(sc->kv_dtype),
        (uint64_t)d->chunks * row * msa_dtype_size(sc->kv_dtype),
        (uint64_t)d->chunks * row * msa_dtype_size(msa_schema_router_store_dtype(sc)),
    };
    unsigned kinds = sc->separate_router_keys ? 3 : 2;
    bool seen[MSA_MAX_LAYERS][3];
    memset(seen, 0, sizeof seen);
    *sum = 0;

    MDB_cursor *cur_ = NULL;
    int rc = mdb_cursor_open(txn, s->st_blocks, &cur_);
    if (rc) return xlate(s, rc);
    uint8_t prefix[DOC_KEY_LEN];
    doc_key(prefix, c->id, d->id);
    MDB_val k = mval(prefix, DOC_KEY_LEN), v;
    for (rc = mdb_cursor_get(cur_, &k, &v, MDB_SET_RANGE); rc == 0;
         rc = mdb_cursor_get(cur_, &k, &v, MDB_NEXT)) {
        if (k.mv_size < DOC_KEY_LEN || memcmp(k.mv_data, prefix, DOC_KEY_LEN) != 0) break;
        size_t len = v.mv_size > VAL_HDR ? v.mv_size - VAL_HDR : 0;
        *sum += len;
        if (k.mv_size != BLOCK_KEY_LEN) {
            add_problem(p, "collection %s: doc %llu: block key of %zu bytes, want %u", c->name,
                        (ull)d->id, k.mv_size, BLOCK_KEY_LEN);
            continue;
        }
        unsigned pos = get_be16((const uint8_t *)k.mv_data + 12);
        unsigned kind = ((const uint8_t *)k.mv_data)[14];
        if (pos >= sc->n_layers || kind >= kinds) {
            add_problem(p, "collection %s: doc %llu: unexpected block layer_pos %u kind %c (%u)",
                        c->name, (ull)d->id, pos, kind_char(kind), kind);
            continue;
        }
        seen[pos][kind] = true;
        const char *why = check_crc ? val_check(TAG_BLOCK, &k, &v, NULL) : NULL;
        if (why)
            add_problem(p, "collection %s: doc %llu: layer %u (pos %u) block %c: %s (damaged)",
                        c->name, (ull)d->id, sc->layers[pos], pos, kind_char(kind), why);
        else if (len != want[kind])
            add_problem(p, "collection %s: doc %llu: layer %u (pos %u) block %c: %zu bytes, want "
                           "%llu",
                        c->name, (ull)d->id, sc->layers[pos], pos, kind_char(kind), len,
                        (ull)want[kind]);
    }
    mdb_cursor_close(cur_);
    if (rc != 0 && rc != MDB_NOTFOUND) return xlate(s, rc);
    for (unsigned pos = 0; pos < sc->n_layers; pos++)
        for (unsigned kind = 0; kind < kinds; kind++)
            if (!seen[pos][kind])
                add_problem(p, "collection %s: doc %llu: layer %u (pos %u) block %c missing",
                            c->name, (ull)d->id, sc->layers[pos], pos, kind_char(kind));
    return MSA_OK;
}

/* The payload length of a document's text or metadata (0 when not stored),
 * checking its checksum when asked. */
static int stored_len(msa_store_t *s, MDB_txn *txn, MDB_dbi dbi, unsigned tag,
                      const msa_coll_rec_t *c, uint64_t doc_id, bool check_crc, problems_t *p,
                      uint64_t *len)
{
    uint8_t key[DOC_KEY_LEN];
    doc_key(key, c->id, doc_id);
    MDB_val k = mval(key, DOC_KEY_LEN), v;
    int rc = mdb_get(txn, dbi, &k, &v);
    *len = rc == 0 && v.mv_size > VAL_HDR ? v.mv_size - VAL_HDR : 0;
    const char *why = rc == 0 && check_crc ? val_check(tag, &k, &v, NULL) : NULL;
    if (why)
        add_problem(p, "collection %s: doc %llu: %s: %s (damaged)", c->name, (ull)doc_id,
                    tag == TAG_TEXT ? "text" : "metadata", why);
    return rc == 0 || rc == MDB_NOTFOUND ? MSA_OK : xlate(s, rc);
}

static int verify_coll(msa_store_t *s, MDB_txn *txn, const msa_coll_rec_t *c, bool check_crc,
                       problems_t *p, uint64_t *docs_checked)
{
    uint64_t documents = 0, chunks = 0, tokens = 0, bytes = 0;
    uint32_t P = c->schema.chunk_tokens ? c->schema.chunk_tokens : 1;
    MDB_cursor *dc = NULL;
    int rc = mdb_cursor_open(txn, s->st_docs, &dc);
    if (rc) return xlate(s, rc);
    uint8_t prefix[4];
    put_be32(prefix, c->id);
    MDB_val k = mval(prefix, 4), v;
    int r = MSA_OK;
    for (rc = mdb_cursor_get(dc, &k, &v, MDB_SET_RANGE); rc == 0;
         rc = mdb_cursor_get(dc, &k, &v, MDB_NEXT)) {
        if (k.mv_size < 4 || memcmp(k.mv_data, prefix, 4) != 0) break;
        if (k.mv_size != DOC_KEY_LEN) {
            add_problem(p, "collection %s: document key of %zu bytes, want %u", c->name,
                        k.mv_size, DOC_KEY_LEN);
            continue;
        }
        uint64_t key_id = get_be64((const uint8_t *)k.mv_data + 4);
        msa_doc_rec_t d;
        if (doc_decode(&k, &v, &d) != MSA_OK) {
            const char *why = val_check(TAG_DOC, &k, &v, NULL);
            add_problem(p, "collection %s: doc %llu: record %s (%zu bytes)", c->name,
                        (ull)key_id, why ? why : "undecodable", v.mv_size);
            continue;
        }
        (*docs_checked)++;
        if (d.id != key_id)
            add_problem(p, "collection %s: doc %llu: record says id %llu", c->name, (ull)key_id,
                        (ull)d.id);
        d.id = key_id;
        uint64_t want_chunks = ((uint64_t)d.tokens + P - 1) / P;
        if (d.chunks != want_chunks)
            add_problem(p, "collection %s: doc %llu: chunks %u, want ceil(tokens %u / %u) = %llu",
                        c->name, (ull)d.id, d.chunks, d.tokens, P, (ull)want_chunks);
        uint64_t sum, tlen, mlen;
        if ((r = verify_blocks(s, txn, c, &d, check_crc, p, &sum)) ||
            (r = stored_len(s, txn, s->st_text, TAG_TEXT, c, d.id, check_crc, p, &tlen)) ||
            (r = stored_len(s, txn, s->st_metadata, TAG_META, c, d.id, check_crc, p, &mlen)))
            break;
        if (sum != d.tensor_bytes)
            add_problem(p, "collection %s: doc %llu: tensor_bytes %llu, its blocks hold %llu",
                        c->name, (ull)d.id, (ull)d.tensor_bytes, (ull)sum);
        if (tlen != d.text_bytes)
            add_problem(p, "collection %s: doc %llu: text_bytes %llu, text holds %llu", c->name,
                        (ull)d.id, (ull)d.text_bytes, (ull)tlen);
        if (mlen != d.metadata_bytes)
            add_problem(p, "collection %s: doc %llu: metadata_bytes %llu, metadata holds %llu",
                        c->name, (ull)d.id, (ull)d.metadata_bytes, (ull)mlen);
        documents++;
        chunks += d.chunks;
        tokens += d.tokens;
        bytes += d.tensor_bytes + d.text_bytes + d.metadata_bytes;
    }
    mdb_cursor_close(dc);
    if (r) return r;
    if (rc != 0 && rc != MDB_NOTFOUND) return xlate(s, rc);

    const struct {
        const char *name;
        uint64_t have, want;
    } ctr[] = {{"documents", c->documents, documents},
               {"chunks", c->chunks, chunks},
               {"tokens", c->tokens, tokens},
               {"bytes", c->bytes, bytes}};
    for (size_t i = 0; i < sizeof ctr / sizeof ctr[0]; i++)
        if (ctr[i].have != ctr[i].want)
            add_problem(p, "collection %s: counter %s is %llu, its documents sum to %llu",
                        c->name, ctr[i].name, (ull)ctr[i].have, (ull)ctr[i].want);
    return MSA_OK;
}

/* Finds keys of dbi (in the collection coll_id, or all when 0) whose document
 * has no record. Consecutive keys of one document share one lookup. */
static int verify_orphans(msa_store_t *s, MDB_txn *txn, MDB_dbi dbi, const char *what,
                          uint32_t coll_id, problems_t *p)
{
    MDB_cursor *c = NULL;
    int rc = mdb_cursor_open(txn, dbi, &c);
    if (rc) return xlate(s, rc);
    uint8_t prefix[4];
    put_be32(prefix, coll_id);
    MDB_val k = mval(prefix, 4), v;
    uint8_t last[DOC_KEY_LEN];
    bool have_last = false, last_exists = false;
    for (rc = coll_id ? mdb_cursor_get(c, &k, &v, MDB_SET_RANGE)
                      : mdb_cursor_get(c, &k, &v, MDB_FIRST);
         rc == 0; rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        if (coll_id && (k.mv_size < 4 || memcmp(k.mv_data, prefix, 4) != 0)) break;
        const uint8_t *kp = k.mv_data;
        if (k.mv_size < DOC_KEY_LEN) {
            add_problem(p, "%s: key of %zu bytes, want at least %u", what, k.mv_size,
                        DOC_KEY_LEN);
            continue;
        }
        if (!have_last || memcmp(kp, last, DOC_KEY_LEN) != 0) {
            memcpy(last, kp, DOC_KEY_LEN);
            have_last = true;
            MDB_val dk = mval(last, DOC_KEY_LEN), dv;
            int g = mdb_get(txn, s->st_docs, &dk, &dv);
            if (g != 0 && g != MDB_NOTFOUND) {
                mdb_cursor_close(c);
                return xlate(s, g);
            }
            last_exists = g == 0;
        }
        if (last_exists) continue;
        uint32_t cid = get_be32(kp);
        uint64_t did = get_be64(kp + 4);
        msa_coll_rec_t cr;
        char cname[MSA_MAX_NAME_LEN + 16];
        if (coll_get_id_txn(s, txn, cid, &cr) == MSA_OK)
            snprintf(cname, sizeof cname, "%s", cr.name);
        else
            snprintf(cname, sizeof cname, "#%u (dropped)", cid);
        if (k.mv_size == BLOCK_KEY_LEN)
            add_problem(p, "collection %s: doc %llu: orphan %s layer_pos %u kind %c without a "
                           "document record",
                        cname, (ull)did, what, get_be16(kp + 12), kind_char(kp[14]));
        else
            add_problem(p, "collection %s: doc %llu: orphan %s without a document record", cname,
                        (ull)did, what);
    }
    mdb_cursor_close(c);
    return rc == 0 || rc == MDB_NOTFOUND ? MSA_OK : xlate(s, rc);
}

/* Whole-store checks: document records of missing collections and the name
 * table against the collection records. */
static int verify_catalog(msa_store_t *s, MDB_txn *txn, problems_t *p)
{
    MDB_cursor *c = NULL;
    int rc = mdb_cursor_open(txn, s->st_docs, &c);
    if (rc) return xlate(s, rc);
    MDB_val k, v;
    uint32_t last = 0;
    bool have_last = false, last_exists = false;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        if (k.mv_size < 4) continue;
        uint32_t cid = get_be32(k.mv_data);
        if (!have_last || cid != last) {
            msa_coll_rec_t cr;
            last = cid;
            have_last = true;
            last_exists = coll_get_id_txn(s, txn, cid, &cr) == MSA_OK;
        }
        if (!last_exists)
            add_problem(p, "collection #%u: doc %llu: orphan document record (no collection)",
                        cid, k.mv_size == DOC_KEY_LEN ? (ull)get_be64((uint8_t *)k.mv_data + 4)
                                                      : 0ull);
    }
    mdb_cursor_close(c);
    if (rc != MDB_NOTFOUND) return xlate(s, rc);

    if ((rc = mdb_cursor_open(txn, s->st_names, &c))) return xlate(s, rc);
    for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        int nlen = (int)(k.mv_size > MSA_MAX_NAME_LEN ? MSA_MAX_NAME_LEN : k.mv_size);
        msa_coll_rec_t cr;
        if (v.mv_size != 4) {
            add_problem(p, "collection %.*s: name entry of %zu bytes, want 4", nlen,
                        (char *)k.mv_data, v.mv_size);
            continue;
        }
        uint32_t cid = get_le32(v.mv_data);
        if (coll_get_id_txn(s, txn, cid, &cr) != MSA_OK)
            add_problem(p, "collection %.*s: names id %u, which has no readable record", nlen,
                        (char *)k.mv_data, cid);
        else if (strlen(cr.name) != k.mv_size || memcmp(cr.name, k.mv_data, k.mv_size) != 0)
            add_problem(p, "collection %.*s: names id %u, whose record is named %s", nlen,
                        (char *)k.mv_data, cid, cr.name);
    }
    mdb_cursor_close(c);
    return rc == MDB_NOTFOUND ? MSA_OK : xlate(s, rc);
}

/* The checks of msa_store_verify inside txn; check_crc=false skips the
 * checksums of blocks, text and metadata (msa_store_check has read them). */
static int verify_txn(msa_store_t *s, MDB_txn *txn, uint32_t coll_id, bool check_crc,
                      problems_t *p, uint64_t *docs_checked)
{
    int rc;
    if (coll_id) {
        msa_coll_rec_t c;
        if ((rc = coll_get_id_txn(s, txn, coll_id, &c))) return rc;
        if ((rc = verify_coll(s, txn, &c, check_crc, p, docs_checked))) return rc;
    } else {
        MDB_cursor *cc = NULL;
        if ((rc = xlate(s, mdb_cursor_open(txn, s->st_colls, &cc)))) return rc;
        MDB_val k, v;
        int g;
        for (g = mdb_cursor_get(cc, &k, &v, MDB_FIRST); g == 0;
             g = mdb_cursor_get(cc, &k, &v, MDB_NEXT)) {
            msa_coll_rec_t c;
            uint32_t kid = k.mv_size == 4 ? get_be32(k.mv_data) : 0;
            if (coll_decode(&k, &v, &c) != MSA_OK || c.id != kid) {
                const char *why = val_check(TAG_COLL, &k, &v, NULL);
                add_problem(p, "collection #%u: record %s", kid, why ? why : "undecodable");
                continue;
            }
            if ((rc = verify_coll(s, txn, &c, check_crc, p, docs_checked))) break;
        }
        mdb_cursor_close(cc);
        if (rc) return rc;
        if (g != MDB_NOTFOUND) return xlate(s, g);
        if ((rc = verify_catalog(s, txn, p))) return rc;
    }
    if ((rc = verify_orphans(s, txn, s->st_blocks, "block", coll_id, p)) ||
        (rc = verify_orphans(s, txn, s->st_text, "text", coll_id, p)) ||
        (rc = verify_orphans(s, txn, s->st_metadata, "metadata", coll_id, p)))
        return rc;
    return MSA_OK;
}

/* Hands the problems over: the summary line for dropped ones, then *problems. */
static int problems_finish(problems_t *p, char ***problems, size_t *n_problems)
{
    if (p->dropped) {
        uint64_t d = p->dropped;
        p->dropped = 0;
        /* Problems are dropped only once the list is full: the summary line
         * takes the last slot. */
        p->n = VERIFY_MAX_PROBLEMS - 1;
        free(p->v[p->n]);
        add_problem(p, "... and %llu more problems", (ull)d + 1);
    }
    if (p->oom) {
        msa_store_problems_free(p->v, p->n);
        return MSA_ENOMEM;
    }
    *problems = p->v;
    *n_problems = p->n;
    return MSA_OK;
}

int msa_store_verify(msa_store_t *s, uint32_t coll_id, uint64_t *docs_checked, char ***problems,
                     size_t *n_problems)
{
    *docs_checked = 0;
    *problems = NULL;
    *n_problems = 0;
    problems_t p = {0};
    msa_store_txn_t *t = NULL;
    int rc = msa_store_read_begin(s, &t);
    if (rc) return rc;
    rc = verify_txn(s, t->tx_root, coll_id, true, &p, docs_checked);
    msa_store_abort(t);
    if (rc) {
        msa_store_problems_free(p.v, p.n);
        *docs_checked = 0;
        return rc;
    }
    return problems_finish(&p, problems, n_problems);
}

void msa_store_problems_free(char **problems, size_t n)
{
    if (!problems) return;
    for (size_t i = 0; i < n; i++) free(problems[i]);
    free(problems);
}

/* ==== integrity walk ========================================================== */

/* "collection c doc N layer_pos P kind K" for a key of docs/text/metadata/blocks. */
static void key_label(msa_store_t *s, MDB_txn *txn, const MDB_val *k, char *buf, size_t cap)
{
    const uint8_t *kp = k->mv_data;
    if (k->mv_size < DOC_KEY_LEN) {
        snprintf(buf, cap, "key of %zu bytes", k->mv_size);
        return;
    }
    uint32_t cid = get_be32(kp);
    msa_coll_rec_t c;
    char cname[MSA_MAX_NAME_LEN + 16];
    if (coll_get_id_txn(s, txn, cid, &c) == MSA_OK)
        snprintf(cname, sizeof cname, "%s", c.name);
    else
        snprintf(cname, sizeof cname, "#%u", cid);
    if (k->mv_size == BLOCK_KEY_LEN)
        snprintf(buf, cap, "collection %s: doc %llu: layer_pos %u block %c", cname,
                 (ull)get_be64(kp + 4), get_be16(kp + 12), kind_char(kp[14]));
    else
        snprintf(buf, cap, "collection %s: doc %llu", cname, (ull)get_be64(kp + 4));
}

typedef struct walk_db {
    const char *name;
    MDB_dbi dbi;
    unsigned tag;        /* checksummed values of this kind; 0 = plain values */
    size_t kmin, kmax;   /* key sizes */
} walk_db_t;

typedef struct walk_acc {
    uint64_t tree_pages; /* branch + leaf + overflow pages of every tree */
    uint64_t free_pages; /* page numbers listed in the freelist */
    uint64_t last_pgno;  /* of the snapshot's meta page */
} walk_acc_t;

/* A freelist record: u64 count, then count page numbers, strictly descending,
 * each a data page of the file (not a meta page, not past the last page). */
static void walk_free_value(const MDB_val *k, const MDB_val *v, walk_acc_t *a, problems_t *p)
{
    uint64_t txnid = 0, n = 0;
    if (k->mv_size == sizeof(size_t)) memcpy(&txnid, k->mv_data, sizeof(size_t));
    if (v->mv_size < sizeof(size_t) || v->mv_size % sizeof(size_t)) {
        add_problem(p, "freelist: record of txn %llu: %zu bytes, not a page list", (ull)txnid,
                    v->mv_size);
        return;
    }
    const uint8_t *d = v->mv_data;
    size_t cnt;
    memcpy(&cnt, d, sizeof cnt);
    n = cnt;
    if ((n + 1) * sizeof(size_t) != v->mv_size) {
        add_problem(p, "freelist: record of txn %llu: count %llu in %zu bytes", (ull)txnid,
                    (ull)n, v->mv_size);
        return;
    }
    size_t prev = 0;
    for (uint64_t i = 1; i <= n; i++) {
        size_t pg;
        memcpy(&pg, d + i * sizeof(size_t), sizeof pg);
        if (pg < 2 || pg > a->last_pgno || (i > 1 && pg >= prev)) {
            add_problem(p, "freelist: record of txn %llu: page %llu out of range or order",
                        (ull)txnid, (ull)pg);
            return;
        }
        prev = pg;
    }
    a->free_pages += n;
}

/* Walks one database with a cursor: key sizes, strict key order, the entry
 * count of its header, and (full) every value's checksum. Damage found is a
 * problem; only an LMDB failure that is not damage (ENOMEM) is returned. */
static int walk_db(msa_store_t *s, MDB_txn *txn, const walk_db_t *w, bool full, walk_acc_t *a,
                   problems_t *p)
{
    MDB_stat ms;
    int rc = mdb_stat(txn, w->dbi, &ms);
    if (rc) {
        add_problem(p, "%s: cannot read its header: %s", w->name, mdb_strerror(rc));
        return MSA_OK;
    }
    a->tree_pages += ms.ms_branch_pages + ms.ms_leaf_pages + ms.ms_overflow_pages;
    MDB_cursor *c = NULL;
    if ((rc = mdb_cursor_open(txn, w->dbi, &c))) return xlate(s, rc);
    MDB_val k, v, prev = {0, NULL};
    uint64_t n = 0;
    char label[MSA_MAX_NAME_LEN + 96];
    for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        n++;
        if (k.mv_size < w->kmin || k.mv_size > w->kmax)
            add_problem(p, "%s: entry %llu: key of %zu bytes, want %zu..%zu", w->name, (ull)n,
                        k.mv_size, w->kmin, w->kmax);
        if (prev.mv_data && mdb_cmp(txn, w->dbi, &prev, &k) >= 0)
            add_problem(p, "%s: entry %llu: keys out of order", w->name, (ull)n);
        prev = k;
        if (w->dbi == 0) {
            walk_free_value(&k, &v, a, p);
        } else if (full && w->tag) {
            const char *why = val_check(w->tag, &k, &v, NULL);
            if (why) {
                if (w->tag == TAG_COLL)
                    snprintf(label, sizeof label, "collection #%u",
                             k.mv_size == 4 ? get_be32(k.mv_data) : 0);
                else
                    key_label(s, txn, &k, label, sizeof label);
                add_problem(p, "%s: %s: %s (damaged)", w->name, label, why);
            }
        }
    }
    mdb_cursor_close(c);
    if (rc != MDB_NOTFOUND) {
        if (rc == ENOMEM) return MSA_ENOMEM;
        add_problem(p, "%s: walk stopped after %llu entries: %s", w->name, (ull)n,
                    mdb_strerror(rc));
    } else if (n != ms.ms_entries) {
        add_problem(p, "%s: %llu entries walked, its header says %llu", w->name, (ull)n,
                    (ull)ms.ms_entries);
    }
    return MSA_OK;
}

int msa_store_check(msa_store_t *s, bool full, uint64_t *docs_checked, char ***problems,
                    size_t *n_problems)
{
    *docs_checked = 0;
    *problems = NULL;
    *n_problems = 0;
    problems_t p = {0};
    msa_store_txn_t *t = NULL;
    int rc = msa_store_read_begin(s, &t);
    if (rc) return rc;
    MDB_txn *txn = t->tx_root;
    MDB_envinfo info;
    walk_acc_t a = {0};
    if ((rc = xlate(s, mdb_env_info(s->st_env, &info)))) goto out;
    a.last_pgno = info.me_last_pgno;

    /* FREE_DBI (0) and MAIN_DBI (1) are LMDB's own: the freelist (txn id ->
     * page list) and the table of named databases. */
    const walk_db_t dbs[] = {
        {"freelist", 0, 0, sizeof(size_t), sizeof(size_t)},
        {"main", 1, 0, 1, 64},
        {"meta", s->st_meta, 0, 3, 9},
        {"coll_names", s->st_names, 0, 1, MSA_MAX_NAME_LEN},
        {"collections", s->st_colls, TAG_COLL, 4, 4},
        {"docs", s->st_docs, TAG_DOC, DOC_KEY_LEN, DOC_KEY_LEN},
        {"text", s->st_text, TAG_TEXT, DOC_KEY_LEN, DOC_KEY_LEN},
        {"metadata", s->st_metadata, TAG_META, DOC_KEY_LEN, DOC_KEY_LEN},
        {"blocks", s->st_blocks, TAG_BLOCK, BLOCK_KEY_LEN, BLOCK_KEY_LEN},
    };
    for (size_t i = 0; i < sizeof dbs / sizeof dbs[0]; i++)
        if ((rc = walk_db(s, txn, &dbs[i], full, &a, &p))) goto out;
    /* Every page is a meta page (2), in some tree, or free (LMDB's own audit,
     * mdb_audit): a damaged freelist or tree header shows up here. */
    if (a.tree_pages + a.free_pages + 2 != a.last_pgno + 1)
        add_problem(&p, "pages: %llu in trees + %llu free + 2 meta = %llu, the file has %llu",
                    (ull)a.tree_pages, (ull)a.free_pages, (ull)(a.tree_pages + a.free_pages + 2),
                    (ull)(a.last_pgno + 1));
    /* Full: the records' own checks (verify), without reading the values a
     * second time; only when the trees walked cleanly, since verify's lookups
     * would stumble over the same damage. */
    if (full && p.n == 0) rc = verify_txn(s, txn, 0, false, &p, docs_checked);

out:
    msa_store_abort(t);
    if (rc) {
        msa_store_problems_free(p.v, p.n);
        *docs_checked = 0;
        return rc;
    }
    return problems_finish(&p, problems, n_problems);
}

/* ==== check in a child process ================================================= */

/* Exit codes of the child; anything else (or a signal) means it crashed. */
enum { CHILD_SOUND = 0, CHILD_SKIP = 64, CHILD_REFUSED = 65, CHILD_PROBLEMS = 66 };
#define CHILD_REPORT_MAX 8192
#define CHILD_PROBLEMS_LISTED 5

static void child_say(int fd, const char *msg)
{
    size_t n = strlen(msg);
    while (n) {
        ssize_t w = write(fd, msg, n);
        if (w <= 0) return;
        msg += w;
        n -= (size_t)w;
    }
}

/* Runs in the forked child: touches the file only here, reports over fd and
 * exits. No core dump: a crash is the expected outcome on some damage. */
static void __attribute__((noreturn)) check_child(const char *dir, bool full, int fd)
{
    struct rlimit rl = {0, 0};
    setrlimit(RLIMIT_CORE, &rl);
    /* What LMDB's assertions (or a sanitizer) print on the way down goes into
     * the report rather than the daemon's stderr. */
    dup2(fd, STDERR_FILENO);
    /* Hold msad.lock while walking, so no msad writes under the walk; when
     * another one owns the directory, let the caller's own open say so. */
    char *lock_path = path_join(dir, "msad.lock");
    int lfd = lock_path ? open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600) : -1;
    if (lfd < 0 || flock(lfd, LOCK_EX | LOCK_NB) != 0) _exit(CHILD_SKIP);
    msa_store_opts_t o = {.read_only = true};
    msa_store_t *s = NULL;
    msa_status_t st;
    int rc = msa_store_open(dir, &o, &s, &st);
    if (rc) {
        child_say(fd, st.msg);
        _exit(rc == MSA_ECORRUPT ? CHILD_REFUSED : CHILD_SKIP);
    }
    uint64_t docs = 0;
    char **pr = NULL;
    size_t n = 0;
    rc = msa_store_check(s, full, &docs, &pr, &n);
    if (rc) {
        char msg[256];
        snprintf(msg, sizeof msg, "could not finish: %s", msa_strerror(rc));
        child_say(fd, msg);
        _exit(CHILD_PROBLEMS);
    }
    if (n) {
        char line[64];
        snprintf(line, sizeof line, "%zu problem%s: ", n, n == 1 ? "" : "s");
        child_say(fd, line);
        for (size_t i = 0; i < n && i < CHILD_PROBLEMS_LISTED; i++) {
            if (i) child_say(fd, "; ");
            child_say(fd, pr[i]);
        }
        if (n > CHILD_PROBLEMS_LISTED) child_say(fd, "; ...");
        _exit(CHILD_PROBLEMS);
    }
    msa_store_close(s);
    _exit(CHILD_SOUND);
}

int msa_store_check_file(const char *dir, msa_store_check_t mode, uint64_t *bytes,
                         msa_status_t *st)
{
    msa_status_clear(st);
    *bytes = 0;
    if (mode == MSA_STORE_CHECK_OFF) return MSA_OK;
    char *data = path_join(dir, "data.mdb");
    if (!data) return msa_status_set(st, MSA_ENOMEM, "out of memory checking %s", dir);
    struct stat sb;
    if (stat(data, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        free(data); /* nothing to check: a new store, or the open says what is wrong */
        return MSA_OK;
    }
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) {
        int err = errno;
        free(data);
        return msa_status_set(st, MSA_EIO, "%s: cannot start the integrity walk: %s", dir,
                              strerror(err));
    }
    pid_t pid = fork();
    if (pid < 0) {
        int err = errno;
        close(fds[0]);
        close(fds[1]);
        free(data);
        return msa_status_set(st, err == ENOMEM || err == EAGAIN ? MSA_ENOMEM : MSA_EIO,
                              "%s: cannot start the integrity walk: %s", dir, strerror(err));
    }
    if (pid == 0) {
        close(fds[0]);
        check_child(dir, mode == MSA_STORE_CHECK_FULL, fds[1]);
    }
    close(fds[1]);
    char report[CHILD_REPORT_MAX];
    size_t len = 0;
    for (;;) {
        char buf[1024];
        ssize_t r = read(fds[0], buf, sizeof buf);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        size_t take = (size_t)r < sizeof report - 1 - len ? (size_t)r : sizeof report - 1 - len;
        memcpy(report + len, buf, take);
        len += take;
    }
    report[len] = '\0';
    close(fds[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    /* The first line of a crashed child's output says where (an LMDB assertion). */
    char first[160] = "";
    for (const char *l = report; *l;) {
        size_t n = strcspn(l, "\n");
        if (n > 0 && l[0] != '=') {
            snprintf(first, sizeof first, " [%.*s]", (int)(n < 150 ? n : 150), l);
            break;
        }
        l += n + (l[n] == '\n');
    }
    int rc = MSA_OK;
    const char *fix = "the file is damaged; restore it from a backup (or start with "
                      "--check-on-start off to serve what is still readable)";
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        if (sig == SIGKILL || sig == SIGTERM || sig == SIGINT)
            rc = msa_status_set(st, MSA_EIO, "%s: integrity walk was killed (%s)", data,
                                sigabbrev_np(sig) ? sigabbrev_np(sig) : "signal");
        else
            rc = msa_status_set(st, MSA_ECORRUPT, "%s: integrity walk crashed (SIG%s)%s: %s", data,
                                sigabbrev_np(sig) ? sigabbrev_np(sig) : "?", first, fix);
    } else if (!WIFEXITED(status)) {
        rc = msa_status_set(st, MSA_EIO, "%s: integrity walk ended oddly (status %d)", data,
                            status);
    } else {
        switch (WEXITSTATUS(status)) {
        case CHILD_SOUND:
            *bytes = (uint64_t)sb.st_size;
            break;
        case CHILD_SKIP:
            break; /* the caller's own open reports why the file cannot be opened */
        case CHILD_REFUSED:
            rc = msa_status_set(st, MSA_ECORRUPT, "%s", len ? report : "store refused");
            break;
        case CHILD_PROBLEMS:
            rc = msa_status_set(st, MSA_ECORRUPT, "%s: integrity walk: %s; %s", data, report, fix);
            break;
        default:
            /* Sanitizer builds turn a crash into an exit code. */
            rc = msa_status_set(st, MSA_ECORRUPT, "%s: integrity walk crashed (exit %d)%s: %s",
                                data, WEXITSTATUS(status), first, fix);
            break;
        }
    }
    free(data);
    return rc;
}
