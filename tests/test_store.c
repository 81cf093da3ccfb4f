/* test_store.c — unit tests of the store (store.h: storage/store*.c) on a real
 * LMDB in a temp dir.
 *
 * Each TEST is one case in the table at the bottom; main runs them all (or the
 * ones named on the command line) and exits non-zero when any check failed.
 * Checks print both operands and end the failing case.
 *
 * Longer than ~900 lines on purpose: one test file per module (STYLE.md rule
 * 10), and the store's cases share the fixtures above them (schemas, document
 * builders, the damage helpers of the verify and check cases).
 */
#define _GNU_SOURCE

#include "crc32c.h"
#include "harness.h"
#include "store.h"

#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* ==== fixtures =============================================================== */

static char g_root[128];
static int g_dirs;

/* A fresh, not yet existing path under the temp root. */
static const char *newdir(void)
{
    static char buf[8][256];
    char *p = buf[g_dirs % 8];
    snprintf(p, sizeof buf[0], "%s/d%d", g_root, g_dirs++);
    return p;
}

static msa_schema_t schema_of(uint32_t H, uint32_t D, uint32_t P, bool sep)
{
    msa_schema_t s;
    memset(&s, 0, sizeof s);
    s.n_layers = 2;
    s.layers[0] = 3;
    s.layers[1] = 7;
    s.kv_heads = H;
    s.query_heads = 2 * H;
    s.head_dim = D;
    s.chunk_tokens = P;
    s.kv_dtype = MSA_DT_BF16;
    s.routing_dtype = MSA_DT_F32; /* router blocks get another size than K/V */
    s.separate_router_keys = sep;
    s.similarity = MSA_SIM_COSINE;
    s.head_reduce = MSA_HEAD_MEAN;
    s.query_reduce = MSA_QUERY_MAX;
    s.chunk_reduce = MSA_CHUNK_MAX;
    s.default_top_k = 16;
    snprintf(s.model, sizeof s.model, "test-model");
    return s;
}

static msa_schema_t small_schema(void)
{
    return schema_of(2, 8, 4, true);
}

static bool schema_eq(const msa_schema_t *a, const msa_schema_t *b)
{
    return a->n_layers == b->n_layers &&
           memcmp(a->layers, b->layers, a->n_layers * sizeof a->layers[0]) == 0 &&
           a->kv_heads == b->kv_heads && a->query_heads == b->query_heads &&
           a->head_dim == b->head_dim && a->chunk_tokens == b->chunk_tokens &&
           a->kv_dtype == b->kv_dtype && a->routing_dtype == b->routing_dtype &&
           a->separate_router_keys == b->separate_router_keys && a->similarity == b->similarity &&
           a->default_top_k == b->default_top_k && strcmp(a->model, b->model) == 0;
}

static size_t block_len(const msa_schema_t *s, uint32_t chunks, unsigned kind)
{
    msa_dtype_t dt = kind == MSA_BLOCK_R ? msa_schema_router_store_dtype(s) : s->kv_dtype;
    return (size_t)chunks * s->kv_heads * s->head_dim * msa_dtype_size(dt);
}

static uint8_t pattern(uint64_t id, unsigned pos, unsigned kind, uint8_t salt)
{
    return (uint8_t)(id * 31 + pos * 7 + kind * 3 + salt);
}

/* Writes a well-formed document: every block the schema asks for, filled with
 * pattern(id, pos, kind, salt). Version and created_seq follow an earlier
 * version when there is one, as the engine would do. */
static int put_doc(msa_store_txn_t *w, const msa_coll_rec_t *c, uint64_t id, uint32_t tokens,
                   uint64_t seq, const char *text, const char *meta, uint8_t salt,
                   msa_doc_rec_t *out)
{
    const msa_schema_t *s = &c->schema;
    msa_doc_rec_t rec = {0}, old;
    rec.id = id;
    rec.version = 1;
    rec.created_seq = seq;
    if (msa_store_doc_get(w, c->id, id, &old) == MSA_OK) {
        rec.version = old.version + 1;
        rec.created_seq = old.created_seq;
    }
    rec.tokens = tokens;
    rec.chunks = (tokens + s->chunk_tokens - 1) / s->chunk_tokens;
    rec.updated_seq = seq;
    rec.updated_unix_ms = 1700000000000 + (int64_t)seq;
    rec.text_bytes = text ? strlen(text) : 0;
    rec.metadata_bytes = meta ? strlen(meta) : 0;
    unsigned kinds = s->separate_router_keys ? 3 : 2;
    msa_store_block_t blocks[2 * 3];
    size_t nb = 0;
    for (unsigned pos = 0; pos < s->n_layers; pos++) {
        for (unsigned kind = 0; kind < kinds; kind++) {
            size_t len = block_len(s, rec.chunks, kind);
            uint8_t *b = malloc(len ? len : 1);
            memset(b, pattern(id, pos, kind, salt), len);
            blocks[nb++] = (msa_store_block_t){(uint16_t)pos, (uint8_t)kind, b, len};
            rec.tensor_bytes += len;
        }
    }
    int rc = msa_store_doc_put(w, c->id, &rec, text, rec.text_bytes, meta, rec.metadata_bytes,
                               blocks, nb);
    for (size_t i = 0; i < nb; i++) free((void *)blocks[i].data);
    if (out) *out = rec;
    return rc;
}

/* Returns NULL when the stored document matches what put_doc wrote, else a
 * static description of the first difference. */
static const char *doc_mismatch(msa_store_txn_t *t, const msa_coll_rec_t *c, uint64_t id,
                                uint32_t tokens, const char *text, const char *meta, uint8_t salt)
{
    static char why[256];
    msa_doc_rec_t d;
    int rc = msa_store_doc_get(t, c->id, id, &d);
    if (rc)
        return snprintf(why, sizeof why, "doc_get %llu: %s", (unsigned long long)id,
                        msa_errname(rc)),
               why;
    if (d.tokens != tokens) return "tokens differ";
    msa_store_view_t v;
    if (msa_store_text_get(t, c->id, id, &v)) return "text_get failed";
    size_t tl = text ? strlen(text) : 0;
    if (v.len != tl || (tl && memcmp(v.data, text, tl))) return "text differs";
    if (msa_store_meta_get(t, c->id, id, &v)) return "meta_get failed";
    size_t ml = meta ? strlen(meta) : 0;
    if (v.len != ml || (ml && memcmp(v.data, meta, ml))) return "metadata differs";
    unsigned kinds = c->schema.separate_router_keys ? 3 : 2;
    for (unsigned pos = 0; pos < c->schema.n_layers; pos++) {
        for (unsigned kind = 0; kind < kinds; kind++) {
            if (msa_store_block_get(t, c->id, id, (uint16_t)pos, kind, &v)) return "block missing";
            if (v.len != block_len(&c->schema, d.chunks, kind)) return "block length differs";
            const uint8_t *b = v.data;
            for (size_t i = 0; i < v.len; i++)
                if (b[i] != pattern(id, pos, kind, salt)) return "block bytes differ";
        }
    }
    return NULL;
}

#define CHECK_DOC(t, c, id, tokens, text, meta, salt)                        \
    do {                                                                     \
        const char *why_ = doc_mismatch(t, c, id, tokens, text, meta, salt); \
        if (why_) FAILF("doc %llu: %s", (unsigned long long)(id), why_);     \
    } while (0)

static int verify_count(msa_store_t *s, uint32_t coll_id, uint64_t *docs, bool print)
{
    char **pr = NULL;
    size_t n = 0;
    uint64_t d = 0;
    int rc = msa_store_verify(s, coll_id, &d, &pr, &n);
    if (rc) return -1000 + rc;
    if (print)
        for (size_t i = 0; i < n; i++) fprintf(stderr, "    problem: %s\n", pr[i]);
    msa_store_problems_free(pr, n);
    if (docs) *docs = d;
    /* A store that verifies clean must also pass the integrity walk, in both
     * modes (its page accounting included). */
    for (int full = 0; n == 0 && coll_id == 0 && full < 2; full++) {
        char **cp = NULL;
        size_t cn = 0;
        uint64_t cd = 0;
        if ((rc = msa_store_check(s, full, &cd, &cp, &cn))) return -2000 + rc;
        for (size_t i = 0; i < cn; i++) fprintf(stderr, "    check problem: %s\n", cp[i]);
        msa_store_problems_free(cp, cn);
        if (cn) return -3000 - (int)cn;
        if (full && cd != d) return -4000;
    }
    return (int)n;
}

static msa_store_t *open_new(const char *dir, const msa_store_opts_t *o)
{
    msa_store_t *s = NULL;
    msa_status_t st;
    int rc = msa_store_open(dir, o, &s, &st);
    if (rc) fprintf(stderr, "  open %s: %s: %s\n", dir, msa_errname(rc), st.msg);
    return s;
}

/* A raw LMDB env on a closed store, to inject damage the API cannot make. */
static MDB_env *raw_open(const char *dir)
{
    MDB_env *env = NULL;
    if (mdb_env_create(&env) || mdb_env_set_maxdbs(env, 16) ||
        mdb_env_set_mapsize(env, 256u << 20) || mdb_env_open(env, dir, MDB_NOTLS, 0600)) {
        if (env) mdb_env_close(env);
        return NULL;
    }
    return env;
}

static void key_doc(uint8_t k[12], uint32_t coll, uint64_t doc)
{
    for (int i = 0; i < 4; i++) k[i] = (uint8_t)(coll >> (24 - 8 * i));
    for (int i = 0; i < 8; i++) k[4 + i] = (uint8_t)(doc >> (56 - 8 * i));
}

/* ==== cases ================================================================== */

