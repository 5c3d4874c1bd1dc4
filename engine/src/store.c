/*
 * The snapshot store (see forkd/store.h): owns <state-dir>/snapshots, the on-disk layout of a
 * snapshot, the atomic publish protocol, crash clean-up at open, and the in-memory table of names
 * (READY, WRITING, corrupt) with their use counts.
 *
 * The table is the truth after store_open: READY entries hold the parsed snapshot.json, so list,
 * get and acquire never touch the disk. One mutex guards the table; under it the store only does
 * metadata operations (mkdir, rename), never fsync or data I/O.
 */
#include "forkd/store.h"

#include "basic/cleanup.h"
#include "basic/fsutil.h"

#include "snapshot_json.h"
#include "forkd/utf8.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define STORE_NAME_RULE       "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#define STORE_TMP_PREFIX      ".tmp-"
#define STORE_DELETING_PREFIX ".tmp-deleting-"
#define STORE_METADATA_FILE   "snapshot.json"
#define STORE_VMSTATE_FILE    "vmstate"
#define STORE_MEMORY_FILE     "memory.bin"
#define STORE_METADATA_MAX    (1 << 20)
/* Integers above 2^53 do not survive a JSON number (a double); refuse them on both sides. */

enum store_entry_kind {
    STORE_ENTRY_READY,
    STORE_ENTRY_WRITING,
    STORE_ENTRY_CORRUPT,
    /* Deleted by force while VMs still used it: kept only to absorb their store_release. */
    STORE_ENTRY_GONE,
};

struct store_entry {
    struct store_entry *next;
    enum store_entry_kind kind;
    char name[STORE_NAME_MAX + 1];
    uint32_t users;
    /* Uses of an earlier snapshot of this name deleted by force; store_release consumes these
     * first, so a name's count can only be too high (delete refused), never too low. */
    uint32_t orphaned_users;
    struct store_writer *writer; /* WRITING */
    /* READY: the record as its snapshot.json holds it, parsed when asked for. The text is about
     * 1 KiB where a struct store_snapshot is about 15 KiB: a store of 25,000 snapshots keeps
     * some 30 MB, not 400. */
    char *metadata;
    struct forkd_error corrupt; /* CORRUPT: why, naming the file */
};

struct store {
    pthread_mutex_t lock;
    char dir[PATH_MAX]; /* <state-dir>/snapshots */
    struct store_entry *entries;
};

struct store_writer {
    struct store *store;
    struct store_entry *entry; /* NULL once a forced delete abandoned the writer */
    atomic_bool abandoned;
    char name[STORE_NAME_MAX + 1];
    char dir[PATH_MAX];
    char vmstate_path[PATH_MAX];
    char memory_path[PATH_MAX];
};

/* ---- names ---- */

static bool store_name_char_ok(char c, bool first)
{
    if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'))
        return true;
    return !first && (c == '_' || c == '.' || c == '-');
}

/* A bad name is quoted in messages: escaped, so it cannot forge text, and cut at
 * STORE_NAME_MAX characters. */
#define STORE_QUOTED_MAX (STORE_NAME_MAX * 4 + 4)

static void store_quote_name(const char *name, char out[STORE_QUOTED_MAX])
{
    size_t used = 0, i;
    for (i = 0; name[i] && i < STORE_NAME_MAX; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c >= 0x20 && c < 0x7f && c != '\\')
            out[used++] = (char)c;
        else
            used += (size_t)sprintf(out + used, "\\x%02x", c);
    }
    strcpy(out + used, name[i] ? "..." : "");
}

int store_validate_name_of(const char *what, const char *name, struct forkd_error *err)
{
    if (!name || !*name)
        return forkd_error_set(err, -EINVAL, "%s is empty; names match %s", what,
                               STORE_NAME_RULE);
    char quoted[STORE_QUOTED_MAX];
    store_quote_name(name, quoted);
    size_t len = strnlen(name, STORE_NAME_MAX + 1);
    if (len > STORE_NAME_MAX)
        return forkd_error_set(err, -EINVAL,
                               "%s '%s' is longer than %d characters; names match %s",
                               what, quoted, STORE_NAME_MAX, STORE_NAME_RULE);
    if (!store_name_char_ok(name[0], true))
        return forkd_error_set(err, -EINVAL,
                               "%s '%s' must start with a letter or a digit; names "
                               "match %s",
                               what, quoted, STORE_NAME_RULE);
    for (size_t i = 1; i < len; i++) {
        if (!store_name_char_ok(name[i], false))
            return forkd_error_set(err, -EINVAL,
                                   "%s '%s' has a character other than letters, digits, "
                                   "'_', '.' and '-' at position %zu; names match %s",
                                   what, quoted, i, STORE_NAME_RULE);
    }
    return 0;
}

int store_validate_name(const char *name, struct forkd_error *err)
{
    return store_validate_name_of("snapshot name", name, err);
}

/* Copies a validated name into a STORE_NAME_MAX + 1 buffer. */
static void store_copy_name(char *dst, const char *name)
{
    size_t len = strnlen(name, STORE_NAME_MAX);
    memcpy(dst, name, len);
    dst[len] = '\0';
}

