/* Listen addresses (see listen.h). */
#include "listen.h"

#include "basic/cleanup.h"

#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int listen_parse_unix(const char *path, bool allow_abstract, struct listen_address *out,
                             struct forkd_error *err)
{
    if (path[0] == '\0')
        return forkd_error_set(err, -EINVAL,
                               "--listen unix: needs a socket path (an empty name would be an "
                               "abstract socket that any local user can reach)");
    if (path[0] == '@') {
        out->kind = LISTEN_UNIX_ABSTRACT;
        if (!allow_abstract)
            return forkd_error_set(err, -EINVAL,
                                   "--listen %s is an abstract Unix socket: no file permission "
                                   "protects it, any local user can reach it; refused without "
                                   "--allow-abstract-socket",
                                   out->target);
        return 0;
    }
    size_t length = strlen(path);
    if (length >= sizeof(out->unix_path))
        return forkd_error_set(err, -ENAMETOOLONG,
                               "socket path %s is %zu bytes; a Unix socket address holds at most "
                               "%zu",
                               path, length, sizeof(out->unix_path) - 1);
    memcpy(out->unix_path, path, length + 1);
    out->kind = LISTEN_UNIX;
    return 0;
}

int listen_parse(const char *address, bool allow_abstract, struct listen_address *out,
                 struct forkd_error *err)
{
    memset(out, 0, sizeof(*out));
    out->target = address;
    if (strncmp(address, "unix-abstract:", 14) == 0) {
        out->kind = LISTEN_UNIX_ABSTRACT;
        if (!allow_abstract || address[14] == '\0')
            return forkd_error_set(
                err, -EINVAL,
                "--listen %s is an abstract Unix socket: no file permission "
                "protects it, any local user can reach it; refused %s",
                address, address[14] ? "without --allow-abstract-socket" : "(empty name)");
        return 0;
    }
    if (strncmp(address, "unix:", 5) == 0)
        return listen_parse_unix(address + 5, allow_abstract, out, err);
    if (strncmp(address, "tcp:", 4) == 0)
        out->target = address + 4;
    out->kind = LISTEN_TCP;
    if (out->target[0] == '\0' || !strrchr(out->target, ':'))
        return forkd_error_set(err, -EINVAL, "--listen %s: expected unix:PATH or HOST:PORT",
                               address);
    return 0;
}

/* Binds a TCP socket to host:port the way a listener would; returns 0 or -errno. */
static int listen_probe_tcp(const char *target)
{
    char host[256];
    const char *colon = strrchr(target, ':');
    size_t host_length = (size_t)(colon - target);
    if (host_length >= sizeof(host))
        return -ENAMETOOLONG;
    memcpy(host, target, host_length);
    host[host_length] = '\0';
    char *name = host;
    if (host_length >= 2 && host[0] == '[' && host[host_length - 1] == ']') {
        host[host_length - 1] = '\0';
        name = host + 1;
    }
    struct addrinfo hints = {.ai_flags = AI_PASSIVE, .ai_socktype = SOCK_STREAM};
    struct addrinfo *found = NULL;
    int rc = getaddrinfo(name[0] ? name : NULL, colon + 1, &hints, &found);
    if (rc != 0)
        return rc == EAI_SYSTEM ? -errno : -EADDRNOTAVAIL;
    int result = -EADDRNOTAVAIL;
    for (struct addrinfo *a = found; a; a = a->ai_next) {
        _cleanup_close_ int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, 0);
        int one = 1;
        if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
            continue;
        if (bind(fd, a->ai_addr, a->ai_addrlen) < 0) {
            result = -errno;
            break;
        }
        result = 0;
    }
    freeaddrinfo(found);
    return result;
}

static int listen_probe_unix(const char *path)
{
    _cleanup_close_ int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    memcpy(address.sun_path, path, strlen(path) + 1);
    if (bind(fd, (struct sockaddr *)&address, sizeof(address)) < 0)
        return -errno;
    unlink(path);
    return 0;
}

int listen_explain_failure(const struct listen_address *address, struct forkd_error *err)
{
    int rc = 0;
    if (address->kind == LISTEN_TCP)
        rc = listen_probe_tcp(address->target);
    else if (address->kind == LISTEN_UNIX)
        rc = listen_probe_unix(address->unix_path);
    if (rc < 0)
        return forkd_error_errno(err, rc, "cannot listen on %s", address->target);
    return forkd_error_set(err, -EADDRNOTAVAIL,
                           "cannot listen on %s: gRPC refused the address (a bind of it works; "
                           "see the gRPC log above)",
                           address->target);
}
