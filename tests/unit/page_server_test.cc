// The page server against this process's own memory: the test plays the VMM (a userfaultfd
// with EVENT_REMOVE, regions registered MISSING, Firecracker's handshake), so faults, REMOVE
// events, huge pages, prefetch and handshake abuse are checked without KVM.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <future>
#include <mutex>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <string>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <vector>

extern "C" {
#include "forkd/page_server.h"
#include "uffd.h"
}

namespace
{

constexpr uint64_t kPage = 4096;
constexpr uint64_t kHuge = 2ULL << 20;
constexpr uint64_t kTemplateBytes = 8ULL << 20;

// The template's word at a file offset: never zero, distinct per offset.
uint64_t Pattern(uint64_t offset)
{
    return 0x5a5a000000000000ULL | (offset + 1);
}

bool PageMatches(const uint8_t *page, uint64_t file_offset, uint64_t length)
{
    const uint64_t *words = reinterpret_cast<const uint64_t *>(page);
    for (uint64_t i = 0; i < length / 8; i++)
        if (words[i] != Pattern(file_offset + 8 * i))
            return false;
    return true;
}

bool PageIsZero(const uint8_t *page, uint64_t length)
{
    for (uint64_t i = 0; i < length; i++)
        if (page[i])
            return false;
    return true;
}

// Userfaultfds open in this process (ours and the server's copies).
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

// Waits for cond with a bounded deadline.
template <typename Cond> bool WaitFor(Cond cond, int timeout_ms = 5000)
{
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (!cond()) {
        if (std::chrono::steady_clock::now() > deadline)
            return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return true;
}

std::string FormatMappings(const struct uffd_region *regions, size_t count)
{
    char *json = uffd_format_mappings(regions, count);
    std::string copy = json ? json : "";
    free(json);
    return copy;
}

int ConnectTo(const std::string &path)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un address = {};
    address.sun_family = AF_UNIX;
    snprintf(address.sun_path, sizeof(address.sun_path), "%s", path.c_str());
    if (fd >= 0 &&
        connect(fd, reinterpret_cast<struct sockaddr *>(&address), sizeof(address)) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

// Sends bytes with the given fds attached (any number, including none).
bool SendRaw(int socket_fd, const std::string &bytes, const std::vector<int> &fds)
{
    std::vector<char> control(CMSG_SPACE(sizeof(int) * (fds.empty() ? 1 : fds.size())));
    struct iovec iov = {const_cast<char *>(bytes.data()), bytes.size()};
    struct msghdr msg = {};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (!fds.empty()) {
        msg.msg_control = control.data();
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
        memcpy(CMSG_DATA(cmsg), fds.data(), sizeof(int) * fds.size());
    }
    return sendmsg(socket_fd, &msg, MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size());
}

// This process as a VMM: guest regions of anonymous memory registered MISSING on a
// userfaultfd with EVENT_REMOVE, as Firecracker sets them up for a Uffd restore.
class FakeVmm
{
  public:
    // sizes: region sizes, laid out back to back in memory.bin; page_size per region.
    FakeVmm(const std::vector<uint64_t> &sizes, uint64_t page_size)
    {
        uffd_ = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
        EXPECT_GE(uffd_, 0) << "userfaultfd: " << strerror(errno);
        struct uffdio_api api = {};
        api.api = UFFD_API;
        api.features = UFFD_FEATURE_EVENT_REMOVE;
        EXPECT_EQ(0, ioctl(uffd_, UFFDIO_API, &api)) << strerror(errno);
        uint64_t offset = 0;
        for (uint64_t size : sizes) {
            uint8_t *base = MapAligned(size, page_size);
            struct uffdio_register reg = {};
            reg.range.start = reinterpret_cast<uint64_t>(base);
            reg.range.len = size;
            reg.mode = UFFDIO_REGISTER_MODE_MISSING;
            EXPECT_EQ(0, ioctl(uffd_, UFFDIO_REGISTER, &reg)) << strerror(errno);
            regions_.push_back({reinterpret_cast<uint64_t>(base), size, offset, page_size});
            offset += size;
        }
    }
    ~FakeVmm()
    {
        Hangup();
        if (uffd_ >= 0)
            close(uffd_);
        for (const auto &r : regions_)
            munmap(reinterpret_cast<void *>(r.host_base), r.size);
    }
    bool Connect(const std::string &path)
    {
        socket_ = ConnectTo(path);
        struct forkd_error err = {};
        return socket_ >= 0 &&
               uffd_send_handshake(socket_, uffd_, regions_.data(), regions_.size(), &err) == 0;
    }
    void Hangup()
    {
        if (socket_ >= 0)
            close(socket_);
        socket_ = -1;
    }
    uint8_t *Region(size_t i) const
    {
        return reinterpret_cast<uint8_t *>(regions_[i].host_base);
    }
    int uffd() const
    {
        return uffd_;
    }
    std::vector<struct uffd_region> regions_;

  private:
    static uint8_t *MapAligned(uint64_t size, uint64_t alignment)
    {
        void *raw = mmap(nullptr, size + alignment, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        EXPECT_NE(MAP_FAILED, raw);
        uint64_t start = (reinterpret_cast<uint64_t>(raw) + alignment - 1) & ~(alignment - 1);
        uint64_t end = reinterpret_cast<uint64_t>(raw) + size + alignment;
        if (start > reinterpret_cast<uint64_t>(raw))
            munmap(raw, start - reinterpret_cast<uint64_t>(raw));
        if (end > start + size)
            munmap(reinterpret_cast<void *>(start + size), end - start - size);
        return reinterpret_cast<uint8_t *>(start);
    }
    int uffd_ = -1;
    int socket_ = -1;
};

class PageServerTest : public ::testing::Test
{
  protected:
    void SetUp() override
    {
        char dir[] = "/tmp/forkd-ps-XXXXXX";
        ASSERT_NE(nullptr, mkdtemp(dir));
        dir_ = dir;
        memory_path_ = dir_ + "/memory.bin";
        std::vector<uint64_t> words(kTemplateBytes / 8);
        for (uint64_t i = 0; i < words.size(); i++)
            words[i] = Pattern(8 * i);
        int fd = open(memory_path_.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
        ASSERT_GE(fd, 0);
        ASSERT_EQ(static_cast<ssize_t>(kTemplateBytes), write(fd, words.data(), kTemplateBytes));
        close(fd);
        struct page_server_config config = {};
        config.handshake_timeout_ms = 500;
        struct forkd_error err = {};
        ASSERT_EQ(0, page_server_open(&config, &server_, &err)) << err.message;
    }
    void TearDown() override
    {
        page_server_close(server_);
        std::string command = "rm -rf '" + dir_ + "'";
        if (system(command.c_str()) != 0)
            ADD_FAILURE() << "could not remove " << dir_;
    }

    // Prepares a fork on a fresh socket; the caller makes a peer connect, then waits.
    struct page_server_fork *Prepare(const std::string &socket_name, pid_t pid = 0)
    {
        std::string path = dir_ + "/" + socket_name;
        struct page_server_fork_config config = {};
        config.template_name = "tmpl";
        config.memory_path = memory_path_.c_str();
        config.socket_path = path.c_str();
        config.vmm_pid = pid;
        config.label = socket_name.c_str();
        struct page_server_fork *fork = nullptr;
        struct forkd_error err = {};
        EXPECT_EQ(0, page_server_fork_prepare(server_, &config, &fork, &err)) << err.message;
        return fork;
    }

    // A fork served for vmm (connected, handshake received).
    struct page_server_fork *Attach(FakeVmm &vmm, const std::string &socket_name)
    {
        struct page_server_fork *fork = Prepare(socket_name, getpid());
        if (!fork)
            return nullptr;
        EXPECT_TRUE(vmm.Connect(dir_ + "/" + socket_name));
        struct forkd_error err = {};
        EXPECT_EQ(0, page_server_fork_wait_ready(fork, 5000, &err)) << err.message;
        return fork;
    }

    // Reads the page from another thread, so that a server that never answers fails the test
    // instead of hanging it: the range is then unregistered, which wakes the reader.
    static bool Touch(FakeVmm &vmm, const uint8_t *address)
    {
        auto reader = std::async(std::launch::async, [address] {
            return *reinterpret_cast<const volatile uint8_t *>(address);
        });
        if (reader.wait_for(std::chrono::seconds(5)) == std::future_status::ready)
            return true;
        for (const auto &r : vmm.regions_) {
            struct uffdio_range range = {r.host_base, r.size};
            ioctl(vmm.uffd(), UFFDIO_UNREGISTER, &range);
        }
        return false;
    }

    static struct page_server_stats Stats(struct page_server_fork *fork)
    {
        struct page_server_stats stats;
        page_server_fork_stats(fork, &stats);
        return stats;
    }

    // The faulting thread wakes as soon as its page is in, a moment before the loop counts
    // the fault: wait (bounded) for the count, then read the figures that came with it.
    static struct page_server_stats Settled(struct page_server_fork *fork, uint64_t faults)
    {
        EXPECT_TRUE(WaitFor([&] { return Stats(fork).faults_served >= faults; }))
            << "faults counted: " << Stats(fork).faults_served << ", expected " << faults;
        return Stats(fork);
    }

    std::string dir_, memory_path_;
    struct page_server *server_ = nullptr;
};

TEST_F(PageServerTest, ServesEveryRegionFromItsFileOffset)
{
    FakeVmm vmm({1 << 20, 2 << 20}, kPage);
    struct page_server_fork *fork = Attach(vmm, "a.sock");
    ASSERT_NE(nullptr, fork);
    EXPECT_EQ(getpid(), page_server_fork_peer_pid(fork));
    EXPECT_EQ(3u << 20, page_server_fork_memory_bytes(fork));
    for (size_t r = 0; r < 2; r++)
        for (uint64_t at = 0; at < vmm.regions_[r].size; at += kPage) {
            ASSERT_TRUE(Touch(vmm, vmm.Region(r) + at));
            ASSERT_TRUE(PageMatches(vmm.Region(r) + at, vmm.regions_[r].file_offset + at, kPage))
                << "region " << r << " offset " << at;
        }
    struct page_server_stats stats = Settled(fork, 768);
    EXPECT_EQ(768u, stats.faults_served);
    EXPECT_EQ(3u << 20, stats.bytes_copied);
    EXPECT_EQ(0u, stats.zero_pages);
    EXPECT_EQ(1u, stats.forks_active);
    EXPECT_GT(stats.service_p50_ns, 0u);
    EXPECT_LE(stats.service_p50_ns, stats.service_p99_ns);
    EXPECT_LE(stats.service_p99_ns, stats.service_max_ns);

    struct page_server_template_info info = {};
    ASSERT_EQ(0, page_server_template_describe(server_, "tmpl", &info));
    EXPECT_EQ(1u, info.times_mapped);
    EXPECT_EQ(kTemplateBytes, info.memory_bytes);
    EXPECT_EQ(768u, info.stats.faults_served);
    EXPECT_EQ(1u, info.stats.forks_active);
    EXPECT_EQ(-ENOENT, page_server_template_describe(server_, "other", &info));
    page_server_fork_release(fork);
}

TEST_F(PageServerTest, RemovedRangesAreZeroFilledAfterwards)
{
    FakeVmm vmm({1 << 20}, kPage);
    struct page_server_fork *fork = Attach(vmm, "rm.sock");
    ASSERT_NE(nullptr, fork);
    uint8_t *base = vmm.Region(0);
    for (uint64_t at = 0; at < (1 << 20); at += kPage)
        ASSERT_TRUE(Touch(vmm, base + at));
    // Discard pages [64, 80): their template contents are gone for good.
    ASSERT_EQ(0, madvise(base + 64 * kPage, 16 * kPage, MADV_DONTNEED)) << strerror(errno);
    for (uint64_t page = 60; page < 84; page++) {
        ASSERT_TRUE(Touch(vmm, base + page * kPage));
        if (page >= 64 && page < 80)
            EXPECT_TRUE(PageIsZero(base + page * kPage, kPage)) << "page " << page;
        else
            EXPECT_TRUE(PageMatches(base + page * kPage, page * kPage, kPage)) << "page " << page;
    }
    struct page_server_stats stats = Settled(fork, 256 + 16);
    EXPECT_EQ(1u, stats.remove_events);
    EXPECT_EQ(16u, stats.zero_pages);
    EXPECT_EQ(256u + 16u, stats.faults_served);
    // A page written after its zero fill keeps the data (it is present, no fault).
    base[70 * kPage] = 7;
    EXPECT_EQ(7, base[70 * kPage]);
    page_server_fork_release(fork);
}

TEST_F(PageServerTest, HugePageMappingsAreServedWholePages)
{
    FakeVmm vmm({4 << 20}, kHuge);
    struct page_server_fork *fork = Attach(vmm, "huge.sock");
    ASSERT_NE(nullptr, fork);
    uint8_t *base = vmm.Region(0);
    ASSERT_TRUE(Touch(vmm, base + kHuge + 12345));
    EXPECT_TRUE(PageMatches(base + kHuge, kHuge, kHuge));
    struct page_server_stats stats = Settled(fork, 1);
    EXPECT_EQ(1u, stats.faults_served) << "one fault fills the whole 2 MiB page";
    EXPECT_EQ(kHuge, stats.bytes_copied);

    ASSERT_EQ(0, madvise(base + kHuge, kHuge, MADV_DONTNEED));
    ASSERT_TRUE(Touch(vmm, base + kHuge + 99));
    EXPECT_TRUE(PageIsZero(base + kHuge, kHuge));
    ASSERT_TRUE(Touch(vmm, base + 5));
    EXPECT_TRUE(PageMatches(base, 0, kHuge));
    stats = Settled(fork, 3);
    EXPECT_EQ(1u, stats.zero_pages);
    EXPECT_EQ(3u, stats.faults_served);
    page_server_fork_release(fork);
}

TEST_F(PageServerTest, ConcurrentFaultsOnTheSamePagesAllSeeTheTemplate)
{
    FakeVmm vmm({1 << 20}, kPage);
    struct page_server_fork *fork = Attach(vmm, "many.sock");
    ASSERT_NE(nullptr, fork);
    const uint8_t *base = vmm.Region(0);
    std::atomic<int> wrong{0};
    std::vector<std::thread> readers;
    for (int t = 0; t < 8; t++)
        readers.emplace_back([&, t] {
            for (uint64_t i = 0; i < 256; i++) {
                uint64_t page = (t % 2) ? 255 - i : (i * 7 + t) % 256;
                if (!PageMatches(base + page * kPage, page * kPage, kPage))
                    wrong++;
            }
        });
    for (auto &reader : readers)
        reader.join();
    EXPECT_EQ(0, wrong.load());
    struct page_server_stats stats;
    EXPECT_TRUE(WaitFor([&] {
        stats = Stats(fork);
        return stats.faults_served - stats.already_present >= 256;
    }));
    EXPECT_GE(stats.faults_served, 256u);
    EXPECT_EQ(256u * kPage, stats.bytes_copied) << "each page copied once; repeats only woken";
    EXPECT_EQ(stats.faults_served - 256u, stats.already_present);
    page_server_fork_release(fork);
}

// Faults racing REMOVE events: the kernel refuses ioctls with EAGAIN while a REMOVE is being
// applied; those faults are retried later and every read still sees the template or zeros.
TEST_F(PageServerTest, FaultsRacingRemoveEventsAreRetriedAndStayCorrect)
{
    FakeVmm vmm({1 << 20}, kPage);
    struct page_server_fork *fork = Attach(vmm, "race.sock");
    ASSERT_NE(nullptr, fork);
    uint8_t *base = vmm.Region(0);
    std::atomic<bool> stop{false};
    std::atomic<int> torn{0};
    std::vector<std::thread> readers;
    for (int t = 0; t < 2; t++)
        readers.emplace_back([&, t] {
            while (!stop)
                for (uint64_t page = t; page < 256 && !stop; page += 2) {
                    const uint8_t *p = base + page * kPage;
                    // A page may turn from the template's to zeros at any moment (a discard),
                    // never back: so it is good if it matched, or else is zeros when read
                    // after. The fence keeps the compiler from moving the second read before
                    // the first (clang did: the zero check read a page before the match did,
                    // so a page that turned to zeros in between failed both).
                    bool matched = PageMatches(p, page * kPage, kPage);
                    std::atomic_signal_fence(std::memory_order_seq_cst);
                    if (!matched && !PageIsZero(p, kPage))
                        torn++;
                }
        });
    // Discard 16 pages at a time while the readers fault, pacing the discards on the
    // readers' progress so that both go on (bounded: 5 s).
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    for (int round = 0; std::chrono::steady_clock::now() < deadline; round++) {
        ASSERT_EQ(0, madvise(base + (round % 16) * 16 * kPage, 16 * kPage, MADV_DONTNEED));
        uint64_t before = Stats(fork).faults_served;
        WaitFor([&] { return Stats(fork).faults_served >= before + 4; }, 1000);
        struct page_server_stats now = Stats(fork);
        if (round >= 100 && now.retries > 0)
            break;
    }
    stop = true;
    for (auto &reader : readers)
        reader.join();
    struct page_server_stats stats = Stats(fork);
    printf("REMOVE race: %llu REMOVE events, %llu faults, %llu zero pages, %llu EAGAIN retries\n",
           (unsigned long long)stats.remove_events, (unsigned long long)stats.faults_served,
           (unsigned long long)stats.zero_pages, (unsigned long long)stats.retries);
    EXPECT_EQ(0, torn.load()) << "a page is the template's or zeros, nothing else";
    EXPECT_TRUE(page_server_fork_active(fork)) << "retries do not drop the fork";
    EXPECT_GT(stats.zero_pages, 0u);
    EXPECT_GE(stats.faults_served, 256u + 100u * 4u);
    EXPECT_GT(stats.retries, 0u) << "some faults met a REMOVE in flight (EAGAIN)";
    page_server_fork_release(fork);
}

TEST_F(PageServerTest, PeerHangupDropsTheForkAndClosesItsFd)
{
    FakeVmm keep({1 << 20}, kPage), leave({1 << 20}, kPage);
    struct page_server_fork *kept = Attach(keep, "keep.sock");
    struct page_server_fork *left = Attach(leave, "leave.sock");
    ASSERT_NE(nullptr, kept);
    ASSERT_NE(nullptr, left);
    ASSERT_TRUE(Touch(leave, leave.Region(0)));
    EXPECT_EQ(2u, page_server_active_forks(server_));
    int fds = CountUserfaultfds();
    leave.Hangup();
    ASSERT_TRUE(WaitFor([&] { return page_server_active_forks(server_) == 1; }));
    EXPECT_FALSE(page_server_fork_active(left));
    char reason[128];
    page_server_fork_drop_reason(left, reason, sizeof(reason));
    EXPECT_STREQ("peer hung up", reason);
    EXPECT_EQ(fds - 1, CountUserfaultfds()) << "the server's copy of the uffd is closed";
    EXPECT_EQ(1u, Settled(left, 1).faults_served) << "figures stay readable after the drop";
    ASSERT_TRUE(Touch(keep, keep.Region(0) + 5 * kPage));
    EXPECT_TRUE(PageMatches(keep.Region(0) + 5 * kPage, 5 * kPage, kPage));
    struct page_server_template_info info = {};
    ASSERT_EQ(0, page_server_template_describe(server_, "tmpl", &info));
    EXPECT_EQ(1u, info.stats.forks_active);
    EXPECT_EQ(2u, info.stats.forks_total);
    page_server_fork_release(left);
    page_server_fork_release(kept);
    ASSERT_TRUE(WaitFor([&] { return page_server_active_forks(server_) == 0; }));
}

struct Abuse {
    const char *name;
    int expected;
    const char *message_part;
};

TEST_F(PageServerTest, HandshakeAbuseFailsClearlyAndOthersKeepBeingServed)
{
    FakeVmm good({1 << 20}, kPage);
    struct page_server_fork *served = Attach(good, "good.sock");
    ASSERT_NE(nullptr, served);
    FakeVmm spare({1 << 20}, kPage); // a real uffd for the abusive peers to send
    std::string json = FormatMappings(spare.regions_.data(), 1);
    int baseline = CountUserfaultfds();
    const Abuse cases[] = {
        {"no-fd", -EPROTO, "no file descriptor"},
        {"two-fds", -EPROTO, "2 file descriptors"},
        {"garbage", -EINVAL, "invalid JSON"},
        {"truncated", -ECONNRESET, "closed the connection"},
        {"silent", -ETIMEDOUT, "sent nothing"},
        {"nobody", -ETIMEDOUT, "no VMM connected"},
        {"wrong-pid", -EPERM, "is not the VMM's"},
        {"too-big", -EINVAL, "regions need"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const Abuse &c = cases[i];
        SCOPED_TRACE(c.name);
        std::string name = std::string(c.name) + ".sock";
        struct page_server_fork *fork = Prepare(name, strcmp(c.name, "wrong-pid") ? 0 : 1);
        ASSERT_NE(nullptr, fork);
        int peer = strcmp(c.name, "nobody") ? ConnectTo(dir_ + "/" + name) : -1;
        int dup_fd = fcntl(spare.uffd(), F_DUPFD_CLOEXEC, 0);
        if (!strcmp(c.name, "no-fd"))
            SendRaw(peer, json, {});
        else if (!strcmp(c.name, "two-fds"))
            SendRaw(peer, json, {spare.uffd(), dup_fd});
        else if (!strcmp(c.name, "garbage"))
            SendRaw(peer, "hello, page server", {spare.uffd()});
        else if (!strcmp(c.name, "truncated"))
            SendRaw(peer, json.substr(0, json.size() / 2), {spare.uffd()});
        else if (!strcmp(c.name, "wrong-pid"))
            SendRaw(peer, json, {spare.uffd()});
        else if (!strcmp(c.name, "too-big")) {
            struct uffd_region huge = spare.regions_[0];
            huge.size = kTemplateBytes * 2;
            SendRaw(peer, FormatMappings(&huge, 1), {spare.uffd()});
        }
        close(dup_fd);
        if (!strcmp(c.name, "truncated"))
            close(peer), peer = -1;
        struct forkd_error err = {};
        auto started = std::chrono::steady_clock::now();
        EXPECT_EQ(c.expected, page_server_fork_wait_ready(fork, 5000, &err)) << err.message;
        EXPECT_NE(nullptr, strstr(err.message, c.message_part)) << err.message;
        EXPECT_NE(nullptr, strstr(err.message, name.c_str())) << "names the fork: " << err.message;
        EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(3));
        if (peer >= 0)
            close(peer);
        page_server_fork_release(fork);
        // The good fork is still served, on a page it never touched.
        uint8_t *page = good.Region(0) + (10 + i) * kPage;
        ASSERT_TRUE(Touch(good, page));
        EXPECT_TRUE(PageMatches(page, (10 + i) * kPage, kPage));
        struct stat st;
        EXPECT_NE(0, stat((dir_ + "/" + name).c_str(), &st)) << "socket removed";
    }
    EXPECT_EQ(baseline, CountUserfaultfds()) << "every received fd was closed";
    EXPECT_EQ(1u, page_server_active_forks(server_));
    page_server_fork_release(served);
}

TEST_F(PageServerTest, ObjectFormHandshakeIsAccepted)
{
    FakeVmm vmm({1 << 20}, kPage);
    struct page_server_fork *fork = Prepare("obj.sock", getpid());
    ASSERT_NE(nullptr, fork);
    int peer = ConnectTo(dir_ + "/obj.sock");
    std::string object = "{\"mappings\": " + FormatMappings(vmm.regions_.data(), 1) + "}";
    ASSERT_TRUE(SendRaw(peer, object, {vmm.uffd()}));
    struct forkd_error err = {};
    ASSERT_EQ(0, page_server_fork_wait_ready(fork, 5000, &err)) << err.message;
    ASSERT_TRUE(Touch(vmm, vmm.Region(0) + 3 * kPage));
    EXPECT_TRUE(PageMatches(vmm.Region(0) + 3 * kPage, 3 * kPage, kPage));
    close(peer);
    page_server_fork_release(fork);
}

TEST_F(PageServerTest, ReleaseCancelsAPendingHandshakeAtOnce)
{
    struct page_server_fork *fork = Prepare("pending.sock");
    ASSERT_NE(nullptr, fork);
    auto started = std::chrono::steady_clock::now();
    page_server_fork_release(fork);
    struct stat st;
    std::string path = dir_ + "/pending.sock";
    ASSERT_TRUE(WaitFor([&] { return stat(path.c_str(), &st) != 0; }, 2000));
    EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::milliseconds(400))
        << "not left to the handshake timeout";
}

TEST_F(PageServerTest, PrefetchCopiesTheRecordedHotSetBeforeTheForkRuns)
{
    struct forkd_error err = {};
    // The window must outlast the 24 touches below even on a loaded machine; the test waits
    // for it to close rather than for a fixed time.
    ASSERT_EQ(0,
              page_server_template_set_prefetch(server_, "tmpl", memory_path_.c_str(), 2000, &err))
        << err.message;
    FakeVmm first({2 << 20}, kPage);
    struct page_server_fork *recorder = Attach(first, "first.sock");
    ASSERT_NE(nullptr, recorder);
    // Two hot areas: pages 0..19 and 300..303.
    for (uint64_t page :
         {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 300, 301, 302, 303})
        ASSERT_TRUE(Touch(first, first.Region(0) + page * kPage));
    EXPECT_EQ(24u, Settled(recorder, 24).faults_served);
    struct page_server_template_info info = {};
    ASSERT_TRUE(WaitFor(
        [&] {
            page_server_template_describe(server_, "tmpl", &info);
            return info.hot_set_ready;
        },
        10000));
    EXPECT_EQ(24u, info.hot_pages);

    FakeVmm second({2 << 20}, kPage);
    struct page_server_fork *later = Attach(second, "second.sock");
    ASSERT_NE(nullptr, later);
    struct page_server_stats stats = Stats(later);
    // 64 KiB chunks holding a hot page: [0, 32) pages (two chunks) and [288, 304) (one chunk).
    EXPECT_EQ(48u, stats.pages_prefetched);
    EXPECT_EQ(48u * kPage, stats.bytes_copied);
    EXPECT_EQ(0u, stats.faults_served);
    for (uint64_t page : {0, 19, 31, 288, 303}) {
        ASSERT_TRUE(Touch(second, second.Region(0) + page * kPage));
        EXPECT_TRUE(PageMatches(second.Region(0) + page * kPage, page * kPage, kPage));
    }
    EXPECT_EQ(0u, Stats(later).faults_served) << "prefetched pages take no fault";
    ASSERT_TRUE(Touch(second, second.Region(0) + 500 * kPage));
    EXPECT_EQ(1u, Settled(later, 1).faults_served);
    page_server_fork_release(recorder);
    page_server_fork_release(later);
}

// The snapshot's own hot set (recorded by its branch) seeds the template: the first fork is
// prefetched already, and still records what else it faults in for the forks after it.
TEST_F(PageServerTest, ASeededHotSetIsPrefetchedIntoTheFirstForkWhichStillRecords)
{
    struct forkd_error err = {};
    const struct page_server_range seed[] = {{0, 20 * kPage}, {300 * kPage, 4 * kPage}};
    // Without prefetch on, a template keeps no hot set: the seed changes nothing.
    ASSERT_EQ(0,
              page_server_template_seed_hot(server_, "tmpl", memory_path_.c_str(), seed, 2, &err))
        << err.message;
    struct page_server_template_info info = {};
    ASSERT_EQ(0, page_server_template_describe(server_, "tmpl", &info));
    EXPECT_EQ(0u, info.hot_pages);
    EXPECT_FALSE(info.hot_set_ready);
    // A range that is not whole pages of memory.bin is refused, and marks nothing.
    const struct page_server_range bad[] = {{0, kPage}, {kTemplateBytes - kPage, 2 * kPage}};
    ASSERT_EQ(0,
              page_server_template_set_prefetch(server_, "tmpl", memory_path_.c_str(), 2000, &err))
        << err.message;
    EXPECT_EQ(-EINVAL,
              page_server_template_seed_hot(server_, "tmpl", memory_path_.c_str(), bad, 2, &err));
    EXPECT_NE(nullptr, strstr(err.message, "hot range 1")) << err.message;
    ASSERT_EQ(0, page_server_template_describe(server_, "tmpl", &info));
    EXPECT_EQ(0u, info.hot_pages);

    ASSERT_EQ(0,
              page_server_template_seed_hot(server_, "tmpl", memory_path_.c_str(), seed, 2, &err))
        << err.message;
    ASSERT_EQ(0, page_server_template_describe(server_, "tmpl", &info));
    EXPECT_EQ(24u, info.hot_pages);
    EXPECT_TRUE(info.hot_set_ready);
    FakeVmm first({2 << 20}, kPage);
    struct page_server_fork *fork = Attach(first, "first.sock");
    ASSERT_NE(nullptr, fork);
    // 64 KiB chunks holding a seeded page: [0, 32) pages (two chunks) and [288, 304) (one).
    EXPECT_EQ(48u, Stats(fork).pages_prefetched);
    for (uint64_t page : {0, 19, 31, 288, 303}) {
        ASSERT_TRUE(Touch(first, first.Region(0) + page * kPage));
        EXPECT_TRUE(PageMatches(first.Region(0) + page * kPage, page * kPage, kPage));
    }
    EXPECT_EQ(0u, Stats(fork).faults_served) << "seeded pages take no fault";
    ASSERT_TRUE(Touch(first, first.Region(0) + 500 * kPage));
    EXPECT_EQ(1u, Settled(fork, 1).faults_served);
    ASSERT_EQ(0, page_server_template_describe(server_, "tmpl", &info));
    EXPECT_EQ(25u, info.hot_pages) << "the first fork records what it faults in";
    page_server_fork_release(fork);
}

// A page already present in the middle of a prefetch run: the kernel copies the pages before
// it and answers EAGAIN with their count; the prefetch skips the present page and goes on
// (it used to stop there, leaving the rest of the hot set to faults).
TEST_F(PageServerTest, PrefetchGoesOnPastAPageAlreadyPresent)
{
    struct forkd_error err = {};
    ASSERT_EQ(0,
              page_server_template_set_prefetch(server_, "tmpl", memory_path_.c_str(), 2000, &err))
        << err.message;
    FakeVmm first({2 << 20}, kPage);
    struct page_server_fork *recorder = Attach(first, "first.sock");
    ASSERT_NE(nullptr, recorder);
    for (uint64_t page : {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19})
        ASSERT_TRUE(Touch(first, first.Region(0) + page * kPage));
    EXPECT_EQ(20u, Settled(recorder, 20).faults_served);
    struct page_server_template_info info = {};
    ASSERT_TRUE(WaitFor(
        [&] {
            page_server_template_describe(server_, "tmpl", &info);
            return info.hot_set_ready;
        },
        10000));

    FakeVmm second({2 << 20}, kPage);
    // Page 5 is there before the prefetch (as if the guest had touched it already).
    struct uffdio_zeropage zero = {};
    zero.range.start = reinterpret_cast<uint64_t>(second.Region(0)) + 5 * kPage;
    zero.range.len = kPage;
    ASSERT_EQ(0, ioctl(second.uffd(), UFFDIO_ZEROPAGE, &zero)) << strerror(errno);
    struct page_server_fork *later = Attach(second, "second.sock");
    ASSERT_NE(nullptr, later);
    // The two 64 KiB chunks [0, 32) but page 5.
    EXPECT_EQ(31u, Stats(later).pages_prefetched);
    for (uint64_t page : {4, 6, 19, 31}) {
        ASSERT_TRUE(Touch(second, second.Region(0) + page * kPage));
        EXPECT_TRUE(PageMatches(second.Region(0) + page * kPage, page * kPage, kPage));
    }
    EXPECT_EQ(0u, Stats(later).faults_served) << "pages after the present one were prefetched";
    page_server_fork_release(recorder);
    page_server_fork_release(later);
}

TEST_F(PageServerTest, ForksOutliveTheServerForTheirFigures)
{
    FakeVmm vmm({1 << 20}, kPage);
    struct page_server_fork *fork = Attach(vmm, "late.sock");
    ASSERT_NE(nullptr, fork);
    ASSERT_TRUE(Touch(vmm, vmm.Region(0)));
    page_server_close(server_);
    server_ = nullptr;
    EXPECT_FALSE(page_server_fork_active(fork));
    EXPECT_EQ(1u, Settled(fork, 1).faults_served);
    page_server_fork_release(fork);
}

TEST(PageServerOpen, RefusesMissingTemplateAndLongSocketPath)
{
    struct page_server *server = nullptr;
    struct forkd_error err = {};
    ASSERT_EQ(0, page_server_open(nullptr, &server, &err)) << err.message;
    struct page_server_fork_config config = {};
    config.memory_path = "/nonexistent/memory.bin";
    config.socket_path = "/tmp/forkd-ps-missing.sock";
    struct page_server_fork *fork = nullptr;
    EXPECT_EQ(-ENOENT, page_server_fork_prepare(server, &config, &fork, &err));
    EXPECT_NE(nullptr, strstr(err.message, "/nonexistent/memory.bin")) << err.message;

    char memory[] = "/tmp/forkd-ps-memory-XXXXXX";
    int fd = mkstemp(memory);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(0, ftruncate(fd, 8192));
    close(fd);
    std::string long_path = "/tmp/" + std::string(120, 'x');
    config.memory_path = memory;
    config.socket_path = long_path.c_str();
    EXPECT_EQ(-ENAMETOOLONG, page_server_fork_prepare(server, &config, &fork, &err));
    EXPECT_EQ(0u, page_server_active_forks(server));
    page_server_close(server);
    unlink(memory);
}

} // namespace

// forkd restarted: the fork's userfaultfd is taken back and served again, and a vCPU waiting
// on a fault that the dead forkd had read (and never resolved) is woken and served.
TEST_F(PageServerTest, AnAdoptedForkIsServedAgainAndAFaultReadBeforeIsWoken)
{
    FakeVmm vmm({1 << 20}, kPage);
    const uint8_t *page = vmm.Region(0) + 5 * kPage;
    auto reader = std::async(std::launch::async,
                             [page] { return *reinterpret_cast<const volatile uint8_t *>(page); });
    // The earlier forkd read the fault's message; it died with it.
    struct pollfd readable = {vmm.uffd(), POLLIN, 0};
    ASSERT_EQ(1, poll(&readable, 1, 5000));
    struct uffd_msg message;
    ASSERT_EQ(static_cast<ssize_t>(sizeof(message)), read(vmm.uffd(), &message, sizeof(message)));
    ASSERT_EQ(UFFD_EVENT_PAGEFAULT, message.event);

    int uffds_before = CountUserfaultfds();
    struct page_server_fork_config config = {};
    config.template_name = "tmpl";
    config.memory_path = memory_path_.c_str();
    config.socket_path = "";
    config.vmm_pid = getpid();
    config.label = "adopted";
    struct page_server_fork *fork = nullptr;
    struct forkd_error err = {};
    ASSERT_EQ(0, page_server_fork_adopt(server_, &config, vmm.regions_.data(), vmm.regions_.size(),
                                        fcntl(vmm.uffd(), F_DUPFD_CLOEXEC, 0),
                                        static_cast<int>(syscall(SYS_pidfd_open, getpid(), 0)),
                                        &fork, &err))
        << err.message;
    EXPECT_TRUE(page_server_fork_active(fork));
    if (reader.wait_for(std::chrono::seconds(5)) != std::future_status::ready) {
        struct uffdio_range range = {vmm.regions_[0].host_base, vmm.regions_[0].size};
        ioctl(vmm.uffd(), UFFDIO_UNREGISTER, &range); // wakes the reader: fail, do not hang
        FAIL() << "the fault read before the adoption was never served";
    }
    EXPECT_TRUE(PageMatches(page, 5 * kPage, kPage));
    ASSERT_TRUE(Touch(vmm, vmm.Region(0) + 9 * kPage));
    EXPECT_TRUE(PageMatches(vmm.Region(0) + 9 * kPage, 9 * kPage, kPage));
    EXPECT_GE(Settled(fork, 2).faults_served, 2u);
    page_server_fork_release(fork);
    EXPECT_TRUE(WaitFor([&] { return CountUserfaultfds() == uffds_before; }))
        << "the adopted fork's userfaultfd is closed once released";
}

TEST_F(PageServerTest, AnAdoptedForkWhoseRegionsExceedTheTemplateIsRefusedAndItsFdsClosed)
{
    FakeVmm vmm({kTemplateBytes + (1 << 20)}, kPage);
    int uffds_before = CountUserfaultfds();
    struct page_server_fork_config config = {};
    config.template_name = "tmpl";
    config.memory_path = memory_path_.c_str();
    config.socket_path = "";
    config.vmm_pid = getpid();
    config.label = "too-big";
    struct page_server_fork *fork = nullptr;
    struct forkd_error err = {};
    EXPECT_EQ(-EINVAL,
              page_server_fork_adopt(server_, &config, vmm.regions_.data(), vmm.regions_.size(),
                                     fcntl(vmm.uffd(), F_DUPFD_CLOEXEC, 0),
                                     static_cast<int>(syscall(SYS_pidfd_open, getpid(), 0)), &fork,
                                     &err));
    EXPECT_EQ(uffds_before, CountUserfaultfds());
}

// ---- lazy templates: memory that arrives chunk by chunk (a Spawn from the bucket) ----

namespace
{

constexpr uint64_t kChunk = 2ULL << 20; // kTemplateBytes is 4 chunks

// Plays the lazy pull: records the chunks the page server asks for, and fills memory.bin (a
// hole until then) with the template's pattern when the test delivers a chunk.
class LazySource
{
  public:
    static void Want(void *arg, uint64_t chunk)
    {
        auto *self = static_cast<LazySource *>(arg);
        std::lock_guard<std::mutex> hold(self->lock_);
        self->asked_.push_back(chunk);
    }
    bool Asked(uint64_t chunk)
    {
        std::lock_guard<std::mutex> hold(lock_);
        return std::find(asked_.begin(), asked_.end(), chunk) != asked_.end();
    }
    std::vector<uint64_t> asked_;
    std::mutex lock_;
};

class LazyPageServerTest : public PageServerTest
{
  protected:
    void SetUp() override
    {
        PageServerTest::SetUp();
        lazy_path_ = dir_ + "/lazy.bin";
        int fd = open(lazy_path_.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
        ASSERT_GE(fd, 0);
        ASSERT_EQ(0, ftruncate(fd, static_cast<off_t>(kTemplateBytes)));
        lazy_fd_ = fd;
        bool present[4] = {false, true, false, false}; // chunk 1 is all zero: not fetched
        struct page_server_lazy_source source = {};
        source.chunk_size = kChunk;
        source.chunk_count = 4;
        source.present = present;
        source.want = LazySource::Want;
        source.arg = &source_;
        struct forkd_error err = {};
        ASSERT_EQ(0, page_server_template_open_lazy(server_, "lazy", lazy_path_.c_str(), &source,
                                                    &template_, &err))
            << err.message;
    }
    void TearDown() override
    {
        page_server_template_release(template_);
        close(lazy_fd_);
        PageServerTest::TearDown();
    }
    struct page_server_fork *AttachLazy(FakeVmm &vmm, const std::string &socket_name,
                                        const int *pidfd = nullptr)
    {
        std::string path = dir_ + "/" + socket_name;
        struct page_server_fork_config config = {};
        config.template_name = "lazy";
        config.memory_path = lazy_path_.c_str();
        config.socket_path = path.c_str();
        config.vmm_pid = getpid();
        config.vmm_pidfd = pidfd;
        config.label = socket_name.c_str();
        struct page_server_fork *fork = nullptr;
        struct forkd_error err = {};
        EXPECT_EQ(0, page_server_fork_prepare(server_, &config, &fork, &err)) << err.message;
        if (!fork)
            return nullptr;
        EXPECT_TRUE(vmm.Connect(path));
        EXPECT_EQ(0, page_server_fork_wait_ready(fork, 5000, &err)) << err.message;
        return fork;
    }
    // Writes the chunk's bytes into the file, then tells the page server.
    void Deliver(uint64_t chunk)
    {
        std::vector<uint64_t> words(kChunk / 8);
        for (uint64_t i = 0; i < words.size(); i++)
            words[i] = Pattern(chunk * kChunk + 8 * i);
        ASSERT_EQ(static_cast<ssize_t>(kChunk),
                  pwrite(lazy_fd_, words.data(), kChunk, static_cast<off_t>(chunk * kChunk)));
        page_server_chunk_arrived(server_, template_, chunk);
    }
    // Ends a read the page server will never answer (its range is unregistered: the reader
    // then reads the anonymous page itself).
    static void Release(FakeVmm &vmm, std::future<uint8_t> &reader)
    {
        for (const auto &r : vmm.regions_) {
            struct uffdio_range range = {r.host_base, r.size};
            ioctl(vmm.uffd(), UFFDIO_UNREGISTER, &range);
        }
        reader.wait();
    }
    static std::future<uint8_t> Read(const uint8_t *address)
    {
        return std::async(std::launch::async, [address] {
            return *reinterpret_cast<const volatile uint8_t *>(address);
        });
    }

    std::string lazy_path_;
    int lazy_fd_ = -1;
    LazySource source_;
    struct page_server_template *template_ = nullptr;
};

} // namespace

// A fault in a chunk not there yet asks for it and waits, while another fork's fault in a chunk
// that arrives is served meanwhile; the waiting fault is served (with the chunk's bytes) once its
// chunk arrives; an all-zero chunk is served without being asked for.
TEST_F(LazyPageServerTest, AFaultWaitsForItsChunkWhileOtherForksAreServed)
{
    FakeVmm a({kTemplateBytes}, kPage), b({kTemplateBytes}, kPage);
    struct page_server_fork *fa = AttachLazy(a, "a.sock"), *fb = AttachLazy(b, "b.sock");
    ASSERT_NE(nullptr, fa);
    ASSERT_NE(nullptr, fb);
    const uint64_t in_chunk2 = 2 * kChunk + 5 * kPage;
    auto waiting = Read(a.Region(0) + in_chunk2);
    ASSERT_TRUE(WaitFor([&] { return source_.Asked(2); }));
    EXPECT_NE(std::future_status::ready, waiting.wait_for(std::chrono::milliseconds(50)));

    // The other fork is served meanwhile: from a chunk delivered now, and from the zero chunk.
    Deliver(0);
    ASSERT_TRUE(Touch(b, b.Region(0) + 3 * kPage));
    EXPECT_TRUE(PageMatches(b.Region(0) + 3 * kPage, 3 * kPage, kPage));
    ASSERT_TRUE(Touch(b, b.Region(0) + kChunk + kPage));
    EXPECT_TRUE(PageIsZero(b.Region(0) + kChunk + kPage, kPage));
    EXPECT_FALSE(source_.Asked(1));
    EXPECT_NE(std::future_status::ready, waiting.wait_for(std::chrono::milliseconds(0)));

    Deliver(2);
    ASSERT_EQ(std::future_status::ready, waiting.wait_for(std::chrono::seconds(5)));
    EXPECT_TRUE(PageMatches(a.Region(0) + in_chunk2, in_chunk2, kPage));
    EXPECT_TRUE(page_server_fork_active(fa));
    EXPECT_FALSE(source_.Asked(3)); // never touched, never asked for
    char why[128];
    EXPECT_FALSE(page_server_fork_memory_failed(fa, why, sizeof(why)));
    page_server_fork_release(fa);
    page_server_fork_release(fb);
}

// A chunk that cannot be had ends the forks faulting in it, with the reason, and kills their
// VMM (through the pidfd); a fork not needing it goes on; no page of it is ever copied.
TEST_F(LazyPageServerTest, AChunkThatFailsEndsOnlyTheForksNeedingIt)
{
    // A process standing for the VMM: killed and reaped at the end whatever happens.
    struct Child {
        pid_t pid = ::fork();
        bool reaped = false;
        ~Child()
        {
            if (pid > 0 && !reaped) {
                kill(pid, SIGKILL);
                waitpid(pid, nullptr, 0);
            }
        }
    } child;
    ASSERT_GE(child.pid, 0);
    if (child.pid == 0) {
        pause();
        _exit(0);
    }
    int pidfd = static_cast<int>(syscall(SYS_pidfd_open, child.pid, 0));
    ASSERT_GE(pidfd, 0);
    FakeVmm a({kTemplateBytes}, kPage), b({kTemplateBytes}, kPage);
    struct page_server_fork *fa = AttachLazy(a, "a.sock", &pidfd), *fb = AttachLazy(b, "b.sock");
    ASSERT_NE(nullptr, fa);
    ASSERT_NE(nullptr, fb);
    auto waiting = Read(a.Region(0) + 3 * kChunk);
    ASSERT_TRUE(WaitFor([&] { return source_.Asked(3); }));
    page_server_chunk_failed(server_, template_, 3, "chunk 3 is corrupt: its sha256 is 00");
    ASSERT_TRUE(WaitFor([&] { return !page_server_fork_active(fa); }));
    char why[128] = "";
    EXPECT_TRUE(page_server_fork_memory_failed(fa, why, sizeof(why)));
    EXPECT_STREQ("chunk 3 is corrupt: its sha256 is 00", why);
    int status = 0;
    close(pidfd);
    ASSERT_TRUE(WaitFor([&] { return waitpid(child.pid, &status, WNOHANG) == child.pid; }))
        << "the VMM was not killed";
    child.reaped = true;
    EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    EXPECT_EQ(0u, Stats(fa).bytes_copied);
    EXPECT_NE(std::future_status::ready, waiting.wait_for(std::chrono::milliseconds(0)));
    Release(a, waiting);

    // The other fork: served from what arrives; a later fault in the failed chunk ends it too.
    Deliver(0);
    ASSERT_TRUE(Touch(b, b.Region(0)));
    EXPECT_TRUE(PageMatches(b.Region(0), 0, kPage));
    EXPECT_TRUE(page_server_fork_active(fb));
    EXPECT_FALSE(page_server_fork_memory_failed(fb, why, sizeof(why)));
    auto late = Read(b.Region(0) + 3 * kChunk + kPage);
    ASSERT_TRUE(WaitFor([&] { return !page_server_fork_active(fb); }));
    EXPECT_TRUE(page_server_fork_memory_failed(fb, why, sizeof(why)));
    Release(b, late);
    page_server_fork_release(fa);
    page_server_fork_release(fb);
}

// A fork released while its fault waits for a chunk: the chunk arriving later touches nothing
// of it, and the template's other forks are served.
TEST_F(LazyPageServerTest, AForkReleasedWhileItsChunkIsInFlightLeavesNothingBehind)
{
    int before = CountUserfaultfds();
    {
        FakeVmm a({kTemplateBytes}, kPage), b({kTemplateBytes}, kPage);
        struct page_server_fork *fa = AttachLazy(a, "a.sock"), *fb = AttachLazy(b, "b.sock");
        ASSERT_NE(nullptr, fa);
        ASSERT_NE(nullptr, fb);
        auto waiting = Read(a.Region(0) + 2 * kChunk);
        ASSERT_TRUE(WaitFor([&] { return source_.Asked(2); }));
        a.Hangup(); // the VMM is gone (killed): its connection closes
        ASSERT_TRUE(WaitFor([&] { return !page_server_fork_active(fa); }));
        Deliver(2);
        ASSERT_TRUE(Touch(b, b.Region(0) + 2 * kChunk));
        EXPECT_TRUE(PageMatches(b.Region(0) + 2 * kChunk, 2 * kChunk, kPage));
        Release(a, waiting);
        page_server_fork_release(fa);
        page_server_fork_release(fb);
    }
    // The loop closes a dropped fork's fds at the end of its event batch.
    EXPECT_TRUE(WaitFor([&] { return CountUserfaultfds() == before; }))
        << CountUserfaultfds() << " userfaultfds open, " << before << " before";
}
