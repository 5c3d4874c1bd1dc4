/*
 * api: the Firecracker-compatible endpoint handlers and the VMM's state machine
 * (Not started -> Running <-> Paused), on top of guest_memory, kvm_vm, guest_boot and vmstate.
 * Every handler runs on the API thread; struct vmm is owned by it.
 */
#ifndef FORKD_TESTVM_API_H
#define FORKD_TESTVM_API_H

#include <limits.h>
#include <stdbool.h>
#include <stdint.h>

#include "boot_args.h"
#include "guest_memory.h"
#include "http.h"
#include "kvm_vm.h"

enum vmm_state {
    VMM_NOT_STARTED,
    VMM_RUNNING,
    VMM_PAUSED,
};

#define VMM_MAX_DRIVES 8
#define VMM_MAX_NETS   4

/* Recorded like Firecracker's: the guest has no NIC or vsock, GET / reports them. */
struct vmm_net {
    char id[64];
    char host_dev_name[16];
    char guest_mac[18];
};

struct vmm_vsock {
    bool present;
    uint32_t guest_cid;
    char uds_path[108];
};

struct vmm_drive {
    char id[64];
    char path[PATH_MAX];
    bool root;
    bool read_only;
};

struct vmm {
    char id[64];
    uint32_t mmio_gap_mib;
    unsigned pause_timeout_ms;
    /* A slow VMM: a pause request is held this long before the vCPUs are stopped, and then
     * completes (answered late), as a busy Firecracker may do past its client's limit. */
    unsigned pause_delay_ms;
    bool fill_boot_memory; /* --boot-memory fill: write the boot pattern everywhere at boot */
    bool boot_filled;      /* this guest's memory was filled at boot (carried by snapshots) */
    /* --balloon-discard firecracker: MADV_DONTNEED whatever the memory, no EVENT_REMOVE */
    bool balloon_discard_firecracker;

    enum vmm_state state;
    bool machine_configured;
    bool boot_source_configured;
    uint32_t vcpu_count;
    uint32_t mem_size_mib;
    char kernel_image_path[PATH_MAX];
    char boot_memory_path[PATH_MAX]; /* machine-config mem_backend_path; empty: anonymous */
    bool huge_pages; /* machine-config huge_pages "2M": guest memory in 2 MiB hugetlbfs pages */
    struct workload workload;
    /* Recorded; the first writable one is the guest's disk (GUEST_PORT_DISK, its fd in
     * vm.disk_fd while the machine exists), the others are not attached. */
    struct vmm_drive drives[VMM_MAX_DRIVES];
    unsigned drive_count;
    struct vmm_net nets[VMM_MAX_NETS];
    unsigned net_count;
    struct vmm_vsock vsock;
    char initrd_path[PATH_MAX]; /* boot-source initrd_path; empty: none */

    struct guest_memory memory;
    struct kvm_vm vm;
    bool vm_created;
    struct guest_config guest_config;
    uint64_t increment_window;
    uint64_t loop_start;
    uint64_t loop_end;
    uint64_t disk_window;     /* the guest's RIP after its disk write (guest_image_header) */
    int write_protect_socket; /* the last PUT /uffd/wp connection, kept open */

    uint64_t pause_count;
    uint64_t last_pause_ns; /* kvm_vm_pause: request to every vCPU parked, measured here */
    uint64_t last_resume_ns;
    uint64_t last_snapshot_ns;
};

void vmm_init(struct vmm *vmm, const char *id, uint32_t mmio_gap_mib, unsigned pause_timeout_ms);

/* Handles one request; *body is a malloc'd JSON text or NULL (for 204). */
void api_handle(struct vmm *vmm, const struct http_request *request, int *status, char **body);

#endif
