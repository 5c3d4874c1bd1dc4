/* VMM identity records (see vm_record.h). */
#include "vm_record.h"

#include "basic/cleanup.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct vm_identity {
    pid_t pid;
    unsigned long long start_time;
    char exe[PATH_MAX];
};

/* Reads the live identity of pid from /proc. Returns 0 or -errno. */
static int vm_identity_of(pid_t pid, struct vm_identity *out)
{
    char path[64], stat[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    ssize_t n = read(fd, stat, sizeof(stat) - 1);
    if (n <= 0)
        return -EIO;
    stat[n] = '\0';
    /* The command name may hold spaces and parentheses: fields start after the last ')'. */
    char *fields = strrchr(stat, ')');
    if (!fields)
        return -EIO;
    char *field = strtok(fields + 1, " ");
    for (int i = 3; field && i < 22; i++) /* field 3 is the state; 22 the start time */
        field = strtok(NULL, " ");
    if (!field)
        return -EIO;
    out->start_time = strtoull(field, NULL, 10);
    snprintf(path, sizeof(path), "/proc/%d/exe", (int)pid);
    ssize_t length = readlink(path, out->exe, sizeof(out->exe) - 1);
    if (length < 0)
        return -errno;
    out->exe[length] = '\0';
    out->pid = pid;
    return 0;
}

static int vm_record_path(const char *run_dir, const char *vm_id, char *path, size_t size)
{
    int n = snprintf(path, size, "%s/%s.proc", run_dir, vm_id);
    return n < 0 || (size_t)n >= size ? -ENAMETOOLONG : 0;
}

int vm_record_write(const char *run_dir, const char *vm_id, pid_t pid)
{
    struct vm_identity identity;
    char path[PATH_MAX];
    int rc = vm_identity_of(pid, &identity);
    if (rc == 0)
        rc = vm_record_path(run_dir, vm_id, path, sizeof(path));
    if (rc < 0)
        return rc;
    unlink(path);
    _cleanup_close_ int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    char text[PATH_MAX + 64];
    int length = snprintf(text, sizeof(text), "%d %llu %s\n", (int)pid, identity.start_time,
                          identity.exe);
    if (length < 0 || (size_t)length >= sizeof(text) || write(fd, text, (size_t)length) != length)
        return -EIO;
    return 0;
}

/* Reads a record: only a small regular file, never through a symlink, never blocking. */
static int vm_record_read(const char *path, struct vm_identity *out)
{
    _cleanup_close_ int fd = open(path, O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        return -errno;
    if (!S_ISREG(st.st_mode) || st.st_uid != geteuid() || st.st_size >= PATH_MAX + 64)
        return -EPERM;
    char text[PATH_MAX + 64];
    ssize_t n = read(fd, text, sizeof(text) - 1);
    if (n <= 0)
        return -EIO;
    text[n] = '\0';
    int pid, used = 0;
    if (sscanf(text, "%d %llu %n", &pid, &out->start_time, &used) != 2 || used == 0)
        return -EIO;
    char *end = strchr(text + used, '\n');
    if (!end)
        return -EIO;
    *end = '\0';
    snprintf(out->exe, sizeof(out->exe), "%s", text + used);
    out->pid = pid;
    return 0;
}

bool vm_record_matches(const char *run_dir, const char *vm_id, pid_t pid)
{
    char path[PATH_MAX];
    struct vm_identity recorded, live;
    if (vm_record_path(run_dir, vm_id, path, sizeof(path)) < 0 ||
        vm_record_read(path, &recorded) < 0 || vm_identity_of(pid, &live) < 0)
        return false;
    return recorded.pid == live.pid && recorded.start_time == live.start_time &&
           strcmp(recorded.exe, live.exe) == 0;
}

void vm_record_remove(const char *run_dir, const char *vm_id)
{
    char path[PATH_MAX];
    if (vm_record_path(run_dir, vm_id, path, sizeof(path)) == 0)
        unlink(path);
}
