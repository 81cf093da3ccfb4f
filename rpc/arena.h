/* arena.h — a per-call bump allocator for the rpc layer.
 *
 * One arena lives exactly as long as one RPC: protobuf-c unpacks the request
 * into it, the handler builds the response message in it, and everything goes
 * at once when the call ends. Small allocations come from 64 KiB blocks; large
 * ones (tensor payloads) get a block of their own. Not thread-safe: an arena
 * belongs to one call, and a call is handled by one thread at a time.
 */
#ifndef MSA_RPC_ARENA_H
#define MSA_RPC_ARENA_H

#include <protobuf-c/protobuf-c.h>

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct msa_rpc_arena_block msa_rpc_arena_block_t;

typedef struct msa_rpc_arena {
    msa_rpc_arena_block_t *head; /* newest block first */
    size_t used;                 /* bytes used in head */
    size_t cap;                  /* bytes in head */
    size_t total;                /* bytes allocated over all blocks */
    ProtobufCAllocator pb;       /* protobuf-c allocator backed by this arena */
    bool oom;                    /* an allocation failed since init or reset */
} msa_rpc_arena_t;

/* Prepares an empty arena (no allocation yet). */
void msa_rpc_arena_init(msa_rpc_arena_t *a);
/* Frees every block; the arena is empty again and may be reused. */
void msa_rpc_arena_reset(msa_rpc_arena_t *a);
/* n bytes aligned to 16, or NULL when out of memory. Never freed singly. */
void *msa_rpc_arena_alloc(msa_rpc_arena_t *a, size_t n);
/* Zeroed n * size bytes, NULL on overflow or out of memory. */
void *msa_rpc_arena_calloc(msa_rpc_arena_t *a, size_t n, size_t size);
/* A NUL-terminated copy of len bytes at s. */
char *msa_rpc_arena_strndup(msa_rpc_arena_t *a, const void *s, size_t len);

#ifdef __cplusplus
}
#endif
#endif
