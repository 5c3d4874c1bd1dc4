// Cloning drive files: the reflink probe (tmpfs cannot, XFS can), a clone that shares nothing
// writable with its source, and the explicit byte-copy fallback. The XFS file system is made
// for the test on a loop device (root, xfsprogs).
#include <gtest/gtest.h>

#include <chrono>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <string>
#include <vector>
#include <unistd.h>

extern "C" {
#include "disk_clone.h"
}

namespace
{

std::string MakeDir(const char *base)
{
    std::string pattern = std::string(base) + "/forkd-clone-XXXXXX";
    std::vector<char> buffer(pattern.begin(), pattern.end());
    buffer.push_back('\0');
    EXPECT_NE(nullptr, mkdtemp(buffer.data()));
    return buffer.data();
}

void WriteFile(const std::string &path, const std::string &data)
{
    FILE *f = fopen(path.c_str(), "wb");
    ASSERT_NE(nullptr, f);
    ASSERT_EQ(data.size(), fwrite(data.data(), 1, data.size(), f));
    fclose(f);
}

std::string ReadFile(const std::string &path)
{
    std::string data;
    FILE *f = fopen(path.c_str(), "rb");
    if (!f)
        return data;
    char buffer[65536];
    size_t n;
    while ((n = fread(buffer, 1, sizeof(buffer), f)) > 0)
        data.append(buffer, n);
    fclose(f);
    return data;
}

int Shell(const std::string &command)
{
    return system(command.c_str());
}

TEST(DiskClone, TmpfsCannotReflinkAndSaysWhatWouldWork)
{
    std::string dir = MakeDir("/dev/shm");
    struct forkd_error err = {};
    EXPECT_EQ(-EOPNOTSUPP, disk_clone_probe(dir.c_str(), &err));
    EXPECT_NE(nullptr, strstr(err.message, "tmpfs")) << err.message;
    EXPECT_NE(nullptr, strstr(err.message, "XFS")) << err.message;
    // Asked again (answered from the cache): the same answer.
    struct forkd_error again = {};
    EXPECT_EQ(-EOPNOTSUPP, disk_clone_probe(dir.c_str(), &again));
    EXPECT_STREQ(err.message, again.message);
    // The probe leaves nothing behind.
    EXPECT_EQ(0, Shell("test -z \"$(ls -A " + dir + ")\""));

    std::string source = dir + "/disk.img", target = dir + "/clone.img";
    WriteFile(source, std::string(3 << 20, 'd'));
    uint64_t copied = 7;
    EXPECT_EQ(-EOPNOTSUPP, disk_clone_file(source.c_str(), target.c_str(), false, &copied, &err));
    EXPECT_EQ(0u, copied);
    EXPECT_NE(0, access(target.c_str(), F_OK)) << "a refused clone leaves no file";
    ASSERT_EQ(0, disk_clone_file(source.c_str(), target.c_str(), true, &copied, &err))
        << err.message;
    EXPECT_EQ(uint64_t{3} << 20, copied);
    EXPECT_EQ(ReadFile(source), ReadFile(target));
    // Never over an existing file.
    EXPECT_EQ(-EEXIST, disk_clone_file(source.c_str(), target.c_str(), true, &copied, &err));
    Shell("rm -rf " + dir);
}

class XfsTest : public ::testing::Test
{
  protected:
    void SetUp() override
    {
        base_ = MakeDir("/tmp");
        mount_ = base_ + "/mnt";
        ASSERT_EQ(0, Shell("truncate -s 512M " + base_ + "/xfs.img && mkdir " + mount_));
        ASSERT_EQ(0, Shell("losetup --find --show " + base_ + "/xfs.img > " + base_ + "/loop"));
        loop_ = ReadFile(base_ + "/loop");
        loop_.erase(loop_.find_last_not_of('\n') + 1);
        ASSERT_EQ(0,
                  Shell("mkfs.xfs -q -m reflink=1 " + loop_ + " && mount " + loop_ + " " + mount_));
    }
    void TearDown() override
    {
        Shell("umount -l " + mount_ + " 2>/dev/null");
        if (!loop_.empty())
            Shell("losetup -d " + loop_);
        Shell("rm -rf " + base_);
    }
    std::string base_, mount_, loop_;
};

TEST_F(XfsTest, XfsReflinksAndTheCloneIsItsOwnFile)
{
    struct forkd_error err = {};
    ASSERT_EQ(0, disk_clone_probe(mount_.c_str(), &err)) << err.message;
    std::string source = mount_ + "/disk.img", target = mount_ + "/clone.img";
    WriteFile(source, std::string(8 << 20, 's'));
    uint64_t copied = 7;
    ASSERT_EQ(0, disk_clone_file(source.c_str(), target.c_str(), false, &copied, &err))
        << err.message;
    EXPECT_EQ(0u, copied) << "a reflink copies nothing";
    EXPECT_EQ(ReadFile(source), ReadFile(target));
    EXPECT_TRUE(disk_clone_same_file_system(source.c_str(), mount_.c_str()));
    EXPECT_FALSE(disk_clone_same_file_system(source.c_str(), "/dev/shm"));
    // Writing the clone leaves the source as it was.
    int fd = open(target.c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(5, pwrite(fd, "fork!", 5, 4096));
    close(fd);
    EXPECT_EQ(std::string(8 << 20, 's'), ReadFile(source));
    EXPECT_EQ("fork!", ReadFile(target).substr(4096, 5));
}

// Not an assertion: the cost of one clone (what each fork's disk costs at Spawn, and the disk
// share of a branch's pause), printed for the record. A reflink's cost follows the file's
// extents, not its size: the same file after scattered 4 KiB writes (each a new extent in a
// clone-shared file) costs more than the contiguous one.
TEST_F(XfsTest, CloneCostIsPrinted)
{
    struct forkd_error err = {};
    struct Case {
        const char *what;
        size_t mib;
        unsigned scattered_writes;
    } cases[] = {{"8 MiB, contiguous", 8, 0},
                 {"256 MiB, contiguous", 256, 0},
                 {"256 MiB, 4096 scattered 4 KiB writes", 256, 4096}};
    for (const auto &c : cases) {
        std::string source = mount_ + "/cost.img";
        ASSERT_EQ(0, Shell("dd if=/dev/urandom of=" + source +
                           " bs=1M count=" + std::to_string(c.mib) + " status=none conv=fsync"));
        if (c.scattered_writes) {
            // A clone first: later writes to the source then break its extents apart.
            uint64_t copied;
            ASSERT_EQ(0, disk_clone_file(source.c_str(), (mount_ + "/pin.img").c_str(), false,
                                         &copied, &err))
                << err.message;
            int fd = open(source.c_str(), O_WRONLY);
            ASSERT_GE(fd, 0);
            char page[4096] = {1};
            uint64_t pages = (uint64_t)c.mib << 8, x = 88172645463325252ull;
            for (unsigned i = 0; i < c.scattered_writes; i++) {
                x ^= x << 13, x ^= x >> 7, x ^= x << 17;
                ASSERT_EQ(4096, pwrite(fd, page, sizeof(page), (off_t)((x % pages) * 4096)));
            }
            fsync(fd);
            close(fd);
        }
        const int rounds = 20;
        auto start = std::chrono::steady_clock::now();
        for (int i = 0; i < rounds; i++) {
            std::string target = mount_ + "/clone-" + std::to_string(i) + ".img";
            uint64_t copied = 1;
            ASSERT_EQ(0, disk_clone_file(source.c_str(), target.c_str(), false, &copied, &err))
                << err.message;
            ASSERT_EQ(0u, copied);
        }
        double us =
            std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
                .count() /
            rounds;
        printf("reflink clone of a drive file on XFS (%s): %.0f us per clone (mean of %d)\n",
               c.what, us, rounds);
        Shell("rm -f " + mount_ + "/clone-*.img " + mount_ + "/pin.img " + source);
    }
}

} // namespace
