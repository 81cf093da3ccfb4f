// attend.cu — the attend op of the CUDA device: attention of query tokens over
// memory K/V gathered from device blocks (SEMANTICS "Attention"),
// flash-decoding style; contract in dev.h and dev_cuda_impl.h (msa__cuda_attend).
//
// Shape of the work. For query token t and query head j (kv head h = j / G),
// over the R rows of all blocks:
//     logit[r] = scale * dot(q[t, j], K[r, h])
//     lse[t, j] = log(sum_r exp(logit[r])),  out[t, j] = sum_r exp(logit[r] - lse) V[r, h]
//
// Kernel 1 (split): grid (query-vector tiles, H, S). A thread block (CTA)
// takes up to 8 query vectors (t, g) of one kv head h — one warp each — and
// one of S equal ranges of the R rows (a "split"). It walks its rows in tiles
// of 32: the CTA converts the tile's K and V (F32/F16/BF16) to float32 in
// shared memory, so the 8 warps share each load; then each warp scores the
// tile (lane r computes logit of row r), and updates its online softmax in
// float32: running max m, running sum l, accumulator acc[D] (lane owns
// d = lane + 32 i). With S = 1 it finishes in place (out = acc / l, lse =
// m + log l); otherwise it writes the partial (m, l, acc) to `work`.
//
// Kernel 2 (merge, only when S > 1): one warp per (t, j) combines the S
// partials with log-sum-exp: M = max m_s, L = sum l_s e^(m_s - M),
// out = sum acc_s e^(m_s - M) / L, lse = M + log L.
//
// Splitting the rows is what fills the GPU when there are few query vectors
// (decode: T = 1) or many rows; S is picked so that the grid has about 8 CTAs
// per multiprocessor, capped by MAX_SPLITS and by the work space given.
//
// Every CTA sums the blocks' nrows itself (R is not known on the host: the
// block array lives on the device) and then walks the block list to its range,
// so the documents' K/V need not be contiguous; blocks of 0 rows (even with
// NULL pointers) are skipped. With R = 0 (or no blocks) lse = -inf, out = 0.
//
// Precision: float32 throughout, expf/logf (not the fast intrinsics); the max
// is subtracted before every exp, so large logits never overflow.
//
// Not done (yet): tensor cores (wgmma/mma) for Q K^T and P V, vector loads
// and asynchronous copies of the tiles. At T*Hq = 2048 query vectors over
// 100K rows the CUDA-core dot products dominate the time.
#include "dev_cuda_impl.h"

#include "msa_log.h"

#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

