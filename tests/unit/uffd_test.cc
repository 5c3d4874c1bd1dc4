// Unit tests of the userfaultfd layer (engine/src/uffd.c). The test process plays the VMM: it
// creates a userfaultfd with write-protect features, registers its own anonymous and memfd
// memory, and hands the fd over a real Unix socket to uffd_accept_handshake. No KVM needed.
// Missing userfaultfd or write-protect support fails these tests: they never skip.
#include <gtest/gtest.h>

extern "C" {
#include "forkd/probe.h"
#include "uffd.h"
#include <forkd_compat/userfaultfd.h>
}

#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/sockios.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

namespace
{

using Clock = std::chrono::steady_clock;

constexpr uint64_t kPage = 4096;
constexpr uint64_t kHugePage = 2ULL << 20;
constexpr int kDeadlineMs = 5000; // how long a condition that must happen may take
constexpr uint64_t kWriteWp = UFFD_PAGEFAULT_FLAG_WRITE | UFFD_PAGEFAULT_FLAG_WP;

long long ElapsedMs(Clock::time_point start)
{
    return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
}

class Fd
{
  public:
    explicit Fd(int fd = -1) : fd_(fd)
    {
    }
    Fd(const Fd &) = delete;
    Fd &operator=(const Fd &) = delete;
    ~Fd()
    {
        reset();
    }
    int get() const
    {
        return fd_;
    }
    void reset(int fd = -1)
    {
        if (fd_ >= 0)
            close(fd_);
        fd_ = fd;
    }

  private:
    int fd_;
};

int CountOpenFds()
{
    DIR *dir = opendir("/proc/self/fd");
    if (!dir)
        return -1;
    int count = 0;
    while (struct dirent *entry = readdir(dir))
        count += entry->d_name[0] != '.';
    closedir(dir);
    return count - 1; // the directory's own fd
}

bool IsUserfaultfd(int fd)
{
    char path[64];
    char target[64] = {0};
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(path, target, sizeof(target) - 1);
    return n > 0 && std::string(target) == "anon_inode:[userfaultfd]";
}

// A userfaultfd of this process with the given features; ADD_FAILURE (never skip) if the host
// cannot provide it.
int OpenUffd(uint64_t features, int flags = O_CLOEXEC | O_NONBLOCK)
{
    int fd = probe_open_userfaultfd(flags);
    if (fd < 0) {
        ADD_FAILURE() << "userfaultfd unavailable: " << strerror(-fd);
        return -1;
    }
    struct uffdio_api api = {};
    api.api = UFFD_API;
    api.features = features;
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        ADD_FAILURE() << "UFFDIO_API features 0x" << std::hex << features << ": "
                      << strerror(errno);
        close(fd);
        return -1;
    }
    if ((api.features & features) != features) {
        ADD_FAILURE() << "userfaultfd lacks features 0x" << std::hex << (features & ~api.features);
        close(fd);
        return -1;
    }
    return fd;
}

std::string RegionJson(uint64_t base, uint64_t size, uint64_t offset, uint64_t page = kPage)
{
    char buffer[256];
    snprintf(buffer, sizeof(buffer),
             "{\"base_host_virt_addr\":%" PRIu64 ",\"size\":%" PRIu64 ",\"offset\":%" PRIu64
             ",\"page_size\":%" PRIu64 ",\"page_size_kib\":%" PRIu64 "}",
             base, size, offset, page, page);
    return buffer;
}

struct uffd_handshake EmptyHandshake()
{
    struct uffd_handshake handshake = {};
    handshake.uffd = -1;
    handshake.connection = -1;
    return handshake;
}

int Parse(const std::string &json, struct uffd_handshake *out, struct forkd_error *err)
{
    return uffd_parse_mappings(json.data(), json.size(), out, err);
}

// ------------------------------------------------------------------ parsing

TEST(UffdParse, BareArrayInFirecrackerForm)
{
    const uint64_t gib = 1ULL << 30;
    std::string json = "[" + RegionJson(0x7f0000000000, 3 * gib, 0) + "," +
                       RegionJson(0x7f0100000000, gib, 3 * gib) + "]";
    struct uffd_handshake out = EmptyHandshake();
    struct forkd_error err = {};
    ASSERT_EQ(Parse(json, &out, &err), 0) << err.message;
    ASSERT_EQ(out.region_count, 2u);
    EXPECT_EQ(out.regions[0].host_base, 0x7f0000000000u);
    EXPECT_EQ(out.regions[0].size, 3 * gib);
    EXPECT_EQ(out.regions[0].file_offset, 0u);
    EXPECT_EQ(out.regions[0].page_size, kPage);
    EXPECT_EQ(out.regions[1].host_base, 0x7f0100000000u);
    EXPECT_EQ(out.regions[1].file_offset, 3 * gib);
    EXPECT_EQ(uffd_total_size(&out), 4 * gib);
    EXPECT_EQ(out.uffd, -1); // parsing never touches the fds
    EXPECT_EQ(out.connection, -1);
}

TEST(UffdParse, ObjectFormWithMappings)
{
    std::string json = "{\"mappings\": [" + RegionJson(0x10000000, 8 * kPage, 0) + "]}";
    struct uffd_handshake out = EmptyHandshake();
    struct forkd_error err = {};
    ASSERT_EQ(Parse(json, &out, &err), 0) << err.message;
    ASSERT_EQ(out.region_count, 1u);
    EXPECT_EQ(out.regions[0].size, 8 * kPage);
}

TEST(UffdParse, PageSizeKibIsBytesAndOnlyAFallback)
{
    struct uffd_handshake out = EmptyHandshake();
    struct forkd_error err = {};
    std::string kib_only = "[{\"base_host_virt_addr\":4194304,\"size\":4194304,\"offset\":0,\"page_"
                           "size_kib\":2097152}]";
    ASSERT_EQ(Parse(kib_only, &out, &err), 0) << err.message;
    EXPECT_EQ(out.regions[0].page_size, kHugePage);

    // page_size wins: with 2 MiB from page_size_kib this 4 KiB-aligned base would be refused.
    std::string both =
        "[{\"base_host_virt_addr\":8192,\"size\":4096,\"offset\":0,\"page_size\":4096,"
        "\"page_size_kib\":2097152}]";
    ASSERT_EQ(Parse(both, &out, &err), 0) << err.message;
    EXPECT_EQ(out.regions[0].page_size, kPage);
}

TEST(UffdParse, SortsByFileOffset)
{
    std::string json = "[" + RegionJson(0x200000000, 4 * kPage, 2 * kPage) + "," +
                       RegionJson(0x100000000, 2 * kPage, 0) + "]";
    struct uffd_handshake out = EmptyHandshake();
    struct forkd_error err = {};
    ASSERT_EQ(Parse(json, &out, &err), 0) << err.message;
    ASSERT_EQ(out.region_count, 2u);
    EXPECT_EQ(out.regions[0].host_base, 0x100000000u);
    EXPECT_EQ(out.regions[1].host_base, 0x200000000u);
}

