// Test-side helpers for forkd-testvm: starting and reaping the real binary, an HTTP/1.1 client
// over its Unix socket, running the verifier, and receiving the userfaultfd handshake.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

extern "C" {
#include <cjson/cJSON.h>
}

namespace forkd_testvm
{

using Clock = std::chrono::steady_clock;

struct HttpResponse {
    int status = 0;
    std::string body;
};

// Owns a cJSON tree.
class Json
{
  public:
    explicit Json(const std::string &text) : root_(cJSON_Parse(text.c_str()))
    {
    }
    ~Json()
    {
        cJSON_Delete(root_);
    }
    Json(const Json &) = delete;
    Json &operator=(const Json &) = delete;
    bool valid() const
    {
        return root_ != nullptr;
    }
    const cJSON *get(const char *name) const
    {
        return cJSON_GetObjectItemCaseSensitive(root_, name);
    }
    std::string string(const char *name) const;
    double number(const char *name) const;
    const cJSON *root() const
    {
        return root_;
    }

  private:
    cJSON *root_;
};

// A temporary directory removed (recursively) on destruction.
class TempDir
{
  public:
    TempDir();
    ~TempDir();
    const std::string &path() const
    {
        return path_;
    }
    std::string file(const std::string &name) const
    {
        return path_ + "/" + name;
    }

  private:
    std::string path_;
};

// One HTTP/1.1 keep-alive connection to an API socket.
class ApiClient
{
  public:
    explicit ApiClient(const std::string &socket_path);
    ~ApiClient();
    ApiClient(const ApiClient &) = delete;
    ApiClient &operator=(const ApiClient &) = delete;

    HttpResponse request(const std::string &method, const std::string &path,
                         const std::string &body = "");
    // Sends bytes as they are and reads one response (status 0 when the server closed).
    HttpResponse raw(const std::string &bytes);
    void send_only(const std::string &bytes);
    bool send_until_closed(const std::string &bytes);
    HttpResponse read_response();
    int fd() const
    {
        return fd_;
    }

  private:
    int fd_ = -1;
    std::string pending_;
};

// A running forkd-testvm process, killed and reaped on destruction.
class TestVmm
{
  public:
    explicit TestVmm(const std::string &dir, std::vector<std::string> extra_args = {});
    ~TestVmm();
    TestVmm(const TestVmm &) = delete;
    TestVmm &operator=(const TestVmm &) = delete;

    ApiClient &api()
    {
        return *api_;
    }
    const std::string &socket_path() const
    {
        return socket_path_;
    }
    pid_t pid() const
    {
        return pid_;
    }
    bool alive();
    std::string log() const;

    // Convenience wrappers that fail the current test on a non-2xx answer.
    void boot(unsigned vcpus, unsigned mem_mib, const std::string &boot_args);
    void pause();
    void resume();
    void snapshot(const std::string &vmstate_path, const std::string &mem_path,
                  const std::string &type = "Full");
    std::vector<uint64_t> progress();
    std::string state();
    // Waits until every vCPU reported at least minimum writes; fails the test on timeout.
    void wait_progress(uint64_t minimum, std::chrono::seconds timeout = std::chrono::seconds(60));

  private:
    std::string dir_, socket_path_, log_path_;
    pid_t pid_ = -1;
    ApiClient *api_ = nullptr;
};

struct VerifyResult {
    int exit_code = -1;
    std::string out, err;
    std::vector<uint64_t> totals;
};

VerifyResult run_verify(const std::vector<std::string> &args);

struct HandshakeRegion {
    uint64_t base_host_virt_addr, size, offset, page_size;
};

struct Handshake {
    int uffd = -1;
    int connection = -1;
    std::string message;
    std::vector<HandshakeRegion> regions;
};

// Listens on a Unix socket for one Firecracker-style uffd handshake.
class HandshakeListener
{
  public:
    explicit HandshakeListener(const std::string &path);
    ~HandshakeListener();
    // Accepts one connection and receives message + fd (bounded by timeout).
    Handshake receive(std::chrono::milliseconds timeout = std::chrono::milliseconds(10000));
    const std::string &path() const
    {
        return path_;
    }

  private:
    std::string path_;
    int fd_ = -1;
};

// Fails the test (not skips) when the machine cannot run the suite.
void require_kvm_and_userfaultfd();

std::string fault_message(const HttpResponse &response);

} // namespace forkd_testvm
