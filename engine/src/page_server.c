/*
 * The page server (see forkd/page_server.h). Owns the templates (page_server_templates.c:
 * read-only mappings of memory.bin, hot sets, prefetch), each fork's handshake (listening
 * socket, received userfaultfd and connection), the event loop that resolves every fork's
 * faults, and the statistics.
 *
 * Threads and what each owns:
 * - The loop thread owns every attached fork's fds, epoll registrations, removed-page bitmaps
 *   and retry list, and the server's list of attached forks; it alone adds or drops forks, on
 *   requests queued under server->lock (attach, detach, close) and woken by an eventfd.
 * - A handshake thread per fork owns the fork's listening socket and the received handshake
 *   until it queues the fork for attach; it also runs the prefetch (before the fork runs).
 * - server->lock guards the template list, the request queues and the handshake count: never
 *   taken per fault. fork->lock guards the fork's state, error and drop reason, for waiters.
 * - Counters are atomics (written by the loop, or a handshake thread while prefetching).
 */
#include "page_server_internal.h"

#include "basic/cleanup.h"
#include "basic/clock.h"
#include "latency.h"
#include "thread_priority.h"
#include "uffd.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

void page_server_counters_read(const struct page_server_counters *c, struct page_server_stats *out)
{
    uint64_t faults = atomic_load_explicit(&c->faults, memory_order_acquire);
    struct latency_summary service;
    latency_summarize(&c->service, &service);
    *out = (struct page_server_stats){
        .faults_served = faults,
        .bytes_copied = page_server_load(&c->bytes),
        .pages_prefetched = page_server_load(&c->prefetched),
        .zero_pages = page_server_load(&c->zero),
        .service_p50_ns = service.p50_ns,
        .service_p99_ns = service.p99_ns,
        .service_max_ns = service.max_ns,
        .already_present = page_server_load(&c->existed),
        .retries = page_server_load(&c->retries),
        .remove_events = page_server_load(&c->removes),
    };
}

static void page_server_server_unref(struct page_server *server);

void page_server_template_unref(struct page_server_template *t)
{
    if (!t || atomic_fetch_sub(&t->refs, 1) != 1)
        return;
    if (t->memory)
        munmap((void *)t->memory, t->size);
    free(t->hot);
    free(t->chunk_ready);
    free(t->chunk_failed);
    pthread_mutex_destroy(&t->chunk_lock);
    free(t);
}

static void page_server_fork_ref(struct page_server_fork *fork)
{
    atomic_fetch_add(&fork->refs, 1);
}

static void page_server_fork_unref(struct page_server_fork *fork)
{
    if (!fork || atomic_fetch_sub(&fork->refs, 1) != 1)
        return;
    struct page_server *server = fork->server;
    uffd_handshake_release(&fork->handshake);
    if (fork->listen_fd >= 0)
        close(fork->listen_fd);
    for (size_t i = 0; i < UFFD_MAX_REGIONS; i++)
        free(fork->removed[i]);
    free(fork->retries);
    free(fork->waits);
    if (fork->pidfd >= 0)
        close(fork->pidfd);
    page_server_template_unref(fork->template);
    pthread_mutex_destroy(&fork->lock);
    pthread_cond_destroy(&fork->changed);
    free(fork);
    page_server_server_unref(server);
}

static const char *page_server_fork_label(const struct page_server_fork *fork)
{
    return fork->label[0] ? fork->label : fork->socket_path;
}

/* ---------------------------------------------------------------- fork state */

static void page_server_fork_set_state(struct page_server_fork *fork,
                                       enum page_server_fork_state state)
{
    pthread_mutex_lock(&fork->lock);
    fork->state = state;
    pthread_cond_broadcast(&fork->changed);
    pthread_mutex_unlock(&fork->lock);
}

static void page_server_fork_fail(struct page_server_fork *fork, const struct forkd_error *error)
{
    pthread_mutex_lock(&fork->lock);
    fork->error = *error;
    fork->state = PAGE_SERVER_FAILED;
    pthread_cond_broadcast(&fork->changed);
    pthread_mutex_unlock(&fork->lock);
}

static void page_server_wake_loop(struct page_server *server)
{
    uint64_t one = 1;
    if (write(server->wake_fd, &one, sizeof(one)) != sizeof(one))
        abort(); /* an eventfd add of 1 cannot fail short of overflow; the loop would sleep */
}

/* ---------------------------------------------------------------- fault resolution */

static const struct uffd_region *page_server_region_of(const struct page_server_fork *fork,
                                                       uint64_t address, size_t *index)
{
    const struct uffd_handshake *h = &fork->handshake;
    for (size_t i = 0; i < h->region_count; i++) {
        const struct uffd_region *r = &h->regions[i];
        if (address >= r->host_base && address - r->host_base < r->size) {
            *index = i;
            return r;
        }
    }
    return NULL;
}

/* Sets a bit; true when it was clear. */
/* UFFDIO_COPY of one page (which wakes the faulting threads): 0, 1 when it was there
 * already (then woken), or -errno (-EAGAIN: try again later). */
static int page_server_copy_page(struct page_server_fork *fork, uint64_t page, const void *source,
                                 uint64_t length)
{
    struct uffdio_copy copy = {.dst = page, .src = (uint64_t)(uintptr_t)source, .len = length};
    int uffd = fork->handshake.uffd;
    if (ioctl(uffd, UFFDIO_COPY, &copy) == 0) {
        page_server_count(&fork->counters.bytes, length);
        page_server_count(&fork->template->counters.bytes, length);
        return 0;
    }
    int rc = -errno;
    if (rc != -EEXIST)
        return rc;
    /* Present already (another thread's fault, or prefetch): only the waiters need waking. */
    struct uffdio_range range = {.start = page, .len = length};
    return ioctl(uffd, UFFDIO_WAKE, &range) == 0 ? 1 : -errno;
}

