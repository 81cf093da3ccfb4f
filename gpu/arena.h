/* arena.h — an offset allocator over one region of device memory carved at
 * startup, so the request path never calls cudaMalloc: the routing-key
 * mirrors and the K/V block cache each own one arena and evict (LRU) when an
 * allocation does not fit.
 *
 * First fit over an address-ordered free list, 256-byte alignment, neighbours
 * coalesced on free. Not thread-safe: the owner serialises calls.
 */
#ifndef MSA_GPU_ARENA_H
#define MSA_GPU_ARENA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MSA_GPU_ARENA_ALIGN 256
#define MSA_GPU_ARENA_NONE UINT64_MAX

typedef struct msa_gpu_arena msa_gpu_arena_t;

/* Manages [0, bytes). MSA_ENOMEM when the bookkeeping cannot be allocated. */
int msa_gpu_arena_create(uint64_t bytes, msa_gpu_arena_t **out);
void msa_gpu_arena_destroy(msa_gpu_arena_t *a);
/* Offset of a free range of n bytes (rounded up to the alignment), or
 * MSA_GPU_ARENA_NONE when no free range is large enough. */
uint64_t msa_gpu_arena_alloc(msa_gpu_arena_t *a, uint64_t n);
/* Returns a range from msa_gpu_arena_alloc (same n). */
void msa_gpu_arena_free(msa_gpu_arena_t *a, uint64_t off, uint64_t n);
uint64_t msa_gpu_arena_used(const msa_gpu_arena_t *a);
uint64_t msa_gpu_arena_size(const msa_gpu_arena_t *a);

#ifdef __cplusplus
}
#endif
#endif
