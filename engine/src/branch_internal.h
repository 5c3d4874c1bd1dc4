/*
 * The state of one branch run, private to the engine's branch module: branch.c (the phases,
 * arming, the pause, the bulk copier) and branch_handler.c (the fault handler). Threads and
 * what they own:
 * - the branch thread (the caller of branch_run) drives the phases, arms and re-arms
 *   write-protect, runs the bulk copier and owns everything in struct branch_run_state except
 *   struct branch_handler;
 * - the fault handler thread (branch_handler.c) reads the userfaultfd and owns the tracking
 *   list it appends to; it hands that list over, and switches modes, only when the branch
 *   thread asks through the control eventfd and waits for its acknowledgement (the barrier).
 * Per-page claims (an atomic byte per page) are the only state both copy paths touch; nothing
 * on the fault path takes a lock.
 */
#ifndef FORKD_BRANCH_INTERNAL_H
#define FORKD_BRANCH_INTERNAL_H

#include "forkd/branch.h"

#include "latency.h"
#include "uffd.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

/* Page claim states: who writes the page to memory.bin, and whether its pre-image is taken. */
#define PAGE_CLAIMED_BY_FAULT 1u
#define PAGE_CLAIMED_BY_BULK  2u
#define PAGE_CAPTURED         4u

#define BULK_CHUNK_BYTES      (2u << 20)  /* one read and one write per chunk */
#define FAULT_AROUND_BYTES    (64u << 10) /* an aligned run a fault may capture in one go */
#define STAGING_BYTES         (16u << 20) /* pre-images the fault handler can hold unwritten */
#define STAGING_MIN_SLOTS     8
#define MIRROR_MEMORY_SHARE   2          /* a mirror takes at most 1/this of MemAvailable */
#define MIRROR_WRITE_BYTES    (8u << 20) /* the mirror goes to memory.bin in writes this big */
#define HANDLER_BATCH         64
#define HANDLER_DEFERRED_MAX  256  /* events read early; one per VMM thread at most */
#define HANDLER_EAGAIN_MS     2000 /* the handler's own ioctls, refused while events wait */
#define REARM_MAX_ROUNDS      16
#define REARM_CONVERGED_PAGES 64 /* dirty set small enough to re-arm inside the pause */
/* LIVE: the first tracking round lasts at least this long (times the host's time scale). What the
 * guest writes in it is its working set, the snapshot's hot set; a round that ends as soon as
 * everything is armed sees the few pages written during the arming (one write fault each), and
 * converges at once. */
#ifndef REARM_HOT_WINDOW_MS /* a build may set it, to measure what the window costs */
#define REARM_HOT_WINDOW_MS 20
#endif
#define HANDSHAKE_TIMEOUT_MS     5000
#define VMSTATE_ONLY_MEMORY_PATH "/dev/null/forkd-vmstate-only" /* must never be opened */

enum handler_mode { HANDLER_TRACKING, HANDLER_COPY };

struct branch_region {
    struct uffd_region uffd;
    uint64_t page_count;
    _Atomic uint8_t *pages;
    /* Per page, once captured: 1 + the number of userfaultfd reads the handler had begun when
     * the capture was complete (branch_mark_captured); 0 until then. A page the guest discards
     * is safe exactly when this is at most the number of the read that reported the discard:
     * its pre-image was taken before that read, so before the kernel removed the page. */
    _Atomic uint32_t *captured_at;
    _Atomic uint8_t *write_counts; /* tests only */
};

/* A growable list of page addresses the tracking handler unprotected. */
struct dirty_list {
    uint64_t *addresses;
    size_t count, capacity;
};

/* Pre-images the fault handler captured and released, waiting for the bulk copier (between
 * its chunks, and at the end) to write them to memory.bin: so a vCPU's fault never waits
 * behind a write. One producer (the handler), one consumer (the copier), no lock: slot i is
 * the handler's until `head` passes it, then the copier's until `tail` does. */
struct staged_page {
    struct branch_region *region;
    uint64_t index;
};

