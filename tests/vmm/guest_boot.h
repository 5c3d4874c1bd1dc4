/*
 * guest_boot: prepares freshly filled guest memory for a cold boot: loads the guest image,
 * writes the identity-mapping page tables, the GDT and the guest_config that carries the
 * workload. Runs on the API thread before any vCPU exists.
 */
#ifndef FORKD_TESTVM_GUEST_BOOT_H
#define FORKD_TESTVM_GUEST_BOOT_H

#include <stddef.h>

#include "boot_args.h"
#include "guest_layout.h"
#include "guest_memory.h"

struct guest_boot_result {
    struct guest_config config;
    struct guest_image_header header;
};

int guest_boot_prepare(struct guest_memory *memory, const char *image_path,
                       const struct workload *workload, unsigned vcpu_count, uint64_t tsc_khz,
                       struct guest_boot_result *out, char *err, size_t err_size);

/* Number of working-set pages the layout allows (what pages= defaults to). */
uint64_t guest_boot_available_pages(const struct guest_memory *memory);

#endif
