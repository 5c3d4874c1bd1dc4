// forkd_error: the engine's error report.
#include <gtest/gtest.h>

#include <cerrno>
#include <string>

extern "C" {
#include "basic/error.h"
}

TEST(Error, SetRecordsCodeAndMessageAndReturnsCode)
{
    struct forkd_error err = {};
    EXPECT_EQ(-ENOENT, forkd_error_set(&err, -ENOENT, "open %s: %s", "/x", "missing"));
    EXPECT_EQ(-ENOENT, err.code);
    EXPECT_STREQ("open /x: missing", err.message);
}

TEST(Error, PrefixAddsContextInFront)
{
    struct forkd_error err = {};
    forkd_error_set(&err, -EIO, "PUT /vm: 400: bad state");
    EXPECT_EQ(-EIO, forkd_error_prefix(&err, "branch %s: ", "vm-1"));
    EXPECT_STREQ("branch vm-1: PUT /vm: 400: bad state", err.message);
}

TEST(Error, PrefixTruncatesTheTailNotTheHead)
{
    struct forkd_error err = {};
    std::string long_message(FORKD_ERROR_MESSAGE_MAX - 1, 'x');
    forkd_error_set(&err, -EIO, "%s", long_message.c_str());
    forkd_error_prefix(&err, "context: ");
    std::string result(err.message);
    EXPECT_EQ(size_t(FORKD_ERROR_MESSAGE_MAX - 1), result.size());
    EXPECT_EQ(0u, result.find("context: xxx"));
}

TEST(Error, NullReportIsAllowed)
{
    EXPECT_EQ(-EINVAL, forkd_error_set(nullptr, -EINVAL, "ignored"));
    forkd_error_clear(nullptr);
}

// `return forkd_error_prefix(err, ...)` after a failure must not turn into success for a caller
// that passed no report (store_get(..., NULL) did, when a READY record failed to parse).
TEST(Error, PrefixWithoutAReportStillFails)
{
    EXPECT_LT(forkd_error_prefix(nullptr, "context: "), 0);
}