static int page_server_zero_page(struct page_server_fork *fork, uint64_t page, uint64_t length)
{
    /* UFFDIO_ZEROPAGE maps the shared zero page but has no hugetlb support: copy zeros there. */
    if (length != PAGE_SERVER_SMALL_PAGE)
        return page_server_copy_page(fork, page, fork->server->zero_page, length);
    struct uffdio_zeropage zero = {.range = {.start = page, .len = length}};
    if (ioctl(fork->handshake.uffd, UFFDIO_ZEROPAGE, &zero) == 0)
        return 0;
    if (errno != EEXIST)
        return -errno;
    struct uffdio_range range = {.start = page, .len = length};
    return ioctl(fork->handshake.uffd, UFFDIO_WAKE, &range) == 0 ? 1 : -errno;
}

static void page_server_record_hot(struct page_server_fork *fork, uint64_t file_offset,
                                   uint64_t now)
{
    struct page_server_template *t = fork->template;
    if (now >= fork->record_until_ns || !t->hot)
        return;
    if (page_server_bit_set(t->hot, file_offset / PAGE_SERVER_SMALL_PAGE))
        page_server_count(&t->hot_pages, 1);
}

/* A lazy template's chunks under the file range [offset, offset + length): 0 when all are here,
 * -EINPROGRESS when one is on its way (asked for again: the source ignores repeats), -EIO when
 * one cannot be fetched. The ready bit is read with acquire: the chunk's bytes were written to
 * the file before it was set. */
static int page_server_chunks_state(struct page_server_template *t, uint64_t offset,
                                    uint64_t length)
{
    if (!t->chunk_ready)
        return 0;
    for (uint64_t c = offset / t->chunk_size; c <= (offset + length - 1) / t->chunk_size; c++) {
        uint64_t mask = 1ULL << (c % 64);
        if (atomic_load_explicit(&t->chunk_ready[c / 64], memory_order_acquire) & mask)
            continue;
        if (page_server_bit_test(t->chunk_failed, c))
            return -EIO;
        t->want(t->want_arg, c);
        return -EINPROGRESS;
    }
    return 0;
}

/* Resolves one fault: 0 or 1 (resolved; 1: was present), or -errno (-EINPROGRESS: its lazy
 * chunk is on its way; -EIO: its lazy chunk cannot be fetched). */
static int page_server_resolve(struct page_server_fork *fork, uint64_t address, bool *zero_filled)
{
    size_t index;
    const struct uffd_region *r = page_server_region_of(fork, address, &index);
    if (!r)
        return -ERANGE;
    uint64_t page = address & ~(r->page_size - 1);
    uint64_t offset = r->file_offset + (page - r->host_base);
    *zero_filled = page_server_bit_test(fork->removed[index], (page - r->host_base) / r->page_size);
    if (*zero_filled)
        return page_server_zero_page(fork, page, r->page_size);
    int rc = page_server_chunks_state(fork->template, offset, r->page_size);
    if (rc < 0)
        return rc;
    if (fork->record_until_ns)
        page_server_record_hot(fork, offset, page_server_now_ns());
    return page_server_copy_page(fork, page, fork->template->memory + offset, r->page_size);
}

static void page_server_account_fault(struct page_server_fork *fork, int rc, bool zero_filled,
                                      uint64_t start_ns)
{
    struct page_server_counters *mine = &fork->counters, *all = &fork->template->counters;
    uint64_t elapsed = page_server_now_ns() - start_ns;
    if (rc == 1) {
        page_server_count(&mine->existed, 1);
        page_server_count(&all->existed, 1);
    } else if (zero_filled) {
        page_server_count(&mine->zero, 1);
        page_server_count(&all->zero, 1);
    }
    latency_record(&mine->service, elapsed);
    latency_record(&all->service, elapsed);
    /* Last and with release order: a reader that sees the fault counted sees its figures. */
    atomic_fetch_add_explicit(&mine->faults, 1, memory_order_release);
    atomic_fetch_add_explicit(&all->faults, 1, memory_order_release);
}

/* ---------------------------------------------------------------- dropping forks */

static void page_server_retry_unlist(struct page_server *server, struct page_server_fork *fork)
{
    struct page_server_fork **p = &server->retry_list;
    while (*p && *p != fork)
        p = &(*p)->retry_next;
    if (*p)
        *p = fork->retry_next;
    fork->retry_listed = false;
}

static void page_server_loop_unlist(struct page_server *server, struct page_server_fork *fork)
{
    struct page_server_fork **p = &server->forks;
    while (*p && *p != fork)
        p = &(*p)->loop_next;
    if (*p)
        *p = fork->loop_next;
}

/* Loop thread: releases everything the fork holds but its figures; the loop's reference goes
 * at the end of the event batch (later events of the batch may still name the fork). */
static void page_server_drop(struct page_server *server, struct page_server_fork *fork,
                             const char *why)
{
    if (!fork->in_loop)
        return;
    fork->in_loop = false;
    epoll_ctl(server->epoll_fd, EPOLL_CTL_DEL, fork->handshake.uffd, NULL);
    epoll_ctl(server->epoll_fd, EPOLL_CTL_DEL, fork->handshake.connection, NULL);
    uffd_handshake_release(&fork->handshake);
    for (size_t i = 0; i < UFFD_MAX_REGIONS; i++) {
        free(fork->removed[i]);
        fork->removed[i] = NULL;
    }
    free(fork->retries);
    fork->retries = NULL;
    fork->retry_count = fork->retry_capacity = 0;
    free(fork->waits);
    fork->waits = NULL;
    fork->wait_count = fork->wait_capacity = 0;
    if (fork->retry_listed)
        page_server_retry_unlist(server, fork);
    page_server_loop_unlist(server, fork);
    atomic_store(&fork->active, false);
    atomic_fetch_sub(&fork->template->forks_active, 1);
    atomic_fetch_sub(&server->active_forks, 1);
    pthread_mutex_lock(&fork->lock);
    snprintf(fork->drop_reason, sizeof(fork->drop_reason), "%s", why);
    fork->state = PAGE_SERVER_DROPPED;
    pthread_cond_broadcast(&fork->changed);
    pthread_mutex_unlock(&fork->lock);
    fork->grave_next = server->graveyard;
    server->graveyard = fork;
}