/* dir + "/" + file into buf; false when it does not fit. */
static bool store_join(char *buf, size_t size, const char *dir, const char *file)
{
    int n = snprintf(buf, size, "%s/%s", dir, file);
    return n >= 0 && (size_t)n < size;
}

int store_file_path(const char *dir, enum store_file file, char *out, size_t size)
{
    static const char *const names[] = {
        [STORE_FILE_VMSTATE] = STORE_VMSTATE_FILE,
        [STORE_FILE_MEMORY] = STORE_MEMORY_FILE,
        [STORE_FILE_METADATA] = STORE_METADATA_FILE,
    };
    if ((size_t)file >= ARRAY_SIZE(names) || !store_join(out, size, dir, names[file]))
        return -ENAMETOOLONG;
    return 0;
}

/* ---- the table (caller holds store->lock) ---- */

static struct store_entry *store_find(struct store *store, const char *name)
{
    for (struct store_entry *e = store->entries; e; e = e->next)
        if (strcmp(e->name, name) == 0)
            return e;
    return NULL;
}

static bool store_entry_visible(const struct store_entry *entry)
{
    return entry->kind == STORE_ENTRY_READY || entry->kind == STORE_ENTRY_WRITING ||
           entry->kind == STORE_ENTRY_CORRUPT;
}

static struct store_entry *store_entry_add(struct store *store, const char *name,
                                           enum store_entry_kind kind)
{
    struct store_entry *entry = calloc(1, sizeof(*entry));
    if (!entry)
        return NULL;
    entry->kind = kind;
    store_copy_name(entry->name, name);
    entry->next = store->entries;
    store->entries = entry;
    return entry;
}

static void store_entry_unlink_and_free(struct store *store, struct store_entry *entry)
{
    for (struct store_entry **p = &store->entries; *p; p = &(*p)->next) {
        if (*p == entry) {
            *p = entry->next;
            break;
        }
    }
    free(entry->metadata);
    free(entry);
}

/* The name's snapshot is gone; keep the entry only while uses of it are outstanding. */
static void store_entry_retire(struct store *store, struct store_entry *entry)
{
    entry->orphaned_users += entry->users;
    entry->users = 0;
    entry->writer = NULL;
    free(entry->metadata);
    entry->metadata = NULL;
    if (entry->orphaned_users > 0)
        entry->kind = STORE_ENTRY_GONE;
    else
        store_entry_unlink_and_free(store, entry);
}

static int store_path(const struct store *store, const char *name, char *buf, size_t size,
                      struct forkd_error *err)
{
    if (!store_join(buf, size, store->dir, name))
        return forkd_error_set(err, -ENAMETOOLONG, "path %s/%s is too long", store->dir, name);
    return 0;
}

/* Describes an entry in *out: 0, or -ENOMEM when a READY record cannot be parsed for want of
 * memory (it parsed when it was loaded or published). */
static int store_fill_snapshot(const struct store *store, const struct store_entry *entry,
                               struct store_snapshot *out, struct forkd_error *err)
{
    if (entry->kind == STORE_ENTRY_READY) {
        int r = snapshot_json_parse(entry->metadata, strlen(entry->metadata), out, err);
        if (r < 0) {
            forkd_error_prefix(err, "snapshot '%s': ", entry->name);
            return r; /* store_get's callers may pass no err */
        }
        out->state = STORE_STATE_READY;
        store_path(store, entry->name, out->path, sizeof(out->path), NULL);
    } else if (entry->kind == STORE_ENTRY_CORRUPT) {
        memset(out, 0, sizeof(*out));
        memcpy(out->name, entry->name, sizeof(out->name));
        out->state = STORE_STATE_CORRUPT;
        store_path(store, entry->name, out->path, sizeof(out->path), NULL);
        memcpy(out->corrupt_reason, entry->corrupt.message, sizeof(out->corrupt_reason));
    } else {
        memset(out, 0, sizeof(*out));
        memcpy(out->name, entry->name, sizeof(out->name));
        out->state = STORE_STATE_WRITING;
        memcpy(out->path, entry->writer->dir, sizeof(out->path));
    }
    out->users = entry->users;
    return 0;
}

/* ---- removing directories ---- */

/* rm -rf of parent_fd/name without following symlinks. */
static int store_remove_tree_at(int parent_fd, const char *name)
{
    int fd = openat(parent_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT)
            return 0;
        if (errno != ENOTDIR && errno != ELOOP)
            return -errno;
        return unlinkat(parent_fd, name, 0) < 0 && errno != ENOENT ? -errno : 0;
    }
    _cleanup_closedir_ DIR *dir = fdopendir(fd);
    if (!dir) {
        int saved = errno;
        close(fd);
        return -saved;
    }
    struct dirent *de;
    while ((errno = 0, de = readdir(dir))) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        if (unlinkat(dirfd(dir), de->d_name, 0) == 0)
            continue;
        if (errno != EISDIR)
            return -errno;
        int r = store_remove_tree_at(dirfd(dir), de->d_name);
        if (r < 0)
            return r;
    }
    if (errno)
        return -errno;
    return unlinkat(parent_fd, name, AT_REMOVEDIR) < 0 && errno != ENOENT ? -errno : 0;
}

