/* npy.c — the .npy codec (see npy.h for the dtype mapping and contracts).
 *
 * The header is a Python dict literal; we parse exactly what numpy writes and
 * what a careful hand-written file would contain: single- or double-quoted
 * keys and strings, True/False, a tuple of non-negative integers, whitespace
 * anywhere, an optional trailing comma. The three keys descr, fortran_order
 * and shape must each appear once; any other key is refused.
 */
#include "npy.h"

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char MAGIC[6] = {'\x93', 'N', 'U', 'M', 'P', 'Y'};

size_t msa_cli_npy_elem_size(msa_dtype_t dt)
{
    if (dt == MSA_CLI_NPY_U64) return 8;
    if (dt == MSA_DT_F32 || dt == MSA_DT_F16 || dt == MSA_DT_BF16 || dt == MSA_DT_I8)
        return msa_dtype_size(dt);
    return 0;
}

const char *msa_cli_npy_descr(msa_dtype_t dt)
{
    switch ((int)dt) {
    case MSA_DT_F32:
        return "<f4";
    case MSA_DT_F16:
        return "<f2";
    case MSA_DT_BF16:
        return "<u2";
    case MSA_DT_I8:
        return "|i1";
    case (int)MSA_CLI_NPY_U64:
        return "<u8";
    }
    return NULL;
}

size_t msa_cli_npy_count(const msa_cli_npy_t *a)
{
    size_t n = 1;
    for (uint32_t i = 0; i < a->ndim; i++) n *= a->shape[i];
    return n;
}

void msa_cli_npy_free(msa_cli_npy_t *a)
{
    if (!a) return;
    free(a->data);
    memset(a, 0, sizeof *a);
}

msa_tensor_t msa_cli_npy_tensor(const msa_cli_npy_t *a)
{
    msa_tensor_t t;
    memset(&t, 0, sizeof t);
    t.dtype = a->dtype;
    t.ndim = a->ndim;
    for (uint32_t i = 0; i < a->ndim && i < MSA_TENSOR_MAX_DIMS; i++) t.shape[i] = a->shape[i];
    t.data = a->data;
    t.nbytes = a->nbytes;
    return t;
}

/* ==== header parsing ============================================================ */

typedef struct {
    const char *p, *end;
} cursor_t;

static void skip_ws(cursor_t *c)
{
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
        c->p++;
}

static bool eat(cursor_t *c, char ch)
{
    skip_ws(c);
    if (c->p < c->end && *c->p == ch) {
        c->p++;
        return true;
    }
    return false;
}

/* A quoted string without escapes, copied into out (NUL-terminated). */
static bool parse_str(cursor_t *c, char *out, size_t cap)
{
    skip_ws(c);
    if (c->p >= c->end || (*c->p != '\'' && *c->p != '"')) return false;
    char q = *c->p++;
    size_t n = 0;
    while (c->p < c->end && *c->p != q) {
        if (*c->p == '\\' || n + 1 >= cap) return false;
        out[n++] = *c->p++;
    }
    if (c->p >= c->end) return false;
    c->p++;
    out[n] = '\0';
    return true;
}

static bool parse_word(cursor_t *c, const char *w)
{
    skip_ws(c);
    size_t n = strlen(w);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, w, n) != 0) return false;
    c->p += n;
    return true;
}

/* "(a, b, c)" with up to max entries; numpy also writes "(3,)" and "()". */
static int parse_shape(cursor_t *c, uint32_t *shape, uint32_t *ndim, const char *name,
                       msa_status_t *st)
{
    if (!eat(c, '('))
        return msa_status_set(st, MSA_EINVAL, "%s: header: shape is not a tuple", name);
    uint32_t n = 0;
    for (;;) {
        if (eat(c, ')')) break;
        skip_ws(c);
        if (c->p >= c->end || *c->p < '0' || *c->p > '9')
            return msa_status_set(st, MSA_EINVAL, "%s: header: shape has a non-integer entry",
                                  name);
        uint64_t v = 0;
        while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
            v = v * 10 + (uint64_t)(*c->p - '0');
            if (v > UINT32_MAX)
                return msa_status_set(st, MSA_EINVAL, "%s: header: shape extent too large", name);
            c->p++;
        }
        skip_ws(c);
        if (c->p < c->end && *c->p == 'L') c->p++; /* Python 2 long suffix */
        if (n == MSA_TENSOR_MAX_DIMS)
            return msa_status_set(st, MSA_EINVAL, "%s: more than %d dimensions", name,
                                  MSA_TENSOR_MAX_DIMS);
        shape[n++] = (uint32_t)v;
        if (eat(c, ',')) continue;
        if (eat(c, ')')) break;
        return msa_status_set(st, MSA_EINVAL, "%s: header: malformed shape tuple", name);
    }
    *ndim = n;
    return MSA_OK;
}

