/*
 * The userfaultfd layer (see forkd/uffd.h). Owns the handshake socket and its bounded receive,
 * the handshake JSON (parse, validate, format, send), and the operations on a received
 * userfaultfd: write-protect, wake, event reads and waits. The range-op and event paths run
 * once per guest write fault, so they allocate nothing, touch no JSON and log nothing; they only
 * format a message when they fail.
 */
#include "uffd.h"

#include "basic/cleanup.h"
#include "basic/clock.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define UFFD_PAGE_4K             4096ULL
#define UFFD_PAGE_2M             (2ULL << 20)
#define UFFD_LISTEN_BACKLOG      16
#define UFFD_EAGAIN_TRIES        1000 /* yields before the retries sleep */
#define UFFD_EAGAIN_MS           3000 /* then short sleeps, this long at most */
#define UFFD_EAGAIN_SLEEP_NS     50000
#define UFFD_FORMAT_REGION_BYTES 256 /* one region's JSON, five 20-digit numbers and the keys */
/* Room for several fds, so that "too many" is counted instead of hidden by MSG_CTRUNC. */
#define UFFD_MAX_RECEIVED_FDS 8
/* Integers below 2^53 are exact as doubles (cJSON keeps numbers as doubles). */
#define UFFD_JSON_EXACT_LIMIT 0x1p53

/* ---------------------------------------------------------------- time */

/* Polls one fd for input until deadline: 1 when ready, -ETIMEDOUT, or -errno. */
static int uffd_poll_in(int fd, uint64_t deadline)
{
    for (;;) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int ready = poll(&pfd, 1, forkd_ms_left(deadline));
        if (ready > 0)
            return 1;
        if (ready == 0)
            return -ETIMEDOUT;
        if (errno != EINTR)
            return -errno;
    }
}

/* ---------------------------------------------------------------- listening socket */

static int uffd_socket_address(const char *path, struct sockaddr_un *addr, struct forkd_error *err)
{
    size_t length = path ? strlen(path) : 0;
    if (length == 0 || length >= sizeof(addr->sun_path))
        return forkd_error_set(err, -ENAMETOOLONG, "uffd socket path '%s': empty or over %zu bytes",
                               path ? path : "", sizeof(addr->sun_path) - 1);
    *addr = (struct sockaddr_un){.sun_family = AF_UNIX};
    memcpy(addr->sun_path, path, length + 1);
    return 0;
}

/* A leftover socket from an earlier run would make bind() fail; anything else is not ours. */
static int uffd_remove_stale_socket(const char *path, struct forkd_error *err)
{
    struct stat st;
    if (lstat(path, &st) < 0) {
        if (errno == ENOENT)
            return 0;
        return forkd_error_errno(err, -errno, "stat %s", path);
    }
    if (!S_ISSOCK(st.st_mode))
        return forkd_error_set(err, -EEXIST, "%s exists and is not a socket: not replacing it",
                               path);
    if (unlink(path) < 0 && errno != ENOENT)
        return forkd_error_errno(err, -errno, "unlink stale socket %s", path);
    return 0;
}

int uffd_listen(const char *path, struct forkd_error *err)
{
    struct sockaddr_un addr;
    int r = uffd_socket_address(path, &addr, err);
    if (r < 0)
        return r;
    r = uffd_remove_stale_socket(path, err);
    if (r < 0)
        return r;
    /* Non-blocking so that accept() after poll() cannot hang on a connection that was reset. */
    _cleanup_close_ int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return forkd_error_errno(err, -errno, "socket(AF_UNIX)");
    if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        return forkd_error_errno(err, -errno, "bind %s", path);
    if (listen(fd, UFFD_LISTEN_BACKLOG) < 0)
        return forkd_error_errno(err, -errno, "listen %s", path);
    return take_fd(fd);
}

/* ---------------------------------------------------------------- receiving the handshake */

/* Tells when the bytes so far hold one complete top-level JSON value, so that a message split
 * by the stream is read to its end, and garbage is refused without waiting for the timeout. */
struct uffd_json_scan {
    size_t depth;
    bool in_string;
    bool escaped;
    bool finished; /* the top-level value closed, or the input cannot be one */
};

static bool uffd_json_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

