// The VM registry, the VMM client and the pause guard against the real test VMM on KVM.
#include <gtest/gtest.h>

#include "engine_harness.h"
#include "test_time.h"

#include <csignal>
#include <cstring>
#include <string>
#include <sys/stat.h>

extern "C" {
#include "pause.h"
#include "vmm_client.h"
}

namespace
{

// Pauses, takes a Full snapshot into dir, resumes. Returns the pause window in ns.
uint64_t FullSnapshot(struct vm *vm, const std::string &dir)
{
    mkdir(dir.c_str(), 0700);
    struct forkd_error err = {};
    FORKD_PAUSE_GUARD(guard, vm, &err);
    EXPECT_EQ(0, guard.rc) << err.message;
    std::string vmstate = dir + "/vmstate", memory = dir + "/memory.bin";
    EXPECT_EQ(0, vmm_snapshot_create(vm_client(vm), VMM_SNAPSHOT_FULL, vmstate.c_str(),
                                     memory.c_str(), &err))
        << err.message;
    EXPECT_EQ(0, pause_guard_resume(&guard, &err)) << err.message;
    return pause_guard_window_ns(&guard);
}

// Early return with the guard armed: the cleanup must resume the VM.
int PauseAndBailOut(struct vm *vm)
{
    struct forkd_error err = {};
    FORKD_PAUSE_GUARD(guard, vm, &err);
    if (guard.rc < 0)
        return guard.rc;
    return -EIO;
}

} // namespace

TEST_F(EngineTest, BootPauseFullSnapshotVerifies)
{
    struct vm *vm = Boot(2, 64, "pages=4000 pattern=random seed=3", "first");
    ASSERT_NE(nullptr, vm);
    EXPECT_EQ("Running", VmmState(vm));
    struct vm_status status;
    vm_get_status(vm, &status);
    EXPECT_EQ(VM_STATE_RUNNING, status.state);
    EXPECT_EQ(VM_MEMORY_MEMFD, status.memory); // forkd boots VMs on a memfd it owns
    EXPECT_GT(status.vmm_pid, 0);
    EXPECT_STREQ("first", status.name);

    uint64_t window = FullSnapshot(vm, state_dir_ + "/snap");
    EXPECT_GT(window, 0u);
    EXPECT_EQ("Running", VmmState(vm));
    VerifyResult verify = Verify(state_dir_ + "/snap");
    EXPECT_EQ(0, verify.exit_code) << verify.output;
    vm_unref(vm);
}

TEST_F(EngineTest, PauseGuardResumesOnEveryExitPath)
{
    struct vm *vm = Boot(1, 32, "pages=100");
    ASSERT_NE(nullptr, vm);
    EXPECT_EQ(-EIO, PauseAndBailOut(vm));
    EXPECT_EQ("Running", VmmState(vm));
    {
        struct forkd_error err = {};
        FORKD_PAUSE_GUARD(guard, vm, &err);
        ASSERT_EQ(0, guard.rc) << err.message;
        EXPECT_EQ("Paused", VmmState(vm));
        pause_guard_release(&guard);
    }
    EXPECT_EQ("Paused", VmmState(vm)) << "a released guard leaves the VM paused";
    struct forkd_error err = {};
    EXPECT_EQ(0, vmm_resume(vm_client(vm), &err)) << err.message;
    vm_unref(vm);
}

TEST_F(EngineTest, RestoreWithFileAndMemfdContinuesTheGuest)
{
    struct vm *source = Boot(2, 64, "pages=3000 pattern=hotset seed=9");
    ASSERT_NE(nullptr, source);
    std::string snap = state_dir_ + "/base";
    FullSnapshot(source, snap);
    VerifyResult base = Verify(snap);
    ASSERT_EQ(0, base.exit_code) << base.output;
    unsigned long long base_total = TotalFromVerify(base.output);

    for (enum vm_memory memory : {VM_MEMORY_FILE, VM_MEMORY_MEMFD}) {
        SCOPED_TRACE(memory == VM_MEMORY_FILE ? "FILE" : "MEMFD");
        struct vm *fork = Restore(snap, memory, "base");
        ASSERT_NE(nullptr, fork);
        struct forkd_error err = {};
        EXPECT_EQ(memory == VM_MEMORY_MEMFD, vm_memfd(fork) >= 0);
        EXPECT_STREQ("base", vm_source_snapshot(fork));
        // The restored guest runs on from the snapshot: its totals grow past the base's.
        unsigned long long total = 0;
        for (int attempt = 0; attempt < 50 && total <= base_total; attempt++) {
            std::string again =
                state_dir_ + "/again-" + std::to_string(memory) + "-" + std::to_string(attempt);
            FullSnapshot(fork, again);
            VerifyResult verify = Verify(again);
            ASSERT_EQ(0, verify.exit_code) << verify.output;
            total = TotalFromVerify(verify.output);
            ASSERT_GE(total, base_total);
        }
        EXPECT_GT(total, base_total);
        ASSERT_EQ(0, vm_stop(registry_, fork, 2000, &err)) << err.message;
        EXPECT_EQ(-1, vm_memfd(fork)) << "a MEMFD VM's memory is released when it ends";
        EXPECT_EQ(nullptr, vm_lookup(registry_, vm_id(fork)));
        vm_unref(fork);
    }
    vm_unref(source);
}

