/* The gRPC C-core server (see server.h). */
#include "server.h"

#include "call.h"
#include "listen.h"
#include "log.h"
#include "routes.h"
#include "workers.h"

#include "basic/cleanup.h"
#include "basic/clock.h"
#include "basic/fsutil.h"

#include <errno.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>

#define SHUTDOWN_TAG ((void *)1)

/* How often the dispatcher wakes without events, to time out requests that do not arrive. */
#define DISPATCH_TICK_MS 50
/* A worker thread with nothing to do for this long exits. */
#define WORKER_IDLE_MS 30000
/* Threads that do gRPC's I/O (read, parse, write every connection). One busy connection (a
 * rapid-reset flood: thousands of HEADERS+RST_STREAM per read) holds one of them. */
#define SERVER_POLLERS 2
/* Streams one HTTP/2 connection may have open at once (further ones wait in the client). */
#define MAX_STREAMS_PER_CONNECTION 64

struct server {
    grpc_server *grpc;
    grpc_completion_queue *queue;      /* new calls and every batch of every call; never polled */
    grpc_completion_queue *poll_queue; /* polled by the I/O threads; no event but its end */
    pthread_t dispatcher;
    pthread_t pollers[SERVER_POLLERS];
    unsigned poller_count;
    struct worker_pool *workers;
    void *daemon;
    char unix_path[sizeof(((struct sockaddr_un *)0)->sun_path)];

    /* Dispatcher only. */
    struct rpc_call *waiting_head; /* calls whose request is not in, oldest (first due) first */
    struct rpc_call *waiting_tail;
    unsigned waiting_calls;
    unsigned max_waiting;
    bool shutdown_notified;
    bool queue_shut;
    unsigned max_calls;
    unsigned max_streams;
    unsigned request_timeout_ms;

    pthread_mutex_t lock; /* guards the counts below */
    pthread_cond_t idle;
    unsigned active_calls;   /* accepted and not yet freed, admitted or not */
    unsigned unary_calls;    /* admitted unary calls */
    unsigned streaming_calls; /* admitted streaming calls */
};

static void server_waiting_remove(struct server *server, struct rpc_call *call)
{
    if (call->waiting_prev)
        call->waiting_prev->waiting_next = call->waiting_next;
    else if (server->waiting_head == call)
        server->waiting_head = call->waiting_next;
    else
        return; /* not in the list */
    server->waiting_calls--;
    if (call->waiting_next)
        call->waiting_next->waiting_prev = call->waiting_prev;
    else
        server->waiting_tail = call->waiting_prev;
    call->waiting_prev = call->waiting_next = NULL;
}

static void server_waiting_append(struct server *server, struct rpc_call *call)
{
    call->request_deadline_ns =
        forkd_monotonic_ns() + (uint64_t)server->request_timeout_ms * 1000000;
    call->waiting_next = NULL;
    call->waiting_prev = server->waiting_tail;
    if (server->waiting_tail)
        server->waiting_tail->waiting_next = call;
    else
        server->waiting_head = call;
    server->waiting_tail = call;
    server->waiting_calls++;
}

/* Frees a call no batch refers to any more and gives back its budget. */
static void server_release_call(struct server *server, struct rpc_call *call)
{
    pthread_mutex_lock(&server->lock);
    if (call->admitted && call->streaming)
        server->streaming_calls--;
    else if (call->admitted)
        server->unary_calls--;
    if (--server->active_calls == 0)
        pthread_cond_broadcast(&server->idle);
    pthread_mutex_unlock(&server->lock);
    call_free(call);
}

static void server_run_call(struct rpc_call *call, void *context)
{
    call_serve(call);
    server_release_call(context, call);
}

/* Counts the call against its budget (unary or streaming, so long-lived streams cannot take the
 * places of unary calls). Returns false, with the refusal in status, when the budget is full. */
static bool server_admit(struct server *server, struct rpc_call *call, struct rpc_status *status)
{
    call->streaming = call->route->server_streaming;
    pthread_mutex_lock(&server->lock);
    unsigned *count = call->streaming ? &server->streaming_calls : &server->unary_calls;
    unsigned max = call->streaming ? server->max_streams : server->max_calls;
    bool admitted = *count < max;
    if (admitted)
        (*count)++;
    pthread_mutex_unlock(&server->lock);
    call->admitted = admitted;
    if (!admitted)
        rpc_status_set(status, GRPC_STATUS_RESOURCE_EXHAUSTED,
                       "%s: forkd is serving its limit of %u %s calls at once (%s); try again "
                       "later",
                       call->method, max, call->streaming ? "streaming" : "unary",
                       call->streaming ? "--max-streams" : "--max-calls");
    return admitted;
}

