/*
 * Engine records -> proto messages, and engine errors -> gRPC status. Each *_message holder
 * owns the storage of one message and its sub-messages, so handlers build responses without
 * per-field allocation; the record it was filled from is copied inside and outlives it.
 */
#ifndef FORKD_SERVICE_CONVERT_H
#define FORKD_SERVICE_CONVERT_H

#include "call.h"
#include "device_messages.h"

#include "forkd/branch.h"
#include "forkd/engine.h"
#include "basic/error.h"
#include "forkd/page_server.h"
#include "forkd/store.h"
#include "forkd/vm.h"
#include "forkd/v1/forkd.pb-c.h"

struct vm_message {
    Forkd__V1__Vm vm;
    Forkd__V1__MachineConfig machine;
    Forkd__V1__Vm__LabelsEntry labels[VM_MAX_LABELS];
    Forkd__V1__Vm__LabelsEntry *label_pointers[VM_MAX_LABELS];
    Forkd__V1__PageServerStats page_server;
    struct vm_status status;
    struct device_messages devices;
};

struct snapshot_message {
    Forkd__V1__Snapshot snapshot;
    Forkd__V1__MachineConfig machine;
    Forkd__V1__BranchFigures figures;
    Forkd__V1__BranchProgress progress;
    Forkd__V1__MemoryRegion regions[STORE_MAX_REGIONS];
    Forkd__V1__MemoryRegion *region_pointers[STORE_MAX_REGIONS];
    Forkd__V1__Snapshot__LabelsEntry labels[STORE_MAX_LABELS];
    Forkd__V1__Snapshot__LabelsEntry *label_pointers[STORE_MAX_LABELS];
    Forkd__V1__PageServerStats page_server;
    Forkd__V1__LazyPull lazy_pull;
    struct store_snapshot record;
    struct device_messages devices;
};

/* Adds a template's page-server figures to a snapshot message (when it has UFFD forks). */
void convert_snapshot_page_server(struct page_server *server, struct snapshot_message *out);

/* Adds the progress of the lazy pull filling a WRITING snapshot (when one is). */
void convert_snapshot_lazy_pull(struct engine *engine, struct snapshot_message *out);

void convert_vm(struct vm *vm, struct vm_message *out);
void convert_snapshot(const struct store_snapshot *record, struct snapshot_message *out);
void convert_figures(const struct store_figures *figures, Forkd__V1__BranchFigures *out);
void convert_progress(const struct branch_progress *progress, Forkd__V1__BranchProgress *out);

/* The proto's state for a store state. */
Forkd__V1__SnapshotState convert_snapshot_state(enum store_state state);

/* The proto's name of an enum value without the prefix its values share
 * ("MEMORY_BACKEND_ANONYMOUS" -> "ANONYMOUS"), for messages: they name backends and modes, never
 * their numbers. NULL for a value the proto does not define. */
const char *convert_enum_name(const ProtobufCEnumDescriptor *descriptor, int value);

/* The gRPC code for an engine error code (negative errno). */
grpc_status_code convert_status_code(int code);

/* Fills status from an engine error; returns the code. */
grpc_status_code convert_error(struct rpc_status *status, const struct forkd_error *err);

#endif
