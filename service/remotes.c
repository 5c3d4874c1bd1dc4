/* The remote-snapshot RPCs: Push, Pull (streaming progress), ListRemote, DeleteRemote, over the
 * engine's remote store (forkd/remote.h). */
#include "convert.h"
#include "daemon.h"
#include "handlers.h"
#include "log.h"

#include "forkd/remote.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define REMOTES_PROGRESS_MIN_MS 10
#define REMOTES_PROGRESS_MAX_MS 60000

static grpc_status_code remotes_check(struct daemon_state *daemon, const char *name,
                                      bool name_needed, struct remote **out,
                                      struct rpc_status *status)
{
    struct forkd_error err = {0};
    if (name_needed && store_validate_name(name, &err) < 0)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT, "snapshot_name: %s",
                              err.message);
    *out = engine_remote(daemon->engine);
    if (!*out)
        return rpc_status_set(status, GRPC_STATUS_FAILED_PRECONDITION,
                              "no remote store: start forkd with --remote-endpoint and "
                              "--remote-bucket (and --remote-credentials or AWS_ACCESS_KEY_ID/"
                              "AWS_SECRET_ACCESS_KEY)");
    return GRPC_STATUS_OK;
}

struct remotes_stream {
    struct rpc_call *call;
    struct daemon_state *daemon;
    const char *name;
    bool gone; /* a send failed: the client left */
};

static void remotes_fill_progress(const struct remote_progress *progress,
                                  Forkd__V1__TransferProgress *out)
{
    *out = (Forkd__V1__TransferProgress)FORKD__V1__TRANSFER_PROGRESS__INIT;
    out->bytes_total = progress->bytes_total;
    out->bytes_done = progress->bytes_done;
    out->bytes_transferred = progress->bytes_transferred;
    out->chunks_total = progress->chunks_total;
    out->chunks_done = progress->chunks_done;
    out->chunks_skipped = progress->chunks_skipped;
    out->chunks_zero = progress->chunks_zero;
    out->elapsed_ns = progress->elapsed_ns;
    out->bytes_per_second =
        progress->elapsed_ns
            ? (uint64_t)((double)progress->bytes_transferred * 1e9 / (double)progress->elapsed_ns)
            : 0;
    out->chunk_size = REMOTE_CHUNK_SIZE;
}

static void remotes_send_progress(const struct remote_progress *progress, void *arg)
{
    struct remotes_stream *stream = arg;
    if (stream->gone)
        return;
    Forkd__V1__TransferProgress message;
    remotes_fill_progress(progress, &message);
    Forkd__V1__TransferEvent event = FORKD__V1__TRANSFER_EVENT__INIT;
    event.snapshot_name = (char *)stream->name;
    event.progress = &message;
    if (call_send_message(stream->call, &event.base) < 0)
        stream->gone = true;
}

static bool remotes_cancelled(void *arg)
{
    struct remotes_stream *stream = arg;
    return stream->gone || call_is_cancelled(stream->call) ||
           atomic_load(&stream->daemon->shutting_down);
}

static unsigned remotes_interval(uint32_t requested)
{
    if (!requested)
        return 100;
    if (requested < REMOTES_PROGRESS_MIN_MS)
        return REMOTES_PROGRESS_MIN_MS;
    return requested > REMOTES_PROGRESS_MAX_MS ? REMOTES_PROGRESS_MAX_MS : requested;
}

