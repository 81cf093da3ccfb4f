/* connlimit.c — connection cap and EMFILE guard by interposing accept4 and
 * close (see connlimit.h for why). */
#define _GNU_SOURCE
#include "connlimit.h"

#include "msa_clock.h"
#include "msa_log.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef int (*accept4_fn)(int, struct sockaddr *, socklen_t *, int);
typedef int (*close_fn)(int);

static struct {
    _Atomic(accept4_fn) real_accept4;
    _Atomic(close_fn) real_close;
    atomic_int armed;
    atomic_int exempt;            /* listening fd that passes through; -1 none */
    atomic_int reserve;           /* spare descriptor on /dev/null; -1 none */
    _Atomic(atomic_uchar *) slot; /* per fd: 1 = a counted client connection */
    size_t n_slot;                /* entries in slot (fds beyond are refused) */
    unsigned max;                 /* the cap */
    bool plaintext;               /* refusals may carry a GOAWAY */
    atomic_uint_fast64_t open, accepted, refused;
    atomic_int_fast64_t last_log_s; /* rate limit of the refusal warning */
} g = {.exempt = -1, .reserve = -1};

static accept4_fn real_accept4(void)
{
    accept4_fn f = atomic_load(&g.real_accept4);
    if (!f) {
        f = (accept4_fn)dlsym(RTLD_NEXT, "accept4");
        atomic_store(&g.real_accept4, f);
    }
    return f;
}

static close_fn real_close(void)
{
    close_fn f = atomic_load(&g.real_close);
    if (!f) {
        f = (close_fn)dlsym(RTLD_NEXT, "close");
        atomic_store(&g.real_close, f);
    }
    return f;
}

uint64_t msa_rpc_conn_raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return 1024;
    if (rl.rlim_cur < rl.rlim_max) {
        struct rlimit want = rl;
        want.rlim_cur = rl.rlim_max;
        /* Some kernels refuse RLIM_INFINITY or more than fs.nr_open: keep the old value. */
        if (setrlimit(RLIMIT_NOFILE, &want) == 0) rl = want;
    }
    return rl.rlim_cur == RLIM_INFINITY ? (uint64_t)1 << 20 : (uint64_t)rl.rlim_cur;
}

int msa_rpc_conn_arm(unsigned max_conn, bool plaintext)
{
    if (atomic_load(&g.armed)) { /* a later server in the same process */
        g.max = max_conn;
        g.plaintext = plaintext;
        return 0;
    }
    uint64_t nofile = msa_rpc_conn_raise_nofile();
    size_t n = nofile > ((uint64_t)1 << 22) ? ((size_t)1 << 22) : (size_t)nofile;
    atomic_uchar *slot = calloc(n, sizeof(*slot));
    if (!slot) return -1;
    real_accept4();
    real_close();
    g.n_slot = n;
    g.max = max_conn;
    g.plaintext = plaintext;
    atomic_store(&g.slot, slot);
    atomic_store(&g.reserve, open("/dev/null", O_RDONLY | O_CLOEXEC));
    atomic_store(&g.armed, 1);
    return 0;
}

void msa_rpc_conn_exempt(int listen_fd)
{
    atomic_store(&g.exempt, listen_fd);
}

uint64_t msa_rpc_conn_open(void)
{
    return atomic_load(&g.open);
}
uint64_t msa_rpc_conn_accepted(void)
{
    return atomic_load(&g.accepted);
}
uint64_t msa_rpc_conn_refused(void)
{
    return atomic_load(&g.refused);
}
unsigned msa_rpc_conn_max(void)
{
    return atomic_load(&g.armed) ? g.max : 0;
}

/* Tells the peer why (plaintext HTTP/2: a GOAWAY with ENHANCE_YOUR_CALM and
 * a reason a client may log), then closes. */
