/*
 * Error reporting convention of forkd-testvm: a failing function returns a negative errno and
 * writes a sentence of context into the caller's buffer. error_set() does both in one line.
 */
#ifndef FORKD_TESTVM_VMM_ERROR_H
#define FORKD_TESTVM_VMM_ERROR_H

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>

/* Formats the message into err (if any) and returns -errnum, so callers can `return
 * error_set(...)`. */
__attribute__((format(printf, 4, 5))) static inline int error_set(char *err, size_t err_size,
                                                                  int errnum, const char *fmt, ...)
{
    if (err && err_size) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, err_size, fmt, ap);
        va_end(ap);
    }
    return errnum > 0 ? -errnum : (errnum < 0 ? errnum : -EINVAL);
}

#endif
