/* bench_engine.c — the core engine benchmark (issue "Core engine"): durable
 * ingest and Route at MSA-4B shapes, each figure next to its physical floor.
 *
 *   bench_engine [--dir D] [--tokens N] [--doc-tokens N] [--reps R] [--threads N]
 *                [--ingest-threads N] (concurrent writers, default 2, at most 16)
 *                [--dump DIR]   (writes the keys and queries for the FAISS peer)
 *
 * Floors are measured in the same run: the disk's fsync'd sequential write
 * rate, the memory read bandwidth (all threads streaming), and the float32
 * FMA peak of the cores. Output: human lines plus one JSON line "bench: {...}".
 */
#define _GNU_SOURCE
#include "bench_floor.h"
#include "engine.h"
#include "kernels.h"
#include "tensor.h"

#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

enum { LAYERS = 18, H = 8, HQ = 32, D = 128, P = 64, T = 64, TOP_K = 16 };

/* Sequential write of `mb` MiB in 1 MiB writes, fsync at the end: the disk's
 * floor for durable ingest. */
static double disk_write_mbps(const char *dir, int mb)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/fsync-probe", dir);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) return 0;
    char *buf = malloc(1 << 20);
    for (int i = 0; i < (1 << 20); i++) buf[i] = (char)i;
    double t0 = now_s();
    for (int i = 0; i < mb; i++)
        if (write(fd, buf, 1 << 20) != (1 << 20)) break;
    fsync(fd);
    double t = now_s() - t0;
    close(fd);
    unlink(path);
    free(buf);
    return mb / t;
}

/* ==== ingest ==================================================================== */

enum { DOCS_PER_REQ = 4 };

typedef struct ingest {
    msa_engine_t *e;
    const msa_schema_t *s;
    const uint16_t *pool; /* random BF16 rows reused at different offsets */
    size_t blk;           /* elements of one full document's layer block */
    long ndocs, tokens, doc_tokens;
    int nthreads;
    pthread_mutex_t lock;
    double bytes;
    int failed;
} ingest_t;

/* Writes every nthreads-th request of DOCS_PER_REQ documents, as one of
 * several concurrent clients: group commit is what they share. */
typedef struct ingest_arg {
    ingest_t *g;
    int slot;
} ingest_arg_t;

static void *ingest_thread(void *arg)
{
    ingest_t *g = ((ingest_arg_t *)arg)->g;
    const int *slot = &((ingest_arg_t *)arg)->slot;
    msa_engine_layer_kv_t lk[DOCS_PER_REQ * LAYERS];
    msa_engine_write_op_t ops[DOCS_PER_REQ];
    double bytes = 0;
    for (long d0 = (long)*slot * DOCS_PER_REQ; d0 < g->ndocs;
         d0 += (long)g->nthreads * DOCS_PER_REQ) {
        int n = (int)(g->ndocs - d0 < DOCS_PER_REQ ? g->ndocs - d0 : DOCS_PER_REQ);
        for (int j = 0; j < n; j++) {
            long id = d0 + j + 1;
            long tk = id == g->ndocs ? g->tokens - (g->ndocs - 1) * g->doc_tokens : g->doc_tokens;
            uint32_t c = (uint32_t)((tk + P - 1) / P);
            for (int l = 0; l < LAYERS; l++) {
                msa_engine_layer_kv_t *x = &lk[j * LAYERS + l];
                const uint16_t *base = g->pool + ((size_t)(id * 7 + l * 3) % 61) * g->blk;
                msa_tensor_t t = {.dtype = MSA_DT_BF16,
                                  .ndim = 3,
                                  .shape = {c, H, D},
                                  .nbytes = (size_t)c * H * D * 2};
                x->layer = g->s->layers[l];
                x->k = t, x->v = t, x->router_k = t;
                x->k.data = base;
                x->v.data = base + g->blk;
                x->router_k.data = base + 2 * g->blk;
                bytes += 3.0 * t.nbytes;
            }
            ops[j] = (msa_engine_write_op_t){.kind = MSA_OP_PUT,
                                             .put = {.id = (uint64_t)id,
                                                     .tokens = (uint32_t)tk,
                                                     .n_layers = LAYERS,
                                                     .layers = &lk[j * LAYERS]}};
        }
        msa_engine_write_req_t req = {.collection = "bench", .n_ops = (size_t)n, .ops = ops};
        msa_engine_write_result_t *res = NULL;
        msa_status_t st;
        if (msa_engine_write(g->e, &req, &res, &st)) {
            fprintf(stderr, "write: %s\n", st.msg);
            g->failed = 1;
            break;
        }
        msa_engine_write_result_free(res);
    }
    pthread_mutex_lock(&g->lock);
    g->bytes += bytes;
    pthread_mutex_unlock(&g->lock);
    return NULL;
}