static int dtype_from_descr(const char *d, const char *name, msa_dtype_t *dt, bool *signed64,
                            msa_status_t *st)
{
    *signed64 = false;
    if (!strcmp(d, "<f4"))
        *dt = MSA_DT_F32;
    else if (!strcmp(d, "<f2"))
        *dt = MSA_DT_F16;
    else if (!strcmp(d, "<u2"))
        *dt = MSA_DT_BF16;
    else if (!strcmp(d, "|i1") || !strcmp(d, "i1") || !strcmp(d, "<i1"))
        *dt = MSA_DT_I8;
    else if (!strcmp(d, "<u8"))
        *dt = MSA_CLI_NPY_U64;
    else if (!strcmp(d, "<i8")) {
        *dt = MSA_CLI_NPY_U64;
        *signed64 = true;
    } else if (d[0] == '>') {
        return msa_status_set(st, MSA_EINVAL, "%s: dtype '%s' is big-endian, want little-endian",
                              name, d);
    } else {
        return msa_status_set(st, MSA_EINVAL,
                              "%s: dtype '%s' not supported, want '<f4' (F32), '<f2' (F16), "
                              "'<u2' (BF16 bits), '|i1' (I8) or '<u8' (ids)",
                              name, d);
    }
    return MSA_OK;
}

