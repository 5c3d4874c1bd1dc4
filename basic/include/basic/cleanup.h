/*
 * RAII-style cleanup helpers built on __attribute__((cleanup)), in the manner of systemd and
 * crun. A variable declared with one of these is released when it goes out of scope; hand it
 * on with take_ptr()/take_fd() to keep it alive past the scope.
 */
#ifndef FORKD_CLEANUP_H
#define FORKD_CLEANUP_H

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

/* Elements of an array (not a pointer). */
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* Defines name##p(type *), calling func on a non-NULL value: the cleanup handler of a pointer
 * type whose release function does not accept NULL. */
#define FORKD_DEFINE_CLEANUP(type, func)                                                           \
    static inline void func##p(type *p)                                                            \
    {                                                                                              \
        if (*p)                                                                                    \
            func(*p);                                                                              \
    }

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

FORKD_DEFINE_CLEANUP(FILE *, fclose)
FORKD_DEFINE_CLEANUP(DIR *, closedir)

/* A child process that must not outlive the scope: killed and reaped, so it is neither left
 * running nor left a zombie. 0 or less means none. */
static inline void forkd_kill_reapp(pid_t *pid)
{
    if (*pid <= 0)
        return;
    int saved = errno;
    kill(*pid, SIGKILL);
    while (waitpid(*pid, NULL, 0) < 0 && errno == EINTR)
        ;
    errno = saved;
}

#define _cleanup_(fn)      __attribute__((cleanup(fn)))
#define _cleanup_free_     _cleanup_(forkd_freep)
#define _cleanup_close_    _cleanup_(forkd_closep)
#define _cleanup_fclose_   _cleanup_(fclosep)
#define _cleanup_closedir_ _cleanup_(closedirp)
#define _cleanup_pid_      _cleanup_(forkd_kill_reapp)

/* Returns *pp and clears it, so the cleanup handler no longer frees it. */
#define take_ptr(p)                                                                                \
    ({                                                                                             \
        typeof(p) _taken = (p);                                                                    \
        (p) = NULL;                                                                                \
        _taken;                                                                                    \
    })

#define take_pid(pid)                                                                              \
    ({                                                                                             \
        pid_t _taken = (pid);                                                                      \
        (pid) = 0;                                                                                 \
        _taken;                                                                                    \
    })

#define take_fd(fd)                                                                                \
    ({                                                                                             \
        int _taken = (fd);                                                                         \
        (fd) = -1;                                                                                 \
        _taken;                                                                                    \
    })

#endif