TEST(UffdParse, LargestUserAddressesAreExact)
{
    // Top of the 47-bit x86-64 user address space, and 2 MiB pages.
    const uint64_t base = (1ULL << 47) - 2 * kHugePage;
    std::string json = " \n[" + RegionJson(base, 2 * kHugePage, 0, kHugePage) + "]\n ";
    struct uffd_handshake out = EmptyHandshake();
    struct forkd_error err = {};
    ASSERT_EQ(Parse(json, &out, &err), 0) << err.message;
    EXPECT_EQ(out.regions[0].host_base, base);
    EXPECT_EQ(out.regions[0].page_size, kHugePage);
}

TEST(UffdParse, IgnoresUnknownFields)
{
    std::string json = "[{\"base_host_virt_addr\":4096,\"size\":4096,\"offset\":0,"
                       "\"page_size\":4096,\"future\":{\"x\":[1,2.5,\"]\"]}}]";
    struct uffd_handshake out = EmptyHandshake();
    struct forkd_error err = {};
    ASSERT_EQ(Parse(json, &out, &err), 0) << err.message;
}

TEST(UffdParse, FailureLeavesNoRegions)
{
    struct uffd_handshake out = EmptyHandshake();
    struct forkd_error err = {};
    ASSERT_EQ(Parse("[" + RegionJson(4096, 4096, 0) + "]", &out, &err), 0);
    ASSERT_EQ(out.region_count, 1u);
    EXPECT_EQ(Parse("[" + RegionJson(4096, 4096, 4096) + "]", &out, &err), -EINVAL);
    EXPECT_EQ(out.region_count, 0u);
    EXPECT_EQ(err.code, -EINVAL);
}

struct RejectCase {
    const char *name;
    std::string json;
    std::vector<std::string> message_parts;
};

std::string ManyRegions(int count)
{
    std::string json = "[";
    for (int i = 0; i < count; i++)
        json += (i ? "," : "") + RegionJson((uint64_t)(i + 1) << 30, kPage, (uint64_t)i * kPage);
    return json + "]";
}

std::string WithField(const std::string &fields)
{
    return "[{" + fields + "}]";
}

const std::string kBase = "\"base_host_virt_addr\":1048576";
const std::string kSize = "\"size\":4096";
const std::string kOffset = "\"offset\":0";
const std::string kPageSize = "\"page_size\":4096";

std::vector<RejectCase> RejectCases()
{
    const std::string ok = RegionJson(1 << 20, kPage, 0);
    return {
        {"NotJson", "hello", {"invalid JSON"}},
        {"TruncatedJson", "[{\"size\":4096", {"invalid JSON"}},
        {"TrailingData", "[" + ok + "] x", {"after the JSON", "byte"}},
        {"TrailingNul", "[" + ok + "]" + std::string(1, '\0'), {"after the JSON"}},
        {"Scalar", "42", {"expected a JSON array"}},
        {"ObjectWithoutMappings", "{\"regions\":[" + ok + "]}", {"expected a JSON array"}},
        {"MappingsNotArray", "{\"mappings\":{}}", {"expected a JSON array"}},
        {"EmptyArray", "[]", {"0 regions"}},
        {"TooManyRegions", ManyRegions(UFFD_MAX_REGIONS + 1), {"17 regions", "1 to 16"}},
        {"ElementNotObject", "[" + ok + ",7]", {"region 1: not an object"}},
        {"MissingBase",
         WithField(kSize + "," + kOffset + "," + kPageSize),
         {"region 0", "\"base_host_virt_addr\" missing"}},
        {"MissingSize",
         WithField(kBase + "," + kOffset + "," + kPageSize),
         {"region 0", "\"size\" missing"}},
        {"MissingOffset",
         WithField(kBase + "," + kSize + "," + kPageSize),
         {"region 0", "\"offset\" missing"}},
        {"MissingPageSize",
         WithField(kBase + "," + kSize + "," + kOffset),
         {"region 0", "\"page_size\"", "missing"}},
        {"SizeIsString",
         WithField(kBase + ",\"size\":\"4096\"," + kOffset + "," + kPageSize),
         {"region 0", "\"size\" is not a number"}},
        {"NegativeBase",
         WithField("\"base_host_virt_addr\":-4096," + kSize + "," + kOffset + "," + kPageSize),
         {"region 0", "\"base_host_virt_addr\"", "negative"}},
        {"NegativeZeroOffset",
         WithField(kBase + "," + kSize + ",\"offset\":-0," + kPageSize),
         {"region 0", "\"offset\"", "negative"}},
        {"FractionalSize",
         WithField(kBase + ",\"size\":4096.5," + kOffset + "," + kPageSize),
         {"region 0", "\"size\" is not an integer"}},
        {"BaseAt2To53",
         WithField("\"base_host_virt_addr\":9007199254740992," + kSize + "," + kOffset + "," +
                   kPageSize),
         {"region 0", "\"base_host_virt_addr\"", "2^53"}},
        {"BaseJustOver2To53", // rounds to 2^53 as a double: must not be taken as 2^53
         WithField("\"base_host_virt_addr\":9007199254740993," + kSize + "," + kOffset + "," +
                   kPageSize),
         {"region 0", "2^53"}},
        {"SizeHuge",
         WithField(kBase + ",\"size\":1e300," + kOffset + "," + kPageSize),
         {"region 0", "\"size\"", "2^53"}},
        {"PageSize8K",
         WithField(kBase + ",\"size\":8192," + kOffset + ",\"page_size\":8192"),
         {"region 0", "\"page_size\" 8192", "neither"}},
        {"PageSizeKibInKib",
         WithField(kBase + "," + kSize + "," + kOffset + ",\"page_size_kib\":4"),
         {"region 0", "\"page_size_kib\" 4 "}},
        {"BaseZero",
         WithField("\"base_host_virt_addr\":0," + kSize + "," + kOffset + "," + kPageSize),
         {"region 0", "\"base_host_virt_addr\" is 0"}},
        {"SizeZero",
         WithField(kBase + ",\"size\":0," + kOffset + "," + kPageSize),
         {"region 0", "\"size\" is 0"}},
        {"BaseUnaligned",
         WithField("\"base_host_virt_addr\":1049088," + kSize + "," + kOffset + "," + kPageSize),
         {"region 0", "\"base_host_virt_addr\" 0x100200 not aligned to page size 4096"}},
        {"SizeUnaligned",
         "[" + ok + "," + RegionJson(1 << 24, 6000, kPage) + "]",
         {"region 1", "\"size\"", "not aligned"}},
        {"HugeBaseOnly4KAligned",
         "[" + RegionJson(kHugePage + kPage, kHugePage, 0, kHugePage) + "]",
         {"region 0", "\"base_host_virt_addr\"", "not aligned to page size 2097152"}},
        {"FirstOffsetNotZero",
         "[" + RegionJson(1 << 20, kPage, kPage) + "]",
         {"region 0", "\"offset\" 0x1000, expected 0x0"}},
        {"GapBetweenRegions",
         "[" + ok + "," + RegionJson(1 << 24, kPage, 2 * kPage) + "]",
         {"region 1", "\"offset\" 0x2000, expected 0x1000"}},
        {"SameOffsetTwice",
         "[" + ok + "," + RegionJson(1 << 24, kPage, 0) + "]",
         {"region 1", "\"offset\""}},
        {"ErrorNamesRegionAsSent", // region 1 sorts first; region 0 is the one out of place
         "[" + RegionJson(1 << 24, kPage, 3 * kPage) + "," + ok + "]",
         {"region 0", "\"offset\" 0x3000, expected 0x1000"}},
        {"HostRangesOverlap",
         "[" + RegionJson(1 << 20, 2 * kPage, 0) + "," +
             RegionJson((1 << 20) + kPage, kPage, 2 * kPage) + "]",
         {"region 1", "overlaps region 0"}},
    };
}