static void refuse(int fd, const char *why)
{
    atomic_fetch_add(&g.refused, 1);
    if (g.plaintext) {
        unsigned char buf[160];
        size_t dl = strlen(why);
        if (dl > sizeof(buf) - 17) dl = sizeof(buf) - 17;
        /* No SETTINGS first: a client that saw the connection set up would
         * count it as a success and reconnect at once, in a loop; without
         * it the connection attempt fails, and the call fails UNAVAILABLE
         * (or backs off and retries, as the client chooses). */
        size_t len = 8 + dl;
        unsigned char *f = buf;
        f[0] = (unsigned char)(len >> 16);
        f[1] = (unsigned char)(len >> 8);
        f[2] = (unsigned char)len;
        f[3] = 7;                                      /* GOAWAY */
        memset(f + 4, 0, 5 + 4);                       /* flags, stream 0, last stream id 0 */
        f[13] = 0, f[14] = 0, f[15] = 0, f[16] = 0x0b; /* ENHANCE_YOUR_CALM */
        memcpy(f + 17, why, dl);
        ssize_t w = send(fd, buf, 17 + dl, MSG_DONTWAIT | MSG_NOSIGNAL);
        (void)w;
    }
    real_close()(fd);
    int_fast64_t now_s = msa_clock_ms() / 1000;
    int_fast64_t last = atomic_load(&g.last_log_s);
    if (now_s > last && atomic_compare_exchange_strong(&g.last_log_s, &last, now_s))
        msa_log(MSA_LOG_WARN, "connection refused: %s (%llu refused so far)", why,
                (unsigned long long)atomic_load(&g.refused));
}

/* Out of descriptors: give the reserve back to the kernel, accept the
 * waiting connection with it and refuse it, take the reserve again.
 * Returns 1 when a connection was shed, 0 when none was waiting. */
static int shed(int lfd)
{
    int r = atomic_exchange(&g.reserve, -1);
    if (r >= 0) real_close()(r);
    int c = real_accept4()(lfd, NULL, NULL, SOCK_CLOEXEC);
    int shed_one = 0;
    if (c >= 0) {
        /* No GOAWAY here: the listener may be TLS, and the peer's bytes are
         * not ours to answer. A plain close tells the client to retry. */
        atomic_fetch_add(&g.refused, 1);
        real_close()(c);
        shed_one = 1;
    }
    atomic_store(&g.reserve, open("/dev/null", O_RDONLY | O_CLOEXEC));
    if (shed_one) {
        int_fast64_t now_s = msa_clock_ms() / 1000;
        int_fast64_t last = atomic_load(&g.last_log_s);
        if (now_s > last && atomic_compare_exchange_strong(&g.last_log_s, &last, now_s))
            msa_log(MSA_LOG_WARN,
                    "connection refused: out of file descriptors (%llu connections open; "
                    "raise `ulimit -n` or lower --max-connections)",
                    (unsigned long long)atomic_load(&g.open));
    }
    return shed_one;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags)
{
    accept4_fn acc = real_accept4();
    if (!acc) {
        errno = ENOSYS;
        return -1;
    }
    if (!atomic_load(&g.armed) || fd == atomic_load(&g.exempt))
        return acc(fd, addr, addrlen, flags);
    atomic_uchar *slot = atomic_load(&g.slot);
    /* Loop: gRPC's listener is edge-triggered, so a refusal must not leave
     * connections waiting in the backlog without a new event to wake it. */
    for (int tries = 0; tries < 4096; tries++) {
        int c = acc(fd, addr, addrlen, flags);
        if (c < 0) {
            int e = errno;
            if (e == EINTR || e == EAGAIN || e == ECONNABORTED || e == EBADF || e == EINVAL ||
                e == ENOTSOCK)
                return -1; /* gRPC handles these (re-arm, or the listener is closing) */
            /* EMFILE, ENFILE, ENOBUFS, ENOMEM, EPERM, ...: fatal to gRPC's
             * listener. Shed what waits and report "nothing to accept". */
            if (e == EMFILE || e == ENFILE) {
                if (shed(fd)) continue;
            }
            errno = EAGAIN;
            return -1;
        }
        if ((size_t)c >= g.n_slot) {
            refuse(c, "msad: out of file descriptors; retry later");
            continue;
        }
        if (atomic_fetch_add(&g.open, 1) >= g.max) {
            atomic_fetch_sub(&g.open, 1);
            char why[96];
            snprintf(why, sizeof(why), "msad: too many connections (%u, --max-connections)", g.max);
            refuse(c, why);
            continue;
        }
        atomic_store(&slot[c], 1);
        atomic_fetch_add(&g.accepted, 1);
        return c;
    }
    errno = EAGAIN;
    return -1;
}

int close(int fd)
{
    atomic_uchar *slot = atomic_load(&g.slot);
    /* Clear before the real close: once closed, the number may be reused by
     * a concurrent accept, which must find the slot free. */
    if (slot && fd >= 0 && (size_t)fd < g.n_slot && atomic_exchange(&slot[fd], 0))
        atomic_fetch_sub(&g.open, 1);
    close_fn f = real_close();
    if (!f) {
        errno = ENOSYS;
        return -1;
    }
    return f(fd);
}
