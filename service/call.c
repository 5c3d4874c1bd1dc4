/* One server call, start to end: accepted by the dispatcher, run by a worker (see call.h). */
#include "call.h"

#include "glue.h"
#include "log.h"
#include "routes.h"

#include "basic/clock.h"

#include <errno.h>
#include <grpc/support/time.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

grpc_status_code rpc_status_set(struct rpc_status *status, grpc_status_code code, const char *fmt,
                                ...)
{
    char raw[sizeof(status->message)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(raw, sizeof(raw), fmt, ap);
    va_end(ap);
    log_escape(raw, status->message, sizeof(status->message));
    status->code = code;
    return code;
}

struct rpc_call *call_new(struct server *server, void *daemon, grpc_completion_queue *queue)
{
    struct rpc_call *call = calloc(1, sizeof(*call));
    if (!call)
        return NULL;
    call->queue = queue;
    call->server = server;
    call->daemon = daemon;
    pthread_mutex_init(&call->lock, NULL);
    pthread_cond_init(&call->changed, NULL);
    for (int op = 0; op < CALL_OPS; op++)
        call->tags[op] = (struct call_tag){.call = call, .op = (enum call_op)op};
    grpc_call_details_init(&call->details);
    grpc_metadata_array_init(&call->request_metadata);
    return call;
}

void call_complete(struct rpc_call *call, enum call_op op, bool success)
{
    pthread_mutex_lock(&call->lock);
    call->done |= 1u << op;
    if (success)
        call->ok |= 1u << op;
    if (op == CALL_OP_CLOSE)
        call->close_done = true;
    if (call->pending > 0)
        call->pending--;
    pthread_cond_broadcast(&call->changed);
    pthread_mutex_unlock(&call->lock);
}

bool call_quiet(struct rpc_call *call)
{
    pthread_mutex_lock(&call->lock);
    bool quiet = call->pending == 0;
    pthread_mutex_unlock(&call->lock);
    return quiet;
}

/* Waits for the batch op of this call to be delivered. Returns its success flag. */
static bool call_wait(struct rpc_call *call, enum call_op op)
{
    pthread_mutex_lock(&call->lock);
    while (!(call->done & (1u << op)))
        pthread_cond_wait(&call->changed, &call->lock);
    bool ok = call->ok & (1u << op);
    pthread_mutex_unlock(&call->lock);
    return ok;
}

/* Waits until no batch of the call is pending. */
static void call_wait_quiet(struct rpc_call *call)
{
    pthread_mutex_lock(&call->lock);
    while (call->pending > 0)
        pthread_cond_wait(&call->changed, &call->lock);
    pthread_mutex_unlock(&call->lock);
}

void call_free(struct rpc_call *call)
{
    if (!call)
        return;
    if (call->call)
        grpc_call_unref(call->call);
    if (call->response)
        grpc_byte_buffer_destroy(call->response);
    if (call->request)
        grpc_byte_buffer_destroy(call->request);
    grpc_call_details_destroy(&call->details);
    grpc_metadata_array_destroy(&call->request_metadata);
    pthread_mutex_destroy(&call->lock);
    pthread_cond_destroy(&call->changed);
    free(call);
}

static int call_start_batch(struct rpc_call *call, const grpc_op *ops, size_t count,
                            enum call_op op)
{
    /* Counted before the start: the completion may be delivered before grpc returns. */
    pthread_mutex_lock(&call->lock);
    call->pending++;
    call->done &= ~(1u << op);
    call->ok &= ~(1u << op);
    pthread_mutex_unlock(&call->lock);
    grpc_call_error rc = grpc_call_start_batch(call->call, ops, count, &call->tags[op], NULL);
    if (rc != GRPC_CALL_OK) {
        /* A batch whose start fails never delivers its tag: do not wait for it. */
        log_error("%s: grpc_call_start_batch failed (%d)", call->method, (int)rc);
        call_complete(call, op, false);
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
    call->close_started = call_start_batch(call, &op, 1, CALL_OP_CLOSE) == 0;
}

bool call_is_cancelled(struct rpc_call *call)
{
    return call_wait_cancelled(call, 0);
}

bool call_wait_cancelled(struct rpc_call *call, int timeout_ms)
{
    if (!call->close_started)
        return true;
    struct timespec deadline = forkd_realtime_after_ms(timeout_ms > 0 ? timeout_ms : 0);
    pthread_mutex_lock(&call->lock);
    while (!call->close_done && timeout_ms > 0 &&
           pthread_cond_timedwait(&call->changed, &call->lock, &deadline) != ETIMEDOUT) {
    }
    bool ended = call->close_done;
    pthread_mutex_unlock(&call->lock);
    return ended;
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
    int rc = call_start_batch(call, ops, count, CALL_OP_SEND);
    bool sent = rc == 0 && call_wait(call, CALL_OP_SEND);
    grpc_byte_buffer_destroy(buffer);
    return sent ? 0 : -ECANCELED;
}

/* Starts receiving the single request message; the dispatcher learns when it is in. */
static int call_start_recv_request(struct rpc_call *call)
{
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &call->request;
    return call_start_batch(call, &op, 1, CALL_OP_RECV);
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
    if (call_start_batch(call, ops, count, CALL_OP_FINISH) == 0)
        call_wait(call, CALL_OP_FINISH);
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
    ProtobufCMessage *request = NULL;
    struct forkd_error err = {0};
    int rc = glue_unpack(route->method->input, call->request, &request, &err);
    grpc_byte_buffer_destroy(call->request);
    call->request = NULL;
    if (rc < 0) {
        rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT, "%s: %s", call->method, err.message);
        return;
    }
    route->handler(call, request, status);
    protobuf_c_message_free_unpacked(request, NULL);
}

void call_identify(struct rpc_call *call)
{
    call_copy_method(call);
    call->route = routes_find(call->method);
}

int call_accept(struct rpc_call *call, struct rpc_status *status)
{
    if (!call->route)
        return rpc_status_set(status, GRPC_STATUS_UNIMPLEMENTED, "unknown method %s",
                              call->method);
    if (!call->route->handler)
        return rpc_status_set(status, GRPC_STATUS_UNIMPLEMENTED,
                              "%s is not implemented in forkd %s yet", call->method,
                              FORKD_VERSION);
    call_start_close_watch(call);
    if (call_start_recv_request(call) < 0)
        return rpc_status_set(status, GRPC_STATUS_INTERNAL, "%s: cannot receive the request",
                              call->method);
    return 0;
}

void call_refuse(struct rpc_call *call, grpc_status_code code, const char *message)
{
    log_debug("%s -> %d %s", call->method[0] ? call->method : "call", (int)code, message);
    /* Sends the status and ends the call without a batch: nothing to wait for. */
    grpc_call_cancel_with_status(call->call, code, message, NULL);
}

void call_serve(struct rpc_call *call)
{
    struct rpc_status status = {.code = GRPC_STATUS_OK, .message = ""};
    call_dispatch(call, &status);
    log_debug("%s -> %d %s", call->method, (int)status.code, status.message);
    call_finish(call, &status);
    call_wait_quiet(call);
}
