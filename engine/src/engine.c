/* The engine's front door (see forkd/engine.h): owns the store, the registry, the page server. */
#include "forkd/engine.h"

#include "basic/cleanup.h"
#include "thread_priority.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A lazy pull forks of a remote snapshot run on (Spawn with remote); kept until it has ended and
 * no Spawn uses its files, then freed by the next lazy Spawn or at close. */
struct engine_lazy {
    struct engine_lazy *next;
    struct remote_lazy *lazy;
    char name[STORE_NAME_MAX + 1];
    unsigned spawns; /* Spawns restoring forks from its files now */
};

struct engine {
    struct store *store;
    struct vm_registry *registry;
    struct page_server *page_server;
    struct remote *remote;     /* NULL when no remote store is configured */
    pthread_mutex_t lazy_lock; /* guards lazies */
    struct engine_lazy *lazies;
};

int engine_open(const struct engine_config *config, struct engine **out, struct forkd_error *err)
{
    struct engine *engine = calloc(1, sizeof(*engine));
    if (!engine)
        return forkd_error_set(err, -ENOMEM, "engine: out of memory");
    pthread_mutex_init(&engine->lazy_lock, NULL);
    char run_dir[PATH_MAX];
    if (config->run_dir && *config->run_dir)
        snprintf(run_dir, sizeof(run_dir), "%s", config->run_dir);
    else if (snprintf(run_dir, sizeof(run_dir), "%s/vms", config->state_dir) >=
             (int)sizeof(run_dir))
        return free(engine), forkd_error_set(err, -ENAMETOOLONG, "state directory too long");
    struct vm_registry_config registry = {
        .vmm_binary = config->vmm_binary,
        .run_dir = run_dir,
        .timeout_scale = config->timeout_scale,
        .boot_memory = config->anonymous_boot_memory ? VM_MEMORY_ANONYMOUS : VM_MEMORY_MEMFD,
        .kvm_unusable_reason = config->kvm_unusable_reason,
    };
    thread_priority_configure(!config->no_realtime, config->realtime_max_percent);
    struct page_server_config server = {.handshake_timeout_ms = config->handshake_timeout_ms};
    int rc = store_open(config->state_dir, &engine->store, err);
    if (rc < 0)
        forkd_error_prefix(err, "snapshot store: ");
    if (rc == 0 && (rc = vm_registry_open(&registry, &engine->registry, err)) < 0)
        forkd_error_prefix(err, "VM registry: ");
    if (rc == 0 && (rc = page_server_open(&server, &engine->page_server, err)) < 0)
        forkd_error_prefix(err, "page server: ");
    if (rc == 0 && config->remote && (rc = remote_open(config->remote, &engine->remote, err)) < 0)
        forkd_error_prefix(err, "remote store: ");
    if (rc < 0) {
        engine_close(engine, false, 0);
        return rc;
    }
    *out = engine;
    return 0;
}

int engine_adopt_vms(struct engine *engine, struct vm_adopt_config *config,
                     struct vm_adopt_report *report, struct forkd_error *err)
{
    config->store = engine->store;
    config->page_server = engine->page_server;
    return vm_registry_adopt(engine->registry, config, report, err);
}

unsigned long engine_realtime_demotions(void)
{
    return thread_priority_demotions();
}

void engine_close(struct engine *engine, bool keep_vms, unsigned grace_ms)
{
    if (!engine)
        return;
    if (engine->registry)
        vm_registry_close(engine->registry, keep_vms, grace_ms);
    /* Lazy pulls after the VMs (their forks are gone) and before the page server they feed; one
     * still fetching is stopped and leaves the store clean. */
    while (engine->lazies) {
        struct engine_lazy *entry = engine->lazies;
        engine->lazies = entry->next;
        remote_lazy_free(entry->lazy);
        free(entry);
    }
    pthread_mutex_destroy(&engine->lazy_lock);
    /* After the VMs: a UFFD fork whose page server is gone hangs on its next fault. */
    if (engine->page_server)
        page_server_close(engine->page_server);
    remote_close(engine->remote);
    if (engine->store)
        store_close(engine->store);
    free(engine);
}

