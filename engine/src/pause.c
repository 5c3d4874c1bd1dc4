/* The pause guard (see forkd/pause.h). */
#include "pause.h"

struct pause_guard pause_guard_begin(struct vm *vm, struct forkd_error *err)
{
    struct pause_guard guard = {.vm = vm};
    thread_priority_raise(&guard.priority);
    guard.requested_ns = forkd_monotonic_ns();
    guard.rc = vm_pause(vm, err);
    if (guard.rc == 0) {
        guard.paused_ns = forkd_monotonic_ns();
        guard.paused = true;
    } else {
        thread_priority_restore(&guard.priority);
    }
    return guard;
}

int pause_guard_resume(struct pause_guard *guard, struct forkd_error *err)
{
    if (!guard->paused)
        return 0;
    guard->paused = false;
    guard->resume_requested_ns = forkd_monotonic_ns();
    int rc = vm_resume(guard->vm, err);
    guard->resumed_ns = forkd_monotonic_ns();
    thread_priority_restore(&guard->priority);
    return rc;
}

void pause_guard_release(struct pause_guard *guard)
{
    guard->released = true;
    thread_priority_restore(&guard->priority);
}

uint64_t pause_guard_window_ns(const struct pause_guard *guard)
{
    return guard->resumed_ns ? guard->resumed_ns - guard->requested_ns : 0;
}

void pause_guard_cleanup(struct pause_guard *guard)
{
    if (!guard->paused || guard->released)
        return;
    /* An error path: the caller's report already says what failed; a failed resume is kept
     * in the guard rather than overwriting it. */
    struct forkd_error resume_err;
    guard->cleanup_resume_rc = pause_guard_resume(guard, &resume_err);
}
