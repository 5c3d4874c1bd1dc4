/*
 * Pages of the List calls: replies stay far below clients' 4 MiB message limit whatever the
 * daemon holds, and a page costs the daemon the same whatever it holds. Tokens are the last
 * item's key (a snapshot name, a VM id): stable while items come and go between pages.
 */
#ifndef FORKD_SERVICE_PAGING_H
#define FORKD_SERVICE_PAGING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PAGING_DEFAULT_SIZE 500
#define PAGING_MAX_SIZE     1000

/* The page size to use for a requested one: 0 gives the default, more than the maximum gives
 * the maximum. */
size_t paging_size(uint32_t requested);

/* Parses a ListVms page token ("" or a VM id "vm-<n>") into n (0 for ""). Returns 0 or -EINVAL. */
int paging_vm_token(const char *token, unsigned long *out);

#endif
