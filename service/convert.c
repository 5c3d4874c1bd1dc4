/* Engine records -> proto messages, engine errors -> gRPC status (see convert.h). */
#include "convert.h"

#include <errno.h>
#include <string.h>

static void convert_page_server_stats(const struct page_server_stats *stats,
                                      Forkd__V1__PageServerStats *out)
{
    *out = (Forkd__V1__PageServerStats)FORKD__V1__PAGE_SERVER_STATS__INIT;
    out->faults_served = stats->faults_served;
    out->bytes_copied = stats->bytes_copied;
    out->pages_prefetched = stats->pages_prefetched;
    out->zero_pages = stats->zero_pages;
    out->service_p50_ns = stats->service_p50_ns;
    out->service_p99_ns = stats->service_p99_ns;
    out->service_max_ns = stats->service_max_ns;
}

static Forkd__V1__HugePages convert_huge_pages(uint64_t page_size)
{
    return page_size == VM_HUGE_PAGE_SIZE ? FORKD__V1__HUGE_PAGES__HUGE_PAGES_2M
                                          : FORKD__V1__HUGE_PAGES__HUGE_PAGES_NONE;
}

void convert_vm(struct vm *vm, struct vm_message *out)
{
    vm_get_status(vm, &out->status);
    const struct vm_status *status = &out->status;
    out->machine = (Forkd__V1__MachineConfig)FORKD__V1__MACHINE_CONFIG__INIT;
    out->machine.vcpu_count = status->vcpu_count;
    out->machine.mem_size_mib = status->mem_size_mib;
    out->machine.huge_pages = convert_huge_pages(status->page_size);
    out->vm = (Forkd__V1__Vm)FORKD__V1__VM__INIT;
    out->vm.id = out->status.id;
    out->vm.name = out->status.name;
    out->vm.state = (Forkd__V1__VmState)status->state;
    out->vm.memory_backend = (Forkd__V1__MemoryBackend)status->memory;
    out->vm.machine = &out->machine;
    out->vm.vmm_pid = status->vmm_pid;
    out->vm.api_socket_path = out->status.api_socket_path;
    out->vm.vmm_binary = out->status.vmm_binary;
    out->vm.source_snapshot = out->status.source_snapshot;
    out->vm.created_at_unix_ms = status->created_at_unix_ms;
    out->vm.exit_reason = out->status.exit_reason;
    out->vm.active_branch_id = out->status.active_branch_id;
    for (size_t i = 0; i < out->status.label_count; i++) {
        out->labels[i] = (Forkd__V1__Vm__LabelsEntry)FORKD__V1__VM__LABELS_ENTRY__INIT;
        out->labels[i].key = out->status.labels[i].key;
        out->labels[i].value = out->status.labels[i].value;
        out->label_pointers[i] = &out->labels[i];
    }
    out->vm.n_labels = out->status.label_count;
    out->vm.labels = out->label_pointers;
    device_messages_fill_vm(&out->devices, &out->status.devices, &out->vm);
    struct page_server_stats stats;
    if (vm_page_server_stats(vm, &stats) == 0) {
        convert_page_server_stats(&stats, &out->page_server);
        out->vm.page_server = &out->page_server;
    }
}

void convert_snapshot_page_server(struct page_server *server, struct snapshot_message *out)
{
    struct page_server_template_info info;
    if (page_server_template_describe(server, out->record.name, &info) < 0)
        return;
    convert_page_server_stats(&info.stats, &out->page_server);
    out->snapshot.page_server = &out->page_server;
}

void convert_snapshot_lazy_pull(struct engine *engine, struct snapshot_message *out)
{
    struct remote_lazy_status status;
    if (out->record.state != STORE_STATE_WRITING ||
        engine_lazy_pull_status(engine, out->record.name, &status) < 0)
        return;
    Forkd__V1__LazyPull *m = &out->lazy_pull;
    *m = (Forkd__V1__LazyPull)FORKD__V1__LAZY_PULL__INIT;
    m->chunks_total = status.chunks_total;
    m->chunks_zero = status.chunks_zero;
    m->chunks_fetched = status.chunks_fetched;
    m->chunks_failed = status.chunks_failed;
    m->chunks_demanded = status.chunks_demanded;
    m->hot_chunks = status.hot_chunks;
    m->hot_chunks_fetched = status.hot_chunks_fetched;
    m->hot_fetched_ns = status.hot_done_ns;
    m->bytes_fetched = status.bytes_fetched;
    m->elapsed_ns = status.elapsed_ns;
    out->snapshot.lazy_pull = m;
}

