/* store_impl.h — what the files of the LMDB store share; not a public header.
 *
 * The store (store.h) is one module in four files, split by concern:
 *   store.c         environment, the gate, transactions and savepoints, growth
 *   store_docs.c    collections and documents inside a txn
 *   store_layout.c  the on-disk layout: keys, checksummed value framing
 *                   (CRC32C header), collection and document records
 *   store_verify.c  backup, verify, the integrity walk and its forked check
 * Internal functions shared between them are msa__store_*; they follow the
 * conventions of store.h (MSA_* codes, LMDB codes translated by
 * msa__store_xlate) and are called with the gate held unless they say so.
 */
#ifndef MSA_STORE_IMPL_H
#define MSA_STORE_IMPL_H

#include "store.h"

#include "msa_alloc.h"

#include <lmdb.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Format 2: every value of collections, docs, text, metadata and blocks starts
 * with an 8-byte checksum header (see "checksummed values" below). */
#define STORE_FORMAT 2u
#define COLL_REC_VERSION 1u
#define DOC_REC_VERSION 1u
#define DOC_REC_LEN 73u    /* version byte + 8 u64/i64 + 2 u32 */
#define COLL_REC_FIXED 46u /* version, id, created_seq, 4 counters, name length */
#define DEFAULT_MAP_SIZE (1ull << 30)
#define DEFAULT_MAP_MAX (1ull << 40)
#define DEFAULT_MAX_READERS 1024u
#define MAX_DBS 16
#define DOC_KEY_LEN 12u   /* coll_id u32 + doc_id u64 */
#define BLOCK_KEY_LEN 15u /* + layer_pos u16 + kind u8 */
#define VERIFY_MAX_PROBLEMS 1000u
#define VAL_HDR 8u /* u32 crc32c, u8 VAL_VERSION, u8 tag, u16 zero */
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
    uint32_t st_detached;          /* detached read txns open */
    bool st_closing;               /* the gate is (being) taken exclusively: no new detach */
    int st_lock_fd;                /* flock'd dir/msad.lock; -1 when read_only */
    bool st_read_only;
    uint64_t st_map_size;         /* bytes; changed only under the exclusive gate */
    uint64_t st_map_max;          /* bytes: the hard limit (configured map_max) */
    uint64_t st_map_soft;         /* bytes: growth for ordinary writes stops here; the
                               * rest (map_max - soft) is a reserve that only
                               * msa_store_reserve opens, so deletes can free space */
    _Atomic uint64_t st_last_seq; /* last committed seq, read by any thread */
    atomic_bool st_broken;        /* MDB_PANIC seen: every later txn gets MSA_EBROKEN */
    char *st_dir;
    char *st_data_path; /* dir/data.mdb */
};

struct msa_store_txn {
    msa_store_t *tx_store;
    MDB_txn *tx_root;
    MDB_txn *tx_child; /* the open savepoint, or NULL */
    bool tx_write;
    int tx_err;       /* first failure that left the root txn half-written */
    int tx_child_err; /* the same for the open savepoint */
    uint64_t tx_seq;  /* snapshot seq (read) or last committed seq at begin (write) */
    bool tx_detached; /* read txn whose gate hold belongs to no thread (msa_store_txn_detach) */
};

/* Bytes of the largest collection record (see msa__store_coll_encode). */
#define COLL_REC_MAX (COLL_REC_FIXED + MSA_MAX_NAME_LEN + 4 + MSA_SCHEMA_ENC_MAX)

/* ==== byte order (store_layout.c's codecs and every reader of raw keys) ==== */

static inline void put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static inline void put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static inline uint32_t get_le32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static inline uint64_t get_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static inline void put_be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void put_be32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (24 - 8 * i));
}

static inline void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (56 - 8 * i));
}

static inline uint16_t get_be16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

static inline uint32_t get_be32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v = v << 8 | p[i];
    return v;
}

static inline uint64_t get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = v << 8 | p[i];
    return v;
}

static inline MDB_val mval(const void *p, size_t n)
{
    MDB_val v = {n, (void *)p};
    return v;
}

