// Test-side helpers for forkd-testvm (see vmm_test_client.h).
#include "vmm_test_client.h"

#include <fcntl.h>
#include <ftw.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include <gtest/gtest.h>

#include "test_time.h"

extern "C" {
#include <linux/userfaultfd.h>
}

namespace forkd_testvm
{

namespace
{

constexpr int kResponseTimeoutMs = 60000;

std::string errno_text(const char *what)
{
    return std::string(what) + ": " + std::strerror(errno);
}

int remove_entry(const char *path, const struct stat *, int, struct FTW *)
{
    return remove(path);
}

bool wait_readable(int fd, int timeout_ms)
{
    struct pollfd pfd = {fd, POLLIN, 0};
    int r;
    do {
        r = poll(&pfd, 1, timeout_ms);
    } while (r < 0 && errno == EINTR);
    return r > 0;
}

int connect_unix(const std::string &path)
{
    struct sockaddr_un addr = {};
    addr.sun_family = AF_UNIX;
    if (path.size() >= sizeof(addr.sun_path))
        throw std::runtime_error("socket path too long: " + path);
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        throw std::runtime_error(errno_text("socket"));
    if (connect(fd, reinterpret_cast<struct sockaddr *>(&addr), sizeof(addr)) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

} // namespace

std::string Json::string(const char *name) const
{
    const cJSON *item = get(name);
    return cJSON_IsString(item) ? item->valuestring : "";
}

double Json::number(const char *name) const
{
    const cJSON *item = get(name);
    return cJSON_IsNumber(item) ? item->valuedouble : -1;
}

TempDir::TempDir()
{
    char pattern[] = "/tmp/forkd-testvm-XXXXXX";
    if (!mkdtemp(pattern))
        throw std::runtime_error(errno_text("mkdtemp"));
    path_ = pattern;
}

TempDir::~TempDir()
{
    nftw(path_.c_str(), remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

ApiClient::ApiClient(const std::string &socket_path)
{
    fd_ = connect_unix(socket_path);
    if (fd_ < 0)
        throw std::runtime_error(errno_text(("connect " + socket_path).c_str()));
}

ApiClient::~ApiClient()
{
    if (fd_ >= 0)
        close(fd_);
}

void ApiClient::send_only(const std::string &bytes)
{
    if (!send_until_closed(bytes))
        throw std::runtime_error(errno_text("send"));
}

// Sends all of bytes; false when the VMM closed the connection first (it may answer an oversized
// request before reading all of it, and its answer is then waiting in the socket).
bool ApiClient::send_until_closed(const std::string &bytes)
{
    size_t done = 0;
    while (done < bytes.size()) {
        ssize_t n = send(fd_, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EPIPE || errno == ECONNRESET))
            return false;
        if (n < 0)
            throw std::runtime_error(errno_text("send"));
        done += static_cast<size_t>(n);
    }
    return true;
}

HttpResponse ApiClient::read_response()
{
    HttpResponse response;
    size_t header_end;
    char chunk[4096];

    auto fill = [&]() {
        if (!wait_readable(fd_, scaled_ms(kResponseTimeoutMs)))
            throw std::runtime_error("timed out waiting for the VMM to answer");
        ssize_t n = recv(fd_, chunk, sizeof(chunk), 0);
        if (n < 0)
            throw std::runtime_error(errno_text("recv"));
        pending_.append(chunk, static_cast<size_t>(n));
        return n > 0;
    };
    while ((header_end = pending_.find("\r\n\r\n")) == std::string::npos)
        if (!fill())
            return response; // closed: status 0
    std::string head = pending_.substr(0, header_end);
    if (std::sscanf(head.c_str(), "HTTP/1.1 %d", &response.status) != 1)
        throw std::runtime_error("malformed status line: " + head);
    size_t length = 0;
    std::istringstream lines(head);
    for (std::string line; std::getline(lines, line);)
        if (strncasecmp(line.c_str(), "Content-Length:", 15) == 0)
            length = std::stoul(line.substr(15));
    while (pending_.size() < header_end + 4 + length)
        if (!fill())
            throw std::runtime_error("connection closed inside a response body");
    response.body = pending_.substr(header_end + 4, length);
    pending_.erase(0, header_end + 4 + length);
    return response;
}

HttpResponse ApiClient::raw(const std::string &bytes)
{
    send_until_closed(bytes);
    return read_response();
}

HttpResponse ApiClient::request(const std::string &method, const std::string &path,
                                const std::string &body)
{
    std::string text = method + " " + path + " HTTP/1.1\r\nHost: localhost\r\n";
    if (!body.empty())
        text += "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
                "\r\n";
    text += "\r\n" + body;
    return raw(text);
}

TestVmm::TestVmm(const std::string &dir, std::vector<std::string> extra_args)
    : dir_(dir), socket_path_(dir + "/api.sock"), log_path_(dir + "/vmm.log")
{
    std::vector<std::string> args = {FORKD_TESTVM_PATH, "--api-sock", socket_path_, "--id",
                                     "test-vm"};
    args.insert(args.end(), extra_args.begin(), extra_args.end());
    pid_ = fork();
    if (pid_ < 0)
        throw std::runtime_error(errno_text("fork"));
    if (pid_ == 0) {
        int log = open(log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
        if (log >= 0) {
            dup2(log, 1);
            dup2(log, 2);
        }
        std::vector<char *> argv;
        for (auto &a : args)
            argv.push_back(const_cast<char *>(a.c_str()));
        argv.push_back(nullptr);
        execv(argv[0], argv.data());
        _exit(127);
    }
    auto deadline = Clock::now() + scaled(std::chrono::seconds(10));
    while (Clock::now() < deadline && alive()) {
        int fd = connect_unix(socket_path_);
        if (fd >= 0) {
            close(fd);
            api_ = new ApiClient(socket_path_);
            return;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    throw std::runtime_error("forkd-testvm did not come up: " + log());
}

TestVmm::~TestVmm()
{
    delete api_;
    if (pid_ > 0) {
        kill(pid_, SIGKILL);
        waitpid(pid_, nullptr, 0);
    }
}

bool TestVmm::alive()
{
    if (pid_ <= 0)
        return false;
    int status;
    pid_t r = waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
        pid_ = -1;
        return false;
    }
    return true;
}

std::string TestVmm::log() const
{
    std::ifstream in(log_path_);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
}

void TestVmm::boot(unsigned vcpus, unsigned mem_mib, const std::string &boot_args)
{
    auto r = api().request("PUT", "/machine-config",
                           "{\"vcpu_count\":" + std::to_string(vcpus) +
                               ",\"mem_size_mib\":" + std::to_string(mem_mib) + "}");
    ASSERT_EQ(r.status, 204) << r.body;
    r = api().request("PUT", "/boot-source",
                      std::string("{\"kernel_image_path\":\"") + FORKD_GUEST_PATH +
                          "\",\"boot_args\":\"" + boot_args + "\"}");
    ASSERT_EQ(r.status, 204) << r.body;
    r = api().request("PUT", "/actions", R"({"action_type":"InstanceStart"})");
    ASSERT_EQ(r.status, 204) << r.body;
}

void TestVmm::pause()
{
    auto r = api().request("PATCH", "/vm", R"({"state":"Paused"})");
    ASSERT_EQ(r.status, 204) << r.body;
}

void TestVmm::resume()
{
    auto r = api().request("PATCH", "/vm", R"({"state":"Resumed"})");
    ASSERT_EQ(r.status, 204) << r.body;
}

void TestVmm::snapshot(const std::string &vmstate_path, const std::string &mem_path,
                       const std::string &type)
{
    auto r = api().request("PUT", "/snapshot/create",
                           "{\"snapshot_type\":\"" + type + "\",\"snapshot_path\":\"" +
                               vmstate_path + "\",\"mem_file_path\":\"" + mem_path + "\"}");
    ASSERT_EQ(r.status, 204) << r.body;
}

std::vector<uint64_t> TestVmm::progress()
{
    auto r = api().request("GET", "/");
    Json json(r.body);
    std::vector<uint64_t> values;
    const cJSON *item;
    cJSON_ArrayForEach(item, json.get("guest_progress"))
        values.push_back(static_cast<uint64_t>(item->valuedouble));
    std::string error = json.string("guest_error");
    if (!error.empty())
        ADD_FAILURE() << "guest failed: " << error;
    return values;
}

std::string TestVmm::state()
{
    auto r = api().request("GET", "/");
    return Json(r.body).string("state");
}

void TestVmm::wait_progress(uint64_t minimum, std::chrono::seconds timeout)
{
    auto deadline = Clock::now() + scaled(timeout);
    std::vector<uint64_t> values;
    while (Clock::now() < deadline) {
        values = progress();
        bool all = !values.empty();
        for (uint64_t v : values)
            all = all && v >= minimum;
        if (all)
            return;
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    std::string seen;
    for (uint64_t v : values)
        seen += std::to_string(v) + " ";
    FAIL() << "guest progress did not reach " << minimum << " within " << scaled(timeout).count()
           << " s; last seen: " << seen;
}

VerifyResult run_verify(const std::vector<std::string> &args)
{
    VerifyResult result;
    int out_pipe[2], err_pipe[2];
    if (pipe2(out_pipe, O_CLOEXEC) < 0 || pipe2(err_pipe, O_CLOEXEC) < 0)
        throw std::runtime_error(errno_text("pipe"));
    pid_t pid = fork();
    if (pid == 0) {
        dup2(out_pipe[1], 1);
        dup2(err_pipe[1], 2);
        std::vector<std::string> full = {FORKD_TESTVM_PATH, "verify"};
        full.insert(full.end(), args.begin(), args.end());
        std::vector<char *> argv;
        for (auto &a : full)
            argv.push_back(const_cast<char *>(a.c_str()));
        argv.push_back(nullptr);
        execv(argv[0], argv.data());
        _exit(127);
    }
    close(out_pipe[1]);
    close(err_pipe[1]);
    auto drain = [](int fd, std::string &into) {
        char buffer[4096];
        ssize_t n;
        while ((n = read(fd, buffer, sizeof(buffer))) > 0)
            into.append(buffer, static_cast<size_t>(n));
        close(fd);
    };
    std::thread err_reader(drain, err_pipe[0], std::ref(result.err));
    drain(out_pipe[0], result.out);
    err_reader.join();
    int status = 0;
    waitpid(pid, &status, 0);
    result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    std::istringstream lines(result.out);
    for (std::string line; std::getline(lines, line);) {
        unsigned index;
        unsigned long long total;
        if (std::sscanf(line.c_str(), "vcpu %u total %llu", &index, &total) == 2)
            result.totals.push_back(total);
    }
    return result;
}

HandshakeListener::HandshakeListener(const std::string &path) : path_(path)
{
    struct sockaddr_un addr = {};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd_ < 0 || bind(fd_, reinterpret_cast<struct sockaddr *>(&addr), sizeof(addr)) < 0 ||
        listen(fd_, 4) < 0)
        throw std::runtime_error(errno_text(("listen " + path).c_str()));
}

HandshakeListener::~HandshakeListener()
{
    if (fd_ >= 0)
        close(fd_);
    unlink(path_.c_str());
}

Handshake HandshakeListener::receive(std::chrono::milliseconds timeout)
{
    Handshake handshake;
    if (!wait_readable(fd_, static_cast<int>(scaled(timeout).count())))
        throw std::runtime_error("no handshake connection on " + path_);
    handshake.connection = accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (handshake.connection < 0)
        throw std::runtime_error(errno_text("accept"));
    if (!wait_readable(handshake.connection, static_cast<int>(scaled(timeout).count())))
        throw std::runtime_error("no handshake message on " + path_);

    char body[8192];
    char control[CMSG_SPACE(sizeof(int))] = {};
    struct iovec iov = {body, sizeof(body) - 1};
    struct msghdr msg = {};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    ssize_t n = recvmsg(handshake.connection, &msg, MSG_CMSG_CLOEXEC);
    if (n <= 0)
        throw std::runtime_error(errno_text("recvmsg"));
    body[n] = '\0';
    handshake.message = body;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
            std::memcpy(&handshake.uffd, CMSG_DATA(c), sizeof(int));
    cJSON *array = cJSON_Parse(body);
    const cJSON *item;
    cJSON_ArrayForEach(item, array)
    {
        auto field = [&](const char *name) {
            const cJSON *f = cJSON_GetObjectItemCaseSensitive(item, name);
            return cJSON_IsNumber(f) ? static_cast<uint64_t>(f->valuedouble) : UINT64_MAX;
        };
        handshake.regions.push_back(
            {field("base_host_virt_addr"), field("size"), field("offset"), field("page_size")});
    }
    cJSON_Delete(array);
    return handshake;
}

void require_kvm_and_userfaultfd()
{
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    ASSERT_GE(kvm, 0) << "/dev/kvm is unusable (" << std::strerror(errno)
                      << "): the forkd-testvm suite needs KVM and must not be skipped";
    close(kvm);
    int uffd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
    ASSERT_GE(uffd, 0) << "userfaultfd is unusable (" << std::strerror(errno) << ")";
    struct uffdio_api api = {};
    api.api = UFFD_API;
    ASSERT_EQ(ioctl(uffd, UFFDIO_API, &api), 0) << std::strerror(errno);
    close(uffd);
}

std::string fault_message(const HttpResponse &response)
{
    Json json(response.body);
    return json.string("fault_message");
}

} // namespace forkd_testvm