struct staging {
    uint8_t *slots; /* slot_count slots of slot_bytes, mapped and populated up front */
    size_t mapped_bytes;
    uint64_t slot_bytes, slot_count;
    struct staged_page *pages;
    _Atomic uint64_t head;     /* pages published by the handler */
    _Atomic uint64_t tail;     /* pages written by the copier */
    atomic_uint_fast64_t full; /* faults written by the handler itself: no slot was free */
};

/* A message the handler read early, while its own ioctl waited for the events ahead of it to
 * be read (branch_handler.c), with the number of the read that returned it. */
struct deferred_message {
    struct uffd_msg message;
    uint32_t read;
};

/* The fault handler thread and its hand-shake with the branch thread (branch_handler.c). */
struct branch_handler {
    pthread_t thread;
    bool running;
    struct branch *branch;        /* whose figures the handler counts */
    int control_fd;               /* eventfd: wakes the handler for a request or to stop */
    pthread_mutex_t control_lock; /* request/ack hand-shake, never taken on the fault path */
    pthread_cond_t control_cond;
    unsigned request_seq, ack_seq; /* guarded by control_lock */
    enum handler_mode requested_mode;
    struct dirty_list handed_over; /* filled by the handler when it acknowledges */
    atomic_bool stop;
    bool exited; /* guarded by control_lock */
    _Atomic int mode;
    struct dirty_list tracking; /* owned by the handler */
    /* Pages the guest discarded while the handler tracked (owned by the handler): re-armed in
     * the pause, when every discard reported before it has completed. */
    struct dirty_list removed;
    _Atomic uint32_t reads; /* userfaultfd reads begun: see branch_region.captured_at */
    /* Handler only: a ring of messages read early, handled in order after the one in hand. */
    struct deferred_message deferred[HANDLER_DEFERRED_MAX];
    uint64_t deferred_head, deferred_tail;
    uint64_t pages_lost; /* handler only: discarded after the save before their capture */
    /* Negative errno once the handler failed, published after its message is complete (the
     * first failure claims the message through error_claimed, then writes it). */
    _Atomic int error;
    atomic_bool error_claimed;
    char error_message[FORKD_ERROR_MESSAGE_MAX];
};

struct branch_run_state {
    struct store *store;
    struct vm *vm;
    pid_t vmm_pid;
    enum store_mode mode;
    struct store_writer *writer;
    struct uffd_handshake handshake;
    size_t region_count;
    struct branch_region regions[UFFD_MAX_REGIONS];
    uint64_t total_bytes;
    struct vm_devices devices; /* the VM's, when the branch began */
    int memory_fd;             /* memory.bin being written */
    const uint8_t *guest_map;  /* MEMFD guest memory, mapped read-only; NULL for anonymous */
    size_t guest_map_size;

    struct branch_handler handler;
    atomic_uint_fast64_t pages_written;
    atomic_uint_fast64_t pages_released; /* captured and unprotected, by either path */
    uint64_t total_pages;
    uint64_t resumed_ns; /* start of the copy phase */
    /* Set inside the pause once memory at the save is write-protected: from then on a page
     * the guest discards before its capture is lost (branch_handler.c). */
    atomic_bool save_protected;
    unsigned levers;                           /* branch_lever bits in use */
    void (*fault_claimed_hook)(void *context); /* branch_request's, for tests */
    void *hook_context;
    struct staging staging; /* with BRANCH_LEVER_STAGING, when there is no mirror */
    /* With BRANCH_LEVER_MIRROR: memory.bin's image (indexed by file offset) in anonymous
     * memory, populated before the pause. Both copy paths capture pre-images into it at memory
     * speed, each page at its own offset (a page is claimed once, so writers never meet); the
     * copier writes it to memory.bin once every page is captured. NULL: no room (see
     * MIRROR_MEMORY_SHARE), pages go to memory.bin as they are captured. */
    uint8_t *mirror;       /* total_bytes long */
    struct dirty_list hot; /* pages dirtied while pre-arming (branch thread) */
    /* The last dirty set, re-armed inside the pause: joins `hot` for the snapshot's hot set once
     * the copy is done (the guest was writing these pages right before the pause). */
    struct dirty_list paused_dirty;
    /* The hot set the snapshot records, built from `hot` once the copy is done. */
    size_t hot_set_count;
    struct store_hot_range hot_set[STORE_MAX_HOT_RANGES];
    /* Futex word bumped by the fault handler after each page it wrote, woken only while the
     * copier waits for the last of them (written_waiting), so the fault path makes no system
     * call otherwise and takes no lock. */
    _Atomic uint32_t written_seq;
    atomic_bool written_waiting;
};

