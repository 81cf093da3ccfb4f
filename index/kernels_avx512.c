/* kernels_avx512.c — AVX-512 (F/BW/VL/DQ + FMA + F16C) routing tiles and
 * attention helpers. Compiled with those flags (CMake msa_simd_flags); only
 * called after msa_idx_isa_supported(MSA_ISA_AVX512).
 *
 * Tile shape: 8 rows x 2 queries = 16 zmm accumulators, walked in 32-element
 * blocks (two zmm per key and query). Each key block is loaded and converted
 * once and used for both queries; each query block once for all 8 rows. The
 * 16 accumulators are reduced together by one shuffle tree (reduce16).
 *
 * BF16 keys are widened without a shuffle: 32 bf16 loaded as 16 dwords give the
 * even elements by `<< 16` and the odd ones by `& 0xffff0000`; the scorer stores
 * the query in the matching even/odd order (MSA__QF_F32_EO32).
 */
#include "kernels_impl.h"

#include <immintrin.h>

#define AI static inline __attribute__((always_inline))

enum { K_F32 = 1, K_F16 = 2, K_BF16 = 3, K_I8 = 4 };

/* Loads elements [l, l+32) of key k (n < 32: only the first n, rest zero) as
 * two float vectors in the order the query format of the dtype expects. */
AI void load_key(int dt, const void *k, uint32_t l, uint32_t n, __m512 *k0, __m512 *k1)
{
    if (dt == K_F32) {
        const float *p = (const float *)k + l;
        if (n >= 32) {
            *k0 = _mm512_loadu_ps(p);
            *k1 = _mm512_loadu_ps(p + 16);
        } else {
            __mmask16 m0 = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
            __mmask16 m1 = n > 16 ? (__mmask16)((1u << (n - 16)) - 1) : 0;
            *k0 = _mm512_maskz_loadu_ps(m0, p);
            *k1 = _mm512_maskz_loadu_ps(m1, p + 16);
        }
    } else if (dt == K_F16) {
        const uint16_t *p = (const uint16_t *)k + l;
        if (n >= 32) {
            *k0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
            *k1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 16)));
        } else {
            __mmask16 m0 = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
            __mmask16 m1 = n > 16 ? (__mmask16)((1u << (n - 16)) - 1) : 0;
            *k0 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m0, p));
            *k1 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m1, p + 16));
        }
    } else if (dt == K_BF16) {
        const uint16_t *p = (const uint16_t *)k + l;
        __m512i v = n >= 32 ? _mm512_loadu_si512(p)
                            : _mm512_maskz_loadu_epi16((__mmask32)((1u << n) - 1), p);
        *k0 = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        *k1 = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
    } else {
        const int8_t *p = (const int8_t *)k + l;
        __m128i a, b;
        if (n >= 32) {
            a = _mm_loadu_si128((const __m128i *)p);
            b = _mm_loadu_si128((const __m128i *)(p + 16));
        } else {
            __mmask16 m0 = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
            __mmask16 m1 = n > 16 ? (__mmask16)((1u << (n - 16)) - 1) : 0;
            a = _mm_maskz_loadu_epi8(m0, p);
            b = _mm_maskz_loadu_epi8(m1, p + 16);
        }
        *k0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a));
        *k1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    }
}

/* Horizontal sums of 16 vectors: lane m of the result = sum of lanes of v[m].
 * A 4-level shuffle tree (15 adds) instead of 16 separate reductions. */
AI __m512 reduce16(const __m512 *o)
{
    /* The tree leaves lane 4c+e holding input 4e+c; feed it transposed. */
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

/* Stores the 8 x NQB sums of a[i][j] to acc[i * ld + j]. */
AI void store_acc(__m512 a[MSA__NK][2], int NQB, float *acc, size_t ld)
{
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

AI void tile_blk(int dt, int NQB, const float *q, size_t qs, const void *const *k, uint32_t L,
                 float *acc, size_t ld)
{
    __m512 a[MSA__NK][2];
#pragma GCC unroll 16
    for (int i = 0; i < MSA__NK; i++) a[i][0] = a[i][1] = _mm512_setzero_ps();
    for (uint32_t l = 0; l < L; l += 32) {
        const uint32_t n = L - l;
        __m512 q0[2], q1[2];
#pragma GCC unroll 16
        for (int j = 0; j < NQB; j++) {
            q0[j] = _mm512_loadu_ps(q + j * qs + l);
            q1[j] = _mm512_loadu_ps(q + j * qs + l + 16);
        }
#pragma GCC unroll 16
        for (int i = 0; i < MSA__NK; i++) {
            __m512 k0, k1;
            if (n >= 32)
                load_key(dt, k[i], l, 32, &k0, &k1);
            else
                load_key(dt, k[i], l, n, &k0, &k1);
#pragma GCC unroll 16
            for (int j = 0; j < NQB; j++) {
                a[i][j] = _mm512_fmadd_ps(k0, q0[j], a[i][j]);
                a[i][j] = _mm512_fmadd_ps(k1, q1[j], a[i][j]);
            }
        }
    }
    store_acc(a, NQB, acc, ld);
}

AI void tile_gen(int dt, const float *q, size_t qs, uint32_t nq, const void *const *k, uint32_t L,
                 float *acc, size_t ld)
{
    uint32_t j = 0;
    for (; j + 2 <= nq; j += 2) tile_blk(dt, 2, q + j * qs, qs, k, L, acc + j, ld);
    if (j < nq) tile_blk(dt, 1, q + j * qs, qs, k, L, acc + j, ld);
}

void msa__tile_avx512_f32(const float *q, size_t qs, uint32_t nq, const void *const *k, uint32_t L,
                          float *acc, size_t ld)
{
    tile_gen(K_F32, q, qs, nq, k, L, acc, ld);
}
void msa__tile_avx512_f16(const float *q, size_t qs, uint32_t nq, const void *const *k, uint32_t L,
                          float *acc, size_t ld)
{
    tile_gen(K_F16, q, qs, nq, k, L, acc, ld);
}
void msa__tile_avx512_i8(const float *q, size_t qs, uint32_t nq, const void *const *k, uint32_t L,
                         float *acc, size_t ld)
{
    tile_gen(K_I8, q, qs, nq, k, L, acc, ld);
}
static void tile_bf16(const float *q, size_t qs, uint32_t nq, const void *const *k, uint32_t L,
                      float *acc, size_t ld)
{
    tile_gen(K_BF16, q, qs, nq, k, L, acc, ld);
}

/* ---- attention helpers ------------------------------------------------------ */

float msa__dot_avx512(const float *a, const float *b, uint32_t n)
{
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    uint32_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    }
    for (; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

void msa__axpy_avx512(float a, const float *x, float *y, uint32_t n)
{
    const __m512 va = _mm512_set1_ps(a);
    for (uint32_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 vy = _mm512_maskz_loadu_ps(m, y + i);
        _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i), vy));
    }
}

const msa__kern_ops_t msa__ops_avx512 = {
    .tile = {NULL, msa__tile_avx512_f32, msa__tile_avx512_f16, tile_bf16, msa__tile_avx512_i8},
    .qfmt = {0, MSA__QF_F32, MSA__QF_F32, MSA__QF_F32_EO32, MSA__QF_F32},
    .dot = msa__dot_avx512,
    .axpy = msa__axpy_avx512,
};
