/* test_npy.c — client/npy.c: round trips for every dtype and rank, byte-exact
 * agreement with files numpy 1.24 wrote (np.save), and malformed input
 * (truncations, mutations, bad headers) refused with messages, never a crash.
 */
#include "harness.h"
#include "npy.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char g_dir[200];

/* ==== numpy-written files (numpy 1.24, np.save / write_array) ===================== */

static const char NP_F4_2x3[] =
    "\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"
    "                                                          \n"
    "\x00\x00\x00\x00\x00\x00\x80?\x00\x00\x00@\x00\x00@@\x00\x00\x80@\x00\x00\xa0@";
static const char NP_I8_3[] =
    "\x93NUMPY\x01\x00v\x00{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }"
    "                                                            \n"
    "\x01\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x00\x00"
    "\x00\x00";
static const char NP_F2_SCALAR[] =
    "\x93NUMPY\x01\x00v\x00{'descr': '<f2', 'fortran_order': False, 'shape': (), }"
    "                                                              \n"
    "\x00\x00";
static const char NP_U2_V2[] =
    "\x93NUMPY\x02\x00t\x00\x00\x00{'descr': '<u2', 'fortran_order': False, 'shape': (3,), }"
    "                                                          \n"
    "\x00\x00\x01\x00\x02\x00";

TEST(numpy_files)
{
    msa_cli_npy_t a;
    msa_status_t st;
    CHECK(msa_cli_npy_parse(NP_F4_2x3, sizeof NP_F4_2x3 - 1, "a.npy", &a, &st) == MSA_OK);
    CHECK(a.dtype == MSA_DT_F32 && a.ndim == 2 && a.shape[0] == 2 && a.shape[1] == 3);
    CHECK(a.nbytes == 24 && ((float *)a.data)[5] == 5.0f);
    /* our encoder writes the same bytes numpy does */
    void *buf;
    size_t len;
    CHECK(msa_cli_npy_encode(a.dtype, a.ndim, a.shape, a.data, a.nbytes, &buf, &len, &st) == 0);
    CHECK(len == sizeof NP_F4_2x3 - 1 && memcmp(buf, NP_F4_2x3, len) == 0);
    free(buf);
    msa_cli_npy_free(&a);
    CHECK(a.data == NULL);

    CHECK(msa_cli_npy_parse(NP_I8_3, sizeof NP_I8_3 - 1, "ids.npy", &a, &st) == MSA_OK);
    CHECK(a.dtype == MSA_CLI_NPY_U64 && a.ndim == 1 && a.shape[0] == 3);
    CHECK(((uint64_t *)a.data)[2] == 3);
    msa_cli_npy_free(&a);

    CHECK(msa_cli_npy_parse(NP_F2_SCALAR, sizeof NP_F2_SCALAR - 1, "s.npy", &a, &st) == MSA_OK);
    CHECK(a.dtype == MSA_DT_F16 && a.ndim == 0 && a.nbytes == 2 && msa_cli_npy_count(&a) == 1);
    CHECK(msa_cli_npy_encode(a.dtype, a.ndim, a.shape, a.data, a.nbytes, &buf, &len, &st) == 0);
    CHECK(len == sizeof NP_F2_SCALAR - 1 && memcmp(buf, NP_F2_SCALAR, len) == 0);
    free(buf);
    msa_cli_npy_free(&a);

    CHECK(msa_cli_npy_parse(NP_U2_V2, sizeof NP_U2_V2 - 1, "b.npy", &a, &st) == MSA_OK);
    CHECK(a.dtype == MSA_DT_BF16 && a.ndim == 1 && a.shape[0] == 3);
    CHECK(((uint16_t *)a.data)[2] == 2);
    msa_cli_npy_free(&a);
    msa_cli_npy_free(NULL);
}

/* ==== round trips ================================================================= */

