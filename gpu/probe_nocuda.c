/* probe_nocuda.c — the device probe for builds without nvcc (or sanitizer
 * builds, where the CUDA runtime is left out): there is never a GPU. */
#include "gpu.h"

#include <stdio.h>

#ifndef MSA_HAVE_CUDA
int msa_gpu_device_count(char *why, size_t len)
{
    if (why && len) snprintf(why, len, "built without CUDA");
    return 0;
}
#else
/* With CUDA, probe.cu provides the function; keep this unit non-empty. */
typedef int msa__gpu_probe_nocuda_unused;
#endif
