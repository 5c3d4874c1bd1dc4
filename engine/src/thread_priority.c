/* Real-time priority for latency-critical threads, bounded (see thread_priority.h). */
#include "thread_priority.h"

#include "basic/clock.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

/* Long enough to see a thread's duty cycle, short enough that a runaway is caught quickly. */
#define PRIORITY_WINDOW_NS 100000000ULL

static atomic_bool priority_enabled = true;
static atomic_uint priority_max_percent = 50;
static atomic_ulong priority_demoted;

void thread_priority_configure(bool enabled, unsigned max_percent)
{
    atomic_store(&priority_enabled, enabled);
    atomic_store(&priority_max_percent, max_percent >= 1 && max_percent <= 100 ? max_percent : 50);
}

static uint64_t thread_cpu_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
    return (uint64_t)now.tv_sec * 1000000000ULL + (uint64_t)now.tv_nsec;
}

static void thread_priority_start_window(struct thread_priority *saved)
{
    saved->window_start_ns = forkd_monotonic_ns();
    saved->window_cpu_ns = thread_cpu_ns();
}

int thread_priority_raise(struct thread_priority *saved)
{
    saved->raised = false;
    if (!atomic_load(&priority_enabled))
        return -ECANCELED;
    int rc = pthread_getschedparam(pthread_self(), &saved->policy, &saved->param);
    if (rc != 0)
        return -rc;
    struct sched_param fifo = {.sched_priority = 1};
    rc = pthread_setschedparam(pthread_self(), SCHED_FIFO, &fifo);
    if (rc != 0)
        return -rc;
    saved->raised = true;
    thread_priority_start_window(saved);
    return 0;
}

bool thread_priority_check(struct thread_priority *saved)
{
    if (!saved->raised)
        return false;
    uint64_t elapsed = forkd_monotonic_ns() - saved->window_start_ns;
    if (elapsed < PRIORITY_WINDOW_NS)
        return true;
    uint64_t used = thread_cpu_ns() - saved->window_cpu_ns;
    if (used * 100 > elapsed * atomic_load(&priority_max_percent)) {
        thread_priority_restore(saved);
        atomic_fetch_add(&priority_demoted, 1);
        return false;
    }
    thread_priority_start_window(saved);
    return true;
}

void thread_priority_restore(struct thread_priority *saved)
{
    if (!saved->raised)
        return;
    pthread_setschedparam(pthread_self(), saved->policy, &saved->param);
    saved->raised = false;
}

unsigned long thread_priority_demotions(void)
{
    return atomic_load(&priority_demoted);
}
