/* store.h — durable state of msad in one LMDB environment.
 *
 * Owns the environment, its named databases and the commit sequence. Holds
 * collections (id, name, schema, counters), document records, text, metadata
 * and pooled tensor blocks; knows nothing above it (no index, no protobuf).
 * Threads: any number of read transactions from any thread (MDB_NOTLS); one
 * write transaction at a time, owned by the engine's single writer thread.
 * A txn handle and every view it returned must stay on the calling request and
 * end before the request does.
 *
 * Layout (keys big-endian so cursor order is numeric order):
 *   meta         "format" -> u32, "seq" -> u64, "next_coll" -> u32
 *   coll_names   name -> coll_id (u32)
 *   collections  coll_id -> collection record (schema, counters, created_seq)
 *   docs         (coll_id u32, doc_id u64) -> document record
 *   text, metadata (coll_id, doc_id) -> bytes
 *   blocks       (coll_id, doc_id, layer_pos u16, kind u8) -> pooled tensor bytes
 * Every value of collections, docs, text, metadata and blocks carries an
 * 8-byte header with a CRC-32C over key, header and payload (format 2); each
 * read that returns such a value checks it and fails with MSA_ECORRUPT.
 */
#ifndef MSA_STORE_H
#define MSA_STORE_H

#include "msa_err.h"
#include "schema.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct msa_store msa_store_t;
typedef struct msa_store_txn msa_store_txn_t;

typedef struct msa_store_opts {
    uint64_t map_size;    /* initial LMDB map size in bytes (0 = 1 GiB, or map_max if smaller) */
    uint64_t map_max;     /* growth stops here; then writes get MSA_EFULL (0 = 1 TiB) */
    unsigned max_readers; /* LMDB reader slots (0 = 1024) */
    bool nosync;          /* MDB_NOSYNC: commits are not fsync'd (explicit opt-in only) */
    bool read_only;       /* open without taking the writer lock (tools, verify of a backup) */
} msa_store_opts_t;

/* Block kinds of one (document, layer). */
typedef enum { MSA_BLOCK_K = 0, MSA_BLOCK_V = 1, MSA_BLOCK_R = 2 } msa_block_kind_t;

typedef struct msa_coll_rec {
    uint32_t id; /* never reused */
    char name[MSA_MAX_NAME_LEN + 1];
    uint64_t created_seq;
    msa_schema_t schema;
    uint64_t documents; /* live documents */
    uint64_t chunks;    /* sum of their chunks (index rows per layer) */
    uint64_t tokens;    /* sum of their tokens */
    uint64_t bytes;     /* tensor + text + metadata bytes */
} msa_coll_rec_t;

typedef struct msa_doc_rec {
    uint64_t id;
    uint64_t version; /* 1 on insert, +1 per replace */
    uint32_t tokens;
    uint32_t chunks;      /* ceil(tokens / P) */
    uint64_t created_seq; /* commit that inserted the id */
    uint64_t updated_seq; /* commit that wrote this version */
    int64_t updated_unix_ms;
    uint64_t text_bytes;
    uint64_t metadata_bytes;
    uint64_t tensor_bytes; /* all blocks of this version */
} msa_doc_rec_t;

/* A borrowed, zero-copy view into the map; valid until its txn ends. */
typedef struct msa_store_view {
    const void *data;
    size_t len;
} msa_store_view_t;

/* One block to write: pooled tensor bytes of (layer_pos, kind). */
typedef struct msa_store_block {
    uint16_t layer_pos; /* index into schema.layers */
    uint8_t kind;       /* msa_block_kind_t */
    const void *data;
    size_t len;
} msa_store_block_t;

/* ---- environment ----------------------------------------------------------- */

/* Opens (creating when missing) the store in directory dir and takes an
 * exclusive lock on dir/msad.lock unless read_only. Errors: MSA_EIO (cannot
 * create/lock: another msad owns it), MSA_ECORRUPT (not an msad store, wrong
 * format version, damaged file), MSA_ENOMEM. st names the file at fault. */
int msa_store_open(const char *dir, const msa_store_opts_t *opts, msa_store_t **out,
                   msa_status_t *st);
/* Closes; every txn must have ended. NULL is a no-op. */
void msa_store_close(msa_store_t *s);
/* Size of the data file in bytes. */
uint64_t msa_store_file_bytes(const msa_store_t *s);
/* Last committed sequence number (0 for a new store). Published right after
 * the commit returns, so a snapshot begun in that instant may already see a
 * newer seq; it never goes back. Safe from any thread. */
uint64_t msa_store_last_seq(const msa_store_t *s);

/* ---- transactions ---------------------------------------------------------- */

/* A read snapshot; *out's seq (msa_store_txn_seq) is the commit it sees.
 * MSA_EFULL when every reader slot is taken, MSA_EBROKEN after MDB_PANIC.
 * A thread may hold several txns of one store at once (a nested begin never
 * waits behind a pending grow). Open snapshots delay msa_store_grow. */