/* Sends the final event (done, with the pulled snapshot when there is one). */
static grpc_status_code remotes_finish(struct remotes_stream *stream,
                                       const struct remote_progress *final,
                                       const struct store_snapshot *pulled,
                                       struct rpc_status *status)
{
    Forkd__V1__TransferProgress message;
    remotes_fill_progress(final, &message);
    Forkd__V1__TransferEvent event = FORKD__V1__TRANSFER_EVENT__INIT;
    event.snapshot_name = (char *)stream->name;
    event.progress = &message;
    event.done = true;
    struct snapshot_message *snapshot = NULL;
    if (pulled) {
        snapshot = malloc(sizeof(*snapshot));
        if (!snapshot)
            return rpc_status_set(status, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        convert_snapshot(pulled, snapshot);
        event.snapshot = &snapshot->snapshot;
    }
    int rc = call_send_message(stream->call, &event.base);
    free(snapshot);
    if (rc < 0)
        return rpc_status_set(status, GRPC_STATUS_CANCELLED, "the client went away");
    return GRPC_STATUS_OK;
}

typedef int (*remotes_transfer_fn)(struct remote *remote, struct store *store, const char *name,
                                   const struct remote_transfer_control *control,
                                   struct remote_progress *final, struct forkd_error *err);

/* What Push and Pull share: the checks, the progress stream and the engine call. */
static grpc_status_code remotes_transfer(struct rpc_call *call, const char *verb,
                                         remotes_transfer_fn transfer, const char *name,
                                         uint32_t interval_ms, struct remotes_stream *stream,
                                         struct remote_progress *final, struct rpc_status *status)
{
    struct daemon_state *daemon = call->daemon;
    struct remote *remote = NULL;
    if (remotes_check(daemon, name, true, &remote, status) != GRPC_STATUS_OK)
        return status->code;
    *stream = (struct remotes_stream){.call = call, .daemon = daemon, .name = name};
    struct remote_transfer_control control = {.progress = remotes_send_progress,
                                              .cancelled = remotes_cancelled,
                                              .arg = stream,
                                              .interval_ms = remotes_interval(interval_ms)};
    struct forkd_error err = {0};
    log_info("%s %s: started", verb, name);
    if (transfer(remote, engine_store(daemon->engine), name, &control, final, &err) < 0) {
        log_warn("%s %s: %s", verb, name, err.message);
        return convert_error(status, &err);
    }
    return GRPC_STATUS_OK;
}

FORKD_HANDLER(handle_push)
{
    const Forkd__V1__PushRequest *r = (const Forkd__V1__PushRequest *)request;
    struct remotes_stream stream;
    struct remote_progress final;
    if (remotes_transfer(call, "push", remote_push, r->snapshot_name, r->progress_interval_ms,
                         &stream, &final, status) != GRPC_STATUS_OK)
        return status->code;
    log_info("push %s: done, %llu of %llu chunks uploaded (%llu already there, %llu zero)",
             r->snapshot_name,
             (unsigned long long)(final.chunks_total - final.chunks_skipped - final.chunks_zero),
             (unsigned long long) final.chunks_total, (unsigned long long) final.chunks_skipped,
             (unsigned long long) final.chunks_zero);
    return remotes_finish(&stream, &final, NULL, status);
}

FORKD_HANDLER(handle_pull)
{
    const Forkd__V1__PullRequest *r = (const Forkd__V1__PullRequest *)request;
    struct remotes_stream stream;
    struct remote_progress final;
    if (remotes_transfer(call, "pull", remote_pull, r->snapshot_name, r->progress_interval_ms,
                         &stream, &final, status) != GRPC_STATUS_OK)
        return status->code;
    struct daemon_state *daemon = call->daemon;
    struct store_snapshot record;
    struct forkd_error err = {0};
    if (store_get(engine_store(daemon->engine), r->snapshot_name, &record, &err) < 0)
        return convert_error(status, &err);
    log_info("pull %s: done, %llu chunks fetched (%llu zero)", r->snapshot_name,
             (unsigned long long)(final.chunks_total - final.chunks_zero),
             (unsigned long long) final.chunks_zero);
    return remotes_finish(&stream, &final, &record, status);
}

FORKD_HANDLER(handle_list_remote)
{
    (void)request;
    struct daemon_state *daemon = call->daemon;
    struct remote *remote = NULL;
    if (remotes_check(daemon, "", false, &remote, status) != GRPC_STATUS_OK)
        return status->code;
    struct remote_snapshot_info *infos = NULL;
    size_t count = 0;
    bool truncated = false;
    struct forkd_error err = {0};
    if (remote_list(remote, &infos, &count, &truncated, &err) < 0)
        return convert_error(status, &err);
    Forkd__V1__RemoteSnapshot *messages = calloc(count ? count : 1, sizeof(*messages));
    Forkd__V1__RemoteSnapshot **pointers = calloc(count ? count : 1, sizeof(*pointers));
    grpc_status_code code = GRPC_STATUS_OK;
    if (!messages || !pointers) {
        code = rpc_status_set(status, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    } else {
        for (size_t i = 0; i < count; i++) {
            Forkd__V1__RemoteSnapshot *m = &messages[i];
            *m = (Forkd__V1__RemoteSnapshot)FORKD__V1__REMOTE_SNAPSHOT__INIT;
            m->name = infos[i].name;
            m->parent_snapshot = infos[i].parent_snapshot;
            m->memory_bytes = infos[i].memory_bytes;
            m->vmstate_bytes = infos[i].vmstate_bytes;
            m->chunk_count = infos[i].chunk_count;
            m->zero_chunks = infos[i].zero_chunks;
            m->hot_bytes = infos[i].hot_bytes;
            m->created_at_unix_ms = infos[i].created_at_unix_ms;
            pointers[i] = m;
        }
        Forkd__V1__ListRemoteResponse response = FORKD__V1__LIST_REMOTE_RESPONSE__INIT;
        response.n_snapshots = count;
        response.snapshots = pointers;
        response.truncated = truncated;
        if (call_set_response(call, &response.base) < 0)
            code = rpc_status_set(status, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    }
    free(pointers);
    free(messages);
    free(infos);
    return code;
}

FORKD_HANDLER(handle_delete_remote)
{
    const Forkd__V1__DeleteRemoteRequest *r = (const Forkd__V1__DeleteRemoteRequest *)request;
    struct daemon_state *daemon = call->daemon;
    struct remote *remote = NULL;
    if (remotes_check(daemon, r->snapshot_name, true, &remote, status) != GRPC_STATUS_OK)
        return status->code;
    struct remote_delete_report report;
    struct forkd_error err = {0};
    if (remote_delete(remote, r->snapshot_name, &report, &err) < 0)
        return convert_error(status, &err);
    log_info("deleted remote snapshot %s: %llu chunks deleted, %llu kept (used elsewhere)",
             r->snapshot_name, (unsigned long long)report.chunks_deleted,
             (unsigned long long)report.chunks_kept);
    Forkd__V1__DeleteRemoteResponse response = FORKD__V1__DELETE_REMOTE_RESPONSE__INIT;
    response.chunks_deleted = report.chunks_deleted;
    response.chunks_kept = report.chunks_kept;
    if (call_set_response(call, &response.base) < 0)
        return rpc_status_set(status, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    return GRPC_STATUS_OK;
}
