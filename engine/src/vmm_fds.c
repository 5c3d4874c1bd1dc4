/* Taking back a VMM's memfd and userfaultfd (see vmm_fds.h). */
#include "vmm_fds.h"

#include "basic/cleanup.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/userfaultfd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static int vmm_fds_getfd(int pidfd, int target)
{
    int fd = (int)syscall(SYS_pidfd_getfd, pidfd, target, 0); /* the kernel sets O_CLOEXEC */
    return fd < 0 ? -errno : fd;
}

/* readlink of /proc/<pid>/<dir>/<entry>, NUL-terminated; false when it cannot be read. */
static bool vmm_fds_link(pid_t pid, const char *dir, const char *entry, char *out, size_t size)
{
    char path[384];
    snprintf(path, sizeof(path), "/proc/%d/%s/%s", (int)pid, dir, entry);
    ssize_t n = readlink(path, out, size - 1);
    if (n < 0)
        return false;
    out[n] = '\0';
    return true;
}

/* A memfd shows as "/memfd:<name> (deleted)". */
static bool vmm_fds_is_memfd(const char *link, const char *memfd_name)
{
    char expected[PATH_MAX];
    snprintf(expected, sizeof(expected), "/memfd:%s (deleted)", memfd_name);
    return strcmp(link, expected) == 0;
}

static bool vmm_fds_inode_is(int fd, unsigned long long inode)
{
    struct stat st;
    return fstat(fd, &st) == 0 && (unsigned long long)st.st_ino == inode;
}

/* From the VMM's open files (a VMM that keeps its backing file open, as Firecracker does). */
static int vmm_fds_memfd_from_fds(int pidfd, pid_t pid, const char *name, unsigned long long ino)
{
    char path[64], link[PATH_MAX];
    snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
    _cleanup_closedir_ DIR *dir = opendir(path);
    if (!dir)
        return -errno;
    for (struct dirent *entry; (entry = readdir(dir));) {
        if (entry->d_name[0] == '.' || !vmm_fds_link(pid, "fd", entry->d_name, link, sizeof(link)) ||
            !vmm_fds_is_memfd(link, name))
            continue;
        int fd = vmm_fds_getfd(pidfd, atoi(entry->d_name));
        if (fd >= 0 && vmm_fds_inode_is(fd, ino))
            return fd;
        if (fd >= 0)
            close(fd);
    }
    return -ENOENT;
}

/* From the VMM's mappings (a VMM that closed the file once mapped, as the test VMM does). */
static int vmm_fds_memfd_from_maps(pid_t pid, const char *name, unsigned long long ino)
{
    char path[64], link[PATH_MAX];
    snprintf(path, sizeof(path), "/proc/%d/map_files", (int)pid);
    _cleanup_closedir_ DIR *dir = opendir(path);
    if (!dir)
        return -errno;
    for (struct dirent *entry; (entry = readdir(dir));) {
        if (entry->d_name[0] == '.' ||
            !vmm_fds_link(pid, "map_files", entry->d_name, link, sizeof(link)) ||
            !vmm_fds_is_memfd(link, name))
            continue;
        char file[384];
        snprintf(file, sizeof(file), "/proc/%d/map_files/%s", (int)pid, entry->d_name);
        int fd = open(file, O_RDWR | O_CLOEXEC);
        if (fd >= 0 && vmm_fds_inode_is(fd, ino))
            return fd;
        if (fd >= 0)
            close(fd);
    }
    return -ENOENT;
}

int vmm_fds_take_memfd(int pidfd, pid_t pid, const char *memfd_name, unsigned long long inode)
{
    int fd = vmm_fds_memfd_from_fds(pidfd, pid, memfd_name, inode);
    return fd >= 0 ? fd : vmm_fds_memfd_from_maps(pid, memfd_name, inode);
}

/* The features of a userfaultfd, from the "API:\t<api>:<features>:<ioctls>" line of its
 * fdinfo. */
static int vmm_fds_uffd_features(pid_t pid, const char *fd_name, unsigned long long *out)
{
    char path[384], line[256];
    snprintf(path, sizeof(path), "/proc/%d/fdinfo/%s", (int)pid, fd_name);
    _cleanup_fclose_ FILE *file = fopen(path, "re");
    if (!file)
        return -errno;
    while (fgets(line, sizeof(line), file)) {
        unsigned long long api;
        if (sscanf(line, "API:\t%llx:%llx:", &api, out) == 2)
            return 0;
    }
    return -ENOENT;
}

int vmm_fds_take_uffd(int pidfd, pid_t pid, bool write_protect)
{
    char path[64], link[PATH_MAX];
    snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
    _cleanup_closedir_ DIR *dir = opendir(path);
    if (!dir)
        return -errno;
    int found = -1, matches = 0;
    for (struct dirent *entry; (entry = readdir(dir));) {
        unsigned long long features;
        if (entry->d_name[0] == '.' || !vmm_fds_link(pid, "fd", entry->d_name, link, sizeof(link)) ||
            strcmp(link, "anon_inode:[userfaultfd]") != 0 ||
            vmm_fds_uffd_features(pid, entry->d_name, &features) < 0 ||
            !!(features & UFFD_FEATURE_PAGEFAULT_FLAG_WP) != write_protect)
            continue;
        matches++;
        found = atoi(entry->d_name);
    }
    if (matches != 1)
        return matches ? -EEXIST : -ENOENT;
    return vmm_fds_getfd(pidfd, found);
}
