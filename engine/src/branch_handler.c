/*
 * The fault handler of a live branch (see branch_internal.h for who owns what): one thread
 * reads the write-protect userfaultfd. While the branch pre-arms it tracks (remembers each page
 * written, then lets the writer go); from the pause on it copies (captures each page's
 * pre-image before the guest may change it, then lets the writer go). It takes no lock on the
 * fault path and never waits for a write to memory.bin with a vCPU stopped.
 */
#include "branch_internal.h"

#include "basic/cleanup.h"
#include "basic/clock.h"
#include "basic/fsutil.h"

#include "thread_priority.h"

#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <linux/futex.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

static void branch_handler_fail(struct branch_run_state *run, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void branch_handler_fail(struct branch_run_state *run, int code, const char *fmt, ...)
{
    if (atomic_exchange(&run->handler.error_claimed, true))
        return; /* keep the first failure: later ones are usually its consequences */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(run->handler.error_message, sizeof(run->handler.error_message), fmt, ap);
    va_end(ap);
    /* Readers see the code only once the message is whole. */
    atomic_store_explicit(&run->handler.error, code, memory_order_release);
}

int branch_dirty_append(struct dirty_list *list, uint64_t address)
{
    if (list->count == list->capacity) {
        size_t capacity = list->capacity ? list->capacity * 2 : 4096;
        uint64_t *grown = realloc(list->addresses, capacity * sizeof(*grown));
        if (!grown)
            return -ENOMEM;
        list->addresses = grown;
        list->capacity = capacity;
    }
    list->addresses[list->count++] = address;
    return 0;
}

/* Reads what the uffd holds into the deferred ring, counting the read as the main loop does
 * (see branch_region.captured_at). Returns how many messages it read, or -errno. */
static int branch_handler_read_early(struct branch_run_state *run)
{
    struct branch_handler *handler = &run->handler;
    uint64_t room = HANDLER_DEFERRED_MAX - (handler->deferred_tail - handler->deferred_head);
    struct uffd_msg messages[HANDLER_BATCH];
    if (room == 0)
        return 0;
    uint32_t read_number = atomic_fetch_add(&handler->reads, 1) + 1;
    int count = uffd_read_events(run->handshake.uffd, messages,
                                 room < HANDLER_BATCH ? room : HANDLER_BATCH, NULL);
    for (int i = 0; i < count; i++)
        handler->deferred[handler->deferred_tail++ % HANDLER_DEFERRED_MAX] =
            (struct deferred_message){messages[i], read_number};
    return count;
}

/* The handler's own unprotect. The kernel refuses range ioctls (EAGAIN) while an event such
 * as a discard's REMOVE waits to be read, and this thread is its reader: read what waits
 * (handled after the message in hand), then try again, for a bounded time. */
static int branch_handler_unprotect(struct branch_run_state *run, uint64_t address, uint64_t length,
                                    uint64_t page_size, struct forkd_error *err)
{
    uint64_t deadline = forkd_deadline_after_ms(HANDLER_EAGAIN_MS);
    for (;;) {
        int rc = uffd_write_protect_once(run->handshake.uffd, address, length, page_size, false,
                                         false, err);
        if (rc != -EAGAIN || forkd_ms_left(deadline) == 0)
            return rc;
        int read = branch_handler_read_early(run);
        if (read < 0)
            return forkd_error_set(err, read, "read userfaultfd: %s", strerror(-read));
        if (read == 0)
            sched_yield(); /* the discarding thread still has to leave its wait */
    }
}

/* Tracking mode: remember the page, then let the writer go. The order matters: a page is in
 * the list before it is writable, so the barrier's final list covers every unprotected page. */
static void branch_track_fault(struct branch_run_state *run, struct branch_region *region,
                               uint64_t page_address)
{
    if (branch_dirty_append(&run->handler.tracking, page_address) < 0) {
        branch_handler_fail(run, -ENOMEM, "fault handler: out of memory for the dirty set");
        return; /* the page stays protected: the vCPU waits until the branch aborts */
    }
    struct forkd_error err;
    if (branch_handler_unprotect(run, page_address, region->uffd.page_size, region->uffd.page_size,
                                 &err) < 0)
        branch_handler_fail(run, err.code, "fault handler: %s", err.message);
}

/* Fault-around: extends the claim of the faulting page `index` to the free pages next to it in
 * its FAULT_AROUND_BYTES-aligned block, as far as they are free on each side, so one capture
 * and one unprotect serve a guest that writes its neighbours next. *first and *count receive
 * the run now claimed by the fault. */
static void branch_claim_around(struct branch_region *region, uint64_t index, uint64_t *first,
                                uint64_t *count)
{
    uint64_t block = FAULT_AROUND_BYTES / region->uffd.page_size;
    uint64_t low = index, high = index + 1;
    if (block > 1) {
        uint64_t start = index - index % block;
        uint64_t end = start + block < region->page_count ? start + block : region->page_count;
        uint8_t expected = 0;
        while (low > start && atomic_compare_exchange_strong(&region->pages[low - 1], &expected,
                                                             (uint8_t)PAGE_CLAIMED_BY_FAULT))
            low--;
        expected = 0;
        while (high < end && atomic_compare_exchange_strong(&region->pages[high], &expected,
                                                            (uint8_t)PAGE_CLAIMED_BY_FAULT))
            high++;
    }
    *first = low;
    *count = high - low;
}

/* Reserves count staging slots for the handler; false when the copier has not freed enough. */
static bool branch_staging_reserve(struct branch_run_state *run, uint64_t count)
{
    struct staging *staging = &run->staging;
    if (!staging->slots)
        return false;
    uint64_t used = atomic_load_explicit(&staging->head, memory_order_relaxed) -
                    atomic_load_explicit(&staging->tail, memory_order_acquire);
    if (used + count <= staging->slot_count)
        return true;
    atomic_fetch_add(&staging->full, 1);
    return false;
}

/* Captures a claimed run into the reserved slots, one page per slot (slots wrap). */
static int branch_staging_capture(struct branch_run_state *run, struct branch_region *region,
                                  uint64_t first, uint64_t count)
{
    struct staging *staging = &run->staging;
    uint64_t head = atomic_load_explicit(&staging->head, memory_order_relaxed);
    uint64_t page_size = region->uffd.page_size;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t slot = (head + i) % staging->slot_count;
        int rc = branch_read_guest(run, region, (first + i) * page_size,
                                   staging->slots + slot * staging->slot_bytes, page_size);
        if (rc < 0)
            return rc;
        staging->pages[slot] = (struct staged_page){region, first + i};
    }
    return 0;
}

