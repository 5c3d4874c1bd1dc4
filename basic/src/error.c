/* The engine's error report (see forkd/error.h). */
#include "basic/error.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int forkd_error_set(struct forkd_error *err, int code, const char *fmt, ...)
{
    if (!err)
        return code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
    err->code = code;
    return code;
}

int forkd_error_errno(struct forkd_error *err, int code, const char *fmt, ...)
{
    if (!err)
        return code;
    va_list ap;
    va_start(ap, fmt);
    int used = vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
    if (used >= 0 && (size_t)used < sizeof(err->message))
        snprintf(err->message + used, sizeof(err->message) - (size_t)used, ": %s", strerror(-code));
    err->code = code;
    return code;
}

int forkd_error_prefix(struct forkd_error *err, const char *fmt, ...)
{
    if (!err) /* the code went nowhere either: still a failure, never success */
        return -EIO;
    char prefix[FORKD_ERROR_MESSAGE_MAX];
    char old[FORKD_ERROR_MESSAGE_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof(prefix), fmt, ap);
    va_end(ap);
    memcpy(old, err->message, sizeof(old));
    /* Truncation keeps the start of the message, which names the failing step first. */
    size_t used = strnlen(prefix, sizeof(err->message) - 1);
    memcpy(err->message, prefix, used);
    size_t room = sizeof(err->message) - 1 - used;
    size_t tail = strnlen(old, room);
    memcpy(err->message + used, old, tail);
    err->message[used + tail] = '\0';
    return err->code;
}

void forkd_error_clear(struct forkd_error *err)
{
    if (!err)
        return;
    err->code = 0;
    err->message[0] = '\0';
}
