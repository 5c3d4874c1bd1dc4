/*
 * The RPC handlers the method table routes to, one module per group: info.c (GetInfo),
 * health.c (grpc.health.v1), vms.c (Boot, Spawn, ListVms, GetVm, StopVm), snapshots.c
 * (ListSnapshots, GetSnapshot, DeleteSnapshot), branches.c (Branch, WatchBranch), remotes.c
 * (Push, Pull, ListRemote, DeleteRemote). Each has the
 * rpc_handler_fn signature (call.h).
 */
#ifndef FORKD_SERVICE_HANDLERS_H
#define FORKD_SERVICE_HANDLERS_H

#include "call.h"

grpc_status_code handle_get_info(struct rpc_call *call, const ProtobufCMessage *request,
                                 struct rpc_status *status);
grpc_status_code handle_health_check(struct rpc_call *call, const ProtobufCMessage *request,
                                     struct rpc_status *status);
grpc_status_code handle_health_watch(struct rpc_call *call, const ProtobufCMessage *request,
                                     struct rpc_status *status);

#define FORKD_HANDLER(name)                                                                        \
    grpc_status_code name(struct rpc_call *call, const ProtobufCMessage *request,                  \
                          struct rpc_status *status)

FORKD_HANDLER(handle_boot);
FORKD_HANDLER(handle_spawn);
FORKD_HANDLER(handle_list_vms);
FORKD_HANDLER(handle_get_vm);
FORKD_HANDLER(handle_stop_vm);
FORKD_HANDLER(handle_list_snapshots);
FORKD_HANDLER(handle_get_snapshot);
FORKD_HANDLER(handle_delete_snapshot);
FORKD_HANDLER(handle_branch);
FORKD_HANDLER(handle_watch_branch);
/* remotes.c: the remote-snapshot RPCs */
FORKD_HANDLER(handle_push);
FORKD_HANDLER(handle_pull);
FORKD_HANDLER(handle_list_remote);
FORKD_HANDLER(handle_delete_remote);

#endif
