// probe.cu — counts usable CUDA devices without ever aborting the daemon: on a
// machine without a GPU (or driver) cudaGetDeviceCount fails and we report 0.
#include "gpu.h"

#include <cuda_runtime.h>
#include <stdio.h>

extern "C" int msa_gpu_device_count(char *why, size_t len)
{
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        if (why && len) snprintf(why, len, "cudaGetDeviceCount: %s", cudaGetErrorString(err));
        cudaGetLastError(); /* clear the sticky-free error so later probes start clean */
        return 0;
    }
    if (n == 0 && why && len) snprintf(why, len, "no CUDA device");
    return n;
}
