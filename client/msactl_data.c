/* msactl_data.c — the data commands of msactl: docs (list, get, delete), put, route and
 * attend. Tensors cross the command line as NumPy .npy files (client/npy.h: F32 '<f4',
 * F16 '<f2', BF16 as raw bits '<u2').
 */
#include "msactl.h"
#include "npy.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* ======================================================================================
 * Helpers
 * ==================================================================================== */

/* Reads a whole file (text or metadata). Exits EXIT_USAGE on failure. */
static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) exit(ctl_usage("%s: %s", path, strerror(errno)));
    size_t cap = 1 << 16, n = 0;
    char *b = malloc(cap);
    for (;;) {
        if (!b) exit(ctl_usage("out of memory"));
        size_t r = fread(b + n, 1, cap - n - 1, f);
        n += r;
        if (r == 0) break;
        if (n + 1 >= cap) b = realloc(b, cap *= 2);
    }
    fclose(f);
    b[n] = '\0';
    *len = n;
    return b;
}

/* Loads an .npy into a wire tensor. conv = DTYPE_UNSPECIFIED keeps the file's dtype
 * (F32, F16 or BF16), else converts to conv. promote: a 2-D array [a, b] becomes [1, a, b]
 * (one query token). Exits EXIT_USAGE on failure. */
static void load_tensor(const char *path, Msa__V1__DType conv, bool promote, Msa__V1__Tensor *t)
{
    msa_cli_npy_t a;
    msa_status_t st;
    if (msa_cli_npy_read(path, &a, &st) != MSA_OK) exit(ctl_usage("%s", st.msg));
    Msa__V1__DType dt = (Msa__V1__DType)a.dtype;
    if (dt != MSA__V1__DTYPE__F32 && dt != MSA__V1__DTYPE__F16 && dt != MSA__V1__DTYPE__BF16)
        exit(ctl_usage("%s: dtype %s: want float32 ('<f4'), float16 ('<f2') or bf16 bits ('<u2')",
                       path, msa_cli_npy_descr(a.dtype) ? msa_cli_npy_descr(a.dtype) : "?"));
    uint32_t shape[4];
    size_t nd = a.ndim;
    memcpy(shape, a.shape, sizeof(uint32_t) * a.ndim);
    if (promote && nd == 2) {
        shape[2] = shape[1];
        shape[1] = shape[0];
        shape[0] = 1;
        nd = 3;
    }
    if (nd != 3)
        exit(ctl_usage("%s: %u dimensions, want 3 ([rows, heads, head_dim])", path, a.ndim));
    msa_cli_status_t cst;
    Msa__V1__Tensor raw;
    if (msa_cli_tensor_from_raw(&raw, dt, shape, nd, a.data, a.nbytes, &cst) != MSA_OK)
        exit(ctl_usage("%s: %s", path, cst.msg));
    msa_cli_npy_free(&a);
    if (conv == MSA__V1__DTYPE__DTYPE_UNSPECIFIED || conv == dt) {
        *t = raw;
        return;
    }
    float *f;
    size_t n;
    if (msa_cli_tensor_to_f32_alloc(&raw, &f, &n, &cst) != MSA_OK ||
        msa_cli_tensor_from_f32(t, conv, shape, nd, f, &cst) != MSA_OK)
        exit(ctl_usage("%s: %s", path, cst.msg));
    free(f);
    msa_cli_tensor_clear(&raw);
}

/* Splits "L:a:b[:c]" into layer and up to max_parts paths (empty parts allowed, NULL
 * when absent). Returns the number of paths given. Exits on a malformed spec. */
static int layer_spec(const char *spec, uint32_t *layer, char **parts, int max_parts)
{
    char *dup = strdup(spec);
    char *colon = strchr(dup, ':');
    if (!colon) exit(ctl_usage("--layer %s: want L:FILE[:FILE...]", spec));
    *colon = '\0';
    *layer = ctl_u32("--layer", dup);
    int n = 0;
    char *p = colon + 1;
    for (int i = 0; i < max_parts; i++) parts[i] = NULL;
    while (p) {
        if (n == max_parts)
            exit(ctl_usage("--layer %s: too many files (at most %d)", spec, max_parts));
        char *next = strchr(p, ':');
        if (next) *next++ = '\0';
        parts[n++] = p;
        p = next;
    }
    return n;
}

static cJSON *jarr_u64(const uint64_t *v, size_t n)
{
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; i < n; i++) cJSON_AddItemToArray(a, ju64(v[i]));
    return a;
}
static cJSON *jarr_f32(const float *v, size_t n)
{
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(v[i]));
    return a;
}
static cJSON *jshape(const Msa__V1__Tensor *t)
{
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; i < t->n_shape; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber(t->shape[i]));
    return a;
}
static void shape_str(const Msa__V1__Tensor *t, char *b, size_t len)
{
    size_t o = 0;
    o += (size_t)snprintf(b + o, len - o, "[");
    for (size_t i = 0; i < t->n_shape && o < len; i++)
        o += (size_t)snprintf(b + o, len - o, "%s%u", i ? "," : "", t->shape[i]);
    if (o < len) snprintf(b + o, len - o, "]");
}

static void mkdir_p(const char *dir)
{
    if (mkdir(dir, 0777) != 0 && errno != EEXIST) exit(ctl_usage("%s: %s", dir, strerror(errno)));
}