/* Hands the captured run to the copier, and wakes it if it waits for the last pages. */
static void branch_staging_publish(struct branch_run_state *run, uint64_t count)
{
    atomic_fetch_add_explicit(&run->staging.head, count, memory_order_release);
    branch_wake_copier(run);
}

/* Without a staging slot: the handler writes the run itself, after the vCPU was woken. */
static void branch_fault_write(struct branch *branch, struct branch_run_state *run,
                               struct branch_region *region, uint64_t first, uint64_t count,
                               const uint8_t *buffer)
{
    uint64_t page_size = region->uffd.page_size;
    int rc = fs_pwrite_all(run->memory_fd, buffer, count * page_size,
                           (off_t)(region->uffd.file_offset + first * page_size));
    if (rc < 0)
        branch_handler_fail(run, rc, "write memory.bin: %s", strerror(-rc));
    branch_count_write(region, first, count);
    atomic_fetch_add(&branch->pages_by_fault, count);
    atomic_fetch_add(&branch->bytes_copied, count * page_size);
    atomic_fetch_add(&run->pages_written, count);
    branch_wake_copier(run);
}

/* A fault on a page someone else claimed: wake the vCPU once the page is captured. */
static void branch_fault_on_claimed(struct branch *branch, struct branch_run_state *run,
                                    struct branch_region *region, uint64_t page_address,
                                    uint64_t index, uint64_t started_ns)
{
    if (!(atomic_load(&region->pages[index]) & PAGE_CAPTURED)) {
        /* The bulk copier claimed it and has not captured it yet. It unprotects (and so wakes
         * this vCPU) right after capturing; waiting here would hold the one handler thread, at
         * real-time priority, against the very copier it waits for. */
        atomic_fetch_add(&branch->faults_left_to_bulk, 1);
        return;
    }
    struct forkd_error err;
    uint64_t page_size = region->uffd.page_size;
    if (branch_handler_unprotect(run, page_address, page_size, page_size, &err) < 0)
        branch_handler_fail(run, err.code, "fault handler: %s", err.message);
    latency_record(&branch->service, forkd_monotonic_ns() - started_ns);
}