int msa_cli_npy_parse(const void *buf, size_t len, const char *name, msa_cli_npy_t *out,
                      msa_status_t *st)
{
    const uint8_t *b = buf;
    if (!name) name = "<npy>";
    memset(out, 0, sizeof *out);

    if (len < 10 || memcmp(b, MAGIC, 6) != 0)
        return msa_status_set(st, MSA_EINVAL, "%s: not a .npy file (bad magic)", name);
    uint8_t major = b[6];
    size_t hoff, hlen;
    if (major == 1) {
        hlen = (size_t)b[8] | (size_t)b[9] << 8;
        hoff = 10;
    } else if (major == 2 || major == 3) {
        if (len < 12) return msa_status_set(st, MSA_EINVAL, "%s: truncated header", name);
        hlen = (size_t)b[8] | (size_t)b[9] << 8 | (size_t)b[10] << 16 | (size_t)b[11] << 24;
        hoff = 12;
    } else {
        return msa_status_set(st, MSA_EINVAL, "%s: .npy format version %u.%u not supported", name,
                              major, b[7]);
    }
    if (hlen > len - hoff) return msa_status_set(st, MSA_EINVAL, "%s: truncated header", name);

    cursor_t c = {(const char *)b + hoff, (const char *)b + hoff + hlen};
    char descr[32] = "";
    bool have_descr = false, have_fortran = false, have_shape = false, fortran = false;
    uint32_t shape[MSA_TENSOR_MAX_DIMS] = {0};
    uint32_t ndim = 0;
    int rc;

    if (!eat(&c, '{')) return msa_status_set(st, MSA_EINVAL, "%s: header is not a dict", name);
    for (;;) {
        if (eat(&c, '}')) break;
        char key[32];
        if (!parse_str(&c, key, sizeof key) || !eat(&c, ':'))
            return msa_status_set(st, MSA_EINVAL, "%s: header: malformed dict", name);
        if (!strcmp(key, "descr")) {
            if (have_descr || !parse_str(&c, descr, sizeof descr))
                return msa_status_set(st, MSA_EINVAL, "%s: header: bad descr", name);
            have_descr = true;
        } else if (!strcmp(key, "fortran_order")) {
            if (have_fortran)
                return msa_status_set(st, MSA_EINVAL, "%s: header: bad fortran_order", name);
            if (parse_word(&c, "True"))
                fortran = true;
            else if (parse_word(&c, "False"))
                fortran = false;
            else
                return msa_status_set(st, MSA_EINVAL, "%s: header: bad fortran_order", name);
            have_fortran = true;
        } else if (!strcmp(key, "shape")) {
            if (have_shape) return msa_status_set(st, MSA_EINVAL, "%s: header: shape twice", name);
            if ((rc = parse_shape(&c, shape, &ndim, name, st))) return rc;
            have_shape = true;
        } else {
            return msa_status_set(st, MSA_EINVAL, "%s: header: unknown key '%s'", name, key);
        }
        if (eat(&c, ',')) continue;
        if (eat(&c, '}')) break;
        return msa_status_set(st, MSA_EINVAL, "%s: header: malformed dict", name);
    }
    skip_ws(&c);
    if (c.p != c.end)
        return msa_status_set(st, MSA_EINVAL, "%s: header: trailing characters", name);
    if (!have_descr || !have_fortran || !have_shape)
        return msa_status_set(st, MSA_EINVAL, "%s: header lacks %s", name,
                              !have_descr     ? "descr"
                              : !have_fortran ? "fortran_order"
                                              : "shape");
    if (fortran)
        return msa_status_set(st, MSA_EINVAL, "%s: fortran_order True, want C order", name);

    msa_dtype_t dt = MSA_DT_UNSPECIFIED;
    bool signed64 = false;
    if ((rc = dtype_from_descr(descr, name, &dt, &signed64, st))) return rc;
    size_t es = msa_cli_npy_elem_size(dt);

    uint64_t count = 1;
    for (uint32_t i = 0; i < ndim; i++)
        if (__builtin_mul_overflow(count, (uint64_t)shape[i], &count))
            return msa_status_set(st, MSA_EINVAL, "%s: shape too large", name);
    uint64_t want;
    if (__builtin_mul_overflow(count, (uint64_t)es, &want) || want > SIZE_MAX)
        return msa_status_set(st, MSA_EINVAL, "%s: shape too large", name);
    size_t have = len - hoff - hlen;
    if (have != want)
        return msa_status_set(st, MSA_EINVAL, "%s: %zu bytes of data, want %" PRIu64 " for '%s'",
                              name, have, want, descr);

    void *data = malloc(want ? (size_t)want : 1);
    if (!data) return msa_status_set(st, MSA_ENOMEM, "%s: out of memory", name);
    memcpy(data, b + hoff + hlen, (size_t)want);
    if (signed64) {
        for (uint64_t i = 0; i < count; i++) {
            int64_t v;
            memcpy(&v, (uint8_t *)data + 8 * i, 8);
            if (v < 0) {
                free(data);
                return msa_status_set(
                    st, MSA_EINVAL,
                    "%s: element %" PRIu64 " is negative (%" PRId64 "), want ids >= 0", name, i, v);
            }
        }
    }
    out->dtype = dt;
    out->ndim = ndim;
    memcpy(out->shape, shape, sizeof shape);
    out->data = data;
    out->nbytes = (size_t)want;
    msa_status_clear(st);
    return MSA_OK;
}

int msa_cli_npy_read(const char *path, msa_cli_npy_t *out, msa_status_t *st)
{
    memset(out, 0, sizeof *out);
    FILE *f = fopen(path, "rb");
    if (!f) return msa_status_set(st, MSA_EIO, "%s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        fclose(f);
        return msa_status_set(st, MSA_EIO, "%s: not a regular file", path);
    }
    size_t len = (size_t)sb.st_size;
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf) {
        fclose(f);
        return msa_status_set(st, MSA_ENOMEM, "%s: out of memory (%zu bytes)", path, len);
    }
    size_t got = fread(buf, 1, len, f);
    int err = ferror(f);
    fclose(f);
    if (got != len || err) {
        free(buf);
        return msa_status_set(st, MSA_EIO, "%s: short read", path);
    }
    int rc = msa_cli_npy_parse(buf, len, path, out, st);
    free(buf);
    return rc;
}

