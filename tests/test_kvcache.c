/* test_kvcache.c — the K/V block cache (gpu/kvcache.c) on the CPU: hits and
 * misses, LRU order, eviction, pinning (a pinned block is never evicted; EFULL
 * when only pinned blocks remain), abandoned fills, racing fills of one key,
 * collection invalidation, many keys (hash map growth), arena reuse after
 * fragmentation, and a multithreaded hammer.
 *
 * Single-threaded cases use a fake device base (0x10000) and check addresses
 * only. The hammer uses a real host buffer as the "device" region so that it
 * can also fill every block with a pattern derived from its key and verify the
 * pattern on every hit: a block handed out twice, or evicted while pinned,
 * shows up as corrupted content. An independent interval list of the blocks
 * the threads currently pin checks bounds and non-overlap.
 */
/* Checks run in worker threads: a failed one is counted and the case goes on. */
#define MSA_TEST_KEEP_GOING
#include "harness.h"
#include "kvcache.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FAKE_BASE ((uintptr_t)0x10000)
#define SLOT 256 /* smallest block side: one arena alignment unit */

static msa_gpu_kvkey_t key(uint32_t coll, uint64_t doc, uint64_t version, uint32_t layer)
{
    msa_gpu_kvkey_t k = {.doc = doc, .version = version, .coll = coll, .layer = layer};
    return k;
}

static msa_gpu_kvcache_stats_t stats(msa_gpu_kvcache_t *c)
{
    msa_gpu_kvcache_stats_t s;
    msa_gpu_kvcache_stats(c, &s);
    return s;
}

/* Inserts key with side bytes per side, publishes it and releases it. */
static void put(msa_gpu_kvcache_t *c, msa_gpu_kvkey_t k, uint64_t side)
{
    msa_gpu_kvblock_t *b = NULL;
    int rc = msa_gpu_kvcache_insert(c, &k, 1, side, &b);
    CHECK_MSG(rc == MSA_OK && b, "insert doc %llu: %s", (unsigned long long)k.doc, msa_errname(rc));
    if (!b) return;
    CHECK(msa_gpu_kvcache_ready(c, b));
    msa_gpu_kvcache_release(c, b);
}

/* True when key is cached (the lookup's pin is released again). */
static bool has(msa_gpu_kvcache_t *c, msa_gpu_kvkey_t k)
{
    msa_gpu_kvblock_t *b = NULL;
    if (msa_gpu_kvcache_lookup(c, &k, &b) != MSA_OK) return false;
    msa_gpu_kvcache_release(c, b);
    return true;
}

TEST(hit_miss_and_addresses)
{
    msa_gpu_kvcache_t *c;
    CHECK_OK(msa_gpu_kvcache_create((void *)FAKE_BASE, 1 << 20, &c));
    msa_gpu_kvkey_t k = key(1, 42, 7, 3);
    msa_gpu_kvblock_t *b = NULL, *b2 = NULL;
    CHECK_RC(msa_gpu_kvcache_lookup(c, &k, &b), MSA_ENOTFOUND);
    CHECK(b == NULL);
    CHECK_RC(msa_gpu_kvcache_insert(c, &k, 5, 0, &b), MSA_EINVAL);

    CHECK_OK(msa_gpu_kvcache_insert(c, &k, 5, 1000, &b));
    uintptr_t kd = (uintptr_t)msa_gpu_kvblock_k(b), vd = (uintptr_t)msa_gpu_kvblock_v(b);
    CHECK(kd >= FAKE_BASE && vd + 1000 <= FAKE_BASE + (1 << 20));
    CHECK_EQ_U(kd % 256, 0);
    CHECK_EQ_U(vd - kd, 1024); /* V starts at the next 256-byte boundary after K */
    CHECK_EQ_U(msa_gpu_kvblock_nrows(b), 5);
    CHECK_EQ_U(msa_gpu_kvblock_bytes_per_side(b), 1000);
    CHECK_EQ_U(msa_gpu_kvblock_key(b)->doc, 42);
    CHECK_EQ_U(msa_gpu_kvblock_key(b)->version, 7);

    /* Not visible until ready. */
    CHECK_RC(msa_gpu_kvcache_lookup(c, &k, &b2), MSA_ENOTFOUND);
    CHECK(msa_gpu_kvcache_ready(c, b));
    CHECK(msa_gpu_kvcache_ready(c, b)); /* idempotent */
    CHECK_OK(msa_gpu_kvcache_lookup(c, &k, &b2));
    CHECK(b2 == b);
    msa_gpu_kvcache_release(c, b2);
    msa_gpu_kvcache_release(c, b);
    msa_gpu_kvcache_release(c, NULL);

    /* Every other field of the key makes a different key. */
    CHECK(has(c, k));
    CHECK(!has(c, key(2, 42, 7, 3)));
    CHECK(!has(c, key(1, 43, 7, 3)));
    CHECK(!has(c, key(1, 42, 8, 3))); /* an updated document never hits the old block */
    CHECK(!has(c, key(1, 42, 7, 4)));

    msa_gpu_kvcache_stats_t s = stats(c);
    CHECK_EQ_U(s.hits, 2);
    CHECK_EQ_U(s.misses, 6);
    CHECK_EQ_U(s.evictions, 0);
    CHECK_EQ_U(s.blocks, 1);
    CHECK_EQ_U(s.bytes_used, 2048);
    CHECK_EQ_U(s.bytes_total, 1 << 20);
    msa_gpu_kvcache_destroy(c);
    msa_gpu_kvcache_destroy(NULL);
}

