/*
 * One server call, handled start to end by one thread (thread-per-call): receiving the request,
 * sending the response or the stream of messages, the final status, and telling whether the
 * client is still there. Each call owns a pluck completion queue that only its thread reads, so
 * a blocking handler never holds up other calls or the dispatcher.
 */
#ifndef FORKD_SERVICE_CALL_H
#define FORKD_SERVICE_CALL_H

#include <grpc/grpc.h>
#include <protobuf-c/protobuf-c.h>
#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

struct server;
struct route;

struct rpc_call {
    grpc_call *call;
    grpc_completion_queue *queue; /* pluck queue bound to this call */
    grpc_call_details details;
    grpc_metadata_array request_metadata;
    struct server *server;
    void *daemon; /* the daemon's state, handed to handlers */

    char method[160];
    const struct route *route;

    int close_cancelled; /* filled by RECV_CLOSE_ON_SERVER */
    bool close_started;
    bool close_done; /* the call has ended on the transport (status sent, or cancelled) */
    bool initial_metadata_sent;
    grpc_byte_buffer *response; /* unary response, set by call_set_response */
};

/* Status a handler returns: code plus a message for the client. */
struct rpc_status {
    grpc_status_code code;
    char message[512];
};

/* Sets status and returns its code: `return rpc_status_set(st, GRPC_STATUS_NOT_FOUND, ...)`. */
grpc_status_code rpc_status_set(struct rpc_status *status, grpc_status_code code, const char *fmt,
                                ...) __attribute__((format(printf, 3, 4)));

/* Allocates a call record with its own queue, ready for grpc_server_request_call. */
struct rpc_call *call_new(struct server *server, void *daemon);
/* Releases the call (unref, queue drained and destroyed). */
void call_free(struct rpc_call *call);

/* Runs a requested call to its end: route, receive, decode, handle, send status. */
void call_serve(struct rpc_call *call);

/* Unary handlers: records the response message sent with the OK status. Returns 0 or -ENOMEM. */
int call_set_response(struct rpc_call *call, const ProtobufCMessage *message);

/* Streaming handlers: sends one message and waits until the transport took it. Returns 0, or
 * -ECANCELED once the call is gone (client cancelled or disconnected, deadline passed). */
int call_send_message(struct rpc_call *call, const ProtobufCMessage *message);

/* True once the client cancelled, disconnected or the deadline passed. Never blocks. */
bool call_is_cancelled(struct rpc_call *call);

/* Waits up to timeout_ms for the call to end on the client's side; returns true if it ended. */
bool call_wait_cancelled(struct rpc_call *call, int timeout_ms);

/* Milliseconds left before the client's deadline; INT64_MAX when it set none. */
long long call_deadline_remaining_ms(const struct rpc_call *call);

/* A handler decodes nothing and encodes nothing itself: it gets the decoded request and either
 * calls call_set_response (unary) or call_send_message per message (streaming), and returns the
 * final status. A NULL handler answers UNIMPLEMENTED. */
typedef grpc_status_code (*rpc_handler_fn)(struct rpc_call *call, const ProtobufCMessage *request,
                                           struct rpc_status *status);

#ifdef __cplusplus
}
#endif

#endif
