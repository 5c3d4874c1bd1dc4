/*
 * The identity record of a VMM process forkd started: "<run_dir>/<vm id>.proc" holds its pid,
 * its start time (field 22 of /proc/<pid>/stat, in clock ticks since boot) and its executable
 * (/proc/<pid>/exe). A later forkd kills a leftover VMM only when the process answering on the
 * VM's socket is, by all three, the one recorded: a pid alone may have been reused, and a socket
 * in the run directory may have been planted (or be a symlink to someone else's).
 */
#ifndef FORKD_ENGINE_VM_RECORD_H
#define FORKD_ENGINE_VM_RECORD_H

#include <stdbool.h>
#include <sys/types.h>

/* Records pid (a started VMM, after exec) as VM vm_id's process. Returns 0 or -errno. */
int vm_record_write(const char *run_dir, const char *vm_id, pid_t pid);

/* True when pid is, by pid, start time and executable, the process recorded for vm_id. */
bool vm_record_matches(const char *run_dir, const char *vm_id, pid_t pid);

/* Removes vm_id's record, if any. */
void vm_record_remove(const char *run_dir, const char *vm_id);

#endif