TEST_F(EngineTest, BadBootsFailCleanly)
{
    struct vm_boot_config config = {};
    config.vcpu_count = 1;
    config.mem_size_mib = 32;
    config.kernel_image_path = "/nonexistent/guest.bin";
    struct vm *vm = nullptr;
    struct forkd_error err = {};
    EXPECT_EQ(-ENOENT, vm_boot(registry_, &config, &vm, &err));
    EXPECT_NE(std::string::npos, std::string(err.message).find("/nonexistent/guest.bin"));

    config.kernel_image_path = FORKD_GUEST_PATH;
    config.boot_args = "pattern=zigzag";
    EXPECT_EQ(-EREMOTEIO, vm_boot(registry_, &config, &vm, &err));
    EXPECT_NE(std::string::npos, std::string(err.message).find(": 400: ")) << err.message;

    config.boot_args = "";
    config.vcpu_count = 0;
    EXPECT_EQ(-EREMOTEIO, vm_boot(registry_, &config, &vm, &err));
    EXPECT_NE(std::string::npos, std::string(err.message).find("PUT /machine-config: 400"))
        << err.message;

    struct vm **vms;
    size_t count = vm_list(registry_, &vms);
    vm_list_free(vms, count);
    EXPECT_EQ(0u, count) << "failed boots leave nothing listed";
}

TEST_F(EngineTest, DuplicateNameIsRefused)
{
    struct vm *vm = Boot(1, 32, "pages=100", "twin");
    ASSERT_NE(nullptr, vm);
    struct vm_boot_config config = {};
    config.name = "twin";
    config.vcpu_count = 1;
    config.mem_size_mib = 32;
    config.kernel_image_path = FORKD_GUEST_PATH;
    struct vm *other = nullptr;
    struct forkd_error err = {};
    EXPECT_EQ(-EEXIST, vm_boot(registry_, &config, &other, &err));
    vm_unref(vm);
}

TEST_F(EngineTest, VmmDeathIsReportedAndReaped)
{
    struct vm *vm = Boot(1, 32, "pages=100");
    ASSERT_NE(nullptr, vm);
    pid_t pid = vm_pid(vm);
    ASSERT_GT(pid, 0);
    ASSERT_EQ(0, kill(pid, SIGKILL));
    struct vm_status status = {};
    for (int i = 0; i < scaled_ms(500) && status.state != VM_STATE_FAILED; i++) {
        vm_get_status(vm, &status);
        usleep(10000);
    }
    EXPECT_EQ(VM_STATE_FAILED, status.state);
    EXPECT_STREQ("killed by signal 9 (Killed)", status.exit_reason);
    EXPECT_EQ(0, status.vmm_pid);
    EXPECT_EQ(-1, kill(pid, 0)) << "the VMM was reaped, not left a zombie";
    struct forkd_error err = {};
    EXPECT_NE(0, vmm_pause(vm_client(vm), &err));
    vm_unref(vm);
}

TEST_F(EngineTest, PauseAndResumeRefuseAVmWhoseVmmEnded)
{
    struct vm *vm = Boot(1, 32, "pages=100");
    ASSERT_NE(nullptr, vm);
    ASSERT_EQ(0, kill(vm_pid(vm), SIGKILL));
    struct vm_status status = {};
    for (int i = 0; i < scaled_ms(500) && status.state != VM_STATE_FAILED; i++) {
        vm_get_status(vm, &status);
        usleep(10000);
    }
    ASSERT_EQ(VM_STATE_FAILED, status.state);
    // Refused on the recorded state, before any VMM call, with the state named.
    struct forkd_error err = {};
    EXPECT_EQ(-EBADFD, vm_pause(vm, &err)) << err.message;
    EXPECT_NE(nullptr, strstr(err.message, "cannot pause")) << err.message;
    EXPECT_NE(nullptr, strstr(err.message, "it is FAILED")) << err.message;
    EXPECT_EQ(-EBADFD, vm_resume(vm, &err)) << err.message;
    EXPECT_NE(nullptr, strstr(err.message, "cannot resume")) << err.message;
    EXPECT_EQ(VM_STATE_FAILED, (vm_get_status(vm, &status), status.state));
    vm_unref(vm);
}
