/* auth.c — tokens file and constant-time bearer check (see auth.h). */
#include "auth.h"

#include "msa_log.h"

#include <ctype.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define TOKEN_MAX 4096

typedef struct token {
    char *tok; /* owned */
    size_t len;
    msa_rpc_scope_t scope;
} token_t;

struct msa_rpc_auth {
    token_t *tokens;
    size_t n;
};

static const char *const scope_names[] = {
#define X(id, name) [MSA_RPC_SCOPE_##id] = name,
    MSA_RPC_SCOPES(X)
#undef X
};
#define N_SCOPES (sizeof scope_names / sizeof scope_names[0])

const char *msa_rpc_scope_name(msa_rpc_scope_t s)
{
    return (unsigned)s < N_SCOPES ? scope_names[s] : "?";
}

/* A token's scope: any named scope but NONE. */
static int parse_scope(const char *s, msa_rpc_scope_t *out)
{
    for (unsigned i = MSA_RPC_SCOPE_NONE + 1; i < N_SCOPES; i++)
        if (!strcmp(s, scope_names[i])) {
            *out = (msa_rpc_scope_t)i;
            return 0;
        }
    return -1;
}

void msa_rpc_auth_free(msa_rpc_auth_t *a)
{
    if (!a) return;
    for (size_t i = 0; i < a->n; i++) {
        /* Scrub secrets before giving the memory back. */
        volatile char *p = a->tokens[i].tok;
        for (size_t k = 0; k < a->tokens[i].len; k++) p[k] = 0;
        free(a->tokens[i].tok);
    }
    free(a->tokens);
    free(a);
}

size_t msa_rpc_auth_count(const msa_rpc_auth_t *a)
{
    return a ? a->n : 0;
}

