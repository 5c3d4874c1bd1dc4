/*
 * The VM registry (see forkd/vm.h): VMM processes launched with posix_spawn, watched through
 * pidfds by one reaper thread, configured through the VMM client.
 *
 * Locking: registry->lock guards the list and the id counter; vm->lock guards a VM's mutable
 * fields (state, pid, exit reason, memfd, branch id). The reaper takes vm->lock only, never the
 * registry lock while holding it.
 */
#include "forkd/vm.h"

#include "basic/cleanup.h"
#include "vmm_client.h"
#include "basic/clock.h"
#include "basic/fsutil.h"
#include "pause.h"

#include "disk_clone.h"
#include "vm_record.h"
#include "vmm_fds.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>

#include <linux/mman.h> /* MAP_HUGE_SHIFT */

/* memfd_create's 2 MiB hugetlbfs page size (linux/memfd.h; that header's other flags clash
 * with glibc's). */
#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << MAP_HUGE_SHIFT)
#endif
#include <time.h>
#include <unistd.h>

extern char **environ;

struct vm {
    atomic_int refs;
    struct vm_registry *registry;
    char id[VM_ID_MAX];
    char name[VM_NAME_MAX + 1];
    enum vm_memory memory;
    unsigned vcpu_count;
    uint64_t mem_size_mib;
    uint64_t page_size; /* VM_SMALL_PAGE_SIZE or VM_HUGE_PAGE_SIZE */
    size_t label_count;
    struct vm_label labels[VM_MAX_LABELS];
    struct vm_devices devices; /* set before the VM is listed as started; then read-only */
    uint64_t memory_bytes;
    char api_socket_path[PATH_MAX];
    char log_path[PATH_MAX];
    char source_snapshot[VM_NAME_MAX + 1];
    int64_t created_at_unix_ms;
    struct vmm_client *client;
    struct page_server_fork *page_fork; /* UFFD: our registration with the page server */
    struct store *store;         /* holds a use of source_snapshot until stopped (under lock) */
    struct vm_identity identity; /* the VMM process, once it answers */
    bool adopted;                /* started by an earlier forkd: not our child */

    pthread_mutex_t record_lock; /* serialises writes of the VM's record */
    bool starting;               /* under record_lock: Boot or Spawn still configuring it */
    bool record_gone;            /* under record_lock: removed for good (the VM was stopped) */

    pthread_mutex_t lock; /* guards the fields below */
    pthread_cond_t exited_cond;
    enum vm_state state;
    pid_t pid;
    int pidfd;
    int memfd;
    bool exited;
    bool stop_requested;
    char exit_reason[128];
    char active_branch_id[64];
};

struct vm_registry {
    char vmm_binary[PATH_MAX];
    char run_dir[PATH_MAX];
    unsigned start_timeout_ms;
    unsigned call_timeout_ms; /* before scaling */
    enum vm_memory boot_memory;
    unsigned timeout_scale;
    char kvm_unusable_reason[200]; /* empty: VMs may start */

    pthread_mutex_t lock; /* guards vms, count, next_id */
    /* Held by a restore from placing stand-in drives until its VMM is re-pointed off them
     * (vm_place_stand_ins): two restores never share one. */
    pthread_mutex_t stand_in_lock;
    struct vm **vms;
    size_t count, capacity;
    unsigned long next_id;

    int epoll_fd;
    int stop_fd;
    pthread_t reaper;
};

static void vm_remove_fork_drives(struct vm *vm);

/* ---- records ---------------------------------------------------------------------------- */

void vm_ref(struct vm *vm)
{
    atomic_fetch_add(&vm->refs, 1);
}

void vm_unref(struct vm *vm)
{
    if (!vm || atomic_fetch_sub(&vm->refs, 1) != 1)
        return;
    vmm_client_close(vm->client);
    page_server_fork_release(vm->page_fork);
    if (vm->memfd >= 0)
        close(vm->memfd);
    if (vm->pidfd >= 0)
        close(vm->pidfd);
    pthread_mutex_destroy(&vm->lock);
    pthread_mutex_destroy(&vm->record_lock);
    pthread_cond_destroy(&vm->exited_cond);
    free(vm);
}

static struct vm *vm_new(struct vm_registry *registry)
{
    struct vm *vm = calloc(1, sizeof(*vm));
    if (!vm)
        return NULL;
    atomic_init(&vm->refs, 1);
    vm->registry = registry;
    vm->pidfd = -1;
    vm->memfd = -1;
    vm->page_size = VM_SMALL_PAGE_SIZE;
    vm->state = VM_STATE_STARTING;
    vm->created_at_unix_ms = forkd_unix_ms();
    vm->starting = true;
    pthread_mutex_init(&vm->lock, NULL);
    pthread_mutex_init(&vm->record_lock, NULL);
    pthread_cond_init(&vm->exited_cond, NULL);
    return vm;
}

/* ---- the durable record ------------------------------------------------------------------ */

static void vm_fill_record(struct vm *vm, struct vm_record *r)
{
    memset(r, 0, sizeof(*r));
    snprintf(r->id, sizeof(r->id), "%s", vm->id);
    snprintf(r->name, sizeof(r->name), "%s", vm->name);
    r->vmm = vm->identity;
    r->starting = vm->starting;
    r->memory = vm->memory;
    r->vcpu_count = vm->vcpu_count;
    r->mem_size_mib = vm->mem_size_mib;
    r->page_size = vm->page_size;
    r->memory_bytes = vm->memory_bytes;
    snprintf(r->source_snapshot, sizeof(r->source_snapshot), "%s", vm->source_snapshot);
    r->created_at_unix_ms = vm->created_at_unix_ms;
    r->label_count = vm->label_count;
    memcpy(r->labels, vm->labels, vm->label_count * sizeof(vm->labels[0]));
    r->devices = vm->devices;
    if (vm->page_fork)
        r->region_count = page_server_fork_regions(vm->page_fork, r->regions, UFFD_MAX_REGIONS);
    pthread_mutex_lock(&vm->lock);
    struct stat st;
    if (vm->memfd >= 0 && fstat(vm->memfd, &st) == 0)
        r->memfd_inode = (unsigned long long)st.st_ino;
    snprintf(r->branch_id, sizeof(r->branch_id), "%s", vm->active_branch_id);
    if (vm->exited)
        snprintf(r->exit_reason, sizeof(r->exit_reason), "%s", vm->exit_reason);
    pthread_mutex_unlock(&vm->lock);
}

/* Writes the VM's record as it is now (nothing before the VMM is spawned: until then there is
 * no process a later forkd could find). Returns 0 or -errno. */
static int vm_save_record(struct vm *vm)
{
    if (vm->identity.pid == 0)
        return 0;
    pthread_mutex_lock(&vm->record_lock);
    int rc = 0;
    if (!vm->record_gone) {
        struct vm_record record;
        vm_fill_record(vm, &record);
        rc = vm_record_save(vm->registry->run_dir, &record);
    }
    pthread_mutex_unlock(&vm->record_lock);
    return rc;
}

/* The VM was stopped for good: no later forkd hears of it. */
static void vm_forget_record(struct vm *vm)
{
    pthread_mutex_lock(&vm->record_lock);
    vm->record_gone = true;
    vm_record_remove(vm->registry->run_dir, vm->id);
    pthread_mutex_unlock(&vm->record_lock);
}

/* Boot or restore finished: from now a later forkd adopts the VM rather than stopping it. */
static int vm_mark_started(struct vm *vm, struct forkd_error *err)
{
    pthread_mutex_lock(&vm->record_lock);
    vm->starting = false;
    pthread_mutex_unlock(&vm->record_lock);
    int rc = vm_save_record(vm);
    return rc < 0 ? forkd_error_errno(err, rc, "write the record of VM %s", vm->id) : 0;
}

/* Waits until the VMM's exec closed its copy of exec_done's write end (vm_exec_pipe), bounded
 * by the start timeout. */
static int vm_wait_exec_done(struct vm *vm, int exec_done, struct forkd_error *err)
{
    uint64_t deadline = forkd_deadline_after_ms(vm->registry->start_timeout_ms);
    struct pollfd closed = {.fd = exec_done, .events = POLLIN};
    int ready;
    while ((ready = poll(&closed, 1, forkd_ms_left(deadline))) < 0 && errno == EINTR)
        ;
    if (ready < 0)
        return forkd_error_errno(err, -errno, "wait for the exec of VMM pid %d", vm->pid);
    if (ready == 0)
        return forkd_error_set(err, -ETIMEDOUT,
                               "VMM pid %d had not finished its exec of %s after %u ms", vm->pid,
                               vm->registry->vmm_binary, vm->registry->start_timeout_ms);
    return 0;
}

/* The VMM's first record, written as soon as it is spawned: a forkd that dies before the VMM
 * answers (a slow start, a VMM that hangs) leaves a record with which the next one finds the
 * process and stops it, instead of an orphan nobody can prove is its own (vm_adopt_prove).
 * posix_spawn returns when the child's exec is past its point of no return, a moment before
 * the exec moves the child onto the VMM's memory: until then /proc/<pid>/exe names forkd, and
 * an identity read then never matches the VMM (the next forkd would leave it running). The
 * exec closes exec_done only after that move. A VMM that exited already needs no record: its
 * start fails in vm_wait_for_api, with its last words. */
/* The VMM's identity once /proc/<pid>/exe no longer names forkd's own executable. The pipe's
 * end should mean that already; on Debian 12's 6.1 kernel under emulation it did not (records
 * named forkd), so the identity itself is what is waited for, bounded by the start timeout. */
static int vm_launched_identity(struct vm *vm, struct vm_identity *identity,
                                struct forkd_error *err)
{
    char own[sizeof(identity->exe)];
    ssize_t length = readlink("/proc/self/exe", own, sizeof(own) - 1);
    if (length < 0)
        return forkd_error_errno(err, -errno, "readlink /proc/self/exe");
    own[length] = '\0';
    uint64_t deadline = forkd_deadline_after_ms(vm->registry->start_timeout_ms);
    for (;;) {
        int rc = vm_identity_of(vm->pid, identity);
        if (rc < 0 || strcmp(identity->exe, own) != 0)
            return rc;
        if (forkd_ms_left(deadline) == 0)
            return forkd_error_set(err, -ETIMEDOUT,
                                   "VMM pid %d still ran forkd's executable after %u ms", vm->pid,
                                   vm->registry->start_timeout_ms);
        struct timespec pause = {.tv_nsec = 1000000};
        nanosleep(&pause, NULL);
    }
}

