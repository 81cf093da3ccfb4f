/* test_auth.c — unit test of rpc/auth.c: tokens file parsing, scope checks,
 * and that the bearer comparison is constant-time.
 *
 * Timing check: 64 configured tokens of 4096 bytes that share all but their
 * last byte. Wrong tokens that differ from them at the first byte, at the
 * last byte, or that are 1 byte long must take the same time (medians of
 * interleaved runs within 2x). An early-exit comparison (memcmp, strcmp)
 * makes the first-byte case ~10x faster and fails this by far.
 */
#define MSA_TEST_KEEP_GOING /* a failed check is counted and the case carries on */
#include "harness.h"

#include "auth.h"
#include "msa_clock.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static char tmpdir[PATH_MAX];

static const char *write_file(const char *name, const char *text)
{
    static char path[PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        exit(1);
    }
    fputs(text, f);
    fclose(f);
    return path;
}

static int check(const msa_rpc_auth_t *a, const char *hdr, msa_rpc_scope_t need, msa_status_t *st)
{
    return msa_rpc_auth_check(a, hdr, hdr ? strlen(hdr) : 0, need, st);
}

TEST(scopes)
{
    msa_status_t st;
    msa_rpc_auth_t *a = NULL;
    const char *p =
        write_file("tokens", "# comment\nrtok read\n\n  wtok\twrite  \natok admin # x\n");
    CHECK_MSG(msa_rpc_auth_load(p, &a, &st) == MSA_OK, "load: %s", st.msg);
    if (!a) return;
    CHECK_MSG(msa_rpc_auth_count(a) == 3, "count %zu", msa_rpc_auth_count(a));

    /* scope matrix */
    const char *hdr[] = {"Bearer rtok", "Bearer wtok", "Bearer atok"};
    for (int t = 0; t < 3; t++)
        for (int need = MSA_RPC_SCOPE_READ; need <= MSA_RPC_SCOPE_ADMIN; need++) {
            int rc = check(a, hdr[t], (msa_rpc_scope_t)need, &st);
            int want = (t + 1 >= need) ? MSA_OK : MSA_EPERM;
            CHECK_MSG(rc == want, "%s need %d: rc %d (%s)", hdr[t], need, rc, st.msg);
            if (rc) CHECK_MSG(!strstr(st.msg, hdr[t] + 7), "message repeats the token: %s", st.msg);
        }
    /* NONE needs nothing; no table means auth off */
    CHECK_MSG(check(a, NULL, MSA_RPC_SCOPE_NONE, &st) == MSA_OK, "none");
    CHECK_MSG(check(NULL, NULL, MSA_RPC_SCOPE_ADMIN, &st) == MSA_OK, "no table");
    /* scheme is case-insensitive (RFC 6750), surrounding blanks ignored */
    CHECK_MSG(check(a, "bearer rtok", MSA_RPC_SCOPE_READ, &st) == MSA_OK, "lower-case: %s", st.msg);
    CHECK_MSG(check(a, "Bearer  rtok ", MSA_RPC_SCOPE_READ, &st) == MSA_OK, "blanks: %s", st.msg);
    /* refusals */
    const char *bad[] = {
        NULL,         "",         "Bearer",     "Bearer ",      "Bearer   ",
        "Basic rtok", "rtok",     "Bearer rto", "Bearer rtokk", "Bearer Rtok",
        "Bearer r",   "Bearer x", "Bearerrtok", "Bearer atok2", "Bearer wtok atok"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = check(a, bad[i], MSA_RPC_SCOPE_READ, &st);
        CHECK_MSG(rc == MSA_EUNAUTH, "'%s': rc %d", bad[i] ? bad[i] : "(null)", rc);
    }
    /* an embedded NUL does not truncate the comparison */
    CHECK_MSG(msa_rpc_auth_check(a, "Bearer rtok\0x", 13, MSA_RPC_SCOPE_READ, &st) == MSA_EUNAUTH,
              "embedded NUL accepted");
    msa_rpc_auth_free(a);

    /* bad files */
    const char *files[] = {"",
                           "# only a comment\n",
                           "tok\n",
                           "tok superuser\n",
                           "tok read extra\n",
                           "tok read\ntok admin\n"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        a = NULL;
        p = write_file("bad", files[i]);
        CHECK_MSG(msa_rpc_auth_load(p, &a, &st) == MSA_EINVAL, "file %zu accepted", i);
        CHECK_MSG(a == NULL, "file %zu: table returned", i);
    }
    a = NULL;
    CHECK_MSG(msa_rpc_auth_load("/nonexistent/tokens", &a, &st) == MSA_EIO, "missing file");
}