void convert_figures(const struct store_figures *figures, Forkd__V1__BranchFigures *out)
{
    *out = (Forkd__V1__BranchFigures)FORKD__V1__BRANCH_FIGURES__INIT;
    /* The proto carries the figures of the same name; the page counts travel in progress. */
    for (size_t i = 0; i < STORE_FIGURE_COUNT; i++) {
        const struct store_figure_field *figure = &store_figure_fields[i];
        const ProtobufCFieldDescriptor *field = protobuf_c_message_descriptor_get_field_by_name(
            &forkd__v1__branch_figures__descriptor, figure->name);
        if (field && field->type == PROTOBUF_C_TYPE_UINT64 &&
            field->label != PROTOBUF_C_LABEL_REPEATED)
            *(uint64_t *)((char *)out + field->offset) = store_figure_get(figures, figure);
    }
}

void convert_progress(const struct branch_progress *progress, Forkd__V1__BranchProgress *out)
{
    *out = (Forkd__V1__BranchProgress)FORKD__V1__BRANCH_PROGRESS__INIT;
    out->bytes_copied = progress->bytes_copied;
    out->bytes_total = progress->bytes_total;
    out->pages_by_fault = progress->pages_by_fault;
    out->pages_by_bulk = progress->pages_by_bulk;
    out->page_size = progress->page_size;
    out->faults_served = progress->faults_served;
    out->fault_service_p50_ns = progress->fault_service_p50_ns;
    out->fault_service_p99_ns = progress->fault_service_p99_ns;
    out->fault_service_max_ns = progress->fault_service_max_ns;
    out->faults_left_to_bulk = progress->faults_left_to_bulk;
}

static void convert_snapshot_regions(struct snapshot_message *out)
{
    const struct store_snapshot *record = &out->record;
    for (size_t i = 0; i < record->region_count && i < STORE_MAX_REGIONS; i++) {
        Forkd__V1__MemoryRegion *region = &out->regions[i];
        *region = (Forkd__V1__MemoryRegion)FORKD__V1__MEMORY_REGION__INIT;
        region->guest_phys_addr = record->regions[i].guest_phys_addr;
        region->size_bytes = record->regions[i].size;
        region->file_offset = record->regions[i].file_offset;
        region->page_size = record->regions[i].page_size;
        out->region_pointers[i] = region;
    }
    out->snapshot.n_regions = record->region_count;
    out->snapshot.regions = out->region_pointers;
    for (size_t i = 0; i < record->label_count && i < STORE_MAX_LABELS; i++) {
        out->labels[i] = (Forkd__V1__Snapshot__LabelsEntry)FORKD__V1__SNAPSHOT__LABELS_ENTRY__INIT;
        out->labels[i].key = out->record.labels[i].key;
        out->labels[i].value = out->record.labels[i].value;
        out->label_pointers[i] = &out->labels[i];
    }
    out->snapshot.n_labels = record->label_count;
    out->snapshot.labels = out->label_pointers;
}

void convert_snapshot(const struct store_snapshot *record, struct snapshot_message *out)
{
    out->record = *record;
    struct store_snapshot *r = &out->record;
    out->machine = (Forkd__V1__MachineConfig)FORKD__V1__MACHINE_CONFIG__INIT;
    out->machine.vcpu_count = r->vcpu_count;
    out->machine.mem_size_mib = r->mem_size_mib;
    out->machine.huge_pages = convert_huge_pages(r->page_size);
    convert_figures(&r->figures, &out->figures);
    out->progress = (Forkd__V1__BranchProgress)FORKD__V1__BRANCH_PROGRESS__INIT;
    out->progress.bytes_copied = r->figures.bytes_copied;
    out->progress.bytes_total = r->memory_bytes;
    out->progress.pages_by_fault = r->figures.pages_by_fault;
    out->progress.pages_by_bulk = r->figures.pages_by_bulk;
    out->progress.page_size = r->page_size;
    Forkd__V1__Snapshot *s = &out->snapshot;
    *s = (Forkd__V1__Snapshot)FORKD__V1__SNAPSHOT__INIT;
    s->name = r->name;
    s->state = convert_snapshot_state(r->state);
    s->corrupt_reason = r->corrupt_reason;
    s->source_vm_id = r->source_vm_id;
    s->source_vm_name = r->source_vm_name;
    s->parent_snapshot = r->parent_snapshot;
    s->mode = (Forkd__V1__BranchMode)r->mode;
    s->machine = &out->machine;
    s->memory_bytes = r->memory_bytes;
    s->vmstate_bytes = r->vmstate_bytes;
    s->figures = &out->figures;
    s->progress = &out->progress;
    s->vmm_binary = r->vmm_binary;
    s->vmm_version = r->vmm_version;
    s->created_at_unix_ms = r->created_at_unix_ms;
    s->path = r->path;
    s->vms_using = r->users;
    s->hot_ranges = (uint32_t)r->hot_count;
    for (size_t i = 0; i < r->hot_count; i++)
        s->hot_bytes += r->hot[i].length;
    convert_snapshot_regions(out);
    device_messages_fill_snapshot(&out->devices, &r->devices, s);
}