static int write_npy(const char *dir, const char *name, const Msa__V1__Tensor *t, char *path,
                     size_t plen)
{
    snprintf(path, plen, "%s/%s", dir, name);
    msa_status_t st;
    if (msa_cli_npy_write(path, (msa_dtype_t)t->dtype, (uint32_t)t->n_shape, t->shape, t->data.data,
                          t->data.len, &st) != MSA_OK)
        return ctl_usage("%s", st.msg);
    return EXIT_OK;
}

/* ======================================================================================
 * docs
 * ==================================================================================== */

static const char DOCS_HELP[] =
    "usage: msactl docs list COLL [--after ID] [--limit N] [--all]\n"
    "       msactl docs get COLL ID [ID...] [--no-text] [--no-metadata] [--no-tensors]\n"
    "                       [--layers LIST] [--full-text] [--out-dir DIR] [--min-seq S]\n"
    "       msactl docs delete COLL ID [ID...] [--expect-version V]\n"
    "\n"
    "list    one page of document infos in id order (--all: every page).\n"
    "get     info, text (first 200 bytes unless --full-text), metadata, and per layer and\n"
    "        tensor (k, v, router_k) a summary: shape, dtype, chunks, L2 norm of each\n"
    "        (chunk, head) vector (min/mean/max), value min/max, count of NaN/Inf.\n"
    "        --out-dir writes the stored tensors as DIR/doc<ID>_L<layer>_<k|v|router_k>.npy\n"
    "        (BF16 as '<u2' bits).\n"
    "delete  deletes the ids in one atomic write; --expect-version applies to each id.\n"
    "ID lists may use ranges: 1,2,10-20.\n";

typedef struct tsum {
    double norm_min, norm_max, norm_sum;
    float vmin, vmax;
    uint64_t nonfinite, vectors;
} tsum_t;

static bool summarize(const Msa__V1__Tensor *t, tsum_t *s)
{
    memset(s, 0, sizeof *s);
    float *f;
    size_t n;
    msa_cli_status_t st;
    if (t->n_shape != 3 || msa_cli_tensor_to_f32_alloc(t, &f, &n, &st) != MSA_OK) return false;
    size_t D = t->shape[2], vecs = D ? n / D : 0;
    s->norm_min = INFINITY;
    s->norm_max = -INFINITY;
    s->vmin = INFINITY;
    s->vmax = -INFINITY;
    for (size_t v = 0; v < vecs; v++) {
        double sq = 0;
        for (size_t d = 0; d < D; d++) {
            float x = f[v * D + d];
            if (!isfinite(x)) {
                s->nonfinite++;
                continue;
            }
            if (x < s->vmin) s->vmin = x;
            if (x > s->vmax) s->vmax = x;
            sq += (double)x * x;
        }
        double nm = sqrt(sq);
        if (nm < s->norm_min) s->norm_min = nm;
        if (nm > s->norm_max) s->norm_max = nm;
        s->norm_sum += nm;
    }
    s->vectors = vecs;
    free(f);
    return true;
}

static cJSON *tsum_json(const Msa__V1__Tensor *t, const char *file)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "dtype", msa_cli_dtype_name(t->dtype));
    cJSON_AddItemToObject(o, "shape", jshape(t));
    tsum_t s;
    if (summarize(t, &s)) {
        cJSON_AddNumberToObject(o, "chunks", t->shape[0]);
        cJSON_AddNumberToObject(o, "norm_min", s.vectors ? s.norm_min : 0);
        cJSON_AddNumberToObject(o, "norm_mean", s.vectors ? s.norm_sum / (double)s.vectors : 0);
        cJSON_AddNumberToObject(o, "norm_max", s.vectors ? s.norm_max : 0);
        cJSON_AddNumberToObject(o, "min", s.vmin);
        cJSON_AddNumberToObject(o, "max", s.vmax);
        jadd_u64(o, "nonfinite", s.nonfinite);
    }
    if (file) cJSON_AddStringToObject(o, "file", file);
    return o;
}

static void tsum_print(const char *kind, const Msa__V1__Tensor *t)
{
    char sh[64];
    shape_str(t, sh, sizeof sh);
    tsum_t s;
    if (!summarize(t, &s)) {
        printf("    %-9s %-5s %-14s (cannot decode)\n", kind, msa_cli_dtype_name(t->dtype), sh);
        return;
    }
    printf("    %-9s %-5s %-14s chunks %-5u norm %.4g/%.4g/%.4g  min %.4g max %.4g  %s\n", kind,
           msa_cli_dtype_name(t->dtype), sh, t->shape[0], s.vectors ? s.norm_min : 0,
           s.vectors ? s.norm_sum / (double)s.vectors : 0, s.vectors ? s.norm_max : 0,
           (double)s.vmin, (double)s.vmax, s.nonfinite ? "NaN/Inf!" : "finite");
}

static cJSON *docinfo_json(const Msa__V1__DocumentInfo *d)
{
    cJSON *o = cJSON_CreateObject();
    jadd_u64(o, "id", d->id);
    jadd_u64(o, "version", d->version);
    cJSON_AddNumberToObject(o, "tokens", d->tokens);
    cJSON_AddNumberToObject(o, "chunks", d->chunks);
    jadd_u64(o, "created_seq", d->created_seq);
    jadd_u64(o, "updated_seq", d->updated_seq);
    cJSON_AddNumberToObject(o, "updated_unix_ms", (double)d->updated_unix_ms);
    jadd_u64(o, "text_bytes", d->text_bytes);
    jadd_u64(o, "metadata_bytes", d->metadata_bytes);
    return o;
}

static bool printable(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((p[i] < 0x20 && p[i] != '\n' && p[i] != '\t' && p[i] != '\r') || p[i] == 0x7f)
            return false;
    return true;
}

static char *hex(const uint8_t *p, size_t n)
{
    char *s = malloc(2 * n + 1);
    if (!s) exit(ctl_usage("out of memory"));
    for (size_t i = 0; i < n; i++) sprintf(s + 2 * i, "%02x", p[i]);
    s[2 * n] = '\0';
    return s;
}

static int docs_list(ctl_t *ctl, const char *coll, uint64_t after, uint32_t limit, bool all)
{
    msa_cli_status_t st;
    cJSON *j = NULL, *arr = NULL;
    if (ctl->json) {
        j = cJSON_CreateObject();
        arr = cJSON_AddArrayToObject(j, "documents");
    } else {
        printf("%20s %8s %8s %7s %10s %10s %14s\n", "ID", "VERSION", "TOKENS", "CHUNKS", "TEXT",
               "METADATA", "UPDATED_SEQ");
    }
    uint64_t next = 0, snap = 0, total = 0;
    for (;;) {
        Msa__V1__ListRequest req = MSA__V1__LIST_REQUEST__INIT;
        req.collection = (char *)coll;
        req.after_id = after;
        req.limit = limit;
        Msa__V1__ListResponse *r;
        if (msa_cli_list(ctl_conn(ctl), &req, &r, 0, &st)) {
            cJSON_Delete(j);
            return ctl_fail(ctl, &st);
        }
        for (size_t i = 0; i < r->n_documents; i++) {
            const Msa__V1__DocumentInfo *d = r->documents[i];
            if (j)
                cJSON_AddItemToArray(arr, docinfo_json(d));
            else
                printf("%20" PRIu64 " %8" PRIu64 " %8u %7u %10" PRIu64 " %10" PRIu64 " %14" PRIu64
                       "\n",
                       d->id, d->version, d->tokens, d->chunks, d->text_bytes, d->metadata_bytes,
                       d->updated_seq);
        }
        total += r->n_documents;
        next = r->next_after_id;
        snap = r->snapshot_seq;
        msa_cli_free(r);
        if (!all || next == 0) break;
        if (ctl->progress) fprintf(stderr, "\r%" PRIu64 " documents...", total);
        after = next;
    }
    ctl_progress_end(ctl);
    if (j) {
        jadd_u64(j, "next_after_id", next);
        jadd_u64(j, "snapshot_seq", snap);
        jprint(j);
    } else {
        printf("(%" PRIu64 " documents%s", total, next ? "; more: --after " : ")\n");
        if (next) printf("%" PRIu64 ")\n", next);
    }
    return EXIT_OK;
}

static int docs_get(ctl_t *ctl, const char *coll, const uint64_t *ids, size_t n, bool text,
                    bool meta, bool tensors, const uint64_t *layers, size_t n_layers,
                    bool full_text, const char *out_dir, uint64_t min_seq)
{
    msa_cli_status_t st;
    Msa__V1__GetRequest req = MSA__V1__GET_REQUEST__INIT;
    req.collection = (char *)coll;
    req.n_ids = n;
    req.ids = (uint64_t *)ids;
    req.with_text = text;
    req.with_metadata = meta;
    req.with_tensors = tensors;
    req.min_seq = min_seq;
    uint32_t *ls = NULL;
    if (n_layers) {
        ls = malloc(n_layers * sizeof *ls);
        for (size_t i = 0; i < n_layers; i++) ls[i] = (uint32_t)layers[i];
        req.n_layers = n_layers;
        req.layers = ls;
    }
    Msa__V1__GetResponse *r;
    int rc = msa_cli_get(ctl_conn(ctl), &req, &r, 0, &st);
    free(ls);
    if (rc) return ctl_fail(ctl, &st);
    if (out_dir) mkdir_p(out_dir);
    cJSON *j = NULL, *arr = NULL;
    if (ctl->json) {
        j = cJSON_CreateObject();
        jadd_u64(j, "snapshot_seq", r->snapshot_seq);
        arr = cJSON_AddArrayToObject(j, "documents");
    }
    for (size_t i = 0; i < r->n_records; i++) {
        const Msa__V1__DocumentRecord *rec = r->records[i];
        const Msa__V1__DocumentInfo *d = rec->info;
        const Msa__V1__Document *doc = rec->document;
        cJSON *o = NULL, *jl = NULL;
        if (j) {
            o = cJSON_CreateObject();
            if (d) cJSON_AddItemToObject(o, "info", docinfo_json(d));
            cJSON_AddItemToArray(arr, o);
        } else if (d) {
            printf("document %" PRIu64 ": version %" PRIu64
                   ", %u tokens, %u chunks, created_seq %" PRIu64 ", updated_seq %" PRIu64
                   ", updated %" PRId64 " ms, text %" PRIu64 " B, metadata %" PRIu64 " B\n",
                   d->id, d->version, d->tokens, d->chunks, d->created_seq, d->updated_seq,
                   d->updated_unix_ms, d->text_bytes, d->metadata_bytes);
        }
        if (!doc) continue;
        if (text) {
            if (j) {
                cJSON_AddStringToObject(o, "text", doc->text ? doc->text : "");
            } else {
                size_t tl = doc->text ? strlen(doc->text) : 0;
                int show = (int)(full_text || tl <= 200 ? tl : 200);
                printf("  text: %.*s%s\n", show, doc->text ? doc->text : "",
                       (size_t)show < tl ? "..." : "");
            }
        }
        if (meta) {
            const uint8_t *mp = doc->metadata.data;
            size_t ml = doc->metadata.len;
            char *hx = hex(mp, ml);
            if (j) {
                cJSON_AddStringToObject(o, "metadata_hex", hx);
                if (printable(mp, ml)) {
                    char *s = ml ? strndup((const char *)mp, ml) : strdup("");
                    cJSON_AddStringToObject(o, "metadata", s);
                    free(s);
                }
            } else if (printable(mp, ml)) {
                printf("  metadata: %.*s\n", (int)ml, (const char *)mp);
            } else {
                printf("  metadata (hex): %.*s%s\n", (int)(ml > 64 ? 128 : 2 * ml), hx,
                       ml > 64 ? "..." : "");
            }
            free(hx);
        }
        if (tensors) {
            if (j) jl = cJSON_AddArrayToObject(o, "layers");
            for (size_t k = 0; k < doc->n_layers; k++) {
                const Msa__V1__LayerKV *l = doc->layers[k];
                cJSON *lo = NULL;
                if (j) {
                    lo = cJSON_CreateObject();
                    cJSON_AddNumberToObject(lo, "layer", l->layer);
                    cJSON_AddItemToArray(jl, lo);
                } else {
                    printf("  layer %u\n", l->layer);
                }
                const Msa__V1__Tensor *ts[3] = {l->k, l->v, l->router_k};
                const char *names[3] = {"k", "v", "router_k"};
                for (int q = 0; q < 3; q++) {
                    if (!ts[q] || ts[q]->n_shape == 0) continue;
                    char path[4096];
                    const char *file = NULL;
                    if (out_dir) {
                        char fn[128];
                        snprintf(fn, sizeof fn, "doc%" PRIu64 "_L%u_%s.npy", doc->id, l->layer,
                                 names[q]);
                        if ((rc = write_npy(out_dir, fn, ts[q], path, sizeof path))) {
                            cJSON_Delete(j);
                            msa_cli_free(r);
                            return rc;
                        }
                        file = path;
                    }
                    if (j)
                        cJSON_AddItemToObject(lo, names[q], tsum_json(ts[q], file));
                    else
                        tsum_print(names[q], ts[q]);
                }
            }
        }
    }
    if (j) jprint(j);
    msa_cli_free(r);
    return EXIT_OK;
}

