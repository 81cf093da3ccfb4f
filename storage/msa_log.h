/* msa_log.h — leveled logging to stderr, text or JSON lines.
 *
 * The level check happens before the arguments are evaluated. The level and the
 * format are process-wide settings made once at start-up (msad's flags); the
 * writer serialises lines so concurrent threads do not interleave.
 */
#ifndef MSA_LOG_H
#define MSA_LOG_H

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    MSA_LOG_DEBUG = 0,
    MSA_LOG_INFO,
    MSA_LOG_WARN,
    MSA_LOG_ERROR,
    MSA_LOG_OFF
} msa_log_level_t;

extern int msa__log_level; /* read-mostly; set by msa_log_setup */

/* level: "debug|info|warn|error|off"; json: one JSON object per line. Returns
 * MSA_EINVAL (nothing changed) for an unknown level name. */
int msa_log_setup(const char *level, int json);
void msa__log(int level, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define msa_log(level, ...)                                                                \
    do {                                                                                   \
        if ((level) >= msa__log_level) msa__log((level), __FILE__, __LINE__, __VA_ARGS__); \
    } while (0)

#ifdef __cplusplus
}
#endif
#endif