static int cmp_i64(const void *x, const void *y)
{
    int64_t a = *(const int64_t *)x, b = *(const int64_t *)y;
    return a < b ? -1 : a > b;
}

#define NTOK 64
#define TLEN 4096
#define REPS 801

TEST(constant_time)
{
    /* 64 tokens of 4096 bytes: 'a' * 4095 + one distinct last byte. */
    size_t cap = (size_t)NTOK * (TLEN + 16) + 1;
    char *text = malloc(cap), *p = text;
    /* 'a' * 4095 + a last byte unique to each token */
    const char *lasts = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789bcdefghijklmnopqrstuvwxyz!#$%";
    for (int t = 0; t < NTOK; t++) {
        memset(p, 'a', TLEN - 1);
        p += TLEN - 1;
        p += sprintf(p, "%c admin\n", lasts[t]);
    }
    *p = 0;
    msa_status_t st;
    msa_rpc_auth_t *a = NULL;
    const char *path = write_file("long", text);
    int rc = msa_rpc_auth_load(path, &a, &st);
    CHECK_MSG(rc == MSA_OK, "load: %s", st.msg);
    free(text);
    if (rc) return;

    size_t hl = 7 + TLEN;
    char *first = malloc(hl + 1), *last = malloc(hl + 1), *good = malloc(hl + 1);
    memcpy(first, "Bearer ", 7);
    memset(first + 7, 'a', TLEN - 1);
    first[7 + TLEN - 1] = 'A';
    first[hl] = 0;
    memcpy(last, first, hl + 1);
    memcpy(good, first, hl + 1);
    first[7] = 'z';                  /* differs from every token at byte 0 */
    last[7 + TLEN - 1] = '~';        /* differs from every token at the last byte only */
    const char *shortt = "Bearer a"; /* 1 byte: a prefix of every token */
    CHECK_MSG(check(a, good, MSA_RPC_SCOPE_ADMIN, &st) == MSA_OK, "long token refused: %s", st.msg);
    CHECK_MSG(check(a, first, MSA_RPC_SCOPE_READ, &st) == MSA_EUNAUTH, "first");
    CHECK_MSG(check(a, last, MSA_RPC_SCOPE_READ, &st) == MSA_EUNAUTH, "last");
    CHECK_MSG(check(a, shortt, MSA_RPC_SCOPE_READ, &st) == MSA_EUNAUTH, "short");

    const char *cand[3] = {first, last, shortt};
    const char *names[3] = {"first byte differs", "last byte differs", "1-byte prefix"};
    int64_t *t[3];
    for (int c = 0; c < 3; c++) t[c] = malloc(REPS * sizeof(int64_t));
    for (int r = 0; r < REPS; r++)
        for (int c = 0; c < 3; c++) {
            int k = (c + r) % 3; /* rotate the order: no candidate always runs first */
            int64_t t0 = msa_clock_ns();
            (void)check(a, cand[k], MSA_RPC_SCOPE_READ, &st);
            t[k][r] = msa_clock_ns() - t0;
        }
    int64_t med[3];
    for (int c = 0; c < 3; c++) {
        qsort(t[c], REPS, sizeof(int64_t), cmp_i64);
        med[c] = t[c][REPS / 2];
        printf("auth timing: %-20s median %lld ns\n", names[c], (long long)med[c]);
    }
    for (int c = 1; c < 3; c++) {
        double ratio = (double)med[c] / (double)(med[0] ? med[0] : 1);
        /* An early-exit compare is ~10-800x off; 2x leaves slack for a loaded CI box. */
        CHECK_MSG(ratio > 0.5 && ratio < 2.0,
                  "'%s' takes %.2fx the time of '%s': the comparison is not constant-time",
                  names[c], ratio, names[0]);
    }
    for (int c = 0; c < 3; c++) free(t[c]);
    free(first);
    free(last);
    free(good);
    msa_rpc_auth_free(a);
}

static const msa_test_t tests[] = {
    TEST_ENTRY(scopes),
    TEST_ENTRY(constant_time),
};

int main(int argc, char **argv)
{
    if (!msa_test_tmpdir(tmpdir, sizeof tmpdir, "auth")) return 1;
    int rc = msa_test_run(tests, sizeof tests / sizeof tests[0], argc, argv);
    msa_test_tmpdir_done(tmpdir, rc);
    return rc;
}
