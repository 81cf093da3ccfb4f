/* store_verify.c — backup (mdb_env_copy), verify (records against schema and
 * counters), the integrity walk over every page and checksum, and that walk
 * in a forked child so a damaged page cannot crash the caller (store.h).
 */
#define _GNU_SOURCE /* vasprintf */

#include "store_impl.h"

#include "tensor.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

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
        rc = msa_status_set(st, msa__store_xlate(NULL, rc), "backup %s: cannot open the copy: %s",
                            path, mdb_strerror(rc));
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

int msa_store_backup(msa_store_t *s, const char *path, bool compact, uint64_t *seq, uint64_t *bytes,
                     msa_status_t *st)
{
    msa_status_clear(st);
    *seq = 0;
    *bytes = 0;
    if (mkdir(path, 0700) != 0) {
        int err = errno;
        return msa_status_set(st, err == EEXIST ? MSA_EEXIST : MSA_EIO, "backup %s: %s", path,
                              err == EEXIST ? "already exists" : strerror(err));
    }
    char *data = msa__store_path_join(path, "data.mdb");
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
    msa__store_gate_enter(s);
    int rc = mdb_env_copyfd2(s->st_env, fd, compact ? MDB_CP_COMPACT : 0);
    msa__store_gate_leave(s);
    if (rc == 0 && fsync(fd) != 0) rc = errno;
    if (close(fd) != 0 && rc == 0) rc = errno;
    if (rc) {
        rc = msa_status_set(st, msa__store_xlate(s, rc), "backup %s: copy failed: %s", path,
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
        char **nv = msa_realloc(p->v, cap * sizeof *nv);
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
    if (rc) return msa__store_xlate(s, rc);
    uint8_t prefix[DOC_KEY_LEN];
    msa__store_doc_key(prefix, c->id, d->id);
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
        const char *why = check_crc ? msa__store_val_check(TAG_BLOCK, &k, &v, NULL) : NULL;
        if (why)
            add_problem(p, "collection %s: doc %llu: layer %u (pos %u) block %c: %s (damaged)",
                        c->name, (ull)d->id, sc->layers[pos], pos, kind_char(kind), why);
        else if (len != want[kind])
            add_problem(p,
                        "collection %s: doc %llu: layer %u (pos %u) block %c: %zu bytes, want "
                        "%llu",
                        c->name, (ull)d->id, sc->layers[pos], pos, kind_char(kind), len,
                        (ull)want[kind]);
    }
    mdb_cursor_close(cur_);
    if (rc != 0 && rc != MDB_NOTFOUND) return msa__store_xlate(s, rc);
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
    msa__store_doc_key(key, c->id, doc_id);
    MDB_val k = mval(key, DOC_KEY_LEN), v;
    int rc = mdb_get(txn, dbi, &k, &v);
    *len = rc == 0 && v.mv_size > VAL_HDR ? v.mv_size - VAL_HDR : 0;
    const char *why = rc == 0 && check_crc ? msa__store_val_check(tag, &k, &v, NULL) : NULL;
    if (why)
        add_problem(p, "collection %s: doc %llu: %s: %s (damaged)", c->name, (ull)doc_id,
                    tag == TAG_TEXT ? "text" : "metadata", why);
    return rc == 0 || rc == MDB_NOTFOUND ? MSA_OK : msa__store_xlate(s, rc);
}

static int verify_coll(msa_store_t *s, MDB_txn *txn, const msa_coll_rec_t *c, bool check_crc,
                       problems_t *p, uint64_t *docs_checked)
{
    uint64_t documents = 0, chunks = 0, tokens = 0, bytes = 0;
    uint32_t P = c->schema.chunk_tokens ? c->schema.chunk_tokens : 1;
    MDB_cursor *dc = NULL;
    int rc = mdb_cursor_open(txn, s->st_docs, &dc);
    if (rc) return msa__store_xlate(s, rc);
    uint8_t prefix[4];
    put_be32(prefix, c->id);
    MDB_val k = mval(prefix, 4), v;
    int r = MSA_OK;
    for (rc = mdb_cursor_get(dc, &k, &v, MDB_SET_RANGE); rc == 0;
         rc = mdb_cursor_get(dc, &k, &v, MDB_NEXT)) {
        if (k.mv_size < 4 || memcmp(k.mv_data, prefix, 4) != 0) break;
        if (k.mv_size != DOC_KEY_LEN) {
            add_problem(p, "collection %s: document key of %zu bytes, want %u", c->name, k.mv_size,
                        DOC_KEY_LEN);
            continue;
        }
        uint64_t key_id = get_be64((const uint8_t *)k.mv_data + 4);
        msa_doc_rec_t d;
        if (msa__store_doc_decode(&k, &v, &d) != MSA_OK) {
            const char *why = msa__store_val_check(TAG_DOC, &k, &v, NULL);
            add_problem(p, "collection %s: doc %llu: record %s (%zu bytes)", c->name, (ull)key_id,
                        why ? why : "undecodable", v.mv_size);
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
    if (rc != 0 && rc != MDB_NOTFOUND) return msa__store_xlate(s, rc);

    const struct {
        const char *name;
        uint64_t have, want;
    } ctr[] = {{"documents", c->documents, documents},
               {"chunks", c->chunks, chunks},
               {"tokens", c->tokens, tokens},
               {"bytes", c->bytes, bytes}};
    for (size_t i = 0; i < sizeof ctr / sizeof ctr[0]; i++)
        if (ctr[i].have != ctr[i].want)
            add_problem(p, "collection %s: counter %s is %llu, its documents sum to %llu", c->name,
                        ctr[i].name, (ull)ctr[i].have, (ull)ctr[i].want);
    return MSA_OK;
}

/* Finds keys of dbi (in the collection coll_id, or all when 0) whose document
 * has no record. Consecutive keys of one document share one lookup. */
static int verify_orphans(msa_store_t *s, MDB_txn *txn, MDB_dbi dbi, const char *what,
                          uint32_t coll_id, problems_t *p)
{
    MDB_cursor *c = NULL;
    int rc = mdb_cursor_open(txn, dbi, &c);
    if (rc) return msa__store_xlate(s, rc);
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
            add_problem(p, "%s: key of %zu bytes, want at least %u", what, k.mv_size, DOC_KEY_LEN);
            continue;
        }
        if (!have_last || memcmp(kp, last, DOC_KEY_LEN) != 0) {
            memcpy(last, kp, DOC_KEY_LEN);
            have_last = true;
            MDB_val dk = mval(last, DOC_KEY_LEN), dv;
            int g = mdb_get(txn, s->st_docs, &dk, &dv);
            if (g != 0 && g != MDB_NOTFOUND) {
                mdb_cursor_close(c);
                return msa__store_xlate(s, g);
            }
            last_exists = g == 0;
        }
        if (last_exists) continue;
        uint32_t cid = get_be32(kp);
        uint64_t did = get_be64(kp + 4);
        msa_coll_rec_t cr;
        char cname[MSA_MAX_NAME_LEN + 16];
        if (msa__store_coll_get_id_txn(s, txn, cid, &cr) == MSA_OK)
            snprintf(cname, sizeof cname, "%s", cr.name);
        else
            snprintf(cname, sizeof cname, "#%u (dropped)", cid);
        if (k.mv_size == BLOCK_KEY_LEN)
            add_problem(p,
                        "collection %s: doc %llu: orphan %s layer_pos %u kind %c without a "
                        "document record",
                        cname, (ull)did, what, get_be16(kp + 12), kind_char(kp[14]));
        else
            add_problem(p, "collection %s: doc %llu: orphan %s without a document record", cname,
                        (ull)did, what);
    }
    mdb_cursor_close(c);
    return rc == 0 || rc == MDB_NOTFOUND ? MSA_OK : msa__store_xlate(s, rc);
}

/* Whole-store checks: document records of missing collections and the name
 * table against the collection records. */
static int verify_catalog(msa_store_t *s, MDB_txn *txn, problems_t *p)
{
    MDB_cursor *c = NULL;
    int rc = mdb_cursor_open(txn, s->st_docs, &c);
    if (rc) return msa__store_xlate(s, rc);
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
            last_exists = msa__store_coll_get_id_txn(s, txn, cid, &cr) == MSA_OK;
        }
        if (!last_exists)
            add_problem(p, "collection #%u: doc %llu: orphan document record (no collection)", cid,
                        k.mv_size == DOC_KEY_LEN ? (ull)get_be64((uint8_t *)k.mv_data + 4) : 0ull);
    }
    mdb_cursor_close(c);
    if (rc != MDB_NOTFOUND) return msa__store_xlate(s, rc);

    if ((rc = mdb_cursor_open(txn, s->st_names, &c))) return msa__store_xlate(s, rc);
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
        if (msa__store_coll_get_id_txn(s, txn, cid, &cr) != MSA_OK)
            add_problem(p, "collection %.*s: names id %u, which has no readable record", nlen,
                        (char *)k.mv_data, cid);
        else if (strlen(cr.name) != k.mv_size || memcmp(cr.name, k.mv_data, k.mv_size) != 0)
            add_problem(p, "collection %.*s: names id %u, whose record is named %s", nlen,
                        (char *)k.mv_data, cid, cr.name);
    }
    mdb_cursor_close(c);
    return rc == MDB_NOTFOUND ? MSA_OK : msa__store_xlate(s, rc);
}