struct remote *engine_remote(struct engine *engine)
{
    return engine->remote;
}

struct store *engine_store(struct engine *engine)
{
    return engine->store;
}

struct vm_registry *engine_registry(struct engine *engine)
{
    return engine->registry;
}

struct page_server *engine_page_server(struct engine *engine)
{
    return engine->page_server;
}

/* ---- Spawn ------------------------------------------------------------------------------ */

/* Restores one fork from the snapshot's record and files (in dir): the settings every fork
 * of a Spawn shares, whatever the snapshot's files are. */
static int engine_restore_fork(struct engine *engine, const struct engine_spawn_request *request,
                               const struct store_snapshot *snapshot, const char *dir,
                               struct vm_restore_config *config, unsigned index, struct vm **out,
                               struct forkd_error *err)
{
    char name[VM_NAME_MAX + 1] = "";
    if (request->name_prefix && *request->name_prefix)
        snprintf(name, sizeof(name), "%s-%u", request->name_prefix, index);
    config->name = name;
    config->snapshot_name = request->snapshot;
    config->vcpu_count = snapshot->vcpu_count;
    config->page_size = snapshot->page_size;
    config->labels = request->labels;
    config->label_count = request->label_count;
    config->page_server = engine->page_server;
    config->devices = &snapshot->devices;
    config->snapshot_dir = dir;
    config->overrides = request->overrides;
    config->fork_index = index;
    config->start_finished_by_caller = true;
    return vm_restore(engine->registry, config, out, err);
}

/* Restores one fork. From a lazy pull: its files are the WRITING snapshot's, it holds no use
 * of the snapshot in the store (not READY yet), and its memory comes from the lazy template.
 * Otherwise the VM takes over the use of the snapshot acquired here. */
static int engine_spawn_one(struct engine *engine, const struct engine_spawn_request *request,
                            struct remote_lazy *lazy, unsigned index, bool start_paused,
                            struct vm **out, struct forkd_error *err)
{
    if (lazy) {
        struct vm_restore_config config = {.vmstate_path = remote_lazy_vmstate_path(lazy),
                                           .memory_path = remote_lazy_memory_path(lazy),
                                           .memory = VM_MEMORY_UFFD,
                                           .start_paused = start_paused};
        return engine_restore_fork(engine, request, remote_lazy_snapshot(lazy),
                                   remote_lazy_dir(lazy), &config, index, out, err);
    }
    struct store_snapshot snapshot;
    int rc = store_acquire(engine->store, request->snapshot, &snapshot, err);
    if (rc < 0)
        return rc;
    char vmstate[PATH_MAX + 16], memory_path[PATH_MAX + 16];
    store_file_path(snapshot.path, STORE_FILE_VMSTATE, vmstate, sizeof(vmstate));
    store_file_path(snapshot.path, STORE_FILE_MEMORY, memory_path, sizeof(memory_path));
    struct vm_restore_config config = {.store = engine->store,
                                       .vmstate_path = vmstate,
                                       .memory_path = memory_path,
                                       .memory = request->memory,
                                       .start_paused = start_paused};
    return engine_restore_fork(engine, request, &snapshot, snapshot.path, &config, index, out, err);
}

/* The VM among the listed live ones whose tap or vsock socket is `name`, or NULL. */
static const char *engine_device_user(struct vm **vms, const struct vm_status *statuses,
                                      size_t count, bool tap, const char *name)
{
    for (size_t v = 0; v < count; v++) {
        const struct vm_devices *d = &statuses[v].devices;
        if (statuses[v].state == VM_STATE_STOPPED || statuses[v].state == VM_STATE_FAILED)
            continue;
        for (size_t i = 0; tap && i < d->net_count; i++)
            if (strcmp(d->nets[i].host_dev_name, name) == 0)
                return vm_id(vms[v]);
        if (!tap && d->vsock.present && strcmp(d->vsock.uds_path, name) == 0)
            return vm_id(vms[v]);
    }
    return NULL;
}