TEST(lru_order_and_eviction)
{
    /* Room for exactly 8 blocks of one slot per side. */
    const unsigned N = 8;
    msa_gpu_kvcache_t *c;
    CHECK_OK(msa_gpu_kvcache_create((void *)FAKE_BASE, N * 2 * SLOT, &c));
    for (unsigned i = 0; i < N; i++) put(c, key(1, i, 1, 0), SLOT);
    CHECK_EQ_U(stats(c).evictions, 0);

    /* Touch doc 0: doc 1 becomes the least recently used. */
    CHECK(has(c, key(1, 0, 1, 0)));
    put(c, key(1, 100, 1, 0), SLOT);
    CHECK_EQ_U(stats(c).evictions, 1);
    CHECK(!has(c, key(1, 1, 1, 0)));
    CHECK(has(c, key(1, 0, 1, 0)));

    /* Next victims in order: 2, 3, ... (0 and 100 were used since). */
    put(c, key(1, 101, 1, 0), SLOT);
    CHECK(!has(c, key(1, 2, 1, 0)));
    CHECK(has(c, key(1, 3, 1, 0))); /* 3 is now recent; 4 is next */
    put(c, key(1, 102, 1, 0), SLOT);
    CHECK(!has(c, key(1, 4, 1, 0)));
    CHECK(has(c, key(1, 3, 1, 0)));

    /* A block of 3 slots per side evicts as many LRU blocks as it takes. */
    /* (Possibly more than 3: first fit needs 6 adjacent free slots.) */
    uint64_t ev = stats(c).evictions;
    put(c, key(1, 200, 1, 0), 3 * SLOT);
    msa_gpu_kvcache_stats_t s = stats(c);
    CHECK(s.evictions >= ev + 3);
    CHECK_EQ_U(s.blocks, N + 1 - (s.evictions - ev));
    CHECK(has(c, key(1, 200, 1, 0)));

    /* Larger than the whole cache: EFULL, nothing evicted. */
    msa_gpu_kvblock_t *b = NULL;
    msa_gpu_kvkey_t big = key(1, 300, 1, 0);
    ev = stats(c).evictions;
    CHECK_RC(msa_gpu_kvcache_insert(c, &big, 1, N * SLOT + 1, &b), MSA_EFULL);
    CHECK(b == NULL);
    CHECK_RC(msa_gpu_kvcache_insert(c, &big, 1, UINT64_MAX, &b), MSA_EFULL);
    CHECK_EQ_U(stats(c).evictions, ev);
    CHECK(has(c, key(1, 200, 1, 0)));
    /* Exactly the whole cache fits (evicting the rest). */
    put(c, big = key(1, 301, 1, 0), N * SLOT);
    CHECK_EQ_U(stats(c).blocks, 1);
    CHECK_EQ_U(stats(c).bytes_used, N * 2 * SLOT);
    msa_gpu_kvcache_destroy(c);
}