TEST(create_reopen)
{
    const char *dir = newdir();
    msa_schema_t sc = small_schema();
    CHECK_OK(msa_schema_validate(&sc, "schema", NULL));
    msa_store_t *s = open_new(dir, NULL);
    CHECK(s != NULL);
    CHECK_EQ_U(msa_store_last_seq(s), 0);
    struct stat sb;
    CHECK(stat(dir, &sb) == 0 && (sb.st_mode & 0777) == 0700);

    msa_store_txn_t *w;
    msa_coll_rec_t c;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_EQ_U(msa_store_txn_seq(w), 0);
    CHECK_OK(msa_store_coll_create(w, "alpha", &sc, 1, &c));
    CHECK_EQ_U(c.id, 1);
    CHECK_OK(put_doc(w, &c, 1, 10, 1, "hello world", "{\"k\":1}", 0, NULL));
    CHECK_OK(put_doc(w, &c, 2, 4, 1, NULL, NULL, 0, NULL));
    CHECK_OK(msa_store_commit(w, 1));
    CHECK_EQ_U(msa_store_last_seq(s), 1);
    CHECK(msa_store_file_bytes(s) > 0);
    msa_store_close(s);

    s = open_new(dir, NULL);
    CHECK(s != NULL);
    CHECK_EQ_U(msa_store_last_seq(s), 1);
    msa_store_txn_t *t;
    CHECK_OK(msa_store_read_begin(s, &t));
    CHECK_EQ_U(msa_store_txn_seq(t), 1);
    msa_coll_rec_t g, gi;
    CHECK_OK(msa_store_coll_get(t, "alpha", &g));
    CHECK_OK(msa_store_coll_get_by_id(t, 1, &gi));
    CHECK_EQ_U(g.id, 1);
    CHECK_EQ_U(gi.id, 1);
    CHECK(strcmp(g.name, "alpha") == 0);
    CHECK(strcmp(gi.name, "alpha") == 0);
    CHECK_EQ_U(g.created_seq, 1);
    CHECK(schema_eq(&g.schema, &sc));
    CHECK_EQ_U(g.documents, 2);
    CHECK_DOC(t, &g, 1, 10, "hello world", "{\"k\":1}", 0);
    CHECK_DOC(t, &g, 2, 4, NULL, NULL, 0);
    msa_doc_rec_t d;
    CHECK_OK(msa_store_doc_get(t, 1, 1, &d));
    CHECK_EQ_U(d.version, 1);
    CHECK_EQ_U(d.chunks, 3);
    CHECK_EQ_U(d.updated_unix_ms, 1700000000001);
    CHECK_EQ_U(d.text_bytes, 11);
    msa_store_view_t v = {(void *)1, 99};
    CHECK_OK(msa_store_text_get(t, 1, 2, &v)); /* no text: an empty view, not ENOTFOUND */
    CHECK_EQ_U(v.len, 0);
    msa_store_abort(t);
    CHECK_EQ_U(verify_count(s, 0, NULL, true), 0);
    msa_store_close(s);
}

TEST(collection_ids_not_reused)
{
    const char *dir = newdir();
    msa_schema_t sc = small_schema();
    msa_store_t *s = open_new(dir, NULL);
    CHECK(s != NULL);
    msa_store_txn_t *w;
    msa_coll_rec_t a, b, c;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_create(w, "a", &sc, 1, &a));
    CHECK_OK(msa_store_commit(w, 1));
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_drop(w, "a", NULL));
    CHECK_OK(msa_store_coll_create(w, "a", &sc, 2, &b));
    CHECK_OK(msa_store_commit(w, 2));
    CHECK_EQ_U(a.id, 1);
    CHECK_EQ_U(b.id, 2);
    msa_store_close(s);
    s = open_new(dir, NULL);
    CHECK(s != NULL);
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_create(w, "c", &sc, 3, &c));
    CHECK_OK(msa_store_commit(w, 3));
    CHECK_EQ_U(c.id, 3);
    msa_store_close(s);
}

TEST(savepoint_keep_and_undo)
{
    msa_store_t *s = open_new(newdir(), NULL);
    CHECK(s != NULL);
    msa_schema_t sc = small_schema();
    msa_store_txn_t *w;
    msa_coll_rec_t c, x;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_create(w, "c", &sc, 1, &c));
    CHECK_OK(msa_store_savepoint_begin(w));
    CHECK_OK(put_doc(w, &c, 1, 8, 1, "one", NULL, 0, NULL));
    CHECK_OK(msa_store_savepoint_end(w, true));
    CHECK_OK(msa_store_savepoint_begin(w));
    CHECK_OK(put_doc(w, &c, 2, 8, 1, "two", NULL, 0, NULL));
    CHECK_OK(put_doc(w, &c, 1, 12, 1, "one again", NULL, 5, NULL)); /* replace, then undo */
    CHECK_OK(msa_store_coll_create(w, "undone", &sc, 1, &x));
    msa_doc_rec_t d;
    CHECK_OK(msa_store_doc_get(w, c.id, 2, &d)); /* the savepoint sees its own writes */
    CHECK_OK(msa_store_savepoint_end(w, false));
    CHECK_RC(msa_store_doc_get(w, c.id, 2, &d), MSA_ENOTFOUND);
    CHECK_RC(msa_store_coll_get(w, "undone", &x), MSA_ENOTFOUND);
    CHECK_OK(msa_store_commit(w, 1));

    msa_store_txn_t *t;
    CHECK_OK(msa_store_read_begin(s, &t));
    CHECK_OK(msa_store_coll_get(t, "c", &x));
    CHECK_EQ_U(x.documents, 1);
    CHECK_EQ_U(x.tokens, 8);
    CHECK_DOC(t, &x, 1, 8, "one", NULL, 0);
    CHECK_RC(msa_store_doc_get(t, c.id, 2, &d), MSA_ENOTFOUND);
    CHECK_OK(msa_store_doc_get(t, c.id, 1, &d));
    CHECK_EQ_U(d.version, 1);
    CHECK_RC(msa_store_coll_get(t, "undone", &x), MSA_ENOTFOUND);
    msa_store_abort(t);
    CHECK_EQ_U(verify_count(s, 0, NULL, true), 0);
    msa_store_close(s);
}

TEST(abort_writes_nothing)
{
    const char *dir = newdir();
    msa_store_t *s = open_new(dir, NULL);
    CHECK(s != NULL);
    msa_schema_t sc = small_schema();
    msa_store_txn_t *w, *t;
    msa_coll_rec_t c;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_create(w, "c", &sc, 1, &c));
    CHECK_OK(msa_store_commit(w, 1));
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(put_doc(w, &c, 7, 8, 2, "x", "y", 0, NULL));
    CHECK_OK(msa_store_coll_create(w, "d", &sc, 2, NULL));
    CHECK_OK(msa_store_savepoint_begin(w));
    CHECK_OK(put_doc(w, &c, 8, 8, 2, "x", "y", 0, NULL));
    msa_store_abort(w); /* with a savepoint still open */
    CHECK_EQ_U(msa_store_last_seq(s), 1);
    msa_store_close(s);

    s = open_new(dir, NULL);
    CHECK(s != NULL);
    CHECK_EQ_U(msa_store_last_seq(s), 1);
    CHECK_OK(msa_store_read_begin(s, &t));
    CHECK_EQ_U(msa_store_txn_seq(t), 1);
    msa_doc_rec_t d;
    CHECK_RC(msa_store_doc_get(t, c.id, 7, &d), MSA_ENOTFOUND);
    CHECK_RC(msa_store_doc_get(t, c.id, 8, &d), MSA_ENOTFOUND);
    CHECK_RC(msa_store_coll_get(t, "d", &c), MSA_ENOTFOUND);
    CHECK_OK(msa_store_coll_get(t, "c", &c));
    CHECK_EQ_U(c.documents, 0);
    CHECK_EQ_U(c.bytes, 0);
    msa_store_abort(t);
    msa_store_abort(NULL);
    msa_store_close(s);
    msa_store_close(NULL);
}

TEST(counters_put_replace_delete_drop)
{
    msa_store_t *s = open_new(newdir(), NULL);
    CHECK(s != NULL);
    msa_schema_t sc = small_schema();
    msa_store_txn_t *w;
    msa_coll_rec_t c, g;
    msa_doc_rec_t r1, r2, r1b;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_create(w, "c", &sc, 1, &c));
    CHECK_OK(put_doc(w, &c, 1, 10, 1, "abcd", "m", 0, &r1));
    CHECK_OK(put_doc(w, &c, 2, 4, 1, "abc", "xy", 0, &r2));
    CHECK_OK(msa_store_commit(w, 1));
    uint64_t b1 = r1.tensor_bytes + 4 + 1, b2 = r2.tensor_bytes + 3 + 2;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_get(w, "c", &g));
    CHECK_EQ_U(g.documents, 2);
    CHECK_EQ_U(g.chunks, 3 + 1);
    CHECK_EQ_U(g.tokens, 14);
    CHECK_EQ_U(g.bytes, b1 + b2);
    CHECK_EQ_U(r1.tensor_bytes, 2 * (3 * 2 * 8 * 2 * 2 + 3 * 2 * 8 * 4));

    /* Replace doc 1 with a shorter version and no text. */
    CHECK_OK(put_doc(w, &c, 1, 5, 2, NULL, "meta", 9, &r1b));
    CHECK_EQ_U(r1b.version, 2);
    CHECK_OK(msa_store_coll_get(w, "c", &g));
    CHECK_EQ_U(g.documents, 2);
    CHECK_EQ_U(g.chunks, 2 + 1);
    CHECK_EQ_U(g.tokens, 9);
    CHECK_EQ_U(g.bytes, r1b.tensor_bytes + 4 + b2);
    CHECK_DOC(w, &g, 1, 5, NULL, "meta", 9);
    CHECK_OK(msa_store_commit(w, 2));
    CHECK_EQ_U(verify_count(s, 0, NULL, true), 0);

    /* A replace that names fewer blocks leaves none of the old ones behind. */
    CHECK_OK(msa_store_write_begin(s, &w));
    uint8_t kb[2 * 8 * 2 * 2];
    memset(kb, 1, sizeof kb);
    msa_doc_rec_t r = r1b;
    r.version = 3;
    r.tensor_bytes = sizeof kb;
    r.text_bytes = 0;
    r.metadata_bytes = 0;
    msa_store_block_t only = {0, MSA_BLOCK_K, kb, sizeof kb};
    CHECK_OK(msa_store_doc_put(w, c.id, &r, NULL, 0, NULL, 0, &only, 1));
    msa_store_view_t v;
    CHECK_OK(msa_store_block_get(w, c.id, 1, 0, MSA_BLOCK_K, &v));
    CHECK_EQ_U(v.len, sizeof kb);
    CHECK_RC(msa_store_block_get(w, c.id, 1, 0, MSA_BLOCK_V, &v), MSA_ENOTFOUND);
    CHECK_RC(msa_store_block_get(w, c.id, 1, 1, MSA_BLOCK_R, &v), MSA_ENOTFOUND);
    CHECK_OK(msa_store_meta_get(w, c.id, 1, &v));
    CHECK_EQ_U(v.len, 0);
    CHECK_OK(msa_store_coll_get(w, "c", &g));
    CHECK_EQ_U(g.bytes, sizeof kb + b2);
    msa_store_abort(w);

    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_doc_delete(w, c.id, 2));
    CHECK_OK(msa_store_coll_get(w, "c", &g));
    CHECK_EQ_U(g.documents, 1);
    CHECK_EQ_U(g.chunks, 2);
    CHECK_EQ_U(g.tokens, 5);
    CHECK_EQ_U(g.bytes, r1b.tensor_bytes + 4);
    CHECK_RC(msa_store_text_get(w, c.id, 2, &v), MSA_ENOTFOUND);
    CHECK_RC(msa_store_block_get(w, c.id, 2, 0, MSA_BLOCK_K, &v), MSA_ENOTFOUND);
    CHECK_OK(msa_store_doc_delete(w, c.id, 1));
    CHECK_OK(msa_store_coll_get(w, "c", &g));
    CHECK_EQ_U(g.documents, 0);
    CHECK_EQ_U(g.chunks, 0);
    CHECK_EQ_U(g.tokens, 0);
    CHECK_EQ_U(g.bytes, 0);
    CHECK_OK(msa_store_commit(w, 3));
    CHECK_EQ_U(verify_count(s, 0, NULL, true), 0);

    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(put_doc(w, &c, 3, 4, 4, "t", NULL, 0, NULL));
    msa_coll_rec_t dropped;
    CHECK_OK(msa_store_coll_drop(w, "c", &dropped));
    CHECK_EQ_U(dropped.id, c.id);
    CHECK_EQ_U(dropped.documents, 1); /* the record as it was, with this txn's put */
    CHECK_RC(msa_store_coll_get_by_id(w, c.id, &g), MSA_ENOTFOUND);
    CHECK_OK(msa_store_commit(w, 4));
    CHECK_EQ_U(verify_count(s, 0, NULL, true), 0);
    msa_store_close(s);
}