/* Whether a branch may still be cancelled: it is OPEN until it either honours a cancel or
 * commits to publishing (the point of no return); the first of the two wins. */
enum branch_commit { BRANCH_OPEN, BRANCH_CANCEL_REQUESTED, BRANCH_COMMITTED };

struct branch {
    _Atomic int commit;               /* enum branch_commit */
    struct latency_histogram service; /* fault service times */
    atomic_uint_fast64_t faults_left_to_bulk;
    atomic_uint_fast64_t captured_ns;  /* resume to the last page released; 0 until then */
    _Atomic unsigned levers;           /* branch_progress.levers */
    atomic_uint_fast64_t mirror_bytes; /* branch_progress.mirror_bytes */
    _Atomic int phase;
    atomic_uint_fast64_t bytes_copied, pages_by_fault, pages_by_bulk;
    uint64_t bytes_total;
    uint32_t page_size;
    pthread_mutex_t figures_lock; /* figures are written by the branch thread, read by anyone */
    struct store_figures figures;
    branch_phase_fn on_phase;
    void *context;
    struct branch_run_state *run; /* during branch_run only */
    uint8_t *final_write_counts;  /* tests: flattened copy after the run */
    uint64_t final_page_count;
};

static inline bool branch_lever(const struct branch_run_state *run, enum branch_lever lever)
{
    return (run->levers & lever) != 0;
}

/* branch.c: guest memory access. */

/* Copies guest bytes [region offset, +length) into buffer: from our map of the memfd, or from
 * the VMM's address space for anonymous memory. A read never trips write-protect. */
int branch_read_guest(const struct branch_run_state *run, const struct branch_region *region,
                      uint64_t offset, void *buffer, size_t length);
/* Marks pages [first, +count) captured, once their pre-images are read and before they are
 * unprotected; records which userfaultfd read the capture precedes (captured_at). */
void branch_mark_captured(struct branch_run_state *run, struct branch_region *region,
                          uint64_t first, uint64_t count);
/* Wakes the copier if it waits for the last pages to be captured or written. */
void branch_wake_copier(struct branch_run_state *run);
/* Tests: counts a write of pages [page, +pages) to memory.bin. */
void branch_count_write(struct branch_region *region, uint64_t page, uint64_t pages);
/* The region holding address, or NULL. */
struct branch_region *branch_region_of(struct branch_run_state *run, uint64_t address);

/* branch_handler.c: the fault handler. */

/* -ENOMEM when the list cannot grow. */
int branch_dirty_append(struct dirty_list *list, uint64_t address);
/* Sets up the handler's hand-shake (its eventfd, lock, condition). Returns 0 or -errno. */
int branch_handler_open(struct branch_run_state *run);
/* Frees what branch_handler_open set up and the lists the handler left; after stop. */
void branch_handler_close(struct branch_run_state *run);
/* Starts the handler thread in mode. Returns 0 or -errno. */
int branch_handler_start(struct branch *branch, struct branch_run_state *run,
                         enum handler_mode mode);
/* Hands the handler a mode and takes its tracking list: the barrier of the design. Returns
 * once the handler acknowledged (or failed): 0, or the handler's negative errno. */
int branch_handler_request(struct branch_run_state *run, enum handler_mode mode,
                           struct dirty_list *out);
/* Stops and joins the handler; a no-op when it does not run. */
void branch_handler_stop(struct branch_run_state *run);

#endif
