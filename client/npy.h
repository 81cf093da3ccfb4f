/* npy.h — read and write NumPy .npy files (format 1.0, 2.0 and 3.0 headers).
 *
 * Shared by msactl and the test tools: tensors cross the command line as .npy
 * files. Pure functions over caller buffers and files; safe from any thread.
 *
 * dtype mapping (numpy has no bfloat16):
 *   F32   <-> '<f4'
 *   F16   <-> '<f2'
 *   BF16  <-> '<u2'  the raw bf16 bit patterns as uint16 (numpy has no bf16;
 *                    to float32: (u.astype(np.uint32) << 16).view(np.float32);
 *                    from float32: round to nearest even on the top 16 bits,
 *                    see tests/oracle.py f32_to_bf16_bits)
 *   I8    <-> '|i1'
 *   MSA_CLI_NPY_U64 <-> '<u8'  id lists; reading also accepts '<i8' (numpy's
 *                    default integer) when no value is negative
 * Only little-endian ('<' or '|' for one byte), C order (fortran_order False),
 * 0..4 dimensions. Anything else is refused with a message naming the file.
 */
#ifndef MSA_CLI_NPY_H
#define MSA_CLI_NPY_H

#include "msa_err.h"
#include "tensor.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Not a tensor dtype: 64-bit unsigned integers (document id lists). */
#define MSA_CLI_NPY_U64 ((msa_dtype_t)64)

/* An array read from a file; owns data (malloc). */
typedef struct msa_cli_npy {
    msa_dtype_t dtype; /* F32, F16, BF16, I8 or MSA_CLI_NPY_U64 */
    uint32_t ndim;     /* 0..MSA_TENSOR_MAX_DIMS (0 = a scalar) */
    uint32_t shape[MSA_TENSOR_MAX_DIMS];
    void *data;    /* nbytes bytes, little-endian; owned */
    size_t nbytes; /* prod(shape) * element size */
} msa_cli_npy_t;

/* Element size of a dtype this codec knows (F32, F16, BF16, I8, U64), else 0. */
size_t msa_cli_npy_elem_size(msa_dtype_t dt);
/* The numpy descr for a dtype ("<f4", "<f2", "<u2", "|i1", "<u8"), or NULL. */
const char *msa_cli_npy_descr(msa_dtype_t dt);

/* Reads path into *out (zeroed first). Errors: MSA_EIO when the file cannot be
 * read, MSA_EINVAL when it is not an .npy this codec accepts; st->msg starts
 * with the path, e.g. "k.npy: dtype '>f4' is big-endian". *out is empty on error. */
int msa_cli_npy_read(const char *path, msa_cli_npy_t *out, msa_status_t *st);

/* Parses an in-memory .npy image; name is used in messages. data is copied. */
int msa_cli_npy_parse(const void *buf, size_t len, const char *name, msa_cli_npy_t *out,
                      msa_status_t *st);

/* Encodes an array as a version 1.0 .npy image (version 2.0 if the header
 * needs it) into *buf (malloc'd; free()). nbytes must equal prod(shape) *
 * element size, else MSA_EINVAL. */
int msa_cli_npy_encode(msa_dtype_t dt, uint32_t ndim, const uint32_t *shape, const void *data,
                       size_t nbytes, void **buf, size_t *len, msa_status_t *st);

/* Writes an array to path (created or truncated). MSA_EIO / MSA_EINVAL. */
int msa_cli_npy_write(const char *path, msa_dtype_t dt, uint32_t ndim, const uint32_t *shape,
                      const void *data, size_t nbytes, msa_status_t *st);

/* Writes a tensor view (its dtype, shape, data). */
int msa_cli_npy_write_tensor(const char *path, const msa_tensor_t *t, msa_status_t *st);

/* A borrowed tensor view of a: valid while a is. */
msa_tensor_t msa_cli_npy_tensor(const msa_cli_npy_t *a);

/* Number of elements, prod(shape) (1 for a scalar). */
size_t msa_cli_npy_count(const msa_cli_npy_t *a);

/* Frees a's data and zeroes it. NULL is a no-op. */
void msa_cli_npy_free(msa_cli_npy_t *a);

#ifdef __cplusplus
}
#endif
#endif