int cmd_docs(ctl_t *ctl, int argc, char **argv)
{
    if (argc < 2 || ctl_is_help(argv[1])) {
        fputs(DOCS_HELP, argc < 2 ? stderr : stdout);
        return argc < 2 ? EXIT_USAGE : EXIT_OK;
    }
    const char *sub = argv[1], *coll = NULL, *v, *out_dir = NULL;
    uint64_t after = 0, expect = 0, min_seq = 0;
    uint32_t limit = 0;
    bool all = false, text = true, meta = true, tensors = true, full = false;
    uint64_t *ids = NULL, *layers = NULL;
    size_t n_ids = 0, n_layers = 0;
    for (int i = 2; i < argc; i++) {
        if (ctl_is_help(argv[i])) {
            fputs(DOCS_HELP, stdout);
            return EXIT_OK;
        }
        if (ctl_common_opt(ctl, argc, argv, &i)) continue;
        if (ctl_arg(argc, argv, &i, "--after", &v))
            after = ctl_u64("--after", v);
        else if (ctl_arg(argc, argv, &i, "--limit", &v))
            limit = ctl_u32("--limit", v);
        else if (!strcmp(argv[i], "--all"))
            all = true;
        else if (!strcmp(argv[i], "--no-text"))
            text = false;
        else if (!strcmp(argv[i], "--no-metadata"))
            meta = false;
        else if (!strcmp(argv[i], "--no-tensors"))
            tensors = false;
        else if (!strcmp(argv[i], "--full-text"))
            full = true;
        else if (ctl_arg(argc, argv, &i, "--layers", &v))
            n_layers = ctl_u64_list("--layers", v, &layers);
        else if (ctl_arg(argc, argv, &i, "--out-dir", &v))
            out_dir = v;
        else if (ctl_arg(argc, argv, &i, "--min-seq", &v))
            min_seq = ctl_u64("--min-seq", v);
        else if (ctl_arg(argc, argv, &i, "--expect-version", &v))
            expect = ctl_u64("--expect-version", v);
        else if (argv[i][0] == '-' && argv[i][1])
            return ctl_usage("docs %s: unknown option %s", sub, argv[i]);
        else if (!coll)
            coll = argv[i];
        else {
            uint64_t *more;
            size_t m = ctl_u64_list("ID", argv[i], &more);
            ids = realloc(ids, (n_ids + m) * sizeof *ids);
            memcpy(ids + n_ids, more, m * sizeof *ids);
            n_ids += m;
            free(more);
        }
    }
    if (!coll) return ctl_usage("docs %s: COLL missing", sub);
    if (!strcmp(sub, "list")) {
        if (n_ids) return ctl_usage("docs list: unexpected ids (use --after)");
        return docs_list(ctl, coll, after, limit, all);
    }
    if (n_ids == 0) return ctl_usage("docs %s: ID missing", sub);
    if (!strcmp(sub, "get"))
        return docs_get(ctl, coll, ids, n_ids, text, meta, tensors, layers, n_layers, full, out_dir,
                        min_seq);
    if (!strcmp(sub, "delete")) {
        msa_cli_status_t st;
        Msa__V1__WriteOp *opv = calloc(n_ids, sizeof *opv);
        Msa__V1__WriteOp **ops = calloc(n_ids, sizeof *ops);
        for (size_t i = 0; i < n_ids; i++) {
            msa__v1__write_op__init(&opv[i]);
            opv[i].op_case = MSA__V1__WRITE_OP__OP_DELETE_ID;
            opv[i].delete_id = ids[i];
            opv[i].expect_version = expect;
            ops[i] = &opv[i];
        }
        Msa__V1__WriteRequest req = MSA__V1__WRITE_REQUEST__INIT;
        req.collection = (char *)coll;
        req.n_ops = n_ids;
        req.ops = ops;
        Msa__V1__WriteResponse *r;
        int rc = msa_cli_write(ctl_conn(ctl), &req, &r, 0, &st);
        free(opv);
        free(ops);
        if (rc) return ctl_fail(ctl, &st);
        if (ctl->json) {
            cJSON *j = cJSON_CreateObject();
            cJSON_AddItemToObject(j, "deleted", jarr_u64(ids, n_ids));
            jadd_u64(j, "commit_seq", r->commit_seq);
            jprint(j);
        } else {
            printf("deleted %zu document%s (commit %" PRIu64 ")\n", n_ids, n_ids == 1 ? "" : "s",
                   r->commit_seq);
        }
        msa_cli_free(r);
        return EXIT_OK;
    }
    return ctl_usage("docs: unknown subcommand '%s' (list, get, delete)", sub);
}

