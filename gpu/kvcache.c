/* kvcache.c — the K/V block cache in HBM; see kvcache.h.
 *
 * Every block is in exactly one of two intrusive doubly linked lists:
 *   lru   published and unpinned: evictable, most recently released at the
 *         head, the eviction victim at the tail;
 *   busy  pinned (published or not) — never evicted.
 * Published blocks are also in the hash map (chained, power-of-two buckets,
 * grown at load factor 1). A block that is pinned and not in the map is
 * either being filled (no ready yet) or dead (invalidated, or a duplicate of
 * an already published key); the last release frees it.
 *
 * Keeping pinned blocks out of the LRU list makes eviction O(1): the tail is
 * always a victim. A hit therefore "moves to MRU" at its last release, which
 * is also when the block becomes evictable again.
 */
#include "kvcache.h"

#include "arena.h"
#include "msa_log.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define INITIAL_BUCKETS 256

struct msa_gpu_kvblock {
    msa_gpu_kvkey_t kb_key;
    uint64_t kb_off;        /* arena offset of K; V follows at kb_off + kb_side_alloc */
    uint64_t kb_side;       /* bytes per side as asked */
    uint64_t kb_side_alloc; /* bytes per side rounded up to the arena alignment */
    uint64_t kb_hash;       /* hash of kb_key (cached for rehashing) */
    uintptr_t kb_k, kb_v;   /* device addresses of K and V */
    uint32_t kb_nrows;
    uint32_t kb_refs;                 /* pins; > 0 <=> in the busy list */
    bool kb_in_map;                   /* published (in the hash map) */
    bool kb_dead;                     /* never to be published; freed at the last release */
    struct msa_gpu_kvblock *kb_hnext; /* hash chain */
    struct msa_gpu_kvblock *kb_prev, *kb_next; /* lru or busy list */
};

typedef struct list {
    msa_gpu_kvblock_t *head, *tail;
} list_t;

struct msa_gpu_kvcache {
    pthread_mutex_t kc_mu;
    uintptr_t kc_base;         /* device address of offset 0 */
    msa_gpu_arena_t *kc_arena; /* offsets within the region */
    msa_gpu_kvblock_t **kc_buckets;
    size_t kc_nbuckets; /* power of two */
    size_t kc_nmap;     /* blocks in the map */
    list_t kc_lru, kc_busy;
    uint64_t kc_pinned_bytes;      /* arena bytes held by busy blocks */
    msa_gpu_kvcache_stats_t kc_st; /* hits, misses, evictions, blocks (bytes filled on read) */
};

/* ---- helpers -------------------------------------------------------------------- */

