/* kernels_avx2.c — AVX2 + FMA + F16C routing tiles and attention helpers.
 * Compiled with those flags (CMake msa_simd_flags); only called after
 * msa_idx_isa_supported(MSA_ISA_AVX2).
 *
 * 16 ymm registers: the 8-row tile runs as two passes of 4 rows x 2 queries
 * (8 accumulators), walked in 16-element blocks (two ymm per key and query).
 * BF16 keys are widened by `<< 16` / `& 0xffff0000` on 16 bf16 read as 8 dwords
 * (even / odd elements); the query is stored to match (MSA__QF_F32_EO16).
 * Key tails (< 16 elements) are copied into a zeroed block first.
 */
#include "kernels_impl.h"

#include <immintrin.h>
#include <string.h>

#define AI static inline __attribute__((always_inline))

enum { K_F32 = 1, K_F16 = 2, K_BF16 = 3, K_I8 = 4 };

static const size_t esz_of[5] = {0, 4, 2, 2, 1};

/* Elements [0, 16) at p as two float vectors in the dtype's query order. */
AI void load_key(int dt, const void *p, __m256 *k0, __m256 *k1)
{
    if (dt == K_F32) {
        *k0 = _mm256_loadu_ps((const float *)p);
        *k1 = _mm256_loadu_ps((const float *)p + 8);
    } else if (dt == K_F16) {
        *k0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
        *k1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + 8)));
    } else if (dt == K_BF16) {
        __m256i v = _mm256_loadu_si256((const __m256i *)p);
        *k0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        *k1 = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
    } else {
        __m128i v = _mm_loadu_si128((const __m128i *)p);
        *k0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        *k1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
    }
}

/* Lane m of the result = horizontal sum of v[m]. */
AI __m256 reduce8(const __m256 *v)
{
    __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
    __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                         _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* 4 rows (k[0..3]) x NQB queries. */
AI void tile_blk(int dt, int NQB, const float *q, size_t qs, const void *const *k, uint32_t L,
                 float *acc, size_t ld)
{
    __m256 a[4][2];
#pragma GCC unroll 16
    for (int i = 0; i < 4; i++) a[i][0] = a[i][1] = _mm256_setzero_ps();
    const size_t esz = esz_of[dt];
    uint32_t l = 0;
    for (; l < L; l += 16) {
        __m256 q0[2], q1[2];
#pragma GCC unroll 16
        for (int j = 0; j < NQB; j++) {
            q0[j] = _mm256_loadu_ps(q + j * qs + l);
            q1[j] = _mm256_loadu_ps(q + j * qs + l + 8);
        }
#pragma GCC unroll 16
        for (int i = 0; i < 4; i++) {
            __m256 k0, k1;
            const char *p = (const char *)k[i] + l * esz;
            if (L - l >= 16) {
                load_key(dt, p, &k0, &k1);
            } else {
                _Alignas(32) char buf[64] = {0};
                memcpy(buf, p, (L - l) * esz);
                load_key(dt, buf, &k0, &k1);
            }
#pragma GCC unroll 16
            for (int j = 0; j < NQB; j++) {
                a[i][j] = _mm256_fmadd_ps(k0, q0[j], a[i][j]);
                a[i][j] = _mm256_fmadd_ps(k1, q1[j], a[i][j]);
            }
        }
    }
    __m256 o[8];
#pragma GCC unroll 16
    for (int i = 0; i < 4; i++) {
        o[2 * i] = a[i][0];
        o[2 * i + 1] = NQB == 2 ? a[i][1] : _mm256_setzero_ps();
    }
    float t[8];
    _mm256_storeu_ps(t, reduce8(o));
#pragma GCC unroll 16
    for (int i = 0; i < 4; i++) {
        acc[i * ld] = t[2 * i];
        if (NQB == 2) acc[i * ld + 1] = t[2 * i + 1];
    }
}

AI void tile_gen(int dt, const float *q, size_t qs, uint32_t nq, const void *const *k, uint32_t L,
                 float *acc, size_t ld)
{
    for (int half = 0; half < MSA__NK / 4; half++) {
        const void *const *kk = k + 4 * half;
        float *aa = acc + 4 * half * ld;
        uint32_t j = 0;
        for (; j + 2 <= nq; j += 2) tile_blk(dt, 2, q + j * qs, qs, kk, L, aa + j, ld);
        if (j < nq) tile_blk(dt, 1, q + j * qs, qs, kk, L, aa + j, ld);
    }
}

static void tile_f32(const float *q, size_t qs, uint32_t nq, const void *const *k, uint32_t L,
                     float *acc, size_t ld)
{
    tile_gen(K_F32, q, qs, nq, k, L, acc, ld);
}
static void tile_f16(const float *q, size_t qs, uint32_t nq, const void *const *k, uint32_t L,
                     float *acc, size_t ld)
{
    tile_gen(K_F16, q, qs, nq, k, L, acc, ld);
}
static void tile_bf16(const float *q, size_t qs, uint32_t nq, const void *const *k, uint32_t L,
                      float *acc, size_t ld)
{
    tile_gen(K_BF16, q, qs, nq, k, L, acc, ld);
}
static void tile_i8(const float *q, size_t qs, uint32_t nq, const void *const *k, uint32_t L,
                    float *acc, size_t ld)
{
    tile_gen(K_I8, q, qs, nq, k, L, acc, ld);
}

/* ---- attention helpers ------------------------------------------------------ */

static float dot_avx2(const float *a, const float *b, uint32_t n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    uint32_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    __m256 s = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float r = _mm_cvtss_f32(h);
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

static void axpy_avx2(float a, const float *x, float *y, uint32_t n)
{
    const __m256 va = _mm256_set1_ps(a);
    uint32_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i,
                         _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

const msa__kern_ops_t msa__ops_avx2 = {
    .tile = {NULL, tile_f32, tile_f16, tile_bf16, tile_i8},
    .qfmt = {0, MSA__QF_F32, MSA__QF_F32, MSA__QF_F32_EO16, MSA__QF_F32},
    .dot = dot_avx2,
    .axpy = axpy_avx2,
};
