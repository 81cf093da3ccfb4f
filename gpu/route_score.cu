// route_score.cu — the score kernel of dev.h on the GPU: per query i and key
// row r, C[h][c] = scale(r,h) * dot(key[r,h,:], cols_i[h][c][:]) and the plan
// epilogue (LINEAR / MAXVEC / GENERAL) into scores[i*ld + r].
//
// Three paths, all float32 accumulation, chosen per call by msa__cuda_score:
//
//   fused    (nq*ncol <= 16 columns by default) one warp per key row streams the
//            row in chunks of 8 elements (16-byte loads for F16/BF16, 2x16 for
//            F32, 8 for I8), coalesced across the warp, several steps' loads in
//            flight before the first use. The query columns sit in shared
//            memory as exact float32 (two halves per chunk, so a warp's float4
//            reads hit distinct banks). Per lane: partial dots of its chunk
//            against every column; LINEAR/MAXVEC sum scale*partial over all
//            chunks (the head sum is linear), GENERAL first completes each
//            head's dot with shuffles inside the lanes that cover that head and
//            keeps max over heads. A final warp reduce and the plan epilogue.
//            Needs D % 8 == 0 with D/8 dividing 32 or a multiple of 32 (so no
//            lane group straddles heads), and 16-byte aligned keys.
//   generic  any other shape: one warp per row, lanes stride over d with scalar
//            loads, cols read from global memory (cached), the epilogue
//            evaluated straight from the contract. Slow but total.
//   gemm     many columns (nq*ncol >= MSA_GPU_GEMM_MIN_COLS, default 17) when
//            `work` holds at least one tile: cuBLAS over row tiles sized so the
//            C buffer fits `work`, then an epilogue kernel. LINEAR/MAXVEC on
//            F32/F16/BF16 keys need no per-head values, so the GEMM runs flat
//            over K = H*D (one batch, C = [col][row]); GENERAL and I8 (scale per
//            (row, head)) run one batch per head (strided batched, lda = H*D,
//            strideA = D). 16-bit keys meet the query split into hi + lo
//            columns of the same 16-bit type (q ~= hi + lo, ~16 mantissa bits
//            for BF16, ~22 for F16) so the result stays near fp32; F16
//            columns are scaled per (batch, column) by a power of two that puts
//            max|q| just under 2^14 (exact, undone in the epilogue) so no query
//            magnitude overflows the half range. F32 keys: fp32 GEMM with
//            CUBLAS_COMPUTE_32F_PEDANTIC (no TF32). I8 keys: each tile is
//            converted to BF16 in work (exact for -127..127) and the scale is
//            applied per (row, head) in the epilogue.
#include "dev_cuda_impl.h"

#include "msa_log.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

namespace
{

constexpr int kWarps = 8; // warps (rows in flight) per block of the row kernels
constexpr int kThreads = kWarps * 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr uint32_t kMaxFusedCols = 16; // largest NC template of the fused kernel
constexpr size_t kAlign = 256;         // alignment of every carve from work

struct ScoreParams {
    const void *keys;
    const float *scales;
    uint32_t nrows, H, D, W; // W = H * D elements per row
    int dt, plan, qred;
    uint32_t ncol, G, nq; // nq: queries of this launch
    const float *cols;    // [nq][H][ncol][D]
    float *scores;        // scores[i * ld + r]
    size_t ld;
};

/* ==== shared device helpers ================================================== */

// A max that keeps a NaN once it has seen one (as the contract's reference does).
__device__ __forceinline__ float max_nan(float m, float x)
{
    return (x > m || x != x) ? x : m;
}

__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    return v;
}