/* ==== writing ===================================================================== */

int msa_cli_npy_encode(msa_dtype_t dt, uint32_t ndim, const uint32_t *shape, const void *data,
                       size_t nbytes, void **buf, size_t *len, msa_status_t *st)
{
    *buf = NULL;
    *len = 0;
    const char *descr = msa_cli_npy_descr(dt);
    if (!descr) return msa_status_set(st, MSA_EINVAL, "npy: dtype %d cannot be written", (int)dt);
    if (ndim > MSA_TENSOR_MAX_DIMS)
        return msa_status_set(st, MSA_EINVAL, "npy: rank %u > %d", ndim, MSA_TENSOR_MAX_DIMS);
    uint64_t count = 1;
    for (uint32_t i = 0; i < ndim; i++)
        if (__builtin_mul_overflow(count, (uint64_t)shape[i], &count))
            return msa_status_set(st, MSA_EINVAL, "npy: shape too large");
    uint64_t want;
    if (__builtin_mul_overflow(count, (uint64_t)msa_cli_npy_elem_size(dt), &want) ||
        want != (uint64_t)nbytes)
        return msa_status_set(st, MSA_EINVAL, "npy: %zu bytes, want %" PRIu64 " for shape and '%s'",
                              nbytes, want, descr);

    char hdr[256];
    int n = snprintf(hdr, sizeof hdr, "{'descr': '%s', 'fortran_order': False, 'shape': (", descr);
    for (uint32_t i = 0; i < ndim; i++)
        n += snprintf(hdr + n, sizeof hdr - (size_t)n, "%s%" PRIu32, i ? ", " : "", shape[i]);
    n += snprintf(hdr + n, sizeof hdr - (size_t)n, "%s), }", ndim == 1 ? "," : "");
    /* Pad with spaces and a final newline so the data starts on a 64-byte
     * boundary (numpy's convention). The header always fits version 1.0. */
    size_t pre = 10;
    size_t total = pre + (size_t)n + 1;
    size_t padded = (total + 63) / 64 * 64;
    size_t hlen = padded - pre;
    uint8_t *b = malloc(padded + nbytes);
    if (!b) return msa_status_set(st, MSA_ENOMEM, "npy: out of memory");
    memcpy(b, MAGIC, 6);
    b[6] = 1;
    b[7] = 0;
    b[8] = (uint8_t)(hlen & 0xff);
    b[9] = (uint8_t)(hlen >> 8);
    memcpy(b + pre, hdr, (size_t)n);
    memset(b + pre + n, ' ', hlen - (size_t)n - 1);
    b[padded - 1] = '\n';
    if (nbytes) memcpy(b + padded, data, nbytes);
    *buf = b;
    *len = padded + nbytes;
    return MSA_OK;
}

int msa_cli_npy_write(const char *path, msa_dtype_t dt, uint32_t ndim, const uint32_t *shape,
                      const void *data, size_t nbytes, msa_status_t *st)
{
    void *buf;
    size_t len;
    int rc = msa_cli_npy_encode(dt, ndim, shape, data, nbytes, &buf, &len, st);
    if (rc) {
        /* Re-prefix the message with the path. */
        char tmp[MSA_STATUS_MSG_MAX];
        snprintf(tmp, sizeof tmp, "%s", st ? st->msg : "");
        const char *why = strncmp(tmp, "npy: ", 5) == 0 ? tmp + 5 : tmp;
        return msa_status_set(st, rc, "%s: %s", path, why);
    }
    FILE *f = fopen(path, "wb");
    if (!f) {
        free(buf);
        return msa_status_set(st, MSA_EIO, "%s: %s", path, strerror(errno));
    }
    size_t put = fwrite(buf, 1, len, f);
    free(buf);
    if (put != len || fclose(f) != 0) {
        if (put != len) fclose(f);
        return msa_status_set(st, MSA_EIO, "%s: write failed", path);
    }
    msa_status_clear(st);
    return MSA_OK;
}

int msa_cli_npy_write_tensor(const char *path, const msa_tensor_t *t, msa_status_t *st)
{
    return msa_cli_npy_write(path, t->dtype, t->ndim, t->shape, t->data, t->nbytes, st);
}
