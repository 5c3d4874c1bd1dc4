// Cloning drive files: the reflink probe (tmpfs cannot, XFS can), a clone that shares nothing
// writable with its source, and the explicit byte-copy fallback. The XFS file system is made
// for the test on a loop device (root, xfsprogs).
#include <gtest/gtest.h>

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
        ASSERT_EQ(0, Shell("mkfs.xfs -q -m reflink=1 " + loop_ + " && mount " + loop_ + " " +
                         mount_));
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

} // namespace
