// The host capability probe, checked against direct system calls made by the test. These
// machines have KVM and userfaultfd with write-protect: a probe reporting otherwise is a bug
// (or a broken machine), and the test fails rather than skips.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <fstream>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

extern "C" {
#include "forkd/probe.h"
#include <forkd_compat/userfaultfd.h>
}

class Probe : public ::testing::Test {
  protected:
    static void SetUpTestSuite() { probe_host(&caps_); }
    static struct probe_host_caps caps_;
};
struct probe_host_caps Probe::caps_;

TEST_F(Probe, KernelReleaseMatchesUname)
{
    struct utsname uts;
    ASSERT_EQ(0, uname(&uts));
    EXPECT_STREQ(uts.release, caps_.kernel_release);
}

TEST_F(Probe, KvmIsUsableWithTheStableApi)
{
    ASSERT_TRUE(caps_.kvm_usable) << "KVM must work on this machine: " << caps_.kvm_error;
    EXPECT_EQ(12, caps_.kvm_api_version);
    EXPECT_STREQ("", caps_.kvm_error);
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
    EXPECT_TRUE(probe_live_branch_supported(&caps_));
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
    caps.uffd_wp_anonymous = false;
    EXPECT_FALSE(probe_live_branch_supported(&caps));
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