namespace
{

constexpr uint32_t kRowsPerTile = 32;                        // one row per lane when scoring
constexpr uint32_t kMaxWarps = 8;                            // query vectors per CTA
constexpr uint32_t kAccPerLane = MSA_CUDA_ATTEND_MAX_D / 32; // acc[] registers per lane
constexpr uint32_t kMaxSplits = 128;
constexpr uint32_t kCtasPerSm = 8; // grid size target of the split kernel
constexpr unsigned kFullMask = 0xffffffffu;

static_assert(MSA_CUDA_ATTEND_MAX_D % 32 == 0, "lanes own d = lane + 32 i");

// Dynamic shared memory of the split kernel at its largest shape (D = MAX_D,
// kMaxWarps warps): K tile [32][D|1], V tile [32][D], queries [warps][D].
constexpr size_t kMaxSplitSmem =
    ((size_t)kRowsPerTile * (MSA_CUDA_ATTEND_MAX_D | 1) +
     (size_t)kRowsPerTile * MSA_CUDA_ATTEND_MAX_D + (size_t)kMaxWarps * MSA_CUDA_ATTEND_MAX_D) *
    sizeof(float);
static_assert(kMaxSplitSmem <= 227 * 1024, "fits Hopper's opt-in shared memory per block");

struct AttendParams {
    const float *q;                   // device [T][Hq][D]
    const msa_dev_kv_block_t *blocks; // device [n_blocks]
    uint32_t n_blocks;
    uint32_t T, Hq, H, D, G;
    uint32_t kpitch; // floats per K row in shared memory (odd: no bank conflicts)
    float scale;
    uint32_t splits;        // S >= 1
    float *out, *lse;       // final results (S = 1 writes them directly)
    float *part_acc;        // S > 1: [S][T*Hq][D] unnormalised accumulators
    float *part_m, *part_l; // S > 1: [S][T*Hq] running max and sum
};

// Element i of a K/V buffer of dtype DT, as float32 (exact for all three).
template <int DT> __device__ __forceinline__ float load_f32(const void *p, size_t i);

template <> __device__ __forceinline__ float load_f32<MSA_DT_F32>(const void *p, size_t i)
{
    return static_cast<const float *>(p)[i];
}

template <> __device__ __forceinline__ float load_f32<MSA_DT_F16>(const void *p, size_t i)
{
    return __half2float(static_cast<const __half *>(p)[i]);
}

template <> __device__ __forceinline__ float load_f32<MSA_DT_BF16>(const void *p, size_t i)
{
    // bfloat16 is the high half of a float32.
    return __uint_as_float(static_cast<uint32_t>(static_cast<const uint16_t *>(p)[i]) << 16);
}

__device__ __forceinline__ float warp_max(float x)
{
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x)
{
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
    return x;
}

__device__ __forceinline__ unsigned long long min_u64(unsigned long long a, unsigned long long b)
{
    return a < b ? a : b;
}

__device__ __forceinline__ unsigned long long max_u64(unsigned long long a, unsigned long long b)
{
    return a > b ? a : b;
}

// ---- kernel 1: one split of the rows for up to kMaxWarps query vectors ------------

template <int DT> __global__ void attend_split_kernel(AttendParams p)
{
    // Shared memory: K tile [32][kpitch], V tile [32][D], queries [warps][D].
    extern __shared__ float smem[];
    __shared__ unsigned long long total_rows;
    const uint32_t nwarps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t D = p.D, h = blockIdx.y, s = blockIdx.z;
    float *k_s = smem;
    float *v_s = k_s + kRowsPerTile * p.kpitch;
    float *q_s = v_s + kRowsPerTile * D;

    // This warp's query vector: index i over the T*G vectors of kv head h,
    // t = i / G, query head j = h*G + i % G. Warps past the end (last tile)
    // still help load and keep the barriers uniform, but write nothing.
    const uint32_t nvec = p.T * p.G;
    const uint32_t vi = blockIdx.x * nwarps + warp;
    const bool active = vi < nvec;
    const uint32_t t = active ? vi / p.G : 0, j = active ? h * p.G + vi % p.G : 0;
    const size_t o = (size_t)t * p.Hq + j; // index into lse, and out / D
    for (uint32_t d = lane; d < D; d += 32) q_s[warp * D + d] = active ? p.q[o * D + d] : 0.0f;

    // R = total rows over all blocks, then this CTA's range [r0, r1).
    if (threadIdx.x == 0) total_rows = 0;
    __syncthreads();
    unsigned long long mine = 0;
    for (uint32_t b = threadIdx.x; b < p.n_blocks; b += blockDim.x) mine += p.blocks[b].nrows;
    if (mine) atomicAdd(&total_rows, mine);
    __syncthreads(); // also publishes q_s
    const unsigned long long R = total_rows;
    const unsigned long long chunk = (R + p.splits - 1) / p.splits;
    const unsigned long long r0 = min_u64(R, (unsigned long long)s * chunk);
    const unsigned long long r1 = min_u64(R, r0 + chunk);

    float m = -INFINITY, l = 0.0f, acc[kAccPerLane];
#pragma unroll
    for (uint32_t i = 0; i < kAccPerLane; i++) acc[i] = 0.0f;

    const size_t row_stride = (size_t)p.H * D; // elements from one row to the next
    const float *qv = q_s + warp * D;
    unsigned long long base = 0; // global index of block b's first row
    // All loop bounds below are the same for every thread of the CTA, so the
    // barriers inside are reached by all of them.
    for (uint32_t b = 0; b < p.n_blocks && base < r1; b++) {
        const msa_dev_kv_block_t blk = p.blocks[b];
        const unsigned long long lo = max_u64(r0, base), hi = min_u64(r1, base + blk.nrows);
        for (unsigned long long row = lo; row < hi; row += kRowsPerTile) {
            const uint32_t nr = (uint32_t)min_u64(kRowsPerTile, hi - row);
            const size_t first = (size_t)(row - base); // row within the block

            // Tile load, coalesced along d: K[first + r][h][d] and V likewise.
            for (uint32_t e = threadIdx.x; e < nr * D; e += blockDim.x) {
                const uint32_t r = e / D, d = e - r * D;
                const size_t src = (first + r) * row_stride + (size_t)h * D + d;
                k_s[r * p.kpitch + d] = load_f32<DT>(blk.k, src);
                v_s[r * D + d] = load_f32<DT>(blk.v, src);
            }
            __syncthreads();

            // Logit of row `lane` (the odd K pitch puts the 32 lanes' rows in
            // 32 different banks; q is a broadcast read).
            float logit = -INFINITY;
            if (lane < nr) {
                const float *kr = k_s + lane * p.kpitch;
                float dot = 0.0f;
                for (uint32_t d = 0; d < D; d++) dot = fmaf(qv[d], kr[d], dot);
                logit = p.scale * dot;
            }
            // Online softmax: rescale what we have to the new max, then add
            // this tile. m_new is the same on every lane (warp reduction).
            const float m_new = fmaxf(m, warp_max(logit));
            if (m_new != -INFINITY) {
                const float corr = expf(m - m_new); // 0 on the first tile (m = -inf)
                const float pr = lane < nr ? expf(logit - m_new) : 0.0f;
                l = l * corr + warp_sum(pr);
#pragma unroll
                for (uint32_t i = 0; i < kAccPerLane; i++) acc[i] *= corr;
                for (uint32_t r = 0; r < nr; r++) {
                    const float w = __shfl_sync(kFullMask, pr, r);
                    const float *vr = v_s + r * D;
#pragma unroll
                    for (uint32_t i = 0; i < kAccPerLane; i++) {
                        const uint32_t d = lane + 32 * i;
                        if (d < D) acc[i] = fmaf(w, vr[d], acc[i]);
                    }
                }
                m = m_new;
            }
            __syncthreads(); // the tile is overwritten next
        }
        base += blk.nrows;
    }

    if (!active) return;
    if (p.splits == 1) {
        // l >= 1 once any row was seen (the max row adds e^0); none: R = 0.
        const bool any = l > 0.0f;
        const float inv = any ? 1.0f / l : 0.0f;
#pragma unroll
        for (uint32_t i = 0; i < kAccPerLane; i++) {
            const uint32_t d = lane + 32 * i;
            if (d < D) p.out[o * D + d] = any ? acc[i] * inv : 0.0f;
        }
        if (lane == 0) p.lse[o] = any ? m + logf(l) : -INFINITY;
    } else {
        const size_t ps = (size_t)s * p.T * p.Hq + o; // partial index [s][o]
#pragma unroll
        for (uint32_t i = 0; i < kAccPerLane; i++) {
            const uint32_t d = lane + 32 * i;
            if (d < D) p.part_acc[ps * D + d] = acc[i];
        }
        if (lane == 0) {
            p.part_m[ps] = m; // -inf and l = 0 for an empty split
            p.part_l[ps] = l;
        }
    }
}

// ---- kernel 2: log-sum-exp merge of the S partials, one warp per (t, j) ----------

__global__ void attend_merge_kernel(AttendParams p)
{
    const size_t TH = (size_t)p.T * p.Hq;
    const size_t o = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const uint32_t lane = threadIdx.x % 32, D = p.D, S = p.splits;
    if (o >= TH) return;

    float M = -INFINITY;
    for (uint32_t s = 0; s < S; s++) M = fmaxf(M, p.part_m[s * TH + o]);
    if (M == -INFINITY) {
        // No split saw a row: R = 0.
        for (uint32_t d = lane; d < D; d += 32) p.out[o * D + d] = 0.0f;
        if (lane == 0) p.lse[o] = -INFINITY;
        return;
    }
    float L = 0.0f;
    for (uint32_t s = 0; s < S; s++) {
        const float ms = p.part_m[s * TH + o];
        if (ms != -INFINITY) L += p.part_l[s * TH + o] * expf(ms - M);
    }
    if (!(L > 0.0f)) {
        // A NaN (or +inf logits) poisoned the sums: as the CPU reference and
        // the one-split path (any = l > 0) do, report no rows rather than NaN.
        for (uint32_t d = lane; d < D; d += 32) p.out[o * D + d] = 0.0f;
        if (lane == 0) p.lse[o] = -INFINITY;
        return;
    }
    const float inv = 1.0f / L; // L >= 1: the split holding M contributes l_s >= 1
    for (uint32_t d = lane; d < D; d += 32) {
        float x = 0.0f;
        for (uint32_t s = 0; s < S; s++) {
            const float ms = p.part_m[s * TH + o];
            if (ms != -INFINITY) x += p.part_acc[(s * TH + o) * D + d] * expf(ms - M);
        }
        p.out[o * D + d] = x * inv;
    }
    if (lane == 0) p.lse[o] = M + logf(L);
}

// Bytes of work for one split: acc [T*Hq][D], m and l [T*Hq].
size_t work_per_split(uint32_t T, uint32_t Hq, uint32_t D)
{
    return (size_t)T * Hq * ((size_t)D + 2) * sizeof(float);
}

} // namespace

