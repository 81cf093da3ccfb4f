/* harness.h — the one C test harness of tests/test_*.c (header-only).
 *
 * A test file writes small cases with TEST(name), lists them in one table of
 * TEST_ENTRY(name) and hands it to msa_test_run(), which runs them in order (or
 * only those named on the command line), prints one line per case and ends with
 * the plain line "N passed, N failed" that CI reads. Exit status: 0 all passed,
 * 1 any case failed, 77 (CTest's skip) none failed but some case skipped itself.
 *
 * Checks print the expression, both operands, file, line and running case to
 * stderr, then end the case (return). A file whose checks also run in helpers
 * that return a value, or in threads, defines MSA_TEST_KEEP_GOING before
 * including this: its failed checks are counted and the case carries on.
 * Counters are updated atomically, so checks may run on any thread of a case.
 *
 * Temp dirs: msa_test_tmpdir() makes a private directory for a test's files,
 * msa_test_rmtree() removes one (rm -rf), and msa_test_tmpdir_done() removes it
 * at the end unless the run failed or MSA_KEEP_TMP is set (then it says where
 * the files are).
 */
#ifndef MSA_TEST_HARNESS_H
#define MSA_TEST_HARNESS_H

#include "msa_err.h"

#include <dirent.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

typedef struct msa_test {
    const char *name;
    void (*fn)(void);
} msa_test_t;

#define TEST(name) static void test_##name(void)
/* Kept by hand: clang-format would split this initializer over four lines. */
/* clang-format off */
#define TEST_ENTRY(name) {#name, test_##name}
/* clang-format on */

static int msa_test_nfail;             /* checks failed so far, all cases */
static int msa_test_nchecks;           /* checks evaluated so far, all cases */
static const char *msa_test_name = ""; /* the running case */
static const char *msa_test_skip_why;  /* set by TEST_SKIP in the running case */

#ifdef MSA_TEST_KEEP_GOING
#define MSA_TEST_BAIL_ (void)0
#else
#define MSA_TEST_BAIL_ return
#endif

static inline void msa_test_vfail_(const char *file, int line, const char *head, const char *fmt,
                                   va_list ap)
{
    char msg[1024] = "";
    if (fmt) vsnprintf(msg, sizeof msg, fmt, ap);
    /* One fprintf per failure keeps lines from different threads apart. */
    fprintf(stderr, "%s:%d: [%s] %s%s%s\n", file, line, msa_test_name, head ? head : "",
            head && *msg ? ": " : "", msg);
    __atomic_add_fetch(&msa_test_nfail, 1, __ATOMIC_SEQ_CST);
}

/* Records a failure: "file:line: [case] <fmt...>". */
static inline __attribute__((format(printf, 3, 4))) void msa_test_fail_(const char *file, int line,
                                                                        const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    msa_test_vfail_(file, line, NULL, fmt, ap);
    va_end(ap);
}

/* Records a failure: "file:line: [case] <head>: <fmt...>". */
static inline __attribute__((format(printf, 4, 5))) void
msa_test_failm_(const char *file, int line, const char *head, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    msa_test_vfail_(file, line, head, fmt, ap);
    va_end(ap);
}

#define MSA_TEST_COUNT_() __atomic_add_fetch(&msa_test_nchecks, 1, __ATOMIC_RELAXED)

/* Fails with a printf message (and ends the case). */
#define FAILF(...)                                       \
    do {                                                 \
        msa_test_fail_(__FILE__, __LINE__, __VA_ARGS__); \
        MSA_TEST_BAIL_;                                  \
    } while (0)

