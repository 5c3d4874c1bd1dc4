/*
 * Branching a VM into a snapshot (see forkd/branch.h for the algorithm and its guarantees):
 * the phases, arming, the pause and the bulk copier, on the branch thread. The fault handler
 * is in branch_handler.c; who owns what is in branch_internal.h.
 */
#include "branch_internal.h"

#include "basic/cleanup.h"
#include "basic/fsutil.h"

#include "disk_clone.h"
#include "hot_set.h"
#include "forkd/probe.h"
#include "latency.h"
#include "pause.h"
#include "uffd.h"
#include "vmm_client.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* ---- handle, progress ------------------------------------------------------------------- */

struct branch *branch_new(void)
{
    struct branch *branch = calloc(1, sizeof(*branch));
    if (branch)
        pthread_mutex_init(&branch->figures_lock, NULL);
    return branch;
}

void branch_free(struct branch *branch)
{
    if (!branch)
        return;
    pthread_mutex_destroy(&branch->figures_lock);
    free(branch->final_write_counts);
    free(branch);
}

bool branch_cancel(struct branch *branch)
{
    int expected = BRANCH_OPEN;
    if (atomic_compare_exchange_strong(&branch->commit, &expected, BRANCH_CANCEL_REQUESTED))
        return true;
    return expected == BRANCH_CANCEL_REQUESTED;
}

static bool branch_cancelled(struct branch *branch)
{
    return atomic_load(&branch->commit) == BRANCH_CANCEL_REQUESTED;
}

/* The point of no return: from here the branch publishes (or fails), and a cancel is refused.
 * -ECANCELED when a cancel came first. */
static int branch_commit(struct branch *branch, struct forkd_error *err)
{
    int expected = BRANCH_OPEN;
    if (atomic_compare_exchange_strong(&branch->commit, &expected, BRANCH_COMMITTED))
        return 0;
    return forkd_error_set(err, -ECANCELED, "branch cancelled before it was published");
}

static void branch_service_percentiles(struct branch *branch, struct branch_progress *out)
{
    struct latency_summary service;
    latency_summarize(&branch->service, &service);
    out->faults_served = service.count;
    out->fault_service_p50_ns = service.p50_ns;
    out->fault_service_p99_ns = service.p99_ns;
    out->fault_service_max_ns = service.max_ns;
    out->faults_left_to_bulk = atomic_load(&branch->faults_left_to_bulk);
    out->captured_ns = atomic_load(&branch->captured_ns);
    out->mirror_bytes = atomic_load(&branch->mirror_bytes);
    out->levers = atomic_load(&branch->levers);
}

void branch_get_progress(struct branch *branch, struct branch_progress *out)
{
    memset(out, 0, sizeof(*out));
    branch_service_percentiles(branch, out);
    out->phase = (enum branch_phase)atomic_load(&branch->phase);
    out->bytes_copied = atomic_load(&branch->bytes_copied);
    out->bytes_total = branch->bytes_total;
    out->pages_by_fault = atomic_load(&branch->pages_by_fault);
    out->pages_by_bulk = atomic_load(&branch->pages_by_bulk);
    out->page_size = branch->page_size;
    pthread_mutex_lock(&branch->figures_lock);
    out->figures = branch->figures;
    pthread_mutex_unlock(&branch->figures_lock);
    out->figures.pages_by_fault = out->pages_by_fault;
    out->figures.pages_by_bulk = out->pages_by_bulk;
    out->figures.bytes_copied = out->bytes_copied;
}

const uint8_t *branch_page_write_counts(const struct branch *branch, uint64_t *page_count,
                                        uint32_t *page_size)
{
    *page_count = branch->final_page_count;
    *page_size = branch->page_size;
    return branch->final_write_counts;
}

static void branch_set_phase(struct branch *branch, enum branch_phase phase)
{
    atomic_store(&branch->phase, (int)phase);
    if (!branch->on_phase)
        return;
    struct branch_progress progress;
    branch_get_progress(branch, &progress);
    branch->on_phase(branch->context, phase, &progress);
}

/* Records one duration: figures_lock keeps readers from seeing half-written figures. */
static void branch_record(struct branch *branch, uint64_t *field, uint64_t value)
{
    pthread_mutex_lock(&branch->figures_lock);
    *field = value;
    pthread_mutex_unlock(&branch->figures_lock);
}

/* ---- drives ----------------------------------------------------------------------------- */

/* Before anything is armed or paused: the VM's writable drives can be captured inside the
 * pause (the state directory reflinks, each drive is on its file system), or the request
 * accepts a copy there. -EOPNOTSUPP saying why and what would work otherwise. */
static int branch_check_drives(struct branch_run_state *run, const struct branch_request *request,
                               struct forkd_error *err)
{
    _cleanup_free_ struct vm_status *status = malloc(sizeof(*status));
    if (!status)
        return forkd_error_set(err, -ENOMEM, "branch: out of memory");
    vm_get_status(run->vm, status);
    run->devices = status->devices;
    if (!devices_have_writable_drive(&run->devices) || request->allow_disk_copy)
        return 0;
    const char *dir = store_dir(run->store);
    for (size_t i = 0; i < run->devices.drive_count; i++) {
        const struct devices_drive *drive = &run->devices.drives[i];
        if (!drive->read_only && !disk_clone_same_file_system(drive->path, dir))
            return forkd_error_set(
                err, -EOPNOTSUPP,
                "writable drive '%s' (%s) is not on the state directory's file system (%s): a "
                "reflink clone cannot cross file systems, and the branch must capture the drive "
                "inside its pause: keep writable drives on the state directory's XFS or btrfs, "
                "or accept a copy inside the pause (allow_disk_copy_in_pause)",
                drive->id, drive->path, dir);
    }
    return disk_clone_probe(dir, err);
}

/* Inside the pause, after the VMM's save (which drains block I/O): each writable drive is
 * cloned into the snapshot, so the disk is the one the saved state and memory describe. */
static int branch_capture_drives(struct branch *branch, struct branch_run_state *run,
                                 const struct branch_request *request, struct forkd_error *err)
{
    uint64_t start = forkd_monotonic_ns(), copied_total = 0;
    for (size_t i = 0; i < run->devices.drive_count; i++) {
        const struct devices_drive *drive = &run->devices.drives[i];
        if (drive->read_only)
            continue;
        char target[PATH_MAX];
        uint64_t copied = 0;
        int rc = store_drive_path(store_writer_dir(run->writer), drive->id, target, sizeof(target));
        if (rc < 0)
            return forkd_error_set(err, rc, "drive '%s': snapshot path too long", drive->id);
        rc = disk_clone_file(drive->path, target, request->allow_disk_copy, &copied, err);
        if (rc < 0)
            return forkd_error_prefix(err, "capture drive '%s' inside the pause: ", drive->id);
        copied_total += copied;
    }
    branch_record(branch, &branch->figures.disk_capture_ns, forkd_monotonic_ns() - start);
    branch_record(branch, &branch->figures.disk_copied_bytes, copied_total);
    return 0;
}

/* After the resume: the captured drives reach the disk before the snapshot is published. */
static int branch_sync_drives(struct branch_run_state *run, struct forkd_error *err)
{
    for (size_t i = 0; i < run->devices.drive_count; i++) {
        if (run->devices.drives[i].read_only)
            continue;
        char path[PATH_MAX];
        if (store_drive_path(store_writer_dir(run->writer), run->devices.drives[i].id, path,
                             sizeof(path)) < 0)
            return forkd_error_set(err, -ENAMETOOLONG, "drive path too long");
        _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0 || fsync(fd) < 0)
            return forkd_error_errno(err, -errno, "sync captured drive %s", path);
    }
    return 0;
}