static void uffd_scan_byte(struct uffd_json_scan *scan, char c)
{
    if (scan->in_string) {
        if (scan->escaped)
            scan->escaped = false;
        else if (c == '\\')
            scan->escaped = true;
        else if (c == '"')
            scan->in_string = false;
        return;
    }
    if (c == '[' || c == '{') {
        scan->depth++;
    } else if (c == ']' || c == '}') {
        scan->finished = scan->depth <= 1;
        scan->depth -= scan->depth > 0;
    } else if (c == '"' && scan->depth > 0) {
        scan->in_string = true;
    } else if (scan->depth == 0 && !uffd_json_space(c)) {
        scan->finished = true; /* not an array or object: let the parser name the defect */
    }
}

static void uffd_scan(struct uffd_json_scan *scan, const char *bytes, size_t length)
{
    for (size_t i = 0; i < length && !scan->finished; i++)
        uffd_scan_byte(scan, bytes[i]);
}

struct uffd_receiver {
    int connection;
    uint64_t deadline;
    int timeout_ms;
    char *buffer; /* UFFD_HANDSHAKE_MAX_BYTES + 1: one more byte reveals an oversize message */
    size_t used;
    int fd; /* the fd that came with the first bytes */
};

static void uffd_close_all(const int *fds, size_t count)
{
    for (size_t i = 0; i < count; i++)
        close(fds[i]);
}

/* Collects every fd a message carried; returns how many. */
static size_t uffd_collect_fds(struct msghdr *msg, int *fds, size_t max)
{
    size_t count = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < n && count < max; i++)
            memcpy(&fds[count++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
    }
    return count;
}

/* Keeps the single fd of the first chunk; any other fd received is closed, never leaked. */
static int uffd_accept_fds(struct uffd_receiver *rx, struct msghdr *msg, struct forkd_error *err)
{
    int fds[UFFD_MAX_RECEIVED_FDS];
    size_t count = uffd_collect_fds(msg, fds, UFFD_MAX_RECEIVED_FDS);
    bool first = rx->used == 0;

    if (msg->msg_flags & MSG_CTRUNC) {
        uffd_close_all(fds, count);
        return forkd_error_set(err, -EPROTO,
                               "uffd handshake: control data truncated (MSG_CTRUNC): more than "
                               "%d file descriptors or unexpected ancillary data",
                               UFFD_MAX_RECEIVED_FDS);
    }
    if (first && count == 1) {
        rx->fd = fds[0];
        return 0;
    }
    uffd_close_all(fds, count);
    if (first && count == 0)
        return forkd_error_set(err, -EPROTO,
                               "uffd handshake: no file descriptor (SCM_RIGHTS) with the message");
    if (first)
        return forkd_error_set(err, -EPROTO,
                               "uffd handshake: %zu file descriptors, expected exactly one", count);
    if (count > 0)
        return forkd_error_set(err, -EPROTO,
                               "uffd handshake: %zu file descriptor(s) after byte %zu: the fd "
                               "must come with the first bytes",
                               count, rx->used);
    return 0;
}

/* One recvmsg into the free part of the buffer: bytes read, 0 on EOF, -EAGAIN, or error. */
static ssize_t uffd_receive_chunk(struct uffd_receiver *rx, struct forkd_error *err)
{
    union {
        char bytes[CMSG_SPACE(sizeof(int) * UFFD_MAX_RECEIVED_FDS)];
        struct cmsghdr align;
    } control;
    struct iovec iov = {.iov_base = rx->buffer + rx->used,
                        .iov_len = UFFD_HANDSHAKE_MAX_BYTES + 1 - rx->used};
    struct msghdr msg = {.msg_iov = &iov,
                         .msg_iovlen = 1,
                         .msg_control = control.bytes,
                         .msg_controllen = sizeof(control.bytes)};
    ssize_t n;
    do
        n = recvmsg(rx->connection, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN)
            return -EAGAIN;
        return forkd_error_errno(err, -errno, "uffd handshake: recvmsg");
    }
    if (n == 0)
        return 0; /* end of stream carries no fds */
    int r = uffd_accept_fds(rx, &msg, err);
    if (r < 0)
        return r;
    if (msg.msg_flags & MSG_TRUNC)
        return forkd_error_set(err, -EMSGSIZE, "uffd handshake: message truncated (MSG_TRUNC)");
    return n;
}

