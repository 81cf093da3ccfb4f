/* msactl.c — the admin CLI of msad (on libmsaclient): main, global options, output
 * helpers, and the commands collections, stats, backup, verify and health. The data
 * commands live in msactl_data.c, bench in msactl_bench.c.
 */
#include "msactl.h"

#include "msa_clock.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char MAIN_HELP[] =
    "usage: msactl [GLOBAL OPTIONS] COMMAND [ARGS]\n"
    "\n"
    "Admin client of msad, the MSA memory daemon.\n"
    "\n"
    "Global options (also accepted after the command):\n"
    "  --addr A          server address: host:port or unix:/path (default $MSA_ADDR,\n"
    "                    else 127.0.0.1:7420)\n"
    "  --token-file F    bearer token file, first line (default $MSA_TOKEN_FILE)\n"
    "  --tls-ca F        PEM root certificates; turns TLS on\n"
    "  --tls-name N      name expected in the server certificate\n"
    "  --timeout S       deadline per call in seconds (default 30; 0 = none)\n"
    "  --max-message-mb N  largest message sent or received (default 256)\n"
    "  --json            machine-readable output on stdout\n"
    "  --version, --help\n"
    "\n"
    "Commands (msactl COMMAND --help for details):\n"
    "  collections list|create|describe|drop   manage collections\n"
    "  docs list|get|delete                     inspect and delete documents\n"
    "  put COLL --id ID --layer L:k.npy:v.npy   write a document from .npy files\n"
    "  route COLL --layer L:rq.npy              top-k documents per layer\n"
    "  attend COLL --layer L:rq.npy:q.npy       attention over the selected memory\n"
    "  stats                                    server statistics\n"
    "  backup NAME [--compact]                  hot backup into the backup directory\n"
    "  verify [COLL]                            consistency check of the store\n"
    "  health                                   gRPC health check\n"
    "  bench                                    synthetic load: ingest, Route, Attend\n"
    "\n"
    "Exit codes: 0 ok; 1 error from the server or transport (the gRPC status name is\n"
    "printed, e.g. NOT_FOUND); 2 usage error or bad input file; 3 verify found problems,\n"
    "or health: not serving.\n";

/* ======================================================================================
 * Helpers
 * ==================================================================================== */

int ctl_usage(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("msactl: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return EXIT_USAGE;
}

int ctl_fail(ctl_t *ctl, const msa_cli_status_t *st)
{
    ctl_progress_end(ctl);
    const char *name = msa_cli_grpc_name(st->grpc_code);
    fprintf(stderr, "msactl: %s: %s\n", name, st->msg);
    if (ctl->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON *e = cJSON_AddObjectToObject(j, "error");
        cJSON_AddStringToObject(e, "code", name);
        cJSON_AddNumberToObject(e, "grpc_code", st->grpc_code);
        cJSON_AddStringToObject(e, "message", st->msg);
        jprint(j);
    }
    return EXIT_SERVER;
}

msa_cli_t *ctl_conn(ctl_t *ctl)
{
    if (ctl->c) return ctl->c;
    msa_cli_status_t st;
    if (msa_cli_connect(&ctl->opt, &ctl->c, &st) != MSA_OK) {
        fprintf(stderr, "msactl: %s\n", st.msg);
        exit(EXIT_USAGE);
    }
    return ctl->c;
}

bool ctl_is_help(const char *a)
{
    return !strcmp(a, "--help") || !strcmp(a, "-h");
}

bool ctl_arg(int argc, char **argv, int *i, const char *name, const char **val)
{
    const char *a = argv[*i];
    size_t n = strlen(name);
    if (strncmp(a, name, n) != 0) return false;
    if (a[n] == '=') {
        *val = a + n + 1;
        return true;
    }
    if (a[n] != '\0') return false;
    if (*i + 1 >= argc) exit(ctl_usage("%s needs a value", name));
    *val = argv[++*i];
    return true;
}

bool ctl_common_opt(ctl_t *ctl, int argc, char **argv, int *i)
{
    const char *v;
    if (!strcmp(argv[*i], "--json")) {
        ctl->json = true;
        return true;
    }
    if (ctl_arg(argc, argv, i, "--addr", &v)) {
        ctl->opt.addr = v;
    } else if (ctl_arg(argc, argv, i, "--token-file", &v)) {
        ctl->opt.token_file = v;
    } else if (ctl_arg(argc, argv, i, "--tls-ca", &v)) {
        ctl->opt.tls_ca_file = v;
    } else if (ctl_arg(argc, argv, i, "--tls-name", &v)) {
        ctl->opt.tls_server_name = v;
    } else if (ctl_arg(argc, argv, i, "--timeout", &v)) {
        double s = ctl_double("--timeout", v);
        ctl->opt.timeout_ms = s <= 0 ? -1 : (int64_t)(s * 1000.0 + 0.5);
        if (ctl->opt.timeout_ms == 0) ctl->opt.timeout_ms = 1;
    } else if (ctl_arg(argc, argv, i, "--max-message-mb", &v)) {
        ctl->opt.max_message_bytes = (size_t)ctl_u32("--max-message-mb", v) << 20;
    } else {
        return false;
    }
    if (ctl->c) { /* options after connecting: unusual, but make them count */
        msa_cli_close(ctl->c);
        ctl->c = NULL;
    }
    return true;
}

uint64_t ctl_u64(const char *name, const char *s)
{
    char *end;
    errno = 0;
    if (!s || !*s || *s == '-') exit(ctl_usage("%s: '%s' is not a non-negative integer", name, s));
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end) exit(ctl_usage("%s: '%s' is not a non-negative integer", name, s));
    return v;
}

