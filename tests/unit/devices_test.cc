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

// Spawn's per-fork overrides: a second interface, so that two taps must stay apart.
struct vm_devices TwoInterfaces()
{
    struct vm_devices d = Sample();
    d.net_count = 2;
    snprintf(d.nets[1].id, sizeof(d.nets[1].id), "eth1");
    snprintf(d.nets[1].host_dev_name, sizeof(d.nets[1].host_dev_name), "tap1");
    return d;
}

struct devices_overrides Overrides(const char *eth0, const char *eth1, const char *vsock)
{
    struct devices_overrides o = {};
    if (eth0) {
        snprintf(o.nets[o.net_count].iface_id, DEVICES_ID_MAX, "eth0");
        snprintf(o.nets[o.net_count++].host_dev_name, DEVICES_PATTERN_MAX, "%s", eth0);
    }
    if (eth1) {
        snprintf(o.nets[o.net_count].iface_id, DEVICES_ID_MAX, "eth1");
        snprintf(o.nets[o.net_count++].host_dev_name, DEVICES_PATTERN_MAX, "%s", eth1);
    }
    if (vsock)
        snprintf(o.vsock_uds_path, sizeof(o.vsock_uds_path), "%s", vsock);
    return o;
}

TEST(DeviceOverrides, EachForkGetsItsOwnTapsAndSocket)
{
    struct vm_devices snapshot = TwoInterfaces();
    struct devices_overrides o = Overrides("fa{i}", "fb{i}", "/run/fork-{i}-{vm_id}.sock");
    struct forkd_error err = {};
    ASSERT_EQ(0, devices_overrides_validate(&o, 12, &err)) << err.message;
    ASSERT_EQ(0, devices_overrides_check(&snapshot, &o, 12, "s", &err)) << err.message;
    struct vm_devices fork = snapshot;
    ASSERT_EQ(0, devices_overrides_apply(&fork, &o, 11, "vm-42", &err)) << err.message;
    EXPECT_STREQ("fa11", fork.nets[0].host_dev_name);
    EXPECT_STREQ("fb11", fork.nets[1].host_dev_name);
    EXPECT_STREQ("06:00:AC:10:00:02", fork.nets[0].guest_mac); // the snapshot's, unchanged
    EXPECT_STREQ("/run/fork-11-vm-42.sock", fork.vsock.uds_path);
    EXPECT_EQ(0, devices_validate(&fork, &err)) << err.message;
}

TEST(DeviceOverrides, OneForkMayKeepOrRenameWithoutAPlaceholder)
{
    struct vm_devices snapshot = TwoInterfaces();
    struct devices_overrides none = {};
    struct forkd_error err = {};
    EXPECT_EQ(0, devices_overrides_check(&snapshot, &none, 1, "s", &err)) << err.message;
    struct devices_overrides o = Overrides("tapx", nullptr, "/run/one.sock");
    EXPECT_EQ(0, devices_overrides_validate(&o, 1, &err)) << err.message;
    EXPECT_EQ(0, devices_overrides_check(&snapshot, &o, 1, "s", &err)) << err.message;
}

TEST(DeviceOverrides, EachBadOverrideIsRefusedNamingTheField)
{
    struct Case {
        const char *field;
        struct devices_overrides o;
        unsigned count;
    } cases[] = {
        {"network_overrides[0].host_dev_name 'tap0': 2 forks", Overrides("tap0", "b{i}", "/{i}"),
         2},
        {"{vm_id} is not allowed", Overrides("t{vm_id}", nullptr, nullptr), 1},
        {"unknown placeholder at '{n}'", Overrides("t{n}", nullptr, nullptr), 1},
        {"unknown placeholder", Overrides("t{i", nullptr, nullptr), 1},
        {"network_overrides[0].host_dev_name", Overrides("", nullptr, nullptr), 1},
        {"'tap-abcdefghi{i}' for fork 100", Overrides("tap-abcdefghi{i}", nullptr, nullptr), 101},
        {"network_overrides[1].host_dev_name 'a1{i}' gives fork 0 tap a10",
         Overrides("a{i}", "a1{i}", nullptr), 12},
        {"network_overrides[1].host_dev_name 'same' gives fork 0 tap same",
         Overrides("same", "same", nullptr), 1},
        {"vsock_override.uds_path must be an absolute path", Overrides(nullptr, nullptr, "v{i}"),
         2},
        {"vsock_override.uds_path '/run/v.sock': 2 forks",
         Overrides(nullptr, nullptr, "/run/v.sock"), 2},
        {"longest VM id) vsock_override.uds_path: 114 bytes",
         Overrides(nullptr, nullptr,
                   "/sssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssss"
                   "sssssssssssssssss{vm_id}"),
         1},
    };
    for (const auto &c : cases) {
        struct forkd_error err = {};
        EXPECT_EQ(-EINVAL, devices_overrides_validate(&c.o, c.count, &err)) << c.field;
        EXPECT_NE(nullptr, strstr(err.message, c.field)) << err.message;
    }
    struct devices_overrides twice = Overrides("a{i}", "b{i}", nullptr);
    strcpy(twice.nets[1].iface_id, "eth0");
    struct forkd_error err = {};
    EXPECT_EQ(-EINVAL, devices_overrides_validate(&twice, 2, &err));
    EXPECT_NE(nullptr, strstr(err.message, "network_overrides[1].iface_id 'eth0' is also"))
        << err.message;
}

TEST(DeviceOverrides, TheSnapshotsDevicesDecideWhatIsNeededAndKnown)
{
    struct Case {
        const char *message;
        struct devices_overrides o;
        unsigned count;
    } cases[] = {
        {"interface 'eth0' uses tap tap0, which two forks cannot share: give network_overrides "
         "{iface_id: \"eth0\"",
         Overrides(nullptr, "b{i}", "/v{i}"), 2},
        {"vsock uses socket /run/v.sock, which two forks cannot share: give vsock_override",
         Overrides("a{i}", "b{i}", nullptr), 2},
        {"gives fork 0 tap tap1, which interface 'eth1' keeps", Overrides("tap1", nullptr, nullptr),
         1},
    };
    struct vm_devices snapshot = TwoInterfaces();
    for (const auto &c : cases) {
        struct forkd_error err = {};
        EXPECT_EQ(0, devices_overrides_validate(&c.o, c.count, &err)) << err.message;
        EXPECT_EQ(-EINVAL, devices_overrides_check(&snapshot, &c.o, c.count, "s", &err))
            << c.message;
        EXPECT_NE(nullptr, strstr(err.message, c.message)) << err.message;
    }
    struct devices_overrides unknown = Overrides("a{i}", "b{i}", "/v{i}");
    strcpy(unknown.nets[1].iface_id, "eth7");
    struct forkd_error err = {};
    EXPECT_EQ(-EINVAL, devices_overrides_check(&snapshot, &unknown, 2, "s", &err));
    EXPECT_NE(nullptr, strstr(err.message, "network_overrides[1].iface_id 'eth7': the VM of "
                                           "snapshot s has no such interface (its interfaces: "
                                           "eth0, eth1)"))
        << err.message;
    snapshot.vsock.present = false;
    struct devices_overrides vsock = Overrides(nullptr, nullptr, "/v.sock");
    EXPECT_EQ(-EINVAL, devices_overrides_check(&snapshot, &vsock, 1, "s", &err));
    EXPECT_NE(nullptr, strstr(err.message, "vsock_override.uds_path: the VM of snapshot s has "
                                           "no vsock"))
        << err.message;
}

} // namespace
