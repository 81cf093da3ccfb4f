/* msa_alloc.c — libc allocation behind msa_alloc.h, plus the fault injector. */
#define _GNU_SOURCE /* strndup */

#include "msa_alloc.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* The test hook's state (see msa_alloc.h for why it is global). */
static _Atomic uint64_t g_fail_at; /* the allocation number that fails; 0 = off */
static _Atomic uint64_t g_count;   /* allocations since arming */
static atomic_bool g_fired;        /* g_fail_at was reached */

/* True when this allocation is the one the test asked to fail. */
static bool inject(void)
{
    uint64_t at = atomic_load_explicit(&g_fail_at, memory_order_relaxed);
    if (at == 0) return false;
    if (atomic_fetch_add(&g_count, 1) + 1 != at) return false;
    atomic_store(&g_fired, true);
    errno = ENOMEM;
    return true;
}

void *msa_malloc(size_t n)
{
    return inject() ? NULL : malloc(n);
}

void *msa_calloc(size_t n, size_t size)
{
    return inject() ? NULL : calloc(n, size);
}

void *msa_realloc(void *p, size_t n)
{
    return inject() ? NULL : realloc(p, n);
}

char *msa_strdup(const char *s)
{
    return inject() ? NULL : strdup(s);
}

char *msa_strndup(const char *s, size_t n)
{
    return inject() ? NULL : strndup(s, n);
}

void msa_alloc_fail_nth(uint64_t n)
{
    atomic_store(&g_fail_at, 0);
    atomic_store(&g_count, 0);
    atomic_store(&g_fired, false);
    atomic_store(&g_fail_at, n);
}

uint64_t msa_alloc_count(void)
{
    return atomic_load(&g_count);
}

bool msa_alloc_fired(void)
{
    return atomic_load(&g_fired);
}