static void page_server_drop_errno(struct page_server *server, struct page_server_fork *fork,
                                   const char *what, int rc)
{
    char why[PAGE_SERVER_REASON_MAX];
    snprintf(why, sizeof(why), "%s: %s", what, strerror(-rc));
    page_server_drop(server, fork, why);
}

/* Loop thread: the fork needs a chunk of its lazy template that cannot be fetched. Its vCPU
 * waits on a fault nobody can answer with the right bytes, so its VMM is killed (through the
 * pidfd its owner gave, which proves it ours), and the reason kept for the owner. */
static void page_server_fail_memory(struct page_server *server, struct page_server_fork *fork)
{
    struct page_server_template *t = fork->template;
    char why[PAGE_SERVER_REASON_MAX];
    pthread_mutex_lock(&t->chunk_lock);
    snprintf(why, sizeof(why), "%s", t->chunk_error);
    pthread_mutex_unlock(&t->chunk_lock);
    pthread_mutex_lock(&fork->lock);
    snprintf(fork->memory_error, sizeof(fork->memory_error), "%s", why);
    pthread_mutex_unlock(&fork->lock);
    if (fork->pidfd >= 0)
        syscall(SYS_pidfd_send_signal, fork->pidfd, SIGKILL, NULL, 0);
    page_server_drop(server, fork, why);
}

static void page_server_bury(struct page_server *server)
{
    while (server->graveyard) {
        struct page_server_fork *fork = server->graveyard;
        server->graveyard = fork->grave_next;
        page_server_fork_unref(fork);
    }
}

/* ---------------------------------------------------------------- EAGAIN retries */

static int page_server_fault_list_add(struct page_server_retry **list, size_t *count,
                                      size_t *capacity, uint64_t address, uint64_t start_ns)
{
    if (*count == *capacity) {
        size_t grown_capacity = *capacity ? *capacity * 2 : 8;
        struct page_server_retry *grown = realloc(*list, grown_capacity * sizeof(*grown));
        if (!grown)
            return -ENOMEM;
        *list = grown;
        *capacity = grown_capacity;
    }
    (*list)[(*count)++] = (struct page_server_retry){address, start_ns};
    return 0;
}

/* A fault whose lazy chunk is on its way waits for it (looked at again when a chunk arrives). */
static int page_server_wait_add(struct page_server_fork *fork, uint64_t address, uint64_t start_ns)
{
    return page_server_fault_list_add(&fork->waits, &fork->wait_count, &fork->wait_capacity,
                                      address, start_ns);
}

static int page_server_retry_add(struct page_server_fork *fork, uint64_t address, uint64_t start_ns)
{
    int rc = page_server_fault_list_add(&fork->retries, &fork->retry_count, &fork->retry_capacity,
                                        address, start_ns);
    if (rc < 0)
        return rc;
    page_server_count(&fork->counters.retries, 1);
    page_server_count(&fork->template->counters.retries, 1);
    return 0;
}

static void page_server_arm_timer(struct page_server *server, struct page_server_fork *fork)
{
    if (!fork->retry_listed) {
        fork->retry_listed = true;
        fork->retry_next = server->retry_list;
        server->retry_list = fork;
    }
    if (server->timer_armed)
        return;
    struct itimerspec when = {.it_value = {.tv_nsec = (long)PAGE_SERVER_RETRY_DELAY_NS}};
    server->timer_armed = timerfd_settime(server->timer_fd, 0, &when, NULL) == 0;
}

/* Tries the fork's EAGAIN'd faults again; those still refused wait for the timer. */
static void page_server_retry_faults(struct page_server *server, struct page_server_fork *fork)
{
    size_t kept = 0;
    for (size_t i = 0; i < fork->retry_count && fork->in_loop; i++) {
        struct page_server_retry retry = fork->retries[i];
        bool zero_filled = false;
        int rc = page_server_resolve(fork, retry.address, &zero_filled);
        if (rc >= 0) {
            page_server_account_fault(fork, rc, zero_filled, retry.start_ns);
        } else if (rc == -EINPROGRESS) {
            if (page_server_wait_add(fork, retry.address, retry.start_ns) < 0)
                page_server_drop(server, fork, "out of memory queueing a fault");
        } else if (rc == -EIO) {
            page_server_fail_memory(server, fork);
        } else if (rc != -EAGAIN) {
            page_server_drop_errno(server, fork, "resolve a retried fault", rc);
        } else if (page_server_now_ns() - retry.start_ns >= PAGE_SERVER_RETRY_GIVE_UP_NS) {
            page_server_drop(server, fork, "a fault kept failing with EAGAIN");
        } else {
            fork->retries[kept++] = retry;
        }
    }
    if (!fork->in_loop)
        return;
    fork->retry_count = kept;
    if (kept)
        page_server_arm_timer(server, fork);
}

/* Looks again at the fork's faults waiting for lazy chunks: served once their chunk is here,
 * the fork failed when it cannot be fetched. */
static void page_server_serve_waits(struct page_server *server, struct page_server_fork *fork)
{
    size_t kept = 0;
    bool retry = false;
    for (size_t i = 0; i < fork->wait_count && fork->in_loop; i++) {
        struct page_server_retry wait = fork->waits[i];
        bool zero_filled = false;
        int rc = page_server_resolve(fork, wait.address, &zero_filled);
        if (rc >= 0) {
            page_server_account_fault(fork, rc, zero_filled, wait.start_ns);
        } else if (rc == -EINPROGRESS) {
            fork->waits[kept++] = wait;
        } else if (rc == -EIO) {
            page_server_fail_memory(server, fork);
        } else if (rc == -EAGAIN) {
            if (page_server_retry_add(fork, wait.address, wait.start_ns) < 0)
                page_server_drop(server, fork, "out of memory queueing a retry");
            retry = true;
        } else {
            page_server_drop_errno(server, fork, "resolve a fault that waited for its chunk", rc);
        }
    }
    if (!fork->in_loop)
        return;
    fork->wait_count = kept;
    if (retry)
        page_server_arm_timer(server, fork);
}

