/* A VM's devices between the proto and the engine (see device_messages.h). */
#include "device_messages.h"

#include <stdio.h>
#include <string.h>

/* Copies a string field, refusing one longer than out holds. The field is named
 * "<list>[<index>].<member>", or "<member>" when list is NULL. */
static grpc_status_code device_messages_copy(const char *list, size_t index, const char *member,
                                             const char *value, char *out, size_t size,
                                             struct rpc_status *status)
{
    size_t length = strlen(value);
    if (length >= size) {
        char name[96];
        if (list)
            snprintf(name, sizeof(name), "%s[%zu].%s", list, index, member);
        else
            snprintf(name, sizeof(name), "%s", member);
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT, "%s: %zu bytes, at most %zu",
                              name, length, size - 1);
    }
    memcpy(out, value, length + 1);
    return GRPC_STATUS_OK;
}

grpc_status_code device_messages_from_boot(const Forkd__V1__BootRequest *request,
                                           struct vm_devices *out, struct rpc_status *status)
{
    memset(out, 0, sizeof(*out));
    if (request->n_drives > DEVICES_MAX_DRIVES)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                              "drives: at most %d per VM, got %zu", DEVICES_MAX_DRIVES,
                              request->n_drives);
    if (request->n_network_interfaces > DEVICES_MAX_NETS)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                              "network_interfaces: at most %d per VM, got %zu", DEVICES_MAX_NETS,
                              request->n_network_interfaces);
    grpc_status_code code =
        device_messages_copy(NULL, 0, "initrd_path", request->initrd_path, out->initrd_path,
                             sizeof(out->initrd_path), status);
    for (size_t i = 0; code == GRPC_STATUS_OK && i < request->n_drives; i++) {
        const Forkd__V1__Drive *in = request->drives[i];
        struct devices_drive *drive = &out->drives[i];
        code = device_messages_copy("drives", i, "drive_id", in->drive_id, drive->id,
                                    sizeof(drive->id), status);
        if (code == GRPC_STATUS_OK)
            code = device_messages_copy("drives", i, "path_on_host", in->path_on_host, drive->path,
                                        sizeof(drive->path), status);
        drive->read_only = in->is_read_only;
        drive->root = in->is_root_device;
        out->drive_count++;
    }
    for (size_t i = 0; code == GRPC_STATUS_OK && i < request->n_network_interfaces; i++) {
        const Forkd__V1__NetworkInterface *in = request->network_interfaces[i];
        struct devices_net *net = &out->nets[i];
        code = device_messages_copy("network_interfaces", i, "iface_id", in->iface_id, net->id,
                                    sizeof(net->id), status);
        if (code == GRPC_STATUS_OK)
            code = device_messages_copy("network_interfaces", i, "host_dev_name", in->host_dev_name,
                                        net->host_dev_name, sizeof(net->host_dev_name), status);
        if (code == GRPC_STATUS_OK)
            code = device_messages_copy("network_interfaces", i, "guest_mac", in->guest_mac,
                                        net->guest_mac, sizeof(net->guest_mac), status);
        out->net_count++;
    }
    if (code == GRPC_STATUS_OK && request->vsock) {
        out->vsock.present = true;
        out->vsock.guest_cid = request->vsock->guest_cid;
        code = device_messages_copy(NULL, 0, "vsock.uds_path", request->vsock->uds_path,
                                    out->vsock.uds_path, sizeof(out->vsock.uds_path), status);
    }
    if (code != GRPC_STATUS_OK)
        return code;
    struct forkd_error err = {0};
    if (devices_validate(out, &err) < 0)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT, "%s", err.message);
    return GRPC_STATUS_OK;
}

