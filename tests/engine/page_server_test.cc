// UFFD spawns on KVM: many forks of one template served by the page server from one mapping,
// every fork checked by the test VMM's verifier; a fork killed mid-run, handshake abuse while
// forks run, and prefetch.
#include <gtest/gtest.h>

#include "engine_harness.h"
#include "test_time.h"

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstring>
#include <dirent.h>
#include <fstream>
#include <string>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <thread>
#include <unistd.h>
#include <vector>

extern "C" {
#include "forkd/page_server.h"
#include "vmm_client.h"
}

namespace
{

using Clock = std::chrono::steady_clock;

template <typename Cond> bool WaitFor(Cond cond, int timeout_ms)
{
    auto deadline = Clock::now() + scaled(std::chrono::milliseconds(timeout_ms));
    while (!cond()) {
        if (Clock::now() > deadline)
            return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return true;
}

int CountUserfaultfds()
{
    int count = 0;
    DIR *dir = opendir("/proc/self/fd");
    while (struct dirent *entry = dir ? readdir(dir) : nullptr) {
        char path[300], target[64] = {};
        snprintf(path, sizeof(path), "/proc/self/fd/%s", entry->d_name);
        if (readlink(path, target, sizeof(target) - 1) > 0 &&
            strcmp(target, "anon_inode:[userfaultfd]") == 0)
            count++;
    }
    if (dir)
        closedir(dir);
    return count;
}

// Lines of /proc/self/maps that map path: the template is mapped once for all forks.
int CountMappings(const std::string &path)
{
    std::ifstream maps("/proc/self/maps");
    int count = 0;
    for (std::string line; std::getline(maps, line);)
        if (line.size() >= path.size() &&
            line.compare(line.size() - path.size(), path.size(), path) == 0)
            count++;
    return count;
}

struct page_server_stats ForkStats(struct vm *vm)
{
    struct page_server_stats stats = {};
    EXPECT_EQ(0, vm_page_server_stats(vm, &stats));
    return stats;
}

} // namespace

class PageServerKvmTest : public EngineTest
{
  protected:
    void SetUp() override
    {
        EngineTest::SetUp();
        struct page_server_config config = {};
        config.handshake_timeout_ms = scaled_ms(10000);
        struct forkd_error err = {};
        ASSERT_EQ(0, page_server_open(&config, &server_, &err)) << err.message;
    }
    void TearDown() override
    {
        EngineTest::TearDown(); // the VMMs go first: they would hang on a closed server
        page_server_close(server_);
    }

    // Boots a guest, takes a Full snapshot into <state>/<name>, verifies it, stops the guest.
    void MakeTemplate(const std::string &name, unsigned mem_mib, const std::string &workload)
    {
        struct vm *source = Boot(1, mem_mib, workload);
        ASSERT_NE(nullptr, source);
        template_dir_ = state_dir_ + "/" + name;
        template_name_ = name;
        ASSERT_TRUE(Snapshot(source, template_dir_));
        VerifyResult verify = Verify(template_dir_);
        ASSERT_EQ(0, verify.exit_code) << verify.output;
        template_total_ = TotalFromVerify(verify.output);
        struct forkd_error err = {};
        ASSERT_EQ(0, vm_stop(registry_, source, 2000, &err)) << err.message;
        vm_unref(source);
    }

    // Full snapshot into dir; pauses and resumes the VM unless it is paused already.
    static bool Snapshot(struct vm *vm, const std::string &dir, bool paused = false)
    {
        mkdir(dir.c_str(), 0700);
        struct forkd_error err = {};
        std::string vmstate = dir + "/vmstate", memory = dir + "/memory.bin";
        bool ok = (paused || vmm_pause(vm_client(vm), &err) == 0) &&
                  vmm_snapshot_create(vm_client(vm), VMM_SNAPSHOT_FULL, vmstate.c_str(),
                                      memory.c_str(), &err) == 0 &&
                  (paused || vmm_resume(vm_client(vm), &err) == 0);
        EXPECT_TRUE(ok) << err.message;
        return ok;
    }

    // Pauses every fork, so that checking one does not compete for the cores with the
    // others' vCPUs (the guests spin flat out), and resumes them after each check.
    static void PauseAll(const std::vector<struct vm *> &forks, bool pause)
    {
        struct forkd_error err = {};
        for (struct vm *fork : forks)
            EXPECT_EQ(0,
                      pause ? vmm_pause(vm_client(fork), &err) : vmm_resume(vm_client(fork), &err))
                << err.message;
    }