int msa__cuda_attend(struct msa_dev_lane *l, const msa_dev_attend_args_t *a)
{
    // ---- validate (a bad request is an error, never a crash) ----
    if (a->H == 0 || a->Hq % a->H != 0 || a->D == 0 || a->D > MSA_CUDA_ATTEND_MAX_D ||
        a->H > 65535) {
        msa_log(MSA_LOG_ERROR, "cuda attend: unsupported shape Hq=%u H=%u D=%u (D <= %d)", a->Hq,
                a->H, a->D, MSA_CUDA_ATTEND_MAX_D);
        return MSA_EINVAL;
    }
    if (a->T == 0 || a->Hq == 0) return MSA_OK;
    if ((uint64_t)a->T * a->Hq > UINT32_MAX) {
        msa_log(MSA_LOG_ERROR, "cuda attend: T*Hq = %llu too large",
                (unsigned long long)a->T * a->Hq);
        return MSA_EINVAL;
    }
    if (!a->q || !a->out || !a->lse || (a->n_blocks && !a->blocks)) {
        msa_log(MSA_LOG_ERROR, "cuda attend: NULL q/out/lse/blocks");
        return MSA_EINVAL;
    }
    void (*split_kernel)(AttendParams);
    switch (a->kv_dtype) {
    case MSA_DT_F32:
        split_kernel = attend_split_kernel<MSA_DT_F32>;
        break;
    case MSA_DT_F16:
        split_kernel = attend_split_kernel<MSA_DT_F16>;
        break;
    case MSA_DT_BF16:
        split_kernel = attend_split_kernel<MSA_DT_BF16>;
        break;
    default:
        msa_log(MSA_LOG_ERROR, "cuda attend: unsupported kv dtype %d", (int)a->kv_dtype);
        return MSA_EINVAL;
    }

    // ---- launch geometry ----
    const uint32_t G = a->Hq / a->H, nvec = a->T * G, TH = a->T * a->Hq;
    const uint32_t nwarps = nvec < kMaxWarps ? nvec : kMaxWarps;
    const uint32_t tiles = (nvec + nwarps - 1) / nwarps;
    const uint32_t kpitch = a->D | 1u; // odd and >= D
    const size_t smem =
        ((size_t)kRowsPerTile * kpitch + (size_t)kRowsPerTile * a->D + (size_t)nwarps * a->D) *
        sizeof(float);

    // Splits: enough CTAs for about kCtasPerSm per multiprocessor.
    const int sms = l->dv->prop.multiProcessorCount;
    const uint64_t ctas_per_split = (uint64_t)tiles * a->H;
    const uint64_t want = ((uint64_t)sms * kCtasPerSm + ctas_per_split - 1) / ctas_per_split;
    uint32_t splits = (uint32_t)(want < 1 ? 1 : want > kMaxSplits ? kMaxSplits : want);
    if (splits > 1) {
        // Fewer splits when the work space cannot hold their partials.
        const bool aligned = ((uintptr_t)a->work % sizeof(float)) == 0;
        const size_t fit =
            a->work && aligned ? a->work_bytes / work_per_split(a->T, a->Hq, a->D) : 0;
        if (splits > fit) splits = (uint32_t)fit;
        if (splits < 2) splits = 1;
    }

    AttendParams p;
    p.q = a->q;
    p.blocks = a->blocks;
    p.n_blocks = a->n_blocks;
    p.T = a->T;
    p.Hq = a->Hq;
    p.H = a->H;
    p.D = a->D;
    p.G = G;
    p.kpitch = kpitch;
    p.scale = a->scale;
    p.splits = splits;
    p.out = a->out;
    p.lse = a->lse;
    p.part_acc = p.part_m = p.part_l = nullptr;
    if (splits > 1) {
        float *w = static_cast<float *>(a->work);
        p.part_acc = w;
        p.part_m = w + (size_t)splits * TH * a->D;
        p.part_l = p.part_m + (size_t)splits * TH;
    }

    // ---- launch ----
    // Above 48 KiB (D > ~150) a block needs the dynamic shared memory limit
    // raised. The limit is per kernel (and device), shared by every thread:
    // setting it to this call's smem would let a concurrent call with a
    // smaller D lower it between our set and our launch (which then fails),
    // so it is always set to the largest size any shape needs (capped by the
    // device, which keeps it one value per device).
    if (smem > 48 * 1024) {
        const int optin = (int)l->dv->prop.sharedMemPerBlockOptin;
        const int lim = (int)kMaxSplitSmem < optin ? (int)kMaxSplitSmem : optin;
        MSA_CK(cudaFuncSetAttribute((const void *)split_kernel,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, lim));
    }
    split_kernel<<<dim3(tiles, a->H, splits), nwarps * 32, smem, l->stream>>>(p);
    MSA_CK_LAUNCH(l, "attend_split_kernel");
    if (splits > 1) {
        const uint32_t per_block = 8; // warps (outputs) per merge block
        const uint32_t merge_blocks = (TH + per_block - 1) / per_block;
        attend_merge_kernel<<<merge_blocks, per_block * 32, 0, l->stream>>>(p);
        MSA_CK_LAUNCH(l, "attend_merge_kernel");
    }
    return MSA_OK;
}