Forkd__V1__SnapshotState convert_snapshot_state(enum store_state state)
{
    switch (state) {
    case STORE_STATE_READY:
        return FORKD__V1__SNAPSHOT_STATE__SNAPSHOT_STATE_READY;
    case STORE_STATE_WRITING:
        return FORKD__V1__SNAPSHOT_STATE__SNAPSHOT_STATE_WRITING;
    case STORE_STATE_CORRUPT:
        return FORKD__V1__SNAPSHOT_STATE__SNAPSHOT_STATE_CORRUPT;
    }
    return FORKD__V1__SNAPSHOT_STATE__SNAPSHOT_STATE_UNSPECIFIED;
}

/* Length of the prefix every value name of descriptor shares, up to and including its last
 * '_' ("MEMORY_BACKEND_"). */
static size_t convert_enum_prefix(const ProtobufCEnumDescriptor *descriptor)
{
    const char *first = descriptor->values[0].name;
    size_t common = strlen(first);
    for (unsigned i = 1; i < descriptor->n_values; i++) {
        const char *name = descriptor->values[i].name;
        size_t same = 0;
        while (same < common && first[same] == name[same])
            same++;
        common = same;
    }
    while (common > 0 && first[common - 1] != '_')
        common--;
    return common;
}

const char *convert_enum_name(const ProtobufCEnumDescriptor *descriptor, int value)
{
    const ProtobufCEnumValue *found = protobuf_c_enum_descriptor_get_value(descriptor, value);
    return found ? found->name + convert_enum_prefix(descriptor) : NULL;
}

grpc_status_code convert_status_code(int code)
{
    switch (code) {
    case 0:
        return GRPC_STATUS_OK;
    case -EINVAL:
    case -ENAMETOOLONG:
        return GRPC_STATUS_INVALID_ARGUMENT;
    case -ENOENT:
        return GRPC_STATUS_NOT_FOUND;
    case -EEXIST:
        return GRPC_STATUS_ALREADY_EXISTS;
    case -EBUSY:
    case -EAGAIN:
    case -EOPNOTSUPP:
    case -ENODEV: /* the host cannot run VMs (no usable KVM) */
    case -EBADFD: /* the VM's state does not allow it (forkd/vm.h) */
    case -ESTALE: /* a file a snapshot references changed since (forkd/devices.h) */
        return GRPC_STATUS_FAILED_PRECONDITION;
    case -ENOSPC:
    case -EDQUOT:
    case -ENOMEM:
    case -EMFILE:
        return GRPC_STATUS_RESOURCE_EXHAUSTED;
    case -ESRCH:
    case -ECHILD:
    case -ECONNREFUSED:
    case -ECONNRESET:
    case -EPIPE:
    case -ETIMEDOUT:
    case -EREMOTEIO: /* the VMM refused the request */
        return GRPC_STATUS_UNAVAILABLE;
    case -EIO: /* a snapshot's files are corrupt or unreadable */
        return GRPC_STATUS_DATA_LOSS;
    case -ECANCELED:
        return GRPC_STATUS_CANCELLED;
    case -ENODATA: /* the guest discarded memory a live branch had yet to capture */
        return GRPC_STATUS_ABORTED;
    case -EKEYREJECTED: /* the remote store rejects the credentials */
        return GRPC_STATUS_UNAUTHENTICATED;
    case -EACCES: /* the remote store denies access */
        return GRPC_STATUS_PERMISSION_DENIED;
    default:
        return GRPC_STATUS_INTERNAL;
    }
}

grpc_status_code convert_error(struct rpc_status *status, const struct forkd_error *err)
{
    return rpc_status_set(status, convert_status_code(err->code), "%s", err->message);
}