#define CHECK(cond)                                    \
    do {                                               \
        MSA_TEST_COUNT_();                             \
        if (!(cond)) FAILF("CHECK(%s) failed", #cond); \
    } while (0)

/* CHECK with a printf message that says what the operands were. */
#define CHECK_MSG(cond, ...)                                                             \
    do {                                                                                 \
        MSA_TEST_COUNT_();                                                               \
        if (!(cond)) {                                                                   \
            msa_test_failm_(__FILE__, __LINE__, "CHECK(" #cond ") failed", __VA_ARGS__); \
            MSA_TEST_BAIL_;                                                              \
        }                                                                                \
    } while (0)

#define CHECK_EQ_U(a, b)                                                                      \
    do {                                                                                      \
        unsigned long long a_ = (unsigned long long)(a), b_ = (unsigned long long)(b);        \
        MSA_TEST_COUNT_();                                                                    \
        if (a_ != b_)                                                                         \
            FAILF("%s == %s failed: %llu (0x%llx) vs %llu (0x%llx)", #a, #b, a_, a_, b_, b_); \
    } while (0)

#define CHECK_EQ_I(a, b)                                                      \
    do {                                                                      \
        long long a_ = (long long)(a), b_ = (long long)(b);                   \
        MSA_TEST_COUNT_();                                                    \
        if (a_ != b_) FAILF("%s == %s failed: %lld vs %lld", #a, #b, a_, b_); \
    } while (0)

#define CHECK_STR(a, b)                                                              \
    do {                                                                             \
        const char *a_ = (a), *b_ = (b);                                             \
        MSA_TEST_COUNT_();                                                           \
        if (strcmp(a_, b_) != 0)                                                     \
            FAILF("%s == %s failed:\n  got  \"%s\"\n  want \"%s\"", #a, #b, a_, b_); \
    } while (0)

#define CHECK_STR_HAS(hay, needle)                                            \
    do {                                                                      \
        const char *h_ = (hay), *n_ = (needle);                               \
        MSA_TEST_COUNT_();                                                    \
        if (!strstr(h_, n_)) FAILF("\"%s\" does not contain \"%s\"", h_, n_); \
    } while (0)

/* |a - b| <= tol, or a == b (equal infinities); NaN never passes. */
#define CHECK_NEAR(a, b, tol) CHECK_NEAR_MSG(a, b, tol, "%s", "")

#define CHECK_NEAR_MSG(a, b, tol, ...)                                                             \
    do {                                                                                           \
        double a_ = (double)(a), b_ = (double)(b), t_ = (double)(tol);                             \
        MSA_TEST_COUNT_();                                                                         \
        if (!(fabs(a_ - b_) <= t_) && !(a_ == b_)) {                                               \
            char h_[256];                                                                          \
            snprintf(h_, sizeof h_, "|%s - %s| <= %.3g failed: %.9g vs %.9g", #a, #b, t_, a_, b_); \
            msa_test_failm_(__FILE__, __LINE__, h_, __VA_ARGS__);                                  \
            MSA_TEST_BAIL_;                                                                        \
        }                                                                                          \
    } while (0)

/* MSA_E* codes print by name: "got EFULL (-30005), want OK (0)". */
#define CHECK_RC(expr, want)                                                                    \
    do {                                                                                        \
        int r_ = (expr), w_ = (want);                                                           \
        MSA_TEST_COUNT_();                                                                      \
        if (r_ != w_)                                                                           \
            FAILF("%s: got %s (%d), want %s (%d)", #expr, msa_errname(r_), r_, msa_errname(w_), \
                  w_);                                                                          \
    } while (0)

#define CHECK_OK(expr) CHECK_RC(expr, MSA_OK)

/* Ends the running case as skipped (why: a string that outlives the case). */
#define TEST_SKIP(why)             \
    do {                           \
        msa_test_skip_why = (why); \
        return;                    \
    } while (0)

/* Runs tests[0..n) in order; with arguments, only the cases they name (an unknown
 * name is a usage error: exit 2). Returns the exit status described above. */
static inline int msa_test_run(const msa_test_t *tests, size_t n, int argc, char **argv)
{
    for (int a = 1; a < argc; a++) {
        size_t i = 0;
        while (i < n && strcmp(argv[a], tests[i].name) != 0) i++;
        if (i == n) {
            fprintf(stderr, "%s: no test named \"%s\"; the tests are:\n", argv[0], argv[a]);
            for (i = 0; i < n; i++) fprintf(stderr, "  %s\n", tests[i].name);
            return 2;
        }
    }
    int passed = 0, failed = 0, skipped = 0;
    for (size_t i = 0; i < n; i++) {
        bool pick = argc < 2;
        for (int a = 1; a < argc && !pick; a++) pick = strcmp(argv[a], tests[i].name) == 0;
        if (!pick) continue;
        msa_test_name = tests[i].name;
        msa_test_skip_why = NULL;
        int before = __atomic_load_n(&msa_test_nfail, __ATOMIC_SEQ_CST);
        tests[i].fn();
        fflush(stderr);
        if (__atomic_load_n(&msa_test_nfail, __ATOMIC_SEQ_CST) != before) {
            failed++;
            printf("FAIL %s\n", tests[i].name);
        } else if (msa_test_skip_why) {
            skipped++;
            printf("skip %s: %s\n", tests[i].name, msa_test_skip_why);
        } else {
            passed++;
            printf("ok   %s\n", tests[i].name);
        }
        fflush(stdout);
    }
    msa_test_name = "";
    if (skipped) printf("%d skipped\n", skipped);
    printf("%d passed, %d failed\n", passed, failed);
    fflush(stdout);
    return failed ? 1 : skipped ? 77 : 0;
}

/* ==== temp dirs ============================================================== */

/* Makes a fresh directory "$TMPDIR/msa-<tag>-XXXXXX" (TMPDIR default /tmp, mode
 * 0700) and writes its path to buf (cap bytes, PATH_MAX is plenty). Returns buf,
 * or NULL after printing why. */
static inline char *msa_test_tmpdir(char *buf, size_t cap, const char *tag)
{
    const char *root = getenv("TMPDIR");
    if (!root || !*root) root = "/tmp";
    int n = snprintf(buf, cap, "%s/msa-%s-XXXXXX", root, tag);
    if (n < 0 || (size_t)n >= cap) {
        fprintf(stderr, "temp dir path too long under %s\n", root);
        return NULL;
    }
    if (!mkdtemp(buf)) {
        perror(buf);
        return NULL;
    }
    return buf;
}

/* rm -rf path (symlinks removed, not followed); a missing path is fine. Plain
 * readdir recursion: nftw would need a feature macro defined before the first
 * system header of every including file. */
static inline void msa_test_rmtree(const char *path)
{
    struct stat sb;
    if (lstat(path, &sb) != 0) return;
    if (S_ISDIR(sb.st_mode)) {
        DIR *d = opendir(path);
        if (d) {
            struct dirent *e;
            while ((e = readdir(d))) {
                if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
                size_t n = strlen(path) + strlen(e->d_name) + 2;
                char *sub = malloc(n);
                if (!sub) break;
                snprintf(sub, n, "%s/%s", path, e->d_name);
                msa_test_rmtree(sub);
                free(sub);
            }
            closedir(d);
        }
    }
    remove(path);
}

/* Ends a temp dir with the run's exit status rc: removes it, or keeps it when
 * rc == 1 (a check failed) or MSA_KEEP_TMP is set, and prints where it is. */
static inline void msa_test_tmpdir_done(const char *path, int rc)
{
    if (rc == 1 || getenv("MSA_KEEP_TMP"))
        fprintf(stderr, "data left in %s\n", path);
    else
        msa_test_rmtree(path);
}

#endif