/* Posts the catch-all request for the next call, whatever its method. */
static struct rpc_call *server_request_next_call(struct server *server)
{
    struct rpc_call *call = call_new(server, server->daemon, server->queue);
    if (!call)
        return NULL;
    grpc_call_error rc = grpc_server_request_call(server->grpc, &call->call, &call->details,
                                                  &call->request_metadata, server->queue,
                                                  server->queue, &call->tags[CALL_OP_NEW]);
    if (rc != GRPC_CALL_OK) {
        log_error("grpc_server_request_call failed (%d)", (int)rc);
        call_free(call);
        return NULL;
    }
    return call;
}

/* Too many calls wait for their request: the oldest goes. A real client sends its request
 * with the call's headers, so the oldest waiting call is the likeliest to be idle on purpose;
 * refusing the new call instead would let idle streams lock everyone else out. */
static void server_evict_oldest_waiting(struct server *server)
{
    struct rpc_call *call = server->waiting_head;
    server_waiting_remove(server, call);
    char message[sizeof(call->method) + 128];
    snprintf(message, sizeof(message),
             "%s: ended: its request had not arrived and %u newer calls were waiting for theirs "
             "(4 x (--max-calls + --max-streams))",
             call->method, server->max_waiting);
    call_refuse(call, GRPC_STATUS_RESOURCE_EXHAUSTED, message);
}

/* A new call: refused at once (unknown method) or waiting for its request. */
static void server_on_new_call(struct server *server, struct rpc_call *call)
{
    pthread_mutex_lock(&server->lock);
    server->active_calls++;
    pthread_mutex_unlock(&server->lock);
    struct rpc_status status = {.code = GRPC_STATUS_OK};
    call_identify(call);
    if (server->waiting_calls >= server->max_waiting)
        server_evict_oldest_waiting(server);
    if (call_accept(call, &status) == 0) {
        server_waiting_append(server, call);
        return;
    }
    call_refuse(call, status.code, status.message);
    if (call_quiet(call))
        server_release_call(server, call);
}

/* The request is in (or will never come): hand the call to a worker, or end it. Returns true
 * when a worker has the call (it may be gone already: do not touch it). */
static bool server_on_request(struct server *server, struct rpc_call *call, bool success)
{
    server_waiting_remove(server, call);
    if (!success || !call->request) {
        /* Client gone, cancelled (request deadline) or half-closed without a message. */
        call_refuse(call, GRPC_STATUS_INVALID_ARGUMENT, "no request message");
        return false;
    }
    struct rpc_status status = {.code = GRPC_STATUS_OK};
    if (!server_admit(server, call, &status)) {
        call_refuse(call, status.code, status.message);
        return false;
    }
    call->has_worker = true;
    int rc = worker_pool_submit(server->workers, call);
    if (rc == 0)
        return true;
    log_error("%s: cannot start a worker thread: %s", call->method, strerror(-rc));
    call->has_worker = false;
    call_refuse(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "forkd cannot start a thread now");
    return false;
}

/* Ends the calls whose request did not arrive in time. */
static void server_expire_waiting(struct server *server)
{
    uint64_t now = forkd_monotonic_ns();
    char message[sizeof(server->waiting_head->method) + 96];
    while (server->waiting_head && server->waiting_head->request_deadline_ns <= now) {
        struct rpc_call *call = server->waiting_head;
        server_waiting_remove(server, call);
        snprintf(message, sizeof(message),
                 "%s: the request message did not arrive within %u ms (--request-timeout-ms)",
                 call->method, server->request_timeout_ms);
        call_refuse(call, GRPC_STATUS_DEADLINE_EXCEEDED, message);
    }
}