class UffdParseReject : public testing::TestWithParam<RejectCase>
{
};

TEST_P(UffdParseReject, NamesTheDefect)
{
    const RejectCase &c = GetParam();
    struct uffd_handshake out = EmptyHandshake();
    struct forkd_error err = {};
    ASSERT_EQ(Parse(c.json, &out, &err), -EINVAL) << c.json;
    EXPECT_EQ(err.code, -EINVAL);
    EXPECT_EQ(out.region_count, 0u);
    for (const std::string &part : c.message_parts)
        EXPECT_NE(std::string(err.message).find(part), std::string::npos)
            << "message '" << err.message << "' lacks '" << part << "'";
}

INSTANTIATE_TEST_SUITE_P(Uffd, UffdParseReject, testing::ValuesIn(RejectCases()),
                         [](const testing::TestParamInfo<RejectCase> &param) {
                             return std::string(param.param.name);
                         });

TEST(UffdFormat, RoundTripsThroughParse)
{
    struct uffd_region regions[2] = {
        {(1ULL << 47) - kHugePage * 4, kHugePage * 4, 0, kHugePage},
        {0x7f0000000000, kHugePage, kHugePage * 4, kHugePage},
    };
    char *json = uffd_format_mappings(regions, 2);
    ASSERT_NE(json, nullptr);
    std::string text(json);
    free(json);
    EXPECT_EQ(text.front(), '[');
    EXPECT_NE(text.find("\"page_size_kib\":2097152"), std::string::npos) << text;
    EXPECT_NE(text.find("\"base_host_virt_addr\":140737479966720"), std::string::npos) << text;

    struct uffd_handshake out = EmptyHandshake();
    struct forkd_error err = {};
    ASSERT_EQ(Parse(text, &out, &err), 0) << err.message;
    ASSERT_EQ(out.region_count, 2u);
    for (int i = 0; i < 2; i++) {
        EXPECT_EQ(out.regions[i].host_base, regions[i].host_base);
        EXPECT_EQ(out.regions[i].size, regions[i].size);
        EXPECT_EQ(out.regions[i].file_offset, regions[i].file_offset);
        EXPECT_EQ(out.regions[i].page_size, regions[i].page_size);
    }
}

// ------------------------------------------------------------------ sockets and handshake

class UffdSocketTest : public testing::Test
{
  protected:
    void SetUp() override
    {
        char pattern[] = "/tmp/forkd-uffd-test-XXXXXX";
        ASSERT_NE(mkdtemp(pattern), nullptr) << strerror(errno);
        dir_ = pattern;
        path_ = dir_ + "/uffd.sock";
        struct forkd_error err = {};
        listen_.reset(uffd_listen(path_.c_str(), &err));
        ASSERT_GE(listen_.get(), 0) << err.message;
    }

    void TearDown() override
    {
        uffd_handshake_release(&handshake_);
        listen_.reset();
        unlink(path_.c_str());
        rmdir(dir_.c_str());
    }

    int Connect()
    {
        struct sockaddr_un addr = {};
        addr.sun_family = AF_UNIX;
        snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", path_.c_str());
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        EXPECT_GE(fd, 0) << strerror(errno);
        EXPECT_EQ(connect(fd, (struct sockaddr *)&addr, sizeof(addr)), 0) << strerror(errno);
        return fd;
    }

    int Accept(int timeout_ms)
    {
        uffd_handshake_release(&handshake_);
        error_ = {};
        return uffd_accept_handshake(listen_.get(), timeout_ms, &handshake_, &error_);
    }

    std::string Message() const
    {
        return error_.message;
    }

    std::string dir_;
    std::string path_;
    Fd listen_;
    struct uffd_handshake handshake_ = EmptyHandshake();
    struct forkd_error error_ = {};
};

// Sends bytes with fds attached (none when empty) in one sendmsg.
ssize_t SendRaw(int sock, const std::string &bytes, const std::vector<int> &fds)
{
    struct iovec iov = {const_cast<char *>(bytes.data()), bytes.size()};
    struct msghdr msg = {};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    std::vector<char> control;
    if (!fds.empty()) {
        control.resize(CMSG_SPACE(sizeof(int) * fds.size()));
        msg.msg_control = control.data();
        msg.msg_controllen = control.size();
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
        memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
    }
    return sendmsg(sock, &msg, MSG_NOSIGNAL);
}

// Waits until the receiver has read everything sent on sock (SIOCOUTQ: bytes not yet read), so
// that the next write cannot be merged into the same recvmsg.
bool WaitConsumed(int sock, int timeout_ms)
{
    auto start = Clock::now();
    int pending = 0;
    while (ioctl(sock, SIOCOUTQ, &pending) == 0 && pending > 0) {
        if (ElapsedMs(start) > timeout_ms)
            return false;
        std::this_thread::yield();
    }
    return pending == 0;
}

const std::string kOneRegion = "[" + RegionJson(1 << 20, 4 * kPage, 0) + "]";

TEST_F(UffdSocketTest, ListeningSocketIsCloseOnExec)
{
    EXPECT_TRUE(fcntl(listen_.get(), F_GETFD) & FD_CLOEXEC);
    struct stat st;
    ASSERT_EQ(lstat(path_.c_str(), &st), 0);
    EXPECT_TRUE(S_ISSOCK(st.st_mode));
}

TEST_F(UffdSocketTest, ListenReplacesStaleSocket)
{
    listen_.reset(); // the socket file stays behind, as after a crash
    struct forkd_error err = {};
    listen_.reset(uffd_listen(path_.c_str(), &err));
    ASSERT_GE(listen_.get(), 0) << err.message;
    Fd peer(Connect());
    EXPECT_GE(peer.get(), 0);
}

TEST_F(UffdSocketTest, ListenRefusesToReplaceARegularFile)
{
    std::string file = dir_ + "/not-a-socket";
    {
        Fd f(open(file.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600));
        ASSERT_GE(f.get(), 0);
        ASSERT_EQ(write(f.get(), "keep", 4), 4);
    }
    struct forkd_error err = {};
    EXPECT_EQ(uffd_listen(file.c_str(), &err), -EEXIST);
    EXPECT_NE(std::string(err.message).find("not a socket"), std::string::npos) << err.message;
    struct stat st;
    ASSERT_EQ(stat(file.c_str(), &st), 0);
    EXPECT_EQ(st.st_size, 4);
    unlink(file.c_str());
}

TEST_F(UffdSocketTest, ListenRejectsOverlongPath)
{
    std::string path = dir_ + "/" + std::string(200, 'x');
    struct forkd_error err = {};
    EXPECT_EQ(uffd_listen(path.c_str(), &err), -ENAMETOOLONG);
}

