/* attend_cuda.h — the attention kernels of the CUDA device (SEMANTICS
 * "Attention"; contract in dev.h "attend"): flash-decoding over K/V gathered
 * from device blocks, GQA, fp32 online softmax, out and lse (natural log).
 *
 * Called by dev_cuda.cu with the lane's stream; stateless, so any number of
 * threads may call it on different streams.
 */
#ifndef MSA_GPU_ATTEND_CUDA_H
#define MSA_GPU_ATTEND_CUDA_H

#include "dev.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Largest head dimension the kernels take. */
#define MSA_CUDA_ATTEND_MAX_D 256

/* Queues the attention of a on stream (a cudaStream_t; never stream 0 in
 * msad). All pointers in a, and those inside a->blocks, are device pointers;
 * blocks with nrows = 0 may have NULL k/v. a->work (a->work_bytes bytes,
 * 16-byte aligned; may be NULL) holds the partial results of the row splits:
 * with less of it the rows are split fewer ways (down to one, which needs no
 * work at all), so it only affects speed.
 * Errors (logged, nothing queued): MSA_EINVAL (H = 0, Hq not a multiple of H,
 * D = 0 or D > MSA_CUDA_ATTEND_MAX_D, kv_dtype not F32/F16/BF16, a NULL
 * pointer the shape needs); MSA_ENOMEM / MSA_EINTERNAL when CUDA refuses a
 * launch (the CUDA message is logged with the statement and line). T = 0 or
 * Hq = 0 queues nothing and returns MSA_OK. */
int msa__cuda_attend(void *stream, const msa_dev_attend_args_t *a);

/* Bytes of work that let msa__cuda_attend use `splits` row splits for a
 * query of T tokens, Hq heads, head dim D (for callers sizing scratch). */
size_t msa__cuda_attend_work(uint32_t T, uint32_t Hq, uint32_t D, uint32_t splits);

#ifdef __cplusplus
}
#endif
#endif
