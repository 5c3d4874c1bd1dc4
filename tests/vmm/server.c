/* server: poll loop over the API socket and its keep-alive connections. */
#include "server.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "basic/cleanup.h"

#include "http.h"
#include "vmm_error.h"

#define MAX_CONNECTIONS 32

struct server {
    int listen_fd;
    struct http_connection connections[MAX_CONNECTIONS];
    unsigned connection_count;
    struct vmm *vmm;
};

static int listen_on(const char *path, char *err, size_t err_size)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    struct stat st;
    _cleanup_close_ int fd = -1;

    if (strlen(path) >= sizeof(addr.sun_path))
        return error_set(err, err_size, ENAMETOOLONG, "--api-sock path too long: %s", path);
    strcpy(addr.sun_path, path);
    /* A stale socket from a previous run is replaced; any other file is left alone. */
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode))
        unlink(path);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return error_set(err, err_size, errno, "socket(): %s", strerror(errno));
    if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        return error_set(err, err_size, errno, "bind(%s): %s", path, strerror(errno));
    if (listen(fd, 16) < 0)
        return error_set(err, err_size, errno, "listen(%s): %s", path, strerror(errno));
    return take_fd(fd);
}

static void accept_connection(struct server *server)
{
    int fd = accept4(server->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);

    if (fd < 0)
        return;
    if (server->connection_count == MAX_CONNECTIONS ||
        http_connection_init(&server->connections[server->connection_count], fd) < 0) {
        close(fd);
        return;
    }
    server->connection_count++;
}

static void drop_connection(struct server *server, unsigned index)
{
    http_connection_release(&server->connections[index]);
    server->connections[index] = server->connections[--server->connection_count];
}

/* Answers every complete request in the buffer; returns false when the connection must close. */
static bool serve_buffered_requests(struct server *server, struct http_connection *connection)
{
    for (;;) {
        struct http_request request;
        char err[256];
        size_t consumed = 0;
        int status;
        char *body = NULL;

        enum http_parse_result parsed =
            http_parse_request(connection, &request, &consumed, &status, err, sizeof(err));
        if (parsed == HTTP_PARSE_INCOMPLETE)
            return true;
        if (parsed == HTTP_PARSE_ERROR) {
            /* The framing is lost: answer and close, as there is no next request to find. */
            body = http_fault_body(err);
            http_send_response(connection, status, body, true);
            free(body);
            return false;
        }
        api_handle(server->vmm, &request, &status, &body);
        int r = http_send_response(connection, status, body, request.close);
        free(body);
        http_connection_consume(connection, consumed);
        if (r < 0 || request.close)
            return false;
    }
}

static bool service_connection(struct server *server, struct http_connection *connection)
{
    for (;;) {
        int n = http_connection_read(connection);
        if (n == -EAGAIN)
            return true;
        if (n <= 0)
            return false; /* EOF (a truncated request is simply dropped) or error */
        if (!serve_buffered_requests(server, connection))
            return false;
    }
}

int server_run(struct vmm *vmm, const char *socket_path, char *err, size_t err_size)
{
    struct server server = {.vmm = vmm};
    struct pollfd fds[MAX_CONNECTIONS + 1];

    server.listen_fd = listen_on(socket_path, err, err_size);
    if (server.listen_fd < 0)
        return server.listen_fd;
    for (;;) {
        fds[0] = (struct pollfd){.fd = server.listen_fd, .events = POLLIN};
        for (unsigned i = 0; i < server.connection_count; i++)
            fds[i + 1] = (struct pollfd){.fd = server.connections[i].fd, .events = POLLIN};
        unsigned polled = server.connection_count;
        if (poll(fds, polled + 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            return error_set(err, err_size, errno, "poll: %s", strerror(errno));
        }
        /* Back to front so dropping (swap with the last) never skips a connection. */
        for (unsigned i = polled; i-- > 0;)
            if (fds[i + 1].revents && !service_connection(&server, &server.connections[i]))
                drop_connection(&server, i);
        if (fds[0].revents & POLLIN)
            accept_connection(&server);
    }
}
