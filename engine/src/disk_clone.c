/* Cloning drive files with reflinks (see disk_clone.h). */
#include "disk_clone.h"

#include "basic/cleanup.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#define DISK_CLONE_PROBE_CACHE 16

struct disk_clone_probe_result {
    dev_t device;
    int rc;
    char message[FORKD_ERROR_MESSAGE_MAX];
};

static pthread_mutex_t disk_clone_lock = PTHREAD_MUTEX_INITIALIZER;
static struct disk_clone_probe_result disk_clone_cache[DISK_CLONE_PROBE_CACHE];
static size_t disk_clone_cached;

static const char *disk_clone_fs_name(long type)
{
    switch ((unsigned long)type) {
    case 0xef53:
        return "ext4";
    case 0x01021994:
        return "tmpfs";
    case 0x58465342:
        return "xfs";
    case 0x9123683e:
        return "btrfs";
    case 0x794c7630:
        return "overlayfs";
    case 0x01021997:
        return "9p";
    default:
        return NULL;
    }
}

/* Clones a one-page temporary file inside dir. */
static int disk_clone_try(const char *dir, struct forkd_error *err)
{
    char source_path[4096], target_path[4096 + 16];
    snprintf(source_path, sizeof(source_path), "%s/.reflink-probe-XXXXXX", dir);
    _cleanup_close_ int source = mkostemp(source_path, O_CLOEXEC);
    if (source < 0)
        return forkd_error_errno(err, -errno, "reflink probe: create a file in %s", dir);
    char page[4096];
    memset(page, 0x5a, sizeof(page));
    int rc = write(source, page, sizeof(page)) == (ssize_t)sizeof(page) ? 0 : -EIO;
    snprintf(target_path, sizeof(target_path), "%s.clone", source_path);
    _cleanup_close_ int target =
        rc == 0 ? open(target_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600) : -1;
    if (rc == 0 && target < 0)
        rc = -errno;
    if (rc == 0 && ioctl(target, FICLONE, source) < 0)
        rc = -errno;
    unlink(source_path);
    if (target >= 0)
        unlink(target_path);
    if (rc == 0)
        return 0;
    struct statfs fs;
    bool known = statfs(dir, &fs) == 0;
    const char *name = known ? disk_clone_fs_name(fs.f_type) : NULL;
    char what[64] = "file system of unknown type";
    if (name)
        snprintf(what, sizeof(what), "%s", name);
    else if (known)
        snprintf(what, sizeof(what), "file system type 0x%lx", (unsigned long)fs.f_type);
    if (rc == -EOPNOTSUPP || rc == -EINVAL || rc == -ENOTTY || rc == -EXDEV)
        return forkd_error_set(
            err, -EOPNOTSUPP,
            "the state directory %s (%s) cannot make reflink copies (FICLONE: %s), which a "
            "branch needs to capture a writable drive inside its pause: put the state directory "
            "and the drives on XFS (mkfs.xfs -m reflink=1, the default) or btrfs, or boot with a "
            "read-only root and an in-memory overlay, or accept a copy inside the pause "
            "(allow_disk_copy_in_pause)",
            dir, what, strerror(-rc));
    return forkd_error_errno(err, rc, "reflink probe in %s", dir);
}

int disk_clone_probe(const char *dir, struct forkd_error *err)
{
    struct stat st;
    if (stat(dir, &st) < 0)
        return forkd_error_errno(err, -errno, "reflink probe: %s", dir);
    pthread_mutex_lock(&disk_clone_lock);
    for (size_t i = 0; i < disk_clone_cached; i++) {
        if (disk_clone_cache[i].device != st.st_dev)
            continue;
        int rc = disk_clone_cache[i].rc;
        if (rc < 0)
            forkd_error_set(err, rc, "%s", disk_clone_cache[i].message);
        pthread_mutex_unlock(&disk_clone_lock);
        return rc;
    }
    struct forkd_error probe_err = {0};
    int rc = disk_clone_try(dir, &probe_err);
    /* A probe that could not run (no space, a transient error) is not an answer: ask again. */
    if ((rc == 0 || rc == -EOPNOTSUPP) && disk_clone_cached < DISK_CLONE_PROBE_CACHE) {
        struct disk_clone_probe_result *slot = &disk_clone_cache[disk_clone_cached++];
        slot->device = st.st_dev;
        slot->rc = rc;
        snprintf(slot->message, sizeof(slot->message), "%s", probe_err.message);
    }
    pthread_mutex_unlock(&disk_clone_lock);
    if (rc < 0)
        forkd_error_set(err, rc, "%s", probe_err.message);
    return rc;
}

bool disk_clone_same_file_system(const char *path, const char *dir)
{
    struct stat a, b;
    return stat(path, &a) == 0 && stat(dir, &b) == 0 && a.st_dev == b.st_dev;
}

static int disk_clone_copy(int source, int target, const char *source_path, uint64_t *copied,
                           struct forkd_error *err)
{
    struct stat st;
    if (fstat(source, &st) < 0)
        return forkd_error_errno(err, -errno, "stat %s", source_path);
    loff_t in = 0, out = 0;
    while (in < st.st_size) {
        ssize_t n = copy_file_range(source, &in, target, &out, (size_t)(st.st_size - in), 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return forkd_error_errno(err, n < 0 ? -errno : -EIO, "copy %s", source_path);
    }
    *copied = (uint64_t)in;
    return 0;
}

int disk_clone_file(const char *source_path, const char *target_path, bool allow_copy,
                    uint64_t *copied_bytes, struct forkd_error *err)
{
    *copied_bytes = 0;
    _cleanup_close_ int source = open(source_path, O_RDONLY | O_CLOEXEC);
    if (source < 0)
        return forkd_error_errno(err, -errno, "open drive %s", source_path);
    _cleanup_close_ int target =
        open(target_path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (target < 0)
        return forkd_error_errno(err, -errno, "create %s", target_path);
    int rc = ioctl(target, FICLONE, source) == 0 ? 0 : -errno;
    if (rc == -EOPNOTSUPP || rc == -EINVAL || rc == -EXDEV || rc == -ENOTTY) {
        if (!allow_copy) {
            unlink(target_path);
            return forkd_error_set(err, -EOPNOTSUPP, "reflink %s to %s: %s", source_path,
                                   target_path, strerror(-rc));
        }
        rc = disk_clone_copy(source, target, source_path, copied_bytes, err);
    } else if (rc < 0) {
        forkd_error_errno(err, rc, "reflink %s to %s", source_path, target_path);
    }
    if (rc < 0)
        unlink(target_path);
    return rc;
}