TEST_F(UffdSocketTest, ReceivesFdRegionsAndPeer)
{
    Fd uffd(OpenUffd(0));
    ASSERT_GE(uffd.get(), 0);
    int before = CountOpenFds();
    Fd peer(Connect());
    struct uffd_region regions[2] = {{1 << 20, 4 * kPage, 0, kPage},
                                     {1 << 24, 2 * kPage, 4 * kPage, kPage}};
    struct forkd_error err = {};
    ASSERT_EQ(uffd_send_handshake(peer.get(), uffd.get(), regions, 2, &err), 0) << err.message;

    ASSERT_EQ(Accept(kDeadlineMs), 0) << Message();
    EXPECT_TRUE(IsUserfaultfd(handshake_.uffd));
    EXPECT_NE(handshake_.uffd, uffd.get());
    EXPECT_TRUE(fcntl(handshake_.uffd, F_GETFD) & FD_CLOEXEC);
    EXPECT_TRUE(fcntl(handshake_.uffd, F_GETFL) & O_NONBLOCK);
    EXPECT_GE(handshake_.connection, 0);
    EXPECT_TRUE(fcntl(handshake_.connection, F_GETFD) & FD_CLOEXEC);
    EXPECT_EQ(handshake_.peer_pid, getpid());
    ASSERT_EQ(handshake_.region_count, 2u);
    EXPECT_EQ(handshake_.regions[1].host_base, (uint64_t)1 << 24);
    EXPECT_EQ(uffd_total_size(&handshake_), 6 * kPage);

    uffd_handshake_release(&handshake_);
    EXPECT_EQ(handshake_.uffd, -1);
    EXPECT_EQ(handshake_.connection, -1);
    peer.reset();
    EXPECT_EQ(CountOpenFds(), before);
}

// The handshake is taken from the expected process only: an earlier connection of another
// process is hung up on unread, and the wait goes on for the right one.
TEST_F(UffdSocketTest, HandshakeIsTakenFromTheExpectedProcessOnly)
{
    Fd uffd(OpenUffd(0));
    ASSERT_GE(uffd.get(), 0);
    Fd impostor(Connect());
    ASSERT_GT(SendRaw(impostor.get(), kOneRegion, {uffd.get()}), 0);
    int hold[2];
    ASSERT_EQ(0, pipe2(hold, O_CLOEXEC));
    struct sockaddr_un addr = {};
    addr.sun_family = AF_UNIX;
    snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", path_.c_str());
    pid_t child = fork();
    ASSERT_GE(child, 0);
    if (child == 0) { // the VMM: connect, send, keep the connection until told
        close(hold[1]);
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
            SendRaw(fd, kOneRegion, {uffd.get()}) <= 0)
            _exit(1);
        char byte;
        while (read(hold[0], &byte, 1) < 0 && errno == EINTR)
            ;
        _exit(0);
    }
    close(hold[0]);
    error_ = {};
    int rc = uffd_accept_handshake_from(listen_.get(), kDeadlineMs, child, &handshake_, &error_);
    EXPECT_EQ(0, rc) << Message();
    EXPECT_EQ(child, handshake_.peer_pid);
    char byte;
    ssize_t n = recv(impostor.get(), &byte, 1, 0); // EOF, or a reset: its bytes went unread
    EXPECT_TRUE(n == 0 || (n < 0 && errno == ECONNRESET)) << "the impostor was not hung up on";
    close(hold[1]);
    int status = 0;
    ASSERT_EQ(child, waitpid(child, &status, 0));
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

TEST_F(UffdSocketTest, OnlyOtherProcessesInTimeIsRefusedNamingThem)
{
    Fd uffd(OpenUffd(0));
    ASSERT_GE(uffd.get(), 0);
    Fd impostor(Connect());
    ASSERT_GT(SendRaw(impostor.get(), kOneRegion, {uffd.get()}), 0);
    error_ = {};
    int rc = uffd_accept_handshake_from(listen_.get(), 200, getppid(), &handshake_, &error_);
    EXPECT_EQ(-EPERM, rc);
    EXPECT_NE(std::string::npos, Message().find("pid " + std::to_string(getpid()))) << Message();
    EXPECT_EQ(-1, handshake_.uffd);
}

TEST_F(UffdSocketTest, ObjectFormOverSocket)
{
    Fd uffd(OpenUffd(0));
    Fd peer(Connect());
    ASSERT_GT(SendRaw(peer.get(), "{\"mappings\":" + kOneRegion + "}", {uffd.get()}), 0);
    ASSERT_EQ(Accept(kDeadlineMs), 0) << Message();
    EXPECT_EQ(handshake_.region_count, 1u);
}

TEST_F(UffdSocketTest, MessageSplitAcrossTwoWrites)
{
    // The fd's chunk ends a stream read, so the second write is always a second recvmsg.
    Fd uffd(OpenUffd(0));
    Fd peer(Connect());
    size_t half = kOneRegion.size() / 2;
    ASSERT_GT(SendRaw(peer.get(), kOneRegion.substr(0, half), {uffd.get()}), 0);
    ASSERT_GT(SendRaw(peer.get(), kOneRegion.substr(half), {}), 0);
    ASSERT_EQ(Accept(kDeadlineMs), 0) << Message();
    EXPECT_EQ(handshake_.region_count, 1u);
}

TEST_F(UffdSocketTest, RestOfMessageArrivesWhileWaiting)
{
    Fd uffd(OpenUffd(0));
    Fd peer(Connect());
    size_t cut = 7;
    ASSERT_GT(SendRaw(peer.get(), kOneRegion.substr(0, cut), {uffd.get()}), 0);
    std::atomic<bool> consumed{false};
    std::thread late([&] {
        consumed = WaitConsumed(peer.get(), kDeadlineMs);
        SendRaw(peer.get(), kOneRegion.substr(cut), {});
    });
    int r = Accept(kDeadlineMs);
    late.join();
    EXPECT_TRUE(consumed);
    ASSERT_EQ(r, 0) << Message();
}

TEST_F(UffdSocketTest, RejectsMessageWithoutFd)
{
    int before = CountOpenFds();
    Fd peer(Connect());
    ASSERT_GT(SendRaw(peer.get(), kOneRegion, {}), 0);
    EXPECT_EQ(Accept(kDeadlineMs), -EPROTO);
    EXPECT_NE(Message().find("no file descriptor"), std::string::npos) << Message();
    EXPECT_EQ(handshake_.uffd, -1);
    EXPECT_EQ(handshake_.connection, -1);
    peer.reset();
    EXPECT_EQ(CountOpenFds(), before);
}

TEST_F(UffdSocketTest, RejectsTwoFdsAndClosesBoth)
{
    Fd uffd(OpenUffd(0));
    Fd other(OpenUffd(0));
    Fd peer(Connect());
    int before = CountOpenFds();
    ASSERT_GT(SendRaw(peer.get(), kOneRegion, {uffd.get(), other.get()}), 0);
    EXPECT_EQ(Accept(kDeadlineMs), -EPROTO);
    EXPECT_NE(Message().find("2 file descriptors"), std::string::npos) << Message();
    EXPECT_EQ(CountOpenFds(), before); // both received copies closed
}

TEST_F(UffdSocketTest, RejectsManyFdsAndClosesEveryOne)
{
    Fd uffd(OpenUffd(0));
    Fd peer(Connect());
    int before = CountOpenFds();
    std::vector<int> fds(20, uffd.get()); // more than the control buffer holds: MSG_CTRUNC
    ASSERT_GT(SendRaw(peer.get(), kOneRegion, fds), 0);
    EXPECT_EQ(Accept(kDeadlineMs), -EPROTO);
    EXPECT_NE(Message().find("MSG_CTRUNC"), std::string::npos) << Message();
    EXPECT_EQ(CountOpenFds(), before);
}

