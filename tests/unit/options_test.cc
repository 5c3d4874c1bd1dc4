// forkd's command line.
#include <gtest/gtest.h>

#include <string>
#include <vector>

extern "C" {
#include "options.h"
}

namespace
{

enum options_result Parse(std::vector<std::string> args, struct forkd_options *opts)
{
    static std::vector<std::string> storage;
    storage = std::move(args);
    storage.insert(storage.begin(), "forkd");
    std::vector<char *> argv;
    for (auto &arg : storage)
        argv.push_back(arg.data());
    argv.push_back(nullptr);
    return options_parse((int)storage.size(), argv.data(), opts);
}

} // namespace

TEST(Options, DefaultsListenOnTheUnixSocket)
{
    struct forkd_options opts;
    ASSERT_EQ(OPTIONS_RUN, Parse({}, &opts));
    EXPECT_STREQ("unix:/run/forkd/forkd.sock", opts.listen);
    EXPECT_FALSE(opts.insecure_tcp);
    EXPECT_EQ(4u, opts.max_branches);
    EXPECT_EQ(4u << 20, opts.max_message_bytes);
    EXPECT_EQ(10000u, opts.shutdown_grace_ms);
    EXPECT_EQ(1u, opts.timeout_scale);
    EXPECT_TRUE(opts.realtime);
    EXPECT_EQ(50u, opts.realtime_max_percent);
}

TEST(Options, TimeScaleAndRealTimeFlags)
{
    struct forkd_options opts;
    ASSERT_EQ(
        OPTIONS_RUN,
        Parse({"--timeout-scale", "12", "--no-realtime", "--realtime-max-percent", "20"}, &opts));
    EXPECT_EQ(12u, opts.timeout_scale);
    EXPECT_FALSE(opts.realtime);
    EXPECT_EQ(20u, opts.realtime_max_percent);
    EXPECT_EQ(OPTIONS_EXIT_USAGE, Parse({"--timeout-scale", "0"}, &opts));
    EXPECT_EQ(OPTIONS_EXIT_USAGE, Parse({"--realtime-max-percent", "101"}, &opts));
    EXPECT_EQ(OPTIONS_EXIT_USAGE, Parse({"--realtime-max-percent", "0"}, &opts));
}

TEST(Options, EveryFlagIsApplied)
{
    struct forkd_options opts;
    ASSERT_EQ(OPTIONS_RUN,
              Parse({"--listen", "127.0.0.1:7000", "--insecure-tcp", "--state-dir", "/s",
                     "--vmm-binary", "/bin/vmm", "--max-branches", "9", "--max-message-bytes",
                     "2048", "--shutdown-grace-ms=250", "--log-level", "debug"},
                    &opts));
    EXPECT_STREQ("127.0.0.1:7000", opts.listen);
    EXPECT_TRUE(opts.insecure_tcp);
    EXPECT_STREQ("/s", opts.state_dir);
    EXPECT_STREQ("/bin/vmm", opts.vmm_binary);
    EXPECT_EQ(9u, opts.max_branches);
    EXPECT_EQ(2048u, opts.max_message_bytes);
    EXPECT_EQ(250u, opts.shutdown_grace_ms);
    EXPECT_EQ(LOG_LEVEL_DEBUG, opts.log_level);
}

TEST(Options, BootMemoryIsAMemfdUnlessAnonymousIsAskedFor)
{
    struct forkd_options opts;
    ASSERT_EQ(OPTIONS_RUN, Parse({}, &opts));
    EXPECT_FALSE(opts.anonymous_boot_memory);
    ASSERT_EQ(OPTIONS_RUN, Parse({"--anonymous-boot-memory"}, &opts));
    EXPECT_TRUE(opts.anonymous_boot_memory);
}

TEST(Options, BadValuesAreUsageErrors)
{
    struct forkd_options opts;
    EXPECT_EQ(OPTIONS_EXIT_USAGE, Parse({"--max-branches", "0"}, &opts));
    EXPECT_EQ(OPTIONS_EXIT_USAGE, Parse({"--max-branches", "-3"}, &opts));
    EXPECT_EQ(OPTIONS_EXIT_USAGE, Parse({"--max-branches", "4x"}, &opts));
    EXPECT_EQ(OPTIONS_EXIT_USAGE, Parse({"--shutdown-grace-ms", ""}, &opts));
    EXPECT_EQ(OPTIONS_EXIT_USAGE, Parse({"--log-level", "loud"}, &opts));
    EXPECT_EQ(OPTIONS_EXIT_USAGE, Parse({"--no-such-flag"}, &opts));
    EXPECT_EQ(OPTIONS_EXIT_USAGE, Parse({"--listen"}, &opts));
    EXPECT_EQ(OPTIONS_EXIT_USAGE, Parse({"stray"}, &opts));
}

