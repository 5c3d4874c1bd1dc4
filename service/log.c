/* Leveled logging to stderr (see log.h). */
#include "log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static _Atomic int log_threshold = LOG_LEVEL_INFO;
static const char *const log_level_names[] = {"error", "warn", "info", "debug"};

void log_set_level(enum log_level level)
{
    atomic_store(&log_threshold, (int)level);
}

int log_parse_level(const char *text, enum log_level *out)
{
    for (int i = LOG_LEVEL_ERROR; i <= LOG_LEVEL_DEBUG; i++) {
        if (strcmp(text, log_level_names[i]) == 0) {
            *out = (enum log_level)i;
            return 0;
        }
    }
    return -EINVAL;
}

void log_escape(const char *in, char *out, size_t out_size)
{
    static const char hex[] = "0123456789abcdef";
    size_t at = 0;
    for (; *in && at + 1 < out_size; in++) {
        unsigned char c = (unsigned char)*in;
        if (c >= 0x20 && c != 0x7f) {
            out[at++] = (char)c;
            continue;
        }
        if (at + 4 >= out_size)
            break;
        out[at++] = '\\';
        out[at++] = 'x';
        out[at++] = hex[c >> 4];
        out[at++] = hex[c & 15];
    }
    if (out_size)
        out[at] = '\0';
}

void log_write(enum log_level level, const char *fmt, ...)
{
    if ((int)level > atomic_load(&log_threshold))
        return;
    char raw[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(raw, sizeof(raw), fmt, ap);
    va_end(ap);
    char message[1024];
    log_escape(raw, message, sizeof(message));

    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    struct tm tm;
    gmtime_r(&now.tv_sec, &tm);
    char stamp[32];
    strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &tm);
    fprintf(stderr, "%s.%03ldZ forkd %-5s %s\n", stamp, now.tv_nsec / 1000000,
            log_level_names[level], message);
}
