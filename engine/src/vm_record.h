/*
 * The durable record of a VM: "<run_dir>/<vm id>.vm", one JSON object per VMM process forkd
 * started, written atomically (temporary file, fsync, rename, fsync of the directory) whenever
 * what a later forkd needs to know changes. It says who the VMM is (pid, start time: field 22
 * of /proc/<pid>/stat in clock ticks since boot, executable: /proc/<pid>/exe), how to reach it
 * (its API socket), what the VM is (name, memory backend, source snapshot, labels, the region
 * mappings of a UFFD fork), what forkd held for it (the memfd of a MEMFD VM, by inode; the
 * userfaultfd of a UFFD fork) and the branch running on it, if any.
 *
 * A later forkd adopts the VMM only when the process is, by all three of pid, start time and
 * executable, the one recorded: a pid alone may have been reused. Records are read as small
 * regular files owned by forkd's user, never through a symlink, and every path a later forkd
 * acts on is derived from the run directory and the id, never taken from the record.
 */
#ifndef FORKD_ENGINE_VM_RECORD_H
#define FORKD_ENGINE_VM_RECORD_H

#include "forkd/vm.h"
#include "uffd.h"

#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

/* Who a process is: a pid, and what makes it that process and not a later one with its pid. */
struct vm_identity {
    pid_t pid;
    unsigned long long start_time;
    char exe[PATH_MAX];
};

struct vm_record {
    char id[VM_ID_MAX];
    char name[VM_NAME_MAX + 1];
    struct vm_identity vmm;
    /* Set while the VMM is being configured or restored (Boot, Spawn): a later forkd stops a
     * VMM whose start was cut short rather than adopting a half-made VM. */
    bool starting;
    enum vm_memory memory; /* 0 while starting */
    unsigned vcpu_count;
    uint64_t mem_size_mib;
    uint64_t memory_bytes;
    uint64_t page_size; /* guest pages: 4 KiB or 2 MiB (records without it: 4 KiB) */
    char source_snapshot[VM_NAME_MAX + 1];
    int64_t created_at_unix_ms;
    size_t label_count;
    struct vm_label labels[VM_MAX_LABELS];
    struct vm_devices devices; /* drives, network interfaces, vsock, initrd */
    /* UFFD: the fork's regions, as its handshake announced them. */
    size_t region_count;
    struct uffd_region regions[UFFD_MAX_REGIONS];
    /* What forkd held: the inode of a MEMFD VM's memfd (0: none). A UFFD fork's userfaultfd is
     * implied by memory == VM_MEMORY_UFFD. */
    unsigned long long memfd_inode;
    char branch_id[64]; /* a branch running on the VM: the snapshot it writes ("" when none) */
    char exit_reason[128];      /* set once the VMM exited while forkd watched it */
};

/* Reads the live identity of pid from /proc. Returns 0 or -errno (-ESRCH: no such process). */
int vm_identity_of(pid_t pid, struct vm_identity *out);

/* True when the live process recorded.pid is, by start time and executable, the one recorded. */
bool vm_identity_is_live(const struct vm_identity *recorded);

/* Writes the record atomically as <run_dir>/<record->id>.vm. Returns 0 or -errno. */
int vm_record_save(const char *run_dir, const struct vm_record *record);

/* Reads and checks <run_dir>/<id>.vm: a regular file of ours, not a symlink, its id the one
 * asked for. Returns 0, -ENOENT, -EPERM (not a file we wrote), or -EINVAL (malformed). */
int vm_record_load(const char *run_dir, const char *id, struct vm_record *out);

/* Removes vm_id's record, if any (and the directory entry is made durable). */
void vm_record_remove(const char *run_dir, const char *vm_id);

/* "vm-<n>.vm" gives n; 0 when the file name is not a record's. */
unsigned long vm_record_file_id(const char *file_name);

#endif
