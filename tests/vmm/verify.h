/*
 * verify: checks a snapshot (vmstate + memory.bin) against the guest's invariant: for every
 * vCPU the counters in memory add up to its register total (or one more when it stopped
 * between the two increments), and every page the guest does not own still holds the boot
 * pattern. A snapshot whose memory lags or leads its vCPU state fails.
 */
#ifndef FORKD_TESTVM_VERIFY_H
#define FORKD_TESTVM_VERIFY_H

#include <stddef.h>
#include <stdint.h>

#include "guest_layout.h"

struct verify_result {
    unsigned vcpu_count;
    uint64_t totals[GUEST_MAX_VCPUS];
    uint64_t working_set_pages;
    uint64_t other_pages;
};

/*
 * Returns 0 when consistent, -EBADMSG with the first violation in err when not, or another
 * negative errno when the files cannot be read.
 */
int verify_snapshot(const char *vmstate_path, const char *memory_path, struct verify_result *out,
                    char *err, size_t err_size);

#endif