static int vm_record_launch(struct vm *vm, int exec_done, struct forkd_error *err)
{
    int rc = vm_wait_exec_done(vm, exec_done, err);
    if (rc < 0)
        return rc;
    struct vm_identity identity;
    rc = vm_launched_identity(vm, &identity, err);
    if (rc == -ESRCH)
        return 0;
    if (rc == -ETIMEDOUT)
        return rc;
    if (rc == 0) {
        vm->identity = identity;
        rc = vm_save_record(vm);
    }
    return rc < 0 ? forkd_error_errno(err, rc, "write the record of VM %s", vm->id) : 0;
}

uint64_t vm_page_size(const struct vm *vm)
{
    return vm->page_size; /* set before the VM is listed, then fixed */
}

unsigned vm_slow_call_timeout_ms(const struct vm *vm)
{
    /* 10 s, plus 20 ms per MiB: writing or filling 4 GiB takes 12-25 s on a nested host. */
    return (VMM_CLIENT_DEFAULT_TIMEOUT_MS + (unsigned)((vm->memory_bytes >> 20) * 20)) *
           vm->registry->timeout_scale;
}

unsigned vm_time_scale(const struct vm *vm)
{
    return vm->registry->timeout_scale;
}

unsigned vm_call_timeout_ms(const struct vm *vm)
{
    return vm->registry->call_timeout_ms * vm->registry->timeout_scale;
}

const char *vm_id(const struct vm *vm)
{
    return vm->id;
}

struct vmm_client *vm_client(struct vm *vm)
{
    return vm->client;
}

enum vm_memory vm_memory_kind(const struct vm *vm)
{
    return vm->memory;
}

uint64_t vm_memory_bytes(const struct vm *vm)
{
    return vm->memory_bytes;
}

int vm_page_server_stats(struct vm *vm, struct page_server_stats *out)
{
    if (!vm->page_fork)
        return -ENOENT;
    page_server_fork_stats(vm->page_fork, out);
    return 0;
}

const char *vm_source_snapshot(const struct vm *vm)
{
    return vm->source_snapshot;
}

pid_t vm_pid(struct vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    pid_t pid = vm->exited ? 0 : vm->pid;
    pthread_mutex_unlock(&vm->lock);
    return pid;
}

bool vm_is_alive(struct vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    bool alive = !vm->exited && vm->pidfd >= 0;
    /* A pidfd turns readable the moment the process exits, before the reaper records it. */
    struct pollfd exited = {.fd = vm->pidfd, .events = POLLIN};
    if (alive && poll(&exited, 1, 0) > 0)
        alive = false;
    pthread_mutex_unlock(&vm->lock);
    return alive;
}

bool vm_exited_within(struct vm *vm, int timeout_ms)
{
    pthread_mutex_lock(&vm->lock);
    int pidfd = vm->exited || vm->pidfd < 0 ? -1 : fcntl(vm->pidfd, F_DUPFD_CLOEXEC, 0);
    bool exited = vm->exited;
    pthread_mutex_unlock(&vm->lock);
    if (exited || pidfd < 0)
        return true;
    struct pollfd watch = {.fd = pidfd, .events = POLLIN};
    exited = poll(&watch, 1, timeout_ms) > 0;
    close(pidfd);
    return exited;
}

int vm_memfd(struct vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    int fd = vm->memfd;
    pthread_mutex_unlock(&vm->lock);
    return fd;
}

int vm_dup_memfd(struct vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    int fd = vm->memfd >= 0 ? fcntl(vm->memfd, F_DUPFD_CLOEXEC, 0) : -EBADF;
    if (vm->memfd >= 0 && fd < 0)
        fd = -errno;
    pthread_mutex_unlock(&vm->lock);
    return fd;
}

/* The one writer of a live VM's state (the reaper records the end states itself). */
static void vm_set_state(struct vm *vm, enum vm_state state)
{
    pthread_mutex_lock(&vm->lock);
    if (!vm->exited)
        vm->state = state;
    pthread_mutex_unlock(&vm->lock);
}

const char *vm_memory_name(enum vm_memory memory, char *buffer, size_t size)
{
    switch (memory) {
    case VM_MEMORY_ANONYMOUS:
        return "ANONYMOUS";
    case VM_MEMORY_FILE:
        return "FILE";
    case VM_MEMORY_MEMFD:
        return "MEMFD";
    case VM_MEMORY_UFFD:
        return "UFFD";
    }
    snprintf(buffer, size, "backend %d", (int)memory);
    return buffer;
}

const char *vm_state_name(enum vm_state state)
{
    switch (state) {
    case VM_STATE_STARTING:
        return "STARTING";
    case VM_STATE_RUNNING:
        return "RUNNING";
    case VM_STATE_PAUSED:
        return "PAUSED";
    case VM_STATE_STOPPED:
        return "STOPPED";
    case VM_STATE_FAILED:
        return "FAILED";
    }
    return "UNKNOWN";
}

/* Pausing and resuming talk to a VMM that must be up: one still starting belongs to
 * vm_boot/vm_restore, one that ended has no VMM. Refused with -EBADFD naming the state. */
static int vm_check_up(struct vm *vm, const char *action, struct forkd_error *err)
{
    pthread_mutex_lock(&vm->lock);
    enum vm_state state = vm->state;
    pthread_mutex_unlock(&vm->lock);
    if (state == VM_STATE_RUNNING || state == VM_STATE_PAUSED)
        return 0;
    return forkd_error_set(err, -EBADFD, "cannot %s VM %s: it is %s (%s needs RUNNING or PAUSED)",
                           action, vm->id, vm_state_name(state), action);
}

int vm_pause(struct vm *vm, struct forkd_error *err)
{
    int rc = vm_check_up(vm, "pause", err);
    if (rc < 0)
        return rc;
    rc = vmm_pause(vm->client, err);
    if (rc == 0)
        vm_set_state(vm, VM_STATE_PAUSED);
    return rc;
}

int vm_resume(struct vm *vm, struct forkd_error *err)
{
    int rc = vm_check_up(vm, "resume", err);
    if (rc < 0)
        return rc;
    rc = vmm_resume(vm->client, err);
    if (rc == 0)
        vm_set_state(vm, VM_STATE_RUNNING);
    return rc;
}

enum vm_state vm_recorded_state(struct vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    enum vm_state state = vm->state;
    pthread_mutex_unlock(&vm->lock);
    return state;
}

int vm_query_state(struct vm *vm, enum vm_state *out, struct forkd_error *err)
{
    struct vmm_info info;
    /* A VMM that let a call time out may still be busy with it: it answers after it. */
    int rc = vmm_get_info_within(vm->client, vm_slow_call_timeout_ms(vm), &info, err);
    if (rc < 0)
        return rc;
    if (strcmp(info.state, "Paused") == 0)
        *out = VM_STATE_PAUSED;
    else if (strcmp(info.state, "Running") == 0)
        *out = VM_STATE_RUNNING;
    else
        return forkd_error_set(err, -EPROTO, "GET /: the VMM reports state \"%.32s\"", info.state);
    vm_set_state(vm, *out);
    return 0;
}

void vm_get_status(struct vm *vm, struct vm_status *out)
{
    memset(out, 0, sizeof(*out));
    snprintf(out->id, sizeof(out->id), "%s", vm->id);
    snprintf(out->name, sizeof(out->name), "%s", vm->name);
    out->memory = vm->memory;
    out->vcpu_count = vm->vcpu_count;
    out->mem_size_mib = vm->mem_size_mib;
    out->page_size = vm->page_size;
    out->label_count = vm->label_count;
    memcpy(out->labels, vm->labels, vm->label_count * sizeof(vm->labels[0]));
    out->devices = vm->devices;
    snprintf(out->api_socket_path, sizeof(out->api_socket_path), "%s", vm->api_socket_path);
    snprintf(out->vmm_binary, sizeof(out->vmm_binary), "%s", vm->registry->vmm_binary);
    snprintf(out->source_snapshot, sizeof(out->source_snapshot), "%s", vm->source_snapshot);
    out->created_at_unix_ms = vm->created_at_unix_ms;
    pthread_mutex_lock(&vm->lock);
    out->state = vm->state;
    out->vmm_pid = vm->exited ? 0 : vm->pid;
    snprintf(out->exit_reason, sizeof(out->exit_reason), "%s", vm->exit_reason);
    snprintf(out->active_branch_id, sizeof(out->active_branch_id), "%s", vm->active_branch_id);
    pthread_mutex_unlock(&vm->lock);
}

bool vm_try_begin_branch(struct vm *vm, const char *branch_id)
{
    pthread_mutex_lock(&vm->lock);
    bool free_to_branch = vm->active_branch_id[0] == '\0';
    if (free_to_branch)
        snprintf(vm->active_branch_id, sizeof(vm->active_branch_id), "%s", branch_id);
    pthread_mutex_unlock(&vm->lock);
    /* A later forkd reports a branch it finds recorded as failed by the restart. */
    if (free_to_branch)
        vm_save_record(vm);
    return free_to_branch;
}

void vm_end_branch(struct vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    vm->active_branch_id[0] = '\0';
    pthread_mutex_unlock(&vm->lock);
    vm_save_record(vm);
}

/* ---- the reaper ------------------------------------------------------------------------- */

static void vm_describe_exit(const siginfo_t *info, char *out, size_t out_len)
{
    if (info->si_code == CLD_EXITED)
        snprintf(out, out_len, "exited with status %d", info->si_status);
    else
        snprintf(out, out_len, "killed by signal %d (%s)", info->si_status,
                 strsignal(info->si_status));
}

/* Called by the reaper when a VMM's pidfd turns readable: the process has exited. */
static void vm_record_exit(struct vm *vm)
{
    siginfo_t info = {0};
    /* An adopted VMM is not our child: its exit status went to its parent (init). */
    bool status_known = waitid((idtype_t)P_PIDFD, (id_t)vm->pidfd, &info, WEXITED | WNOHANG) == 0;
    if (status_known ? info.si_pid == 0 : !(vm->adopted && errno == ECHILD))
        return;
    char memory_error[128] = "";
    bool memory_failed = vm->page_fork && page_server_fork_memory_failed(
                                              vm->page_fork, memory_error, sizeof(memory_error));
    pthread_mutex_lock(&vm->lock);
    if (memory_failed) /* the page server killed it: its memory could not be fetched */
        snprintf(vm->exit_reason, sizeof(vm->exit_reason), "killed: %s", memory_error);
    else if (status_known)
        vm_describe_exit(&info, vm->exit_reason, sizeof(vm->exit_reason));
    else
        snprintf(vm->exit_reason, sizeof(vm->exit_reason),
                 "exited (status unknown: started by an earlier forkd)");
    bool clean =
        vm->stop_requested || (status_known && info.si_code == CLD_EXITED && info.si_status == 0);
    vm->state = clean ? VM_STATE_STOPPED : VM_STATE_FAILED;
    vm->exited = true;
    /* The guest's memfd is released with the VM; a branch still copying holds its own map. */
    if (vm->memfd >= 0) {
        close(vm->memfd);
        vm->memfd = -1;
    }
    bool stopping = vm->stop_requested;
    pthread_cond_broadcast(&vm->exited_cond);
    pthread_mutex_unlock(&vm->lock);
    if (!stopping)
        vm_save_record(vm); /* a later forkd lists it as exited, for this reason */
}