/* Copy mode: claim the page (with fault-around, its free neighbours too), capture the
 * pre-images (into staging slots, else into buffer), unprotect (which wakes the vCPU), then
 * hand the pages to the copier or write them here. Copy before unprotect, always. */
static void branch_copy_fault(struct branch *branch, struct branch_run_state *run,
                              struct branch_region *region, uint64_t page_address, uint8_t *buffer,
                              uint64_t started_ns)
{
    uint64_t page_size = region->uffd.page_size;
    uint64_t index = (page_address - region->uffd.host_base) / page_size;
    uint8_t expected = 0;
    if (!atomic_compare_exchange_strong(&region->pages[index], &expected,
                                        (uint8_t)PAGE_CLAIMED_BY_FAULT)) {
        branch_fault_on_claimed(branch, run, region, page_address, index, started_ns);
        return;
    }
    if (run->fault_claimed_hook)
        run->fault_claimed_hook(run->hook_context);
    uint64_t first = index, count = 1;
    if (branch_lever(run, BRANCH_LEVER_FAULT_AROUND))
        branch_claim_around(region, index, &first, &count);
    uint8_t *mirror =
        run->mirror ? run->mirror + region->uffd.file_offset + first * page_size : NULL;
    bool staged =
        !mirror && branch_lever(run, BRANCH_LEVER_STAGING) && branch_staging_reserve(run, count);
    int rc = staged ? branch_staging_capture(run, region, first, count)
                    : branch_read_guest(run, region, first * page_size, mirror ? mirror : buffer,
                                        count * page_size);
    if (rc < 0)
        branch_handler_fail(run, rc, "fault handler: read guest page 0x%llx: %s",
                            (unsigned long long)page_address, strerror(-rc));
    branch_mark_captured(run, region, first, count);
    struct forkd_error err;
    if (branch_handler_unprotect(run, region->uffd.host_base + first * page_size, count * page_size,
                                 page_size, &err) < 0)
        branch_handler_fail(run, err.code, "fault handler: %s", err.message);
    latency_record(&branch->service, forkd_monotonic_ns() - started_ns); /* the vCPU runs again */
    atomic_fetch_add(&run->pages_released, count);
    if (mirror) {
        atomic_fetch_add(&branch->pages_by_fault, count); /* the copier writes the mirror */
        branch_wake_copier(run);
    } else if (staged) {
        branch_staging_publish(run, count);
    } else {
        branch_fault_write(branch, run, region, first, count, buffer);
    }
}

/* Pages [first, +count) of region were discarded while tracking: the page is empty at the
 * save unless written again, and a write after the re-arm faults. Whether the discard kept the
 * page write-protected is the kernel's business: the page is re-armed at the next round and,
 * since the removal itself completes only after this read, once more inside the pause. */
static void branch_removed_while_tracking(struct branch_run_state *run,
                                          const struct branch_region *region, uint64_t first,
                                          uint64_t count)
{
    uint64_t page_size = region->uffd.page_size;
    for (uint64_t p = first; p < first + count; p++) {
        uint64_t address = region->uffd.host_base + p * page_size;
        if (branch_dirty_append(&run->handler.tracking, address) < 0 ||
            branch_dirty_append(&run->handler.removed, address) < 0) {
            branch_handler_fail(run, -ENOMEM, "fault handler: out of memory for the dirty set");
            return;
        }
    }
}

/* Pages [first, +count) of region were discarded after the save (reported by userfaultfd read
 * number `read`): their contents at the save are gone unless captured before that read. */
static void branch_removed_while_copying(struct branch_run_state *run,
                                         const struct branch_region *region, uint64_t first,
                                         uint64_t count, uint32_t read)
{
    uint64_t lost = 0;
    for (uint64_t p = first; p < first + count; p++) {
        uint32_t captured_at = atomic_load(&region->captured_at[p]);
        lost += captured_at == 0 || captured_at > read;
    }
    if (lost == 0)
        return;
    run->handler.pages_lost += lost;
    branch_handler_fail(run, -ENODATA,
                        "the guest discarded %llu pages of memory during the copy (balloon) "
                        "before they were captured; the snapshot would be torn",
                        (unsigned long long)run->handler.pages_lost);
}

