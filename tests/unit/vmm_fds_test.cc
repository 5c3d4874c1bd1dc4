// Taking back what forkd held from a "VMM" (a child process here): its guest memfd, whether it
// kept the file open or only the mapping, and its userfaultfd, told apart by its features.
#include <gtest/gtest.h>

#include <cerrno>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <string>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

extern "C" {
#include "vmm_fds.h"
}

namespace
{

constexpr uint64_t kMarker = 0x666f726b64ULL;

// A child that holds a memfd (open or only mapped, the marker at its start) and a userfaultfd,
// reports the memfd's inode and waits to be killed.
class Vmm
{
  public:
    Vmm(bool keep_memfd_open, uint64_t uffd_features)
    {
        int report[2];
        EXPECT_EQ(0, pipe2(report, O_CLOEXEC));
        pid_ = fork();
        if (pid_ == 0) {
            close(report[0]);
            Run(report[1], keep_memfd_open, uffd_features);
        }
        close(report[1]);
        EXPECT_EQ(static_cast<ssize_t>(sizeof(inode_)), read(report[0], &inode_, sizeof(inode_)));
        close(report[0]);
        pidfd_ = static_cast<int>(syscall(SYS_pidfd_open, pid_, 0));
        EXPECT_GE(pidfd_, 0);
    }
    ~Vmm()
    {
        kill(pid_, SIGKILL);
        waitpid(pid_, nullptr, 0);
        close(pidfd_);
    }
    pid_t pid_ = -1;
    int pidfd_ = -1;
    unsigned long long inode_ = 0;

  private:
    [[noreturn]] static void Run(int report, bool keep_memfd_open, uint64_t uffd_features)
    {
        int memfd = memfd_create("forkd-guest-vm-9", MFD_CLOEXEC);
        struct stat st;
        if (memfd < 0 || ftruncate(memfd, 1 << 20) < 0 || fstat(memfd, &st) < 0)
            _exit(1);
        auto *memory = static_cast<uint64_t *>(
            mmap(nullptr, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0));
        if (memory == MAP_FAILED)
            _exit(1);
        memory[0] = kMarker;
        if (!keep_memfd_open)
            close(memfd);
        int uffd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
        struct uffdio_api api = {};
        api.api = UFFD_API;
        api.features = uffd_features;
        if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api) < 0)
            _exit(1);
        unsigned long long inode = st.st_ino;
        if (write(report, &inode, sizeof(inode)) != sizeof(inode))
            _exit(1);
        for (;;)
            pause();
    }
};

uint64_t FirstWord(int fd)
{
    uint64_t word = 0;
    return pread(fd, &word, sizeof(word), 0) == sizeof(word) ? word : 0;
}

std::string LinkOf(int fd)
{
    char path[64], target[128] = {};
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    return readlink(path, target, sizeof(target) - 1) > 0 ? target : "";
}

TEST(VmmFdsTest, TheMemfdIsTakenFromAMappingOnlyAndCheckedByInode)
{
    Vmm vmm(false, UFFD_FEATURE_EVENT_REMOVE);
    int fd = vmm_fds_take_memfd(vmm.pidfd_, vmm.pid_, "forkd-guest-vm-9", vmm.inode_);
    ASSERT_GE(fd, 0) << strerror(-fd);
    EXPECT_EQ(kMarker, FirstWord(fd)) << "the very memory the VMM maps";
    close(fd);
    EXPECT_EQ(-ENOENT, vmm_fds_take_memfd(vmm.pidfd_, vmm.pid_, "forkd-guest-vm-9", vmm.inode_ + 1));
    EXPECT_EQ(-ENOENT, vmm_fds_take_memfd(vmm.pidfd_, vmm.pid_, "forkd-guest-vm-1", vmm.inode_));
}

TEST(VmmFdsTest, TheMemfdIsTakenFromAnOpenFile)
{
    Vmm vmm(true, UFFD_FEATURE_EVENT_REMOVE);
    int fd = vmm_fds_take_memfd(vmm.pidfd_, vmm.pid_, "forkd-guest-vm-9", vmm.inode_);
    ASSERT_GE(fd, 0) << strerror(-fd);
    EXPECT_EQ(kMarker, FirstWord(fd));
    EXPECT_NE(0, fcntl(fd, F_GETFD) & FD_CLOEXEC);
    close(fd);
}

TEST(VmmFdsTest, TheUserfaultfdIsTakenByItsKind)
{
    Vmm restore(false, UFFD_FEATURE_EVENT_REMOVE);
    int fd = vmm_fds_take_uffd(restore.pidfd_, restore.pid_, false);
    ASSERT_GE(fd, 0) << strerror(-fd);
    EXPECT_EQ("anon_inode:[userfaultfd]", LinkOf(fd));
    close(fd);
    EXPECT_EQ(-ENOENT, vmm_fds_take_uffd(restore.pidfd_, restore.pid_, true));

    Vmm write_protect(false, UFFD_FEATURE_PAGEFAULT_FLAG_WP);
    fd = vmm_fds_take_uffd(write_protect.pidfd_, write_protect.pid_, true);
    ASSERT_GE(fd, 0) << strerror(-fd);
    close(fd);
    EXPECT_EQ(-ENOENT, vmm_fds_take_uffd(write_protect.pidfd_, write_protect.pid_, false));
}

} // namespace