static void *vm_reaper_loop(void *arg)
{
    struct vm_registry *registry = arg;
    for (;;) {
        struct epoll_event events[16];
        int n = epoll_wait(registry->epoll_fd, events, 16, -1);
        if (n < 0 && errno == EINTR)
            continue;
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == NULL)
                return NULL; /* the stop eventfd */
            struct vm *vm = events[i].data.ptr;
            epoll_ctl(registry->epoll_fd, EPOLL_CTL_DEL, vm->pidfd, NULL);
            vm_record_exit(vm);
            vm_unref(vm); /* the reference taken by vm_watch */
        }
    }
}

/* Hands the VM's pidfd to the reaper, which keeps a reference until the exit is recorded. */
static int vm_watch(struct vm *vm, struct forkd_error *err)
{
    vm_ref(vm);
    struct epoll_event event = {.events = EPOLLIN, .data.ptr = vm};
    if (epoll_ctl(vm->registry->epoll_fd, EPOLL_CTL_ADD, vm->pidfd, &event) < 0) {
        vm_unref(vm);
        return forkd_error_errno(err, -errno, "watch VMM pid %d", vm->pid);
    }
    return 0;
}

/* Waits until the reaper recorded the exit, up to timeout_ms. True when exited. */
static bool vm_wait_exit(struct vm *vm, unsigned timeout_ms)
{
    struct timespec deadline = forkd_realtime_after_ms(timeout_ms);
    pthread_mutex_lock(&vm->lock);
    while (!vm->exited)
        if (pthread_cond_timedwait(&vm->exited_cond, &vm->lock, &deadline) == ETIMEDOUT)
            break;
    bool exited = vm->exited;
    pthread_mutex_unlock(&vm->lock);
    return exited;
}

static void vm_signal(struct vm *vm, int signal_number)
{
    pthread_mutex_lock(&vm->lock);
    if (!vm->exited && vm->pidfd >= 0)
        syscall(SYS_pidfd_send_signal, vm->pidfd, signal_number, NULL, 0);
    pthread_mutex_unlock(&vm->lock);
}

/* SIGTERM, then SIGKILL after grace_ms; returns once the exit is recorded. */
static void vm_terminate(struct vm *vm, unsigned grace_ms)
{
    pthread_mutex_lock(&vm->lock);
    vm->stop_requested = true;
    pthread_mutex_unlock(&vm->lock);
    vm_signal(vm, SIGTERM);
    if (vm_wait_exit(vm, grace_ms)) {
        vm_forget_record(vm);
        return;
    }
    vm_signal(vm, SIGKILL);
    vm_wait_exit(vm, 60000);
    vm_forget_record(vm);
}

/* ---- the registry ----------------------------------------------------------------------- */

int vm_registry_open(const struct vm_registry_config *config, struct vm_registry **out,
                     struct forkd_error *err)
{
    int rc = fs_mkdir_parents(config->run_dir, 0700);
    if (rc < 0)
        return forkd_error_errno(err, rc, "create VM run directory %s", config->run_dir);
    struct vm_registry *registry = calloc(1, sizeof(*registry));
    if (!registry)
        return forkd_error_set(err, -ENOMEM, "VM registry: out of memory");
    snprintf(registry->vmm_binary, sizeof(registry->vmm_binary), "%s", config->vmm_binary);
    snprintf(registry->run_dir, sizeof(registry->run_dir), "%s", config->run_dir);
    registry->timeout_scale = config->timeout_scale ? config->timeout_scale : 1;
    registry->boot_memory = config->boot_memory ? config->boot_memory : VM_MEMORY_MEMFD;
    registry->call_timeout_ms =
        config->call_timeout_ms ? config->call_timeout_ms : VMM_CLIENT_DEFAULT_TIMEOUT_MS;
    registry->start_timeout_ms =
        (config->start_timeout_ms ? config->start_timeout_ms : 10000) * registry->timeout_scale;
    if (config->kvm_unusable_reason)
        snprintf(registry->kvm_unusable_reason, sizeof(registry->kvm_unusable_reason), "%s",
                 config->kvm_unusable_reason[0] ? config->kvm_unusable_reason : "unknown reason");
    pthread_mutex_init(&registry->lock, NULL);
    pthread_mutex_init(&registry->stand_in_lock, NULL);
    registry->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    registry->stop_fd = eventfd(0, EFD_CLOEXEC);
    struct epoll_event stop = {.events = EPOLLIN, .data.ptr = NULL};
    if (registry->epoll_fd < 0 || registry->stop_fd < 0 ||
        epoll_ctl(registry->epoll_fd, EPOLL_CTL_ADD, registry->stop_fd, &stop) < 0 ||
        pthread_create(&registry->reaper, NULL, vm_reaper_loop, registry) != 0) {
        rc = forkd_error_errno(err, -errno, "VM registry: reaper set-up");
        close(registry->epoll_fd);
        close(registry->stop_fd);
        free(registry);
        return rc;
    }
    *out = registry;
    return 0;
}

void vm_registry_close(struct vm_registry *registry, bool keep_vms, unsigned grace_ms)
{
    if (!registry)
        return;
    struct vm **vms;
    size_t count = vm_list(registry, &vms);
    /* Kept VMs keep their records: the next forkd adopts them. */
    for (size_t i = 0; i < count && !keep_vms; i++) {
        vm_terminate(vms[i], grace_ms);
        vm_remove_fork_drives(vms[i]);
    }
    vm_list_free(vms, count);
    uint64_t one = 1;
    if (write(registry->stop_fd, &one, sizeof(one)) != sizeof(one))
        abort(); /* an eventfd write of 1 cannot fail; the reaper would never stop */
    pthread_join(registry->reaper, NULL);
    for (size_t i = 0; i < registry->count; i++) {
        struct vm *vm = registry->vms[i];
        pthread_mutex_lock(&vm->lock);
        bool watched = !vm->exited; /* a kept VM: the stopped reaper still holds a reference */
        pthread_mutex_unlock(&vm->lock);
        if (watched)
            vm_unref(vm);
        vm_unref(vm);
    }
    free(registry->vms);
    close(registry->epoll_fd);
    close(registry->stop_fd);
    pthread_mutex_destroy(&registry->lock);
    pthread_mutex_destroy(&registry->stand_in_lock);
    free(registry);
}

static struct vm *vm_lookup_locked(struct vm_registry *registry, const char *id_or_name)
{
    for (size_t i = 0; i < registry->count; i++) {
        struct vm *vm = registry->vms[i];
        if (strcmp(vm->id, id_or_name) == 0 || strcmp(vm->name, id_or_name) == 0)
            return vm;
    }
    return NULL;
}

struct vm *vm_lookup(struct vm_registry *registry, const char *id_or_name)
{
    pthread_mutex_lock(&registry->lock);
    struct vm *vm = vm_lookup_locked(registry, id_or_name);
    if (vm)
        vm_ref(vm);
    pthread_mutex_unlock(&registry->lock);
    return vm;
}

size_t vm_list(struct vm_registry *registry, struct vm ***out)
{
    pthread_mutex_lock(&registry->lock);
    size_t count = registry->count;
    struct vm **vms = calloc(count ? count : 1, sizeof(*vms));
    for (size_t i = 0; vms && i < count; i++) {
        vms[i] = registry->vms[i];
        vm_ref(vms[i]);
    }
    pthread_mutex_unlock(&registry->lock);
    *out = vms;
    return vms ? count : 0;
}

void vm_list_free(struct vm **vms, size_t count)
{
    for (size_t i = 0; i < count; i++)
        vm_unref(vms[i]);
    free(vms);
}

/* Lists a new VM under a fresh id, refusing a name already in use. The list's reference is
 * the VM's initial one; the caller gets another. */
static int vm_registry_grow_locked(struct vm_registry *registry, struct forkd_error *err)
{
    if (registry->count < registry->capacity)
        return 0;
    size_t capacity = registry->capacity ? registry->capacity * 2 : 16;
    struct vm **grown = realloc(registry->vms, capacity * sizeof(*grown));
    if (!grown)
        return forkd_error_set(err, -ENOMEM, "VM registry: out of memory");
    registry->vms = grown;
    registry->capacity = capacity;
    return 0;
}

static int vm_enlist(struct vm_registry *registry, struct vm *vm, const char *name,
                     struct forkd_error *err)
{
    pthread_mutex_lock(&registry->lock);
    int rc = 0;
    if (name && *name && vm_lookup_locked(registry, name))
        rc = forkd_error_set(err, -EEXIST, "a VM named '%s' already exists", name);
    else
        rc = vm_registry_grow_locked(registry, err);
    if (rc == 0) {
        snprintf(vm->id, sizeof(vm->id), "vm-%lu", ++registry->next_id);
        snprintf(vm->name, sizeof(vm->name), "%s", name && *name ? name : vm->id);
        registry->vms[registry->count++] = vm;
        vm_ref(vm);
    }
    pthread_mutex_unlock(&registry->lock);
    return rc;
}

/* Removes the VM from the list and drops the list's reference. */
static void vm_delist(struct vm_registry *registry, struct vm *vm)
{
    bool found = false;
    pthread_mutex_lock(&registry->lock);
    for (size_t i = 0; i < registry->count; i++) {
        if (registry->vms[i] != vm)
            continue;
        registry->vms[i] = registry->vms[--registry->count];
        found = true;
        break;
    }
    pthread_mutex_unlock(&registry->lock);
    if (found)
        vm_unref(vm);
}

/* ---- launching a VMM -------------------------------------------------------------------- */

