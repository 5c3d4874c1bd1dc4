/*
 * The null fault handler: the same userfaultfd set-up as a live branch (PUT /uffd/wp, the
 * handshake, write-protect armed on every region), the same loop shape as the engine's handler
 * (wait, read up to 64 messages, serve each, at SCHED_FIFO), but serving a fault is only
 * "unprotect the page" (which wakes the vCPU). The engine's copy-mode handler adds the claim
 * and the capture of the page to that, so the ratio of the two is what forkd's own work costs
 * a faulting vCPU.
 */
#include "bench.h"

#include "basic/cleanup.h"
#include "latency.h"
#include "thread_priority.h"
#include "uffd.h"
#include "vmm_client.h"

#include <errno.h>
#include <pthread.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NULL_BATCH        64 /* the engine's HANDLER_BATCH */
#define NULL_HANDSHAKE_MS 5000

struct null_samples {
    uint64_t *ns;
    size_t count, capacity;
};

static void null_record(struct null_samples *samples, uint64_t ns)
{
    if (samples->count == samples->capacity) {
        size_t capacity = samples->capacity ? samples->capacity * 2 : 65536;
        uint64_t *grown = realloc(samples->ns, capacity * sizeof(*grown));
        if (!grown)
            return; /* keep what we have: percentiles of fewer samples */
        samples->ns = grown;
        samples->capacity = capacity;
    }
    samples->ns[samples->count++] = ns;
}

static const struct uffd_region *null_region_of(const struct uffd_handshake *handshake,
                                                uint64_t address)
{
    for (size_t i = 0; i < handshake->region_count; i++) {
        const struct uffd_region *region = &handshake->regions[i];
        if (address >= region->host_base && address - region->host_base < region->size)
            return region;
    }
    return NULL;
}

