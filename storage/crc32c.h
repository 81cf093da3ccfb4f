/* crc32c.h — CRC-32C (Castagnoli), the checksum of every value in the store.
 *
 * Owns two read-only tables built once on first use. Uses the SSE4.2 crc32
 * instruction (three interleaved streams) when the CPU has it, a portable
 * slicing-by-8 table otherwise. Safe from any thread.
 */
#ifndef MSA_CRC32C_H
#define MSA_CRC32C_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Extends crc (0 to start) over len bytes of buf, zlib style: pre- and
 * post-inverted, so msa_crc32c(msa_crc32c(0, a), b) is the CRC of a || b.
 * msa_crc32c(0, "123456789", 9) == 0xe3069283. buf may be NULL when len is 0. */
uint32_t msa_crc32c(uint32_t crc, const void *buf, size_t len);
/* The same computed by the portable table code only (tests, benchmarks). */
uint32_t msa_crc32c_sw(uint32_t crc, const void *buf, size_t len);
/* Whether msa_crc32c uses the SSE4.2 instruction on this CPU. */
bool msa_crc32c_hw(void);

#ifdef __cplusplus
}
#endif
#endif