uint32_t ctl_u32(const char *name, const char *s)
{
    uint64_t v = ctl_u64(name, s);
    if (v > UINT32_MAX) exit(ctl_usage("%s: %s is too large", name, s));
    return (uint32_t)v;
}

double ctl_double(const char *name, const char *s)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || end == s || !isfinite(v))
        exit(ctl_usage("%s: '%s' is not a number", name, s));
    return v;
}

size_t ctl_u64_list(const char *name, const char *s, uint64_t **out)
{
    size_t n = 0, cap = 16;
    uint64_t *v = malloc(cap * sizeof *v);
    char *dup = strdup(s), *save = NULL;
    if (!v || !dup) exit(ctl_usage("out of memory"));
    for (char *tok = strtok_r(dup, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *dash = strchr(tok + 1, '-');
        uint64_t lo, hi;
        if (dash) {
            *dash = '\0';
            lo = ctl_u64(name, tok);
            hi = ctl_u64(name, dash + 1);
            if (hi < lo || hi - lo > 1000000)
                exit(ctl_usage("%s: bad range %s-%s", name, tok, dash + 1));
        } else {
            lo = hi = ctl_u64(name, tok);
        }
        for (uint64_t x = lo;; x++) {
            if (n == cap) {
                v = realloc(v, (cap *= 2) * sizeof *v);
                if (!v) exit(ctl_usage("out of memory"));
            }
            v[n++] = x;
            if (x == hi) break;
        }
    }
    free(dup);
    if (n == 0) exit(ctl_usage("%s: empty list", name));
    *out = v;
    return n;
}

cJSON *ju64(uint64_t v)
{
    char b[32];
    snprintf(b, sizeof b, "%" PRIu64, v);
    return cJSON_CreateRaw(b);
}

void jadd_u64(cJSON *o, const char *key, uint64_t v)
{
    cJSON_AddItemToObject(o, key, ju64(v));
}

void jprint(cJSON *j)
{
    char *s = cJSON_Print(j);
    if (s) {
        fputs(s, stdout);
        fputc('\n', stdout);
        free(s);
    }
    cJSON_Delete(j);
}

static bool progress_shown;

void ctl_progress(ctl_t *ctl, const char *label, uint64_t done, uint64_t total)
{
    if (!ctl->progress || total == 0) return;
    int width = 30, fill = (int)(done * (uint64_t)width / total);
    char bar[64];
    for (int i = 0; i < width; i++) bar[i] = i < fill ? '#' : '.';
    bar[width] = '\0';
    fprintf(stderr, "\r%s [%s] %3d%% %" PRIu64 "/%" PRIu64 " ", label, bar,
            (int)(done * 100 / total), done, total);
    fflush(stderr);
    progress_shown = true;
}

void ctl_progress_end(ctl_t *ctl)
{
    if (progress_shown) {
        fputs("\r\033[K", stderr);
        fflush(stderr);
        progress_shown = false;
    }
}

const char *ctl_bytes(uint64_t b, char *buf, size_t len)
{
    static const char *const unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double x = (double)b;
    int u = 0;
    while (x >= 1024 && u < 4) {
        x /= 1024;
        u++;
    }
    if (u == 0)
        snprintf(buf, len, "%" PRIu64 " B", b);
    else
        snprintf(buf, len, "%.1f %s", x, unit[u]);
    return buf;
}

double ctl_now(void)
{
    return (double)msa_clock_ns() * 1e-9;
}

/* ======================================================================================
 * Schemas
 * ==================================================================================== */

typedef struct {
    const char *name; /* canonical proto enum name */
    const char *alias;
    int value;
} enum_name_t;

static const enum_name_t SIM[] = {{"COSINE", "cosine", 0}, {"DOT", "dot", 1}, {NULL, NULL, 0}};
static const enum_name_t HEADR[] = {
    {"HEAD_MEAN", "mean", 0}, {"HEAD_MAX", "max", 1}, {NULL, NULL, 0}};
static const enum_name_t QUERYR[] = {
    {"QUERY_MAX", "max", 0}, {"QUERY_MEAN", "mean", 1}, {"QUERY_LAST", "last", 2}, {NULL, NULL, 0}};
static const enum_name_t CHUNKR[] = {
    {"CHUNK_MAX", "max", 0}, {"CHUNK_MEAN", "mean", 1}, {NULL, NULL, 0}};

static int enum_parse(const enum_name_t *t, const char *s)
{
    for (; t->name; t++)
        if (!strcasecmp(s, t->name) || !strcasecmp(s, t->alias)) return t->value;
    return -1;
}
static const char *enum_str(const enum_name_t *t, int v)
{
    for (; t->name; t++)
        if (t->value == v) return t->name;
    return "?";
}

static void set_layers(Msa__V1__CollectionSchema *s, const char *spec)
{
    uint64_t *v;
    size_t n = ctl_u64_list("--layers", spec, &v);
    free(s->layers);
    s->layers = malloc(n * sizeof *s->layers);
    if (!s->layers) exit(ctl_usage("out of memory"));
    for (size_t i = 0; i < n; i++) {
        if (v[i] > UINT32_MAX) exit(ctl_usage("--layers: %" PRIu64 " too large", v[i]));
        s->layers[i] = (uint32_t)v[i];
    }
    s->n_layers = n;
    free(v);
}

static Msa__V1__DType dtype_arg(const char *name, const char *v)
{
    Msa__V1__DType dt = msa_cli_dtype_parse(v);
    if (dt == MSA__V1__DTYPE__DTYPE_UNSPECIFIED)
        exit(ctl_usage("%s: '%s': want f32, f16, bf16 or i8", name, v));
    return dt;
}

static int enum_arg(const enum_name_t *t, const char *name, const char *v)
{
    int x = enum_parse(t, v);
    if (x < 0) exit(ctl_usage("%s: unknown value '%s'", name, v));
    return x;
}

bool ctl_schema_opt(Msa__V1__CollectionSchema *s, int argc, char **argv, int *i)
{
    const char *v;
    if (ctl_arg(argc, argv, i, "--layers", &v)) {
        set_layers(s, v);
    } else if (ctl_arg(argc, argv, i, "--kv-heads", &v)) {
        s->kv_heads = ctl_u32("--kv-heads", v);
    } else if (ctl_arg(argc, argv, i, "--query-heads", &v)) {
        s->query_heads = ctl_u32("--query-heads", v);
    } else if (ctl_arg(argc, argv, i, "--head-dim", &v)) {
        s->head_dim = ctl_u32("--head-dim", v);
    } else if (ctl_arg(argc, argv, i, "--chunk-tokens", &v)) {
        s->chunk_tokens = ctl_u32("--chunk-tokens", v);
    } else if (ctl_arg(argc, argv, i, "--kv-dtype", &v)) {
        s->kv_dtype = dtype_arg("--kv-dtype", v);
    } else if (ctl_arg(argc, argv, i, "--routing-dtype", &v)) {
        s->routing_dtype = dtype_arg("--routing-dtype", v);
    } else if (!strcmp(argv[*i], "--separate-router-keys")) {
        s->separate_router_keys = true;
    } else if (!strcmp(argv[*i], "--no-separate-router-keys")) {
        s->separate_router_keys = false;
    } else if (ctl_arg(argc, argv, i, "--similarity", &v)) {
        s->similarity = enum_arg(SIM, "--similarity", v);
    } else if (ctl_arg(argc, argv, i, "--head-reduce", &v)) {
        s->head_reduce = enum_arg(HEADR, "--head-reduce", v);
    } else if (ctl_arg(argc, argv, i, "--query-reduce", &v)) {
        s->query_reduce = enum_arg(QUERYR, "--query-reduce", v);
    } else if (ctl_arg(argc, argv, i, "--chunk-reduce", &v)) {
        s->chunk_reduce = enum_arg(CHUNKR, "--chunk-reduce", v);
    } else if (ctl_arg(argc, argv, i, "--default-top-k", &v)) {
        s->default_top_k = ctl_u32("--default-top-k", v);
    } else if (ctl_arg(argc, argv, i, "--model", &v)) {
        s->model = (char *)v;
    } else {
        return false;
    }
    return true;
}

cJSON *ctl_schema_json(const Msa__V1__CollectionSchema *s)
{
    cJSON *j = cJSON_CreateObject();
    cJSON *l = cJSON_AddArrayToObject(j, "layers");
    for (size_t i = 0; i < s->n_layers; i++)
        cJSON_AddItemToArray(l, cJSON_CreateNumber(s->layers[i]));
    cJSON_AddNumberToObject(j, "kv_heads", s->kv_heads);
    cJSON_AddNumberToObject(j, "query_heads", s->query_heads);
    cJSON_AddNumberToObject(j, "head_dim", s->head_dim);
    cJSON_AddNumberToObject(j, "chunk_tokens", s->chunk_tokens);
    cJSON_AddStringToObject(j, "kv_dtype", msa_cli_dtype_name(s->kv_dtype));
    cJSON_AddStringToObject(j, "routing_dtype", msa_cli_dtype_name(s->routing_dtype));
    cJSON_AddBoolToObject(j, "separate_router_keys", s->separate_router_keys);
    cJSON_AddStringToObject(j, "similarity", enum_str(SIM, s->similarity));
    cJSON_AddStringToObject(j, "head_reduce", enum_str(HEADR, s->head_reduce));
    cJSON_AddStringToObject(j, "query_reduce", enum_str(QUERYR, s->query_reduce));
    cJSON_AddStringToObject(j, "chunk_reduce", enum_str(CHUNKR, s->chunk_reduce));
    cJSON_AddNumberToObject(j, "default_top_k", s->default_top_k);
    cJSON_AddStringToObject(j, "model", s->model ? s->model : "");
    return j;
}

cJSON *ctl_info_json(const Msa__V1__CollectionInfo *ci)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "name", ci->name);
    if (ci->schema) cJSON_AddItemToObject(j, "schema", ctl_schema_json(ci->schema));
    jadd_u64(j, "documents", ci->documents);
    jadd_u64(j, "chunks", ci->chunks);
    jadd_u64(j, "tokens", ci->tokens);
    jadd_u64(j, "bytes", ci->bytes);
    jadd_u64(j, "created_seq", ci->created_seq);
    return j;
}