// The plan epilogue of dev.h, word for word. C(h, c) yields C[h][c] of one
// query, scale included. Called with H = 1 when the head sum is already done.
template <class F>
__device__ float plan_score(int plan, int qred, uint32_t H, uint32_t ncol, uint32_t G, F C)
{
    if (plan == MSA_DEV_PLAN_GENERAL) {
        const uint32_t T = ncol / G;
        float acc = qred == MSA_QUERY_MAX ? -INFINITY : 0.0f;
        for (uint32_t t = 0; t < T; t++) {
            float m = -INFINITY;
            for (uint32_t h = 0; h < H; h++)
                for (uint32_t g = 0; g < G; g++) m = max_nan(m, C(h, t * G + g));
            acc = qred == MSA_QUERY_MAX ? max_nan(acc, m) : acc + m;
        }
        return qred == MSA_QUERY_MAX ? acc : acc / (float)T;
    }
    const uint32_t nc = plan == MSA_DEV_PLAN_LINEAR ? 1 : ncol; // LINEAR: column 0
    float best = -INFINITY;
    for (uint32_t c = 0; c < nc; c++) {
        float s = 0.0f;
        for (uint32_t h = 0; h < H; h++) s += C(h, c);
        best = max_nan(best, s);
    }
    return best;
}

__device__ __forceinline__ float key_at(int dt, const void *keys, size_t i)
{
    switch (dt) {
    case MSA_DT_F32:
        return ((const float *)keys)[i];
    case MSA_DT_F16:
        return __half2float(((const __half *)keys)[i]);
    case MSA_DT_BF16:
        return __bfloat162float(((const __nv_bfloat16 *)keys)[i]);
    default:
        return (float)((const int8_t *)keys)[i];
    }
}

/* ==== generic kernel ========================================================= */

// One warp per row (grid-stride); every C[h][c] is a lane-strided dot reduced
// with shuffles, so all lanes hold it and follow the same epilogue path.
__global__ void __launch_bounds__(kThreads) score_generic_kernel(ScoreParams p)
{
    const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (uint32_t row = blockIdx.x * kWarps + warp; row < p.nrows; row += gridDim.x * kWarps) {
        const size_t rbase = (size_t)row * p.W;
        for (uint32_t i = 0; i < p.nq; i++) {
            const float *qc = p.cols + (size_t)i * p.H * p.ncol * p.D;
            float s = plan_score(p.plan, p.qred, p.H, p.ncol, p.G, [&](uint32_t h, uint32_t c) {
                const float *q = qc + ((size_t)h * p.ncol + c) * p.D;
                float acc = 0.0f;
                for (uint32_t d = lane; d < p.D; d += 32)
                    acc += key_at(p.dt, p.keys, rbase + (size_t)h * p.D + d) * q[d];
                acc = warp_sum(acc);
                return p.dt == MSA_DT_I8 ? acc * p.scales[(size_t)row * p.H + h] : acc;
            });
            if (lane == 0) p.scores[(size_t)i * p.ld + row] = s;
        }
    }
}

/* ==== fused kernel =========================================================== */

// Loads the chunk of 8 elements at element e (a multiple of 8) of the key
// buffer: F32 two 16-byte words (a, b), F16/BF16 one (a), I8 8 bytes (a.x, a.y).
template <int DT>
__device__ __forceinline__ void load_chunk(const void *keys, size_t e, uint4 &a, uint4 &b)
{
    if (DT == MSA_DT_F32) {
        const uint4 *p = reinterpret_cast<const uint4 *>((const float *)keys + e);
        a = __ldg(p);
        b = __ldg(p + 1);
    } else if (DT == MSA_DT_I8) {
        uint2 v = __ldg(reinterpret_cast<const uint2 *>((const int8_t *)keys + e));
        a.x = v.x;
        a.y = v.y;
    } else {
        a = __ldg(reinterpret_cast<const uint4 *>((const uint16_t *)keys + e));
    }
}

__device__ __forceinline__ float2 half2_bits(uint32_t w)
{
    __half2 h;
    memcpy(&h, &w, sizeof w);
    return __half22float2(h);
}