TEST(pinned_blocks_are_never_evicted)
{
    const unsigned N = 8;
    msa_gpu_kvcache_t *c;
    CHECK_OK(msa_gpu_kvcache_create((void *)FAKE_BASE, N * 2 * SLOT, &c));
    msa_gpu_kvblock_t *pin[8], *b = NULL;

    /* All pinned by their inserts (published or not): no room, no eviction. */
    for (unsigned i = 0; i < N; i++) {
        msa_gpu_kvkey_t k = key(1, i, 1, 0);
        CHECK_OK(msa_gpu_kvcache_insert(c, &k, 1, SLOT, &pin[i]));
        if (i % 2) CHECK(msa_gpu_kvcache_ready(c, pin[i]));
    }
    msa_gpu_kvkey_t k9 = key(1, 9, 1, 0);
    CHECK_RC(msa_gpu_kvcache_insert(c, &k9, 1, SLOT, &b), MSA_EFULL);
    CHECK_EQ_U(stats(c).evictions, 0);

    /* Releasing one (published) makes room by evicting exactly that one. */
    msa_gpu_kvcache_release(c, pin[3]);
    CHECK_OK(msa_gpu_kvcache_insert(c, &k9, 1, SLOT, &b));
    CHECK_EQ_U(stats(c).evictions, 1);
    CHECK(!has(c, key(1, 3, 1, 0)));
    for (unsigned i = 1; i < N; i += 2)
        if (i != 3) CHECK(has(c, key(1, i, 1, 0)));
    msa_gpu_kvcache_release(c, b); /* never readied: freed */
    for (unsigned i = 0; i < N; i++)
        if (i != 3) msa_gpu_kvcache_release(c, pin[i]);
    CHECK_EQ_U(stats(c).blocks, N / 2 - 1); /* the published odd ones but 3 */

    /* Pins taken by lookups protect as well. */
    for (unsigned i = 0; i < N; i++)
        if (!has(c, key(1, i, 1, 0))) put(c, key(1, i, 1, 0), SLOT);
    for (unsigned i = 0; i < N; i++) {
        msa_gpu_kvkey_t k = key(1, i, 1, 0);
        CHECK_OK(msa_gpu_kvcache_lookup(c, &k, &pin[i]));
    }
    uint64_t ev = stats(c).evictions;
    CHECK_RC(msa_gpu_kvcache_insert(c, &k9, 1, SLOT, &b), MSA_EFULL);
    CHECK_EQ_U(stats(c).evictions, ev);

    /* Fragmentation: pinned blocks at even slots leave only 1-slot holes; a
     * 2-slot block cannot fit even after every unpinned block is evicted. */
    for (unsigned i = 1; i < N; i += 2) msa_gpu_kvcache_release(c, pin[i]);
    msa_gpu_kvkey_t k10 = key(1, 10, 1, 0);
    CHECK_RC(msa_gpu_kvcache_insert(c, &k10, 1, 2 * SLOT, &b), MSA_EFULL);
    for (unsigned i = 0; i < N; i += 2) CHECK(has(c, key(1, i, 1, 0)));
    /* ...while a one-slot block fits in a hole. */
    CHECK_OK(msa_gpu_kvcache_insert(c, &k10, 1, SLOT, &b));
    msa_gpu_kvcache_release(c, b);
    for (unsigned i = 0; i < N; i += 2) msa_gpu_kvcache_release(c, pin[i]);
    msa_gpu_kvcache_destroy(c);
}