/* The checks of msa_store_verify inside txn; check_crc=false skips the
 * checksums of blocks, text and metadata (msa_store_check has read them). */
static int verify_txn(msa_store_t *s, MDB_txn *txn, uint32_t coll_id, bool check_crc, problems_t *p,
                      uint64_t *docs_checked)
{
    int rc;
    if (coll_id) {
        msa_coll_rec_t c;
        if ((rc = msa__store_coll_get_id_txn(s, txn, coll_id, &c))) return rc;
        if ((rc = verify_coll(s, txn, &c, check_crc, p, docs_checked))) return rc;
    } else {
        MDB_cursor *cc = NULL;
        if ((rc = msa__store_xlate(s, mdb_cursor_open(txn, s->st_colls, &cc)))) return rc;
        MDB_val k, v;
        int g;
        for (g = mdb_cursor_get(cc, &k, &v, MDB_FIRST); g == 0;
             g = mdb_cursor_get(cc, &k, &v, MDB_NEXT)) {
            msa_coll_rec_t c;
            uint32_t kid = k.mv_size == 4 ? get_be32(k.mv_data) : 0;
            if (msa__store_coll_decode(&k, &v, &c) != MSA_OK || c.id != kid) {
                const char *why = msa__store_val_check(TAG_COLL, &k, &v, NULL);
                add_problem(p, "collection #%u: record %s", kid, why ? why : "undecodable");
                continue;
            }
            if ((rc = verify_coll(s, txn, &c, check_crc, p, docs_checked))) break;
        }
        mdb_cursor_close(cc);
        if (rc) return rc;
        if (g != MDB_NOTFOUND) return msa__store_xlate(s, g);
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
    if (msa__store_coll_get_id_txn(s, txn, cid, &c) == MSA_OK)
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
    unsigned tag;      /* checksummed values of this kind; 0 = plain values */
    size_t kmin, kmax; /* key sizes */
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
        add_problem(p, "freelist: record of txn %llu: count %llu in %zu bytes", (ull)txnid, (ull)n,
                    v->mv_size);
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
    if ((rc = mdb_cursor_open(txn, w->dbi, &c))) return msa__store_xlate(s, rc);
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
            const char *why = msa__store_val_check(w->tag, &k, &v, NULL);
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
    if ((rc = msa__store_xlate(s, mdb_env_info(s->st_env, &info)))) goto out;
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
    char *lock_path = msa__store_path_join(dir, "msad.lock");
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

int msa_store_check_file(const char *dir, msa_store_check_t mode, uint64_t *bytes, msa_status_t *st)
{
    msa_status_clear(st);
    *bytes = 0;
    if (mode == MSA_STORE_CHECK_OFF) return MSA_OK;
    char *data = msa__store_path_join(dir, "data.mdb");
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
        rc =
            msa_status_set(st, MSA_EIO, "%s: integrity walk ended oddly (status %d)", data, status);
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
