/* connlimit.h — the cap on msad's concurrent client connections, and the
 * guard that keeps gRPC's accept loop alive when file descriptors run out.
 *
 * gRPC core (1.51, Debian 12) has no connection limit, and its listener stops
 * for good when accept4 fails with EMFILE (grpc/grpc#20418): one client could
 * stop every new connection until a restart. Both are handled here by
 * interposing accept4 and close for the whole process (msad's executable
 * defines them, so libgrpc's calls resolve here first):
 *  - an accepted connection past the cap is answered with an HTTP/2 GOAWAY
 *    saying why (plaintext listeners) and closed at once;
 *  - when accept4 fails for want of descriptors, a reserve descriptor is
 *    released to accept and close the waiting connection, so the listener
 *    sees EAGAIN (re-arm) and never a fatal error;
 *  - close() of a counted connection gives its slot back.
 * Until msa_rpc_conn_arm is called (and in every other program that links
 * msa_rpc) both calls pass straight through. Thread-safe: atomics only.
 */
#ifndef MSA_RPC_CONNLIMIT_H
#define MSA_RPC_CONNLIMIT_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Descriptors kept free for everything but client connections: the store,
 * backups, gRPC's own pipes and timers (128), and the metrics endpoint's
 * connections (MSA_RPC_HTTP_MAX_CONN, 128). */
#define MSA_RPC_FD_RESERVE 256

/* Raises RLIMIT_NOFILE's soft limit to the hard limit; returns the soft
 * limit in force afterwards (descriptors this process may hold). */
uint64_t msa_rpc_conn_raise_nofile(void);

/* Starts counting: at most max_conn client connections at once. plaintext:
 * refusals may carry an HTTP/2 GOAWAY (not on TLS listeners). Returns 0, or
 * -1 when the tracking table cannot be allocated (nothing is armed). */
int msa_rpc_conn_arm(unsigned max_conn, bool plaintext);

/* Accepts on this listening descriptor pass through uncounted (the metrics
 * endpoint has its own limit). */
void msa_rpc_conn_exempt(int listen_fd);

uint64_t msa_rpc_conn_open(void);     /* client connections held now */
uint64_t msa_rpc_conn_accepted(void); /* connections accepted (counted) since arm */
uint64_t msa_rpc_conn_refused(void);  /* refused: over the cap or out of descriptors */
unsigned msa_rpc_conn_max(void);      /* the cap; 0 before arm */

#ifdef __cplusplus
}
#endif
#endif
