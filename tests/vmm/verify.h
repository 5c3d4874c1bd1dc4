/*
 * verify: checks a snapshot (vmstate + memory.bin) against the guest's invariant: for every
 * vCPU the counters in memory add up to its register total (or one more when it stopped
 * between the two increments), and every page the guest does not own still holds the boot
 * pattern. A snapshot whose memory lags or leads its vCPU state fails. When the guest writes a
 * disk (guest_config.disk), the snapshot's copy of that drive must hold, for every vCPU, the
 * total its memory records as last written (or its register total at guest_disk_window): a
 * disk captured at another instant than memory fails. When the guest has a balloon, every
 * balloon page its table says is in use must hold its signature: a page lost (discarded, or
 * never captured) while in use fails.
 */
#ifndef FORKD_TESTVM_VERIFY_H
#define FORKD_TESTVM_VERIFY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "guest_layout.h"

struct verify_result {
    unsigned vcpu_count;
    uint64_t totals[GUEST_MAX_VCPUS];
    uint64_t working_set_pages;
    uint64_t other_pages;
    uint64_t balloon_table_pages, balloon_in_use, balloon_free; /* guest_config.balloon_pages */
    bool disk_checked;
};

/*
 * Returns 0 when consistent, -EBADMSG with the first violation in err when not, or another
 * negative errno when the files cannot be read.
 */
int verify_snapshot(const char *vmstate_path, const char *memory_path, struct verify_result *out,
                    char *err, size_t err_size);
/* The same, with the snapshot's copy of the guest's disk (NULL: the guest must write none). */
int verify_snapshot_with_disk(const char *vmstate_path, const char *memory_path,
                              const char *disk_path, struct verify_result *out, char *err,
                              size_t err_size);

#endif
