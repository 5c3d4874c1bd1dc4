// The snapshot store: names, the publish protocol, crash leftovers, corrupt metadata, uses and
// deletes, concurrency, and a full disk.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <cjson/cJSON.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/mount.h>
#include <unistd.h>

extern "C" {
#include "forkd/store.h"
}

namespace fs = std::filesystem;

namespace
{

const char kRule[] = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$";

std::string make_temp_dir()
{
    const char *base = getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/forkd-store-XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    if (!mkdtemp(buf.data()))
        ADD_FAILURE() << "mkdtemp " << tmpl << ": " << strerror(errno);
    return std::string(buf.data());
}

void write_file(const std::string &path, const std::string &content)
{
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << content;
    ASSERT_TRUE(out.good()) << path;
}

std::string read_file(const std::string &path)
{
    std::ifstream in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

// Names in dir, sorted (std::set), so a test can compare a whole directory at once.
std::set<std::string> entries_of(const std::string &dir)
{
    std::set<std::string> names;
    for (const auto &e : fs::directory_iterator(dir))
        names.insert(e.path().filename().string());
    return names;
}

// Every field set to something distinct, including numbers past 2^32.
struct store_snapshot full_meta(const char *name)
{
    struct store_snapshot m = {};
    snprintf(m.name, sizeof(m.name), "%s", name);
    snprintf(m.source_vm_id, sizeof(m.source_vm_id), "vm-0123456789abcdef");
    snprintf(m.source_vm_name, sizeof(m.source_vm_name), "agent.7");
    snprintf(m.parent_snapshot, sizeof(m.parent_snapshot), "base-image");
    m.mode = STORE_MODE_LIVE_ARM_IN_PAUSE;
    m.vcpu_count = 3;
    m.mem_size_mib = 4096;
    m.region_count = 2;
    m.regions[0] = {false, 0, UINT64_C(3) << 30, 0, 4096}; /* a VMM that does not say */
    m.regions[1] = {true, UINT64_C(4) << 30, UINT64_C(1) << 30, UINT64_C(3) << 30, 2u << 20};
    m.page_size = 4096;
    m.figures = {101, 102, 103, 104, 105, 106, 107, UINT64_C(1) << 50, 109, 110, UINT64_C(5) << 32, 111, 112, 113, 114};
    snprintf(m.vmm_binary, sizeof(m.vmm_binary), "/usr/bin/firecracker");
    snprintf(m.vmm_version, sizeof(m.vmm_version), "1.12.0-forkd");
    m.created_at_unix_ms = INT64_C(1700000000123);
    m.label_count = 2;
    snprintf(m.labels[0].key, sizeof(m.labels[0].key), "team");
    snprintf(m.labels[0].value, sizeof(m.labels[0].value), "evals \"quoted\" \\ ünïcode");
    snprintf(m.labels[1].key, sizeof(m.labels[1].key), "step");
    snprintf(m.labels[1].value, sizeof(m.labels[1].value), "42");
    return m;
}

// Adds "hot": {"version": version (none when negative), "ranges": ranges (JSON; none when null)}.
void add_hot(cJSON *root, int version, const char *ranges)
{
    cJSON *hot = cJSON_AddObjectToObject(root, "hot");
    if (version >= 0)
        cJSON_AddNumberToObject(hot, "version", version);
    if (ranges)
        cJSON_AddItemToObject(hot, "ranges", cJSON_Parse(ranges));
}

// count valid one-page ranges, a page apart: too many is the only thing wrong with them.
std::string many_hot_ranges(int count)
{
    std::string out = "[";
    for (int i = 0; i < count; i++)
        out += (i ? ", [" : "[") + std::to_string(i * 8192) + ", 4096]";
    return out + "]";
}

class StoreTest : public ::testing::Test
{
  protected:
    void SetUp() override
    {
        state_dir_ = make_temp_dir();
        snapshots_ = state_dir_ + "/snapshots";
        Open();
    }

    void TearDown() override
    {
        store_close(store_);
        std::error_code ec;
        fs::remove_all(state_dir_, ec);
    }

    void Open()
    {
        struct forkd_error err = {};
        ASSERT_EQ(0, store_open(state_dir_.c_str(), &store_, &err)) << err.message;
    }

    void Reopen()
    {
        store_close(store_);
        store_ = nullptr;
        Open();
    }

    // begin + write both data files; returns the writer.
    struct store_writer *Begin(const char *name, size_t memory_bytes = 8192,
                               size_t vmstate_bytes = 100)
    {
        struct forkd_error err = {};
        struct store_writer *w = nullptr;
        EXPECT_EQ(0, store_begin(store_, name, &w, &err)) << err.message;
        if (!w)
            return nullptr;
        write_file(store_writer_vmstate_path(w), std::string(vmstate_bytes, 'v'));
        write_file(store_writer_memory_path(w), std::string(memory_bytes, 'm'));
        return w;
    }

    void Publish(const char *name)
    {
        struct store_writer *w = Begin(name);
        ASSERT_NE(nullptr, w);
        struct forkd_error err = {};
        struct store_snapshot meta = full_meta(name);
        ASSERT_EQ(0, store_publish(w, &meta, &err)) << err.message;
    }

    int Get(const char *name, struct store_snapshot *out, struct forkd_error *err)
    {
        return store_get(store_, name, out, err);
    }

    uint32_t Users(const char *name)
    {
        struct store_snapshot s = {};
        struct forkd_error err = {};
        EXPECT_EQ(0, Get(name, &s, &err)) << err.message;
        return s.users;
    }

    std::string state_dir_;
    std::string snapshots_;
    struct store *store_ = nullptr;
};

// ---- names ----

TEST(StoreName, AcceptsNamesMatchingTheRule)
{
    const std::string longest(STORE_NAME_MAX, 'a');
    for (const char *name : {"a", "Z", "7", "a.b-c_d", "v1.2.3", "a..b", "x-", longest.c_str()}) {
        struct forkd_error err = {};
        EXPECT_EQ(0, store_validate_name(name, &err)) << name << ": " << err.message;
    }
}

TEST(StoreName, RejectsBadNamesNamingTheNameAndTheRule)
{
    const std::string too_long(STORE_NAME_MAX + 1, 'a');
    struct Case {
        std::string name;
        const char *why;
    } cases[] = {
        {"", "is empty"},
        {".", "must start with a letter or a digit"},
        {"..", "must start with a letter or a digit"},
        {".hidden", "must start with a letter or a digit"},
        {"-x", "must start with a letter or a digit"},
        {"_x", "must start with a letter or a digit"},
        {"/etc", "must start with a letter or a digit"},
        {"../up", "must start with a letter or a digit"},
        {"a/b", "at position 1"},
        {"a/../b", "at position 1"},
        {"a b", "at position 1"},
        {"ab\n", "at position 2"},
        {"caf\xc3\xa9", "at position 3"},
        {"a:b", "at position 1"},
        {too_long, "longer than 64 characters"},
    };
    for (const auto &c : cases) {
        struct forkd_error err = {};
        EXPECT_EQ(-EINVAL, store_validate_name(c.name.c_str(), &err)) << c.name;
        EXPECT_EQ(-EINVAL, err.code);
        std::string msg = err.message;
        EXPECT_NE(std::string::npos, msg.find(c.why)) << c.name << ": " << msg;
        EXPECT_NE(std::string::npos, msg.find(kRule)) << msg;
        bool printable = std::all_of(c.name.begin(), c.name.end(),
                                     [](char ch) { return ch >= 0x20 && ch < 0x7f; });
        if (printable && !c.name.empty()) {
            EXPECT_NE(std::string::npos, msg.find("'" + c.name.substr(0, STORE_NAME_MAX))) << msg;
        }
    }
    struct forkd_error err = {};
    EXPECT_EQ(-EINVAL, store_validate_name(nullptr, &err));
    // Control characters are escaped, so a name cannot forge lines in a log.
    store_validate_name("ab\n", &err);
    EXPECT_NE(nullptr, strstr(err.message, "ab\\x0a")) << err.message;
}

TEST_F(StoreTest, BadNamesAreRefusedByEveryEntryPoint)
{
    struct forkd_error err = {};
    struct store_writer *w = nullptr;
    struct store_snapshot s;
    EXPECT_EQ(-EINVAL, store_begin(store_, "../escape", &w, &err));
    EXPECT_EQ(nullptr, w);
    EXPECT_EQ(-EINVAL, store_get(store_, "../escape", &s, &err));
    EXPECT_EQ(-EINVAL, store_acquire(store_, "a/b", &s, &err));
    EXPECT_EQ(-EINVAL, store_delete(store_, "..", true, &err));
    EXPECT_TRUE(entries_of(snapshots_).empty());
    EXPECT_FALSE(fs::exists(state_dir_ + "/escape"));
}

// ---- publish ----

TEST_F(StoreTest, PublishRoundTripsEveryFieldAndSurvivesReopen)
{
    struct store_writer *w = Begin("snap-1", 12288, 777);
    ASSERT_NE(nullptr, w);
    EXPECT_EQ(0, std::string(store_writer_dir(w)).rfind(snapshots_ + "/.tmp-snap-1", 0));
    EXPECT_EQ(std::string(store_writer_dir(w)) + "/vmstate", store_writer_vmstate_path(w));
    EXPECT_EQ(std::string(store_writer_dir(w)) + "/memory.bin", store_writer_memory_path(w));
    struct store_snapshot meta = full_meta("snap-1");
    meta.memory_bytes = 1; // the store records the real sizes
    meta.vmstate_bytes = 2;
    meta.hot_count = 2;
    meta.hot[0] = {0, 4096};
    meta.hot[1] = {8192, 4096};
    struct forkd_error err = {};
    ASSERT_EQ(0, store_publish(w, &meta, &err)) << err.message;
    EXPECT_EQ((std::set<std::string>{"snap-1"}), entries_of(snapshots_));
    EXPECT_EQ((std::set<std::string>{"memory.bin", "snapshot.json", "vmstate"}),
              entries_of(snapshots_ + "/snap-1"));

    for (int pass = 0; pass < 2; pass++) {
        SCOPED_TRACE(pass == 0 ? "after publish" : "after reopen");
        struct store_snapshot got;
        memset(&got, 0xa5, sizeof(got));
        ASSERT_EQ(0, Get("snap-1", &got, &err)) << err.message;
        struct store_snapshot want = full_meta("snap-1");
        EXPECT_STREQ(want.name, got.name);
        EXPECT_EQ(STORE_STATE_READY, got.state);
        EXPECT_STREQ(want.source_vm_id, got.source_vm_id);
        EXPECT_STREQ(want.source_vm_name, got.source_vm_name);
        EXPECT_STREQ(want.parent_snapshot, got.parent_snapshot);
        EXPECT_EQ(want.mode, got.mode);
        EXPECT_EQ(want.vcpu_count, got.vcpu_count);
        EXPECT_EQ(want.mem_size_mib, got.mem_size_mib);
        EXPECT_EQ(12288u, got.memory_bytes);
        EXPECT_EQ(777u, got.vmstate_bytes);
        ASSERT_EQ(want.region_count, got.region_count);
        for (size_t i = 0; i < want.region_count; i++) {
            EXPECT_EQ(want.regions[i].guest_phys_addr_known, got.regions[i].guest_phys_addr_known)
                << i;
            EXPECT_EQ(want.regions[i].guest_phys_addr, got.regions[i].guest_phys_addr) << i;
            EXPECT_EQ(want.regions[i].size, got.regions[i].size) << i;
            EXPECT_EQ(want.regions[i].file_offset, got.regions[i].file_offset) << i;
            EXPECT_EQ(want.regions[i].page_size, got.regions[i].page_size) << i;
        }
        EXPECT_EQ(want.page_size, got.page_size);
        EXPECT_EQ(0, memcmp(&want.figures, &got.figures, sizeof(want.figures)));
        EXPECT_STREQ(want.vmm_binary, got.vmm_binary);
        EXPECT_STREQ(want.vmm_version, got.vmm_version);
        EXPECT_EQ(want.created_at_unix_ms, got.created_at_unix_ms);
        ASSERT_EQ(want.label_count, got.label_count);
        for (size_t i = 0; i < want.label_count; i++) {
            EXPECT_STREQ(want.labels[i].key, got.labels[i].key);
            EXPECT_STREQ(want.labels[i].value, got.labels[i].value);
        }
        EXPECT_EQ(snapshots_ + "/snap-1", got.path);
        EXPECT_EQ(0u, got.users);
        ASSERT_EQ(2u, got.hot_count);
        EXPECT_EQ(0u, got.hot[0].offset);
        EXPECT_EQ(4096u, got.hot[0].length);
        EXPECT_EQ(8192u, got.hot[1].offset);
        EXPECT_EQ(4096u, got.hot[1].length);
        if (pass == 0)
            Reopen();
    }
}

TEST_F(StoreTest, SnapshotJsonIsVersionedReadableAndHoldsNoStoreFields)
{
    Publish("readable");
    std::string text = read_file(snapshots_ + "/readable/snapshot.json");
    EXPECT_NE(std::string::npos, text.find('\n')) << "not pretty-printed: " << text;
    cJSON *root = cJSON_Parse(text.c_str());
    ASSERT_NE(nullptr, root) << text;
    EXPECT_EQ(1, cJSON_GetObjectItem(root, "format_version")->valueint);
    EXPECT_STREQ("live_arm_in_pause", cJSON_GetObjectItem(root, "mode")->valuestring);
    EXPECT_STREQ("evals \"quoted\" \\ ünïcode",
                 cJSON_GetObjectItem(cJSON_GetObjectItem(root, "labels"), "team")->valuestring);
    EXPECT_EQ(nullptr, cJSON_GetObjectItem(root, "path"));
    EXPECT_EQ(nullptr, cJSON_GetObjectItem(root, "users"));
    EXPECT_EQ(nullptr, cJSON_GetObjectItem(root, "state"));
    EXPECT_EQ(nullptr, cJSON_GetObjectItem(root, "hot")) << "written without a hot set";
    cJSON_Delete(root);
    // Exact integers, not 1.1258999068426e+15.
    EXPECT_NE(std::string::npos, text.find("1125899906842624")) << text;
}

TEST_F(StoreTest, PublishFillsCreatedAtWhenZero)
{
    struct store_writer *w = Begin("now");
    struct store_snapshot meta = full_meta("now");
    meta.created_at_unix_ms = 0;
    struct forkd_error err = {};
    int64_t before = (int64_t)time(nullptr) * 1000;
    ASSERT_EQ(0, store_publish(w, &meta, &err)) << err.message;
    struct store_snapshot got;
    ASSERT_EQ(0, Get("now", &got, &err));
    EXPECT_GE(got.created_at_unix_ms, before);
    EXPECT_LE(got.created_at_unix_ms, before + 60000);
}

TEST_F(StoreTest, WritingIsListedAndCannotBeAcquired)
{
    Publish("done");
    struct store_writer *w = Begin("in-progress");
    ASSERT_NE(nullptr, w);
    struct store_snapshot *list = nullptr;
    size_t count = 0;
    struct forkd_error err = {};
    ASSERT_EQ(0, store_list(store_, &list, &count, &err));
    ASSERT_EQ(2u, count);
    EXPECT_STREQ("done", list[0].name);
    EXPECT_EQ(STORE_STATE_READY, list[0].state);
    EXPECT_STREQ("in-progress", list[1].name);
    EXPECT_EQ(STORE_STATE_WRITING, list[1].state);
    EXPECT_STREQ(store_writer_dir(w), list[1].path);
    free(list);

    struct store_snapshot got;
    ASSERT_EQ(0, Get("in-progress", &got, &err));
    EXPECT_EQ(STORE_STATE_WRITING, got.state);
    EXPECT_EQ(-EAGAIN, store_acquire(store_, "in-progress", &got, &err));
    EXPECT_NE(nullptr, strstr(err.message, "still being written")) << err.message;
    EXPECT_NE(nullptr, strstr(err.message, "in-progress")) << err.message;
    EXPECT_FALSE(fs::exists(snapshots_ + "/in-progress"));

    struct store_snapshot meta = full_meta("in-progress");
    ASSERT_EQ(0, store_publish(w, &meta, &err)) << err.message;
    ASSERT_EQ(0, store_acquire(store_, "in-progress", &got, &err)) << err.message;
    EXPECT_EQ(STORE_STATE_READY, got.state);
    EXPECT_EQ(1u, got.users);
    store_release(store_, "in-progress");
}

TEST_F(StoreTest, ListIsSortedByNameAndEmptyListIsNull)
{
    struct store_snapshot *list = nullptr;
    size_t count = 7;
    struct forkd_error err = {};
    ASSERT_EQ(0, store_list(store_, &list, &count, &err));
    EXPECT_EQ(0u, count);
    EXPECT_EQ(nullptr, list);
    for (const char *name : {"b", "a0", "C", "a"})
        Publish(name);
    struct store_writer *w = Begin("ab");
    ASSERT_EQ(0, store_list(store_, &list, &count, &err));
    std::vector<std::string> names;
    for (size_t i = 0; i < count; i++)
        names.push_back(list[i].name);
    free(list);
    EXPECT_EQ((std::vector<std::string>{"C", "a", "a0", "ab", "b"}), names);
    store_abort(w);
}

TEST_F(StoreTest, DuplicateNamesAreRefused)
{
    Publish("ready");
    struct store_writer *w = Begin("writing");
    struct store_writer *dup = nullptr;
    struct forkd_error err = {};
    EXPECT_EQ(-EEXIST, store_begin(store_, "ready", &dup, &err));
    EXPECT_EQ(nullptr, dup);
    EXPECT_NE(nullptr, strstr(err.message, "'ready' already exists")) << err.message;
    EXPECT_EQ(-EEXIST, store_begin(store_, "writing", &dup, &err));
    EXPECT_EQ(nullptr, dup);
    EXPECT_NE(nullptr, strstr(err.message, "already being written")) << err.message;
    // The refused begins left no temporary directory behind.
    EXPECT_EQ(2u, entries_of(snapshots_).size());
    store_abort(w);
    EXPECT_EQ((std::set<std::string>{"ready"}), entries_of(snapshots_));
}

TEST_F(StoreTest, BeginRefusesANameTakenOnDiskBehindTheStoresBack)
{
    fs::create_directory(snapshots_ + "/appeared");
    struct store_writer *w = nullptr;
    struct forkd_error err = {};
    EXPECT_EQ(-EEXIST, store_begin(store_, "appeared", &w, &err));
    EXPECT_TRUE(fs::exists(snapshots_ + "/appeared"));
}

TEST_F(StoreTest, AbortLeavesNothingAndFreesTheName)
{
    struct store_writer *w = Begin("aborted");
    ASSERT_NE(nullptr, w);
    std::string dir = store_writer_dir(w);
    fs::create_directory(dir + "/extra"); // whatever the branch left behind
    write_file(dir + "/extra/f", "x");
    store_abort(w);
    EXPECT_TRUE(entries_of(snapshots_).empty());
    struct store_snapshot got;
    struct forkd_error err = {};
    EXPECT_EQ(-ENOENT, Get("aborted", &got, &err));
    Publish("aborted");
}

TEST_F(StoreTest, PublishWithAMissingDataFileFailsAndLeavesNothing)
{
    for (const char *missing : {"memory.bin", "vmstate"}) {
        SCOPED_TRACE(missing);
        struct store_writer *w = Begin("partial");
        ASSERT_NE(nullptr, w);
        std::string path = std::string(store_writer_dir(w)) + "/" + missing;
        ASSERT_EQ(0, unlink(path.c_str()));
        struct store_snapshot meta = full_meta("partial");
        struct forkd_error err = {};
        EXPECT_EQ(-ENOENT, store_publish(w, &meta, &err));
        EXPECT_NE(nullptr, strstr(err.message, path.c_str())) << err.message;
        EXPECT_NE(nullptr, strstr(err.message, "No such file or directory")) << err.message;
        EXPECT_NE(nullptr, strstr(err.message, "publish snapshot 'partial'")) << err.message;
        EXPECT_TRUE(entries_of(snapshots_).empty());
        struct store_snapshot got;
        EXPECT_EQ(-ENOENT, Get("partial", &got, &err));
    }
}

TEST_F(StoreTest, PublishRefusesMetadataItCannotStoreAndLeavesNothing)
{
    struct Case {
        const char *what;
        std::function<void(struct store_snapshot *)> spoil;
        const char *why;
    } cases[] = {
        {"other name", [](struct store_snapshot *m) { snprintf(m->name, 8, "other"); }, "other"},
        {"bad mode", [](struct store_snapshot *m) { m->mode = (enum store_mode)9; }, "mode 9"},
        {"too many regions", [](struct store_snapshot *m) { m->region_count = 17; }, "17 regions"},
        {"beyond 2^53",
         [](struct store_snapshot *m) { m->figures.total_ns = (UINT64_C(1) << 53) + 1; }, "2^53"},
        {"duplicate label", [](struct store_snapshot *m) { snprintf(m->labels[1].key, 8, "team"); },
         "twice"},
        {"unterminated label",
         [](struct store_snapshot *m) {
             memset(m->labels[0].value, 'x', sizeof(m->labels[0].value));
         },
         "unterminated"},
        {"unterminated vmm version",
         [](struct store_snapshot *m) { memset(m->vmm_version, 'x', sizeof(m->vmm_version)); },
         "not NUL-terminated"},
        {"hot range beyond memory.bin",
         [](struct store_snapshot *m) {
             m->hot_count = 1;
             m->hot[0] = {4096, 8192}; /* memory.bin is 8192 bytes */
         },
         "hot: ranges[0] ends at 12288, beyond memory_bytes (8192)"},
        {"hot ranges out of order",
         [](struct store_snapshot *m) {
             m->hot_count = 2;
             m->hot[0] = {4096, 4096};
             m->hot[1] = {0, 4096};
         },
         "ranges[1] starts at 0, before ranges[0] ends"},
        {"too many hot ranges",
         [](struct store_snapshot *m) { m->hot_count = STORE_MAX_HOT_RANGES + 1; },
         "257 ranges (at most 256)"},
    };
    for (const auto &c : cases) {
        SCOPED_TRACE(c.what);
        struct store_writer *w = Begin("meta");
        ASSERT_NE(nullptr, w);
        struct store_snapshot meta = full_meta("meta");
        c.spoil(&meta);
        struct forkd_error err = {};
        EXPECT_EQ(-EINVAL, store_publish(w, &meta, &err));
        EXPECT_NE(nullptr, strstr(err.message, c.why)) << err.message;
        EXPECT_TRUE(entries_of(snapshots_).empty());
    }
}

// ---- crash leftovers and corrupt snapshots ----

TEST_F(StoreTest, LeftoversAreRemovedAtOpenAndOtherFilesKept)
{
    Publish("kept");
    struct store_writer *w = Begin("crashed"); // a writer that never finished
    ASSERT_NE(nullptr, w);
    std::string crashed_dir = store_writer_dir(w);
    fs::create_directories(snapshots_ + "/.tmp-x/nested/deeper");
    write_file(snapshots_ + "/.tmp-x/memory.bin", "m");
    write_file(snapshots_ + "/.tmp-x/nested/deeper/f", "f");
    ASSERT_EQ(0, symlink("/etc", (snapshots_ + "/.tmp-x/nested/link").c_str()));
    fs::create_directories(snapshots_ + "/.tmp-deleting-y");
    write_file(snapshots_ + "/.tmp-deleting-y/vmstate", "v");
    write_file(snapshots_ + "/.tmp-file", "a plain file");
    write_file(snapshots_ + "/README", "not ours");
    fs::create_directories(snapshots_ + "/lost+found");
    // Simulate the crash: drop the store without finishing the writer.
    store_abort(w);
    fs::create_directories(crashed_dir);
    write_file(crashed_dir + "/memory.bin", "m");
    Reopen();
    EXPECT_EQ((std::set<std::string>{"README", "kept", "lost+found"}), entries_of(snapshots_));
    EXPECT_TRUE(fs::exists("/etc/passwd")) << "followed a symlink while removing";
    struct store_snapshot got;
    struct forkd_error err = {};
    EXPECT_EQ(0, Get("kept", &got, &err)) << err.message;
    EXPECT_EQ(-ENOENT, Get("crashed", &got, &err));
}

TEST_F(StoreTest, CorruptSnapshotsAreListedAsSuchAndNeverDeletedAtOpen)
{
    Publish("good");
    std::string good_json = read_file(snapshots_ + "/good/snapshot.json");
    auto copy_good = [&](const std::string &name) {
        fs::copy(snapshots_ + "/good", snapshots_ + "/" + name);
        std::string json = good_json;
        json.replace(json.find("\"good\""), 6, "\"" + name + "\"");
        write_file(snapshots_ + "/" + name + "/snapshot.json", json);
    };
    copy_good("not-json");
    write_file(snapshots_ + "/not-json/snapshot.json", "{ this is not json");
    copy_good("no-json");
    fs::remove(snapshots_ + "/no-json/snapshot.json");
    copy_good("short-memory");
    fs::resize_file(snapshots_ + "/short-memory/memory.bin", 4096);
    copy_good("renamed");
    write_file(snapshots_ + "/renamed/snapshot.json", good_json); // still says "good"
    Reopen();

    struct store_snapshot *list = nullptr;
    size_t count = 0;
    struct forkd_error err = {};
    ASSERT_EQ(0, store_list(store_, &list, &count, &err));
    ASSERT_EQ(5u, count);
    for (size_t i = 0; i < count; i++) {
        SCOPED_TRACE(list[i].name);
        bool good = strcmp(list[i].name, "good") == 0;
        EXPECT_EQ(good ? STORE_STATE_READY : STORE_STATE_CORRUPT, list[i].state);
        EXPECT_EQ(good, list[i].corrupt_reason[0] == '\0') << list[i].corrupt_reason;
        EXPECT_EQ(snapshots_ + "/" + list[i].name, list[i].path);
    }
    free(list);

    struct Case {
        const char *name;
        const char *file;
        const char *why;
    } cases[] = {
        {"not-json", "snapshot.json", "not valid JSON"},
        {"no-json", "snapshot.json", "No such file or directory"},
        {"short-memory", "memory.bin", "8192 bytes"},
        {"renamed", "snapshot.json", "names snapshot 'good'"},
    };
    for (const auto &c : cases) {
        SCOPED_TRACE(c.name);
        std::string file = snapshots_ + "/" + c.name + "/" + c.file;
        struct store_snapshot got;
        EXPECT_EQ(-EIO, Get(c.name, &got, &err));
        EXPECT_NE(nullptr, strstr(err.message, file.c_str())) << err.message;
        EXPECT_NE(nullptr, strstr(err.message, c.why)) << err.message;
        EXPECT_EQ(-EIO, store_acquire(store_, c.name, &got, &err));
        struct store_writer *w = nullptr;
        EXPECT_EQ(-EEXIST, store_begin(store_, c.name, &w, &err));
        EXPECT_EQ(nullptr, w);
        EXPECT_NE(nullptr, strstr(err.message, file.c_str())) << err.message;
        EXPECT_TRUE(fs::exists(snapshots_ + "/" + c.name + "/vmstate")) << "user data deleted";
    }
    // An explicit delete is how a user gets rid of one.
    EXPECT_EQ(0, store_delete(store_, "not-json", false, &err)) << err.message;
    EXPECT_FALSE(fs::exists(snapshots_ + "/not-json"));
    Publish("not-json");
}

// Invalid UTF-8 in snapshot.json would reach clients that refuse it (proto3 strings) and break
// every listing; a FIFO planted as snapshot.json would hang the open. Both are corrupt snapshots.
TEST_F(StoreTest, InvalidUtf8AndNonRegularSnapshotJsonAreCorruptNotAHang)
{
    Publish("good");
    std::string good_json = read_file(snapshots_ + "/good/snapshot.json");
    auto copy_good = [&](const std::string &name) {
        fs::copy(snapshots_ + "/good", snapshots_ + "/" + name);
        std::string json = good_json;
        json.replace(json.find("\"good\""), 6, "\"" + name + "\"");
        return json;
    };
    std::string json = copy_good("bad-utf8");
    size_t version = json.find("\"version\":");
    ASSERT_NE(std::string::npos, version);
    json.insert(json.find('"', version + 10) + 1, "\xff\xfe");
    write_file(snapshots_ + "/bad-utf8/snapshot.json", json);
    copy_good("fifo");
    fs::remove(snapshots_ + "/fifo/snapshot.json");
    ASSERT_EQ(0, mkfifo((snapshots_ + "/fifo/snapshot.json").c_str(), 0600));
    Reopen();

    struct store_snapshot *list = nullptr;
    size_t count = 0;
    struct forkd_error err = {};
    ASSERT_EQ(0, store_list(store_, &list, &count, &err));
    ASSERT_EQ(3u, count);
    EXPECT_EQ(STORE_STATE_CORRUPT, list[0].state); // bad-utf8
    EXPECT_EQ(STORE_STATE_CORRUPT, list[1].state); // fifo
    EXPECT_EQ(STORE_STATE_READY, list[2].state);   // good
    free(list);
    struct store_snapshot got;
    EXPECT_EQ(-EIO, Get("bad-utf8", &got, &err));
    EXPECT_NE(nullptr, strstr(err.message, "not valid UTF-8")) << err.message;
    EXPECT_EQ(-EIO, Get("fifo", &got, &err));
    EXPECT_NE(nullptr, strstr(err.message, "not a regular file")) << err.message;
}

TEST_F(StoreTest, SnapshotJsonIsReadStrictly)
{
    Publish("strict");
    const std::string path = snapshots_ + "/strict/snapshot.json";
    const std::string original = read_file(path);
    struct Case {
        const char *what;
        std::function<void(cJSON *)> spoil;
        const char *why;
    } cases[] = {
        {"page_size as string",
         [](cJSON *r) { cJSON_ReplaceItemInObject(r, "page_size", cJSON_CreateString("4096")); },
         "\"page_size\" must be an integer"},
        {"missing vmm", [](cJSON *r) { cJSON_DeleteItemFromObject(r, "vmm"); },
         "\"vmm\" is missing"},
        {"format_version 2",
         [](cJSON *r) { cJSON_ReplaceItemInObject(r, "format_version", cJSON_CreateNumber(2)); },
         "format_version 2"},
        {"unknown mode",
         [](cJSON *r) { cJSON_ReplaceItemInObject(r, "mode", cJSON_CreateString("fast")); },
         "mode \"fast\""},
        {"negative",
         [](cJSON *r) { cJSON_ReplaceItemInObject(r, "page_size", cJSON_CreateNumber(-1)); },
         "\"page_size\""},
        {"fraction",
         [](cJSON *r) {
             cJSON_ReplaceItemInObject(cJSON_GetObjectItem(r, "figures"), "copy_ns",
                                       cJSON_CreateNumber(1.5));
         },
         "figures: field \"copy_ns\""},
        {"vcpu_count beyond u32",
         [](cJSON *r) {
             cJSON_ReplaceItemInObject(cJSON_GetObjectItem(r, "machine"), "vcpu_count",
                                       cJSON_CreateNumber(4294967296.0));
         },
         "\"vcpu_count\""},
        {"region not an object",
         [](cJSON *r) {
             cJSON_AddItemToArray(cJSON_GetObjectItem(r, "regions"), cJSON_CreateNull());
         },
         "regions[2]"},
        {"regions not an array",
         [](cJSON *r) { cJSON_ReplaceItemInObject(r, "regions", cJSON_CreateObject()); },
         "\"regions\" must be an array"},
        {"label value a number",
         [](cJSON *r) {
             cJSON_ReplaceItemInObject(cJSON_GetObjectItem(r, "labels"), "step",
                                       cJSON_CreateNumber(42));
         },
         "labels: \"step\""},
        {"labels an array",
         [](cJSON *r) { cJSON_ReplaceItemInObject(r, "labels", cJSON_CreateArray()); },
         "\"labels\" must be an object"},
        {"source_vm.id null",
         [](cJSON *r) {
             cJSON_ReplaceItemInObject(cJSON_GetObjectItem(r, "source_vm"), "id",
                                       cJSON_CreateNull());
         },
         "\"id\" must be a string"},
        {"root an array", [](cJSON *r) { (void)r; }, "not a JSON object"},
        // The hot set: optional, but checked like every other field (memory.bin is 8192 bytes).
        {"hot an array", [](cJSON *r) { cJSON_AddItemToObject(r, "hot", cJSON_CreateArray()); },
         "field \"hot\" must be an object"},
        {"hot without a version", [](cJSON *r) { add_hot(r, -1, "[[0, 4096]]"); },
         "hot: field \"version\" is missing"},
        {"hot version 2", [](cJSON *r) { add_hot(r, 2, "[[0, 4096]]"); },
         "hot: version 2 is not supported"},
        {"hot without ranges", [](cJSON *r) { add_hot(r, 1, nullptr); },
         "hot: field \"ranges\" is missing"},
        {"hot ranges an object", [](cJSON *r) { add_hot(r, 1, "{}"); },
         "hot: \"ranges\" must be an array of at most 256"},
        {"hot range of three numbers", [](cJSON *r) { add_hot(r, 1, "[[0, 4096, 1]]"); },
         "hot: ranges[0] must be [offset, length]"},
        {"hot range of strings", [](cJSON *r) { add_hot(r, 1, "[[0, 4096], [\"4096\", 1]]"); },
         "hot: ranges[1] must be [offset, length]"},
        {"hot range negative", [](cJSON *r) { add_hot(r, 1, "[[-4096, 4096]]"); },
         "hot: ranges[0] must be [offset, length]"},
        {"hot range fraction", [](cJSON *r) { add_hot(r, 1, "[[0, 4096.5]]"); },
         "hot: ranges[0] must be [offset, length]"},
        {"hot range unaligned", [](cJSON *r) { add_hot(r, 1, "[[0, 4096], [4096, 100]]"); },
         "hot: ranges[1]: offset and length must be multiples of 4096"},
        {"hot range empty", [](cJSON *r) { add_hot(r, 1, "[[4096, 0]]"); },
         "hot: ranges[0]: offset and length must be multiples of 4096, the length above 0"},
        {"hot range beyond memory.bin", [](cJSON *r) { add_hot(r, 1, "[[4096, 8192]]"); },
         "hot: ranges[0] ends at 12288, beyond memory_bytes (8192)"},
        {"hot range far beyond memory.bin",
         [](cJSON *r) { add_hot(r, 1, "[[18014398509481984, 4096]]"); },
         "hot: ranges[0] must be [offset, length]"},
        {"hot ranges overlapping", [](cJSON *r) { add_hot(r, 1, "[[0, 8192], [4096, 4096]]"); },
         "hot: ranges[1] starts at 4096, before ranges[0] ends (8192)"},
        {"too many hot ranges", [](cJSON *r) { add_hot(r, 1, many_hot_ranges(257).c_str()); },
         "hot: \"ranges\" must be an array of at most 256"},
    };
    for (const auto &c : cases) {
        SCOPED_TRACE(c.what);
        cJSON *root = cJSON_Parse(original.c_str());
        ASSERT_NE(nullptr, root);
        c.spoil(root);
        char *text = cJSON_Print(root);
        write_file(path, strcmp(c.what, "root an array") == 0 ? "[1, 2]" : text);
        free(text);
        cJSON_Delete(root);
        Reopen();
        struct store_snapshot got;
        struct forkd_error err = {};
        EXPECT_EQ(-EIO, Get("strict", &got, &err));
        EXPECT_NE(nullptr, strstr(err.message, path.c_str())) << err.message;
        EXPECT_NE(nullptr, strstr(err.message, c.why)) << err.message;
    }
    {
        SCOPED_TRACE("a NUL byte after the object");
        write_file(path, original + std::string("\0", 1));
        Reopen();
        struct store_snapshot got;
        struct forkd_error err = {};
        EXPECT_EQ(-EIO, Get("strict", &got, &err));
        EXPECT_NE(nullptr, strstr(err.message, "holds a NUL byte")) << err.message;
    }
    {
        SCOPED_TRACE("the hot ranges may touch, and reach the end of memory.bin");
        cJSON *root = cJSON_Parse(original.c_str());
        add_hot(root, 1, "[[0, 4096], [4096, 4096]]");
        char *text = cJSON_Print(root);
        write_file(path, text);
        free(text);
        cJSON_Delete(root);
        Reopen();
        struct store_snapshot got;
        struct forkd_error err = {};
        ASSERT_EQ(0, Get("strict", &got, &err)) << err.message;
        EXPECT_EQ(2u, got.hot_count);
    }
    write_file(path, original);
    Reopen();
    struct store_snapshot got;
    struct forkd_error err = {};
    EXPECT_EQ(0, Get("strict", &got, &err)) << err.message;
    EXPECT_EQ(0u, got.hot_count);
}

// ---- uses and deletes ----

TEST_F(StoreTest, DeleteIsRefusedWhileInUseAndRemovesEverythingAfter)
{
    Publish("used");
    struct store_snapshot got;
    struct forkd_error err = {};
    ASSERT_EQ(0, store_acquire(store_, "used", &got, &err));
    EXPECT_EQ(1u, got.users);
    ASSERT_EQ(0, store_acquire(store_, "used", &got, &err));
    EXPECT_EQ(2u, got.users);
    EXPECT_EQ(snapshots_ + "/used", got.path);
    EXPECT_EQ(2u, Users("used"));

    EXPECT_EQ(-EBUSY, store_delete(store_, "used", false, &err));
    EXPECT_NE(nullptr, strstr(err.message, "used by 2")) << err.message;
    store_release(store_, "used");
    EXPECT_EQ(-EBUSY, store_delete(store_, "used", false, &err));
    store_release(store_, "used");
    store_release(store_, "used"); // one too many: ignored, never wraps
    EXPECT_EQ(0u, Users("used"));
    store_release(store_, "never-existed");

    EXPECT_EQ(0, store_delete(store_, "used", false, &err)) << err.message;
    EXPECT_TRUE(entries_of(snapshots_).empty()) << "left the moved-aside directory";
    EXPECT_EQ(-ENOENT, Get("used", &got, &err));
    EXPECT_EQ(-ENOENT, store_acquire(store_, "used", &got, &err));
    EXPECT_EQ(-ENOENT, store_delete(store_, "used", false, &err));
    EXPECT_NE(nullptr, strstr(err.message, "'used' does not exist")) << err.message;
    Reopen();
    EXPECT_EQ(-ENOENT, Get("used", &got, &err));
}

TEST_F(StoreTest, DeleteOfAWriterIsRefusedUnlessForced)
{
    struct store_writer *w = Begin("busy");
    struct forkd_error err = {};
    EXPECT_EQ(-EBUSY, store_delete(store_, "busy", false, &err));
    EXPECT_NE(nullptr, strstr(err.message, "being written")) << err.message;
    EXPECT_FALSE(store_writer_abandoned(w));
    struct store_snapshot meta = full_meta("busy");
    EXPECT_EQ(0, store_publish(w, &meta, &err)) << err.message;
}

TEST_F(StoreTest, ForcedDeleteInUseKeepsCountingTheOldUsesApart)
{
    Publish("reused");
    struct store_snapshot got;
    struct forkd_error err = {};
    ASSERT_EQ(0, store_acquire(store_, "reused", &got, &err));
    ASSERT_EQ(0, store_acquire(store_, "reused", &got, &err));
    ASSERT_EQ(0, store_delete(store_, "reused", true, &err)) << err.message;
    EXPECT_TRUE(entries_of(snapshots_).empty());
    EXPECT_EQ(-ENOENT, Get("reused", &got, &err));

    // A new snapshot of the same name, used by one VM.
    Publish("reused");
    ASSERT_EQ(0, store_acquire(store_, "reused", &got, &err));
    EXPECT_EQ(1u, got.users);
    // The two VMs of the deleted snapshot stop: the new one must still count its own VM.
    store_release(store_, "reused");
    store_release(store_, "reused");
    EXPECT_EQ(1u, Users("reused"));
    EXPECT_EQ(-EBUSY, store_delete(store_, "reused", false, &err));
    store_release(store_, "reused");
    EXPECT_EQ(0, store_delete(store_, "reused", false, &err)) << err.message;
}

TEST_F(StoreTest, ForcedDeleteOfAWriterCancelsItsPublish)
{
    struct store_writer *w = Begin("doomed");
    ASSERT_NE(nullptr, w);
    struct forkd_error err = {};
    ASSERT_EQ(0, store_delete(store_, "doomed", true, &err)) << err.message;
    EXPECT_TRUE(store_writer_abandoned(w));
    struct store_snapshot got;
    EXPECT_EQ(-ENOENT, Get("doomed", &got, &err));
    struct store_snapshot *list = nullptr;
    size_t count = 9;
    ASSERT_EQ(0, store_list(store_, &list, &count, &err));
    EXPECT_EQ(0u, count);
    free(list);

    // The name is free at once; the abandoned writer cannot take it back.
    struct store_writer *next = Begin("doomed");
    ASSERT_NE(nullptr, next);
    struct store_snapshot meta = full_meta("doomed");
    EXPECT_EQ(-ECANCELED, store_publish(w, &meta, &err));
    EXPECT_NE(nullptr, strstr(err.message, "'doomed'")) << err.message;
    EXPECT_EQ(1u, entries_of(snapshots_).size()) << "only the new writer's directory";
    ASSERT_EQ(0, store_publish(next, &meta, &err)) << err.message;
    EXPECT_EQ((std::set<std::string>{"doomed"}), entries_of(snapshots_));
}

TEST_F(StoreTest, ForcedDeleteOfAnAbandonedWriterThenAbortIsClean)
{
    struct store_writer *w = Begin("gone");
    struct forkd_error err = {};
    ASSERT_EQ(0, store_delete(store_, "gone", true, &err));
    store_abort(w);
    EXPECT_TRUE(entries_of(snapshots_).empty());
}

// ---- concurrency ----

TEST_F(StoreTest, ConcurrentBeginOfOneNameHasExactlyOneWinner)
{
    const int kThreads = 8;
    for (int round = 0; round < 25; round++) {
        std::string name = "race-" + std::to_string(round);
        pthread_barrier_t barrier;
        pthread_barrier_init(&barrier, nullptr, kThreads);
        std::vector<int> results(kThreads);
        std::vector<struct store_writer *> writers(kThreads, nullptr);
        std::vector<std::thread> threads;
        for (int i = 0; i < kThreads; i++) {
            threads.emplace_back([&, i] {
                struct forkd_error err = {};
                pthread_barrier_wait(&barrier);
                results[i] = store_begin(store_, name.c_str(), &writers[i], &err);
            });
        }
        for (auto &t : threads)
            t.join();
        pthread_barrier_destroy(&barrier);
        int winners = 0, exists = 0;
        for (int i = 0; i < kThreads; i++) {
            winners += results[i] == 0;
            exists += results[i] == -EEXIST;
            if (results[i] != 0) {
                EXPECT_EQ(nullptr, writers[i]);
            }
        }
        ASSERT_EQ(1, winners) << name;
        ASSERT_EQ(kThreads - 1, exists) << name;
        EXPECT_EQ(1u, entries_of(snapshots_).size()) << "losers left temporary directories";
        for (auto *w : writers)
            store_abort(w);
    }
}

TEST_F(StoreTest, ConcurrentUsesAreCountedExactly)
{
    Publish("shared");
    struct store_snapshot held;
    struct forkd_error err = {};
    // One use held throughout: every delete attempt below must be refused.
    ASSERT_EQ(0, store_acquire(store_, "shared", &held, &err)) << err.message;
    std::atomic<bool> stop{false};
    std::atomic<int> refused{0}, deleted{0};
    std::thread deleter([&] {
        struct forkd_error derr = {};
        while (!stop) {
            int r = store_delete(store_, "shared", false, &derr);
            refused += r == -EBUSY;
            deleted += r == 0;
        }
    });
    std::vector<std::thread> users;
    for (int i = 0; i < 8; i++) {
        users.emplace_back([&] {
            struct forkd_error uerr = {};
            struct store_snapshot got;
            for (int n = 0; n < 2000; n++) {
                ASSERT_EQ(0, store_acquire(store_, "shared", &got, &uerr)) << uerr.message;
                ASSERT_GE(got.users, 2u);
                store_release(store_, "shared");
            }
        });
    }
    for (auto &t : users)
        t.join();
    stop = true;
    deleter.join();
    EXPECT_GT(refused.load(), 0);
    EXPECT_EQ(0, deleted.load());
    EXPECT_EQ(1u, Users("shared"));
    store_release(store_, "shared");
    EXPECT_EQ(0, store_delete(store_, "shared", false, &err)) << err.message;
}

// ---- a full disk ----

class StoreDiskFullTest : public ::testing::Test
{
  protected:
    void SetUp() override
    {
        dir_ = make_temp_dir();
        ASSERT_EQ(0, mount("tmpfs", dir_.c_str(), "tmpfs", 0, "size=256k"))
            << "mount tmpfs on " << dir_ << ": " << strerror(errno);
        mounted_ = true;
        struct forkd_error err = {};
        ASSERT_EQ(0, store_open(dir_.c_str(), &store_, &err)) << err.message;
    }

    void TearDown() override
    {
        store_close(store_);
        if (mounted_) {
            EXPECT_EQ(0, umount(dir_.c_str())) << strerror(errno);
        }
        rmdir(dir_.c_str());
    }

    std::string dir_;
    bool mounted_ = false;
    struct store *store_ = nullptr;
};

// Appends to path until the file system refuses; returns the errno that stopped it.
int fill_until_full(const std::string &path)
{
    int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
    if (fd < 0)
        return errno;
    std::vector<char> block(4096, 'm');
    int stop = 0;
    for (;;) {
        ssize_t n = write(fd, block.data(), block.size());
        if (n < 0) {
            stop = errno;
            break;
        }
    }
    close(fd);
    return stop;
}

TEST_F(StoreDiskFullTest, PublishOnAFullDiskFailsNamingENOSPCAndLeavesNothing)
{
    struct forkd_error err = {};
    struct store_writer *w = nullptr;
    ASSERT_EQ(0, store_begin(store_, "big", &w, &err)) << err.message;
    write_file(store_writer_vmstate_path(w), "vmstate");
    ASSERT_EQ(ENOSPC, fill_until_full(store_writer_memory_path(w)));
    struct store_snapshot meta = full_meta("big");
    EXPECT_EQ(-ENOSPC, store_publish(w, &meta, &err));
    EXPECT_NE(nullptr, strstr(err.message, "No space left on device")) << err.message;
    EXPECT_NE(nullptr, strstr(err.message, "snapshot.json")) << err.message;
    EXPECT_NE(nullptr, strstr(err.message, "publish snapshot 'big'")) << err.message;
    EXPECT_TRUE(entries_of(dir_ + "/snapshots").empty());
    struct store_snapshot got;
    EXPECT_EQ(-ENOENT, store_get(store_, "big", &got, &err));

    // The space came back: a small snapshot now fits.
    ASSERT_EQ(0, store_begin(store_, "small", &w, &err)) << err.message;
    write_file(store_writer_vmstate_path(w), "v");
    write_file(store_writer_memory_path(w), std::string(4096, 'm'));
    meta = full_meta("small");
    EXPECT_EQ(0, store_publish(w, &meta, &err)) << err.message;
    EXPECT_EQ((std::set<std::string>{"small"}), entries_of(dir_ + "/snapshots"));
}

} // namespace
