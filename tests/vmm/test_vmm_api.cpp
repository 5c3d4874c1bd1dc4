// forkd-testvm API robustness (malformed HTTP and JSON, wrong state: 400s, never a crash) and
// the figures the README quotes: guest write rate and PATCH /vm pause/resume round trips.
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "vmm_test_client.h"

using namespace forkd_testvm;
using namespace std::chrono_literals;

namespace
{

class ApiTest : public ::testing::Test
{
  protected:
    void SetUp() override
    {
        ASSERT_NO_FATAL_FAILURE(require_kvm_and_userfaultfd());
        vmm_ = std::make_unique<TestVmm>(dir_.path());
    }
    // After each abuse the VMM must still answer on a fresh connection.
    void expect_alive()
    {
        ASSERT_TRUE(vmm_->alive()) << vmm_->log();
        ApiClient fresh(vmm_->socket_path());
        auto r = fresh.request("GET", "/");
        EXPECT_EQ(r.status, 200);
        EXPECT_TRUE(Json(r.body).valid()) << r.body;
    }
    void expect_400(const std::string &method, const std::string &path, const std::string &body,
                    const std::string &message_part)
    {
        auto r = vmm_->api().request(method, path, body);
        EXPECT_EQ(r.status, 400) << method << " " << path << " " << body << " -> " << r.body;
        EXPECT_NE(fault_message(r).find(message_part), std::string::npos)
            << "fault_message of " << body << ": " << r.body;
    }
    TempDir dir_;
    std::unique_ptr<TestVmm> vmm_;
};

std::string guest_boot_source(const std::string &boot_args)
{
    return std::string("{\"kernel_image_path\":\"") + FORKD_GUEST_PATH + "\",\"boot_args\":\"" +
           boot_args + "\"}";
}

} // namespace

TEST_F(ApiTest, GetRootDescribesTheVmm)
{
    auto r = vmm_->api().request("GET", "/");
    ASSERT_EQ(r.status, 200);
    Json json(r.body);
    EXPECT_EQ(json.string("id"), "test-vm");
    EXPECT_EQ(json.string("state"), "Not started");
    EXPECT_FALSE(json.string("vmm_version").empty());
    EXPECT_EQ(json.string("app_name"), "forkd-testvm");
}

TEST_F(ApiTest, UnknownPathIs404AndWrongMethodIs400)
{
    auto r = vmm_->api().request("GET", "/no/such/thing");
    EXPECT_EQ(r.status, 404);
    EXPECT_FALSE(fault_message(r).empty());
    r = vmm_->api().request("DELETE", "/vm");
    EXPECT_EQ(r.status, 400);
    EXPECT_FALSE(fault_message(r).empty());
    expect_alive();
}