TEST(Options, ReceiveMemoryFollowsTheMessageLimit)
{
    struct forkd_options opts;
    ASSERT_EQ(OPTIONS_RUN, Parse({}, &opts));
    EXPECT_EQ(size_t{64} << 20, opts.max_receive_memory_bytes);
    ASSERT_EQ(OPTIONS_RUN, Parse({"--max-message-bytes", "33554432"}, &opts));
    EXPECT_EQ(size_t{128} << 20, opts.max_receive_memory_bytes);
    ASSERT_EQ(OPTIONS_RUN, Parse({"--max-receive-memory-bytes", "8388608"}, &opts));
    EXPECT_EQ(size_t{8} << 20, opts.max_receive_memory_bytes);
    EXPECT_EQ(OPTIONS_EXIT_USAGE,
              Parse({"--max-message-bytes", "33554432", "--max-receive-memory-bytes", "16777216"},
                    &opts));
    EXPECT_EQ(OPTIONS_EXIT_USAGE, Parse({"--max-receive-memory-bytes", "1000"}, &opts));
}

TEST(Options, TlsCertAndKeyGoTogether)
{
    struct forkd_options opts;
    EXPECT_EQ(OPTIONS_EXIT_USAGE, Parse({"--tls-cert", "/c.pem"}, &opts));
    EXPECT_EQ(OPTIONS_EXIT_USAGE, Parse({"--tls-key", "/k.pem"}, &opts));
    EXPECT_EQ(OPTIONS_RUN, Parse({"--tls-cert", "/c.pem", "--tls-key", "/k.pem"}, &opts));
}

TEST(Options, HelpAndVersionExitCleanly)
{
    struct forkd_options opts;
    testing::internal::CaptureStdout();
    EXPECT_EQ(OPTIONS_EXIT_OK, Parse({"--help"}, &opts));
    std::string help = testing::internal::GetCapturedStdout();
    for (const char *flag :
         {"--listen", "--insecure-tcp", "--tls-cert", "--tls-key", "--state-dir", "--vmm-binary",
          "--max-branches", "--max-message-bytes", "--max-receive-memory-bytes",
          "--shutdown-grace-ms", "--log-level", "--version", "--help"})
        EXPECT_NE(std::string::npos, help.find(flag)) << flag << " missing from --help";
    testing::internal::CaptureStdout();
    EXPECT_EQ(OPTIONS_EXIT_OK, Parse({"--version"}, &opts));
    EXPECT_EQ(std::string("forkd ") + FORKD_VERSION + "\n", testing::internal::GetCapturedStdout());
}

TEST(Options, RemoteFlagsGoTogether)
{
    struct forkd_options opts;
    ASSERT_EQ(OPTIONS_RUN, Parse({"--remote-endpoint", "http://127.0.0.1:7480", "--remote-bucket",
                                  "snaps", "--remote-region", "eu-1", "--remote-credentials",
                                  "/etc/forkd/s3", "--remote-parallel", "8",
                                  "--remote-multipart-bytes", "8388608"},
                                 &opts));
    EXPECT_STREQ("http://127.0.0.1:7480", opts.remote_endpoint);
    EXPECT_STREQ("snaps", opts.remote_bucket);
    EXPECT_STREQ("eu-1", opts.remote_region);
    EXPECT_STREQ("/etc/forkd/s3", opts.remote_credentials);
    EXPECT_EQ(8u, opts.remote_parallel);
    EXPECT_EQ(8388608ull, opts.remote_multipart_bytes);
    ASSERT_EQ(OPTIONS_RUN, Parse({}, &opts));
    EXPECT_EQ(nullptr, opts.remote_endpoint);
    EXPECT_EQ(OPTIONS_EXIT_USAGE, Parse({"--remote-endpoint", "http://x:1"}, &opts));
    EXPECT_EQ(OPTIONS_EXIT_USAGE, Parse({"--remote-bucket", "snaps"}, &opts));
    EXPECT_EQ(OPTIONS_EXIT_USAGE, Parse({"--remote-credentials", "/x"}, &opts));
    EXPECT_EQ(OPTIONS_EXIT_USAGE, Parse({"--remote-endpoint", "http://x:1", "--remote-bucket",
                                         "snaps", "--remote-parallel", "0"},
                                        &opts));
    EXPECT_EQ(OPTIONS_EXIT_USAGE, Parse({"--remote-endpoint", "http://x:1", "--remote-bucket",
                                         "snaps", "--remote-multipart-bytes", "1000"},
                                        &opts));
}
