/*
 * The engine's front door: one object that owns the snapshot store, the VM registry, the
 * page server and (when configured) the remote store of snapshots in S3, and the lifecycle actions
 * that need more than one of them (Spawn, deleting a snapshot). A user opens one engine, reaches
 * its parts through the accessors for the actions that need one part only (Boot, GetVm,
 * ListSnapshots, Branch, ...), and closes it.
 *
 * Each action states when it is allowed; the caller (the gRPC layer) turns a request into an
 * action and an action's error (negative errno + message) into its own status.
 *
 * engine/README.md maps the files and the threads (who starts each, what it owns, how work is
 * handed from one to another).
 */
#ifndef FORKD_ENGINE_H
#define FORKD_ENGINE_H

#include "basic/error.h"
#include "forkd/page_server.h"
#include "forkd/remote.h"
#include "forkd/store.h"
#include "forkd/vm.h"

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

struct engine;

struct engine_config {
    const char *state_dir;    /* snapshots under <state_dir>/snapshots; created if missing */
    const char *run_dir;      /* VMM sockets and logs; NULL or "": <state_dir>/vms */
    const char *vmm_binary;   /* path, or a name looked up in PATH */
    int handshake_timeout_ms; /* page server; 0: its default */
    /* Every time limit on a VMM is multiplied by this (slow or emulated hosts); 0 means 1. */
    unsigned timeout_scale;
    /* Boot VMs on the VMM's own anonymous memory instead of a memfd forkd owns (a VMM without
     * the machine-config memory file). */
    bool anonymous_boot_memory;
    /* Non-NULL: this host cannot run VMs, for this reason; Boot and Spawn then refuse with
     * -ENODEV before launching anything. */
    const char *kvm_unusable_reason;
    /* Real-time priority for the pause and fault-serving threads: off when no_realtime; a
     * raised thread using more than realtime_max_percent of a core (0: 50) is demoted. */
    bool no_realtime;
    unsigned realtime_max_percent;
    /* The S3 bucket snapshots are pushed to and pulled from; NULL: none (engine_remote is then
     * NULL). Opened after the page server (credentials loaded, nothing sent). */
    const struct remote_config *remote;
};

/* Opens the store, the VM registry and the page server, in that order; on failure whatever was
 * opened is closed again. */
int engine_open(const struct engine_config *config, struct engine **out, struct forkd_error *err);

/* Stops every VM (SIGTERM, SIGKILL after grace_ms) unless keep_vms, then closes the page
 * server (only now: a UFFD fork whose page server is gone hangs on its next fault), then the
 * store. Every branch must have ended first. NULL is a no-op. */
void engine_close(struct engine *engine, bool keep_vms, unsigned grace_ms);

/* Takes back the VMs an earlier forkd on this state directory left running (it died, or was
 * stopped with keep_vms): vm_registry_adopt with the engine's store and page server (config's
 * store and page_server are filled in here). Call once, right after engine_open, before any
 * other action. */
int engine_adopt_vms(struct engine *engine, struct vm_adopt_config *config,
                     struct vm_adopt_report *report, struct forkd_error *err);

/* How many real-time threads were demoted for using too much CPU (see engine_config). */
unsigned long engine_realtime_demotions(void);

struct store *engine_store(struct engine *engine);
struct vm_registry *engine_registry(struct engine *engine);
struct page_server *engine_page_server(struct engine *engine);
/* The remote store (forkd/remote.h: Push, Pull, ListRemote, DeleteRemote), or NULL when the
 * engine was opened without one. */
struct remote *engine_remote(struct engine *engine);

struct engine_spawn_request {
    const char *snapshot;    /* a READY snapshot (-EAGAIN while it is WRITING) */
    unsigned count;          /* at least 1 */
    enum vm_memory memory;   /* FILE, MEMFD or UFFD */
    const char *name_prefix; /* forks are named <prefix>-<index>; NULL or "": by id only */
    bool start_paused;       /* leave every fork paused */
    /* Each fork runs as soon as it is restored, instead of all being restored paused and
     * resumed together (the benchmark's default; the daemon never sets it). */
    bool run_as_restored;
    unsigned prefetch_record_ms; /* UFFD: record and prefetch hot pages (0: off) */
    /* Per-fork taps and vsock socket (NULL: none; see devices_overrides_validate). More than
     * one fork of a snapshot whose VM has a network interface or a vsock needs them. */
    const struct devices_overrides *overrides;
    const struct vm_label *labels;
    size_t label_count; /* at most VM_MAX_LABELS */
    /* From the bucket, chunk by chunk (UFFD only, else -EINVAL; -EOPNOTSUPP without a remote
     * store): a READY local snapshot of that name is used as it is; otherwise the forks run on
     * a lazy pull (forkd/remote.h) while it proceeds: -ENOENT when the bucket has no such
     * snapshot, -EAGAIN while a local one of that name is being written by something else.
     * prefetch_record_ms does not apply to a lazy pull. */
    bool remote;
    /* Asked between restores; true stops the spawn with -ECANCELED. May be NULL. */
    bool (*cancelled)(void *arg);
    void *cancelled_arg;
};

/* Spawn: starts request->count VMs restored from one snapshot, all or none. Refused with -ENODEV
 * first, before anything else is looked at, on a host that cannot run VMs; then -EINVAL for
 * overrides that do not fit the snapshot's devices (devices_overrides_check), -EBUSY when a
 * fork would get a tap device or vsock socket a live VM has (a VMM opens them for itself
 * alone). Each VM holds a
 * use of the snapshot (so it cannot be deleted without force) until it is stopped. On success
 * *out is an array of request->count references (free with vm_list_free). On failure every
 * fork started is stopped again and the error says why: -ENOENT (no such snapshot), -EAGAIN
 * (still being written), -ECANCELED, or the restore's error. */
int engine_spawn(struct engine *engine, const struct engine_spawn_request *request,
                 struct vm ***out, struct forkd_error *err);

/* How the lazy pull of a snapshot that Spawns from the bucket run on stands (GetSnapshot of
 * the WRITING snapshot): 0 while it fetches, -ENOENT when none is fetching it. */
int engine_lazy_pull_status(struct engine *engine, const char *name,
                            struct remote_lazy_status *out);

/* DeleteSnapshot: removes it from the store (-EBUSY while VMs use it, unless force) and makes
 * the page server forget its template, so a later snapshot of that name is mapped afresh. */
int engine_delete_snapshot(struct engine *engine, const char *name, bool force,
                           struct forkd_error *err);

#ifdef __cplusplus
}
#endif

#endif
