/*
 * The snapshot store: <state-dir>/snapshots/<name>/{vmstate, memory.bin, snapshot.json}.
 *
 * A snapshot is written in a temporary directory (<snapshots>/.tmp-<name>.XXXXXX) and becomes
 * visible under its name only by store_publish: files fsynced, snapshot.json written and fsynced,
 * the directory renamed into place, the parent fsynced. So a READY snapshot is always complete; one
 * being written is listed WRITING and cannot be acquired; leftovers of a crash (.tmp-*) are
 * removed by store_open. The store is thread-safe (one mutex; no I/O of snapshot data under it).
 */
#ifndef FORKD_STORE_H
#define FORKD_STORE_H

#include "basic/error.h"
#include "forkd/devices.h"

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define STORE_NAME_MAX    64 /* ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ */
#define STORE_MAX_REGIONS 16
#define STORE_MAX_LABELS  16
/* A hot set is coalesced to at most this many ranges: its part of snapshot.json stays a few KiB
 * and struct store_snapshot a fixed size. */
#define STORE_MAX_HOT_RANGES 256

enum store_state { STORE_STATE_WRITING = 1, STORE_STATE_READY = 2, STORE_STATE_CORRUPT = 3 };

/* Matches the proto's BranchMode values. */
enum store_mode { STORE_MODE_LIVE = 1, STORE_MODE_LIVE_ARM_IN_PAUSE = 2, STORE_MODE_FULL = 3 };

struct store_region {
    /* Where the guest sees the region, as the VMM reported it; unknown (false, and absent
     * from snapshot.json) where the VMM does not say, as stock Firecracker does not. */
    bool guest_phys_addr_known;
    uint64_t guest_phys_addr;
    uint64_t size;
    uint64_t file_offset;
    uint32_t page_size;
};

struct store_figures {
    uint64_t pause_ns, arm_ns, rearm_ns, rearmed_pages, vmstate_ns, copy_ns, publish_ns, total_ns;
    uint64_t pages_by_fault, pages_by_bulk, bytes_copied;
    /* Inside pause_ns: the VMM's answers to the pause and to the resume request. */
    uint64_t pause_request_ns, resume_request_ns;
    /* Inside pause_ns: capturing the writable drives (reflink clones), and the bytes copied
     * instead where the branch accepted a copy inside the pause (0: reflinks only). Optional in
     * snapshot.json (records written before drives existed have neither). */
    uint64_t disk_capture_ns, disk_copied_bytes;
};

/* Every field of struct store_figures, by name, for the code that treats them alike (the
 * snapshot.json codec, the proto conversion). */
struct store_figure_field {
    const char *name;
    size_t offset; /* of a uint64_t in struct store_figures */
};
#define STORE_FIGURE_COUNT 15
extern const struct store_figure_field store_figure_fields[STORE_FIGURE_COUNT];

static inline uint64_t store_figure_get(const struct store_figures *figures,
                                        const struct store_figure_field *field)
{
    return *(const uint64_t *)((const char *)figures + field->offset);
}

struct store_label {
    char key[64];
    char value[256];
};

/* A run of memory.bin, in bytes: offset and length multiples of 4096, length above 0. */
struct store_hot_range {
    uint64_t offset, length;
};

/* What snapshot.json records. Filled by the branch before store_publish; read back by
 * store_get/store_list. */
struct store_snapshot {
    char name[STORE_NAME_MAX + 1];
    enum store_state state;
    char source_vm_id[64];
    char source_vm_name[STORE_NAME_MAX + 1];
    char parent_snapshot[STORE_NAME_MAX + 1];
    enum store_mode mode;
    uint32_t vcpu_count;
    uint64_t mem_size_mib;
    uint64_t memory_bytes;  /* size of memory.bin (set by the store from the file at publish) */
    uint64_t vmstate_bytes; /* size of vmstate (set by the store from the file at publish) */
    size_t region_count;
    struct store_region regions[STORE_MAX_REGIONS];
    uint32_t page_size;
    struct store_figures figures;
    char vmm_binary[PATH_MAX];
    char vmm_version[64];
    int64_t created_at_unix_ms; /* 0 at publish: the store sets the current time */
    size_t label_count;
    struct store_label labels[STORE_MAX_LABELS];
    char path[PATH_MAX]; /* directory of the snapshot (set by the store; the temporary one
                          * while WRITING) */
    uint32_t users;      /* VMs holding it through store_acquire (set by the store) */
    char corrupt_reason[FORKD_ERROR_MESSAGE_MAX]; /* CORRUPT: why, naming the file (set by the store) */
    /* The source VM's drives (read-only ones with their file's identity at branch time),
     * network interfaces, vsock and initrd. */
    struct vm_devices devices;
    /* The hot set: where in memory.bin the guest was writing when it was branched, so that
     * forks get those pages first (a lazy Spawn fetches their chunks before the others). LIVE
     * branches record the pages dirtied while write-protect was being armed, coalesced to at
     * most STORE_MAX_HOT_RANGES ranges; FULL and ARM_IN_PAUSE branches record none (0), and
     * records written before it existed have none ("hot" is optional in snapshot.json). Sorted,
     * not overlapping, within memory_bytes (checked on load and at publish). */
    size_t hot_count;
    struct store_hot_range hot[STORE_MAX_HOT_RANGES];
};

