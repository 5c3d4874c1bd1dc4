/* The snapshot RPCs: ListSnapshots, GetSnapshot, DeleteSnapshot, over the engine's store. */
#include "convert.h"
#include "daemon.h"
#include "handlers.h"
#include "log.h"
#include "paging.h"

#include <stdlib.h>

static grpc_status_code snapshots_check_name(const char *name, struct rpc_status *status)
{
    struct forkd_error err = {0};
    if (store_validate_name(name, &err) < 0)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT, "%s", err.message);
    return GRPC_STATUS_OK;
}

grpc_status_code handle_get_snapshot(struct rpc_call *call, const ProtobufCMessage *message,
                                     struct rpc_status *status)
{
    const Forkd__V1__GetSnapshotRequest *request = (const Forkd__V1__GetSnapshotRequest *)message;
    struct daemon_state *daemon = call->daemon;
    if (snapshots_check_name(request->name, status) != GRPC_STATUS_OK)
        return status->code;
    struct store_snapshot record;
    struct forkd_error err = {0};
    if (store_get(engine_store(daemon->engine), request->name, &record, &err) < 0)
        return convert_error(status, &err);
    struct snapshot_message *reply = malloc(sizeof(*reply));
    if (!reply)
        return rpc_status_set(status, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    convert_snapshot(&record, reply);
    convert_snapshot_page_server(engine_page_server(daemon->engine), reply);
    convert_snapshot_lazy_pull(daemon->engine, reply);
    int rc = call_set_response(call, &reply->snapshot.base);
    free(reply);
    return rc < 0 ? rpc_status_set(status, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory")
                  : GRPC_STATUS_OK;
}

grpc_status_code handle_list_snapshots(struct rpc_call *call, const ProtobufCMessage *message,
                                       struct rpc_status *status)
{
    const Forkd__V1__ListSnapshotsRequest *request =
        (const Forkd__V1__ListSnapshotsRequest *)message;
    struct daemon_state *daemon = call->daemon;
    struct store_snapshot *records = NULL;
    size_t count = 0;
    bool more = false;
    struct forkd_error err = {0};
    if (request->page_token[0] && store_validate_name(request->page_token, &err) < 0)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                              "page_token is not a snapshot name from an earlier page: %s",
                              err.message);
    if (store_list_page(engine_store(daemon->engine), request->page_token, paging_size(request->page_size),
                        &records, &count, &more, &err) < 0)
        return convert_error(status, &err);
    struct snapshot_message *messages = calloc(count ? count : 1, sizeof(*messages));
    Forkd__V1__Snapshot **pointers = calloc(count ? count : 1, sizeof(*pointers));
    grpc_status_code code = GRPC_STATUS_OK;
    if (!messages || !pointers) {
        code = rpc_status_set(status, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    } else {
        for (size_t i = 0; i < count; i++) {
            convert_snapshot(&records[i], &messages[i]);
            convert_snapshot_page_server(engine_page_server(daemon->engine), &messages[i]);
            convert_snapshot_lazy_pull(daemon->engine, &messages[i]);
            pointers[i] = &messages[i].snapshot;
        }
        Forkd__V1__ListSnapshotsResponse response = FORKD__V1__LIST_SNAPSHOTS_RESPONSE__INIT;
        response.n_snapshots = count;
        response.snapshots = pointers;
        response.next_page_token = more && count ? records[count - 1].name : "";
        if (call_set_response(call, &response.base) < 0)
            code = rpc_status_set(status, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    }
    free(pointers);
    free(messages);
    free(records);
    return code;
}

grpc_status_code handle_delete_snapshot(struct rpc_call *call, const ProtobufCMessage *message,
                                        struct rpc_status *status)
{
    const Forkd__V1__DeleteSnapshotRequest *request =
        (const Forkd__V1__DeleteSnapshotRequest *)message;
    struct daemon_state *daemon = call->daemon;
    if (snapshots_check_name(request->name, status) != GRPC_STATUS_OK)
        return status->code;
    struct forkd_error err = {0};
    if (engine_delete_snapshot(daemon->engine, request->name, request->force, &err) < 0)
        return convert_error(status, &err);
    log_info("deleted snapshot %s%s", request->name, request->force ? " (forced)" : "");
    Forkd__V1__DeleteSnapshotResponse response = FORKD__V1__DELETE_SNAPSHOT_RESPONSE__INIT;
    call_set_response(call, &response.base);
    return GRPC_STATUS_OK;
}