TEST(abandon_and_racing_fills)
{
    msa_gpu_kvcache_t *c;
    CHECK_OK(msa_gpu_kvcache_create((void *)FAKE_BASE, 1 << 16, &c));
    msa_gpu_kvkey_t k = key(1, 5, 1, 0);
    msa_gpu_kvblock_t *a = NULL, *b = NULL, *h = NULL;

    /* A fill that failed is released without ready: gone, space returned. */
    CHECK_OK(msa_gpu_kvcache_insert(c, &k, 1, 100, &a));
    msa_gpu_kvcache_release(c, a);
    CHECK_EQ_U(stats(c).blocks, 0);
    CHECK_EQ_U(stats(c).bytes_used, 0);
    CHECK(!has(c, k));

    /* Two threads miss and fill the same key: the first ready wins. */
    CHECK_OK(msa_gpu_kvcache_insert(c, &k, 1, 100, &a));
    CHECK_OK(msa_gpu_kvcache_insert(c, &k, 1, 100, &b));
    CHECK(msa_gpu_kvblock_k(a) != msa_gpu_kvblock_k(b));
    CHECK(msa_gpu_kvcache_ready(c, b));
    CHECK(!msa_gpu_kvcache_ready(c, a));
    CHECK_OK(msa_gpu_kvcache_lookup(c, &k, &h));
    CHECK(h == b);
    msa_gpu_kvcache_release(c, h);
    CHECK_EQ_U(stats(c).blocks, 2); /* a is still pinned and usable */
    msa_gpu_kvcache_release(c, a);
    msa_gpu_kvcache_release(c, b);
    CHECK_EQ_U(stats(c).blocks, 1);
    CHECK_EQ_U(stats(c).bytes_used, 512);
    CHECK(has(c, k));
    msa_gpu_kvcache_destroy(c);
}

TEST(invalidate_collection)
{
    msa_gpu_kvcache_t *c;
    CHECK_OK(msa_gpu_kvcache_create((void *)FAKE_BASE, 1 << 20, &c));
    for (uint64_t d = 0; d < 10; d++) {
        put(c, key(1, d, 1, 0), SLOT);
        put(c, key(2, d, 1, 0), SLOT);
    }
    msa_gpu_kvkey_t k3 = key(1, 3, 1, 0), k50 = key(1, 50, 1, 0);
    msa_gpu_kvblock_t *held = NULL, *filling = NULL;
    CHECK_OK(msa_gpu_kvcache_lookup(c, &k3, &held));              /* pinned and published */
    CHECK_OK(msa_gpu_kvcache_insert(c, &k50, 1, SLOT, &filling)); /* pinned, being filled */

    CHECK_EQ_U(msa_gpu_kvcache_invalidate_coll(c, 1), 11);
    CHECK_EQ_U(msa_gpu_kvcache_invalidate_coll(c, 1), 0);
    for (uint64_t d = 0; d < 10; d++) {
        CHECK(!has(c, key(1, d, 1, 0)));
        CHECK(has(c, key(2, d, 1, 0)));
    }
    /* The pinned blocks stay valid until released, then go. */
    CHECK_EQ_U(stats(c).blocks, 12);
    CHECK(!msa_gpu_kvcache_ready(c, filling));
    CHECK(!has(c, k50));
    msa_gpu_kvcache_release(c, filling);
    msa_gpu_kvcache_release(c, held);
    CHECK_EQ_U(stats(c).blocks, 10);
    CHECK_EQ_U(stats(c).bytes_used, 10 * 2 * SLOT);
    CHECK_EQ_U(msa_gpu_kvcache_invalidate_coll(c, 2), 10);
    CHECK_EQ_U(stats(c).blocks, 0);
    CHECK_EQ_U(stats(c).bytes_used, 0);
    msa_gpu_kvcache_destroy(c);
}