/* Reads a JSON schema file: either a schema object or {"schema": {...}} (the output of
 * `collections describe --json`). Returns false with a message on error. */
static bool schema_from_json(const char *path, Msa__V1__CollectionSchema *s, char *err,
                             size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return false;
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        fclose(f);
        free(buf);
        snprintf(err, errlen, "%s: read error", path);
        return false;
    }
    fclose(f);
    buf[n] = '\0';
    cJSON *root = cJSON_ParseWithLength(buf, (size_t)n);
    free(buf);
    if (!root || !cJSON_IsObject(root)) {
        snprintf(err, errlen, "%s: not a JSON object", path);
        cJSON_Delete(root);
        return false;
    }
    cJSON *j = cJSON_GetObjectItemCaseSensitive(root, "schema");
    if (!cJSON_IsObject(j)) j = root;
    bool okay = true;
    cJSON *it;
    cJSON_ArrayForEach(it, j)
    {
        const char *k = it->string;
        if (!strcmp(k, "layers")) {
            if (cJSON_IsString(it)) {
                set_layers(s, it->valuestring);
                continue;
            }
            if (!cJSON_IsArray(it)) goto bad;
            int n_l = cJSON_GetArraySize(it);
            free(s->layers);
            s->layers = malloc((size_t)(n_l ? n_l : 1) * sizeof *s->layers);
            s->n_layers = 0;
            cJSON *e;
            cJSON_ArrayForEach(e, it)
            {
                if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble > UINT32_MAX)
                    goto bad;
                s->layers[s->n_layers++] = (uint32_t)e->valuedouble;
            }
        } else if (!strcmp(k, "kv_heads") || !strcmp(k, "query_heads") || !strcmp(k, "head_dim") ||
                   !strcmp(k, "chunk_tokens") || !strcmp(k, "default_top_k")) {
            if (!cJSON_IsNumber(it) || it->valuedouble < 0 || it->valuedouble > UINT32_MAX ||
                it->valuedouble != floor(it->valuedouble))
                goto bad;
            uint32_t v = (uint32_t)it->valuedouble;
            if (!strcmp(k, "kv_heads"))
                s->kv_heads = v;
            else if (!strcmp(k, "query_heads"))
                s->query_heads = v;
            else if (!strcmp(k, "head_dim"))
                s->head_dim = v;
            else if (!strcmp(k, "chunk_tokens"))
                s->chunk_tokens = v;
            else
                s->default_top_k = v;
        } else if (!strcmp(k, "kv_dtype") || !strcmp(k, "routing_dtype")) {
            Msa__V1__DType dt;
            if (cJSON_IsString(it))
                dt = msa_cli_dtype_parse(it->valuestring);
            else if (cJSON_IsNumber(it))
                dt = (Msa__V1__DType)it->valueint;
            else
                goto bad;
            if (dt == MSA__V1__DTYPE__DTYPE_UNSPECIFIED && !cJSON_IsNumber(it)) goto bad;
            if (!strcmp(k, "kv_dtype"))
                s->kv_dtype = dt;
            else
                s->routing_dtype = dt;
        } else if (!strcmp(k, "separate_router_keys")) {
            if (!cJSON_IsBool(it)) goto bad;
            s->separate_router_keys = cJSON_IsTrue(it);
        } else if (!strcmp(k, "similarity") || !strcmp(k, "head_reduce") ||
                   !strcmp(k, "query_reduce") || !strcmp(k, "chunk_reduce")) {
            const enum_name_t *t = !strcmp(k, "similarity")     ? SIM
                                   : !strcmp(k, "head_reduce")  ? HEADR
                                   : !strcmp(k, "query_reduce") ? QUERYR
                                                                : CHUNKR;
            int v;
            if (cJSON_IsString(it))
                v = enum_parse(t, it->valuestring);
            else if (cJSON_IsNumber(it))
                v = it->valueint;
            else
                goto bad;
            if (v < 0) goto bad;
            if (t == SIM)
                s->similarity = v;
            else if (t == HEADR)
                s->head_reduce = v;
            else if (t == QUERYR)
                s->query_reduce = v;
            else
                s->chunk_reduce = v;
        } else if (!strcmp(k, "model")) {
            if (!cJSON_IsString(it)) goto bad;
            s->model = strdup(it->valuestring); /* lives until exit */
        } else {
            snprintf(err, errlen, "%s: unknown schema key '%s'", path, k);
            okay = false;
            break;
        }
        continue;
    bad:
        snprintf(err, errlen, "%s: bad value for '%s'", path, k);
        okay = false;
        break;
    }
    cJSON_Delete(root);
    return okay;
}

