/* The gRPC C-core server (see server.h). */
#include "server.h"

#include "call.h"
#include "log.h"

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

struct server {
    grpc_server *grpc;
    grpc_completion_queue *notify_queue; /* dispatcher's; every new call is announced here */
    pthread_t dispatcher;
    void *daemon;
    char unix_path[sizeof(((struct sockaddr_un *)0)->sun_path)];

    pthread_mutex_t lock; /* guards active_calls */
    pthread_cond_t idle;
    unsigned active_calls;
};

static void *server_call_thread(void *arg)
{
    struct rpc_call *call = arg;
    struct server *server = call->server;
    call_serve(call);
    call_free(call);
    pthread_mutex_lock(&server->lock);
    if (--server->active_calls == 0)
        pthread_cond_broadcast(&server->idle);
    pthread_mutex_unlock(&server->lock);
    return NULL;
}

static void server_start_call_thread(struct server *server, struct rpc_call *call)
{
    pthread_mutex_lock(&server->lock);
    server->active_calls++;
    pthread_mutex_unlock(&server->lock);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t thread;
    int rc = pthread_create(&thread, &attr, server_call_thread, call);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        /* No thread: the call still gets an answer, on this thread, so the client never hangs. */
        log_error("%s: cannot start a call thread: %s", "dispatcher", strerror(rc));
        server_call_thread(call);
    }
}

/* Posts the catch-all request for the next call, whatever its method. */
static struct rpc_call *server_request_next_call(struct server *server)
{
    struct rpc_call *call = call_new(server, server->daemon);
    if (!call)
        return NULL;
    grpc_call_error rc =
        grpc_server_request_call(server->grpc, &call->call, &call->details, &call->request_metadata,
                                 call->queue, server->notify_queue, call);
    if (rc != GRPC_CALL_OK) {
        log_error("grpc_server_request_call failed (%d)", (int)rc);
        call_free(call);
        return NULL;
    }
    return call;
}

static void *server_dispatch_loop(void *arg)
{
    struct server *server = arg;
    bool accepting = server_request_next_call(server) != NULL;
    for (;;) {
        grpc_event event = grpc_completion_queue_next(server->notify_queue,
                                                      gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (event.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (event.tag == SHUTDOWN_TAG) {
            grpc_completion_queue_shutdown(server->notify_queue);
            continue;
        }
        struct rpc_call *call = event.tag;
        if (!event.success) {
            /* The server is shutting down: the pending request is failed, not a call. */
            call_free(call);
            accepting = false;
            continue;
        }
        if (accepting)
            accepting = server_request_next_call(server) != NULL;
        server_start_call_thread(server, call);
    }
    return NULL;
}

/* Prepares a Unix socket path: parent directory created, a stale socket removed, a live one
 * (another daemon) or a non-socket file refused. */
static int server_prepare_unix_path(const char *path, struct forkd_error *err)
{
    if (strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
        return forkd_error_set(err, -ENAMETOOLONG,
                               "socket path %s is longer than a Unix socket address allows", path);
    }
    _cleanup_free_ char *parent = strdup(path);
    if (!parent)
        return forkd_error_set(err, -ENOMEM, "out of memory");
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
    if (!S_ISSOCK(st.st_mode)) {
        return forkd_error_set(err, -EEXIST,
                               "%s exists and is not a socket; refusing to replace it", path);
    }
    _cleanup_close_ int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    snprintf(address.sun_path, sizeof(address.sun_path), "%s", path);
    if (probe >= 0 && connect(probe, (struct sockaddr *)&address, sizeof(address)) == 0) {
        return forkd_error_set(err, -EADDRINUSE, "another process is already listening on %s",
                               path);
    }
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

static grpc_server_credentials *server_credentials(const struct server_config *config, bool tcp,
                                                   struct forkd_error *err)
{
    bool tls = config->tls_cert_path && config->tls_key_path;
    if (!tcp || !tls) {
        if (tcp && !config->insecure_tcp) {
            forkd_error_set(
                err, -EINVAL,
                "listening on TCP (%s) needs --tls-cert and --tls-key, or --insecure-tcp",
                config->listen_address);
            return NULL;
        }
        return grpc_insecure_server_credentials_create();
    }
    _cleanup_free_ char *cert = server_read_file(config->tls_cert_path, err);
    _cleanup_free_ char *key = server_read_file(config->tls_key_path, err);
    if (!cert || !key)
        return NULL;
    grpc_ssl_pem_key_cert_pair pair = {.private_key = key, .cert_chain = cert};
    return grpc_ssl_server_credentials_create(NULL, &pair, 1, 0, NULL);
}

static int server_bind(struct server *server, const struct server_config *config,
                       struct forkd_error *err)
{
    const char *address = config->listen_address;
    bool tcp = strncmp(address, "unix:", 5) != 0;
    if (strncmp(address, "tcp:", 4) == 0)
        address += 4;
    if (!tcp) {
        snprintf(server->unix_path, sizeof(server->unix_path), "%s", address + 5);
        int rc = server_prepare_unix_path(server->unix_path, err);
        if (rc < 0)
            return rc;
    }
    grpc_server_credentials *credentials = server_credentials(config, tcp, err);
    if (!credentials)
        return err->code;
    mode_t old_mask = umask(0177); /* the socket is created 0600: only root may drive VMs */
    int port = grpc_server_add_http2_port(server->grpc, address, credentials);
    umask(old_mask);
    grpc_server_credentials_release(credentials);
    if (port <= 0)
        return forkd_error_set(err, -EADDRNOTAVAIL, "cannot listen on %s", config->listen_address);
    return 0;
}

int server_start(const struct server_config *config, struct server **out, struct forkd_error *err)
{
    struct server *server = calloc(1, sizeof(*server));
    if (!server)
        return forkd_error_set(err, -ENOMEM, "out of memory");
    pthread_mutex_init(&server->lock, NULL);
    pthread_cond_init(&server->idle, NULL);
    server->daemon = config->daemon;

    grpc_arg args[] = {
        {.type = GRPC_ARG_INTEGER,
         .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
         .value.integer = (int)config->max_message_bytes},
    };
    grpc_channel_args channel_args = {.num_args = 1, .args = args};
    server->grpc = grpc_server_create(&channel_args, NULL);
    server->notify_queue = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(server->grpc, server->notify_queue, NULL);

    int rc = server_bind(server, config, err);
    if (rc < 0) {
        grpc_server_destroy(server->grpc);
        grpc_completion_queue_shutdown(server->notify_queue);
        while (grpc_completion_queue_next(server->notify_queue, gpr_inf_future(GPR_CLOCK_MONOTONIC),
                                          NULL)
                   .type != GRPC_QUEUE_SHUTDOWN) {
        }
        grpc_completion_queue_destroy(server->notify_queue);
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
    grpc_server_shutdown_and_notify(server->grpc, server->notify_queue, SHUTDOWN_TAG);
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
    grpc_completion_queue_destroy(server->notify_queue);
    if (server->unix_path[0])
        unlink(server->unix_path);
    pthread_mutex_destroy(&server->lock);
    pthread_cond_destroy(&server->idle);
    free(server);
}
