/* store.c — the LMDB store behind store.h: environment, gate, transactions.
 *
 * One environment per data directory, seven named databases, keys big-endian
 * and records explicit little-endian with a leading version byte (their
 * codecs: store_layout.c). LMDB error codes are translated here
 * (msa__store_xlate) and nowhere else. A process-local rwlock (the "gate")
 * lets msa_store_grow remap the file while no transaction can point into the
 * old mapping. Collections and documents: store_docs.c; backup, verify and the
 * integrity check: store_verify.c; what they share: store_impl.h.
 */
#define _GNU_SOURCE /* pthread_rwlockattr_setkind_np */

#include "store_impl.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

/* ==== errors ================================================================= */

/* The one place where LMDB's codes become ours. MDB_PANIC means the environment
 * can no longer be trusted, so it marks the store broken for every later txn. */
int msa__store_xlate(msa_store_t *s, int rc)
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

void msa__store_gate_enter(msa_store_t *s)
{
    for (int i = 0; i < GATE_SLOTS; i++) {
        if (gate_held[i].store == s && gate_held[i].depth > 0) {
            gate_held[i].depth++;
            return;
        }
    }
    msa_assert(pthread_rwlock_rdlock(&s->st_gate) == 0);
    /* With every slot in use (txns on more than GATE_SLOTS stores at once) the
     * hold goes uncounted; it still balances because msa__store_gate_leave then finds no
     * slot and unlocks. */
    for (int i = 0; i < GATE_SLOTS; i++) {
        if (gate_held[i].depth == 0) {
            gate_held[i].store = s;
            gate_held[i].depth = 1;
            return;
        }
    }
}

void msa__store_gate_leave(msa_store_t *s)
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
MDB_txn *msa__store_cur(const msa_store_txn_t *t)
{
    return t->tx_child ? t->tx_child : t->tx_root;
}

/* Records a failure that may have left the current level half-written, so a
 * later commit (or savepoint keep) refuses it instead of persisting half an op. */
int msa__store_poison(msa_store_txn_t *t, int rc)
{
    if (rc == MSA_OK) return rc;
    if (t->tx_child) {
        if (!t->tx_child_err) t->tx_child_err = rc;
    } else if (!t->tx_err) {
        t->tx_err = rc;
    }
    return rc;
}

int msa__store_level_err(const msa_store_txn_t *t)
{
    return t->tx_child ? t->tx_child_err : t->tx_err;
}

int msa__store_meta_get_u64(msa_store_t *s, MDB_txn *txn, const char *key, size_t width,
                            uint64_t *out)
{
    MDB_val k = mval(key, strlen(key)), v;
    int rc = mdb_get(txn, s->st_meta, &k, &v);
    if (rc == MDB_NOTFOUND) return MSA_ECORRUPT; /* every store has all meta keys */
    if (rc) return msa__store_xlate(s, rc);
    if (v.mv_size != width) return MSA_ECORRUPT;
    *out = width == 4 ? get_le32(v.mv_data) : get_le64(v.mv_data);
    return MSA_OK;
}

int msa__store_meta_put_u64(msa_store_t *s, MDB_txn *txn, const char *key, size_t width,
                            uint64_t val)
{
    uint8_t buf[8];
    if (width == 4)
        put_le32(buf, (uint32_t)val);
    else
        put_le64(buf, val);
    MDB_val k = mval(key, strlen(key)), v = mval(buf, width);
    return msa__store_xlate(s, mdb_put(txn, s->st_meta, &k, &v, 0));
}

/* Deletes every key of dbi that starts with prefix. After mdb_cursor_del the
 * cursor already rests on the next key, so the walk reads on from there; a
 * fresh seek confirms that the range is empty before it stops, which keeps the
 * result right even where LMDB's cursor state after a delete at a page edge
 * is not what this loop expects. */
int msa__store_del_prefix(msa_store_t *s, MDB_txn *txn, MDB_dbi dbi, const uint8_t *prefix,
                          size_t plen)
{
    MDB_cursor *c = NULL;
    int rc = mdb_cursor_open(txn, dbi, &c);
    if (rc) return msa__store_xlate(s, rc);
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
    return msa__store_xlate(s, rc);
}

int msa__store_coll_get_id_txn(msa_store_t *s, MDB_txn *txn, uint32_t id, msa_coll_rec_t *out)
{
    uint8_t key[4];
    put_be32(key, id);
    MDB_val k = mval(key, 4), v;
    int rc = mdb_get(txn, s->st_colls, &k, &v);
    if (rc) return msa__store_xlate(s, rc);
    rc = msa__store_coll_decode(&k, &v, out);
    if (rc == MSA_OK && out->id != id) rc = MSA_ECORRUPT;
    return rc;
}

