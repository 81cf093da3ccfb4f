/* msactl.h — internals shared by the msactl source files (not a public API).
 *
 * msactl.c holds main, global options, output helpers and the small commands;
 * msactl_data.c the data commands (docs, put, route, attend); msactl_bench.c bench.
 * Every command is `int cmd_x(ctl_t *ctl, int argc, char **argv)` with argv[0] the
 * command's own name, and returns the process exit code.
 */
#ifndef MSACTL_H
#define MSACTL_H

#include "msaclient.h"

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdint.h>

/* Exit codes (also in `msactl --help`). */
#define EXIT_OK 0
#define EXIT_SERVER 1   /* the server (or the transport) answered an error */
#define EXIT_USAGE 2    /* bad command line, unreadable or malformed input file */
#define EXIT_PROBLEMS 3 /* verify found problems; health: not serving */

typedef struct ctl {
    msa_cli_options_t opt; /* connection options from the command line */
    msa_cli_t *c;          /* connected lazily by ctl_conn() */
    bool json;             /* --json: machine-readable stdout */
    bool progress;         /* stdout and stderr are terminals */
} ctl_t;

/* Connects on first use; on failure prints the error and exits EXIT_USAGE. */
msa_cli_t *ctl_conn(ctl_t *ctl);

/* Prints "msactl: <GRPC_NAME>: message" (and a JSON error object on stdout with
 * --json); returns EXIT_SERVER. */
int ctl_fail(ctl_t *ctl, const msa_cli_status_t *st);
/* Prints "msactl: message" for a usage error and returns EXIT_USAGE. */
int ctl_usage(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Options shared by every command (--json, --addr, ...) found after the command name.
 * Returns true when argv[*i] was one (and advances *i past its value). */
bool ctl_common_opt(ctl_t *ctl, int argc, char **argv, int *i);
/* Matches "--name VALUE" or "--name=VALUE" at argv[*i]; advances *i past the value.
 * A missing value is a usage error (exits EXIT_USAGE). */
bool ctl_arg(int argc, char **argv, int *i, const char *name, const char **val);
bool ctl_is_help(const char *a);

/* Number parsing; on a bad number they print a usage error and exit EXIT_USAGE. */
uint64_t ctl_u64(const char *name, const char *s);
uint32_t ctl_u32(const char *name, const char *s);
double ctl_double(const char *name, const char *s);
/* "1,2,5-7" into a malloc'ed array. */
size_t ctl_u64_list(const char *name, const char *s, uint64_t **out);

/* JSON helpers: uint64 as an exact number. */
void jadd_u64(cJSON *o, const char *key, uint64_t v);
cJSON *ju64(uint64_t v);
/* Prints and frees j (pretty). */
void jprint(cJSON *j);

/* Progress bar on stderr when ctl->progress; done <= total. */
void ctl_progress(ctl_t *ctl, const char *label, uint64_t done, uint64_t total);
void ctl_progress_end(ctl_t *ctl);

/* Human sizes: "1.5 GiB" into buf. */
const char *ctl_bytes(uint64_t b, char *buf, size_t len);
double ctl_now(void); /* monotonic seconds */

int cmd_docs(ctl_t *ctl, int argc, char **argv);
int cmd_put(ctl_t *ctl, int argc, char **argv);
int cmd_route(ctl_t *ctl, int argc, char **argv);
int cmd_attend(ctl_t *ctl, int argc, char **argv);
int cmd_bench(ctl_t *ctl, int argc, char **argv);

/* Fills a collection schema from flags; shared by `collections create` and `bench`.
 * Returns true when argv[*i] was a schema flag. Layers are malloc'ed into s. */
bool ctl_schema_opt(Msa__V1__CollectionSchema *s, int argc, char **argv, int *i);
/* Describes a schema as JSON (enum names as strings; what --schema-json reads). */
cJSON *ctl_schema_json(const Msa__V1__CollectionSchema *s);
cJSON *ctl_info_json(const Msa__V1__CollectionInfo *ci);

#endif