TEST(round_trip_files)
{
    static const msa_dtype_t dts[5] = {MSA_DT_F32, MSA_DT_F16, MSA_DT_BF16, MSA_DT_I8,
                                       MSA_CLI_NPY_U64};
    static const uint32_t shapes[6][4] = {{0}, {7}, {3, 5}, {2, 3, 4}, {1, 2, 1, 3}, {0, 4, 2}};
    static const uint32_t ranks[6] = {0, 1, 2, 3, 4, 3};
    char path[300];
    snprintf(path, sizeof path, "%s/x.npy", g_dir);
    for (int d = 0; d < 5; d++) {
        for (int s = 0; s < 6; s++) {
            size_t count = 1;
            for (uint32_t i = 0; i < ranks[s]; i++) count *= shapes[s][i];
            size_t es = msa_cli_npy_elem_size(dts[d]);
            size_t nb = count * es;
            uint8_t *data = malloc(nb + 1);
            for (size_t i = 0; i < nb; i++) data[i] = (uint8_t)(i * 37 + (size_t)d);
            if (dts[d] == MSA_DT_F32) /* keep the bytes finite floats */
                for (size_t i = 0; i < count; i++) ((float *)data)[i] = (float)i * 0.5f - 3.0f;
            msa_status_t st;
            CHECK(msa_cli_npy_write(path, dts[d], ranks[s], shapes[s], data, nb, &st) == MSA_OK);
            msa_cli_npy_t a;
            CHECK(msa_cli_npy_read(path, &a, &st) == MSA_OK);
            CHECK(a.dtype == dts[d] && a.ndim == ranks[s] && a.nbytes == nb);
            for (uint32_t i = 0; i < ranks[s]; i++) CHECK(a.shape[i] == shapes[s][i]);
            CHECK(nb == 0 || memcmp(a.data, data, nb) == 0);
            msa_tensor_t t = msa_cli_npy_tensor(&a);
            CHECK(t.dtype == dts[d] && t.ndim == ranks[s] && t.data == a.data && t.nbytes == nb);
            /* write_tensor gives the same file */
            CHECK(msa_cli_npy_write_tensor(path, &t, &st) == MSA_OK);
            msa_cli_npy_t b;
            CHECK(msa_cli_npy_read(path, &b, &st) == MSA_OK);
            CHECK(b.nbytes == nb && (nb == 0 || memcmp(b.data, data, nb) == 0));
            msa_cli_npy_free(&a);
            msa_cli_npy_free(&b);
            free(data);
        }
    }
    unlink(path);
}

TEST(write_errors)
{
    msa_status_t st;
    uint32_t sh[1] = {4};
    float d[4] = {0};
    char path[300];
    snprintf(path, sizeof path, "%s/w.npy", g_dir);
    CHECK(msa_cli_npy_write(path, MSA_DT_F32, 1, sh, d, 12, &st) == MSA_EINVAL);
    CHECK(strncmp(st.msg, path, strlen(path)) == 0);
    CHECK(strstr(st.msg, "12 bytes, want 16") != NULL);
    CHECK(msa_cli_npy_write(path, (msa_dtype_t)99, 1, sh, d, 16, &st) == MSA_EINVAL);
    CHECK(msa_cli_npy_write("/nonexistent-dir/x.npy", MSA_DT_F32, 1, sh, d, 16, &st) == MSA_EIO);
    CHECK(strncmp(st.msg, "/nonexistent-dir/x.npy: ", 24) == 0);
    uint32_t sh5[5] = {1, 1, 1, 1, 1};
    CHECK(msa_cli_npy_write(path, MSA_DT_F32, 5, sh5, d, 4, &st) == MSA_EINVAL);
}

/* ==== malformed input ============================================================== */

/* Builds a v1 file from a header text (padded) and n data bytes. */
static size_t make_file(uint8_t *out, const char *hdr, size_t ndata)
{
    size_t h = strlen(hdr);
    memcpy(out, "\x93NUMPY\x01\x00", 8);
    out[8] = (uint8_t)h;
    out[9] = (uint8_t)(h >> 8);
    memcpy(out + 10, hdr, h);
    memset(out + 10 + h, 0, ndata);
    return 10 + h + ndata;
}