TEST(doc_list_paging)
{
    msa_store_t *s = open_new(newdir(), NULL);
    CHECK(s != NULL);
    msa_schema_t sc = small_schema();
    msa_store_txn_t *w, *t;
    msa_coll_rec_t c, c2;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_create(w, "c", &sc, 1, &c));
    CHECK_OK(msa_store_coll_create(w, "c2", &sc, 1, &c2));
    for (uint64_t i = 1; i <= 25; i++) CHECK_OK(put_doc(w, &c, i * 10, 4, 1, NULL, NULL, 0, NULL));
    for (uint64_t i = 1; i <= 3; i++) CHECK_OK(put_doc(w, &c2, i, 4, 1, NULL, NULL, 0, NULL));
    CHECK_OK(put_doc(w, &c2, UINT64_MAX >> 1, 4, 1, NULL, NULL, 0, NULL));
    CHECK_OK(msa_store_commit(w, 1));

    CHECK_OK(msa_store_read_begin(s, &t));
    msa_doc_rec_t out[30];
    uint32_t n;
    uint64_t next, after = 0, seen = 0;
    int pages = 0;
    do {
        CHECK_OK(msa_store_doc_list(t, c.id, after, 10, out, &n, &next));
        for (uint32_t i = 0; i < n; i++) {
            seen++;
            CHECK_EQ_U(out[i].id, seen * 10);
        }
        pages++;
        CHECK_EQ_U(n, pages < 3 ? 10 : 5);
        CHECK_EQ_U(next, pages < 3 ? seen * 10 : 0);
        after = next;
    } while (next);
    CHECK_EQ_U(seen, 25);
    CHECK_EQ_U(pages, 3);

    CHECK_OK(msa_store_doc_list(t, c.id, 15, 2, out, &n, &next));
    CHECK_EQ_U(n, 2);
    CHECK_EQ_U(out[0].id, 20);
    CHECK_EQ_U(next, 30);
    CHECK_OK(msa_store_doc_list(t, c.id, 0, 25, out, &n, &next)); /* exactly all: no more */
    CHECK_EQ_U(n, 25);
    CHECK_EQ_U(next, 0);
    CHECK_OK(msa_store_doc_list(t, c.id, 250, 10, out, &n, &next));
    CHECK_EQ_U(n, 0);
    CHECK_EQ_U(next, 0);
    CHECK_OK(msa_store_doc_list(t, c2.id, 0, 30, out, &n, &next));
    CHECK_EQ_U(n, 4);
    CHECK_EQ_U(out[3].id, UINT64_MAX >> 1);
    CHECK_RC(msa_store_doc_list(t, 99, 0, 10, out, &n, &next), MSA_ENOTFOUND);
    msa_store_abort(t);
    msa_store_close(s);
}

static int count_doc(void *arg, const msa_doc_rec_t *d)
{
    uint64_t *n = arg;
    if (d->id <= n[1]) return -77; /* out of order */
    n[1] = d->id;
    n[0]++;
    return 0;
}

static int count_coll(void *arg, const msa_coll_rec_t *c)
{
    (*(int *)arg)++;
    return strcmp(c->name, "stop") == 0 ? 42 : 0;
}

TEST(foreach)
{
    msa_store_t *s = open_new(newdir(), NULL);
    CHECK(s != NULL);
    msa_schema_t sc = small_schema();
    msa_store_txn_t *w;
    msa_coll_rec_t c;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_create(w, "c", &sc, 1, &c));
    CHECK_OK(msa_store_coll_create(w, "stop", &sc, 1, NULL));
    CHECK_OK(msa_store_coll_create(w, "z", &sc, 1, NULL));
    for (uint64_t i = 1; i <= 300; i++) CHECK_OK(put_doc(w, &c, i * 3, 4, 1, NULL, NULL, 0, NULL));
    CHECK_OK(msa_store_commit(w, 1));
    msa_store_txn_t *t;
    CHECK_OK(msa_store_read_begin(s, &t));
    uint64_t n[2] = {0, 0};
    CHECK_OK(msa_store_doc_foreach(t, c.id, count_doc, n));
    CHECK_EQ_U(n[0], 300);
    int nc = 0;
    CHECK_EQ_U(msa_store_coll_foreach(t, count_coll, &nc), 42); /* stopped at the 2nd */
    CHECK_EQ_U(nc, 2);
    CHECK_RC(msa_store_doc_foreach(t, 77, count_doc, n), MSA_ENOTFOUND);
    msa_store_abort(t);
    msa_store_close(s);
}

TEST(drop_removes_everything)
{
    const char *dir = newdir();
    msa_store_t *s = open_new(dir, NULL);
    CHECK(s != NULL);
    /* Blocks of 2.5 KiB and more go to overflow pages, small ones share leaves. */
    msa_schema_t big = schema_of(2, 64, 4, true), sc = small_schema();
    msa_store_txn_t *w;
    msa_coll_rec_t a, b;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_create(w, "b", &sc, 1, &b));
    CHECK_OK(msa_store_coll_create(w, "a", &big, 1, &a));
    for (uint64_t i = 1; i <= 300; i++)
        CHECK_OK(put_doc(w, &a, i, i % 2 ? 40 : 3, 1, i % 3 ? "text" : NULL, "meta", 0, NULL));
    for (uint64_t i = 1; i <= 5; i++) CHECK_OK(put_doc(w, &b, i, 6, 1, "bt", "bm", 1, NULL));
    CHECK_OK(msa_store_commit(w, 1));
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_drop(w, "a", NULL));
    CHECK_OK(msa_store_commit(w, 2));
    uint64_t docs = 0;
    CHECK_EQ_U(verify_count(s, 0, &docs, true), 0);
    CHECK_EQ_U(docs, 5);
    msa_store_txn_t *t;
    CHECK_OK(msa_store_read_begin(s, &t));
    for (uint64_t i = 1; i <= 5; i++) CHECK_DOC(t, &b, i, 6, "bt", "bm", 1);
    msa_store_abort(t);
    msa_store_close(s);

    /* No key of collection a is left in any database. */
    MDB_env *env = raw_open(dir);
    CHECK(env != NULL);
    MDB_txn *txn;
    CHECK_EQ_U(mdb_txn_begin(env, NULL, MDB_RDONLY, &txn), 0);
    const char *dbs[] = {"docs", "text", "metadata", "blocks", "collections"};
    for (size_t i = 0; i < 5; i++) {
        MDB_dbi dbi;
        MDB_cursor *cur;
        MDB_val k, v;
        CHECK_EQ_U(mdb_dbi_open(txn, dbs[i], 0, &dbi), 0);
        CHECK_EQ_U(mdb_cursor_open(txn, dbi, &cur), 0);
        uint64_t left = 0, kept = 0;
        for (int rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
             rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
            const uint8_t *p = k.mv_data;
            uint32_t id = (uint32_t)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3];
            if (id == a.id) left++;
            if (id == b.id) kept++;
        }
        mdb_cursor_close(cur);
        if (left) {
            mdb_txn_abort(txn);
            mdb_env_close(env);
        }
        CHECK_EQ_U(left, 0);
        CHECK(kept > 0);
    }
    MDB_dbi names;
    MDB_val nk = {1, "a"}, nv;
    CHECK_EQ_U(mdb_dbi_open(txn, "coll_names", 0, &names), 0);
    CHECK_EQ_U(mdb_get(txn, names, &nk, &nv), MDB_NOTFOUND);
    mdb_txn_abort(txn);
    mdb_env_close(env);
}

