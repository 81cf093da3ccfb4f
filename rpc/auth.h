/* auth.h — bearer tokens with scopes (SEMANTICS "Security defaults").
 *
 * A tokens file holds one `token scope` per line (scope read|write|admin;
 * blank lines and # comments ignored). A call carries `authorization: Bearer
 * <token>` metadata. Tokens are compared in constant time: every configured
 * token is compared in full, whatever matched. Loaded once at start; after
 * that the table is read-only and safe from any thread.
 */
#ifndef MSA_RPC_AUTH_H
#define MSA_RPC_AUTH_H

#include "msa_err.h"

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* X(ID, name), ordered: a scope includes every scope below it (the enum's
 * values are 0, 1, ...). NONE = always allowed, never a token's scope. */
#define MSA_RPC_SCOPES(X) X(NONE, "none") X(READ, "read") X(WRITE, "write") X(ADMIN, "admin")

typedef enum {
#define X(id, name) MSA_RPC_SCOPE_##id,
    MSA_RPC_SCOPES(X)
#undef X
} msa_rpc_scope_t;

typedef struct msa_rpc_auth msa_rpc_auth_t;

/* "read", "write", "admin" (or "none"). */
const char *msa_rpc_scope_name(msa_rpc_scope_t s);

/* Loads a tokens file. Errors: MSA_EIO (cannot read; st names the file),
 * MSA_EINVAL (bad line: st says "FILE:LINE: ..."; empty file). */
int msa_rpc_auth_load(const char *path, msa_rpc_auth_t **out, msa_status_t *st);
void msa_rpc_auth_free(msa_rpc_auth_t *a);
size_t msa_rpc_auth_count(const msa_rpc_auth_t *a);

/* Checks the value of an `authorization` header (value NULL when absent)
 * against the table for a method needing scope `need`. Returns MSA_OK,
 * MSA_EUNAUTH (missing, malformed or unknown token) or MSA_EPERM (token known,
 * scope too low), with a message in *st that never repeats the token. */
int msa_rpc_auth_check(const msa_rpc_auth_t *a, const char *value, size_t len, msa_rpc_scope_t need,
                       msa_status_t *st);

#ifdef __cplusplus
}
#endif
#endif
