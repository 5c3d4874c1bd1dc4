// The method table: every proto method routed, with the right streaming flag.
#include <gtest/gtest.h>

#include <set>
#include <string>

extern "C" {
#include "routes.h"
#include "forkd/v1/forkd.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"
}

class Routes : public ::testing::Test {
  protected:
    void SetUp() override
    {
        struct forkd_error err = {};
        ASSERT_EQ(0, routes_init(&err)) << err.message;
    }
};

TEST_F(Routes, EveryForkdMethodHasARoute)
{
    const ProtobufCServiceDescriptor &service = forkd__v1__forkd__descriptor;
    EXPECT_EQ(15u, service.n_methods);
    for (unsigned i = 0; i < service.n_methods; i++) {
        std::string path = std::string("/forkd.v1.Forkd/") + service.methods[i].name;
        const struct route *route = routes_find(path.c_str());
        ASSERT_NE(nullptr, route) << path;
        EXPECT_EQ(service.methods[i].input, route->method->input) << path;
    }
}

TEST_F(Routes, OnlyBranchWatchPushAndPullStream)
{
    std::set<std::string> streaming;
    for (size_t i = 0; const struct route *route = routes_at(i); i++)
        if (route->server_streaming)
            streaming.insert(route->path);
    EXPECT_EQ((std::set<std::string>{"/forkd.v1.Forkd/Branch", "/forkd.v1.Forkd/WatchBranch",
                                     "/forkd.v1.Forkd/Push", "/forkd.v1.Forkd/Pull",
                                     "/grpc.health.v1.Health/Watch"}),
              streaming);
}

TEST_F(Routes, HealthAndGetInfoHaveHandlers)
{
    for (const char *path :
         {"/forkd.v1.Forkd/GetInfo", "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}) {
        const struct route *route = routes_find(path);
        ASSERT_NE(nullptr, route) << path;
        EXPECT_NE(nullptr, route->handler) << path;
    }
}

TEST_F(Routes, UnknownPathsAreNotFound)
{
    EXPECT_EQ(nullptr, routes_find("/forkd.v1.Forkd/Nope"));
    EXPECT_EQ(nullptr, routes_find("/forkd.v1.Forkd/getinfo"));
    EXPECT_EQ(nullptr, routes_find("/forkd.v1.Forkd/GetInfo/"));
    EXPECT_EQ(nullptr, routes_find(""));
}