TEST(duplicates_and_not_found)
{
    msa_store_t *s = open_new(newdir(), NULL);
    CHECK(s != NULL);
    msa_schema_t sc = small_schema();
    msa_store_txn_t *w;
    msa_coll_rec_t c, g;
    msa_doc_rec_t d;
    msa_store_view_t v;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_create(w, "c", &sc, 1, &c));
    CHECK_RC(msa_store_coll_create(w, "c", &sc, 1, &g), MSA_EEXIST);
    CHECK_RC(msa_store_coll_create(w, "", &sc, 1, &g), MSA_EINVAL);
    CHECK_RC(msa_store_coll_get(w, "nope", &g), MSA_ENOTFOUND);
    CHECK_RC(msa_store_coll_get_by_id(w, 9, &g), MSA_ENOTFOUND);
    CHECK_RC(msa_store_coll_drop(w, "nope", &g), MSA_ENOTFOUND);
    CHECK_RC(msa_store_doc_get(w, c.id, 1, &d), MSA_ENOTFOUND);
    CHECK_RC(msa_store_doc_delete(w, c.id, 1), MSA_ENOTFOUND);
    CHECK_RC(msa_store_doc_delete(w, 9, 1), MSA_ENOTFOUND);
    CHECK_RC(msa_store_text_get(w, c.id, 1, &v), MSA_ENOTFOUND);
    CHECK_RC(msa_store_meta_get(w, c.id, 1, &v), MSA_ENOTFOUND);
    CHECK_RC(msa_store_block_get(w, c.id, 1, 0, MSA_BLOCK_K, &v), MSA_ENOTFOUND);
    CHECK_RC(put_doc(w, &(msa_coll_rec_t){.id = 9, .schema = sc}, 1, 4, 1, NULL, NULL, 0, NULL),
             MSA_ENOTFOUND);
    /* A block outside the schema is a caller bug, refused before any write. */
    msa_doc_rec_t r = {.id = 1, .version = 1, .tokens = 4, .chunks = 1, .tensor_bytes = 1};
    msa_store_block_t bad = {2, MSA_BLOCK_K, "x", 1};
    CHECK_RC(msa_store_doc_put(w, c.id, &r, NULL, 0, NULL, 0, &bad, 1), MSA_EINVAL);
    bad = (msa_store_block_t){0, 3, "x", 1};
    CHECK_RC(msa_store_doc_put(w, c.id, &r, NULL, 0, NULL, 0, &bad, 1), MSA_EINVAL);
    /* Refused ops leave the txn usable. */
    CHECK_OK(put_doc(w, &c, 1, 4, 1, NULL, NULL, 0, NULL));
    CHECK_OK(msa_store_commit(w, 1));
    CHECK_EQ_U(verify_count(s, 0, NULL, true), 0);
    char **pr;
    size_t n;
    uint64_t dc;
    CHECK_RC(msa_store_verify(s, 9, &dc, &pr, &n), MSA_ENOTFOUND);
    msa_store_close(s);
}

TEST(second_open_is_refused)
{
    const char *dir = newdir();
    msa_store_t *s = open_new(dir, NULL), *s2 = NULL;
    CHECK(s != NULL);
    msa_status_t st;
    CHECK_RC(msa_store_open(dir, NULL, &s2, &st), MSA_EIO);
    CHECK(s2 == NULL);
    CHECK_EQ_U(st.code, MSA_EIO);
    CHECK_STR_HAS(st.msg, "is in use by another msad");
    CHECK_STR_HAS(st.msg, dir);
    msa_store_close(s);
    CHECK_OK(msa_store_open(dir, NULL, &s2, &st));
    msa_store_close(s2);
}

static void write_file(const char *path, const void *data, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd >= 0) {
        if (write(fd, data, len) != (ssize_t)len) perror("write");
        close(fd);
    }
}

TEST(garbage_file_is_corrupt)
{
    size_t sizes[] = {100, 5000, 65536};
    for (size_t i = 0; i < 3; i++) {
        const char *dir = newdir();
        CHECK(mkdir(dir, 0700) == 0);
        char path[300];
        snprintf(path, sizeof path, "%s/data.mdb", dir);
        uint8_t *junk = malloc(sizes[i]);
        uint32_t x = 12345;
        for (size_t j = 0; j < sizes[i]; j++) {
            x = x * 1103515245 + 12345;
            junk[j] = (uint8_t)(x >> 16);
        }
        write_file(path, junk, sizes[i]);
        free(junk);
        msa_store_t *s = NULL;
        msa_status_t st;
        CHECK_RC(msa_store_open(dir, NULL, &s, &st), MSA_ECORRUPT);
        CHECK(s == NULL);
        CHECK_STR_HAS(st.msg, "data.mdb");
        msa_store_opts_t ro = {.read_only = true};
        CHECK_RC(msa_store_open(dir, &ro, &s, &st), MSA_ECORRUPT);
    }
}

TEST(truncated_file_is_an_error)
{
    const char *dir = newdir();
    msa_store_t *s = open_new(dir, NULL);
    CHECK(s != NULL);
    msa_schema_t big = schema_of(2, 64, 4, true);
    msa_store_txn_t *w;
    msa_coll_rec_t c;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_create(w, "c", &big, 1, &c));
    for (uint64_t i = 1; i <= 100; i++) CHECK_OK(put_doc(w, &c, i, 40, 1, "t", "m", 0, NULL));
    CHECK_OK(msa_store_commit(w, 1));
    msa_store_close(s);
    char path[300];
    snprintf(path, sizeof path, "%s/data.mdb", dir);
    struct stat sb;
    CHECK(stat(path, &sb) == 0);
    CHECK(sb.st_size > 200000);
    off_t cuts[] = {sb.st_size / 2, 3 * 4096, 5000};
    for (size_t i = 0; i < 3; i++) {
        CHECK(truncate(path, cuts[i]) == 0);
        msa_status_t st;
        CHECK_RC(msa_store_open(dir, NULL, &s, &st), MSA_ECORRUPT);
        CHECK_STR_HAS(st.msg, "data.mdb");
    }
}

TEST(foreign_lmdb_and_wrong_format)
{
    /* Some other program's LMDB file. */
    const char *dir = newdir();
    CHECK(mkdir(dir, 0700) == 0);
    MDB_env *env = raw_open(dir);
    CHECK(env != NULL);
    MDB_txn *txn;
    MDB_dbi dbi;
    MDB_val k = {5, "hello"}, v = {5, "world"};
    CHECK_EQ_U(mdb_txn_begin(env, NULL, 0, &txn), 0);
    CHECK_EQ_U(mdb_dbi_open(txn, NULL, 0, &dbi), 0);
    CHECK_EQ_U(mdb_put(txn, dbi, &k, &v, 0), 0);
    CHECK_EQ_U(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
    msa_store_t *s = NULL;
    msa_status_t st;
    CHECK_RC(msa_store_open(dir, NULL, &s, &st), MSA_ECORRUPT);
    CHECK_STR_HAS(st.msg, "not an msad store");

    /* A store of a format this build does not know. */
    dir = newdir();
    s = open_new(dir, NULL);
    CHECK(s != NULL);
    msa_store_close(s);
    env = raw_open(dir);
    CHECK(env != NULL);
    uint8_t one[4] = {1, 0, 0, 0}; /* format 1: before per-value checksums */
    k = (MDB_val){6, "format"};
    v = (MDB_val){4, one};
    CHECK_EQ_U(mdb_txn_begin(env, NULL, 0, &txn), 0);
    CHECK_EQ_U(mdb_dbi_open(txn, "meta", 0, &dbi), 0);
    CHECK_EQ_U(mdb_put(txn, dbi, &k, &v, 0), 0);
    CHECK_EQ_U(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
    CHECK_RC(msa_store_open(dir, NULL, &s, &st), MSA_ECORRUPT);
    CHECK_STR_HAS(st.msg, "unsupported store format 1");
}

TEST(read_only)
{
    const char *dir = newdir();
    msa_store_opts_t ro = {.read_only = true};
    msa_store_t *s = NULL;
    msa_status_t st;
    CHECK_RC(msa_store_open(dir, &ro, &s, &st), MSA_EIO); /* nothing there: not created */
    struct stat sb;
    CHECK(stat(dir, &sb) != 0);

    s = open_new(dir, NULL);
    CHECK(s != NULL);
    msa_schema_t sc = small_schema();
    msa_store_txn_t *w;
    msa_coll_rec_t c;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_create(w, "c", &sc, 1, &c));
    CHECK_OK(put_doc(w, &c, 1, 4, 1, "t", NULL, 0, NULL));
    CHECK_OK(msa_store_commit(w, 7));
    msa_store_close(s);

    CHECK_OK(msa_store_open(dir, &ro, &s, &st));
    CHECK_EQ_U(msa_store_last_seq(s), 7);
    CHECK_RC(msa_store_write_begin(s, &w), MSA_EINVAL);
    CHECK_RC(msa_store_grow(s), MSA_EINVAL);
    msa_store_txn_t *t;
    CHECK_OK(msa_store_read_begin(s, &t));
    CHECK_DOC(t, &c, 1, 4, "t", NULL, 0);
    msa_store_abort(t);
    CHECK_EQ_U(verify_count(s, 0, NULL, true), 0);
    msa_store_close(s);
}

/* Writes documents of 160 KiB until the map is full; grows and retries. */
TEST(map_full_and_grow)
{
    const char *dir = newdir();
    msa_store_opts_t o = {.map_size = 1u << 20, .map_max = 4u << 20};
    msa_store_t *s = open_new(dir, &o);
    CHECK(s != NULL);
    msa_schema_t sc = schema_of(8, 128, 64, true);
    msa_store_txn_t *w;
    msa_coll_rec_t c;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_create(w, "c", &sc, 1, &c));
    CHECK_OK(msa_store_commit(w, 1));

    uint64_t seq = 1, id = 0;
    int grows = 0, fulls = 0, put_fulls = 0;
    for (int iter = 0; iter < 200; iter++) {
        CHECK_OK(msa_store_write_begin(s, &w));
        int rc = put_doc(w, &c, id + 1, 640, seq + 1, "text", NULL, 0, NULL);
        if (rc == MSA_OK) {
            rc = msa_store_commit(w, seq + 1);
        } else {
            CHECK_RC(rc, MSA_EFULL);
            put_fulls++;
            /* The failed op poisons the txn: a commit refuses it. */
            CHECK_RC(msa_store_commit(w, seq + 1), MSA_EFULL);
        }
        if (rc == MSA_OK) {
            seq++;
            id++;
            continue;
        }
        CHECK_RC(rc, MSA_EFULL);
        CHECK_EQ_U(msa_store_last_seq(s), seq);
        fulls++;
        rc = msa_store_grow(s);
        if (rc == MSA_EFULL) break;
        CHECK_OK(rc);
        grows++;
    }
    CHECK_EQ_U(grows, 2); /* 1 -> 2 -> 4 MiB */
    CHECK_EQ_U(fulls, 3);
    CHECK(put_fulls > 0);
    CHECK(id > 10);
    CHECK_RC(msa_store_grow(s), MSA_EFULL);
    CHECK_EQ_U(verify_count(s, 0, NULL, true), 0);
    msa_store_close(s);

    s = open_new(dir, &o);
    CHECK(s != NULL);
    CHECK_EQ_U(msa_store_last_seq(s), seq);
    msa_store_txn_t *t;
    CHECK_OK(msa_store_read_begin(s, &t));
    for (uint64_t i = 1; i <= id; i++) CHECK_DOC(t, &c, i, 640, "text", NULL, 0);
    msa_store_abort(t);
    CHECK_RC(msa_store_grow(s), MSA_EFULL);
    msa_store_close(s);
    s = open_new(dir, NULL); /* default opts: a larger map */
    CHECK(s != NULL);
    CHECK_EQ_U(msa_store_last_seq(s), seq);
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_doc_delete(w, c.id, 1));
    CHECK_OK(put_doc(w, &c, id + 1, 640, seq + 1, "text", NULL, 0, NULL));
    CHECK_OK(msa_store_commit(w, seq + 1));
    CHECK_EQ_U(verify_count(s, 0, NULL, true), 0);
    msa_store_close(s);
}

