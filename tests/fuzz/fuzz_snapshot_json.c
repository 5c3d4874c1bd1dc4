/*
 * libFuzzer target: snapshot.json parsing, as the store runs it at start-up on every snapshot
 * directory (a file anyone who could write the state directory might have shaped). Nothing may
 * crash or read out of bounds; a parsed record must hold NUL-terminated strings and a hot set
 * that is sorted and within memory.bin.
 */
#include "forkd/store.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct store_snapshot meta;
    struct forkd_error err = {0};
    if (store_parse_metadata((const char *)data, size, &meta, &err) == 0) {
        if (strnlen(meta.name, sizeof(meta.name)) == sizeof(meta.name) ||
            strnlen(meta.vmm_version, sizeof(meta.vmm_version)) == sizeof(meta.vmm_version))
            abort();
        for (size_t i = 0; i < meta.label_count; i++)
            if (strnlen(meta.labels[i].value, sizeof(meta.labels[i].value)) ==
                sizeof(meta.labels[i].value))
                abort();
        /* A hot set as the page server and the lazy pull rely on it: sorted, within memory. */
        if (meta.hot_count > STORE_MAX_HOT_RANGES)
            abort();
        for (size_t i = 0; i < meta.hot_count; i++)
            if (meta.hot[i].length == 0 || meta.hot[i].offset > meta.memory_bytes ||
                meta.hot[i].length > meta.memory_bytes - meta.hot[i].offset ||
                (i > 0 && meta.hot[i].offset < meta.hot[i - 1].offset + meta.hot[i - 1].length))
                abort();
    }
    return 0;
}