/* Loop thread: a lazy chunk arrived or failed; every waiting fault is looked at again. */
static void page_server_on_chunks(struct page_server *server)
{
    if (!atomic_exchange(&server->chunks_changed, false))
        return;
    struct page_server_fork *fork = server->forks;
    while (fork) {
        struct page_server_fork *next = fork->loop_next; /* the fork may be dropped */
        if (fork->wait_count)
            page_server_serve_waits(server, fork);
        fork = next;
    }
}

static void page_server_on_timer(struct page_server *server)
{
    uint64_t expirations;
    if (read(server->timer_fd, &expirations, sizeof(expirations)) < 0 && errno != EAGAIN)
        return;
    server->timer_armed = false;
    struct page_server_fork *list = server->retry_list;
    server->retry_list = NULL;
    while (list) {
        struct page_server_fork *fork = list;
        list = fork->retry_next;
        fork->retry_listed = false;
        if (fork->in_loop)
            page_server_retry_faults(server, fork);
    }
}

/* ---------------------------------------------------------------- events */

static void page_server_on_fault(struct page_server *server, struct page_server_fork *fork,
                                 uint64_t address, uint64_t start_ns)
{
    bool zero_filled = false;
    int rc = page_server_resolve(fork, address, &zero_filled);
    if (rc >= 0)
        page_server_account_fault(fork, rc, zero_filled, start_ns);
    else if (rc == -EAGAIN && page_server_retry_add(fork, address, start_ns) < 0)
        page_server_drop(server, fork, "out of memory queueing a retry");
    else if (rc == -EINPROGRESS && page_server_wait_add(fork, address, start_ns) < 0)
        page_server_drop(server, fork, "out of memory queueing a fault");
    else if (rc == -EINPROGRESS)
        return;
    else if (rc == -EIO)
        page_server_fail_memory(server, fork);
    else if (rc == -ERANGE)
        page_server_drop(server, fork, "fault outside every announced region");
    else if (rc != -EAGAIN)
        page_server_drop_errno(server, fork, "resolve a fault",
                               rc); /* ESRCH/ENOSPC: the VMM is gone */
}

/* Marks [start, end) removed in the regions it touches: later faults there get zeros. */
static int page_server_on_remove(struct page_server_fork *fork, uint64_t start, uint64_t end)
{
    page_server_count(&fork->counters.removes, 1);
    page_server_count(&fork->template->counters.removes, 1);
    for (size_t i = 0; i < fork->handshake.region_count; i++) {
        const struct uffd_region *r = &fork->handshake.regions[i];
        uint64_t from = start > r->host_base ? start : r->host_base;
        uint64_t to = end < r->host_base + r->size ? end : r->host_base + r->size;
        if (from >= to)
            continue;
        uint64_t pages = r->size / r->page_size;
        if (!fork->removed[i])
            fork->removed[i] = calloc((pages + 63) / 64, sizeof(atomic_uint_fast64_t));
        if (!fork->removed[i])
            return -ENOMEM;
        for (uint64_t p = (from - r->host_base) / r->page_size;
             p < (to - r->host_base + r->page_size - 1) / r->page_size; p++)
            page_server_bit_set(fork->removed[i], p);
    }
    return 0;
}

static void page_server_on_message(struct page_server *server, struct page_server_fork *fork,
                                   const struct uffd_msg *message, uint64_t start_ns)
{
    if (message->event == UFFD_EVENT_PAGEFAULT) {
        page_server_on_fault(server, fork, message->arg.pagefault.address, start_ns);
    } else if (message->event == UFFD_EVENT_REMOVE) {
        if (page_server_on_remove(fork, message->arg.remove.start, message->arg.remove.end) < 0)
            page_server_drop(server, fork, "out of memory recording a removed range");
    }
    /* Other events need features the VMM did not ask for; nothing to do for them. */
}

static void page_server_on_uffd(struct page_server *server, struct page_server_fork *fork)
{
    struct uffd_msg messages[PAGE_SERVER_MESSAGE_BATCH];
    struct forkd_error err = {0};
    int count = uffd_read_events(fork->handshake.uffd, messages, PAGE_SERVER_MESSAGE_BATCH, &err);
    if (count < 0) {
        page_server_drop(server, fork, err.message);
        return;
    }
    uint64_t start_ns = page_server_now_ns();
    for (int i = 0; i < count && fork->in_loop; i++)
        page_server_on_message(server, fork, &messages[i], start_ns);
    /* A REMOVE read just now ends the EAGAIN window of faults queued behind it. */
    if (fork->in_loop && fork->retry_count)
        page_server_retry_faults(server, fork);
}

static void page_server_on_connection(struct page_server *server, struct page_server_fork *fork,
                                      uint32_t events)
{
    if (fork->adopted)
        page_server_drop(server, fork, "VMM exited"); /* its pidfd turned readable */
    else if (events & (EPOLLHUP | EPOLLRDHUP | EPOLLERR))
        page_server_drop(server, fork, "peer hung up");
    else
        page_server_drop(server, fork, "peer sent data after the handshake (protocol breach)");
}

/* ---------------------------------------------------------------- attach and detach */

static int page_server_epoll_add(struct page_server *server, int fd, uint32_t events,
                                 struct page_server_watch *watch)
{
    struct epoll_event event = {.events = events, .data.ptr = watch};
    return epoll_ctl(server->epoll_fd, EPOLL_CTL_ADD, fd, &event) < 0 ? -errno : 0;
}

/* Loop thread: wakes every vCPU of an adopted fork that waits on a fault read by the earlier
 * forkd (the message is gone with it): woken, the vCPU faults again and this loop serves it. */
