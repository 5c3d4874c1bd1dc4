/*
 * The VMM API client: Firecracker's HTTP/1.1 API over its Unix socket (libcurl, cJSON). One
 * client per VMM; it keeps its connection open between calls (Firecracker never closes it) and
 * serialises calls with a mutex, so any thread may use it. Every error names the method, the
 * path, the HTTP status and the VMM's fault_message: "PUT /snapshot/create: 400: <message>".
 */
#ifndef FORKD_VMM_CLIENT_H
#define FORKD_VMM_CLIENT_H

#include "basic/error.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define VMM_CLIENT_DEFAULT_TIMEOUT_MS 10000

struct vmm_client;

enum vmm_snapshot_type { VMM_SNAPSHOT_FULL, VMM_SNAPSHOT_VMSTATE_ONLY };
enum vmm_memory_backend { VMM_MEMORY_FILE, VMM_MEMORY_UFFD };

#define VMM_INFO_MAX_REGIONS 16

struct vmm_info {
    char id[128];
    char state[32]; /* "Not started", "Running", "Paused" */
    char vmm_version[64];
    /* Guest memory as the VMM lays it out, where its GET / says (the test VMM; stock
     * Firecracker does not): region_count 0 otherwise. */
    size_t region_count;
    struct vmm_region {
        uint64_t guest_phys_addr, size, file_offset;
    } regions[VMM_INFO_MAX_REGIONS];
};

int vmm_client_open(const char *socket_path, struct vmm_client **out, struct forkd_error *err);
void vmm_client_close(struct vmm_client *client);
/* The client's limit for each later call (connect + request + response). A call that needs
 * longer passes its own limit (the *_within functions) rather than changing this one, which
 * other threads' calls share. */
void vmm_client_set_timeout_ms(struct vmm_client *client, long timeout_ms);

/* One request. body may be NULL. On a 2xx answer returns 0 and, if response is not NULL,
 * *response holds the body (malloc'd, NUL-terminated, may be empty). Otherwise -EIO (HTTP
 * error), -ETIMEDOUT, -ECONNREFUSED/-ENOENT (no VMM there) with the message filled. */
int vmm_request(struct vmm_client *client, const char *method, const char *path, const char *body,
                char **response, struct forkd_error *err);
/* The same with a limit of timeout_ms for this call only (0: the client's limit). */
int vmm_request_within(struct vmm_client *client, const char *method, const char *path,
                       const char *body, long timeout_ms, char **response, struct forkd_error *err);

int vmm_put_machine_config(struct vmm_client *client, unsigned vcpu_count, uint64_t mem_size_mib,
                           struct forkd_error *err);
/* The same with guest memory backed by a file the VMM maps shared from boot on (a memfd as
 * /proc/<pid>/fd/<n>; the machine-config field mem_backend_path), or anonymous when NULL;
 * huge_pages sends Firecracker's huge_pages "2M" (2 MiB hugetlbfs pages). */
int vmm_put_machine_config_backed(struct vmm_client *client, unsigned vcpu_count,
                                  uint64_t mem_size_mib, const char *mem_backend_path,
                                  bool huge_pages, struct forkd_error *err);
int vmm_put_boot_source(struct vmm_client *client, const char *kernel_image_path,
                        const char *boot_args, struct forkd_error *err);
/* The same with an initrd (boot-source initrd_path; NULL or "": none). */
int vmm_put_boot_source_initrd(struct vmm_client *client, const char *kernel_image_path,
                               const char *boot_args, const char *initrd_path,
                               struct forkd_error *err);
/* PUT /drives/{id} (before InstanceStart): {"drive_id", "path_on_host", "is_root_device",
 * "is_read_only"}. */
int vmm_put_drive(struct vmm_client *client, const char *drive_id, const char *path_on_host,
                  bool is_root_device, bool is_read_only, struct forkd_error *err);
/* PATCH /drives/{id} {"drive_id", "path_on_host"}: re-points a drive of a started or restored
 * (paused) VM at another file. */
int vmm_patch_drive(struct vmm_client *client, const char *drive_id, const char *path_on_host,
                    struct forkd_error *err);
/* PUT /network-interfaces/{id} {"iface_id", "host_dev_name", "guest_mac" (omitted when
 * empty)}. */
int vmm_put_network_interface(struct vmm_client *client, const char *iface_id,
                              const char *host_dev_name, const char *guest_mac,
                              struct forkd_error *err);
/* PUT /vsock {"guest_cid", "uds_path"}. */
int vmm_put_vsock(struct vmm_client *client, uint32_t guest_cid, const char *uds_path,
                  struct forkd_error *err);
int vmm_start(struct vmm_client *client, struct forkd_error *err);
int vmm_start_within(struct vmm_client *client, long timeout_ms, struct forkd_error *err);
int vmm_pause(struct vmm_client *client, struct forkd_error *err);
int vmm_resume(struct vmm_client *client, struct forkd_error *err);
int vmm_snapshot_create(struct vmm_client *client, enum vmm_snapshot_type type,
                        const char *snapshot_path, const char *mem_file_path,
                        struct forkd_error *err);
int vmm_snapshot_create_within(struct vmm_client *client, enum vmm_snapshot_type type,
                               const char *snapshot_path, const char *mem_file_path,
                               long timeout_ms, struct forkd_error *err);
/* What a restore changes in the snapshot's devices, as Firecracker's snapshot/load takes it:
 * network_overrides (a new tap per interface, Firecracker 1.12 on) and vsock_override (a new
 * host socket, Firecracker 1.16 on; older ones refuse the field). Only what is set is sent. */
#define VMM_LOAD_MAX_NETS 4
struct vmm_load_overrides {
    size_t net_count;
    struct {
        const char *iface_id;
        const char *host_dev_name;
    } nets[VMM_LOAD_MAX_NETS];
    const char *vsock_uds_path; /* NULL: none */
};

/* overrides may be NULL (none). */
int vmm_snapshot_load(struct vmm_client *client, const char *snapshot_path,
                      enum vmm_memory_backend backend, const char *backend_path, bool shared,
                      bool resume_vm, const struct vmm_load_overrides *overrides,
                      struct forkd_error *err);
/* Asks the VMM to send a write-protect userfaultfd to the Unix socket at socket_path. */
int vmm_uffd_wp(struct vmm_client *client, const char *socket_path, struct forkd_error *err);
int vmm_get_info(struct vmm_client *client, struct vmm_info *out, struct forkd_error *err);
/* The same with a limit of timeout_ms for this call only (0: the client's limit). */
int vmm_get_info_within(struct vmm_client *client, long timeout_ms, struct vmm_info *out,
                        struct forkd_error *err);

#ifdef __cplusplus
}
#endif

#endif
