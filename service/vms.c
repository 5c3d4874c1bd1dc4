/* The VM RPCs: Boot, Spawn, ListVms, GetVm, StopVm. Input is checked before any VMM starts. */
#include "convert.h"
#include "daemon.h"
#include "handlers.h"
#include "log.h"
#include "paging.h"

#include "basic/cleanup.h"
#include "basic/clock.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define VM_MAX_VCPUS          32
#define VM_MIN_MEMORY_MIB     16
#define VM_MAX_MEMORY_MIB     (1024 * 1024)
#define SPAWN_MAX_COUNT       256
#define VM_MAX_BOOT_ARGS      2048 /* x86 Linux COMMAND_LINE_SIZE, Firecracker's limit too */
#define STOP_DEFAULT_GRACE_MS 2000

static grpc_status_code vms_check_name(const char *name, struct rpc_status *status)
{
    struct forkd_error err = {0};
    if (*name && store_validate_name_of("VM name", name, &err) < 0)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT, "%s", err.message);
    return GRPC_STATUS_OK;
}

static grpc_status_code vms_check_boot(const Forkd__V1__BootRequest *request,
                                       struct rpc_status *status)
{
    if (vms_check_name(request->name, status) != GRPC_STATUS_OK)
        return status->code;
    const Forkd__V1__MachineConfig *machine = request->machine;
    if (!machine)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                              "machine is required (vcpu_count, mem_size_mib)");
    if (machine->vcpu_count < 1 || machine->vcpu_count > VM_MAX_VCPUS)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                              "vcpu_count %u is out of range 1..%d", machine->vcpu_count,
                              VM_MAX_VCPUS);
    if (machine->mem_size_mib < VM_MIN_MEMORY_MIB || machine->mem_size_mib > VM_MAX_MEMORY_MIB)
        return rpc_status_set(
            status, GRPC_STATUS_INVALID_ARGUMENT, "mem_size_mib %llu is out of range %d..%d",
            (unsigned long long)machine->mem_size_mib, VM_MIN_MEMORY_MIB, VM_MAX_MEMORY_MIB);
    if (machine->huge_pages != FORKD__V1__HUGE_PAGES__HUGE_PAGES_NONE &&
        machine->huge_pages != FORKD__V1__HUGE_PAGES__HUGE_PAGES_2M)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                              "huge_pages %d is not HUGE_PAGES_NONE or HUGE_PAGES_2M",
                              (int)machine->huge_pages);
    if (machine->huge_pages == FORKD__V1__HUGE_PAGES__HUGE_PAGES_2M && machine->mem_size_mib % 2)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                              "mem_size_mib %llu is odd: with HUGE_PAGES_2M guest memory is whole "
                              "2 MiB pages",
                              (unsigned long long)machine->mem_size_mib);
    size_t boot_args_length = strlen(request->boot_args);
    if (boot_args_length > VM_MAX_BOOT_ARGS)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                              "boot_args is %zu bytes; a kernel command line holds at most %d",
                              boot_args_length, VM_MAX_BOOT_ARGS);
    if (request->kernel_image_path[0] != '/')
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                              "kernel_image_path must be an absolute path, got '%s'",
                              request->kernel_image_path);
    return GRPC_STATUS_OK;
}

/* Every protobuf-c map<string, string> entry has this layout (BootRequest__LabelsEntry,
 * SpawnRequest__LabelsEntry, ...), so one copier serves them all. */
struct vms_label_entry {
    ProtobufCMessage base;
    char *key;
    char *value;
};

/* Copies request labels, refusing what a VM record cannot hold. */
static grpc_status_code vms_copy_labels(size_t count, void *const *entries, struct vm_label *out,
                                        struct rpc_status *status)
{
    if (count > VM_MAX_LABELS)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT, "at most %d labels",
                              VM_MAX_LABELS);
    for (size_t i = 0; i < count; i++) {
        const struct vms_label_entry *entry = entries[i];
        if (!*entry->key || strlen(entry->key) >= sizeof(out[i].key) ||
            strlen(entry->value) >= sizeof(out[i].value))
            return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                                  "label '%.64s': keys are 1..63 bytes, values at most 255",
                                  entry->key);
        strcpy(out[i].key, entry->key);
        strcpy(out[i].value, entry->value);
    }
    return GRPC_STATUS_OK;
}