/* ==== store.c ================================================================ */

/* The one place where LMDB's codes become ours; MDB_PANIC marks s broken (s
 * may be NULL for an environment that is not a store). */
int msa__store_xlate(msa_store_t *s, int rc);
/* Shared hold of the gate by this thread (re-entrant per thread and store). */
void msa__store_gate_enter(msa_store_t *s);
void msa__store_gate_leave(msa_store_t *s);
/* The LMDB txn operations go to: the open savepoint, else the root txn. */
MDB_txn *msa__store_cur(const msa_store_txn_t *t);
/* Records rc (when not MSA_OK) as the failure of t's current level, so a later
 * commit or savepoint keep refuses it; returns rc. */
int msa__store_poison(msa_store_txn_t *t, int rc);
/* The failure recorded for t's current level, or MSA_OK. */
int msa__store_level_err(const msa_store_txn_t *t);
/* A meta key of width 4 or 8 bytes (LE); a missing key is MSA_ECORRUPT. */
int msa__store_meta_get_u64(msa_store_t *s, MDB_txn *txn, const char *key, size_t width,
                            uint64_t *out);
int msa__store_meta_put_u64(msa_store_t *s, MDB_txn *txn, const char *key, size_t width,
                            uint64_t val);
/* Deletes every key of dbi that starts with prefix[0..plen). */
int msa__store_del_prefix(msa_store_t *s, MDB_txn *txn, MDB_dbi dbi, const uint8_t *prefix,
                          size_t plen);
/* Collection record by id (checked: MSA_ECORRUPT when damaged), and its write. */
int msa__store_coll_get_id_txn(msa_store_t *s, MDB_txn *txn, uint32_t id, msa_coll_rec_t *out);
int msa__store_coll_put_txn(msa_store_t *s, MDB_txn *txn, const msa_coll_rec_t *c);
/* Document record by (collection, id), checked. */
int msa__store_doc_get_txn(msa_store_t *s, MDB_txn *txn, uint32_t coll_id, uint64_t doc_id,
                           msa_doc_rec_t *out);
/* "dir/name" in a malloc'd string, or NULL when out of memory. */
char *msa__store_path_join(const char *dir, const char *name);

/* ==== store_layout.c ========================================================= */

/* Keys: big-endian, so LMDB's byte order is (collection, document, layer, kind). */
void msa__store_doc_key(uint8_t k[DOC_KEY_LEN], uint32_t coll_id, uint64_t doc_id);
void msa__store_block_key(uint8_t k[BLOCK_KEY_LEN], uint32_t coll_id, uint64_t doc_id,
                          uint16_t layer_pos, uint8_t kind);
/* Stores a checksummed value (header + payload) under k in dbi. */
int msa__store_val_put(msa_store_t *s, MDB_txn *txn, MDB_dbi dbi, unsigned tag, const MDB_val *k,
                       const void *payload, size_t len);
/* Why the stored value v under k fails its check as a `tag` value, or NULL when
 * it is sound (then *out, if out is not NULL, is its payload). */
const char *msa__store_val_check(unsigned tag, const MDB_val *k, const MDB_val *v, MDB_val *out);
/* msa__store_val_check as a code: MSA_OK or MSA_ECORRUPT. */
int msa__store_val_open(unsigned tag, const MDB_val *k, const MDB_val *v, MDB_val *out);
/* Records: encode into buf (COLL_REC_MAX / DOC_REC_LEN bytes; returns the
 * length), decode a stored value under k (MSA_ECORRUPT when damaged). */
size_t msa__store_coll_encode(const msa_coll_rec_t *c, uint8_t *buf);
int msa__store_coll_decode(const MDB_val *k, const MDB_val *sv, msa_coll_rec_t *out);
void msa__store_doc_encode(const msa_doc_rec_t *d, uint8_t buf[DOC_REC_LEN]);
int msa__store_doc_decode(const MDB_val *k, const MDB_val *sv, msa_doc_rec_t *out);

#endif