/* One fork's taps and socket against the live VMs'. */
static int engine_check_fork_devices_free(const struct vm_devices *fork, unsigned index,
                                          bool check_vsock, struct vm **vms,
                                          const struct vm_status *statuses, size_t count,
                                          struct forkd_error *err)
{
    for (size_t i = 0; i < fork->net_count; i++) {
        const char *user =
            engine_device_user(vms, statuses, count, true, fork->nets[i].host_dev_name);
        if (user)
            return forkd_error_set(err, -EBUSY,
                                   "fork %u's interface '%s' would use tap %s, which VM %s uses "
                                   "(a VMM opens a tap for itself alone): give network_overrides "
                                   "for '%s' a pattern no running VM uses",
                                   index, fork->nets[i].id, fork->nets[i].host_dev_name, user,
                                   fork->nets[i].id);
    }
    const char *user = check_vsock && fork->vsock.present
                           ? engine_device_user(vms, statuses, count, false, fork->vsock.uds_path)
                           : NULL;
    if (user)
        return forkd_error_set(err, -EBUSY,
                               "fork %u's vsock would bind socket %s, which VM %s uses (a VMM "
                               "binds it and fails when it exists): give vsock_override a "
                               "pattern no running VM uses",
                               index, fork->vsock.uds_path, user);
    return 0;
}

/* A VMM opens each tap for itself alone (Firecracker's TUNSETIFF has no IFF_MULTI_QUEUE: a
 * second open is EBUSY) and binds the vsock socket path (EADDRINUSE when it exists): a fork
 * whose tap or socket a live VM has (the source VM, earlier forks) would fail in its VMM.
 * Refused up front, -EBUSY naming that VM. A socket path with {vm_id} is new by construction;
 * two Spawns running at once are only caught by the VMMs. */
static int engine_check_devices_free(struct engine *engine, const struct vm_devices *snapshot,
                                     const struct devices_overrides *overrides, unsigned count,
                                     struct forkd_error *err)
{
    struct vm **vms = NULL;
    size_t listed = vm_list(engine->registry, &vms);
    _cleanup_free_ struct vm_status *statuses = calloc(listed + 1, sizeof(*statuses));
    _cleanup_free_ struct vm_devices *fork = malloc(sizeof(*fork));
    int rc = statuses && fork ? 0 : forkd_error_set(err, -ENOMEM, "spawn: out of memory");
    for (size_t v = 0; rc == 0 && v < listed; v++)
        vm_get_status(vms[v], &statuses[v]);
    bool check_vsock = !strstr(overrides->vsock_uds_path, "{vm_id}");
    for (unsigned index = 0; rc == 0 && index < count; index++) {
        *fork = *snapshot;
        rc = devices_overrides_apply(fork, overrides, index, "", err);
        if (rc == 0)
            rc = engine_check_fork_devices_free(fork, index, check_vsock, vms, statuses, listed,
                                                err);
    }
    vm_list_free(vms, listed);
    return rc;
}

/* A fork's read-only drives are the snapshot's files themselves: each must still be the file
 * the branch recorded (size, mtime, ctime, inode), or the fork's page cache and file system
 * would disagree with its disk. -ESTALE naming the drive otherwise. Two forks cannot share a
 * tap device or a vsock socket: the overrides must fit the snapshot's devices and, for more
 * than one fork, give each its own (-EINVAL up front, naming the override to give), and no
 * fork may get a tap or socket a live VM has (-EBUSY naming it). */
static int engine_check_devices(struct engine *engine, const struct store_snapshot *snapshot,
                                const char *name, unsigned count,
                                const struct devices_overrides *overrides,
                                struct forkd_error *err)
{
    static const struct devices_overrides none;
    int rc = devices_overrides_check(&snapshot->devices, overrides ? overrides : &none, count,
                                     name, err);
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < snapshot->devices.drive_count; i++) {
        const struct devices_drive *drive = &snapshot->devices.drives[i];
        if (!drive->read_only)
            continue;
        struct devices_file_identity now;
        rc = devices_file_identity_of(drive->path, &now);
        if (rc < 0)
            return forkd_error_errno(err, rc == -ENOENT ? -ESTALE : rc,
                                     "spawn from %s: read-only drive '%s' (%s)", name, drive->id,
                                     drive->path);
        if (!devices_file_identity_equal(&now, &drive->identity))
            return forkd_error_set(
                err, -ESTALE,
                "spawn from %s: read-only drive '%s' (%s) changed since the branch recorded it "
                "(size %llu -> %llu, mtime or ctime or inode differ): a fork would see a disk "
                "that disagrees with its memory",
                name, drive->id, drive->path, (unsigned long long)drive->identity.size,
                (unsigned long long)now.size);
    }
    rc = engine_check_devices_free(engine, &snapshot->devices, overrides ? overrides : &none, count,
                                   err);
    return rc < 0 ? forkd_error_prefix(err, "spawn from %s: ", name) : 0;
}