TEST(many_keys)
{
    /* 20000 keys that differ in one field at a time (the hash must mix them
     * all) in a cache large enough for all: every one hits, others miss. */
    const unsigned n = 20000;
    msa_gpu_kvcache_t *c;
    CHECK_OK(msa_gpu_kvcache_create((void *)FAKE_BASE, (uint64_t)n * 2 * SLOT, &c));
    for (unsigned i = 0; i < n; i++) put(c, key(i % 4, i / 16, (i / 4) % 2, (i / 8) % 2), SLOT);
    msa_gpu_kvcache_stats_t s = stats(c);
    CHECK_EQ_U(s.blocks, n);
    CHECK_EQ_U(s.evictions, 0);
    CHECK_EQ_U(s.bytes_used, s.bytes_total);
    unsigned hits = 0;
    for (unsigned i = 0; i < n; i++) {
        msa_gpu_kvkey_t k = key(i % 4, i / 16, (i / 4) % 2, (i / 8) % 2);
        msa_gpu_kvblock_t *b = NULL;
        if (msa_gpu_kvcache_lookup(c, &k, &b) != MSA_OK) continue;
        const msa_gpu_kvkey_t *bk = msa_gpu_kvblock_key(b);
        CHECK_MSG(bk->doc == k.doc && bk->version == k.version && bk->coll == k.coll &&
                      bk->layer == k.layer,
                  "key %u found a different block", i);
        msa_gpu_kvcache_release(c, b);
        hits++;
    }
    CHECK_EQ_U(hits, n);
    for (unsigned i = 0; i < 1000; i++) CHECK(!has(c, key(4 + i % 4, i, 0, 0)));
    CHECK(!has(c, key(0, n, 0, 0)));
    msa_gpu_kvcache_destroy(c);
}

/* xorshift64*: deterministic test randomness. */
static uint64_t rnd(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545f4914f6cdd1dULL;
}

TEST(fragmentation_and_reuse)
{
    /* Blocks of random sizes (1..16 slots per side) churn through a cache of
     * 64 KiB; when all are dropped the arena has coalesced back into one range
     * that takes a block of the whole cache. */
    const uint64_t bytes = 64 << 10;
    msa_gpu_kvcache_t *c;
    CHECK_OK(msa_gpu_kvcache_create((void *)FAKE_BASE, bytes, &c));
    uint64_t seed = 12345;
    /* At most 2 pinned blocks (16 KiB): the largest hole left is >= 16 KiB,
     * so every insert (at most 8 KiB) must succeed. */
    msa_gpu_kvblock_t *held[2] = {0};
    for (unsigned i = 0; i < 20000; i++) {
        uint64_t doc = rnd(&seed) % 300;
        uint64_t side = (1 + doc % 16) * SLOT - doc % 7; /* not always a multiple of 256 */
        msa_gpu_kvkey_t k = key(1 + (uint32_t)(doc % 3), doc, 1, 0);
        msa_gpu_kvblock_t *b = NULL;
        if (msa_gpu_kvcache_lookup(c, &k, &b) != MSA_OK) {
            int rc = msa_gpu_kvcache_insert(c, &k, 1, side, &b);
            CHECK_MSG(rc == MSA_OK, "insert %u: %s", i, msa_errname(rc));
            if (rc != MSA_OK) break;
            msa_gpu_kvcache_ready(c, b);
        }
        uintptr_t kd = (uintptr_t)msa_gpu_kvblock_k(b);
        CHECK(kd >= FAKE_BASE && (uintptr_t)msa_gpu_kvblock_v(b) + side <= FAKE_BASE + bytes);
        /* Keep a few pinned for a while, as concurrent requests would. */
        unsigned slot = (unsigned)(rnd(&seed) % 2);
        msa_gpu_kvcache_release(c, held[slot]);
        held[slot] = b;
    }
    for (unsigned s = 0; s < 2; s++) msa_gpu_kvcache_release(c, held[s]);
    msa_gpu_kvcache_stats_t st = stats(c);
    CHECK(st.evictions > 0);
    for (uint32_t coll = 1; coll <= 3; coll++) msa_gpu_kvcache_invalidate_coll(c, coll);
    st = stats(c);
    CHECK_EQ_U(st.blocks, 0);
    CHECK_EQ_U(st.bytes_used, 0);
    put(c, key(9, 1, 1, 0), bytes / 2);
    CHECK_EQ_U(stats(c).bytes_used, bytes);
    msa_gpu_kvcache_destroy(c);
}

/* ---- multithreaded hammer ------------------------------------------------------ */

