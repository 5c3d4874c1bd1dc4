/*
 * The copy baseline: a plain sequential copy of the same number of bytes from a memfd to a new
 * file on the snapshot store's file system. It matches what the engine's copy_ns covers: the
 * file is created and sized beforehand (the engine does that before the pause), then the timed
 * part reads and writes in the engine's chunk size (2 MiB) and ends with fsync.
 */
#include "bench.h"

#include "basic/cleanup.h"
#include "basic/fsutil.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define COPY_CHUNK_BYTES (2u << 20) /* the engine's BULK_CHUNK_BYTES */

static int copy_chunks(int from, int to, uint64_t bytes, uint8_t *buffer, struct forkd_error *err)
{
    for (uint64_t offset = 0; offset < bytes;) {
        size_t length = bytes - offset < COPY_CHUNK_BYTES ? bytes - offset : COPY_CHUNK_BYTES;
        ssize_t n = pread(from, buffer, length, (off_t)offset);
        if (n <= 0)
            return forkd_error_set(err, n < 0 ? -errno : -EIO, "baseline: read memfd: %s",
                                   n < 0 ? strerror(errno) : "short");
        int rc = fs_pwrite_all(to, buffer, (size_t)n, (off_t)offset);
        if (rc < 0)
            return forkd_error_errno(err, rc, "baseline: write");
        offset += (uint64_t)n;
    }
    return 0;
}

int bench_copy_baseline(int memfd, uint64_t bytes, const char *dir, double *bytes_per_s,
                        struct forkd_error *err)
{
    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/baseline-copy.bin", dir);
    unlink(path);
    _cleanup_close_ int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return forkd_error_errno(err, -errno, "baseline: create %s", path);
    _cleanup_free_ uint8_t *buffer = aligned_alloc(4096, COPY_CHUNK_BYTES);
    int rc = buffer ? 0 : forkd_error_set(err, -ENOMEM, "baseline: out of memory");
    if (rc == 0 && ftruncate(fd, (off_t)bytes) < 0)
        rc = forkd_error_errno(err, -errno, "baseline: size %s", path);
    uint64_t start = bench_now_ns();
    if (rc == 0)
        rc = copy_chunks(memfd, fd, bytes, buffer, err);
    if (rc == 0 && fsync(fd) < 0)
        rc = forkd_error_errno(err, -errno, "baseline: fsync");
    uint64_t elapsed = bench_now_ns() - start;
    unlink(path);
    if (rc == 0)
        *bytes_per_s = (double)bytes * 1e9 / (double)elapsed;
    return rc;
}
