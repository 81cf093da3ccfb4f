/* arena.c — per-call bump allocator (see arena.h). */
#include "arena.h"

#include "msa_alloc.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ARENA_BLOCK 65536u
#define ARENA_ALIGN 16u

struct msa_rpc_arena_block {
    msa_rpc_arena_block_t *next;
    size_t cap;
    _Alignas(16) unsigned char data[];
};

static void *pb_alloc(void *ctx, size_t n)
{
    return msa_rpc_arena_alloc(ctx, n);
}
/* Memory goes back when the call's arena is reset. */
static void pb_free(void *ctx, void *p) {}

void msa_rpc_arena_init(msa_rpc_arena_t *a)
{
    memset(a, 0, sizeof(*a));
    a->pb.alloc = pb_alloc;
    a->pb.free = pb_free;
    a->pb.allocator_data = a;
}

void msa_rpc_arena_reset(msa_rpc_arena_t *a)
{
    msa_rpc_arena_block_t *b = a->head;
    while (b) {
        msa_rpc_arena_block_t *next = b->next;
        free(b);
        b = next;
    }
    a->head = NULL;
    a->used = a->cap = a->total = 0;
    a->oom = false;
}

static msa_rpc_arena_block_t *block_new(size_t cap)
{
    if (cap > SIZE_MAX - sizeof(msa_rpc_arena_block_t)) return NULL;
    msa_rpc_arena_block_t *b = msa_malloc(sizeof(*b) + cap);
    if (b) b->cap = cap;
    return b;
}

void *msa_rpc_arena_alloc(msa_rpc_arena_t *a, size_t n)
{
    if (n == 0) n = 1;
    if (n > SIZE_MAX - ARENA_ALIGN) return NULL;
    size_t need = (n + ARENA_ALIGN - 1) & ~(size_t)(ARENA_ALIGN - 1);
    if (a->head && a->cap - a->used >= need) {
        void *p = a->head->data + a->used;
        a->used += need;
        return p;
    }
    if (need > ARENA_BLOCK / 4) {
        /* Large: a block of its own, linked behind the current head so that
         * the head keeps serving small allocations. */
        msa_rpc_arena_block_t *b = block_new(need);
        if (!b) {
            a->oom = true;
            return NULL;
        }
        a->total += need;
        if (a->head) {
            b->next = a->head->next;
            a->head->next = b;
        } else {
            b->next = NULL;
            a->head = b;
            a->used = a->cap = need;
        }
        return b->data;
    }
    msa_rpc_arena_block_t *b = block_new(ARENA_BLOCK);
    if (!b) {
        a->oom = true;
        return NULL;
    }
    a->total += ARENA_BLOCK;
    b->next = a->head;
    a->head = b;
    a->cap = ARENA_BLOCK;
    a->used = need;
    return b->data;
}

void *msa_rpc_arena_calloc(msa_rpc_arena_t *a, size_t n, size_t size)
{
    if (size && n > SIZE_MAX / size) return NULL;
    void *p = msa_rpc_arena_alloc(a, n * size);
    if (p) memset(p, 0, n * size);
    return p;
}

char *msa_rpc_arena_strndup(msa_rpc_arena_t *a, const void *s, size_t len)
{
    if (len == SIZE_MAX) return NULL;
    char *p = msa_rpc_arena_alloc(a, len + 1);
    if (!p) return NULL;
    if (len) memcpy(p, s, len);
    p[len] = '\0';
    return p;
}
