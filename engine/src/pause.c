/* The pause guard (see pause.h). */
#include "pause.h"

#include <errno.h>
#include <stdio.h>

#define PAUSE_RESUME_ATTEMPTS 3

/* Resumes, retrying a resume that failed while the VMM lives; a resume that timed out may have
 * taken effect after its time limit, so the VMM is asked before the next attempt. */
static int pause_resume_retrying(struct vm *vm, struct forkd_error *err)
{
    int rc = 0;
    for (int attempt = 0; attempt < PAUSE_RESUME_ATTEMPTS; attempt++) {
        rc = vm_resume(vm, err);
        if (rc == 0 || !vm_is_alive(vm))
            return rc;
        enum vm_state state;
        if (vm_query_state(vm, &state, NULL) == 0 && state == VM_STATE_RUNNING)
            return 0;
    }
    return rc;
}

/* The pause request failed, but the VMM may pause anyway (after the client's time limit): ask
 * it, and resume it unless the guard found it paused. err keeps the pause's error code; its
 * message says what became of the VM. */
static void pause_guard_undo_failed_pause(struct pause_guard *guard, struct forkd_error *err)
{
    if (!vm_is_alive(guard->vm))
        return;
    char cause[FORKD_ERROR_MESSAGE_MAX];
    snprintf(cause, sizeof(cause), "%s", err ? err->message : "the pause failed");
    struct forkd_error step_err = {0};
    enum vm_state state;
    if (vm_query_state(guard->vm, &state, &step_err) < 0) {
        forkd_error_set(err, guard->rc, "%s; the VM's state is unknown afterwards: %s", cause,
                        step_err.message);
        return;
    }
    if (state != VM_STATE_PAUSED || guard->found_paused) {
        forkd_error_set(err, guard->rc, "%s; the VM is %s", cause,
                        state == VM_STATE_PAUSED ? "paused, as it was" : "running");
        return;
    }
    if (pause_resume_retrying(guard->vm, &step_err) == 0)
        forkd_error_set(err, guard->rc, "%s; the VMM paused afterwards and was resumed", cause);
    else
        forkd_error_set(err, guard->rc,
                        "%s; the VMM paused afterwards and could not be resumed (%d attempts): %s",
                        cause, PAUSE_RESUME_ATTEMPTS, step_err.message);
}

struct pause_guard pause_guard_begin(struct vm *vm, struct forkd_error *err)
{
    struct pause_guard guard = {.vm = vm};
    guard.found_paused = vm_recorded_state(vm) == VM_STATE_PAUSED;
    thread_priority_raise(&guard.priority);
    guard.requested_ns = forkd_monotonic_ns();
    guard.rc = vm_pause(vm, err);
    if (guard.rc == 0) {
        guard.paused_ns = forkd_monotonic_ns();
        guard.paused = true;
    } else {
        thread_priority_restore(&guard.priority);
        pause_guard_undo_failed_pause(&guard, err);
    }
    return guard;
}

int pause_guard_resume(struct pause_guard *guard, struct forkd_error *err)
{
    if (!guard->paused)
        return 0;
    guard->paused = false;
    guard->resume_requested_ns = forkd_monotonic_ns();
    int rc = guard->found_paused ? 0 : pause_resume_retrying(guard->vm, err);
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
