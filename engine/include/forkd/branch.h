/*
 * Branching a VM into a snapshot (DESIGN.md section 2).
 *
 * LIVE: write-protect is armed on all guest memory while the VM runs (faults only record the
 * page as dirty and unprotect it), the guest writes for a 20 ms window, the pages dirtied are
 * re-armed in a few converging rounds; then, inside a short pause, the VMM saves vCPU and device
 * state (VmstateOnly), the last dirty set (including any page the VMM wrote while saving) is
 * re-armed, the fault handler switches to copy mode (a write fault captures the page's pre-image,
 * then unprotects it), and the VM resumes. A bulk copier then streams every page no fault captured.
 * Each page is written to memory.bin exactly once, claimed through a per-page atomic; a faulting
 * vCPU never waits for the bulk pass. memory.bin equals guest memory at the end of the state save.
 * The pages dirtied before the pause (the window, the rounds, the last set) are the snapshot's hot
 * set (store_snapshot.hot): where the guest was writing, which forks get first. LIVE_ARM_IN_PAUSE:
 * the same with all arming inside the pause (the benchmark's baseline). FULL: stop-and-copy: pause,
 * the VMM writes a Full snapshot, resume. Works on any VM. FULL and ARM_IN_PAUSE watch no write
 * before the pause, so they record no hot set.
 *
 * Any failure or honoured cancellation leaves the VM in the state the branch found (running, or
 * paused if it was paused) and unprotected, the userfaultfd closed and no snapshot (the store's
 * temporary directory removed). A cancel after the point of no return (publishing) is refused.
 */
#ifndef FORKD_BRANCH_H
#define FORKD_BRANCH_H

#include "basic/error.h"
#include "forkd/store.h"
#include "forkd/vm.h"

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Values match the proto's BranchPhase. */
enum branch_phase {
    BRANCH_PHASE_STARTED = 1,
    BRANCH_PHASE_ARMED = 2,
    BRANCH_PHASE_PAUSED = 3,
    BRANCH_PHASE_VMSTATE_SAVED = 4,
    BRANCH_PHASE_RESUMED = 5,
    BRANCH_PHASE_COPYING = 6,
    BRANCH_PHASE_PUBLISHING = 7,
    BRANCH_PHASE_DONE = 8,
    BRANCH_PHASE_FAILED = 9,
    BRANCH_PHASE_CANCELLED = 10,
};

/* A consistent read of a running branch's progress. */
struct branch_progress {
    enum branch_phase phase;
    uint64_t bytes_copied, bytes_total;
    uint64_t pages_by_fault, pages_by_bulk;
    uint32_t page_size;
    struct store_figures figures; /* durations so far */
    /* Copy-mode write faults: how long the handler took from reading a fault to waking the
     * vCPU (capture + unprotect), as percentiles of a histogram with 19% wide buckets. */
    uint64_t faults_served;
    uint64_t fault_service_p50_ns, fault_service_p99_ns, fault_service_max_ns;
    /* Faults on pages the bulk copier had claimed but not yet captured: left to it, since its
     * unprotect right after the capture wakes the vCPU (not in the service times). */
    uint64_t faults_left_to_bulk;
    /* LIVE and ARM_IN_PAUSE: from the resume until every page was captured and unprotected,
     * when the guest stops paying for the branch (memory.bin may not be durable yet); 0 before. */
    uint64_t captured_ns;
    /* Bytes of the in-memory image the pages were captured into (BRANCH_LEVER_MIRROR); 0 when
     * they went to memory.bin as they were captured. */
    uint64_t mirror_bytes;
    /* LIVE and ARM_IN_PAUSE: the branch_lever bits in use (what a benchmark row measured). */
    unsigned levers;
};

/* Copy-phase levers (see branch.c), all in use by default. The benchmark leaves them out one
 * by one to measure what each buys, against the engine without it, in the same run. */
