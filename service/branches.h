/*
 * Branch jobs: each Branch RPC starts a job whose engine work runs on a worker thread of its
 * own, so the call's thread only streams events. A job keeps every phase event it produced (a
 * late or slow reader never misses one) and reads copy progress on demand (so progress is
 * coalesced to the reader's pace). Jobs outlive their call when detached, and finished jobs are
 * remembered for WatchBranch.
 */
#ifndef FORKD_SERVICE_BRANCHES_H
#define FORKD_SERVICE_BRANCHES_H

#include "serial.h"

#include <stdbool.h>

struct branch_table;

/* The table takes over ids (the source of branch ids). */
struct branch_table *branches_table_new(unsigned max_running, struct serial *ids);
/* Waits for every job's worker to end, then frees the table. */
void branches_table_free(struct branch_table *table);

/* Asks every running branch to abort (they clean up on their own threads). */
void branches_cancel_all(struct branch_table *table);
/* Waits until no branch runs, up to timeout_ms (< 0: no limit). True when none runs. */
bool branches_wait_idle(struct branch_table *table, int timeout_ms);

/* Lists the branch of vm_id to snapshot_name, which ran when an earlier forkd died, as
 * finished and FAILED ("forkd restarted") under a new branch id, so WatchBranch by snapshot
 * name tells its client what became of it. */
void branches_record_interrupted(struct branch_table *table, const char *snapshot_name,
                                 const char *vm_id);

#endif