/* The last line of the VMM's log, for errors when it dies during start-up. */
static void vm_log_tail(const struct vm *vm, char *out, size_t out_len)
{
    out[0] = '\0';
    _cleanup_close_ int fd = open(vm->log_path, O_RDONLY | O_CLOEXEC);
    char buffer[512];
    off_t size = fd >= 0 ? lseek(fd, 0, SEEK_END) : -1;
    if (size <= 0)
        return;
    off_t start = size > (off_t)sizeof(buffer) - 1 ? size - (off_t)sizeof(buffer) + 1 : 0;
    ssize_t n = pread(fd, buffer, sizeof(buffer) - 1, start);
    if (n <= 0)
        return;
    buffer[n] = '\0';
    while (n > 0 && (buffer[n - 1] == '\n' || buffer[n - 1] == '\r'))
        buffer[--n] = '\0';
    char *line = strrchr(buffer, '\n');
    if (snprintf(out, out_len, "%s", line ? line + 1 : buffer) >= (int)out_len)
        strcpy(out + out_len - 4, "..."); /* keep the start: it names the failure */
}

static int vm_spawn_setup(posix_spawn_file_actions_t *actions, posix_spawnattr_t *attributes,
                          const char *log_path)
{
    posix_spawn_file_actions_init(actions);
    posix_spawn_file_actions_addopen(actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(actions, 1, log_path, O_WRONLY | O_CREAT | O_APPEND, 0600);
    posix_spawn_file_actions_adddup2(actions, 1, 2);
    posix_spawnattr_init(attributes);
    /* forkd blocks SIGTERM/SIGINT and ignores SIGPIPE; the VMM must get the defaults back. Its
     * own session keeps a terminal's Ctrl-C from reaching it behind forkd's back. */
    sigset_t none, defaults;
    sigemptyset(&none);
    sigemptyset(&defaults);
    sigaddset(&defaults, SIGTERM);
    sigaddset(&defaults, SIGINT);
    sigaddset(&defaults, SIGPIPE);
    posix_spawnattr_setsigmask(attributes, &none);
    posix_spawnattr_setsigdefault(attributes, &defaults);
    return posix_spawnattr_setflags(attributes, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF |
                                                    POSIX_SPAWN_SETSID);
}

/* A close-on-exec pipe for vm_record_launch: once posix_spawn returned, forkd closes its
 * write end and the VMM's copy is closed by its exec (a VMM spawned meanwhile by another
 * thread holds one until its own exec). The write end is kept off the standard streams, which
 * the spawn's file actions replace before the exec. */
static int vm_exec_pipe(int fds[2], struct forkd_error *err)
{
    if (pipe2(fds, O_CLOEXEC) < 0)
        return forkd_error_errno(err, -errno, "pipe for the VMM's exec");
    if (fds[1] > STDERR_FILENO)
        return 0;
    int above = fcntl(fds[1], F_DUPFD_CLOEXEC, STDERR_FILENO + 1);
    int saved = errno;
    close(fds[1]);
    if (above < 0) {
        close(fds[0]);
        return forkd_error_errno(err, -saved, "pipe for the VMM's exec");
    }
    fds[1] = above;
    return 0;
}

static int vm_posix_spawn(const struct vm *vm, const char *const *argv, pid_t *pid,
                          struct forkd_error *err)
{
    const char *binary = vm->registry->vmm_binary;
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attributes;
    vm_spawn_setup(&actions, &attributes, vm->log_path);
    int rc = strchr(binary, '/')
                 ? posix_spawn(pid, binary, &actions, &attributes, (char *const *)argv, environ)
                 : posix_spawnp(pid, binary, &actions, &attributes, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attributes);
    return rc != 0 ? forkd_error_errno(err, -rc, "start VMM %s", binary) : 0;
}

static int vm_spawn_vmm(struct vm *vm, const char *const *extra_args, struct forkd_error *err)
{
    struct vm_registry *registry = vm->registry;
    /* A Unix socket address holds 107 bytes: a longer path would be cut silently by bind(). */
    int length = snprintf(vm->api_socket_path, sizeof(vm->api_socket_path), "%s/%s.sock",
                          registry->run_dir, vm->id);
    if (length >= (int)sizeof(((struct sockaddr_un *)0)->sun_path))
        return forkd_error_set(err, -ENAMETOOLONG,
                               "VMM API socket path %s is too long for a Unix socket (max 107)",
                               vm->api_socket_path);
    if (snprintf(vm->log_path, sizeof(vm->log_path), "%s/%s.log", registry->run_dir, vm->id) >=
        (int)sizeof(vm->log_path))
        return forkd_error_set(err, -ENAMETOOLONG, "VMM log path too long");
    unlink(vm->api_socket_path);
    const char *argv[32] = {registry->vmm_binary, "--api-sock", vm->api_socket_path, "--id",
                            vm->id};
    size_t argc = 5;
    for (size_t i = 0; extra_args && extra_args[i] && argc < 31; i++)
        argv[argc++] = extra_args[i];
    int exec_done[2];
    int rc = vm_exec_pipe(exec_done, err);
    if (rc < 0)
        return rc;
    _cleanup_close_ int exec_done_read = exec_done[0];
    pid_t pid;
    rc = vm_posix_spawn(vm, argv, &pid, err);
    close(exec_done[1]); /* the VMM's copy is the one left */
    if (rc < 0)
        return rc;
    vm->pid = pid;
    vm->pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (vm->pidfd < 0) {
        int saved = errno;
        forkd_kill_reapp(&pid);
        return forkd_error_errno(err, -saved, "pidfd_open(%d)", vm->pid);
    }
    rc = vm_record_launch(vm, exec_done_read, err);
    if (rc < 0) {
        forkd_kill_reapp(&pid);
        return rc;
    }
    return vm_watch(vm, err);
}

/* Waits for the VMM's API socket to accept connections, or for the VMM to die. */
static int vm_wait_for_api(struct vm *vm, struct forkd_error *err)
{
    uint64_t deadline = forkd_deadline_after_ms(vm->registry->start_timeout_ms);
    while (!fs_unix_socket_answers(vm->api_socket_path)) {
        if (vm_wait_exit(vm, 2)) {
            char tail[256];
            vm_log_tail(vm, tail, sizeof(tail));
            return forkd_error_set(err, -ECHILD, "VMM %s %s before its API socket was ready: %s",
                                   vm->registry->vmm_binary, vm->exit_reason,
                                   tail[0] ? tail : "(no output)");
        }
        if (forkd_monotonic_ns() > deadline)
            return forkd_error_set(err, -ETIMEDOUT, "VMM API socket %s not ready after %u ms",
                                   vm->api_socket_path, vm->registry->start_timeout_ms);
    }
    int rc = vmm_client_open(vm->api_socket_path, &vm->client, err);
    if (rc == 0)
        vmm_client_set_timeout_ms(vm->client, vm_call_timeout_ms(vm));
    /* After exec (the socket answers): the identity a later forkd checks before it adopts or
     * stops this VMM. A VM without a durable record would be lost to a restart: refused. */
    if (rc == 0 && (rc = vm_identity_of(vm->pid, &vm->identity)) < 0)
        return forkd_error_errno(err, rc, "identity of VMM pid %d", vm->pid);
    if (rc == 0 && (rc = vm_save_record(vm)) < 0)
        return forkd_error_errno(err, rc, "write the record of VM %s", vm->id);
    return rc;
}

int vm_registry_check_host(const struct vm_registry *registry, struct forkd_error *err)
{
    if (!registry->kvm_unusable_reason[0])
        return 0;
    return forkd_error_set(err, -ENODEV, "KVM is not usable on this host: %s",
                           registry->kvm_unusable_reason);
}

/* Undoes a failed start: the VMM killed and reaped, the VM unlisted. The error is kept, with
 * the VMM's last words when it died on its own. */
static void vm_abandon_start(struct vm *vm, int rc, struct forkd_error *err)
{
    if (vm->pidfd >= 0 && !vm_wait_exit(vm, 0)) {
        vm_terminate(vm, 0);
    } else if (vm->pidfd >= 0 && rc != -ECHILD) {
        char tail[256];
        vm_log_tail(vm, tail, sizeof(tail));
        if (tail[0])
            forkd_error_prefix(err, "VMM %s (\"%s\"): ", vm->exit_reason, tail);
    }
    vm_forget_record(vm); /* the VMM died by itself: its launch record goes too */
    vm_delist(vm->registry, vm);
    vm_unref(vm);
}

/* What a VM is launched with, besides its VMM's configuration. */
struct vm_launch_params {
    const char *name;
    const char *const *extra_args;
    const struct vm_label *labels;
    size_t label_count;
};

static int vm_launch(struct vm_registry *registry, const struct vm_launch_params *params,
                     struct vm **out, struct forkd_error *err)
{
    if (params->label_count > VM_MAX_LABELS)
        return forkd_error_set(err, -EINVAL, "at most %d labels per VM", VM_MAX_LABELS);
    struct vm *vm = vm_new(registry);
    if (!vm)
        return forkd_error_set(err, -ENOMEM, "VM: out of memory");
    vm->label_count = params->label_count;
    if (params->label_count)
        memcpy(vm->labels, params->labels, params->label_count * sizeof(*params->labels));
    const char *name = params->name;
    const char *const *extra_args = params->extra_args;
    int rc = vm_enlist(registry, vm, name, err);
    if (rc < 0) {
        vm_unref(vm);
        return rc;
    }
    rc = vm_spawn_vmm(vm, extra_args, err);
    if (rc == 0)
        rc = vm_wait_for_api(vm, err);
    if (rc < 0) {
        vm_abandon_start(vm, rc, err);
        return rc;
    }
    *out = vm;
    return 0;
}

/* ---- boot, restore, stop ---------------------------------------------------------------- */

/* A boot's or restore's page size: 0 means 4 KiB; anything but 4 KiB and 2 MiB is -EINVAL. */
static int vm_page_size_of(uint64_t requested, const char *what, uint64_t *out,
                           struct forkd_error *err)
{
    *out = requested ? requested : VM_SMALL_PAGE_SIZE;
    if (*out != VM_SMALL_PAGE_SIZE && *out != VM_HUGE_PAGE_SIZE)
        return forkd_error_set(err, -EINVAL, "%s: page size %llu is not 4 KiB or 2 MiB", what,
                               (unsigned long long)*out);
    return 0;
}

/* The guest memfd of a MEMFD VM, empty (no page populated), of 2 MiB hugetlbfs pages when the
 * VM has huge pages. Those are reserved here, by mapping the whole file once: a host short of
 * free huge pages fails now, by name, rather than the VMM at start or a vCPU later (SIGBUS). */
static int vm_create_memfd(struct vm *vm, uint64_t bytes, struct forkd_error *err)
{
    char name[64];
    snprintf(name, sizeof(name), "forkd-guest-%s", vm->id);
    bool huge = vm->page_size == VM_HUGE_PAGE_SIZE;
    _cleanup_close_ int memfd =
        memfd_create(name, MFD_CLOEXEC | (huge ? MFD_HUGETLB | MFD_HUGE_2MB : 0));
    if (memfd < 0 || ftruncate(memfd, (off_t)bytes) < 0)
        return forkd_error_errno(err, -errno, "%smemfd for %s (%llu bytes)",
                                 huge ? "2 MiB hugetlbfs " : "", vm->id, (unsigned long long)bytes);
    if (huge) {
        void *map = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
        if (map == MAP_FAILED)
            return forkd_error_errno(err, -errno,
                                     "reserve %llu free 2 MiB huge pages for %s (see "
                                     "/proc/sys/vm/nr_hugepages and "
                                     "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages)",
                                     (unsigned long long)(bytes / VM_HUGE_PAGE_SIZE), vm->id);
        munmap(map, bytes); /* the reservation stays with the file */
    }
    return take_fd(memfd);
}

/* A MEMFD boot: the guest memfd handed to the VMM as /proc/<pid>/fd/<n> in backend_path. */
static int vm_create_boot_memfd(struct vm *vm, char *backend_path, size_t backend_path_size,
                                struct forkd_error *err)
{
    int memfd = vm_create_memfd(vm, vm->memory_bytes, err);
    if (memfd < 0)
        return memfd;
    snprintf(backend_path, backend_path_size, "/proc/%d/fd/%d", (int)getpid(), memfd);
    pthread_mutex_lock(&vm->lock);
    vm->memfd = memfd;
    pthread_mutex_unlock(&vm->lock);
    return 0;
}

/* Firecracker's device endpoints, before InstanceStart. */
static int vm_configure_devices(struct vm *vm, struct forkd_error *err)
{
    const struct vm_devices *d = &vm->devices;
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < d->drive_count; i++)
        rc = vmm_put_drive(vm->client, d->drives[i].id, d->drives[i].path, d->drives[i].root,
                           d->drives[i].read_only, err);
    for (size_t i = 0; rc == 0 && i < d->net_count; i++)
        rc = vmm_put_network_interface(vm->client, d->nets[i].id, d->nets[i].host_dev_name,
                                       d->nets[i].guest_mac, err);
    if (rc == 0 && d->vsock.present)
        rc = vmm_put_vsock(vm->client, d->vsock.guest_cid, d->vsock.uds_path, err);
    return rc;
}