static void server_on_event(struct server *server, grpc_event event, bool *accepting)
{
    if (event.tag == SHUTDOWN_TAG) {
        server->shutdown_notified = true;
        return;
    }
    struct call_tag *tag = event.tag;
    struct rpc_call *call = tag->call;
    if (tag->op == CALL_OP_NEW) {
        if (!event.success) {
            /* The server is shutting down: the pending request is failed, not a call. */
            call_free(call);
            *accepting = false;
            return;
        }
        if (*accepting)
            *accepting = server_request_next_call(server) != NULL;
        server_on_new_call(server, call);
        return;
    }
    /* Read before the completion is recorded: from then on a worker may free the call. */
    bool worker = call->has_worker;
    call_complete(call, tag->op, event.success);
    if (worker)
        return;
    if (tag->op == CALL_OP_RECV && server_on_request(server, call, event.success))
        return;
    if (call_quiet(call))
        server_release_call(server, call);
}

static void *server_dispatch_loop(void *arg)
{
    struct server *server = arg;
    bool accepting = server_request_next_call(server) != NULL;
    for (;;) {
        gpr_timespec tick = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                         gpr_time_from_millis(DISPATCH_TICK_MS, GPR_TIMESPAN));
        grpc_event event = grpc_completion_queue_next(server->queue, tick, NULL);
        if (event.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (event.type == GRPC_OP_COMPLETE)
            server_on_event(server, event, &accepting);
        server_expire_waiting(server);
        pthread_mutex_lock(&server->lock);
        bool done = server->shutdown_notified && server->active_calls == 0;
        pthread_mutex_unlock(&server->lock);
        if (done && !server->queue_shut) {
            server->queue_shut = true;
            grpc_completion_queue_shutdown(server->queue);
        }
    }
    return NULL;
}

/* gRPC C core does its I/O on the threads that wait on a polling completion queue. These
 * threads wait on one that never gets an event, so the dispatcher, which waits on a non-polling
 * queue, only ever dispatches: a connection that floods the transport with work delays it no
 * longer than the event it waits for, and the other connections are read by the other
 * thread. */
static void *server_poll_loop(void *arg)
{
    struct server *server = arg;
    while (grpc_completion_queue_next(server->poll_queue, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL)
               .type != GRPC_QUEUE_SHUTDOWN) {
    }
    return NULL;
}

