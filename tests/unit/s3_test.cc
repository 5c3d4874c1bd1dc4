// The S3 client's configuration: credentials from a file or the environment, endpoint, region
// and bucket checks. (Requests themselves are tested against a real radosgw: integration.remote.)
#include <gtest/gtest.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unistd.h>

#include "s3.h"

namespace
{

std::string WriteFile(const std::string &text)
{
    char path[] = "/tmp/forkd-s3-test.XXXXXX";
    int fd = mkstemp(path);
    EXPECT_GE(fd, 0);
    EXPECT_EQ((ssize_t)text.size(), write(fd, text.data(), text.size()));
    close(fd);
    return path;
}

struct s3_config Valid()
{
    struct s3_config config = {};
    snprintf(config.endpoint, sizeof(config.endpoint), "http://127.0.0.1:7480");
    snprintf(config.region, sizeof(config.region), "us-east-1");
    snprintf(config.bucket, sizeof(config.bucket), "forkd-snapshots");
    return config;
}

} // namespace

TEST(S3, CredentialsFromAnAwsStyleFile)
{
    std::string path = WriteFile("[default]\n# a comment\naws_access_key_id = AKID \n"
                                 "aws_secret_access_key=s3cr3t\nregion = x\n");
    struct s3_config config = Valid();
    struct forkd_error err = {};
    ASSERT_EQ(0, s3_credentials_load(&config, path.c_str(), &err)) << err.message;
    EXPECT_STREQ("AKID", config.access_key);
    EXPECT_STREQ("s3cr3t", config.secret_key);
    unlink(path.c_str());
}

TEST(S3, AFileWithoutTheSecretIsRefusedWithoutShowingTheKey)
{
    std::string path = WriteFile("aws_access_key_id = AKID\n");
    struct s3_config config = Valid();
    struct forkd_error err = {};
    EXPECT_EQ(-EINVAL, s3_credentials_load(&config, path.c_str(), &err));
    EXPECT_NE(nullptr, strstr(err.message, "aws_secret_access_key"));
    EXPECT_EQ(nullptr, strstr(err.message, "AKID"));
    unlink(path.c_str());
    EXPECT_EQ(-ENOENT, s3_credentials_load(&config, path.c_str(), &err));
}

TEST(S3, CredentialsFromTheEnvironment)
{
    struct s3_config config = Valid();
    struct forkd_error err = {};
    unsetenv("AWS_ACCESS_KEY_ID");
    unsetenv("AWS_SECRET_ACCESS_KEY");
    EXPECT_EQ(-ENOENT, s3_credentials_load(&config, nullptr, &err));
    EXPECT_NE(nullptr, strstr(err.message, "--remote-credentials"));
    setenv("AWS_ACCESS_KEY_ID", "ENVKEY", 1);
    setenv("AWS_SECRET_ACCESS_KEY", "envsecret", 1);
    ASSERT_EQ(0, s3_credentials_load(&config, "", &err)) << err.message;
    EXPECT_STREQ("ENVKEY", config.access_key);
    EXPECT_STREQ("envsecret", config.secret_key);
    unsetenv("AWS_ACCESS_KEY_ID");
    unsetenv("AWS_SECRET_ACCESS_KEY");
}

TEST(S3, ConfigChecksNameTheFlag)
{
    struct forkd_error err = {};
    struct s3_config config = Valid();
    EXPECT_EQ(0, s3_config_check(&config, &err)) << err.message;
    snprintf(config.endpoint, sizeof(config.endpoint), "ftp://x");
    EXPECT_EQ(-EINVAL, s3_config_check(&config, &err));
    EXPECT_NE(nullptr, strstr(err.message, "--remote-endpoint"));
    config = Valid();
    snprintf(config.endpoint, sizeof(config.endpoint), "http://x/");
    EXPECT_EQ(-EINVAL, s3_config_check(&config, &err));
    config = Valid();
    snprintf(config.bucket, sizeof(config.bucket), "ab");
    EXPECT_EQ(-EINVAL, s3_config_check(&config, &err));
    EXPECT_NE(nullptr, strstr(err.message, "--remote-bucket"));
    snprintf(config.bucket, sizeof(config.bucket), "Upper");
    EXPECT_EQ(-EINVAL, s3_config_check(&config, &err));
    config = Valid();
    snprintf(config.region, sizeof(config.region), "us east");
    EXPECT_EQ(-EINVAL, s3_config_check(&config, &err));
    EXPECT_NE(nullptr, strstr(err.message, "--remote-region"));
}
