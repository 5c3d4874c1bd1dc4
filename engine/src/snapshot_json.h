/*
 * snapshot.json: the codec of a snapshot's record (struct store_snapshot, format_version 1).
 * Reading is strict: a missing field or a wrong type is corruption. No file I/O here: the store
 * reads and writes the file. Optional fields (absent from records written before they existed):
 * the figures disk_capture_ns and disk_copied_bytes, and "hot", the hot set:
 *   "hot": {"version": 1, "ranges": [[offset, length], ...]}   (bytes of memory.bin)
 */
#ifndef FORKD_SNAPSHOT_JSON_H
#define FORKD_SNAPSHOT_JSON_H

#include "forkd/store.h"

#include <stdbool.h>
#include <stddef.h>

/* The record as JSON text (malloc'd), NULL when out of memory. */
char *snapshot_json_format(const struct store_snapshot *meta);

/* Fills meta from JSON text; -EIO with the defect named in err. The record is READY. */
int snapshot_json_parse(const char *text, size_t len, struct store_snapshot *meta,
                        struct forkd_error *err);

/* Checks meta's hot set: at most STORE_MAX_HOT_RANGES ranges, 4 KiB aligned, non-empty, sorted
 * and apart, within memory_bytes. -EIO naming the range and what is wrong with it. */
int snapshot_json_hot_check(const struct store_snapshot *meta, struct forkd_error *err);

/* False when a number of meta cannot be written exactly (beyond +-2^53). */
bool snapshot_json_numbers_fit(const struct store_snapshot *meta);

/* True for a mode snapshot.json has a name for. */
bool snapshot_json_mode_known(enum store_mode mode);

#endif