static void server_drain_queue(grpc_completion_queue *queue)
{
    grpc_completion_queue_shutdown(queue);
    while (grpc_completion_queue_next(queue, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(queue);
}

/* Once the gRPC server is destroyed: nothing is left to poll. */
static void server_stop_pollers(struct server *server)
{
    grpc_completion_queue_shutdown(server->poll_queue);
    for (unsigned i = 0; i < server->poller_count; i++)
        pthread_join(server->pollers[i], NULL);
    grpc_completion_queue_destroy(server->poll_queue);
}

/* Prepares a Unix socket path: parent directory created, a stale socket removed, a live one
 * (another daemon) or a non-socket file refused. */
static int server_prepare_unix_path(const char *path, struct forkd_error *err)
{
    _cleanup_free_ char *parent = strdup(path);
    if (!parent)
        return forkd_error_set(err, -ENOMEM, "socket path %s: out of memory", path);
    char *slash = strrchr(parent, '/');
    if (slash && slash != parent) {
        *slash = '\0';
        int rc = fs_mkdir_parents(parent, 0755);
        if (rc < 0)
            return forkd_error_errno(err, rc, "create socket directory %s", parent);
    }
    struct stat st;
    if (lstat(path, &st) < 0)
        return errno == ENOENT ? 0 : forkd_error_errno(err, -errno, "stat %s", path);
    if (!S_ISSOCK(st.st_mode))
        return forkd_error_set(err, -EEXIST,
                               "%s exists and is not a socket; refusing to replace it", path);
    _cleanup_close_ int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    snprintf(address.sun_path, sizeof(address.sun_path), "%s", path);
    if (probe >= 0 && connect(probe, (struct sockaddr *)&address, sizeof(address)) == 0)
        return forkd_error_set(err, -EADDRINUSE, "another process is already listening on %s",
                               path);
    if (unlink(path) < 0 && errno != ENOENT)
        return forkd_error_errno(err, -errno, "remove stale socket %s", path);
    return 0;
}

static char *server_read_file(const char *path, struct forkd_error *err)
{
    _cleanup_fclose_ FILE *f = fopen(path, "re");
    if (!f) {
        forkd_error_errno(err, -errno, "read %s", path);
        return NULL;
    }
    char *text = NULL;
    size_t capacity = 0;
    /* PEM files hold no NUL byte, so this reads the whole file. */
    if (getdelim(&text, &capacity, '\0', f) <= 0) {
        free(text);
        forkd_error_set(err, -EINVAL, "read %s: file is empty or unreadable", path);
        return NULL;
    }
    return text;
}

/* TLS for a TCP listener: client certificates signed by --tls-client-ca are required, unless
 * server-only TLS was asked for explicitly (--tls-no-client-auth). */
static grpc_server_credentials *server_tls_credentials(const struct server_config *config,
                                                       struct forkd_error *err)
{
    if (!config->tls_client_ca_path && !config->tls_no_client_auth) {
        forkd_error_set(err, -EINVAL,
                        "TLS on %s needs --tls-client-ca (client certificates), or "
                        "--tls-no-client-auth to let any client that trusts the server "
                        "certificate drive VMs",
                        config->listen_address);
        return NULL;
    }
    _cleanup_free_ char *cert = server_read_file(config->tls_cert_path, err);
    _cleanup_free_ char *key = cert ? server_read_file(config->tls_key_path, err) : NULL;
    if (!cert || !key)
        return NULL;
    _cleanup_free_ char *client_ca = NULL;
    if (config->tls_client_ca_path) {
        client_ca = server_read_file(config->tls_client_ca_path, err);
        if (!client_ca)
            return NULL;
    }
    grpc_ssl_pem_key_cert_pair pair = {.private_key = key, .cert_chain = cert};
    grpc_ssl_client_certificate_request_type request =
        client_ca ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                  : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE;
    grpc_server_credentials *credentials =
        grpc_ssl_server_credentials_create_ex(client_ca, &pair, 1, request, NULL);
    if (!credentials)
        forkd_error_set(err, -EINVAL, "TLS: gRPC refused the certificate, key or client CA");
    return credentials;
}

static grpc_server_credentials *server_credentials(const struct server_config *config, bool tcp,
                                                   struct forkd_error *err)
{
    bool tls = config->tls_cert_path && config->tls_key_path;
    if (!tcp || !tls) {
        if (tcp && !config->insecure_tcp) {
            forkd_error_set(err, -EINVAL,
                            "listening on TCP (%s) needs --tls-cert, --tls-key and "
                            "--tls-client-ca, or --insecure-tcp",
                            config->listen_address);
            return NULL;
        }
        return grpc_insecure_server_credentials_create();
    }
    return server_tls_credentials(config, err);
}

static int server_bind(struct server *server, const struct server_config *config,
                       struct forkd_error *err)
{
    struct listen_address address;
    int rc = listen_parse(config->listen_address, config->allow_abstract_socket, &address, err);
    if (rc < 0)
        return rc;
    bool tcp = address.kind == LISTEN_TCP;
    if (address.kind == LISTEN_UNIX) {
        memcpy(server->unix_path, address.unix_path, sizeof(server->unix_path));
        rc = server_prepare_unix_path(server->unix_path, err);
        if (rc < 0)
            return rc;
    }
    grpc_server_credentials *credentials = server_credentials(config, tcp, err);
    if (!credentials)
        return err->code;
    mode_t old_mask = umask(0177); /* the socket is created 0600: only root may drive VMs */
    int port = grpc_server_add_http2_port(server->grpc, address.target, credentials);
    umask(old_mask);
    grpc_server_credentials_release(credentials);
    if (port <= 0) {
        server->unix_path[0] = '\0'; /* not ours: never unlink it */
        return listen_explain_failure(&address, err);
    }
    return 0;
}

/* The gRPC server, its queues (see server_poll_loop) and its I/O threads. Returns 0, or -EAGAIN
 * when no I/O thread can be started. */
static int server_create_grpc(struct server *server, const struct server_config *config)
{
    grpc_resource_quota *quota = grpc_resource_quota_create("forkd requests");
    grpc_resource_quota_resize(quota, config->max_receive_memory_bytes);
    grpc_arg args[] = {
        {.type = GRPC_ARG_POINTER,
         .key = GRPC_ARG_RESOURCE_QUOTA,
         .value.pointer = {.p = quota, .vtable = grpc_resource_quota_arg_vtable()}},
        {.type = GRPC_ARG_INTEGER,
         .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
         .value.integer = (int)config->max_message_bytes},
        {.type = GRPC_ARG_INTEGER,
         .key = GRPC_ARG_MAX_CONCURRENT_STREAMS,
         .value.integer = MAX_STREAMS_PER_CONNECTION},
        /* A second forkd on the same port must fail, not share it. */
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_ALLOW_REUSEPORT, .value.integer = 0},
    };
    grpc_channel_args channel_args = {.num_args = ARRAY_SIZE(args), .args = args};
    server->grpc = grpc_server_create(&channel_args, NULL);
    grpc_resource_quota_unref(quota); /* the server holds its own reference */
    grpc_completion_queue_attributes attributes = {GRPC_CQ_CURRENT_VERSION, GRPC_CQ_NEXT,
                                                   GRPC_CQ_NON_POLLING, NULL};
    server->queue = grpc_completion_queue_create(grpc_completion_queue_factory_lookup(&attributes),
                                                 &attributes, NULL);
    server->poll_queue = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(server->grpc, server->queue, NULL);
    grpc_server_register_completion_queue(server->grpc, server->poll_queue, NULL);
    for (; server->poller_count < SERVER_POLLERS; server->poller_count++)
        if (pthread_create(&server->pollers[server->poller_count], NULL, server_poll_loop,
                           server) != 0)
            break;
    return server->poller_count > 0 ? 0 : -EAGAIN;
}

/* The server's record and its worker pool, before anything of gRPC's. */
static struct server *server_new(const struct server_config *config)
{
    struct server *server = calloc(1, sizeof(*server));
    if (!server)
        return NULL;
    pthread_mutex_init(&server->lock, NULL);
    pthread_cond_init(&server->idle, NULL);
    server->daemon = config->daemon;
    server->max_calls = config->max_calls;
    server->max_streams = config->max_streams;
    server->request_timeout_ms = config->request_timeout_ms;
    /* Waiting calls cost memory only, but every one is a record and a stream: bounded too. */
    server->max_waiting = 4 * (config->max_calls + config->max_streams);
    /* The budgets bound the calls that can hold a thread: the pool never needs more. */
    if (worker_pool_new(config->max_calls + config->max_streams, WORKER_IDLE_MS, server_run_call,
                        server, &server->workers) < 0) {
        free(server);
        return NULL;
    }
    return server;
}

int server_start(const struct server_config *config, struct server **out, struct forkd_error *err)
{
    struct server *server = server_new(config);
    if (!server)
        return forkd_error_set(err, -ENOMEM, "cannot start the gRPC server: out of memory");
    int rc = server_create_grpc(server, config);
    if (rc < 0)
        forkd_error_set(err, rc, "cannot start the gRPC I/O threads");
    else
        rc = server_bind(server, config, err);
    if (rc < 0) {
        grpc_server_destroy(server->grpc);
        server_drain_queue(server->queue);
        server_stop_pollers(server);
        worker_pool_free(server->workers);
        free(server);
        return rc;
    }
    grpc_server_start(server->grpc);
    if (server->unix_path[0])
        chmod(server->unix_path, 0600);
    pthread_create(&server->dispatcher, NULL, server_dispatch_loop, server);
    *out = server;
    return 0;
}

void server_begin_shutdown(struct server *server)
{
    grpc_server_shutdown_and_notify(server->grpc, server->queue, SHUTDOWN_TAG);
}

bool server_wait_idle(struct server *server, int timeout_ms)
{
    struct timespec deadline = forkd_realtime_after_ms(timeout_ms);
    pthread_mutex_lock(&server->lock);
    while (server->active_calls > 0) {
        if (timeout_ms < 0)
            pthread_cond_wait(&server->idle, &server->lock);
        else if (pthread_cond_timedwait(&server->idle, &server->lock, &deadline) == ETIMEDOUT)
            break;
    }
    bool idle = server->active_calls == 0;
    pthread_mutex_unlock(&server->lock);
    return idle;
}

void server_cancel_all(struct server *server)
{
    grpc_server_cancel_all_calls(server->grpc);
}

void server_destroy(struct server *server)
{
    pthread_join(server->dispatcher, NULL);
    grpc_server_destroy(server->grpc);
    grpc_completion_queue_destroy(server->queue);
    server_stop_pollers(server);
    worker_pool_free(server->workers);
    if (server->unix_path[0])
        unlink(server->unix_path);
    pthread_mutex_destroy(&server->lock);
    pthread_cond_destroy(&server->idle);
    free(server);
}