static void page_server_wake_all(struct page_server *server, struct page_server_fork *fork)
{
    for (size_t i = 0; i < fork->handshake.region_count && fork->in_loop; i++) {
        const struct uffd_region *r = &fork->handshake.regions[i];
        int rc = uffd_wake(fork->handshake.uffd, r->host_base, r->size, NULL);
        if (rc < 0 && rc != -EAGAIN)
            page_server_drop_errno(server, fork, "wake the vCPUs of an adopted fork", rc);
    }
}

/* Loop thread: starts serving a fork whose handshake thread queued it (with its reference). */
static void page_server_attach(struct page_server *server, struct page_server_fork *fork)
{
    fork->uffd_watch = (struct page_server_watch){PAGE_SERVER_WATCH_UFFD, fork};
    fork->connection_watch = (struct page_server_watch){PAGE_SERVER_WATCH_CONNECTION, fork};
    int rc = page_server_epoll_add(server, fork->handshake.uffd, EPOLLIN, &fork->uffd_watch);
    if (rc == 0)
        rc = page_server_epoll_add(server, fork->handshake.connection, EPOLLIN | EPOLLRDHUP,
                                   &fork->connection_watch);
    fork->in_loop = true;
    fork->loop_next = server->forks;
    server->forks = fork;
    atomic_store(&fork->active, true);
    atomic_fetch_add(&fork->template->forks_active, 1);
    atomic_fetch_add(&fork->template->forks_total, 1);
    atomic_fetch_add(&server->active_forks, 1);
    if (fork->record_ms) {
        fork->record_until_ns = page_server_now_ns() + fork->record_ms * 1000000ULL;
        uint_fast64_t none = 0;
        atomic_compare_exchange_strong(&fork->template->hot_ready_ns, &none, fork->record_until_ns);
    }
    pthread_mutex_lock(&fork->lock);
    bool released = fork->released;
    fork->state = PAGE_SERVER_ACTIVE;
    pthread_cond_broadcast(&fork->changed);
    pthread_mutex_unlock(&fork->lock);
    if (rc < 0)
        page_server_drop_errno(server, fork, "epoll_ctl", rc);
    else if (released)
        page_server_drop(server, fork, "released by its owner");
    else if (fork->adopted)
        page_server_wake_all(server, fork);
}

/* Loop thread: takes the queued requests. */
static bool page_server_on_wake(struct page_server *server)
{
    uint64_t count;
    if (read(server->wake_fd, &count, sizeof(count)) < 0 && errno != EAGAIN)
        return false;
    pthread_mutex_lock(&server->lock);
    struct page_server_fork *attach = server->attach_queue, *detach = server->detach_queue;
    server->attach_queue = server->detach_queue = NULL;
    bool closing = server->closing;
    pthread_mutex_unlock(&server->lock);
    while (attach) {
        struct page_server_fork *fork = attach;
        attach = fork->queue_next;
        page_server_attach(server, fork);
    }
    while (detach) {
        struct page_server_fork *fork = detach;
        detach = fork->queue_next;
        page_server_drop(server, fork, "released by its owner");
        page_server_fork_unref(fork); /* the request's reference */
    }
    while (closing && server->forks)
        page_server_drop(server, server->forks, "page server closed");
    page_server_on_chunks(server);
    return closing;
}

static void page_server_dispatch(struct page_server *server, const struct epoll_event *event,
                                 bool *closing)
{
    struct page_server_watch *watch = event->data.ptr;
    switch (watch->kind) {
    case PAGE_SERVER_WATCH_WAKE:
        *closing = page_server_on_wake(server);
        break;
    case PAGE_SERVER_WATCH_TIMER:
        page_server_on_timer(server);
        break;
    case PAGE_SERVER_WATCH_UFFD:
        if (watch->fork->in_loop)
            page_server_on_uffd(server, watch->fork);
        break;
    case PAGE_SERVER_WATCH_CONNECTION:
        if (watch->fork->in_loop)
            page_server_on_connection(server, watch->fork, event->events);
        break;
    }
}

static void *page_server_loop_main(void *arg)
{
    struct page_server *server = arg;
    /* A vCPU waits on every fault: on busy cores an ordinary thread may wait a tick to run.
     * Without the privilege the loop runs as it is. */
    struct thread_priority priority;
    thread_priority_raise(&priority);
    bool closing = false;
    while (!closing) {
        struct epoll_event events[PAGE_SERVER_EPOLL_BATCH];
        int n = epoll_wait(server->epoll_fd, events, PAGE_SERVER_EPOLL_BATCH, -1);
        for (int i = 0; i < n; i++)
            page_server_dispatch(server, &events[i], &closing);
        page_server_bury(server);
        thread_priority_check(&priority);
    }
    return NULL;
}

/* ---------------------------------------------------------------- handshake thread */

static int page_server_check_handshake(const struct page_server_fork *fork, struct forkd_error *err)
{
    const struct uffd_handshake *h = &fork->handshake;
    if (fork->expected_pid > 0 && h->peer_pid != fork->expected_pid)
        return forkd_error_set(err, -EPERM, "uffd handshake: peer pid %d is not the VMM's (%d)",
                               (int)h->peer_pid, (int)fork->expected_pid);
    const struct uffd_region *last = &h->regions[h->region_count - 1];
    uint64_t needed = last->file_offset + last->size;
    if (needed > fork->template->size)
        return forkd_error_set(err, -EINVAL,
                               "uffd handshake: regions need %" PRIu64 " bytes of memory but "
                               "%s has %" PRIu64,
                               needed, fork->template->path, fork->template->size);
    return 0;
}

static void page_server_handshake_done(struct page_server *server)
{
    pthread_mutex_lock(&server->lock);
    server->handshakes--;
    pthread_cond_broadcast(&server->handshakes_done);
    pthread_mutex_unlock(&server->lock);
}

static void page_server_unlist_pending_locked(struct page_server *server,
                                              struct page_server_fork *fork)
{
    struct page_server_fork **p = &server->pending;
    while (*p && *p != fork)
        p = &(*p)->queue_next;
    if (*p)
        *p = fork->queue_next;
    fork->queue_next = NULL;
}

