/*
 * A snapshot's hot set (struct store_snapshot's hot ranges, "hot" in snapshot.json): built from
 * the pages a branch saw the guest write, coalesced into at most STORE_MAX_HOT_RANGES ranges;
 * and the chunks those ranges touch, which a lazy pull fetches before the others.
 */
#ifndef FORKD_HOT_SET_H
#define FORKD_HOT_SET_H

#include "forkd/store.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Turns count written runs of memory.bin (in any order, overlapping or not; each usually one
 * page, all 4 KiB aligned) into a hot set in out (room for STORE_MAX_HOT_RANGES), its size in
 * *out_count. Runs are sorted and merged where they touch; while more than STORE_MAX_HOT_RANGES
 * remain, the smallest gaps between them are closed, so the set covers every page written and
 * as few others as the bound allows. Runs beyond the last whole 4 KiB page of memory_bytes are
 * cut off. Sorts and overwrites runs. 0, or -ENOMEM (then no set). */
int hot_set_build(struct store_hot_range *runs, size_t count, uint64_t memory_bytes,
                  struct store_hot_range *out, size_t *out_count);

/* The indices of the chunk_size chunks (below chunk_count) that the hot set of meta touches,
 * ascending, each once, into out (room for chunk_count); returns how many. */
uint64_t hot_set_chunks(const struct store_snapshot *meta, uint64_t chunk_size,
                        uint64_t chunk_count, uint64_t *out);

#endif
