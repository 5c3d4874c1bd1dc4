/*
 * The VM registry: one VMM process per VM (forkd-testvm or a patched firecracker), launched,
 * booted or restored from a snapshot, watched, reaped and stopped. Each VM is a refcounted
 * record; the registry holds one reference while the VM is listed, and every lookup returns one
 * more that the caller drops with vm_unref.
 *
 * Threads: a reaper thread waits on every VMM's pidfd and records exits as they happen (state,
 * exit reason; a MEMFD VM's memory is released then). Any thread may call any function here.
 *
 * States: a VM is STARTING inside vm_boot/vm_restore (never returned in that state), then
 * RUNNING or PAUSED (only vm_pause and vm_resume move between the two), and STOPPED or FAILED
 * once its VMM exited (recorded by the reaper; final). Each function below says which states it
 * accepts; one that needs a live VMM refuses the others with -EBADFD and a message naming the
 * state (the service answers FAILED_PRECONDITION).
 */
#ifndef FORKD_VM_H
#define FORKD_VM_H

#include "basic/error.h"
#include "forkd/devices.h"
#include "forkd/page_server.h"
#include "forkd/store.h"

#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Values match the proto's MemoryBackend and VmState. */
enum vm_memory {
    VM_MEMORY_ANONYMOUS = 1, /* booted on request: the VMM's private anonymous memory */
    VM_MEMORY_FILE = 2,      /* MAP_PRIVATE of memory.bin */
    VM_MEMORY_MEMFD = 3,     /* a memfd owned by forkd, shared with the VMM */
    VM_MEMORY_UFFD = 4,      /* filled lazily by the page server */
};

enum vm_state {
    VM_STATE_STARTING = 1,
    VM_STATE_RUNNING = 2,
    VM_STATE_PAUSED = 3,
    VM_STATE_STOPPED = 4,
    VM_STATE_FAILED = 5,
};

#define VM_ID_MAX     32
#define VM_NAME_MAX   64
#define VM_MAX_LABELS 16
/* Guest page sizes: 4 KiB, or 2 MiB pages from hugetlbfs (Firecracker's huge_pages "2M"). */
#define VM_SMALL_PAGE_SIZE 4096ULL
#define VM_HUGE_PAGE_SIZE  (2ULL << 20)

/* Free-form key/value kept with a VM for its users (the proto's labels). */
struct vm_label {
    char key[64];
    char value[256];
};

struct vm;
struct vm_registry;
struct vmm_client; /* the engine's VMM API client (internal) */

struct vm_registry_config {
    const char *vmm_binary;     /* path, or a name looked up in PATH */
    const char *run_dir;        /* VMM sockets and logs go here; created if missing */
    unsigned start_timeout_ms;  /* VMM socket must answer within this; 0 means 10000 */
    unsigned call_timeout_ms;   /* limit of an ordinary VMM API call; 0 means 10000 */
    enum vm_memory boot_memory; /* a boot's memory when its config names none; 0: MEMFD */
    /* Every time limit on a VMM (start, API calls, slow calls) is multiplied by this: a slow or
     * emulated host is slow, not broken. 0 means 1. */
    unsigned timeout_scale;
    /* Non-NULL: this host cannot run VMs, for this reason (the probe's words). Boot and restore
     * then refuse with -ENODEV before any VMM is launched. */
    const char *kvm_unusable_reason;
};

struct vm_boot_config {
    const char *name; /* NULL or "": the id */
    unsigned vcpu_count;
    uint64_t mem_size_mib;
    const char *kernel_image_path;
    const char *boot_args;
    /* MEMFD (the registry's default when 0): guest memory is a memfd forkd owns, shared with the
     * VMM from the first instruction (machine-config mem_backend_path), so the VM is
     * live-branchable on any kernel with shmem write-protect. ANONYMOUS: the VMM's own private
     * memory, live-branchable only where the kernel write-protects never-touched anonymous pages
     * (6.4+). */
    enum vm_memory memory;
    /* 0 or VM_SMALL_PAGE_SIZE, or VM_HUGE_PAGE_SIZE: guest memory in 2 MiB hugetlbfs pages
     * (MEMFD: a memfd made with MFD_HUGETLB, its pages reserved before the VMM starts, so a
     * host without enough free huge pages fails the boot with -ENOMEM naming them; ANONYMOUS:
     * the VMM's own MAP_HUGETLB memory). mem_size_mib must then be even. */
    uint64_t page_size;
    /* NULL-terminated, appended to the VMM's argv; may be NULL */
    const char *const *extra_vmm_args;
    const struct vm_label *labels;
    size_t label_count; /* at most VM_MAX_LABELS */
    /* Drives, network interfaces, vsock, initrd (NULL: none): checked (devices_validate, and
     * the drive files open as the VMM will open them) before the VMM is launched, sent to it
     * before InstanceStart, and recorded with the identity of each drive's file. */
    const struct vm_devices *devices;
};

