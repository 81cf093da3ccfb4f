/* bench_floor.h — the physical floors every benchmark prints its figures
 * next to, measured in the same process: streaming read bandwidth, fp32 FMA
 * peak (AVX-512, 16 MAC per instruction) and vdpbf16ps peak (32 MAC per
 * instruction), over the threads of an msa_idx_pool (NULL = this thread).
 * Header-only: each bench is one translation unit.
 */
#ifndef MSA_BENCH_FLOOR_H
#define MSA_BENCH_FLOOR_H

#include "kernels.h"
#include "msa_clock.h"

#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

static inline double now_s(void)
{
    return (double)msa_clock_ns() * 1e-9;
}

static uint64_t g_rng __attribute__((unused)) = 88172645463325252ull;
static inline float frand(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((g_rng >> 40) * (1.0 / 16777216.0) * 2.0 - 1.0);
}

/* ---- floors: streaming read, FMA and vdpbf16ps peak -------------------------- */

typedef struct {
    const char *buf;
    size_t bytes;
    size_t ntasks;
    double sink[64];
} stream_t;

__attribute__((target("avx512f"))) static inline void stream_task(void *arg, size_t task,
                                                                  unsigned w)
{
    stream_t *s = arg;
    size_t per = s->bytes / s->ntasks / 256 * 256;
    const char *p = s->buf + task * per;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < per; i += 256) {
        a0 = _mm512_xor_si512(a0, _mm512_load_si512(p + i));
        a1 = _mm512_xor_si512(a1, _mm512_load_si512(p + i + 64));
        a2 = _mm512_xor_si512(a2, _mm512_load_si512(p + i + 128));
        a3 = _mm512_xor_si512(a3, _mm512_load_si512(p + i + 192));
    }
    a0 = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
    s->sink[task % 64] += (double)_mm512_reduce_add_epi64(a0);
}

/* Bytes per second reading buf with nthreads threads (best of 3). */
static inline double measure_bw(msa_idx_pool_t *pool, const void *buf, size_t bytes)
{
    stream_t s = {.buf = buf, .bytes = bytes, .ntasks = pool ? 64 : 1};
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = now_s();
        msa_idx_pool_run(pool, s.ntasks, stream_task, &s);
        double dt = now_s() - t0;
        size_t per = bytes / s.ntasks / 256 * 256;
        double bw = (double)per * s.ntasks / dt;
        best = bw > best ? bw : best;
    }
    return best;
}

typedef struct {
    long iters;
    int bf16;
    float sink[64];
} peak_t;

/* 16 independent accumulators, written out so that no compiler setting can
 * turn the loop into a memory-bound one; the asm barrier keeps them live. */
#define REP16(X) \
    X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
#define DECL(i) __m512 a##i = _mm512_set1_ps((float)i);
#define SUM(i) s = _mm512_add_ps(s, a##i);
#define BARRIER                                                                                   \
    __asm__ volatile(""                                                                           \
                     : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6),      \
                       "+v"(a7));                                                                 \
    __asm__ volatile(""                                                                           \
                     : "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11), "+v"(a12), "+v"(a13), "+v"(a14), \
                       "+v"(a15))

__attribute__((target("avx512f,fma"))) static inline float fma_loop(long iters)
{
    const __m512 x = _mm512_set1_ps(1.0000001f), y = _mm512_set1_ps(0.9999999f);
    REP16(DECL)
    for (long n = 0; n < iters; n++) {
#define STEP(i) a##i = _mm512_fmadd_ps(a##i, x, y);
        REP16(STEP)
#undef STEP
        BARRIER;
    }
    __m512 s = _mm512_setzero_ps();
    REP16(SUM)
    return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx512f,avx512bf16"))) static inline float dpbf16_loop(long iters)
{
    const __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = x;
    REP16(DECL)
    for (long n = 0; n < iters; n++) {
#define STEP(i) a##i = _mm512_dpbf16_ps(a##i, x, y);
        REP16(STEP)
#undef STEP
        BARRIER;
    }
    __m512 s = _mm512_setzero_ps();
    REP16(SUM)
    return _mm512_reduce_add_ps(s);
}

static inline void peak_task(void *arg, size_t task, unsigned w)
{
    peak_t *p = arg;
    p->sink[task % 64] += p->bf16 ? dpbf16_loop(p->iters) : fma_loop(p->iters);
}

/* MACs per second over all threads: fp32 FMA (16 per instruction) or
 * vdpbf16ps (32 per instruction). */
static inline double measure_peak(msa_idx_pool_t *pool, int bf16)
{
    const unsigned nthr = pool ? msa_idx_pool_size(pool) + 1 : 1;
    peak_t p = {.iters = 10000000, .bf16 = bf16};
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now_s();
        msa_idx_pool_run(pool, nthr, peak_task, &p);
        double dt = now_s() - t0;
        double macs = (double)p.iters * 16 * (bf16 ? 32 : 16) * nthr;
        best = macs / dt > best ? macs / dt : best;
    }
    return best;
}

#endif