grpc_status_code device_messages_overrides_from_spawn(const Forkd__V1__SpawnRequest *request,
                                                      struct devices_overrides *out,
                                                      struct rpc_status *status)
{
    memset(out, 0, sizeof(*out));
    if (request->n_network_overrides > DEVICES_MAX_NETS)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                              "network_overrides: at most %d (one per interface), got %zu",
                              DEVICES_MAX_NETS, request->n_network_overrides);
    grpc_status_code code = GRPC_STATUS_OK;
    for (size_t i = 0; code == GRPC_STATUS_OK && i < request->n_network_overrides; i++) {
        const Forkd__V1__NetworkOverride *in = request->network_overrides[i];
        struct devices_net_override *net = &out->nets[i];
        if (*in->guest_mac)
            return rpc_status_set(
                status, GRPC_STATUS_INVALID_ARGUMENT,
                "network_overrides[%zu].guest_mac: a fork's MAC cannot be changed: the guest's "
                "virtio-net config space, with its MAC, is restored from the snapshot. Leave it "
                "empty; forks share the snapshot's MAC, so give each fork's tap its own network "
                "namespace (or bridge), or change the address inside the guest after the restore",
                i);
        code = device_messages_copy("network_overrides", i, "iface_id", in->iface_id, net->iface_id,
                                    sizeof(net->iface_id), status);
        if (code == GRPC_STATUS_OK)
            code = device_messages_copy("network_overrides", i, "host_dev_name", in->host_dev_name,
                                        net->host_dev_name, sizeof(net->host_dev_name), status);
        out->net_count++;
    }
    if (code == GRPC_STATUS_OK && request->vsock_override) {
        code = device_messages_copy(NULL, 0, "vsock_override.uds_path",
                                    request->vsock_override->uds_path, out->vsock_uds_path,
                                    sizeof(out->vsock_uds_path), status);
        if (code == GRPC_STATUS_OK && !out->vsock_uds_path[0])
            return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                                  "vsock_override.uds_path: a path is required");
    }
    if (code != GRPC_STATUS_OK)
        return code;
    struct forkd_error err = {0};
    if (devices_overrides_validate(out, request->count, &err) < 0)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT, "%s", err.message);
    return GRPC_STATUS_OK;
}

/* Fills the holder; the caller points its message's fields at it. */
static void device_messages_fill(struct device_messages *holder, struct vm_devices *devices)
{
    for (size_t i = 0; i < devices->drive_count; i++) {
        struct devices_drive *drive = &devices->drives[i];
        Forkd__V1__FileIdentity *identity = &holder->identities[i];
        *identity = (Forkd__V1__FileIdentity)FORKD__V1__FILE_IDENTITY__INIT;
        identity->size_bytes = drive->identity.size;
        identity->mtime_unix_ns = drive->identity.mtime_ns;
        identity->ctime_unix_ns = drive->identity.ctime_ns;
        identity->inode = drive->identity.inode;
        identity->device = drive->identity.device;
        holder->drives[i] = (Forkd__V1__Drive)FORKD__V1__DRIVE__INIT;
        holder->drives[i].drive_id = drive->id;
        holder->drives[i].path_on_host = drive->path;
        holder->drives[i].is_read_only = drive->read_only;
        holder->drives[i].is_root_device = drive->root;
        holder->drives[i].identity = identity;
        holder->drive_pointers[i] = &holder->drives[i];
    }
    for (size_t i = 0; i < devices->net_count; i++) {
        holder->nets[i] = (Forkd__V1__NetworkInterface)FORKD__V1__NETWORK_INTERFACE__INIT;
        holder->nets[i].iface_id = devices->nets[i].id;
        holder->nets[i].host_dev_name = devices->nets[i].host_dev_name;
        holder->nets[i].guest_mac = devices->nets[i].guest_mac;
        holder->net_pointers[i] = &holder->nets[i];
    }
    holder->vsock = (Forkd__V1__Vsock)FORKD__V1__VSOCK__INIT;
    holder->vsock.guest_cid = devices->vsock.guest_cid;
    holder->vsock.uds_path = devices->vsock.uds_path;
}

void device_messages_fill_vm(struct device_messages *holder, struct vm_devices *devices,
                             Forkd__V1__Vm *out)
{
    device_messages_fill(holder, devices);
    out->initrd_path = devices->initrd_path;
    out->n_drives = devices->drive_count;
    out->drives = holder->drive_pointers;
    out->n_network_interfaces = devices->net_count;
    out->network_interfaces = holder->net_pointers;
    out->vsock = devices->vsock.present ? &holder->vsock : NULL;
}

void device_messages_fill_snapshot(struct device_messages *holder, struct vm_devices *devices,
                                   Forkd__V1__Snapshot *out)
{
    device_messages_fill(holder, devices);
    out->initrd_path = devices->initrd_path;
    out->n_drives = devices->drive_count;
    out->drives = holder->drive_pointers;
    out->n_network_interfaces = devices->net_count;
    out->network_interfaces = holder->net_pointers;
    out->vsock = devices->vsock.present ? &holder->vsock : NULL;
}
