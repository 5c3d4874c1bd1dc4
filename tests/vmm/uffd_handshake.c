/* uffd_handshake: userfaultfd creation and Firecracker's fd-passing handshake. */
#include "uffd_handshake.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <forkd_compat/userfaultfd.h>

#include "basic/cleanup.h"

#include "vmm_error.h"

#define HANDSHAKE_MAX_BYTES 4096

int uffd_open(uint64_t required, uint64_t optional, uint64_t *features_out, char *err,
              size_t err_size)
{
    struct uffdio_api probe = {.api = UFFD_API};
    _cleanup_close_ int probe_fd = -1;
    _cleanup_close_ int uffd = -1;

    /* UFFDIO_API may be called once per fd: probe the offered features on a throwaway fd. */
    probe_fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (probe_fd < 0)
        return error_set(err, err_size, errno, "userfaultfd(): %s", strerror(errno));
    if (ioctl(probe_fd, UFFDIO_API, &probe) < 0)
        return error_set(err, err_size, errno, "UFFDIO_API probe: %s", strerror(errno));
    if ((probe.features & required) != required)
        return error_set(err, err_size, ENOTSUP,
                         "userfaultfd lacks features 0x%" PRIx64 " (kernel offers 0x%llx)",
                         required & ~(uint64_t)probe.features, (unsigned long long)probe.features);

    struct uffdio_api api = {.api = UFFD_API, .features = required | (optional & probe.features)};
    uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0)
        return error_set(err, err_size, errno, "userfaultfd(): %s", strerror(errno));
    if (ioctl(uffd, UFFDIO_API, &api) < 0)
        return error_set(err, err_size, errno, "UFFDIO_API features 0x%llx: %s",
                         (unsigned long long)api.features, strerror(errno));
    if (features_out)
        *features_out = api.features;
    return take_fd(uffd);
}

int uffd_register(int uffd, uint64_t address, uint64_t size, uint64_t mode, char *err,
                  size_t err_size)
{
    struct uffdio_register reg = {.range = {.start = address, .len = size}, .mode = mode};

    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        return error_set(err, err_size, errno,
                         "UFFDIO_REGISTER 0x%" PRIx64 "+0x%" PRIx64 " mode 0x%" PRIx64 ": %s",
                         address, size, mode, strerror(errno));
    return 0;
}

static int format_regions(const struct uffd_handshake_region *regions, unsigned count, char *out,
                          size_t out_size)
{
    size_t used = 0;

    used += (size_t)snprintf(out, out_size, "[");
    for (unsigned i = 0; i < count && used < out_size; i++) {
        used += (size_t)snprintf(out + used, out_size - used,
                                 "%s{\"base_host_virt_addr\":%" PRIu64 ",\"size\":%" PRIu64
                                 ",\"offset\":%" PRIu64 ",\"page_size\":%" PRIu64
                                 ",\"page_size_kib\":%" PRIu64 "}",
                                 i ? "," : "", regions[i].base_host_virt_addr, regions[i].size,
                                 regions[i].offset, regions[i].page_size, regions[i].page_size);
    }
    if (used < out_size)
        used += (size_t)snprintf(out + used, out_size - used, "]");
    return used < out_size ? (int)used : -ENOSPC;
}

static int connect_unix(const char *path, char *err, size_t err_size)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    _cleanup_close_ int fd = -1;

    if (strlen(path) >= sizeof(addr.sun_path))
        return error_set(err, err_size, ENAMETOOLONG, "socket path too long: %s", path);
    strcpy(addr.sun_path, path);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return error_set(err, err_size, errno, "socket(): %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        return error_set(err, err_size, errno, "connect(%s): %s", path, strerror(errno));
    return take_fd(fd);
}

int uffd_handshake_send(const char *socket_path, int uffd,
                        const struct uffd_handshake_region *regions, unsigned region_count,
                        int *socket_out, char *err, size_t err_size)
{
    char body[HANDSHAKE_MAX_BYTES];
    char control[CMSG_SPACE(sizeof(int))] = {0};
    _cleanup_close_ int sock = -1;

    int length = format_regions(regions, region_count, body, sizeof(body));
    if (length < 0)
        return error_set(err, err_size, ENOSPC, "handshake message too long");
    sock = connect_unix(socket_path, err, err_size);
    if (sock < 0)
        return sock;

    struct iovec iov = {.iov_base = body, .iov_len = (size_t)length};
    struct msghdr msg = {.msg_iov = &iov,
                         .msg_iovlen = 1,
                         .msg_control = control,
                         .msg_controllen = sizeof(control)};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cmsg), &uffd, sizeof(int));

    ssize_t sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (sent < 0)
        return error_set(err, err_size, errno, "sendmsg(%s): %s", socket_path, strerror(errno));
    if (sent != length)
        return error_set(err, err_size, EIO, "sendmsg(%s): short write %zd of %d", socket_path,
                         sent, length);
    *socket_out = take_fd(sock);
    return 0;
}