TEST(savepoint_failure_leaves_parent_usable)
{
    msa_store_opts_t o = {.map_size = 1u << 20, .map_max = 1u << 20};
    msa_store_t *s = open_new(newdir(), &o);
    CHECK(s != NULL);
    msa_schema_t sc = schema_of(8, 128, 64, true);
    msa_store_txn_t *w;
    msa_coll_rec_t c;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_create(w, "c", &sc, 1, &c));
    CHECK_OK(put_doc(w, &c, 1, 64, 1, "small", NULL, 0, NULL));
    CHECK_OK(msa_store_savepoint_begin(w));
    CHECK_RC(put_doc(w, &c, 2, 64 * 200, 1, "huge", NULL, 0, NULL), MSA_EFULL);
    CHECK_RC(msa_store_savepoint_end(w, true), MSA_EFULL); /* undone, not merged */
    CHECK_OK(msa_store_commit(w, 1));
    msa_store_txn_t *t;
    CHECK_OK(msa_store_read_begin(s, &t));
    CHECK_DOC(t, &c, 1, 64, "small", NULL, 0);
    msa_doc_rec_t d;
    CHECK_RC(msa_store_doc_get(t, c.id, 2, &d), MSA_ENOTFOUND);
    msa_store_abort(t);
    CHECK_EQ_U(verify_count(s, 0, NULL, true), 0);
    msa_store_close(s);
}

TEST(backup)
{
    const char *dir = newdir();
    msa_store_t *s = open_new(dir, NULL);
    CHECK(s != NULL);
    msa_schema_t sc = small_schema();
    msa_store_txn_t *w, *t;
    msa_coll_rec_t c;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_create(w, "c", &sc, 1, &c));
    for (uint64_t i = 1; i <= 50; i++) CHECK_OK(put_doc(w, &c, i, 9, 1, "tx", "mx", 0, NULL));
    CHECK_OK(msa_store_commit(w, 4));
    CHECK_OK(msa_store_write_begin(s, &w)); /* freed pages: compaction has work */
    for (uint64_t i = 1; i <= 25; i++) CHECK_OK(msa_store_doc_delete(w, c.id, i));
    CHECK_OK(msa_store_commit(w, 5));

    CHECK_OK(msa_store_read_begin(s, &t)); /* a live reader does not stop a backup */
    for (int compact = 0; compact < 2; compact++) {
        const char *bk = newdir();
        uint64_t seq = 0, bytes = 0;
        msa_status_t st;
        CHECK_OK(msa_store_backup(s, bk, compact, &seq, &bytes, &st));
        CHECK_EQ_U(seq, 5);
        char p[300];
        snprintf(p, sizeof p, "%s/data.mdb", bk);
        struct stat sb;
        CHECK(stat(p, &sb) == 0);
        CHECK_EQ_U(bytes, sb.st_size);
        if (compact) CHECK(bytes < msa_store_file_bytes(s));
        CHECK_RC(msa_store_backup(s, bk, compact, &seq, &bytes, &st), MSA_EEXIST);
        CHECK_STR_HAS(st.msg, bk);

        msa_store_t *b = open_new(bk, NULL);
        CHECK(b != NULL);
        CHECK_EQ_U(msa_store_last_seq(b), 5);
        msa_store_txn_t *bt;
        msa_coll_rec_t bc;
        CHECK_OK(msa_store_read_begin(b, &bt));
        CHECK_OK(msa_store_coll_get(bt, "c", &bc));
        CHECK_EQ_U(bc.documents, 25);
        for (uint64_t i = 26; i <= 50; i++) CHECK_DOC(bt, &bc, i, 9, "tx", "mx", 0);
        msa_doc_rec_t d;
        CHECK_RC(msa_store_doc_get(bt, bc.id, 1, &d), MSA_ENOTFOUND);
        msa_store_abort(bt);
        CHECK_EQ_U(verify_count(b, 0, NULL, true), 0);
        msa_store_close(b);
    }
    msa_store_abort(t);
    uint64_t seq, bytes;
    msa_status_t st;
    char bad[300];
    snprintf(bad, sizeof bad, "%s/no/such/parent", g_root);
    CHECK_RC(msa_store_backup(s, bad, false, &seq, &bytes, &st), MSA_EIO);
    CHECK_STR_HAS(st.msg, bad);
    msa_store_close(s);
}

static bool has_problem(char **pr, size_t n, const char *a, const char *b)
{
    for (size_t i = 0; i < n; i++)
        if (strstr(pr[i], a) && (!b || strstr(pr[i], b))) return true;
    return false;
}

#define CHECK_PROBLEM(pr, n, a, b)                                                     \
    do {                                                                               \
        if (!has_problem(pr, n, a, b)) {                                               \
            for (size_t i_ = 0; i_ < (n); i_++) fprintf(stderr, "    %s\n", (pr)[i_]); \
            FAILF("no problem mentions \"%s\" and \"%s\"", a, b ? b : "");             \
        }                                                                              \
    } while (0)

TEST(verify_finds_injected_problems)
{
    const char *dir = newdir();
    msa_store_t *s = open_new(dir, NULL);
    CHECK(s != NULL);
    msa_schema_t sc = small_schema(); /* H 2, D 8, P 4, K/V BF16, R F32 */
    msa_store_txn_t *w;
    msa_coll_rec_t c, clean;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_create(w, "bad", &sc, 1, &c));
    CHECK_OK(msa_store_coll_create(w, "clean", &sc, 1, &clean));
    CHECK_OK(put_doc(w, &clean, 1, 8, 1, "t", "m", 0, NULL));
    CHECK_OK(put_doc(w, &c, 1, 8, 1, "t", "m", 0, NULL)); /* good */

    uint8_t buf[4096];
    memset(buf, 7, sizeof buf);
    size_t kv = 2 * 2 * 8 * 2, r = 2 * 2 * 8 * 4; /* 2 chunks */
    msa_store_block_t full[6] = {
        {0, MSA_BLOCK_K, buf, kv}, {0, MSA_BLOCK_V, buf, kv}, {0, MSA_BLOCK_R, buf, r},
        {1, MSA_BLOCK_K, buf, kv}, {1, MSA_BLOCK_V, buf, kv}, {1, MSA_BLOCK_R, buf, r},
    };
    msa_doc_rec_t rec = {.version = 1, .tokens = 8, .chunks = 2, .tensor_bytes = 4 * kv + 2 * r};
    msa_store_block_t blk[6];

    rec.id = 2; /* layer 7's V block missing */
    memcpy(blk, full, sizeof full);
    blk[4] = blk[5];
    rec.tensor_bytes = 3 * kv + 2 * r;
    CHECK_OK(msa_store_doc_put(w, c.id, &rec, NULL, 0, NULL, 0, blk, 5));

    rec.id = 3; /* layer 3's K block one byte short */
    memcpy(blk, full, sizeof full);
    blk[0].len = kv - 1;
    rec.tensor_bytes = 4 * kv + 2 * r - 1;
    CHECK_OK(msa_store_doc_put(w, c.id, &rec, NULL, 0, NULL, 0, blk, 6));

    rec.id = 4; /* tensor_bytes disagrees with the blocks */
    rec.tensor_bytes = 4 * kv + 2 * r + 1;
    CHECK_OK(msa_store_doc_put(w, c.id, &rec, NULL, 0, NULL, 0, full, 6));

    rec.id = 5; /* chunks disagree with tokens: 10 tokens need 3 chunks of 4 */
    rec.tokens = 10;
    rec.tensor_bytes = 4 * kv + 2 * r;
    CHECK_OK(msa_store_doc_put(w, c.id, &rec, NULL, 0, NULL, 0, full, 6));
    rec.tokens = 8;

    rec.id = 6; /* text_bytes disagrees with the text */
    rec.text_bytes = 3;
    CHECK_OK(msa_store_doc_put(w, c.id, &rec, "ab", 2, NULL, 0, full, 6));
    rec.text_bytes = 0;
    CHECK_OK(msa_store_commit(w, 1));

    char **pr = NULL;
    size_t n = 0;
    uint64_t docs = 0;
    CHECK_OK(msa_store_verify(s, c.id, &docs, &pr, &n));
    CHECK_EQ_U(docs, 6);
    CHECK_PROBLEM(pr, n, "collection bad: doc 2: layer 7 (pos 1) block V missing", NULL);
    CHECK_PROBLEM(pr, n, "doc 3: layer 3 (pos 0) block K: 63 bytes, want 64", NULL);
    CHECK_PROBLEM(pr, n, "doc 4: tensor_bytes", "blocks hold");
    CHECK_PROBLEM(pr, n, "doc 5: chunks 2", "= 3");
    CHECK_PROBLEM(pr, n, "doc 6: text_bytes 3", "text holds 2");
    CHECK(!has_problem(pr, n, "doc 1:", NULL));
    CHECK_EQ_U(n, 5);
    msa_store_problems_free(pr, n);
    CHECK_EQ_U(verify_count(s, clean.id, &docs, true), 0);
    CHECK_EQ_U(docs, 1);
    CHECK_EQ_U(verify_count(s, 0, &docs, false), 5);
    CHECK_EQ_U(docs, 7);
    msa_store_close(s);

    /* Damage the API cannot make: orphans and a record gone under its data. */
    MDB_env *env = raw_open(dir);
    CHECK(env != NULL);
    MDB_txn *txn;
    MDB_dbi blocks, text, dd;
    CHECK_EQ_U(mdb_txn_begin(env, NULL, 0, &txn), 0);
    CHECK_EQ_U(mdb_dbi_open(txn, "blocks", 0, &blocks), 0);
    CHECK_EQ_U(mdb_dbi_open(txn, "text", 0, &text), 0);
    CHECK_EQ_U(mdb_dbi_open(txn, "docs", 0, &dd), 0);
    uint8_t bk[15];
    key_doc(bk, c.id, 99);
    bk[12] = 0, bk[13] = 1, bk[14] = MSA_BLOCK_V;
    MDB_val k = {15, bk}, v = {4, "abcd"};
    CHECK_EQ_U(mdb_put(txn, blocks, &k, &v, 0), 0);
    uint8_t tk[12];
    key_doc(tk, c.id, 98);
    k = (MDB_val){12, tk};
    CHECK_EQ_U(mdb_put(txn, text, &k, &v, 0), 0);
    key_doc(tk, clean.id, 1);
    CHECK_EQ_U(mdb_del(txn, dd, &k, NULL), 0);
    CHECK_EQ_U(mdb_txn_commit(txn), 0);
    mdb_env_close(env);

    s = open_new(dir, NULL);
    CHECK(s != NULL);
    CHECK_OK(msa_store_verify(s, 0, &docs, &pr, &n));
    CHECK_EQ_U(docs, 6);
    CHECK_PROBLEM(pr, n, "collection bad: doc 99: orphan block layer_pos 1 kind V", NULL);
    CHECK_PROBLEM(pr, n, "collection bad: doc 98: orphan text", NULL);
    CHECK_PROBLEM(pr, n, "collection clean: doc 1: orphan block", NULL);
    CHECK_PROBLEM(pr, n, "collection clean: doc 1: orphan text", NULL);
    CHECK_PROBLEM(pr, n, "collection clean: doc 1: orphan metadata", NULL);
    CHECK_PROBLEM(pr, n, "collection clean: counter documents is 1", "sum to 0");
    CHECK_PROBLEM(pr, n, "collection clean: counter bytes", NULL);
    msa_store_problems_free(pr, n);
    msa_store_close(s);
}