static int uffd_receive_timeout(const struct uffd_receiver *rx, struct forkd_error *err)
{
    if (rx->used == 0)
        return forkd_error_set(err, -ETIMEDOUT,
                               "uffd handshake: the VMM connected but sent nothing within %d ms",
                               rx->timeout_ms);
    return forkd_error_set(err, -ETIMEDOUT,
                           "uffd handshake: message incomplete after %zu bytes and %d ms", rx->used,
                           rx->timeout_ms);
}

/* Reads until the bytes hold a whole JSON value (or cannot), within the size bound and time. */
static int uffd_receive_json(struct uffd_receiver *rx, struct forkd_error *err)
{
    struct uffd_json_scan scan = {0};
    while (!scan.finished) {
        if (rx->used > UFFD_HANDSHAKE_MAX_BYTES)
            return forkd_error_set(err, -EMSGSIZE, "uffd handshake: message over %d bytes",
                                   UFFD_HANDSHAKE_MAX_BYTES);
        int r = uffd_poll_in(rx->connection, rx->deadline);
        if (r == -ETIMEDOUT)
            return uffd_receive_timeout(rx, err);
        if (r < 0)
            return forkd_error_errno(err, r, "uffd handshake: poll");
        ssize_t n = uffd_receive_chunk(rx, err);
        if (n == -EAGAIN)
            continue;
        if (n < 0)
            return (int)n;
        if (n == 0)
            return forkd_error_set(err, -ECONNRESET,
                                   "uffd handshake: the VMM closed the connection after %zu bytes",
                                   rx->used);
        uffd_scan(&scan, rx->buffer + rx->used, (size_t)n);
        rx->used += (size_t)n;
    }
    if (rx->used > UFFD_HANDSHAKE_MAX_BYTES)
        return forkd_error_set(err, -EMSGSIZE, "uffd handshake: message over %d bytes",
                               UFFD_HANDSHAKE_MAX_BYTES);
    return 0;
}

static int uffd_accept_connection(int listen_fd, uint64_t deadline, int timeout_ms,
                                  struct forkd_error *err)
{
    for (;;) {
        int r = uffd_poll_in(listen_fd, deadline);
        if (r == -ETIMEDOUT)
            return forkd_error_set(err, -ETIMEDOUT, "uffd handshake: no VMM connected within %d ms",
                                   timeout_ms);
        if (r < 0)
            return forkd_error_errno(err, r, "uffd handshake: poll");
        int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd >= 0)
            return fd;
        /* The pending connection may have gone between poll() and accept(): wait again. */
        if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
            return forkd_error_errno(err, -errno, "uffd handshake: accept");
    }
}

static int uffd_peer_pid(int connection, pid_t *pid, struct forkd_error *err)
{
    struct ucred cred;
    socklen_t length = sizeof(cred);
    if (getsockopt(connection, SOL_SOCKET, SO_PEERCRED, &cred, &length) < 0)
        return forkd_error_errno(err, -errno, "uffd handshake: SO_PEERCRED");
    *pid = cred.pid;
    return 0;
}

/* A wrong fd (a pipe, the memory file) would only fail later with a confusing ioctl error. */
static int uffd_check_userfaultfd(int fd, struct forkd_error *err)
{
    static const char expected[] = "anon_inode:[userfaultfd]";
    char proc_path[64];
    char target[64];
    snprintf(proc_path, sizeof(proc_path), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(proc_path, target, sizeof(target) - 1);
    if (n < 0)
        return 0; /* no /proc to ask: the ioctls will tell */
    target[n] = '\0';
    if (strcmp(target, expected) != 0)
        return forkd_error_set(err, -EBADF, "uffd handshake: the fd is not a userfaultfd but %s",
                               target);
    return 0;
}

/* poll() on a blocking userfaultfd always reports POLLERR and read() on it waits, so the fd we
 * serve must be O_NONBLOCK. Firecracker creates it so; a VMM that did not has handed reading
 * over to us, and the flag only changes how reads behave. */
static int uffd_ensure_nonblocking(int fd, struct forkd_error *err)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0)
        return forkd_error_errno(err, -errno, "uffd handshake: F_GETFL");
    if (!(flags & O_NONBLOCK) && fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        return forkd_error_errno(err, -errno, "uffd handshake: F_SETFL O_NONBLOCK");
    return 0;
}

static void uffd_handshake_init(struct uffd_handshake *handshake)
{
    handshake->uffd = -1;
    handshake->connection = -1;
    handshake->peer_pid = 0;
    handshake->region_count = 0;
}

