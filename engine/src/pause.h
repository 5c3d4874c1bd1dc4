/*
 * The pause guard: pauses a VM and guarantees it is back in the state the guard found on every
 * exit path of the scope that declared the guard, unless the guard was released: a VM that was
 * running is resumed, one that was already paused (a fork started paused) stays paused. Records
 * the pause window (from the pause request to the resume acknowledgement). The declaring thread
 * runs at real-time priority from the pause request to the resume (see forkd/thread_priority.h).
 *
 * A pause request that fails may still take effect (a request that timed out leaves a VMM that
 * goes on to pause): the guard then asks the VMM for its state and resumes what it finds
 * paused. A resume that fails is retried, and one that timed out is checked the same way; the
 * error says what state the VM was left in.
 *
 *     FORKD_PAUSE_GUARD(guard, vm, err);
 *     if (guard.rc < 0)
 *         return guard.rc;               // not paused; nothing to undo
 *     ... any return from here resumes the VM ...
 *     rc = pause_guard_resume(&guard, err);   // explicit resume, figures final
 */
#ifndef FORKD_PAUSE_H
#define FORKD_PAUSE_H

#include "basic/clock.h"
#include "basic/error.h"
#include "thread_priority.h"
#include "forkd/vm.h"

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct pause_guard {
    struct vm *vm;
    int rc;                       /* result of the pause request */
    bool paused;                  /* paused and not yet resumed */
    bool found_paused;            /* paused before the guard: left paused */
    bool released;                /* leave paused at scope exit */
    uint64_t requested_ns;        /* CLOCK_MONOTONIC at the pause request */
    uint64_t paused_ns;           /* at the pause acknowledgement */
    uint64_t resumed_ns;          /* at the resume acknowledgement */
    uint64_t resume_requested_ns; /* when the resume request went out */
    int cleanup_resume_rc;        /* result of a resume done by the cleanup */
    /* The calling thread runs at real-time priority while the VM is paused (when permitted),
     * so a busy host does not stretch the pause by a scheduler tick per wake-up. */
    struct thread_priority priority;
};

struct pause_guard pause_guard_begin(struct vm *vm, struct forkd_error *err);
/* Resumes now (or leaves paused a VM the guard found paused). Returns 0 or the VMM's error; the
 * guard is disarmed either way. */
int pause_guard_resume(struct pause_guard *guard, struct forkd_error *err);
/* Leaves the VM paused at scope exit. */
void pause_guard_release(struct pause_guard *guard);
/* The pause window in ns: request to resume acknowledgement (0 before the resume). */
uint64_t pause_guard_window_ns(const struct pause_guard *guard);
void pause_guard_cleanup(struct pause_guard *guard);

#define FORKD_PAUSE_GUARD(guard, vm, err)                                                          \
    struct pause_guard guard __attribute__((cleanup(pause_guard_cleanup))) =                       \
        pause_guard_begin((vm), (err))

#ifdef __cplusplus
}
#endif

#endif