static int engine_check_snapshot_devices(struct engine *engine, const char *name, unsigned count,
                                         const struct devices_overrides *overrides,
                                         struct forkd_error *err)
{
    _cleanup_free_ struct store_snapshot *snapshot = malloc(sizeof(*snapshot));
    if (!snapshot)
        return forkd_error_set(err, -ENOMEM, "spawn: out of memory");
    int rc = store_get(engine->store, name, snapshot, err);
    return rc < 0 ? rc : engine_check_devices(engine, snapshot, name, count, overrides, err);
}

/* Turns on hot-page recording and prefetch for the snapshot's UFFD forks, the snapshot's own
 * hot set (recorded by its branch) prefetched from the first fork on. */
static int engine_set_prefetch(struct engine *engine, const struct engine_spawn_request *request,
                               struct forkd_error *err)
{
    _cleanup_free_ struct store_snapshot *snapshot = malloc(sizeof(*snapshot));
    if (!snapshot)
        return forkd_error_set(err, -ENOMEM, "spawn: out of memory");
    int rc = store_get(engine->store, request->snapshot, snapshot, err);
    if (rc < 0)
        return rc;
    char memory_path[PATH_MAX + 16];
    store_file_path(snapshot->path, STORE_FILE_MEMORY, memory_path, sizeof(memory_path));
    rc = page_server_template_set_prefetch(engine->page_server, request->snapshot, memory_path,
                                           request->prefetch_record_ms, err);
    struct page_server_range hot[STORE_MAX_HOT_RANGES];
    for (size_t i = 0; i < snapshot->hot_count; i++)
        hot[i] = (struct page_server_range){snapshot->hot[i].offset, snapshot->hot[i].length};
    if (rc == 0 && snapshot->hot_count)
        rc = page_server_template_seed_hot(engine->page_server, request->snapshot, memory_path, hot,
                                           snapshot->hot_count, err);
    return rc;
}

/* Forks are restored paused and resumed together: restoring the later ones does not compete
 * with the earlier ones running (two running forks can take both cores of a small host), and
 * the forks start from the snapshot at the same moment. */
static int engine_resume_all(struct vm **vms, size_t count, struct forkd_error *err)
{
    for (size_t i = 0; i < count; i++) {
        int rc = vm_resume(vms[i], err);
        if (rc < 0)
            return forkd_error_prefix(err, "resume %s: ", vm_id(vms[i]));
    }
    return 0;
}

static int engine_restore_all(struct engine *engine, const struct engine_spawn_request *request,
                              struct remote_lazy *lazy, struct vm **vms, size_t *started,
                              struct forkd_error *err)
{
    bool paused = request->start_paused || !request->run_as_restored;
    for (*started = 0; *started < request->count; (*started)++) {
        if (request->cancelled && request->cancelled(request->cancelled_arg))
            return forkd_error_set(err, -ECANCELED, "spawn cancelled");
        int rc = engine_spawn_one(engine, request, lazy, (unsigned)*started, paused, &vms[*started],
                                  err);
        if (rc < 0)
            return rc;
    }
    int rc = 0;
    if (!request->start_paused && !request->run_as_restored)
        rc = engine_resume_all(vms, *started, err);
    /* Only now is the Spawn whole: until here a forkd that dies leaves forks its successor
     * stops (all or none), never a part of a Spawn nobody was told about. */
    for (size_t i = 0; rc == 0 && i < *started; i++)
        rc = vm_start_finished(vms[i], err);
    return rc;
}

