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

/* Two runs further apart than this are never joined into one range: a joined range must not
 * hold more than a remote chunk (2 MiB) of what the guest did not write per gap. */
#define HOT_SET_MAX_GAP ((uint64_t)2 << 20)

/* Turns count written ranges of memory.bin (in any order, overlapping or not; each usually one
 * page, all 4 KiB aligned) into a hot set in out (room for STORE_MAX_HOT_RANGES), its size in
 * *out_count. Ranges are sorted and merged where they touch. While more than
 * STORE_MAX_HOT_RANGES remain, the smallest gaps between them (none above HOT_SET_MAX_GAP) are
 * closed: every page written stays in the set, with as few others as the bound allows. If that
 * is not enough (writes scattered wide apart), the STORE_MAX_HOT_RANGES ranges the guest wrote
 * most in are kept and the others dropped: the set stays what the guest was writing, not
 * memory at large. Ranges beyond the last whole 4 KiB page of memory_bytes are cut off. Sorts
 * and overwrites ranges. 0, or -ENOMEM (then no set). */
int hot_set_build(struct store_hot_range *ranges, size_t count, uint64_t memory_bytes,
                  struct store_hot_range *out, size_t *out_count);

/* The indices of the chunk_size chunks (below chunk_count) that the hot set of meta touches,
 * ascending, each once, into out (room for chunk_count); returns how many. */
uint64_t hot_set_chunks(const struct store_snapshot *meta, uint64_t chunk_size,
                        uint64_t chunk_count, uint64_t *out);

#endif