TEST(verify_caps_problem_list)
{
    msa_store_t *s = open_new(newdir(), NULL);
    CHECK(s != NULL);
    msa_schema_t sc = small_schema();
    msa_store_txn_t *w;
    msa_coll_rec_t c;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_create(w, "c", &sc, 1, &c));
    for (uint64_t i = 1; i <= 1100; i++) {
        msa_doc_rec_t rec = {.id = i, .version = 1, .tokens = 4, .chunks = 1};
        CHECK_OK(msa_store_doc_put(w, c.id, &rec, NULL, 0, NULL, 0, NULL, 0));
    }
    CHECK_OK(msa_store_commit(w, 1));
    char **pr;
    size_t n;
    uint64_t docs;
    CHECK_OK(msa_store_verify(s, 0, &docs, &pr, &n));
    CHECK_EQ_U(docs, 1100);
    CHECK_EQ_U(n, 1000);
    CHECK_STR_HAS(pr[n - 1], "... and 5601 more problems"); /* 6 missing blocks per doc */
    msa_store_problems_free(pr, n);
    msa_store_close(s);
}

/* ---- concurrency ------------------------------------------------------------ */

struct rd {
    msa_store_t *s;
    uint32_t coll;
    atomic_bool *stop;
    atomic_int errors;
    uint64_t reads, max_seq;
    char first_error[200];
};

static void rd_fail(struct rd *r, const char *what, unsigned long long a, unsigned long long b)
{
    if (atomic_fetch_add(&r->errors, 1) == 0)
        snprintf(r->first_error, sizeof r->first_error, "%s: %llu vs %llu", what, a, b);
}

/* Each commit i rewrites doc 1 with updated_seq = i, text "seq=i" and blocks
 * filled with byte i; a snapshot must show exactly one such version, before
 * and after the writer moved on. */
static void *reader(void *arg)
{
    struct rd *r = arg;
    uint64_t last = 0, last_pub = 0;
    while (!atomic_load(r->stop)) {
        msa_store_txn_t *t;
        int rc = msa_store_read_begin(r->s, &t);
        if (rc) {
            rd_fail(r, "read_begin", (unsigned long long)-rc, 0);
            break;
        }
        uint64_t seq = msa_store_txn_seq(t);
        if (seq < last) rd_fail(r, "snapshot seq went back", seq, last);
        /* last_seq is published right after the commit returns, so it may lag
         * a snapshot for a moment, but it never goes back. */
        uint64_t ls = msa_store_last_seq(r->s);
        if (ls < last_pub) rd_fail(r, "last_seq went back", ls, last_pub);
        last_pub = ls;
        last = seq;
        for (int pass = 0; pass < 2 && seq > 1; pass++) {
            msa_doc_rec_t d = {0};
            msa_store_view_t tv = {0}, kv = {0};
            char want[32];
            snprintf(want, sizeof want, "seq=%llu", (unsigned long long)seq);
            if (msa_store_doc_get(t, r->coll, 1, &d) || d.updated_seq != seq)
                rd_fail(r, "doc version vs snapshot", d.updated_seq, seq);
            else if (msa_store_text_get(t, r->coll, 1, &tv) || tv.len != strlen(want) ||
                     memcmp(tv.data, want, tv.len) != 0)
                rd_fail(r, "text vs snapshot", tv.len, seq);
            else if (msa_store_block_get(t, r->coll, 1, 0, MSA_BLOCK_K, &kv) || kv.len == 0)
                rd_fail(r, "block missing", 0, seq);
            else
                for (size_t i = 0; i < kv.len; i++)
                    if (((const uint8_t *)kv.data)[i] != (uint8_t)seq) {
                        rd_fail(r, "block bytes vs snapshot", ((const uint8_t *)kv.data)[i], seq);
                        break;
                    }
            sched_yield(); /* let the writer commit between the two passes */
        }
        msa_store_abort(t);
        r->reads++;
    }
    r->max_seq = last;
    return NULL;
}

static int write_version(msa_store_t *s, uint32_t coll, const msa_schema_t *sc, uint64_t seq,
                         uint32_t tokens)
{
    msa_store_txn_t *w;
    int rc = msa_store_write_begin(s, &w);
    if (rc) return rc;
    msa_doc_rec_t rec = {.id = 1, .version = seq, .tokens = tokens, .updated_seq = seq};
    rec.chunks = (tokens + sc->chunk_tokens - 1) / sc->chunk_tokens;
    char text[32];
    snprintf(text, sizeof text, "seq=%llu", (unsigned long long)seq);
    rec.text_bytes = strlen(text);
    size_t len = block_len(sc, rec.chunks, MSA_BLOCK_K);
    uint8_t *b = malloc(len);
    memset(b, (uint8_t)seq, len);
    msa_store_block_t blk[4] = {{0, MSA_BLOCK_K, b, len},
                                {0, MSA_BLOCK_V, b, len},
                                {1, MSA_BLOCK_K, b, len},
                                {1, MSA_BLOCK_V, b, len}};
    rec.tensor_bytes = 4 * len;
    rc = msa_store_doc_put(w, coll, &rec, text, rec.text_bytes, NULL, 0, blk, 4);
    free(b);
    if (rc) {
        msa_store_abort(w);
        return rc;
    }
    return msa_store_commit(w, seq);
}

static void run_readers_during_writes(msa_store_opts_t *o, uint32_t head_dim, int commits,
                                      int *grows_out)
{
    msa_store_t *s = open_new(newdir(), o);
    CHECK(s != NULL);
    msa_schema_t sc = schema_of(8, head_dim, 64, false);
    msa_store_txn_t *w;
    msa_coll_rec_t c;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_create(w, "c", &sc, 1, &c));
    CHECK_OK(msa_store_commit(w, 1));

    enum { NR = 4 };
    atomic_bool stop = false;
    struct rd r[NR];
    pthread_t th[NR];
    for (int i = 0; i < NR; i++) {
        memset(&r[i], 0, sizeof r[i]);
        r[i].s = s;
        r[i].coll = c.id;
        r[i].stop = &stop;
        CHECK(pthread_create(&th[i], NULL, reader, &r[i]) == 0);
    }
    int grows = 0, failed = 0;
    uint64_t seq = 2;
    for (int i = 0; i < commits && !failed; i++, seq++) {
        /* Documents grow with seq, so a small map fills and must be grown. */
        uint32_t tokens = 64 * (1 + (uint32_t)(seq % 8)) * (o->map_size ? 8 : 1);
        int rc, tries = 0;
        while ((rc = write_version(s, c.id, &sc, seq, tokens)) == MSA_EFULL && tries++ < 8) {
            if ((rc = msa_store_grow(s)) != MSA_OK) break;
            grows++;
        }
        if (rc) {
            fprintf(stderr, "  write seq %llu: %s\n", (unsigned long long)seq, msa_errname(rc));
            failed = 1;
        }
    }
    atomic_store(&stop, true);
    uint64_t reads = 0;
    for (int i = 0; i < NR; i++) {
        pthread_join(th[i], NULL);
        reads += r[i].reads;
        if (r[i].errors) FAILF("reader %d: %d errors, first: %s", i, r[i].errors, r[i].first_error);
    }
    CHECK_EQ_U(failed, 0);
    CHECK(reads > 0);
    CHECK_EQ_U(msa_store_last_seq(s), seq - 1);
    CHECK_EQ_U(verify_count(s, 0, NULL, true), 0);
    msa_store_close(s);
    *grows_out = grows;
}

TEST(concurrent_readers_see_one_snapshot)
{
    msa_store_opts_t o = {0};
    int grows = -1;
    run_readers_during_writes(&o, 16, 400, &grows);
    CHECK_EQ_U(grows, 0);
}

TEST(grow_while_readers_run)
{
    msa_store_opts_t o = {.map_size = 1u << 20, .map_max = 64u << 20};
    int grows = 0;
    run_readers_during_writes(&o, 128, 120, &grows);
    CHECK(grows >= 1);
}

/* A thread that holds a snapshot may open a second one even while a grow is
 * waiting for the gate (no self-deadlock), and the grow then completes. */
struct grower {
    msa_store_t *s;
    atomic_int done;
    int rc;
};

static void *grow_thread(void *arg)
{
    struct grower *g = arg;
    g->rc = msa_store_grow(g->s);
    atomic_store(&g->done, 1);
    return NULL;
}

