/* The call worker pool (see workers.h). */
#include "workers.h"

#include "call.h"

#include "basic/clock.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>

struct worker_pool {
    pthread_mutex_t lock;
    pthread_cond_t work;    /* a call was queued, or the pool is closing */
    pthread_cond_t exited;  /* a thread exited */
    struct rpc_call *head;  /* FIFO of calls waiting for a thread, linked by worker_next */
    struct rpc_call *tail;
    unsigned queued;
    unsigned threads;
    unsigned idle;
    unsigned max_threads;
    unsigned idle_ms;
    bool closing;
    worker_run_fn run;
    void *context;
};

static struct rpc_call *worker_pool_pop(struct worker_pool *pool)
{
    struct rpc_call *call = pool->head;
    pool->head = call->worker_next;
    if (!pool->head)
        pool->tail = NULL;
    call->worker_next = NULL;
    pool->queued--;
    return call;
}

/* Waits for a call; NULL when the thread should exit (idle too long, or the pool closing). */
static struct rpc_call *worker_pool_next(struct worker_pool *pool)
{
    struct timespec deadline = forkd_realtime_after_ms(pool->idle_ms);
    pool->idle++;
    int rc = 0;
    while (!pool->head && !pool->closing && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&pool->work, &pool->lock, &deadline);
    pool->idle--;
    return pool->head ? worker_pool_pop(pool) : NULL;
}

static void *worker_pool_thread(void *arg)
{
    struct worker_pool *pool = arg;
    pthread_mutex_lock(&pool->lock);
    struct rpc_call *call;
    while ((call = worker_pool_next(pool)) != NULL) {
        pthread_mutex_unlock(&pool->lock);
        pool->run(call, pool->context);
        pthread_mutex_lock(&pool->lock);
    }
    pool->threads--;
    pthread_cond_broadcast(&pool->exited);
    pthread_mutex_unlock(&pool->lock);
    return NULL;
}

int worker_pool_new(unsigned max_threads, unsigned idle_ms, worker_run_fn run, void *context,
                    struct worker_pool **out)
{
    struct worker_pool *pool = calloc(1, sizeof(*pool));
    if (!pool)
        return -ENOMEM;
    pthread_mutex_init(&pool->lock, NULL);
    pthread_cond_init(&pool->work, NULL);
    pthread_cond_init(&pool->exited, NULL);
    pool->max_threads = max_threads;
    pool->idle_ms = idle_ms;
    pool->run = run;
    pool->context = context;
    *out = pool;
    return 0;
}

/* Called locked: starts one more detached thread. Returns 0 or a negative errno. */
static int worker_pool_grow(struct worker_pool *pool)
{
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t thread;
    int rc = pthread_create(&thread, &attr, worker_pool_thread, pool);
    pthread_attr_destroy(&attr);
    if (rc != 0)
        return -rc;
    pool->threads++;
    return 0;
}

int worker_pool_submit(struct worker_pool *pool, struct rpc_call *call)
{
    pthread_mutex_lock(&pool->lock);
    int rc = 0;
    if (pool->idle <= pool->queued && pool->threads < pool->max_threads) {
        rc = worker_pool_grow(pool);
        /* Without a new thread the call still runs if some thread will come back for it. */
        if (rc < 0 && pool->threads > 0)
            rc = 0;
    }
    if (rc == 0) {
        call->worker_next = NULL;
        if (pool->tail)
            pool->tail->worker_next = call;
        else
            pool->head = call;
        pool->tail = call;
        pool->queued++;
        pthread_cond_signal(&pool->work);
    }
    pthread_mutex_unlock(&pool->lock);
    return rc;
}

unsigned worker_pool_threads(struct worker_pool *pool)
{
    pthread_mutex_lock(&pool->lock);
    unsigned threads = pool->threads;
    pthread_mutex_unlock(&pool->lock);
    return threads;
}

void worker_pool_free(struct worker_pool *pool)
{
    if (!pool)
        return;
    pthread_mutex_lock(&pool->lock);
    pool->closing = true;
    pthread_cond_broadcast(&pool->work);
    while (pool->threads > 0)
        pthread_cond_wait(&pool->exited, &pool->lock);
    pthread_mutex_unlock(&pool->lock);
    pthread_mutex_destroy(&pool->lock);
    pthread_cond_destroy(&pool->work);
    pthread_cond_destroy(&pool->exited);
    free(pool);
}
