/* kernels_avx512bf16.c — BF16-key routing tiles with vdpbf16ps (AVX512_BF16);
 * every other dtype and the attention helpers reuse the AVX-512 ones.
 *
 * Precision: vdpbf16ps multiplies bf16 by bf16, so the float32 query is split
 * at scorer creation into q ~= hi + lo, both bf16 (MSA__QF_BF16X2), and each
 * 32-element block costs two vdpbf16ps per (row, query). hi + lo carries 16
 * significant bits: |q - hi - lo| <= 2^-18 |q| (~3.8e-6) per element; bf16 x
 * bf16 products are exact in float32 and the accumulation is float32, so a
 * score is within ~4e-6 * sum|q||k| of exact (measured worst 3.6e-6;
 * tests/test_kernels.c allows 1e-5, 2e-6 for the float32-query paths). Same
 * MAC rate as the AVX-512 FMA path (2 instructions per 32 MACs), no key
 * conversion. vdpbf16ps treats
 * denormal inputs as zero and rounds to nearest even without MXCSR, which only
 * matters for |q| or |k| below 1.2e-38. The one-term variant (MSA__QF_BF16X1,
 * set by msa__scorer_set_bf16_terms, used only by the benchmark) rounds the
 * query to bf16 (2^-9 relative): twice the throughput, not the contract's
 * float32 query.
 *
 * Tile shape as in the AVX-512 file: 8 rows x 2 queries, 16 accumulators,
 * keys loaded raw (no conversion), one shuffle-tree reduction per tile.
 */
#include "kernels_impl.h"

#include <immintrin.h>

#define AI static inline __attribute__((always_inline))

/* As in kernels_avx512.c (kept local so both files stay self-contained). */
AI __m512 reduce16(const __m512 *o)
{
    __m512 v[16];
#pragma GCC unroll 16
    for (int c = 0; c < 4; c++)
#pragma GCC unroll 16
        for (int e = 0; e < 4; e++) v[4 * e + c] = o[4 * c + e];
    __m512 w[8], u[4], z[2];
#pragma GCC unroll 16
    for (int p = 0; p < 8; p++) {
        __m512 a = v[2 * p], b = v[2 * p + 1];
        w[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
    }
#pragma GCC unroll 16
    for (int p = 0; p < 4; p++) {
        __m512 a = w[2 * p], b = w[2 * p + 1];
        u[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
    }
#pragma GCC unroll 16
    for (int p = 0; p < 2; p++) {
        __m512 a = u[2 * p], b = u[2 * p + 1];
        z[p] = _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
    }
    return _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* q: per 32-block [32 bf16 hi][32 bf16 lo] = 32 floats' worth (MSA__QF_BF16X*). */
AI void tile_blk(int NQB, int TERMS, const float *q, size_t qs, const void *const *k, uint32_t L,
                 float *acc, size_t ld)
{
    __m512 a[MSA__NK][2];
#pragma GCC unroll 16
    for (int i = 0; i < MSA__NK; i++) a[i][0] = a[i][1] = _mm512_setzero_ps();
    for (uint32_t l = 0; l < L; l += 32) {
        const uint32_t n = L - l;
        __m512bh qh[2], ql[2];
#pragma GCC unroll 16
        for (int j = 0; j < NQB; j++) {
            qh[j] = (__m512bh)_mm512_loadu_si512(q + j * qs + l);
            if (TERMS == 2) ql[j] = (__m512bh)_mm512_loadu_si512(q + j * qs + l + 16);
        }
#pragma GCC unroll 16
        for (int i = 0; i < MSA__NK; i++) {
            const uint16_t *p = (const uint16_t *)k[i] + l;
            __m512bh kv =
                (__m512bh)(n >= 32 ? _mm512_loadu_si512(p)
                                   : _mm512_maskz_loadu_epi16((__mmask32)((1u << n) - 1), p));
#pragma GCC unroll 16
            for (int j = 0; j < NQB; j++) {
                a[i][j] = _mm512_dpbf16_ps(a[i][j], kv, qh[j]);
                if (TERMS == 2) a[i][j] = _mm512_dpbf16_ps(a[i][j], kv, ql[j]);
            }
        }
    }
    __m512 o[16];
#pragma GCC unroll 16
    for (int i = 0; i < MSA__NK; i++) {
        if (NQB == 2) {
            o[2 * i] = a[i][0];
            o[2 * i + 1] = a[i][1];
        } else {
            o[i] = a[i][0];
            o[8 + i] = _mm512_setzero_ps();
        }
    }
    float t[16];
    _mm512_storeu_ps(t, reduce16(o));
#pragma GCC unroll 16
    for (int i = 0; i < MSA__NK; i++) {
        if (NQB == 2) {
            acc[i * ld] = t[2 * i];
            acc[i * ld + 1] = t[2 * i + 1];
        } else {
            acc[i * ld] = t[i];
        }
    }
}

AI void tile_gen(int TERMS, const float *q, size_t qs, uint32_t nq, const void *const *k,
                 uint32_t L, float *acc, size_t ld)
{
    uint32_t j = 0;
    for (; j + 2 <= nq; j += 2) tile_blk(2, TERMS, q + j * qs, qs, k, L, acc + j, ld);
    if (j < nq) tile_blk(1, TERMS, q + j * qs, qs, k, L, acc + j, ld);
}

static void tile_bf16x2(const float *q, size_t qs, uint32_t nq, const void *const *k, uint32_t L,
                        float *acc, size_t ld)
{
    tile_gen(2, q, qs, nq, k, L, acc, ld);
}

void msa__tile_avx512bf16_x1(const float *q, size_t qs, uint32_t nq, const void *const *k,
                             uint32_t L, float *acc, size_t ld)
{
    tile_gen(1, q, qs, nq, k, L, acc, ld);
}

const msa__kern_ops_t msa__ops_avx512bf16 = {
    .tile = {NULL, msa__tile_avx512_f32, msa__tile_avx512_f16, tile_bf16x2, msa__tile_avx512_i8},
    .qfmt = {0, MSA__QF_F32, MSA__QF_F32, MSA__QF_BF16X2, MSA__QF_F32},
    .dot = msa__dot_avx512,
    .axpy = msa__axpy_avx512,
};