/* ======================================================================================
 * put
 * ==================================================================================== */

static const char PUT_HELP[] =
    "usage: msactl put COLL --id ID --layer L:K.npy:V.npy[:ROUTER_K.npy] [--layer ...]\n"
    "                  [--tokens N] [--raw] [--text S | --text-file F] [--metadata-file F]\n"
    "                  [--expect-version V | --expect-absent] [--model M] [--dtype T]\n"
    "\n"
    "Writes one document (insert, or replace an existing id) in one transaction.\n"
    "One --layer per schema layer, any order. Each .npy holds one tensor:\n"
    "  pooled (default): [C, H, D] with C = ceil(tokens / chunk_tokens) chunk rows\n"
    "  --raw:            [N, H, D] token rows; the server mean-pools them into chunks\n"
    "dtype float32 '<f4', float16 '<f2', or bfloat16 stored as its raw bits '<u2'\n"
    "(numpy: (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16), rounding aside).\n"
    "ROUTER_K is required when the collection has separate_router_keys, else refused.\n"
    "--tokens defaults to N (raw) or C * chunk_tokens (pooled; give the exact count when\n"
    "the last chunk is partial). --dtype f32|f16|bf16 converts before sending (default:\n"
    "send each file's dtype as it is; the server rounds to the collection's dtypes).\n";