static int vm_configure_boot(struct vm *vm, const struct vm_boot_config *config,
                             struct forkd_error *err)
{
    char backend_path[PATH_MAX] = "";
    int rc = 0;
    if (vm->memory == VM_MEMORY_MEMFD)
        rc = vm_create_boot_memfd(vm, backend_path, sizeof(backend_path), err);
    if (rc == 0)
        rc = vmm_put_machine_config_backed(vm->client, config->vcpu_count, config->mem_size_mib,
                                           backend_path[0] ? backend_path : NULL,
                                           vm->page_size == VM_HUGE_PAGE_SIZE, err);
    if (rc == 0)
        rc = vmm_put_boot_source_initrd(vm->client, config->kernel_image_path, config->boot_args,
                                        vm->devices.initrd_path, err);
    if (rc == 0)
        rc = vm_configure_devices(vm, err);
    if (rc == 0) {
        /* A VMM may touch all guest memory while starting (the test VMM fills it). */
        rc = vmm_start_within(vm->client, vm_slow_call_timeout_ms(vm), err);
    }
    return rc;
}

int vm_boot(struct vm_registry *registry, const struct vm_boot_config *config, struct vm **out,
            struct forkd_error *err)
{
    int rc = vm_registry_check_host(registry, err);
    if (rc < 0)
        return rc;
    if (access(config->kernel_image_path, R_OK) < 0)
        return forkd_error_errno(err, -errno, "kernel image %s", config->kernel_image_path);
    _cleanup_free_ struct vm_devices *devices = calloc(1, sizeof(*devices));
    if (!devices)
        return forkd_error_set(err, -ENOMEM, "boot: out of memory");
    if (config->devices)
        *devices = *config->devices;
    rc = devices_validate(devices, err);
    if (rc == 0)
        rc = devices_check_files(devices, err);
    if (rc < 0)
        return rc;
    enum vm_memory memory = config->memory ? config->memory : registry->boot_memory;
    if (memory != VM_MEMORY_MEMFD && memory != VM_MEMORY_ANONYMOUS)
        return forkd_error_set(err, -EINVAL, "boot: memory %s is not MEMFD or ANONYMOUS",
                               vm_memory_name(memory, (char[32]){0}, 32));
    uint64_t page_size;
    rc = vm_page_size_of(config->page_size, "boot", &page_size, err);
    if (rc < 0)
        return rc;
    if ((config->mem_size_mib << 20) % page_size)
        return forkd_error_set(err, -EINVAL,
                               "boot: mem_size_mib %llu is not a whole number of 2 MiB pages",
                               (unsigned long long)config->mem_size_mib);
    struct vm *vm;
    struct vm_launch_params params = {config->name, config->extra_vmm_args, config->labels,
                                      config->label_count};
    rc = vm_launch(registry, &params, &vm, err);
    if (rc < 0)
        return rc;
    vm->memory = memory;
    vm->page_size = page_size;
    vm->devices = *devices;
    vm->vcpu_count = config->vcpu_count;
    vm->mem_size_mib = config->mem_size_mib;
    vm->memory_bytes = config->mem_size_mib << 20;
    rc = vm_configure_boot(vm, config, err);
    if (rc == 0)
        rc = vm_mark_started(vm, err);
    if (rc < 0) {
        vm_abandon_start(vm, rc, err);
        return rc;
    }
    vm_set_state(vm, VM_STATE_RUNNING);
    *out = vm;
    return 0;
}

/* Copies memory.bin into a hugetlbfs memfd, which takes no write() or sendfile(): through a
 * mapping of it. */
static int vm_read_into_mapping(int memfd, int source, uint64_t bytes, const char *memory_path,
                                struct forkd_error *err)
{
    uint8_t *map = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (map == MAP_FAILED)
        return forkd_error_errno(err, -errno, "map the guest memfd (%llu bytes)",
                                 (unsigned long long)bytes);
    int rc = 0;
    for (uint64_t done = 0; done < bytes && rc == 0;) {
        ssize_t n = pread(source, map + done, bytes - done, (off_t)done);
        if (n <= 0)
            rc = forkd_error_set(err, n < 0 ? -errno : -EIO, "read %s at %llu: %s", memory_path,
                                 (unsigned long long)done,
                                 n < 0 ? strerror(errno) : "unexpected end of file");
        else
            done += (uint64_t)n;
    }
    munmap(map, bytes);
    return rc;
}

static int vm_send_into_memfd(int memfd, int source, uint64_t bytes, const char *memory_path,
                              struct forkd_error *err)
{
    off_t offset = 0;
    while ((uint64_t)offset < bytes) {
        /* sendfile copies page cache to the memfd in the kernel, in large steps. */
        ssize_t n = sendfile(memfd, source, &offset, (size_t)(bytes - (uint64_t)offset));
        if (n <= 0)
            return forkd_error_set(err, n < 0 ? -errno : -EIO, "fill memfd from %s at %lld: %s",
                                   memory_path, (long long)offset,
                                   n < 0 ? strerror(errno) : "unexpected end of file");
    }
    return 0;
}

