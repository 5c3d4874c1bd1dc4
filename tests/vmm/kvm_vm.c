/* kvm_vm: KVM VM and vCPU lifecycle, vCPU threads and the pause protocol (see kvm_vm.h). */
#include "kvm_vm.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "basic/cleanup.h"
#include "basic/clock.h"

#include "vmm_error.h"

#define VCPU_KICK_SIGNAL SIGUSR1
#define MSR_IA32_TSC     0x10

#define CR0_PE         (1ull << 0)
#define CR0_MP         (1ull << 1)
#define CR0_ET         (1ull << 4)
#define CR0_NE         (1ull << 5)
#define CR0_WP         (1ull << 16)
#define CR0_PG         (1ull << 31)
#define CR4_PAE        (1ull << 5)
#define CR4_OSFXSR     (1ull << 9)
#define CR4_OSXMMEXCPT (1ull << 10)
#define RFLAGS_FIXED   (1ull << 1)
#define RFLAGS_IOPL3   (3ull << 12)
#define EFER_LME       (1ull << 8)
#define EFER_LMA       (1ull << 10)

/* The vCPU thread's kvm_run, for the kick signal handler. */
static __thread struct kvm_run *thread_run;

static void kick_signal_handler(int signo)
{
    (void)signo;
    if (thread_run)
        __atomic_store_n(&thread_run->immediate_exit, 1, __ATOMIC_RELAXED);
}

static int install_kick_handler(char *err, size_t err_size)
{
    /* No SA_RESTART: the point of the signal is that KVM_RUN returns EINTR. */
    struct sigaction action = {.sa_handler = kick_signal_handler};

    sigemptyset(&action.sa_mask);
    if (sigaction(VCPU_KICK_SIGNAL, &action, NULL) < 0)
        return error_set(err, err_size, errno, "sigaction: %s", strerror(errno));
    return 0;
}

static int init_sync(struct kvm_vm *vm, char *err, size_t err_size)
{
    pthread_condattr_t attr;

    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    int r = pthread_cond_init(&vm->changed, &attr);
    pthread_condattr_destroy(&attr);
    if (r != 0)
        return error_set(err, err_size, r, "pthread_cond_init: %s", strerror(r));
    r = pthread_mutex_init(&vm->lock, NULL);
    if (r != 0) {
        pthread_cond_destroy(&vm->changed);
        return error_set(err, err_size, r, "pthread_mutex_init: %s", strerror(r));
    }
    vm->sync_initialised = true;
    return 0;
}

static int open_kvm(struct kvm_vm *vm, char *err, size_t err_size)
{
    vm->kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (vm->kvm_fd < 0)
        return error_set(err, err_size, errno, "open(/dev/kvm): %s", strerror(errno));
    int version = ioctl(vm->kvm_fd, KVM_GET_API_VERSION, 0);
    if (version != KVM_API_VERSION)
        return error_set(err, err_size, ENOTSUP, "KVM API version %d, want %d", version,
                         KVM_API_VERSION);
    if (ioctl(vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_IMMEDIATE_EXIT) <= 0)
        return error_set(err, err_size, ENOTSUP, "KVM lacks KVM_CAP_IMMEDIATE_EXIT");
    int run_size = ioctl(vm->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size <= 0)
        return error_set(err, err_size, errno, "KVM_GET_VCPU_MMAP_SIZE: %s", strerror(errno));
    vm->run_size = (size_t)run_size;
    vm->vm_fd = ioctl(vm->kvm_fd, KVM_CREATE_VM, 0);
    if (vm->vm_fd < 0)
        return error_set(err, err_size, errno, "KVM_CREATE_VM: %s", strerror(errno));
    return 0;
}

static int add_memory_slots(struct kvm_vm *vm, const struct guest_memory *memory, char *err,
                            size_t err_size)
{
    for (unsigned i = 0; i < memory->region_count; i++) {
        const struct memory_region *r = &memory->regions[i];
        struct kvm_userspace_memory_region slot = {
            .slot = i,
            .guest_phys_addr = r->guest_phys_addr,
            .memory_size = r->size,
            .userspace_addr = (uint64_t)r->host,
        };
        if (ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &slot) < 0)
            return error_set(err, err_size, errno, "KVM_SET_USER_MEMORY_REGION slot %u: %s", i,
                             strerror(errno));
    }
    return 0;
}