int cmd_put(ctl_t *ctl, int argc, char **argv)
{
    const char *coll = NULL, *v, *text = NULL, *text_file = NULL, *meta_file = NULL, *model = "";
    uint64_t id = 0, expect = 0;
    uint32_t tokens = 0;
    bool raw = false, absent = false, have_id = false;
    Msa__V1__DType conv = MSA__V1__DTYPE__DTYPE_UNSPECIFIED;
    char **specs = calloc((size_t)argc, sizeof *specs);
    int n_specs = 0;
    for (int i = 1; i < argc; i++) {
        if (ctl_is_help(argv[i])) {
            fputs(PUT_HELP, stdout);
            return EXIT_OK;
        }
        if (ctl_common_opt(ctl, argc, argv, &i)) continue;
        if (ctl_arg(argc, argv, &i, "--id", &v)) {
            id = ctl_u64("--id", v);
            have_id = true;
        } else if (ctl_arg(argc, argv, &i, "--tokens", &v))
            tokens = ctl_u32("--tokens", v);
        else if (!strcmp(argv[i], "--raw"))
            raw = true;
        else if (ctl_arg(argc, argv, &i, "--text", &v))
            text = v;
        else if (ctl_arg(argc, argv, &i, "--text-file", &v))
            text_file = v;
        else if (ctl_arg(argc, argv, &i, "--metadata-file", &v))
            meta_file = v;
        else if (ctl_arg(argc, argv, &i, "--expect-version", &v))
            expect = ctl_u64("--expect-version", v);
        else if (!strcmp(argv[i], "--expect-absent"))
            absent = true;
        else if (ctl_arg(argc, argv, &i, "--model", &v))
            model = v;
        else if (ctl_arg(argc, argv, &i, "--dtype", &v)) {
            if (strcmp(v, "auto") != 0) {
                conv = msa_cli_dtype_parse(v);
                if (conv == MSA__V1__DTYPE__DTYPE_UNSPECIFIED || conv == MSA__V1__DTYPE__I8)
                    return ctl_usage("--dtype: '%s': want auto, f32, f16 or bf16", v);
            }
        } else if (ctl_arg(argc, argv, &i, "--layer", &v))
            specs[n_specs++] = (char *)v;
        else if (argv[i][0] == '-' && argv[i][1])
            return ctl_usage("put: unknown option %s", argv[i]);
        else if (!coll)
            coll = argv[i];
        else
            return ctl_usage("put: unexpected %s", argv[i]);
    }
    if (!coll) return ctl_usage("put: COLL missing (see msactl put --help)");
    if (!have_id) return ctl_usage("put: --id missing");
    if (n_specs == 0) return ctl_usage("put: at least one --layer L:K.npy:V.npy is needed");
    if (text && text_file) return ctl_usage("put: --text and --text-file exclude each other");

    msa_cli_status_t st;
    msa_cli_doc_t *doc;
    if (msa_cli_doc_new(id, tokens, raw, &doc, &st)) return ctl_fail(ctl, &st);
    uint32_t rows = 0;
    for (int s = 0; s < n_specs; s++) {
        uint32_t layer;
        char *parts[3];
        int np = layer_spec(specs[s], &layer, parts, 3);
        if (np < 2 || !parts[0][0] || !parts[1][0])
            return ctl_usage("--layer %s: want L:K.npy:V.npy[:ROUTER_K.npy]", specs[s]);
        Msa__V1__Tensor k, vt, rk;
        msa__v1__tensor__init(&rk);
        load_tensor(parts[0], conv, false, &k);
        load_tensor(parts[1], conv, false, &vt);
        if (np == 3 && parts[2][0]) load_tensor(parts[2], conv, false, &rk);
        rows = k.shape[0];
        if (msa_cli_doc_add_layer(doc, layer, &k, &vt, np == 3 ? &rk : NULL, &st))
            return ctl_fail(ctl, &st);
    }
    if (tokens == 0) {
        if (raw) {
            tokens = rows;
        } else {
            Msa__V1__CollectionInfo *ci;
            if (msa_cli_collection_describe(ctl_conn(ctl), coll, &ci, &st))
                return ctl_fail(ctl, &st);
            tokens = rows * (ci->schema ? ci->schema->chunk_tokens : 0);
            msa_cli_free(ci);
        }
        msa_cli_doc_msg(doc)->tokens = tokens;
    }
    if (text_file) {
        size_t len;
        char *t = slurp(text_file, &len);
        msa_cli_doc_set_text(doc, t, len, &st);
        free(t);
    } else if (text) {
        msa_cli_doc_set_text(doc, text, (size_t)-1, &st);
    }
    if (meta_file) {
        size_t len;
        char *m = slurp(meta_file, &len);
        msa_cli_doc_set_metadata(doc, m, len, &st);
        free(m);
    }
    Msa__V1__WriteOp op = MSA__V1__WRITE_OP__INIT;
    op.op_case = MSA__V1__WRITE_OP__OP_PUT;
    op.put = msa_cli_doc_msg(doc);
    op.expect_version = expect;
    op.expect_absent = absent;
    Msa__V1__WriteOp *ops[1] = {&op};
    Msa__V1__WriteRequest req = MSA__V1__WRITE_REQUEST__INIT;
    req.collection = (char *)coll;
    req.model = (char *)model;
    req.n_ops = 1;
    req.ops = ops;
    Msa__V1__WriteResponse *r;
    int rc = msa_cli_write(ctl_conn(ctl), &req, &r, 0, &st);
    msa_cli_doc_free(doc);
    free(specs);
    if (rc) return ctl_fail(ctl, &st);
    uint64_t version = r->n_versions ? r->versions[0] : 0;
    if (ctl->json) {
        cJSON *j = cJSON_CreateObject();
        jadd_u64(j, "id", id);
        jadd_u64(j, "version", version);
        jadd_u64(j, "commit_seq", r->commit_seq);
        cJSON_AddNumberToObject(j, "tokens", tokens);
        jprint(j);
    } else {
        printf("put %" PRIu64 ": version %" PRIu64 " (commit %" PRIu64 ")\n", id, version,
               r->commit_seq);
    }
    msa_cli_free(r);
    return EXIT_OK;
}

/* ======================================================================================
 * route / attend
 * ==================================================================================== */

static const char ROUTE_HELP[] =
    "usage: msactl route COLL --layer L:RQ.npy [--layer ...] [--top-k K] [--exclude IDS]\n"
    "                    [--min-seq S] [--model M]\n"
    "\n"
    "Routes each layer independently and prints the top-k documents with scores.\n"
    "RQ.npy: routing query [T, Hq, D] (or [Hq, D] for one token), float32/float16/bf16\n"
    "bits, sent as it is. IDS: 1,2,10-20.\n";

static const char ATTEND_HELP[] =
    "usage: msactl attend COLL --layer L:RQ.npy:Q.npy [--layer ...] [--top-k K]\n"
    "                     [--doc-ids IDS] [--exclude IDS] [--scale S] [--out-dtype T]\n"
    "                     [--out-dir DIR] [--min-seq S] [--model M]\n"
    "\n"
    "Routing, then attention of Q over the pooled K/V of the selected documents.\n"
    "RQ.npy: routing query [T, Hq, D]; Q.npy: attention query [T, Hq, D] (position\n"
    "encoding applied). With --doc-ids the routing step is skipped and RQ may be left\n"
    "out: --layer L::Q.npy. Prints the selected documents and a summary of out/lse;\n"
    "--out-dir writes DIR/out_L<layer>.npy ([T, Hq, D] in --out-dtype f32|f16|bf16,\n"
    "bf16 as '<u2' bits) and DIR/lse_L<layer>.npy ([T, Hq] float32, -inf = no memory).\n"
    "--scale 0 (default) means 1/sqrt(D).\n";

typedef struct qopts {
    const char *coll, *model, *out_dir;
    uint32_t top_k;
    uint64_t min_seq;
    uint64_t *exclude, *doc_ids;
    size_t n_exclude, n_doc_ids;
    float scale;
    Msa__V1__DType out_dtype;
    Msa__V1__LayerQuery **layers;
    size_t n_layers;
} qopts_t;