static int store_remove_tree(const char *path)
{
    return store_remove_tree_at(AT_FDCWD, path);
}

/* Moves a published directory out of the namespace at once, so a crash while removing it leaves
 * a .tmp- leftover and never a half-deleted READY snapshot. Metadata only: fine under the lock. */
static int store_unpublish(struct store *store, const char *name, char *moved_to, size_t size,
                           struct forkd_error *err)
{
    char path[PATH_MAX];
    int r = store_path(store, name, path, sizeof(path), err);
    if (r < 0)
        return r;
    int n = snprintf(moved_to, size, "%s/" STORE_DELETING_PREFIX "%s.XXXXXX", store->dir, name);
    if (n < 0 || (size_t)n >= size)
        return forkd_error_set(err, -ENAMETOOLONG, "delete %s: path too long", path);
    if (!mkdtemp(moved_to))
        return forkd_error_errno(err, -errno, "delete %s: mkdtemp %s", path, moved_to);
    /* rename(2) atomically replaces the empty directory mkdtemp just made. */
    if (rename(path, moved_to) < 0) {
        int saved = errno;
        rmdir(moved_to);
        return forkd_error_errno(err, -saved, "delete %s: rename to %s", path, moved_to);
    }
    return 0;
}

/* ---- the record's figures ---- */

/* clang-format off */
#define STORE_FIGURE(name) {#name, offsetof(struct store_figures, name)}
/* clang-format on */
const struct store_figure_field store_figure_fields[STORE_FIGURE_COUNT] = {
    STORE_FIGURE(pause_ns),          STORE_FIGURE(arm_ns),       STORE_FIGURE(rearm_ns),
    STORE_FIGURE(rearmed_pages),     STORE_FIGURE(vmstate_ns),   STORE_FIGURE(copy_ns),
    STORE_FIGURE(publish_ns),        STORE_FIGURE(total_ns),     STORE_FIGURE(pages_by_fault),
    STORE_FIGURE(pages_by_bulk),     STORE_FIGURE(bytes_copied), STORE_FIGURE(pause_request_ns),
    STORE_FIGURE(resume_request_ns), STORE_FIGURE(disk_capture_ns), STORE_FIGURE(disk_copied_bytes),
};
_Static_assert(STORE_FIGURE_COUNT * sizeof(uint64_t) == sizeof(struct store_figures),
               "store_figure_fields must name every figure");

int store_parse_metadata(const char *text, size_t len, struct store_snapshot *out,
                         struct forkd_error *err)
{
    return snapshot_json_parse(text, len, out, err);
}

/* ---- loading at open ---- */

static int store_read_small_file(int dir_fd, const char *path, char **out, size_t *len,
                                 struct forkd_error *err)
{
    /* O_NONBLOCK: a FIFO planted here must not hang start-up in open(); fstat then refuses it. */
    _cleanup_close_ int fd = openat(dir_fd, path, O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        return forkd_error_set(err, -EIO, "%s", strerror(errno));
    if (!S_ISREG(st.st_mode) || st.st_size > STORE_METADATA_MAX)
        return forkd_error_set(err, -EIO, "not a regular file of at most %d bytes",
                               STORE_METADATA_MAX);
    _cleanup_free_ char *buf = malloc((size_t)st.st_size + 1);
    if (!buf)
        return forkd_error_set(err, -ENOMEM, "out of memory");
    ssize_t n = pread(fd, buf, (size_t)st.st_size, 0);
    if (n != st.st_size)
        return forkd_error_set(err, -EIO, "short read: %s", n < 0 ? strerror(errno) : "");
    buf[n] = '\0';
    *len = (size_t)n;
    *out = take_ptr(buf);
    return 0;
}

static int store_check_data_file(int snap_fd, const char *file, uint64_t expected,
                                 struct forkd_error *err)
{
    struct stat st;
    if (fstatat(snap_fd, file, &st, AT_SYMLINK_NOFOLLOW) < 0)
        return forkd_error_set(err, -EIO, "%s: %s", file, strerror(errno));
    if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size != expected)
        return forkd_error_set(err, -EIO, "%s: not a regular file of %llu bytes as %s says", file,
                               (unsigned long long)expected, STORE_METADATA_FILE);
    return 0;
}