/* UFFD_EVENT_REMOVE (the VMM asked for EVENT_REMOVE): the guest discarded [start, end), with
 * no write-protect fault (MADV_DONTNEED, MADV_REMOVE). The discarding thread waits until this
 * event is read, so the pages are still there, but forkd can no longer take them. */
static void branch_handle_remove(struct branch_run_state *run, uint64_t start, uint64_t end,
                                 uint32_t read)
{
    for (size_t i = 0; i < run->region_count; i++) {
        const struct branch_region *region = &run->regions[i];
        uint64_t base = region->uffd.host_base, page_size = region->uffd.page_size;
        uint64_t from = start > base ? start : base;
        uint64_t to = end < base + region->uffd.size ? end : base + region->uffd.size;
        if (from >= to)
            continue;
        uint64_t first = (from - base) / page_size;
        uint64_t count = (to - base + page_size - 1) / page_size - first;
        if (atomic_load(&run->handler.mode) == HANDLER_TRACKING)
            branch_removed_while_tracking(run, region, first, count);
        else if (atomic_load(&run->save_protected))
            branch_removed_while_copying(run, region, first, count, read);
        /* else: copy mode before the save (ARM_IN_PAUSE arms all of memory in the pause). */
    }
}

static void branch_handle_message(struct branch *branch, struct branch_run_state *run,
                                  const struct uffd_msg *message, uint8_t *buffer, uint32_t read)
{
    if (message->event == UFFD_EVENT_REMOVE) {
        branch_handle_remove(run, message->arg.remove.start, message->arg.remove.end, read);
        return;
    }
    if (message->event != UFFD_EVENT_PAGEFAULT || !uffd_is_wp_fault(message))
        return; /* a write-protect uffd registers nothing else; nothing to serve */
    uint64_t address = message->arg.pagefault.address;
    struct branch_region *region = branch_region_of(run, address);
    if (!region) {
        branch_handler_fail(run, -EFAULT, "fault at 0x%llx outside every guest region",
                            (unsigned long long)address);
        return;
    }
    uint64_t page_address = address & ~(region->uffd.page_size - 1);
    if (atomic_load(&run->handler.mode) == HANDLER_TRACKING) {
        branch_track_fault(run, region, page_address);
        return;
    }
    uint64_t start = forkd_monotonic_ns();
    branch_copy_fault(branch, run, region, page_address, buffer, start);
}

/* Serves a pending request of the branch thread: hand over the tracking list and switch to
 * the requested mode, then acknowledge. Runs between messages, so each message is handled
 * entirely in one mode. */
static void branch_handler_serve_request(struct branch_run_state *run)
{
    pthread_mutex_lock(&run->handler.control_lock);
    if (run->handler.ack_seq != run->handler.request_seq) {
        /* Into the pause: every page discarded while tracking is re-armed once more. */
        for (size_t i = 0;
             run->handler.requested_mode == HANDLER_COPY && i < run->handler.removed.count; i++)
            if (branch_dirty_append(&run->handler.tracking, run->handler.removed.addresses[i]) < 0)
                branch_handler_fail(run, -ENOMEM, "fault handler: out of memory for the dirty set");
        run->handler.handed_over = run->handler.tracking;
        run->handler.tracking = (struct dirty_list){0};
        atomic_store(&run->handler.mode, (int)run->handler.requested_mode);
        run->handler.ack_seq = run->handler.request_seq;
        pthread_cond_broadcast(&run->handler.control_cond);
    }
    pthread_mutex_unlock(&run->handler.control_lock);
}