TEST_F(UffdSocketTest, RejectsFdAfterTheFirstBytes)
{
    Fd uffd(OpenUffd(0));
    int before = CountOpenFds();
    Fd peer(Connect());
    // Sent together, the kernel would hand both chunks and the fd to one recvmsg.
    ASSERT_GT(SendRaw(peer.get(), kOneRegion.substr(0, 5), {}), 0);
    std::atomic<bool> consumed{false};
    std::thread late([&] {
        consumed = WaitConsumed(peer.get(), kDeadlineMs);
        SendRaw(peer.get(), kOneRegion.substr(5), {uffd.get()});
    });
    EXPECT_EQ(Accept(kDeadlineMs), -EPROTO);
    late.join();
    EXPECT_TRUE(consumed);
    EXPECT_NE(Message().find("no file descriptor"), std::string::npos) << Message();
    peer.reset(); // drops the fd still queued on the connection
    EXPECT_EQ(CountOpenFds(), before);
}

TEST_F(UffdSocketTest, RejectsAnFdThatIsNotAUserfaultfd)
{
    int pipe_fds[2];
    ASSERT_EQ(pipe2(pipe_fds, O_CLOEXEC), 0);
    Fd read_end(pipe_fds[0]), write_end(pipe_fds[1]);
    Fd peer(Connect());
    int before = CountOpenFds();
    ASSERT_GT(SendRaw(peer.get(), kOneRegion, {read_end.get()}), 0);
    EXPECT_EQ(Accept(kDeadlineMs), -EBADF);
    EXPECT_NE(Message().find("not a userfaultfd"), std::string::npos) << Message();
    EXPECT_EQ(CountOpenFds(), before);
}

TEST_F(UffdSocketTest, RejectsGarbageWithoutWaitingForTheTimeout)
{
    Fd uffd(OpenUffd(0));
    int before = CountOpenFds();
    for (const std::string &garbage : std::vector<std::string>{
             "hello", "[1,2}", "\"[]\"", "[{\"size\":4096}] trailing", std::string(3, '\0')}) {
        Fd peer(Connect());
        ASSERT_GT(SendRaw(peer.get(), garbage, {uffd.get()}), 0);
        auto start = Clock::now();
        EXPECT_EQ(Accept(kDeadlineMs), -EINVAL) << garbage;
        EXPECT_LT(ElapsedMs(start), kDeadlineMs / 2) << garbage; // the peer stays connected
    }
    EXPECT_EQ(CountOpenFds(), before);
}

TEST_F(UffdSocketTest, RejectsInvalidRegionNamingIt)
{
    Fd uffd(OpenUffd(0));
    Fd peer(Connect());
    ASSERT_GT(SendRaw(peer.get(), "[" + RegionJson(1 << 20, 0, 0) + "]", {uffd.get()}), 0);
    EXPECT_EQ(Accept(kDeadlineMs), -EINVAL);
    EXPECT_NE(Message().find("region 0: \"size\" is 0"), std::string::npos) << Message();
    EXPECT_EQ(handshake_.uffd, -1);
}

TEST_F(UffdSocketTest, PeerClosingMidMessageIsConnectionReset)
{
    Fd uffd(OpenUffd(0));
    int before = CountOpenFds();
    Fd peer(Connect());
    ASSERT_GT(SendRaw(peer.get(), "[{\"base_host_virt_addr\":", {uffd.get()}), 0);
    peer.reset();
    EXPECT_EQ(Accept(kDeadlineMs), -ECONNRESET);
    EXPECT_NE(Message().find("closed the connection after 24 bytes"), std::string::npos)
        << Message();
    EXPECT_EQ(CountOpenFds(), before);
}

TEST_F(UffdSocketTest, PeerClosingWithoutSendingIsConnectionReset)
{
    Fd peer(Connect());
    peer.reset();
    EXPECT_EQ(Accept(kDeadlineMs), -ECONNRESET);
}

// A message of n bytes: one region padded with spaces inside the array.
std::string PaddedMessage(size_t n)
{
    std::string region = RegionJson(1 << 20, kPage, 0);
    std::string json = "[" + region;
    json += std::string(n - json.size() - 1, ' ');
    return json + "]";
}

TEST_F(UffdSocketTest, AcceptsMessageOfExactlyTheLimit)
{
    Fd uffd(OpenUffd(0));
    Fd peer(Connect());
    std::string json = PaddedMessage(UFFD_HANDSHAKE_MAX_BYTES);
    ASSERT_EQ(SendRaw(peer.get(), json, {uffd.get()}), (ssize_t)json.size());
    ASSERT_EQ(Accept(kDeadlineMs), 0) << Message();
}

TEST_F(UffdSocketTest, RejectsOversizeMessage)
{
    Fd uffd(OpenUffd(0));
    int before = CountOpenFds();
    for (size_t size : {(size_t)UFFD_HANDSHAKE_MAX_BYTES + 1, (size_t)200 * 1024}) {
        Fd peer(Connect());
        std::string json = PaddedMessage(size);
        // A large write may not fit the socket buffer before we read: send from a thread.
        std::thread sender([&] { SendRaw(peer.get(), json, {uffd.get()}); });
        EXPECT_EQ(Accept(kDeadlineMs), -EMSGSIZE) << size;
        EXPECT_NE(Message().find("over 65536 bytes"), std::string::npos) << Message();
        shutdown(peer.get(), SHUT_RDWR); // unblocks a sender whose peer went away
        sender.join();
    }
    EXPECT_EQ(CountOpenFds(), before);
}

TEST_F(UffdSocketTest, SilentPeerTimesOut)
{
    Fd peer(Connect());
    auto start = Clock::now();
    EXPECT_EQ(Accept(300), -ETIMEDOUT);
    long long elapsed = ElapsedMs(start);
    EXPECT_GE(elapsed, 250);
    EXPECT_LT(elapsed, 3000);
    EXPECT_NE(Message().find("sent nothing within 300 ms"), std::string::npos) << Message();
}

TEST_F(UffdSocketTest, IncompleteMessageTimesOutAndClosesTheFd)
{
    Fd uffd(OpenUffd(0));
    Fd peer(Connect());
    int before = CountOpenFds();
    ASSERT_GT(SendRaw(peer.get(), "[{\"size\":", {uffd.get()}), 0);
    auto start = Clock::now();
    EXPECT_EQ(Accept(300), -ETIMEDOUT);
    EXPECT_LT(ElapsedMs(start), 3000);
    EXPECT_NE(Message().find("incomplete after 9 bytes"), std::string::npos) << Message();
    EXPECT_EQ(CountOpenFds(), before);
}

TEST_F(UffdSocketTest, NoPeerTimesOut)
{
    auto start = Clock::now();
    EXPECT_EQ(Accept(200), -ETIMEDOUT);
    long long elapsed = ElapsedMs(start);
    EXPECT_GE(elapsed, 150);
    EXPECT_LT(elapsed, 3000);
    EXPECT_NE(Message().find("no VMM connected within 200 ms"), std::string::npos) << Message();
}

