/* fuzz_rpc.c — libFuzzer target for request decoding and validation.
 *
 * Input: one selector byte, then a serialized request message. The selector
 * picks one of the rpc layer's real handlers (rpc/methods.c, via the method
 * table): protobuf-c unpack -> proto-to-engine conversion -> the engine's
 * validation and, for well-formed requests, the real write path (group commit,
 * index apply) and read path (route, attend, get) of an in-process engine.
 *
 * The engine is opened once per process on a temporary LMDB directory (nosync,
 * CPU backend, one compute thread) with three fixed collections that cover
 * every dtype and reduction (see fixture_collections; tests/fuzz/make_corpus.py
 * builds seeds against the same schemas). At exit the store is verified: a
 * request that corrupted the store or the index fails the run.
 *
 * Unpacked requests live in individually malloc'd blocks (not the per-call
 * arena), so AddressSanitizer sees exact bounds for every decoded field.
 *
 * Selector (data[0] % N_SEL), stable because the seed corpus depends on it:
 *   0 Write  1 Route  2 Attend  3 CreateCollection  4 Get  5 List
 *   6 DescribeCollection  7 ListCollections  8 DropCollection  9 Stats
 *   10 Backup  11 Verify  12 HealthCheck
 */
#define _GNU_SOURCE /* nftw */
#include "engine.h"
#include "memory.pb-c.h"
#include "methods.h"
#include "metrics.h"
#include "msa_log.h"

#include <ftw.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *const sel_names[] = {
    "Write",
    "Route",
    "Attend",
    "CreateCollection",
    "Get",
    "List",
    "DescribeCollection",
    "ListCollections",
    "DropCollection",
    "Stats",
    "Backup",
    "Verify",
    "HealthCheck",
};
#define N_SEL (sizeof(sel_names) / sizeof(sel_names[0]))

static const msa_rpc_method_t *sel[N_SEL];
static msa_engine_t *eng;
static msa_rpc_metrics_t mx;
static atomic_int stopping;
static msa_rpc_ctx_t ctx;
static char root[256], data_dir[300], backup_dir[300];
static bool verbose; /* MSA_FUZZ_VERBOSE=1: one line per input (checking seeds) */

#define DIE(...)                                   \
    do {                                           \
        fprintf(stderr, "fuzz_rpc: " __VA_ARGS__); \
        fputc('\n', stderr);                       \
        abort();                                   \
    } while (0)

/* ==== malloc-backed protobuf-c allocator ======================================== */

/* Every block is its own malloc, chained for one free at the end of the input. */
typedef struct blk {
    struct blk *next;
    size_t pad; /* keeps the payload 16-byte aligned */
} blk_t;

static void *pb_alloc(void *arg, size_t n)
{
    blk_t **head = arg;
    blk_t *b = malloc(sizeof(blk_t) + (n ? n : 1));
    if (!b) return NULL;
    b->next = *head;
    *head = b;
    return b + 1;
}
static void pb_free(void *arg, void *p)
{
    (void)arg, (void)p;
}

static void blocks_free(blk_t *b)
{
    while (b) {
        blk_t *next = b->next;
        free(b);
        b = next;
    }
}

/* ==== fixture ==================================================================== */

/* The fixed collections. make_corpus.py mirrors these numbers. */
static void fixture_collections(void)
{
    msa_schema_t s[3];
    memset(s, 0, sizeof s);
    /* "c": BF16, two layers, COSINE, HEAD_MEAN, QUERY_MAX, CHUNK_MAX, model "m". */
    s[0].n_layers = 2, s[0].layers[0] = 0, s[0].layers[1] = 3;
    s[0].kv_heads = 2, s[0].query_heads = 4, s[0].head_dim = 8, s[0].chunk_tokens = 4;
    s[0].kv_dtype = MSA_DT_BF16, s[0].routing_dtype = MSA_DT_BF16;
    s[0].similarity = MSA_SIM_COSINE, s[0].head_reduce = MSA_HEAD_MEAN;
    s[0].query_reduce = MSA_QUERY_MAX, s[0].chunk_reduce = MSA_CHUNK_MAX;
    s[0].default_top_k = 4;
    snprintf(s[0].model, sizeof s[0].model, "m");
    /* "s": F32 K/V, I8 routing, separate router keys, DOT, HEAD_MAX, QUERY_MEAN, CHUNK_MEAN. */
    s[1].n_layers = 1, s[1].layers[0] = 1;
    s[1].kv_heads = 1, s[1].query_heads = 2, s[1].head_dim = 4, s[1].chunk_tokens = 2;
    s[1].kv_dtype = MSA_DT_F32, s[1].routing_dtype = MSA_DT_I8;
    s[1].separate_router_keys = true;
    s[1].similarity = MSA_SIM_DOT, s[1].head_reduce = MSA_HEAD_MAX;
    s[1].query_reduce = MSA_QUERY_MEAN, s[1].chunk_reduce = MSA_CHUNK_MEAN;
    s[1].default_top_k = 2;
    /* "h": F16, one head of two values, one token per chunk, QUERY_LAST. */
    s[2].n_layers = 1, s[2].layers[0] = 0;
    s[2].kv_heads = 1, s[2].query_heads = 1, s[2].head_dim = 2, s[2].chunk_tokens = 1;
    s[2].kv_dtype = MSA_DT_F16, s[2].routing_dtype = MSA_DT_F16;
    s[2].similarity = MSA_SIM_DOT, s[2].query_reduce = MSA_QUERY_LAST;
    s[2].default_top_k = 8;
    static const char *const names[3] = {"c", "s", "h"};
    for (int i = 0; i < 3; i++) {
        msa_engine_create_collection_result_t *ci = NULL;
        msa_status_t st;
        if (msa_engine_create_collection(eng, names[i], &s[i], &ci, &st))
            DIE("create %s: %s", names[i], st.msg);
        msa_engine_create_collection_result_free(ci);
    }
}