struct vm_restore_config {
    const char *name;
    const char *snapshot_name; /* recorded as the VM's source */
    /* When set, the caller took a use of snapshot_name with store_acquire and the VM takes it
     * over: it is given back when the VM is stopped, or by vm_restore when it fails. */
    struct store *store;
    const char *vmstate_path;
    const char *memory_path; /* memory.bin */
    enum vm_memory memory;   /* FILE, MEMFD, or UFFD (needs page_server) */
    /* The snapshot's page size (0: 4 KiB). With 2 MiB pages, FILE is refused (a private
     * mapping of memory.bin cannot give huge pages: -EOPNOTSUPP), MEMFD fills a hugetlbfs
     * memfd, UFFD serves 2 MiB pages. */
    uint64_t page_size;
    bool start_paused;
    unsigned vcpu_count; /* from the snapshot's record, for status reports; 0 if unknown */
    const char *const *extra_vmm_args;
    const struct vm_label *labels;
    size_t label_count; /* at most VM_MAX_LABELS */
    /* The devices the snapshot recorded (NULL: none): the restored VMM has them from its
     * vmstate. Each writable drive gets a disk of its own: a reflink clone (a copy where the
     * file system cannot reflink) of the snapshot's capture (store_drive_path in
     * snapshot_dir), <run_dir>/<id>.drive-<drive id>, which the VMM is re-pointed at (PATCH
     * /drives) after a paused load and before the guest runs; it is removed when the VM is
     * stopped. The VM's description names the fork's own files. */
    const struct vm_devices *devices;
    const char *snapshot_dir;
    /* Spawn's per-fork overrides (NULL: none), checked against devices already: expanded for
     * fork_index and the VM's id, sent with the load, and the VM's description then names the
     * fork's own tap devices and vsock socket. */
    const struct devices_overrides *overrides;
    unsigned fork_index;
    /* UFFD: serves the fork's memory. The fork's socket is <run_dir>/<id>.uffd; the template
     * is named snapshot_name (memory_path when none). The fork stays registered until the
     * VM's last reference goes (the page server drops it by itself when the VMM exits). */
    struct page_server *page_server;
    /* One of several VMs started together, all or none (a Spawn): the VM stays "starting" in
     * its record, so a forkd that dies before the caller calls vm_start_finished for the whole
     * group makes the next forkd stop it instead of adopting it. */
    bool start_finished_by_caller;
};

/* What a VM looks like now (a copy; safe to keep). */
struct vm_status {
    char id[VM_ID_MAX];
    char name[VM_NAME_MAX + 1];
    enum vm_state state;
    enum vm_memory memory;
    unsigned vcpu_count;
    uint64_t mem_size_mib;
    uint64_t page_size; /* VM_SMALL_PAGE_SIZE or VM_HUGE_PAGE_SIZE */
    pid_t vmm_pid; /* 0 once reaped */
    char api_socket_path[PATH_MAX];
    char vmm_binary[PATH_MAX];
    char source_snapshot[VM_NAME_MAX + 1];
    int64_t created_at_unix_ms;
    char exit_reason[128];
    char active_branch_id[64];
    size_t label_count;
    struct vm_label labels[VM_MAX_LABELS];
    struct vm_devices devices;
};

int vm_registry_open(const struct vm_registry_config *config, struct vm_registry **out,
                     struct forkd_error *err);