static uint64_t mix64(uint64_t x)
{
    /* splitmix64 finaliser: every input bit affects every output bit. */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static uint64_t key_hash(const msa_gpu_kvkey_t *k)
{
    uint64_t h = mix64(k->doc ^ 0x9e3779b97f4a7c15ULL);
    h = mix64(h ^ k->version);
    h = mix64(h ^ (((uint64_t)k->coll << 32) | k->layer));
    return h;
}

static bool key_eq(const msa_gpu_kvkey_t *a, const msa_gpu_kvkey_t *b)
{
    return a->doc == b->doc && a->version == b->version && a->coll == b->coll &&
           a->layer == b->layer;
}

static uint64_t block_bytes(const msa_gpu_kvblock_t *b)
{
    return 2 * b->kb_side_alloc;
}

static void list_push_head(list_t *l, msa_gpu_kvblock_t *b)
{
    b->kb_prev = NULL;
    b->kb_next = l->head;
    if (l->head)
        l->head->kb_prev = b;
    else
        l->tail = b;
    l->head = b;
}

static void list_remove(list_t *l, msa_gpu_kvblock_t *b)
{
    if (b->kb_prev)
        b->kb_prev->kb_next = b->kb_next;
    else
        l->head = b->kb_next;
    if (b->kb_next)
        b->kb_next->kb_prev = b->kb_prev;
    else
        l->tail = b->kb_prev;
    b->kb_prev = b->kb_next = NULL;
}

static msa_gpu_kvblock_t *map_find(const msa_gpu_kvcache_t *c, const msa_gpu_kvkey_t *key,
                                   uint64_t h)
{
    for (msa_gpu_kvblock_t *b = c->kc_buckets[h & (c->kc_nbuckets - 1)]; b; b = b->kb_hnext)
        if (b->kb_hash == h && key_eq(&b->kb_key, key)) return b;
    return NULL;
}

/* Doubles the bucket array. On allocation failure the map keeps working with
 * longer chains, so it is not an error. */
static void map_grow(msa_gpu_kvcache_t *c)
{
    size_t n = c->kc_nbuckets * 2;
    msa_gpu_kvblock_t **nb = calloc(n, sizeof *nb);
    if (!nb) return;
    for (size_t i = 0; i < c->kc_nbuckets; i++) {
        msa_gpu_kvblock_t *b = c->kc_buckets[i];
        while (b) {
            msa_gpu_kvblock_t *next = b->kb_hnext;
            size_t j = b->kb_hash & (n - 1);
            b->kb_hnext = nb[j];
            nb[j] = b;
            b = next;
        }
    }
    free(c->kc_buckets);
    c->kc_buckets = nb;
    c->kc_nbuckets = n;
}

static void map_insert(msa_gpu_kvcache_t *c, msa_gpu_kvblock_t *b)
{
    if (c->kc_nmap + 1 > c->kc_nbuckets) map_grow(c);
    size_t j = b->kb_hash & (c->kc_nbuckets - 1);
    b->kb_hnext = c->kc_buckets[j];
    c->kc_buckets[j] = b;
    b->kb_in_map = true;
    c->kc_nmap++;
}

static void map_remove(msa_gpu_kvcache_t *c, msa_gpu_kvblock_t *b)
{
    msa_gpu_kvblock_t **pp = &c->kc_buckets[b->kb_hash & (c->kc_nbuckets - 1)];
    while (*pp && *pp != b) pp = &(*pp)->kb_hnext;
    msa_assert(*pp == b);
    *pp = b->kb_hnext;
    b->kb_hnext = NULL;
    b->kb_in_map = false;
    c->kc_nmap--;
}

/* Returns b's space to the arena and frees it; b is in no list or map. */
static void block_free(msa_gpu_kvcache_t *c, msa_gpu_kvblock_t *b)
{
    msa_gpu_arena_free(c->kc_arena, b->kb_off, block_bytes(b));
    c->kc_st.blocks--;
    free(b);
}

/* ---- create / destroy ----------------------------------------------------------- */

int msa_gpu_kvcache_create(void *base_d, uint64_t bytes, msa_gpu_kvcache_t **out)
{
    *out = NULL;
    msa_gpu_kvcache_t *c = calloc(1, sizeof *c);
    if (!c) return MSA_ENOMEM;
    c->kc_base = (uintptr_t)base_d;
    c->kc_nbuckets = INITIAL_BUCKETS;
    c->kc_buckets = calloc(c->kc_nbuckets, sizeof *c->kc_buckets);
    if (!c->kc_buckets) goto fail;
    if (msa_gpu_arena_create(bytes, &c->kc_arena) != MSA_OK) goto fail;
    if (pthread_mutex_init(&c->kc_mu, NULL) != 0) goto fail;
    *out = c;
    return MSA_OK;
fail:
    msa_gpu_arena_destroy(c->kc_arena);
    free(c->kc_buckets);
    free(c);
    return MSA_ENOMEM;
}

void msa_gpu_kvcache_destroy(msa_gpu_kvcache_t *c)
{
    if (!c) return;
    if (c->kc_busy.head)
        msa_log(MSA_LOG_WARN, "gpu kvcache: destroyed with pinned blocks (not released)");
    list_t *lists[2] = {&c->kc_lru, &c->kc_busy};
    for (int i = 0; i < 2; i++) {
        msa_gpu_kvblock_t *b = lists[i]->head;
        while (b) {
            msa_gpu_kvblock_t *next = b->kb_next;
            free(b);
            b = next;
        }
    }
    msa_gpu_arena_destroy(c->kc_arena);
    free(c->kc_buckets);
    pthread_mutex_destroy(&c->kc_mu);
    free(c);
}

/* ---- lookup / insert / ready / release ------------------------------------------- */

int msa_gpu_kvcache_lookup(msa_gpu_kvcache_t *c, const msa_gpu_kvkey_t *key,
                           msa_gpu_kvblock_t **block_out)
{
    const uint64_t h = key_hash(key);
    pthread_mutex_lock(&c->kc_mu);
    msa_gpu_kvblock_t *b = map_find(c, key, h);
    if (!b) {
        c->kc_st.misses++;
        pthread_mutex_unlock(&c->kc_mu);
        *block_out = NULL;
        return MSA_ENOTFOUND;
    }
    if (b->kb_refs++ == 0) {
        /* First pin: no longer evictable. */
        list_remove(&c->kc_lru, b);
        list_push_head(&c->kc_busy, b);
        c->kc_pinned_bytes += block_bytes(b);
    }
    c->kc_st.hits++;
    pthread_mutex_unlock(&c->kc_mu);
    *block_out = b;
    return MSA_OK;
}

int msa_gpu_kvcache_insert(msa_gpu_kvcache_t *c, const msa_gpu_kvkey_t *key, uint32_t nrows,
                           uint64_t bytes_per_side, msa_gpu_kvblock_t **block_out)
{
    *block_out = NULL;
    if (bytes_per_side == 0) return MSA_EINVAL;
    /* Round each side so that V starts aligned too; refuse sizes whose
     * rounding or doubling would overflow (they cannot fit anyway). */
    if (bytes_per_side > UINT64_MAX / 4) return MSA_EFULL;
    const uint64_t side =
        (bytes_per_side + MSA_GPU_ARENA_ALIGN - 1) / MSA_GPU_ARENA_ALIGN * MSA_GPU_ARENA_ALIGN;
    const uint64_t need = 2 * side;

    msa_gpu_kvblock_t *b = calloc(1, sizeof *b);
    if (!b) return MSA_ENOMEM;
    b->kb_key = *key;
    b->kb_hash = key_hash(key);
    b->kb_side = bytes_per_side;
    b->kb_side_alloc = side;
    b->kb_nrows = nrows;

    pthread_mutex_lock(&c->kc_mu);
    /* Pinned blocks cannot move: when what they leave is too small, evicting
     * the others would only empty the cache for nothing. */
    const uint64_t total = msa_gpu_arena_size(c->kc_arena);
    if (need > total || need > total - c->kc_pinned_bytes) {
        pthread_mutex_unlock(&c->kc_mu);
        free(b);
        return MSA_EFULL;
    }
    uint64_t off;
    while ((off = msa_gpu_arena_alloc(c->kc_arena, need)) == MSA_GPU_ARENA_NONE) {
        msa_gpu_kvblock_t *victim = c->kc_lru.tail;
        if (!victim) {
            /* Only pinned blocks remain and they fragment the free space. */
            pthread_mutex_unlock(&c->kc_mu);
            free(b);
            return MSA_EFULL;
        }
        list_remove(&c->kc_lru, victim);
        map_remove(c, victim);
        block_free(c, victim);
        c->kc_st.evictions++;
    }
    b->kb_off = off;
    b->kb_k = c->kc_base + off;
    b->kb_v = c->kc_base + off + side;
    b->kb_refs = 1;
    list_push_head(&c->kc_busy, b);
    c->kc_pinned_bytes += need;
    c->kc_st.blocks++;
    pthread_mutex_unlock(&c->kc_mu);
    *block_out = b;
    return MSA_OK;
}

bool msa_gpu_kvcache_ready(msa_gpu_kvcache_t *c, msa_gpu_kvblock_t *b)
{
    pthread_mutex_lock(&c->kc_mu);
    bool published = b->kb_in_map;
    if (!published && !b->kb_dead) {
        if (map_find(c, &b->kb_key, b->kb_hash)) {
            /* A racing insert of the same key won; this copy stays private. */
            b->kb_dead = true;
        } else {
            map_insert(c, b);
            published = true;
        }
    }
    pthread_mutex_unlock(&c->kc_mu);
    return published;
}

void msa_gpu_kvcache_release(msa_gpu_kvcache_t *c, msa_gpu_kvblock_t *b)
{
    if (!b) return;
    pthread_mutex_lock(&c->kc_mu);
    msa_assert(b->kb_refs > 0);
    if (--b->kb_refs == 0) {
        list_remove(&c->kc_busy, b);
        c->kc_pinned_bytes -= block_bytes(b);
        if (b->kb_in_map)
            list_push_head(&c->kc_lru, b); /* most recently used */
        else
            block_free(c, b); /* abandoned or dead */
    }
    pthread_mutex_unlock(&c->kc_mu);
}

/* ---- invalidation and stats ----------------------------------------------------- */

uint64_t msa_gpu_kvcache_invalidate_coll(msa_gpu_kvcache_t *c, uint32_t coll_id)
{
    uint64_t n = 0;
    pthread_mutex_lock(&c->kc_mu);
    msa_gpu_kvblock_t *b = c->kc_lru.head;
    while (b) {
        msa_gpu_kvblock_t *next = b->kb_next;
        if (b->kb_key.coll == coll_id) {
            list_remove(&c->kc_lru, b);
            map_remove(c, b);
            block_free(c, b);
            n++;
        }
        b = next;
    }
    for (b = c->kc_busy.head; b; b = b->kb_next) {
        if (b->kb_key.coll != coll_id || b->kb_dead) continue;
        if (b->kb_in_map) map_remove(c, b);
        b->kb_dead = true; /* freed at its last release, never published */
        n++;
    }
    pthread_mutex_unlock(&c->kc_mu);
    return n;
}

void msa_gpu_kvcache_stats(msa_gpu_kvcache_t *c, msa_gpu_kvcache_stats_t *out)
{
    pthread_mutex_lock(&c->kc_mu);
    *out = c->kc_st;
    out->bytes_used = msa_gpu_arena_used(c->kc_arena);
    out->bytes_total = msa_gpu_arena_size(c->kc_arena);
    pthread_mutex_unlock(&c->kc_mu);
}

/* ---- block accessors (fields are immutable while the block is pinned) ----------- */

void *msa_gpu_kvblock_k(const msa_gpu_kvblock_t *b)
{
    return (void *)b->kb_k;
}
void *msa_gpu_kvblock_v(const msa_gpu_kvblock_t *b)
{
    return (void *)b->kb_v;
}
uint32_t msa_gpu_kvblock_nrows(const msa_gpu_kvblock_t *b)
{
    return b->kb_nrows;
}
uint64_t msa_gpu_kvblock_bytes_per_side(const msa_gpu_kvblock_t *b)
{
    return b->kb_side;
}
const msa_gpu_kvkey_t *msa_gpu_kvblock_key(const msa_gpu_kvblock_t *b)
{
    return &b->kb_key;
}
