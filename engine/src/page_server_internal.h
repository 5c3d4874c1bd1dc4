/*
 * The page server's objects, private to its two files: page_server.c (forks, the event loop
 * that resolves their faults, the handshakes, the server) and page_server_templates.c (the
 * templates: one read-only mapping of a snapshot's memory.bin shared by all its forks, the hot
 * set recorded from the first forks' faults, and the prefetch of that set into a new fork).
 * Who owns what is at the top of page_server.c.
 */
#ifndef FORKD_PAGE_SERVER_INTERNAL_H
#define FORKD_PAGE_SERVER_INTERNAL_H

#include "forkd/page_server.h"

#include "latency.h"
#include "uffd.h"

#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
#include <time.h>

#define PAGE_SERVER_SMALL_PAGE    4096ULL
#define PAGE_SERVER_HUGE_PAGE     (2ULL << 20)
#define PAGE_SERVER_MESSAGE_BATCH 64
#define PAGE_SERVER_EPOLL_BATCH   64
#define PAGE_SERVER_RETRY_DELAY_NS                                                                 \
    1000000ULL /* EAGAIN: the next try after 1 ms (or the next round) */
/* EAGAIN lasts while a REMOVE is unread or being applied: a guest discarding memory in a
 * long burst may keep a fault waiting that long. One refused for this long means a broken
 * VMM, and the fork is dropped. */
#define PAGE_SERVER_RETRY_GIVE_UP_NS (30ULL * 1000000000ULL)
#define PAGE_SERVER_PREFETCH_MAX_RUN (1ULL << 20) /* one prefetch ioctl copies at most this */
#define PAGE_SERVER_NAME_MAX         128
#define PAGE_SERVER_REASON_MAX       128

struct page_server_counters {
    atomic_uint_fast64_t faults, bytes, prefetched, zero, existed, retries, removes;
    struct latency_histogram service;
};

static inline uint64_t page_server_now_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000ULL + (uint64_t)now.tv_nsec;
}

static inline void page_server_count(atomic_uint_fast64_t *counter, uint64_t amount)
{
    atomic_fetch_add_explicit(counter, amount, memory_order_relaxed);
}

static inline uint64_t page_server_load(const atomic_uint_fast64_t *counter)
{
    return atomic_load_explicit(counter, memory_order_relaxed);
}

/* Sets a bit; true when it was clear. */
static inline bool page_server_bit_set(atomic_uint_fast64_t *bits, uint64_t index)
{
    uint64_t mask = 1ULL << (index % 64);
    return !(atomic_fetch_or_explicit(&bits[index / 64], mask, memory_order_relaxed) & mask);
}

/* A bit of a bitmap that may not exist yet (NULL: clear). */
static inline bool page_server_bit_test(atomic_uint_fast64_t *bits, uint64_t index)
{
    return bits && (page_server_load(&bits[index / 64]) >> (index % 64)) & 1;
}

struct page_server_template {
    atomic_int refs; /* the server's list (while listed) and every fork */
    struct page_server_template *next;
    char name[PAGE_SERVER_NAME_MAX];
    char path[PATH_MAX];
    /* The file's identity: device and inode alone could name a new file on file systems that
     * reuse inode numbers (or do not keep them stable), so its size and change times too. */
    dev_t dev;
    ino_t ino;
    off_t file_size;
    struct timespec mtime, ctime;
    const uint8_t *memory; /* PROT_READ, MAP_SHARED: the page cache, read once for all forks */
    uint64_t size;
    unsigned times_mapped;
    unsigned record_ms;        /* under server->lock */
    atomic_uint_fast64_t *hot; /* bitmap of 4 KiB file pages faulted while recording */
    atomic_uint_fast64_t hot_pages;
    atomic_uint_fast64_t hot_ready_ns; /* monotonic time the first recording window closes */
    /* The hot set was seeded (page_server_template_seed_hot): forks are prefetched from the
     * first on, the recording ones too. Under server->lock. */
    bool hot_seeded;
    atomic_uint forks_active, forks_total;
    struct page_server_counters counters;
    /* A lazy template (page_server_template_open_lazy): its memory.bin is still being filled,
     * chunk by chunk. NULL bitmaps: every byte is there. A fault in a chunk not ready yet
     * asks want() for it and waits; one in a failed chunk ends its fork. */
    atomic_uint_fast64_t *chunk_ready, *chunk_failed;
    uint64_t chunk_size, chunk_count;
    void (*want)(void *arg, uint64_t chunk);
    void *want_arg;
    pthread_mutex_t chunk_lock; /* guards chunk_error (the first failure's reason) */
    char chunk_error[PAGE_SERVER_REASON_MAX];
};

