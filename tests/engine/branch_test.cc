// Live and FULL branches of a real guest on KVM, every snapshot checked by the test VMM's
// verifier: consistency under load, continuation, exactly-once, cancellation at each phase,
// VMM death, a full disk, and bad input.
#include <gtest/gtest.h>

#include "engine_harness.h"
#include "huge_pages.h"
#include "test_time.h"

#include <atomic>
#include <cmath>
#include <csignal>
#include <random>
#include <string>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <thread>
#include <sys/stat.h>
#include <dirent.h>

extern "C" {
#include "forkd/branch.h"
#include "forkd/probe.h"
#include "forkd/store.h"
#include "uffd.h"
#include "vmm_client.h"
}

namespace
{

// Entries of a directory other than . and ..
std::vector<std::string> DirEntries(const std::string &path)
{
    std::vector<std::string> names;
    DIR *dir = opendir(path.c_str());
    if (!dir)
        return names;
    while (struct dirent *entry = readdir(dir))
        if (std::string(entry->d_name) != "." && std::string(entry->d_name) != "..")
            names.push_back(entry->d_name);
    closedir(dir);
    return names;
}

const char *ModeName(enum store_mode mode)
{
    return mode == STORE_MODE_LIVE ? "LIVE" : mode == STORE_MODE_FULL ? "FULL" : "ARM_IN_PAUSE";
}

} // namespace

class BranchTest : public EngineTest
{
  protected:
    void SetUp() override
    {
        EngineTest::SetUp();
        struct forkd_error err = {};
        ASSERT_EQ(0, store_open(state_dir_.c_str(), &store_, &err)) << err.message;
    }
    void TearDown() override
    {
        store_close(store_);
        EngineTest::TearDown();
    }

    struct Result {
        int rc;
        std::string error;
        struct store_snapshot snapshot;
        struct branch_progress progress;
    };

    // Runs a request on a branch handle of the caller's.
    Result Run(struct branch *branch, const struct branch_request &request)
    {
        Result result = {};
        struct forkd_error err = {};
        result.rc = branch_run(branch, store_, &request, &result.snapshot, &err);
        result.error = err.message;
        branch_get_progress(branch, &result.progress);
        return result;
    }

    static struct branch_request Request(struct vm *vm, const std::string &name,
                                         enum store_mode mode, void *context = nullptr)
    {
        struct branch_request request = {};
        request.vm = vm;
        request.snapshot_name = name.c_str();
        request.mode = mode;
        request.context = context;
        return request;
    }

    Result Branch(struct vm *vm, const std::string &name, enum store_mode mode,
                  branch_phase_fn on_phase = nullptr, void *context = nullptr,
                  struct branch *handle = nullptr, bool count_writes = false,
                  unsigned levers_off = 0)
    {
        struct branch *branch = handle ? handle : branch_new();
        struct branch_request request = Request(vm, name, mode, context);
        request.on_phase = on_phase;
        request.count_page_writes = count_writes;
        request.levers_off = levers_off;
        Result result = Run(branch, request);
        if (!handle)
            branch_free(branch);
        return result;
    }

    // A 2-vCPU, 64 MiB guest on 2 MiB pages (the caller reserves 36), once it wrote 1,000
    // times: by then every one of its 32 pages holds counters.
    struct vm *BootOnHugePages(const std::string &workload)
    {
        struct vm *vm = Boot(2, 64, workload, "", nullptr, VM_MEMORY_MEMFD, VM_HUGE_PAGE_SIZE);
        if (vm)
            WaitForGuestWrites(vm, 1000);
        return vm;
    }

    std::string SnapshotDir(const std::string &name)
    {
        return state_dir_ + "/snapshots/" + name;
    }

    // Branches and verifies; returns the verified total of all vCPUs.
    unsigned long long BranchAndVerify(struct vm *vm, const std::string &name, enum store_mode mode)
    {
        Result result = Branch(vm, name, mode);
        EXPECT_EQ(0, result.rc) << ModeName(mode) << " " << name << ": " << result.error;
        if (result.rc != 0)
            return 0;
        EXPECT_EQ(STORE_STATE_READY, result.snapshot.state);
        VerifyResult verify = Verify(SnapshotDir(name));
        EXPECT_EQ(0, verify.exit_code) << ModeName(mode) << " " << name << ":\n" << verify.output;
        return TotalFromVerify(verify.output);
    }

    // After an aborted branch: nothing of it in the store, not even a temporary directory.
    void ExpectStoreClean(const std::string &name)
    {
        struct store_snapshot snapshot;
        struct forkd_error err = {};
        EXPECT_EQ(-ENOENT, store_get(store_, name.c_str(), &snapshot, &err));
        for (const std::string &entry : DirEntries(state_dir_ + "/snapshots"))
            EXPECT_NE(0u, entry.rfind(".tmp", 0)) << "leftover " << entry;
    }

    struct store *store_ = nullptr;
};

struct LoadConfig {
    const char *label;
    unsigned vcpus;
    const char *workload;
    bool two_regions;
};

// Each configuration takes 13 branches of each mode: over the four, at least 50 per mode.
static const LoadConfig kLoadConfigs[] = {
    {"OneVcpuSequential", 1, "pattern=sequential", false},
    {"TwoVcpusRandomTwoRegions", 2, "pattern=random seed=7", true},
    {"TwoVcpusHotset", 2, "pattern=hotset seed=11", false},
    {"OneVcpuRandomTwoRegions", 1, "pattern=random seed=5", true},
};
static constexpr int kBranchesPerMode = 13;
static constexpr unsigned kLoadGuestMib = 32;

class BranchUnderLoad : public BranchTest, public ::testing::WithParamInterface<LoadConfig>
{
};