/* Parses <snapshots>/<name>/snapshot.json and checks the data files it describes. */
static int store_load_snapshot(int dir_fd, const char *name, struct store_snapshot *meta,
                               char **text_out, struct forkd_error *err)
{
    _cleanup_close_ int snap_fd =
        openat(dir_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (snap_fd < 0)
        return forkd_error_set(err, -EIO, STORE_METADATA_FILE ": %s", strerror(errno));
    _cleanup_free_ char *text = NULL;
    size_t len = 0;
    int r = store_read_small_file(snap_fd, STORE_METADATA_FILE, &text, &len, err);
    if (r == 0 && strlen(text) != len)
        r = forkd_error_set(err, -EIO, "it holds a NUL byte");
    if (r == 0)
        r = snapshot_json_parse(text, len, meta, err);
    if (r == 0 && strcmp(meta->name, name) != 0)
        r = forkd_error_set(err, -EIO, "it names snapshot '%s'", meta->name);
    if (r < 0)
        return r == -ENOMEM ? r : forkd_error_prefix(err, STORE_METADATA_FILE ": ");
    /* The data files must be what the metadata describes, or a restore would read garbage. */
    if (r == 0)
        r = store_check_data_file(snap_fd, STORE_VMSTATE_FILE, meta->vmstate_bytes, err);
    if (r == 0)
        r = store_check_data_file(snap_fd, STORE_MEMORY_FILE, meta->memory_bytes, err);
    if (r == 0)
        *text_out = take_ptr(text);
    return r;
}

static int store_add_loaded(struct store *store, int dir_fd, const char *name,
                            struct forkd_error *err)
{
    struct forkd_error why = {0};
    _cleanup_free_ struct store_snapshot *meta = calloc(1, sizeof(*meta));
    if (!meta)
        return forkd_error_set(err, -ENOMEM, "open store %s: out of memory", store->dir);
    _cleanup_free_ char *text = NULL;
    int r = store_load_snapshot(dir_fd, name, meta, &text, &why);
    if (r == -ENOMEM)
        return forkd_error_set(err, r, "open store %s: %s", store->dir, why.message);
    struct store_entry *entry =
        store_entry_add(store, name, r == 0 ? STORE_ENTRY_READY : STORE_ENTRY_CORRUPT);
    if (!entry)
        return forkd_error_set(err, -ENOMEM, "open store %s: out of memory", store->dir);
    if (r == 0)
        entry->metadata = take_ptr(text);
    else
        forkd_error_set(&entry->corrupt, -EIO, "snapshot '%s' is corrupt: %s/%s/%s", name,
                        store->dir, name, why.message);
    return 0;
}

/* One entry of the snapshots directory at open: a crash leftover to remove, a snapshot to load,
 * or something that is not ours (left alone). */
static int store_scan_entry(struct store *store, int dir_fd, const char *name,
                            struct forkd_error *err)
{
    if (strncmp(name, STORE_TMP_PREFIX, strlen(STORE_TMP_PREFIX)) == 0) {
        int r = store_remove_tree_at(dir_fd, name);
        if (r < 0)
            return forkd_error_errno(err, r, "open store: remove leftover %s/%s", store->dir, name);
        return 0;
    }
    struct stat st;
    if (store_validate_name(name, NULL) < 0 ||
        fstatat(dir_fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISDIR(st.st_mode))
        return 0;
    return store_add_loaded(store, dir_fd, name, err);
}

static int store_scan(struct store *store, struct forkd_error *err)
{
    _cleanup_closedir_ DIR *dir = opendir(store->dir);
    if (!dir)
        return forkd_error_errno(err, -errno, "open store: opendir %s", store->dir);
    struct dirent *de;
    while ((errno = 0, de = readdir(dir))) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        int r = store_scan_entry(store, dirfd(dir), de->d_name, err);
        if (r < 0)
            return r;
    }
    if (errno)
        return forkd_error_errno(err, -errno, "open store: readdir %s", store->dir);
    int r = fs_sync_dir(store->dir);
    if (r < 0)
        return forkd_error_errno(err, r, "open store: fsync %s", store->dir);
    return 0;
}

int store_open(const char *state_dir, struct store **out, struct forkd_error *err)
{
    *out = NULL;
    struct store *store = calloc(1, sizeof(*store));
    if (!store)
        return forkd_error_set(err, -ENOMEM, "open store: out of memory");
    pthread_mutex_init(&store->lock, NULL);
    int n = snprintf(store->dir, sizeof(store->dir), "%s/snapshots", state_dir);
    int r = 0;
    if (n < 0 || (size_t)n >= sizeof(store->dir))
        r = forkd_error_set(err, -ENAMETOOLONG, "open store: state dir %s is too long", state_dir);
    if (r == 0 && (r = fs_mkdir_parents(store->dir, 0700)) < 0)
        forkd_error_errno(err, r, "open store: mkdir %s", store->dir);
    if (r == 0)
        r = store_scan(store, err);
    if (r < 0) {
        store_close(store);
        return r;
    }
    *out = store;
    return 0;
}

void store_close(struct store *store)
{
    if (!store)
        return;
    while (store->entries)
        store_entry_unlink_and_free(store, store->entries);
    pthread_mutex_destroy(&store->lock);
    free(store);
}

/* ---- writers ---- */

static int store_writer_paths(struct store_writer *w, struct forkd_error *err)
{
    char template[STORE_NAME_MAX + 32];
    snprintf(template, sizeof(template), STORE_TMP_PREFIX "%s.XXXXXX", w->name);
    if (!store_join(w->dir, sizeof(w->dir), w->store->dir, template) ||
        !store_join(w->vmstate_path, sizeof(w->vmstate_path), w->dir, STORE_VMSTATE_FILE) ||
        !store_join(w->memory_path, sizeof(w->memory_path), w->dir, STORE_MEMORY_FILE))
        return forkd_error_set(err, -ENAMETOOLONG, "begin snapshot '%s': path under %s too long",
                               w->name, w->store->dir);
    if (!mkdtemp(w->dir))
        return forkd_error_errno(err, -errno, "begin snapshot '%s': mkdtemp %s", w->name, w->dir);
    /* The file paths were formatted from the template: give them the X's mkdtemp filled in. */
    memcpy(w->vmstate_path, w->dir, strlen(w->dir));
    memcpy(w->memory_path, w->dir, strlen(w->dir));
    return 0;
}

/* Claims name for w, or explains why it is taken. Caller holds the lock. */
static int store_reserve(struct store *store, struct store_writer *w, struct forkd_error *err)
{
    struct store_entry *entry = store_find(store, w->name);
    if (entry && entry->kind == STORE_ENTRY_WRITING)
        return forkd_error_set(err, -EEXIST, "snapshot '%s' is already being written", w->name);
    if (entry && entry->kind == STORE_ENTRY_CORRUPT)
        return forkd_error_set(err, -EEXIST, "%s (delete it to reuse the name)",
                               entry->corrupt.message);
    if (entry && entry->kind != STORE_ENTRY_GONE)
        return forkd_error_set(err, -EEXIST, "snapshot '%s' already exists", w->name);
    char path[PATH_MAX];
    struct stat st;
    int r = store_path(store, w->name, path, sizeof(path), err);
    if (r < 0)
        return r;
    if (fstatat(AT_FDCWD, path, &st, AT_SYMLINK_NOFOLLOW) == 0)
        return forkd_error_set(err, -EEXIST, "snapshot '%s': %s already exists", w->name, path);
    if (!entry && !(entry = store_entry_add(store, w->name, STORE_ENTRY_WRITING)))
        return forkd_error_set(err, -ENOMEM, "begin snapshot '%s': out of memory", w->name);
    entry->kind = STORE_ENTRY_WRITING;
    entry->writer = w;
    w->entry = entry;
    return 0;
}

int store_begin(struct store *store, const char *name, struct store_writer **out,
                struct forkd_error *err)
{
    *out = NULL;
    int r = store_validate_name(name, err);
    if (r < 0)
        return r;
    _cleanup_free_ struct store_writer *w = calloc(1, sizeof(*w));
    if (!w)
        return forkd_error_set(err, -ENOMEM, "begin snapshot '%s': out of memory", name);
    w->store = store;
    store_copy_name(w->name, name);
    r = store_writer_paths(w, err);
    if (r < 0)
        return r;
    pthread_mutex_lock(&store->lock);
    r = store_reserve(store, w, err);
    pthread_mutex_unlock(&store->lock);
    if (r < 0) {
        rmdir(w->dir);
        return r;
    }
    *out = take_ptr(w);
    return 0;
}

const char *store_writer_dir(const struct store_writer *writer)
{
    return writer->dir;
}

const char *store_dir(const struct store *store)
{
    return store->dir;
}

int store_drive_path(const char *dir, const char *drive_id, char *out, size_t size)
{
    int n = snprintf(out, size, "%s/drive-%s", dir, drive_id);
    return n < 0 || (size_t)n >= size ? -ENAMETOOLONG : 0;
}

const char *store_writer_vmstate_path(const struct store_writer *writer)
{
    return writer->vmstate_path;
}

const char *store_writer_memory_path(const struct store_writer *writer)
{
    return writer->memory_path;
}

bool store_writer_abandoned(const struct store_writer *writer)
{
    return atomic_load(&writer->abandoned);
}

/* Releases the writer's name (unless a forced delete already did) and frees it. */
static void store_writer_finish(struct store_writer *w)
{
    struct store *store = w->store;
    pthread_mutex_lock(&store->lock);
    if (w->entry)
        store_entry_retire(store, w->entry);
    pthread_mutex_unlock(&store->lock);
    free(w);
}

void store_abort(struct store_writer *writer)
{
    if (!writer)
        return;
    store_remove_tree(writer->dir);
    store_writer_finish(writer);
}

/* ---- publish ---- */

static int store_check_meta_strings(const struct store_snapshot *meta, struct forkd_error *err)
{
    if (strnlen(meta->source_vm_id, sizeof(meta->source_vm_id)) == sizeof(meta->source_vm_id) ||
        strnlen(meta->source_vm_name, sizeof(meta->source_vm_name)) ==
            sizeof(meta->source_vm_name) ||
        strnlen(meta->parent_snapshot, sizeof(meta->parent_snapshot)) ==
            sizeof(meta->parent_snapshot) ||
        strnlen(meta->vmm_binary, sizeof(meta->vmm_binary)) == sizeof(meta->vmm_binary) ||
        strnlen(meta->vmm_version, sizeof(meta->vmm_version)) == sizeof(meta->vmm_version))
        return forkd_error_set(err, -EINVAL, "a text field is not NUL-terminated");
    for (size_t i = 0; i < meta->label_count; i++) {
        const struct store_label *l = &meta->labels[i];
        if (strnlen(l->key, sizeof(l->key)) == sizeof(l->key) ||
            strnlen(l->value, sizeof(l->value)) == sizeof(l->value))
            return forkd_error_set(err, -EINVAL, "label %zu: unterminated key or value", i);
        for (size_t j = 0; j < i; j++)
            if (strcmp(meta->labels[j].key, l->key) == 0)
                return forkd_error_set(err, -EINVAL, "label key \"%s\" appears twice", l->key);
    }
    return 0;
}

static int store_check_meta(const struct store_writer *w, const struct store_snapshot *meta,
                            struct forkd_error *err)
{
    if (strncmp(meta->name, w->name, sizeof(meta->name)) != 0)
        return forkd_error_set(err, -EINVAL, "metadata names snapshot '%.*s'", (int)STORE_NAME_MAX,
                               meta->name);
    if (!snapshot_json_mode_known(meta->mode))
        return forkd_error_set(err, -EINVAL, "mode %d is not a store_mode", (int)meta->mode);
    if (meta->region_count > STORE_MAX_REGIONS || meta->label_count > STORE_MAX_LABELS)
        return forkd_error_set(err, -EINVAL, "%zu regions and %zu labels (at most %d and %d)",
                               meta->region_count, meta->label_count, STORE_MAX_REGIONS,
                               STORE_MAX_LABELS);
    if (!snapshot_json_numbers_fit(meta))
        return forkd_error_set(err, -EINVAL, "a number is above 2^53 or below -2^53");
    return store_check_meta_strings(meta, err);
}

/* Makes a data file the branch wrote durable and returns its size; a missing file is an error. */
static int store_sync_data_file(const char *path, uint64_t *size, struct forkd_error *err)
{
    _cleanup_close_ int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT)
        return forkd_error_set(err, -ENOENT, "open %s: %s (the branch did not write it)", path,
                               strerror(ENOENT));
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        return forkd_error_errno(err, -errno, "open %s", path);
    if (!S_ISREG(st.st_mode))
        return forkd_error_set(err, -EINVAL, "%s is not a regular file", path);
    if (fsync(fd) < 0)
        return forkd_error_errno(err, -errno, "fsync %s", path);
    *size = (uint64_t)st.st_size;
    return 0;
}