static int null_protect_all(const struct uffd_handshake *handshake, bool protect,
                            struct forkd_error *err)
{
    for (size_t i = 0; i < handshake->region_count; i++) {
        const struct uffd_region *region = &handshake->regions[i];
        int rc = uffd_write_protect(handshake->uffd, region->host_base, region->size,
                                    region->page_size, protect, false, err);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Serves write faults until deadline, timing each from the start of its handling to the
 * return of the unprotect, as the engine does. */
static int null_serve(const struct uffd_handshake *handshake, uint64_t deadline,
                      struct null_samples *samples, struct forkd_error *err)
{
    struct uffd_msg messages[NULL_BATCH];
    for (uint64_t now = bench_now_ns(); now < deadline; now = bench_now_ns()) {
        int timeout_ms = (int)((deadline - now) / 1000000) + 1;
        int ready = uffd_wait_peer(handshake->uffd, handshake->connection, -1, timeout_ms);
        if (ready < 0)
            return forkd_error_errno(err, ready, "null handler: userfaultfd");
        int count = ready ? uffd_read_events(handshake->uffd, messages, NULL_BATCH, err) : 0;
        if (count < 0)
            return count;
        for (int i = 0; i < count; i++) {
            if (messages[i].event != UFFD_EVENT_PAGEFAULT || !uffd_is_wp_fault(&messages[i]))
                continue;
            uint64_t address = messages[i].arg.pagefault.address;
            const struct uffd_region *region = null_region_of(handshake, address);
            if (!region)
                continue;
            uint64_t page = address & ~(region->page_size - 1);
            uint64_t started = bench_now_ns(); /* where the engine starts its clock */
            int rc = uffd_write_protect(handshake->uffd, page, region->page_size, region->page_size,
                                        false, false, err);
            if (rc < 0)
                return rc;
            null_record(samples, bench_now_ns() - started);
        }
    }
    return 0;
}

/* --null-sweep: unprotects memory in the bulk copier's 2 MiB steps at a given rate while the
 * null handler serves, as the engine's copier does during a LIVE copy, without its copying. */
struct null_sweep {
    const struct uffd_handshake *handshake;
    double bytes_per_s;
    uint64_t started_ns, deadline_ns;
    pthread_t thread;
};

#define SWEEP_CHUNK_BYTES (2ULL << 20) /* the engine's BULK_CHUNK_BYTES */

static void *null_sweep_loop(void *arg)
{
    struct null_sweep *sweep = arg;
    uint64_t done = 0;
    for (size_t r = 0; r < sweep->handshake->region_count; r++) {
        const struct uffd_region *region = &sweep->handshake->regions[r];
        for (uint64_t offset = 0; offset < region->size; offset += SWEEP_CHUNK_BYTES) {
            uint64_t due = sweep->started_ns + (uint64_t)((double)done * 1e9 / sweep->bytes_per_s);
            uint64_t now = bench_now_ns();
            if (due > sweep->deadline_ns)
                return NULL;
            if (due > now)
                bench_sleep_ms((unsigned)((due - now) / 1000000));
            uint64_t length = region->size - offset < SWEEP_CHUNK_BYTES ? region->size - offset
                                                                        : SWEEP_CHUNK_BYTES;
            uffd_write_protect(sweep->handshake->uffd, region->host_base + offset, length,
                               region->page_size, false, false, NULL);
            done += length;
        }
    }
    return NULL;
}

static int compare_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void null_summarise(struct null_samples *samples, struct null_result *out)
{
    qsort(samples->ns, samples->count, sizeof(uint64_t), compare_u64);
    out->faults = samples->count;
    out->exact_p50_ns = bench_percentile(samples->ns, samples->count, 50);
    out->p50_ns = latency_quantize(out->exact_p50_ns);
    out->p99_ns = latency_quantize(bench_percentile(samples->ns, samples->count, 99));
    out->max_ns = samples->count ? samples->ns[samples->count - 1] : 0;
}

static int null_receive(struct vm *vm, struct uffd_handshake *handshake, struct forkd_error *err)
{
    struct vm_status status;
    vm_get_status(vm, &status);
    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%.*s.null.sock", (int)(strlen(status.api_socket_path) - 5),
             status.api_socket_path);
    _cleanup_close_ int listener = uffd_listen(path, err);
    if (listener < 0)
        return listener;
    int rc = vmm_uffd_wp(vm_client(vm), path, err);
    if (rc == 0)
        rc = uffd_accept_handshake(listener, NULL_HANDSHAKE_MS, handshake, err);
    unlink(path);
    return rc;
}

int bench_null_handler(struct vm *vm, unsigned duration_ms, double sweep_bytes_per_s,
                       struct null_result *out, struct forkd_error *err)
{
    memset(out, 0, sizeof(*out));
    struct uffd_handshake handshake = {.uffd = -1, .connection = -1};
    int rc = null_receive(vm, &handshake, err);
    if (rc < 0)
        return rc;
    struct thread_priority priority; /* as the engine's handler: a vCPU waits on each fault */
    thread_priority_raise(&priority);
    struct null_samples samples = {0};
    rc = null_protect_all(&handshake, true, err);
    out->armed_ns = bench_now_ns();
    uint64_t deadline = out->armed_ns + (uint64_t)duration_ms * 1000000ULL;
    struct null_sweep sweep = {&handshake, sweep_bytes_per_s, out->armed_ns, deadline, 0};
    bool sweeping = rc == 0 && sweep_bytes_per_s > 0 &&
                    pthread_create(&sweep.thread, NULL, null_sweep_loop, &sweep) == 0;
    if (rc == 0)
        rc = null_serve(&handshake, deadline, &samples, err);
    if (sweeping)
        pthread_join(sweep.thread, NULL);
    out->finished_ns = bench_now_ns();
    /* Unprotecting wakes every vCPU still waiting; closing the fd drops the registration. */
    struct forkd_error ignored;
    null_protect_all(&handshake, false, &ignored);
    thread_priority_restore(&priority);
    uffd_handshake_release(&handshake);
    null_summarise(&samples, out);
    free(samples.ns);
    return rc;
}
