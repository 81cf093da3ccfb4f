/* nccl_comm.c — NCCL through dlopen: see nccl_comm.h. The header of the CUDA Toolkit
 * gives the types; the functions come from libnccl.so.2 at run time. */
#ifdef MSA_HAVE_CUDA
#include "nccl_comm.h"

#include "cuda_status.h"
#include "msa_err.h"
#include "msa_log.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct nccl_fns {
    ncclResult_t (*comm_init_all)(ncclComm_t *, int, const int *);
    ncclResult_t (*comm_destroy)(ncclComm_t);
    ncclResult_t (*group_start)(void);
    ncclResult_t (*group_end)(void);
    ncclResult_t (*send)(const void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
    ncclResult_t (*recv)(void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
    ncclResult_t (*all_reduce)(const void *, void *, size_t, ncclDataType_t, ncclRedOp_t,
                               ncclComm_t, cudaStream_t);
    const char *(*error_string)(ncclResult_t);
    ncclResult_t (*get_version)(int *);
} nccl_fns_t;

struct msa_gpu_nccl {
    void *lib;
    nccl_fns_t f;
    int ndev;
    ncclComm_t *comm; /* [ndev]: rank d drives device d */
    char version[32];
};

#define SYM(field, name)                                        \
    do {                                                        \
        *(void **)(&n->f.field) = dlsym(n->lib, name);          \
        if (!n->f.field) {                                      \
            snprintf(why, len, "libnccl.so.2 has no %s", name); \
            goto fail;                                          \
        }                                                       \
    } while (0)

/* Every rank adds its own rank + 1: the sum proves the clique moves data. */
static int self_check(msa_gpu_nccl_t *n, char *why, size_t len)
{
    int rc = MSA_OK;
    float **buf = calloc((size_t)n->ndev, sizeof *buf);
    cudaStream_t *st = calloc((size_t)n->ndev, sizeof *st);
    if (!buf || !st) {
        free(buf);
        free(st);
        return MSA_ENOMEM;
    }
    for (int d = 0; d < n->ndev && rc == MSA_OK; d++) {
        float v = (float)(d + 1);
        if (cudaSetDevice(d) != cudaSuccess || cudaStreamCreate(&st[d]) != cudaSuccess ||
            cudaMalloc((void **)&buf[d], sizeof(float)) != cudaSuccess ||
            cudaMemcpy(buf[d], &v, sizeof v, cudaMemcpyHostToDevice) != cudaSuccess)
            rc = MSA_EUNAVAIL;
    }
    if (rc == MSA_OK) {
        ncclResult_t r = n->f.group_start();
        for (int d = 0; d < n->ndev && r == ncclSuccess; d++)
            r = n->f.all_reduce(buf[d], buf[d], 1, ncclFloat32, ncclSum, n->comm[d], st[d]);
        ncclResult_t r2 = n->f.group_end();
        if (r != ncclSuccess || r2 != ncclSuccess) {
            snprintf(why, len, "NCCL all-reduce: %s", n->f.error_string(r != ncclSuccess ? r : r2));
            rc = MSA_EUNAVAIL;
        }
    }
    float want = (float)n->ndev * (float)(n->ndev + 1) / 2.0f;
    for (int d = 0; d < n->ndev && rc == MSA_OK; d++) {
        float got = 0;
        cudaSetDevice(d);
        if (cudaStreamSynchronize(st[d]) != cudaSuccess ||
            cudaMemcpy(&got, buf[d], sizeof got, cudaMemcpyDeviceToHost) != cudaSuccess ||
            got != want) {
            snprintf(why, len, "NCCL self-check: rank %d holds %g, want %g", d, got, want);
            rc = MSA_EUNAVAIL;
        }
    }
    for (int d = 0; d < n->ndev; d++) {
        cudaSetDevice(d);
        if (buf[d]) cudaFree(buf[d]);
        if (st[d]) cudaStreamDestroy(st[d]);
    }
    cudaGetLastError();
    free(buf);
    free(st);
    return rc;
}

/* NCCL's result names: the translation must not need the dlopen'd library. */
static const char *nccl_name(ncclResult_t e)
{
    switch (e) {
    case ncclSuccess:
        return "ncclSuccess";
    case ncclUnhandledCudaError:
        return "ncclUnhandledCudaError";
    case ncclSystemError:
        return "ncclSystemError";
    case ncclInternalError:
        return "ncclInternalError";
    case ncclInvalidArgument:
        return "ncclInvalidArgument";
    case ncclInvalidUsage:
        return "ncclInvalidUsage";
    case ncclRemoteError:
        return "ncclRemoteError";
    case ncclInProgress:
        return "ncclInProgress";
    default:
        return "unknown NCCL result";
    }
}

int msa__cuda_status_nccl(ncclResult_t e, const char *stmt, const char *func, int line)
{
    if (e == ncclSuccess) return MSA_OK;
    msa_log(MSA_LOG_ERROR, "nccl: %s failed in %s (line %d): %s (%d)", stmt, func, line,
            nccl_name(e), (int)e);
    return MSA_EINTERNAL;
}

int msa_gpu_nccl_open(int ndev, msa_gpu_nccl_t **out, char *why, size_t len)
{
    *out = NULL;
    if (ndev < 2) {
        snprintf(why, len, "NCCL needs two or more GPUs (%d)", ndev);
        return MSA_EUNAVAIL;
    }
    msa_gpu_nccl_t *n = calloc(1, sizeof *n);
    if (!n) return MSA_ENOMEM;
    n->ndev = ndev;
    n->lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (!n->lib) {
        snprintf(why, len, "cannot load libnccl.so.2: %s", dlerror());
        goto fail;
    }
    SYM(comm_init_all, "ncclCommInitAll");
    SYM(comm_destroy, "ncclCommDestroy");
    SYM(group_start, "ncclGroupStart");
    SYM(group_end, "ncclGroupEnd");
    SYM(send, "ncclSend");
    SYM(recv, "ncclRecv");
    SYM(all_reduce, "ncclAllReduce");
    SYM(error_string, "ncclGetErrorString");
    SYM(get_version, "ncclGetVersion");
    int v = 0;
    n->f.get_version(&v);
    snprintf(n->version, sizeof n->version, "%d.%d.%d", v / 10000, v / 100 % 100, v % 100);
    n->comm = calloc((size_t)ndev, sizeof *n->comm);
    int *devs = malloc((size_t)ndev * sizeof *devs);
    if (!n->comm || !devs) {
        free(devs);
        snprintf(why, len, "out of memory");
        goto fail;
    }
    for (int d = 0; d < ndev; d++) devs[d] = d;
    ncclResult_t r = n->f.comm_init_all(n->comm, ndev, devs);
    free(devs);
    if (r != ncclSuccess) {
        snprintf(why, len, "ncclCommInitAll over %d GPUs: %s", ndev, n->f.error_string(r));
        free(n->comm);
        n->comm = NULL;
        goto fail;
    }
    if (self_check(n, why, len) != MSA_OK) goto fail;
    msa_log(MSA_LOG_INFO, "gpu: NCCL %s communicator over %d GPUs (self-check passed)", n->version,
            ndev);
    *out = n;
    return MSA_OK;
fail:
    msa_gpu_nccl_close(n);
    return MSA_EUNAVAIL;
}

void msa_gpu_nccl_close(msa_gpu_nccl_t *n)
{
    if (!n) return;
    if (n->comm)
        for (int d = 0; d < n->ndev; d++)
            if (n->comm[d]) n->f.comm_destroy(n->comm[d]);
    free(n->comm);
    if (n->lib) dlclose(n->lib);
    free(n);
}

int msa_gpu_nccl_move(msa_gpu_nccl_t *n, int src_dev, const void *src, void *src_stream,
                      int dst_dev, void *dst, void *dst_stream, size_t bytes)
{
    if (src_dev == dst_dev || src_dev < 0 || dst_dev < 0 || src_dev >= n->ndev ||
        dst_dev >= n->ndev)
        return MSA_EINVAL;
    cudaStream_t ss = (cudaStream_t)src_stream, ds = (cudaStream_t)dst_stream;
    int rc = MSA_CK_RC(n->f.group_start());
    if (rc == MSA_OK)
        rc = MSA_CK_RC(n->f.send(src, bytes, ncclInt8, dst_dev, n->comm[src_dev], ss));
    if (rc == MSA_OK)
        rc = MSA_CK_RC(n->f.recv(dst, bytes, ncclInt8, src_dev, n->comm[dst_dev], ds));
    int end = MSA_CK_RC(n->f.group_end()); /* closes the group whatever happened in it */
    return rc != MSA_OK ? rc : end;
}

const char *msa_gpu_nccl_version(const msa_gpu_nccl_t *n)
{
    return n->version;
}
#else
/* Built without CUDA: nothing (the CUDA backend needs a CUDA build). */
typedef int msa_gpu_nccl_unused_t;
#endif