/* What adoption found (vm_registry_adopt). */
struct vm_adopt_report {
    unsigned adopted;  /* VMMs proven to be the recorded ones: managed again, same ids */
    unsigned exited;   /* recorded VMMs that exited while no forkd watched: listed as exited */
    unsigned stopped;  /* VMMs whose start (Boot, Spawn) was cut short: stopped */
    unsigned foreign;  /* records and VM sockets not proven ours: never acted on */
    unsigned degraded; /* adopted without all that forkd held for them (see the log) */
    unsigned branches_failed; /* branches that ran when the earlier forkd died */
};

struct vm_adopt_config {
    struct store *store;             /* restored VMs take a use of their snapshot again */
    struct page_server *page_server; /* serves adopted UFFD forks */
    /* Each finding, in words; may be NULL. */
    void (*log)(void *arg, bool warning, const char *message);
    /* A branch that ran on vm_id, writing snapshot_name, when the earlier forkd died; may be
     * NULL. */
    void (*branch_failed)(void *arg, const char *vm_id, const char *snapshot_name);
    void *arg;
};

/* Call once after opening, before anything else uses the registry: takes back the VMs an
 * earlier forkd on this run directory left running (it died, or stopped with keep_vms). For
 * each durable record, a live VMM that is provably the recorded process (pid, start time,
 * executable, and it answers on the VM's API socket) is adopted: listed under its id, its
 * state read (GET /), what forkd held taken back from it (a MEMFD VM's memfd; a UFFD fork's
 * userfaultfd, served again by the page server; UFFD forks are adopted first), a branch that
 * was running reported through branch_failed with the VM resumed if it was left paused. A
 * recorded VMM that is gone is listed as exited with the reason; one whose start was cut short
 * is stopped. A process not proven ours is never signalled or touched. New ids follow the
 * highest found, so no id or file is reused. */
int vm_registry_adopt(struct vm_registry *registry, const struct vm_adopt_config *config,
                      struct vm_adopt_report *report, struct forkd_error *err);

/* Stops every VM (SIGTERM, then SIGKILL after grace_ms) unless keep_vms, then frees. With
 * keep_vms the VMs keep running, and their records: the next forkd adopts them. */
void vm_registry_close(struct vm_registry *registry, bool keep_vms, unsigned grace_ms);

/* 0 when this host can run VMs; otherwise -ENODEV naming why ("KVM is not usable on this host:
 * open /dev/kvm: ..."). Boot and restore check it before launching anything. */
int vm_registry_check_host(const struct vm_registry *registry, struct forkd_error *err);

/* Launches a VMM, configures and starts the guest: a new VM, STARTING until it returns it
 * RUNNING. *out holds a reference. -EEXIST for a name in use, -ENOENT for a missing kernel,
 * -EIO with the VMM's words when it refuses. On failure the VMM process is gone and nothing is
 * listed. */
int vm_boot(struct vm_registry *registry, const struct vm_boot_config *config, struct vm **out,
            struct forkd_error *err);

/* Launches a VMM restored from a snapshot with FILE, MEMFD or UFFD memory: a new VM, returned
 * RUNNING, or PAUSED with start_paused. Same guarantees.
 * UFFD: the snapshot is loaded paused, the handshake received and the hot set prefetched,
 * then the VM is resumed (unless start_paused); -EINVAL without a page server, the
 * handshake's error (page_server_fork_wait_ready) when it fails. */
int vm_restore(struct vm_registry *registry, const struct vm_restore_config *config,
               struct vm **out, struct forkd_error *err);

/* The group a VM restored with start_finished_by_caller belongs to is complete: from now a
 * later forkd adopts the VM (one that exited meanwhile is reported exited). Accepts any
 * state; returns 0 or -errno. */
int vm_start_finished(struct vm *vm, struct forkd_error *err);

/* By id or name, in any state (a VM is listed until vm_stop); NULL when unknown. Returns a
 * reference. */
struct vm *vm_lookup(struct vm_registry *registry, const char *id_or_name);

/* Every listed VM, in any state, with a reference each; free the array with vm_list_free. */
size_t vm_list(struct vm_registry *registry, struct vm ***out);
void vm_list_free(struct vm **vms, size_t count);