/* Creates the guest memfd of a MEMFD restore and fills it from memory.bin. */
static int vm_fill_memfd(struct vm *vm, const char *memory_path, struct forkd_error *err)
{
    _cleanup_close_ int source = open(memory_path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (source < 0 || fstat(source, &st) < 0)
        return forkd_error_errno(err, -errno, "open %s", memory_path);
    uint64_t bytes = (uint64_t)st.st_size;
    if (bytes % vm->page_size)
        return forkd_error_set(err, -EIO,
                               "%s holds %llu bytes, not a whole number of %llu-byte "
                               "pages",
                               memory_path, (unsigned long long)bytes,
                               (unsigned long long)vm->page_size);
    _cleanup_close_ int memfd = vm_create_memfd(vm, bytes, err);
    if (memfd < 0)
        return memfd;
    int rc = vm->page_size == VM_HUGE_PAGE_SIZE
                 ? vm_read_into_mapping(memfd, source, bytes, memory_path, err)
                 : vm_send_into_memfd(memfd, source, bytes, memory_path, err);
    if (rc < 0)
        return rc;
    vm->memory_bytes = bytes;
    pthread_mutex_lock(&vm->lock);
    vm->memfd = take_fd(memfd);
    pthread_mutex_unlock(&vm->lock);
    return 0;
}

/* ---- a fork's own disks ----------------------------------------------------------------- */

/* <run_dir>/<id>.drive-<drive id>: the fork's clone of a captured writable drive. */
static int vm_fork_drive_path(const struct vm *vm, const char *drive_id, char *out, size_t size)
{
    int n = snprintf(out, size, "%s/%s.drive-%s", vm->registry->run_dir, vm->id, drive_id);
    return n < 0 || (size_t)n >= size ? -ENAMETOOLONG : 0;
}

/* Removes the disks forkd made for this fork (only files at the fork's own paths). */
static void vm_remove_fork_drives(struct vm *vm)
{
    for (size_t i = 0; i < vm->devices.drive_count; i++) {
        char own[PATH_MAX];
        const struct devices_drive *drive = &vm->devices.drives[i];
        if (!drive->read_only && vm_fork_drive_path(vm, drive->id, own, sizeof(own)) == 0 &&
            strcmp(own, drive->path) == 0)
            unlink(own);
    }
}

/* Clones each captured writable drive of the snapshot for this fork; vm->devices then names
 * the clones. */
static int vm_clone_fork_drives(struct vm *vm, const struct vm_restore_config *config,
                                struct forkd_error *err)
{
    for (size_t i = 0; i < vm->devices.drive_count; i++) {
        struct devices_drive *drive = &vm->devices.drives[i];
        if (drive->read_only)
            continue;
        char source[PATH_MAX], target[DEVICES_PATH_MAX];
        uint64_t copied = 0;
        if (!config->snapshot_dir ||
            store_drive_path(config->snapshot_dir, drive->id, source, sizeof(source)) < 0 ||
            vm_fork_drive_path(vm, drive->id, target, sizeof(target)) < 0)
            return forkd_error_set(err, -ENAMETOOLONG, "drive '%s': no path for its clone",
                                   drive->id);
        int rc = disk_clone_file(source, target, true, &copied, err);
        if (rc < 0)
            return forkd_error_prefix(err, "fork %s, drive '%s': ", vm->id, drive->id);
        snprintf(drive->path, sizeof(drive->path), "%s", target);
        devices_file_identity_of(target, &drive->identity);
    }
    return 0;
}

static void vm_remove_stand_ins(struct vm *vm, char (*placed)[DEVICES_PATH_MAX], int count)
{
    for (int i = 0; i < count; i++)
        unlink(placed[i]);
    if (count > 0)
        pthread_mutex_unlock(&vm->registry->stand_in_lock);
}

/* True if path is a fork's own clone of drive_id in this run directory,
 * <run_dir>/vm-<n>.drive-<drive_id> (vm_fork_drive_path). */
static bool vm_is_fork_drive_path(const struct vm_registry *registry, const char *path,
                                  const char *drive_id)
{
    size_t dir = strlen(registry->run_dir);
    if (strncmp(path, registry->run_dir, dir) != 0 || path[dir] != '/')
        return false;
    const char *name = path + dir + 1;
    unsigned long id;
    int used = 0;
    if (sscanf(name, "vm-%lu%n", &id, &used) != 1 || used <= 3)
        return false;
    char suffix[DEVICES_ID_MAX + 8];
    snprintf(suffix, sizeof(suffix), ".drive-%s", drive_id);
    return strcmp(name + used, suffix) == 0;
}

/* The VMM reopens each writable drive at the path the snapshot's state names (the source VM's
 * when the branch ran) before forkd re-points it (PATCH /drives after the paused load). A
 * source that was itself a fork had its own clone there, removed when it stopped: for the
 * load a stand-in is put at that path, a reflink clone of the snapshot's capture (the disk
 * the fork is given anyway), and removed once the fork is re-pointed (vm_remove_stand_ins).
 * The registry's stand_in_lock is held meanwhile (taken with the first stand-in). A missing
 * path outside forkd's run directory is the user's file: -ESTALE naming it, forkd creates
 * nothing there. Returns how many stand-ins were placed, their paths in placed. */
static int vm_place_stand_ins(struct vm *vm, const struct vm_restore_config *config,
                              char (*placed)[DEVICES_PATH_MAX], struct forkd_error *err)
{
    int count = 0, rc = 0;
    for (size_t i = 0; rc == 0 && config->devices && i < config->devices->drive_count; i++) {
        const struct devices_drive *drive = &config->devices->drives[i];
        char capture[PATH_MAX];
        uint64_t copied = 0;
        if (drive->read_only || access(drive->path, F_OK) == 0)
            continue;
        if (!vm_is_fork_drive_path(vm->registry, drive->path, drive->id)) {
            rc = forkd_error_set(err, -ESTALE,
                                 "drive '%s': the snapshot's state names %s, which no longer "
                                 "exists; the VMM opens it before forkd can point the fork at "
                                 "its own disk",
                                 drive->id, drive->path);
            break;
        }
        if (count == 0)
            pthread_mutex_lock(&vm->registry->stand_in_lock);
        rc = store_drive_path(config->snapshot_dir, drive->id, capture, sizeof(capture));
        if (rc == 0 && (rc = disk_clone_file(capture, drive->path, true, &copied, err)) == 0)
            snprintf(placed[count++], DEVICES_PATH_MAX, "%s", drive->path);
        else if (rc == -ENAMETOOLONG)
            forkd_error_set(err, rc, "drive '%s': no path for its capture", drive->id);
    }
    if (rc < 0) {
        vm_remove_stand_ins(vm, placed, count);
        return forkd_error_prefix(err, "fork %s: ", vm->id);
    }
    return count;
}

/* After a paused load, before the guest runs: the VMM opened the drives at the paths the
 * snapshot's state names (the source VM's); each writable one is re-pointed at the fork's
 * clone, so the fork never writes the source's disk or the snapshot's capture. */
static int vm_repoint_fork_drives(struct vm *vm, struct forkd_error *err)
{
    for (size_t i = 0; i < vm->devices.drive_count; i++) {
        const struct devices_drive *drive = &vm->devices.drives[i];
        if (drive->read_only)
            continue;
        int rc = vmm_patch_drive(vm->client, drive->id, drive->path, err);
        if (rc < 0)
            return rc;
    }
    return 0;
}

_Static_assert(VMM_LOAD_MAX_NETS >= DEVICES_MAX_NETS, "every interface can be overridden");

/* What the load changes in the snapshot's devices: the fork's taps and socket, as expanded
 * into vm->devices. */
static void vm_load_overrides(const struct vm *vm, const struct vm_restore_config *config,
                              struct vmm_load_overrides *out)
{
    *out = (struct vmm_load_overrides){0};
    const struct devices_overrides *o = config->overrides;
    for (size_t k = 0; o && k < o->net_count && k < VMM_LOAD_MAX_NETS; k++)
        for (size_t i = 0; i < vm->devices.net_count; i++)
            if (strcmp(vm->devices.nets[i].id, o->nets[k].iface_id) == 0) {
                out->nets[out->net_count].iface_id = vm->devices.nets[i].id;
                out->nets[out->net_count++].host_dev_name = vm->devices.nets[i].host_dev_name;
            }
    if (o && o->vsock_uds_path[0])
        out->vsock_uds_path = vm->devices.vsock.uds_path;
}

/* UFFD: the page server listens on <run_dir>/<id>.uffd for the VMM's handshake. The load is
 * paused so that the prefetch lands before the guest runs. */
static int vm_load_uffd(struct vm *vm, const struct vm_restore_config *config,
                        struct forkd_error *err)
{
    char socket_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    if (snprintf(socket_path, sizeof(socket_path), "%s/%s.uffd", vm->registry->run_dir, vm->id) >=
        (int)sizeof(socket_path))
        return forkd_error_set(err, -ENAMETOOLONG, "uffd socket path under %s too long",
                               vm->registry->run_dir);
    struct page_server_fork_config fork = {.template_name = config->snapshot_name,
                                           .memory_path = config->memory_path,
                                           .socket_path = socket_path,
                                           .vmm_pid = vm->pid,
                                           .vmm_pidfd = &vm->pidfd,
                                           .label = vm->id};
    struct vmm_load_overrides overrides;
    vm_load_overrides(vm, config, &overrides);
    int rc = page_server_fork_prepare(config->page_server, &fork, &vm->page_fork, err);
    if (rc == 0)
        rc = vmm_snapshot_load(vm->client, config->vmstate_path, VMM_MEMORY_UFFD, socket_path,
                               false, false, &overrides, err);
    if (rc == 0)
        rc = page_server_fork_wait_ready(vm->page_fork, -1, err);
    if (rc == 0)
        rc = vm_repoint_fork_drives(vm, err);
    if (rc < 0)
        return rc;
    vm->memory_bytes = page_server_fork_memory_bytes(vm->page_fork);
    return config->start_paused ? 0 : vmm_resume(vm->client, err);
}

static int vm_load_snapshot(struct vm *vm, const struct vm_restore_config *config,
                            struct forkd_error *err)
{
    if (config->memory == VM_MEMORY_UFFD)
        return vm_load_uffd(vm, config, err);
    char backend_path[PATH_MAX];
    bool shared = config->memory == VM_MEMORY_MEMFD;
    if (shared) {
        int rc = vm_fill_memfd(vm, config->memory_path, err);
        if (rc < 0)
            return rc;
        snprintf(backend_path, sizeof(backend_path), "/proc/%d/fd/%d", (int)getpid(), vm->memfd);
    } else {
        struct stat st;
        if (stat(config->memory_path, &st) < 0)
            return forkd_error_errno(err, -errno, "%s", config->memory_path);
        vm->memory_bytes = (uint64_t)st.st_size;
        snprintf(backend_path, sizeof(backend_path), "%s", config->memory_path);
    }
    /* With writable drives the load is paused: they are re-pointed before the guest runs. */
    bool repoint = devices_have_writable_drive(&vm->devices);
    struct vmm_load_overrides overrides;
    vm_load_overrides(vm, config, &overrides);
    int rc = vmm_snapshot_load(vm->client, config->vmstate_path, VMM_MEMORY_FILE, backend_path,
                               shared, !config->start_paused && !repoint, &overrides, err);
    if (rc == 0 && repoint)
        rc = vm_repoint_fork_drives(vm, err);
    if (rc == 0 && repoint && !config->start_paused)
        rc = vmm_resume(vm->client, err);
    return rc;
}

static int vm_restore_held(struct vm_registry *registry, const struct vm_restore_config *config,
                           struct vm **out, struct forkd_error *err)
{
    int rc = vm_registry_check_host(registry, err);
    if (rc < 0)
        return rc;
    if (config->memory == VM_MEMORY_UFFD && !config->page_server)
        return forkd_error_set(err, -EINVAL, "restore: UFFD memory needs a page server");
    if (config->memory != VM_MEMORY_FILE && config->memory != VM_MEMORY_MEMFD &&
        config->memory != VM_MEMORY_UFFD)
        return forkd_error_set(err, -EINVAL, "restore: memory %s is not FILE, MEMFD or UFFD",
                               vm_memory_name(config->memory, (char[32]){0}, 32));
    uint64_t page_size;
    rc = vm_page_size_of(config->page_size, "restore", &page_size, err);
    if (rc < 0)
        return rc;
    if (page_size == VM_HUGE_PAGE_SIZE && config->memory == VM_MEMORY_FILE)
        return forkd_error_set(err, -EOPNOTSUPP,
                               "restore: %s has 2 MiB pages, which FILE memory (a private "
                               "mapping of memory.bin) cannot give the guest: use MEMFD or UFFD",
                               config->snapshot_name ? config->snapshot_name : "the snapshot");
    struct vm *vm;
    struct vm_launch_params params = {config->name, config->extra_vmm_args, config->labels,
                                      config->label_count};
    rc = vm_launch(registry, &params, &vm, err);
    if (rc < 0)
        return rc;
    vm->memory = config->memory;
    vm->page_size = page_size;
    vm->vcpu_count = config->vcpu_count;
    if (config->devices)
        vm->devices = *config->devices;
    char stand_ins[DEVICES_MAX_DRIVES][DEVICES_PATH_MAX];
    if (config->overrides)
        rc = devices_overrides_apply(&vm->devices, config->overrides, config->fork_index, vm->id,
                                     err);
    if (rc == 0)
        rc = vm_clone_fork_drives(vm, config, err);
    int placed = rc < 0 ? rc : vm_place_stand_ins(vm, config, stand_ins, err);
    if (placed < 0) {
        vm_remove_fork_drives(vm);
        vm_abandon_start(vm, placed, err);
        return placed;
    }
    snprintf(vm->source_snapshot, sizeof(vm->source_snapshot), "%s",
             config->snapshot_name ? config->snapshot_name : "");
    rc = vm_load_snapshot(vm, config, err);
    vm_remove_stand_ins(vm, stand_ins, placed); /* the VMM was re-pointed, or failed */
    if (rc == 0) {
        vm->mem_size_mib = vm->memory_bytes >> 20;
        rc = config->start_finished_by_caller ? vm_save_record(vm) : vm_mark_started(vm, err);
        if (rc < 0 && config->start_finished_by_caller)
            rc = forkd_error_errno(err, rc, "write the record of VM %s", vm->id);
    }
    if (rc < 0) {
        vm_remove_fork_drives(vm);
        vm_abandon_start(vm, rc, err);
        return rc;
    }
    vm->mem_size_mib = vm->memory_bytes >> 20;
    vm_set_state(vm, config->start_paused ? VM_STATE_PAUSED : VM_STATE_RUNNING);
    pthread_mutex_lock(&vm->lock);
    vm->store = config->store;
    pthread_mutex_unlock(&vm->lock);
    *out = vm;
    return 0;
}

int vm_restore(struct vm_registry *registry, const struct vm_restore_config *config,
               struct vm **out, struct forkd_error *err)
{
    int rc = vm_restore_held(registry, config, out, err);
    if (rc < 0 && config->store && config->snapshot_name)
        store_release(config->store, config->snapshot_name);
    return rc;
}

int vm_start_finished(struct vm *vm, struct forkd_error *err)
{
    return vm_mark_started(vm, err);
}

int vm_stop(struct vm_registry *registry, struct vm *vm, unsigned grace_ms, struct forkd_error *err)
{
    pthread_mutex_lock(&vm->lock);
    bool branching = vm->active_branch_id[0] != '\0';
    pthread_mutex_unlock(&vm->lock);
    if (branching)
        return forkd_error_set(err, -EBUSY, "VM %s has a branch running (%s)", vm->id,
                               vm->active_branch_id);
    vm_terminate(vm, grace_ms);
    vm_delist(registry, vm);
    vm_remove_fork_drives(vm);
    pthread_mutex_lock(&vm->lock);
    struct store *store = take_ptr(vm->store);
    pthread_mutex_unlock(&vm->lock);
    if (store)
        store_release(store, vm->source_snapshot);
    return 0;
}

/* ---- adoption: the VMs of an earlier forkd ---------------------------------------------- */

struct vm_adoption {
    struct vm_registry *registry;
    const struct vm_adopt_config *config;
    struct vm_adopt_report *report;
};

static void vm_adopt_log(const struct vm_adoption *a, bool warning, const char *format, ...)
    __attribute__((format(printf, 3, 4)));

static void vm_adopt_log(const struct vm_adoption *a, bool warning, const char *format, ...)
{
    if (!a->config->log)
        return;
    char message[512];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof(message), format, args);
    va_end(args);
    a->config->log(a->config->arg, warning, message);
}