    struct vm *Spawn(enum vm_memory memory, const std::string &name = "")
    {
        std::string vmstate = template_dir_ + "/vmstate", mem = template_dir_ + "/memory.bin";
        struct vm_restore_config config = {};
        config.name = name.c_str();
        config.snapshot_name = template_name_.c_str();
        config.vmstate_path = vmstate.c_str();
        config.memory_path = mem.c_str();
        config.memory = memory;
        config.page_server = server_;
        struct vm *fork = nullptr;
        struct forkd_error err = {};
        EXPECT_EQ(0, vm_restore(registry_, &config, &fork, &err)) << err.message;
        return fork;
    }

    // The fork ran on from the template: its snapshot verifies and its totals are not behind.
    void CheckFork(struct vm *fork, const std::string &tag, bool paused = false)
    {
        std::string dir = state_dir_ + "/check-" + tag;
        ASSERT_TRUE(Snapshot(fork, dir, paused));
        VerifyResult verify = Verify(dir);
        EXPECT_EQ(0, verify.exit_code) << tag << ": " << verify.output;
        EXPECT_GE(TotalFromVerify(verify.output), template_total_) << tag;
        std::string command = "rm -rf '" + dir + "'"; // keep the disk use of 16 forks small
        EXPECT_EQ(0, system(command.c_str()));
    }

    struct page_server_template_info Template()
    {
        struct page_server_template_info info = {};
        EXPECT_EQ(0, page_server_template_describe(server_, template_name_.c_str(), &info));
        return info;
    }

