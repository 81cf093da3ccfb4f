/* fuzz_config.c — libFuzzer target for msad's flags and config file parser
 * (rpc/config.c, msa_rpc_opts_parse).
 *
 * Input: NUL-separated segments. Segment 0 is the text of a config file,
 * written to a per-process temporary file; every further segment is one argv
 * entry after "msad", where the entry "@cfg" stands for that file's path (so
 * "--config\0@cfg" or "--config=@cfg" read it). The parser must never crash
 * or leak, must name the source of every error, and a successful parse must
 * hold the invariants msad.c relies on (a listen address, a data dir, a log
 * level, TLS cert and key together, a client CA only with them).
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHECK(cond, ...)                                                                          \
    do {                                                                                          \
        if (!(cond)) {                                                                            \
            fprintf(stderr, "fuzz_config: %s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                                         \
            fputc('\n', stderr);                                                                  \
            abort();                                                                              \
        }                                                                                         \
    } while (0)

#define MAX_ARGS 64

static char cfg_path[256];

static void at_exit(void)
{
    if (cfg_path[0]) unlink(cfg_path);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    const char *tmp = getenv("TMPDIR");
    if (!tmp) tmp = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(cfg_path, sizeof cfg_path, "%s/msa-fuzz-config-XXXXXX", tmp);
    int fd = mkstemp(cfg_path);
    if (fd < 0) {
        perror("fuzz_config: mkstemp");
        abort();
    }
    close(fd);
    atexit(at_exit);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* One NUL-terminated copy; segments point into it. */
    char *buf = malloc(size + 1);
    memcpy(buf, data, size);
    buf[size] = '\0';
    size_t cfg_len = strnlen(buf, size);
    FILE *f = fopen(cfg_path, "w");
    CHECK(f, "cannot write %s", cfg_path);
    fwrite(buf, 1, cfg_len, f);
    fclose(f);

    char *argv[MAX_ARGS + 1];
    char *owned[MAX_ARGS];
    int argc = 0, n_owned = 0;
    argv[argc++] = (char *)"msad";
    for (size_t i = cfg_len + 1; i < size && argc < MAX_ARGS; i += strlen(buf + i) + 1) {
        char *a = buf + i;
        char *at = strstr(a, "@cfg");
        if (at) {
            /* Substitute the path for the first "@cfg". */
            size_t pre = (size_t)(at - a), len = pre + strlen(cfg_path) + strlen(at + 4) + 1;
            char *s = malloc(len);
            snprintf(s, len, "%.*s%s%s", (int)pre, a, cfg_path, at + 4);
            owned[n_owned++] = s;
            a = s;
        }
        argv[argc++] = a;
    }
    argv[argc] = NULL;

    msa_rpc_opts_t o;
    msa_status_t st;
    msa_status_clear(&st);
    int rc = msa_rpc_opts_parse(argc, argv, &o, &st);
    if (rc != MSA_OK) {
        CHECK(rc == MSA_EINVAL || rc == MSA_EIO || rc == MSA_ENOMEM, "rc %d", rc);
        CHECK(st.code == rc && st.msg[0], "error %d without a message", rc);
    } else if (o.action == MSA_RPC_RUN) {
        CHECK(o.n_listen >= 1 && o.listen, "no listen address");
        for (size_t i = 0; i < o.n_listen; i++)
            CHECK(o.listen[i] && o.listen[i][0], "empty listen[%zu]", i);
        CHECK(o.data_dir && o.data_dir[0], "no data dir");
        CHECK(o.log_level, "no log level");
        CHECK(!!o.tls_cert == !!o.tls_key, "cert without key");
        CHECK(!o.tls_client_ca || o.tls_cert, "client CA without cert");
        CHECK(o.max_message_mb >= 1 && o.max_message_mb <= 2047, "max_message_mb %u",
              o.max_message_mb);
        CHECK(o.backend <= MSA_BACKEND_CUDA, "backend %d", (int)o.backend);
    }
    msa_rpc_opts_free(&o);
    for (int i = 0; i < n_owned; i++) free(owned[i]);
    free(buf);
    return 0;
}