/* Accepts connections until one comes from expected_pid (0: any): anyone else who can reach
 * the socket is hung up on unread, so an impostor can neither feed us a userfaultfd nor keep
 * the VMM out. */
static int uffd_accept_from(int listen_fd, uint64_t deadline, int timeout_ms, pid_t expected_pid,
                            pid_t *pid, struct forkd_error *err)
{
    unsigned refused = 0;
    pid_t last_refused = 0;
    for (;;) {
        _cleanup_close_ int connection =
            uffd_accept_connection(listen_fd, deadline, timeout_ms, err);
        if (connection < 0 && refused && connection == -ETIMEDOUT)
            return forkd_error_set(err, -EPERM,
                                   "uffd handshake: no connection from the VMM (pid %d) in time; "
                                   "refused %u from other processes (last pid %d)",
                                   (int)expected_pid, refused, (int)last_refused);
        if (connection < 0)
            return connection;
        int r = uffd_peer_pid(connection, pid, err);
        if (r < 0)
            return r;
        if (expected_pid <= 0 || *pid == expected_pid)
            return take_fd(connection);
        refused++;
        last_refused = *pid;
    }
}

int uffd_accept_handshake(int listen_fd, int timeout_ms, struct uffd_handshake *out,
                          struct forkd_error *err)
{
    return uffd_accept_handshake_from(listen_fd, timeout_ms, 0, out, err);
}

int uffd_accept_handshake_from(int listen_fd, int timeout_ms, pid_t expected_pid,
                               struct uffd_handshake *out, struct forkd_error *err)
{
    uffd_handshake_init(out);
    uint64_t deadline = forkd_deadline_after_ms(timeout_ms);
    pid_t pid = 0;
    _cleanup_close_ int connection =
        uffd_accept_from(listen_fd, deadline, timeout_ms, expected_pid, &pid, err);
    if (connection < 0)
        return connection;
    int r;
    _cleanup_free_ char *buffer = malloc(UFFD_HANDSHAKE_MAX_BYTES + 1);
    if (!buffer)
        return forkd_error_set(err, -ENOMEM, "uffd handshake: out of memory");
    struct uffd_receiver rx = {.connection = connection,
                               .deadline = deadline,
                               .timeout_ms = timeout_ms,
                               .buffer = buffer,
                               .fd = -1};
    r = uffd_receive_json(&rx, err);
    _cleanup_close_ int uffd = rx.fd;
    if (r < 0)
        return r;
    r = uffd_parse_mappings(buffer, rx.used, out, err);
    if (r >= 0)
        r = uffd_check_userfaultfd(uffd, err);
    if (r >= 0)
        r = uffd_ensure_nonblocking(uffd, err);
    if (r < 0) {
        out->region_count = 0;
        return r;
    }
    out->uffd = take_fd(uffd);
    out->connection = take_fd(connection);
    out->peer_pid = pid;
    return 0;
}

/* ---------------------------------------------------------------- handshake JSON */

static void uffd_json_deletep(cJSON **json)
{
    cJSON_Delete(*json);
}

/* Reads an unsigned integer field: 1 when present, 0 when absent, or an error. */
static int uffd_json_u64(const cJSON *object, const char *field, size_t index, uint64_t *out,
                         struct forkd_error *err)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(object, field);
    if (!item)
        return 0;
    if (!cJSON_IsNumber(item))
        return forkd_error_set(err, -EINVAL, "uffd handshake: region %zu: \"%s\" is not a number",
                               index, field);
    double value = item->valuedouble;
    /* Above 2^53 a double no longer holds every integer: the value may not be what was sent. */
    if (signbit(value) || !(value < UFFD_JSON_EXACT_LIMIT))
        return forkd_error_set(err, -EINVAL,
                               "uffd handshake: region %zu: \"%s\" is negative or not below 2^53",
                               index, field);
    if (value != (double)(uint64_t)value)
        return forkd_error_set(err, -EINVAL,
                               "uffd handshake: region %zu: \"%s\" is not an integer (%.17g)",
                               index, field, value);
    *out = (uint64_t)value;
    return 1;
}

static int uffd_json_required(const cJSON *object, const char *field, size_t index, uint64_t *out,
                              struct forkd_error *err)
{
    int r = uffd_json_u64(object, field, index, out, err);
    if (r == 0)
        return forkd_error_set(err, -EINVAL, "uffd handshake: region %zu: \"%s\" missing", index,
                               field);
    return r < 0 ? r : 0;
}

