/*
 * userfaultfd constants newer than Debian 12's <linux/userfaultfd.h> (which stops at
 * UFFD_FEATURE_WP_HUGETLBFS_SHMEM). Values are the kernel's ABI; each is defined only when
 * the system header lacks it, so a newer header always wins. Probe features at run time:
 * a constant being defined here says nothing about the running kernel.
 */
#ifndef FORKD_COMPAT_USERFAULTFD_H
#define FORKD_COMPAT_USERFAULTFD_H

#include <linux/userfaultfd.h>

#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12) /* WP on shmem/memfd and hugetlbfs, 5.19+ */
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13) /* WP markers on never-touched anon ptes, 6.4+ */
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15) /* kernel resolves WP faults itself: no messages */
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif

/* ioctl on /dev/userfaultfd that returns a new userfaultfd (Linux 6.1+). */
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

#endif