TEST_F(ApiTest, MalformedJsonAndSchemaViolationsAre400)
{
    expect_400("PUT", "/machine-config", "{\"vcpu_count\": 2, \"mem_size_mib\": ", "JSON");
    expect_400("PUT", "/machine-config", "[1,2,3]", "object");
    expect_400("PUT", "/machine-config", "{\"vcpu_count\":\"two\",\"mem_size_mib\":64}",
               "vcpu_count");
    expect_400("PUT", "/machine-config", "{\"vcpu_count\":1.5,\"mem_size_mib\":64}", "vcpu_count");
    expect_400("PUT", "/machine-config", "{\"vcpu_count\":-1,\"mem_size_mib\":64}", "vcpu_count");
    expect_400("PUT", "/machine-config", "{\"vcpu_count\":99,\"mem_size_mib\":64}", "vcpu_count");
    expect_400("PUT", "/machine-config", "{\"vcpu_count\":1,\"mem_size_mib\":64,\"turbo\":true}",
               "unknown field 'turbo'");
    expect_400("PUT", "/machine-config", "{\"vcpu_count\":1}", "missing field 'mem_size_mib'");
    expect_400("PUT", "/machine-config",
               "{\"vcpu_count\":1,\"mem_size_mib\":64,\"huge_pages\":\"1G\"}", "huge_pages");
    expect_400("PUT", "/machine-config",
               "{\"vcpu_count\":1,\"mem_size_mib\":65,\"huge_pages\":\"2M\"}", "multiple of 2");
    expect_400("PUT", "/boot-source", "{\"kernel_image_path\":42}", "kernel_image_path");
    expect_400("PUT", "/boot-source", guest_boot_source("pages=abc"), "pages");
    expect_400("PUT", "/boot-source", guest_boot_source("pattern=zigzag"), "pattern");
    expect_400("PUT", "/boot-source", guest_boot_source("speed=3"), "unknown key");
    expect_400("PUT", "/boot-source", "{\"kernel_image_path\":\"/nonexistent/guest.bin\"}",
               "nonexistent");
    expect_400("PUT", "/actions", "{\"action_type\":\"SendCtrlAltDel\"}", "not supported");
    expect_400("PATCH", "/vm", "{\"state\":\"Frozen\"}", "Paused");
    expect_400(
        "PUT", "/snapshot/create",
        "{\"snapshot_type\":\"Diff\",\"snapshot_path\":\"/tmp/x\",\"mem_file_path\":\"/tmp/y\"}",
        "snapshot_type");
    expect_400("PUT", "/snapshot/load",
               "{\"snapshot_path\":\"/tmp/x\",\"mem_backend\":{\"backend_type\":\"Tape\","
               "\"backend_path\":\"/tmp/y\"}}",
               "backend_type");
    expect_400("PUT", "/uffd/wp", "{\"socket\":[]}", "socket");
    auto r = vmm_->api().request("PUT", "/machine-config", "");
    EXPECT_EQ(r.status, 400);
    expect_alive();
}

TEST_F(ApiTest, WrongStateIs400)
{
    expect_400("PATCH", "/vm", "{\"state\":\"Paused\"}", "not started");
    expect_400("PUT", "/snapshot/create",
               "{\"snapshot_path\":\"/tmp/x\",\"mem_file_path\":\"/tmp/y\"}", "paused");
    expect_400("PUT", "/uffd/wp", "{\"socket\":\"/tmp/none\"}", "started");
    expect_400("PUT", "/actions", "{\"action_type\":\"InstanceStart\"}", "boot-source");
    ASSERT_NO_FATAL_FAILURE(vmm_->boot(1, 32, "pages=64"));
    expect_400("PUT", "/machine-config", "{\"vcpu_count\":1,\"mem_size_mib\":64}", "started");
    expect_400("PUT", "/boot-source", guest_boot_source(""), "started");
    expect_400("PUT", "/actions", "{\"action_type\":\"InstanceStart\"}", "started");
    expect_400("PUT", "/snapshot/create",
               "{\"snapshot_path\":\"/tmp/x\",\"mem_file_path\":\"/tmp/y\"}", "paused");
    expect_400("PUT", "/snapshot/load",
               "{\"snapshot_path\":\"/tmp/x\",\"mem_backend\":{\"backend_type\":\"File\","
               "\"backend_path\":\"/tmp/y\"}}",
               "fresh");
    expect_alive();
}

TEST_F(ApiTest, LoadOfMissingOrBogusSnapshotIs400AndLeavesProcessFresh)
{
    expect_400("PUT", "/snapshot/load",
               "{\"snapshot_path\":\"/nonexistent/vmstate\",\"mem_backend\":{\"backend_type\":"
               "\"File\",\"backend_path\":\"/nonexistent/memory.bin\"}}",
               "nonexistent");
    std::string bogus = dir_.file("bogus");
    FILE *f = fopen(bogus.c_str(), "w");
    ASSERT_NE(f, nullptr);
    fputs("this is not a vmstate at all, just some text padding it out", f);
    fclose(f);
    expect_400("PUT", "/snapshot/load",
               "{\"snapshot_path\":\"" + bogus +
                   "\",\"mem_backend\":{\"backend_type\":\"File\","
                   "\"backend_path\":\"" +
                   bogus + "\"}}",
               "vmstate");
    EXPECT_EQ(vmm_->state(), "Not started");
    ASSERT_NO_FATAL_FAILURE(vmm_->boot(1, 32, "pages=64"));
}

