/* ref_util.h — helpers of the kernel tests, header-only: a seeded xorshift
 * generator, and dtype codecs (double in, stored bits out) written
 * independently of storage/tensor.c so the tests compare against a second
 * implementation (finite inputs in the normal range, |x| in [2^-14, 65504]
 * for F16, or zero). */
#ifndef MSA_TEST_REF_UTIL_H
#define MSA_TEST_REF_UTIL_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;

static inline uint64_t rnd(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return g_rng;
}

/* Uniform in [-1, 1). */
static inline double urand(void)
{
    return (double)(rnd() >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

/* Deliberately NOT msa_f32_to_bf16: the tests compare the production code
 * against this second copy, so it must not call what it checks. */
static inline uint16_t to_bf16(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    u += 0x7fffu + ((u >> 16) & 1u); /* finite inputs only */
    return (uint16_t)(u >> 16);
}

static inline double from_bf16(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Half via frexp/ldexp. */
static inline uint16_t to_f16(float x)
{
    if (x == 0.0f) return 0;
    uint16_t sign = x < 0 ? 0x8000 : 0;
    int e;
    double m = frexp(fabs((double)x), &e); /* x = m * 2^e, m in [0.5, 1) */
    double man = nearbyint((m * 2.0 - 1.0) * 1024.0);
    e -= 1;
    if (man >= 1024.0) {
        man = 0;
        e++;
    }
    if (e < -14) return sign; /* flush: the tests keep values above this */
    return (uint16_t)(sign | (uint16_t)((e + 15) << 10) | (uint16_t)man);
}

static inline double from_f16(uint16_t h)
{
    int e = (h >> 10) & 0x1f;
    double m = h & 0x3ff;
    double v = e == 0 ? ldexp(m, -24) : ldexp(1.0 + m / 1024.0, e - 15);
    return (h & 0x8000) ? -v : v;
}

#endif
