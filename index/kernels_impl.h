/* kernels_impl.h — internals shared by index/kernels*.c, topk.c, attend.c and
 * pool.c: the prepared scorer, and the per-ISA function tables.
 *
 * Not a public header: only the kernel files (and the kernel tests/bench, which
 * may poke at internals) include it. Every ISA file fills one msa__kern_ops_t;
 * kernels.c picks the table of the scorer's ISA at run time.
 */
#ifndef MSA_KERNELS_IMPL_H
#define MSA_KERNELS_IMPL_H

#include "kernels.h"

#include <stddef.h>
#include <stdint.h>

/* Rows per micro-tile: every tile function scores MSA__NK key vectors at once
 * (the caller repeats the last row's pointer when fewer remain). */
#define MSA__NK 8
/* Query vectors per tile call at most (bounds the caller's stack scratch). */
#define MSA__QB 256
/* Prepared query segments are zero-padded to a multiple of this many floats, so
 * SIMD loops over the query never need a tail; keys get masked/padded tails. */
#define MSA__QPAD 32

/* How a prepared query segment of Lp floats' worth of bytes is laid out.
 * Every format takes exactly Lp * 4 bytes, so strides count in floats. */
typedef enum {
    MSA__QF_F32 = 0,  /* plain float32, zero padded */
    MSA__QF_F32_EO32, /* float32, each 32-block as [16 even elems][16 odd elems] */
    MSA__QF_F32_EO16, /* float32, each 16-block as [8 even][8 odd] */
    MSA__QF_BF16X2,   /* per 32-block: [32 bf16 hi][32 bf16 lo], q ~= hi + lo */
    MSA__QF_BF16X1,   /* as BF16X2 with lo = 0 (query rounded to bf16: fast, lossy) */
} msa__qfmt_t;

/* acc[i * ldacc + j] = sum_{l < L} q_j[l] * key_i[l] for i < MSA__NK, j < nq.
 * q_j = q + j * qstride floats, in the ISA's qfmt for the key dtype, padded to
 * a multiple of MSA__QPAD; key_i = k[i] points at L elements of the dtype (I8:
 * the raw int8 values; the caller applies the scale). Accumulates in float32. */
typedef void (*msa__tile_fn)(const float *q, size_t qstride, uint32_t nq, const void *const *k,
                             uint32_t L, float *acc, size_t ldacc);

typedef struct msa__kern_ops {
    msa__tile_fn tile[5]; /* indexed by msa_dtype_t: F32, F16, BF16, I8 */
    uint8_t qfmt[5];      /* msa__qfmt_t per dtype */
    /* Attention helpers over float32: dot product, and y += a * x. */
    float (*dot)(const float *a, const float *b, uint32_t n);
    void (*axpy)(float a, const float *x, float *y, uint32_t n);
} msa__kern_ops_t;

extern const msa__kern_ops_t msa__ops_scalar;
extern const msa__kern_ops_t msa__ops_avx2;
extern const msa__kern_ops_t msa__ops_avx512;
extern const msa__kern_ops_t msa__ops_avx512bf16;

/* AVX-512 pieces the AVX512BF16 table reuses. */
void msa__tile_avx512_f32(const float *q, size_t qs, uint32_t nq, const void *const *k, uint32_t L,
                          float *acc, size_t ld);
void msa__tile_avx512_f16(const float *q, size_t qs, uint32_t nq, const void *const *k, uint32_t L,
                          float *acc, size_t ld);
void msa__tile_avx512_i8(const float *q, size_t qs, uint32_t nq, const void *const *k, uint32_t L,
                         float *acc, size_t ld);
float msa__dot_avx512(const float *a, const float *b, uint32_t n);
void msa__axpy_avx512(float a, const float *x, float *y, uint32_t n);
/* BF16 tile with the one-term (bf16-rounded) query, MSA__QF_BF16X1. */
void msa__tile_avx512bf16_x1(const float *q, size_t qs, uint32_t nq, const void *const *k,
                             uint32_t L, float *acc, size_t ld);

/* The table of isa (must be supported). */
const msa__kern_ops_t *msa__kern_ops(msa_isa_t isa);

/* bf16 <-> f32: msa_f32_to_bf16 / msa_bf16_to_f32 (storage/tensor.h). */

/* IEEE half -> float (exact), for the scalar path. */
static inline float msa__f16_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    union {
        uint32_t u;
        float f;
    } v;
    if (exp == 0x1f) {
        v.u = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        v.u = sign | ((exp + 112u) << 23) | (man << 13);
    } else {
        /* zero or subnormal: man * 2^-24 */
        v.f = (float)man * (1.0f / 16777216.0f);
        v.u |= sign;
    }
    return v.f;
}

/* Internal knob for benchmarks: with the AVX512BF16 ISA and BF16 keys, round the
 * query to a single bf16 (1) instead of the hi+lo split (2). Call right after
 * msa_idx_scorer_create, before any run. Returns MSA_EINVAL when the scorer does
 * not use vdpbf16ps. */
int msa__scorer_set_bf16_terms(msa_idx_scorer_t *s, int terms);

#endif
