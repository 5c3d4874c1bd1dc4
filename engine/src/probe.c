/*
 * Host capability probe (see forkd/probe.h). Runs once at daemon start; each check creates and
 * destroys what it tests (a KVM VM, a userfaultfd, two small mappings), so it leaves nothing
 * behind.
 */
#include "forkd/probe.h"

#include "basic/cleanup.h"
#include <forkd_compat/userfaultfd.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/utsname.h>

/* The KVM API version has been 12 since Linux 2.6.22; anything else is not a KVM we know. */
#define KVM_STABLE_API_VERSION 12

static void probe_kvm(struct probe_host_caps *caps)
{
    _cleanup_close_ int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) {
        snprintf(caps->kvm_error, sizeof(caps->kvm_error), "open /dev/kvm: %s", strerror(errno));
        return;
    }
    int version = ioctl(kvm, KVM_GET_API_VERSION, 0);
    if (version < 0) {
        snprintf(caps->kvm_error, sizeof(caps->kvm_error), "KVM_GET_API_VERSION: %s",
                 strerror(errno));
        return;
    }
    caps->kvm_api_version = version;
    if (version != KVM_STABLE_API_VERSION) {
        snprintf(caps->kvm_error, sizeof(caps->kvm_error), "KVM API version %d, expected %d",
                 version, KVM_STABLE_API_VERSION);
        return;
    }
    _cleanup_close_ int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) {
        snprintf(caps->kvm_error, sizeof(caps->kvm_error), "KVM_CREATE_VM: %s", strerror(errno));
        return;
    }
    caps->kvm_usable = true;
}

int probe_open_userfaultfd(int flags)
{
    int fd = (int)syscall(SYS_userfaultfd, flags);
    if (fd >= 0)
        return fd;
    int syscall_errno = errno;
    if (syscall_errno != EPERM)
        return -syscall_errno;
    /* Unprivileged processes may still be allowed through the device node's permissions. */
    _cleanup_close_ int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -syscall_errno;
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    return fd >= 0 ? fd : -errno;
}

/* Opens a uffd and negotiates the given features; returns the fd or -errno. */
static int probe_uffd_with_features(uint64_t features, uint64_t *offered)
{
    _cleanup_close_ int uffd = probe_open_userfaultfd(O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0)
        return uffd;
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (ioctl(uffd, UFFDIO_API, &api) < 0)
        return -errno;
    if (offered)
        *offered = api.features;
    return take_fd(uffd);
}

/* Registers a two-page mapping for write-protect, touches it, and arms and disarms it. */
static bool probe_wp_on_mapping(uint64_t features, void *mem, size_t len)
{
    _cleanup_close_ int uffd = probe_uffd_with_features(features, NULL);
    if (uffd < 0)
        return false;
    memset(mem, 0x5a, len); /* populate, so the result does not depend on WP_UNPOPULATED */
    struct uffdio_register reg = {
        .range = {.start = (uintptr_t)mem, .len = len},
        .mode = UFFDIO_REGISTER_MODE_WP,
    };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        return false;
    if (!(reg.ioctls & (1ULL << _UFFDIO_WRITEPROTECT)))
        return false;
    struct uffdio_writeprotect wp = {.range = reg.range, .mode = UFFDIO_WRITEPROTECT_MODE_WP};
    if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0)
        return false;
    wp.mode = 0;
    return ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) == 0;
}

static bool probe_wp_anonymous(void)
{
    size_t len = 2 * (size_t)sysconf(_SC_PAGESIZE);
    void *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return false;
    bool ok = probe_wp_on_mapping(UFFD_FEATURE_PAGEFAULT_FLAG_WP, mem, len);
    munmap(mem, len);
    return ok;
}

static bool probe_wp_shmem(void)
{
    size_t len = 2 * (size_t)sysconf(_SC_PAGESIZE);
    _cleanup_close_ int memfd = memfd_create("forkd-probe", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, (off_t)len) < 0)
        return false;
    void *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (mem == MAP_FAILED)
        return false;
    bool ok = probe_wp_on_mapping(UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
                                  mem, len);
    munmap(mem, len);
    return ok;
}

static void probe_userfaultfd(struct probe_host_caps *caps)
{
    uint64_t offered = 0;
    _cleanup_close_ int uffd = probe_uffd_with_features(0, &offered);
    if (uffd < 0) {
        snprintf(caps->uffd_error, sizeof(caps->uffd_error), "userfaultfd: %s", strerror(-uffd));
        return;
    }
    caps->uffd_usable = true;
    caps->uffd_features = offered;
    if (offered & UFFD_FEATURE_PAGEFAULT_FLAG_WP)
        caps->uffd_wp_anonymous = probe_wp_anonymous();
    if (offered & UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
        caps->uffd_wp_shmem = probe_wp_shmem();
    caps->uffd_wp_unpopulated = caps->uffd_wp_anonymous && (offered & UFFD_FEATURE_WP_UNPOPULATED);
    if (!caps->uffd_wp_anonymous || !caps->uffd_wp_shmem)
        snprintf(caps->uffd_error, sizeof(caps->uffd_error),
                 "write-protect unavailable on %s memory (features 0x%llx)",
                 !caps->uffd_wp_anonymous ? "anonymous" : "shmem", (unsigned long long)offered);
}

static int probe_read_int_file(const char *path)
{
    _cleanup_fclose_ FILE *f = fopen(path, "re");
    int value;
    if (!f || fscanf(f, "%d", &value) != 1)
        return -1;
    return value;
}

void probe_host(struct probe_host_caps *caps)
{
    memset(caps, 0, sizeof(*caps));
    struct utsname uts;
    if (uname(&uts) == 0)
        snprintf(caps->kernel_release, sizeof(caps->kernel_release), "%s", uts.release);
    probe_kvm(caps);
    probe_userfaultfd(caps);
    caps->unprivileged_userfaultfd = probe_read_int_file("/proc/sys/vm/unprivileged_userfaultfd");
}

bool probe_live_branch_supported(const struct probe_host_caps *caps)
{
    return caps->kvm_usable && caps->uffd_wp_shmem;
}

bool probe_live_branch_anonymous_supported(const struct probe_host_caps *caps)
{
    return caps->kvm_usable && caps->uffd_wp_unpopulated;
}

static bool probe_wp_unpopulated_result;

static void probe_wp_unpopulated_once(void)
{
    uint64_t offered = 0;
    _cleanup_close_ int uffd = probe_uffd_with_features(0, &offered);
    uint64_t needed = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED;
    probe_wp_unpopulated_result = uffd >= 0 && (offered & needed) == needed;
}

bool probe_wp_unpopulated(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, probe_wp_unpopulated_once);
    return probe_wp_unpopulated_result;
}