/* ======================================================================================
 * collections
 * ==================================================================================== */

static const char COLL_HELP[] =
    "usage: msactl collections list\n"
    "       msactl collections describe NAME\n"
    "       msactl collections drop NAME\n"
    "       msactl collections create NAME (--schema-json FILE | SCHEMA FLAGS) [SCHEMA FLAGS]\n"
    "\n"
    "Schema flags (defaults in brackets; see memory.proto CollectionSchema):\n"
    "  --layers LIST          model layers with memory, e.g. 0,1,8-17 (required)\n"
    "  --kv-heads H           kv heads (required)\n"
    "  --query-heads HQ       query heads, a multiple of H (required)\n"
    "  --head-dim D           head dimension (required)\n"
    "  --chunk-tokens P       pooling size [64]\n"
    "  --kv-dtype T           f32|f16|bf16 [bf16]\n"
    "  --routing-dtype T      f32|f16|bf16|i8 [bf16]\n"
    "  --separate-router-keys documents carry router_k [off: route on pooled K]\n"
    "  --similarity S         cosine|dot [cosine]\n"
    "  --head-reduce R        mean|max [mean]\n"
    "  --query-reduce R       max|mean|last [max]\n"
    "  --chunk-reduce R       max|mean [max]\n"
    "  --default-top-k K      [0 = 16]\n"
    "  --model M              encoder identity, e.g. EverMind-AI/MSA-4B@rev\n"
    "\n"
    "--schema-json FILE reads the same fields from JSON, named as in memory.proto\n"
    "(enums as strings, e.g. \"kv_dtype\": \"BF16\", \"head_reduce\": \"HEAD_MEAN\");\n"
    "the output of `msactl --json collections describe` is accepted as it is. Flags\n"
    "given after it override the file.\n";

