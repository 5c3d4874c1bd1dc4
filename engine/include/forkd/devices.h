/*
 * A VM's devices as Firecracker configures them: block drives, network interfaces, a vsock
 * and an initrd. This module owns their description (struct vm_devices), the rules a
 * description must follow (checked before any VMM starts), the identity of a drive's file
 * (size, mtime, ctime, inode) and the JSON form kept in VM records and snapshot.json. The VM
 * registry sends them to the VMM with Firecracker's endpoints:
 * PUT /drives/{id}, PUT /network-interfaces/{id}, PUT /vsock, boot-source initrd_path.
 */
#ifndef FORKD_DEVICES_H
#define FORKD_DEVICES_H

#include "basic/error.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DEVICES_MAX_DRIVES     8
#define DEVICES_MAX_NETS       4
#define DEVICES_ID_MAX         64   /* drive and interface ids: [A-Za-z0-9_]{1,63} */
#define DEVICES_PATH_MAX       1024 /* host paths (drives, initrd) */
#define DEVICES_TAP_NAME_MAX   16   /* IFNAMSIZ: 1..15 bytes */
#define DEVICES_MAC_MAX        18   /* "aa:bb:cc:dd:ee:ff" */
#define DEVICES_VSOCK_PATH_MAX 108  /* sun_path */
#define DEVICES_MIN_GUEST_CID  3    /* 0..2 are reserved (hypervisor, local, host) */

/* What a drive's file was when it was recorded: a read-only drive whose file no longer matches
 * has changed under the snapshots that reference it. All zero: not recorded. */
struct devices_file_identity {
    uint64_t size;
    int64_t mtime_ns;
    int64_t ctime_ns;
    uint64_t inode;
    uint64_t device;
};

struct devices_drive {
    char id[DEVICES_ID_MAX];
    char path[DEVICES_PATH_MAX]; /* absolute path on the host */
    bool read_only;
    bool root;
    struct devices_file_identity identity;
};

struct devices_net {
    char id[DEVICES_ID_MAX];
    char host_dev_name[DEVICES_TAP_NAME_MAX];
    char guest_mac[DEVICES_MAC_MAX]; /* empty: the VMM picks one */
};

struct devices_vsock {
    bool present;
    uint32_t guest_cid;
    char uds_path[DEVICES_VSOCK_PATH_MAX];
};

struct vm_devices {
    char initrd_path[DEVICES_PATH_MAX]; /* empty: none */
    size_t drive_count;
    struct devices_drive drives[DEVICES_MAX_DRIVES];
    size_t net_count;
    struct devices_net nets[DEVICES_MAX_NETS];
    struct devices_vsock vsock;
};

/* Spawn's per-fork overrides of what two forks of one snapshot cannot share, as Firecracker's
 * PUT /snapshot/load takes them: network_overrides (a tap per interface, Firecracker 1.12 on)
 * and vsock_override (the host socket, Firecracker 1.16 on). Each value is a pattern expanded
 * per fork: "{i}" is the fork's index in its Spawn (0..count-1), and in the vsock path only,
 * "{vm_id}" is the fork's VM id (unknown until the fork exists, and a tap name has only 15
 * bytes). Any other '{' is refused. A guest MAC cannot be overridden: the guest's virtio-net
 * config space comes from the snapshot. */
#define DEVICES_PATTERN_MAX   256
#define DEVICES_VM_ID_LONGEST "vm-18446744073709551615" /* the longest id {vm_id} can give */

struct devices_net_override {
    char iface_id[DEVICES_ID_MAX];
    char host_dev_name[DEVICES_PATTERN_MAX]; /* a pattern */
};

struct devices_overrides {
    size_t net_count;
    struct devices_net_override nets[DEVICES_MAX_NETS];
    char vsock_uds_path[DEVICES_PATTERN_MAX]; /* a pattern; empty: no override */
};

/* Checks the overrides alone, for count forks: iface ids as Boot's and each named once,
 * placeholders known, a per-fork placeholder in every pattern when count > 1, every expansion
 * a valid tap name (1..15 bytes) or an absolute socket path (< 108 bytes, with the longest VM
 * id), no two taps the same. -EINVAL naming the field ("network_overrides[0].host_dev_name")
 * otherwise. */
int devices_overrides_validate(const struct devices_overrides *overrides, unsigned count,
                               struct forkd_error *err);

/* Checks the overrides against the devices of the snapshot forks restore (named snapshot in
 * messages), for count forks: each iface_id is one of its interfaces, a vsock override needs
 * its vsock, no fork's tap is another interface's, and with count > 1 every interface and the
 * vsock are overridden (two forks cannot share a tap or a socket; the message says which
 * override to give). -EINVAL otherwise. */
int devices_overrides_check(const struct vm_devices *devices,
                            const struct devices_overrides *overrides, unsigned count,
                            const char *snapshot, struct forkd_error *err);

/* Applies the overrides for fork index (VM id vm_id) to devices (the snapshot's, copied for the
 * fork): the interfaces and the vsock then name the fork's own tap and socket. -EINVAL or
 * -ENAMETOOLONG naming the field when an expansion does not fit (checked up front already). */
int devices_overrides_apply(struct vm_devices *devices, const struct devices_overrides *overrides,
                            unsigned index, const char *vm_id, struct forkd_error *err);

/* Checks a description: ids 1..63 of [A-Za-z0-9_] and unique per kind, absolute paths without
 * "." or ".." components, at most one root drive, tap names 1..15 printable bytes without '/',
 * MACs as six hex pairs, a vsock CID of at least 3 and an absolute socket path. -EINVAL naming
 * the field ("drives[1].drive_id: ...") otherwise. */
int devices_validate(const struct vm_devices *devices, struct forkd_error *err);

/* Opens each drive's file as the VMM will (read-only or read-write; a regular file or a block
 * device) and records its identity; -ENOENT, -EACCES, ... naming the field and the path. The
 * initrd must be readable. */
int devices_check_files(struct vm_devices *devices, struct forkd_error *err);

/* The identity of the file at path now; -errno. */
int devices_file_identity_of(const char *path, struct devices_file_identity *out);

/* True when both identities name the same unchanged file. */
bool devices_file_identity_equal(const struct devices_file_identity *a,
                                 const struct devices_file_identity *b);

/* True when the VM has a drive the guest can write. */
bool devices_have_writable_drive(const struct vm_devices *devices);

/* The JSON form (a cJSON object, passed as void * so this header needs no cJSON): adds
 * "devices" to parent. Returns false when out of memory. */
bool devices_json_put(void *parent, const struct vm_devices *devices);
/* Reads "devices" of parent into out (all empty when parent has none: records written before
 * devices existed). -EINVAL naming the defect otherwise. */
int devices_json_get(const void *parent, struct vm_devices *out, struct forkd_error *err);

#ifdef __cplusplus
}
#endif

#endif