/* ==== workload ================================================================ */

static msa_schema_t msa4b_schema(void)
{
    msa_schema_t s;
    memset(&s, 0, sizeof s);
    s.n_layers = LAYERS;
    for (int l = 0; l < LAYERS; l++) s.layers[l] = 18 + l; /* the upper half of 36 layers */
    s.kv_heads = H;
    s.query_heads = HQ;
    s.head_dim = D;
    s.chunk_tokens = P;
    s.kv_dtype = MSA_DT_BF16;
    s.routing_dtype = MSA_DT_BF16;
    s.separate_router_keys = true;
    s.similarity = MSA_SIM_COSINE;
    s.head_reduce = MSA_HEAD_MEAN;
    s.query_reduce = MSA_QUERY_MAX;
    s.chunk_reduce = MSA_CHUNK_MAX;
    s.default_top_k = TOP_K;
    return s;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Writes a float32 .npy of the given shape. */
static void write_npy(const char *path, const float *data, const uint32_t *shape, int ndim)
{
    FILE *f = fopen(path, "wb");
    if (!f) return;
    char hdr[256], dims[96] = "";
    size_t n = 1;
    for (int i = 0; i < ndim; i++) {
        char d[24];
        snprintf(d, sizeof d, "%u,%s", shape[i], ndim == 1 ? "" : " ");
        strcat(dims, d);
        n *= shape[i];
    }
    int len = snprintf(hdr, sizeof hdr, "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }",
                       dims);
    int total = 10 + len + 1;
    int pad = (64 - total % 64) % 64;
    fwrite("\x93NUMPY\x01\x00", 1, 8, f);
    uint16_t hl = (uint16_t)(len + pad + 1);
    fwrite(&hl, 2, 1, f);
    fwrite(hdr, 1, len, f);
    for (int i = 0; i < pad; i++) fputc(' ', f);
    fputc('\n', f);
    fwrite(data, sizeof(float), n, f);
    fclose(f);
}

int main(int argc, char **argv)
{
    const char *dir = NULL, *dump = NULL;
    long tokens = 1000000, doc_tokens = 1024;
    int reps = 15, threads = 0, ingest_threads = 2;
    const char *backend = "cpu";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--dir") && i + 1 < argc)
            dir = argv[++i];
        else if (!strcmp(argv[i], "--dump") && i + 1 < argc)
            dump = argv[++i];
        else if (!strcmp(argv[i], "--tokens") && i + 1 < argc)
            tokens = atol(argv[++i]);
        else if (!strcmp(argv[i], "--doc-tokens") && i + 1 < argc)
            doc_tokens = atol(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--ingest-threads") && i + 1 < argc)
            ingest_threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--backend") && i + 1 < argc)
            backend = argv[++i];
        else {
            fprintf(stderr,
                    "usage: bench_engine [--dir D] [--tokens N] [--doc-tokens N] [--reps R] "
                    "[--threads N] [--ingest-threads N] [--backend cpu|cuda] [--dump DIR]\n");
            return 2;
        }
    }
    if (ingest_threads < 1) ingest_threads = 1;
    if (ingest_threads > 16) ingest_threads = 16;
    char tmp[64] = "/tmp/msa-bench-XXXXXX";
    if (!dir) dir = mkdtemp(tmp);
    int ncpu = threads ? threads : (int)sysconf(_SC_NPROCESSORS_ONLN);

    /* ---- floors ---- */
    double disk = disk_write_mbps(dir, 512);
    msa_idx_pool_t *fpool = NULL;
    if (ncpu > 1 && msa_idx_pool_create((unsigned)ncpu - 1, &fpool) != MSA_OK) fpool = NULL;
    size_t bw_bytes = (size_t)1 << 30;
    void *bw_buf = aligned_alloc(64, bw_bytes);
    memset(bw_buf, 1, bw_bytes);
    double bw = measure_bw(fpool, bw_buf, bw_bytes) / 1e9;
    free(bw_buf);
    double peak = measure_peak(fpool, 0) / 1e9;
    double peak_bf16 = msa_idx_isa_supported(MSA_ISA_AVX512BF16) ? measure_peak(fpool, 1) / 1e9 : 0;
    msa_idx_pool_destroy(fpool);
    printf("floors: disk %.0f MB/s (fsync'd sequential), memory read %.1f GB/s (%d threads), "
           "fp32 FMA peak %.0f GMAC/s, vdpbf16ps peak %.0f GMAC/s\n",
           disk, bw, ncpu, peak, peak_bf16);

    /* ---- ingest ---- */
    char data_dir[4200];
    snprintf(data_dir, sizeof data_dir, "%s/store", dir);
    bool cuda = !strcmp(backend, "cuda");
    msa_engine_config_t cfg = {.data_dir = data_dir,
                               .backend = cuda ? MSA_BACKEND_CUDA : MSA_BACKEND_CPU,
                               .threads = (unsigned)threads,
                               .gpu = {.shards_per_gpu = 1}};
    msa_dev_config_env(&cfg.gpu.dev); /* MSA_GPU_SIM=1: the simulated device */
    msa_engine_t *e;
    msa_status_t st;
    if (msa_engine_open(&cfg, &e, &st)) {
        fprintf(stderr, "open: %s\n", st.msg);
        return 1;
    }
    msa_schema_t s = msa4b_schema();
    msa_engine_create_collection_result_t *created = NULL;
    if (msa_engine_create_collection(e, "bench", &s, &created, &st)) {
        fprintf(stderr, "create: %s\n", st.msg);
        return 1;
    }
    msa_engine_coll_info_t info = created->info;
    msa_engine_create_collection_result_free(created);
    long ndocs = (tokens + doc_tokens - 1) / doc_tokens;
    uint32_t C = (uint32_t)((doc_tokens + P - 1) / P);
    size_t blk = (size_t)C * H * D;
    /* One pool of random BF16 rows reused across documents at different
     * offsets: generation stays out of the timed region. */
    size_t pool_n = blk * 64;
    uint16_t *pool = malloc(pool_n * sizeof *pool);
    for (size_t i = 0; i < pool_n; i++) pool[i] = msa_f32_to_bf16(frand());
    ingest_t ing = {.e = e,
                    .s = &s,
                    .pool = pool,
                    .blk = blk,
                    .ndocs = ndocs,
                    .tokens = tokens,
                    .doc_tokens = doc_tokens,
                    .nthreads = ingest_threads,
                    .lock = PTHREAD_MUTEX_INITIALIZER};
    pthread_t th[16];
    ingest_arg_t args[16];
    double t_start = now_s();
    for (int i = 0; i < ingest_threads; i++) {
        args[i] = (ingest_arg_t){&ing, i};
        pthread_create(&th[i], NULL, ingest_thread, &args[i]);
    }
    for (int i = 0; i < ingest_threads; i++) pthread_join(th[i], NULL);
    double t_ingest = now_s() - t_start;
    if (ing.failed) return 1;
    double ingest_mbps = ing.bytes / 1e6 / t_ingest;
    printf("ingest: %ld docs, %.0f MB of tensors in %.2f s = %.0f MB/s durable "
           "(%d client threads, %d docs per request; disk floor %.0f MB/s)\n",
           ndocs, ing.bytes / 1e6, t_ingest, ingest_mbps, ingest_threads, DOCS_PER_REQ, disk);

    /* ---- route ---- */
    float *q = malloc((size_t)LAYERS * T * HQ * D * sizeof *q);
    for (size_t i = 0; i < (size_t)LAYERS * T * HQ * D; i++) q[i] = frand();
    msa_engine_layer_query_t lq[LAYERS];
    for (int l = 0; l < LAYERS; l++) {
        lq[l] = (msa_engine_layer_query_t){.layer = s.layers[l]};
        lq[l].routing_q = (msa_tensor_t){.dtype = MSA_DT_F32,
                                         .ndim = 3,
                                         .shape = {T, HQ, D},
                                         .data = q + (size_t)l * T * HQ * D,
                                         .nbytes = (size_t)T * HQ * D * 4};
    }
    msa_engine_route_req_t rr = {
        .c = {.collection = "bench"}, .n_layers = LAYERS, .layers = lq, .top_k = TOP_K};
    double *ms = malloc(reps * sizeof *ms), first_route_ms = 0;
    for (int r = -1; r < reps; r++) {
        msa_engine_route_result_t *res;
        double t0 = now_s();
        if (msa_engine_route(e, &rr, &res, &st)) {
            fprintf(stderr, "route: %s\n", st.msg);
            return 1;
        }
        if (r >= 0)
            ms[r] = (now_s() - t0) * 1e3;
        else
            first_route_ms = (now_s() - t0) * 1e3;
        msa_engine_route_result_free(res);
    }
    if (cuda)
        printf("route: first call %.2f ms (uploads the router keys to the device)\n",
               first_route_ms);
    qsort(ms, reps, sizeof *ms, cmp_double);
    double rows = (double)info.chunks;
    msa_engine_describe_collection_result_t *ci = NULL;
    if (msa_engine_describe_collection(e, "bench", &ci, &st) == MSA_OK)
        rows = (double)ci->info.chunks;
    msa_engine_describe_collection_result_free(ci);
    double key_bytes = rows * LAYERS * H * D * 2;
    double macs = rows * LAYERS * (double)T * H * D;
    double floor_bw = key_bytes / (bw * 1e9) * 1e3, floor_fma = macs / (peak * 1e9) * 1e3;
    double floor_ms = floor_bw > floor_fma ? floor_bw : floor_fma;
    printf("route: T=%d, %d layers, %.0f rows/layer: median %.2f ms (p10 %.2f, p90 %.2f); "
           "floor %.2f ms (bandwidth %.2f ms for %.0f MB, compute %.2f ms for %.1f GMAC) = %.2fx "
           "floor\n",
           T, LAYERS, rows, ms[reps / 2], ms[reps / 10], ms[reps * 9 / 10], floor_ms, floor_bw,
           key_bytes / 1e6, floor_fma, macs / 1e9, ms[reps / 2] / floor_ms);
    /* Attend over the routed documents (q = routing_q): routing plus the K/V
     * gather from LMDB and the attention itself. */
    for (int l = 0; l < LAYERS; l++) lq[l].q = lq[l].routing_q;
    msa_engine_attend_req_t ar = {
        .c = {.collection = "bench"}, .n_layers = LAYERS, .layers = lq, .top_k = TOP_K};
    double *ams = malloc(reps * sizeof *ams), cold_ms = 0;
    for (int r = -1; r < reps; r++) {
        msa_engine_attend_result_t *res;
        double t0 = now_s();
        if (msa_engine_attend(e, &ar, &res, &st)) {
            fprintf(stderr, "attend: %s\n", st.msg);
            return 1;
        }
        if (r >= 0)
            ams[r] = (now_s() - t0) * 1e3;
        else
            cold_ms = (now_s() - t0) * 1e3;
        msa_engine_attend_result_free(res);
    }
    qsort(ams, reps, sizeof *ams, cmp_double);
    printf("attend: T=%d, %d layers, top_k %d: median %.2f ms (routing included)\n", T, LAYERS,
           TOP_K, ams[reps / 2]);
    if (cuda) {
        msa_engine_stats_result_t *ss = NULL;
        if (msa_engine_stats(e, &ss, &st) == MSA_OK)
            printf("attend: cold K/V cache %.2f ms (first call), warm %.2f ms; cache %llu hits, "
                   "%llu misses; device %s\n",
                   cold_ms, ams[reps / 2], (unsigned long long)ss->gpu.cache_hits,
                   (unsigned long long)ss->gpu.cache_misses, ss->n_gpu ? ss->gpu_dev[0].name : "?");
        msa_engine_stats_result_free(ss);
    }

    /* A bf16 dot product does twice the MACs per instruction but rounds the
     * query to bf16; the contract's float32 scores keep fp32 FMA as the floor. */
    double floor_bf16 = peak_bf16 > 0 ? macs / (peak_bf16 * 1e9) * 1e3 : 0;
    printf("route: lossy-bf16 bound (vdpbf16ps peak, query rounded to bf16): %.2f ms\n",
           floor_bf16);
    printf("bench: {\"tokens\": %ld, \"docs\": %ld, \"ingest_mb_s\": %.1f, \"disk_mb_s\": %.1f, "
           "\"route_ms_median\": %.3f, \"attend_ms_median\": %.3f, \"route_floor_ms\": %.3f, "
           "\"floor_bw_ms\": %.3f, "
           "\"floor_compute_ms\": %.3f, \"floor_bf16_dot_ms\": %.3f, \"mem_gb_s\": %.2f, "
           "\"fma_gmac_s\": %.1f, \"bf16_gmac_s\": %.1f, \"isa\": \"%s\", \"backend\": \"%s\", "
           "\"attend_cold_ms\": %.3f, \"route_first_ms\": %.3f}\n",
           tokens, ndocs, ingest_mbps, disk, ms[reps / 2], ams[reps / 2], floor_ms, floor_bw,
           floor_fma, floor_bf16, bw, peak, peak_bf16, msa_idx_isa_name(msa_idx_isa_detect()),
           backend, cold_ms, first_route_ms);

    /* ---- the FAISS peer's input: the stored keys (normalised, as float32) and
     * the group-summed normalised queries (COSINE + HEAD_MEAN). ---- */
    if (dump) {
        mkdir(dump, 0700);
        uint32_t R = (uint32_t)rows;
        float *keys = malloc((size_t)R * H * D * sizeof *keys);
        float *qg = malloc((size_t)T * H * D * sizeof *qg);
        for (int l = 0; l < LAYERS; l++) {
            uint64_t *ids = malloc(ndocs * sizeof *ids);
            for (long i = 0; i < ndocs; i++) ids[i] = (uint64_t)i + 1;
            uint32_t layer = s.layers[l];
            msa_engine_get_req_t gr = {.collection = "bench",
                                       .n_ids = (size_t)ndocs,
                                       .ids = ids,
                                       .with_tensors = true,
                                       .n_layers = 1,
                                       .layers = &layer};
            msa_engine_get_result_t *g;
            if (msa_engine_get(e, &gr, &g, &st)) {
                fprintf(stderr, "get: %s\n", st.msg);
                return 1;
            }
            size_t at = 0;
            for (size_t i = 0; i < g->n_records; i++) {
                const msa_tensor_t *rk = &g->records[i].layers[0].router_k;
                size_t n = (size_t)rk->shape[0] * H * D;
                msa_tensor_to_f32(MSA_DT_BF16, rk->data, n, keys + at);
                msa_tensor_l2_normalize(keys + at, n / D, D);
                at += n;
            }
            msa_engine_get_result_free(g);
            free(ids);
            const float *ql = q + (size_t)l * T * HQ * D;
            for (int t = 0; t < T; t++)
                for (int h = 0; h < H; h++)
                    for (int dd = 0; dd < D; dd++) {
                        float sum = 0;
                        for (int j = h * (HQ / H); j < (h + 1) * (HQ / H); j++) {
                            const float *v = ql + ((size_t)t * HQ + j) * D;
                            double nn = 0;
                            for (int k = 0; k < D; k++) nn += (double)v[k] * v[k];
                            sum += nn > 0 ? v[dd] / (float)sqrt(nn) : 0.f;
                        }
                        qg[((size_t)t * H + h) * D + dd] = sum;
                    }
            char path[4300];
            uint32_t ks[2] = {R, H * D}, qs[2] = {T, H * D};
            snprintf(path, sizeof path, "%s/keys_%02d.npy", dump, l);
            write_npy(path, keys, ks, 2);
            snprintf(path, sizeof path, "%s/query_%02d.npy", dump, l);
            write_npy(path, qg, qs, 2);
        }
        free(keys);
        free(qg);
        printf("dump: keys and queries of %d layers in %s\n", LAYERS, dump);
    }
    msa_engine_close(e);
    free(pool);
    free(q);
    free(ms);
    free(ams);
    if (dir == tmp) {
        char cmd[200];
        snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
        if (system(cmd)) fprintf(stderr, "cleanup failed\n");
    }
    return 0;
}