static void print_info_human(const Msa__V1__CollectionInfo *ci)
{
    char b[32];
    printf("name:          %s\n", ci->name);
    printf("documents:     %" PRIu64 "\n", ci->documents);
    printf("chunks:        %" PRIu64 "\n", ci->chunks);
    printf("tokens:        %" PRIu64 "\n", ci->tokens);
    printf("bytes:         %" PRIu64 " (%s)\n", ci->bytes, ctl_bytes(ci->bytes, b, sizeof b));
    printf("created_seq:   %" PRIu64 "\n", ci->created_seq);
    const Msa__V1__CollectionSchema *s = ci->schema;
    if (!s) return;
    printf("layers:        ");
    for (size_t i = 0; i < s->n_layers; i++) printf("%s%u", i ? "," : "", s->layers[i]);
    printf("\n");
    printf("kv_heads:      %u\nquery_heads:   %u\nhead_dim:      %u\nchunk_tokens:  %u\n",
           s->kv_heads, s->query_heads, s->head_dim, s->chunk_tokens);
    printf("kv_dtype:      %s\nrouting_dtype: %s\n", msa_cli_dtype_name(s->kv_dtype),
           msa_cli_dtype_name(s->routing_dtype));
    printf("router_keys:   %s\n", s->separate_router_keys ? "separate" : "pooled K");
    printf("similarity:    %s\nhead_reduce:   %s\nquery_reduce:  %s\nchunk_reduce:  %s\n",
           enum_str(SIM, s->similarity), enum_str(HEADR, s->head_reduce),
           enum_str(QUERYR, s->query_reduce), enum_str(CHUNKR, s->chunk_reduce));
    printf("default_top_k: %u\nmodel:         %s\n", s->default_top_k, s->model ? s->model : "");
}