TEST_F(UffdSocketTest, SendRefusesMissingUffd)
{
    Fd peer(Connect());
    struct uffd_region region = {1 << 20, kPage, 0, kPage};
    struct forkd_error err = {};
    EXPECT_EQ(uffd_send_handshake(peer.get(), -1, &region, 1, &err), -EBADF);
}

TEST_F(UffdSocketTest, BlockingUffdIsMadeNonBlocking)
{
    // poll() on a blocking userfaultfd always says POLLERR, and read() on it waits.
    Fd blocking(OpenUffd(0, O_CLOEXEC));
    ASSERT_GE(blocking.get(), 0);
    EXPECT_EQ(uffd_wait(blocking.get(), -1, 0), -EINVAL);
    Fd peer(Connect());
    ASSERT_GT(SendRaw(peer.get(), kOneRegion, {blocking.get()}), 0);
    ASSERT_EQ(Accept(kDeadlineMs), 0) << Message();
    ASSERT_TRUE(fcntl(handshake_.uffd, F_GETFL) & O_NONBLOCK);
    struct uffd_msg messages[4];
    struct forkd_error err = {};
    EXPECT_EQ(uffd_read_events(handshake_.uffd, messages, 4, &err), 0) << err.message;
    EXPECT_EQ(uffd_wait(handshake_.uffd, -1, 0), 0);
}

// ------------------------------------------------------------------ write-protect on real memory

// Writes one byte to each address in order, on its own thread (a write to a protected page
// blocks until the page is unprotected), and signals an eventfd when all are done.
class Writer
{
  public:
    Writer(std::vector<volatile char *> addresses, char value)
        : done_(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK))
    {
        thread_ = std::thread([this, addresses, value] {
            for (volatile char *p : addresses)
                *p = value;
            uint64_t one = 1;
            if (write(done_.get(), &one, sizeof(one)) != sizeof(one))
                abort();
        });
    }
    ~Writer()
    {
        thread_.join();
    }
    bool WaitDone(int timeout_ms)
    {
        struct pollfd pfd = {done_.get(), POLLIN, 0};
        return poll(&pfd, 1, timeout_ms) == 1;
    }

  private:
    Fd done_;
    std::thread thread_;
};

class UffdWriteProtectTest : public UffdSocketTest
{
  protected:
    static constexpr size_t kPages = 64;

    void SetUp() override
    {
        UffdSocketTest::SetUp();
        Fd owner(OpenUffd(UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM));
        ASSERT_GE(owner.get(), 0);
        anon_ = Map(-1);
        ASSERT_NE(anon_, nullptr);
        memset(anon_, 0, kPages * kPage); // anonymous WP skips never-touched pages
        memfd_.reset(memfd_create("forkd-uffd-test", MFD_CLOEXEC));
        ASSERT_GE(memfd_.get(), 0) << strerror(errno);
        ASSERT_EQ(ftruncate(memfd_.get(), kPages * kPage), 0);
        shared_ = Map(memfd_.get()); // left unpopulated: shmem WP covers empty ptes
        ASSERT_NE(shared_, nullptr);
        ASSERT_NO_FATAL_FAILURE(Register(owner.get(), anon_));
        ASSERT_NO_FATAL_FAILURE(Register(owner.get(), shared_));

        struct uffd_region regions[2] = {{Addr(anon_), kPages * kPage, 0, kPage},
                                         {Addr(shared_), kPages * kPage, kPages * kPage, kPage}};
        peer_.reset(Connect());
        struct forkd_error err = {};
        ASSERT_EQ(uffd_send_handshake(peer_.get(), owner.get(), regions, 2, &err), 0)
            << err.message;
        ASSERT_EQ(Accept(kDeadlineMs), 0) << Message();
        // From here on only the received fd is used, as forkd uses the VMM's.
    }

    void TearDown() override
    {
        // Release any writer a failed test left blocked, then join it.
        struct forkd_error err = {};
        if (handshake_.uffd >= 0) {
            uffd_write_protect(handshake_.uffd, Addr(anon_), kPages * kPage, kPage, false, false,
                               &err);
            uffd_write_protect(handshake_.uffd, Addr(shared_), kPages * kPage, kPage, false, false,
                               &err);
        }
        writers_.clear();
        if (anon_)
            munmap(anon_, kPages * kPage);
        if (shared_)
            munmap(shared_, kPages * kPage);
        UffdSocketTest::TearDown();
    }

    static char *Map(int fd)
    {
        void *p = mmap(nullptr, kPages * kPage, PROT_READ | PROT_WRITE,
                       fd < 0 ? MAP_PRIVATE | MAP_ANONYMOUS : MAP_SHARED, fd, 0);
        return p == MAP_FAILED ? nullptr : static_cast<char *>(p);
    }

    static uint64_t Addr(const void *p)
    {
        return (uint64_t)(uintptr_t)p;
    }

    static void Register(int uffd, char *base)
    {
        struct uffdio_register reg = {};
        reg.range.start = Addr(base);
        reg.range.len = kPages * kPage;
        reg.mode = UFFDIO_REGISTER_MODE_WP;
        ASSERT_EQ(ioctl(uffd, UFFDIO_REGISTER, &reg), 0)
            << "UFFDIO_REGISTER WP: " << strerror(errno);
    }

    int Protect(char *address, size_t pages, bool protect, bool dont_wake = false)
    {
        error_ = {};
        return uffd_write_protect(handshake_.uffd, Addr(address), pages * kPage, kPage, protect,
                                  dont_wake, &error_);
    }

    Writer &StartWriter(std::vector<volatile char *> addresses, char value)
    {
        writers_.push_back(std::make_unique<Writer>(std::move(addresses), value));
        return *writers_.back();
    }

    // Waits for the next message and checks it is a WP write fault in the page at page.
    void ExpectWpFault(const char *page)
    {
        ASSERT_EQ(uffd_wait(handshake_.uffd, -1, kDeadlineMs), 1) << "no fault within deadline";
        struct uffd_msg message;
        struct forkd_error err = {};
        ASSERT_EQ(uffd_read_events(handshake_.uffd, &message, 1, &err), 1) << err.message;
        ASSERT_EQ(message.event, UFFD_EVENT_PAGEFAULT);
        EXPECT_EQ(message.arg.pagefault.flags & kWriteWp, kWriteWp);
        EXPECT_TRUE(uffd_is_wp_fault(&message));
        EXPECT_EQ(message.arg.pagefault.address & ~(kPage - 1), Addr(page));
    }

    void ExpectNoEvents()
    {
        struct uffd_msg messages[4];
        struct forkd_error err = {};
        EXPECT_EQ(uffd_read_events(handshake_.uffd, messages, 4, &err), 0) << err.message;
    }

    char *anon_ = nullptr;
    char *shared_ = nullptr;
    Fd memfd_;
    Fd peer_;
    std::vector<std::unique_ptr<Writer>> writers_;
};

