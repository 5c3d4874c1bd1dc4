/* Real-time priority for latency-critical threads (see forkd/thread_priority.h). */
#include "thread_priority.h"

#include <errno.h>
#include <pthread.h>

int thread_priority_raise(struct thread_priority *saved)
{
    saved->raised = false;
    int rc = pthread_getschedparam(pthread_self(), &saved->policy, &saved->param);
    if (rc != 0)
        return -rc;
    struct sched_param fifo = {.sched_priority = 1};
    rc = pthread_setschedparam(pthread_self(), SCHED_FIFO, &fifo);
    if (rc != 0)
        return -rc;
    saved->raised = true;
    return 0;
}

void thread_priority_restore(struct thread_priority *saved)
{
    if (!saved->raised)
        return;
    pthread_setschedparam(pthread_self(), saved->policy, &saved->param);
    saved->raised = false;
}
