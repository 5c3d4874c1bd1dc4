/*
 * A counter that survives restarts: the numbers it hands out (branch ids) are never handed out
 * twice on one state directory, even across a crash. It reserves them in blocks, so the file
 * that holds the high-water mark is rewritten once per block, not once per number; a restart
 * skips what was left of the last block.
 */
#ifndef FORKD_SERVICE_SERIAL_H
#define FORKD_SERVICE_SERIAL_H

#include "basic/error.h"

struct serial;

/* Opens the counter kept in file name of directory dir (created with 0 when missing; never a
 * link). Returns 0 or -errno. */
int serial_open(const char *dir, const char *name, struct serial **out, struct forkd_error *err);
/* The next number (from 1); 0 or -errno when the next block cannot be reserved. Thread-safe. */
int serial_next(struct serial *serial, unsigned long *out, struct forkd_error *err);
/* NULL is a no-op. */
void serial_close(struct serial *serial);

#endif