/* Writes snapshot.json; its text is handed back in *text_out. */
static int store_write_metadata(const struct store_writer *w, const struct store_snapshot *meta,
                                char **text_out, struct forkd_error *err)
{
    char path[PATH_MAX];
    if (!store_join(path, sizeof(path), w->dir, STORE_METADATA_FILE))
        return forkd_error_set(err, -ENAMETOOLONG, "%s/%s: path too long", w->dir,
                               STORE_METADATA_FILE);
    _cleanup_free_ char *text = snapshot_json_format(meta);
    if (!text)
        return forkd_error_set(err, -ENOMEM, "format %s: out of memory", path);
    _cleanup_close_ int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return forkd_error_errno(err, -errno, "create %s", path);
    int r = fs_write_all(fd, text, strlen(text));
    if (r < 0)
        return forkd_error_errno(err, r, "write %s", path);
    if (fsync(fd) < 0)
        return forkd_error_errno(err, -errno, "fsync %s", path);
    *text_out = take_ptr(text);
    return 0;
}

static int64_t store_now_unix_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Everything up to the rename, none of it under the lock: the data files and the metadata made
 * durable inside the temporary directory. Fills the store-owned fields of *meta. */
static int store_prepare(struct store_writer *w, struct store_snapshot *meta, char **text,
                         struct forkd_error *err)
{
    int r = store_check_meta(w, meta, err);
    if (r == 0)
        r = store_sync_data_file(w->vmstate_path, &meta->vmstate_bytes, err);
    if (r == 0)
        r = store_sync_data_file(w->memory_path, &meta->memory_bytes, err);
    /* Against the file's size: what a later load checks it against. */
    if (r == 0 && snapshot_json_hot_check(meta, err) < 0) {
        if (err)
            err->code = -EINVAL;
        r = -EINVAL;
    }
    if (r < 0)
        return r;
    if (meta->created_at_unix_ms == 0)
        meta->created_at_unix_ms = store_now_unix_ms();
    meta->state = STORE_STATE_READY;
    meta->users = 0;
    meta->path[0] = '\0';
    r = store_write_metadata(w, meta, text, err);
    if (r == 0 && (r = fs_sync_dir(w->dir)) < 0)
        forkd_error_errno(err, r, "fsync %s", w->dir);
    return r;
}

