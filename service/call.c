/* One server call, start to end, on its own thread and pluck queue (see call.h). */
#include "call.h"

#include "glue.h"
#include "log.h"
#include "routes.h"

#include <errno.h>
#include <grpc/support/time.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Each call has its own queue, so small constant tags are unique among its pending batches. */
#define TAG_CLOSE  ((void *)1)
#define TAG_RECV   ((void *)2)
#define TAG_SEND   ((void *)3)
#define TAG_FINISH ((void *)4)

grpc_status_code rpc_status_set(struct rpc_status *status, grpc_status_code code, const char *fmt,
                                ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(status->message, sizeof(status->message), fmt, ap);
    va_end(ap);
    status->code = code;
    return code;
}

struct rpc_call *call_new(struct server *server, void *daemon)
{
    struct rpc_call *call = calloc(1, sizeof(*call));
    if (!call)
        return NULL;
    call->queue = grpc_completion_queue_create_for_pluck(NULL);
    call->server = server;
    call->daemon = daemon;
    grpc_call_details_init(&call->details);
    grpc_metadata_array_init(&call->request_metadata);
    return call;
}

/* Waits for one batch of this call. Returns the batch's success flag. */
static bool call_wait(struct rpc_call *call, void *tag)
{
    grpc_event event =
        grpc_completion_queue_pluck(call->queue, tag, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
    return event.type == GRPC_OP_COMPLETE && event.success;
}

void call_free(struct rpc_call *call)
{
    if (!call)
        return;
    if (call->call)
        grpc_call_unref(call->call);
    if (call->response)
        grpc_byte_buffer_destroy(call->response);
    grpc_call_details_destroy(&call->details);
    grpc_metadata_array_destroy(&call->request_metadata);
    grpc_completion_queue_shutdown(call->queue);
    /* A pluck queue reports SHUTDOWN only once every pending batch was delivered. */
    while (grpc_completion_queue_pluck(call->queue, NULL, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL)
               .type != GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(call->queue);
    free(call);
}

static int call_start_batch(struct rpc_call *call, const grpc_op *ops, size_t count, void *tag)
{
    grpc_call_error rc = grpc_call_start_batch(call->call, ops, count, tag, NULL);
    if (rc != GRPC_CALL_OK) {
        /* A batch whose start fails never delivers its tag: do not wait for it. */
        log_error("%s: grpc_call_start_batch failed (%d)", call->method, (int)rc);
        return -EIO;
    }
    return 0;
}

/* Watches for the end of the call on the client's side: cancellation, disconnect, deadline. */
static void call_start_close_watch(struct rpc_call *call)
{
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &call->close_cancelled;
    call->close_started = call_start_batch(call, &op, 1, TAG_CLOSE) == 0;
}

bool call_is_cancelled(struct rpc_call *call)
{
    return call_wait_cancelled(call, 0);
}

bool call_wait_cancelled(struct rpc_call *call, int timeout_ms)
{
    if (call->close_done || !call->close_started)
        return true;
    gpr_timespec deadline = timeout_ms <= 0
                                ? gpr_inf_past(GPR_CLOCK_MONOTONIC)
                                : gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                               gpr_time_from_millis(timeout_ms, GPR_TIMESPAN));
    grpc_event event = grpc_completion_queue_pluck(call->queue, TAG_CLOSE, deadline, NULL);
    if (event.type == GRPC_OP_COMPLETE)
        call->close_done = true;
    return call->close_done;
}

long long call_deadline_remaining_ms(const struct rpc_call *call)
{
    gpr_timespec deadline = gpr_convert_clock_type(call->details.deadline, GPR_CLOCK_MONOTONIC);
    if (gpr_time_cmp(deadline, gpr_inf_future(GPR_CLOCK_MONOTONIC)) == 0)
        return INT64_MAX;
    gpr_timespec left = gpr_time_sub(deadline, gpr_now(GPR_CLOCK_MONOTONIC));
    return (long long)gpr_time_to_millis(left);
}

int call_set_response(struct rpc_call *call, const ProtobufCMessage *message)
{
    if (call->response)
        grpc_byte_buffer_destroy(call->response);
    call->response = glue_pack(message);
    return call->response ? 0 : -ENOMEM;
}

static void call_add_initial_metadata(struct rpc_call *call, grpc_op *ops, size_t *count)
{
    if (call->initial_metadata_sent)
        return;
    grpc_op *op = &ops[(*count)++];
    memset(op, 0, sizeof(*op));
    op->op = GRPC_OP_SEND_INITIAL_METADATA;
    call->initial_metadata_sent = true;
}

int call_send_message(struct rpc_call *call, const ProtobufCMessage *message)
{
    if (call_is_cancelled(call))
        return -ECANCELED;
    grpc_byte_buffer *buffer = glue_pack(message);
    if (!buffer)
        return -ENOMEM;
    grpc_op ops[2];
    size_t count = 0;
    call_add_initial_metadata(call, ops, &count);
    memset(&ops[count], 0, sizeof(ops[count]));
    ops[count].op = GRPC_OP_SEND_MESSAGE;
    ops[count].data.send_message.send_message = buffer;
    count++;
    int rc = call_start_batch(call, ops, count, TAG_SEND);
    bool sent = rc == 0 && call_wait(call, TAG_SEND);
    grpc_byte_buffer_destroy(buffer);
    return sent ? 0 : -ECANCELED;
}

/* Receives the single request message; NULL when the client sent none or went away. */
static grpc_byte_buffer *call_recv_request(struct rpc_call *call)
{
    grpc_byte_buffer *payload = NULL;
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &payload;
    if (call_start_batch(call, &op, 1, TAG_RECV) < 0 || !call_wait(call, TAG_RECV)) {
        if (payload)
            grpc_byte_buffer_destroy(payload);
        return NULL;
    }
    return payload;
}

static void call_finish(struct rpc_call *call, const struct rpc_status *status)
{
    grpc_op ops[3];
    size_t count = 0;
    call_add_initial_metadata(call, ops, &count);
    if (status->code == GRPC_STATUS_OK && call->response) {
        memset(&ops[count], 0, sizeof(ops[count]));
        ops[count].op = GRPC_OP_SEND_MESSAGE;
        ops[count].data.send_message.send_message = call->response;
        count++;
    }
    grpc_slice details = grpc_slice_from_copied_string(status->message);
    memset(&ops[count], 0, sizeof(ops[count]));
    ops[count].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[count].data.send_status_from_server.status = status->code;
    ops[count].data.send_status_from_server.status_details = &details;
    count++;
    if (call_start_batch(call, ops, count, TAG_FINISH) == 0)
        call_wait(call, TAG_FINISH);
    grpc_slice_unref(details);
}

static void call_copy_method(struct rpc_call *call)
{
    size_t length = GRPC_SLICE_LENGTH(call->details.method);
    if (length >= sizeof(call->method))
        length = sizeof(call->method) - 1;
    memcpy(call->method, GRPC_SLICE_START_PTR(call->details.method), length);
    call->method[length] = '\0';
}

/* Decodes the request and runs the handler; fills status. */
static void call_dispatch(struct rpc_call *call, struct rpc_status *status)
{
    const struct route *route = call->route;
    grpc_byte_buffer *payload = call_recv_request(call);
    if (!payload && call_is_cancelled(call)) {
        rpc_status_set(status, GRPC_STATUS_CANCELLED, "%s: call ended before its request arrived",
                       call->method);
        return;
    }
    ProtobufCMessage *request = NULL;
    char err[256];
    int rc = glue_unpack(route->method->input, payload, &request, err, sizeof(err));
    if (payload)
        grpc_byte_buffer_destroy(payload);
    if (rc < 0) {
        rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT, "%s: %s", call->method, err);
        return;
    }
    route->handler(call, request, status);
    protobuf_c_message_free_unpacked(request, NULL);
}

void call_serve(struct rpc_call *call)
{
    call_copy_method(call);
    call_start_close_watch(call);
    struct rpc_status status = {.code = GRPC_STATUS_OK, .message = ""};
    call->route = routes_find(call->method);
    if (!call->route)
        rpc_status_set(&status, GRPC_STATUS_UNIMPLEMENTED, "unknown method %s", call->method);
    else if (!call->route->handler)
        rpc_status_set(&status, GRPC_STATUS_UNIMPLEMENTED, "%s is not implemented in forkd %s yet",
                       call->method, FORKD_VERSION);
    else
        call_dispatch(call, &status);
    log_debug("%s -> %d %s", call->method, (int)status.code, status.message);
    call_finish(call, &status);
    if (call->close_started && !call->close_done)
        call_wait(call, TAG_CLOSE);
}
