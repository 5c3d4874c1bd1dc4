/*
 * A VM's devices between the proto and the engine: BootRequest's drives, network interfaces,
 * vsock and initrd copied into struct vm_devices (counts and lengths bounded before anything is
 * copied, then the engine's rules, devices_validate), SpawnRequest's per-fork overrides into
 * struct devices_overrides (the same way), and struct vm_devices described in Vm and Snapshot
 * messages. The holder owns the sub-messages; its strings point into the vm_devices
 * it was filled from, which must outlive it (the convert.h holders keep both).
 */
#ifndef FORKD_SERVICE_DEVICE_MESSAGES_H
#define FORKD_SERVICE_DEVICE_MESSAGES_H

#include "call.h"

#include "forkd/devices.h"
#include "forkd/v1/forkd.pb-c.h"

struct device_messages {
    Forkd__V1__Drive drives[DEVICES_MAX_DRIVES];
    Forkd__V1__Drive *drive_pointers[DEVICES_MAX_DRIVES];
    Forkd__V1__FileIdentity identities[DEVICES_MAX_DRIVES];
    Forkd__V1__NetworkInterface nets[DEVICES_MAX_NETS];
    Forkd__V1__NetworkInterface *net_pointers[DEVICES_MAX_NETS];
    Forkd__V1__Vsock vsock;
};

/* BootRequest -> vm_devices; INVALID_ARGUMENT naming the field. */
grpc_status_code device_messages_from_boot(const Forkd__V1__BootRequest *request,
                                           struct vm_devices *out, struct rpc_status *status);

/* SpawnRequest's network_overrides and vsock_override -> devices_overrides for count forks
 * (devices_overrides_validate); a guest_mac is refused. INVALID_ARGUMENT naming the field. */
grpc_status_code device_messages_overrides_from_spawn(const Forkd__V1__SpawnRequest *request,
                                                      struct devices_overrides *out,
                                                      struct rpc_status *status);

/* vm_devices -> the device fields of a Vm or a Snapshot message. */
void device_messages_fill_vm(struct device_messages *holder, struct vm_devices *devices,
                             Forkd__V1__Vm *out);
void device_messages_fill_snapshot(struct device_messages *holder, struct vm_devices *devices,
                                   Forkd__V1__Snapshot *out);

#endif
