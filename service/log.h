/*
 * Leveled logging to stderr, one line per record: time, level, message. Thread-safe (one
 * fprintf per record). The level is set once at start-up from --log-level.
 */
#ifndef FORKD_SERVICE_LOG_H
#define FORKD_SERVICE_LOG_H

#include <stddef.h>

enum log_level { LOG_LEVEL_ERROR, LOG_LEVEL_WARN, LOG_LEVEL_INFO, LOG_LEVEL_DEBUG };

void log_set_level(enum log_level level);
/* Parses "error", "warn", "info" or "debug"; returns 0 or -EINVAL. */
int log_parse_level(const char *text, enum log_level *out);
void log_write(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_error(...) log_write(LOG_LEVEL_ERROR, __VA_ARGS__)
#define log_warn(...)  log_write(LOG_LEVEL_WARN, __VA_ARGS__)
#define log_info(...)  log_write(LOG_LEVEL_INFO, __VA_ARGS__)
#define log_debug(...) log_write(LOG_LEVEL_DEBUG, __VA_ARGS__)

/* Copies in to out (NUL-terminated, truncated to out_size), control characters (below 0x20,
 * and 0x7f) written as \xNN: text from clients reaches logs and status messages, and must not
 * forge log lines or drive terminals. */
void log_escape(const char *in, char *out, size_t out_size);

#endif