static int cmd_collections(ctl_t *ctl, int argc, char **argv)
{
    if (argc < 2 || ctl_is_help(argv[1])) {
        fputs(COLL_HELP, argc < 2 ? stderr : stdout);
        return argc < 2 ? EXIT_USAGE : EXIT_OK;
    }
    const char *sub = argv[1];
    const char *name = NULL;
    const char *schema_file = NULL;
    Msa__V1__CollectionSchema schema;
    msa_cli_schema_init(&schema);
    bool flags = false;
    for (int i = 2; i < argc; i++) {
        const char *v;
        if (ctl_is_help(argv[i])) {
            fputs(COLL_HELP, stdout);
            return EXIT_OK;
        }
        if (ctl_common_opt(ctl, argc, argv, &i)) continue;
        if (!strcmp(sub, "create")) {
            if (ctl_arg(argc, argv, &i, "--schema-json", &v)) {
                schema_file = v;
                continue;
            }
            if (ctl_schema_opt(&schema, argc, argv, &i)) {
                flags = true;
                continue;
            }
        }
        if (argv[i][0] == '-' && argv[i][1])
            return ctl_usage("collections %s: unknown option %s", sub, argv[i]);
        if (name) return ctl_usage("collections %s: unexpected argument %s", sub, argv[i]);
        name = argv[i];
    }
    msa_cli_status_t st;
    if (!strcmp(sub, "list")) {
        if (name) return ctl_usage("collections list takes no argument");
        Msa__V1__ListCollectionsRequest req = MSA__V1__LIST_COLLECTIONS_REQUEST__INIT;
        Msa__V1__ListCollectionsResponse *r;
        if (msa_cli_list_collections(ctl_conn(ctl), &req, &r, 0, &st)) return ctl_fail(ctl, &st);
        if (ctl->json) {
            cJSON *j = cJSON_CreateObject();
            cJSON *a = cJSON_AddArrayToObject(j, "collections");
            for (size_t i = 0; i < r->n_collections; i++)
                cJSON_AddItemToArray(a, ctl_info_json(r->collections[i]));
            jprint(j);
        } else {
            printf("%-24s %10s %12s %14s %10s %6s %3s %4s %4s %5s %-5s %-5s\n", "NAME", "DOCS",
                   "CHUNKS", "TOKENS", "BYTES", "LAYERS", "H", "HQ", "D", "P", "KV", "ROUTE");
            for (size_t i = 0; i < r->n_collections; i++) {
                const Msa__V1__CollectionInfo *ci = r->collections[i];
                const Msa__V1__CollectionSchema *s = ci->schema;
                char b[32];
                printf("%-24s %10" PRIu64 " %12" PRIu64 " %14" PRIu64
                       " %10s %6zu %3u %4u %4u %5u %-5s %-5s\n",
                       ci->name, ci->documents, ci->chunks, ci->tokens,
                       ctl_bytes(ci->bytes, b, sizeof b), s ? s->n_layers : 0, s ? s->kv_heads : 0,
                       s ? s->query_heads : 0, s ? s->head_dim : 0, s ? s->chunk_tokens : 0,
                       s ? msa_cli_dtype_name(s->kv_dtype) : "",
                       s ? msa_cli_dtype_name(s->routing_dtype) : "");
            }
            if (r->n_collections == 0) printf("(no collections)\n");
        }
        msa_cli_free(r);
        return EXIT_OK;
    }
    if (!name) return ctl_usage("collections %s: NAME missing", sub);
    if (!strcmp(sub, "describe")) {
        Msa__V1__CollectionInfo *ci;
        if (msa_cli_collection_describe(ctl_conn(ctl), name, &ci, &st)) return ctl_fail(ctl, &st);
        if (ctl->json)
            jprint(ctl_info_json(ci));
        else
            print_info_human(ci);
        msa_cli_free(ci);
        return EXIT_OK;
    }
    if (!strcmp(sub, "drop")) {
        uint64_t seq;
        if (msa_cli_collection_drop(ctl_conn(ctl), name, &seq, &st)) return ctl_fail(ctl, &st);
        if (ctl->json) {
            cJSON *j = cJSON_CreateObject();
            cJSON_AddStringToObject(j, "dropped", name);
            jadd_u64(j, "commit_seq", seq);
            jprint(j);
        } else {
            printf("dropped %s (commit %" PRIu64 ")\n", name, seq);
        }
        return EXIT_OK;
    }
    if (!strcmp(sub, "create")) {
        if (schema_file) {
            /* The file first, then the flags on top: re-parse flags after loading. */
            char err[512];
            Msa__V1__CollectionSchema fs;
            msa_cli_schema_init(&fs);
            if (!schema_from_json(schema_file, &fs, err, sizeof err)) return ctl_usage("%s", err);
            for (int i = 2; i < argc; i++) {
                const char *v;
                if (ctl_arg(argc, argv, &i, "--schema-json", &v)) continue;
                ctl_schema_opt(&fs, argc, argv, &i);
            }
            schema = fs;
        } else if (!flags) {
            return ctl_usage("collections create: give --schema-json FILE or schema flags "
                             "(--layers, --kv-heads, --query-heads, --head-dim, ...)");
        }
        Msa__V1__CollectionInfo *ci;
        if (msa_cli_collection_create(ctl_conn(ctl), name, &schema, &ci, &st))
            return ctl_fail(ctl, &st);
        if (ctl->json) {
            jprint(ctl_info_json(ci));
        } else {
            printf("created %s (commit %" PRIu64 ")\n", ci->name, ci->created_seq);
        }
        msa_cli_free(ci);
        return EXIT_OK;
    }
    return ctl_usage("collections: unknown subcommand '%s' (list, create, describe, drop)", sub);
}

/* ======================================================================================
 * stats, backup, verify, health
 * ==================================================================================== */

static const char STATS_HELP[] =
    "usage: msactl stats\n\nServer statistics: version, backend, commit seq, store size,\n"
    "collections, documents, chunks, devices and counters.\n";

