/*
 * The gRPC C-core server: listener set-up (Unix socket by default, TCP with TLS or an explicit
 * insecure opt-in), the dispatcher thread that accepts every call with a catch-all request and
 * hands it to a thread of its own, and the staged shutdown (stop accepting, grace, cancel).
 *
 * Threads: the dispatcher owns the server's notification queue; each call's thread owns that
 * call (see call.h); the thread that called server_start drives the shutdown functions.
 */
#ifndef FORKD_SERVICE_SERVER_H
#define FORKD_SERVICE_SERVER_H

#include "basic/error.h"

#include <stdbool.h>
#include <stddef.h>

struct server;

struct server_config {
    const char *listen_address; /* "unix:/path", "HOST:PORT" or "tcp:HOST:PORT" */
    bool insecure_tcp;          /* allow TCP without TLS */
    const char *tls_cert_path;  /* PEM; TLS on TCP when both are set */
    const char *tls_key_path;
    size_t max_message_bytes; /* largest request accepted */
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
