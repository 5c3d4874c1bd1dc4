// The host capability probe, checked against direct system calls made by the test. These
// machines have userfaultfd with write-protect: a probe reporting otherwise is a bug (or a broken
// machine), and the test fails rather than skips. KVM differs between machines (some have no
// /dev/kvm), so its answer is checked against the device itself; the KVM-labelled tests assert
// that KVM works wherever they run.
#include <gtest/gtest.h>

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <string>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

extern "C" {
#include "forkd/probe.h"
#include <forkd_compat/userfaultfd.h>
}

class Probe : public ::testing::Test
{
  protected:
    static void SetUpTestSuite()
    {
        probe_host(&caps_);
    }
    static struct probe_host_caps caps_;
};
struct probe_host_caps Probe::caps_;

TEST_F(Probe, KernelReleaseMatchesUname)
{
    struct utsname uts;
    ASSERT_EQ(0, uname(&uts));
    EXPECT_STREQ(uts.release, caps_.kernel_release);
}

TEST_F(Probe, KvmAnswerMatchesTheDevice)
{
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) {
        std::string expected = std::string("open /dev/kvm: ") + strerror(errno);
        EXPECT_FALSE(caps_.kvm_usable);
        EXPECT_EQ(0, caps_.kvm_api_version);
        EXPECT_EQ(expected, caps_.kvm_error);
        return;
    }
    int version = ioctl(kvm, KVM_GET_API_VERSION, 0);
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    bool usable = version == 12 && vm >= 0;
    if (vm >= 0)
        close(vm);
    close(kvm);
    EXPECT_EQ(usable, caps_.kvm_usable) << caps_.kvm_error;
    EXPECT_EQ(version < 0 ? 0 : version, caps_.kvm_api_version); // set only once it answered
    if (usable)
        EXPECT_STREQ("", caps_.kvm_error);
    else
        EXPECT_STRNE("", caps_.kvm_error);
}

TEST_F(Probe, UserfaultfdFeaturesAreWhatTheKernelOffers)
{
    ASSERT_TRUE(caps_.uffd_usable) << caps_.uffd_error;
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    ASSERT_GE(fd, 0);
    struct uffdio_api api = {};
    api.api = UFFD_API;
    ASSERT_EQ(0, ioctl(fd, UFFDIO_API, &api));
    close(fd);
    EXPECT_EQ(api.features, caps_.uffd_features);
}

TEST_F(Probe, WriteProtectWorksOnAnonymousAndShmem)
{
    EXPECT_TRUE(caps_.uffd_wp_anonymous) << caps_.uffd_error;
    EXPECT_TRUE(caps_.uffd_wp_shmem) << caps_.uffd_error;
    EXPECT_EQ((caps_.uffd_features & UFFD_FEATURE_WP_UNPOPULATED) != 0, caps_.uffd_wp_unpopulated);
    // Write-protect works here, so a live branch is possible exactly where KVM is; of
    // anonymous memory, only where never-touched pages can be protected too.
    EXPECT_EQ(caps_.kvm_usable, probe_live_branch_supported(&caps_));
    EXPECT_EQ(caps_.kvm_usable && caps_.uffd_wp_unpopulated,
              probe_live_branch_anonymous_supported(&caps_));
    EXPECT_EQ(caps_.uffd_wp_unpopulated, probe_wp_unpopulated());
}

TEST_F(Probe, UnprivilegedSettingMatchesProc)
{
    std::ifstream setting("/proc/sys/vm/unprivileged_userfaultfd");
    int expected = -1;
    setting >> expected;
    EXPECT_EQ(expected, caps_.unprivileged_userfaultfd);
}

TEST_F(Probe, LiveBranchNeedsEveryPart)
{
    struct probe_host_caps caps = caps_;
    caps.kvm_usable = false;
    EXPECT_FALSE(probe_live_branch_supported(&caps));
    caps = caps_;
    caps.uffd_wp_shmem = false;
    EXPECT_FALSE(probe_live_branch_supported(&caps));
    caps = caps_;
    caps.uffd_wp_unpopulated = false;
    EXPECT_FALSE(probe_live_branch_anonymous_supported(&caps));
}

TEST_F(Probe, AnonymousMemoryIsNotNeededForLiveBranchesOfMemfdVms)
{
    // forkd boots every VM on a memfd: shmem write-protect is what LIVE needs.
    struct probe_host_caps caps = caps_;
    caps.kvm_usable = true;
    caps.uffd_wp_shmem = true;
    caps.uffd_wp_anonymous = false;
    caps.uffd_wp_unpopulated = false;
    EXPECT_TRUE(probe_live_branch_supported(&caps));
    EXPECT_FALSE(probe_live_branch_anonymous_supported(&caps));
}

TEST(ProbeOpen, UserfaultfdOpensAndNegotiates)
{
    int fd = probe_open_userfaultfd(O_CLOEXEC | O_NONBLOCK);
    ASSERT_GE(fd, 0) << strerror(-fd);
    struct uffdio_api api = {};
    api.api = UFFD_API;
    EXPECT_EQ(0, ioctl(fd, UFFDIO_API, &api));
    // A second handshake on the same fd is refused by the kernel.
    EXPECT_NE(0, ioctl(fd, UFFDIO_API, &api));
    close(fd);
}

TEST(ProbeOpen, BadFlagsAreAnError)
{
    EXPECT_EQ(-EINVAL, probe_open_userfaultfd(0x40000000));
}