/* KVM_GET_SUPPORTED_CPUID wants the caller to guess the entry count: grow until it fits. */
static struct kvm_cpuid2 *supported_cpuid(int kvm_fd, char *err, size_t err_size)
{
    for (unsigned entries = 64; entries <= 4096; entries *= 2) {
        struct kvm_cpuid2 *cpuid =
            calloc(1, sizeof(*cpuid) + entries * sizeof(struct kvm_cpuid_entry2));
        if (!cpuid) {
            error_set(err, err_size, ENOMEM, "CPUID table");
            return NULL;
        }
        cpuid->nent = entries;
        if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid) == 0)
            return cpuid;
        int saved = errno;
        free(cpuid);
        if (saved != E2BIG) {
            error_set(err, err_size, saved, "KVM_GET_SUPPORTED_CPUID: %s", strerror(saved));
            return NULL;
        }
    }
    error_set(err, err_size, E2BIG, "KVM_GET_SUPPORTED_CPUID: table too large");
    return NULL;
}

static int create_vcpus(struct kvm_vm *vm, unsigned vcpu_count, char *err, size_t err_size)
{
    _cleanup_free_ struct kvm_cpuid2 *cpuid = supported_cpuid(vm->kvm_fd, err, err_size);

    if (!cpuid)
        return -EINVAL;
    for (unsigned i = 0; i < vcpu_count; i++) {
        struct vcpu *vcpu = &vm->vcpus[i];
        vcpu->fd = ioctl(vm->vm_fd, KVM_CREATE_VCPU, i);
        if (vcpu->fd < 0)
            return error_set(err, err_size, errno, "KVM_CREATE_VCPU %u: %s", i, strerror(errno));
        vm->vcpu_count = i + 1;
        void *run = mmap(NULL, vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu->fd, 0);
        if (run == MAP_FAILED)
            return error_set(err, err_size, errno, "mmap kvm_run of vCPU %u: %s", i,
                             strerror(errno));
        vcpu->run = run;
        /* Reserved, not touched: a VM nobody asks for its reports pays a page at most. */
        void *reports = mmap(NULL, VCPU_REPORT_RING * sizeof(struct vcpu_report),
                             PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        vcpu->reports = reports == MAP_FAILED ? NULL : reports;
        if (ioctl(vcpu->fd, KVM_SET_CPUID2, cpuid) < 0)
            return error_set(err, err_size, errno, "KVM_SET_CPUID2 vCPU %u: %s", i,
                             strerror(errno));
    }
    return 0;
}

int kvm_vm_create(struct kvm_vm *vm, const struct guest_memory *memory, unsigned vcpu_count,
                  char *err, size_t err_size)
{
    int r;

    memset(vm, 0, sizeof(*vm));
    vm->kvm_fd = vm->vm_fd = -1;
    atomic_init(&vm->disk_fd, -1);
    for (unsigned i = 0; i < GUEST_MAX_VCPUS; i++)
        vm->vcpus[i] = (struct vcpu){.vm = vm, .index = i, .fd = -1};
    if (vcpu_count == 0 || vcpu_count > GUEST_MAX_VCPUS)
        return error_set(err, err_size, EINVAL, "%u vCPUs (1 to %u allowed)", vcpu_count,
                         GUEST_MAX_VCPUS);
    r = init_sync(vm, err, err_size);
    if (r == 0)
        r = install_kick_handler(err, err_size);
    if (r == 0)
        r = open_kvm(vm, err, err_size);
    if (r == 0)
        r = add_memory_slots(vm, memory, err, err_size);
    if (r == 0)
        r = create_vcpus(vm, vcpu_count, err, err_size);
    if (r < 0)
        return r;
    int khz = ioctl(vm->vcpus[0].fd, KVM_GET_TSC_KHZ, 0);
    if (khz <= 0)
        return error_set(err, err_size, errno, "KVM_GET_TSC_KHZ: %s", strerror(errno));
    vm->tsc_khz = (uint64_t)khz;
    return 0;
}

static void set_long_mode_sregs(struct kvm_sregs *sregs)
{
    struct kvm_segment code = {
        .base = 0,
        .limit = 0xffffffff,
        .selector = GUEST_CODE_SELECTOR,
        .type = 11,
        .present = 1,
        .dpl = 3,
        .s = 1,
        .l = 1,
        .g = 1,
    };
    struct kvm_segment data = {
        .base = 0,
        .limit = 0xffffffff,
        .selector = GUEST_DATA_SELECTOR,
        .type = 3,
        .present = 1,
        .dpl = 3,
        .s = 1,
        .db = 1,
        .g = 1,
    };

    sregs->cs = code;
    sregs->ds = sregs->es = sregs->fs = sregs->gs = sregs->ss = data;
    sregs->gdt.base = GUEST_GDT_GPA;
    sregs->gdt.limit = 5 * 8 - 1;
    /* No IDT: the guest takes no interrupts, and an exception becomes a triple fault, which
     * surfaces as KVM_EXIT_SHUTDOWN instead of silently misbehaving. */
    sregs->idt.base = 0;
    sregs->idt.limit = 0;
    sregs->cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs->cr3 = GUEST_PML4_GPA;
    sregs->cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs->efer = EFER_LME | EFER_LMA;
}

int kvm_vm_set_boot_state(struct kvm_vm *vm, uint64_t entry, char *err, size_t err_size)
{
    for (unsigned i = 0; i < vm->vcpu_count; i++) {
        struct vcpu *vcpu = &vm->vcpus[i];
        struct kvm_sregs sregs;
        struct kvm_fpu fpu = {.fcw = 0x37f, .mxcsr = 0x1f80};
        struct kvm_regs regs = {
            .rip = entry,
            .rsp = GUEST_STACKS_GPA + (i + 1) * GUEST_STACK_SIZE,
            .rdi = i,
            .rsi = GUEST_CONFIG_GPA,
            .rflags = RFLAGS_FIXED | RFLAGS_IOPL3, /* IOPL 3: port I/O from CPL 3 */
        };

        if (ioctl(vcpu->fd, KVM_GET_SREGS, &sregs) < 0)
            return error_set(err, err_size, errno, "KVM_GET_SREGS: %s", strerror(errno));
        set_long_mode_sregs(&sregs);
        if (ioctl(vcpu->fd, KVM_SET_SREGS, &sregs) < 0)
            return error_set(err, err_size, errno, "KVM_SET_SREGS: %s", strerror(errno));
        if (ioctl(vcpu->fd, KVM_SET_REGS, &regs) < 0)
            return error_set(err, err_size, errno, "KVM_SET_REGS: %s", strerror(errno));
        if (ioctl(vcpu->fd, KVM_SET_FPU, &fpu) < 0)
            return error_set(err, err_size, errno, "KVM_SET_FPU: %s", strerror(errno));
    }
    return 0;
}

/* struct kvm_msrs ends in a flexible array: give it room for the one entry we use. */
union tsc_msr {
    struct kvm_msrs msrs;
    uint8_t storage[sizeof(struct kvm_msrs) + sizeof(struct kvm_msr_entry)];
};

static void tsc_msr_init(union tsc_msr *msr, uint64_t value)
{
    memset(msr, 0, sizeof(*msr));
    msr->msrs.nmsrs = 1;
    msr->msrs.entries[0].index = MSR_IA32_TSC;
    msr->msrs.entries[0].data = value;
}

int kvm_vm_save_vcpu(struct kvm_vm *vm, unsigned index, struct vcpu_state *out, char *err,
                     size_t err_size)
{
    struct vcpu *vcpu = &vm->vcpus[index];
    union tsc_msr msr;

    memset(out, 0, sizeof(*out));
    tsc_msr_init(&msr, 0);
    if (ioctl(vcpu->fd, KVM_GET_REGS, &out->regs) < 0 ||
        ioctl(vcpu->fd, KVM_GET_SREGS, &out->sregs) < 0 ||
        ioctl(vcpu->fd, KVM_GET_FPU, &out->fpu) < 0)
        return error_set(err, err_size, errno, "saving vCPU %u registers: %s", index,
                         strerror(errno));
    if (ioctl(vcpu->fd, KVM_GET_MSRS, &msr) != 1)
        return error_set(err, err_size, EIO, "saving vCPU %u TSC: KVM_GET_MSRS failed", index);
    out->tsc = msr.msrs.entries[0].data;
    return 0;
}

int kvm_vm_load_vcpu(struct kvm_vm *vm, unsigned index, const struct vcpu_state *state, char *err,
                     size_t err_size)
{
    struct vcpu *vcpu = &vm->vcpus[index];
    union tsc_msr msr;

    if (ioctl(vcpu->fd, KVM_SET_SREGS, &state->sregs) < 0 ||
        ioctl(vcpu->fd, KVM_SET_REGS, &state->regs) < 0 ||
        ioctl(vcpu->fd, KVM_SET_FPU, &state->fpu) < 0)
        return error_set(err, err_size, errno, "restoring vCPU %u registers: %s", index,
                         strerror(errno));
    tsc_msr_init(&msr, state->tsc);
    if (ioctl(vcpu->fd, KVM_SET_MSRS, &msr) != 1)
        return error_set(err, err_size, EIO, "restoring vCPU %u TSC: KVM_SET_MSRS failed", index);
    return 0;
}

/* Records why this vCPU stops for good; the API thread reports it in GET / and refuses
 * snapshots of a VM with a failed vCPU. */
__attribute__((format(printf, 2, 3))) static void vcpu_fail(struct vcpu *vcpu, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(vcpu->error, sizeof(vcpu->error), fmt, ap);
    va_end(ap);
    atomic_store(&vcpu->failed, true);
}

/* For failures whose cause is in the guest: where it was is the first thing to know. */
__attribute__((format(printf, 2, 3))) static void vcpu_fail_with_registers(struct vcpu *vcpu,
                                                                           const char *what, ...)
{
    struct kvm_regs regs = {0};
    struct kvm_sregs sregs = {0};
    char reason[96];
    va_list ap;

    va_start(ap, what);
    vsnprintf(reason, sizeof(reason), what, ap);
    va_end(ap);
    ioctl(vcpu->fd, KVM_GET_REGS, &regs);
    ioctl(vcpu->fd, KVM_GET_SREGS, &sregs);
    vcpu_fail(
        vcpu,
        "vCPU %u: %s at rip 0x%llx (rsp 0x%llx, cr0 0x%llx, cr3 0x%llx, cr4 0x%llx, efer 0x%llx)",
        vcpu->index, reason, (unsigned long long)regs.rip, (unsigned long long)regs.rsp,
        (unsigned long long)sregs.cr0, (unsigned long long)sregs.cr3, (unsigned long long)sregs.cr4,
        (unsigned long long)sregs.efer);
}

static void record_progress(struct vcpu *vcpu, uint16_t port, uint32_t value)
{
    if (port == GUEST_PORT_PROGRESS_HIGH) {
        vcpu->progress_high = value;
        return;
    }
    uint64_t total = ((uint64_t)vcpu->progress_high << 32) | value;
    atomic_store_explicit(&vcpu->progress, total, memory_order_relaxed);
    if (!vcpu->reports)
        return;
    uint64_t count = atomic_load_explicit(&vcpu->report_count, memory_order_relaxed);
    vcpu->reports[count % VCPU_REPORT_RING] =
        (struct vcpu_report){.at_ns = forkd_monotonic_ns(), .progress = total};
    atomic_store_explicit(&vcpu->report_count, count + 1, memory_order_release);
}

uint64_t kvm_vm_read_reports(const struct vcpu *vcpu, uint64_t since_ns, struct vcpu_report *out,
                             uint64_t max)
{
    uint64_t count = atomic_load_explicit(&vcpu->report_count, memory_order_acquire);
    /* Keep clear of the slots the vCPU may be overwriting while we read. */
    uint64_t window = VCPU_REPORT_RING - 1024;
    uint64_t first = count > window ? count - window : 0, n = 0;
    for (uint64_t i = first; vcpu->reports && i < count && n < max; i++) {
        struct vcpu_report report = vcpu->reports[i % VCPU_REPORT_RING];
        if (report.at_ns > since_ns)
            out[n++] = report;
    }
    return n;
}

/* The guest's disk write: synchronous, so it is on the drive file before the guest's next
 * instruction (and before any pause completes). Returns 1 (I/O pending) or -1. */
static int write_disk(struct vcpu *vcpu, uint32_t value)
{
    uint64_t word = value;
    int fd = atomic_load(&vcpu->vm->disk_fd);
    off_t offset = (off_t)(GUEST_DISK_OFFSET + 8ull * vcpu->index);
    if (fd < 0) {
        vcpu_fail(vcpu, "vCPU %u: guest disk write without a writable drive", vcpu->index);
        return -1;
    }
    ssize_t n = pwrite(fd, &word, sizeof(word), offset);
    if (n != (ssize_t)sizeof(word)) {
        vcpu_fail(vcpu, "vCPU %u: guest disk write at offset %lld: %s", vcpu->index,
                  (long long)offset, n < 0 ? strerror(errno) : "short write");
        return -1;
    }
    return 1;
}

int kvm_vm_set_balloon(struct kvm_vm *vm, const struct guest_memory *memory,
                       const struct guest_config *config, bool like_firecracker, char *err,
                       size_t err_size)
{
    if (config->balloon_pages == 0)
        return 0;
    if (memory->page_size != GUEST_PAGE_SIZE)
        return error_set(err, err_size, EINVAL,
                         "boot_args: balloon needs 4 KiB pages, but guest memory is in huge pages");
    uint8_t *host = guest_memory_host_address(memory, config->balloon_gpa,
                                              config->balloon_pages * GUEST_PAGE_SIZE);
    if (!host || config->balloon_pages > GUEST_BALLOON_MAX_PAGES)
        return error_set(err, err_size, EINVAL, "the guest's balloon lies outside its memory");
    vm->balloon_host = host;
    vm->balloon_pages = config->balloon_pages;
    /* Shared memory keeps a page in the file until the hole is punched; MADV_REMOVE on the
     * mapping punches it and, unlike fallocate, tells a userfaultfd (UFFD_EVENT_REMOVE).
     * Firecracker only drops the mapping's page-table entries (MADV_DONTNEED). */
    vm->balloon_advice =
        memory->backend == MEMORY_BACKEND_SHARED && !like_firecracker ? MADV_REMOVE : MADV_DONTNEED;
    return 0;
}

/* The guest handed balloon page `index` back: discard it inside the exit, so it is gone before
 * the guest's next instruction and before any pause completes. Returns 1 or -1. */
static int discard_balloon_page(struct vcpu *vcpu, uint32_t index)
{
    struct kvm_vm *vm = vcpu->vm;
    if (index >= vm->balloon_pages) {
        vcpu_fail(vcpu, "vCPU %u: guest freed balloon page %u of %llu", vcpu->index, index,
                  (unsigned long long)vm->balloon_pages);
        return -1;
    }
    if (madvise(vm->balloon_host + (uint64_t)index * GUEST_PAGE_SIZE, GUEST_PAGE_SIZE,
                vm->balloon_advice) < 0) {
        vcpu_fail(vcpu, "vCPU %u: discarding balloon page %u: %s", vcpu->index, index,
                  strerror(errno));
        return -1;
    }
    atomic_fetch_add(&vm->balloon_discards, 1);
    return 1;
}

/* Returns 1 when the exit left port I/O pending, 0 to keep running, -1 when the vCPU failed. */
static int handle_exit(struct vcpu *vcpu)
{
    struct kvm_run *run = vcpu->run;

    switch (run->exit_reason) {
    case KVM_EXIT_IO:
        if (run->io.direction == KVM_EXIT_IO_OUT && run->io.size == 4 && run->io.count == 1) {
            uint32_t value;
            memcpy(&value, (uint8_t *)run + run->io.data_offset, sizeof(value));
            if (run->io.port == GUEST_PORT_PROGRESS || run->io.port == GUEST_PORT_PROGRESS_HIGH) {
                record_progress(vcpu, run->io.port, value);
                return 1;
            }
            if (run->io.port == GUEST_PORT_DISK)
                return write_disk(vcpu, value);
            if (run->io.port == GUEST_PORT_BALLOON)
                return discard_balloon_page(vcpu, value);
            if (run->io.port == GUEST_PORT_PANIC) {
                vcpu_fail(vcpu, "vCPU %u: guest panic code %u", vcpu->index, value);
                return -1;
            }
        }
        if (run->io.direction == KVM_EXIT_IO_IN)
            memset((uint8_t *)run + run->io.data_offset, 0xff,
                   (size_t)run->io.size * run->io.count);
        return 1;
    case KVM_EXIT_INTR:
        return 0;
    case KVM_EXIT_HLT:
        vcpu_fail(vcpu, "vCPU %u: guest halted", vcpu->index);
        return -1;
    case KVM_EXIT_SHUTDOWN:
        vcpu_fail_with_registers(vcpu, "guest triple fault (shutdown)");
        return -1;
    case KVM_EXIT_FAIL_ENTRY:
        vcpu_fail(vcpu, "vCPU %u: VM entry failed, reason 0x%llx", vcpu->index,
                  (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
        return -1;
    case KVM_EXIT_INTERNAL_ERROR:
        vcpu_fail_with_registers(vcpu, "KVM internal error, suberror %u", run->internal.suberror);
        return -1;
    case KVM_EXIT_MMIO:
        vcpu_fail(vcpu, "vCPU %u: guest touched unbacked address 0x%llx", vcpu->index,
                  (unsigned long long)run->mmio.phys_addr);
        return -1;
    default:
        vcpu_fail(vcpu, "vCPU %u: unexpected KVM exit %u", vcpu->index, run->exit_reason);
        return -1;
    }
}

/*
 * KVM finishes a port-I/O exit only on the next KVM_RUN; state read before that would have
 * RIP still at the OUT. Entering with immediate_exit set completes it without running guest
 * code.
 */
static void complete_pending_io(struct vcpu *vcpu)
{
    vcpu->run->immediate_exit = 1;
    while (ioctl(vcpu->fd, KVM_RUN, 0) == 0 && vcpu->run->exit_reason != KVM_EXIT_INTR)
        ;
    vcpu->run->immediate_exit = 0;
}

/* Parks until resumed; returns false when the VM is being destroyed. */
static bool vcpu_park(struct vcpu *vcpu)
{
    struct kvm_vm *vm = vcpu->vm;
    bool keep_running;

    pthread_mutex_lock(&vm->lock);
    vcpu->parked = true;
    vm->parked_count++;
    pthread_cond_broadcast(&vm->changed);
    while (atomic_load(&vm->pause_requested) && !vm->quit)
        pthread_cond_wait(&vm->changed, &vm->lock);
    vm->parked_count--;
    vcpu->parked = false;
    keep_running = !vm->quit;
    pthread_mutex_unlock(&vm->lock);
    return keep_running;
}

static void vcpu_mark_stopped(struct vcpu *vcpu)
{
    struct kvm_vm *vm = vcpu->vm;

    pthread_mutex_lock(&vm->lock);
    vm->stopped_count++;
    pthread_cond_broadcast(&vm->changed);
    pthread_mutex_unlock(&vm->lock);
}

static void *vcpu_thread_main(void *arg)
{
    struct vcpu *vcpu = arg;
    bool io_pending = false;

    thread_run = vcpu->run;
    for (;;) {
        if (atomic_load(&vcpu->vm->pause_requested)) {
            if (io_pending)
                complete_pending_io(vcpu);
            io_pending = false;
            vcpu->run->immediate_exit = 0;
            if (!vcpu_park(vcpu))
                break;
            continue;
        }
        if (ioctl(vcpu->fd, KVM_RUN, 0) < 0) {
            io_pending = false;
            if (errno == EINTR || errno == EAGAIN) {
                /* Cleared before pause_requested is read again: a kick for a later pause
                 * is stored after its request, so neither can be lost. */
                vcpu->run->immediate_exit = 0;
                continue;
            }
            vcpu_fail(vcpu, "vCPU %u: KVM_RUN: %s", vcpu->index, strerror(errno));
            break;
        }
        int r = handle_exit(vcpu);
        if (r < 0)
            break;
        io_pending = r == 1;
    }
    vcpu_mark_stopped(vcpu);
    return NULL;
}

int kvm_vm_start(struct kvm_vm *vm, bool start_paused, char *err, size_t err_size)
{
    sigset_t kick, previous;

    atomic_store(&vm->pause_requested, start_paused);
    /* The new threads inherit the mask: make sure the kick signal is deliverable to them. */
    sigemptyset(&kick);
    sigaddset(&kick, VCPU_KICK_SIGNAL);
    pthread_sigmask(SIG_UNBLOCK, &kick, &previous);
    /* vCPUs run at normal priority even when the API thread creating them runs real-time:
     * a guest spinning flat out must not be able to starve the host. */
    pthread_attr_t attributes;
    struct sched_param normal = {.sched_priority = 0};
    pthread_attr_init(&attributes);
    pthread_attr_setinheritsched(&attributes, PTHREAD_EXPLICIT_SCHED);
    pthread_attr_setschedpolicy(&attributes, SCHED_OTHER);
    pthread_attr_setschedparam(&attributes, &normal);
    int r = 0;
    for (unsigned i = 0; i < vm->vcpu_count && r == 0; i++) {
        struct vcpu *vcpu = &vm->vcpus[i];
        r = pthread_create(&vcpu->thread, &attributes, vcpu_thread_main, vcpu);
        if (r != 0)
            error_set(err, err_size, r, "starting vCPU %u thread: %s", i, strerror(r));
        else
            vcpu->thread_started = true;
    }
    pthread_attr_destroy(&attributes);
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    return r == 0 ? 0 : -r;
}

static void kick_all(struct kvm_vm *vm)
{
    for (unsigned i = 0; i < vm->vcpu_count; i++)
        if (vm->vcpus[i].thread_started)
            pthread_kill(vm->vcpus[i].thread, VCPU_KICK_SIGNAL);
}

static unsigned started_vcpus(const struct kvm_vm *vm)
{
    unsigned started = 0;
    for (unsigned i = 0; i < vm->vcpu_count; i++)
        started += vm->vcpus[i].thread_started;
    return started;
}

static void list_running_vcpus(struct kvm_vm *vm, char *out, size_t out_size)
{
    size_t used = 0;

    out[0] = '\0';
    for (unsigned i = 0; i < vm->vcpu_count && used < out_size; i++)
        if (!vm->vcpus[i].parked && !atomic_load(&vm->vcpus[i].failed))
            used += (size_t)snprintf(out + used, out_size - used, "%s%u", used ? "," : "", i);
}

int kvm_vm_pause(struct kvm_vm *vm, unsigned timeout_ms, char *err, size_t err_size)
{
    struct timespec deadline;
    unsigned expected = started_vcpus(vm);
    int r = 0;

    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&vm->lock);
    atomic_store(&vm->pause_requested, true);
    pthread_mutex_unlock(&vm->lock);
    kick_all(vm);

    pthread_mutex_lock(&vm->lock);
    while (r == 0 && vm->parked_count + vm->stopped_count < expected)
        r = pthread_cond_timedwait(&vm->changed, &vm->lock, &deadline);
    if (vm->parked_count + vm->stopped_count < expected) {
        char running[128];
        list_running_vcpus(vm, running, sizeof(running));
        atomic_store(&vm->pause_requested, false);
        pthread_cond_broadcast(&vm->changed);
        pthread_mutex_unlock(&vm->lock);
        return error_set(err, err_size, ETIMEDOUT,
                         "vCPU(s) %s did not stop within %u ms; the VM keeps running", running,
                         timeout_ms);
    }
    pthread_mutex_unlock(&vm->lock);
    return 0;
}

void kvm_vm_resume(struct kvm_vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    atomic_store(&vm->pause_requested, false);
    pthread_cond_broadcast(&vm->changed);
    pthread_mutex_unlock(&vm->lock);
}

bool kvm_vm_failure(struct kvm_vm *vm, char *err, size_t err_size)
{
    for (unsigned i = 0; i < vm->vcpu_count; i++) {
        if (atomic_load(&vm->vcpus[i].failed)) {
            snprintf(err, err_size, "%s", vm->vcpus[i].error);
            return true;
        }
    }
    return false;
}

void kvm_vm_destroy(struct kvm_vm *vm)
{
    if (vm->sync_initialised) {
        pthread_mutex_lock(&vm->lock);
        vm->quit = true;
        atomic_store(&vm->pause_requested, true);
        pthread_cond_broadcast(&vm->changed);
        pthread_mutex_unlock(&vm->lock);
        kick_all(vm);
    }
    for (unsigned i = 0; i < vm->vcpu_count; i++) {
        struct vcpu *vcpu = &vm->vcpus[i];
        if (vcpu->thread_started)
            pthread_join(vcpu->thread, NULL);
        vcpu->thread_started = false;
        if (vcpu->run)
            munmap(vcpu->run, vm->run_size);
        vcpu->run = NULL;
        if (vcpu->reports)
            munmap(vcpu->reports, VCPU_REPORT_RING * sizeof(struct vcpu_report));
        vcpu->reports = NULL;
        forkd_closep(&vcpu->fd);
        vcpu->fd = -1;
    }
    forkd_closep(&vm->vm_fd);
    forkd_closep(&vm->kvm_fd);
    vm->vm_fd = vm->kvm_fd = -1;
    if (vm->sync_initialised) {
        pthread_mutex_destroy(&vm->lock);
        pthread_cond_destroy(&vm->changed);
        vm->sync_initialised = false;
    }
    vm->vcpu_count = 0;
}