struct store;
struct store_writer;

/* The files of a snapshot directory. Their names are spelled only in the store. */
enum store_file { STORE_FILE_VMSTATE, STORE_FILE_MEMORY, STORE_FILE_METADATA };

/* Writes <dir>/<the file's name> into out. -ENAMETOOLONG when it does not fit. */
int store_file_path(const char *dir, enum store_file file, char *out, size_t size);

/* Checks a snapshot name; -EINVAL with the reason otherwise. */
int store_validate_name(const char *name, struct forkd_error *err);
/* The same rule for another kind of name (VMs share it): what names it in the message ("VM
 * name"). */
int store_validate_name_of(const char *what, const char *name, struct forkd_error *err);

/* Opens (creating) <state_dir>/snapshots and removes crash leftovers (.tmp-* directories).
 * A directory with a valid name whose snapshot.json is unreadable (or whose data files do not
 * match it) is left alone: listed by store_list as CORRUPT with the reason, -EIO from
 * store_get/store_acquire with the file and the reason, -EEXIST from store_begin;
 * store_delete removes it. */
int store_open(const char *state_dir, struct store **out, struct forkd_error *err);
/* Every writer must have been published or aborted first. */
void store_close(struct store *store);

/* Reserves name and creates its temporary directory. -EEXIST when a snapshot or a writer of
 * that name exists, -EINVAL for a bad name. */
int store_begin(struct store *store, const char *name, struct store_writer **out,
                struct forkd_error *err);

/* The temporary directory to write vmstate and memory.bin into. */
const char *store_writer_dir(const struct store_writer *writer);
/* <state-dir>/snapshots: where snapshots (and their captured drives) are written. */
const char *store_dir(const struct store *store);
/* The file a snapshot keeps its capture of the writable drive drive_id in: <dir>/drive-<id>.
 * -ENAMETOOLONG when it does not fit. */
int store_drive_path(const char *dir, const char *drive_id, char *out, size_t size);

/* Paths of the two data files inside the writer's directory. */
const char *store_writer_vmstate_path(const struct store_writer *writer);
const char *store_writer_memory_path(const struct store_writer *writer);

/* True once a forced delete asked this writer's branch to stop. */
bool store_writer_abandoned(const struct store_writer *writer);

/* Makes the snapshot READY (see the top of this file). meta->name must be the writer's name;
 * path, state, users and the two sizes are set by the store. Both vmstate and memory.bin must
 * exist (-ENOENT otherwise); -ECANCELED when a forced delete abandoned the writer; -EINVAL for
 * metadata that cannot be stored (a number beyond 2^53, duplicate label keys). On success the
 * writer is freed; on failure the writer is aborted (temporary directory removed) and freed too. */
int store_publish(struct store_writer *writer, const struct store_snapshot *meta,
                  struct forkd_error *err);

/* Removes the temporary directory and releases the name. Frees the writer. */
void store_abort(struct store_writer *writer);

/* All snapshots, READY, WRITING and CORRUPT (only name, path and corrupt_reason filled), sorted
 * by name. *out is malloc'd (free it; NULL when
 * *count is 0). */
int store_list(struct store *store, struct store_snapshot **out, size_t *count,
               struct forkd_error *err);

/* One page of store_list: at most max snapshots whose names sort after `after` ("" for the
 * first page), sorted by name; *more tells whether others follow. Copies only the page's
 * records, so a page costs the same whatever the store holds. *out as for store_list. */
int store_list_page(struct store *store, const char *after, size_t max,
                    struct store_snapshot **out, size_t *count, bool *more,
                    struct forkd_error *err);

/* Parses snapshot.json text as store_open does (strictly: UTF-8, every field, right types).
 * Returns 0 or -EIO with the reason in err. For tests and fuzzing; the store calls it itself. */
int store_parse_metadata(const char *text, size_t len, struct store_snapshot *out,
                         struct forkd_error *err);

/* Calls fn with the reason of each CORRUPT snapshot (under the store's lock: fn must not call
 * back into the store). Cheaper than store_list when only those are wanted. */
void store_for_each_corrupt(struct store *store, void (*fn)(const char *reason, void *context),
                            void *context);

/* One snapshot (READY or WRITING). -ENOENT when there is none. */
int store_get(struct store *store, const char *name, struct store_snapshot *out,
              struct forkd_error *err);

/* Takes a use of a READY snapshot for a VM restored from it (out filled). -ENOENT, or -EAGAIN
 * when it is still WRITING. */
int store_acquire(struct store *store, const char *name, struct store_snapshot *out,
                  struct forkd_error *err);
/* Gives back a use taken by store_acquire. Uses of a snapshot deleted by force are remembered
 * under its name and given back first, so a later snapshot of that name never counts too few. */
void store_release(struct store *store, const char *name);

/* Deletes a snapshot. -EBUSY while VMs use it or a branch writes it, unless force; a forced
 * delete of a WRITING snapshot marks its writer abandoned (the branch then aborts). */
int store_delete(struct store *store, const char *name, bool force, struct forkd_error *err);

#ifdef __cplusplus
}
#endif

#endif
