/*
 * The gRPC C-core server: listener set-up (Unix socket by default, TCP with TLS or an explicit
 * insecure opt-in), the dispatcher, the bounded worker pool, and the staged shutdown (stop
 * accepting, grace, cancel).
 *
 * Design: one completion queue, read by one dispatcher thread that never blocks, two I/O
 * threads, and a bounded pool of worker threads (workers.h).
 * - The dispatcher accepts every call with a catch-all request, starts its receive and close
 *   watch, and goes on: a call whose request has not arrived costs a small record, no thread.
 *   Idle streams and HTTP/2 rapid resets (HEADERS then RST_STREAM) therefore cost no thread and
 *   no thread start. A request that does not arrive within --request-timeout-ms ends the call
 *   with DEADLINE_EXCEEDED.
 * - Calls in flight are bounded by two budgets, unary (--max-calls) and streaming
 *   (--max-streams), so long-lived streams (Branch, WatchBranch, health Watch) can never take
 *   every place and starve unary calls. A call is counted once its request is in (from then on
 *   it holds a thread); beyond its budget it gets RESOURCE_EXHAUSTED at once. Calls still
 *   waiting for their request are bounded apart (4 x both budgets): they cost no thread, and
 *   counting them in the budgets would let a client that opens streams and sends nothing
 *   refuse service to everyone else for the request deadline. Each HTTP/2 connection may open
 *   a limited number of streams (GRPC_ARG_MAX_CONCURRENT_STREAMS), so one connection cannot
 *   fill even that bound.
 * - Once its request is in, a call runs on a worker thread, because handlers block (a Boot or a
 *   Branch waits seconds on a VMM); an event-driven handler would push that waiting into the
 *   engine. The pool has at most as many threads as both budgets together, so it never has to
 *   refuse an admitted call, and idle threads exit after a while.
 * - Every batch of every call completes on the one queue; the dispatcher hands each completion
 *   to its call (call.h), whose worker waits on the call's own condition variable.
 * - gRPC C core reads, parses and writes connections on the threads that wait on a polling
 *   completion queue. The dispatcher's queue does not poll; two I/O threads wait on a second
 *   queue that never gets an event. When the dispatcher did the I/O itself, a rapid-reset
 *   flood (thousands of HEADERS+RST_STREAM per read, each making and killing a call) kept it
 *   busy for the whole flood and every other caller waited behind it; now the flood holds one
 *   I/O thread (a connection is processed by one thread at a time), the other serves the other
 *   connections, and the dispatcher only dispatches.
 *
 * - Request memory: gRPC 1.51 checks --max-message-bytes only once a message is whole, and
 *   its transport grants flow-control window up to the length a message declares, so one
 *   client can make forkd buffer gigabytes before it is refused. The server's resource
 *   quota (--max-receive-memory-bytes) bounds what every connection together may buffer:
 *   near it the transport reads less, beyond it it cancels streams (RESOURCE_EXHAUSTED,
 *   "Buffers full") until memory is back under the quota. The quota is soft (checked as
 *   memory is taken), so the peak can pass it by what one read brings in.
 *
 * Threads: the dispatcher owns the queue and the calls without a worker; the I/O threads own
 * nothing of forkd's (they run gRPC's transport code); a worker owns its call
 * until it frees it; the thread that called server_start drives the shutdown functions.
 */
#ifndef FORKD_SERVICE_SERVER_H
#define FORKD_SERVICE_SERVER_H

#include "basic/error.h"

#include <stdbool.h>
#include <stddef.h>

struct server;

struct server_config {
    const char *listen_address; /* "unix:/path", "HOST:PORT" or "tcp:HOST:PORT" (listen.h) */
    bool insecure_tcp;          /* allow TCP without TLS */
    bool allow_abstract_socket; /* allow abstract Unix socket names */
    const char *tls_cert_path;  /* PEM; TLS on TCP when both are set */
    const char *tls_key_path;
    const char *tls_client_ca_path; /* PEM; client certificates must chain to it */
    bool tls_no_client_auth;        /* explicit opt-in to server-only TLS */
    size_t max_message_bytes; /* largest request accepted */
    /* Memory requests still arriving may hold, every connection together (a gRPC resource
     * quota: beyond it the transport slows its reads and cancels streams). */
    size_t max_receive_memory_bytes;
    unsigned max_calls;          /* unary calls in flight; more are refused */
    unsigned max_streams;        /* streaming calls in flight; more are refused */
    unsigned request_timeout_ms; /* a call's request message must arrive within this */
    void *daemon;             /* handed to every handler */
};

/* Binds, starts the dispatcher. Returns 0 or a negative errno with the reason in err. */
int server_start(const struct server_config *config, struct server **out, struct forkd_error *err);

/* Stops accepting calls; calls already running go on. */
void server_begin_shutdown(struct server *server);

/* Waits until no call is running, up to timeout_ms (< 0: no limit). True when idle. */
bool server_wait_idle(struct server *server, int timeout_ms);

/* Cancels every running call; their handlers see call_is_cancelled() and return. */
void server_cancel_all(struct server *server);

/* After server_begin_shutdown and once idle: joins the dispatcher and releases everything. */
void server_destroy(struct server *server);

#endif
