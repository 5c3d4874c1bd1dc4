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

#ifdef __cplusplus
}
#endif

#endif
