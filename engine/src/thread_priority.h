/*
 * Real-time priority for the few threads whose latency a guest feels: the thread inside a
 * branch's pause window and the write-fault handler. On a host whose cores are busy (the VM's
 * own vCPUs among them), an ordinary thread that wakes up may wait a whole scheduler tick
 * (4 ms at HZ=250) for a core; SCHED_FIFO runs it at once. Both threads only block or do
 * bounded work, so they cannot starve the host.
 */
#ifndef FORKD_THREAD_PRIORITY_H
#define FORKD_THREAD_PRIORITY_H

#include <sched.h>
#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

struct thread_priority {
    bool raised;
    int policy;
    struct sched_param param;
};

/* Moves the calling thread to SCHED_FIFO priority 1, remembering its policy in saved.
 * Returns 0, or -EPERM when the process may not (then nothing changed). */
int thread_priority_raise(struct thread_priority *saved);

/* Puts the calling thread back to what thread_priority_raise saved (no-op if not raised). */
void thread_priority_restore(struct thread_priority *saved);

#ifdef __cplusplus
}
#endif

#endif
