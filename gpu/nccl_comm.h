/* nccl_comm.h — the daemon's one NCCL communicator over its local GPUs, used
 * to move K/V blocks between GPUs (a block cached on GPU d travels to the GPU
 * that attends). NCCL is loaded with dlopen when msad finds two or more GPUs,
 * so a one-GPU or GPU-less machine never needs libnccl; without it (or when
 * its start-up self-check fails) block moves fall back to cudaMemcpyPeer.
 * Compiled with the CUDA backend only. Thread-safe after msa_gpu_nccl_open.
 */
#ifndef MSA_GPU_NCCL_COMM_H
#define MSA_GPU_NCCL_COMM_H

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct msa_gpu_nccl msa_gpu_nccl_t;

/* One communicator clique over CUDA devices 0..ndev-1 (ndev >= 2) plus an
 * all-reduce self-check. MSA_EUNAVAIL (why says it: library missing, init or
 * self-check failed) leaves *out NULL. */
int msa_gpu_nccl_open(int ndev, msa_gpu_nccl_t **out, char *why, size_t len);
void msa_gpu_nccl_close(msa_gpu_nccl_t *n);
/* Queues a move of bytes from src (device src_dev, on src_stream) to dst
 * (device dst_dev, on dst_stream): ncclSend/ncclRecv in one group. The data is
 * at dst once dst_stream reaches this point. MSA_EINTERNAL on an NCCL error. */
int msa_gpu_nccl_move(msa_gpu_nccl_t *n, int src_dev, const void *src, void *src_stream,
                      int dst_dev, void *dst, void *dst_stream, size_t bytes);
const char *msa_gpu_nccl_version(const msa_gpu_nccl_t *n);

#ifdef __cplusplus
}
#endif
#endif
