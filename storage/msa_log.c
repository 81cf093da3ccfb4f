#include "msa_log.h"

#include "msa_err.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

int msa__log_level = MSA_LOG_INFO;
static int log_json;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static const char *const level_names[] = {"debug", "info", "warn", "error", "off"};

int msa_log_setup(const char *level, int json)
{
    for (int i = 0; i <= MSA_LOG_OFF; i++) {
        if (level && strcmp(level, level_names[i]) == 0) {
            msa__log_level = i;
            log_json = json;
            return MSA_OK;
        }
    }
    return MSA_EINVAL;
}

/* Escapes a message for a JSON string value. */
static void put_json_string(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

/* Writes a message for the text format: control characters are escaped
 * (\n, \r, \t, \xNN), so a field taken from a request (a backup name, a
 * collection name) cannot start a forged log line or move the cursor. */
static void put_text(FILE *f, const char *s)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '\n')
            fputs("\\n", f);
        else if (c == '\r')
            fputs("\\r", f);
        else if (c == '\t')
            fputs("\\t", f);
        else if (c < 0x20 || c == 0x7f)
            fprintf(f, "\\x%02x", c);
        else
            fputc(c, f);
    }
}

void msa__log(int level, const char *file, int line, const char *fmt, ...)
{
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);

    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char when[40];
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
    const char *base = strrchr(file, '/');
    base = base ? base + 1 : file;
    if (level < 0 || level > MSA_LOG_ERROR) level = MSA_LOG_ERROR;

    pthread_mutex_lock(&log_lock);
    if (log_json) {
        fprintf(stderr, "{\"ts\":\"%s.%03ldZ\",\"level\":\"%s\",\"src\":\"%s:%d\",\"msg\":", when,
                ts.tv_nsec / 1000000, level_names[level], base, line);
        put_json_string(stderr, msg);
        fputs("}\n", stderr);
    } else {
        fprintf(stderr, "%s.%03ldZ %-5s ", when, ts.tv_nsec / 1000000, level_names[level]);
        put_text(stderr, msg);
        fprintf(stderr, " (%s:%d)\n", base, line);
    }
    fflush(stderr);
    pthread_mutex_unlock(&log_lock);
}
