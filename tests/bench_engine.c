/* bench_engine.c — the core engine benchmark (issue "Core engine"): durable
 * ingest and Route at MSA-4B shapes, each figure next to its physical floor.
 *
 *   bench_engine [--dir D] [--tokens N] [--doc-tokens N] [--reps R] [--threads N]
 *                [--dump DIR]   (writes the keys and queries for the FAISS peer)
 *
 * Floors are measured in the same run: the disk's fsync'd sequential write
 * rate, the memory read bandwidth (all threads streaming), and the float32
 * FMA peak of the cores. Output: human lines plus one JSON line "bench: {...}".
 */
#define _GNU_SOURCE
#include "engine.h"
#include "kernels.h"
#include "tensor.h"

#include <fcntl.h>
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

enum { LAYERS = 18, H = 8, HQ = 32, D = 128, P = 64, T = 64, TOP_K = 16 };

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;
static float frand(void) /* uniform in [-1, 1) */
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) * (1.0 / (1 << 23))) - 1.0f;
}

/* ==== floors ================================================================ */

/* Sequential write of `mb` MiB in 1 MiB writes, fsync at the end. */
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

typedef struct bw_arg {
    const float *p;
    size_t n;
    float sink;
} bw_arg_t;

__attribute__((target("avx2"))) static void *bw_read(void *arg)
{
    bw_arg_t *a = arg;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (size_t i = 0; i + 32 <= a->n; i += 32) {
        s0 = _mm256_add_ps(s0, _mm256_load_ps(a->p + i));
        s1 = _mm256_add_ps(s1, _mm256_load_ps(a->p + i + 8));
        s2 = _mm256_add_ps(s2, _mm256_load_ps(a->p + i + 16));
        s3 = _mm256_add_ps(s3, _mm256_load_ps(a->p + i + 24));
    }
    float out[8];
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    a->sink = out[0];
    return NULL;
}

/* Read bandwidth in GB/s over a 1 GiB buffer with nthreads streaming readers. */
static double mem_read_gbps(int nthreads)
{
    size_t n = (size_t)1 << 28; /* floats: 1 GiB */
    float *buf = aligned_alloc(64, n * sizeof(float));
    memset(buf, 1, n * sizeof(float));
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        pthread_t th[64];
        bw_arg_t a[64];
        double t0 = now_s();
        for (int i = 0; i < nthreads; i++) {
            a[i] = (bw_arg_t){buf + i * (n / nthreads), n / nthreads, 0};
            pthread_create(&th[i], NULL, bw_read, &a[i]);
        }
        for (int i = 0; i < nthreads; i++) pthread_join(th[i], NULL);
        double gbps = n * sizeof(float) / (now_s() - t0) / 1e9;
        if (gbps > best) best = gbps;
    }
    free(buf);
    return best;
}

__attribute__((target("avx2,fma"))) static void *fma_loop(void *arg)
{
    double *gflops = arg;
    __m256 acc[10];
    for (int i = 0; i < 10; i++) acc[i] = _mm256_set1_ps((float)i);
    const __m256 m = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
    long iters = 20000000;
    double t0 = now_s();
    for (long it = 0; it < iters; it++)
        for (int i = 0; i < 10; i++) acc[i] = _mm256_fmadd_ps(acc[i], m, b);
    double t = now_s() - t0;
    float sink[8];
    __m256 s = acc[0];
    for (int i = 1; i < 10; i++) s = _mm256_add_ps(s, acc[i]);
    _mm256_storeu_ps(sink, s);
    *gflops = iters * 10.0 * 8 / t / 1e9 + (sink[0] == 12345.f); /* multiply-adds per s */
    return NULL;
}

/* fp32 multiply-adds per second (G) over nthreads cores, 256-bit FMA; on
 * AMD Zen 4 a 512-bit FMA issues as two 256-bit halves, so this is the peak. */