#define BAD_HDR(hdr, ndata, want_substr)                                                       \
    do {                                                                                       \
        uint8_t f_[1024];                                                                      \
        size_t n_ = make_file(f_, hdr, ndata);                                                 \
        msa_cli_npy_t a_;                                                                      \
        msa_status_t st_;                                                                      \
        int rc_ = msa_cli_npy_parse(f_, n_, "k.npy", &a_, &st_);                               \
        if (rc_ != MSA_EINVAL || strstr(st_.msg, want_substr) == NULL ||                       \
            strncmp(st_.msg, "k.npy: ", 7) != 0) {                                             \
            FAILF("header %s: rc %d msg \"%s\", want \"%s\"", hdr, rc_, st_.msg, want_substr); \
        }                                                                                      \
        CHECK(a_.data == NULL);                                                                \
    } while (0)

TEST(bad_headers)
{
    BAD_HDR("{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }", 8,
            "fortran_order True, want C order");
    BAD_HDR("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", 8, "big-endian");
    BAD_HDR("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", 16,
            "dtype '<f8' not supported");
    BAD_HDR("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 1, 1, 1), }", 4,
            "more than 4 dimensions");
    BAD_HDR("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", 7,
            "7 bytes of data, want 8");
    BAD_HDR("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", 9,
            "9 bytes of data, want 8");
    BAD_HDR("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", 8,
            "unknown key 'x'");
    BAD_HDR("{'descr': '<f4', 'shape': (2,), }", 8, "lacks fortran_order");
    BAD_HDR("{'fortran_order': False, 'shape': (2,), }", 8, "lacks descr");
    BAD_HDR("{'descr': '<f4', 'fortran_order': False}", 8, "lacks shape");
    BAD_HDR("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'shape': (2,)}", 8,
            "shape twice");
    BAD_HDR("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }", 8, "non-integer");
    BAD_HDR("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999,), }", 8, "too large");
    BAD_HDR("{'descr': '<f4', 'fortran_order': False, 'shape': (65536, 65536, 65536, 65536)}", 8,
            "too large");
    BAD_HDR("{'descr': '<f4', 'fortran_order': False, 'shape': 2}", 8, "not a tuple");
    BAD_HDR("{'descr': '<f4', 'fortran_order': Maybe, 'shape': (2,)}", 8, "fortran_order");
    BAD_HDR("{'descr': '<f4' 'fortran_order': False, 'shape': (2,)}", 8, "malformed");
    BAD_HDR("{'descr': '<f4', 'fortran_order': False, 'shape': (2,)} x", 8, "trailing");
    BAD_HDR("['descr']", 8, "not a dict");
    BAD_HDR("{'descr': '<f4', 'fortran_order': False, 'shape': (2 3)}", 8, "malformed shape");
    BAD_HDR("{'descr': '<f4', 'fortran_order': False, 'shape': (2,", 8, "");
    BAD_HDR("{'descr': '<f4", 8, "bad descr");

    /* negative '<i8' ids */
    uint8_t f[256];
    size_t n = make_file(f, "{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }", 16);
    int64_t neg[2] = {5, -1};
    memcpy(f + n - 16, neg, 16);
    msa_cli_npy_t a;
    msa_status_t st;
    CHECK(msa_cli_npy_parse(f, n, "ids.npy", &a, &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "ids.npy: element 1 is negative (-1), want ids >= 0");

    /* hand-written variations that are fine: double quotes, no spaces, no padding */
    n = make_file(f, "{\"shape\":(2,),\"descr\":\"<f4\",\"fortran_order\":False}", 8);
    CHECK(msa_cli_npy_parse(f, n, "h.npy", &a, &st) == MSA_OK);
    CHECK(a.ndim == 1 && a.shape[0] == 2 && a.dtype == MSA_DT_F32);
    msa_cli_npy_free(&a);
    n = make_file(f, "{'descr': '|i1', 'fortran_order': False, 'shape': (3, 0), }\n", 0);
    CHECK(msa_cli_npy_parse(f, n, "h.npy", &a, &st) == MSA_OK);
    CHECK(a.ndim == 2 && a.shape[1] == 0 && a.nbytes == 0 && a.dtype == MSA_DT_I8);
    msa_cli_npy_free(&a);

    /* magic and version */
    CHECK(msa_cli_npy_parse("\x93NUMPZ\x01\x00\x00\x00", 10, "m.npy", &a, &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "m.npy: not a .npy file (bad magic)");
    CHECK(msa_cli_npy_parse("\x93NUMPY\x07\x00\x00\x00", 10, "m.npy", &a, &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "m.npy: .npy format version 7.0 not supported");
    CHECK(msa_cli_npy_parse("\x93NUMPY\x01\x00\xff\x00", 10, "m.npy", &a, &st) == MSA_EINVAL);
    CHECK_STR(st.msg, "m.npy: truncated header");
    CHECK(msa_cli_npy_parse("", 0, "m.npy", &a, &st) == MSA_EINVAL);
    CHECK(msa_cli_npy_parse("\x93NUMPY\x02\x00\x00\x00", 10, "m.npy", &a, &st) == MSA_EINVAL);

    /* files */
    char path[300];
    snprintf(path, sizeof path, "%s/missing.npy", g_dir);
    CHECK(msa_cli_npy_read(path, &a, &st) == MSA_EIO);
    CHECK(strncmp(st.msg, path, strlen(path)) == 0 && strstr(st.msg, "No such file"));
    CHECK(msa_cli_npy_read(g_dir, &a, &st) == MSA_EIO);
}

/* Every truncation and many random byte mutations of a valid file: the parser
 * returns (any code) without reading out of bounds; run under ASan in CI's
 * sanitizer build. */
TEST(fuzz_no_crash)
{
    const uint8_t *src = (const uint8_t *)NP_F4_2x3;
    size_t n = sizeof NP_F4_2x3 - 1;
    msa_cli_npy_t a;
    msa_status_t st;
    for (size_t cut = 0; cut < n; cut++) {
        uint8_t *b = malloc(cut ? cut : 1); /* exact-size buffer so ASan sees overreads */
        memcpy(b, src, cut);
        int rc = msa_cli_npy_parse(b, cut, "t.npy", &a, &st);
        CHECK(rc == MSA_EINVAL);
        CHECK(a.data == NULL);
        free(b);
    }
    uint64_t r = 0x1234567;
    int ok = 0;
    for (int it = 0; it < 50000; it++) {
        uint8_t *b = malloc(n);
        memcpy(b, src, n);
        int flips = 1 + (int)(r % 4);
        for (int k = 0; k < flips; k++) {
            r ^= r << 13, r ^= r >> 7, r ^= r << 17;
            size_t pos = (size_t)(r % n);
            r ^= r << 13, r ^= r >> 7, r ^= r << 17;
            b[pos] = (it & 1) ? (uint8_t)r : (uint8_t) " (),:'0123456789TF{}"[r % 20];
        }
        r ^= r << 13, r ^= r >> 7, r ^= r << 17;
        size_t len = (r % 8 == 0) ? (size_t)(r >> 8) % n : n;
        int rc = msa_cli_npy_parse(b, len, "t.npy", &a, &st);
        if (rc == MSA_OK) {
            ok++;
            CHECK(a.nbytes == msa_cli_npy_count(&a) * msa_cli_npy_elem_size(a.dtype));
            msa_cli_npy_free(&a);
        } else {
            CHECK(a.data == NULL && strncmp(st.msg, "t.npy: ", 7) == 0);
        }
        free(b);
    }
    CHECK(ok > 0); /* data-only mutations still parse */
}

static const msa_test_t tests[] = {
    TEST_ENTRY(numpy_files), TEST_ENTRY(round_trip_files), TEST_ENTRY(write_errors),
    TEST_ENTRY(bad_headers), TEST_ENTRY(fuzz_no_crash),
};

int main(int argc, char **argv)
{
    if (!msa_test_tmpdir(g_dir, sizeof g_dir, "npy")) return 1;
    int rc = msa_test_run(tests, sizeof tests / sizeof tests[0], argc, argv);
    msa_test_tmpdir_done(g_dir, rc);
    return rc;
}