#define HAMMER_THREADS 4
#define HAMMER_OPS 40000
#define HAMMER_KEYS 600
#define HAMMER_PINS 3
#define HAMMER_BYTES (256 << 10)

/* The blocks the threads pin right now, as address intervals: an independent
 * check that live blocks stay inside the region and never overlap. */
typedef struct interval {
    uintptr_t lo, hi;
    const msa_gpu_kvblock_t *b;
    unsigned pins;
} interval_t;

static struct {
    pthread_mutex_t mu;
    interval_t iv[HAMMER_THREADS * (HAMMER_PINS + 1)]; /* + the block just got */
    unsigned n;
    uintptr_t base;
    msa_gpu_kvcache_t *c;
    uint64_t lookups;
} ham = {.mu = PTHREAD_MUTEX_INITIALIZER};

static uint64_t side_of(uint64_t doc)
{
    return 100 + (doc * 131) % 3000;
}

static uint8_t pattern(const msa_gpu_kvkey_t *k, size_t i, int v)
{
    return (uint8_t)(k->doc * 7 + k->version * 3 + k->coll * 11 + i * (v ? 5 : 1));
}

static void iv_add(const msa_gpu_kvblock_t *b)
{
    uintptr_t lo = (uintptr_t)msa_gpu_kvblock_k(b);
    uintptr_t hi = (uintptr_t)msa_gpu_kvblock_v(b) + msa_gpu_kvblock_bytes_per_side(b);
    pthread_mutex_lock(&ham.mu);
    CHECK_MSG(lo >= ham.base && hi <= ham.base + HAMMER_BYTES, "block [%#lx, %#lx) outside",
              (unsigned long)lo, (unsigned long)hi);
    for (unsigned i = 0; i < ham.n; i++) {
        if (ham.iv[i].b == b) {
            ham.iv[i].pins++;
            pthread_mutex_unlock(&ham.mu);
            return;
        }
        CHECK_MSG(hi <= ham.iv[i].lo || lo >= ham.iv[i].hi,
                  "live blocks overlap: [%#lx, %#lx) and [%#lx, %#lx)", (unsigned long)lo,
                  (unsigned long)hi, (unsigned long)ham.iv[i].lo, (unsigned long)ham.iv[i].hi);
    }
    CHECK(ham.n < HAMMER_THREADS * (HAMMER_PINS + 1));
    if (ham.n < HAMMER_THREADS * (HAMMER_PINS + 1))
        ham.iv[ham.n++] = (interval_t){.lo = lo, .hi = hi, .b = b, .pins = 1};
    pthread_mutex_unlock(&ham.mu);
}

/* Must run BEFORE the cache release: after it the space may be reused. */
static void iv_del(const msa_gpu_kvblock_t *b)
{
    pthread_mutex_lock(&ham.mu);
    for (unsigned i = 0; i < ham.n; i++) {
        if (ham.iv[i].b != b) continue;
        if (--ham.iv[i].pins == 0) ham.iv[i] = ham.iv[--ham.n];
        break;
    }
    pthread_mutex_unlock(&ham.mu);
}