// The chunk as 8 floats (exact conversions).
template <int DT> __device__ __forceinline__ void unpack(const uint4 &a, const uint4 &b, float v[8])
{
    const uint32_t w[4] = {a.x, a.y, a.z, a.w};
    if (DT == MSA_DT_F32) {
        const uint32_t u[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            v[k] = __uint_as_float(w[k]);
            v[4 + k] = __uint_as_float(u[k]);
        }
    } else if (DT == MSA_DT_BF16) {
#pragma unroll
        for (int k = 0; k < 4; k++) {
            v[2 * k] = __uint_as_float(w[k] << 16);
            v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
        }
    } else if (DT == MSA_DT_F16) {
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float2 f = half2_bits(w[k]);
            v[2 * k] = f.x;
            v[2 * k + 1] = f.y;
        }
    } else {
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = (float)(int8_t)(uint8_t)(w[k / 4] >> (8 * (k % 4)));
    }
}

// Steps (32 chunks each) whose loads are issued together: 8-byte I8 loads
// need more of them in flight for the same bytes.
template <int DT> struct Unroll {
    static constexpr int value = DT == MSA_DT_I8 ? 8 : 4;
};

// Shared memory: [NC][W] query floats (column j, chunk k: elements 0-3 at
// float4 index j*W/4 + k, elements 4-7 at j*W/4 + W/8 + k), then per warp NC
// reduced column values.
size_t fused_smem(uint32_t NC, uint32_t W)
{
    return ((size_t)NC * W + (size_t)kWarps * NC) * 4;
}

template <int DT, int NC>
__global__ void __launch_bounds__(kThreads) score_fused_kernel(ScoreParams p)
{
    extern __shared__ float4 smem4[];
    float *sq = reinterpret_cast<float *>(smem4);
    const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const uint32_t W = p.W, W4 = W / 4, W8 = W / 8, D = p.D, N = p.nq * p.ncol;

    // Query columns -> shared memory (columns j >= N are zeros, never read back).
    for (uint32_t x = threadIdx.x; x < NC * W; x += blockDim.x) {
        const uint32_t j = x / W, e = x % W;
        float v = 0.0f;
        if (j < N) {
            const uint32_t i = j / p.ncol, c = j % p.ncol, h = e / D, d = e % D;
            v = p.cols[(((size_t)i * p.H + h) * p.ncol + c) * D + d];
        }
        const uint32_t k = e / 8, w8 = e % 8;
        sq[(size_t)j * W + (w8 / 4) * (W / 2) + k * 4 + (w8 % 4)] = v;
    }
    float *red = sq + (size_t)NC * W + warp * NC;
    __syncthreads();

    const uint32_t cph = D / 8;                   // chunks per head
    const uint32_t lpg = cph < 32 ? cph : 32;     // lanes sharing one head within a step
    const uint32_t sph = cph < 32 ? 1 : cph / 32; // steps per head
    const uint32_t nsteps = (W8 + 31) / 32;
    const bool general = p.plan == MSA_DEV_PLAN_GENERAL;
    constexpr int U = Unroll<DT>::value;

    for (uint32_t row = blockIdx.x * kWarps + warp; row < p.nrows; row += gridDim.x * kWarps) {
        const size_t rbase = (size_t)row * W;
        float acc[NC], hm[NC];
#pragma unroll
        for (int j = 0; j < NC; j++) {
            acc[j] = 0.0f;
            hm[j] = -INFINITY;
        }
        for (uint32_t s0 = 0; s0 < nsteps; s0 += U) {
            uint4 ra[U], rb[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                const uint32_t k = (s0 + u) * 32 + lane;
                ra[u] = make_uint4(0, 0, 0, 0);
                rb[u] = make_uint4(0, 0, 0, 0);
                if (k < W8) load_chunk<DT>(p.keys, rbase + (size_t)k * 8, ra[u], rb[u]);
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                const uint32_t s = s0 + u;
                if (s >= nsteps) break; // uniform across the warp
                const uint32_t k = s * 32 + lane;
                const bool valid = k < W8; // whole head groups are valid or not
                const uint32_t kk = valid ? k : 0;
                float kv[8];
                unpack<DT>(ra[u], rb[u], kv); // zeros when !valid
                const float sc =
                    (DT == MSA_DT_I8 && valid) ? p.scales[(size_t)row * p.H + kk / cph] : 1.0f;
#pragma unroll
                for (int j = 0; j < NC; j++) {
                    const float4 qa = smem4[j * W4 + kk], qb = smem4[j * W4 + W8 + kk];
                    float part = kv[0] * qa.x;
                    part = fmaf(kv[1], qa.y, part);
                    part = fmaf(kv[2], qa.z, part);
                    part = fmaf(kv[3], qa.w, part);
                    part = fmaf(kv[4], qb.x, part);
                    part = fmaf(kv[5], qb.y, part);
                    part = fmaf(kv[6], qb.z, part);
                    part = fmaf(kv[7], qb.w, part);
                    acc[j] = general ? acc[j] + part : fmaf(sc, part, acc[j]);
                }
                if (general && (s + 1) % sph == 0) {
                    // The head ends with this step: complete its dot inside the
                    // lpg lanes that cover it (aligned groups), fold into max.
#pragma unroll
                    for (int j = 0; j < NC; j++) {
                        float v = acc[j];
                        for (uint32_t o = 1; o < lpg; o <<= 1) v += __shfl_xor_sync(kFull, v, o);
                        if (valid) hm[j] = max_nan(hm[j], sc * v);
                        acc[j] = 0.0f;
                    }
                }
            }
        }
#pragma unroll
        for (int j = 0; j < NC; j++) {
            float v;
            if (!general) {
                v = warp_sum(acc[j]);
            } else {
                v = hm[j];
                for (int o = 16; o; o >>= 1) v = max_nan(v, __shfl_xor_sync(kFull, v, o));
            }
            if (lane == 0) red[j] = v;
        }
        __syncwarp();
        // red[j]: LINEAR/MAXVEC sum_h C[h][j]; GENERAL max_h C[h][j]. Either way
        // the epilogue sees one "head" (H = 1) holding that value.
        if (lane < p.nq) {
            const float *ri = red + lane * p.ncol;
            float s = plan_score(p.plan, p.qred, 1, p.ncol, p.G,
                                 [&](uint32_t, uint32_t c) { return ri[c]; });
            p.scores[(size_t)lane * p.ld + row] = s;
        }
        __syncwarp();
    }
}

