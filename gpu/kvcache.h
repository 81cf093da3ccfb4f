/* kvcache.h — the K/V block cache in HBM: one device region, carved at startup,
 * holds the memory K/V of recently attended documents so that a repeated Attend
 * over the same documents copies nothing from the host.
 *
 * A block is keyed by (collection, document, version, layer) and holds K and V
 * of one layer of one document version, [nrows][H][D] each in the stored
 * dtype. The version is the document's created commit seq: an updated document
 * never hits an old block, and the old block simply ages out of the LRU.
 *
 * Host logic only (an msa_gpu_arena_t of offsets over the region; no CUDA
 * call), so it runs in the CPU test suite. Thread-safe: one mutex; lookup,
 * insert, ready and release are O(1) amortised (hash map + LRU list), apart
 * from the evictions an insert needs. invalidate_coll is O(blocks).
 *
 * Life of a block:
 *   insert  -> allocated and pinned (refcount 1), invisible to lookups; the
 *              caller fills K/V at msa_gpu_kvblock_k/_v (async copies);
 *   ready   -> after the fill has completed, published to lookups;
 *   lookup  -> a hit pins it (refcount + 1);
 *   release -> unpins; an unpinned published block sits in the LRU list (most
 *              recently released first) and is evicted when space is needed.
 * A pinned block is never evicted or freed, so its device addresses stay valid
 * from insert/lookup until the matching release.
 */
#ifndef MSA_GPU_KVCACHE_H
#define MSA_GPU_KVCACHE_H

#include "msa_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct msa_gpu_kvcache msa_gpu_kvcache_t;
typedef struct msa_gpu_kvblock msa_gpu_kvblock_t;

typedef struct msa_gpu_kvkey {
    uint64_t doc;     /* document id */
    uint64_t version; /* created commit seq of the document version */
    uint32_t coll;    /* collection id */
    uint32_t layer;   /* model layer index */
} msa_gpu_kvkey_t;

typedef struct msa_gpu_kvcache_stats {
    uint64_t hits;        /* lookups that found a published block */
    uint64_t misses;      /* lookups that did not */
    uint64_t evictions;   /* blocks evicted to make room (LRU) */
    uint64_t blocks;      /* blocks holding cache space (any state) */
    uint64_t bytes_used;  /* bytes of the region allocated (rounded to 256) */
    uint64_t bytes_total; /* bytes of the region the cache manages */
} msa_gpu_kvcache_stats_t;

/* Creates a cache over the device region [base_d, base_d + bytes) (base_d
 * should be 256-byte aligned, as cudaMalloc returns; bytes is rounded down to
 * 256). The cache never dereferences base_d: it only hands out addresses in
 * it. Errors: MSA_ENOMEM (host bookkeeping); *out is NULL then. */
int msa_gpu_kvcache_create(void *base_d, uint64_t bytes, msa_gpu_kvcache_t **out);
/* Frees the bookkeeping of every block (pinned ones included: callers must
 * have released them; their addresses are invalid afterwards). NULL: no-op. */
void msa_gpu_kvcache_destroy(msa_gpu_kvcache_t *c);

/* Looks up a published block. MSA_OK: *block_out is pinned (release it once)
 * and counts as a hit. MSA_ENOTFOUND: a miss (*block_out = NULL); blocks still
 * being filled (no ready yet) are not found. */
int msa_gpu_kvcache_lookup(msa_gpu_kvcache_t *c, const msa_gpu_kvkey_t *key,
                           msa_gpu_kvblock_t **block_out);

/* Allocates a block for key with room for bytes_per_side bytes of K and as
 * many of V, evicting least recently used unpinned blocks until it fits.
 * MSA_OK: *block_out is pinned and not yet visible to lookups; fill it, then
 * call msa_gpu_kvcache_ready, and release it when done (releasing without
 * ready abandons it: it is freed). Errors (*block_out = NULL):
 *   MSA_EINVAL  bytes_per_side is 0;
 *   MSA_EFULL   it does not fit even with every unpinned block evicted (when
 *               the pinned blocks alone leave too few bytes, or it is larger
 *               than the whole cache, nothing is evicted; when only
 *               fragmentation between pinned blocks stops it, the unpinned
 *               blocks are gone by then);
 *   MSA_ENOMEM  host bookkeeping (nothing evicted). */
int msa_gpu_kvcache_insert(msa_gpu_kvcache_t *c, const msa_gpu_kvkey_t *key, uint32_t nrows,
                           uint64_t bytes_per_side, msa_gpu_kvblock_t **block_out);

/* Publishes a block from insert whose K/V copies have COMPLETED (e.g. after
 * msa_dev_lane_sync): later lookups of its key hit it. Returns false when it
 * was not published: another insert of the same key was published first, or
 * its collection was invalidated meanwhile. Either way the caller may keep
 * using the block until it releases it (then it is freed). Calling it on an
 * already published block returns true and changes nothing. */
bool msa_gpu_kvcache_ready(msa_gpu_kvcache_t *c, msa_gpu_kvblock_t *b);

/* Unpins a block from lookup or insert (once per pin). When the last pin goes,
 * a published block becomes the most recently used evictable block; an
 * unpublished or invalidated one is freed. b must not be used afterwards.
 * NULL: no-op. */
void msa_gpu_kvcache_release(msa_gpu_kvcache_t *c, msa_gpu_kvblock_t *b);

/* Drops every block of collection coll_id: unpinned ones are freed now,
 * pinned ones become unreachable to lookups and are freed at their last
 * release (blocks being filled are never published). Returns the number of
 * blocks dropped. */
uint64_t msa_gpu_kvcache_invalidate_coll(msa_gpu_kvcache_t *c, uint32_t coll_id);

void msa_gpu_kvcache_stats(msa_gpu_kvcache_t *c, msa_gpu_kvcache_stats_t *out);

/* Accessors of a pinned block (immutable while pinned; no lock taken). */
void *msa_gpu_kvblock_k(const msa_gpu_kvblock_t *b); /* device: K, bytes_per_side */
void *msa_gpu_kvblock_v(const msa_gpu_kvblock_t *b); /* device: V, bytes_per_side */
uint32_t msa_gpu_kvblock_nrows(const msa_gpu_kvblock_t *b);
uint64_t msa_gpu_kvblock_bytes_per_side(const msa_gpu_kvblock_t *b);
const msa_gpu_kvkey_t *msa_gpu_kvblock_key(const msa_gpu_kvblock_t *b);

#ifdef __cplusplus
}
#endif
#endif
