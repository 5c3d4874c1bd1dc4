/*
 * boot_args: the guest workload grammar carried in PUT /boot-source's boot_args.
 * Space-separated key=value pairs: pages=N pattern=sequential|random|hotset rate=N seed=N
 * report_us=N (how often the guest reports its progress, 100 us to 1 s; default 10 ms)
 * balloon=N (N pages, at most GUEST_BALLOON_MAX_PAGES, that the guest keeps handing back to the
 * VMM and taking back; default 0, none), skip=N (the working set starts N pages further into
 * memory; default 0, right after the system area).
 */
#ifndef FORKD_TESTVM_BOOT_ARGS_H
#define FORKD_TESTVM_BOOT_ARGS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct workload {
    uint64_t pages;   /* 0 = every page the guest may use */
    uint32_t pattern; /* enum guest_pattern */
    uint64_t rate;    /* page writes per second per vCPU, 0 = flat out */
    uint64_t seed;
    uint64_t report_us;     /* 0 = the guest's default, 10 ms */
    uint64_t balloon_pages; /* 0 = no balloon */
    uint64_t skip_pages;    /* pages left out before the working set */
    /* Not a boot_args key: set by the VMM when it has a writable drive for the guest's disk
     * writes (guest_config.disk). */
    bool disk;
};

/* Parses text (NULL or empty = all defaults) into *out; unknown keys and bad values fail. */
int boot_args_parse(const char *text, struct workload *out, char *err, size_t err_size);

const char *boot_args_pattern_name(uint32_t pattern);

#endif