int msa_store_read_begin(msa_store_t *s, msa_store_txn_t **out);
/* The single write txn. Blocks while the map is being grown. MSA_EINVAL on a
 * read_only store. A write op that fails after it began writing (MSA_EFULL,
 * MSA_EIO, ...) poisons its level: a later commit, or savepoint_end(keep),
 * returns that error and writes nothing. Refusals before any write (EEXIST,
 * ENOTFOUND, EINVAL) leave the txn usable. */
int msa_store_write_begin(msa_store_t *s, msa_store_txn_t **out);
uint64_t msa_store_txn_seq(const msa_store_txn_t *t);
/* Write txn: stores seq as the new commit sequence and commits (fsync unless
 * nosync). On error the txn is gone and nothing was written. */
int msa_store_commit(msa_store_txn_t *t, uint64_t seq);
/* Ends a read txn, or rolls back a write txn. NULL is a no-op. */
void msa_store_abort(msa_store_txn_t *t);
/* Makes a read txn begun on this thread independent of it, so that it may
 * outlive the call that began it (held snapshots): any thread may use it
 * afterwards, one thread at a time (the env has MDB_NOTLS), and any thread
 * may end it with msa_store_abort. It still delays msa_store_grow (and
 * msa_store_reserve) until it ends, so a caller that holds one for long must
 * end it before those. MSA_EUNAVAIL (txn unchanged) while a grow is pending. */
int msa_store_txn_detach(msa_store_txn_t *t);

/* Savepoints (nested LMDB txns) make one request of a group commit atomic:
 * begin, apply its ops, then end with keep=true, or keep=false to undo them.
 * One level only; every op of the txn goes to the open savepoint. A savepoint
 * whose ops failed is undone even with keep=true (that call returns the
 * error) and the enclosing txn stays usable. Commit with a savepoint open is
 * a bug (msa_assert). */
int msa_store_savepoint_begin(msa_store_txn_t *t);
int msa_store_savepoint_end(msa_store_txn_t *t, bool keep);

/* After MSA_EFULL from a write: call with no txn of this process open (the
 * write txn aborted); doubles the map up to the soft limit, map_max less a
 * reserve (map_max/16 clamped to 1..64 MiB, at most map_max/4). MSA_EFULL there.
 * Waits until every open read snapshot ends (new ones queue behind it), so
 * long-held snapshots delay growth. Calling it while this thread holds a txn
 * of s is a bug (msa_assert). MSA_EINVAL on a read_only store. */
int msa_store_grow(msa_store_t *s);
/* The reserve between the soft limit and map_max, for writes that free space
 * (deletes): at the soft limit a full store could otherwise not even delete,
 * since LMDB's copy-on-write needs new pages before old ones are freed (and
 * pages freed by a commit are reusable only after the next commit).
 * on=true maps up to map_max (MSA_EFULL when already there); on=false
 * maps back to the soft limit, or to the pages in use if more. Same rules
 * as msa_store_grow (no txn of this thread open; waits for snapshots). */
int msa_store_reserve(msa_store_t *s, bool on);

/* ---- collections ----------------------------------------------------------- */

/* Creates a collection (schema already validated); fills *out. MSA_EEXIST. */
int msa_store_coll_create(msa_store_txn_t *w, const char *name, const msa_schema_t *schema,
                          uint64_t seq, msa_coll_rec_t *out);
/* Removes the collection and every record, text, metadata and block of it.
 * Fills *out with the record as it was. MSA_ENOTFOUND. */
int msa_store_coll_drop(msa_store_txn_t *w, const char *name, msa_coll_rec_t *out);
int msa_store_coll_get(msa_store_txn_t *t, const char *name, msa_coll_rec_t *out);
int msa_store_coll_get_by_id(msa_store_txn_t *t, uint32_t id, msa_coll_rec_t *out);
/* Calls fn for each collection in id order; stops at fn's first non-zero return
 * and returns it. fn may read through t but must not write. */
int msa_store_coll_foreach(msa_store_txn_t *t, int (*fn)(void *arg, const msa_coll_rec_t *c),
                           void *arg);

/* ---- documents ------------------------------------------------------------- */

int msa_store_doc_get(msa_store_txn_t *t, uint32_t coll_id, uint64_t doc_id, msa_doc_rec_t *out);
/* Writes rec, text, metadata and blocks of one document version, replacing
 * every block of an earlier version, and adjusts the collection's counters.
 * rec->tensor_bytes must equal the sum of blocks' lengths, and text_bytes /
 * metadata_bytes the lengths given: rec is stored as given (counters follow
 * it), and msa_store_verify reports any disagreement. Empty text/metadata
 * store no key. MSA_ENOTFOUND (collection), MSA_EINVAL (a block's layer_pos
 * or kind outside the schema). */
int msa_store_doc_put(msa_store_txn_t *w, uint32_t coll_id, const msa_doc_rec_t *rec,
                      const void *text, size_t text_len, const void *meta, size_t meta_len,
                      const msa_store_block_t *blocks, size_t n_blocks);