TEST_F(UffdWriteProtectTest, FaultThenUnprotectExactlyThatPage)
{
    ASSERT_EQ(Protect(anon_, kPages, true), 0) << Message();
    ASSERT_EQ(Protect(shared_, kPages, true), 0) << Message();
    ExpectNoEvents();

    char *anon_page = anon_ + 3 * kPage;
    char *shared_page = shared_ + 5 * kPage;
    Writer &first = StartWriter({anon_page + 100, shared_page + 200}, 0x11);
    ASSERT_NO_FATAL_FAILURE(ExpectWpFault(anon_page));
    EXPECT_FALSE(first.WaitDone(0)); // blocked in the fault
    ASSERT_EQ(Protect(anon_page, 1, false), 0) << Message();
    ASSERT_NO_FATAL_FAILURE(ExpectWpFault(shared_page));
    ASSERT_EQ(Protect(shared_page, 1, false), 0) << Message();
    ASSERT_TRUE(first.WaitDone(kDeadlineMs));
    EXPECT_EQ(anon_page[100], 0x11);
    EXPECT_EQ(shared_page[200], 0x11);

    // The unprotected pages no longer fault; their neighbours still do.
    Writer &again = StartWriter({anon_page + 1, shared_page + 2}, 0x22);
    ASSERT_TRUE(again.WaitDone(kDeadlineMs));
    ExpectNoEvents();

    Writer &others = StartWriter({anon_page + kPage, shared_page - kPage}, 0x33);
    ASSERT_NO_FATAL_FAILURE(ExpectWpFault(anon_page + kPage));
    ASSERT_EQ(Protect(anon_page + kPage, 1, false), 0) << Message();
    ASSERT_NO_FATAL_FAILURE(ExpectWpFault(shared_page - kPage));
    ASSERT_EQ(Protect(shared_page - kPage, 1, false), 0) << Message();
    ASSERT_TRUE(others.WaitDone(kDeadlineMs));
}

TEST_F(UffdWriteProtectTest, DontWakeLeavesTheWriterForUffdWake)
{
    ASSERT_EQ(Protect(anon_, kPages, true), 0) << Message();
    Writer &writer = StartWriter({anon_}, 0x44);
    ASSERT_NO_FATAL_FAILURE(ExpectWpFault(anon_));
    ASSERT_EQ(Protect(anon_, 1, false, true), 0) << Message();
    // Nothing will wake it but uffd_wake: a short look suffices to see it still waits.
    EXPECT_FALSE(writer.WaitDone(100));
    struct forkd_error err = {};
    ASSERT_EQ(uffd_wake(handshake_.uffd, Addr(anon_), kPage, &err), 0) << err.message;
    ASSERT_TRUE(writer.WaitDone(kDeadlineMs));
    ExpectNoEvents(); // the retried write found the page writable
}

TEST_F(UffdWriteProtectTest, RefusesUnalignedRangesAndDoesNothing)
{
    ASSERT_EQ(Protect(anon_, kPages, true), 0) << Message();
    const uint64_t base = Addr(anon_);
    struct {
        uint64_t address, length, page_size;
    } bad[] = {
        {base + 1, kPage, kPage},
        {base, 100, kPage},
        {base, 0, kPage},
        {base, kPage, 0},
        {base, 3 * kPage, 3 * kPage},
        {base + kPage, kHugePage, kHugePage},
    };
    for (const auto &b : bad) {
        struct forkd_error err = {};
        EXPECT_EQ(uffd_write_protect(handshake_.uffd, b.address, b.length, b.page_size, false,
                                     false, &err),
                  -EINVAL);
        char expected[128];
        snprintf(expected, sizeof(expected), "UFFDIO_WRITEPROTECT [0x%" PRIx64 "+0x%" PRIx64 ")",
                 b.address, b.length);
        EXPECT_EQ(std::string(err.message).rfind(expected, 0), 0u) << err.message;
        EXPECT_NE(std::string(err.message).find("not aligned"), std::string::npos);
    }
    // Still protected: the refused unprotects did nothing.
    StartWriter({anon_}, 0x55);
    ASSERT_NO_FATAL_FAILURE(ExpectWpFault(anon_));
    ASSERT_EQ(Protect(anon_, 1, false), 0) << Message();
    ASSERT_TRUE(writers_.back()->WaitDone(kDeadlineMs));
}

TEST_F(UffdWriteProtectTest, KernelErrorNamesIoctlRangeAndErrno)
{
    // Memory of this process that is not registered with the uffd.
    char *stray = Map(-1);
    ASSERT_NE(stray, nullptr);
    struct forkd_error err = {};
    int r = uffd_write_protect(handshake_.uffd, Addr(stray), kPage, kPage, true, false, &err);
    munmap(stray, kPages * kPage);
    ASSERT_LT(r, 0);
    EXPECT_EQ(err.code, r);
    char expected[160];
    snprintf(expected, sizeof(expected), "UFFDIO_WRITEPROTECT [0x%" PRIx64 "+0x1000) protect: %s",
             Addr(stray), strerror(-r));
    EXPECT_EQ(std::string(err.message).rfind(expected, 0), 0u) << err.message;
}

