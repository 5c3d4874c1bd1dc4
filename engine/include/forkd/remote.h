/*
 * Remote snapshots: the store's snapshots in an S3 bucket, so that a snapshot made on one host
 * starts forks on another. Owns the bucket layout and the transfers (Push, Pull, ListRemote,
 * DeleteRemote); the HTTP and the signing are the S3 client's (src/s3.h, over libcurl).
 *
 * Layout in the bucket:
 *   snapshots/<name>/manifest.json  snapshot.json (its hot set included), the vmstate's size and
 *                                   sha256, and the chunk index: the sha256 of each
 *                                   REMOTE_CHUNK_SIZE piece of memory.bin, "" for an all-zero
 *                                   piece (not stored)
 *   snapshots/<name>/vmstate
 *   chunks/<sha256>                 one piece of memory, content-addressed: shared by every
 *                                   snapshot holding the same bytes, uploaded once
 * The manifest is written last, so a remote snapshot is visible only once it is complete; a push
 * that fails leaves no manifest (its uploaded chunks stay, for a later push to reuse).
 *
 * Every transfer runs on the calling thread plus REMOTE_PARALLEL_MAX workers at most, each with
 * its own S3 connection; the calling thread reports progress every interval and watches the
 * caller's cancel predicate.
 */
#ifndef FORKD_REMOTE_H
#define FORKD_REMOTE_H

#include "basic/error.h"
#include "forkd/store.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define REMOTE_CHUNK_SIZE   ((uint64_t)2 << 20)
#define REMOTE_PARALLEL_MAX 16
#define REMOTE_LIST_MAX     1000 /* ListRemote answers at most this many snapshots */

struct remote_config {
    const char *endpoint; /* http(s)://host[:port] */
    const char *region;   /* NULL or "": us-east-1 */
    const char *bucket;
    const char *credentials_file; /* NULL or "": AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY */
    unsigned parallel;            /* transfers at once; 0: 4 */
    unsigned retries;             /* per request after the first; 0: 4 */
    uint64_t multipart_bytes;     /* vmstate above this goes up in parts; 0: 64 MiB */
};

struct remote;

/* Checks the configuration and loads the credentials (nothing is sent yet). */
int remote_open(const struct remote_config *config, struct remote **out, struct forkd_error *err);
void remote_close(struct remote *remote);

/* Where a transfer stands. */
struct remote_progress {
    uint64_t bytes_total;       /* memory + vmstate */
    uint64_t bytes_done;        /* of bytes_total: moved, skipped or zero */
    uint64_t bytes_transferred; /* what actually crossed the network (bodies) */
    uint64_t chunks_total;
    uint64_t chunks_done;
    uint64_t chunks_skipped; /* already in the bucket (push) */
    uint64_t chunks_zero;    /* all-zero: neither stored nor fetched */
    uint64_t elapsed_ns;
};

struct remote_transfer_control {
    /* Called on the calling thread about every interval_ms (0: 100) and once at the end. */
    void (*progress)(const struct remote_progress *progress, void *arg);
    /* Asked as often; true stops the transfer with -ECANCELED. */
    bool (*cancelled)(void *arg);
    void *arg;
    unsigned interval_ms;
};

/* Push: uploads a READY local snapshot (held with store_acquire while it is read). -EEXIST when
 * the bucket already holds a snapshot of that name. *final (may be NULL) gets the last
 * progress. */
int remote_push(struct remote *remote, struct store *store, const char *name,
                const struct remote_transfer_control *control, struct remote_progress *final,
                struct forkd_error *err);

/* Pull: downloads a remote snapshot into the store (WRITING, then READY when every chunk has
 * arrived and matched its sha256). -ENOENT when the bucket has none of that name, -EEXIST when
 * the store has one; -EIO for a missing or corrupt chunk, vmstate or manifest: then nothing is
 * left in the store. */
int remote_pull(struct remote *remote, struct store *store, const char *name,
                const struct remote_transfer_control *control, struct remote_progress *final,
                struct forkd_error *err);

