/* cuda_status.h — the one translation of CUDA runtime, cuBLAS and NCCL
 * statuses into msad's error codes, and the macros every CUDA call site uses
 * (the boundary where foreign codes become MSA_E*: STYLE "One error enum").
 *
 *   rc = MSA_CK_RC(stmt);   the code of stmt (a CUDA, cuBLAS or NCCL call),
 *                           for code with something to undo;
 *   MSA_CK(stmt);           returns that code from the enclosing function on
 *                           failure, for code with nothing to undo.
 *
 * A failure is logged once at error level with the statement, the function
 * and the line, and comes back as MSA_ENOMEM (an allocation failure) or
 * MSA_EINTERNAL; success is MSA_OK. The status type picks the translation:
 * C++ overloads in CUDA files, _Generic in C files (nccl_comm.c).
 *
 * Included by the CUDA build only (dev_cuda_impl.h, nccl_comm.c).
 */
#ifndef MSA_GPU_CUDA_STATUS_H
#define MSA_GPU_CUDA_STATUS_H

#include "msa_err.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

/* The toolkit's header declares some functions without (void). */
#ifndef __cplusplus
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstrict-prototypes"
#endif
#include <nccl.h>
#ifndef __cplusplus
#pragma GCC diagnostic pop
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* dev_cuda.cu */
int msa__cuda_status_rt(cudaError_t e, const char *stmt, const char *func, int line);
int msa__cuda_status_blas(cublasStatus_t e, const char *stmt, const char *func, int line);
/* nccl_comm.c (NCCL errors are all MSA_EINTERNAL) */
int msa__cuda_status_nccl(ncclResult_t e, const char *stmt, const char *func, int line);

#ifdef __cplusplus
}

static inline int msa__cuda_status(cudaError_t e, const char *stmt, const char *func, int line)
{
    return msa__cuda_status_rt(e, stmt, func, line);
}
static inline int msa__cuda_status(cublasStatus_t e, const char *stmt, const char *func, int line)
{
    return msa__cuda_status_blas(e, stmt, func, line);
}
static inline int msa__cuda_status(ncclResult_t e, const char *stmt, const char *func, int line)
{
    return msa__cuda_status_nccl(e, stmt, func, line);
}
#define MSA_CK_RC(stmt) msa__cuda_status((stmt), #stmt, __func__, __LINE__)
#else
#define MSA_CK_RC(stmt)                            \
    _Generic((stmt), cudaError_t                   \
             : msa__cuda_status_rt, cublasStatus_t \
             : msa__cuda_status_blas, ncclResult_t \
             : msa__cuda_status_nccl)((stmt), #stmt, __func__, __LINE__)
#endif

#define MSA_CK(stmt)                         \
    do {                                     \
        int ck_rc_ = MSA_CK_RC(stmt);        \
        if (ck_rc_ != MSA_OK) return ck_rc_; \
    } while (0)

#endif