/* A fork of a lazy pull already ended because a chunk it needed cannot be fetched: the Spawn
 * fails with the pull's reason (the forks' exit_reason holds it too). */
static int engine_check_lazy_forks(struct remote_lazy *lazy, struct vm **vms, size_t count,
                                   struct forkd_error *err)
{
    struct remote_lazy_status status;
    struct forkd_error failure = {0};
    if (remote_lazy_state(lazy, &status, &failure) >= 0 && status.chunks_failed == 0)
        return 0;
    for (size_t i = 0; i < count; i++)
        if (!vm_is_alive(vms[i]))
            return forkd_error_set(err, failure.code < 0 ? failure.code : -EIO,
                                   "spawn: fork %s ended: its memory could not be fetched: %s",
                                   vm_id(vms[i]), failure.message);
    return 0;
}

static int engine_spawn_forks(struct engine *engine, const struct engine_spawn_request *request,
                              struct remote_lazy *lazy, struct vm ***out, struct forkd_error *err)
{
    struct vm **vms = calloc(request->count, sizeof(*vms));
    if (!vms)
        return forkd_error_set(err, -ENOMEM, "spawn: out of memory");
    size_t started = 0;
    int rc = engine_restore_all(engine, request, lazy, vms, &started, err);
    if (rc == 0 && lazy)
        rc = engine_check_lazy_forks(lazy, vms, started, err);
    if (rc < 0) {
        /* All or none: the forks of a failed spawn are stopped again. */
        for (size_t i = 0; i < started; i++)
            vm_stop(engine->registry, vms[i], 0, NULL);
        vm_list_free(vms, started);
        return rc;
    }
    *out = vms;
    return 0;
}

/* Under lazy_lock: frees the lazy pulls that ended and that no Spawn uses. */
static void engine_reap_lazies_locked(struct engine *engine)
{
    struct engine_lazy **slot = &engine->lazies;
    while (*slot) {
        struct engine_lazy *entry = *slot;
        if (entry->spawns == 0 && remote_lazy_state(entry->lazy, NULL, NULL) != 1) {
            *slot = entry->next;
            remote_lazy_free(entry->lazy); /* its workers have ended: joins at once */
            free(entry);
        } else {
            slot = &entry->next;
        }
    }
}

/* The running lazy pull of the snapshot, or a new one; its spawns counted (kept from reaping). */
static int engine_lazy_find_or_start(struct engine *engine, const char *name,
                                     struct engine_lazy **out, struct forkd_error *err)
{
    pthread_mutex_lock(&engine->lazy_lock);
    engine_reap_lazies_locked(engine);
    struct engine_lazy *entry = engine->lazies;
    while (entry &&
           (strcmp(entry->name, name) != 0 || remote_lazy_state(entry->lazy, NULL, NULL) != 1))
        entry = entry->next;
    int rc = 0;
    if (!entry) {
        entry = calloc(1, sizeof(*entry));
        rc = entry ? remote_lazy_start(engine->remote, engine->store, engine->page_server, name,
                                       &entry->lazy, err)
                   : forkd_error_set(err, -ENOMEM, "spawn: out of memory");
        if (rc == 0) {
            snprintf(entry->name, sizeof(entry->name), "%s", name);
            entry->next = engine->lazies;
            engine->lazies = entry;
        } else {
            free(entry);
        }
    }
    if (rc == 0) {
        entry->spawns++;
        *out = entry;
    }
    pthread_mutex_unlock(&engine->lazy_lock);
    return rc;
}

/* The running lazy pull of the snapshot (started now if there is none), held for a Spawn: its
 * files stay where they are until the Spawn releases it. A pull that is ending just now is
 * waited for, then looked for again (-EEXIST: it ended READY). */