TEST(nested_read_during_pending_grow)
{
    msa_store_opts_t o = {.map_size = 1u << 20, .map_max = 8u << 20};
    msa_store_t *s = open_new(newdir(), &o);
    CHECK(s != NULL);
    msa_store_txn_t *t1, *t2;
    CHECK_OK(msa_store_read_begin(s, &t1));
    struct grower g = {.s = s};
    pthread_t th;
    CHECK(pthread_create(&th, NULL, grow_thread, &g) == 0);
    usleep(50000);
    CHECK_EQ_U(atomic_load(&g.done), 0); /* waits for our snapshot */
    CHECK_OK(msa_store_read_begin(s, &t2));
    msa_store_abort(t2);
    msa_store_abort(t1);
    pthread_join(th, NULL);
    CHECK_EQ_U(g.done, 1);
    CHECK_OK(g.rc);
    msa_store_close(s);
}

/* ---- checksums and the integrity walk ----------------------------------------- */

TEST(crc32c_known_values_and_paths_agree)
{
    CHECK_EQ_U(msa_crc32c(0, "123456789", 9), 0xe3069283u);
    CHECK_EQ_U(msa_crc32c_sw(0, "123456789", 9), 0xe3069283u);
    CHECK_EQ_U(msa_crc32c(0, NULL, 0), 0);
    uint8_t zeros[32] = {0};
    CHECK_EQ_U(msa_crc32c(0, zeros, 32), 0x8a9136aau); /* RFC 3720 B.4 */
    size_t n = 100000;
    uint8_t *b = malloc(n + 64);
    uint32_t x = 12345;
    for (size_t i = 0; i < n + 64; i++) b[i] = (uint8_t)((x = x * 1103515245u + 12345u) >> 16);
    /* Odd offsets and lengths across the 256-byte and 8 KiB stream blocks. */
    const size_t lens[] = {1, 7, 8, 9, 255, 767, 768, 769, 3 * 8192 - 1, 3 * 8192, 3 * 8192 + 13,
                           n};
    for (size_t off = 0; off < 9; off++)
        for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
            uint32_t hw = msa_crc32c(7, b + off, lens[i]), sw = msa_crc32c_sw(7, b + off, lens[i]);
            CHECK_MSG(hw == sw, "off %zu len %zu: %08x vs %08x", off, lens[i], hw, sw);
            size_t cut = lens[i] / 3;
            CHECK_EQ_U(msa_crc32c(msa_crc32c(7, b + off, cut), b + off + cut, lens[i] - cut), hw);
        }
    free(b);
    fprintf(stderr, "    crc32c: %s\n", msa_crc32c_hw() ? "SSE4.2" : "table");
}

/* Rewrites one stored value through raw LMDB: flips byte `at` of it (counted
 * from the payload, after the 8-byte header), or with dst_key set, copies the
 * value unchanged to another key. */
static int tamper(const char *dir, const char *db, const void *key, size_t klen, size_t at,
                  const void *dst_key)
{
    MDB_env *env = raw_open(dir);
    if (!env) return -1;
    MDB_txn *txn;
    MDB_dbi dbi;
    MDB_val k = {klen, (void *)key}, v;
    int rc = mdb_txn_begin(env, NULL, 0, &txn);
    if (!rc) rc = mdb_dbi_open(txn, db, 0, &dbi);
    if (!rc) rc = mdb_get(txn, dbi, &k, &v);
    uint8_t *copy = NULL;
    if (!rc) {
        copy = malloc(v.mv_size);
        memcpy(copy, v.mv_data, v.mv_size);
        if (!dst_key) {
            if (8 + at >= v.mv_size)
                rc = -2;
            else
                copy[8 + at] ^= 0x01;
        } else {
            k.mv_data = (void *)dst_key;
        }
        MDB_val nv = {v.mv_size, copy};
        if (!rc) rc = mdb_put(txn, dbi, &k, &nv, 0);
    }
    if (!rc)
        rc = mdb_txn_commit(txn);
    else
        mdb_txn_abort(txn);
    free(copy);
    mdb_env_close(env);
    return rc;
}

static void doc_key_of(uint8_t *k, uint32_t coll, uint64_t id, int pos, int kind)
{
    for (int i = 0; i < 4; i++) k[i] = (uint8_t)(coll >> (24 - 8 * i));
    for (int i = 0; i < 8; i++) k[4 + i] = (uint8_t)(id >> (56 - 8 * i));
    if (pos >= 0) {
        k[12] = (uint8_t)(pos >> 8), k[13] = (uint8_t)pos;
        k[14] = (uint8_t)kind;
    }
}

static bool has_check_problem(msa_store_t *s, bool full, const char *a, const char *b)
{
    char **pr = NULL;
    size_t n = 0;
    uint64_t d;
    if (msa_store_check(s, full, &d, &pr, &n)) return false;
    bool found = false;
    for (size_t i = 0; i < n && !found; i++) found = strstr(pr[i], a) && (!b || strstr(pr[i], b));
    if (!found)
        for (size_t i = 0; i < n; i++) fprintf(stderr, "    check problem: %s\n", pr[i]);
    msa_store_problems_free(pr, n);
    return found;
}

TEST(checksum_mismatch_detected_by_reads_and_verify)
{
    const char *dir = newdir();
    msa_store_t *s = open_new(dir, NULL);
    CHECK(s != NULL);
    msa_schema_t sc = schema_of(2, 64, 4, true);
    msa_store_txn_t *w;
    msa_coll_rec_t c;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_create(w, "cs", &sc, 1, &c));
    /* 400 tokens: K/V blocks of 25600 bytes (overflow pages). */
    for (uint64_t id = 1; id <= 4; id++)
        CHECK_OK(put_doc(w, &c, id, id == 1 ? 400 : 8, 2, "some text", "{\"m\":1}", 0, NULL));
    CHECK_OK(msa_store_commit(w, 2));
    CHECK_EQ_I(verify_count(s, 0, NULL, true), 0);
    msa_store_close(s);

    uint8_t k1[15], k2[15], k3[12], k4[12], kd[12];
    doc_key_of(k1, c.id, 1, 1, MSA_BLOCK_V); /* a byte deep inside doc 1's V block */
    CHECK_EQ_I(tamper(dir, "blocks", k1, 15, 20000, NULL), 0);
    doc_key_of(k2, c.id, 2, 0, MSA_BLOCK_K); /* doc 2's K block of layer 0 <- doc 3's */
    uint8_t k2src[15];
    doc_key_of(k2src, c.id, 3, 0, MSA_BLOCK_K);
    CHECK_EQ_I(tamper(dir, "blocks", k2src, 15, 0, k2), 0);
    doc_key_of(k3, c.id, 3, -1, 0);
    CHECK_EQ_I(tamper(dir, "text", k3, 12, 2, NULL), 0);
    doc_key_of(k4, c.id, 4, -1, 0);
    CHECK_EQ_I(tamper(dir, "metadata", k4, 12, 0, NULL), 0);

    s = open_new(dir, NULL);
    CHECK(s != NULL);
    msa_store_txn_t *t;
    msa_store_view_t v;
    CHECK_OK(msa_store_read_begin(s, &t));
    CHECK_RC(msa_store_block_get(t, c.id, 1, 1, MSA_BLOCK_V, &v), MSA_ECORRUPT);
    CHECK_OK(msa_store_block_get(t, c.id, 1, 1, MSA_BLOCK_K, &v)); /* its neighbours are fine */
    CHECK_OK(msa_store_block_get(t, c.id, 1, 0, MSA_BLOCK_V, &v));
    /* Intact bytes under another key: the key is part of the checksum. */
    CHECK_RC(msa_store_block_get(t, c.id, 2, 0, MSA_BLOCK_K, &v), MSA_ECORRUPT);
    CHECK_RC(msa_store_text_get(t, c.id, 3, &v), MSA_ECORRUPT);
    CHECK_OK(msa_store_meta_get(t, c.id, 3, &v));
    CHECK_RC(msa_store_meta_get(t, c.id, 4, &v), MSA_ECORRUPT);
    CHECK_OK(msa_store_text_get(t, c.id, 4, &v));
    msa_store_abort(t);

    char **pr;
    size_t n;
    uint64_t docs;
    CHECK_OK(msa_store_verify(s, 0, &docs, &pr, &n));
    CHECK_EQ_U(docs, 4);
    CHECK_PROBLEM(pr, n, "collection cs: doc 1: layer 7 (pos 1) block V: checksum mismatch", NULL);
    CHECK_PROBLEM(pr, n, "collection cs: doc 2: layer 3 (pos 0) block K: checksum mismatch", NULL);
    CHECK_PROBLEM(pr, n, "collection cs: doc 3: text: checksum mismatch", NULL);
    CHECK_PROBLEM(pr, n, "collection cs: doc 4: metadata: checksum mismatch", NULL);
    CHECK_EQ_U(n, 4);
    msa_store_problems_free(pr, n);
    /* The walk: full reads every value, quick only the keys. */
    CHECK(has_check_problem(s, true, "blocks: collection cs: doc 1: layer_pos 1 block V",
                            "checksum mismatch"));
    CHECK(has_check_problem(s, true, "metadata: collection cs: doc 4", "checksum mismatch"));
    CHECK_OK(msa_store_check(s, false, &docs, &pr, &n));
    CHECK_EQ_U(n, 0);
    msa_store_problems_free(pr, n);
    msa_store_close(s);

    /* A damaged document record: reads of it and verify fail, naming it. */
    CHECK_EQ_I(tamper(dir, "docs", (doc_key_of(kd, c.id, 4, -1, 0), kd), 12, 3, NULL), 0);
    s = open_new(dir, NULL);
    CHECK(s != NULL);
    CHECK_OK(msa_store_read_begin(s, &t));
    msa_doc_rec_t d;
    CHECK_RC(msa_store_doc_get(t, c.id, 4, &d), MSA_ECORRUPT);
    msa_store_abort(t);
    CHECK_OK(msa_store_verify(s, 0, &docs, &pr, &n));
    CHECK_PROBLEM(pr, n, "collection cs: doc 4: record checksum mismatch", NULL);
    msa_store_problems_free(pr, n);
    msa_store_close(s);
}