/* One document per fixture collection, so Route/Attend/Get have rows to work on. */
static void fixture_docs(void)
{
    static float kv_s[2 * 1 * 4], rk_s[2 * 1 * 4];
    static uint16_t kv_c[1 * 2 * 8], kv_h[3 * 1 * 2];
    for (int i = 0; i < 8; i++) kv_s[i] = (float)(i % 5) - 2.0f, rk_s[i] = 0.25f * (float)i;
    for (int i = 0; i < 16; i++) kv_c[i] = (uint16_t)(0x3f80 + 0x10 * i); /* BF16 around 1.0 */
    for (int i = 0; i < 6; i++) kv_h[i] = (uint16_t)(0x3c00 + 0x100 * i); /* F16 from 1.0 */
    struct {
        const char *coll;
        msa_engine_layer_kv_t l[2];
        uint32_t nl, tokens;
        const char *model;
    } d[3] = {
        {"c",
         {{.layer = 0,
           .k = {MSA_DT_BF16, 3, {1, 2, 8}, kv_c, sizeof kv_c},
           .v = {MSA_DT_BF16, 3, {1, 2, 8}, kv_c, sizeof kv_c}},
          {.layer = 3,
           .k = {MSA_DT_BF16, 3, {1, 2, 8}, kv_c, sizeof kv_c},
           .v = {MSA_DT_BF16, 3, {1, 2, 8}, kv_c, sizeof kv_c}}},
         2,
         3,
         "m"},
        {"s",
         {{.layer = 1,
           .k = {MSA_DT_F32, 3, {2, 1, 4}, kv_s, sizeof kv_s},
           .v = {MSA_DT_F32, 3, {2, 1, 4}, kv_s, sizeof kv_s},
           .router_k = {MSA_DT_F32, 3, {2, 1, 4}, rk_s, sizeof rk_s}}},
         1,
         4,
         NULL},
        {"h",
         {{.layer = 0,
           .k = {MSA_DT_F16, 3, {3, 1, 2}, kv_h, sizeof kv_h},
           .v = {MSA_DT_F16, 3, {3, 1, 2}, kv_h, sizeof kv_h}}},
         1,
         3,
         NULL},
    };
    for (int i = 0; i < 3; i++) {
        msa_engine_write_op_t op;
        memset(&op, 0, sizeof op);
        op.kind = MSA_OP_PUT;
        op.put = (msa_engine_doc_t){.id = 1,
                                    .text = "seed",
                                    .text_len = 4,
                                    .metadata = "{}",
                                    .metadata_len = 2,
                                    .tokens = d[i].tokens,
                                    .n_layers = d[i].nl,
                                    .layers = d[i].l};
        msa_engine_write_req_t req = {
            .collection = d[i].coll, .model = d[i].model, .n_ops = 1, .ops = &op};
        msa_engine_write_result_t *res = NULL;
        msa_status_t st;
        if (msa_engine_write(eng, &req, &res, &st)) DIE("seed %s: %s", d[i].coll, st.msg);
        msa_engine_write_result_free(res);
    }
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag;
    (void)ftw;
    remove(p);
    return 0;
}

