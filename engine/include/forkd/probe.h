/*
 * Host capability probe: what this host lets forkd do (KVM, userfaultfd and its write-protect
 * flavours). Every answer is found by trying the thing, not by reading version numbers: KVM by
 * creating a VM, write-protect by arming a real anonymous and a real memfd mapping.
 */
#ifndef FORKD_PROBE_H
#define FORKD_PROBE_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct probe_host_caps {
    char kernel_release[65];

    bool kvm_usable;
    int kvm_api_version; /* 0 when /dev/kvm cannot be opened */
    char kvm_error[160];

    bool uffd_usable;
    uint64_t uffd_features; /* what UFFDIO_API offers */
    bool uffd_wp_anonymous;
    bool uffd_wp_shmem;
    bool uffd_wp_unpopulated;
    char uffd_error[160];

    int unprivileged_userfaultfd; /* /proc/sys/vm/unprivileged_userfaultfd, -1 unreadable */
};

/* Fills caps. Never fails: what cannot be probed is reported as unusable with the reason in
 * kvm_error / uffd_error. */
void probe_host(struct probe_host_caps *caps);

/* LIVE branches of the VMs forkd boots and of MEMFD forks: KVM usable and write-protect works
 * on shmem (memfd) memory, which forkd boots every VM on by default. */
bool probe_live_branch_supported(const struct probe_host_caps *caps);
/* LIVE branches of anonymous guest memory too: write-protect must also cover pages the guest
 * never touched, which needs UFFD_FEATURE_WP_UNPOPULATED (kernel 6.4+); without it a write to
 * such a page after the pause does not trap and the snapshot would be torn. */
bool probe_live_branch_anonymous_supported(const struct probe_host_caps *caps);

/* Whether this kernel offers write-protect of never-touched anonymous pages
 * (UFFD_FEATURE_WP_UNPOPULATED with PAGEFAULT_FLAG_WP). Probed once per process. */
bool probe_wp_unpopulated(void);

/* Opens a userfaultfd for the calling process (syscall, falling back to /dev/userfaultfd when
 * the syscall is refused for lack of privilege). flags: O_CLOEXEC | O_NONBLOCK, optionally
 * UFFD_USER_MODE_ONLY. Returns the fd or a negative errno. */
int probe_open_userfaultfd(int flags);

#ifdef __cplusplus
}
#endif

#endif