static void branch_record_pause(struct branch *branch, const struct pause_guard *guard)
{
    pthread_mutex_lock(&branch->figures_lock);
    branch->figures.pause_ns = pause_guard_window_ns(guard);
    branch->figures.pause_request_ns = guard->paused_ns - guard->requested_ns;
    branch->figures.resume_request_ns = guard->resumed_ns - guard->resume_requested_ns;
    pthread_mutex_unlock(&branch->figures_lock);
}

/* ---- guest memory access ---------------------------------------------------------------- */

/* Copies guest bytes [region offset, +length) into buffer: from our map of the memfd, or from
 * the VMM's address space for anonymous memory. A read never trips write-protect. */
int branch_read_guest(const struct branch_run_state *run, const struct branch_region *region,
                      uint64_t offset, void *buffer, size_t length)
{
    if (run->guest_map) {
        memcpy(buffer, run->guest_map + region->uffd.file_offset + offset, length);
        return 0;
    }
    struct iovec local = {.iov_base = buffer, .iov_len = length};
    struct iovec remote = {.iov_base = (void *)(uintptr_t)(region->uffd.host_base + offset),
                           .iov_len = length};
    ssize_t n = process_vm_readv(run->vmm_pid, &local, 1, &remote, 1, 0);
    if (n == (ssize_t)length)
        return 0;
    return n < 0 ? -errno : -EIO;
}

void branch_mark_captured(struct branch_run_state *run, struct branch_region *region,
                          uint64_t first, uint64_t count)
{
    /* The pre-images were read before the count is: a discard reported by a later read
     * cannot have removed a page under that capture. */
    atomic_thread_fence(memory_order_seq_cst);
    uint32_t captured_at = atomic_load(&run->handler.reads) + 1;
    for (uint64_t p = first; p < first + count; p++) {
        atomic_store_explicit(&region->captured_at[p], captured_at, memory_order_relaxed);
        atomic_fetch_or(&region->pages[p], (uint8_t)PAGE_CAPTURED);
    }
}

void branch_count_write(struct branch_region *region, uint64_t page, uint64_t pages)
{
    if (!region->write_counts)
        return;
    for (uint64_t p = page; p < page + pages; p++)
        atomic_fetch_add(&region->write_counts[p], 1);
}

