/*
 * One server call, start to end. Until its request message has arrived a call costs no thread:
 * the dispatcher (server.c) accepts it, starts the receive and the close watch, and refuses or
 * times it out without blocking. Once the request is in, one worker thread (workers.h) runs it
 * to its end: decode, handler, response or stream, final status.
 *
 * Every batch of every call completes on the server's one completion queue, read only by the
 * dispatcher; it hands each completion to the call (call_complete), whose worker waits for it on
 * the call's condition variable. So a blocking handler never holds up other calls or the
 * dispatcher, and the dispatcher never waits for a handler.
 */
#ifndef FORKD_SERVICE_CALL_H
#define FORKD_SERVICE_CALL_H

#include <grpc/grpc.h>
#include <protobuf-c/protobuf-c.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct server;
struct route;

/* The batches a call runs; each has its own tag, at most one of each kind in flight. */
enum call_op { CALL_OP_NEW, CALL_OP_CLOSE, CALL_OP_RECV, CALL_OP_SEND, CALL_OP_FINISH, CALL_OPS };

/* What a completion queue event's tag points to. */
struct call_tag {
    struct rpc_call *call;
    enum call_op op;
};

struct rpc_call {
    grpc_call *call;
    grpc_completion_queue *queue; /* the server's queue, where this call's batches complete */
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

    /* Completion bookkeeping, shared by the dispatcher and the call's worker. */
    pthread_mutex_t lock;
    pthread_cond_t changed;
    struct call_tag tags[CALL_OPS];
    unsigned pending; /* batches started and not yet delivered */
    unsigned done;    /* bit per enum call_op: delivered since started */
    unsigned ok;      /* bit per enum call_op: delivered with success */
    grpc_byte_buffer *request; /* the request message, once received */

    /* Owned by the dispatcher (server.c). */
    bool streaming;                 /* counted against the streaming budget */
    bool has_worker;                /* handed to a worker, which frees it */
    bool admitted;                  /* counted in a budget */
    uint64_t request_deadline_ns;   /* CLOCK_MONOTONIC; the request must arrive before it */
    struct rpc_call *waiting_prev;  /* list of calls whose request is not in yet */
    struct rpc_call *waiting_next;
    struct rpc_call *worker_next;   /* queue of calls waiting for a worker (workers.c) */
};

/* Status a handler returns: code plus a message for the client. */
struct rpc_status {
    grpc_status_code code;
    char message[512];
};

/* Sets status and returns its code: `return rpc_status_set(st, GRPC_STATUS_NOT_FOUND, ...)`. */
grpc_status_code rpc_status_set(struct rpc_status *status, grpc_status_code code, const char *fmt,
                                ...) __attribute__((format(printf, 3, 4)));

/* Allocates a call record whose batches complete on queue, ready for grpc_server_request_call
 * (with &call->tags[CALL_OP_NEW] as its tag). */
struct rpc_call *call_new(struct server *server, void *daemon, grpc_completion_queue *queue);
/* Releases the call. Only once call_quiet() is true: no batch of it is still pending. */
void call_free(struct rpc_call *call);

/* Dispatcher, on a new call: reads its method and finds its route (NULL when unknown). */
void call_identify(struct rpc_call *call);

/* Dispatcher, on an identified call: starts the close watch and the receive of the
 * request. Returns 0, or the status to refuse the call with (then status is filled). Never
 * blocks. */
int call_accept(struct rpc_call *call, struct rpc_status *status);

/* Dispatcher: ends a call that has no worker with status (sent to the client), never blocking. */
void call_refuse(struct rpc_call *call, grpc_status_code code, const char *message);

/* Dispatcher: records the delivery of one of the call's batches and wakes its worker. */
void call_complete(struct rpc_call *call, enum call_op op, bool success);

/* True once no batch of the call is pending (then it may be freed when no worker has it). */
bool call_quiet(struct rpc_call *call);

/* Worker: runs a call whose request has arrived to its end: decode, handle, send status, and
 * waits until no batch of it is pending. */
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