static int store_cancelled(const struct store_writer *w, struct forkd_error *err)
{
    return forkd_error_set(err, -ECANCELED, "snapshot '%s' was deleted while being written",
                           w->name);
}

/* Renames the finished temporary directory into place, unless a forced delete came first. The
 * entry stays WRITING until the parent directory is synced too. */
static int store_rename_into_place(struct store_writer *w, const char *final_path,
                                   struct forkd_error *err)
{
    struct store *store = w->store;
    int r = 0;
    pthread_mutex_lock(&store->lock);
    if (store_writer_abandoned(w))
        r = store_cancelled(w, err);
    else if (renameat2(AT_FDCWD, w->dir, AT_FDCWD, final_path, RENAME_NOREPLACE) < 0)
        r = forkd_error_errno(err, -errno, "rename %s to %s", w->dir, final_path);
    pthread_mutex_unlock(&store->lock);
    return r;
}

/* The last step: READY, or (cancelled meanwhile, or the parent sync failed) moved back out. */
static int store_make_ready(struct store_writer *w, char **text, int sync_result,
                            struct forkd_error *err)
{
    struct store *store = w->store;
    char moved_to[PATH_MAX] = "";
    int r = sync_result < 0 ? sync_result : 0;
    pthread_mutex_lock(&store->lock);
    if (r == 0 && store_writer_abandoned(w))
        r = store_cancelled(w, err);
    if (r == 0) {
        w->entry->kind = STORE_ENTRY_READY;
        w->entry->writer = NULL;
        w->entry->metadata = take_ptr(*text);
        w->entry = NULL;
    } else if (store_unpublish(store, w->name, moved_to, sizeof(moved_to), NULL) < 0) {
        moved_to[0] = '\0';
    }
    pthread_mutex_unlock(&store->lock);
    if (moved_to[0]) {
        store_remove_tree(moved_to);
        fs_sync_dir(store->dir);
    }
    return r;
}