enum page_server_watch_kind {
    PAGE_SERVER_WATCH_WAKE,
    PAGE_SERVER_WATCH_TIMER,
    PAGE_SERVER_WATCH_UFFD,
    PAGE_SERVER_WATCH_CONNECTION
};

struct page_server_watch {
    enum page_server_watch_kind kind;
    struct page_server_fork *fork;
};

enum page_server_fork_state {
    PAGE_SERVER_PENDING,
    PAGE_SERVER_QUEUED,
    PAGE_SERVER_ACTIVE,
    PAGE_SERVER_FAILED,
    PAGE_SERVER_DROPPED
};

/* A fault that got EAGAIN, tried again later. */
struct page_server_retry {
    uint64_t address;
    uint64_t start_ns;
};

struct page_server_fork {
    atomic_int refs; /* owner, handshake thread, loop, queued requests */
    struct page_server *server;
    struct page_server_template *template;
    char label[64];
    char socket_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    pid_t expected_pid;
    bool adopted;       /* served by an earlier forkd: connection is the VMM's pidfd */
    bool prefetch;      /* set at prepare: the template's hot set is ready */
    unsigned record_ms; /* set at prepare: record the first record_ms of faults */

    pthread_mutex_t lock; /* guards the fields down to drop_reason */
    pthread_cond_t changed;
    enum page_server_fork_state state;
    bool released;
    struct forkd_error error;
    char drop_reason[PAGE_SERVER_REASON_MAX];
    char memory_error[PAGE_SERVER_REASON_MAX]; /* why its memory could not be served, or "" */

    /* Handshake thread until queued for attach, then the loop thread. */
    int listen_fd;
    struct uffd_handshake handshake;
    atomic_int peer_pid;
    uint64_t memory_bytes;

    /* Loop thread only. */
    struct page_server_watch uffd_watch, connection_watch;
    bool in_loop;
    struct page_server_fork *loop_next, *queue_next, *grave_next, *retry_next;
    bool retry_listed;
    uint64_t record_until_ns;
    atomic_uint_fast64_t *removed[UFFD_MAX_REGIONS]; /* pages removed (REMOVE), lazily made */
    struct page_server_retry *retries;
    size_t retry_count, retry_capacity;
    struct page_server_retry *waits; /* faults waiting for a chunk of a lazy template */
    size_t wait_count, wait_capacity;
    int pidfd; /* the VMM's (a dup), -1: none; killed when its memory cannot be served */

    atomic_bool active;
    struct page_server_counters counters;
};

struct page_server {
    atomic_int refs; /* the owner until page_server_close, and every fork */
    int handshake_timeout_ms;
    int epoll_fd, wake_fd, timer_fd;
    struct page_server_watch wake_watch, timer_watch;
    pthread_t loop;
    bool loop_started;
    const uint8_t *zero_page; /* PAGE_SERVER_HUGE_PAGE of zeros: the source of 2 MiB zero fills */
    atomic_uint active_forks;
    atomic_bool chunks_changed; /* a lazy template's chunk arrived or failed: look at waits */

    pthread_mutex_t lock; /* guards the fields down to handshakes */
    pthread_cond_t handshakes_done;
    bool closing;
    struct page_server_template *templates;
    struct page_server_fork *attach_queue, *detach_queue;
    struct page_server_fork *pending; /* forks whose handshake thread runs (via queue_next) */
    unsigned handshakes;

    /* Loop thread only. */
    struct page_server_fork *forks, *graveyard, *retry_list;
    bool timer_armed;
};

void page_server_counters_read(const struct page_server_counters *c, struct page_server_stats *out);
void page_server_template_unref(struct page_server_template *t);

/* page_server_templates.c */

/* Finds or maps the template of snapshot name (memory.bin at path); under server->lock.
 * Returns it without an extra reference. */
int page_server_template_get_locked(struct page_server *server, const char *name, const char *path,
                                    struct page_server_template **out, struct forkd_error *err);
/* Whether the template's first recording window has closed (its hot set can be prefetched). */
bool page_server_hot_ready(const struct page_server_template *t, uint64_t now);
/* Copies the template's hot set into a fork that does not run yet (its handshake thread). */
void page_server_prefetch(struct page_server_fork *fork);

#endif
