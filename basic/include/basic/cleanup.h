/*
 * RAII-style cleanup helpers built on __attribute__((cleanup)), in the manner of systemd and
 * crun. A variable declared with one of these is released when it goes out of scope; hand it
 * on with take_ptr()/take_fd() to keep it alive past the scope.
 */
#ifndef FORKD_CLEANUP_H
#define FORKD_CLEANUP_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static inline void forkd_freep(void *p)
{
    free(*(void **)p);
}

static inline void forkd_closep(int *fd)
{
    if (*fd >= 0) {
        int saved = errno; /* close() must not clobber the errno a caller is reporting */
        close(*fd);
        errno = saved;
    }
}

static inline void forkd_fclosep(FILE **f)
{
    if (*f)
        fclose(*f);
}

#define _cleanup_(fn)    __attribute__((cleanup(fn)))
#define _cleanup_free_   _cleanup_(forkd_freep)
#define _cleanup_close_  _cleanup_(forkd_closep)
#define _cleanup_fclose_ _cleanup_(forkd_fclosep)

/* Returns *pp and clears it, so the cleanup handler no longer frees it. */
#define take_ptr(p)                                                                                \
    ({                                                                                             \
        typeof(p) _taken = (p);                                                                    \
        (p) = NULL;                                                                                \
        _taken;                                                                                    \
    })

#define take_fd(fd)                                                                                \
    ({                                                                                             \
        int _taken = (fd);                                                                         \
        (fd) = -1;                                                                                 \
        _taken;                                                                                    \
    })

#endif
