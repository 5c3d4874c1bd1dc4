// The durable VM record: written atomically, read back whole, refused when it is not a plain
// file of ours or names another id; a process's identity (pid, start time, executable).
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <string>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

extern "C" {
#include "vm_record.h"
}

namespace
{

class VmRecordTest : public ::testing::Test
{
  protected:
    void SetUp() override
    {
        char dir[] = "/tmp/forkd-record-XXXXXX";
        ASSERT_NE(nullptr, mkdtemp(dir));
        dir_ = dir;
    }
    void TearDown() override
    {
        std::string command = "rm -rf '" + dir_ + "'";
        if (system(command.c_str()) != 0)
            ADD_FAILURE() << "could not remove " << dir_;
    }
    static struct vm_record Sample()
    {
        struct vm_record r = {};
        snprintf(r.id, sizeof(r.id), "vm-12");
        snprintf(r.name, sizeof(r.name), "fork-0");
        EXPECT_EQ(0, vm_identity_of(getpid(), &r.vmm));
        r.memory = VM_MEMORY_UFFD;
        r.vcpu_count = 2;
        r.mem_size_mib = 64;
        r.memory_bytes = 64 << 20;
        r.page_size = 2 << 20;
        snprintf(r.source_snapshot, sizeof(r.source_snapshot), "base");
        r.created_at_unix_ms = 1764633600123;
        r.label_count = 2;
        snprintf(r.labels[0].key, sizeof(r.labels[0].key), "team");
        snprintf(r.labels[0].value, sizeof(r.labels[0].value), "evals");
        snprintf(r.labels[1].key, sizeof(r.labels[1].key), "run");
        snprintf(r.labels[1].value, sizeof(r.labels[1].value), "7");
        r.region_count = 2;
        r.regions[0] = {0x7f0000000000ULL, 3ULL << 30, 0, 4096};
        r.regions[1] = {0x7f00c0000000ULL, 1ULL << 30, 3ULL << 30, 2ULL << 20};
        r.memfd_inode = 123456;
        snprintf(r.branch_id, sizeof(r.branch_id), "br-4");
        return r;
    }
    std::string Path(const char *name) const
    {
        return dir_ + "/" + name;
    }
    std::string dir_;
};

TEST_F(VmRecordTest, ARecordReadsBackAsWrittenAndLeavesNoTemporaryFile)
{
    struct vm_record written = Sample(), read = {};
    ASSERT_EQ(0, vm_record_save(dir_.c_str(), &written));
    ASSERT_EQ(0, vm_record_load(dir_.c_str(), "vm-12", &read));
    EXPECT_STREQ("fork-0", read.name);
    EXPECT_EQ(written.vmm.pid, read.vmm.pid);
    EXPECT_EQ(written.vmm.start_time, read.vmm.start_time);
    EXPECT_STREQ(written.vmm.exe, read.vmm.exe);
    EXPECT_EQ(VM_MEMORY_UFFD, read.memory);
    EXPECT_EQ(2u, read.vcpu_count);
    EXPECT_EQ(64u << 20, read.memory_bytes);
    EXPECT_EQ(2u << 20, read.page_size);
    EXPECT_STREQ("base", read.source_snapshot);
    EXPECT_EQ(written.created_at_unix_ms, read.created_at_unix_ms);
    ASSERT_EQ(2u, read.label_count);
    EXPECT_STREQ("run", read.labels[1].key);
    EXPECT_STREQ("7", read.labels[1].value);
    ASSERT_EQ(2u, read.region_count);
    EXPECT_EQ(0x7f00c0000000ULL, read.regions[1].host_base);
    EXPECT_EQ(3ULL << 30, read.regions[1].file_offset);
    EXPECT_EQ(2ULL << 20, read.regions[1].page_size);
    EXPECT_EQ(123456u, read.memfd_inode);
    EXPECT_STREQ("br-4", read.branch_id);
    EXPECT_FALSE(read.starting);

    written.branch_id[0] = '\0';
    ASSERT_EQ(0, vm_record_save(dir_.c_str(), &written)); // replaced, not appended
    ASSERT_EQ(0, vm_record_load(dir_.c_str(), "vm-12", &read));
    EXPECT_STREQ("", read.branch_id);
    struct stat st;
    ASSERT_EQ(0, stat(Path("vm-12.vm").c_str(), &st));
    EXPECT_EQ(0600u, st.st_mode & 0777);
    EXPECT_NE(0, access(Path("vm-12.vm.tmp").c_str(), F_OK));
    EXPECT_EQ(12u, vm_record_file_id("vm-12.vm"));
    EXPECT_EQ(0u, vm_record_file_id("vm-12.vm.tmp"));
    EXPECT_EQ(0u, vm_record_file_id("vm-12.sock"));

    vm_record_remove(dir_.c_str(), "vm-12");
    EXPECT_EQ(-ENOENT, vm_record_load(dir_.c_str(), "vm-12", &read));
}

TEST_F(VmRecordTest, RecordsThatAreNotPlainFilesOfOursOrNameAnotherIdAreRefused)
{
    struct vm_record r = Sample(), read = {};
    ASSERT_EQ(0, vm_record_save(dir_.c_str(), &r));
    // A symlink to a real record is never followed.
    ASSERT_EQ(0, symlink(Path("vm-12.vm").c_str(), Path("vm-13.vm").c_str()));
    EXPECT_EQ(-EPERM, vm_record_load(dir_.c_str(), "vm-13", &read));
    // A copy under another name names another id.
    std::string copy = "cp '" + Path("vm-12.vm") + "' '" + Path("vm-14.vm") + "'";
    ASSERT_EQ(0, system(copy.c_str()));
    EXPECT_EQ(-EINVAL, vm_record_load(dir_.c_str(), "vm-14", &read));
    // Writable by others: anyone could have planted it.
    ASSERT_EQ(0, chmod(Path("vm-12.vm").c_str(), 0666));
    EXPECT_EQ(-EPERM, vm_record_load(dir_.c_str(), "vm-12", &read));
    // Not JSON.
    int fd = open(Path("vm-15.vm").c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(5, write(fd, "{\"id\"", 5));
    close(fd);
    EXPECT_EQ(-EINVAL, vm_record_load(dir_.c_str(), "vm-15", &read));
}

TEST(VmIdentityTest, ALiveProcessMatchesOnlyWithItsStartTimeAndExecutable)
{
    struct vm_identity self = {};
    ASSERT_EQ(0, vm_identity_of(getpid(), &self));
    EXPECT_TRUE(vm_identity_is_live(&self));
    struct vm_identity reused = self;
    reused.start_time++;
    EXPECT_FALSE(vm_identity_is_live(&reused));
    struct vm_identity other_program = self;
    snprintf(other_program.exe, sizeof(other_program.exe), "/usr/bin/true");
    EXPECT_FALSE(vm_identity_is_live(&other_program));
    pid_t child = fork();
    if (child == 0)
        _exit(0);
    ASSERT_GT(child, 0);
    int status;
    ASSERT_EQ(child, waitpid(child, &status, 0));
    struct vm_identity gone = {};
    EXPECT_EQ(-ESRCH, vm_identity_of(child, &gone));
}

} // namespace