    struct page_server *server_ = nullptr;
    std::string template_dir_, template_name_;
    unsigned long long template_total_ = 0;
};

TEST_F(PageServerKvmTest, SixteenForksShareOneMappingAndVerify)
{
    MakeTemplate("base", 32, "pages=1500 pattern=random seed=5");
    std::vector<struct vm *> forks;
    for (int i = 0; i < 16; i++) {
        forks.push_back(Spawn(VM_MEMORY_UFFD));
        ASSERT_NE(nullptr, forks.back());
        EXPECT_EQ(VM_MEMORY_UFFD, vm_memory_kind(forks.back()));
        EXPECT_EQ(32ULL << 20, vm_memory_bytes(forks.back()));
    }
    EXPECT_EQ(16u, page_server_active_forks(server_));
    struct page_server_template_info info = Template();
    EXPECT_EQ(1u, info.times_mapped) << "memory.bin opened and mapped once for 16 forks";
    EXPECT_EQ(1, CountMappings(template_dir_ + "/memory.bin"));
    EXPECT_EQ(16u, info.stats.forks_active);
    for (struct vm *fork : forks)
        ASSERT_TRUE(WaitFor([&] { return ForkStats(fork).faults_served > 0; }, 10000))
            << "every fork faults its memory in through the page server";
    PauseAll(forks, true);
    for (size_t i = 0; i < forks.size(); i++)
        CheckFork(forks[i], std::to_string(i), true);
    PauseAll(forks, false);
    uint64_t sum = 0;
    for (struct vm *fork : forks) {
        struct page_server_stats stats = ForkStats(fork);
        EXPECT_GT(stats.faults_served, 0u);
        EXPECT_GT(stats.bytes_copied, 0u);
        EXPECT_LE(stats.service_p50_ns, stats.service_max_ns);
        sum += stats.faults_served;
        vm_unref(fork);
    }
    info = Template();
    EXPECT_GE(info.stats.faults_served, sum) << "the template sums its forks";
    EXPECT_EQ(16u, info.stats.forks_total);
    printf("16 UFFD forks: %llu faults, service p50 %llu ns p99 %llu ns max %llu ns\n",
           (unsigned long long)info.stats.faults_served,
           (unsigned long long)info.stats.service_p50_ns,
           (unsigned long long)info.stats.service_p99_ns,
           (unsigned long long)info.stats.service_max_ns);
}

TEST_F(PageServerKvmTest, KilledForkIsDroppedAndTheOthersRunOn)
{
    MakeTemplate("base", 32, "pages=1000 pattern=sequential");
    std::vector<struct vm *> forks;
    for (int i = 0; i < 4; i++) {
        forks.push_back(Spawn(VM_MEMORY_UFFD));
        ASSERT_NE(nullptr, forks.back());
    }
    struct vm *victim = forks[1];
    ASSERT_TRUE(WaitFor([&] { return ForkStats(victim).faults_served > 0; }, 10000));
    int uffds = CountUserfaultfds();
    EXPECT_EQ(4, uffds);
    ASSERT_EQ(0, kill(vm_pid(victim), SIGKILL));
    ASSERT_TRUE(WaitFor([&] { return page_server_active_forks(server_) == 3; }, 10000));
    EXPECT_EQ(0u, ForkStats(victim).forks_active);
    EXPECT_EQ(uffds - 1, CountUserfaultfds()) << "the dead fork's uffd is closed";
    EXPECT_EQ(3u, Template().stats.forks_active);
    std::vector<struct vm *> survivors;
    for (struct vm *fork : forks)
        if (fork != victim)
            survivors.push_back(fork);
    PauseAll(survivors, true);
    for (size_t i = 0; i < survivors.size(); i++)
        CheckFork(survivors[i], std::to_string(i), true);
    PauseAll(survivors, false);
    struct forkd_error err = {};
    ASSERT_EQ(0, vm_stop(registry_, forks[0], 2000, &err)) << err.message;
    ASSERT_TRUE(WaitFor([&] { return page_server_active_forks(server_) == 2; }, 10000))
        << "a stopped VM's fork is dropped too";
    for (struct vm *fork : forks)
        vm_unref(fork);
}

TEST_F(PageServerKvmTest, HandshakeAbuseLeavesRunningForksServed)
{
    MakeTemplate("base", 32, "pages=1000 pattern=random seed=2");
    struct vm *fork = Spawn(VM_MEMORY_UFFD);
    ASSERT_NE(nullptr, fork);
    const char *payloads[] = {"[{\"base_host_virt_addr\": 4096", "{not json", ""};
    for (const char *payload : payloads) {
        std::string path = state_dir_ + "/abuse.sock";
        struct page_server_fork_config config = {};
        config.template_name = template_name_.c_str();
        std::string mem = template_dir_ + "/memory.bin";
        config.memory_path = mem.c_str();
        config.socket_path = path.c_str();
        struct page_server_fork *abused = nullptr;
        struct forkd_error err = {};
        ASSERT_EQ(0, page_server_fork_prepare(server_, &config, &abused, &err)) << err.message;
        int peer = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_un address = {};
        address.sun_family = AF_UNIX;
        snprintf(address.sun_path, sizeof(address.sun_path), "%s", path.c_str());
        ASSERT_EQ(0, connect(peer, reinterpret_cast<struct sockaddr *>(&address), sizeof(address)));
        if (*payload) {
            ASSERT_GT(send(peer, payload, strlen(payload), MSG_NOSIGNAL), 0);
        }
        close(peer); // truncated, garbage, silent-then-gone: all without an fd
        EXPECT_NE(0, page_server_fork_wait_ready(abused, 15000, &err));
        EXPECT_NE(0u, strlen(err.message));
        page_server_fork_release(abused);
    }
    EXPECT_EQ(1u, page_server_active_forks(server_));
    CheckFork(fork, "after-abuse");
    vm_unref(fork);
}

TEST_F(PageServerKvmTest, PrefetchedGenerationTakesFewerDemandFaults)
{
    MakeTemplate("base", 32, "pages=1500 pattern=random seed=7");
    const unsigned window_ms = scaled_ms(1500);
    struct forkd_error err = {};
    ASSERT_EQ(0, page_server_template_set_prefetch(server_, template_name_.c_str(),
                                                   (template_dir_ + "/memory.bin").c_str(),
                                                   window_ms, &err))
        << err.message;
    std::vector<struct vm *> first, second;
    for (int i = 0; i < 2; i++)
        first.push_back(Spawn(VM_MEMORY_UFFD));
    ASSERT_TRUE(WaitFor([&] { return Template().hot_set_ready; }, 10000));
    struct page_server_template_info info = Template();
    EXPECT_GT(info.hot_pages, 0u);
    for (int i = 0; i < 2; i++)
        second.push_back(Spawn(VM_MEMORY_UFFD));
    // The same stretch of running as the first generation had when its window closed.
    std::this_thread::sleep_for(std::chrono::milliseconds(window_ms));
    for (int i = 0; i < 2; i++) {
        struct page_server_stats before = ForkStats(first[i]), after = ForkStats(second[i]);
        printf("fork %d: generation 1: %llu demand faults; generation 2: %llu demand faults, "
               "%llu pages prefetched\n",
               i, (unsigned long long)before.faults_served, (unsigned long long)after.faults_served,
               (unsigned long long)after.pages_prefetched);
        EXPECT_EQ(0u, before.pages_prefetched);
        EXPECT_GT(after.pages_prefetched, 0u);
        EXPECT_LT(after.faults_served, before.faults_served);
        EXPECT_LT(after.faults_served * 2, before.faults_served) << "at least halved";
    }
    CheckFork(second[0], "prefetched");
    for (struct vm *fork : first)
        vm_unref(fork);
    for (struct vm *fork : second)
        vm_unref(fork);
}