/* Page p of data.mdb overwritten with bytes derived from seed. */
static void smash_page(const char *dir, size_t page, unsigned seed)
{
    char path[300];
    snprintf(path, sizeof path, "%s/data.mdb", dir);
    int fd = open(path, O_WRONLY);
    uint8_t buf[4096];
    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = (uint8_t)((seed = seed * 1103515245u + 12345u) >> 16);
    if (fd >= 0) {
        ssize_t wr = pwrite(fd, buf, sizeof buf, (off_t)(page * 4096));
        (void)wr;
        close(fd);
    }
}

TEST(check_file_in_a_child)
{
    const char *dir = newdir();
    uint64_t bytes = 1;
    msa_status_t st;
    /* Nothing there yet: nothing to check. */
    CHECK_OK(msa_store_check_file(dir, MSA_STORE_CHECK_FULL, &bytes, &st));
    CHECK_EQ_U(bytes, 0);
    msa_store_t *s = open_new(dir, NULL);
    CHECK(s != NULL);
    msa_schema_t sc = schema_of(2, 64, 4, false);
    msa_store_txn_t *w;
    msa_coll_rec_t c;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_create(w, "f", &sc, 1, &c));
    /* One document of big blocks (K/V of 6 pages each), then small ones; some
     * replaced and deleted so the freelist holds pages. */
    CHECK_OK(put_doc(w, &c, 1, 400, 2, "big", NULL, 0, NULL));
    for (uint64_t id = 2; id <= 40; id++) CHECK_OK(put_doc(w, &c, id, 8, 2, "t", "m", 0, NULL));
    CHECK_OK(msa_store_commit(w, 2));
    CHECK_OK(msa_store_write_begin(s, &w));
    for (uint64_t id = 2; id <= 40; id += 3) CHECK_OK(msa_store_doc_delete(w, c.id, id));
    CHECK_OK(put_doc(w, &c, 5, 12, 3, "t2", NULL, 1, NULL));
    CHECK_OK(msa_store_commit(w, 3));
    CHECK_EQ_I(verify_count(s, 0, NULL, true), 0);
    msa_store_close(s);

    CHECK_OK(msa_store_check_file(dir, MSA_STORE_CHECK_FULL, &bytes, &st));
    CHECK(bytes > 0);
    CHECK_OK(msa_store_check_file(dir, MSA_STORE_CHECK_QUICK, &bytes, &st));
    CHECK_OK(msa_store_check_file(dir, MSA_STORE_CHECK_OFF, &bytes, &st));
    CHECK_EQ_U(bytes, 0);

    /* Find the pages of doc 1's K block of layer 0: its 8-byte header sits
     * right after an overflow page's 16-byte header. Smash the page after it. */
    s = open_new(dir, NULL);
    CHECK(s != NULL);
    msa_store_txn_t *t;
    msa_store_view_t v;
    CHECK_OK(msa_store_read_begin(s, &t));
    CHECK_OK(msa_store_block_get(t, c.id, 1, 0, MSA_BLOCK_K, &v));
    char path[300];
    snprintf(path, sizeof path, "%s/data.mdb", dir);
    int fd = open(path, O_RDONLY);
    CHECK(fd >= 0);
    struct stat sb;
    CHECK(fstat(fd, &sb) == 0);
    uint8_t *file = malloc((size_t)sb.st_size);
    CHECK(pread(fd, file, (size_t)sb.st_size, 0) == sb.st_size);
    close(fd);
    size_t page = 0;
    for (size_t pg = 2; pg * 4096 < (size_t)sb.st_size && !page; pg++)
        if (memcmp(file + pg * 4096 + 24, v.data, 4096 - 24) == 0) page = pg;
    free(file);
    msa_store_abort(t);
    msa_store_close(s);
    CHECK(page > 0);
    smash_page(dir, page + 1, 7);

    /* Refused by the full walk, naming the file and the block; quick does not
     * read values, so it passes. */
    CHECK_RC(msa_store_check_file(dir, MSA_STORE_CHECK_FULL, &bytes, &st), MSA_ECORRUPT);
    CHECK_STR_HAS(st.msg, "data.mdb: integrity walk: 1 problem: blocks: collection f: doc 1: "
                          "layer_pos 0 block K: checksum mismatch");
    CHECK_STR_HAS(st.msg, "restore it from a backup");
    CHECK_OK(msa_store_check_file(dir, MSA_STORE_CHECK_QUICK, &bytes, &st));
    /* Without the walk, the read of that block fails instead of returning wrong bytes. */
    s = open_new(dir, NULL);
    CHECK(s != NULL);
    CHECK_OK(msa_store_read_begin(s, &t));
    CHECK_RC(msa_store_block_get(t, c.id, 1, 0, MSA_BLOCK_K, &v), MSA_ECORRUPT);
    CHECK_OK(msa_store_block_get(t, c.id, 1, 0, MSA_BLOCK_V, &v));
    msa_store_abort(t);
    /* The lock is held: the child skips, leaving the report to the open. */
    CHECK_OK(msa_store_check_file(dir, MSA_STORE_CHECK_FULL, &bytes, &st));
    CHECK_EQ_U(bytes, 0);
    msa_store_close(s);

    /* A garbage file: refused as msa_store_open refuses it. */
    const char *g = newdir();
    CHECK(mkdir(g, 0700) == 0);
    snprintf(path, sizeof path, "%s/data.mdb", g);
    fd = open(path, O_WRONLY | O_CREAT, 0600);
    CHECK(fd >= 0);
    CHECK(ftruncate(fd, 65536) == 0);
    close(fd);
    smash_page(g, 0, 1);
    smash_page(g, 1, 2);
    CHECK_RC(msa_store_check_file(g, MSA_STORE_CHECK_QUICK, &bytes, &st), MSA_ECORRUPT);
    CHECK_STR_HAS(st.msg, "data.mdb");
}

TEST(walk_finds_freelist_and_structure_damage)
{
    const char *dir = newdir();
    msa_store_t *s = open_new(dir, NULL);
    CHECK(s != NULL);
    msa_schema_t sc = small_schema();
    msa_store_txn_t *w;
    msa_coll_rec_t c;
    CHECK_OK(msa_store_write_begin(s, &w));
    CHECK_OK(msa_store_coll_create(w, "s", &sc, 1, &c));
    for (uint64_t id = 1; id <= 300; id++) CHECK_OK(put_doc(w, &c, id, 8, 2, "t", NULL, 0, NULL));
    CHECK_OK(msa_store_commit(w, 2));
    CHECK_OK(msa_store_write_begin(s, &w));
    for (uint64_t id = 1; id <= 300; id += 2) CHECK_OK(msa_store_doc_delete(w, c.id, id));
    CHECK_OK(msa_store_commit(w, 3));
    CHECK_EQ_I(verify_count(s, 0, NULL, true), 0);
    msa_store_close(s);

    /* Every data page overwritten in turn: the child never lets a damaged
     * page through silently. It may find problems, crash, or (for a free
     * page) pass, in which case every document still reads back intact. */
    char path[300];
    snprintf(path, sizeof path, "%s/data.mdb", dir);
    struct stat sb;
    CHECK(stat(path, &sb) == 0);
    size_t npages = (size_t)sb.st_size / 4096;
    char *orig = malloc((size_t)sb.st_size);
    int fd = open(path, O_RDONLY);
    CHECK(pread(fd, orig, (size_t)sb.st_size, 0) == sb.st_size);
    close(fd);
    unsigned refused = 0, passed = 0;
    for (size_t pg = 2; pg < npages; pg++) {
        smash_page(dir, pg, (unsigned)pg);
        uint64_t bytes;
        msa_status_t st;
        int rc = msa_store_check_file(dir, MSA_STORE_CHECK_FULL, &bytes, &st);
        if (rc) {
            CHECK_RC(rc, MSA_ECORRUPT);
            CHECK_STR_HAS(st.msg, "data.mdb");
            refused++;
        } else {
            passed++;
            s = open_new(dir, NULL);
            CHECK(s != NULL);
            msa_store_txn_t *t;
            CHECK_OK(msa_store_read_begin(s, &t));
            for (uint64_t id = 2; id <= 300; id += 2) CHECK_DOC(t, &c, id, 8, "t", NULL, 0);
            msa_store_abort(t);
            msa_store_close(s);
        }
        fd = open(path, O_WRONLY);
        CHECK(pwrite(fd, orig + pg * 4096, 4096, (off_t)(pg * 4096)) == 4096);
        close(fd);
    }
    free(orig);
    fprintf(stderr, "    %zu pages: %u refused, %u passed (free pages) with data intact\n",
            npages - 2, refused, passed);
    CHECK(refused > 0);
}

/* ==== main =================================================================== */

static const msa_test_t tests[] = {
    TEST_ENTRY(create_reopen),
    TEST_ENTRY(collection_ids_not_reused),
    TEST_ENTRY(savepoint_keep_and_undo),
    TEST_ENTRY(abort_writes_nothing),
    TEST_ENTRY(counters_put_replace_delete_drop),
    TEST_ENTRY(doc_list_paging),
    TEST_ENTRY(foreach),
    TEST_ENTRY(drop_removes_everything),
    TEST_ENTRY(duplicates_and_not_found),
    TEST_ENTRY(second_open_is_refused),
    TEST_ENTRY(garbage_file_is_corrupt),
    TEST_ENTRY(truncated_file_is_an_error),
    TEST_ENTRY(foreign_lmdb_and_wrong_format),
    TEST_ENTRY(read_only),
    TEST_ENTRY(map_full_and_grow),
    TEST_ENTRY(savepoint_failure_leaves_parent_usable),
    TEST_ENTRY(backup),
    TEST_ENTRY(verify_finds_injected_problems),
    TEST_ENTRY(verify_caps_problem_list),
    TEST_ENTRY(concurrent_readers_see_one_snapshot),
    TEST_ENTRY(grow_while_readers_run),
    TEST_ENTRY(nested_read_during_pending_grow),
    TEST_ENTRY(crc32c_known_values_and_paths_agree),
    TEST_ENTRY(checksum_mismatch_detected_by_reads_and_verify),
    TEST_ENTRY(check_file_in_a_child),
    TEST_ENTRY(walk_finds_freelist_and_structure_damage),
};

int main(int argc, char **argv)
{
    if (!msa_test_tmpdir(g_root, sizeof g_root, "store")) return 1;
    int rc = msa_test_run(tests, sizeof tests / sizeof tests[0], argc, argv);
    msa_test_tmpdir_done(g_root, rc);
    return rc;
}