// Random pauses between branches, the guest writing flat out all along: every snapshot of
// every mode must pass the verifier (memory consistent with the saved vCPU state).
TEST_P(BranchUnderLoad, EverySnapshotVerifies)
{
    const LoadConfig &config = GetParam();
    static const char *const two_regions[] = {"--mmio-gap-mib", "16", nullptr};
    std::mt19937 random(12345);
    struct vm *vm = Boot(config.vcpus, kLoadGuestMib, config.workload, "",
                         config.two_regions ? two_regions : nullptr);
    ASSERT_NE(nullptr, vm);
    WaitForGuestWrites(vm, 1000);
    for (enum store_mode mode : {STORE_MODE_LIVE, STORE_MODE_LIVE_ARM_IN_PAUSE, STORE_MODE_FULL}) {
        for (int i = 0; i < kBranchesPerMode; i++) {
            usleep(std::uniform_int_distribution<int>(0, 20000)(random));
            std::string name = std::string("load-") + ModeName(mode) + "-" + std::to_string(i);
            Result result = Branch(vm, name, mode);
            ASSERT_EQ(0, result.rc) << name << ": " << result.error;
            if (config.two_regions) {
                /* The second region starts past the 16 MiB gap start and the 1 GiB MMIO gap,
                 * as the VMM lays it out (LIVE's regions come from the handshake, FULL's from
                 * the VMM's description; both name it where the guest sees it). */
                ASSERT_EQ(2u, result.snapshot.region_count);
                EXPECT_TRUE(result.snapshot.regions[1].guest_phys_addr_known);
                EXPECT_EQ((16ull << 20) + (1ull << 30), result.snapshot.regions[1].guest_phys_addr);
                EXPECT_EQ(0u, result.snapshot.regions[0].guest_phys_addr);
            }
            VerifyResult verify = Verify(SnapshotDir(name));
            ASSERT_EQ(0, verify.exit_code) << name << ":\n" << verify.output;
            struct forkd_error err = {};
            ASSERT_EQ(0, store_delete(store_, name.c_str(), false, &err)) << err.message;
        }
    }
    EXPECT_EQ("Running", VmmState(vm));
    vm_unref(vm);
}

INSTANTIATE_TEST_SUITE_P(Configs, BranchUnderLoad, ::testing::ValuesIn(kLoadConfigs),
                         [](const ::testing::TestParamInfo<LoadConfig> &param) {
                             return std::string(param.param.label);
                         });

// A guest whose balloon cycles flat out (it hands a page back, or takes one back, each time it
// looks at the clock) while LIVE branches copy its memfd memory: the VMM's discard of a page in
// use at the save removes it without a write-protect fault, so a page not captured before it
// would land in memory.bin as zeros. Every READY snapshot must verify (each balloon page in
// use holds its signature); a branch that met such a discard fails, naming it, and leaves
// nothing, the VM running. Every other branch copies the balloon last (no hot-first order),
// which leaves its pages uncaptured longest.
TEST_F(BranchTest, LiveBranchesOfABallooningGuestNeverTear)
{
    struct vm *vm = Boot(2, 32, "pages=1024 pattern=random seed=41 balloon=256");
    ASSERT_NE(nullptr, vm);
    WaitForGuestWrites(vm, 1000);
    int ready = 0, verified = 0, failed = 0;
    for (int i = 0; i < 12; i++) {
        std::string name = "balloon-" + std::to_string(i);
        Result result = Branch(vm, name, STORE_MODE_LIVE, nullptr, nullptr, nullptr, false,
                               i % 2 ? BRANCH_LEVER_HOT_FIRST : 0);
        if (result.rc == 0) {
            ready++;
            VerifyResult verify = Verify(SnapshotDir(name));
            EXPECT_EQ(0, verify.exit_code) << name << ":\n" << verify.output;
            EXPECT_NE(std::string::npos, verify.output.find("balloon: ")) << verify.output;
            verified += verify.exit_code == 0;
        } else {
            // A discard of a page not yet captured, or (rarely, on a slow host) discards so
            // frequent that write-protect calls kept being refused: both say so.
            failed++;
            EXPECT_TRUE(result.rc == -ENODATA || result.rc == -EAGAIN)
                << name << ": " << result.rc << " " << result.error;
            EXPECT_TRUE(result.error.find("discarded") != std::string::npos ||
                        result.error.find("kept discarding") != std::string::npos)
                << result.error;
            ExpectStoreClean(name);
        }
        EXPECT_EQ("Running", VmmState(vm));
    }
    printf("balloon: %d READY (%d verified), %d failed on a discard\n", ready, verified, failed);
    RecordProperty("ready", ready);
    RecordProperty("verified", verified);
    RecordProperty("failed_on_discard", failed);
    vm_unref(vm);
}

// Firecracker (1.12 to 1.16) discards a balloon page with MADV_DONTNEED whatever backs guest
// memory, and its write-protect uffd (forkd's patch) does not ask for EVENT_REMOVE. Over a
// memfd that drops only the VMM's page-table entries: the page stays in the file, still
// write-protected (the kernel leaves a marker in the entry), so forkd, which copies from the
// memfd, loses nothing and need not hear of it. Every LIVE branch of such a guest completes and
// verifies, with discards during the branches.
TEST_F(BranchTest, LiveBranchesOfAFirecrackerStyleBalloonOnAMemfdAllVerify)
{
    const char *const firecracker[] = {"--balloon-discard", "firecracker", nullptr};
    struct vm *vm = Boot(2, 32, "pages=1024 pattern=random seed=43 balloon=256", "", firecracker);
    ASSERT_NE(nullptr, vm);
    WaitForGuestWrites(vm, 1000);
    unsigned long long discards = 0;
    for (int i = 0; i < 12; i++) {
        std::string name = "fc-balloon-" + std::to_string(i);
        unsigned long long before = VmmCounter(vm, "balloon_discards");
        Result result = Branch(vm, name, STORE_MODE_LIVE, nullptr, nullptr, nullptr, false,
                               i % 2 ? BRANCH_LEVER_HOT_FIRST : 0);
        discards += VmmCounter(vm, "balloon_discards") - before;
        ASSERT_EQ(0, result.rc) << name << ": " << result.error;
        VerifyResult verify = Verify(SnapshotDir(name));
        EXPECT_EQ(0, verify.exit_code) << name << ":\n" << verify.output;
        EXPECT_NE(std::string::npos, verify.output.find("balloon: ")) << verify.output;
        EXPECT_EQ("Running", VmmState(vm));
    }
    EXPECT_GT(discards, 0u) << "the guest's balloon never moved during the branches";
    printf("firecracker-style balloon: 12 READY and verified, %llu discards during them\n",
           discards);
    vm_unref(vm);
}

TEST_F(BranchTest, EachPageIsWrittenExactlyOnce)
{
    struct vm *vm = Boot(2, 64, "pattern=random seed=3");
    ASSERT_NE(nullptr, vm);
    for (enum store_mode mode : {STORE_MODE_LIVE, STORE_MODE_LIVE_ARM_IN_PAUSE}) {
        struct branch *branch = branch_new();
        std::string name = std::string("once-") + ModeName(mode);
        Result result = Branch(vm, name, mode, nullptr, nullptr, branch, true);
        ASSERT_EQ(0, result.rc) << result.error;
        EXPECT_EQ(0u, result.progress.mirror_bytes) << "a 4 KiB-page guest took the mirror";
        uint64_t pages = 0;
        uint32_t page_size = 0;
        const uint8_t *counts = branch_page_write_counts(branch, &pages, &page_size);
        ASSERT_NE(nullptr, counts);
        EXPECT_EQ(64ull << 20, pages * page_size);
        uint64_t wrong = 0;
        for (uint64_t p = 0; p < pages; p++)
            wrong += counts[p] != 1;
        EXPECT_EQ(0u, wrong) << "pages not written exactly once";
        EXPECT_EQ(pages, result.progress.pages_by_fault + result.progress.pages_by_bulk);
        EXPECT_GT(result.progress.pages_by_fault, 0u)
            << "a guest writing flat out must hit pages before the bulk copier does";
        /* Fault-around: one fault captures at most a 64 KiB aligned block of 4 KiB pages. */
        EXPECT_GE(result.progress.faults_served * 16, result.progress.pages_by_fault);
        EXPECT_GT(result.progress.fault_service_p50_ns, 0u);
        EXPECT_LE(result.progress.fault_service_p50_ns, result.progress.fault_service_p99_ns);
        EXPECT_LE(result.progress.fault_service_p99_ns,
                  result.progress.fault_service_max_ns * 5 / 4 + 1);
        branch_free(branch);
        EXPECT_EQ(0, Verify(SnapshotDir(name)).exit_code);
    }
    vm_unref(vm);
}

// Makes `pages` 2 MiB pages free on top of those in use; puts vm.nr_hugepages back when it goes.
struct HugePageReserve {
    explicit HugePageReserve(long pages) : rc(huge_pages_reserve(pages, &before))
    {
    }
    ~HugePageReserve()
    {
        huge_pages_restore(before);
    }
    long before = -1;
    int rc;
};

// A guest on 2 MiB pages: LIVE and ARM_IN_PAUSE branches capture into the mirror (every page
// of it, then memory.bin written from it once) and verify; with the mirror left out they copy
// as before and verify too.
TEST_F(BranchTest, HugePageGuestsCaptureIntoTheMirrorAndWriteEachPageOnce)
{
    HugePageReserve reserve(64 / 2 + 4);
    ASSERT_EQ(0, reserve.rc) << "cannot make 36 free 2 MiB huge pages: " << strerror(-reserve.rc);
    struct vm *vm = BootOnHugePages("pattern=random seed=5");
    ASSERT_NE(nullptr, vm);
    for (unsigned levers_off : {0u, (unsigned)BRANCH_LEVER_MIRROR}) {
        for (enum store_mode mode : {STORE_MODE_LIVE, STORE_MODE_LIVE_ARM_IN_PAUSE}) {
            struct branch *branch = branch_new();
            std::string name =
                std::string("huge-") + ModeName(mode) + (levers_off ? "-direct" : "");
            Result result = Branch(vm, name, mode, nullptr, nullptr, branch, true, levers_off);
            ASSERT_EQ(0, result.rc) << name << ": " << result.error;
            EXPECT_EQ(levers_off ? 0ull : 64ull << 20, result.progress.mirror_bytes) << name;
            uint64_t pages = 0;
            uint32_t page_size = 0;
            const uint8_t *counts = branch_page_write_counts(branch, &pages, &page_size);
            ASSERT_NE(nullptr, counts);
            EXPECT_EQ(VM_HUGE_PAGE_SIZE, page_size);
            EXPECT_EQ(32u, pages);
            uint64_t wrong = 0;
            for (uint64_t p = 0; p < pages; p++)
                wrong += counts[p] != 1;
            EXPECT_EQ(0u, wrong) << name << ": pages not written exactly once";
            EXPECT_EQ(pages, result.progress.pages_by_fault + result.progress.pages_by_bulk);
            branch_free(branch);
            VerifyResult verify = Verify(SnapshotDir(name));
            EXPECT_EQ(0, verify.exit_code) << name << ":\n" << verify.output;
            EXPECT_EQ("Running", VmmState(vm));
        }
    }
    vm_stop(registry_, vm, 2000, nullptr);
    vm_unref(vm);
}

// Holds the fault handler's first capture until the copier wrote the whole mirror to
// memory.bin (it must not: the held page's pre-image is not in the mirror yet) or a guard time
// passed; either way the capture then completes.
struct HeldCapture {
    struct branch *branch = nullptr;
    std::atomic<int> calls{0};
    std::atomic<bool> written_while_held{false};
};

void HoldFirstCapture(void *context)
{
    auto *held = static_cast<HeldCapture *>(context);
    if (held->calls.fetch_add(1) != 0)
        return;
    auto deadline = std::chrono::steady_clock::now() + scaled(std::chrono::milliseconds(500));
    struct branch_progress progress;
    do {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        branch_get_progress(held->branch, &progress);
    } while (progress.bytes_copied < progress.bytes_total &&
             std::chrono::steady_clock::now() < deadline);
    held->written_while_held = progress.bytes_copied >= progress.bytes_total;
}

// A capture in flight when the copier has captured everything else: memory.bin is written from
// the mirror only after it, so the snapshot holds the page's pre-image, not the mirror's zeros.
TEST_F(BranchTest, TheMirrorIsWrittenOnlyAfterEveryCaptureInFlight)
{
    HugePageReserve reserve(64 / 2 + 4);
    ASSERT_EQ(0, reserve.rc) << "cannot make 36 free 2 MiB huge pages: " << strerror(-reserve.rc);
    struct vm *vm = BootOnHugePages("pattern=random seed=6");
    ASSERT_NE(nullptr, vm);
    for (enum store_mode mode : {STORE_MODE_LIVE, STORE_MODE_LIVE_ARM_IN_PAUSE}) {
        std::string name = std::string("held-") + ModeName(mode);
        HeldCapture held;
        held.branch = branch_new();
        struct branch_request request = Request(vm, name, mode, &held);
        request.fault_claimed_hook = HoldFirstCapture;
        Result result = Run(held.branch, request);
        branch_free(held.branch);
        ASSERT_EQ(0, result.rc) << name << ": " << result.error;
        EXPECT_EQ(64ull << 20, result.progress.mirror_bytes) << name;
        ASSERT_GT(held.calls.load(), 0) << name << ": the guest took no write fault to hold";
        EXPECT_FALSE(held.written_while_held) << name << ": memory.bin written before a capture";
        VerifyResult verify = Verify(SnapshotDir(name));
        EXPECT_EQ(0, verify.exit_code) << name << ":\n" << verify.output;
        EXPECT_EQ("Running", VmmState(vm));
    }
    vm_stop(registry_, vm, 2000, nullptr);
    vm_unref(vm);
}

TEST_F(BranchTest, BranchesOfRestoredVmsContinueTheGuest)
{
    struct vm *source = Boot(2, 64, "pattern=hotset seed=2");
    ASSERT_NE(nullptr, source);
    WaitForGuestWrites(source, 1000);
    unsigned long long base = BranchAndVerify(source, "base", STORE_MODE_LIVE);
    ASSERT_GT(base, 0u);
    struct forkd_error err = {};
    struct store_snapshot snapshot;
    for (enum vm_memory memory : {VM_MEMORY_FILE, VM_MEMORY_MEMFD}) {
        SCOPED_TRACE(memory == VM_MEMORY_FILE ? "FILE" : "MEMFD");
        ASSERT_EQ(0, store_acquire(store_, "base", &snapshot, &err)) << err.message;
        struct vm *fork = Restore(snapshot.path, memory, "base");
        ASSERT_NE(nullptr, fork);
        // A branch of the branch: LIVE where memory is a memfd, FULL on a private file map.
        enum store_mode mode = memory == VM_MEMORY_MEMFD ? STORE_MODE_LIVE : STORE_MODE_FULL;
        std::string name = std::string("child-") + (memory == VM_MEMORY_MEMFD ? "memfd" : "file");
        unsigned long long child = BranchAndVerify(fork, name, mode);
        EXPECT_GE(child, base) << "a fork's counters only grow from its snapshot";
        ASSERT_EQ(0, store_get(store_, name.c_str(), &snapshot, &err));
        EXPECT_STREQ("base", snapshot.parent_snapshot);
        ASSERT_EQ(0, vm_stop(registry_, fork, 2000, &err)) << err.message;
        store_release(store_, "base");
        vm_unref(fork);
    }
    vm_unref(source);
}

TEST_F(BranchTest, LiveOnAFileBackedVmIsRefusedWithTheReason)
{
    struct vm *source = Boot(1, 32, "pattern=random");
    ASSERT_NE(nullptr, source);
    BranchAndVerify(source, "base", STORE_MODE_FULL);
    struct vm *fork = Restore(SnapshotDir("base"), VM_MEMORY_FILE);
    ASSERT_NE(nullptr, fork);
    Result result = Branch(fork, "nope", STORE_MODE_LIVE);
    EXPECT_EQ(-EOPNOTSUPP, result.rc);
    EXPECT_NE(std::string::npos, result.error.find("FILE memory")) << result.error;
    EXPECT_NE(std::string::npos, result.error.find("use FULL")) << result.error;
    ExpectStoreClean("nope");
    EXPECT_EQ("Running", VmmState(fork));
    vm_unref(fork);
    vm_unref(source);
}

TEST_F(BranchTest, BadNamesAndTakenNamesAreRefused)
{
    struct vm *vm = Boot(1, 32, "pattern=random");
    ASSERT_NE(nullptr, vm);
    for (const char *bad : {"", "../escape", "a/b", ".hidden", "-dash", "x y"}) {
        Result result = Branch(vm, bad, STORE_MODE_LIVE);
        EXPECT_EQ(-EINVAL, result.rc) << "'" << bad << "'";
    }
    BranchAndVerify(vm, "taken", STORE_MODE_LIVE);
    Result again = Branch(vm, "taken", STORE_MODE_LIVE);
    EXPECT_EQ(-EEXIST, again.rc) << again.error;
    EXPECT_EQ(0, Verify(SnapshotDir("taken")).exit_code) << "the existing snapshot is untouched";
    EXPECT_EQ("Running", VmmState(vm));
    vm_unref(vm);
}

struct CancelAt {
    enum branch_phase phase;
    struct branch *branch;
    std::atomic<bool> fired{false};
    std::atomic<bool> accepted{false}; // what branch_cancel answered
};

static void CancelOnPhase(void *context, enum branch_phase phase, const struct branch_progress *)
{
    auto *cancel = static_cast<CancelAt *>(context);
    if (phase == cancel->phase && !cancel->fired.exchange(true))
        cancel->accepted = branch_cancel(cancel->branch);
}

// Cancels from the before_commit_hook: the copy is complete, nothing is published yet.
static void CancelBeforeCommit(void *context)
{
    auto *cancel = static_cast<CancelAt *>(context);
    cancel->fired = true;
    cancel->accepted = branch_cancel(cancel->branch);
}

TEST_F(BranchTest, CancelAtEachPhaseLeavesTheVmRunningAndTheStoreClean)
{
    struct vm *vm = Boot(2, 64, "pattern=random seed=4");
    ASSERT_NE(nullptr, vm);
    for (enum branch_phase phase :
         {BRANCH_PHASE_STARTED, BRANCH_PHASE_ARMED, BRANCH_PHASE_PAUSED, BRANCH_PHASE_COPYING}) {
        SCOPED_TRACE("cancel at phase " + std::to_string(phase));
        CancelAt cancel;
        cancel.phase = phase;
        cancel.branch = branch_new();
        std::string name = "cancelled-" + std::to_string(phase);
        Result result = Branch(vm, name, STORE_MODE_LIVE, CancelOnPhase, &cancel, cancel.branch);
        EXPECT_TRUE(cancel.fired);
        EXPECT_EQ(-ECANCELED, result.rc) << result.error;
        EXPECT_EQ(BRANCH_PHASE_CANCELLED, result.progress.phase);
        branch_free(cancel.branch);
        ExpectStoreClean(name);
        EXPECT_EQ("Running", VmmState(vm));
        // Unprotected and without a handler: the guest keeps writing, and branches again.
        BranchAndVerify(vm, "after-" + std::to_string(phase), STORE_MODE_LIVE);
    }
    vm_unref(vm);
}

static void KillVmmOnCopy(void *context, enum branch_phase phase, const struct branch_progress *)
{
    if (phase == BRANCH_PHASE_COPYING)
        kill(vm_pid(static_cast<struct vm *>(context)), SIGKILL);
}

TEST_F(BranchTest, VmmDeathMidCopyFailsCleanly)
{
    struct vm *vm = Boot(2, 64, "pattern=random seed=8");
    ASSERT_NE(nullptr, vm);
    // A MEMFD fork too: its memory stays readable after the VMM dies, so only the death
    // itself can stop the copy.
    Result base = Branch(vm, "base", STORE_MODE_FULL);
    ASSERT_EQ(0, base.rc) << base.error;
    struct vm *fork = Restore(SnapshotDir("base"), VM_MEMORY_MEMFD);
    ASSERT_NE(nullptr, fork);
    Result fork_result = Branch(fork, "orphan-fork", STORE_MODE_LIVE, KillVmmOnCopy, fork);
    EXPECT_EQ(-ESRCH, fork_result.rc) << fork_result.error;
    ExpectStoreClean("orphan-fork");
    vm_unref(fork);
    Result result = Branch(vm, "orphan", STORE_MODE_LIVE, KillVmmOnCopy, vm);
    EXPECT_EQ(-ESRCH, result.rc) << result.error;
    EXPECT_NE(std::string::npos, result.error.find("VMM")) << result.error;
    EXPECT_EQ(BRANCH_PHASE_FAILED, result.progress.phase);
    EXPECT_NE(std::string::npos, result.error.find("orphan")) << result.error;
    ExpectStoreClean("orphan");
    vm_unref(vm);
}

TEST_F(BranchTest, FullDiskFailsCleanly)
{
    std::string small = state_dir_ + "/small";
    ASSERT_EQ(0, mkdir(small.c_str(), 0700));
    ASSERT_EQ(0, mount("tmpfs", small.c_str(), "tmpfs", 0, "size=16m"))
        << "mounting a tmpfs needs root: " << strerror(errno);
    struct store *small_store = nullptr;
    struct forkd_error err = {};
    ASSERT_EQ(0, store_open(small.c_str(), &small_store, &err)) << err.message;
    struct vm *vm = Boot(1, 64, "pattern=random seed=1");
    ASSERT_NE(nullptr, vm);
    for (enum store_mode mode : {STORE_MODE_LIVE, STORE_MODE_FULL}) {
        struct branch *branch = branch_new();
        struct branch_request request = {};
        request.vm = vm;
        request.snapshot_name = "too-big";
        request.mode = mode;
        struct store_snapshot snapshot;
        int rc = branch_run(branch, small_store, &request, &snapshot, &err);
        branch_free(branch);
        EXPECT_NE(0, rc) << ModeName(mode);
        if (mode == STORE_MODE_LIVE) {
            EXPECT_EQ(-ENOSPC, rc) << err.message;
            EXPECT_NE(std::string::npos, std::string(err.message).find("No space left"))
                << err.message;
        }
        EXPECT_EQ(0u, DirEntries(small + "/snapshots").size()) << ModeName(mode);
        EXPECT_EQ("Running", VmmState(vm));
    }
    store_close(small_store);
    EXPECT_EQ(0, umount(small.c_str()));
    BranchAndVerify(vm, "fits", STORE_MODE_LIVE);
    vm_unref(vm);
}

struct SecondBranch {
    struct store *store;
    struct vm *vm;
    int rc = 1;
    std::string error;
};

static void SecondBranchOnCopy(void *context, enum branch_phase phase,
                               const struct branch_progress *)
{
    auto *second = static_cast<SecondBranch *>(context);
    if (phase != BRANCH_PHASE_COPYING || second->rc != 1)
        return;
    struct branch *branch = branch_new();
    struct branch_request request = {};
    request.vm = second->vm;
    request.snapshot_name = "second";
    request.mode = STORE_MODE_LIVE;
    struct forkd_error err = {};
    second->rc = branch_run(branch, second->store, &request, nullptr, &err);
    second->error = err.message;
    branch_free(branch);
}

TEST_F(BranchTest, OneBranchPerVmAtATime)
{
    struct vm *vm = Boot(1, 32, "pattern=random");
    ASSERT_NE(nullptr, vm);
    SecondBranch second;
    second.store = store_;
    second.vm = vm;
    Result first = Branch(vm, "first", STORE_MODE_LIVE, SecondBranchOnCopy, &second);
    EXPECT_EQ(0, first.rc) << first.error;
    EXPECT_EQ(-EBUSY, second.rc) << second.error;
    ExpectStoreClean("second");
    EXPECT_EQ(0, Verify(SnapshotDir("first")).exit_code);
    vm_unref(vm);
}

static size_t OpenFds()
{
    return DirEntries("/proc/self/fd").size();
}

TEST_F(BranchTest, NoFdOrProcessOutlivesItsVm)
{
    size_t fds_before = OpenFds();
    for (bool restored : {false, true}) { // a booted VM, then a MEMFD fork
        struct vm *vm = Boot(1, 32, "pattern=random");
        ASSERT_NE(nullptr, vm);
        struct vm *target = vm;
        if (restored) {
            BranchAndVerify(vm, "seed", STORE_MODE_FULL);
            target = Restore(SnapshotDir("seed"), VM_MEMORY_MEMFD);
            ASSERT_NE(nullptr, target);
        }
        BranchAndVerify(target, "leak-check", STORE_MODE_LIVE);
        Result cancelled = Branch(target, "leak-cancel", STORE_MODE_LIVE, KillVmmOnCopy, target);
        EXPECT_NE(0, cancelled.rc);
        std::vector<pid_t> pids = {vm_pid(vm), vm_pid(target)};
        struct forkd_error err = {};
        vm_stop(registry_, target, 1000, &err);
        if (target != vm) {
            vm_stop(registry_, vm, 1000, &err);
            vm_unref(target);
        }
        vm_unref(vm);
        for (pid_t pid : pids) {
            if (pid > 0) {
                EXPECT_NE(0, kill(pid, 0)) << "VMM " << pid << " outlived its VM";
            }
        }
        store_delete(store_, "seed", true, &err);
        store_delete(store_, "leak-check", true, &err);
    }
    EXPECT_EQ(fds_before, OpenFds()) << "file descriptors leaked by boots, branches, stops";
}

// A FULL branch honours a cancel at every phase before it publishes: the VMM's files are
// dropped and the VM runs on. (It used to ignore the cancel and publish a READY snapshot.)
TEST_F(BranchTest, FullBranchCancelledBeforePublishingLeavesNothing)
{
    struct vm *vm = Boot(2, 64, "pattern=random seed=14");
    ASSERT_NE(nullptr, vm);
    for (enum branch_phase phase : {BRANCH_PHASE_STARTED, BRANCH_PHASE_PAUSED,
                                    BRANCH_PHASE_VMSTATE_SAVED, BRANCH_PHASE_RESUMED}) {
        SCOPED_TRACE("cancel at phase " + std::to_string(phase));
        CancelAt cancel;
        cancel.phase = phase;
        cancel.branch = branch_new();
        std::string name = "full-cancelled-" + std::to_string(phase);
        Result result = Branch(vm, name, STORE_MODE_FULL, CancelOnPhase, &cancel, cancel.branch);
        branch_free(cancel.branch);
        EXPECT_TRUE(cancel.fired);
        EXPECT_TRUE(cancel.accepted);
        EXPECT_EQ(-ECANCELED, result.rc) << result.error;
        EXPECT_EQ(BRANCH_PHASE_CANCELLED, result.progress.phase);
        ExpectStoreClean(name);
        EXPECT_EQ("Running", VmmState(vm));
    }
    BranchAndVerify(vm, "full-after-cancels", STORE_MODE_FULL);
    vm_unref(vm);
}

// A cancel that arrives once the copy is complete, just before the point of no return, is
// still honoured (LIVE used to check for it only while copying).
TEST_F(BranchTest, CancelAfterTheCopyBeforePublishingLeavesNothing)
{
    struct vm *vm = Boot(2, 64, "pattern=random seed=15");
    ASSERT_NE(nullptr, vm);
    for (enum store_mode mode : {STORE_MODE_LIVE, STORE_MODE_FULL}) {
        SCOPED_TRACE(ModeName(mode));
        CancelAt cancel;
        cancel.branch = branch_new();
        std::string name = std::string("late-cancel-") + ModeName(mode);
        struct branch_request request = Request(vm, name, mode, &cancel);
        request.before_commit_hook = CancelBeforeCommit;
        Result result = Run(cancel.branch, request);
        branch_free(cancel.branch);
        EXPECT_TRUE(cancel.fired);
        EXPECT_TRUE(cancel.accepted);
        EXPECT_EQ(-ECANCELED, result.rc) << result.error;
        EXPECT_EQ(BRANCH_PHASE_CANCELLED, result.progress.phase);
        ExpectStoreClean(name);
        EXPECT_EQ("Running", VmmState(vm));
    }
    BranchAndVerify(vm, "after-late-cancels", STORE_MODE_LIVE);
    vm_unref(vm);
}

// Publishing is the point of no return: a cancel then is refused (branch_cancel says so), the
// branch completes, and its snapshot is READY and consistent.
TEST_F(BranchTest, CancelWhilePublishingIsRefusedAndTheSnapshotIsComplete)
{
    struct vm *vm = Boot(2, 64, "pattern=random seed=16");
    ASSERT_NE(nullptr, vm);
    for (enum store_mode mode : {STORE_MODE_LIVE, STORE_MODE_FULL}) {
        SCOPED_TRACE(ModeName(mode));
        CancelAt cancel;
        cancel.phase = BRANCH_PHASE_PUBLISHING;
        cancel.branch = branch_new();
        std::string name = std::string("publishing-") + ModeName(mode);
        Result result = Branch(vm, name, mode, CancelOnPhase, &cancel, cancel.branch);
        EXPECT_FALSE(branch_cancel(cancel.branch)) << "a finished branch cannot be cancelled";
        branch_free(cancel.branch);
        EXPECT_TRUE(cancel.fired);
        EXPECT_FALSE(cancel.accepted);
        ASSERT_EQ(0, result.rc) << result.error;
        EXPECT_EQ(BRANCH_PHASE_DONE, result.progress.phase);
        EXPECT_EQ(STORE_STATE_READY, result.snapshot.state);
        VerifyResult verify = Verify(SnapshotDir(name));
        EXPECT_EQ(0, verify.exit_code) << verify.output;
    }
    vm_unref(vm);
}

// A VM that was paused (a fork started paused) stays paused through a branch, whether it
// succeeds or is cancelled: the pause guard restores the state it found.
TEST_F(BranchTest, BranchesOfAPausedVmLeaveItPaused)
{
    struct vm *vm = Boot(2, 64, "pattern=random seed=17");
    ASSERT_NE(nullptr, vm);
    WaitForGuestWrites(vm, 1000);
    BranchAndVerify(vm, "paused-base", STORE_MODE_FULL);
    struct vm *fork = Restore(SnapshotDir("paused-base"), VM_MEMORY_MEMFD, "paused-base", true);
    ASSERT_NE(nullptr, fork);
    ASSERT_EQ("Paused", VmmState(fork));
    for (enum store_mode mode : {STORE_MODE_LIVE, STORE_MODE_LIVE_ARM_IN_PAUSE, STORE_MODE_FULL}) {
        SCOPED_TRACE(ModeName(mode));
        BranchAndVerify(fork, std::string("of-paused-") + ModeName(mode), mode);
        EXPECT_EQ("Paused", VmmState(fork));
        struct vm_status status;
        vm_get_status(fork, &status);
        EXPECT_EQ(VM_STATE_PAUSED, status.state);
    }
    CancelAt cancel;
    cancel.phase = BRANCH_PHASE_VMSTATE_SAVED;
    cancel.branch = branch_new();
    Result cancelled =
        Branch(fork, "of-paused-cancelled", STORE_MODE_LIVE, CancelOnPhase, &cancel, cancel.branch);
    branch_free(cancel.branch);
    EXPECT_EQ(-ECANCELED, cancelled.rc) << cancelled.error;
    EXPECT_EQ("Paused", VmmState(fork));
    ExpectStoreClean("of-paused-cancelled");
    // Still the fork it was: resumed, it continues and counts on.
    struct forkd_error err = {};
    ASSERT_EQ(0, vm_resume(fork, &err)) << err.message;
    unsigned long long before = GuestWrites(fork);
    WaitForGuestWrites(fork, before + 1000);
    vm_unref(fork);
    vm_unref(vm);
}

// LIVE of anonymous memory needs write-protect of never-touched pages (WP_UNPOPULATED, 6.4+):
// without it the branch is refused before anything is armed or paused, naming the feature. A
// VM forkd boots is on a memfd and branches live on any kernel with shmem write-protect.
TEST_F(BranchTest, LiveOfAnonymousMemoryNeedsWpUnpopulated)
{
    struct vm *booted = Boot(1, 32, "pattern=random seed=18");
    ASSERT_NE(nullptr, booted);
    struct vm_status status;
    vm_get_status(booted, &status);
    EXPECT_EQ(VM_MEMORY_MEMFD, status.memory);
    BranchAndVerify(booted, "memfd-booted", STORE_MODE_LIVE);
    vm_unref(booted);

    struct vm *vm = Boot(1, 32, "pattern=random seed=19", "", nullptr, VM_MEMORY_ANONYMOUS);
    ASSERT_NE(nullptr, vm);
    vm_get_status(vm, &status);
    EXPECT_EQ(VM_MEMORY_ANONYMOUS, status.memory);
    if (probe_wp_unpopulated()) {
        BranchAndVerify(vm, "anonymous-live", STORE_MODE_LIVE);
    } else {
        unsigned long long pauses = VmmPauseCount(vm);
        Result result = Branch(vm, "anonymous-live", STORE_MODE_LIVE);
        EXPECT_EQ(-EOPNOTSUPP, result.rc) << result.error;
        EXPECT_NE(std::string::npos, result.error.find("UFFD_FEATURE_WP_UNPOPULATED"))
            << result.error;
        EXPECT_EQ(pauses, VmmPauseCount(vm)) << "refused only after pausing";
        ExpectStoreClean("anonymous-live");
        EXPECT_EQ("Running", VmmState(vm));
    }
    BranchAndVerify(vm, "anonymous-full", STORE_MODE_FULL);
    vm_unref(vm);
}

// A pause request that outlives the client's time limit while the VMM goes on to pause: the
// branch fails, and the VM is found paused and resumed rather than left paused for good.
TEST_F(BranchTest, APauseThatTimesOutLeavesTheVmRunning)
{
    const unsigned call_timeout_ms = 250;
    const unsigned scale = static_cast<unsigned>(std::ceil(forkd_time_scale()));
    std::string delay = std::to_string(2 * call_timeout_ms * scale);
    const char *const slow_pause[] = {"--pause-delay-ms", delay.c_str(), nullptr};
    struct vm_registry_config config = {};
    config.vmm_binary = FORKD_TESTVM_PATH;
    std::string run_dir = state_dir_ + "/slow-vms";
    config.run_dir = run_dir.c_str();
    config.timeout_scale = scale;
    config.call_timeout_ms = call_timeout_ms;
    struct vm_registry *slow = nullptr;
    struct forkd_error err = {};
    ASSERT_EQ(0, vm_registry_open(&config, &slow, &err)) << err.message;
    struct vm_boot_config boot = {};
    boot.vcpu_count = 1;
    boot.mem_size_mib = 32;
    boot.kernel_image_path = FORKD_GUEST_PATH;
    boot.boot_args = "pattern=random seed=20";
    boot.extra_vmm_args = slow_pause;
    struct vm *vm = nullptr;
    ASSERT_EQ(0, vm_boot(slow, &boot, &vm, &err)) << err.message;
    for (enum store_mode mode : {STORE_MODE_FULL, STORE_MODE_LIVE}) {
        SCOPED_TRACE(ModeName(mode));
        std::string name = std::string("slow-pause-") + ModeName(mode);
        Result result = Branch(vm, name, mode);
        EXPECT_EQ(-ETIMEDOUT, result.rc) << result.error;
        EXPECT_NE(std::string::npos, result.error.find("paused afterwards and was resumed"))
            << result.error;
        ExpectStoreClean(name);
        EXPECT_EQ("Running", VmmState(vm));
        struct vm_status status;
        vm_get_status(vm, &status);
        EXPECT_EQ(VM_STATE_RUNNING, status.state);
        unsigned long long before = GuestWrites(vm);
        WaitForGuestWrites(vm, before + 1000);
    }
    vm_unref(vm);
    vm_registry_close(slow, false, 2000);
}

// The write-protect socket's path is derived from the API socket's: wherever the API socket's
// path fits in sun_path, so does the branch's listener (it used to be 3 bytes longer).
TEST_F(BranchTest, LiveBranchWorksWithTheLongestApiSocketPath)
{
    const size_t sun_path_max = sizeof(((struct sockaddr_un *)nullptr)->sun_path) - 1;
    std::string run_dir = state_dir_ + "/";
    const std::string api_socket_name = "/vm-1.sock"; // the new registry's first VM
    run_dir += std::string(sun_path_max - run_dir.size() - api_socket_name.size(), 'd');
    struct vm_registry_config config = {};
    config.vmm_binary = FORKD_TESTVM_PATH;
    config.run_dir = run_dir.c_str();
    config.timeout_scale = static_cast<unsigned>(std::ceil(forkd_time_scale()));
    struct vm_registry *registry = nullptr;
    struct forkd_error err = {};
    ASSERT_EQ(0, vm_registry_open(&config, &registry, &err)) << err.message;
    struct vm_boot_config boot = {};
    boot.vcpu_count = 1;
    boot.mem_size_mib = 32;
    boot.kernel_image_path = FORKD_GUEST_PATH;
    boot.boot_args = "pattern=random seed=21";
    struct vm *vm = nullptr;
    ASSERT_EQ(0, vm_boot(registry, &boot, &vm, &err)) << err.message;
    struct vm_status status;
    vm_get_status(vm, &status);
    EXPECT_EQ(sun_path_max, strlen(status.api_socket_path)) << status.api_socket_path;
    BranchAndVerify(vm, "long-socket-path", STORE_MODE_LIVE);
    vm_unref(vm);
    vm_registry_close(registry, false, 2000);
}

// Whoever else reaches the write-protect socket first is hung up on: the branch takes the
// handshake of the VMM's own process only (SO_PEERCRED), as the page server does.
TEST_F(BranchTest, AnImpostorOnTheWriteProtectSocketIsIgnored)
{
    struct vm *vm = Boot(1, 32, "pattern=random seed=22");
    ASSERT_NE(nullptr, vm);
    WaitForGuestWrites(vm, 1000);
    struct vm_status status;
    vm_get_status(vm, &status);
    std::string api = status.api_socket_path;
    std::string prefix = api.substr(0, api.size() - strlen(".sock")) + ".wp";
    const size_t impostor_bytes = 16u << 20; // not the guest's size: a mix-up cannot pass
    void *impostor_memory =
        mmap(nullptr, impostor_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(MAP_FAILED, impostor_memory);
    int impostor_uffd = probe_open_userfaultfd(O_CLOEXEC | O_NONBLOCK);
    ASSERT_GE(impostor_uffd, 0) << strerror(-impostor_uffd);
    // The VMM is stopped until the impostor has connected, so the impostor is first in line.
    pid_t vmm = vm_pid(vm);
    ASSERT_EQ(0, kill(vmm, SIGSTOP));
    std::atomic<bool> connected{false};
    int impostor = -1;
    std::thread thread([&] {
        auto guard = std::chrono::steady_clock::now() + scaled(std::chrono::seconds(10));
        while (std::chrono::steady_clock::now() < guard) {
            for (const char *suffix : {"", ".sock"}) { // today's name and the older one
                struct sockaddr_un addr = {};
                addr.sun_family = AF_UNIX;
                std::string path = prefix + suffix;
                if (path.size() >= sizeof(addr.sun_path))
                    continue;
                snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", path.c_str());
                int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
                if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0) {
                    struct uffd_region region = {(uint64_t)(uintptr_t)impostor_memory,
                                                 impostor_bytes, 0, 4096};
                    struct forkd_error send_err = {};
                    uffd_send_handshake(fd, impostor_uffd, &region, 1, &send_err);
                    impostor = fd;
                    connected = true;
                    kill(vmm, SIGCONT);
                    return;
                }
                close(fd);
            }
            usleep(200);
        }
        kill(vmm, SIGCONT);
    });
    Result result = Branch(vm, "impostor", STORE_MODE_LIVE);
    thread.join();
    EXPECT_TRUE(connected) << "the impostor never found the socket";
    EXPECT_EQ(0, result.rc) << result.error;
    if (result.rc == 0) {
        VerifyResult verify = Verify(SnapshotDir("impostor"));
        EXPECT_EQ(0, verify.exit_code) << verify.output;
    }
    if (impostor >= 0) {
        char byte;
        ssize_t n = recv(impostor, &byte, 1, 0); // EOF, or a reset: its bytes went unread
        EXPECT_TRUE(n == 0 || (n < 0 && errno == ECONNRESET))
            << "the impostor's connection is open";
        close(impostor);
    }
    close(impostor_uffd);
    munmap(impostor_memory, impostor_bytes);
    EXPECT_EQ("Running", VmmState(vm));
    vm_unref(vm);
}