static int parse_query(ctl_t *ctl, int argc, char **argv, bool attend, qopts_t *q)
{
    memset(q, 0, sizeof *q);
    q->model = "";
    q->layers = calloc((size_t)argc, sizeof *q->layers);
    const char *v;
    for (int i = 1; i < argc; i++) {
        if (ctl_is_help(argv[i])) {
            fputs(attend ? ATTEND_HELP : ROUTE_HELP, stdout);
            exit(EXIT_OK);
        }
        if (ctl_common_opt(ctl, argc, argv, &i)) continue;
        if (ctl_arg(argc, argv, &i, "--top-k", &v))
            q->top_k = ctl_u32("--top-k", v);
        else if (ctl_arg(argc, argv, &i, "--min-seq", &v))
            q->min_seq = ctl_u64("--min-seq", v);
        else if (ctl_arg(argc, argv, &i, "--model", &v))
            q->model = v;
        else if (ctl_arg(argc, argv, &i, "--exclude", &v))
            q->n_exclude = ctl_u64_list("--exclude", v, &q->exclude);
        else if (attend && ctl_arg(argc, argv, &i, "--doc-ids", &v))
            q->n_doc_ids = ctl_u64_list("--doc-ids", v, &q->doc_ids);
        else if (attend && ctl_arg(argc, argv, &i, "--scale", &v))
            q->scale = (float)ctl_double("--scale", v);
        else if (attend && ctl_arg(argc, argv, &i, "--out-dir", &v))
            q->out_dir = v;
        else if (attend && ctl_arg(argc, argv, &i, "--out-dtype", &v)) {
            q->out_dtype = msa_cli_dtype_parse(v);
            if (q->out_dtype == MSA__V1__DTYPE__DTYPE_UNSPECIFIED ||
                q->out_dtype == MSA__V1__DTYPE__I8)
                return ctl_usage("--out-dtype: '%s': want f32, f16 or bf16", v);
        } else if (ctl_arg(argc, argv, &i, "--layer", &v)) {
            uint32_t layer;
            char *parts[2];
            int np = layer_spec(v, &layer, parts, 2);
            Msa__V1__LayerQuery *lq = calloc(1, sizeof *lq);
            msa__v1__layer_query__init(lq);
            lq->layer = layer;
            if (parts[0] && parts[0][0]) {
                lq->routing_q = calloc(1, sizeof *lq->routing_q);
                load_tensor(parts[0], MSA__V1__DTYPE__DTYPE_UNSPECIFIED, true, lq->routing_q);
            }
            if (attend) {
                if (np < 2 || !parts[1][0])
                    return ctl_usage("--layer %s: want L:RQ.npy:Q.npy (or L::Q.npy with --doc-ids)",
                                     v);
                lq->q = calloc(1, sizeof *lq->q);
                load_tensor(parts[1], MSA__V1__DTYPE__DTYPE_UNSPECIFIED, true, lq->q);
            } else if (np != 1 || !lq->routing_q) {
                return ctl_usage("--layer %s: want L:RQ.npy", v);
            }
            q->layers[q->n_layers++] = lq;
        } else if (argv[i][0] == '-' && argv[i][1]) {
            return ctl_usage("%s: unknown option %s", attend ? "attend" : "route", argv[i]);
        } else if (!q->coll) {
            q->coll = argv[i];
        } else {
            return ctl_usage("%s: unexpected %s", attend ? "attend" : "route", argv[i]);
        }
    }
    if (!q->coll) return ctl_usage("%s: COLL missing", attend ? "attend" : "route");
    if (q->n_layers == 0)
        return ctl_usage("%s: at least one --layer is needed", attend ? "attend" : "route");
    return EXIT_OK;
}

static void print_ranking(uint32_t layer, const uint64_t *ids, size_t n, const float *scores,
                          size_t ns)
{
    printf("layer %u: %zu document%s\n", layer, n, n == 1 ? "" : "s");
    if (n == 0) return;
    printf("  %4s %20s %14s\n", "RANK", "DOC", "SCORE");
    for (size_t i = 0; i < n; i++) {
        if (i < ns)
            printf("  %4zu %20" PRIu64 " %14.6f\n", i + 1, ids[i], (double)scores[i]);
        else
            printf("  %4zu %20" PRIu64 " %14s\n", i + 1, ids[i], "-");
    }
}

int cmd_route(ctl_t *ctl, int argc, char **argv)
{
    qopts_t q;
    int rc = parse_query(ctl, argc, argv, false, &q);
    if (rc) return rc;
    msa_cli_status_t st;
    Msa__V1__RouteRequest req = MSA__V1__ROUTE_REQUEST__INIT;
    req.collection = (char *)q.coll;
    req.n_layers = q.n_layers;
    req.layers = q.layers;
    req.top_k = q.top_k;
    req.n_exclude_ids = q.n_exclude;
    req.exclude_ids = q.exclude;
    req.min_seq = q.min_seq;
    req.model = (char *)q.model;
    Msa__V1__RouteResponse *r;
    if (msa_cli_route(ctl_conn(ctl), &req, &r, 0, &st)) return ctl_fail(ctl, &st);
    if (ctl->json) {
        cJSON *j = cJSON_CreateObject();
        jadd_u64(j, "snapshot_seq", r->snapshot_seq);
        cJSON *a = cJSON_AddArrayToObject(j, "layers");
        for (size_t i = 0; i < r->n_layers; i++) {
            const Msa__V1__LayerRoute *l = r->layers[i];
            cJSON *o = cJSON_CreateObject();
            cJSON_AddNumberToObject(o, "layer", l->layer);
            cJSON_AddItemToObject(o, "doc_ids", jarr_u64(l->doc_ids, l->n_doc_ids));
            cJSON_AddItemToObject(o, "scores", jarr_f32(l->scores, l->n_scores));
            cJSON_AddItemToArray(a, o);
        }
        jprint(j);
    } else {
        printf("snapshot %" PRIu64 "\n", r->snapshot_seq);
        for (size_t i = 0; i < r->n_layers; i++) {
            const Msa__V1__LayerRoute *l = r->layers[i];
            print_ranking(l->layer, l->doc_ids, l->n_doc_ids, l->scores, l->n_scores);
        }
    }
    msa_cli_free(r);
    return EXIT_OK;
}