static int store_publish_steps(struct store_writer *w, struct store_snapshot *meta,
                               struct forkd_error *err)
{
    char final_path[PATH_MAX];
    _cleanup_free_ char *text = NULL;
    int r = store_path(w->store, w->name, final_path, sizeof(final_path), err);
    if (r == 0)
        r = store_prepare(w, meta, &text, err);
    if (r == 0)
        r = store_rename_into_place(w, final_path, err);
    if (r < 0) {
        store_remove_tree(w->dir);
        return r;
    }
    int sync_result = fs_sync_dir(w->store->dir);
    if (sync_result < 0)
        forkd_error_errno(err, sync_result, "fsync %s", w->store->dir);
    return store_make_ready(w, &text, sync_result, err);
}

int store_publish(struct store_writer *writer, const struct store_snapshot *meta,
                  struct forkd_error *err)
{
    _cleanup_free_ struct store_snapshot *copy = malloc(sizeof(*copy));
    if (!copy) {
        store_abort(writer);
        return forkd_error_set(err, -ENOMEM, "publish: out of memory");
    }
    *copy = *meta;
    int r = store_publish_steps(writer, copy, err);
    if (r < 0)
        forkd_error_prefix(err, "publish snapshot '%s': ", writer->name);
    store_writer_finish(writer);
    return r;
}

/* ---- queries and uses ---- */

static int store_compare_names(const void *a, const void *b)
{
    return strcmp(((const struct store_snapshot *)a)->name,
                  ((const struct store_snapshot *)b)->name);
}

int store_list(struct store *store, struct store_snapshot **out, size_t *count,
               struct forkd_error *err)
{
    *out = NULL;
    *count = 0;
    pthread_mutex_lock(&store->lock);
    size_t n = 0;
    for (struct store_entry *e = store->entries; e; e = e->next)
        n += store_entry_visible(e);
    struct store_snapshot *list = n ? calloc(n, sizeof(*list)) : NULL;
    if (n && !list) {
        pthread_mutex_unlock(&store->lock);
        return forkd_error_set(err, -ENOMEM, "list snapshots: out of memory");
    }
    size_t i = 0;
    int r = 0;
    for (struct store_entry *e = store->entries; e && r == 0; e = e->next)
        if (store_entry_visible(e))
            r = store_fill_snapshot(store, e, &list[i++], err);
    pthread_mutex_unlock(&store->lock);
    if (r < 0) {
        free(list);
        return r;
    }
    if (n)
        qsort(list, n, sizeof(*list), store_compare_names);
    *out = list;
    *count = n;
    return 0;
}

static int store_compare_entry_names(const void *a, const void *b)
{
    const struct store_entry *const *x = a, *const *y = b;
    return strcmp((*x)->name, (*y)->name);
}

int store_list_page(struct store *store, const char *after, size_t max,
                    struct store_snapshot **out, size_t *count, bool *more,
                    struct forkd_error *err)
{
    *out = NULL;
    *count = 0;
    *more = false;
    pthread_mutex_lock(&store->lock);
    size_t n = 0;
    for (struct store_entry *e = store->entries; e; e = e->next)
        n += store_entry_visible(e) && strcmp(e->name, after) > 0;
    /* Pointers only: sorting the entries costs 8 bytes each, not a record each. */
    _cleanup_free_ struct store_entry **entries = calloc(n ? n : 1, sizeof(*entries));
    size_t page = n < max ? n : max;
    struct store_snapshot *list = page ? calloc(page, sizeof(*list)) : NULL;
    if (!entries || (page && !list)) {
        pthread_mutex_unlock(&store->lock);
        free(list);
        return forkd_error_set(err, -ENOMEM, "list snapshots: out of memory");
    }
    size_t i = 0;
    for (struct store_entry *e = store->entries; e; e = e->next)
        if (store_entry_visible(e) && strcmp(e->name, after) > 0)
            entries[i++] = e;
    qsort(entries, n, sizeof(*entries), store_compare_entry_names);
    int r = 0;
    for (i = 0; i < page && r == 0; i++)
        r = store_fill_snapshot(store, entries[i], &list[i], err);
    pthread_mutex_unlock(&store->lock);
    if (r < 0) {
        free(list);
        return r;
    }
    *out = list;
    *count = page;
    *more = n > page;
    return 0;
}

