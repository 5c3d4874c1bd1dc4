// A VM's devices: the rules a description follows, the identity of a drive's file, and the
// JSON form kept in VM records and snapshot.json (numbers beyond 2^53 included).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unistd.h>

extern "C" {
#include "forkd/devices.h"
#include "snapshot_json.h"
#include "vm_record.h"
}

namespace
{

struct vm_devices Sample()
{
    struct vm_devices d = {};
    snprintf(d.initrd_path, sizeof(d.initrd_path), "/images/initrd.img");
    d.drive_count = 2;
    snprintf(d.drives[0].id, sizeof(d.drives[0].id), "rootfs");
    snprintf(d.drives[0].path, sizeof(d.drives[0].path), "/images/rootfs.ext4");
    d.drives[0].root = true;
    d.drives[0].read_only = true;
    d.drives[0].identity = {1ULL << 30, 1764633600123456789LL, 1764633600987654321LL,
                            18446744073709551557ULL, 66306};
    snprintf(d.drives[1].id, sizeof(d.drives[1].id), "data_1");
    snprintf(d.drives[1].path, sizeof(d.drives[1].path), "/images/data.img");
    d.net_count = 1;
    snprintf(d.nets[0].id, sizeof(d.nets[0].id), "eth0");
    snprintf(d.nets[0].host_dev_name, sizeof(d.nets[0].host_dev_name), "tap0");
    snprintf(d.nets[0].guest_mac, sizeof(d.nets[0].guest_mac), "06:00:AC:10:00:02");
    d.vsock.present = true;
    d.vsock.guest_cid = 4000000000u;
    snprintf(d.vsock.uds_path, sizeof(d.vsock.uds_path), "/run/v.sock");
    return d;
}

void ExpectSame(const struct vm_devices &a, const struct vm_devices &b)
{
    EXPECT_STREQ(a.initrd_path, b.initrd_path);
    ASSERT_EQ(a.drive_count, b.drive_count);
    for (size_t i = 0; i < a.drive_count; i++) {
        EXPECT_STREQ(a.drives[i].id, b.drives[i].id);
        EXPECT_STREQ(a.drives[i].path, b.drives[i].path);
        EXPECT_EQ(a.drives[i].root, b.drives[i].root);
        EXPECT_EQ(a.drives[i].read_only, b.drives[i].read_only);
        EXPECT_TRUE(devices_file_identity_equal(&a.drives[i].identity, &b.drives[i].identity));
    }
    ASSERT_EQ(a.net_count, b.net_count);
    for (size_t i = 0; i < a.net_count; i++) {
        EXPECT_STREQ(a.nets[i].id, b.nets[i].id);
        EXPECT_STREQ(a.nets[i].host_dev_name, b.nets[i].host_dev_name);
        EXPECT_STREQ(a.nets[i].guest_mac, b.nets[i].guest_mac);
    }
    EXPECT_EQ(a.vsock.present, b.vsock.present);
    EXPECT_EQ(a.vsock.guest_cid, b.vsock.guest_cid);
    EXPECT_STREQ(a.vsock.uds_path, b.vsock.uds_path);
}

TEST(Devices, ASampleIsValid)
{
    struct vm_devices d = Sample();
    struct forkd_error err = {};
    EXPECT_EQ(0, devices_validate(&d, &err)) << err.message;
    EXPECT_TRUE(devices_have_writable_drive(&d));
    d.drives[1].read_only = true;
    EXPECT_FALSE(devices_have_writable_drive(&d));
}

TEST(Devices, EachRuleIsRefusedNamingTheField)
{
    struct Case {
        const char *field;
        void (*spoil)(struct vm_devices *);
    } cases[] = {
        {"drives[1].drive_id", [](struct vm_devices *d) { strcpy(d->drives[1].id, "rootfs"); }},
        {"drives[0].drive_id", [](struct vm_devices *d) { strcpy(d->drives[0].id, "a-b"); }},
        {"drives[1].path_on_host", [](struct vm_devices *d) { strcpy(d->drives[1].path, "x"); }},
        {"drives[1].path_on_host",
         [](struct vm_devices *d) { strcpy(d->drives[1].path, "/a/./b"); }},
        {"drives[1].is_root_device", [](struct vm_devices *d) { d->drives[1].root = true; }},
        {"network_interfaces[0].guest_mac",
         [](struct vm_devices *d) { strcpy(d->nets[0].guest_mac, "06:00:ac:10:00:0g"); }},
        {"network_interfaces[0].host_dev_name",
         [](struct vm_devices *d) { strcpy(d->nets[0].host_dev_name, "ta p"); }},
        {"vsock.guest_cid", [](struct vm_devices *d) { d->vsock.guest_cid = 2; }},
        {"vsock.uds_path", [](struct vm_devices *d) { d->vsock.uds_path[0] = '\0'; }},
        {"initrd_path", [](struct vm_devices *d) { strcpy(d->initrd_path, "/x/../y"); }},
        {"drives: at most", [](struct vm_devices *d) { d->drive_count = DEVICES_MAX_DRIVES + 1; }},
    };
    for (const auto &c : cases) {
        struct vm_devices d = Sample();
        c.spoil(&d);
        struct forkd_error err = {};
        EXPECT_EQ(-EINVAL, devices_validate(&d, &err)) << c.field;
        EXPECT_NE(nullptr, strstr(err.message, c.field)) << err.message;
    }
}

TEST(Devices, CheckFilesRecordsTheIdentityAndNamesAMissingFile)
{
    char path[] = "/tmp/forkd-drive-XXXXXX";
    int fd = mkstemp(path);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(4096, write(fd, std::string(4096, 'x').data(), 4096));
    close(fd);
    struct vm_devices d = {};
    d.drive_count = 1;
    strcpy(d.drives[0].id, "data");
    strcpy(d.drives[0].path, path);
    struct forkd_error err = {};
    ASSERT_EQ(0, devices_check_files(&d, &err)) << err.message;
    EXPECT_EQ(4096u, d.drives[0].identity.size);
    struct devices_file_identity now;
    ASSERT_EQ(0, devices_file_identity_of(path, &now));
    EXPECT_TRUE(devices_file_identity_equal(&now, &d.drives[0].identity));
    FILE *f = fopen(path, "r+");
    ASSERT_NE(nullptr, f);
    fputs("changed", f);
    fclose(f);
    ASSERT_EQ(0, devices_file_identity_of(path, &now));
    EXPECT_FALSE(devices_file_identity_equal(&now, &d.drives[0].identity));
    unlink(path);
    EXPECT_EQ(-ENOENT, devices_check_files(&d, &err));
    EXPECT_NE(nullptr, strstr(err.message, "drives[0].path_on_host")) << err.message;
}

TEST(Devices, AVmRecordKeepsThemExactly)
{
    char dir[] = "/tmp/forkd-devices-XXXXXX";
    ASSERT_NE(nullptr, mkdtemp(dir));
    struct vm_record written = {}, read = {};
    snprintf(written.id, sizeof(written.id), "vm-3");
    ASSERT_EQ(0, vm_identity_of(getpid(), &written.vmm));
    written.memory = VM_MEMORY_MEMFD;
    written.page_size = 4096;
    written.devices = Sample();
    ASSERT_EQ(0, vm_record_save(dir, &written));
    ASSERT_EQ(0, vm_record_load(dir, "vm-3", &read));
    ExpectSame(written.devices, read.devices);
    vm_record_remove(dir, "vm-3");
    rmdir(dir);
}

TEST(Devices, SnapshotJsonKeepsThemExactlyAndOlderRecordsHaveNone)
{
    struct store_snapshot meta = {};
    snprintf(meta.name, sizeof(meta.name), "base");
    meta.mode = STORE_MODE_LIVE;
    meta.page_size = 4096;
    meta.devices = Sample();
    char *text = snapshot_json_format(&meta);
    ASSERT_NE(nullptr, text);
    struct store_snapshot read = {};
    struct forkd_error err = {};
    ASSERT_EQ(0, snapshot_json_parse(text, strlen(text), &read, &err)) << err.message;
    ExpectSame(meta.devices, read.devices);
    // A record written before devices existed: no devices.
    std::string old(text);
    free(text);
    size_t at = old.find(",\n\t\"devices\"");
    ASSERT_NE(std::string::npos, at) << old;
    old = old.substr(0, at) + "\n}";
    ASSERT_EQ(0, snapshot_json_parse(old.data(), old.size(), &read, &err)) << err.message;
    EXPECT_EQ(0u, read.devices.drive_count);
    EXPECT_FALSE(read.devices.vsock.present);
}

} // namespace
