/*
 * The userfaultfd layer: receiving a VMM's userfaultfd and its guest memory regions through
 * Firecracker's one-message handshake, and driving that fd (write-protect, unprotect, events).
 *
 * The handshake: the VMM connects to a Unix socket we listen on and sends ONE message: a JSON
 * array (or an object {"mappings": [...]}) of
 *   {"base_host_virt_addr": N, "size": N, "offset": N, "page_size": N, "page_size_kib": N}
 * with the userfaultfd attached as SCM_RIGHTS. The VMM keeps the socket open and sends nothing
 * more; we keep our end open for as long as we use the fd. UFFDIO_API was already done by the
 * VMM: never call it (or UFFDIO_REGISTER) again on a received fd.
 *
 * All range operations act on the VMM's address space (the fd's creator), addressed by the
 * VMM's host virtual addresses from the handshake.
 */
#ifndef FORKD_UFFD_H
#define FORKD_UFFD_H

#include "basic/error.h"

#include <linux/userfaultfd.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

#define UFFD_MAX_REGIONS         16
#define UFFD_HANDSHAKE_MAX_BYTES (64 * 1024) /* larger messages are refused */

/* One guest memory region as the VMM announced it. */
struct uffd_region {
    uint64_t host_base;   /* base_host_virt_addr: where the VMM maps it */
    uint64_t size;        /* bytes, a multiple of page_size */
    uint64_t file_offset; /* offset of the region in memory.bin ("offset") */
    uint64_t page_size;   /* 4096 or 2 MiB ("page_size", else "page_size_kib" which is bytes) */
};

struct uffd_handshake {
    int uffd;       /* the received userfaultfd; -1 when none */
    int connection; /* our end of the VMM's connection, kept open; -1 when none */
    pid_t peer_pid; /* the VMM, from SO_PEERCRED */
    size_t region_count;
    struct uffd_region regions[UFFD_MAX_REGIONS];
};

/* Creates a listening Unix socket at path (an existing file there is replaced if it is a
 * socket). Returns the listening fd or -errno. */
int uffd_listen(const char *path, struct forkd_error *err);

/* Accepts one connection on listen_fd and receives its handshake, all within timeout_ms
 * (-1: no limit). On success out holds the fd, the open connection and the regions (sorted by
 * file_offset, checked: sizes and bases non-zero and page-aligned, page sizes 4 KiB or 2 MiB,
 * file offsets contiguous from 0, host ranges disjoint). The fd is checked to be a userfaultfd
 * and made O_NONBLOCK if it was not (a blocking uffd cannot be polled). A message split by the
 * stream is read to its end; the fd must come with its first bytes. Rejected, with every
 * received fd closed and a message naming the defect: no fd or more than one (-EPROTO),
 * MSG_CTRUNC (-EPROTO) or MSG_TRUNC (-EMSGSIZE), a message over UFFD_HANDSHAKE_MAX_BYTES
 * (-EMSGSIZE), JSON that is not the format or a region that fails a check (-EINVAL, naming the
 * region index and field), no peer or a peer that sends nothing or too little in time
 * (-ETIMEDOUT), a peer that closes before the message is whole (-ECONNRESET). On failure out
 * holds no fds. */
int uffd_accept_handshake(int listen_fd, int timeout_ms, struct uffd_handshake *out,
                          struct forkd_error *err);
/* The same, taking the handshake only from a connection of process expected_pid (SO_PEERCRED;
 * 0: any). Connections of other processes are closed unread and the wait goes on; -EPERM,
 * naming them, when only those came in time. */
int uffd_accept_handshake_from(int listen_fd, int timeout_ms, pid_t expected_pid,
                               struct uffd_handshake *out, struct forkd_error *err);

/* Parses and checks the handshake JSON (either form) into out->regions and out->region_count
 * (0 on failure); leaves out's fds alone. Exposed for tests. */
int uffd_parse_mappings(const char *json, size_t length, struct uffd_handshake *out,
                        struct forkd_error *err);

/* Serialises regions in the handshake's bare-array form (for the VMM side and tests). Returns
 * a malloc'd NUL-terminated string or NULL. */
char *uffd_format_mappings(const struct uffd_region *regions, size_t count);

/* Sends a handshake on a connected socket: the JSON and the fd as SCM_RIGHTS (the VMM side,
 * for forkd's own tests and harnesses). */
int uffd_send_handshake(int socket_fd, int uffd, const struct uffd_region *regions, size_t count,
                        struct forkd_error *err);

/* Closes the fd and the connection (those that are open) and resets the struct. */
void uffd_handshake_release(struct uffd_handshake *handshake);

/* Sum of region sizes. */
uint64_t uffd_total_size(const struct uffd_handshake *handshake);

/* Write-protects (protect=true) or unprotects [address, address+length) in the VMM's memory.
 * address and length must be non-zero multiples of page_size, a power of two (-EINVAL
 * otherwise, nothing done). Unprotecting wakes the threads waiting on the range unless
 * dont_wake (ignored when protecting: there is no one to wake). EAGAIN (a pending REMOVE or
 * mapping change) is retried for a bounded time (about three seconds); -EAGAIN after that means an
 * event waits to be read, or the VMM has exited (the kernel then answers EAGAIN to every range
 * ioctl). Returns 0 or -errno; allocates nothing, logs nothing. */
int uffd_write_protect(int uffd, uint64_t address, uint64_t length, uint64_t page_size,
                       bool protect, bool dont_wake, struct forkd_error *err);
/* The same without retrying EAGAIN: for the thread that reads the uffd's events, which must
 * read the pending one before the kernel accepts the call. */
int uffd_write_protect_once(int uffd, uint64_t address, uint64_t length, uint64_t page_size,
                            bool protect, bool dont_wake, struct forkd_error *err);

/* Wakes threads blocked on [address, address+length) without changing protection; EAGAIN is
 * retried a bounded number of times, never waited out (its caller reads the events). */
int uffd_wake(int uffd, uint64_t address, uint64_t length, struct forkd_error *err);

/* Reads up to max pending messages with one read(). The uffd must be O_NONBLOCK, as every fd
 * from uffd_accept_handshake is (read() on a blocking uffd waits for the first message).
 * Returns the count (0 when none pending) or -errno. */
int uffd_read_events(int uffd, struct uffd_msg *messages, size_t max, struct forkd_error *err);

/* Waits until uffd has events, stop_fd (an eventfd, or -1) is readable, or timeout_ms passes
 * (-1: no limit). Returns 1 when uffd is readable, 0 on stop (which wins over pending events)
 * or timeout, -errno on error: -EPIPE on POLLHUP/POLLERR from an O_NONBLOCK uffd, -EINVAL when
 * the uffd is blocking (the kernel reports POLLERR for those), -EBADF. EINTR is retried.
 * NB: the uffd shows nothing when its owner exits (no POLLHUP; reads see no events, range
 * ioctls fail with EAGAIN), so this alone does not notice a dead VMM: use uffd_wait_peer. */
int uffd_wait(int uffd, int stop_fd, int timeout_ms);

/* uffd_wait that also watches the handshake connection (or -1): the VMM keeps its end open for
 * its whole life, so a hang-up there is how its death shows (-EPIPE); data on it is a protocol
 * breach (-EPROTO). */
int uffd_wait_peer(int uffd, int connection, int stop_fd, int timeout_ms);

/* True when a message is a write-protect fault (flags carry UFFD_PAGEFAULT_FLAG_WP). */
bool uffd_is_wp_fault(const struct uffd_msg *message);

#ifdef __cplusplus
}
#endif

#endif