static int cmd_stats(ctl_t *ctl, int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (ctl_is_help(argv[i])) {
            fputs(STATS_HELP, stdout);
            return EXIT_OK;
        }
        if (!ctl_common_opt(ctl, argc, argv, &i)) return ctl_usage("stats: unexpected %s", argv[i]);
    }
    msa_cli_status_t st;
    Msa__V1__StatsRequest req = MSA__V1__STATS_REQUEST__INIT;
    Msa__V1__StatsResponse *r;
    if (msa_cli_stats(ctl_conn(ctl), &req, &r, 0, &st)) return ctl_fail(ctl, &st);
    if (ctl->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "version", r->version);
        cJSON_AddStringToObject(j, "backend", r->backend);
        jadd_u64(j, "commit_seq", r->commit_seq);
        jadd_u64(j, "store_bytes", r->store_bytes);
        jadd_u64(j, "collections", r->collections);
        jadd_u64(j, "documents", r->documents);
        jadd_u64(j, "chunks", r->chunks);
        cJSON *d = cJSON_AddArrayToObject(j, "devices");
        for (size_t i = 0; i < r->n_devices; i++) {
            const Msa__V1__DeviceInfo *di = r->devices[i];
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "name", di->name);
            jadd_u64(o, "memory_total", di->memory_total);
            jadd_u64(o, "memory_used", di->memory_used);
            jadd_u64(o, "routing_bytes", di->routing_bytes);
            jadd_u64(o, "cache_bytes", di->cache_bytes);
            cJSON_AddItemToArray(d, o);
        }
        cJSON *cn = cJSON_AddObjectToObject(j, "counters");
        for (size_t i = 0; i < r->n_counters; i++)
            jadd_u64(cn, r->counters[i]->key, r->counters[i]->value);
        jprint(j);
    } else {
        char b[32];
        printf("%-14s %s\n", "version", r->version);
        printf("%-14s %s\n", "backend", r->backend);
        printf("%-14s %" PRIu64 "\n", "commit_seq", r->commit_seq);
        printf("%-14s %" PRIu64 " (%s)\n", "store_bytes", r->store_bytes,
               ctl_bytes(r->store_bytes, b, sizeof b));
        printf("%-14s %" PRIu64 "\n", "collections", r->collections);
        printf("%-14s %" PRIu64 "\n", "documents", r->documents);
        printf("%-14s %" PRIu64 "\n", "chunks", r->chunks);
        if (r->n_devices) {
            printf("\n%-28s %12s %12s %12s %12s\n", "DEVICE", "MEM TOTAL", "MEM USED", "ROUTING",
                   "CACHE");
            for (size_t i = 0; i < r->n_devices; i++) {
                const Msa__V1__DeviceInfo *di = r->devices[i];
                char b1[32], b2[32], b3[32], b4[32];
                printf("%-28s %12s %12s %12s %12s\n", di->name, ctl_bytes(di->memory_total, b1, 32),
                       ctl_bytes(di->memory_used, b2, 32), ctl_bytes(di->routing_bytes, b3, 32),
                       ctl_bytes(di->cache_bytes, b4, 32));
            }
        }
        if (r->n_counters) {
            printf("\n%-40s %16s\n", "COUNTER", "VALUE");
            for (size_t i = 0; i < r->n_counters; i++)
                printf("%-40s %16" PRIu64 "\n", r->counters[i]->key, r->counters[i]->value);
        }
    }
    msa_cli_free(r);
    return EXIT_OK;
}

static const char BACKUP_HELP[] =
    "usage: msactl backup NAME [--compact]\n\n"
    "Writes a consistent copy of the store to NAME inside the daemon's backup directory\n"
    "(no '/' or '..'). --compact omits free pages (slower, smaller).\n";

static int cmd_backup(ctl_t *ctl, int argc, char **argv)
{
    const char *name = NULL;
    bool compact = false;
    for (int i = 1; i < argc; i++) {
        if (ctl_is_help(argv[i])) {
            fputs(BACKUP_HELP, stdout);
            return EXIT_OK;
        }
        if (ctl_common_opt(ctl, argc, argv, &i)) continue;
        if (!strcmp(argv[i], "--compact"))
            compact = true;
        else if (argv[i][0] == '-' && argv[i][1])
            return ctl_usage("backup: unknown option %s", argv[i]);
        else if (name)
            return ctl_usage("backup: unexpected %s", argv[i]);
        else
            name = argv[i];
    }
    if (!name) return ctl_usage("backup: NAME missing (see msactl backup --help)");
    msa_cli_status_t st;
    Msa__V1__BackupRequest req = MSA__V1__BACKUP_REQUEST__INIT;
    req.name = (char *)name;
    req.compact = compact;
    Msa__V1__BackupResponse *r;
    if (msa_cli_backup(ctl_conn(ctl), &req, &r, 0, &st)) return ctl_fail(ctl, &st);
    if (ctl->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "name", name);
        jadd_u64(j, "snapshot_seq", r->snapshot_seq);
        jadd_u64(j, "bytes", r->bytes);
        jprint(j);
    } else {
        char b[32];
        printf("backup %s: %s at commit %" PRIu64 "\n", name, ctl_bytes(r->bytes, b, sizeof b),
               r->snapshot_seq);
    }
    msa_cli_free(r);
    return EXIT_OK;
}

static const char VERIFY_HELP[] =
    "usage: msactl verify [COLL]\n\n"
    "Checks the store's consistency (all collections, or COLL). Exit code 3 when the\n"
    "server reports problems; they are listed one per line.\n";

