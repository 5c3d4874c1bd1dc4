/* 2 MiB huge pages for a test or the benchmark: vm.nr_hugepages raised until enough are free,
 * and the old setting put back afterwards. Plain C, for the C and the C++ tests alike. */
#ifndef FORKD_TEST_HUGE_PAGES_H
#define FORKD_TEST_HUGE_PAGES_H

#include <errno.h>
#include <stdio.h>

#define HUGE_PAGES_NR   "/proc/sys/vm/nr_hugepages"
#define HUGE_PAGES_FREE "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages"

/* The number in a /proc or /sys file, or -1. */
static inline long huge_pages_read(const char *path)
{
    FILE *f = fopen(path, "re");
    long value = -1;
    if (f && fscanf(f, "%ld", &value) != 1)
        value = -1;
    if (f)
        fclose(f);
    return value;
}

static inline int huge_pages_write(const char *path, long value)
{
    FILE *f = fopen(path, "we");
    if (!f)
        return -errno;
    int rc = fprintf(f, "%ld\n", value) < 0 ? -errno : 0;
    if (fclose(f) != 0 && rc == 0)
        rc = -errno;
    return rc;
}

/* Makes `pages` huge pages free on top of those in use. *before receives the setting to put
 * back with huge_pages_restore (-1 when it was left alone). 0; -ENOENT when the counts cannot
 * be read; -ENOMEM when the kernel could not free that many (memory too fragmented); or the
 * write's -errno. */
static inline int huge_pages_reserve(long pages, long *before)
{
    long total = huge_pages_read(HUGE_PAGES_NR), free = huge_pages_read(HUGE_PAGES_FREE);
    *before = -1;
    if (total < 0 || free < 0)
        return -ENOENT;
    if (free >= pages)
        return 0;
    *before = total;
    int rc = huge_pages_write(HUGE_PAGES_NR, total + pages - free);
    if (rc < 0)
        return rc;
    return huge_pages_read(HUGE_PAGES_FREE) >= pages ? 0 : -ENOMEM;
}

static inline void huge_pages_restore(long before)
{
    if (before >= 0)
        huge_pages_write(HUGE_PAGES_NR, before);
}

#endif
