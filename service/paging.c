/* List pages (see paging.h). */
#include "paging.h"

#include <errno.h>
#include <stdio.h>

size_t paging_size(uint32_t requested)
{
    if (requested == 0)
        return PAGING_DEFAULT_SIZE;
    return requested > PAGING_MAX_SIZE ? PAGING_MAX_SIZE : requested;
}

int paging_vm_token(const char *token, unsigned long *out)
{
    *out = 0;
    if (!token[0])
        return 0;
    int used = 0;
    if (sscanf(token, "vm-%lu%n", out, &used) != 1 || token[used] != '\0' || *out == 0)
        return -EINVAL;
    return 0;
}
