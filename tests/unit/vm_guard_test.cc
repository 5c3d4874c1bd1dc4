// The VM registry's own guards, reached without a VMM: a memory backend a boot or a restore
// cannot use is refused by its name, before anything is launched.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <string>

extern "C" {
#include "forkd/vm.h"
}

namespace
{

class VmGuardTest : public ::testing::Test
{
  protected:
    void SetUp() override
    {
        char dir[] = "/tmp/forkd-guard-XXXXXX";
        ASSERT_NE(nullptr, mkdtemp(dir));
        dir_ = dir;
        // No VMM exists at this path: a guard that let a request through would fail to launch
        // it, with another message.
        struct vm_registry_config config = {};
        config.vmm_binary = "/nonexistent/forkd-vmm";
        config.run_dir = dir_.c_str();
        struct forkd_error err = {};
        ASSERT_EQ(0, vm_registry_open(&config, &registry_, &err)) << err.message;
    }
    void TearDown() override
    {
        vm_registry_close(registry_, false, 0);
        std::string command = "rm -rf '" + dir_ + "'";
        if (system(command.c_str()) != 0)
            ADD_FAILURE() << "could not remove " << dir_;
    }
    std::string dir_;
    struct vm_registry *registry_ = nullptr;
};

TEST_F(VmGuardTest, BootRefusesAMemoryBackendByName)
{
    struct vm_boot_config config = {};
    config.vcpu_count = 1;
    config.mem_size_mib = 16;
    config.kernel_image_path = "/proc/self/exe";
    config.memory = VM_MEMORY_UFFD;
    struct vm *vm = nullptr;
    struct forkd_error err = {};
    EXPECT_EQ(-EINVAL, vm_boot(registry_, &config, &vm, &err));
    EXPECT_STREQ("boot: memory UFFD is not MEMFD or ANONYMOUS", err.message);
    EXPECT_EQ(nullptr, vm);
}

TEST_F(VmGuardTest, RestoreRefusesAMemoryBackendByNameAndAnUnknownOneByNumber)
{
    struct vm_restore_config config = {};
    config.vmstate_path = "/nonexistent/vmstate";
    config.memory_path = "/nonexistent/memory.bin";
    config.memory = VM_MEMORY_ANONYMOUS;
    struct vm *vm = nullptr;
    struct forkd_error err = {};
    EXPECT_EQ(-EINVAL, vm_restore(registry_, &config, &vm, &err));
    EXPECT_STREQ("restore: memory ANONYMOUS is not FILE, MEMFD or UFFD", err.message);
    config.memory = static_cast<enum vm_memory>(9);
    err = {};
    EXPECT_EQ(-EINVAL, vm_restore(registry_, &config, &vm, &err));
    EXPECT_STREQ("restore: memory backend 9 is not FILE, MEMFD or UFFD", err.message);
}

} // namespace
