/* The method table (see routes.h). Built once at start-up, read-only afterwards. */
#include "routes.h"

#include "handlers.h"

#include "forkd/v1/forkd.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"

#include "basic/cleanup.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

struct route_entry {
    const ProtobufCServiceDescriptor *service;
    const char *method;
    bool server_streaming;
    rpc_handler_fn handler; /* NULL answers UNIMPLEMENTED */
};

static const struct route_entry route_entries[] = {
    {&forkd__v1__forkd__descriptor, "Boot", false, handle_boot},
    {&forkd__v1__forkd__descriptor, "Spawn", false, handle_spawn},
    {&forkd__v1__forkd__descriptor, "Branch", true, handle_branch},
    {&forkd__v1__forkd__descriptor, "WatchBranch", true, handle_watch_branch},
    {&forkd__v1__forkd__descriptor, "ListVms", false, handle_list_vms},
    {&forkd__v1__forkd__descriptor, "GetVm", false, handle_get_vm},
    {&forkd__v1__forkd__descriptor, "StopVm", false, handle_stop_vm},
    {&forkd__v1__forkd__descriptor, "ListSnapshots", false, handle_list_snapshots},
    {&forkd__v1__forkd__descriptor, "GetSnapshot", false, handle_get_snapshot},
    {&forkd__v1__forkd__descriptor, "DeleteSnapshot", false, handle_delete_snapshot},
    {&forkd__v1__forkd__descriptor, "GetInfo", false, handle_get_info},
    {&forkd__v1__forkd__descriptor, "Push", true, handle_push},
    {&forkd__v1__forkd__descriptor, "Pull", true, handle_pull},
    {&forkd__v1__forkd__descriptor, "ListRemote", false, handle_list_remote},
    {&forkd__v1__forkd__descriptor, "DeleteRemote", false, handle_delete_remote},
    {&grpc__health__v1__health__descriptor, "Check", false, handle_health_check},
    {&grpc__health__v1__health__descriptor, "Watch", true, handle_health_watch},
};

#define ROUTE_COUNT (ARRAY_SIZE(route_entries))

static const ProtobufCServiceDescriptor *const served_services[] = {
    &forkd__v1__forkd__descriptor,
    &grpc__health__v1__health__descriptor,
};

static struct route routes[ROUTE_COUNT];
static size_t route_count;

static const struct route_entry *routes_entry_for(const ProtobufCServiceDescriptor *service,
                                                  const char *method)
{
    for (size_t i = 0; i < ROUTE_COUNT; i++)
        if (route_entries[i].service == service && strcmp(route_entries[i].method, method) == 0)
            return &route_entries[i];
    return NULL;
}

static int routes_add_service(const ProtobufCServiceDescriptor *service, struct forkd_error *err)
{
    for (unsigned m = 0; m < service->n_methods; m++) {
        const ProtobufCMethodDescriptor *method = &service->methods[m];
        const struct route_entry *entry = routes_entry_for(service, method->name);
        if (!entry)
            return forkd_error_set(err, -EINVAL, "method %s/%s has no entry in the route table",
                                   service->name, method->name);
        struct route *route = &routes[route_count++];
        snprintf(route->path, sizeof(route->path), "/%s/%s", service->name, method->name);
        route->service = service;
        route->method = method;
        route->server_streaming = entry->server_streaming;
        route->handler = entry->handler;
    }
    return 0;
}

int routes_init(struct forkd_error *err)
{
    route_count = 0;
    for (size_t s = 0; s < ARRAY_SIZE(served_services); s++) {
        int rc = routes_add_service(served_services[s], err);
        if (rc < 0)
            return rc;
    }
    if (route_count != ROUTE_COUNT)
        return forkd_error_set(err, -EINVAL,
                               "route table has %zu entries but the services have %zu methods",
                               (size_t)ROUTE_COUNT, route_count);
    return 0;
}

const struct route *routes_find(const char *path)
{
    for (size_t i = 0; i < route_count; i++)
        if (strcmp(routes[i].path, path) == 0)
            return &routes[i];
    return NULL;
}

const struct route *routes_at(size_t index)
{
    return index < route_count ? &routes[index] : NULL;
}
