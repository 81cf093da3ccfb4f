// dev_cuda_peer.cu — moving device memory between two GPUs for the device
// layer: over the daemon's NCCL communicator when there is one (gpu/nccl_comm.h),
// else with cudaMemcpyPeerAsync (which also works without peer access, through
// the host).
#include "dev_cuda_impl.h"
#include "nccl_comm.h"

extern "C" int msa__cuda_peer_copy(msa_dev_lane_t *dst_lane, void *dst, msa_dev_lane_t *src_lane,
                                   const void *src, size_t n, void *link)
{
    struct msa_dev_lane *dl = dst_lane, *sl = src_lane;
    int dd = dl->dv->ordinal, sd = sl->dv->ordinal;
    if (dd == sd) return MSA_EINVAL;
    if (link)
        return msa_gpu_nccl_move((msa_gpu_nccl_t *)link, sd, src, (void *)sl->stream, dd, dst,
                                 (void *)dl->stream, n);
    MSA_CK(cudaSetDevice(dd));
    MSA_CK(cudaMemcpyPeerAsync(dst, dd, src, sd, n, dl->stream));
    return MSA_OK;
}