/* Terminates the VMM (SIGTERM, SIGKILL after grace_ms), waits for it, and unlists the VM; a
 * restored VM gives back its use of the snapshot. Accepts any state; -EBUSY while a branch
 * runs on it. */
int vm_stop(struct vm_registry *registry, struct vm *vm, unsigned grace_ms,
            struct forkd_error *err);

/* The functions from here to vm_page_server_stats accept any state: they read the record, and
 * once the VMM exited they report the end (vm_pid 0, no memfd, vm_is_alive false). */
void vm_ref(struct vm *vm);
void vm_unref(struct vm *vm);

void vm_get_status(struct vm *vm, struct vm_status *out);
/* "RUNNING", "STOPPED", ... (the proto's names), for messages. */
const char *vm_state_name(enum vm_state state);
/* "ANONYMOUS", "FILE", "MEMFD", "UFFD"; "backend <n>" for a value with no name (in a
 * buffer of the caller's). */
const char *vm_memory_name(enum vm_memory memory, char *buffer, size_t size);
const char *vm_id(const struct vm *vm);
struct vmm_client *vm_client(struct vm *vm);
enum vm_memory vm_memory_kind(const struct vm *vm);
pid_t vm_pid(struct vm *vm);     /* 0 once the VMM exited */
bool vm_is_alive(struct vm *vm); /* the VMM has not exited */
/* Waits up to timeout_ms for the VMM to exit; true if it has. A process's memory is gone a
 * moment before it is seen to exit, so a step that failed with "no such process" waits here. */
bool vm_exited_within(struct vm *vm, int timeout_ms);
int vm_memfd(struct vm *vm); /* the guest memfd of a MEMFD VM, -1 otherwise */
/* A duplicate of the guest memfd (the caller closes it), or -EBADF when there is none. */
int vm_dup_memfd(struct vm *vm);
uint64_t vm_memory_bytes(const struct vm *vm);
uint64_t vm_page_size(const struct vm *vm); /* VM_SMALL_PAGE_SIZE or VM_HUGE_PAGE_SIZE */
/* Page-server figures of a UFFD VM (they stay readable after it exits); -ENOENT otherwise. */
int vm_page_server_stats(struct vm *vm, struct page_server_stats *out);
/* Any state. Time limit for VMM calls that touch all guest memory (start, Full snapshot): it
 * grows with the guest's size. */
unsigned vm_slow_call_timeout_ms(const struct vm *vm);
/* Any state. The time limit of an ordinary VMM API call for this VM (the default, scaled). */
unsigned vm_call_timeout_ms(const struct vm *vm);
/* The host's slowness factor (--timeout-scale; 1 on a normal host): guard timeouts and the
 * windows that wait on the guest's own progress are multiplied by it. */
unsigned vm_time_scale(const struct vm *vm);
const char *vm_source_snapshot(const struct vm *vm); /* any state */

/* Pauses the guest (PATCH /vm Paused) and records PAUSED. Accepts RUNNING and PAUSED (pausing
 * again is harmless); -EBADFD naming the state otherwise, before the VMM is asked (a VMM that
 * exits meanwhile gives the VMM call's error). The only way a VM becomes PAUSED after start. */
int vm_pause(struct vm *vm, struct forkd_error *err);
/* Resumes the guest (PATCH /vm Resumed) and records RUNNING. Accepts PAUSED and RUNNING;
 * -EBADFD naming the state otherwise, like vm_pause. */
int vm_resume(struct vm *vm, struct forkd_error *err);

/* Any state: the state forkd last recorded (RUNNING or PAUSED for a live VM). */
enum vm_state vm_recorded_state(struct vm *vm);
/* RUNNING or PAUSED: asks the VMM for its state (GET /, allowing for a VMM still busy with a
 * call that timed out), records it and returns it in *out (RUNNING or PAUSED). */
int vm_query_state(struct vm *vm, enum vm_state *out, struct forkd_error *err);

/* One branch per VM: true if none was running (branch_id recorded), false otherwise. Any
 * state: it only records the branch; the branch checks that the VMM is alive first and pauses
 * through vm_pause. */
bool vm_try_begin_branch(struct vm *vm, const char *branch_id);
void vm_end_branch(struct vm *vm); /* any state */

#ifdef __cplusplus
}
#endif

#endif