typedef void (*fused_fn)(ScoreParams);

fused_fn fused_kernel(int dt, uint32_t nc)
{
#define MSA_FUSED_CASE(DT)                           \
    case DT:                                         \
        return nc <= 1   ? score_fused_kernel<DT, 1> \
               : nc <= 2 ? score_fused_kernel<DT, 2> \
               : nc <= 4 ? score_fused_kernel<DT, 4> \
               : nc <= 8 ? score_fused_kernel<DT, 8> \
                         : score_fused_kernel<DT, 16>;
    switch (dt) {
        MSA_FUSED_CASE(MSA_DT_F32)
        MSA_FUSED_CASE(MSA_DT_F16)
        MSA_FUSED_CASE(MSA_DT_BF16)
        MSA_FUSED_CASE(MSA_DT_I8)
    default:
        return nullptr;
    }
#undef MSA_FUSED_CASE
}

uint32_t pow2_cols(uint32_t n)
{
    return n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : n <= 8 ? 8 : 16;
}

/* ==== GEMM path ============================================================== */

struct PrepParams {
    const float *cols;             // [nq][H][ncol][D]
    uint32_t H, D, ncol, N, N2, K; // N = nq*ncol columns, N2 = N or 2N (hi/lo)
    int dt;                        // key dtype (I8 -> BF16 columns)
    void *Bp;                      // [batch][N2][K] of the GEMM's B type
    float *fac;                    // [batch][N]: factor undoing the column scale
};

