/* Small file-system helpers shared by the engine and the daemon. */
#ifndef FORKD_FSUTIL_H
#define FORKD_FSUTIL_H

#include <stdbool.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Creates path and any missing parents with mode (like mkdir -p). Returns 0 or -errno. */
int fs_mkdir_parents(const char *path, mode_t mode);

/* True when something accepts connections on the Unix socket at path. */
bool fs_unix_socket_answers(const char *path);

/* Writes all length bytes (retrying short writes and EINTR). Returns 0 or -errno (-EIO when
 * the file takes no more). */
int fs_write_all(int fd, const void *buffer, size_t length);
/* The same at a file offset, leaving the file position alone. */
int fs_pwrite_all(int fd, const void *buffer, size_t length, off_t offset);

/* fsync()s a directory, making renames and creations inside it durable. Returns 0 or -errno. */
int fs_sync_dir(const char *path);

/* Replaces dir/name with length bytes of data, durably and atomically: written to dir/tmp_name
 * (created anew, never through a link), fsynced, renamed over name, and the directory fsynced;
 * a reader sees the old file or the new one, never a part. Returns 0 or -errno (the temporary
 * file removed). */
int fs_replace_file(const char *dir, const char *name, const char *tmp_name, const void *data,
                    size_t length);

#ifdef __cplusplus
}
#endif

#endif