/* "page_size" wins; "page_size_kib" (bytes despite its name, deprecated) is the fallback. */
static int uffd_json_page_size(const cJSON *object, size_t index, uint64_t *out,
                               struct forkd_error *err)
{
    const char *field = "page_size";
    int r = uffd_json_u64(object, field, index, out, err);
    if (r == 0) {
        field = "page_size_kib";
        r = uffd_json_u64(object, field, index, out, err);
    }
    if (r < 0)
        return r;
    if (r == 0)
        return forkd_error_set(err, -EINVAL,
                               "uffd handshake: region %zu: \"page_size\" (or \"page_size_kib\") "
                               "missing",
                               index);
    if (*out != UFFD_PAGE_4K && *out != UFFD_PAGE_2M)
        return forkd_error_set(err, -EINVAL,
                               "uffd handshake: region %zu: \"%s\" %" PRIu64
                               " is neither 4096 nor 2097152",
                               index, field, *out);
    return 0;
}

static int uffd_check_aligned(uint64_t value, const char *field, size_t index, uint64_t page_size,
                              struct forkd_error *err)
{
    if (value == 0)
        return forkd_error_set(err, -EINVAL, "uffd handshake: region %zu: \"%s\" is 0", index,
                               field);
    if (value & (page_size - 1))
        return forkd_error_set(err, -EINVAL,
                               "uffd handshake: region %zu: \"%s\" 0x%" PRIx64
                               " not aligned to page size %" PRIu64,
                               index, field, value, page_size);
    return 0;
}

static int uffd_parse_region(const cJSON *item, size_t index, struct uffd_region *region,
                             struct forkd_error *err)
{
    if (!cJSON_IsObject(item))
        return forkd_error_set(err, -EINVAL, "uffd handshake: region %zu: not an object", index);
    int r = uffd_json_required(item, "base_host_virt_addr", index, &region->host_base, err);
    if (r == 0)
        r = uffd_json_required(item, "size", index, &region->size, err);
    if (r == 0)
        r = uffd_json_required(item, "offset", index, &region->file_offset, err);
    if (r == 0)
        r = uffd_json_page_size(item, index, &region->page_size, err);
    if (r == 0)
        r = uffd_check_aligned(region->host_base, "base_host_virt_addr", index, region->page_size,
                               err);
    if (r == 0)
        r = uffd_check_aligned(region->size, "size", index, region->page_size, err);
    return r;
}

/* Insertion sort by file offset (at most UFFD_MAX_REGIONS), carrying each region's position in
 * the message so errors can name the region as the VMM sent it. */
static void uffd_sort_regions(struct uffd_region *regions, size_t *origin, size_t count)
{
    for (size_t i = 1; i < count; i++) {
        struct uffd_region region = regions[i];
        size_t position = origin[i];
        size_t j = i;
        for (; j > 0 && regions[j - 1].file_offset > region.file_offset; j--) {
            regions[j] = regions[j - 1];
            origin[j] = origin[j - 1];
        }
        regions[j] = region;
        origin[j] = position;
    }
}

/* memory.bin is the regions back to back: each offset is the sum of the sizes before it. */
static int uffd_check_layout(const struct uffd_region *regions, const size_t *origin, size_t count,
                             struct forkd_error *err)
{
    uint64_t expected = 0;
    for (size_t i = 0; i < count; i++) {
        const struct uffd_region *r = &regions[i];
        if (r->file_offset != expected)
            return forkd_error_set(err, -EINVAL,
                                   "uffd handshake: region %zu: \"offset\" 0x%" PRIx64
                                   ", expected 0x%" PRIx64 " (regions contiguous from 0)",
                                   origin[i], r->file_offset, expected);
        expected += r->size;
        for (size_t j = 0; j < i; j++) {
            const struct uffd_region *o = &regions[j];
            if (r->host_base < o->host_base + o->size && o->host_base < r->host_base + r->size)
                return forkd_error_set(err, -EINVAL,
                                       "uffd handshake: region %zu: \"base_host_virt_addr\" range "
                                       "overlaps region %zu",
                                       origin[i], origin[j]);
        }
    }
    return 0;
}