static int engine_lazy_acquire(struct engine *engine, const char *name, struct engine_lazy **out,
                               struct forkd_error *err)
{
    for (;;) {
        struct engine_lazy *entry = NULL;
        int rc = engine_lazy_find_or_start(engine, name, &entry, err);
        if (rc < 0)
            return rc;
        if (remote_lazy_hold(entry->lazy) == 0) {
            *out = entry;
            return 0;
        }
        remote_lazy_wait(entry->lazy);
        pthread_mutex_lock(&engine->lazy_lock);
        entry->spawns--;
        pthread_mutex_unlock(&engine->lazy_lock);
    }
}

int engine_lazy_pull_status(struct engine *engine, const char *name, struct remote_lazy_status *out)
{
    int rc = -ENOENT;
    pthread_mutex_lock(&engine->lazy_lock);
    for (struct engine_lazy *entry = engine->lazies; entry && rc < 0; entry = entry->next)
        if (strcmp(entry->name, name) == 0 && remote_lazy_state(entry->lazy, out, NULL) == 1)
            rc = 0;
    pthread_mutex_unlock(&engine->lazy_lock);
    return rc;
}

static void engine_lazy_release(struct engine *engine, struct engine_lazy *entry)
{
    remote_lazy_release(entry->lazy);
    pthread_mutex_lock(&engine->lazy_lock);
    entry->spawns--;
    pthread_mutex_unlock(&engine->lazy_lock);
}

/* Spawn from the bucket: a READY local snapshot of that name is used as it is; otherwise the
 * forks run on a lazy pull of it (one per snapshot, shared by the Spawns made while it runs). */
static int engine_spawn_remote(struct engine *engine, const struct engine_spawn_request *request,
                               struct vm ***out, struct forkd_error *err)
{
    if (request->memory != VM_MEMORY_UFFD)
        return forkd_error_set(err, -EINVAL,
                               "spawn '%s' from the bucket: forks start before their memory "
                               "arrives only with the UFFD backend",
                               request->snapshot);
    if (!engine->remote)
        return forkd_error_set(err, -EOPNOTSUPP,
                               "spawn '%s' from the bucket: no remote store is configured",
                               request->snapshot);
    struct store_snapshot local;
    struct forkd_error ignored = {0};
    if (store_get(engine->store, request->snapshot, &local, &ignored) == 0 &&
        local.state == STORE_STATE_READY) {
        struct engine_spawn_request here = *request;
        here.remote = false;
        return engine_spawn(engine, &here, out, err);
    }
    struct engine_lazy *entry = NULL;
    int rc = engine_lazy_acquire(engine, request->snapshot, &entry, err);
    if (rc == -EEXIST) { /* a lazy pull of it ended READY just now */
        struct engine_spawn_request here = *request;
        here.remote = false;
        return engine_spawn(engine, &here, out, err);
    }
    if (rc < 0)
        return rc;
    rc = engine_check_devices(engine, remote_lazy_snapshot(entry->lazy), request->snapshot,
                              request->count, request->overrides, err);
    if (rc == 0)
        rc = engine_spawn_forks(engine, request, entry->lazy, out, err);
    engine_lazy_release(engine, entry);
    return rc;
}

int engine_spawn(struct engine *engine, const struct engine_spawn_request *request,
                 struct vm ***out, struct forkd_error *err)
{
    int rc = vm_registry_check_host(engine->registry, err);
    if (rc < 0)
        return rc;
    if (request->count < 1)
        return forkd_error_set(err, -EINVAL, "spawn: count must be at least 1");
    if (request->overrides &&
        (rc = devices_overrides_validate(request->overrides, request->count, err)) < 0)
        return rc;
    if (request->remote)
        return engine_spawn_remote(engine, request, out, err);
    rc = engine_check_snapshot_devices(engine, request->snapshot, request->count,
                                       request->overrides, err);
    if (rc < 0)
        return rc;
    if (request->memory == VM_MEMORY_UFFD && request->prefetch_record_ms)
        rc = engine_set_prefetch(engine, request, err);
    if (rc < 0)
        return rc;
    return engine_spawn_forks(engine, request, NULL, out, err);
}

int engine_delete_snapshot(struct engine *engine, const char *name, bool force,
                           struct forkd_error *err)
{
    int rc = store_delete(engine->store, name, force, err);
    if (rc == 0)
        page_server_template_forget(engine->page_server, name);
    return rc;
}