// One block per (column jj, batch b): B columns for the GEMM; see the file
// comment for the hi/lo split and the F16 power-of-two column scale.
__global__ void __launch_bounds__(256) gemm_prep_kernel(PrepParams pp)
{
    const uint32_t jj = blockIdx.x, b = blockIdx.y;
    const uint32_t i = jj / pp.ncol, c = jj % pp.ncol;
    auto value = [&](uint32_t kk) {
        const uint32_t hd = b * pp.K + kk, h = hd / pp.D, d = hd % pp.D;
        return pp.cols[(((size_t)i * pp.H + h) * pp.ncol + c) * pp.D + d];
    };
    float f = 1.0f, fac = 1.0f;
    if (pp.dt == MSA_DT_F16) {
        __shared__ float wmax[32];
        float m = 0.0f;
        for (uint32_t kk = threadIdx.x; kk < pp.K; kk += blockDim.x) m = fmaxf(m, fabsf(value(kk)));
        for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(kFull, m, o));
        if ((threadIdx.x & 31) == 0) wmax[threadIdx.x >> 5] = m;
        __syncthreads();
        m = 0.0f;
        for (uint32_t w = 0; w < blockDim.x / 32; w++) m = fmaxf(m, wmax[w]);
        if (m > 0.0f && isfinite(m)) {
            int ex;
            frexpf(m, &ex); // m < 2^ex
            // max|q * 2^sh| < 2^14. The clamp keeps 2^sh and 2^-sh normal
            // floats; a tighter one (it was +-60) let columns above 2^74
            // overflow the half range after all.
            int sh = min(max(14 - ex, -126), 126);
            f = ldexpf(1.0f, sh);
            fac = ldexpf(1.0f, -sh);
        }
    }
    const size_t hi_at = ((size_t)b * pp.N2 + jj) * pp.K,
                 lo_at = ((size_t)b * pp.N2 + pp.N + jj) * pp.K;
    for (uint32_t kk = threadIdx.x; kk < pp.K; kk += blockDim.x) {
        const float v = value(kk) * f;
        if (pp.dt == MSA_DT_F32) {
            ((float *)pp.Bp)[hi_at + kk] = v;
        } else if (pp.dt == MSA_DT_F16) {
            const __half hi = __float2half_rn(v);
            ((__half *)pp.Bp)[hi_at + kk] = hi;
            ((__half *)pp.Bp)[lo_at + kk] = __float2half_rn(v - __half2float(hi));
        } else { // BF16, and I8 keys converted to BF16
            const __nv_bfloat16 hi = __float2bfloat16_rn(v);
            ((__nv_bfloat16 *)pp.Bp)[hi_at + kk] = hi;
            ((__nv_bfloat16 *)pp.Bp)[lo_at + kk] = __float2bfloat16_rn(v - __bfloat162float(hi));
        }
    }
    if (threadIdx.x == 0) pp.fac[(size_t)b * pp.N + jj] = fac;
}

// int8 -> bf16, exact for -128..127.
__global__ void i8_to_bf16_kernel(const int8_t *src, __nv_bfloat16 *dst, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16_rn((float)src[i]);
}

struct EpiParams {
    const float *C;      // [batch][N2][rt]
    const float *fac;    // [batch][N]
    const float *scales; // I8: [nrows][H]
    uint32_t r0, rt, H, ncol, G, N, N2;
    int plan, qred;
    bool flat, hilo, i8;
    float *scores;
    size_t ld;
};

// One thread per (tile row, query): gathers C[h][c] of its query and runs the
// plan epilogue. Reads of C are coalesced across the rows of a warp.
__global__ void __launch_bounds__(256) gemm_epilogue_kernel(EpiParams e)
{
    const uint32_t r = blockIdx.x * blockDim.x + threadIdx.x, i = blockIdx.y;
    if (r >= e.rt) return;
    const uint32_t row = e.r0 + r;
    float s =
        plan_score(e.plan, e.qred, e.flat ? 1 : e.H, e.ncol, e.G, [&](uint32_t h, uint32_t c) {
            const uint32_t jj = i * e.ncol + c;
            const float *Cb = e.C + (size_t)h * e.N2 * e.rt; // h is 0 when flat
            float v = Cb[(size_t)jj * e.rt + r];
            if (e.hilo) v += Cb[(size_t)(e.N + jj) * e.rt + r];
            v *= e.fac[(size_t)h * e.N + jj];
            if (e.i8) v *= e.scales[(size_t)row * e.H + h];
            return v;
        });
    e.scores[(size_t)i * e.ld + row] = s;
}

