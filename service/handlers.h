/*
 * The RPC handlers the method table routes to, one module per group: info.c (GetInfo),
 * health.c (grpc.health.v1). Each has the rpc_handler_fn signature.
 */
#ifndef FORKD_SERVICE_HANDLERS_H
#define FORKD_SERVICE_HANDLERS_H

#include "routes.h"

grpc_status_code handle_get_info(struct rpc_call *call, const ProtobufCMessage *request,
                                 struct rpc_status *status);
grpc_status_code handle_health_check(struct rpc_call *call, const ProtobufCMessage *request,
                                     struct rpc_status *status);
grpc_status_code handle_health_watch(struct rpc_call *call, const ProtobufCMessage *request,
                                     struct rpc_status *status);

#endif
