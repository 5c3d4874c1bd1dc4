/*
 * uffd_handshake: creating a userfaultfd for guest memory and handing it to another process
 * with Firecracker's one-message handshake (a bare JSON array of region mappings, the fd as
 * SCM_RIGHTS). Used by the Uffd restore backend and by PUT /uffd/wp.
 */
#ifndef FORKD_TESTVM_UFFD_HANDSHAKE_H
#define FORKD_TESTVM_UFFD_HANDSHAKE_H

#include <stddef.h>
#include <stdint.h>

struct uffd_handshake_region {
    uint64_t base_host_virt_addr;
    uint64_t size;
    uint64_t offset;
    uint64_t page_size; /* 4096, or 2 MiB for hugetlbfs memory */
};

/*
 * Opens a userfaultfd (non-blocking, close-on-exec, kernel faults included) with every feature
 * in required (fails if one is missing) plus those of optional the kernel offers.
 */
int uffd_open(uint64_t required, uint64_t optional, uint64_t *features_out, char *err,
              size_t err_size);

/* Registers [address, address + size) on uffd in mode (UFFDIO_REGISTER_MODE_*). */
int uffd_register(int uffd, uint64_t address, uint64_t size, uint64_t mode, char *err,
                  size_t err_size);

/*
 * Connects to the Unix socket at socket_path and sends the handshake for regions with uffd
 * attached. On success *socket_out is the connected socket, which the caller keeps open.
 */
int uffd_handshake_send(const char *socket_path, int uffd,
                        const struct uffd_handshake_region *regions, unsigned region_count,
                        int *socket_out, char *err, size_t err_size);

#endif