/* Removes a document and all its data; adjusts counters. MSA_ENOTFOUND. */
int msa_store_doc_delete(msa_store_txn_t *w, uint32_t coll_id, uint64_t doc_id);
/* Up to limit records with id > after_id, ascending; *next_after is the last id
 * returned when more remain, else 0. limit 0 returns nothing. MSA_ENOTFOUND
 * when the collection is missing. */
int msa_store_doc_list(msa_store_txn_t *t, uint32_t coll_id, uint64_t after_id, uint32_t limit,
                       msa_doc_rec_t *out, uint32_t *n_out, uint64_t *next_after);
/* Calls fn for every document of the collection in id order (index rebuild);
 * stops at fn's first non-zero return and returns it. MSA_ENOTFOUND when the
 * collection is missing. fn may read through t but must not write. */
int msa_store_doc_foreach(msa_store_txn_t *t, uint32_t coll_id,
                          int (*fn)(void *arg, const msa_doc_rec_t *d), void *arg);

/* Zero-copy views, valid until t ends (in a write txn: until its next write).
 * A document without text/metadata gives an empty view; MSA_ENOTFOUND means no
 * such document (or, for blocks, no such block). The stored checksum is checked
 * first (a CRC-32C pass over the bytes): MSA_ECORRUPT when it does not match. */
int msa_store_text_get(msa_store_txn_t *t, uint32_t coll_id, uint64_t doc_id,
                       msa_store_view_t *out);
int msa_store_meta_get(msa_store_txn_t *t, uint32_t coll_id, uint64_t doc_id,
                       msa_store_view_t *out);
int msa_store_block_get(msa_store_txn_t *t, uint32_t coll_id, uint64_t doc_id, uint16_t layer_pos,
                        msa_block_kind_t kind, msa_store_view_t *out);

/* ---- maintenance ----------------------------------------------------------- */

/* Writes a consistent copy of the live store into the directory path (created;
 * must not exist), compacting when asked; the copy is itself a store that
 * msa_store_open accepts. *seq is the commit the copy holds, *bytes the size of
 * its data.mdb. MSA_EEXIST (path exists), MSA_EIO; a failed copy is removed.
 * A non-compacting copy waits for the write txn to end, so the thread that
 * holds the write txn must not call it. */
int msa_store_backup(msa_store_t *s, const char *path, bool compact, uint64_t *seq, uint64_t *bytes,
                     msa_status_t *st);

/* Checks records against blocks (presence and byte sizes per schema), text and
 * metadata sizes and checksums (each value read once), orphan blocks, and
 * collection counters, for one collection
 * (coll_id != 0) or all. Each problem is a malloc'd string appended to
 * *problems (a malloc'd array, free with msa_store_problems_free). Runs in one
 * read snapshot (which delays a grow while it runs). At most 1000 problems are
 * listed, the last one then counting the rest. Returns MSA_OK when it could
 * check (problems or not); MSA_ENOTFOUND for a missing coll_id. */
int msa_store_verify(msa_store_t *s, uint32_t coll_id, uint64_t *docs_checked, char ***problems,
                     size_t *n_problems);
void msa_store_problems_free(char **problems, size_t n);

/* How much msa_store_check_file reads before a store is served. */
typedef enum {
    MSA_STORE_CHECK_FULL = 0,  /* every page and every value's checksum (the default) */
    MSA_STORE_CHECK_QUICK = 1, /* branch and leaf pages of every tree: keys, not values */
    MSA_STORE_CHECK_OFF = 2,
} msa_store_check_t;

/* The integrity walk, in one read snapshot: every database, LMDB's freelist
 * and its table of databases with cursors (key sizes and order, entry counts),
 * the page accounting (meta + tree + free pages = pages of the file); full
 * adds every value's checksum and then the checks of msa_store_verify (whole
 * store). Damage it can see is reported in *problems as by msa_store_verify;
 * damage that LMDB trips over may crash the process instead: run it in a
 * process of its own (msa_store_check_file) before trusting a file. */
int msa_store_check(msa_store_t *s, bool full, uint64_t *docs_checked, char ***problems,
                    size_t *n_problems);
/* Runs msa_store_check on dir/data.mdb in a forked child process (read-only,
 * holding dir/msad.lock) and waits for it; the caller touches no page of the
 * file. Call it with no store of dir open in this process. MSA_OK when the
 * file is sound, or when there is nothing to check (no data.mdb) or the child
 * cannot open it for a reason other than damage (then the caller's own
 * msa_store_open reports it); *bytes is the size checked (0 when skipped).
 * MSA_ECORRUPT with st naming data.mdb and what failed: the child died of a
 * signal ("integrity walk crashed (SIGSEGV)"), found problems, or refused the
 * file as msa_store_open would. MSA_EIO/MSA_ENOMEM when no child could run.
 * Cost: about the time to read the file (full) or its tree pages (quick). */
int msa_store_check_file(const char *dir, msa_store_check_t mode, uint64_t *bytes,
                         msa_status_t *st);

#ifdef __cplusplus
}
#endif
#endif
