/* msa_err.h — the one error enum of msad, and a status that carries a message.
 *
 * The bottom layer: depends on nothing. Every function that can fail returns an
 * int: MSA_OK (0) or a negative MSA_E* code. Calls whose failure a user must
 * understand also fill an msa_status_t with a message that names the field,
 * e.g. "ops[3].put.layers[2].k: shape [12,8,64], want [12,8,128]". Foreign
 * codes (LMDB, CUDA, gRPC) are translated once, at their module's boundary.
 */
#ifndef MSA_ERR_H
#define MSA_ERR_H

#ifdef __cplusplus
extern "C" {
#endif

/* X(name, value, message). Values stay stable: they may appear in logs. */
#define MSA_ERRNO_MAP(X)                                  \
    X(OK, 0, "ok")                                        \
    X(EINVAL, -30001, "invalid argument")                 \
    X(ENOTFOUND, -30002, "not found")                     \
    X(EEXIST, -30003, "already exists")                   \
    X(EPRECOND, -30004, "failed precondition")            \
    X(EFULL, -30005, "resource exhausted")                \
    X(EUNAUTH, -30006, "unauthenticated")                 \
    X(EPERM, -30007, "permission denied")                 \
    X(EUNAVAIL, -30008, "unavailable")                    \
    X(ETIMEOUT, -30009, "deadline exceeded")              \
    X(EINTERNAL, -30010, "internal error")                \
    X(EBROKEN, -30011, "engine broken; restart required") \
    X(ENOMEM, -30012, "out of memory")                    \
    X(EIO, -30013, "i/o error")                           \
    X(ECORRUPT, -30014, "store corrupt")

typedef enum {
#define MSA__ERR_ENUM(name, value, msg) MSA_##name = value,
    MSA_ERRNO_MAP(MSA__ERR_ENUM)
#undef MSA__ERR_ENUM
} msa_err_t;

/* Returns the static message for an MSA_E* code ("unknown error" otherwise). */
const char *msa_strerror(int code);
/* Returns the bare name, e.g. "EINVAL". */
const char *msa_errname(int code);

#define MSA_STATUS_MSG_MAX 512

/* A result with a human message. code == MSA_OK means success and msg is "". */
typedef struct msa_status {
    int code;                     /* MSA_OK or MSA_E* */
    char msg[MSA_STATUS_MSG_MAX]; /* names the field or object at fault */
} msa_status_t;

/* Sets *st (when st != NULL) and returns code, so callers can write
 * `return msa_status_set(st, MSA_EINVAL, "top_k: %u > 1024", k);`. */
int msa_status_set(msa_status_t *st, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Resets *st to MSA_OK with an empty message. */
void msa_status_clear(msa_status_t *st);

/* Bugs only: stays on in release builds, reports expression, file and line. */
#define msa_assert(e) ((e) ? (void)0 : msa__assert_fail(#e, __FILE__, __LINE__))
void msa__assert_fail(const char *expr, const char *file, int line) __attribute__((noreturn));

#ifdef __cplusplus
}
#endif
#endif
