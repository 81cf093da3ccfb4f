/* msa_alloc.h — the heap allocator of msad's own code, with fault injection.
 *
 * msa_malloc/calloc/realloc/strdup/strndup behave as their libc namesakes
 * (memory is released with free()); our code (storage/, index/, daemon/,
 * rpc/'s arena and replies) allocates through them so that a test can make
 * the Nth allocation fail and prove the failure becomes an error (MSA_ENOMEM
 * or a refusal), not a crash or a leak. LMDB, gRPC, OpenBLAS and CUDA allocate
 * on their own and are not covered; protobuf-c unpacks into rpc/'s arena,
 * whose blocks come from here.
 *
 * The injection is one process-wide countdown, off unless a test arms it (a
 * deliberate global: it is a test hook, like a debugger breakpoint, not
 * state of the engine). When off, each call costs one relaxed atomic load.
 * Thread-safe: any thread may allocate while a test arms or disarms it.
 */
#ifndef MSA_ALLOC_H
#define MSA_ALLOC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

void *msa_malloc(size_t n);
void *msa_calloc(size_t n, size_t size);
void *msa_realloc(void *p, size_t n);
char *msa_strdup(const char *s);
char *msa_strndup(const char *s, size_t n);

/* Test hook: arms the injector so that the nth msa_* allocation from now on
 * (counted over all threads, 1 = the next one) returns NULL; that one only,
 * the ones after it succeed again. n = 0 disarms it. Resets the counters. */
void msa_alloc_fail_nth(uint64_t n);
/* msa_* allocations since the last msa_alloc_fail_nth. */
uint64_t msa_alloc_count(void);
/* Whether the armed failure has happened since the last msa_alloc_fail_nth. */
bool msa_alloc_fired(void);

#ifdef __cplusplus
}
#endif
#endif
