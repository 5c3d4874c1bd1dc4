#include <gtest/gtest.h>

#include "engine_harness.h"
#include "test_time.h"

extern "C" {
#include "vmm_client.h"
}

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sys/wait.h>
#include <unistd.h>

void EngineTest::SetUp()
{
    char dir[] = "/tmp/forkd-engine-XXXXXX";
    ASSERT_NE(nullptr, mkdtemp(dir));
    state_dir_ = dir;
    struct vm_registry_config config = {};
    config.vmm_binary = FORKD_TESTVM_PATH;
    std::string run_dir = state_dir_ + "/vms";
    config.run_dir = run_dir.c_str();
    config.timeout_scale = static_cast<unsigned>(std::ceil(forkd_time_scale()));
    struct forkd_error err = {};
    ASSERT_EQ(0, vm_registry_open(&config, &registry_, &err)) << err.message;
}

void EngineTest::TearDown()
{
    vm_registry_close(registry_, false, 2000);
    std::string command = "rm -rf '" + state_dir_ + "'";
    if (system(command.c_str()) != 0)
        ADD_FAILURE() << "could not remove " << state_dir_;
}

struct vm *EngineTest::Boot(unsigned vcpus, unsigned mem_mib, const std::string &workload,
                            const std::string &name, const char *const *extra_args,
                            enum vm_memory memory, uint64_t page_size)
{
    struct vm_boot_config config = {};
    config.memory = memory;
    config.page_size = page_size;
    config.name = name.c_str();
    config.vcpu_count = vcpus;
    config.mem_size_mib = mem_mib;
    config.kernel_image_path = FORKD_GUEST_PATH;
    config.boot_args = workload.c_str();
    config.extra_vmm_args = extra_args;
    struct vm *vm = nullptr;
    struct forkd_error err = {};
    int rc = vm_boot(registry_, &config, &vm, &err);
    EXPECT_EQ(0, rc) << err.message;
    return vm;
}

struct vm *EngineTest::Restore(const std::string &dir, enum vm_memory memory,
                               const char *snapshot_name, bool start_paused)
{
    std::string vmstate = dir + "/vmstate", mem = dir + "/memory.bin";
    struct vm_restore_config config = {};
    config.snapshot_name = snapshot_name;
    config.vmstate_path = vmstate.c_str();
    config.memory_path = mem.c_str();
    config.memory = memory;
    config.start_paused = start_paused;
    struct vm *vm = nullptr;
    struct forkd_error err = {};
    int rc = vm_restore(registry_, &config, &vm, &err);
    EXPECT_EQ(0, rc) << err.message;
    return rc == 0 ? vm : nullptr;
}

std::string EngineTest::VmmState(struct vm *vm)
{
    struct vmm_info info = {};
    struct forkd_error err = {};
    if (vmm_get_info(vm_client(vm), &info, &err) < 0)
        return std::string("error: ") + err.message;
    return info.state;
}

unsigned long long EngineTest::VmmCounter(struct vm *vm, const std::string &key)
{
    char *body = nullptr;
    struct forkd_error err = {};
    if (vmm_request(vm_client(vm), "GET", "/", nullptr, &body, &err) < 0) {
        ADD_FAILURE() << "GET /: " << err.message;
        return 0;
    }
    std::string json(body);
    free(body);
    std::string field = "\"" + key + "\":";
    size_t at = json.find(field);
    if (at == std::string::npos) {
        ADD_FAILURE() << "no " << key << " in " << json;
        return 0;
    }
    return strtoull(json.c_str() + at + field.size(), nullptr, 10);
}

unsigned long long EngineTest::VmmPauseCount(struct vm *vm)
{
    return VmmCounter(vm, "pause_count");
}

unsigned long long EngineTest::GuestWrites(struct vm *vm)
{
    char *body = nullptr;
    struct forkd_error err = {};
    if (vmm_request(vm_client(vm), "GET", "/", nullptr, &body, &err) < 0)
        return 0;
    std::string json(body);
    free(body);
    size_t at = json.find("\"guest_progress\":[");
    unsigned long long sum = 0;
    if (at == std::string::npos)
        return 0;
    const char *cursor = json.c_str() + at + strlen("\"guest_progress\":[");
    while (*cursor && *cursor != ']') {
        char *end;
        sum += strtoull(cursor, &end, 10);
        cursor = *end == ',' ? end + 1 : end;
        if (end == cursor && *cursor != ']')
            break;
    }
    return sum;
}

void EngineTest::WaitForGuestWrites(struct vm *vm, unsigned long long writes)
{
    auto guard = std::chrono::steady_clock::now() + scaled(std::chrono::seconds(10));
    while (std::chrono::steady_clock::now() < guard) {
        if (GuestWrites(vm) >= writes)
            return;
        usleep(5000);
    }
    ADD_FAILURE() << "the guest did not reach " << writes << " writes within "
                  << scaled(std::chrono::seconds(10)).count() << " s";
}

VerifyResult EngineTest::Verify(const std::string &dir)
{
    std::string command = std::string(FORKD_TESTVM_PATH) + " verify '" + dir + "' 2>&1";
    FILE *pipe = popen(command.c_str(), "r");
    VerifyResult result{-1, ""};
    if (!pipe)
        return result;
    char buffer[4096];
    size_t n;
    while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0)
        result.output.append(buffer, n);
    int status = pclose(pipe);
    result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    return result;
}

unsigned long long EngineTest::TotalFromVerify(const std::string &output)
{
    // The verifier prints one "vcpu N total T" line per vCPU.
    unsigned long long sum = 0;
    size_t at = 0;
    while ((at = output.find("vcpu ", at)) != std::string::npos) {
        unsigned vcpu = 0;
        unsigned long long total = 0;
        if (sscanf(output.c_str() + at, "vcpu %u total %llu", &vcpu, &total) == 2)
            sum += total;
        at += 5;
    }
    return sum;
}
