/*
 * The pool of threads that run calls whose request has arrived (see call.h). Threads are
 * started on demand up to a maximum and kept for a while when idle, so a steady load does not
 * pay a thread start per call, and a burst ends with the pool shrinking back. The pool never
 * refuses work itself: the server admits at most as many calls as the pool has threads.
 */
#ifndef FORKD_SERVICE_WORKERS_H
#define FORKD_SERVICE_WORKERS_H

#include <stdbool.h>

struct rpc_call;
struct worker_pool;

/* run is called on a pool thread once per submitted call. */
typedef void (*worker_run_fn)(struct rpc_call *call, void *context);

/* Returns 0 or -ENOMEM. */
int worker_pool_new(unsigned max_threads, unsigned idle_ms, worker_run_fn run, void *context,
                    struct worker_pool **out);

/* Queues call for a thread; starts one if none is idle and the maximum allows. Returns 0, or a
 * negative errno when no thread exists and none can be started (then the call is not queued).
 * Never blocks on a call. */
int worker_pool_submit(struct worker_pool *pool, struct rpc_call *call);

/* Threads alive now (for logs and tests). */
unsigned worker_pool_threads(struct worker_pool *pool);

/* Waits for the queue to drain and every thread to exit, then frees the pool. */
void worker_pool_free(struct worker_pool *pool);

#endif