static void *branch_handler_loop(void *arg)
{
    struct branch_run_state *run = arg;
    struct branch *branch = run->handler.branch;
    uint64_t buffer_size = FAULT_AROUND_BYTES; /* a fault-around run */
    for (size_t i = 0; i < run->region_count; i++)
        if (run->regions[i].uffd.page_size > buffer_size)
            buffer_size = run->regions[i].uffd.page_size;
    _cleanup_free_ uint8_t *buffer = malloc(buffer_size);
    if (!buffer) {
        branch_handler_fail(run, -ENOMEM, "fault handler: out of memory for a page buffer");
        atomic_store(&run->handler.stop, true); /* serve nothing: the branch aborts */
    }
    struct uffd_msg messages[HANDLER_BATCH];
    struct thread_priority priority; /* a vCPU waits on every fault this thread serves */
    thread_priority_raise(&priority);
    while (!atomic_load(&run->handler.stop)) {
        /* The uffd says nothing when the VMM dies; its handshake connection hangs up. */
        int ready = uffd_wait_peer(run->handshake.uffd, run->handshake.connection,
                                   run->handler.control_fd, -1);
        if (ready < 0) {
            branch_handler_fail(run, ready == -EPIPE ? -ESRCH : ready, "userfaultfd: %s",
                                ready == -EPIPE ? "the VMM is gone" : strerror(-ready));
            break;
        }
        uint64_t ignored;
        if (read(run->handler.control_fd, &ignored, sizeof(ignored)) < 0 && errno != EAGAIN)
            break;
        /* Counted before the read: see branch_region.captured_at. */
        uint32_t read_number = atomic_fetch_add(&run->handler.reads, 1) + 1;
        int count = uffd_read_events(run->handshake.uffd, messages, HANDLER_BATCH, NULL);
        for (int i = 0; i < count; i++)
            branch_handle_message(branch, run, &messages[i], buffer, read_number);
        /* Then what was read early meanwhile, in order (it may read more early itself). */
        while (run->handler.deferred_head != run->handler.deferred_tail) {
            struct deferred_message deferred =
                run->handler.deferred[run->handler.deferred_head++ % HANDLER_DEFERRED_MAX];
            branch_handle_message(branch, run, &deferred.message, buffer, deferred.read);
        }
        branch_handler_serve_request(run);
        thread_priority_check(&priority);
    }
    branch_handler_serve_request(run);
    thread_priority_restore(&priority);
    pthread_mutex_lock(&run->handler.control_lock);
    run->handler.exited = true; /* never leave the branch thread waiting for an ack */
    pthread_cond_broadcast(&run->handler.control_cond);
    pthread_mutex_unlock(&run->handler.control_lock);
    return NULL;
}

int branch_handler_request(struct branch_run_state *run, enum handler_mode mode,
                           struct dirty_list *out)
{
    *out = (struct dirty_list){0}; /* empty on every failure: the caller frees it regardless */
    pthread_mutex_lock(&run->handler.control_lock);
    run->handler.requested_mode = mode;
    unsigned seq = ++run->handler.request_seq;
    pthread_mutex_unlock(&run->handler.control_lock);
    uint64_t one = 1;
    if (write(run->handler.control_fd, &one, sizeof(one)) != sizeof(one))
        return -errno;
    pthread_mutex_lock(&run->handler.control_lock);
    while (run->handler.ack_seq != seq && !run->handler.exited)
        pthread_cond_wait(&run->handler.control_cond, &run->handler.control_lock);
    *out = run->handler.handed_over;
    run->handler.handed_over = (struct dirty_list){0};
    pthread_mutex_unlock(&run->handler.control_lock);
    return atomic_load(&run->handler.error);
}

int branch_handler_start(struct branch *branch, struct branch_run_state *run,
                         enum handler_mode mode)
{
    atomic_store(&run->handler.mode, (int)mode);
    run->handler.branch = branch;
    int rc = pthread_create(&run->handler.thread, NULL, branch_handler_loop, run);
    if (rc != 0)
        return -rc;
    run->handler.running = true;
    return 0;
}

void branch_handler_stop(struct branch_run_state *run)
{
    if (!run->handler.running)
        return;
    atomic_store(&run->handler.stop, true);
    uint64_t one = 1;
    if (write(run->handler.control_fd, &one, sizeof(one)) != sizeof(one))
        abort(); /* an eventfd write of 1 cannot fail; the handler would never stop */
    pthread_join(run->handler.thread, NULL);
    run->handler.running = false;
}

int branch_handler_open(struct branch_run_state *run)
{
    run->handler.control_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (run->handler.control_fd < 0)
        return -errno;
    pthread_mutex_init(&run->handler.control_lock, NULL);
    pthread_cond_init(&run->handler.control_cond, NULL);
    return 0;
}

void branch_handler_close(struct branch_run_state *run)
{
    pthread_mutex_destroy(&run->handler.control_lock);
    pthread_cond_destroy(&run->handler.control_cond);
    close(run->handler.control_fd);
    free(run->handler.tracking.addresses);
    free(run->handler.removed.addresses);
    free(run->handler.handed_over.addresses);
}