static grpc_status_code vms_reply(struct rpc_call *call, struct vm *vm, struct rpc_status *status)
{
    struct vm_message message;
    convert_vm(vm, &message);
    if (call_set_response(call, &message.vm.base) < 0)
        return rpc_status_set(status, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    return GRPC_STATUS_OK;
}

grpc_status_code handle_boot(struct rpc_call *call, const ProtobufCMessage *message,
                             struct rpc_status *status)
{
    const Forkd__V1__BootRequest *request = (const Forkd__V1__BootRequest *)message;
    struct daemon_state *daemon = call->daemon;
    if (vms_check_boot(request, status) != GRPC_STATUS_OK)
        return status->code;
    struct vm_label labels[VM_MAX_LABELS];
    if (vms_copy_labels(request->n_labels, (void *const *)request->labels, labels, status) !=
        GRPC_STATUS_OK)
        return status->code;
    _cleanup_free_ struct vm_devices *devices = calloc(1, sizeof(*devices));
    if (!devices)
        return rpc_status_set(status, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    if (device_messages_from_boot(request, devices, status) != GRPC_STATUS_OK)
        return status->code;
    struct vm_boot_config config = {
        .name = request->name,
        .vcpu_count = request->machine->vcpu_count,
        .mem_size_mib = request->machine->mem_size_mib,
        .page_size = request->machine->huge_pages == FORKD__V1__HUGE_PAGES__HUGE_PAGES_2M
                         ? VM_HUGE_PAGE_SIZE
                         : VM_SMALL_PAGE_SIZE,
        .kernel_image_path = request->kernel_image_path,
        .boot_args = request->boot_args,
        .labels = labels,
        .label_count = request->n_labels,
        .devices = devices,
    };
    struct vm *vm = NULL;
    struct forkd_error err = {0};
    int rc = vm_boot(engine_registry(daemon->engine), &config, &vm, &err);
    if (rc == -EREMOTEIO) /* the VMM refused the configuration: the caller's input */
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT, "boot: %s", err.message);
    if (rc < 0)
        return convert_error(status, &err);
    log_info("booted %s (%u vCPUs, %llu MiB)", vm_id(vm), config.vcpu_count,
             (unsigned long long)config.mem_size_mib);
    grpc_status_code code = vms_reply(call, vm, status);
    vm_unref(vm);
    return code;
}

static grpc_status_code vms_lookup(struct daemon_state *daemon, const char *id, struct vm **out,
                                   struct rpc_status *status)
{
    if (!*id)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT, "vm_id is required");
    *out = vm_lookup(engine_registry(daemon->engine), id);
    if (!*out)
        return rpc_status_set(status, GRPC_STATUS_NOT_FOUND, "no VM '%s'", id);
    return GRPC_STATUS_OK;
}

grpc_status_code handle_get_vm(struct rpc_call *call, const ProtobufCMessage *message,
                               struct rpc_status *status)
{
    const Forkd__V1__GetVmRequest *request = (const Forkd__V1__GetVmRequest *)message;
    struct vm *vm;
    if (vms_lookup(call->daemon, request->vm_id, &vm, status) != GRPC_STATUS_OK)
        return status->code;
    grpc_status_code code = vms_reply(call, vm, status);
    vm_unref(vm);
    return code;
}

