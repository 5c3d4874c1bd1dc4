/*
 * Real-time priority for the few threads whose latency a guest feels: the thread inside a
 * branch's pause window and the threads serving write and missing-page faults. On a host whose
 * cores are busy (the VM's own vCPUs among them), an ordinary thread that wakes up may wait a
 * whole scheduler tick (4 ms at HZ=250) for a core; SCHED_FIFO runs it at once.
 *
 * Real-time is bounded: a raised thread that keeps a core busy (more than max_percent of it over
 * a 100 ms window, checked each time it calls thread_priority_check) goes back to its normal
 * priority for good, so a burst of faults on a small or emulated host cannot starve the kernel's
 * own threads. The whole mechanism can be switched off (forkd --no-realtime).
 */
#ifndef FORKD_THREAD_PRIORITY_H
#define FORKD_THREAD_PRIORITY_H

#include <sched.h>
#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct thread_priority {
    bool raised;
    int policy;
    struct sched_param param;
    uint64_t window_start_ns; /* CLOCK_MONOTONIC, start of the current usage window */
    uint64_t window_cpu_ns;   /* the thread's CPU time at that start */
};

/* Process-wide policy, set once at start-up before threads raise themselves (later calls apply
 * to later raises and checks). enabled false: thread_priority_raise does nothing. max_percent in
 * 1..100 (0 means 50). Defaults: enabled, 50. */
void thread_priority_configure(bool enabled, unsigned max_percent);

/* Moves the calling thread to SCHED_FIFO priority 1, remembering its policy in saved.
 * Returns 0; -ECANCELED when real-time is switched off, -EPERM when the process may not (in
 * both cases nothing changed). */
int thread_priority_raise(struct thread_priority *saved);

/* For raised threads that loop: true while the thread stays raised. Demotes the thread (as
 * thread_priority_restore) once it used more than the allowed share of a core over a window. */
bool thread_priority_check(struct thread_priority *saved);

/* Puts the calling thread back to what thread_priority_raise saved (no-op if not raised). */
void thread_priority_restore(struct thread_priority *saved);

/* How many raised threads were demoted for using too much CPU since the process started. */
unsigned long thread_priority_demotions(void);

#ifdef __cplusplus
}
#endif

#endif