/* Parses "vm-<n>" at the start of a file name; 0 when it is not one. */
static unsigned long vm_file_id(const char *file_name)
{
    unsigned long id = 0;
    int used = 0;
    if (sscanf(file_name, "vm-%lu%n", &id, &used) != 1 || file_name[used] != '.')
        return 0;
    return id;
}

/* The pid of the process answering on the Unix socket at path, or 0 when none answers. lstat
 * first: a symlink planted here must not lead the probe (and an adoption) to another socket. */
static pid_t vm_socket_owner(const char *path)
{
    struct stat st;
    if (lstat(path, &st) < 0 || !S_ISSOCK(st.st_mode))
        return 0;
    _cleanup_close_ int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    if (fd < 0 || snprintf(address.sun_path, sizeof(address.sun_path), "%s", path) >=
                      (int)sizeof(address.sun_path))
        return 0;
    if (connect(fd, (struct sockaddr *)&address, sizeof(address)) < 0)
        return 0;
    struct ucred peer;
    socklen_t length = sizeof(peer);
    return getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &length) == 0 ? peer.pid : 0;
}

/* Lists an adopted VM under its recorded id; the list's reference is its initial one. */
static int vm_enlist_adopted(struct vm_registry *registry, struct vm *vm, struct forkd_error *err)
{
    pthread_mutex_lock(&registry->lock);
    int rc = vm_lookup_locked(registry, vm->id) || vm_lookup_locked(registry, vm->name)
                 ? forkd_error_set(err, -EEXIST, "VM %s (%s) is listed already", vm->id, vm->name)
                 : vm_registry_grow_locked(registry, err);
    if (rc == 0) {
        registry->vms[registry->count++] = vm;
        vm_ref(vm);
    }
    pthread_mutex_unlock(&registry->lock);
    return rc;
}

/* A VM as its record describes it; every path is derived from the run directory and the id. */
static struct vm *vm_from_record(struct vm_registry *registry, const struct vm_record *r)
{
    struct vm *vm = vm_new(registry);
    if (!vm)
        return NULL;
    snprintf(vm->id, sizeof(vm->id), "%s", r->id);
    snprintf(vm->name, sizeof(vm->name), "%s", r->name);
    vm->identity = r->vmm;
    vm->pid = r->vmm.pid;
    vm->starting = r->starting;
    vm->memory = r->memory;
    vm->vcpu_count = r->vcpu_count;
    vm->mem_size_mib = r->mem_size_mib;
    vm->page_size = r->page_size;
    vm->memory_bytes = r->memory_bytes;
    snprintf(vm->source_snapshot, sizeof(vm->source_snapshot), "%s", r->source_snapshot);
    vm->created_at_unix_ms = r->created_at_unix_ms;
    vm->label_count = r->label_count;
    memcpy(vm->labels, r->labels, r->label_count * sizeof(r->labels[0]));
    vm->devices = r->devices;
    /* Same length as when the VM was started here, which checked it. */
    if (snprintf(vm->api_socket_path, sizeof(vm->api_socket_path), "%s/%s.sock", registry->run_dir,
                 r->id) >= (int)sizeof(vm->api_socket_path) ||
        snprintf(vm->log_path, sizeof(vm->log_path), "%s/%s.log", registry->run_dir, r->id) >=
            (int)sizeof(vm->log_path)) {
        vm_unref(vm);
        return NULL;
    }
    return vm;
}

/* A recorded VMM that is gone: listed as exited with the reason, until StopVm forgets it. */
static void vm_adopt_exited(struct vm_adoption *a, const struct vm_record *r)
{
    struct vm *vm = vm_from_record(a->registry, r);
    if (!vm)
        return;
    vm->exited = true;
    vm->state = VM_STATE_FAILED;
    if (r->exit_reason[0])
        snprintf(vm->exit_reason, sizeof(vm->exit_reason), "%s", r->exit_reason);
    else
        snprintf(vm->exit_reason, sizeof(vm->exit_reason),
                 "VMM pid %d exited while no forkd watched it", (int)r->vmm.pid);
    if (vm_enlist_adopted(a->registry, vm, NULL) == 0) {
        a->report->exited++;
        vm_adopt_log(a, true, "VM %s (%s): %s", vm->id, vm->name, vm->exit_reason);
    }
    vm_unref(vm);
}

/* Connects to the adopted VMM's API and reads its state. */
static int vm_adopt_connect(struct vm *vm, struct forkd_error *err)
{
    int rc = vmm_client_open(vm->api_socket_path, &vm->client, err);
    if (rc < 0)
        return rc;
    vmm_client_set_timeout_ms(vm->client, vm_call_timeout_ms(vm));
    struct vmm_info info;
    rc = vmm_get_info(vm->client, &info, err);
    if (rc < 0)
        return rc;
    vm->state = strcmp(info.state, "Paused") == 0 ? VM_STATE_PAUSED : VM_STATE_RUNNING;
    return 0;
}

/* UFFD: the fork's userfaultfd, taken back from the VMM, served again from its template. */
static int vm_adopt_uffd(struct vm_adoption *a, struct vm *vm, const struct vm_record *r,
                         struct forkd_error *err)
{
    if (!a->config->page_server || !vm->store)
        return forkd_error_set(err, -ENOENT, "no page server or snapshot '%s' for UFFD fork %s",
                               vm->source_snapshot, vm->id);
    struct store_snapshot snapshot;
    int rc = store_get(vm->store, vm->source_snapshot, &snapshot, err);
    if (rc < 0)
        return rc;
    char memory_path[PATH_MAX + 16];
    store_file_path(snapshot.path, STORE_FILE_MEMORY, memory_path, sizeof(memory_path));
    int uffd = vmm_fds_take_uffd(vm->pidfd, vm->pid, false);
    if (uffd < 0)
        return forkd_error_errno(err, uffd, "take the userfaultfd of VMM pid %d", vm->pid);
    /* The loop polls it; the flag is the VMM's file's too, which never reads it. */
    fcntl(uffd, F_SETFL, fcntl(uffd, F_GETFL) | O_NONBLOCK);
    int pidfd = fcntl(vm->pidfd, F_DUPFD_CLOEXEC, 0);
    if (pidfd < 0) {
        close(uffd);
        return forkd_error_errno(err, -errno, "dup pidfd");
    }
    struct page_server_fork_config fork = {.template_name = vm->source_snapshot,
                                           .memory_path = memory_path,
                                           .socket_path = "",
                                           .vmm_pid = vm->pid,
                                           .label = vm->id};
    return page_server_fork_adopt(a->config->page_server, &fork, r->regions, r->region_count, uffd,
                                  pidfd, &vm->page_fork, err);
}

/* MEMFD: the guest memfd, from the VMM's files or mappings, checked by inode. */
static int vm_adopt_memfd(struct vm *vm, const struct vm_record *r, struct forkd_error *err)
{
    char name[64];
    snprintf(name, sizeof(name), "forkd-guest-%s", vm->id);
    int fd = vmm_fds_take_memfd(vm->pidfd, vm->pid, name, r->memfd_inode);
    if (fd < 0)
        return forkd_error_errno(err, fd, "take the memfd of VMM pid %d", vm->pid);
    pthread_mutex_lock(&vm->lock);
    vm->memfd = fd;
    pthread_mutex_unlock(&vm->lock);
    return 0;
}

/* A restored VM holds a use of its snapshot again, so it cannot be deleted under it. */
static void vm_adopt_snapshot_use(struct vm_adoption *a, struct vm *vm)
{
    struct store_snapshot snapshot;
    struct forkd_error err = {0};
    if (!vm->source_snapshot[0] || !a->config->store)
        return;
    if (store_acquire(a->config->store, vm->source_snapshot, &snapshot, &err) == 0)
        vm->store = a->config->store;
    else
        vm_adopt_log(a, true, "VM %s: snapshot %s: %s", vm->id, vm->source_snapshot, err.message);
}

