/* arena.c — first-fit offset allocator; see arena.h. */
#include "arena.h"

#include "msa_err.h"
#include "msa_log.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

typedef struct range {
    uint64_t off, len;
} range_t;

struct msa_gpu_arena {
    uint64_t size, used;
    range_t *free; /* sorted by off, never adjacent */
    size_t n_free, cap_free;
};

static uint64_t round_up(uint64_t n)
{
    return (n + MSA_GPU_ARENA_ALIGN - 1) / MSA_GPU_ARENA_ALIGN * MSA_GPU_ARENA_ALIGN;
}

int msa_gpu_arena_create(uint64_t bytes, msa_gpu_arena_t **out)
{
    msa_gpu_arena_t *a = calloc(1, sizeof *a);
    if (!a) return MSA_ENOMEM;
    a->size = bytes / MSA_GPU_ARENA_ALIGN * MSA_GPU_ARENA_ALIGN;
    a->cap_free = 64;
    a->free = malloc(a->cap_free * sizeof *a->free);
    if (!a->free) {
        free(a);
        return MSA_ENOMEM;
    }
    if (a->size) a->free[a->n_free++] = (range_t){0, a->size};
    *out = a;
    return MSA_OK;
}

void msa_gpu_arena_destroy(msa_gpu_arena_t *a)
{
    if (!a) return;
    free(a->free);
    free(a);
}

uint64_t msa_gpu_arena_alloc(msa_gpu_arena_t *a, uint64_t n)
{
    n = round_up(n ? n : 1);
    for (size_t i = 0; i < a->n_free; i++) {
        range_t *r = &a->free[i];
        if (r->len < n) continue;
        uint64_t off = r->off;
        r->off += n;
        r->len -= n;
        if (r->len == 0) {
            memmove(r, r + 1, (a->n_free - i - 1) * sizeof *r);
            a->n_free--;
        }
        a->used += n;
        return off;
    }
    return MSA_GPU_ARENA_NONE;
}

void msa_gpu_arena_free(msa_gpu_arena_t *a, uint64_t off, uint64_t n)
{
    n = round_up(n ? n : 1);
    size_t i = 0;
    while (i < a->n_free && a->free[i].off < off) i++;
    bool merge_prev = i > 0 && a->free[i - 1].off + a->free[i - 1].len == off;
    bool merge_next = i < a->n_free && off + n == a->free[i].off;
    a->used -= n;
    if (merge_prev && merge_next) {
        a->free[i - 1].len += n + a->free[i].len;
        memmove(&a->free[i], &a->free[i + 1], (a->n_free - i - 1) * sizeof(range_t));
        a->n_free--;
    } else if (merge_prev) {
        a->free[i - 1].len += n;
    } else if (merge_next) {
        a->free[i].off = off;
        a->free[i].len += n;
    } else {
        if (a->n_free == a->cap_free) {
            range_t *g = realloc(a->free, 2 * a->cap_free * sizeof *g);
            /* Losing track of a free range only leaks arena space; never crash. */
            if (!g) {
                msa_log(MSA_LOG_ERROR, "gpu arena: out of host memory; %llu bytes leaked",
                        (unsigned long long)n);
                return;
            }
            a->free = g;
            a->cap_free *= 2;
        }
        memmove(&a->free[i + 1], &a->free[i], (a->n_free - i) * sizeof(range_t));
        a->free[i] = (range_t){off, n};
        a->n_free++;
    }
}

uint64_t msa_gpu_arena_used(const msa_gpu_arena_t *a)
{
    return a->used;
}
uint64_t msa_gpu_arena_size(const msa_gpu_arena_t *a)
{
    return a->size;
}