/* Hands a received fork to the loop, unless its owner or the server gave up on it. */
static int page_server_queue_attach(struct page_server *server, struct page_server_fork *fork,
                                    struct forkd_error *err)
{
    pthread_mutex_lock(&server->lock);
    page_server_unlist_pending_locked(server, fork);
    int rc = 0;
    if (server->closing) {
        rc = forkd_error_set(err, -ESHUTDOWN, "page server: closing");
    } else {
        page_server_fork_set_state(fork, PAGE_SERVER_QUEUED);
        fork->queue_next = server->attach_queue;
        server->attach_queue = fork;
        page_server_wake_loop(server);
    }
    pthread_mutex_unlock(&server->lock);
    return rc;
}

static int page_server_receive(struct page_server_fork *fork, struct forkd_error *err)
{
    int rc = uffd_accept_handshake(fork->listen_fd, fork->server->handshake_timeout_ms,
                                   &fork->handshake, err);
    close(fork->listen_fd);
    fork->listen_fd = -1;
    unlink(fork->socket_path); /* one VMM per socket: no one else may connect */
    if (rc == 0)
        rc = page_server_check_handshake(fork, err);
    if (rc < 0) {
        uffd_handshake_release(&fork->handshake);
        return forkd_error_prefix(err, "fork %s: ", page_server_fork_label(fork));
    }
    atomic_store(&fork->peer_pid, fork->handshake.peer_pid);
    fork->memory_bytes = uffd_total_size(&fork->handshake);
    return 0;
}

static void *page_server_handshake_main(void *arg)
{
    struct page_server_fork *fork = arg;
    struct page_server *server = fork->server;
    struct forkd_error err = {0};
    int rc = page_server_receive(fork, &err);
    if (rc == 0 && fork->prefetch)
        page_server_prefetch(fork);
    if (rc == 0)
        rc = page_server_queue_attach(server, fork, &err); /* gives our reference to the loop */
    if (rc < 0) {
        pthread_mutex_lock(&server->lock);
        page_server_unlist_pending_locked(server, fork);
        pthread_mutex_unlock(&server->lock);
        uffd_handshake_release(&fork->handshake);
        page_server_fork_fail(fork, &err);
        page_server_fork_unref(fork);
    }
    page_server_handshake_done(server);
    return NULL;
}

/* ---------------------------------------------------------------- forks: public API */

static struct page_server_fork *page_server_fork_new(struct page_server *server,
                                                     const struct page_server_fork_config *config)
{
    struct page_server_fork *fork = calloc(1, sizeof(*fork));
    if (!fork)
        return NULL;
    atomic_init(&fork->refs, 1);
    fork->server = server;
    atomic_fetch_add(&server->refs, 1);
    fork->listen_fd = -1;
    fork->pidfd = config->vmm_pidfd ? fcntl(*config->vmm_pidfd, F_DUPFD_CLOEXEC, 0) : -1;
    fork->handshake.uffd = fork->handshake.connection = -1;
    fork->expected_pid = config->vmm_pid;
    fork->state = PAGE_SERVER_PENDING;
    snprintf(fork->label, sizeof(fork->label), "%s", config->label ? config->label : "");
    pthread_mutex_init(&fork->lock, NULL);
    pthread_condattr_t attributes;
    pthread_condattr_init(&attributes);
    pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC); /* wait_ready's deadline */
    pthread_cond_init(&fork->changed, &attributes);
    pthread_condattr_destroy(&attributes);
    return fork;
}

/* Under server->lock: the fork's template (with a reference) and its prefetch role. */
static int page_server_fork_bind_template(struct page_server *server, struct page_server_fork *fork,
                                          const struct page_server_fork_config *config,
                                          struct forkd_error *err)
{
    const char *name = config->template_name && *config->template_name ? config->template_name
                                                                       : config->memory_path;
    struct page_server_template *t;
    int rc = page_server_template_get_locked(server, name, config->memory_path, &t, err);
    if (rc < 0)
        return rc;
    atomic_fetch_add(&t->refs, 1);
    fork->template = t;
    if (t->chunk_ready) /* lazy: its pages may not be here yet; no hot set recorded either */
        return 0;
    bool ready = page_server_hot_ready(t, page_server_now_ns());
    if (t->record_ms && t->hot && (ready || t->hot_seeded))
        fork->prefetch = page_server_load(&t->hot_pages) > 0;
    if (t->record_ms && !ready)
        fork->record_ms = t->record_ms;
    return 0;
}

static int page_server_fork_start(struct page_server *server, struct page_server_fork *fork,
                                  const struct page_server_fork_config *config,
                                  struct forkd_error *err)
{
    if (server->closing)
        return forkd_error_set(err, -ESHUTDOWN, "page server: closing");
    int rc = page_server_fork_bind_template(server, fork, config, err);
    if (rc < 0)
        return rc;
    fork->listen_fd = uffd_listen(config->socket_path, err);
    if (fork->listen_fd < 0)
        return fork->listen_fd;
    pthread_attr_t attributes;
    pthread_attr_init(&attributes);
    pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
    pthread_t thread;
    page_server_fork_ref(fork); /* the handshake thread's */
    rc = -pthread_create(&thread, &attributes, page_server_handshake_main, fork);
    pthread_attr_destroy(&attributes);
    if (rc < 0) {
        atomic_fetch_sub(&fork->refs, 1);
        unlink(config->socket_path);
        return forkd_error_errno(err, rc, "page server: handshake thread");
    }
    server->handshakes++;
    fork->queue_next = server->pending;
    server->pending = fork;
    return 0;
}