int msa_rpc_auth_load(const char *path, msa_rpc_auth_t **out, msa_status_t *st)
{
    int rc = MSA_OK;
    char *line = NULL;
    size_t cap = 0;
    unsigned lineno = 0;
    msa_rpc_auth_t *a = calloc(1, sizeof(*a));
    FILE *f = fopen(path, "r");
    if (!a) {
        rc = msa_status_set(st, MSA_ENOMEM, "tokens file %s: out of memory", path);
        goto fail;
    }
    if (!f) {
        rc = msa_status_set(st, MSA_EIO, "tokens file %s: %s", path, strerror(errno));
        goto fail;
    }
    struct stat sb;
    if (fstat(fileno(f), &sb) == 0 && (sb.st_mode & S_IROTH))
        msa_log(MSA_LOG_WARN, "tokens file %s is world-readable; chmod 600 it", path);

    ssize_t len;
    while ((len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        char *p = line;
        while (*p && isspace((unsigned char)*p)) p++;
        if (*p == '\0' || *p == '#') continue;
        char *tok = p;
        while (*p && !isspace((unsigned char)*p)) p++;
        size_t tok_len = (size_t)(p - tok);
        if (*p) *p++ = '\0';
        while (*p && isspace((unsigned char)*p)) p++;
        char *scope = p;
        while (*p && !isspace((unsigned char)*p)) p++;
        if (*p) *p++ = '\0';
        while (*p && isspace((unsigned char)*p)) p++;
        msa_rpc_scope_t sc;
        if (*scope == '\0') {
            rc = msa_status_set(st, MSA_EINVAL, "%s:%u: want `token scope`, scope missing", path,
                                lineno);
            goto fail;
        }
        if (parse_scope(scope, &sc) != 0) {
            rc = msa_status_set(st, MSA_EINVAL, "%s:%u: scope '%.32s', want read|write|admin", path,
                                lineno, scope);
            goto fail;
        }
        if (*p != '\0' && *p != '#') {
            rc = msa_status_set(st, MSA_EINVAL, "%s:%u: trailing text after the scope", path,
                                lineno);
            goto fail;
        }
        if (tok_len > TOKEN_MAX) {
            rc = msa_status_set(st, MSA_EINVAL, "%s:%u: token longer than %u bytes", path, lineno,
                                TOKEN_MAX);
            goto fail;
        }
        for (size_t i = 0; i < a->n; i++) {
            if (a->tokens[i].len == tok_len && !memcmp(a->tokens[i].tok, tok, tok_len)) {
                rc = msa_status_set(st, MSA_EINVAL, "%s:%u: duplicate token", path, lineno);
                goto fail;
            }
        }
        token_t *grown = realloc(a->tokens, (a->n + 1) * sizeof(*grown));
        if (!grown) {
            rc = msa_status_set(st, MSA_ENOMEM, "tokens file %s: out of memory", path);
            goto fail;
        }
        a->tokens = grown;
        a->tokens[a->n].tok = strndup(tok, tok_len);
        if (!a->tokens[a->n].tok) {
            rc = msa_status_set(st, MSA_ENOMEM, "tokens file %s: out of memory", path);
            goto fail;
        }
        a->tokens[a->n].len = tok_len;
        a->tokens[a->n].scope = sc;
        a->n++;
    }
    if (ferror(f)) {
        rc = msa_status_set(st, MSA_EIO, "tokens file %s: read error", path);
        goto fail;
    }
    if (a->n == 0) {
        rc = msa_status_set(st, MSA_EINVAL, "tokens file %s: no tokens", path);
        goto fail;
    }
    if (line) {
        memset(line, 0, cap);
        free(line);
    }
    fclose(f);
    *out = a;
    return MSA_OK;

fail:
    if (line) {
        memset(line, 0, cap);
        free(line);
    }
    if (f) fclose(f);
    msa_rpc_auth_free(a);
    return rc;
}

/* 0 when equal. a is the presented token, b a configured one. The loop always
 * runs over all of b, so the time depends on the configured length only:
 * never on the contents, nor on how long the presented token is (a shorter
 * one reads as zeros past its end), which would leak b's length. */
static unsigned ct_compare(const unsigned char *a, size_t alen, const unsigned char *b, size_t blen)
{
    unsigned diff = (alen != blen);
    for (size_t i = 0; i < blen; i++) {
        size_t in = (size_t)0 - (size_t)(i < alen); /* all ones while i < alen */
        unsigned char x = a[i & in] & (unsigned char)in;
        diff |= (unsigned)(x ^ b[i]);
    }
    return diff;
}

int msa_rpc_auth_check(const msa_rpc_auth_t *a, const char *value, size_t len, msa_rpc_scope_t need,
                       msa_status_t *st)
{
    if (need == MSA_RPC_SCOPE_NONE || !a) return MSA_OK;
    if (!value)
        return msa_status_set(st, MSA_EUNAUTH, "missing `authorization: Bearer <token>` metadata");
    if (len < 7 || strncasecmp(value, "bearer ", 7) != 0)
        return msa_status_set(st, MSA_EUNAUTH, "authorization: want `Bearer <token>`");
    const unsigned char *tok = (const unsigned char *)value + 7;
    size_t tok_len = len - 7;
    while (tok_len && *tok == ' ') {
        tok++;
        tok_len--;
    }
    while (tok_len && (tok[tok_len - 1] == ' ' || tok[tok_len - 1] == '\r')) tok_len--;
    if (tok_len == 0) return msa_status_set(st, MSA_EUNAUTH, "authorization: empty token");

    /* Compare against every token, never stopping early, and pick the scope
     * of the match with a mask so that no branch depends on the secret. */
    unsigned scope = 0;
    for (size_t i = 0; i < a->n; i++) {
        unsigned eq = ct_compare(tok, tok_len, (const unsigned char *)a->tokens[i].tok,
                                 a->tokens[i].len) == 0;
        unsigned mask = 0u - eq;
        scope |= mask & (unsigned)a->tokens[i].scope;
    }
    if (scope == 0) return msa_status_set(st, MSA_EUNAUTH, "authorization: unknown token");
    if (scope < (unsigned)need)
        return msa_status_set(st, MSA_EPERM,
                              "token scope '%s' does not allow this call (needs '%s')",
                              msa_rpc_scope_name((msa_rpc_scope_t)scope), msa_rpc_scope_name(need));
    return MSA_OK;
}
