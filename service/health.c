/*
 * grpc.health.v1.Health: SERVING while the daemon accepts work, NOT_SERVING from the moment it
 * starts shutting down. Answers for "" (the daemon) and "forkd.v1.Forkd".
 */
#include "daemon.h"
#include "handlers.h"

#include "grpc/health/v1/health.pb-c.h"

#include <string.h>

/* How often a Watch looks at the daemon's state between checks for the client's cancel. */
#define HEALTH_WATCH_POLL_MS 50

static bool health_known_service(const char *name)
{
    return name[0] == '\0' || strcmp(name, "forkd.v1.Forkd") == 0;
}

static Grpc__Health__V1__HealthCheckResponse__ServingStatus
health_current(const struct daemon_state *daemon)
{
    return atomic_load(&daemon->shutting_down)
               ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING
               : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
}

grpc_status_code handle_health_check(struct rpc_call *call, const ProtobufCMessage *request,
                                     struct rpc_status *status)
{
    const Grpc__Health__V1__HealthCheckRequest *check =
        (const Grpc__Health__V1__HealthCheckRequest *)request;
    if (!health_known_service(check->service))
        return rpc_status_set(status, GRPC_STATUS_NOT_FOUND, "unknown service '%s'",
                              check->service);
    Grpc__Health__V1__HealthCheckResponse response = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    response.status = health_current(call->daemon);
    call_set_response(call, &response.base);
    return GRPC_STATUS_OK;
}

/* Sends the current status, then each change, until the client leaves or the call is cancelled
 * (at the end of the shutdown grace period). */
grpc_status_code handle_health_watch(struct rpc_call *call, const ProtobufCMessage *request,
                                     struct rpc_status *status)
{
    const Grpc__Health__V1__HealthCheckRequest *watch =
        (const Grpc__Health__V1__HealthCheckRequest *)request;
    Grpc__Health__V1__HealthCheckResponse response = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    response.status =
        health_known_service(watch->service)
            ? health_current(call->daemon)
            : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN;
    int sent_status = -1;
    while (!call_wait_cancelled(call, sent_status < 0 ? 0 : HEALTH_WATCH_POLL_MS)) {
        if (health_known_service(watch->service))
            response.status = health_current(call->daemon);
        if ((int)response.status == sent_status)
            continue;
        if (call_send_message(call, &response.base) < 0)
            break;
        sent_status = (int)response.status;
    }
    return rpc_status_set(status, GRPC_STATUS_CANCELLED, "health watch ended by the client");
}