size_t align_up(size_t n)
{
    return (n + kAlign - 1) / kAlign * kAlign;
}

// The GEMM path. *done = false (and nothing queued) when work cannot hold one
// tile of rows: the caller then uses the fused or generic kernel.
int score_gemm(struct msa_dev_lane *l, const msa_dev_score_args_t *a, const ScoreParams &p,
               bool *done)
{
    *done = false;
    const int dt = a->key_dtype;
    const bool i8 = dt == MSA_DT_I8, hilo = dt != MSA_DT_F32;
    const bool flat = a->plan != MSA_DEV_PLAN_GENERAL && !i8;
    const uint64_t N = (uint64_t)a->nq * a->ncol, N2 = hilo ? 2 * N : N;
    const uint32_t W = a->H * a->D, batches = flat ? 1 : a->H, K = flat ? W : a->D;
    const size_t qesz = dt == MSA_DT_F32 ? 4 : 2, kesz = msa_dtype_size(a->key_dtype);
    if (a->nq > 65535 || batches > 65535 || N2 > (uint64_t)INT32_MAX / 2)
        return MSA_OK; // grid limits

    // Carve work: B columns, column factors, then per tile C (and the I8 tile).
    uintptr_t base = ((uintptr_t)a->work + kAlign - 1) & ~(uintptr_t)(kAlign - 1);
    size_t skip = base - (uintptr_t)a->work;
    if (a->work_bytes <= skip) return MSA_OK;
    const size_t avail = a->work_bytes - skip;
    const size_t b_bytes = align_up((size_t)W * N2 * qesz),
                 f_bytes = align_up((size_t)batches * N * 4);
    const size_t per_row = (size_t)batches * N2 * 4 + (i8 ? (size_t)W * 2 : 0);
    const size_t fixed = b_bytes + f_bytes + 2 * kAlign;
    const size_t min_rows = a->nrows < 32 ? a->nrows : 32;
    if (avail < fixed + per_row * min_rows) return MSA_OK;
    size_t R = (avail - fixed) / per_row;
    if (R >= a->nrows)
        R = a->nrows;
    else
        R = R / 32 * 32; // keeps tiles (and ldc) tidy
    if (R > (size_t)INT32_MAX / 2) R = (size_t)INT32_MAX / 2 / 32 * 32;

    char *w = (char *)base;
    void *Bp = w;
    float *fac = (float *)(w + b_bytes);
    float *C = (float *)(w + b_bytes + f_bytes);
    __nv_bfloat16 *Abuf = (__nv_bfloat16 *)((char *)C + align_up((size_t)batches * N2 * R * 4));

    PrepParams pp = {a->cols, a->H, a->D, a->ncol, (uint32_t)N, (uint32_t)N2, K, dt, Bp, fac};
    gemm_prep_kernel<<<dim3((unsigned)N, batches), 256, 0, l->stream>>>(pp);
    MSA_CK_LAUNCH(l, "gemm_prep_kernel");

    const cudaDataType_t ctype = dt == MSA_DT_F32   ? CUDA_R_32F
                                 : dt == MSA_DT_F16 ? CUDA_R_16F
                                                    : CUDA_R_16BF;
    const cublasComputeType_t comp =
        dt == MSA_DT_F32 ? CUBLAS_COMPUTE_32F_PEDANTIC : CUBLAS_COMPUTE_32F;
    const float alpha = 1.0f, beta = 0.0f;
    const unsigned sms = (unsigned)l->dv->prop.multiProcessorCount;
    for (size_t r0 = 0; r0 < a->nrows; r0 += R) {
        const size_t rt = a->nrows - r0 < R ? a->nrows - r0 : R;
        const void *A = (const char *)a->keys + r0 * W * kesz;
        if (i8) {
            const size_t n = rt * W;
            size_t g = (n + 255) / 256;
            g = g > (size_t)sms * 16 ? (size_t)sms * 16 : g;
            i8_to_bf16_kernel<<<(unsigned)g, 256, 0, l->stream>>>((const int8_t *)A, Abuf, n);
            MSA_CK_LAUNCH(l, "i8_to_bf16_kernel");
            A = Abuf;
        }
        // Column-major view: op(A) = A^T is rt x K (A is K x rt, lda = W, each
        // batch shifted by K elements = one head), B is K x N2 (ldb = K), C is
        // rt x N2 (ldc = rt): C[b][j][r].
        MSA_CK(cublasGemmStridedBatchedEx(
            l->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)rt, (int)N2, (int)K, &alpha, A, ctype, (int)W,
            (long long)K, Bp, ctype, (int)K, (long long)N2 * K, &beta, C, CUDA_R_32F, (int)rt,
            (long long)N2 * rt, (int)batches, comp, CUBLAS_GEMM_DEFAULT));
        EpiParams e = {C,       fac,  a->scales,   (uint32_t)r0, (uint32_t)rt, a->H,
                       a->ncol, a->G, (uint32_t)N, (uint32_t)N2, a->plan,      p.qred,
                       flat,    hilo, i8,          a->scores,    a->ld};
        gemm_epilogue_kernel<<<dim3((unsigned)((rt + 255) / 256), a->nq), 256, 0, l->stream>>>(e);
        MSA_CK_LAUNCH(l, "gemm_epilogue_kernel");
    }
    *done = true;
    return MSA_OK;
}