/* ---- Lazy pull: a pull that UFFD forks run on while it proceeds (Spawn with remote set) ----
 *
 * remote_lazy_start checks the manifest, fetches the vmstate and creates memory.bin at its full
 * size in a WRITING snapshot of the store, lists it with the page server as a lazy template
 * (forkd/page_server.h) and starts the remote's parallel workers (one S3 connection each). The
 * workers fetch first the chunks forks fault in (queued by the page server), then the chunks of
 * the snapshot's recorded hot set (snapshot.json "hot", in file order), then every other chunk
 * in file order; each chunk's sha256 is checked before a fork is served from it. When
 * every chunk has arrived and matched, the snapshot is published (READY); if any chunk cannot be
 * fetched (missing, corrupt, server down after the retries), the forks faulting in it are ended
 * (see the page server), the others keep running on what arrived, and once every other chunk
 * was tried the WRITING snapshot is removed: the store is left clean. Either way the page server
 * forgets the lazy template; later forks of that name map the published file.
 * The forks hold no use of the snapshot in the store (it was not READY when they started). */
struct remote_lazy;
struct page_server;

struct remote_lazy_status {
    uint64_t chunks_total, chunks_fetched, chunks_failed, bytes_fetched;
    uint64_t elapsed_ns;  /* since the start, until the end once finished */
    uint64_t chunks_zero; /* all-zero: there from the start, never fetched */
    /* Fetched because a fork faulted in them: ahead of the hot set and the rest. */
    uint64_t chunks_demanded;
    /* The snapshot's hot set (snapshot.json "hot"): its non-zero chunks, fetched before the
     * others (after the ones forks asked for); how many have arrived; and when the last of them
     * arrived or failed, since the start (0 until then, and without a hot set). */
    uint64_t hot_chunks, hot_chunks_fetched, hot_done_ns;
};

/* -EEXIST when the store has a snapshot of that name, -ENOENT when the bucket has none, -EIO for
 * a bad manifest or vmstate; nothing is left in the store or the page server on failure. */
int remote_lazy_start(struct remote *remote, struct store *store, struct page_server *server,
                      const char *name, struct remote_lazy **out, struct forkd_error *err);

/* A Spawn holds the pull while it restores forks on its WRITING files, so that the pull's end
 * (publishing moves them, a failure removes them) waits for it. -EALREADY once the end has
 * begun: remote_lazy_wait, then look again (a READY snapshot in the store, or a new pull). */
int remote_lazy_hold(struct remote_lazy *lazy);
/* Ends a hold; the last one ends a pull whose chunks are all done (on the caller's thread). */
void remote_lazy_release(struct remote_lazy *lazy);
/* Waits until the pull has ended (remote_lazy_state no longer 1). */
void remote_lazy_wait(struct remote_lazy *lazy);

/* 1 while chunks are being fetched, 0 once the snapshot is READY, or the failure (-errno, err).
 * err also gets the first chunk's failure while the pull still runs. */
int remote_lazy_state(struct remote_lazy *lazy, struct remote_lazy_status *out,
                      struct forkd_error *err);

/* snapshot.json as the manifest holds it (vcpu_count, devices, ...), and the WRITING files. */
const struct store_snapshot *remote_lazy_snapshot(const struct remote_lazy *lazy);
const char *remote_lazy_memory_path(const struct remote_lazy *lazy);
const char *remote_lazy_vmstate_path(const struct remote_lazy *lazy);
const char *remote_lazy_dir(const struct remote_lazy *lazy);

/* Stops the workers if still running (chunks not fetched then fail their faults, the store is
 * left clean), joins them and frees. NULL is a no-op. */
void remote_lazy_free(struct remote_lazy *lazy);

struct remote_snapshot_info {
    char name[STORE_NAME_MAX + 1];
    char parent_snapshot[STORE_NAME_MAX + 1];
    uint64_t memory_bytes, vmstate_bytes;
    uint64_t chunk_count, zero_chunks;
    int64_t created_at_unix_ms;
    uint64_t hot_bytes; /* the bytes of its hot set (0: none recorded) */
};

/* ListRemote: the complete remote snapshots (those with a manifest), sorted by name, at most
 * REMOTE_LIST_MAX (*truncated then). *out is malloc'd (NULL when *count is 0). */
int remote_list(struct remote *remote, struct remote_snapshot_info **out, size_t *count,
                bool *truncated, struct forkd_error *err);

struct remote_delete_report {
    uint64_t chunks_deleted; /* referenced by no other manifest */
    uint64_t chunks_kept;    /* still referenced by another manifest */
};

/* DeleteRemote: removes the manifest first (the snapshot disappears at once), then the vmstate,
 * then each of its chunks that no other manifest references. -ENOENT when there is none. */
int remote_delete(struct remote *remote, const char *name, struct remote_delete_report *report,
                  struct forkd_error *err);

#ifdef __cplusplus
}
#endif

#endif