TEST_F(UffdWriteProtectTest, WaitTimesOutStopsAndSeesFaults)
{
    auto start = Clock::now();
    EXPECT_EQ(uffd_wait(handshake_.uffd, -1, 50), 0);
    EXPECT_GE(ElapsedMs(start), 40);
    EXPECT_EQ(uffd_wait_peer(handshake_.uffd, handshake_.connection, -1, 0), 0);

    Fd stop(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    uint64_t one = 1;
    ASSERT_EQ(write(stop.get(), &one, sizeof(one)), (ssize_t)sizeof(one));
    start = Clock::now();
    EXPECT_EQ(uffd_wait(handshake_.uffd, stop.get(), -1), 0);
    EXPECT_LT(ElapsedMs(start), 1000);

    ASSERT_EQ(Protect(shared_, 1, true), 0) << Message();
    StartWriter({shared_}, 0x66);
    // A stop request wins over a pending fault; without it the fault is reported.
    ASSERT_EQ(uffd_wait(handshake_.uffd, -1, kDeadlineMs), 1);
    EXPECT_EQ(uffd_wait(handshake_.uffd, stop.get(), kDeadlineMs), 0);
    EXPECT_EQ(uffd_wait_peer(handshake_.uffd, handshake_.connection, -1, kDeadlineMs), 1);
    ASSERT_NO_FATAL_FAILURE(ExpectWpFault(shared_));
    ASSERT_EQ(Protect(shared_, 1, false), 0) << Message();
    ASSERT_TRUE(writers_.back()->WaitDone(kDeadlineMs));
}

TEST_F(UffdWriteProtectTest, WaitPeerSeesTheVmmHangUp)
{
    peer_.reset();
    auto start = Clock::now();
    EXPECT_EQ(uffd_wait_peer(handshake_.uffd, handshake_.connection, -1, kDeadlineMs), -EPIPE);
    EXPECT_LT(ElapsedMs(start), 1000);
}

TEST_F(UffdWriteProtectTest, ReadEventsEdgeCases)
{
    struct uffd_msg message;
    struct forkd_error err = {};
    EXPECT_EQ(uffd_read_events(handshake_.uffd, &message, 0, &err), 0);
    EXPECT_EQ(uffd_read_events(handshake_.uffd, &message, 1, &err), 0);
    EXPECT_EQ(uffd_read_events(-1, &message, 1, &err), -EBADF);
    EXPECT_NE(std::string(err.message).find("read userfaultfd"), std::string::npos);
    int closed = dup(handshake_.uffd);
    close(closed);
    EXPECT_EQ(uffd_wait(closed, -1, 0), -EBADF);
}

TEST(UffdEvents, IsWpFault)
{
    struct uffd_msg message = {};
    message.event = UFFD_EVENT_PAGEFAULT;
    message.arg.pagefault.flags = kWriteWp;
    EXPECT_TRUE(uffd_is_wp_fault(&message));
    message.arg.pagefault.flags = UFFD_PAGEFAULT_FLAG_WRITE; // a missing-page write
    EXPECT_FALSE(uffd_is_wp_fault(&message));
    message = {};
    message.event = UFFD_EVENT_REMOVE;
    message.arg.pagefault.flags = kWriteWp; // the union's bytes mean something else here
    EXPECT_FALSE(uffd_is_wp_fault(&message));
}

// One WP fault round trip: the writer faults, this thread reads the message and unprotects.
TEST_F(UffdWriteProtectTest, MeasuresFaultRoundTrip)
{
    ASSERT_EQ(Protect(anon_, kPages, true), 0) << Message();
    ASSERT_EQ(Protect(shared_, kPages, true), 0) << Message();
    std::vector<volatile char *> pages;
    for (size_t i = 0; i < kPages; i++) {
        pages.push_back(anon_ + i * kPage);
        pages.push_back(shared_ + i * kPage);
    }
    Writer &writer = StartWriter(pages, 0x77);
    Clock::time_point start; // from the first fault, leaving out the thread's start
    size_t handled = 0;
    struct uffd_msg messages[8];
    struct forkd_error err = {};
    while (handled < pages.size()) {
        ASSERT_EQ(uffd_wait(handshake_.uffd, -1, kDeadlineMs), 1) << "after " << handled;
        int n = uffd_read_events(handshake_.uffd, messages, 8, &err);
        ASSERT_GE(n, 0) << err.message;
        if (handled == 0)
            start = Clock::now();
        for (int i = 0; i < n; i++) {
            ASSERT_TRUE(uffd_is_wp_fault(&messages[i]));
            uint64_t page = messages[i].arg.pagefault.address & ~(kPage - 1);
            ASSERT_EQ(uffd_write_protect(handshake_.uffd, page, kPage, kPage, false, false, &err),
                      0)
                << err.message;
            handled++;
        }
    }
    ASSERT_TRUE(writer.WaitDone(kDeadlineMs));
    double per_fault_us =
        std::chrono::duration<double, std::micro>(Clock::now() - start).count() / (handled - 1);
    RecordProperty("wp_fault_round_trip_us", std::to_string(per_fault_us));
    printf("[ info     ] %zu WP faults, %.1f us per round trip (poll + read + unprotect)\n",
           handled, per_fault_us);
}

// ------------------------------------------------------------------ the VMM dies

// The child plays the VMM: it owns the memory and the uffd, hands it over, then faults.
[[noreturn]] void RunChildVmm(const std::string &socket_path, int go_fd, int go_write_fd,
                              int status_fd)
{
    close(go_write_fd); // so that the parent closing its end reads as EOF here
    int uffd = OpenUffd(UFFD_FEATURE_PAGEFAULT_FLAG_WP);
    void *p = mmap(nullptr, 4 * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (uffd < 0 || p == MAP_FAILED)
        _exit(10);
    char *memory = static_cast<char *>(p);
    memset(memory, 0, 4 * kPage);
    struct uffdio_register reg = {};
    reg.range = {(uint64_t)(uintptr_t)memory, 4 * kPage};
    reg.mode = UFFDIO_REGISTER_MODE_WP;
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        _exit(11);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {};
    addr.sun_family = AF_UNIX;
    snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", socket_path.c_str());
    if (connect(sock, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        _exit(12);
    struct uffd_region region = {(uint64_t)(uintptr_t)memory, 4 * kPage, 0, kPage};
    if (uffd_send_handshake(sock, uffd, &region, 1, nullptr) < 0)
        _exit(13);
    char byte;
    if (read(go_fd, &byte, 1) != 1) // the parent has armed write-protect
        _exit(14);
    memory[kPage] = 1; // faults; the parent unprotects
    if (write(status_fd, "w", 1) != 1)
        _exit(15);
    (void)!read(go_fd, &byte, 1);
    memory[2 * kPage] = 2; // faults; the parent kills us here
    _exit(0);
}

TEST_F(UffdSocketTest, VmmDeathIsSeenWithoutHanging)
{
    int go[2], status[2];
    ASSERT_EQ(pipe2(go, O_CLOEXEC), 0);
    ASSERT_EQ(pipe2(status, O_CLOEXEC), 0);
    Fd go_read(go[0]), go_write(go[1]), status_read(status[0]), status_write(status[1]);
    pid_t child = fork();
    ASSERT_GE(child, 0);
    if (child == 0)
        RunChildVmm(path_, go_read.get(), go_write.get(), status_write.get());
    status_write.reset();
    go_read.reset();

    ASSERT_EQ(Accept(kDeadlineMs), 0) << Message();
    EXPECT_EQ(handshake_.peer_pid, child);
    const uint64_t base = handshake_.regions[0].host_base;
    const int uffd = handshake_.uffd, connection = handshake_.connection;
    struct forkd_error err = {};
    // Range operations reach into the child's address space through the received fd.
    ASSERT_EQ(uffd_write_protect(uffd, base, 4 * kPage, kPage, true, false, &err), 0)
        << err.message;
    ASSERT_EQ(write(go_write.get(), "g", 1), 1);
    struct uffd_msg message;
    ASSERT_EQ(uffd_wait_peer(uffd, connection, -1, kDeadlineMs), 1);
    ASSERT_EQ(uffd_read_events(uffd, &message, 1, &err), 1) << err.message;
    EXPECT_TRUE(uffd_is_wp_fault(&message));
    EXPECT_EQ(message.arg.pagefault.address & ~(kPage - 1), base + kPage);
    ASSERT_EQ(uffd_write_protect(uffd, base + kPage, kPage, kPage, false, false, &err), 0);
    struct pollfd pfd = {status_read.get(), POLLIN, 0};
    ASSERT_EQ(poll(&pfd, 1, kDeadlineMs), 1) << "the child's write did not complete";

    go_write.reset(); // the child writes again and blocks in the fault
    ASSERT_EQ(uffd_wait_peer(uffd, connection, -1, kDeadlineMs), 1);
    ASSERT_EQ(uffd_read_events(uffd, &message, 1, &err), 1) << err.message;
    EXPECT_EQ(message.arg.pagefault.address & ~(kPage - 1), base + 2 * kPage);
    ASSERT_EQ(kill(child, SIGKILL), 0);
    int wstatus = 0;
    ASSERT_EQ(waitpid(child, &wstatus, 0), child); // SIGKILL ends even a thread in a fault
    EXPECT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL) << wstatus;

    auto start = Clock::now();
    EXPECT_EQ(uffd_wait_peer(uffd, connection, -1, kDeadlineMs), -EPIPE);
    int r = uffd_wait(uffd, -1, 100); // the uffd itself says nothing of its owner's death
    EXPECT_TRUE(r == 0 || r == -EPIPE) << r;
    EXPECT_EQ(uffd_read_events(uffd, &message, 1, &err), 0) << err.message;
    r = uffd_write_protect(uffd, base, kPage, kPage, false, false, &err);
    EXPECT_LT(r, 0);
    EXPECT_NE(std::string(err.message).find("UFFDIO_WRITEPROTECT"), std::string::npos);
    EXPECT_LT(ElapsedMs(start), 2000);
}

} // namespace