static double fma_peak_gmacs(int nthreads)
{
    pthread_t th[64];
    double g[64];
    for (int i = 0; i < nthreads; i++) pthread_create(&th[i], NULL, fma_loop, &g[i]);
    double total = 0;
    for (int i = 0; i < nthreads; i++) {
        pthread_join(th[i], NULL);
        total += g[i];
    }
    return total;
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
    int len = snprintf(hdr, sizeof hdr, "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }", dims);
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
    int reps = 15, threads = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--dir") && i + 1 < argc) dir = argv[++i];
        else if (!strcmp(argv[i], "--dump") && i + 1 < argc) dump = argv[++i];
        else if (!strcmp(argv[i], "--tokens") && i + 1 < argc) tokens = atol(argv[++i]);
        else if (!strcmp(argv[i], "--doc-tokens") && i + 1 < argc) doc_tokens = atol(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: bench_engine [--dir D] [--tokens N] [--doc-tokens N] [--reps R] "
                            "[--threads N] [--dump DIR]\n");
            return 2;
        }
    }
    char tmp[64] = "/tmp/msa-bench-XXXXXX";
    if (!dir) dir = mkdtemp(tmp);
    int ncpu = threads ? threads : (int)sysconf(_SC_NPROCESSORS_ONLN);

    /* ---- floors ---- */
    double disk = disk_write_mbps(dir, 512);
    double bw = mem_read_gbps(ncpu);
    double peak = fma_peak_gmacs(ncpu);
    printf("floors: disk %.0f MB/s (fsync'd sequential), memory read %.1f GB/s (%d threads), "
           "fp32 FMA peak %.0f GMAC/s\n", disk, bw, ncpu, peak);

    /* ---- ingest ---- */
    char data_dir[4200];
    snprintf(data_dir, sizeof data_dir, "%s/store", dir);
    msa_srv_config_t cfg = {.data_dir = data_dir, .backend = MSA_BACKEND_CPU,
                            .threads = (unsigned)threads};
    msa_engine_t *e;
    msa_status_t st;
    if (msa_srv_open(&cfg, &e, &st)) {
        fprintf(stderr, "open: %s\n", st.msg);
        return 1;
    }
    msa_schema_t s = msa4b_schema();
    msa_coll_info_t info;
    if (msa_srv_create_collection(e, "bench", &s, &info, &st)) {
        fprintf(stderr, "create: %s\n", st.msg);
        return 1;
    }
    long ndocs = (tokens + doc_tokens - 1) / doc_tokens;
    uint32_t C = (uint32_t)((doc_tokens + P - 1) / P);
    size_t blk = (size_t)C * H * D;
    /* One pool of random BF16 rows reused across documents at different
     * offsets: generation stays out of the timed region. */
    size_t pool_n = blk * 64;
    uint16_t *pool = malloc(pool_n * sizeof *pool);
    for (size_t i = 0; i < pool_n; i++) pool[i] = msa_f32_to_bf16(frand());
    enum { DOCS_PER_REQ = 4 };
    msa_layer_kv_t *lk = calloc((size_t)DOCS_PER_REQ * LAYERS, sizeof *lk);
    msa_write_op_t ops[DOCS_PER_REQ];
    double bytes = 0, t_ingest = 0;
    for (long d0 = 0; d0 < ndocs; d0 += DOCS_PER_REQ) {
        int n = (int)(ndocs - d0 < DOCS_PER_REQ ? ndocs - d0 : DOCS_PER_REQ);
        for (int j = 0; j < n; j++) {
            long id = d0 + j + 1;
            long tk = id == ndocs ? tokens - (ndocs - 1) * doc_tokens : doc_tokens;
            uint32_t c = (uint32_t)((tk + P - 1) / P);
            for (int l = 0; l < LAYERS; l++) {
                msa_layer_kv_t *x = &lk[j * LAYERS + l];
                const uint16_t *base = pool + ((size_t)(id * 7 + l * 3) % 61) * blk;
                msa_tensor_t t = {.dtype = MSA_DT_BF16, .ndim = 3, .shape = {c, H, D},
                                  .nbytes = (size_t)c * H * D * 2};
                x->layer = s.layers[l];
                x->k = t, x->v = t, x->router_k = t;
                x->k.data = base;
                x->v.data = base + blk;
                x->router_k.data = base + 2 * blk;
                bytes += 3.0 * t.nbytes;
            }
            ops[j] = (msa_write_op_t){.kind = MSA_OP_PUT,
                                      .put = {.id = (uint64_t)id, .tokens = (uint32_t)tk,
                                              .n_layers = LAYERS, .layers = &lk[j * LAYERS]}};
        }
        msa_write_req_t req = {.collection = "bench", .n_ops = (size_t)n, .ops = ops};
        msa_write_result_t res;
        double t0 = now_s();
        if (msa_srv_write(e, &req, &res, &st)) {
            fprintf(stderr, "write: %s\n", st.msg);
            return 1;
        }
        t_ingest += now_s() - t0;
        free(res.versions);
    }
    double ingest_mbps = bytes / 1e6 / t_ingest;
    printf("ingest: %ld docs, %.0f MB of tensors in %.2f s = %.0f MB/s durable "
           "(%d docs per request; disk floor %.0f MB/s)\n",
           ndocs, bytes / 1e6, t_ingest, ingest_mbps, DOCS_PER_REQ, disk);

    /* ---- route ---- */
    float *q = malloc((size_t)LAYERS * T * HQ * D * sizeof *q);
    for (size_t i = 0; i < (size_t)LAYERS * T * HQ * D; i++) q[i] = frand();
    msa_layer_query_t lq[LAYERS];
    for (int l = 0; l < LAYERS; l++) {
        lq[l] = (msa_layer_query_t){.layer = s.layers[l]};
        lq[l].routing_q = (msa_tensor_t){.dtype = MSA_DT_F32, .ndim = 3, .shape = {T, HQ, D},
                                         .data = q + (size_t)l * T * HQ * D,
                                         .nbytes = (size_t)T * HQ * D * 4};
    }
    msa_route_req_t rr = {.c = {.collection = "bench"}, .n_layers = LAYERS, .layers = lq,
                          .top_k = TOP_K};
    double *ms = malloc(reps * sizeof *ms);
    for (int r = -1; r < reps; r++) {
        msa_route_result_t *res;
        double t0 = now_s();
        if (msa_srv_route(e, &rr, &res, &st)) {
            fprintf(stderr, "route: %s\n", st.msg);
            return 1;
        }
        if (r >= 0) ms[r] = (now_s() - t0) * 1e3;
        msa_srv_route_result_free(res);
    }
    qsort(ms, reps, sizeof *ms, cmp_double);
    double rows = (double)info.chunks;
    msa_coll_info_t ci;
    msa_srv_describe_collection(e, "bench", &ci, &st);
    rows = (double)ci.chunks;
    double key_bytes = rows * LAYERS * H * D * 2;
    double macs = rows * LAYERS * (double)T * H * D;
    double floor_bw = key_bytes / (bw * 1e9) * 1e3, floor_fma = macs / (peak * 1e9) * 1e3;
    double floor_ms = floor_bw > floor_fma ? floor_bw : floor_fma;
    printf("route: T=%d, %d layers, %.0f rows/layer: median %.2f ms (p10 %.2f, p90 %.2f); "
           "floor %.2f ms (bandwidth %.2f ms for %.0f MB, compute %.2f ms for %.1f GMAC) = %.2fx floor\n",
           T, LAYERS, rows, ms[reps / 2], ms[reps / 10], ms[reps * 9 / 10], floor_ms, floor_bw,
           key_bytes / 1e6, floor_fma, macs / 1e9, ms[reps / 2] / floor_ms);
    printf("bench: {\"tokens\": %ld, \"docs\": %ld, \"ingest_mb_s\": %.1f, \"disk_mb_s\": %.1f, "
           "\"route_ms_median\": %.3f, \"route_floor_ms\": %.3f, \"floor_bw_ms\": %.3f, "
           "\"floor_compute_ms\": %.3f, \"mem_gb_s\": %.2f, \"fma_gmac_s\": %.1f, \"isa\": \"%s\"}\n",
           tokens, ndocs, ingest_mbps, disk, ms[reps / 2], floor_ms, floor_bw, floor_fma, bw, peak,
           msa_idx_isa_name(msa_idx_isa_detect()));

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
            msa_get_req_t gr = {.collection = "bench", .n_ids = (size_t)ndocs, .ids = ids,
                                .with_tensors = true, .n_layers = 1, .layers = &layer};
            msa_get_result_t *g;
            if (msa_srv_get(e, &gr, &g, &st)) {
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
            msa_srv_get_result_free(g);
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
    msa_srv_close(e);
    free(pool);
    free(lk);
    free(q);
    free(ms);
    if (dir == tmp) {
        char cmd[200];
        snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
        if (system(cmd)) fprintf(stderr, "cleanup failed\n");
    }
    return 0;
}