static int uffd_mappings_array(const cJSON *root, const cJSON **array, struct forkd_error *err)
{
    *array = root;
    if (cJSON_IsObject(root))
        *array = cJSON_GetObjectItemCaseSensitive(root, "mappings");
    if (!cJSON_IsArray(*array))
        return forkd_error_set(err, -EINVAL,
                               "uffd handshake: expected a JSON array or {\"mappings\": [...]}");
    int count = cJSON_GetArraySize(*array);
    if (count == 0 || count > UFFD_MAX_REGIONS)
        return forkd_error_set(err, -EINVAL, "uffd handshake: %d regions, expected 1 to %d", count,
                               UFFD_MAX_REGIONS);
    return 0;
}

static int uffd_check_trailing(const char *json, size_t length, const char *end,
                               struct forkd_error *err)
{
    for (const char *p = end; p < json + length; p++) {
        if (!uffd_json_space(*p))
            return forkd_error_set(err, -EINVAL,
                                   "uffd handshake: unexpected data after the JSON at byte %td",
                                   p - json);
    }
    return 0;
}

int uffd_parse_mappings(const char *json, size_t length, struct uffd_handshake *out,
                        struct forkd_error *err)
{
    out->region_count = 0;
    const char *end = NULL;
    _cleanup_(uffd_json_deletep) cJSON *root = cJSON_ParseWithLengthOpts(json, length, &end, 0);
    if (!root)
        return forkd_error_set(err, -EINVAL, "uffd handshake: invalid JSON at byte %td of %zu",
                               end ? end - json : (ptrdiff_t)0, length);
    int r = uffd_check_trailing(json, length, end, err);
    if (r < 0)
        return r;
    const cJSON *array = NULL;
    r = uffd_mappings_array(root, &array, err);
    if (r < 0)
        return r;

    struct uffd_region regions[UFFD_MAX_REGIONS];
    size_t origin[UFFD_MAX_REGIONS];
    size_t count = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, array)
    {
        origin[count] = count;
        r = uffd_parse_region(item, count, &regions[count], err);
        if (r < 0)
            return r;
        count++;
    }
    uffd_sort_regions(regions, origin, count);
    r = uffd_check_layout(regions, origin, count, err);
    if (r < 0)
        return r;
    memcpy(out->regions, regions, count * sizeof(regions[0]));
    out->region_count = count;
    return 0;
}

char *uffd_format_mappings(const struct uffd_region *regions, size_t count)
{
    if (count > 0 && !regions)
        return NULL;
    if (count > (SIZE_MAX - 3) / UFFD_FORMAT_REGION_BYTES)
        return NULL;
    size_t capacity = count * UFFD_FORMAT_REGION_BYTES + 3;
    char *out = malloc(capacity);
    if (!out)
        return NULL;
    size_t used = 0;
    out[used++] = '[';
    for (size_t i = 0; i < count; i++) {
        const struct uffd_region *r = &regions[i];
        /* page_size_kib carries bytes, as Firecracker writes it, for handlers that read it. */
        used += (size_t)snprintf(
            out + used, capacity - used,
            "%s{\"base_host_virt_addr\":%" PRIu64 ",\"size\":%" PRIu64 ",\"offset\":%" PRIu64
            ",\"page_size\":%" PRIu64 ",\"page_size_kib\":%" PRIu64 "}",
            i ? "," : "", r->host_base, r->size, r->file_offset, r->page_size, r->page_size);
    }
    out[used++] = ']';
    out[used] = '\0';
    return out;
}