/* ==== launchers ============================================================== */

bool fused_shape_ok(const msa_dev_score_args_t *a)
{
    if (a->D % 8 != 0) return false;
    const uint32_t cph = a->D / 8;
    if (!((cph <= 32 && 32 % cph == 0) || cph % 32 == 0)) return false;
    return ((uintptr_t)a->keys % 16) == 0 && a->ncol <= kMaxFusedCols;
}

unsigned row_grid(struct msa_dev_lane *l, uint32_t nrows, unsigned per_sm)
{
    size_t g = ((size_t)nrows + kWarps - 1) / kWarps;
    size_t cap = (size_t)l->dv->prop.multiProcessorCount * (per_sm ? per_sm : 1);
    return (unsigned)(g < cap ? g : cap);
}

int launch_generic(struct msa_dev_lane *l, const ScoreParams &p)
{
    score_generic_kernel<<<row_grid(l, p.nrows, 16), kThreads, 0, l->stream>>>(p);
    MSA_CK_LAUNCH(l, "score_generic_kernel");
    return MSA_OK;
}

// Fused kernel over groups of queries whose columns fit shared memory and the
// largest template (16 columns). Falls back to generic when one query's
// columns do not fit.
int launch_fused(struct msa_dev_lane *l, const msa_dev_score_args_t *a, ScoreParams p)
{
    const size_t smax = l->dv->prop.sharedMemPerBlockOptin;
    uint32_t qg = kMaxFusedCols / a->ncol;
    if (qg > a->nq) qg = a->nq;
    while (qg > 0 && fused_smem(pow2_cols(qg * a->ncol), p.W) > smax) qg--;
    if (qg == 0) return launch_generic(l, p);
    for (uint32_t i0 = 0; i0 < a->nq; i0 += qg) {
        ScoreParams q = p;
        q.nq = a->nq - i0 < qg ? a->nq - i0 : qg;
        q.cols = a->cols + (size_t)i0 * a->H * a->ncol * a->D;
        q.scores = a->scores + (size_t)i0 * a->ld;
        const uint32_t nc = pow2_cols(q.nq * a->ncol);
        fused_fn fn = fused_kernel(a->key_dtype, nc);
        const size_t smem = fused_smem(nc, p.W);
        int per_sm = 0;
        MSA_CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, kThreads, smem));
        if (per_sm <= 0) {
            // This group only: returning here would leave the later groups'
            // scores unwritten.
            const int rc = launch_generic(l, q);
            if (rc != MSA_OK) return rc;
            continue;
        }
        fn<<<row_grid(l, p.nrows, (unsigned)per_sm), kThreads, smem, l->stream>>>(q);
        MSA_CK_LAUNCH(l, "score_fused_kernel");
    }
    return MSA_OK;
}

} // namespace