void store_for_each_corrupt(struct store *store, void (*fn)(const char *reason, void *context),
                            void *context)
{
    pthread_mutex_lock(&store->lock);
    for (struct store_entry *e = store->entries; e; e = e->next)
        if (e->kind == STORE_ENTRY_CORRUPT)
            fn(e->corrupt.message, context);
    pthread_mutex_unlock(&store->lock);
}

/* Finds a name for get/acquire/delete: 0, or -EINVAL, -ENOENT, or -EIO for a corrupt one (whose
 * entry is still returned, so it can be deleted). Caller holds the lock. */
static int store_lookup(struct store *store, const char *name, struct store_entry **out,
                        struct forkd_error *err)
{
    *out = NULL;
    int r = store_validate_name(name, err);
    if (r < 0)
        return r;
    struct store_entry *entry = store_find(store, name);
    if (!entry || entry->kind == STORE_ENTRY_GONE)
        return forkd_error_set(err, -ENOENT, "snapshot '%s' does not exist", name);
    *out = entry;
    if (entry->kind == STORE_ENTRY_CORRUPT)
        return forkd_error_set(err, -EIO, "%s", entry->corrupt.message);
    return 0;
}

int store_get(struct store *store, const char *name, struct store_snapshot *out,
              struct forkd_error *err)
{
    struct store_entry *entry;
    pthread_mutex_lock(&store->lock);
    int r = store_lookup(store, name, &entry, err);
    if (r == 0)
        r = store_fill_snapshot(store, entry, out, err);
    pthread_mutex_unlock(&store->lock);
    return r;
}

int store_acquire(struct store *store, const char *name, struct store_snapshot *out,
                  struct forkd_error *err)
{
    struct store_entry *entry;
    pthread_mutex_lock(&store->lock);
    int r = store_lookup(store, name, &entry, err);
    if (r == 0 && entry->kind == STORE_ENTRY_WRITING)
        r = forkd_error_set(err, -EAGAIN, "snapshot '%s' is still being written", name);
    if (r == 0 && entry->users == UINT32_MAX)
        r = forkd_error_set(err, -EOVERFLOW, "snapshot '%s' has too many users", name);
    if (r == 0) {
        entry->users++;
        r = store_fill_snapshot(store, entry, out, err);
        if (r < 0)
            entry->users--;
    }
    pthread_mutex_unlock(&store->lock);
    return r;
}

void store_release(struct store *store, const char *name)
{
    pthread_mutex_lock(&store->lock);
    struct store_entry *entry = name ? store_find(store, name) : NULL;
    if (entry && entry->orphaned_users > 0) {
        entry->orphaned_users--;
        if (entry->kind == STORE_ENTRY_GONE && entry->orphaned_users == 0)
            store_entry_unlink_and_free(store, entry);
    } else if (entry && entry->users > 0) {
        entry->users--;
    }
    pthread_mutex_unlock(&store->lock);
}

/* A forced delete of a WRITING name: the branch notices through store_writer_abandoned, and its
 * publish fails and removes the temporary directory; the name is free at once. */
static void store_abandon_writer(struct store *store, struct store_entry *entry)
{
    struct store_writer *w = entry->writer;
    atomic_store(&w->abandoned, true);
    w->entry = NULL;
    store_entry_retire(store, entry);
}

/* Under the lock: refuses, abandons a writer, or moves a snapshot's directory out of sight. */
static int store_delete_locked(struct store *store, const char *name, bool force, char *moved_to,
                               size_t size, struct forkd_error *err)
{
    struct store_entry *entry;
    int r = store_lookup(store, name, &entry, err);
    if (r < 0 && r != -EIO)
        return r;
    forkd_error_clear(err); /* a corrupt snapshot can be deleted */
    if (entry->kind == STORE_ENTRY_WRITING && !force)
        return forkd_error_set(err, -EBUSY,
                               "snapshot '%s' is being written by a branch; force deletes it and "
                               "cancels the branch",
                               name);
    if (entry->users > 0 && !force)
        return forkd_error_set(err, -EBUSY, "snapshot '%s' is used by %u VM(s)", name,
                               entry->users);
    if (entry->kind == STORE_ENTRY_WRITING) {
        store_abandon_writer(store, entry);
        return 0;
    }
    r = store_unpublish(store, name, moved_to, size, err);
    if (r == 0)
        store_entry_retire(store, entry);
    return r;
}

int store_delete(struct store *store, const char *name, bool force, struct forkd_error *err)
{
    char moved_to[PATH_MAX] = "";
    pthread_mutex_lock(&store->lock);
    int r = store_delete_locked(store, name, force, moved_to, sizeof(moved_to), err);
    pthread_mutex_unlock(&store->lock);
    if (r < 0 || !moved_to[0])
        return r;
    r = store_remove_tree(moved_to);
    if (r < 0)
        return forkd_error_set(err, r,
                               "delete snapshot '%s': remove %s: %s (it is gone from the store; "
                               "the rest is removed at the next start)",
                               name, moved_to, strerror(-r));
    r = fs_sync_dir(store->dir);
    if (r < 0)
        return forkd_error_errno(err, r, "delete snapshot '%s': fsync %s", name, store->dir);
    return 0;
}