int msa__store_coll_put_txn(msa_store_t *s, MDB_txn *txn, const msa_coll_rec_t *c)
{
    uint8_t key[4], buf[COLL_REC_MAX];
    put_be32(key, c->id);
    MDB_val k = mval(key, 4);
    return msa__store_val_put(s, txn, s->st_colls, TAG_COLL, &k, buf,
                              msa__store_coll_encode(c, buf));
}

int msa__store_doc_get_txn(msa_store_t *s, MDB_txn *txn, uint32_t coll_id, uint64_t doc_id,
                           msa_doc_rec_t *out)
{
    uint8_t key[DOC_KEY_LEN];
    msa__store_doc_key(key, coll_id, doc_id);
    MDB_val k = mval(key, DOC_KEY_LEN), v;
    int rc = mdb_get(txn, s->st_docs, &k, &v);
    if (rc) return msa__store_xlate(s, rc);
    return msa__store_doc_decode(&k, &v, out);
}

/* ==== environment ============================================================ */

char *msa__store_path_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = msa_malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* mkdir -p with mode 0700 for the directories it creates. */
static int mkdir_p(const char *dir)
{
    char *tmp = msa_strdup(dir);
    if (!tmp) return ENOMEM;
    int err = 0;
    for (char *p = tmp + 1;; p++) {
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
        return msa_status_set(st, msa__store_xlate(s, rc), "%s: cannot open database '%s': %s",
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
        rc = msa_status_set(st, msa__store_xlate(s, rc), "%s: cannot begin txn: %s",
                            s->st_data_path, mdb_strerror(rc));
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
            rc = msa_status_set(st, msa__store_xlate(s, rc), "%s: %s", s->st_data_path,
                                mdb_strerror(rc));
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
        rc = msa_status_set(st, msa__store_xlate(s, rc), "%s: cannot open database 'meta': %s",
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
        if ((rc = msa__store_meta_put_u64(s, txn, KEY_FORMAT, 4, STORE_FORMAT)) ||
            (rc = msa__store_meta_put_u64(s, txn, KEY_SEQ, 8, 0)) ||
            (rc = msa__store_meta_put_u64(s, txn, KEY_NEXT_COLL, 4, 1))) {
            rc = msa_status_set(st, rc, "%s: cannot initialise the store: %s", s->st_data_path,
                                msa_strerror(rc));
            goto fail;
        }
    }
    uint64_t format = 0, seq = 0, next = 0;
    if ((rc = msa__store_meta_get_u64(s, txn, KEY_FORMAT, 4, &format))) {
        rc = msa_status_set(st, rc, "%s: store format unreadable: %s", s->st_data_path,
                            msa_strerror(rc));
        goto fail;
    }
    if (format != STORE_FORMAT) {
        rc = msa_status_set(st, MSA_ECORRUPT, "%s: unsupported store format %llu", s->st_data_path,
                            (unsigned long long)format);
        goto fail;
    }
    if ((rc = msa__store_meta_get_u64(s, txn, KEY_SEQ, 8, &seq)) ||
        (rc = msa__store_meta_get_u64(s, txn, KEY_NEXT_COLL, 4, &next))) {
        rc = msa_status_set(st, rc, "%s: meta database damaged: %s", s->st_data_path,
                            msa_strerror(rc));
        goto fail;
    }
    atomic_store(&s->st_last_seq, seq);
    /* Commit keeps the dbi handles for later txns, also for a read-only txn. */
    rc = mdb_txn_commit(txn);
    txn = NULL;
    if (rc) {
        rc = msa_status_set(st, msa__store_xlate(s, rc), "%s: cannot commit setup: %s",
                            s->st_data_path, mdb_strerror(rc));
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
    if (!o.map_size)
        o.map_size = (o.map_max && o.map_max < DEFAULT_MAP_SIZE) ? o.map_max : DEFAULT_MAP_SIZE;
    if (!o.map_max) o.map_max = DEFAULT_MAP_MAX;
    if (!o.max_readers) o.max_readers = DEFAULT_MAX_READERS;
    /* Page-size multiples keep LMDB's page arithmetic exact. */
    o.map_size = (o.map_size + 4095) & ~4095ull;
    o.map_max = (o.map_max + 4095) & ~4095ull;
    if (o.map_max < o.map_size) o.map_max = o.map_size;
    /* Reserve kept below the hard limit: map_max/16, at least 1 MiB (at most a
     * quarter of a small map), at most 64 MiB; page multiple. */
    uint64_t reserve = o.map_max / 16;
    if (reserve < (1ull << 20))
        reserve = o.map_max / 4 < (1ull << 20) ? o.map_max / 4 : (1ull << 20);
    if (reserve > (64ull << 20)) reserve = 64ull << 20;
    reserve &= ~4095ull;
    uint64_t soft = o.map_max - reserve;
    if (o.map_size > soft) o.map_size = soft;

    *out = NULL;
    msa_status_clear(st);
    int rc;
    msa_store_t *s = msa_calloc(1, sizeof *s);
    if (!s) return msa_status_set(st, MSA_ENOMEM, "out of memory opening %s", dir);
    s->st_lock_fd = -1;
    s->st_read_only = o.read_only;
    s->st_map_max = o.map_max;
    s->st_map_soft = soft;
    bool gate_init = false;

    s->st_dir = msa_strdup(dir);
    s->st_data_path = msa__store_path_join(dir, "data.mdb");
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
        char *lock_path = msa__store_path_join(dir, "msad.lock");
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
                rc =
                    msa_status_set(st, MSA_EIO, "cannot lock %s/msad.lock: %s", dir, strerror(err));
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
        rc = msa_status_set(st, msa__store_xlate(s, rc), "%s: cannot set up LMDB: %s", dir,
                            mdb_strerror(rc));
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
                                "remove it to start an empty store",
                                s->st_data_path);
            goto fail;
        }
    }
    unsigned flags = MDB_NOTLS | (o.nosync ? MDB_NOSYNC : 0) | (o.read_only ? MDB_RDONLY : 0);
    rc = mdb_env_open(s->st_env, dir, flags, 0600);
    if (rc) {
        int code = msa__store_xlate(s, rc);
        if (code == MSA_ECORRUPT)
            rc = msa_status_set(st, code, "%s: not an LMDB store or damaged: %s", s->st_data_path,
                                mdb_strerror(rc));
        else
            rc = msa_status_set(st, code, "%s: cannot open: %s", s->st_data_path, mdb_strerror(rc));
        goto fail;
    }

    /* A data file shorter than the pages its meta page claims would make LMDB
     * read past the end of the mapping (SIGBUS). Refuse it here instead. */
    MDB_envinfo info;
    MDB_stat ms;
    struct stat sb;
    if ((rc = mdb_env_info(s->st_env, &info)) || (rc = mdb_env_stat(s->st_env, &ms))) {
        rc = msa_status_set(st, msa__store_xlate(s, rc), "%s: %s", s->st_data_path,
                            mdb_strerror(rc));
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
            rc = msa_status_set(st, msa__store_xlate(s, rc), "%s: cannot set the map size: %s",
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
    return msa__store_xlate(s, rc);
}

/* Starts a top-level txn: the writer's (write) or a read snapshot, under the
 * shared gate, and reads its seq. A read begin that finds the map grown by
 * another process (MDB_MAP_RESIZED) adopts the new size and tries once more. */
static int txn_begin(msa_store_t *s, bool write, msa_store_txn_t **out)
{
    *out = NULL;
    if (write && s->st_read_only) return MSA_EINVAL;
    if (atomic_load(&s->st_broken)) return MSA_EBROKEN;
    msa_store_txn_t *t = msa_calloc(1, sizeof *t);
    if (!t) return MSA_ENOMEM;
    t->tx_store = s;
    t->tx_write = write;
    int rc;
    for (int attempt = 0;; attempt++) {
        msa__store_gate_enter(s);
        rc = mdb_txn_begin(s->st_env, NULL, write ? 0 : MDB_RDONLY, &t->tx_root);
        if (write || rc != MDB_MAP_RESIZED || attempt > 0) break;
        msa__store_gate_leave(s);
        if ((rc = adopt_map_size(s))) {
            free(t);
            return rc;
        }
    }
    if (rc) {
        rc = msa__store_xlate(s, rc);
        goto fail;
    }
    if ((rc = msa__store_meta_get_u64(s, t->tx_root, KEY_SEQ, 8, &t->tx_seq))) goto fail;
    *out = t;
    return MSA_OK;

fail:
    if (t->tx_root) mdb_txn_abort(t->tx_root);
    msa__store_gate_leave(s);
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
        msa__store_gate_leave(s);
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
    msa__store_gate_leave(s);
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
    if ((rc = msa__store_meta_put_u64(s, t->tx_root, KEY_SEQ, 8, seq))) {
        mdb_txn_abort(t->tx_root);
        goto out;
    }
    /* mdb_txn_commit frees the txn on success and on failure alike. LMDB
     * reports a short write (a full file system) as EIO: when the file system
     * has (almost) no space left, that is "store full", not an I/O error. */
    int mrc = mdb_txn_commit(t->tx_root);
    rc = msa__store_xlate(s, mrc);
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
        return msa__store_xlate(t->tx_store, rc);
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
    int rc = msa__store_xlate(t->tx_store, mdb_txn_commit(child));
    /* A failed merge may leave the parent partly updated: refuse its commit. */
    return msa__store_poison(t, rc);
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
        rc = msa__store_xlate(s, rc);
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
        rc = msa__store_xlate(s, rc);
        goto out;
    }
    MDB_envinfo info;
    s->st_map_size = mdb_env_info(s->st_env, &info) == 0 ? info.me_mapsize : want;
out:
    gate_open_all(s);
    return rc;
}
