/*
 * kvm_vm: one KVM virtual machine: its memory slots, its vCPUs and their threads, and pausing.
 *
 * Threads and ownership:
 *  - The API thread creates, starts, pauses, resumes and destroys the VM, and reads or writes
 *    vCPU state only while every vCPU is parked (paused) or not yet started.
 *  - Each vCPU thread owns its vCPU's KVM_RUN loop and its kvm_run page. It talks to the API
 *    thread only through struct kvm_vm's pause fields (below) and its vcpu's atomics.
 *
 * Pausing: the API thread sets pause_requested, sends VCPU_KICK_SIGNAL to every vCPU thread
 * (its handler sets kvm_run->immediate_exit, which covers a signal that lands just before
 * KVM_RUN), and waits until each vCPU has parked or stopped. A vCPU parks only between
 * KVM_RUN calls, that is at an instruction boundary, after completing any pending port I/O.
 */
#ifndef FORKD_TESTVM_KVM_VM_H
#define FORKD_TESTVM_KVM_VM_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <linux/kvm.h>

#include "guest_layout.h"
#include "guest_memory.h"
#include "vmstate.h"

struct kvm_vm;

#define VCPU_REPORT_RING 65536u /* 65 s of reports at 1 ms */

struct vcpu_report {
    uint64_t at_ns; /* CLOCK_MONOTONIC */
    uint64_t progress;
};

struct vcpu {
    struct kvm_vm *vm;
    unsigned index;
    int fd;
    struct kvm_run *run;
    pthread_t thread;
    bool thread_started;       /* API thread only */
    bool parked;               /* under vm->lock */
    _Atomic uint64_t progress; /* last running total the guest reported */
    uint32_t progress_high;    /* vCPU thread only: high half of the report in progress */
    /* Every report, timed by the host when it arrived (a ring of VCPU_REPORT_RING entries,
     * written by the vCPU thread only): what the guest achieved in any interval, exact to a
     * report, for the benchmark's stall and lost-work figures. */
    struct vcpu_report *reports;
    _Atomic uint64_t report_count;
    atomic_bool failed; /* set once by the vCPU thread after writing error */
    char error[160];
};

struct kvm_vm {
    int kvm_fd;
    int vm_fd;
    size_t run_size;
    unsigned vcpu_count;
    uint64_t tsc_khz;
    struct vcpu vcpus[GUEST_MAX_VCPUS];

    pthread_mutex_t lock;
    pthread_cond_t changed;      /* parked_count, stopped_count, pause_requested or quit changed */
    atomic_bool pause_requested; /* written under lock, read lock-free by vCPU threads */
    unsigned parked_count;       /* under lock */
    unsigned stopped_count;      /* under lock: vCPU threads that ended on a guest or KVM error */
    bool quit;                   /* under lock */
    bool sync_initialised;
    /* The file the guest's disk writes (GUEST_PORT_DISK) land in, -1: none. Owned by the API
     * thread, which changes it only while every vCPU is parked or before they start. */
    _Atomic int disk_fd;
    /* The guest's balloon (GUEST_PORT_BALLOON): where its pages are mapped and how a page the
     * guest hands back is discarded. Set by the API thread before the vCPUs start. */
    uint8_t *balloon_host;
    uint64_t balloon_pages;
    int balloon_advice; /* MADV_DONTNEED, or MADV_REMOVE for shared memory (precise discards) */
    atomic_uint_fast64_t balloon_discards;
};

/* Opens KVM, creates the VM with one memory slot per region and vcpu_count vCPUs (CPUID set). */
int kvm_vm_create(struct kvm_vm *vm, const struct guest_memory *memory, unsigned vcpu_count,
                  char *err, size_t err_size);

/* Puts every vCPU in 64-bit mode at entry with its own stack, %rdi = index, %rsi = config. */
int kvm_vm_set_boot_state(struct kvm_vm *vm, uint64_t entry, char *err, size_t err_size);

/* Only while paused or not started. */
int kvm_vm_save_vcpu(struct kvm_vm *vm, unsigned index, struct vcpu_state *out, char *err,
                     size_t err_size);
int kvm_vm_load_vcpu(struct kvm_vm *vm, unsigned index, const struct vcpu_state *state, char *err,
                     size_t err_size);

/* Sets up the guest's balloon from its config (none when config->balloon_pages is 0) before
 * the vCPUs start: refused on huge pages (a 4 KiB discard cannot split them). like_firecracker:
 * discard with MADV_DONTNEED whatever the memory (see --balloon-discard). */
int kvm_vm_set_balloon(struct kvm_vm *vm, const struct guest_memory *memory,
                       const struct guest_config *config, bool like_firecracker, char *err,
                       size_t err_size);

/* Starts the vCPU threads, parked when start_paused. */
int kvm_vm_start(struct kvm_vm *vm, bool start_paused, char *err, size_t err_size);

/*
 * Parks every vCPU; waits at most timeout_ms for all of them. On timeout the pause is undone
 * (the vCPUs that parked run again) and -ETIMEDOUT names the vCPUs that did not stop.
 */
int kvm_vm_pause(struct kvm_vm *vm, unsigned timeout_ms, char *err, size_t err_size);

/* Lets parked vCPUs run again; does not wait for them to leave. */
void kvm_vm_resume(struct kvm_vm *vm);

/* Copies the first vCPU failure into err and returns true, if a vCPU has failed. */
bool kvm_vm_failure(struct kvm_vm *vm, char *err, size_t err_size);

/* Copies the vCPU's reports that arrived after since_ns (at most max, oldest first, from the
 * last VCPU_REPORT_RING - 1024); any thread. Returns how many. */
uint64_t kvm_vm_read_reports(const struct vcpu *vcpu, uint64_t since_ns, struct vcpu_report *out,
                             uint64_t max);

/* Stops and joins the vCPU threads and closes everything; safe on a partly created VM. */
void kvm_vm_destroy(struct kvm_vm *vm);

#endif