static int uffd_send_all(int socket_fd, const char *bytes, size_t length, struct forkd_error *err)
{
    while (length > 0) {
        ssize_t n = send(socket_fd, bytes, length, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return forkd_error_errno(err, -errno, "uffd handshake: send");
        bytes += n;
        length -= (size_t)n;
    }
    return 0;
}

int uffd_send_handshake(int socket_fd, int uffd, const struct uffd_region *regions, size_t count,
                        struct forkd_error *err)
{
    if (uffd < 0)
        return forkd_error_set(err, -EBADF, "uffd handshake: no userfaultfd to send");
    _cleanup_free_ char *json = uffd_format_mappings(regions, count);
    if (!json)
        return forkd_error_set(err, -ENOMEM, "uffd handshake: cannot format %zu regions", count);
    size_t length = strlen(json);
    if (length > UFFD_HANDSHAKE_MAX_BYTES)
        return forkd_error_set(err, -EMSGSIZE, "uffd handshake: message of %zu bytes over %d",
                               length, UFFD_HANDSHAKE_MAX_BYTES);
    union {
        char bytes[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control = {0};
    struct iovec iov = {.iov_base = json, .iov_len = length};
    struct msghdr msg = {.msg_iov = &iov,
                         .msg_iovlen = 1,
                         .msg_control = control.bytes,
                         .msg_controllen = sizeof(control.bytes)};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cmsg), &uffd, sizeof(int));
    ssize_t n;
    do
        n = sendmsg(socket_fd, &msg, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return forkd_error_errno(err, -errno, "uffd handshake: sendmsg");
    /* A stream may take a large message in parts; the fd went with the first. */
    return uffd_send_all(socket_fd, json + n, length - (size_t)n, err);
}

void uffd_handshake_release(struct uffd_handshake *handshake)
{
    if (!handshake)
        return;
    if (handshake->uffd >= 0)
        close(handshake->uffd);
    if (handshake->connection >= 0)
        close(handshake->connection);
    uffd_handshake_init(handshake);
}

uint64_t uffd_total_size(const struct uffd_handshake *handshake)
{
    uint64_t total = 0;
    for (size_t i = 0; i < handshake->region_count; i++)
        total += handshake->regions[i].size;
    return total;
}

/* ---------------------------------------------------------------- range operations and events */

static bool uffd_range_aligned(uint64_t address, uint64_t length, uint64_t page_size)
{
    if (page_size == 0 || (page_size & (page_size - 1)))
        return false;
    if (length == 0 || address + length < address)
        return false;
    return ((address | length) & (page_size - 1)) == 0;
}

/* EAGAIN means the address space is changing under a queued event (a REMOVE): the window is
 * short unless no one reads the event, so retry, yielding, a bounded number of times. A
 * patient caller, whose events another thread reads, also retries sleeping briefly for a
 * bounded time after that: a guest that discards memory all the time reopens the window all
 * the time, and a busy host may not run the event's reader at once. */
static int uffd_ioctl_retry(int uffd, unsigned long request, void *argument, bool patient)
{
    uint64_t deadline = 0;
    for (int tries = 1;; tries++) {
        if (ioctl(uffd, request, argument) == 0)
            return 0;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN)
            return -errno;
        if (tries < UFFD_EAGAIN_TRIES) {
            sched_yield();
            continue;
        }
        if (!patient)
            return -EAGAIN;
        if (deadline == 0)
            deadline = forkd_deadline_after_ms(UFFD_EAGAIN_MS);
        else if (forkd_ms_left(deadline) == 0)
            return -EAGAIN;
        struct timespec pause = {.tv_nsec = UFFD_EAGAIN_SLEEP_NS};
        nanosleep(&pause, NULL);
    }
}

static const char *uffd_wp_mode_name(bool protect, bool dont_wake)
{
    if (protect)
        return "protect";
    return dont_wake ? "unprotect (dontwake)" : "unprotect";
}

static int uffd_range_error(struct forkd_error *err, int code, const char *ioctl_name,
                            uint64_t address, uint64_t length, const char *mode)
{
    const char *hint = code == -EAGAIN ? " (after retries: the guest kept discarding memory, each "
                                         "discard's unread REMOVE event holding the address "
                                         "space, or the VMM is gone)"
                                       : "";
    return forkd_error_set(err, code, "%s [0x%" PRIx64 "+0x%" PRIx64 ")%s%s: %s%s", ioctl_name,
                           address, length, *mode ? " " : "", mode, strerror(-code), hint);
}

static int uffd_write_protect_with(int uffd, uint64_t address, uint64_t length, uint64_t page_size,
                                   bool protect, bool dont_wake, bool retry,
                                   struct forkd_error *err)
{
    const char *mode = uffd_wp_mode_name(protect, dont_wake);
    if (!uffd_range_aligned(address, length, page_size))
        return forkd_error_set(err, -EINVAL,
                               "UFFDIO_WRITEPROTECT [0x%" PRIx64 "+0x%" PRIx64
                               ") %s: not aligned to page size 0x%" PRIx64,
                               address, length, mode, page_size);
    /* The kernel refuses WP|DONTWAKE: protecting wakes no one anyway. */
    struct uffdio_writeprotect wp = {
        .range = {.start = address, .len = length},
        .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP
                        : (dont_wake ? UFFDIO_WRITEPROTECT_MODE_DONTWAKE : 0),
    };
    int r = 0;
    if (retry)
        r = uffd_ioctl_retry(uffd, UFFDIO_WRITEPROTECT, &wp, true);
    else
        while ((r = ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0 ? -errno : 0) == -EINTR)
            ;
    if (r < 0)
        return uffd_range_error(err, r, "UFFDIO_WRITEPROTECT", address, length, mode);
    return 0;
}

int uffd_write_protect(int uffd, uint64_t address, uint64_t length, uint64_t page_size,
                       bool protect, bool dont_wake, struct forkd_error *err)
{
    return uffd_write_protect_with(uffd, address, length, page_size, protect, dont_wake, true, err);
}

int uffd_write_protect_once(int uffd, uint64_t address, uint64_t length, uint64_t page_size,
                            bool protect, bool dont_wake, struct forkd_error *err)
{
    return uffd_write_protect_with(uffd, address, length, page_size, protect, dont_wake, false,
                                   err);
}

int uffd_wake(int uffd, uint64_t address, uint64_t length, struct forkd_error *err)
{
    struct uffdio_range range = {.start = address, .len = length};
    int r = uffd_ioctl_retry(uffd, UFFDIO_WAKE, &range, false);
    if (r < 0)
        return uffd_range_error(err, r, "UFFDIO_WAKE", address, length, "");
    return 0;
}

int uffd_read_events(int uffd, struct uffd_msg *messages, size_t max, struct forkd_error *err)
{
    if (max == 0)
        return 0;
    if (max > INT_MAX / sizeof(*messages))
        max = INT_MAX / sizeof(*messages);
    for (;;) {
        ssize_t n = read(uffd, messages, max * sizeof(*messages));
        if (n >= 0) {
            if ((size_t)n % sizeof(*messages))
                return forkd_error_set(err, -EIO, "read userfaultfd: partial message (%zd bytes)",
                                       n);
            return (int)((size_t)n / sizeof(*messages));
        }
        if (errno == EAGAIN)
            return 0;
        if (errno != EINTR)
            return forkd_error_errno(err, -errno, "read userfaultfd");
    }
}

static bool uffd_fd_blocking(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    return flags >= 0 && !(flags & O_NONBLOCK);
}

/* fds: the uffd, stop_fd, the VMM connection (negative fds are ignored by poll). */
static int uffd_wait_result(const struct pollfd *fds)
{
    if ((fds[0].revents | fds[1].revents | fds[2].revents) & POLLNVAL)
        return -EBADF;
    /* The kernel reports POLLERR on a uffd that is blocking or has had no UFFDIO_API. */
    if (fds[0].revents & (POLLERR | POLLHUP))
        return uffd_fd_blocking(fds[0].fd) ? -EINVAL : -EPIPE;
    if (fds[2].revents & (POLLHUP | POLLRDHUP | POLLERR))
        return -EPIPE;
    if (fds[2].revents & POLLIN)
        return -EPROTO; /* the VMM sends nothing after the handshake */
    /* Stop wins over pending faults so that a busy guest cannot starve a stop request. */
    if (fds[1].revents)
        return 0;
    return (fds[0].revents & POLLIN) ? 1 : 0;
}

int uffd_wait_peer(int uffd, int connection, int stop_fd, int timeout_ms)
{
    struct pollfd fds[3] = {
        {.fd = uffd, .events = POLLIN},
        {.fd = stop_fd, .events = POLLIN},
        {.fd = connection, .events = POLLIN | POLLRDHUP},
    };
    uint64_t deadline = timeout_ms > 0 ? forkd_deadline_after_ms(timeout_ms) : FORKD_NO_DEADLINE;
    int wait_ms = timeout_ms;
    for (;;) {
        int ready = poll(fds, 3, wait_ms);
        if (ready > 0)
            return uffd_wait_result(fds);
        if (ready == 0)
            return 0;
        if (errno != EINTR)
            return -errno;
        if (deadline != FORKD_NO_DEADLINE)
            wait_ms = forkd_ms_left(deadline);
    }
}

int uffd_wait(int uffd, int stop_fd, int timeout_ms)
{
    return uffd_wait_peer(uffd, -1, stop_fd, timeout_ms);
}

bool uffd_is_wp_fault(const struct uffd_msg *message)
{
    return message->event == UFFD_EVENT_PAGEFAULT &&
           (message->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP);
}
