/*
 * Taking back what forkd held for a VMM, out of the VMM process itself, after forkd restarted:
 * the guest memfd of a MEMFD VM and the userfaultfd of a UFFD fork. The VMM holds both (the
 * memfd as an open file or only as its mapping, the userfaultfd as an fd); pidfd_getfd(2)
 * duplicates an fd out of another process (forkd runs as root), /proc/<pid>/map_files opens
 * the file behind a mapping. Only ever called for a VMM proven to be the one forkd started.
 */
#ifndef FORKD_ENGINE_VMM_FDS_H
#define FORKD_ENGINE_VMM_FDS_H

#include <stdbool.h>
#include <sys/types.h>

/* A descriptor of the memfd named memfd_name (as given to memfd_create) whose inode is inode,
 * taken from the VMM's open files or, when it kept only the mapping, from the mapping. Returns
 * the fd (O_CLOEXEC) or -errno: -ENOENT when the VMM holds no such memfd. */
int vmm_fds_take_memfd(int pidfd, pid_t pid, const char *memfd_name, unsigned long long inode);

/* The VMM's userfaultfd: the one with write-protect faults (write_protect) or without (the
 * missing-page uffd of a UFFD restore). Returns the fd (O_CLOEXEC) or -errno: -ENOENT when it
 * has none, -EEXIST when it has several (no way to tell which is ours). */
int vmm_fds_take_uffd(int pidfd, pid_t pid, bool write_protect);

#endif