/* Removes dir and everything below it. */
static void rm_tree(const char *dir)
{
    nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static void at_exit(void)
{
    if (!eng) return;
    /* Whatever the inputs did, the store and the index must still agree. */
    msa_status_t st;
    msa_engine_verify_result_t *v = NULL;
    int rc = msa_engine_verify(eng, NULL, &v, &st);
    if (rc) DIE("verify at exit: %s", st.msg);
    for (size_t i = 0; i < v->n_problems; i++)
        fprintf(stderr, "fuzz_rpc: verify problem: %s\n", v->problems[i]);
    size_t n = v->n_problems;
    unsigned long long checked = v->docs_checked;
    msa_engine_verify_result_free(v);
    if (n) DIE("verify at exit: %zu problems in %llu documents", n, (unsigned long long)checked);
    msa_engine_close(eng);
    eng = NULL;
    msa_rpc_metrics_free(&mx);
    rm_tree(root);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    msa_log_setup(getenv("MSA_FUZZ_LOG") ? getenv("MSA_FUZZ_LOG") : "off", 0);
    const char *tmp = getenv("TMPDIR");
    /* tmpfs when there is one: LMDB is faster there and nothing reaches a disk. */
    if (!tmp) tmp = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(root, sizeof root, "%s/msa-fuzz-rpc-XXXXXX", tmp);
    if (!mkdtemp(root)) DIE("mkdtemp %s failed", root);
    snprintf(data_dir, sizeof data_dir, "%s/data", root);
    snprintf(backup_dir, sizeof backup_dir, "%s/backup", root);
    if (mkdir(backup_dir, 0700)) DIE("mkdir %s failed", backup_dir);

    msa_engine_config_t cfg = {.data_dir = data_dir,
                               .backend = MSA_BACKEND_CPU,
                               .threads = 1,
                               .nosync = true,
                               .map_size = 8u << 20,
                               .map_max = 256u << 20,
                               .backup_dir = backup_dir,
                               .min_seq_wait_ms = 1};
    msa_status_t st;
    if (msa_engine_open(&cfg, &eng, &st)) DIE("engine open: %s", st.msg);
    fixture_collections();
    fixture_docs();

    for (size_t i = 0; i < N_SEL; i++) {
        for (size_t j = 0; j < msa__rpc_n_methods; j++)
            if (!strcmp(msa__rpc_methods[j].name, sel_names[i])) sel[i] = &msa__rpc_methods[j];
        if (!sel[i]) DIE("method %s not in the method table", sel_names[i]);
    }
    if (msa_rpc_metrics_init(&mx, msa__rpc_n_methods, msa__rpc_method_names))
        DIE("metrics init failed");
    ctx =
        (msa_rpc_ctx_t){.engine = eng, .metrics = &mx, .max_send = 4u << 20, .stopping = &stopping};
    verbose = getenv("MSA_FUZZ_VERBOSE") != NULL;
    atexit(at_exit);
    return 0;
}

/* DropCollection of a fixture collection would leave the other methods with
 * nothing to work on: such inputs are skipped (any other name is dropped). */
static bool drops_fixture(const uint8_t *data, size_t len)
{
    Msa__V1__DropCollectionRequest *r = msa__v1__drop_collection_request__unpack(NULL, len, data);
    if (!r) return false;
    bool fixture =
        r->name && (!strcmp(r->name, "c") || !strcmp(r->name, "s") || !strcmp(r->name, "h"));
    msa__v1__drop_collection_request__free_unpacked(r, NULL);
    return fixture;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    size_t which = data[0] % N_SEL;
    const msa_rpc_method_t *m = sel[which];
    const uint8_t *msg = data + 1;
    size_t len = size - 1;
    if (which == 8 && drops_fixture(msg, len)) return 0;

    blk_t *blocks = NULL;
    msa_rpc_arena_t arena;
    msa_rpc_arena_init(&arena);
    arena.pb.alloc = pb_alloc;
    arena.pb.free = pb_free;
    arena.pb.allocator_data = &blocks;
    /* The input is copied so that a read one past the message is caught even
     * where libFuzzer's buffer would hide it. */
    uint8_t *copy = malloc(len ? len : 1);
    if (len) memcpy(copy, msg, len);
    msa_rpc_req_t req = {
        .data = copy, .len = len, .deadline_ms = msa__rpc_now_ms() + 2000, .arena = &arena};
    msa_rpc_reply_t rep = {0};
    msa_status_t st;
    msa_status_clear(&st);
    int rc = m->fn(&ctx, &req, &rep, &st);
    if (verbose) fprintf(stderr, "fuzz_rpc: %s -> %s %s\n", m->name, msa_errname(rc), st.msg);
    if (rc == MSA_OK) {
        if (!rep.data) DIE("%s: MSA_OK without a reply", m->name);
        free(rep.data);
    } else {
        if (rep.data) DIE("%s: error %d with a reply", m->name, rc);
        if (rc > 0 || !strcmp(msa_errname(rc), "EUNKNOWN") || !st.msg[0])
            DIE("%s: error %d (%s) without a proper status: '%s'", m->name, rc, msa_errname(rc),
                st.msg);
        if (rc == MSA_EBROKEN || rc == MSA_EINTERNAL || rc == MSA_ECORRUPT)
            DIE("%s: a bad request broke the engine: %s: %s", m->name, msa_errname(rc), st.msg);
    }
    msa_rpc_arena_reset(&arena);
    blocks_free(blocks);
    free(copy);
    /* Backups succeed for any clean name: keep the directory empty. */
    if (which == 10 && rc == MSA_OK) {
        rm_tree(backup_dir);
        if (mkdir(backup_dir, 0700)) DIE("mkdir %s failed", backup_dir);
    }
    return 0;
}
