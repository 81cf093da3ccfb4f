/* msa_clock.h — the one monotonic clock of msad (header-only).
 *
 * Every deadline, timeout, lease, eviction grace and duration in the project
 * reads CLOCK_MONOTONIC through these, so they all share one time base (the
 * engine's deadline_ms values are msa_clock_ms()). Wall-clock time (log
 * stamps, document timestamps) is CLOCK_REALTIME and not here. Safe from any
 * thread; includable from C and CUDA host code.
 */
#ifndef MSA_CLOCK_H
#define MSA_CLOCK_H

#include <stdint.h>
#include <time.h>

/* Nanoseconds on CLOCK_MONOTONIC (arbitrary origin, never goes back). */
static inline int64_t msa_clock_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Milliseconds on CLOCK_MONOTONIC, rounded down. */
static inline int64_t msa_clock_ms(void)
{
    return msa_clock_ns() / 1000000;
}

#endif
