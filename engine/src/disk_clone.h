/*
 * Cloning drive files: a reflink (FICLONE), whose cost grows with the file's extents, not its
 * size, so a branch can capture a writable drive inside its pause and every fork gets a disk of
 * its own. Owns the probe of whether a file system can reflink (made once per file system, by
 * cloning a small temporary file) and the explicit fallback to a byte copy (copy_file_range).
 */
#ifndef FORKD_ENGINE_DISK_CLONE_H
#define FORKD_ENGINE_DISK_CLONE_H

#include "basic/error.h"

#include <stdbool.h>
#include <stdint.h>

/* 0 when files in dir can be reflinked, -EOPNOTSUPP naming the file system and what would work
 * otherwise, or another -errno when the probe itself failed. The answer is kept per file
 * system (st_dev): later calls for the same one do not probe again. */
int disk_clone_probe(const char *dir, struct forkd_error *err);

/* True when path and dir are on one file system (a reflink cannot cross file systems). */
bool disk_clone_same_file_system(const char *path, const char *dir);

/* Creates target (exclusively, mode 0600) as a clone of source: a reflink; where the file
 * system cannot reflink and allow_copy is set, a byte copy (*copied_bytes set; 0 after a
 * reflink). -EOPNOTSUPP (no reflink and no copy allowed), -errno otherwise, naming the files. */
int disk_clone_file(const char *source, const char *target, bool allow_copy, uint64_t *copied_bytes,
                    struct forkd_error *err);

#endif