/* What forkd held for the VM, taken back; a VM adopted without it is still listed. */
static void vm_adopt_held(struct vm_adoption *a, struct vm *vm, const struct vm_record *r)
{
    struct forkd_error err = {0};
    int rc = 0;
    vm_adopt_snapshot_use(a, vm);
    if (r->memory == VM_MEMORY_UFFD)
        rc = vm_adopt_uffd(a, vm, r, &err);
    else if (r->memory == VM_MEMORY_MEMFD && r->memfd_inode)
        rc = vm_adopt_memfd(vm, r, &err);
    if (rc < 0) {
        a->report->degraded++;
        vm_adopt_log(a, true, "VM %s adopted without what forkd held for it: %s", vm->id,
                     err.message);
    }
}

/* A branch that ran when the earlier forkd died: it failed. Its write-protect uffd closed with
 * that forkd (the VMM keeps no copy), which unprotected the guest; a VM left paused by the
 * pause window is resumed. */
static void vm_adopt_branch(struct vm_adoption *a, struct vm *vm, const struct vm_record *r)
{
    if (!r->branch_id[0])
        return;
    a->report->branches_failed++;
    int wp = vmm_fds_take_uffd(vm->pidfd, vm->pid, true);
    if (wp >= 0) {
        close(wp);
        vm_adopt_log(a, true, "VM %s: its VMM kept a write-protect userfaultfd", vm->id);
    }
    struct forkd_error err = {0};
    if (vm->state == VM_STATE_PAUSED && vm_resume(vm, &err) < 0)
        vm_adopt_log(a, true, "VM %s: resume after the branch to %s: %s", vm->id, r->branch_id,
                     err.message);
    if (a->config->branch_failed)
        a->config->branch_failed(a->config->arg, vm->id, r->branch_id);
}

/* True if pid's command line holds "--api-sock" followed by socket_path, as vm_spawn_vmm
 * starts every VMM. */
static bool vm_launched_for(pid_t pid, const char *socket_path)
{
    char path[64], args[8192];
    snprintf(path, sizeof(path), "/proc/%d/cmdline", (int)pid);
    _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t length = fd < 0 ? -1 : read(fd, args, sizeof(args) - 1);
    if (length <= 0)
        return false;
    args[length] = '\0';
    for (const char *arg = args, *end = args + length; arg < end; arg += strlen(arg) + 1) {
        const char *next = arg + strlen(arg) + 1;
        if (strcmp(arg, "--api-sock") == 0 && next < end && strcmp(next, socket_path) == 0)
            return true;
    }
    return false;
}

/* Proves that the recorded VMM is alive and ours, and pins it with a pidfd: 0, -ESRCH when it
 * is gone (its pid free or taken by a later process), -EPERM when the process is not provably
 * the one recorded (never acted on). */
static int vm_adopt_prove(struct vm *vm, const struct vm_record *r)
{
    struct vm_identity live;
    int rc = vm_identity_of(r->vmm.pid, &live);
    if (rc < 0 || live.start_time != r->vmm.start_time)
        return -ESRCH;
    if (strcmp(live.exe, r->vmm.exe) != 0)
        return -EPERM;
    vm->pidfd = (int)syscall(SYS_pidfd_open, r->vmm.pid, 0);
    /* Checked again with the pidfd held: the process it names can no longer be replaced. */
    if (vm->pidfd < 0 || !vm_identity_is_live(&r->vmm))
        return -ESRCH;
    if (vm_socket_owner(vm->api_socket_path) == r->vmm.pid)
        return 0;
    /* A VMM still launching has no socket yet: the arguments forkd gave it, which name this
     * VM's socket in forkd's own run directory, prove it; it is then stopped, never adopted. */
    return r->starting && vm_launched_for(r->vmm.pid, vm->api_socket_path) ? 0 : -EPERM;
}

static void vm_adopt_live(struct vm_adoption *a, struct vm *vm, const struct vm_record *r)
{
    struct forkd_error err = {0};
    vm->adopted = true; /* the reaper records its exit without a status */
    /* Reached before it is listed: a VMM forkd cannot talk to is left as it is (one whose start
     * was cut short is stopped without a word: it may not answer yet). */
    int rc = r->starting ? 0 : vm_adopt_connect(vm, &err);
    if (rc < 0) {
        a->report->foreign++;
        vm_adopt_log(a, true, "VM %s (VMM pid %d) does not answer, left alone: %s", vm->id, vm->pid,
                     err.message);
        return;
    }
    rc = vm_enlist_adopted(a->registry, vm, &err);
    if (rc == 0 && (rc = vm_watch(vm, &err)) < 0)
        vm_delist(a->registry, vm);
    if (rc < 0) {
        vm_adopt_log(a, true, "VM %s not adopted: %s", vm->id, err.message);
        return;
    }
    if (r->starting) {
        /* Boot or Spawn was cut short: all or none, as it would have been. */
        vm_terminate(vm, 0);
        vm_delist(a->registry, vm);
        a->report->stopped++;
        vm_adopt_log(a, false, "VM %s: its start was cut short; VMM pid %d stopped", vm->id,
                     vm->pid);
        return;
    }
    vm_adopt_held(a, vm, r);
    vm_adopt_branch(a, vm, r);
    vm_save_record(vm);
    a->report->adopted++;
    vm_adopt_log(a, false, "VM %s (%s) adopted: VMM pid %d, memory %s, %s", vm->id, vm->name,
                 vm->pid, vm_memory_name(vm->memory, (char[32]){0}, 32),
                 vm->state == VM_STATE_PAUSED ? "paused" : "running");
}

static void vm_adopt_record(struct vm_adoption *a, const char *id)
{
    struct vm_record r;
    int rc = vm_record_load(a->registry->run_dir, id, &r);
    if (rc < 0) {
        a->report->foreign++;
        vm_adopt_log(a, true, "record of %s not read (%s): left alone", id, strerror(-rc));
        return;
    }
    struct vm *vm = vm_from_record(a->registry, &r);
    if (!vm)
        return;
    rc = r.exit_reason[0] ? -ESRCH : vm_adopt_prove(vm, &r);
    if (rc == 0)
        vm_adopt_live(a, vm, &r);
    else if (rc == -ESRCH && r.starting)
        vm_record_remove(a->registry->run_dir, id); /* a start cut short, its VMM gone too */
    else if (rc == -ESRCH)
        vm_adopt_exited(a, &r);
    else {
        a->report->foreign++;
        vm_adopt_log(a, true, "record %s names pid %d, which is not provably its VMM: left alone",
                     id, (int)r.vmm.pid);
    }
    vm_unref(vm);
}

static int vm_compare_ids(const void *left, const void *right)
{
    unsigned long a = *(const unsigned long *)left, b = *(const unsigned long *)right;
    return a < b ? -1 : a > b;
}

/* The ids of every record, in order; the highest "vm-<n>." of any file in *highest. */
static size_t vm_adopt_scan(struct vm_registry *registry, unsigned long *ids, size_t max,
                            unsigned long *highest)
{
    _cleanup_closedir_ DIR *dir = opendir(registry->run_dir);
    size_t count = 0;
    for (struct dirent *entry; dir && (entry = readdir(dir));) {
        unsigned long id = vm_file_id(entry->d_name);
        *highest = id > *highest ? id : *highest;
        unsigned long record = vm_record_file_id(entry->d_name);
        if (record && count < max)
            ids[count++] = record;
    }
    qsort(ids, count, sizeof(*ids), vm_compare_ids);
    return count;
}

/* Files of the earlier forkd that nothing uses any more: its listeners, half-written records,
 * API sockets no VMM answers on. A socket something answers on is not ours to remove. */
static void vm_adopt_sweep(struct vm_adoption *a)
{
    _cleanup_closedir_ DIR *dir = opendir(a->registry->run_dir);
    for (struct dirent *entry; dir && (entry = readdir(dir));) {
        unsigned long id = vm_file_id(entry->d_name);
        if (!id)
            continue;
        char path[PATH_MAX + 256], vm_name[VM_ID_MAX];
        snprintf(path, sizeof(path), "%s/%s", a->registry->run_dir, entry->d_name);
        snprintf(vm_name, sizeof(vm_name), "vm-%lu", id);
        size_t length = strlen(entry->d_name);
        /* ".wp" is a branch's write-protect listener: it died with the earlier forkd. */
        bool socket_file = (length > 5 && (strcmp(entry->d_name + length - 5, ".sock") == 0 ||
                                           strcmp(entry->d_name + length - 5, ".uffd") == 0)) ||
                           (length > 3 && strcmp(entry->d_name + length - 3, ".wp") == 0);
        bool tmp_record = length > 7 && strcmp(entry->d_name + length - 7, ".vm.tmp") == 0;
        struct vm *listed = vm_lookup(a->registry, vm_name);
        bool live = listed && !listed->exited;
        vm_unref(listed);
        if (tmp_record) {
            unlink(path);
        } else if (socket_file && !live && vm_socket_owner(path) > 0) {
            a->report->foreign++;
        } else if (socket_file && !live) {
            unlink(path); /* never follows a symlink: unlink removes the link itself */
        }
    }
}

int vm_registry_adopt(struct vm_registry *registry, const struct vm_adopt_config *config,
                      struct vm_adopt_report *report, struct forkd_error *err)
{
    *report = (struct vm_adopt_report){0};
    struct vm_adoption a = {registry, config, report};
    unsigned long highest = 0, ids[4096];
    size_t count = vm_adopt_scan(registry, ids, ARRAY_SIZE(ids), &highest);
    pthread_mutex_lock(&registry->lock);
    registry->next_id = highest; /* new ids never reuse an adopted id or another VM's files */
    pthread_mutex_unlock(&registry->lock);
    char id[VM_ID_MAX];
    /* UFFD forks first: their vCPUs wait on the page server until they are adopted. Each
     * record's pass is chosen before the first: one it removes (a start cut short) is not
     * taken up again by the second as unreadable. */
    bool uffd[ARRAY_SIZE(ids)];
    for (size_t i = 0; i < count; i++) {
        snprintf(id, sizeof(id), "vm-%lu", ids[i]);
        struct vm_record peek;
        uffd[i] =
            vm_record_load(registry->run_dir, id, &peek) == 0 && peek.memory == VM_MEMORY_UFFD;
    }
    for (int pass = 0; pass < 2; pass++) {
        for (size_t i = 0; i < count; i++) {
            snprintf(id, sizeof(id), "vm-%lu", ids[i]);
            if (uffd[i] == (pass == 0))
                vm_adopt_record(&a, id);
        }
    }
    vm_adopt_sweep(&a);
    (void)err;
    return 0;
}
