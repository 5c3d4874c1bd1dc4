// forkd-testvm's disk: the guest writes its running total to its first writable drive through
// a port, synchronously; a snapshot's copy of that drive taken at the pause verifies with its
// memory and vCPU state, a copy from another instant does not; a restored guest is re-pointed
// at its own copy with PATCH /drives (load paused, patch, resume) and writes only that copy.
#include <fcntl.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>

#include <gtest/gtest.h>

#include "vmm_test_client.h"

using namespace forkd_testvm;

namespace
{

std::string make_dir(const TempDir &dir, const std::string &name)
{
    std::string path = dir.file(name);
    mkdir(path.c_str(), 0700);
    return path;
}

void make_drive(const std::string &path, off_t size = 1 << 20)
{
    int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    ASSERT_GE(fd, 0) << path;
    ASSERT_EQ(0, ftruncate(fd, size));
    close(fd);
}

void copy_file(const std::string &from, const std::string &to)
{
    int in = open(from.c_str(), O_RDONLY | O_CLOEXEC);
    int out = open(to.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    ASSERT_GE(in, 0) << from;
    ASSERT_GE(out, 0) << to;
    struct stat st;
    ASSERT_EQ(0, fstat(in, &st));
    off_t offset = 0;
    while (offset < st.st_size)
        ASSERT_GT(sendfile(out, in, &offset, static_cast<size_t>(st.st_size - offset)), 0);
    close(in);
    close(out);
}

std::string read_all(const std::string &path)
{
    std::string data;
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    char buffer[65536];
    ssize_t n;
    while (fd >= 0 && (n = read(fd, buffer, sizeof(buffer))) > 0)
        data.append(buffer, static_cast<size_t>(n));
    if (fd >= 0)
        close(fd);
    return data;
}

void put_drive(TestVmm &vmm, const std::string &id, const std::string &path, bool read_only)
{
    auto r = vmm.api().request(
        "PUT", "/drives/" + id,
        "{\"drive_id\":\"" + id + "\",\"path_on_host\":\"" + path +
            "\",\"is_root_device\":false,\"is_read_only\":" + (read_only ? "true" : "false") + "}");
    ASSERT_EQ(r.status, 204) << r.body;
}

// A guest with a read-only root and a writable data drive (its disk), 2 vCPUs, running.
void boot_with_disk(TestVmm &vmm, const std::string &root, const std::string &data)
{
    ASSERT_NO_FATAL_FAILURE(put_drive(vmm, "rootfs", root, true));
    ASSERT_NO_FATAL_FAILURE(put_drive(vmm, "data", data, false));
    ASSERT_NO_FATAL_FAILURE(vmm.boot(2, 64, "pattern=random seed=21"));
}

class VmmDiskTest : public ::testing::Test
{
  protected:
    void SetUp() override
    {
        require_kvm_and_userfaultfd();
        root_ = dir_.file("root.img");
        data_ = dir_.file("data.img");
        ASSERT_NO_FATAL_FAILURE(make_drive(root_));
        ASSERT_NO_FATAL_FAILURE(make_drive(data_));
    }
    TempDir dir_;
    std::string root_, data_;
};

TEST_F(VmmDiskTest, DiskCopiedAtThePauseVerifiesAndOneFromAnotherInstantFails)
{
    std::string early = make_dir(dir_, "early");
    TestVmm vmm(make_dir(dir_, "vmm"));
    ASSERT_NO_FATAL_FAILURE(boot_with_disk(vmm, root_, data_));
    ASSERT_NO_FATAL_FAILURE(vmm.wait_progress(5000));
    ASSERT_NO_FATAL_FAILURE(vmm.pause());
    ASSERT_NO_FATAL_FAILURE(vmm.snapshot(early + "/vmstate", early + "/memory.bin"));
    ASSERT_NO_FATAL_FAILURE(copy_file(data_, early + "/data.img"));
    auto ok = run_verify({early, "--disk", early + "/data.img"});
    EXPECT_EQ(ok.exit_code, 0) << ok.err << ok.out;
    EXPECT_NE(ok.out.find("disk agrees"), std::string::npos) << ok.out;
    // The guest did write it: its slots are not all zero.
    std::string disk = read_all(early + "/data.img");
    ASSERT_GE(disk.size(), 4096u + 16u);
    EXPECT_NE(disk.substr(4096, 16), std::string(16, '\0'));
    // Without the disk the verifier refuses to call the snapshot consistent.
    auto missing = run_verify({early});
    EXPECT_NE(missing.exit_code, 0);
    EXPECT_NE(missing.err.find("--disk"), std::string::npos) << missing.err;
    // The disk a moment later, with memory and vCPUs of the pause: torn.
    ASSERT_NO_FATAL_FAILURE(vmm.resume());
    auto totals = ok.totals;
    ASSERT_NO_FATAL_FAILURE(
        vmm.wait_progress(*std::max_element(totals.begin(), totals.end()) + 5000));
    ASSERT_NO_FATAL_FAILURE(vmm.pause());
    ASSERT_NO_FATAL_FAILURE(copy_file(data_, dir_.file("later.img")));
    auto torn = run_verify({early, "--disk", dir_.file("later.img")});
    EXPECT_EQ(torn.exit_code, 1) << torn.out;
    EXPECT_NE(torn.err.find("another instant"), std::string::npos) << torn.err;
}

TEST_F(VmmDiskTest, RestoredGuestIsRepointedAtItsOwnDiskBeforeItResumes)
{
    std::string snap = make_dir(dir_, "snap"), again = make_dir(dir_, "again");
    TestVmm source(make_dir(dir_, "source"));
    ASSERT_NO_FATAL_FAILURE(boot_with_disk(source, root_, data_));
    ASSERT_NO_FATAL_FAILURE(source.wait_progress(5000));
    ASSERT_NO_FATAL_FAILURE(source.pause());
    ASSERT_NO_FATAL_FAILURE(source.snapshot(snap + "/vmstate", snap + "/memory.bin"));
    ASSERT_NO_FATAL_FAILURE(copy_file(data_, snap + "/data.img"));
    ASSERT_NO_FATAL_FAILURE(copy_file(data_, dir_.file("fork.img")));
    auto before = run_verify({snap, "--disk", snap + "/data.img"});
    ASSERT_EQ(before.exit_code, 0) << before.err;
    std::string source_disk = read_all(data_);

    TestVmm fork(make_dir(dir_, "fork"));
    // PATCH is for a started (or loaded) VM only, as in Firecracker.
    auto early_patch = fork.api().request(
        "PATCH", "/drives/data", "{\"drive_id\":\"data\",\"path_on_host\":\"" + data_ + "\"}");
    EXPECT_EQ(early_patch.status, 400) << early_patch.body;
    auto r = fork.api().request("PUT", "/snapshot/load",
                                "{\"snapshot_path\":\"" + snap +
                                    "/vmstate\",\"mem_backend\":{\"backend_type\":\"File\","
                                    "\"backend_path\":\"" +
                                    snap + "/memory.bin\"},\"resume_vm\":false}");
    ASSERT_EQ(r.status, 204) << r.body;
    Json loaded(fork.api().request("GET", "/").body);
    ASSERT_EQ(cJSON_GetArraySize(loaded.get("drives")), 2) << "drives restored from the vmstate";
    r = fork.api().request("PATCH", "/drives/nope",
                           "{\"drive_id\":\"nope\",\"path_on_host\":\"" + data_ + "\"}");
    EXPECT_EQ(r.status, 400) << r.body;
    r = fork.api().request("PATCH", "/drives/data",
                           "{\"drive_id\":\"data\",\"path_on_host\":\"" + dir_.file("nope.img") +
                               "\"}");
    EXPECT_EQ(r.status, 400) << r.body;
    r = fork.api().request("PATCH", "/drives/data",
                           "{\"drive_id\":\"data\",\"path_on_host\":\"" + dir_.file("fork.img") +
                               "\"}");
    ASSERT_EQ(r.status, 204) << r.body;
    ASSERT_NO_FATAL_FAILURE(fork.resume());
    ASSERT_NO_FATAL_FAILURE(
        fork.wait_progress(*std::max_element(before.totals.begin(), before.totals.end()) + 5000));
    ASSERT_NO_FATAL_FAILURE(fork.pause());
    ASSERT_NO_FATAL_FAILURE(fork.snapshot(again + "/vmstate", again + "/memory.bin"));
    auto after = run_verify({again, "--disk", dir_.file("fork.img")});
    EXPECT_EQ(after.exit_code, 0) << after.err << after.out;
    for (size_t i = 0; i < after.totals.size(); i++)
        EXPECT_GT(after.totals[i], before.totals[i]);
    // The fork wrote its own copy only: the source's drive is as the source left it.
    EXPECT_EQ(read_all(data_), source_disk);
}

TEST_F(VmmDiskTest, LoadFailsWhenARecordedDriveIsGone)
{
    std::string snap = make_dir(dir_, "snap");
    TestVmm source(make_dir(dir_, "source"));
    ASSERT_NO_FATAL_FAILURE(boot_with_disk(source, root_, data_));
    ASSERT_NO_FATAL_FAILURE(source.wait_progress(1000));
    ASSERT_NO_FATAL_FAILURE(source.pause());
    ASSERT_NO_FATAL_FAILURE(source.snapshot(snap + "/vmstate", snap + "/memory.bin"));
    ASSERT_EQ(0, unlink(data_.c_str()));
    TestVmm fork(make_dir(dir_, "fork"));
    auto r = fork.api().request("PUT", "/snapshot/load",
                                "{\"snapshot_path\":\"" + snap +
                                    "/vmstate\",\"mem_backend\":{\"backend_type\":\"File\","
                                    "\"backend_path\":\"" +
                                    snap + "/memory.bin\"},\"resume_vm\":false}");
    EXPECT_EQ(r.status, 400) << r.body;
    EXPECT_NE(r.body.find("data"), std::string::npos) << r.body;
}

// snapshot/load's network_overrides and vsock_override, as Firecracker takes them: the
// snapshot's interfaces and vsock come back from the vmstate, an override gives one another tap
// or socket (the MAC stays the snapshot's), and an unknown interface is a 400 that leaves the
// process fresh for another load.
TEST_F(VmmDiskTest, LoadOverridesTapsAndTheVsockSocketAndRefusesAnUnknownInterface)
{
    std::string snap = make_dir(dir_, "snap");
    TestVmm source(make_dir(dir_, "source"));
    auto r = source.api().request("PUT", "/network-interfaces/eth0",
                                  "{\"iface_id\":\"eth0\",\"host_dev_name\":\"fk-src\","
                                  "\"guest_mac\":\"06:00:ac:10:00:02\"}");
    ASSERT_EQ(r.status, 204) << r.body;
    r = source.api().request("PUT", "/vsock",
                             "{\"guest_cid\":3,\"uds_path\":\"" + dir_.file("src.sock") + "\"}");
    ASSERT_EQ(r.status, 204) << r.body;
    ASSERT_NO_FATAL_FAILURE(source.boot(1, 32, "pattern=random seed=5"));
    ASSERT_NO_FATAL_FAILURE(source.wait_progress(1000));
    ASSERT_NO_FATAL_FAILURE(source.pause());
    ASSERT_NO_FATAL_FAILURE(source.snapshot(snap + "/vmstate", snap + "/memory.bin"));

    std::string load = "{\"snapshot_path\":\"" + snap +
                       "/vmstate\",\"mem_backend\":{\"backend_type\":\"File\",\"backend_path\":\"" +
                       snap + "/memory.bin\"},\"resume_vm\":false";
    TestVmm fork(make_dir(dir_, "fork"));
    r = fork.api().request("PUT", "/snapshot/load",
                           load + ",\"network_overrides\":[{\"iface_id\":\"eth9\","
                                  "\"host_dev_name\":\"fk-t1\"}]}");
    EXPECT_EQ(r.status, 400) << r.body;
    EXPECT_NE(r.body.find("eth9"), std::string::npos) << r.body;
    r = fork.api().request("PUT", "/snapshot/load",
                           load + ",\"network_overrides\":[{\"iface_id\":\"eth0\","
                                  "\"host_dev_name\":\"fk-t1\"}],\"vsock_override\":"
                                  "{\"uds_path\":\"" +
                               dir_.file("fork.sock") + "\"}}");
    ASSERT_EQ(r.status, 204) << r.body;
    Json loaded(fork.api().request("GET", "/").body);
    const cJSON *net = cJSON_GetArrayItem(loaded.get("network_interfaces"), 0);
    ASSERT_NE(net, nullptr) << "interfaces restored from the vmstate";
    EXPECT_STREQ(cJSON_GetObjectItem(net, "host_dev_name")->valuestring, "fk-t1");
    EXPECT_STREQ(cJSON_GetObjectItem(net, "guest_mac")->valuestring, "06:00:ac:10:00:02");
    const cJSON *vsock = loaded.get("vsock");
    ASSERT_TRUE(cJSON_IsObject(vsock));
    EXPECT_EQ(dir_.file("fork.sock"), cJSON_GetObjectItem(vsock, "uds_path")->valuestring);
    EXPECT_EQ(3, cJSON_GetObjectItem(vsock, "guest_cid")->valueint);
    // Without overrides a restore keeps what the snapshot has.
    TestVmm plain(make_dir(dir_, "plain"));
    r = plain.api().request("PUT", "/snapshot/load", load + "}");
    ASSERT_EQ(r.status, 204) << r.body;
    Json kept(plain.api().request("GET", "/").body);
    net = cJSON_GetArrayItem(kept.get("network_interfaces"), 0);
    ASSERT_NE(net, nullptr);
    EXPECT_STREQ(cJSON_GetObjectItem(net, "host_dev_name")->valuestring, "fk-src");
    EXPECT_EQ(dir_.file("src.sock"),
              cJSON_GetObjectItem(kept.get("vsock"), "uds_path")->valuestring);
}

} // namespace