/* Replies with a list of VMs: a SpawnResponse (with its elapsed time) or a ListVmsResponse. */
static grpc_status_code vms_reply_list(struct rpc_call *call, struct vm **vms, size_t count,
                                       bool spawned, uint64_t elapsed_ns, const char *next_token,
                                       struct rpc_status *status)
{
    struct vm_message *messages = calloc(count ? count : 1, sizeof(*messages));
    Forkd__V1__Vm **pointers = calloc(count ? count : 1, sizeof(*pointers));
    int rc = -ENOMEM;
    if (messages && pointers) {
        for (size_t i = 0; i < count; i++) {
            convert_vm(vms[i], &messages[i]);
            pointers[i] = &messages[i].vm;
        }
        Forkd__V1__SpawnResponse spawn = FORKD__V1__SPAWN_RESPONSE__INIT;
        Forkd__V1__ListVmsResponse list = FORKD__V1__LIST_VMS_RESPONSE__INIT;
        spawn.n_vms = list.n_vms = count;
        spawn.vms = list.vms = pointers;
        spawn.elapsed_ns = elapsed_ns;
        list.next_page_token = (char *)next_token;
        rc = call_set_response(call, spawned ? &spawn.base : &list.base);
    }
    free(messages);
    free(pointers);
    return rc < 0 ? rpc_status_set(status, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory")
                  : GRPC_STATUS_OK;
}

grpc_status_code handle_list_vms(struct rpc_call *call, const ProtobufCMessage *message,
                                 struct rpc_status *status)
{
    const Forkd__V1__ListVmsRequest *request = (const Forkd__V1__ListVmsRequest *)message;
    struct daemon_state *daemon = call->daemon;
    unsigned long after;
    if (paging_vm_token(request->page_token, &after) < 0)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                              "page_token '%.64s' is not a VM id from an earlier page",
                              request->page_token);
    struct vm **vms;
    size_t count = vm_list(engine_registry(daemon->engine), &vms);
    /* The registry lists VMs in creation order, which is id order. */
    size_t first = 0;
    unsigned long number;
    while (first < count && paging_vm_token(vm_id(vms[first]), &number) == 0 && number <= after)
        first++;
    size_t page = paging_size(request->page_size);
    if (page > count - first)
        page = count - first;
    bool more = first + page < count;
    grpc_status_code code = vms_reply_list(call, vms + first, page, false, 0,
                                           more ? vm_id(vms[first + page - 1]) : "", status);
    vm_list_free(vms, count);
    return code;
}

grpc_status_code handle_stop_vm(struct rpc_call *call, const ProtobufCMessage *message,
                                struct rpc_status *status)
{
    const Forkd__V1__StopVmRequest *request = (const Forkd__V1__StopVmRequest *)message;
    struct vm *vm;
    if (vms_lookup(call->daemon, request->vm_id, &vm, status) != GRPC_STATUS_OK)
        return status->code;
    struct daemon_state *daemon = call->daemon;
    struct forkd_error err = {0};
    unsigned grace = request->grace_ms ? request->grace_ms : STOP_DEFAULT_GRACE_MS;
    int rc = vm_stop(engine_registry(daemon->engine), vm, grace, &err);
    grpc_status_code code;
    if (rc < 0) {
        code = convert_error(status, &err);
    } else {
        log_info("stopped %s", vm_id(vm));
        struct vm_message last;
        convert_vm(vm, &last);
        Forkd__V1__StopVmResponse response = FORKD__V1__STOP_VM_RESPONSE__INIT;
        response.vm = &last.vm;
        code = call_set_response(call, &response.base) < 0
                   ? rpc_status_set(status, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory")
                   : GRPC_STATUS_OK;
    }
    vm_unref(vm);
    return code;
}

static grpc_status_code vms_refuse_backend(Forkd__V1__MemoryBackend backend,
                                           struct rpc_status *status)
{
    const char *name = convert_enum_name(&forkd__v1__memory_backend__descriptor, (int)backend);
    if (!name)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                              "backend %d is not a MemoryBackend; Spawn takes FILE, MEMFD or UFFD",
                              (int)backend);
    return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                          "backend %s is not one Spawn takes: FILE, MEMFD or UFFD (%s memory is "
                          "what Boot gives a fresh VM)",
                          name, name);
}

static grpc_status_code vms_memory_backend(Forkd__V1__MemoryBackend backend, enum vm_memory *out,
                                           struct rpc_status *status)
{
    switch (backend) {
    case FORKD__V1__MEMORY_BACKEND__MEMORY_BACKEND_UNSPECIFIED:
    case FORKD__V1__MEMORY_BACKEND__MEMORY_BACKEND_FILE:
        *out = VM_MEMORY_FILE;
        return GRPC_STATUS_OK;
    case FORKD__V1__MEMORY_BACKEND__MEMORY_BACKEND_MEMFD:
        *out = VM_MEMORY_MEMFD;
        return GRPC_STATUS_OK;
    case FORKD__V1__MEMORY_BACKEND__MEMORY_BACKEND_UFFD:
        *out = VM_MEMORY_UFFD;
        return GRPC_STATUS_OK;
    default:
        return vms_refuse_backend(backend, status);
    }
}