int page_server_fork_prepare(struct page_server *server,
                             const struct page_server_fork_config *config,
                             struct page_server_fork **out, struct forkd_error *err)
{
    if (!config->socket_path || !config->memory_path)
        return forkd_error_set(err, -EINVAL, "page server: socket and memory paths required");
    struct page_server_fork *fork = page_server_fork_new(server, config);
    if (!fork)
        return forkd_error_set(err, -ENOMEM, "page server: out of memory");
    snprintf(fork->socket_path, sizeof(fork->socket_path), "%s", config->socket_path);
    pthread_mutex_lock(&server->lock);
    int rc = page_server_fork_start(server, fork, config, err);
    pthread_mutex_unlock(&server->lock);
    if (rc < 0) {
        page_server_fork_unref(fork);
        return rc;
    }
    *out = fork;
    return 0;
}

/* Under server->lock: binds the template (no prefetch, no recording: the fork ran already). */
static int page_server_fork_adopt_locked(struct page_server *server, struct page_server_fork *fork,
                                         const struct page_server_fork_config *config,
                                         struct forkd_error *err)
{
    if (server->closing)
        return forkd_error_set(err, -ESHUTDOWN, "page server: closing");
    int rc = page_server_fork_bind_template(server, fork, config, err);
    fork->prefetch = false;
    fork->record_ms = 0;
    return rc;
}

int page_server_fork_adopt(struct page_server *server, const struct page_server_fork_config *config,
                           const struct uffd_region *regions, size_t region_count, int uffd,
                           int pidfd, struct page_server_fork **out, struct forkd_error *err)
{
    struct page_server_fork *fork = page_server_fork_new(server, config);
    if (!fork) {
        close(uffd);
        close(pidfd);
        return forkd_error_set(err, -ENOMEM, "page server: out of memory");
    }
    fork->adopted = true;
    fork->handshake.uffd = uffd;
    fork->handshake.connection = pidfd;
    fork->handshake.peer_pid = config->vmm_pid;
    fork->handshake.region_count = region_count < UFFD_MAX_REGIONS ? region_count : 0;
    memcpy(fork->handshake.regions, regions, fork->handshake.region_count * sizeof(*regions));
    pthread_mutex_lock(&server->lock);
    int rc = page_server_fork_adopt_locked(server, fork, config, err);
    pthread_mutex_unlock(&server->lock);
    if (rc == 0 && fork->handshake.region_count == 0)
        rc = forkd_error_set(err, -EINVAL, "fork %s: no regions recorded", config->label);
    if (rc == 0)
        rc = page_server_check_handshake(fork, err);
    if (rc == 0) {
        atomic_store(&fork->peer_pid, config->vmm_pid);
        fork->memory_bytes = uffd_total_size(&fork->handshake);
        page_server_fork_ref(fork); /* the loop's, given with the queued attach */
        rc = page_server_queue_attach(server, fork, err);
        if (rc < 0)
            page_server_fork_unref(fork);
    }
    if (rc == 0)
        rc = page_server_fork_wait_ready(fork, -1, err);
    if (rc < 0) {
        page_server_fork_release(fork);
        return rc;
    }
    *out = fork;
    return 0;
}

size_t page_server_fork_regions(const struct page_server_fork *fork, struct uffd_region *out,
                                size_t max)
{
    size_t count = fork->handshake.region_count;
    memcpy(out, fork->handshake.regions, (count < max ? count : max) * sizeof(*out));
    return count;
}

static bool page_server_fork_settled(enum page_server_fork_state state)
{
    return state != PAGE_SERVER_PENDING && state != PAGE_SERVER_QUEUED;
}

int page_server_fork_wait_ready(struct page_server_fork *fork, int timeout_ms,
                                struct forkd_error *err)
{
    struct timespec deadline = forkd_monotonic_after_ms(timeout_ms);
    pthread_mutex_lock(&fork->lock);
    int rc = 0;
    while (!page_server_fork_settled(fork->state) && rc == 0)
        rc = timeout_ms < 0 ? pthread_cond_wait(&fork->changed, &fork->lock)
                            : pthread_cond_timedwait(&fork->changed, &fork->lock, &deadline);
    enum page_server_fork_state state = fork->state;
    struct forkd_error error = fork->error;
    pthread_mutex_unlock(&fork->lock);
    if (state == PAGE_SERVER_FAILED) {
        if (err)
            *err = error;
        return error.code;
    }
    if (!page_server_fork_settled(state))
        return forkd_error_set(err, -ETIMEDOUT, "fork %s: handshake not done after %d ms",
                               page_server_fork_label(fork), timeout_ms);
    return 0;
}

void page_server_fork_stats(const struct page_server_fork *fork, struct page_server_stats *out)
{
    page_server_counters_read(&fork->counters, out);
    out->forks_active = atomic_load(&fork->active) ? 1 : 0;
    out->forks_total = atomic_load(&fork->peer_pid) != 0 ? 1 : 0;
}

pid_t page_server_fork_peer_pid(const struct page_server_fork *fork)
{
    return atomic_load(&fork->peer_pid);
}

uint64_t page_server_fork_memory_bytes(const struct page_server_fork *fork)
{
    return atomic_load(&fork->peer_pid) != 0 ? fork->memory_bytes : 0;
}

bool page_server_fork_active(const struct page_server_fork *fork)
{
    return atomic_load(&fork->active);
}

void page_server_fork_drop_reason(const struct page_server_fork *fork, char *out, size_t size)
{
    struct page_server_fork *mutable_fork = (struct page_server_fork *)fork;
    pthread_mutex_lock(&mutable_fork->lock);
    snprintf(out, size, "%s", fork->drop_reason);
    pthread_mutex_unlock(&mutable_fork->lock);
}

bool page_server_fork_memory_failed(const struct page_server_fork *fork, char *why, size_t size)
{
    struct page_server_fork *mutable_fork = (struct page_server_fork *)fork;
    pthread_mutex_lock(&mutable_fork->lock);
    bool failed = fork->memory_error[0] != '\0';
    snprintf(why, size, "%s", fork->memory_error);
    pthread_mutex_unlock(&mutable_fork->lock);
    return failed;
}

/* A lazy template's chunk state changed: the loop looks at the faults waiting for chunks. */
static void page_server_chunks_changed(struct page_server *server)
{
    atomic_store(&server->chunks_changed, true);
    page_server_wake_loop(server);
}