int msa__cuda_score_init(struct msa_dev *d)
{
    // Let every fused kernel use the device's full opt-in shared memory.
    const int dts[4] = {MSA_DT_F32, MSA_DT_F16, MSA_DT_BF16, MSA_DT_I8};
    const uint32_t ncs[5] = {1, 2, 4, 8, 16};
    for (int t = 0; t < 4; t++)
        for (int c = 0; c < 5; c++)
            MSA_CK(cudaFuncSetAttribute(fused_kernel(dts[t], ncs[c]),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)d->prop.sharedMemPerBlockOptin));
    return MSA_OK;
}

int msa__cuda_score(struct msa_dev_lane *l, const msa_dev_score_args_t *a)
{
    if (!a) return MSA_EINVAL;
    const int dt = a->key_dtype;
    const bool dt_ok = dt == MSA_DT_F32 || dt == MSA_DT_F16 || dt == MSA_DT_BF16 || dt == MSA_DT_I8;
    const bool plan_ok = a->plan == MSA_DEV_PLAN_LINEAR || a->plan == MSA_DEV_PLAN_MAXVEC ||
                         a->plan == MSA_DEV_PLAN_GENERAL;
    if (!dt_ok || !plan_ok || !a->H || !a->D || !a->ncol || (uint64_t)a->H * a->D > (1u << 24) ||
        (a->plan == MSA_DEV_PLAN_GENERAL && (!a->G || a->ncol % a->G))) {
        msa_log(MSA_LOG_ERROR, "cuda score: bad shape dtype=%d plan=%d H=%u D=%u ncol=%u G=%u", dt,
                (int)a->plan, a->H, a->D, a->ncol, a->G);
        return MSA_EINVAL;
    }
    if (a->nrows == 0 || a->nq == 0) return MSA_OK;
    if (!a->keys || !a->cols || !a->scores || (dt == MSA_DT_I8 && !a->scales) ||
        (a->nq > 1 && a->ld < a->nrows)) {
        msa_log(MSA_LOG_ERROR, "cuda score: NULL keys/cols/scores/scales or ld %zu < nrows %u",
                a->ld, a->nrows);
        return MSA_EINVAL;
    }
    // GENERAL: QUERY_MAX takes the max over t', anything else the mean (LAST
    // arrives as T' = 1, where the two agree), as the reference does.
    ScoreParams p = {a->keys,
                     a->scales,
                     a->nrows,
                     a->H,
                     a->D,
                     a->H * a->D,
                     dt,
                     (int)a->plan,
                     a->query_reduce == MSA_QUERY_MAX ? (int)MSA_QUERY_MAX : (int)MSA_QUERY_MEAN,
                     a->ncol,
                     a->G,
                     a->nq,
                     a->cols,
                     a->scores,
                     a->ld};

    const uint64_t ncols = (uint64_t)a->nq * a->ncol;
    if (ncols >= l->dv->gemm_min_cols && a->work) {
        bool done = false;
        int rc = score_gemm(l, a, p, &done);
        if (rc != MSA_OK || done) return rc;
    }
    if (fused_shape_ok(a)) return launch_fused(l, a, p);
    return launch_generic(l, p);
}
