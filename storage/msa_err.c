#include "msa_err.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

const char *msa_strerror(int code)
{
    switch (code) {
#define MSA__ERR_MSG(name, value, msg) \
    case value:                        \
        return msg;
        MSA_ERRNO_MAP(MSA__ERR_MSG)
#undef MSA__ERR_MSG
    }
    return "unknown error";
}

const char *msa_errname(int code)
{
    switch (code) {
#define MSA__ERR_NAME(name, value, msg) \
    case value:                         \
        return #name;
        MSA_ERRNO_MAP(MSA__ERR_NAME)
#undef MSA__ERR_NAME
    }
    return "EUNKNOWN";
}

int msa_status_set(msa_status_t *st, int code, const char *fmt, ...)
{
    if (st) {
        st->code = code;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(st->msg, sizeof st->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}

void msa_status_clear(msa_status_t *st)
{
    if (st) {
        st->code = MSA_OK;
        st->msg[0] = '\0';
    }
}

void msa__assert_fail(const char *expr, const char *file, int line)
{
    fprintf(stderr, "msa_assert failed: %s (%s:%d)\n", expr, file, line);
    abort();
}