static int cmd_verify(ctl_t *ctl, int argc, char **argv)
{
    const char *coll = NULL;
    for (int i = 1; i < argc; i++) {
        if (ctl_is_help(argv[i])) {
            fputs(VERIFY_HELP, stdout);
            return EXIT_OK;
        }
        if (ctl_common_opt(ctl, argc, argv, &i)) continue;
        if (argv[i][0] == '-' && argv[i][1]) return ctl_usage("verify: unknown option %s", argv[i]);
        if (coll) return ctl_usage("verify: unexpected %s", argv[i]);
        coll = argv[i];
    }
    msa_cli_status_t st;
    Msa__V1__VerifyRequest req = MSA__V1__VERIFY_REQUEST__INIT;
    req.collection = (char *)(coll ? coll : "");
    Msa__V1__VerifyResponse *r;
    /* A full check reads everything: no default deadline unless one was asked for. */
    if (msa_cli_verify(ctl_conn(ctl), &req, &r, ctl->opt.timeout_ms ? 0 : -1, &st))
        return ctl_fail(ctl, &st);
    int rc = r->n_problems ? EXIT_PROBLEMS : EXIT_OK;
    if (ctl->json) {
        cJSON *j = cJSON_CreateObject();
        jadd_u64(j, "documents_checked", r->documents_checked);
        cJSON_AddBoolToObject(j, "ok", r->n_problems == 0);
        cJSON *p = cJSON_AddArrayToObject(j, "problems");
        for (size_t i = 0; i < r->n_problems; i++)
            cJSON_AddItemToArray(p, cJSON_CreateString(r->problems[i]));
        jprint(j);
    } else {
        printf("checked %" PRIu64 " documents: %s\n", r->documents_checked,
               r->n_problems ? "PROBLEMS" : "OK");
        for (size_t i = 0; i < r->n_problems; i++) printf("  %s\n", r->problems[i]);
    }
    msa_cli_free(r);
    return rc;
}

static int cmd_health(ctl_t *ctl, int argc, char **argv)
{
    const char *svc = "";
    for (int i = 1; i < argc; i++) {
        if (ctl_is_help(argv[i])) {
            puts("usage: msactl health [SERVICE]\n\ngrpc.health.v1.Health/Check; exit 0 when "
                 "SERVING, 3 when not serving, 1 on errors.");
            return EXIT_OK;
        }
        if (ctl_common_opt(ctl, argc, argv, &i)) continue;
        svc = argv[i];
    }
    msa_cli_status_t st;
    bool serving = false;
    if (msa_cli_health(ctl_conn(ctl), svc, &serving, 0, &st)) return ctl_fail(ctl, &st);
    if (ctl->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "status", serving ? "SERVING" : "NOT_SERVING");
        jprint(j);
    } else {
        puts(serving ? "SERVING" : "NOT_SERVING");
    }
    return serving ? EXIT_OK : EXIT_PROBLEMS;
}

/* ======================================================================================
 * main
 * ==================================================================================== */

int main(int argc, char **argv)
{
    ctl_t ctl;
    memset(&ctl, 0, sizeof ctl);
    msa_cli_options_init(&ctl.opt);
    ctl.opt.addr = getenv("MSA_ADDR");
    ctl.opt.token_file = getenv("MSA_TOKEN_FILE");
    if (ctl.opt.token_file && !*ctl.opt.token_file) ctl.opt.token_file = NULL;
    ctl.progress = isatty(STDOUT_FILENO) && isatty(STDERR_FILENO);

    int i = 1;
    for (; i < argc; i++) {
        if (ctl_is_help(argv[i])) {
            fputs(MAIN_HELP, stdout);
            return EXIT_OK;
        }
        if (!strcmp(argv[i], "--version")) {
            printf("msactl %s\n", MSA_VERSION);
            return EXIT_OK;
        }
        if (argv[i][0] != '-') break;
        if (!ctl_common_opt(&ctl, argc, argv, &i))
            return ctl_usage("unknown option %s (see msactl --help)", argv[i]);
    }
    if (i >= argc) {
        fputs(MAIN_HELP, stderr);
        return EXIT_USAGE;
    }
    const char *cmd = argv[i];
    int n = argc - i;
    char **av = argv + i;
    int rc;
    if (!strcmp(cmd, "collections") || !strcmp(cmd, "coll"))
        rc = cmd_collections(&ctl, n, av);
    else if (!strcmp(cmd, "docs"))
        rc = cmd_docs(&ctl, n, av);
    else if (!strcmp(cmd, "put"))
        rc = cmd_put(&ctl, n, av);
    else if (!strcmp(cmd, "route"))
        rc = cmd_route(&ctl, n, av);
    else if (!strcmp(cmd, "attend"))
        rc = cmd_attend(&ctl, n, av);
    else if (!strcmp(cmd, "stats"))
        rc = cmd_stats(&ctl, n, av);
    else if (!strcmp(cmd, "backup"))
        rc = cmd_backup(&ctl, n, av);
    else if (!strcmp(cmd, "verify"))
        rc = cmd_verify(&ctl, n, av);
    else if (!strcmp(cmd, "health"))
        rc = cmd_health(&ctl, n, av);
    else if (!strcmp(cmd, "bench"))
        rc = cmd_bench(&ctl, n, av);
    else if (!strcmp(cmd, "help")) {
        fputs(MAIN_HELP, stdout);
        rc = EXIT_OK;
    } else
        rc = ctl_usage("unknown command '%s' (see msactl --help)", cmd);
    ctl_progress_end(&ctl);
    msa_cli_close(ctl.c);
    return rc;
}
