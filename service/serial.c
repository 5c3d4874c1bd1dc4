/*
 * A counter that survives restarts (see serial.h). The file holds one decimal number: every
 * number up to it may have been handed out. It is replaced atomically (fs_replace_file) and
 * read relative to the directory, never through a link.
 */
#include "serial.h"

#include "basic/cleanup.h"
#include "basic/fsutil.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Numbers reserved per write of the file. */
#define SERIAL_BLOCK 1024

struct serial {
    pthread_mutex_t lock; /* guards next and reserved */
    int dir_fd;
    char name[64];
    char dir[PATH_MAX];
    unsigned long next;     /* the number serial_next hands out next */
    unsigned long reserved; /* the high-water mark in the file */
};

/* Reads the high-water mark; 0 when the file is missing. */
static int serial_read(struct serial *serial, unsigned long *out, struct forkd_error *err)
{
    _cleanup_close_ int fd =
        openat(serial->dir_fd, serial->name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    *out = 0;
    if (fd < 0 && errno == ENOENT)
        return 0;
    if (fd < 0)
        return forkd_error_errno(err, -errno, "open %s/%s", serial->dir, serial->name);
    char text[32] = "";
    ssize_t length = read(fd, text, sizeof(text) - 1);
    if (length < 0)
        return forkd_error_errno(err, -errno, "read %s/%s", serial->dir, serial->name);
    char *end;
    errno = 0;
    unsigned long value = strtoul(text, &end, 10);
    if (errno || end == text || (*end && *end != '\n') || value > ULONG_MAX - SERIAL_BLOCK)
        return forkd_error_set(err, -EINVAL, "%s/%s does not hold a counter", serial->dir,
                               serial->name);
    *out = value;
    return 0;
}

/* Makes value the file's high-water mark, durably. */
static int serial_write(struct serial *serial, unsigned long value, struct forkd_error *err)
{
    char tmp_name[80], text[32];
    snprintf(tmp_name, sizeof(tmp_name), ".%s.tmp", serial->name);
    int length = snprintf(text, sizeof(text), "%lu\n", value);
    int rc = fs_replace_file(serial->dir, serial->name, tmp_name, text, (size_t)length);
    return rc < 0 ? forkd_error_errno(err, rc, "write %s/%s", serial->dir, serial->name) : 0;
}

int serial_open(const char *dir, const char *name, struct serial **out, struct forkd_error *err)
{
    _cleanup_free_ struct serial *serial = calloc(1, sizeof(*serial));
    if (!serial)
        return forkd_error_set(err, -ENOMEM, "counter %s: out of memory", name);
    snprintf(serial->dir, sizeof(serial->dir), "%s", dir);
    snprintf(serial->name, sizeof(serial->name), "%s", name);
    serial->dir_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (serial->dir_fd < 0)
        return forkd_error_errno(err, -errno, "open directory %s", dir);
    int rc = serial_read(serial, &serial->reserved, err);
    if (rc < 0) {
        close(serial->dir_fd);
        return rc;
    }
    serial->next = serial->reserved + 1;
    pthread_mutex_init(&serial->lock, NULL);
    *out = take_ptr(serial);
    return 0;
}

int serial_next(struct serial *serial, unsigned long *out, struct forkd_error *err)
{
    pthread_mutex_lock(&serial->lock);
    int rc = 0;
    if (serial->next > serial->reserved) {
        if (serial->reserved > ULONG_MAX - SERIAL_BLOCK)
            rc = forkd_error_set(err, -EOVERFLOW, "%s/%s: the counter is exhausted", serial->dir,
                                 serial->name);
        else
            rc = serial_write(serial, serial->reserved + SERIAL_BLOCK, err);
        if (rc == 0)
            serial->reserved += SERIAL_BLOCK;
    }
    if (rc == 0)
        *out = serial->next++;
    pthread_mutex_unlock(&serial->lock);
    return rc;
}

void serial_close(struct serial *serial)
{
    if (!serial)
        return;
    close(serial->dir_fd);
    pthread_mutex_destroy(&serial->lock);
    free(serial);
}
