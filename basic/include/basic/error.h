/*
 * The engine's error report: every fallible engine function returns 0 or a negative errno-style
 * code and, on failure, fills a caller-provided struct forkd_error with the same code and a
 * message that names what failed and why ("PUT /snapshot/create: 400: <fault_message>").
 */
#ifndef FORKD_ERROR_H
#define FORKD_ERROR_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FORKD_ERROR_MESSAGE_MAX 512

struct forkd_error {
    int code; /* negative errno, 0 when no error was recorded */
    char message[FORKD_ERROR_MESSAGE_MAX];
};

/* Records code (negative errno) and a printf-style message; returns code so callers can write
 * `return forkd_error_set(err, -EINVAL, "...")`. err may be NULL. */
int forkd_error_set(struct forkd_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* The same for a failed system call: the message gets ": " and strerror(-code) appended
 * ("create /x: No such file or directory"). Pass -errno before anything can change errno. */
int forkd_error_errno(struct forkd_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prefixes the message already in err with more context ("branch vm-1: " + message).
 * Returns err->code; without err (a caller that wants no report), -EIO: never 0. */
int forkd_error_prefix(struct forkd_error *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

void forkd_error_clear(struct forkd_error *err);

#ifdef __cplusplus
}
#endif

#endif