void page_server_chunk_arrived(struct page_server *server, struct page_server_template *t,
                               uint64_t chunk)
{
    if (chunk >= t->chunk_count)
        return;
    atomic_fetch_or_explicit(&t->chunk_ready[chunk / 64], 1ULL << (chunk % 64),
                             memory_order_release);
    page_server_chunks_changed(server);
}

void page_server_chunk_failed(struct page_server *server, struct page_server_template *t,
                              uint64_t chunk, const char *why)
{
    if (chunk >= t->chunk_count)
        return;
    pthread_mutex_lock(&t->chunk_lock);
    if (!t->chunk_error[0])
        snprintf(t->chunk_error, sizeof(t->chunk_error), "%s", why);
    pthread_mutex_unlock(&t->chunk_lock);
    atomic_fetch_or_explicit(&t->chunk_failed[chunk / 64], 1ULL << (chunk % 64),
                             memory_order_release);
    page_server_chunks_changed(server);
}

/* Wakes a handshake thread still waiting for its VMM to connect: our own connection closes
 * at once, which ends its wait with -ECONNRESET. */
static void page_server_cancel_accept(const char *socket_path)
{
    _cleanup_close_ int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    snprintf(address.sun_path, sizeof(address.sun_path), "%s", socket_path);
    if (fd >= 0)
        (void)connect(fd, (struct sockaddr *)&address, sizeof(address));
}

static void page_server_queue_detach(struct page_server *server, struct page_server_fork *fork)
{
    pthread_mutex_lock(&server->lock);
    if (!server->closing) {
        page_server_fork_ref(fork);
        fork->queue_next = server->detach_queue;
        server->detach_queue = fork;
        page_server_wake_loop(server);
    }
    pthread_mutex_unlock(&server->lock);
}

void page_server_fork_release(struct page_server_fork *fork)
{
    if (!fork)
        return;
    pthread_mutex_lock(&fork->lock);
    fork->released = true;
    enum page_server_fork_state state = fork->state;
    pthread_mutex_unlock(&fork->lock);
    if (state == PAGE_SERVER_PENDING)
        page_server_cancel_accept(fork->socket_path);
    else if (state == PAGE_SERVER_ACTIVE)
        page_server_queue_detach(fork->server, fork);
    page_server_fork_unref(fork);
}

/* ---------------------------------------------------------------- the server */

static void page_server_server_free(struct page_server *server)
{
    if (server->epoll_fd >= 0)
        close(server->epoll_fd);
    if (server->wake_fd >= 0)
        close(server->wake_fd);
    if (server->timer_fd >= 0)
        close(server->timer_fd);
    if (server->zero_page && server->zero_page != MAP_FAILED)
        munmap((void *)server->zero_page, PAGE_SERVER_HUGE_PAGE);
    pthread_mutex_destroy(&server->lock);
    pthread_cond_destroy(&server->handshakes_done);
    free(server);
}

static void page_server_server_unref(struct page_server *server)
{
    if (atomic_fetch_sub(&server->refs, 1) == 1)
        page_server_server_free(server);
}

static int page_server_server_fds(struct page_server *server)
{
    server->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    server->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    server->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    /* Read-only anonymous memory reads as zeros and costs nothing until read. */
    server->zero_page =
        mmap(NULL, PAGE_SERVER_HUGE_PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (server->epoll_fd < 0 || server->wake_fd < 0 || server->timer_fd < 0 ||
        server->zero_page == MAP_FAILED)
        return -errno;
    server->wake_watch = (struct page_server_watch){PAGE_SERVER_WATCH_WAKE, NULL};
    server->timer_watch = (struct page_server_watch){PAGE_SERVER_WATCH_TIMER, NULL};
    int rc = page_server_epoll_add(server, server->wake_fd, EPOLLIN, &server->wake_watch);
    if (rc == 0)
        rc = page_server_epoll_add(server, server->timer_fd, EPOLLIN, &server->timer_watch);
    return rc;
}

int page_server_open(const struct page_server_config *config, struct page_server **out,
                     struct forkd_error *err)
{
    struct page_server *server = calloc(1, sizeof(*server));
    if (!server)
        return forkd_error_set(err, -ENOMEM, "page server: out of memory");
    atomic_init(&server->refs, 1);
    server->epoll_fd = server->wake_fd = server->timer_fd = -1;
    server->handshake_timeout_ms = config && config->handshake_timeout_ms > 0
                                       ? config->handshake_timeout_ms
                                       : PAGE_SERVER_DEFAULT_HANDSHAKE_TIMEOUT_MS;
    pthread_mutex_init(&server->lock, NULL);
    pthread_cond_init(&server->handshakes_done, NULL);
    int rc = page_server_server_fds(server);
    if (rc == 0)
        rc = -pthread_create(&server->loop, NULL, page_server_loop_main, server);
    if (rc < 0) {
        page_server_server_free(server);
        return forkd_error_errno(err, rc, "page server: start");
    }
    server->loop_started = true;
    *out = server;
    return 0;
}

/* Wakes every handshake thread still waiting for a VMM, then waits for them all. */
static void page_server_stop_handshakes(struct page_server *server)
{
    pthread_mutex_lock(&server->lock);
    for (struct page_server_fork *fork = server->pending; fork; fork = fork->queue_next)
        page_server_cancel_accept(fork->socket_path);
    while (server->handshakes > 0)
        pthread_cond_wait(&server->handshakes_done, &server->lock);
    pthread_mutex_unlock(&server->lock);
}

void page_server_close(struct page_server *server)
{
    if (!server)
        return;
    pthread_mutex_lock(&server->lock);
    server->closing = true;
    page_server_wake_loop(server);
    pthread_mutex_unlock(&server->lock);
    pthread_join(server->loop, NULL);
    page_server_stop_handshakes(server);
    while (server->templates) {
        struct page_server_template *t = server->templates;
        server->templates = t->next;
        page_server_template_unref(t);
    }
    page_server_server_unref(server);
}