static bool vms_call_cancelled(void *call)
{
    return call_is_cancelled(call);
}

/* Turns a SpawnRequest into the engine's request; labels and overrides must outlive it. */
static grpc_status_code vms_check_spawn(struct rpc_call *call,
                                        const Forkd__V1__SpawnRequest *request,
                                        struct vm_label *labels,
                                        struct devices_overrides *overrides,
                                        struct engine_spawn_request *out, struct rpc_status *status)
{
    struct forkd_error err = {0};
    if (store_validate_name(request->snapshot, &err) < 0)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT, "snapshot: %s", err.message);
    if (request->count < 1 || request->count > SPAWN_MAX_COUNT)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                              "count %u is out of range 1..%d", request->count, SPAWN_MAX_COUNT);
    if (*request->name_prefix) {
        char longest[128];
        snprintf(longest, sizeof(longest), "%s-%u", request->name_prefix, request->count - 1);
        if (store_validate_name_of("VM name", longest, &err) < 0)
            return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                                  "name_prefix gives invalid VM names: %s", err.message);
    }
    *out = (struct engine_spawn_request){
        .snapshot = request->snapshot,
        .count = request->count,
        .name_prefix = request->name_prefix,
        .start_paused = request->start_paused,
        .prefetch_record_ms = request->prefetch_record_ms,
        .labels = labels,
        .label_count = request->n_labels,
        .overrides = overrides,
        .cancelled = vms_call_cancelled,
        .cancelled_arg = call,
    };
    if (vms_memory_backend(request->backend, &out->memory, status) != GRPC_STATUS_OK)
        return status->code;
    if (device_messages_overrides_from_spawn(request, overrides, status) != GRPC_STATUS_OK)
        return status->code;
    out->remote = request->remote;
    if (request->remote && out->memory != VM_MEMORY_UFFD)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                              "remote: forks start before their memory arrives only with "
                              "backend UFFD");
    if (request->remote && !engine_remote(((struct daemon_state *)call->daemon)->engine))
        return rpc_status_set(status, GRPC_STATUS_FAILED_PRECONDITION,
                              "remote: no remote store: start forkd with --remote-endpoint and "
                              "--remote-bucket");
    return vms_copy_labels(request->n_labels, (void *const *)request->labels, labels, status);
}

grpc_status_code handle_spawn(struct rpc_call *call, const ProtobufCMessage *message,
                              struct rpc_status *status)
{
    const Forkd__V1__SpawnRequest *request = (const Forkd__V1__SpawnRequest *)message;
    struct vm_label labels[VM_MAX_LABELS];
    _cleanup_free_ struct devices_overrides *overrides = malloc(sizeof(*overrides));
    if (!overrides)
        return rpc_status_set(status, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    struct engine_spawn_request spawn;
    if (vms_check_spawn(call, request, labels, overrides, &spawn, status) != GRPC_STATUS_OK)
        return status->code;
    struct daemon_state *daemon = call->daemon;
    uint64_t start = forkd_monotonic_ns();
    struct vm **vms;
    struct forkd_error err = {0};
    if (engine_spawn(daemon->engine, &spawn, &vms, &err) < 0)
        return convert_error(status, &err);
    uint64_t elapsed_ns = forkd_monotonic_ns() - start;
    log_info("spawned %u forks of %s (%s) in %.1f ms", spawn.count, spawn.snapshot,
             convert_enum_name(&forkd__v1__memory_backend__descriptor, (int)spawn.memory),
             elapsed_ns / 1e6);
    grpc_status_code code = vms_reply_list(call, vms, spawn.count, true, elapsed_ns, "", status);
    vm_list_free(vms, spawn.count);
    return code;
}