void branch_wake_copier(struct branch_run_state *run)
{
    atomic_fetch_add(&run->written_seq, 1);
    if (atomic_load(&run->written_waiting))
        syscall(SYS_futex, &run->written_seq, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

struct branch_region *branch_region_of(struct branch_run_state *run, uint64_t address)
{
    for (size_t i = 0; i < run->region_count; i++) {
        struct branch_region *region = &run->regions[i];
        if (address >= region->uffd.host_base &&
            address - region->uffd.host_base < region->uffd.size)
            return region;
    }
    return NULL;
}

/* ---- arming ----------------------------------------------------------------------------- */

static int branch_arm_all(struct branch_run_state *run, bool protect, struct forkd_error *err)
{
    for (size_t i = 0; i < run->region_count; i++) {
        const struct uffd_region *region = &run->regions[i].uffd;
        int rc = uffd_write_protect(run->handshake.uffd, region->host_base, region->size,
                                    region->page_size, protect, false, err);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int branch_compare_addresses(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Write-protects the pages of a dirty list again, adjacent pages coalesced into one call.
 * Returns the number of distinct pages, or a negative errno. */
static long branch_rearm(struct branch_run_state *run, struct dirty_list *list,
                         struct forkd_error *err)
{
    if (list->count > 1) /* an empty list has no array at all */
        qsort(list->addresses, list->count, sizeof(uint64_t), branch_compare_addresses);
    long pages = 0;
    size_t i = 0;
    while (i < list->count) {
        uint64_t start = list->addresses[i];
        const struct branch_region *region = branch_region_of(run, start);
        uint64_t page_size = region->uffd.page_size;
        uint64_t region_end = region->uffd.host_base + region->uffd.size;
        uint64_t end = start + page_size;
        pages++;
        for (i++; i < list->count; i++) {
            uint64_t next = list->addresses[i];
            if (next < end)
                continue; /* the same page, faulted again after an earlier re-arm */
            if (next != end || end >= region_end)
                break;
            end += page_size;
            pages++;
        }
        int rc = uffd_write_protect(run->handshake.uffd, start, end - start, page_size, true, false,
                                    err);
        if (rc < 0)
            return rc;
    }
    return pages;
}

static void branch_dirty_free(struct dirty_list *list)
{
    free(list->addresses);
    *list = (struct dirty_list){0};
}

/* Appends a round's dirty pages to the hot list; out of memory only costs the ordering and
 * the hot set's completeness. */
static void branch_dirty_extend(struct dirty_list *list, const struct dirty_list *more)
{
    for (size_t i = 0; i < more->count; i++)
        if (branch_dirty_append(list, more->addresses[i]) < 0)
            return;
}

/* Sleeps until the monotonic time until_ns. */
static void branch_sleep_until(uint64_t until_ns)
{
    struct timespec until = {.tv_sec = (time_t)(until_ns / 1000000000ULL),
                             .tv_nsec = (long)(until_ns % 1000000000ULL)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL) == EINTR)
        ;
}

/* LIVE, outside the pause: arm everything, let the guest write for the hot window, then re-arm
 * what it dirtied meanwhile until the dirty set is small, so the pause only has a handful of
 * pages left to re-arm. */
static int branch_prearm(struct branch *branch, struct branch_run_state *run,
                         struct forkd_error *err)
{
    uint64_t start = forkd_monotonic_ns();
    int rc = branch_arm_all(run, true, err);
    if (rc < 0)
        return rc;
    /* An emulated host runs the guest many times slower: its working set needs as much more. */
    branch_sleep_until(start + (uint64_t)REARM_HOT_WINDOW_MS * vm_time_scale(run->vm) * 1000000ULL);
    long previous = -1;
    for (int round = 0; round < REARM_MAX_ROUNDS; round++) {
        struct dirty_list list = {0};
        rc = branch_handler_request(run, HANDLER_TRACKING, &list);
        long pages = rc < 0 ? rc : branch_rearm(run, &list, err);
        if (pages > 0) /* copied first (BRANCH_LEVER_HOT_FIRST), and the snapshot's hot set */
            branch_dirty_extend(&run->hot, &list);
        branch_dirty_free(&list);
        if (rc < 0)
            return forkd_error_set(err, rc, "fault handler: %s", run->handler.error_message);
        if (pages < 0)
            return (int)pages;
        /* Small enough, or no longer shrinking: the guest dirties as fast as we re-arm. */
        if (pages <= REARM_CONVERGED_PAGES || (previous >= 0 && pages * 4 > previous * 3))
            break;
        previous = pages;
    }
    branch_record(branch, &branch->figures.arm_ns, forkd_monotonic_ns() - start);
    return 0;
}

/* ---- the pause -------------------------------------------------------------------------- */

/* Inside the pause: make every page write-protected (the last dirty set for LIVE, all memory
 * for ARM_IN_PAUSE) with the handler in copy mode: from here on a write first saves the page. */
static int branch_protect_in_pause(struct branch *branch, struct branch_run_state *run,
                                   struct forkd_error *err)
{
    uint64_t start = forkd_monotonic_ns();
    if (run->mode == STORE_MODE_LIVE_ARM_IN_PAUSE) {
        int rc = branch_arm_all(run, true, err);
        branch_record(branch, &branch->figures.arm_ns, forkd_monotonic_ns() - start);
        if (rc == 0)
            atomic_store(&run->save_protected, true);
        return rc;
    }
    struct dirty_list last = {0};
    int rc = branch_handler_request(run, HANDLER_COPY, &last);
    long pages = rc < 0 ? rc : branch_rearm(run, &last, err);
    run->paused_dirty = last; /* for the hot set, once the copy is done */
    if (rc < 0)
        return forkd_error_set(err, rc, "fault handler: %s", run->handler.error_message);
    if (pages < 0)
        return (int)pages;
    atomic_store(&run->save_protected, true);
    branch_record(branch, &branch->figures.rearm_ns, forkd_monotonic_ns() - start);
    branch_record(branch, &branch->figures.rearmed_pages, (uint64_t)pages);
    return 0;
}

/* Pause, save the vCPU and device state, protect, resume. The guard resumes the VM on every
 * path out of here.
 *
 * The state is saved before the last protection step, not after: a VMM may write guest memory
 * while it saves (Firecracker drains block I/O into guest buffers and rings, and queues a vsock
 * reset). Those writes still trap in tracking mode (LIVE) or land before arming (ARM_IN_PAUSE),
 * so the re-protected set includes them, and memory.bin equals memory at the end of the save,
 * the instant the saved device state describes. */
static int branch_pause_and_save(struct branch *branch, struct branch_run_state *run,
                                 const struct branch_request *request, struct forkd_error *err)
{
    FORKD_PAUSE_GUARD(guard, run->vm, err);
    if (guard.rc < 0)
        return guard.rc;
    branch_set_phase(branch, BRANCH_PHASE_PAUSED);
    if (branch_cancelled(branch))
        return forkd_error_set(err, -ECANCELED, "branch cancelled inside the pause");
    uint64_t start = forkd_monotonic_ns();
    int rc =
        vmm_snapshot_create(vm_client(run->vm), VMM_SNAPSHOT_VMSTATE_ONLY,
                            store_writer_vmstate_path(run->writer), VMSTATE_ONLY_MEMORY_PATH, err);
    if (rc < 0)
        return rc;
    branch_record(branch, &branch->figures.vmstate_ns, forkd_monotonic_ns() - start);
    rc = branch_protect_in_pause(branch, run, err);
    if (rc == 0)
        rc = branch_capture_drives(branch, run, request, err);
    if (rc < 0)
        return rc;
    branch_set_phase(branch, BRANCH_PHASE_VMSTATE_SAVED);
    if (request->inside_pause_hook)
        request->inside_pause_hook(request->context);
    rc = pause_guard_resume(&guard, err);
    branch_record_pause(branch, &guard);
    if (rc < 0)
        return rc;
    branch_set_phase(branch, BRANCH_PHASE_RESUMED);
    return 0;
}

/* ---- the bulk copier -------------------------------------------------------------------- */

/* Fails the branch when it was cancelled, the handler failed or the VMM died. */
static int branch_check_alive(struct branch *branch, struct branch_run_state *run,
                              struct forkd_error *err)
{
    if (branch_cancelled(branch))
        return forkd_error_set(err, -ECANCELED, "branch cancelled");
    int failed = atomic_load(&run->handler.error);
    if (failed < 0)
        return forkd_error_set(err, failed, "%s", run->handler.error_message);
    if (!vm_is_alive(run->vm))
        return forkd_error_set(err, -ESRCH, "copy stopped"); /* branch_execute says why */
    return 0;
}

/* A run whose pre-image is captured: marks its pages captured, then lets the guest write them. */
static int branch_release_run(struct branch_run_state *run, struct branch_region *region,
                              uint64_t first, uint64_t count, struct forkd_error *err)
{
    uint64_t page_size = region->uffd.page_size;
    branch_mark_captured(run, region, first, count);
    int rc = uffd_write_protect(run->handshake.uffd, region->uffd.host_base + first * page_size,
                                count * page_size, page_size, false, false, err);
    if (rc < 0)
        return rc;
    atomic_fetch_add(&run->pages_released, count);
    return 0;
}

/* Captures one run of pages claimed by the copier and unprotects it: from here the guest
 * writes these pages without a fault. */
static int branch_bulk_capture(struct branch_run_state *run, struct branch_region *region,
                               uint64_t first, uint64_t count, uint8_t *buffer,
                               struct forkd_error *err)
{
    uint64_t page_size = region->uffd.page_size;
    uint64_t offset = first * page_size, length = count * page_size;
    int rc = branch_read_guest(run, region, offset, buffer, length);
    if (rc < 0)
        return forkd_error_errno(err, rc, "read guest memory at 0x%llx+0x%llx",
                                 (unsigned long long)(region->uffd.host_base + offset),
                                 (unsigned long long)length);
    rc = branch_release_run(run, region, first, count, err);
    if (rc < 0)
        return rc;
    return 0;
}

static int branch_bulk_write(struct branch *branch, struct branch_run_state *run,
                             struct branch_region *region, uint64_t first, uint64_t count,
                             const uint8_t *buffer, struct forkd_error *err)
{
    uint64_t page_size = region->uffd.page_size;
    off_t at = (off_t)(region->uffd.file_offset + first * page_size);
    int rc = fs_pwrite_all(run->memory_fd, buffer, count * page_size, at);
    if (rc < 0)
        return forkd_error_errno(err, rc, "write memory.bin at %llu", (unsigned long long)at);
    branch_count_write(region, first, count);
    atomic_fetch_add(&branch->pages_by_bulk, count);
    atomic_fetch_add(&branch->bytes_copied, count * page_size);
    atomic_fetch_add(&run->pages_written, count);
    return 0;
}

/* Capture fast, persist later: for a memfd guest the copier's capture is the write itself,
 * from our mapping of guest memory into memory.bin's page cache (one copy of each byte, not
 * two), made while the run is still protected; then the run is unprotected. Durability comes
 * with the fsync at the end. */
static int branch_bulk_direct(struct branch *branch, struct branch_run_state *run,
                              struct branch_region *region, uint64_t first, uint64_t count,
                              struct forkd_error *err)
{
    uint64_t page_size = region->uffd.page_size;
    uint64_t offset = first * page_size, length = count * page_size;
    off_t at = (off_t)(region->uffd.file_offset + offset);
    int rc = fs_pwrite_all(run->memory_fd, run->guest_map + at, length, at);
    if (rc < 0)
        return forkd_error_errno(err, rc, "write memory.bin at %llu", (unsigned long long)at);
    rc = branch_release_run(run, region, first, count, err);
    if (rc < 0)
        return rc;
    branch_count_write(region, first, count);
    atomic_fetch_add(&branch->pages_by_bulk, count);
    atomic_fetch_add(&branch->bytes_copied, length);
    atomic_fetch_add(&run->pages_written, count);
    return 0;
}

/* The next run of pages claimed here in [*i, count), or false when none is left. */
static bool branch_next_claimed_run(const bool *claimed, uint64_t count, uint64_t *i,
                                    uint64_t *start)
{
    while (*i < count && !claimed[*i])
        (*i)++;
    *start = *i;
    while (*i < count && claimed[*i])
        (*i)++;
    return *i > *start;
}

/* Captures each run of the chunk claimed here into the mirror and unprotects it; memory.bin is
 * written from the mirror once every page is captured (branch_mirror_write). */
static int branch_bulk_mirror(struct branch *branch, struct branch_run_state *run,
                              struct branch_region *region, uint64_t first, const bool *claimed,
                              uint64_t count, struct forkd_error *err)
{
    uint64_t page_size = region->uffd.page_size, i = 0, start;
    while (branch_next_claimed_run(claimed, count, &i, &start)) {
        uint64_t at = region->uffd.file_offset + (first + start) * page_size;
        int rc = branch_bulk_capture(run, region, first + start, i - start, run->mirror + at, err);
        if (rc < 0)
            return rc;
        atomic_fetch_add(&branch->pages_by_bulk, i - start);
    }
    return 0;
}

/* One chunk: claim every free page, then capture and unprotect each run of pages claimed here
 * and write it. With BRANCH_LEVER_RELEASE_FIRST every run is released before any is written,
 * so a vCPU faulting on the chunk's second run never waits behind the write of its first. */
static int branch_bulk_chunk(struct branch *branch, struct branch_run_state *run,
                             struct branch_region *region, uint64_t first, uint64_t count,
                             uint8_t *buffer, struct forkd_error *err)
{
    bool claimed[BULK_CHUNK_BYTES / 4096];
    for (uint64_t i = 0; i < count; i++) {
        uint8_t expected = 0;
        claimed[i] = atomic_compare_exchange_strong(&region->pages[first + i], &expected,
                                                    (uint8_t)PAGE_CLAIMED_BY_BULK);
    }
    uint64_t page_size = region->uffd.page_size, i = 0, start;
    if (run->mirror)
        return branch_bulk_mirror(branch, run, region, first, claimed, count, err);
    bool direct = branch_lever(run, BRANCH_LEVER_DIRECT) && run->guest_map;
    bool release_first = !direct && branch_lever(run, BRANCH_LEVER_RELEASE_FIRST);
    while (direct && branch_next_claimed_run(claimed, count, &i, &start)) {
        int rc = branch_bulk_direct(branch, run, region, first + start, i - start, err);
        if (rc < 0)
            return rc;
    }
    while (!direct && branch_next_claimed_run(claimed, count, &i, &start)) {
        uint8_t *at = buffer + start * page_size;
        int rc = branch_bulk_capture(run, region, first + start, i - start, at, err);
        if (rc == 0 && !release_first)
            rc = branch_bulk_write(branch, run, region, first + start, i - start, at, err);
        if (rc < 0)
            return rc;
    }
    for (i = 0; release_first && branch_next_claimed_run(claimed, count, &i, &start);) {
        int rc = branch_bulk_write(branch, run, region, first + start, i - start,
                                   buffer + start * page_size, err);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Writes what the fault handler staged, adjacent pages in one write, then frees their slots. */
static int branch_staging_drain(struct branch *branch, struct branch_run_state *run,
                                struct forkd_error *err)
{
    struct staging *staging = &run->staging;
    if (!staging->slots)
        return 0;
    uint64_t tail = atomic_load_explicit(&staging->tail, memory_order_relaxed);
    uint64_t head = atomic_load_explicit(&staging->head, memory_order_acquire);
    while (tail < head) {
        uint64_t slot = tail % staging->slot_count;
        struct staged_page page = staging->pages[slot];
        uint64_t page_size = page.region->uffd.page_size, n = 1;
        /* Coalesce the following slots that hold the following pages (no wrap). */
        while (tail + n < head && slot + n < staging->slot_count &&
               page_size == staging->slot_bytes && staging->pages[slot + n].region == page.region &&
               staging->pages[slot + n].index == page.index + n)
            n++;
        off_t at = (off_t)(page.region->uffd.file_offset + page.index * page_size);
        int rc = fs_pwrite_all(run->memory_fd, staging->slots + slot * staging->slot_bytes,
                               n * page_size, at);
        if (rc < 0)
            return forkd_error_errno(err, rc, "write memory.bin at %llu", (unsigned long long)at);
        branch_count_write(page.region, page.index, n);
        atomic_fetch_add(&branch->pages_by_fault, n);
        atomic_fetch_add(&branch->bytes_copied, n * page_size);
        atomic_fetch_add(&run->pages_written, n);
        tail += n;
        atomic_store_explicit(&staging->tail, tail, memory_order_release);
    }
    return 0;
}

/* Hot pages first: the chunks holding pages the guest dirtied while write-protect was being
 * armed are its working set, which it is about to write again; copying them right after the
 * resume, before the cold bulk, turns most of its faults into one chunk copy each. */
static int branch_bulk_hot(struct branch *branch, struct branch_run_state *run, uint8_t *buffer,
                           uint64_t chunk_bytes, struct forkd_error *err)
{
    struct dirty_list *hot = &run->hot;
    if (hot->count > 1)
        qsort(hot->addresses, hot->count, sizeof(uint64_t), branch_compare_addresses);
    uint64_t done_chunk = UINT64_MAX;
    for (size_t i = 0; i < hot->count; i++) {
        struct branch_region *region = branch_region_of(run, hot->addresses[i]);
        uint64_t chunk = (hot->addresses[i] - region->uffd.host_base) / chunk_bytes;
        uint64_t key = (uint64_t)(region - run->regions) << 56 | chunk;
        if (key == done_chunk)
            continue;
        done_chunk = key;
        uint64_t pages_per_chunk = chunk_bytes / region->uffd.page_size;
        uint64_t first = chunk * pages_per_chunk;
        uint64_t count = region->page_count - first < pages_per_chunk ? region->page_count - first
                                                                      : pages_per_chunk;
        int rc = branch_check_alive(branch, run, err);
        if (rc == 0)
            rc = branch_bulk_chunk(branch, run, region, first, count, buffer, err);
        if (rc == 0)
            rc = branch_staging_drain(branch, run, err);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* The hot set the snapshot records: the pages dirtied while pre-arming and right before the
 * pause, as runs of memory.bin (a page of its region's size each), coalesced. Out of memory
 * leaves the snapshot without one, which it may well be. */
static void branch_build_hot_set(struct branch_run_state *run)
{
    const struct dirty_list *hot = &run->hot;
    run->hot_set_count = 0;
    branch_dirty_extend(&run->hot, &run->paused_dirty);
    _cleanup_free_ struct store_hot_range *runs =
        malloc((hot->count ? hot->count : 1) * sizeof(*runs));
    if (!runs)
        return;
    for (size_t i = 0; i < hot->count; i++) {
        const struct branch_region *region = branch_region_of(run, hot->addresses[i]);
        runs[i] = (struct store_hot_range){region->uffd.file_offset +
                                               (hot->addresses[i] - region->uffd.host_base),
                                           region->uffd.page_size};
    }
    if (hot_set_build(runs, hot->count, run->total_bytes, run->hot_set, &run->hot_set_count) < 0)
        run->hot_set_count = 0;
}

static int branch_bulk_copy(struct branch *branch, struct branch_run_state *run,
                            struct forkd_error *err)
{
    uint64_t chunk_bytes = BULK_CHUNK_BYTES;
    for (size_t r = 0; r < run->region_count; r++)
        if (run->regions[r].uffd.page_size > chunk_bytes)
            chunk_bytes = run->regions[r].uffd.page_size;
    _cleanup_free_ uint8_t *buffer = aligned_alloc(4096, chunk_bytes);
    if (!buffer)
        return forkd_error_set(err, -ENOMEM, "bulk copy: out of memory");
    if (branch_lever(run, BRANCH_LEVER_HOT_FIRST)) {
        int rc = branch_bulk_hot(branch, run, buffer, chunk_bytes, err);
        if (rc < 0)
            return rc;
    }
    for (size_t r = 0; r < run->region_count; r++) {
        struct branch_region *region = &run->regions[r];
        uint64_t pages_per_chunk = chunk_bytes / region->uffd.page_size;
        for (uint64_t first = 0; first < region->page_count; first += pages_per_chunk) {
            int rc = branch_check_alive(branch, run, err);
            if (rc < 0)
                return rc;
            uint64_t count = region->page_count - first < pages_per_chunk
                                 ? region->page_count - first
                                 : pages_per_chunk;
            rc = branch_bulk_chunk(branch, run, region, first, count, buffer, err);
            if (rc == 0)
                rc = branch_staging_drain(branch, run, err);
            if (rc < 0)
                return rc;
        }
    }
    return 0;
}

/* Records when the guest stopped paying: every page captured and unprotected. */
static void branch_note_captured(struct branch *branch, struct branch_run_state *run)
{
    if (atomic_load(&branch->captured_ns) || atomic_load(&run->pages_released) < run->total_pages)
        return;
    atomic_store(&branch->captured_ns, forkd_monotonic_ns() - run->resumed_ns);
}

/* Waits until *done counts every page (pages_released: captured; pages_written: in
 * memory.bin), draining the handler's staging meanwhile: woken by each page the handler
 * captures or writes, and every WRITTEN_CHECK_MS to see whether the branch was cancelled or
 * failed. */
#define WRITTEN_CHECK_MS 10
static int branch_wait_pages(struct branch *branch, struct branch_run_state *run,
                             atomic_uint_fast64_t *done, struct forkd_error *err)
{
    atomic_store(&run->written_waiting, true);
    int rc = 0;
    for (;;) {
        uint32_t seen = atomic_load(&run->written_seq);
        if ((rc = branch_staging_drain(branch, run, err)) < 0)
            break;
        branch_note_captured(branch, run);
        if (atomic_load(done) >= run->total_pages)
            break;
        if ((rc = branch_check_alive(branch, run, err)) < 0)
            break;
        /* Returns at once if a page was captured or written since `seen` was read. */
        struct timespec check = {.tv_nsec = WRITTEN_CHECK_MS * 1000000L};
        syscall(SYS_futex, &run->written_seq, FUTEX_WAIT_PRIVATE, seen, &check, NULL, 0);
    }
    atomic_store(&run->written_waiting, false);
    return rc;
}

/* With a mirror: once the fault handler captured the pages it claimed, writes the mirror to
 * memory.bin, region by region, in MIRROR_WRITE_BYTES pieces, checking between them whether
 * the branch was cancelled or failed. */
static int branch_mirror_write(struct branch *branch, struct branch_run_state *run,
                               struct forkd_error *err)
{
    int rc = branch_wait_pages(branch, run, &run->pages_released, err);
    for (size_t r = 0; rc == 0 && r < run->region_count; r++) {
        struct branch_region *region = &run->regions[r];
        uint64_t page_size = region->uffd.page_size;
        for (uint64_t done = 0; rc == 0 && done < region->uffd.size;) {
            uint64_t length = region->uffd.size - done;
            length = length < MIRROR_WRITE_BYTES ? length : MIRROR_WRITE_BYTES;
            off_t at = (off_t)(region->uffd.file_offset + done);
            if ((rc = branch_check_alive(branch, run, err)) < 0)
                break;
            if ((rc = fs_pwrite_all(run->memory_fd, run->mirror + at, length, at)) < 0) {
                forkd_error_errno(err, rc, "write memory.bin at %llu", (unsigned long long)at);
                break;
            }
            branch_count_write(region, done / page_size, length / page_size);
            atomic_fetch_add(&branch->bytes_copied, length);
            atomic_fetch_add(&run->pages_written, length / page_size);
            done += length;
        }
    }
    return rc;
}

/* ---- set-up and tear-down of a live branch ---------------------------------------------- */

/* Asks the VMM for its write-protect userfaultfd and receives it with the region list, from
 * the VMM's process only. The listener is "<api socket minus .sock>.wp": never longer than the
 * API socket's path, so it fits in sun_path wherever that one does. */
static int branch_receive_uffd(struct branch_run_state *run, struct forkd_error *err)
{
    struct vm_status status;
    vm_get_status(run->vm, &status);
    char path[PATH_MAX];
    size_t length = strlen(status.api_socket_path);
    if (length < 5 || strcmp(status.api_socket_path + length - 5, ".sock") != 0)
        return forkd_error_set(err, -EINVAL, "cannot derive a socket path from %s",
                               status.api_socket_path);
    snprintf(path, sizeof(path), "%.*s.wp", (int)(length - 5), status.api_socket_path);
    _cleanup_close_ int listener = uffd_listen(path, err);
    if (listener < 0)
        return listener;
    int rc = vmm_uffd_wp(vm_client(run->vm), path, err);
    if (rc == 0)
        rc = uffd_accept_handshake_from(listener, HANDSHAKE_TIMEOUT_MS, vm_pid(run->vm),
                                        &run->handshake, err);
    unlink(path);
    return rc;
}

static int branch_map_guest(struct branch_run_state *run, struct forkd_error *err)
{
    if (vm_memory_kind(run->vm) != VM_MEMORY_MEMFD) {
        run->vmm_pid = vm_pid(run->vm);
        return run->vmm_pid > 0 ? 0 : forkd_error_set(err, -ESRCH, "the VMM has exited");
    }
    _cleanup_close_ int memfd = vm_dup_memfd(run->vm);
    struct stat st;
    if (memfd < 0 || fstat(memfd, &st) < 0)
        return forkd_error_set(err, memfd < 0 ? memfd : -errno, "guest memfd of %s: %s",
                               vm_id(run->vm), strerror(memfd < 0 ? -memfd : errno));
    if ((uint64_t)st.st_size != run->total_bytes)
        return forkd_error_set(err, -EPROTO,
                               "guest memfd holds %lld bytes but the VMM's regions add up to %llu",
                               (long long)st.st_size, (unsigned long long)run->total_bytes);
    void *map = mmap(NULL, run->total_bytes, PROT_READ, MAP_SHARED, memfd, 0);
    if (map == MAP_FAILED)
        return forkd_error_errno(err, -errno, "map guest memfd");
    /* Map every page now, outside the pause: a capture on the fault path then costs a copy,
     * not a page fault of forkd's own on top of the vCPU's. */
    madvise(map, run->total_bytes, MADV_POPULATE_READ);
    run->guest_map = map;
    run->guest_map_size = run->total_bytes;
    return 0;
}

static int branch_setup_regions(struct branch *branch, struct branch_run_state *run,
                                bool count_writes, struct forkd_error *err)
{
    run->region_count = run->handshake.region_count;
    for (size_t i = 0; i < run->region_count; i++) {
        struct branch_region *region = &run->regions[i];
        region->uffd = run->handshake.regions[i];
        region->page_count = region->uffd.size / region->uffd.page_size;
        region->pages = calloc(region->page_count, 1);
        region->captured_at = calloc(region->page_count, sizeof(*region->captured_at));
        region->write_counts = count_writes ? calloc(region->page_count, 1) : NULL;
        if (!region->pages || !region->captured_at || (count_writes && !region->write_counts))
            return forkd_error_set(err, -ENOMEM, "page claims: out of memory");
        run->total_bytes += region->uffd.size;
        run->total_pages += region->page_count;
    }
    branch->bytes_total = run->total_bytes;
    branch->page_size = (uint32_t)run->regions[0].uffd.page_size;
    return 0;
}

static int branch_open_memory_file(struct branch_run_state *run, struct forkd_error *err)
{
    const char *path = store_writer_memory_path(run->writer);
    run->memory_fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (run->memory_fd < 0)
        return forkd_error_errno(err, -errno, "create %s", path);
    if (ftruncate(run->memory_fd, (off_t)run->total_bytes) < 0)
        return forkd_error_errno(err, -errno, "size %s to %llu bytes", path,
                                 (unsigned long long)run->total_bytes);
    return 0;
}

/* Staging slots for the fault handler's pre-images, populated now: a slot's first use must
 * not be a page fault of forkd's own on the vCPU's wait. */
static int branch_staging_open(struct branch_run_state *run, struct forkd_error *err)
{
    struct staging *staging = &run->staging;
    if (!branch_lever(run, BRANCH_LEVER_STAGING))
        return 0;
    for (size_t i = 0; i < run->region_count; i++)
        if (run->regions[i].uffd.page_size > staging->slot_bytes)
            staging->slot_bytes = run->regions[i].uffd.page_size;
    staging->slot_count = STAGING_BYTES / staging->slot_bytes;
    if (staging->slot_count < STAGING_MIN_SLOTS)
        staging->slot_count = STAGING_MIN_SLOTS;
    staging->pages = calloc(staging->slot_count, sizeof(*staging->pages));
    if (!staging->pages)
        return forkd_error_set(err, -ENOMEM, "staging: out of memory");
    size_t bytes = staging->slot_count * staging->slot_bytes;
    void *slots = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (slots == MAP_FAILED)
        return forkd_error_errno(err, -errno, "staging: map %zu bytes", bytes);
    staging->slots = slots;
    staging->mapped_bytes = bytes;
    return 0;
}

static void branch_staging_close(struct staging *staging)
{
    if (staging->slots)
        munmap(staging->slots, staging->mapped_bytes);
    free(staging->pages);
    staging->slots = NULL;
    staging->pages = NULL;
}

/* MemAvailable of /proc/meminfo in bytes, or 0 when it cannot be read. */
static uint64_t branch_memory_available(void)
{
    _cleanup_fclose_ FILE *f = fopen("/proc/meminfo", "re");
    char line[128];
    unsigned long long kib;
    while (f && fgets(line, sizeof(line), f))
        if (sscanf(line, "MemAvailable: %llu kB", &kib) == 1)
            return (uint64_t)kib << 10;
    return 0;
}

/* Whether the guest's memory is in pages bigger than 4 KiB in every region. */
static bool branch_all_pages_huge(const struct branch_run_state *run)
{
    for (size_t i = 0; i < run->region_count; i++)
        if (run->regions[i].uffd.page_size <= VM_SMALL_PAGE_SIZE)
            return false;
    return run->region_count > 0;
}

/* The mirror (BRANCH_LEVER_MIRROR), populated now, before the pause: a capture must never
 * wait for forkd's own page faults. Only for guests on 2 MiB pages: there the guest pays
 * nothing once its pages are captured, so the capture's speed is its whole cost, and memory
 * speed beats the page cache's; with 4 KiB pages the second-level refaults after the branch
 * dominate and the mirror's extra copy only adds work (forkd-bench, issue 17). Transparent
 * huge pages where the host gives them (fewer faults to populate). Without room for it (more
 * than 1/MIRROR_MEMORY_SHARE of the memory available, or populating fails), the branch copies
 * as it would without the lever: the same snapshot; branch_progress.mirror_bytes says which
 * way it went. */
static void branch_mirror_open(struct branch *branch, struct branch_run_state *run)
{
    if (!branch_lever(run, BRANCH_LEVER_MIRROR) || !branch_all_pages_huge(run) ||
        run->total_bytes > branch_memory_available() / MIRROR_MEMORY_SHARE)
        return;
    void *mirror = mmap(NULL, run->total_bytes, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mirror == MAP_FAILED)
        return;
    madvise(mirror, run->total_bytes, MADV_HUGEPAGE);
    if (madvise(mirror, run->total_bytes, MADV_POPULATE_WRITE) < 0) {
        munmap(mirror, run->total_bytes);
        return;
    }
    run->mirror = mirror;
    atomic_store(&branch->mirror_bytes, run->total_bytes);
}

static int branch_live_setup(struct branch *branch, struct branch_run_state *run,
                             const struct branch_request *request, struct forkd_error *err)
{
    run->levers = BRANCH_LEVER_ALL & ~request->levers_off;
    atomic_store(&branch->levers, run->levers);
    run->fault_claimed_hook = request->fault_claimed_hook;
    run->hook_context = request->context;
    int rc = branch_receive_uffd(run, err);
    if (rc == 0)
        rc = branch_setup_regions(branch, run, request->count_page_writes, err);
    if (rc == 0)
        rc = branch_map_guest(run, err);
    if (rc == 0)
        rc = branch_open_memory_file(run, err);
    if (rc == 0)
        branch_mirror_open(branch, run);
    if (rc == 0 && !run->mirror)
        rc = branch_staging_open(run, err);
    return rc;
}

/* Keeps the per-page write counts of a finished run for branch_page_write_counts. */
static void branch_keep_write_counts(struct branch *branch, struct branch_run_state *run)
{
    uint64_t total = 0;
    for (size_t r = 0; r < run->region_count; r++)
        total += run->regions[r].page_count;
    if (!run->region_count || !run->regions[0].write_counts ||
        !(branch->final_write_counts = malloc(total ? total : 1)))
        return;
    uint64_t at = 0;
    for (size_t r = 0; r < run->region_count; r++)
        for (uint64_t p = 0; p < run->regions[r].page_count; p++)
            branch->final_write_counts[at++] = atomic_load(&run->regions[r].write_counts[p]);
    branch->final_page_count = total;
}

/* Leaves the VM unprotected and forkd without its userfaultfd, whatever happened: protection
 * is lifted while the handler still serves faults, then the handler stops, then the fd closes
 * (which wakes any vCPU still waiting). */
static void branch_live_teardown(struct branch *branch, struct branch_run_state *run)
{
    if (run->handshake.uffd >= 0 && run->region_count > 0)
        branch_arm_all(run, false, NULL);
    branch_handler_stop(run);
    uffd_handshake_release(&run->handshake);
    branch_keep_write_counts(branch, run);
    for (size_t r = 0; r < run->region_count; r++) {
        free(run->regions[r].pages);
        free(run->regions[r].captured_at);
        free(run->regions[r].write_counts);
    }
    if (run->guest_map)
        munmap((void *)run->guest_map, run->guest_map_size);
    if (run->memory_fd >= 0)
        close(run->memory_fd);
    branch_dirty_free(&run->hot);
    branch_dirty_free(&run->paused_dirty);
    branch_staging_close(&run->staging);
    if (run->mirror)
        munmap(run->mirror, run->total_bytes);
}

/* ---- the two kinds of branch ------------------------------------------------------------ */

static int branch_live_copy(struct branch *branch, struct branch_run_state *run,
                            const struct branch_request *request, struct forkd_error *err)
{
    enum handler_mode first_mode = run->mode == STORE_MODE_LIVE ? HANDLER_TRACKING : HANDLER_COPY;
    int rc = branch_handler_start(branch, run, first_mode);
    if (rc < 0)
        return forkd_error_errno(err, rc, "start the fault handler");
    if (run->mode == STORE_MODE_LIVE) {
        rc = branch_prearm(branch, run, err);
        if (rc < 0)
            return rc;
        branch_set_phase(branch, BRANCH_PHASE_ARMED);
    }
    if (branch_cancelled(branch))
        return forkd_error_set(err, -ECANCELED, "branch cancelled before the pause");
    rc = branch_pause_and_save(branch, run, request, err);
    if (rc < 0)
        return rc;
    uint64_t start = forkd_monotonic_ns();
    run->resumed_ns = start;
    branch_set_phase(branch, BRANCH_PHASE_COPYING);
    rc = branch_bulk_copy(branch, run, err);
    if (rc == 0 && run->mirror)
        rc = branch_mirror_write(branch, run, err);
    if (rc == 0)
        rc = branch_wait_pages(branch, run, &run->pages_written, err);
    if (rc == 0) /* the guest pays nothing for the branch any more */
        branch_build_hot_set(run);
    if (rc == 0 && fsync(run->memory_fd) < 0)
        rc = forkd_error_errno(err, -errno, "fsync memory.bin");
    branch_record(branch, &branch->figures.copy_ns, forkd_monotonic_ns() - start);
    return rc;
}

static int branch_run_live(struct branch *branch, struct branch_run_state *run,
                           const struct branch_request *request, struct forkd_error *err)
{
    enum vm_memory memory = vm_memory_kind(run->vm);
    if (memory != VM_MEMORY_ANONYMOUS && memory != VM_MEMORY_MEMFD)
        return forkd_error_set(err, -EOPNOTSUPP,
                               "a live branch needs guest memory that can be write-protected "
                               "(anonymous or memfd), but %s runs on %s memory: use FULL, or "
                               "spawn with the MEMFD backend",
                               vm_id(run->vm), memory == VM_MEMORY_FILE ? "FILE" : "UFFD");
    /* Write-protect skips never-touched anonymous pages unless the kernel has
     * WP_UNPOPULATED: the guest would write them after the resume without a fault and the
     * copier would read the new contents. Refused before anything is armed or paused. */
    if (memory == VM_MEMORY_ANONYMOUS && !probe_wp_unpopulated())
        return forkd_error_set(err, -EOPNOTSUPP,
                               "a live branch of anonymous guest memory needs a kernel that "
                               "write-protects never-touched pages (UFFD_FEATURE_WP_UNPOPULATED, "
                               "Linux 6.4+), which this kernel lacks: use FULL, or boot %s on a "
                               "memfd (the default)",
                               vm_id(run->vm));
    int rc = branch_handler_open(run);
    if (rc < 0)
        return forkd_error_errno(err, rc, "fault handler: eventfd");
    rc = branch_live_setup(branch, run, request, err);
    if (rc == 0)
        rc = branch_live_copy(branch, run, request, err);
    branch_live_teardown(branch, run);
    branch_handler_close(run);
    return rc;
}

/* Stop-and-copy: the VMM writes memory and state while the VM is paused. */
static int branch_run_full(struct branch *branch, struct branch_run_state *run,
                           const struct branch_request *request, struct forkd_error *err)
{
    if (branch_cancelled(branch))
        return forkd_error_set(err, -ECANCELED, "branch cancelled before the pause");
    FORKD_PAUSE_GUARD(guard, run->vm, err);
    if (guard.rc < 0)
        return guard.rc;
    branch_set_phase(branch, BRANCH_PHASE_PAUSED);
    uint64_t start = forkd_monotonic_ns();
    /* The VMM writes all of memory before it answers: allow for it. */
    int rc = vmm_snapshot_create_within(
        vm_client(run->vm), VMM_SNAPSHOT_FULL, store_writer_vmstate_path(run->writer),
        store_writer_memory_path(run->writer), vm_slow_call_timeout_ms(run->vm), err);
    if (rc < 0)
        return rc;
    branch_record(branch, &branch->figures.copy_ns, forkd_monotonic_ns() - start);
    /* Cancelled while the VMM wrote: the guard resumes, the store drops the files. */
    if (branch_cancelled(branch))
        return forkd_error_set(err, -ECANCELED, "branch cancelled inside the pause");
    rc = branch_capture_drives(branch, run, request, err);
    if (rc < 0)
        return rc;
    branch_set_phase(branch, BRANCH_PHASE_VMSTATE_SAVED);
    rc = pause_guard_resume(&guard, err);
    branch_record_pause(branch, &guard);
    if (rc < 0)
        return rc;
    struct stat st;
    if (stat(store_writer_memory_path(run->writer), &st) < 0)
        return forkd_error_errno(err, -errno, "memory.bin after a Full snapshot");
    run->total_bytes = (uint64_t)st.st_size;
    branch->bytes_total = run->total_bytes;
    branch->page_size = (uint32_t)vm_page_size(run->vm);
    atomic_store(&branch->bytes_copied, run->total_bytes);
    branch_set_phase(branch, BRANCH_PHASE_RESUMED);
    return 0;
}

/* ---- the record and the run ------------------------------------------------------------- */

/* memory.bin's regions: from the write-protect handshake (LIVE), else (FULL) from the VMM's
 * own description where it gives one; where the guest sees each, as the VMM says (a region of
 * the handshake is matched to the VMM's by offset and size). */
static void branch_fill_regions(const struct branch *branch, const struct branch_run_state *run,
                                const struct vmm_info *info, struct store_snapshot *meta)
{
    bool from_vmm = run->region_count == 0;
    meta->region_count = from_vmm ? info->region_count : run->region_count;
    if (meta->region_count > STORE_MAX_REGIONS)
        meta->region_count = STORE_MAX_REGIONS;
    for (size_t i = 0; i < meta->region_count; i++) {
        struct store_region *r = &meta->regions[i];
        if (from_vmm) {
            *r = (struct store_region){.guest_phys_addr_known = true,
                                       .guest_phys_addr = info->regions[i].guest_phys_addr,
                                       .size = info->regions[i].size,
                                       .file_offset = info->regions[i].file_offset,
                                       .page_size = branch->page_size};
            continue;
        }
        *r = (struct store_region){.size = run->regions[i].uffd.size,
                                   .file_offset = run->regions[i].uffd.file_offset,
                                   .page_size = (uint32_t)run->regions[i].uffd.page_size};
        for (size_t j = 0; j < info->region_count; j++)
            if (info->regions[j].file_offset == r->file_offset &&
                info->regions[j].size == r->size) {
                r->guest_phys_addr_known = true;
                r->guest_phys_addr = info->regions[j].guest_phys_addr;
            }
    }
}

static void branch_fill_record(struct branch *branch, const struct branch_run_state *run,
                               const struct branch_request *request, struct store_snapshot *meta)
{
    struct vm_status status;
    vm_get_status(run->vm, &status);
    memset(meta, 0, sizeof(*meta));
    snprintf(meta->name, sizeof(meta->name), "%s", request->snapshot_name);
    snprintf(meta->source_vm_id, sizeof(meta->source_vm_id), "%s", status.id);
    snprintf(meta->source_vm_name, sizeof(meta->source_vm_name), "%s", status.name);
    snprintf(meta->parent_snapshot, sizeof(meta->parent_snapshot), "%s", status.source_snapshot);
    snprintf(meta->vmm_binary, sizeof(meta->vmm_binary), "%s", status.vmm_binary);
    meta->mode = run->mode;
    meta->vcpu_count = status.vcpu_count;
    meta->devices = status.devices;
    /* A read-only drive is referenced, not captured: its identity now is what Spawn checks. */
    for (size_t i = 0; i < meta->devices.drive_count; i++)
        if (meta->devices.drives[i].read_only)
            devices_file_identity_of(meta->devices.drives[i].path,
                                     &meta->devices.drives[i].identity);
    meta->mem_size_mib = run->total_bytes >> 20;
    meta->memory_bytes = run->total_bytes;
    meta->page_size = branch->page_size;
    struct vmm_info info = {0};
    if (vmm_get_info(vm_client(run->vm), &info, NULL) == 0)
        snprintf(meta->vmm_version, sizeof(meta->vmm_version), "%s", info.vmm_version);
    branch_fill_regions(branch, run, &info, meta);
    struct stat st;
    if (stat(store_writer_vmstate_path(run->writer), &st) == 0)
        meta->vmstate_bytes = (uint64_t)st.st_size;
    meta->created_at_unix_ms = forkd_unix_ms();
    meta->label_count =
        request->label_count < STORE_MAX_LABELS ? request->label_count : STORE_MAX_LABELS;
    for (size_t i = 0; i < meta->label_count; i++)
        meta->labels[i] = request->labels[i];
    meta->hot_count = run->hot_set_count;
    memcpy(meta->hot, run->hot_set, run->hot_set_count * sizeof(*run->hot_set));
}

static int branch_publish(struct branch *branch, struct branch_run_state *run,
                          const struct branch_request *request, uint64_t started_ns,
                          struct store_snapshot *out, struct forkd_error *err)
{
    branch_set_phase(branch, BRANCH_PHASE_PUBLISHING);
    uint64_t start = forkd_monotonic_ns();
    struct store_snapshot meta;
    branch_fill_record(branch, run, request, &meta);
    struct branch_progress progress;
    branch_get_progress(branch, &progress);
    meta.figures = progress.figures;
    meta.figures.publish_ns = 0;
    meta.figures.total_ns = forkd_monotonic_ns() - started_ns;
    struct store_writer *writer = take_ptr(run->writer);
    int rc = store_publish(writer, &meta, err); /* frees the writer either way */
    if (rc < 0)
        return rc;
    branch_record(branch, &branch->figures.publish_ns, forkd_monotonic_ns() - start);
    branch_record(branch, &branch->figures.total_ns, forkd_monotonic_ns() - started_ns);
    if (out) {
        /* The store's view (path, state), with the figures completed after the file was
         * written: snapshot.json cannot hold the time it took to publish itself. */
        if (store_get(run->store, meta.name, out, NULL) < 0)
            *out = meta;
        out->figures.publish_ns = branch->figures.publish_ns;
        out->figures.total_ns = branch->figures.total_ns;
    }
    return 0;
}

static int branch_validate(const struct branch_request *request, struct forkd_error *err)
{
    if (!request->vm)
        return forkd_error_set(err, -ENOENT, "branch: no VM given");
    if (request->mode != STORE_MODE_LIVE && request->mode != STORE_MODE_LIVE_ARM_IN_PAUSE &&
        request->mode != STORE_MODE_FULL)
        return forkd_error_set(err, -EINVAL, "branch: unknown mode %d", (int)request->mode);
    int rc = store_validate_name(request->snapshot_name, err);
    if (rc < 0)
        return rc;
    if (!vm_is_alive(request->vm))
        return forkd_error_set(err, -ESRCH, "VM %s is not running", vm_id(request->vm));
    return 0;
}

/* A step failed because the VMM died under it: say that, with the step's own words after. */
static int branch_report_vmm_death(struct branch_run_state *run, struct forkd_error *err)
{
    struct vm_status status;
    vm_get_status(run->vm, &status);
    const char *how = status.exit_reason[0] ? status.exit_reason : "exited";
    if (err)
        forkd_error_prefix(err, "the VMM of %s died (%s) during the branch: ", status.id, how);
    if (err)
        err->code = -ESRCH;
    return -ESRCH;
}

static int branch_execute(struct branch *branch, struct branch_run_state *run,
                          const struct branch_request *request, struct store_snapshot *out,
                          struct forkd_error *err)
{
    uint64_t started = forkd_monotonic_ns();
    int rc = branch_check_drives(run, request, err);
    if (rc < 0)
        return rc;
    rc = store_begin(run->store, request->snapshot_name, &run->writer, err);
    if (rc < 0)
        return rc;
    branch_set_phase(branch, BRANCH_PHASE_STARTED);
    rc = run->mode == STORE_MODE_FULL ? branch_run_full(branch, run, request, err)
                                      : branch_run_live(branch, run, request, err);
    if (rc == 0)
        rc = branch_sync_drives(run, err);
    if (rc == 0 && store_writer_abandoned(run->writer))
        rc = forkd_error_set(err, -ECANCELED, "snapshot %s was deleted while being written",
                             request->snapshot_name);
    bool mm_gone = rc == -ESRCH || rc == -EAGAIN; /* what a step sees of a dying VMM */
    if (rc < 0 && rc != -ECANCELED && vm_exited_within(run->vm, mm_gone ? 1000 : 0))
        rc = branch_report_vmm_death(run, err);
    if (rc == 0 && request->before_commit_hook)
        request->before_commit_hook(request->context);
    if (rc == 0)
        rc = branch_commit(branch, err);
    if (rc == 0)
        rc = branch_publish(branch, run, request, started, out, err);
    if (run->writer)
        store_abort(take_ptr(run->writer));
    return rc;
}

int branch_run(struct branch *branch, struct store *store, const struct branch_request *request,
               struct store_snapshot *out, struct forkd_error *err)
{
    int rc = branch_validate(request, err);
    if (rc < 0)
        return rc;
    if (!vm_try_begin_branch(request->vm, request->snapshot_name))
        return forkd_error_set(err, -EBUSY, "VM %s already has a branch running",
                               vm_id(request->vm));
    branch->on_phase = request->on_phase;
    branch->context = request->context;
    struct branch_run_state *run = calloc(1, sizeof(*run));
    if (!run) {
        vm_end_branch(request->vm);
        return forkd_error_set(err, -ENOMEM, "branch: out of memory");
    }
    *run = (struct branch_run_state){.store = store,
                                     .vm = request->vm,
                                     .mode = request->mode,
                                     .memory_fd = -1,
                                     .handler = {.control_fd = -1},
                                     .handshake = {.uffd = -1, .connection = -1}};
    rc = branch_execute(branch, run, request, out, err);
    free(run);
    vm_end_branch(request->vm);
    if (rc < 0)
        forkd_error_prefix(err, "branch '%s' of %s: ", request->snapshot_name, vm_id(request->vm));
    branch_set_phase(branch, rc == 0            ? BRANCH_PHASE_DONE
                             : rc == -ECANCELED ? BRANCH_PHASE_CANCELLED
                                                : BRANCH_PHASE_FAILED);
    return rc;
}
