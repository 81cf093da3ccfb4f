/* gpu.h — the CUDA side of msad. Today: the device probe the engine uses to
 * pick a backend (auto -> CUDA only when a usable GPU answers). The CUDA
 * routing backend itself (HBM-resident keys, kernels, cache, NCCL) is the
 * subject of its own issue and not built yet; see README's status table.
 * Thread-safe; no state.
 */
#ifndef MSA_GPU_H
#define MSA_GPU_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Number of usable CUDA devices; 0 when the build has no CUDA, the driver is
 * missing, or cudaGetDeviceCount fails. why (len bytes) receives the reason
 * when 0 is returned (may be NULL). Never aborts. */
int msa_gpu_device_count(char *why, size_t len);

#ifdef __cplusplus
}
#endif
#endif
