/* tensor.h — dtypes, conversions, pooling, quantisation and validation of tensors.
 *
 * Pure functions over caller-owned buffers; safe from any thread. Rounding to
 * F16/BF16 is round-to-nearest-even (NaN stays NaN). Validation messages name the
 * field path given by the caller, e.g. "ops[3].put.layers[2].k: shape [12,8,64],
 * want [12,8,128]", so the rpc layer can return them unchanged.
 */
#ifndef MSA_TENSOR_H
#define MSA_TENSOR_H

#include "msa_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Values match memory.proto's DType. */
typedef enum {
    MSA_DT_UNSPECIFIED = 0,
    MSA_DT_F32 = 1,
    MSA_DT_F16 = 2,
    MSA_DT_BF16 = 3,
    MSA_DT_I8 = 4,
} msa_dtype_t;

#define MSA_TENSOR_MAX_DIMS 4

/* A borrowed view of a dense, row-major, little-endian tensor. */
typedef struct msa_tensor {
    msa_dtype_t dtype;
    uint32_t ndim;
    uint32_t shape[MSA_TENSOR_MAX_DIMS];
    const void *data; /* nbytes bytes; not owned */
    size_t nbytes;
} msa_tensor_t;

/* Bytes per element: 4, 2, 2, 1; 0 for an unknown dtype. */
size_t msa_dtype_size(msa_dtype_t dt);
/* "F32", "F16", "BF16", "I8", "DTYPE_UNSPECIFIED" or "?". */
const char *msa_dtype_name(msa_dtype_t dt);

/* float32 -> bfloat16, round to nearest even; a NaN stays a (quiet) NaN and a
 * value above bf16's max becomes Inf. The one bf16 rounding of the project:
 * inline so the CPU kernels (index/), the GPU host code and the client library
 * (which links no tensor.c) all call it. */
static inline uint16_t msa_f32_to_bf16(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        /* NaN: keep sign and the top 7 payload bits, force the quiet bit so the
         * result cannot collapse to Inf. */
        return (uint16_t)((u >> 16) | 0x0040u);
    }
    /* Round to nearest even on bit 16; a carry into the exponent is correct
     * (it also turns values above bf16's max into Inf). */
    uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;
    return (uint16_t)(u >> 16);
}

/* bfloat16 -> float32 (exact). */
static inline float msa_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

uint16_t msa_f32_to_f16(float x);
float msa_f16_to_f32(uint16_t h);

/* Converts n elements of dtype dt (F32, F16 or BF16) at src to float32 at dst. */
void msa_tensor_to_f32(msa_dtype_t dt, const void *src, size_t n, float *dst);
/* Converts n float32 values to dt (F32, F16 or BF16), rounding to nearest even. */
void msa_tensor_from_f32(msa_dtype_t dt, const float *src, size_t n, void *dst);

/* Returns the index of the first NaN or Inf among n elements of dt, or -1. */
long msa_tensor_find_nonfinite(msa_dtype_t dt, const void *data, size_t n);

/* Mean-pools token rows into chunk rows (SEMANTICS "Pooling"): raw is [N][W]
 * float32 (W = H*D), out is [ceil(N/P)][W]; chunk c averages tokens
 * [c*P, min((c+1)*P, N)), accumulated in float32 as the contract says. */
void msa_tensor_pool(const float *raw, uint32_t N, uint32_t W, uint32_t P, float *out);

/* L2-normalises each of the n vectors of length d in place; zero stays zero. */
void msa_tensor_l2_normalize(float *x, size_t n, uint32_t d);

/* Symmetric int8 quantisation of one row of H heads of D values:
 * q[h*D+i] = round(x[h*D+i] / scale[h]), scale[h] = max|x[h,:]| / 127 (0 -> 0). */
void msa_tensor_quantize_i8(const float *x, uint32_t H, uint32_t D, int8_t *q, float *scale);

/* Checks a tensor against what the schema wants, in this order: dtype (want_dtype,
 * or any of F32/F16/BF16 when want_dtype is MSA_DT_UNSPECIFIED), rank, shape,
 * byte length, finiteness. want_shape[i] == 0 accepts any extent. On failure
 * returns MSA_EINVAL and sets st->msg to "<path>: <what>, want <what>". */
int msa_tensor_validate(const msa_tensor_t *t, msa_dtype_t want_dtype, uint32_t ndim,
                        const uint32_t *want_shape, const char *path, msa_status_t *st);

/* Formats a shape as "[a,b,c]" into buf (always NUL-terminated). */
void msa_tensor_shape_str(const uint32_t *shape, uint32_t ndim, char *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif
