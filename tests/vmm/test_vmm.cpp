// forkd-testvm tests: boot, pause, snapshot and verify on real KVM; restores with every memory
// backend; torn snapshots; the write-protect userfaultfd endpoint; malformed requests. None of
// them skip: a machine without KVM or userfaultfd fails the suite.
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <functional>
#include <mutex>
#include <set>
#include <thread>

#include <gtest/gtest.h>

extern "C" {
#include <forkd_compat/userfaultfd.h>
}

#include "test_time.h"
#include "vmm_test_client.h"

using namespace forkd_testvm;
using namespace std::chrono_literals;

namespace
{

constexpr uint64_t kPage = 4096;
// Small guests with the MMIO gap forced low: two regions, fast to fault in on nested KVM.
const std::vector<std::string> kTwoRegions = {"--mmio-gap-mib", "32"};

class VmmTest : public ::testing::Test
{
  protected:
    void SetUp() override
    {
        require_kvm_and_userfaultfd();
    }
    TempDir dir_;
};

std::string snapshot_path(const TempDir &dir, const std::string &name)
{
    std::string path = dir.file(name);
    mkdir(path.c_str(), 0700);
    return path;
}

// Boots, runs until every vCPU made progress, pauses and takes a Full snapshot into snap_dir.
void boot_run_snapshot(TestVmm &vmm, unsigned vcpus, const std::string &boot_args,
                       const std::string &snap_dir, uint64_t progress = 2000)
{
    ASSERT_NO_FATAL_FAILURE(vmm.boot(vcpus, 64, boot_args));
    ASSERT_NO_FATAL_FAILURE(vmm.wait_progress(progress));
    ASSERT_NO_FATAL_FAILURE(vmm.pause());
    ASSERT_NO_FATAL_FAILURE(vmm.snapshot(snap_dir + "/vmstate", snap_dir + "/memory.bin"));
}

VerifyResult verify_dir(const std::string &dir)
{
    return run_verify({dir});
}

void expect_consistent(const VerifyResult &result, unsigned vcpus)
{
    EXPECT_EQ(result.exit_code, 0) << result.err << result.out;
    ASSERT_EQ(result.totals.size(), vcpus) << result.out;
    for (uint64_t total : result.totals)
        EXPECT_GT(total, 0u);
}

std::string load_body(const std::string &snap_dir, const std::string &type, const std::string &path,
                      bool shared, bool resume = true)
{
    return "{\"snapshot_path\":\"" + snap_dir + "/vmstate\",\"mem_backend\":{\"backend_type\":\"" +
           type + "\",\"backend_path\":\"" + path + "\"" + (shared ? ",\"shared\":true" : "") +
           "},\"resume_vm\":" + (resume ? "true" : "false") + "}";
}

// Restored guests continue from their snapshot totals; wait until each vCPU went well past.
void wait_beyond(TestVmm &vmm, const std::vector<uint64_t> &totals, uint64_t more)
{
    uint64_t highest = *std::max_element(totals.begin(), totals.end());
    ASSERT_NO_FATAL_FAILURE(vmm.wait_progress(highest + more));
}

void expect_grew(const VerifyResult &before, const VerifyResult &after)
{
    ASSERT_EQ(before.totals.size(), after.totals.size());
    for (size_t i = 0; i < before.totals.size(); i++)
        EXPECT_GT(after.totals[i], before.totals[i]) << "vCPU " << i;
}

// Serves missing-page faults of a Uffd-restored VMM from memory.bin; can hold faults unserved.
class PageServer
{
  public:
    PageServer(const std::string &socket_path, const std::string &memory_path)
        : listener_(socket_path)
    {
        int fd = open(memory_path.c_str(), O_RDONLY | O_CLOEXEC);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) < 0)
            throw std::runtime_error("cannot open " + memory_path);
        size_ = static_cast<size_t>(st.st_size);
        image_ = static_cast<uint8_t *>(mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0));
        close(fd);
        stop_ = eventfd(0, EFD_CLOEXEC);
    }
    ~PageServer()
    {
        stop();
        munmap(image_, size_);
        close(stop_);
        if (handshake_.uffd >= 0)
            close(handshake_.uffd);
        if (handshake_.connection >= 0)
            close(handshake_.connection);
    }
    void start()
    {
        handshake_ = listener_.receive();
        thread_ = std::thread([this] { serve(); });
    }
    void stop()
    {
        uint64_t one = 1;
        if (thread_.joinable()) {
            (void)!write(stop_, &one, sizeof(one));
            thread_.join();
        }
    }
    void hold(bool on)
    {
        std::lock_guard<std::mutex> lock(mutex_);
        holding_ = on;
        if (!on) {
            for (uint64_t address : held_)
                copy_page(address);
            held_.clear();
        }
    }
    size_t held_pages()
    {
        std::lock_guard<std::mutex> lock(mutex_);
        return held_.size();
    }
    uint64_t served() const
    {
        return served_;
    }
    const std::string &path() const
    {
        return listener_.path();
    }
    const Handshake &handshake() const
    {
        return handshake_;
    }

  private:
    void copy_page(uint64_t address)
    {
        for (const auto &region : handshake_.regions) {
            if (address < region.base_host_virt_addr ||
                address >= region.base_host_virt_addr + region.size)
                continue;
            struct uffdio_copy copy = {};
            copy.dst = address;
            copy.src = reinterpret_cast<uint64_t>(image_) + region.offset +
                       (address - region.base_host_virt_addr);
            copy.len = kPage;
            while (ioctl(handshake_.uffd, UFFDIO_COPY, &copy) < 0 && errno == EAGAIN)
                copy.copy = 0;
            served_++;
            return;
        }
        ADD_FAILURE() << "fault outside every region: 0x" << std::hex << address;
    }
    void serve()
    {
        struct pollfd fds[2] = {{handshake_.uffd, POLLIN, 0}, {stop_, POLLIN, 0}};
        for (;;) {
            if (poll(fds, 2, -1) < 0 && errno != EINTR)
                return;
            if (fds[1].revents)
                return;
            struct uffd_msg msg;
            while (read(handshake_.uffd, &msg, sizeof(msg)) == sizeof(msg)) {
                if (msg.event != UFFD_EVENT_PAGEFAULT)
                    continue;
                uint64_t address = msg.arg.pagefault.address & ~(kPage - 1);
                std::lock_guard<std::mutex> lock(mutex_);
                if (holding_)
                    held_.insert(address);
                else
                    copy_page(address);
            }
        }
    }

    HandshakeListener listener_;
    Handshake handshake_;
    uint8_t *image_ = nullptr;
    size_t size_ = 0;
    int stop_ = -1;
    std::thread thread_;
    std::mutex mutex_;
    bool holding_ = false;
    std::set<uint64_t> held_;
    std::atomic<uint64_t> served_{0};
};

// Receives the /uffd/wp handshake and handles WP faults by recording and unprotecting.
class WriteProtectHandler
{
  public:
    explicit WriteProtectHandler(Handshake handshake) : handshake_(std::move(handshake))
    {
        stop_ = eventfd(0, EFD_CLOEXEC);
    }
    ~WriteProtectHandler()
    {
        stop();
        close(stop_);
        close_uffd();
        if (handshake_.connection >= 0)
            close(handshake_.connection);
    }
    void protect_all(bool on)
    {
        for (const auto &region : handshake_.regions) {
            struct uffdio_writeprotect wp = {};
            wp.range.start = region.base_host_virt_addr;
            wp.range.len = region.size;
            wp.mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0;
            ASSERT_EQ(ioctl(handshake_.uffd, UFFDIO_WRITEPROTECT, &wp), 0) << std::strerror(errno);
        }
    }
    void start()
    {
        thread_ = std::thread([this] { handle(); });
    }
    void stop()
    {
        uint64_t one = 1;
        if (thread_.joinable()) {
            (void)!write(stop_, &one, sizeof(one));
            thread_.join();
        }
    }
    void close_uffd()
    {
        if (handshake_.uffd >= 0)
            close(handshake_.uffd);
        handshake_.uffd = -1;
    }
    uint64_t faults_in_region(size_t i) const
    {
        return i < 2 ? region_faults_[i].load() : 0;
    }
    uint64_t bad_flags() const
    {
        return bad_flags_;
    }

  private:
    void handle()
    {
        struct pollfd fds[2] = {{handshake_.uffd, POLLIN, 0}, {stop_, POLLIN, 0}};
        for (;;) {
            if (poll(fds, 2, -1) < 0 && errno != EINTR)
                return;
            if (fds[1].revents)
                return;
            struct uffd_msg msg;
            while (read(handshake_.uffd, &msg, sizeof(msg)) == sizeof(msg)) {
                if (msg.event != UFFD_EVENT_PAGEFAULT)
                    continue;
                if (msg.arg.pagefault.flags != (UFFD_PAGEFAULT_FLAG_WRITE | UFFD_PAGEFAULT_FLAG_WP))
                    bad_flags_++;
                uint64_t address = msg.arg.pagefault.address & ~(kPage - 1);
                for (size_t i = 0; i < handshake_.regions.size() && i < 2; i++) {
                    const auto &r = handshake_.regions[i];
                    if (address >= r.base_host_virt_addr &&
                        address < r.base_host_virt_addr + r.size)
                        region_faults_[i]++;
                }
                struct uffdio_writeprotect wp = {};
                wp.range.start = address;
                wp.range.len = kPage;
                wp.mode = 0; // unprotect and wake the writer
                while (ioctl(handshake_.uffd, UFFDIO_WRITEPROTECT, &wp) < 0 && errno == EAGAIN)
                    ;
            }
        }
    }

    Handshake handshake_;
    int stop_ = -1;
    std::thread thread_;
    std::atomic<uint64_t> region_faults_[2] = {};
    std::atomic<uint64_t> bad_flags_{0};
};

// A memfd holding a copy of memory.bin, handed to the VMM as /proc/<pid>/fd/<n>.
class MemfdCopy
{
  public:
    explicit MemfdCopy(const std::string &memory_path, off_t extra = 0)
    {
        fd_ = memfd_create("forkd-testvm-guest", MFD_CLOEXEC);
        int source = open(memory_path.c_str(), O_RDONLY | O_CLOEXEC);
        struct stat st;
        if (fd_ < 0 || source < 0 || fstat(source, &st) < 0)
            throw std::runtime_error("memfd setup failed");
        off_t offset = 0;
        while (offset < st.st_size)
            if (sendfile(fd_, source, &offset, static_cast<size_t>(st.st_size - offset)) <= 0)
                throw std::runtime_error("copying memory.bin into the memfd failed");
        close(source);
        if (ftruncate(fd_, st.st_size + extra) < 0)
            throw std::runtime_error("ftruncate failed");
        size_ = static_cast<size_t>(st.st_size + extra);
    }
    ~MemfdCopy()
    {
        close(fd_);
    }
    std::string proc_path() const
    {
        return "/proc/" + std::to_string(getpid()) + "/fd/" + std::to_string(fd_);
    }
    bool equals_file(const std::string &path) const
    {
        int other = open(path.c_str(), O_RDONLY | O_CLOEXEC);
        std::vector<char> a(1 << 20), b(1 << 20);
        bool same = other >= 0;
        for (off_t offset = 0; same && offset < static_cast<off_t>(size_); offset += 1 << 20) {
            ssize_t n = pread(fd_, a.data(), a.size(), offset);
            ssize_t m = pread(other, b.data(), b.size(), offset);
            same = n == m && n > 0 && std::memcmp(a.data(), b.data(), static_cast<size_t>(n)) == 0;
        }
        if (other >= 0)
            close(other);
        return same;
    }

  private:
    int fd_ = -1;
    size_t size_ = 0;
};

} // namespace

// ---- boot, pause, Full snapshot, verify ----

TEST_F(VmmTest, BootOneVcpuSnapshotIsConsistent)
{
    std::string snap = snapshot_path(dir_, "snap");
    TestVmm vmm(dir_.path());
    ASSERT_NO_FATAL_FAILURE(boot_run_snapshot(vmm, 1, "pattern=sequential seed=7", snap));
    EXPECT_EQ(vmm.state(), "Paused");
    expect_consistent(verify_dir(snap), 1);
}

TEST_F(VmmTest, BootTwoVcpusTwoRegionsSnapshotIsConsistent)
{
    std::string snap = snapshot_path(dir_, "snap");
    TestVmm vmm(dir_.path(), kTwoRegions);
    ASSERT_NO_FATAL_FAILURE(boot_run_snapshot(vmm, 2, "pattern=hotset seed=3", snap));
    Json info(vmm.api().request("GET", "/").body);
    EXPECT_EQ(cJSON_GetArraySize(info.get("regions")), 2);
    EXPECT_EQ(info.string("memory_backend"), "Anonymous");
    expect_consistent(verify_dir(snap), 2);
    // Resume and pause again: still consistent and further along.
    ASSERT_NO_FATAL_FAILURE(vmm.resume());
    auto first = verify_dir(snap);
    ASSERT_NO_FATAL_FAILURE(wait_beyond(vmm, first.totals, 1000));
    ASSERT_NO_FATAL_FAILURE(vmm.pause());
    std::string again = snapshot_path(dir_, "again");
    ASSERT_NO_FATAL_FAILURE(vmm.snapshot(again + "/vmstate", again + "/memory.bin"));
    auto second = verify_dir(again);
    expect_consistent(second, 2);
    expect_grew(first, second);
}

TEST_F(VmmTest, WorkingSetSmallerThanMemoryLeavesBootPattern)
{
    std::string snap = snapshot_path(dir_, "snap");
    TestVmm vmm(dir_.path());
    ASSERT_NO_FATAL_FAILURE(boot_run_snapshot(vmm, 2, "pages=300 pattern=random seed=11", snap));
    auto result = verify_dir(snap);
    expect_consistent(result, 2);
    EXPECT_NE(result.out.find("300 working-set pages"), std::string::npos) << result.out;
}

// skip=N moves the working set N pages further into memory: the guest writes there and nowhere
// before it (the verifier checks every page outside the working set holds boot contents).
TEST_F(VmmTest, SkippedPagesComeBeforeTheWorkingSet)
{
    std::string snap = snapshot_path(dir_, "snap");
    TestVmm vmm(dir_.path());
    ASSERT_NO_FATAL_FAILURE(
        boot_run_snapshot(vmm, 1, "pages=300 skip=5000 pattern=sequential seed=14", snap));
    auto result = verify_dir(snap);
    expect_consistent(result, 1);
    EXPECT_NE(result.out.find("300 working-set pages"), std::string::npos) << result.out;
    int fd = open((snap + "/memory.bin").c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    auto page_written = [fd](uint64_t page) {
        std::vector<uint64_t> words(512);
        EXPECT_EQ(4096, pread(fd, words.data(), 4096, (off_t)((1ULL << 20) + page * 4096)));
        return std::any_of(words.begin(), words.end(), [](uint64_t w) { return w != 0; });
    };
    EXPECT_FALSE(page_written(0)) << "the first page after the system area is skipped";
    EXPECT_FALSE(page_written(4999));
    EXPECT_TRUE(page_written(5000)) << "the working set starts after the skipped pages";
    close(fd);

    TestVmm too_far(snapshot_path(dir_, "far"));
    auto r =
        too_far.api().request("PUT", "/machine-config", R"({"vcpu_count":1,"mem_size_mib":4})");
    ASSERT_EQ(r.status, 204) << r.body;
    r = too_far.api().request("PUT", "/boot-source",
                              std::string("{\"kernel_image_path\":\"") + FORKD_GUEST_PATH +
                                  R"(","boot_args":"skip=768"})");
    ASSERT_EQ(r.status, 204) << r.body;
    r = too_far.api().request("PUT", "/actions", R"({"action_type":"InstanceStart"})");
    EXPECT_EQ(r.status, 400) << r.body;
    EXPECT_NE(fault_message(r).find("skip=768 leaves none"), std::string::npos) << r.body;
}

// ---- restore with each backend, run, snapshot again ----

class RestoreTest : public VmmTest
{
  protected:
    // Source VM: 2 vCPUs, two regions, random pattern; snapshot A in snap_a_.
    void make_source_snapshot()
    {
        snap_a_ = snapshot_path(dir_, "a");
        snap_b_ = snapshot_path(dir_, "b");
        TestVmm source(snapshot_path(dir_, "source"), kTwoRegions);
        ASSERT_NO_FATAL_FAILURE(boot_run_snapshot(source, 2, "pattern=random seed=5", snap_a_));
        before_ = verify_dir(snap_a_);
        expect_consistent(before_, 2);
    }
    void run_and_check(TestVmm &vmm, const std::string &backend_name)
    {
        Json info(vmm.api().request("GET", "/").body);
        EXPECT_EQ(info.string("memory_backend"), backend_name);
        EXPECT_EQ(info.string("state"), "Running");
        EXPECT_EQ(cJSON_GetArraySize(info.get("regions")), 2);
        ASSERT_NO_FATAL_FAILURE(wait_beyond(vmm, before_.totals, 2000));
        ASSERT_NO_FATAL_FAILURE(vmm.pause());
        ASSERT_NO_FATAL_FAILURE(vmm.snapshot(snap_b_ + "/vmstate", snap_b_ + "/memory.bin"));
        after_ = verify_dir(snap_b_);
        expect_consistent(after_, 2);
        expect_grew(before_, after_);
    }
    std::string snap_a_, snap_b_;
    VerifyResult before_, after_;
};

TEST_F(RestoreTest, FileBackendPrivate)
{
    ASSERT_NO_FATAL_FAILURE(make_source_snapshot());
    TestVmm vmm(snapshot_path(dir_, "restored"));
    auto r = vmm.api().request("PUT", "/snapshot/load",
                               load_body(snap_a_, "File", snap_a_ + "/memory.bin", false));
    ASSERT_EQ(r.status, 204) << r.body;
    ASSERT_NO_FATAL_FAILURE(run_and_check(vmm, "File"));
    // Private mapping: the guest's writes never reach the snapshot file it was loaded from.
    EXPECT_EQ(verify_dir(snap_a_).totals, before_.totals);
}

TEST_F(RestoreTest, FileBackendSharedMemfd)
{
    ASSERT_NO_FATAL_FAILURE(make_source_snapshot());
    MemfdCopy memfd(snap_a_ + "/memory.bin");
    TestVmm vmm(snapshot_path(dir_, "restored"));
    auto r = vmm.api().request("PUT", "/snapshot/load",
                               load_body(snap_a_, "File", memfd.proc_path(), true));
    ASSERT_EQ(r.status, 204) << r.body;
    ASSERT_NO_FATAL_FAILURE(run_and_check(vmm, "FileShared"));
    // Shared mapping: while paused, the memfd is exactly the guest memory just snapshotted.
    EXPECT_TRUE(memfd.equals_file(snap_b_ + "/memory.bin"));
}

TEST_F(RestoreTest, SharedMemfdOfWrongSizeIsRefused)
{
    ASSERT_NO_FATAL_FAILURE(make_source_snapshot());
    MemfdCopy memfd(snap_a_ + "/memory.bin", 4096);
    TestVmm vmm(snapshot_path(dir_, "restored"));
    auto r = vmm.api().request("PUT", "/snapshot/load",
                               load_body(snap_a_, "File", memfd.proc_path(), true));
    EXPECT_EQ(r.status, 400);
    EXPECT_NE(fault_message(r).find("bytes"), std::string::npos) << r.body;
    EXPECT_EQ(vmm.state(), "Not started");
}

TEST_F(RestoreTest, UffdBackendWithPageServer)
{
    ASSERT_NO_FATAL_FAILURE(make_source_snapshot());
    PageServer server(dir_.file("pages.sock"), snap_a_ + "/memory.bin");
    TestVmm vmm(snapshot_path(dir_, "restored"));
    auto r = vmm.api().request("PUT", "/snapshot/load",
                               load_body(snap_a_, "Uffd", server.path(), false));
    ASSERT_EQ(r.status, 204) << r.body;
    ASSERT_NO_FATAL_FAILURE(server.start());
    const Handshake &h = server.handshake();
    ASSERT_EQ(h.regions.size(), 2u) << h.message;
    EXPECT_EQ(h.message.front(), '[');
    EXPECT_EQ(h.regions[0].offset, 0u);
    EXPECT_EQ(h.regions[1].offset, h.regions[0].size);
    EXPECT_EQ(h.regions[0].page_size, kPage);
    EXPECT_NE(h.message.find("\"page_size_kib\":4096"), std::string::npos);
    ASSERT_NO_FATAL_FAILURE(run_and_check(vmm, "Uffd"));
    EXPECT_GT(server.served(), 0u);
}

TEST_F(RestoreTest, LoadWithoutResumeStaysPaused)
{
    ASSERT_NO_FATAL_FAILURE(make_source_snapshot());
    TestVmm vmm(snapshot_path(dir_, "restored"));
    auto r = vmm.api().request("PUT", "/snapshot/load",
                               load_body(snap_a_, "File", snap_a_ + "/memory.bin", false, false));
    ASSERT_EQ(r.status, 204) << r.body;
    EXPECT_EQ(vmm.state(), "Paused");
    // Snapshot straight away: identical totals, still consistent.
    ASSERT_NO_FATAL_FAILURE(vmm.snapshot(snap_b_ + "/vmstate", snap_b_ + "/memory.bin"));
    auto same = verify_dir(snap_b_);
    expect_consistent(same, 2);
    EXPECT_EQ(same.totals, before_.totals);
    ASSERT_NO_FATAL_FAILURE(vmm.resume());
    ASSERT_NO_FATAL_FAILURE(wait_beyond(vmm, before_.totals, 1000));
}

// A vCPU blocked in a userfaultfd fault (the page server holds the page) sits inside KVM_RUN
// and cannot park. Whether the kick signal interrupts the fault depends on the kernel's fault
// path: where it does, the pause completes with the vCPU at the faulting instruction; where it
// does not (this CI's nested hypervisor), PATCH Paused gives up after --pause-timeout-ms with
// a 400 naming the stuck vCPUs and undoes the pause, and the VM keeps running. Either way the
// API answers in bounded time and, once pages flow again, pause and snapshot are consistent.
TEST_F(RestoreTest, PauseWhileVcpuBlockedInUffdFault)
{
    ASSERT_NO_FATAL_FAILURE(make_source_snapshot());
    PageServer server(dir_.file("pages.sock"), snap_a_ + "/memory.bin");
    server.hold(true);
    TestVmm vmm(snapshot_path(dir_, "restored"), {"--pause-timeout-ms", "300"});
    auto r = vmm.api().request("PUT", "/snapshot/load",
                               load_body(snap_a_, "Uffd", server.path(), false));
    ASSERT_EQ(r.status, 204) << r.body;
    ASSERT_NO_FATAL_FAILURE(server.start());
    // With nothing served, each vCPU blocks on its first fault.
    auto deadline = Clock::now() + scaled(20s);
    while (server.held_pages() < 1 && Clock::now() < deadline)
        std::this_thread::sleep_for(1ms);
    ASSERT_GE(server.held_pages(), 1u);
    // The page stays held, so an answer at all proves the attempt is bounded (an unbounded pause
    // would wait for the fault forever); how soon it comes is not this test's business.
    r = vmm.api().request("PATCH", "/vm", R"({"state":"Paused"})");
    if (r.status == 204) {
        std::printf("pause interrupted the blocked fault (kernel fault path is interruptible)\n");
        EXPECT_EQ(vmm.state(), "Paused");
        server.hold(false);
        ASSERT_NO_FATAL_FAILURE(vmm.resume());
    } else {
        std::printf("pause gave up on the blocked vCPU: %s\n", fault_message(r).c_str());
        EXPECT_EQ(r.status, 400);
        EXPECT_NE(fault_message(r).find("did not stop"), std::string::npos) << r.body;
        EXPECT_EQ(vmm.state(), "Running");
        server.hold(false);
    }
    ASSERT_NO_FATAL_FAILURE(run_and_check(vmm, "Uffd"));
}

// ---- torn snapshots must fail verification ----

TEST_F(VmmTest, TornSnapshotFailsVerification)
{
    std::string early = snapshot_path(dir_, "early"), late = snapshot_path(dir_, "late");
    TestVmm vmm(dir_.path(), kTwoRegions);
    ASSERT_NO_FATAL_FAILURE(boot_run_snapshot(vmm, 2, "pattern=random seed=9", early));
    auto first = verify_dir(early);
    expect_consistent(first, 2);
    ASSERT_NO_FATAL_FAILURE(vmm.resume());
    ASSERT_NO_FATAL_FAILURE(wait_beyond(vmm, first.totals, 1000));
    ASSERT_NO_FATAL_FAILURE(vmm.pause());
    // VmstateOnly must not open mem_file_path: a path under /dev/null cannot be created.
    ASSERT_NO_FATAL_FAILURE(vmm.snapshot(late + "/vmstate", "/dev/null/never", "VmstateOnly"));
    struct stat st;
    EXPECT_NE(stat((late + "/memory.bin").c_str(), &st), 0);

    auto lagging = run_verify({"--vmstate", late + "/vmstate", "--mem", early + "/memory.bin"});
    EXPECT_EQ(lagging.exit_code, 1) << lagging.out;
    EXPECT_NE(lagging.err.find("lags"), std::string::npos) << lagging.err;

    ASSERT_NO_FATAL_FAILURE(vmm.snapshot(late + "/vmstate", late + "/memory.bin"));
    expect_consistent(verify_dir(late), 2);
    auto leading = run_verify({"--vmstate", early + "/vmstate", "--mem", late + "/memory.bin"});
    EXPECT_EQ(leading.exit_code, 1) << leading.out;
    EXPECT_NE(leading.err.find("inconsistent"), std::string::npos) << leading.err;
}

// The VMM writes guest memory while it saves (the device page, as Firecracker drains devices):
// memory that misses those writes fails, even with the guest stopped all along.
TEST_F(VmmTest, MemoryMissingTheWritesOfTheSaveFailsVerification)
{
    std::string first = snapshot_path(dir_, "first"), second = snapshot_path(dir_, "second");
    TestVmm vmm(dir_.path());
    ASSERT_NO_FATAL_FAILURE(boot_run_snapshot(vmm, 1, "pattern=random seed=5", first));
    expect_consistent(verify_dir(first), 1);
    // Still paused: the guest wrote nothing since, only the second save's device write differs.
    ASSERT_NO_FATAL_FAILURE(vmm.snapshot(second + "/vmstate", "/dev/null/never", "VmstateOnly"));
    auto missed = run_verify({"--vmstate", second + "/vmstate", "--mem", first + "/memory.bin"});
    EXPECT_EQ(missed.exit_code, 1) << missed.out;
    EXPECT_NE(missed.err.find("device page"), std::string::npos) << missed.err;
    ASSERT_NO_FATAL_FAILURE(vmm.snapshot(second + "/vmstate", second + "/memory.bin"));
    expect_consistent(verify_dir(second), 1);
}

// The word a filled boot writes at gpa (guest_boot_pattern in guest_layout.h, a C header).
static uint64_t boot_pattern(uint64_t gpa)
{
    return 0xF0CD000000000000ull | gpa;
}

// Overwrites the 8-byte word at offset in a file.
static void poke_word(const std::string &path, off_t offset, uint64_t value)
{
    int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(pwrite(fd, &value, sizeof(value), offset), (ssize_t)sizeof(value));
    close(fd);
}

// Boot memory is sparse by default (a page the guest never wrote reads as zeros): the verifier
// accepts zeros there and nothing else, not even the pattern of a filled boot.
TEST_F(VmmTest, SparseBootMemoryVerifiesAndOnlyZerosAreAcceptedUntouched)
{
    std::string snap = snapshot_path(dir_, "sparse");
    TestVmm vmm(dir_.path());
    ASSERT_NO_FATAL_FAILURE(boot_run_snapshot(vmm, 2, "pages=300 pattern=random seed=12", snap));
    expect_consistent(verify_dir(snap), 2);
    const off_t untouched = 32 << 20; // far beyond the 300-page working set
    ASSERT_NO_FATAL_FAILURE(poke_word(snap + "/memory.bin", untouched, boot_pattern(untouched)));
    auto result = verify_dir(snap);
    EXPECT_EQ(result.exit_code, 1) << result.out;
    EXPECT_NE(result.err.find("sparse memory"), std::string::npos) << result.err;
}

// --boot-memory fill keeps the filled boot: there a zeroed page is damage, not sparseness.
TEST_F(VmmTest, FilledBootMemoryRejectsAZeroedPage)
{
    std::string snap = snapshot_path(dir_, "filled");
    TestVmm vmm(dir_.path(), {"--boot-memory", "fill"});
    ASSERT_NO_FATAL_FAILURE(boot_run_snapshot(vmm, 1, "pages=300 pattern=random seed=13", snap));
    expect_consistent(verify_dir(snap), 1);
    ASSERT_NO_FATAL_FAILURE(poke_word(snap + "/memory.bin", 32 << 20, 0));
    auto result = verify_dir(snap);
    EXPECT_EQ(result.exit_code, 1) << result.out;
    EXPECT_NE(result.err.find("boot pattern"), std::string::npos) << result.err;
}

// ---- the balloon: pages handed back (discarded by the VMM) and taken back ----

// balloon=64 in a single-region 64 MiB guest: the table is one page, then the 64 pages, at the
// end of memory (guest_boot.c); memory.bin offsets equal guest-physical addresses.
static constexpr uint64_t kBalloonPages = 64;
static constexpr off_t kBalloonTable = (64 << 20) - (1 + kBalloonPages) * 4096;
static constexpr off_t kBalloonFirstPage = kBalloonTable + 4096;

// The VMM's count of balloon pages it discarded (GET / balloon_discards).
static uint64_t balloon_discards(TestVmm &vmm)
{
    Json info(vmm.api().request("GET", "/").body);
    return static_cast<uint64_t>(info.number("balloon_discards"));
}

static void wait_balloon_discards(TestVmm &vmm, uint64_t minimum)
{
    auto deadline = Clock::now() + scaled(60s);
    while (balloon_discards(vmm) < minimum && Clock::now() < deadline)
        std::this_thread::sleep_for(1ms);
    ASSERT_GE(balloon_discards(vmm), minimum) << "the guest's balloon did not cycle";
}

// The table entries in a file laid out as memory.bin.
static std::vector<uint64_t> balloon_table(int fd)
{
    std::vector<uint64_t> entries(kBalloonPages);
    EXPECT_EQ(pread(fd, entries.data(), entries.size() * 8, kBalloonTable),
              (ssize_t)(entries.size() * 8));
    return entries;
}

static std::vector<uint64_t> balloon_table(const std::string &memory_path)
{
    int fd = open(memory_path.c_str(), O_RDONLY | O_CLOEXEC);
    EXPECT_GE(fd, 0);
    std::vector<uint64_t> entries = balloon_table(fd);
    close(fd);
    return entries;
}

// The guest frees and takes back balloon pages while it counts: a snapshot verifies, a page in
// use that memory lost (zeros, as a discard leaves it) fails, a free page may hold anything.
static void check_balloon_snapshot(TestVmm &vmm, const std::string &snap,
                                   const std::function<void()> &while_paused = nullptr)
{
    ASSERT_NO_FATAL_FAILURE(wait_balloon_discards(vmm, 4 * kBalloonPages));
    ASSERT_NO_FATAL_FAILURE(vmm.pause());
    if (while_paused) {
        ASSERT_NO_FATAL_FAILURE(while_paused());
    }
    ASSERT_NO_FATAL_FAILURE(vmm.snapshot(snap + "/vmstate", snap + "/memory.bin"));
    auto result = verify_dir(snap);
    expect_consistent(result, 2);
    EXPECT_NE(result.out.find("balloon: "), std::string::npos) << result.out;
    std::vector<uint64_t> table = balloon_table(snap + "/memory.bin");
    int in_use = -1, free_page = -1;
    for (int i = 0; i < (int)table.size(); i++) {
        if ((table[i] & 1) && in_use < 0)
            in_use = i;
        if (!(table[i] & 1) && free_page < 0)
            free_page = i;
    }
    ASSERT_GE(in_use, 0) << "no balloon page in use at the snapshot";
    ASSERT_GE(free_page, 0) << "no balloon page free at the snapshot";
    ASSERT_NO_FATAL_FAILURE(
        poke_word(snap + "/memory.bin", kBalloonFirstPage + free_page * 4096, 0x5eed));
    expect_consistent(verify_dir(snap), 2);
    ASSERT_NO_FATAL_FAILURE(
        poke_word(snap + "/memory.bin", kBalloonFirstPage + in_use * 4096 + 8, 0));
    auto torn = verify_dir(snap);
    EXPECT_EQ(torn.exit_code, 1) << torn.out;
    EXPECT_NE(torn.err.find("torn"), std::string::npos) << torn.err;
}

TEST_F(VmmTest, BalloonOnAnonymousMemory)
{
    TestVmm vmm(dir_.path());
    ASSERT_NO_FATAL_FAILURE(vmm.boot(2, 64, "pages=300 pattern=random seed=31 balloon=64"));
    ASSERT_NO_FATAL_FAILURE(check_balloon_snapshot(vmm, snapshot_path(dir_, "snap")));
}

// Boots a 2-vCPU guest with balloon=64 on a 64 MiB memfd (mem_backend_path), as forkd does.
static void boot_balloon_on_memfd(TestVmm &vmm, int memfd)
{
    ASSERT_EQ(0, ftruncate(memfd, 64 << 20));
    std::string path = "/proc/" + std::to_string(getpid()) + "/fd/" + std::to_string(memfd);
    auto r = vmm.api().request("PUT", "/machine-config",
                               R"({"vcpu_count":2,"mem_size_mib":64,"mem_backend_path":")" + path +
                                   "\"}");
    ASSERT_EQ(r.status, 204) << r.body;
    r = vmm.api().request("PUT", "/boot-source",
                          std::string("{\"kernel_image_path\":\"") + FORKD_GUEST_PATH +
                              R"(","boot_args":"pages=300 seed=32 balloon=64"})");
    ASSERT_EQ(r.status, 204) << r.body;
    r = vmm.api().request("PUT", "/actions", R"({"action_type":"InstanceStart"})");
    ASSERT_EQ(r.status, 204) << r.body;
}

// Of the balloon pages the guest freed (FREE after having been in use), how many are holes in
// the memfd.
static void count_freed_holes(int memfd, uint64_t *freed, uint64_t *holes)
{
    std::vector<uint64_t> table = balloon_table(memfd);
    *freed = *holes = 0;
    for (uint64_t i = 0; i < kBalloonPages; i++) {
        if (table[i] == 0 || (table[i] & 1))
            continue; // never taken, or in use
        off_t page = kBalloonFirstPage + (off_t)i * 4096;
        (*freed)++;
        *holes += lseek(memfd, page, SEEK_HOLE) == page;
    }
}

TEST_F(VmmTest, BalloonOnASharedMemfdPunchesHoles)
{
    int memfd = memfd_create("forkd-testvm-balloon", MFD_CLOEXEC);
    ASSERT_GE(memfd, 0);
    TestVmm vmm(dir_.path());
    ASSERT_NO_FATAL_FAILURE(boot_balloon_on_memfd(vmm, memfd));
    // Paused, before the save reads them back in: the freed balloon pages are holes in the
    // memfd (MADV_REMOVE), not just unmapped; all but those a vCPU marked FREE right before
    // its discard (one each at most).
    auto holes_in_memfd = [memfd] {
        uint64_t freed, holes;
        count_freed_holes(memfd, &freed, &holes);
        EXPECT_GT(holes, 0u);
        EXPECT_LE(freed - holes, 2u);
    };
    ASSERT_NO_FATAL_FAILURE(
        check_balloon_snapshot(vmm, snapshot_path(dir_, "snap"), holes_in_memfd));
    close(memfd);
}

// --balloon-discard firecracker: MADV_DONTNEED over the memfd drops only the VMM's mapping of
// a freed page; the page stays in the file, and the snapshot still verifies.
TEST_F(VmmTest, BalloonLikeFirecrackerKeepsFreedPagesInTheMemfd)
{
    int memfd = memfd_create("forkd-testvm-balloon", MFD_CLOEXEC);
    ASSERT_GE(memfd, 0);
    TestVmm vmm(dir_.path(), {"--balloon-discard", "firecracker"});
    ASSERT_NO_FATAL_FAILURE(boot_balloon_on_memfd(vmm, memfd));
    auto no_holes = [memfd] {
        uint64_t freed, holes;
        count_freed_holes(memfd, &freed, &holes);
        EXPECT_GT(freed, 0u);
        EXPECT_EQ(holes, 0u);
    };
    ASSERT_NO_FATAL_FAILURE(check_balloon_snapshot(vmm, snapshot_path(dir_, "snap"), no_holes));
    close(memfd);
}

// A bad --balloon-discard stops the VMM at once, naming the choices.
TEST(VmmOptions, BadBalloonDiscardIsRefused)
{
    std::string command = std::string(FORKD_TESTVM_PATH) +
                          " --api-sock /nonexistent/api.sock --balloon-discard sideways 2>&1";
    FILE *pipe = popen(command.c_str(), "r");
    ASSERT_NE(nullptr, pipe);
    std::string output;
    char buffer[256];
    while (fgets(buffer, sizeof(buffer), pipe))
        output += buffer;
    int status = pclose(pipe);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 2) << status;
    EXPECT_NE(output.find("precise or firecracker, not 'sideways'"), std::string::npos) << output;
}

TEST_F(VmmTest, BalloonArgumentsAreChecked)
{
    TestVmm vmm(dir_.path());
    auto r = vmm.api().request("PUT", "/boot-source",
                               std::string("{\"kernel_image_path\":\"") + FORKD_GUEST_PATH +
                                   R"(","boot_args":"balloon=65537"})");
    EXPECT_EQ(r.status, 400) << r.body;
    r = vmm.api().request("PUT", "/machine-config", R"({"vcpu_count":1,"mem_size_mib":4})");
    ASSERT_EQ(r.status, 204) << r.body;
    r = vmm.api().request("PUT", "/boot-source",
                          std::string("{\"kernel_image_path\":\"") + FORKD_GUEST_PATH +
                              R"(","boot_args":"balloon=2000"})");
    ASSERT_EQ(r.status, 204) << r.body;
    r = vmm.api().request("PUT", "/actions", R"({"action_type":"InstanceStart"})");
    EXPECT_EQ(r.status, 400) << r.body;
    EXPECT_NE(fault_message(r).find("balloon"), std::string::npos) << r.body;
}

TEST_F(VmmTest, VerifierRejectsDamagedFiles)
{
    std::string snap = snapshot_path(dir_, "snap");
    TestVmm vmm(dir_.path());
    ASSERT_NO_FATAL_FAILURE(boot_run_snapshot(vmm, 1, "pages=64 pattern=random", snap));
    // One flipped byte in an untouched page.
    int fd = open((snap + "/memory.bin").c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    char byte = 0;
    off_t where = 32 << 20;
    ASSERT_EQ(pread(fd, &byte, 1, where), 1);
    byte ^= 0x40;
    ASSERT_EQ(pwrite(fd, &byte, 1, where), 1);
    close(fd);
    auto damaged = verify_dir(snap);
    EXPECT_EQ(damaged.exit_code, 1);
    EXPECT_NE(damaged.err.find("boot pattern"), std::string::npos) << damaged.err;
    // A truncated vmstate is not a vmstate.
    ASSERT_EQ(truncate((snap + "/vmstate").c_str(), 100), 0);
    EXPECT_NE(verify_dir(snap).exit_code, 0);
}

// ---- PUT /uffd/wp ----

class WriteProtectTest : public VmmTest
{
  protected:
    // Arms WP over every region, waits for guest writes to fault in both, then disarms.
    void exercise_write_protect(TestVmm &vmm)
    {
        HandshakeListener listener(dir_.file("wp.sock"));
        auto r = vmm.api().request("PUT", "/uffd/wp", "{\"socket\":\"" + listener.path() + "\"}");
        ASSERT_EQ(r.status, 204) << r.body;
        WriteProtectHandler handler(listener.receive());
        ASSERT_NO_FATAL_FAILURE(handler.protect_all(true));
        handler.start();
        auto deadline = Clock::now() + scaled(30s);
        while ((handler.faults_in_region(0) == 0 || handler.faults_in_region(1) == 0) &&
               Clock::now() < deadline)
            std::this_thread::sleep_for(1ms);
        EXPECT_GT(handler.faults_in_region(0), 0u);
        EXPECT_GT(handler.faults_in_region(1), 0u);
        EXPECT_EQ(handler.bad_flags(), 0u) << "a WP fault without flags WRITE|WP";
        ASSERT_NO_FATAL_FAILURE(handler.protect_all(false));
        handler.stop();
        handler.close_uffd();
        // The guest continues without a handler once unprotected and the uffd is gone.
        auto now = vmm.progress();
        ASSERT_NO_FATAL_FAILURE(
            vmm.wait_progress(*std::max_element(now.begin(), now.end()) + 2000));
        std::string snap = snapshot_path(dir_, "after-wp");
        ASSERT_NO_FATAL_FAILURE(vmm.pause());
        ASSERT_NO_FATAL_FAILURE(vmm.snapshot(snap + "/vmstate", snap + "/memory.bin"));
        expect_consistent(verify_dir(snap), 2);
    }
};

TEST_F(WriteProtectTest, AnonymousMemoryTwoRegions)
{
    TestVmm vmm(dir_.path(), kTwoRegions);
    ASSERT_NO_FATAL_FAILURE(vmm.boot(2, 64, "pattern=random seed=21"));
    ASSERT_NO_FATAL_FAILURE(vmm.wait_progress(2000));
    ASSERT_NO_FATAL_FAILURE(exercise_write_protect(vmm));
}

TEST_F(WriteProtectTest, SharedMemfdAfterRestore)
{
    std::string snap = snapshot_path(dir_, "snap");
    {
        TestVmm source(snapshot_path(dir_, "source"), kTwoRegions);
        ASSERT_NO_FATAL_FAILURE(boot_run_snapshot(source, 2, "pattern=random seed=4", snap));
    }
    MemfdCopy memfd(snap + "/memory.bin");
    TestVmm vmm(snapshot_path(dir_, "restored"));
    auto r = vmm.api().request("PUT", "/snapshot/load",
                               load_body(snap, "File", memfd.proc_path(), true));
    ASSERT_EQ(r.status, 204) << r.body;
    ASSERT_NO_FATAL_FAILURE(exercise_write_protect(vmm));
}

// The write-protect uffd asks for EVENT_REMOVE: its receiver hears of each balloon discard
// (which waits until the event is read) within the balloon's pages.
TEST_F(WriteProtectTest, BalloonDiscardsAreReportedAsRemoveEvents)
{
    TestVmm vmm(dir_.path());
    ASSERT_NO_FATAL_FAILURE(vmm.boot(1, 64, "pages=300 balloon=64"));
    HandshakeListener listener(dir_.file("wp.sock"));
    auto r = vmm.api().request("PUT", "/uffd/wp", "{\"socket\":\"" + listener.path() + "\"}");
    ASSERT_EQ(r.status, 204) << r.body;
    Handshake handshake = listener.receive();
    uint64_t base = handshake.regions.at(0).base_host_virt_addr;
    uint64_t removes = 0, outside = 0;
    auto deadline = Clock::now() + scaled(30s);
    while (removes < 8 && Clock::now() < deadline) {
        struct pollfd pfd = {handshake.uffd, POLLIN, 0};
        if (poll(&pfd, 1, 100) <= 0)
            continue;
        struct uffd_msg msg;
        if (read(handshake.uffd, &msg, sizeof(msg)) != (ssize_t)sizeof(msg))
            continue;
        if (msg.event != UFFD_EVENT_REMOVE)
            continue;
        removes++;
        if (msg.arg.remove.start < base + kBalloonFirstPage ||
            msg.arg.remove.end > base + kBalloonFirstPage + kBalloonPages * 4096 ||
            msg.arg.remove.end - msg.arg.remove.start != 4096)
            outside++;
    }
    EXPECT_GE(removes, 8u);
    EXPECT_EQ(outside, 0u);
    close(handshake.uffd);
    close(handshake.connection);
    ASSERT_NO_FATAL_FAILURE(wait_balloon_discards(vmm, balloon_discards(vmm) + 8));
}

TEST_F(WriteProtectTest, RefusedForPrivateFileMemory)
{
    std::string snap = snapshot_path(dir_, "snap");
    {
        TestVmm source(snapshot_path(dir_, "source"));
        ASSERT_NO_FATAL_FAILURE(boot_run_snapshot(source, 1, "pages=64", snap));
    }
    TestVmm vmm(snapshot_path(dir_, "restored"));
    auto r = vmm.api().request("PUT", "/snapshot/load",
                               load_body(snap, "File", snap + "/memory.bin", false));
    ASSERT_EQ(r.status, 204) << r.body;
    HandshakeListener listener(dir_.file("wp.sock"));
    r = vmm.api().request("PUT", "/uffd/wp", "{\"socket\":\"" + listener.path() + "\"}");
    EXPECT_EQ(r.status, 400);
    EXPECT_NE(fault_message(r).find("private file"), std::string::npos) << r.body;
    EXPECT_EQ(vmm.state(), "Running");
}

TEST_F(WriteProtectTest, SecondRegistrationWhileFirstIsOpenIsRefused)
{
    TestVmm vmm(dir_.path());
    ASSERT_NO_FATAL_FAILURE(vmm.boot(1, 32, "pages=64"));
    HandshakeListener listener(dir_.file("wp.sock"));
    auto r = vmm.api().request("PUT", "/uffd/wp", "{\"socket\":\"" + listener.path() + "\"}");
    ASSERT_EQ(r.status, 204) << r.body;
    Handshake first = listener.receive();
    r = vmm.api().request("PUT", "/uffd/wp", "{\"socket\":\"" + listener.path() + "\"}");
    EXPECT_EQ(r.status, 400) << r.body;
    close(first.uffd); // dropping the only reference releases the registration
    r = vmm.api().request("PUT", "/uffd/wp", "{\"socket\":\"" + listener.path() + "\"}");
    EXPECT_EQ(r.status, 204) << r.body;
    Handshake second = listener.receive();
    close(second.uffd);
    close(first.connection);
    close(second.connection);
}