static void *hammer(void *arg)
{
    uint64_t seed = 0x9e3779b97f4a7c15ULL * (1 + (uintptr_t)arg);
    msa_gpu_kvblock_t *held[HAMMER_PINS] = {0};
    uint64_t lookups = 0;
    for (unsigned op = 0; op < HAMMER_OPS; op++) {
        uint64_t r = rnd(&seed);
        if (r % 5000 == 0) {
            msa_gpu_kvcache_invalidate_coll(ham.c, (uint32_t)(r / 5000 % 4));
            continue;
        }
        uint64_t doc = r % HAMMER_KEYS;
        msa_gpu_kvkey_t k = key((uint32_t)(doc % 4), doc, 1 + doc % 2, 0);
        uint64_t side = side_of(doc);
        msa_gpu_kvblock_t *b = NULL;
        lookups++;
        if (msa_gpu_kvcache_lookup(ham.c, &k, &b) == MSA_OK) {
            iv_add(b);
            CHECK(msa_gpu_kvblock_bytes_per_side(b) == side);
            const uint8_t *kp = msa_gpu_kvblock_k(b), *vp = msa_gpu_kvblock_v(b);
            for (size_t i = 0; i < side; i++) {
                if (kp[i] != pattern(&k, i, 0) || vp[i] != pattern(&k, i, 1)) {
                    FAILF("doc %llu: byte %zu corrupted", (unsigned long long)doc, i);
                    break;
                }
            }
        } else {
            int rc = msa_gpu_kvcache_insert(ham.c, &k, 1, side, &b);
            /* At most 16 pinned blocks of <= 6.5 KiB leave >= 150 KiB in <= 17
             * holes: the largest one always takes a new block. */
            CHECK_MSG(rc == MSA_OK, "insert: %s", msa_errname(rc));
            if (rc != MSA_OK) continue;
            iv_add(b);
            uint8_t *kp = msa_gpu_kvblock_k(b), *vp = msa_gpu_kvblock_v(b);
            for (size_t i = 0; i < side; i++) {
                kp[i] = pattern(&k, i, 0);
                vp[i] = pattern(&k, i, 1);
            }
            if (r % 17 == 0) { /* an abandoned fill now and then */
                iv_del(b);
                msa_gpu_kvcache_release(ham.c, b);
                continue;
            }
            msa_gpu_kvcache_ready(ham.c, b);
        }
        unsigned slot = (unsigned)(rnd(&seed) % HAMMER_PINS);
        if (held[slot]) {
            iv_del(held[slot]);
            msa_gpu_kvcache_release(ham.c, held[slot]);
        }
        held[slot] = b;
    }
    for (unsigned i = 0; i < HAMMER_PINS; i++) {
        if (!held[i]) continue;
        iv_del(held[i]);
        msa_gpu_kvcache_release(ham.c, held[i]);
    }
    __atomic_add_fetch(&ham.lookups, lookups, __ATOMIC_RELAXED);
    return NULL;
}

TEST(multithreaded_hammer)
{
    uint8_t *region = aligned_alloc(256, HAMMER_BYTES);
    CHECK(region != NULL);
    if (!region) return;
    ham.base = (uintptr_t)region;
    ham.n = 0;
    ham.lookups = 0;
    CHECK_OK(msa_gpu_kvcache_create(region, HAMMER_BYTES, &ham.c));
    pthread_t th[HAMMER_THREADS];
    for (uintptr_t i = 0; i < HAMMER_THREADS; i++)
        CHECK_EQ_I(pthread_create(&th[i], NULL, hammer, (void *)i), 0);
    for (unsigned i = 0; i < HAMMER_THREADS; i++) pthread_join(th[i], NULL);

    msa_gpu_kvcache_stats_t s = stats(ham.c);
    CHECK_EQ_U(ham.n, 0);
    CHECK_EQ_U(s.hits + s.misses, ham.lookups);
    CHECK(s.hits > 0 && s.misses > 0 && s.evictions > 0);
    CHECK(s.bytes_used <= s.bytes_total);
    /* Everything left is published and unpinned: dropping all collections
     * must return every byte. */
    for (uint32_t coll = 0; coll < 4; coll++) msa_gpu_kvcache_invalidate_coll(ham.c, coll);
    s = stats(ham.c);
    CHECK_EQ_U(s.blocks, 0);
    CHECK_EQ_U(s.bytes_used, 0);
    msa_gpu_kvcache_destroy(ham.c);
    free(region);
}

static const msa_test_t tests[] = {
    TEST_ENTRY(hit_miss_and_addresses),          TEST_ENTRY(lru_order_and_eviction),
    TEST_ENTRY(pinned_blocks_are_never_evicted), TEST_ENTRY(abandon_and_racing_fills),
    TEST_ENTRY(invalidate_collection),           TEST_ENTRY(many_keys),
    TEST_ENTRY(fragmentation_and_reuse),         TEST_ENTRY(multithreaded_hammer),
};

int main(int argc, char **argv)
{
    return msa_test_run(tests, sizeof tests / sizeof tests[0], argc, argv);
}