enum branch_lever {
    BRANCH_LEVER_STAGING = 1u << 0,       /* the fault handler never writes memory.bin */
    BRANCH_LEVER_HOT_FIRST = 1u << 1,     /* pages dirtied while pre-arming are copied first */
    BRANCH_LEVER_FAULT_AROUND = 1u << 2,  /* a fault captures its unclaimed aligned neighbours */
    BRANCH_LEVER_RELEASE_FIRST = 1u << 3, /* a bulk chunk is unprotected before it is written */
    BRANCH_LEVER_DIRECT = 1u << 4, /* the copier captures straight into memory.bin's page cache */
    /* Guests on 2 MiB pages: both paths capture into an image of memory.bin in forkd's memory,
     * at memory speed; memory.bin is written from it once every page is captured (where
     * memory allows). */
    BRANCH_LEVER_MIRROR = 1u << 5,
    BRANCH_LEVER_ALL = BRANCH_LEVER_STAGING | BRANCH_LEVER_HOT_FIRST | BRANCH_LEVER_FAULT_AROUND |
                       BRANCH_LEVER_RELEASE_FIRST | BRANCH_LEVER_DIRECT | BRANCH_LEVER_MIRROR,
};

/* Called on the branch's thread at every phase change; must not block. */
typedef void (*branch_phase_fn)(void *context, enum branch_phase phase,
                                const struct branch_progress *progress);

struct branch_request {
    struct vm *vm;
    const char *snapshot_name;
    enum store_mode mode;
    const struct store_label *labels;
    size_t label_count;
    branch_phase_fn on_phase; /* may be NULL */
    void *context;
    /* Tests: count writes to memory.bin per page (see branch_page_write_counts). */
    bool count_page_writes;
    /* Tests: called inside the pause, after the VMM saved the vmstate, before the resume. */
    void (*inside_pause_hook)(void *context);
    /* Tests: called when the copy is complete, just before the point of no return. */
    void (*before_commit_hook)(void *context);
    /* Tests: called on the fault handler's thread when a write fault claimed its page, before
     * the page is captured (the vCPU, and every later fault, wait until it returns). */
    void (*fault_claimed_hook)(void *context);
    /* Benchmark: branch_lever bits to leave out (0: every lever in use). */
    unsigned levers_off;
    /* Writable drives are captured inside the pause by reflink clones; where the state
     * directory cannot reflink the branch is refused (-EOPNOTSUPP, before anything is paused)
     * unless this accepts a byte copy inside the pause (figures.disk_copied_bytes then says so). */
    bool allow_disk_copy;
};

struct branch;

/* A branch handle: progress and cancellation, usable from any thread while branch_run runs. */
struct branch *branch_new(void);
void branch_free(struct branch *branch);

/* Runs the branch to the end on the calling thread. On success the snapshot is READY and out
 * holds its record. Errors: -ENOENT (VM gone), -EBUSY (a branch of this VM runs), -EOPNOTSUPP
 * (LIVE on memory that cannot be write-protected), -EEXIST (name taken), -EINVAL (bad name),
 * -ECANCELED, -ESRCH (the VMM died), -ENOSPC, -EIO (VMM or I/O error, named in err). */
int branch_run(struct branch *branch, struct store *store, const struct branch_request *request,
               struct store_snapshot *out, struct forkd_error *err);

/* Asks a branch to stop. A branch can be cancelled until its point of no return: the moment it
 * commits to publishing its snapshot, after the copy is complete and just before the PUBLISHING
 * phase. Before it, the cancel is honoured: the branch aborts at its next step, branch_run
 * returns -ECANCELED, the VM is back in the state the branch found and the store holds nothing
 * of it; returns true (also when it was already cancelled). After it, the cancel is refused:
 * returns false and the branch goes on to publish (or fails for another reason). */
bool branch_cancel(struct branch *branch);
void branch_get_progress(struct branch *branch, struct branch_progress *out);

/* With count_page_writes: after branch_run, the number of writes of each page of memory.bin
 * (in file order, pages of the given size), or NULL. */
const uint8_t *branch_page_write_counts(const struct branch *branch, uint64_t *page_count,
                                        uint32_t *page_size);

#ifdef __cplusplus
}
#endif

#endif