TEST_F(ApiTest, MalformedHttpNeverKillsTheVmm)
{
    {
        ApiClient c(vmm_->socket_path());
        auto r = c.raw("THIS IS NOT HTTP\r\n\r\n");
        EXPECT_EQ(r.status, 400);
    }
    {
        ApiClient c(vmm_->socket_path());
        auto r = c.raw(std::string("\x00\x01\x02\xff garbage\r\n\r\n", 17));
        EXPECT_EQ(r.status, 400);
    }
    {
        ApiClient c(vmm_->socket_path());
        auto r = c.raw("PUT /machine-config HTTP/1.1\r\nContent-Length: 12abc\r\n\r\n");
        EXPECT_EQ(r.status, 400);
    }
    {
        ApiClient c(vmm_->socket_path());
        auto r = c.raw("PUT /machine-config HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        EXPECT_EQ(r.status, 400);
    }
    {
        // Truncated request line, then the client goes away.
        ApiClient c(vmm_->socket_path());
        c.send_only("PUT /machine-con");
    }
    {
        // Truncated body, then the client goes away.
        ApiClient c(vmm_->socket_path());
        c.send_only("PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu");
    }
    {
        ApiClient c(vmm_->socket_path());
        auto r = c.raw("PUT /machine-config HTTP/1.1\r\nContent-Length: 10485760\r\n\r\n");
        EXPECT_EQ(r.status, 413);
        EXPECT_FALSE(fault_message(r).empty());
    }
    {
        ApiClient c(vmm_->socket_path());
        auto r = c.raw("GET / HTTP/1.1\r\nX-Filler: " + std::string(20000, 'a') + "\r\n\r\n");
        EXPECT_EQ(r.status, 431);
    }
    {
        // A huge header without an end: the VMM answers once the cap is passed.
        ApiClient c(vmm_->socket_path());
        auto r = c.raw("GET / HTTP/1.1\r\nX-Filler: " + std::string(100000, 'b'));
        EXPECT_EQ(r.status, 431);
    }
    expect_alive();
}

TEST_F(ApiTest, KeepAliveAndPipelining)
{
    ApiClient &c = vmm_->api();
    for (int i = 0; i < 20; i++)
        ASSERT_EQ(c.request("GET", "/").status, 200);
    // Two requests in one write, answered in order on the same connection.
    std::string body = "{\"vcpu_count\":1,\"mem_size_mib\":32}";
    c.send_only("PUT /machine-config HTTP/1.1\r\nContent-Length: " + std::to_string(body.size()) +
                "\r\n\r\n" + body + "GET / HTTP/1.1\r\n\r\n");
    EXPECT_EQ(c.read_response().status, 204);
    auto r = c.read_response();
    EXPECT_EQ(r.status, 200);
    EXPECT_EQ(Json(r.body).number("mem_size_mib"), 32);
    // Split across many writes.
    std::string request =
        "PUT /machine-config HTTP/1.1\r\nContent-Length: " + std::to_string(body.size()) +
        "\r\n\r\n" + body;
    for (char ch : request)
        c.send_only(std::string(1, ch));
    EXPECT_EQ(c.read_response().status, 204);
    // Expect: 100-continue gets its interim answer first.
    c.send_only("PUT /machine-config HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: " +
                std::to_string(body.size()) + "\r\n\r\n");
    EXPECT_EQ(c.read_response().status, 100);
    c.send_only(body);
    EXPECT_EQ(c.read_response().status, 204);
}

TEST_F(ApiTest, DrivesAreValidatedAndRecorded)
{
    std::string disk = dir_.file("rootfs.img");
    FILE *f = fopen(disk.c_str(), "w");
    ASSERT_NE(f, nullptr);
    fclose(f);
    auto drive = [&](const std::string &id, const std::string &path) {
        return "{\"drive_id\":\"" + id + "\",\"path_on_host\":\"" + path +
               "\",\"is_root_device\":true,\"is_read_only\":false}";
    };
    auto r = vmm_->api().request("PUT", "/drives/rootfs", drive("rootfs", disk));
    EXPECT_EQ(r.status, 204) << r.body;
    expect_400("PUT", "/drives/rootfs", drive("other", disk), "does not match");
    expect_400("PUT", "/drives/rootfs", drive("rootfs", "/nonexistent/disk.img"), "nonexistent");
    expect_400("PUT", "/drives/rootfs", "{\"drive_id\":\"rootfs\"}", "missing field");
    EXPECT_EQ(vmm_->api().request("PUT", "/drives/", drive("", disk)).status, 404);
    EXPECT_EQ(vmm_->api().request("PUT", "/drives/a/b", drive("a", disk)).status, 404);
    Json info(vmm_->api().request("GET", "/").body);
    ASSERT_EQ(cJSON_GetArraySize(info.get("drives")), 1);
    ASSERT_NO_FATAL_FAILURE(vmm_->boot(1, 32, "pages=64"));
    expect_400("PUT", "/drives/rootfs", drive("rootfs", disk), "started");
}

TEST_F(ApiTest, PauseAndResumeAreIdempotent)
{
    ASSERT_NO_FATAL_FAILURE(vmm_->boot(2, 32, "pages=64"));
    ASSERT_NO_FATAL_FAILURE(vmm_->resume());
    EXPECT_EQ(vmm_->state(), "Running");
    ASSERT_NO_FATAL_FAILURE(vmm_->pause());
    ASSERT_NO_FATAL_FAILURE(vmm_->pause());
    EXPECT_EQ(vmm_->state(), "Paused");
    ASSERT_NO_FATAL_FAILURE(vmm_->resume());
    ASSERT_NO_FATAL_FAILURE(vmm_->resume());
    EXPECT_EQ(vmm_->state(), "Running");
}

// The figures quoted in the README. Warm the working set up first (first touches are slow
// exits on nested KVM), then measure the steady state.
// Many pause/resume cycles in a row: each is answered 204, the VMM reports how long its pause
// took, a paused guest makes no progress, and the guest carries on after every resume. (How fast
// pausing is belongs to the benchmark, tests/bench, never to a test.)
TEST_F(ApiTest, RepeatedPauseAndResumeKeepTheGuestRunning)
{
    ASSERT_NO_FATAL_FAILURE(vmm_->boot(2, 32, "pages=256 pattern=random"));
    ASSERT_NO_FATAL_FAILURE(vmm_->wait_progress(1u << 20));
    for (int i = 0; i < 200; i++) {
        auto r = vmm_->api().request("PATCH", "/vm", R"({"state":"Paused"})");
        ASSERT_EQ(r.status, 204) << r.body;
        EXPECT_GT(Json(vmm_->api().request("GET", "/").body).number("last_pause_ns"), 0);
        if (i % 50 == 0) {
            auto paused = vmm_->progress();
            auto again = vmm_->progress();
            EXPECT_EQ(paused, again) << "a paused guest made progress";
        }
        r = vmm_->api().request("PATCH", "/vm", R"({"state":"Resumed"})");
        ASSERT_EQ(r.status, 204) << r.body;
    }
    auto after_cycles = vmm_->progress();
    uint64_t highest = *std::max_element(after_cycles.begin(), after_cycles.end());
    ASSERT_NO_FATAL_FAILURE(vmm_->wait_progress(highest + 1000));
}

TEST_F(ApiTest, RateLimitedGuestKeepsItsRate)
{
    ASSERT_NO_FATAL_FAILURE(vmm_->boot(1, 32, "pages=64 pattern=sequential rate=20000"));
    ASSERT_NO_FATAL_FAILURE(vmm_->wait_progress(2000));
    auto start_values = vmm_->progress();
    auto start = Clock::now();
    std::this_thread::sleep_for(500ms); // a measurement interval
    auto end_values = vmm_->progress();
    double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    double rate = (end_values[0] - start_values[0]) / seconds;
    std::printf("rate=20000 guest measured %.0f pages/s\n", rate);
    EXPECT_GT(rate, 20000 * 0.5);
    EXPECT_LT(rate, 20000 * 1.5);
}
