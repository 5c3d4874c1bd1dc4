/*
 * vmstate: forkd-testvm's own snapshot state format (the "vmstate" file next to memory.bin).
 * Everything needed to restore a running guest exactly: machine config, memory regions, the
 * guest's workload config and image facts (where its counting loop and increment window are),
 * and per-vCPU registers (the guest's running total lives in %r15), special registers, FPU
 * state and TSC.
 *
 * On disk (little-endian, x86-64 only):
 *   struct vmstate_file_header                      magic "FKDVMST\0", version, counts,
 *                                                   the device page's count of saves, flags
 *                                                   (bit 0: boot memory filled, else sparse)
 *   struct vmstate_file_region   x region_count
 *   struct guest_config                              as written into guest memory at boot
 *   struct vmstate_file_vcpu     x vcpu_count        kvm_regs, kvm_sregs, kvm_fpu, tsc
 *   struct vmstate_file_drive    x drive_count       id, path, root, read-only (reopened at
 *                                                   load, as Firecracker does)
 *   struct vmstate_file_net      x net_count         id, tap name, guest MAC (as Firecracker's
 *                                                   net device state: the tap is what
 *                                                   network_overrides replaces at load)
 *   struct vmstate_file_vsock                        present, guest CID, socket path
 *                                                   (what vsock_override replaces)
 *   uint64_t checksum                                FNV-1a 64 of every byte before it
 * A reader rejects another magic, another version, counts out of range, a size that does not
 * match the counts, or a bad checksum.
 */
#ifndef FORKD_TESTVM_VMSTATE_H
#define FORKD_TESTVM_VMSTATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <linux/kvm.h>

#include "guest_layout.h"
#include "guest_memory.h"

#define VMSTATE_MAGIC "FKDVMST"
/* 2: the save count and sparse boot; 3: guest_config.report_us; 4: drives, the guest's disk;
 * 5: network interfaces and vsock; 6: guest_config's balloon */
#define VMSTATE_VERSION    6u
#define VMSTATE_MAX_DRIVES 8
#define VMSTATE_MAX_NETS   4

struct vcpu_state {
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct kvm_fpu fpu;
    uint64_t tsc;
};

struct vmstate_drive {
    char id[64];
    char path[4096];
    bool root;
    bool read_only;
};

struct vmstate_net {
    char id[64];
    char host_dev_name[16];
    char guest_mac[18];
};

struct vmstate_vsock {
    bool present;
    uint32_t guest_cid;
    char uds_path[108];
};

struct vmstate {
    uint32_t vcpu_count;
    uint32_t mem_size_mib;
    uint32_t mmio_gap_mib;
    uint32_t region_count;
    uint64_t increment_window; /* guest RIP between the counter and the total increments */
    uint64_t loop_start;       /* [loop_start, loop_end): the guest's counting loop */
    uint64_t loop_end;
    uint64_t device_saves; /* the device page's count of saves, written during this save */
    uint64_t disk_window;  /* guest RIP after its disk write, before it records it in memory */
    uint32_t drive_count;
    struct vmstate_drive drives[VMSTATE_MAX_DRIVES];
    uint32_t net_count;
    struct vmstate_net nets[VMSTATE_MAX_NETS];
    struct vmstate_vsock vsock;
    bool boot_filled; /* boot memory was filled with the pattern; else sparse (zeros) */
    bool huge_pages;  /* guest memory is in 2 MiB hugetlbfs pages (loads need Uffd or shared) */
    struct memory_region regions[GUEST_MEMORY_MAX_REGIONS]; /* host pointers not stored */
    struct guest_config guest_config;
    struct vcpu_state vcpus[GUEST_MAX_VCPUS];
};

/* Writes state to path (created 0600, truncated) and fsyncs it. */
/* Writes the vmstate file; fsyncs it when sync (Full snapshots). A VmstateOnly snapshot is not
 * synced inside the pause: its taker (forkd's store) syncs it before publishing. */
int vmstate_write(const char *path, const struct vmstate *state, bool sync, char *err,
                  size_t err_size);

/* Reads and validates path into *state. */
int vmstate_read(const char *path, struct vmstate *state, char *err, size_t err_size);

/* The guest's running total of a saved vCPU (%r15), 0 before it entered its counting loop. */
uint64_t vmstate_vcpu_total(const struct vmstate *state, unsigned index);

/* Whether the saved vCPU was inside the guest's counting loop. */
bool vmstate_vcpu_counting(const struct vmstate *state, unsigned index);

#endif