int cmd_attend(ctl_t *ctl, int argc, char **argv)
{
    qopts_t q;
    int rc = parse_query(ctl, argc, argv, true, &q);
    if (rc) return rc;
    for (size_t i = 0; i < q.n_layers; i++)
        if (!q.layers[i]->routing_q && q.n_doc_ids == 0)
            return ctl_usage(
                "attend: layer %u has no routing query; give L:RQ.npy:Q.npy or --doc-ids",
                q.layers[i]->layer);
    msa_cli_status_t st;
    Msa__V1__AttendRequest req = MSA__V1__ATTEND_REQUEST__INIT;
    req.collection = (char *)q.coll;
    req.n_layers = q.n_layers;
    req.layers = q.layers;
    req.top_k = q.top_k;
    req.n_exclude_ids = q.n_exclude;
    req.exclude_ids = q.exclude;
    req.n_doc_ids = q.n_doc_ids;
    req.doc_ids = q.doc_ids;
    req.min_seq = q.min_seq;
    req.scale = q.scale;
    req.out_dtype = q.out_dtype;
    req.model = (char *)q.model;
    Msa__V1__AttendResponse *r;
    if (msa_cli_attend(ctl_conn(ctl), &req, &r, 0, &st)) return ctl_fail(ctl, &st);
    if (q.out_dir) mkdir_p(q.out_dir);
    cJSON *j = NULL, *a = NULL;
    if (ctl->json) {
        j = cJSON_CreateObject();
        jadd_u64(j, "snapshot_seq", r->snapshot_seq);
        a = cJSON_AddArrayToObject(j, "layers");
    } else {
        printf("snapshot %" PRIu64 "\n", r->snapshot_seq);
    }
    for (size_t i = 0; i < r->n_layers; i++) {
        const Msa__V1__LayerAttention *l = r->layers[i];
        char out_path[4096] = "", lse_path[4096] = "";
        if (q.out_dir) {
            char fn[64];
            if (l->out) {
                snprintf(fn, sizeof fn, "out_L%u.npy", l->layer);
                if ((rc = write_npy(q.out_dir, fn, l->out, out_path, sizeof out_path))) return rc;
            }
            if (l->lse) {
                snprintf(fn, sizeof fn, "lse_L%u.npy", l->layer);
                if ((rc = write_npy(q.out_dir, fn, l->lse, lse_path, sizeof lse_path))) return rc;
            }
        }
        /* lse summary */
        float lmin = INFINITY, lmax = -INFINITY;
        size_t neg_inf = 0, nl = 0;
        float *lf = NULL;
        if (l->lse && msa_cli_tensor_to_f32_alloc(l->lse, &lf, &nl, &st) == MSA_OK) {
            for (size_t k = 0; k < nl; k++) {
                if (isinf(lf[k]) && lf[k] < 0) {
                    neg_inf++;
                    continue;
                }
                if (lf[k] < lmin) lmin = lf[k];
                if (lf[k] > lmax) lmax = lf[k];
            }
            free(lf);
        }
        if (j) {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddNumberToObject(o, "layer", l->layer);
            cJSON_AddItemToObject(o, "doc_ids", jarr_u64(l->doc_ids, l->n_doc_ids));
            cJSON_AddItemToObject(o, "scores", jarr_f32(l->scores, l->n_scores));
            if (l->out) {
                cJSON *t = cJSON_AddObjectToObject(o, "out");
                cJSON_AddStringToObject(t, "dtype", msa_cli_dtype_name(l->out->dtype));
                cJSON_AddItemToObject(t, "shape", jshape(l->out));
                if (out_path[0]) cJSON_AddStringToObject(t, "file", out_path);
            }
            if (l->lse) {
                cJSON *t = cJSON_AddObjectToObject(o, "lse");
                cJSON_AddItemToObject(t, "shape", jshape(l->lse));
                if (nl > neg_inf) {
                    cJSON_AddNumberToObject(t, "min", lmin);
                    cJSON_AddNumberToObject(t, "max", lmax);
                }
                jadd_u64(t, "neg_inf", neg_inf);
                if (lse_path[0]) cJSON_AddStringToObject(t, "file", lse_path);
            }
            cJSON_AddItemToArray(a, o);
        } else {
            print_ranking(l->layer, l->doc_ids, l->n_doc_ids, l->scores, l->n_scores);
            if (l->out) {
                char sh[64];
                shape_str(l->out, sh, sizeof sh);
                printf("  out %s %s%s%s\n", msa_cli_dtype_name(l->out->dtype), sh,
                       out_path[0] ? " -> " : "", out_path);
            }
            if (l->lse) {
                if (nl > neg_inf)
                    printf("  lse min %.6g max %.6g, %zu -inf%s%s\n", (double)lmin, (double)lmax,
                           neg_inf, lse_path[0] ? " -> " : "", lse_path);
                else
                    printf("  lse all -inf (no memory selected)%s%s\n", lse_path[0] ? " -> " : "",
                           lse_path);
            }
        }
    }
    if (j) jprint(j);
    msa_cli_free(r);
    return EXIT_OK;
}
