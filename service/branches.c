/*
 * Branch and WatchBranch (see branches.h).
 *
 * Threads: a job's worker thread runs the engine branch and appends phase events; any number of
 * call threads follow a job (the Branch call that started it, WatchBranch calls). job->lock
 * guards a job's events and outcome; table->lock guards the job list and the running count.
 * Neither is held across a send to a client, so a slow reader holds up nobody but itself.
 */
#include "branches.h"

#include "convert.h"
#include "daemon.h"
#include "handlers.h"
#include "log.h"

#include "forkd/branch.h"
#include "basic/cleanup.h"
#include "basic/clock.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define JOB_EVENTS_MAX      16 /* at most one event per phase */
#define FINISHED_JOBS_KEPT  64
#define PROGRESS_DEFAULT_MS 100
#define PROGRESS_MIN_MS     10
#define PROGRESS_MAX_MS     60000
#define FOLLOW_WAKE_MS      50 /* how often a follower looks for its client's cancel */

struct job_event {
    enum branch_phase phase;
    struct branch_progress progress;
    int64_t time_unix_ms;
};

struct branch_job {
    atomic_int refs;
    char id[32];
    char vm_id[VM_ID_MAX];
    char snapshot_name[STORE_NAME_MAX + 1];
    bool detach;
    bool allow_disk_copy; /* BranchRequest.allow_disk_copy_in_pause */
    struct daemon_state *daemon;
    struct vm *vm;
    struct branch *engine;
    enum store_mode mode;
    size_t label_count;
    struct store_label labels[STORE_MAX_LABELS];
    pthread_t worker;

    pthread_mutex_t lock; /* guards the fields below */
    pthread_cond_t changed;
    struct job_event events[JOB_EVENTS_MAX];
    size_t event_count;
    bool finished;
    grpc_status_code final_code;
    char final_message[FORKD_ERROR_MESSAGE_MAX];
    struct store_snapshot snapshot; /* when DONE */
};

struct branch_table {
    pthread_mutex_t lock; /* guards the fields below */
    pthread_cond_t idle;
    struct branch_job *jobs[FINISHED_JOBS_KEPT * 2];
    size_t count;
    unsigned running, max_running;
    struct serial *ids; /* branch ids, never reused on this state directory */
};

/* ---- jobs and the table ----------------------------------------------------------------- */

static void branches_job_unref(struct branch_job *job)
{
    if (!job || atomic_fetch_sub(&job->refs, 1) != 1)
        return;
    branch_free(job->engine);
    vm_unref(job->vm);
    pthread_mutex_destroy(&job->lock);
    pthread_cond_destroy(&job->changed);
    free(job);
}

struct branch_table *branches_table_new(unsigned max_running, struct serial *ids)
{
    struct branch_table *table = calloc(1, sizeof(*table));
    if (!table)
        return NULL;
    pthread_mutex_init(&table->lock, NULL);
    pthread_cond_init(&table->idle, NULL);
    table->max_running = max_running;
    table->ids = ids;
    return table;
}

void branches_table_free(struct branch_table *table)
{
    if (!table)
        return;
    branches_wait_idle(table, -1);
    for (size_t i = 0; i < table->count; i++)
        branches_job_unref(table->jobs[i]);
    serial_close(table->ids);
    pthread_mutex_destroy(&table->lock);
    pthread_cond_destroy(&table->idle);
    free(table);
}

void branches_cancel_all(struct branch_table *table)
{
    pthread_mutex_lock(&table->lock);
    for (size_t i = 0; i < table->count; i++)
        branch_cancel(table->jobs[i]->engine);
    pthread_mutex_unlock(&table->lock);
}

bool branches_wait_idle(struct branch_table *table, int timeout_ms)
{
    struct timespec deadline = forkd_realtime_after_ms(timeout_ms);
    pthread_mutex_lock(&table->lock);
    while (table->running > 0) {
        if (timeout_ms < 0)
            pthread_cond_wait(&table->idle, &table->lock);
        else if (pthread_cond_timedwait(&table->idle, &table->lock, &deadline) == ETIMEDOUT)
            break;
    }
    bool idle = table->running == 0;
    pthread_mutex_unlock(&table->lock);
    return idle;
}

/* Names a job "br-<n>", n never used before on this state directory. */
static int branches_new_id(struct branch_table *table, struct branch_job *job,
                           struct forkd_error *err)
{
    unsigned long id;
    int rc = serial_next(table->ids, &id, err);
    if (rc == 0)
        snprintf(job->id, sizeof(job->id), "br-%lu", id);
    return rc;
}

/* Drops the oldest finished job when the list is full; the caller holds table->lock. */
static void branches_make_room(struct branch_table *table)
{
    if (table->count < sizeof(table->jobs) / sizeof(table->jobs[0]))
        return;
    for (size_t i = 0; i < table->count; i++) {
        struct branch_job *job = table->jobs[i];
        pthread_mutex_lock(&job->lock);
        bool finished = job->finished;
        pthread_mutex_unlock(&job->lock);
        if (!finished)
            continue;
        memmove(&table->jobs[i], &table->jobs[i + 1], (table->count - i - 1) * sizeof(job));
        table->count--;
        branches_job_unref(job);
        return;
    }
}

/* Lists a job as running, unless the limit is reached. */
static grpc_status_code branches_add(struct branch_table *table, struct branch_job *job,
                                     struct rpc_status *status)
{
    pthread_mutex_lock(&table->lock);
    grpc_status_code code = GRPC_STATUS_OK;
    branches_make_room(table);
    if (table->running >= table->max_running)
        code = rpc_status_set(status, GRPC_STATUS_RESOURCE_EXHAUSTED,
                              "%u branches are running, the limit (--max-branches); retry later",
                              table->running);
    else if (table->count == sizeof(table->jobs) / sizeof(table->jobs[0]))
        code = rpc_status_set(status, GRPC_STATUS_RESOURCE_EXHAUSTED, "too many branches");
    struct forkd_error err = {0};
    if (code == GRPC_STATUS_OK && branches_new_id(table, job, &err) < 0)
        code = rpc_status_set(status, GRPC_STATUS_INTERNAL, "branch id: %s", err.message);
    if (code == GRPC_STATUS_OK) {
        table->jobs[table->count++] = job;
        atomic_fetch_add(&job->refs, 1);
        table->running++;
    }
    pthread_mutex_unlock(&table->lock);
    return code;
}

static void branches_job_ended(struct branch_table *table)
{
    pthread_mutex_lock(&table->lock);
    if (--table->running == 0)
        pthread_cond_broadcast(&table->idle);
    pthread_mutex_unlock(&table->lock);
}

/* A job by branch id, or the latest one writing or having written a snapshot name. */
static struct branch_job *branches_find(struct branch_table *table, const char *id,
                                        const char *snapshot_name)
{
    struct branch_job *found = NULL;
    pthread_mutex_lock(&table->lock);
    for (size_t i = table->count; i-- > 0 && !found;) {
        struct branch_job *job = table->jobs[i];
        if ((*id && strcmp(job->id, id) == 0) ||
            (*snapshot_name && strcmp(job->snapshot_name, snapshot_name) == 0))
            found = job;
    }
    if (found)
        atomic_fetch_add(&found->refs, 1);
    pthread_mutex_unlock(&table->lock);
    return found;
}

void branches_record_interrupted(struct branch_table *table, const char *snapshot_name,
                                 const char *vm_id)
{
    struct branch_job *job = calloc(1, sizeof(*job));
    if (!job)
        return;
    atomic_init(&job->refs, 1);
    pthread_mutex_init(&job->lock, NULL);
    pthread_cond_init(&job->changed, NULL);
    snprintf(job->snapshot_name, sizeof(job->snapshot_name), "%s", snapshot_name);
    snprintf(job->vm_id, sizeof(job->vm_id), "%s", vm_id);
    job->finished = true;
    job->final_code = GRPC_STATUS_ABORTED;
    snprintf(job->final_message, sizeof(job->final_message),
             "forkd restarted while the branch ran; %s runs on, unprotected", vm_id);
    job->events[job->event_count++] =
        (struct job_event){.phase = BRANCH_PHASE_FAILED, .time_unix_ms = forkd_unix_ms()};
    pthread_mutex_lock(&table->lock);
    branches_make_room(table);
    struct forkd_error err = {0};
    if (table->count < sizeof(table->jobs) / sizeof(table->jobs[0]) &&
        branches_new_id(table, job, &err) == 0)
        table->jobs[table->count++] = take_ptr(job);
    pthread_mutex_unlock(&table->lock);
    if (err.code)
        log_warn("the cut branch to %s is not listed for WatchBranch: %s", snapshot_name,
                 err.message);
    branches_job_unref(job);
}

/* ---- the worker ------------------------------------------------------------------------- */

/* Engine callback on the worker thread: record the phase; never blocks on a client. */
static void branches_on_phase(void *context, enum branch_phase phase,
                              const struct branch_progress *progress)
{
    struct branch_job *job = context;
    if (phase == BRANCH_PHASE_DONE || phase == BRANCH_PHASE_FAILED ||
        phase == BRANCH_PHASE_CANCELLED)
        return; /* branches_worker records the end together with its outcome */
    pthread_mutex_lock(&job->lock);
    if (job->event_count < JOB_EVENTS_MAX) {
        job->events[job->event_count++] = (struct job_event){
            .phase = phase, .progress = *progress, .time_unix_ms = forkd_unix_ms()};
    }
    pthread_cond_broadcast(&job->changed);
    pthread_mutex_unlock(&job->lock);
}

static void *branches_worker(void *arg)
{
    struct branch_job *job = arg;
    struct branch_request request = {
        .vm = job->vm,
        .snapshot_name = job->snapshot_name,
        .mode = job->mode,
        .labels = job->labels,
        .label_count = job->label_count,
        .on_phase = branches_on_phase,
        .context = job,
        .allow_disk_copy = job->allow_disk_copy,
    };
    struct store_snapshot snapshot;
    struct forkd_error err = {0};
    int rc = branch_run(job->engine, engine_store(job->daemon->engine), &request, &snapshot, &err);
    if (rc == 0)
        log_info("%s: snapshot %s of %s READY, pause %.3f ms", job->id, job->snapshot_name,
                 job->vm_id, (double)snapshot.figures.pause_ns / 1e6);
    else
        log_warn("%s: %s", job->id, err.message);
    struct job_event end = {.time_unix_ms = forkd_unix_ms()};
    branch_get_progress(job->engine, &end.progress);
    end.phase = end.progress.phase;
    pthread_mutex_lock(&job->lock);
    job->finished = true;
    job->final_code = convert_status_code(rc);
    snprintf(job->final_message, sizeof(job->final_message), "%s", rc < 0 ? err.message : "");
    if (rc == 0)
        job->snapshot = snapshot;
    /* The outcome is in place before the last event is visible: followers read it unlocked. */
    if (job->event_count < JOB_EVENTS_MAX)
        job->events[job->event_count++] = end;
    pthread_cond_broadcast(&job->changed);
    pthread_mutex_unlock(&job->lock);
    branches_job_ended(job->daemon->branches);
    branches_job_unref(job);
    return NULL;
}

/* ---- following a job -------------------------------------------------------------------- */

struct event_message {
    Forkd__V1__BranchEvent event;
    Forkd__V1__BranchFigures figures;
    Forkd__V1__BranchProgress progress;
    struct snapshot_message snapshot;
};

static void branches_build_event(const struct branch_job *job, const struct job_event *event,
                                 const char *error_message, struct event_message *out)
{
    Forkd__V1__BranchEvent *e = &out->event;
    *e = (Forkd__V1__BranchEvent)FORKD__V1__BRANCH_EVENT__INIT;
    e->branch_id = (char *)job->id;
    e->phase = (Forkd__V1__BranchPhase)event->phase;
    e->vm_id = (char *)job->vm_id;
    e->snapshot_name = (char *)job->snapshot_name;
    e->time_unix_ms = event->time_unix_ms;
    convert_figures(&event->progress.figures, &out->figures);
    e->figures = &out->figures;
    convert_progress(&event->progress, &out->progress);
    e->progress = &out->progress;
    if (event->phase == BRANCH_PHASE_DONE) {
        convert_snapshot(&job->snapshot, &out->snapshot);
        e->snapshot = &out->snapshot.snapshot;
        e->figures = &out->snapshot.figures; /* final, with the publish time */
    }
    if (event->phase == BRANCH_PHASE_FAILED || event->phase == BRANCH_PHASE_CANCELLED)
        e->error_message = (char *)error_message;
}

struct follow_state {
    size_t sent;               /* phase events sent */
    uint64_t last_progress_ns; /* when the last COPYING progress event went out */
    uint64_t interval_ns;
};

/* Takes a copy of what is new under the lock, so nothing is sent while holding it. */
static size_t branches_take_new(struct branch_job *job, struct follow_state *state,
                                struct job_event *out, bool *finished, bool *copying)
{
    uint64_t wait_ms = state->interval_ns / 1000000 < FOLLOW_WAKE_MS ? state->interval_ns / 1000000
                                                                     : FOLLOW_WAKE_MS;
    pthread_mutex_lock(&job->lock);
    if (state->sent == job->event_count && !job->finished) {
        struct timespec deadline = forkd_realtime_after_ms((int64_t)wait_ms);
        pthread_cond_timedwait(&job->changed, &job->lock, &deadline);
    }
    size_t count = job->event_count - state->sent;
    memcpy(out, &job->events[state->sent], count * sizeof(*out));
    *finished = job->finished;
    *copying =
        job->event_count > 0 && job->events[job->event_count - 1].phase == BRANCH_PHASE_COPYING;
    pthread_mutex_unlock(&job->lock);
    return count;
}

static int branches_send(struct rpc_call *call, const struct branch_job *job,
                         const struct job_event *event)
{
    struct event_message *message = malloc(sizeof(*message));
    if (!message)
        return -ENOMEM;
    branches_build_event(job, event, job->final_message, message);
    int rc = call_send_message(call, &message->event.base);
    free(message);
    return rc;
}

/* A coalesced COPYING event with the progress as of now. */
static int branches_send_progress(struct rpc_call *call, struct branch_job *job)
{
    struct job_event event = {.phase = BRANCH_PHASE_COPYING, .time_unix_ms = forkd_unix_ms()};
    branch_get_progress(job->engine, &event.progress);
    if (event.progress.phase != BRANCH_PHASE_COPYING)
        return 0;
    return branches_send(call, job, &event);
}

/* Streams a job's events to a call until the job ends (its status becomes the call's) or the
 * client leaves (-ECANCELED). */
static int branches_follow(struct rpc_call *call, struct branch_job *job, unsigned interval_ms,
                           struct rpc_status *status)
{
    struct follow_state state = {.interval_ns = (uint64_t)interval_ms * 1000000};
    for (;;) {
        struct job_event fresh[JOB_EVENTS_MAX];
        bool finished, copying;
        size_t count = branches_take_new(job, &state, fresh, &finished, &copying);
        for (size_t i = 0; i < count; i++) {
            if (branches_send(call, job, &fresh[i]) < 0)
                return -ECANCELED;
            state.sent++;
            if (fresh[i].phase == BRANCH_PHASE_COPYING)
                state.last_progress_ns = forkd_monotonic_ns();
        }
        if (finished && count == 0) {
            pthread_mutex_lock(&job->lock);
            rpc_status_set(status, job->final_code, "%s", job->final_message);
            pthread_mutex_unlock(&job->lock);
            return 0;
        }
        if (call_is_cancelled(call))
            return -ECANCELED;
        if (copying && !finished &&
            forkd_monotonic_ns() - state.last_progress_ns >= state.interval_ns) {
            if (branches_send_progress(call, job) < 0)
                return -ECANCELED;
            state.last_progress_ns = forkd_monotonic_ns();
        }
    }
}

/* ---- the RPCs --------------------------------------------------------------------------- */

static unsigned branches_interval(uint32_t requested)
{
    if (requested == 0)
        return PROGRESS_DEFAULT_MS;
    return requested < PROGRESS_MIN_MS   ? PROGRESS_MIN_MS
           : requested > PROGRESS_MAX_MS ? PROGRESS_MAX_MS
                                         : requested;
}

/* Labels are stored as given: refuse what the store could not hold, before any work. */
static grpc_status_code branches_check_labels(const Forkd__V1__BranchRequest *request,
                                              struct rpc_status *status)
{
    if (request->n_labels > STORE_MAX_LABELS)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT, "at most %d labels",
                              STORE_MAX_LABELS);
    for (size_t i = 0; i < request->n_labels; i++) {
        const Forkd__V1__BranchRequest__LabelsEntry *label = request->labels[i];
        if (!*label->key || strlen(label->key) >= sizeof(((struct store_label *)0)->key) ||
            strlen(label->value) >= sizeof(((struct store_label *)0)->value))
            return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                                  "label '%.64s': keys are 1..63 bytes, values at most 255",
                                  label->key);
    }
    return GRPC_STATUS_OK;
}

static grpc_status_code branches_check(struct daemon_state *daemon,
                                       const Forkd__V1__BranchRequest *request,
                                       enum store_mode *mode, struct rpc_status *status)
{
    struct forkd_error err = {0};
    if (!*request->vm_id)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT, "vm_id is required");
    if (store_validate_name(request->snapshot_name, &err) < 0)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT, "snapshot_name: %s",
                              err.message);
    switch (request->mode) {
    case FORKD__V1__BRANCH_MODE__BRANCH_MODE_UNSPECIFIED:
    case FORKD__V1__BRANCH_MODE__BRANCH_MODE_LIVE:
        *mode = STORE_MODE_LIVE;
        break;
    case FORKD__V1__BRANCH_MODE__BRANCH_MODE_LIVE_ARM_IN_PAUSE:
        *mode = STORE_MODE_LIVE_ARM_IN_PAUSE;
        break;
    case FORKD__V1__BRANCH_MODE__BRANCH_MODE_FULL:
        *mode = STORE_MODE_FULL;
        break;
    default:
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                              "mode %d is not a BranchMode; Branch takes LIVE, "
                              "LIVE_ARM_IN_PAUSE or FULL",
                              (int)request->mode);
    }
    if (branches_check_labels(request, status) != GRPC_STATUS_OK)
        return status->code;
    if (atomic_load(&daemon->shutting_down))
        return rpc_status_set(status, GRPC_STATUS_UNAVAILABLE, "forkd is shutting down");
    struct store_snapshot existing;
    if (store_get(engine_store(daemon->engine), request->snapshot_name, &existing, NULL) == 0)
        return rpc_status_set(status, GRPC_STATUS_ALREADY_EXISTS, "snapshot '%s' already exists",
                              request->snapshot_name);
    return GRPC_STATUS_OK;
}

/* Builds the job for a checked request; the VM reference moves into it. */
static struct branch_job *branches_new_job(struct daemon_state *daemon, struct vm *vm,
                                           const Forkd__V1__BranchRequest *request,
                                           enum store_mode mode)
{
    struct branch_job *job = calloc(1, sizeof(*job));
    if (!job || !(job->engine = branch_new())) {
        free(job);
        return NULL;
    }
    atomic_init(&job->refs, 1);
    pthread_mutex_init(&job->lock, NULL);
    pthread_cond_init(&job->changed, NULL);
    job->daemon = daemon;
    job->vm = vm;
    job->mode = mode;
    job->detach = request->detach;
    job->allow_disk_copy = request->allow_disk_copy_in_pause;
    snprintf(job->vm_id, sizeof(job->vm_id), "%s", vm_id(vm));
    snprintf(job->snapshot_name, sizeof(job->snapshot_name), "%s", request->snapshot_name);
    job->label_count = request->n_labels;
    for (size_t i = 0; i < request->n_labels; i++) {
        snprintf(job->labels[i].key, sizeof(job->labels[i].key), "%s", request->labels[i]->key);
        snprintf(job->labels[i].value, sizeof(job->labels[i].value), "%s",
                 request->labels[i]->value);
    }
    return job;
}

static grpc_status_code branches_start(struct daemon_state *daemon, struct branch_job *job,
                                       struct rpc_status *status)
{
    if (branches_add(daemon->branches, job, status) != GRPC_STATUS_OK)
        return status->code;
    atomic_fetch_add(&job->refs, 1); /* the worker's */
    pthread_attr_t attributes;
    pthread_attr_init(&attributes);
    pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&job->worker, &attributes, branches_worker, job);
    pthread_attr_destroy(&attributes);
    if (rc != 0) {
        /* Never started: finish the job as failed so followers and the table see its end. */
        pthread_mutex_lock(&job->lock);
        job->finished = true;
        job->final_code = GRPC_STATUS_RESOURCE_EXHAUSTED;
        pthread_mutex_unlock(&job->lock);
        branches_job_ended(daemon->branches);
        branches_job_unref(job);
        return rpc_status_set(status, GRPC_STATUS_RESOURCE_EXHAUSTED,
                              "cannot start a branch thread: %s", strerror(rc));
    }
    return GRPC_STATUS_OK;
}

/* A VM that cannot be branched now: one branch at a time, and only while its VMM is up. */
static grpc_status_code branches_refuse_vm(const struct vm_status *vm, struct rpc_status *status)
{
    if (vm->active_branch_id[0])
        return rpc_status_set(status, GRPC_STATUS_FAILED_PRECONDITION,
                              "VM %s already has a branch running (%s)", vm->id,
                              vm->active_branch_id);
    /* The VMM is gone but the reaper has not recorded it yet. */
    if (vm->state == VM_STATE_RUNNING || vm->state == VM_STATE_PAUSED)
        return rpc_status_set(status, GRPC_STATUS_FAILED_PRECONDITION,
                              "VM %s is not running: its VMM has exited", vm->id);
    return rpc_status_set(status, GRPC_STATUS_FAILED_PRECONDITION,
                          "VM %s is %s: a branch needs it RUNNING or PAUSED", vm->id,
                          vm_state_name(vm->state));
}

/* Waits for a job's outcome and makes it the call's status. */
static void branches_wait_outcome(struct branch_job *job, struct rpc_status *status,
                                  const char *prefix)
{
    pthread_mutex_lock(&job->lock);
    while (!job->finished)
        pthread_cond_wait(&job->changed, &job->lock);
    if (job->final_code == GRPC_STATUS_OK)
        rpc_status_set(status, GRPC_STATUS_OK, "%ssnapshot %s is READY", prefix,
                       job->snapshot_name);
    else
        rpc_status_set(status, job->final_code, "%s%s", prefix, job->final_message);
    pthread_mutex_unlock(&job->lock);
}

/* The client of a Branch call left. A detached branch goes on. Otherwise the branch is
 * cancelled, unless it passed its point of no return (publishing): then it is not reported as
 * CANCELLED while its snapshot is published, but with its real outcome, and logged. */
static void branches_client_left(struct branch_job *job, struct rpc_status *status)
{
    if (job->detach) {
        rpc_status_set(status, GRPC_STATUS_CANCELLED,
                       "the client left the branch stream; the branch goes on (detached)");
        return;
    }
    if (branch_cancel(job->engine)) { /* the engine resumes, unprotects and cleans up */
        rpc_status_set(status, GRPC_STATUS_CANCELLED,
                       "the client left the branch stream: branch cancelled");
        return;
    }
    log_warn("%s: the client left after the branch's point of no return (publishing); "
             "the cancel is refused and the branch completes",
             job->id);
    branches_wait_outcome(job, status,
                          "the branch could no longer be cancelled (it was publishing): ");
}

grpc_status_code handle_branch(struct rpc_call *call, const ProtobufCMessage *message,
                               struct rpc_status *status)
{
    const Forkd__V1__BranchRequest *request = (const Forkd__V1__BranchRequest *)message;
    struct daemon_state *daemon = call->daemon;
    enum store_mode mode = STORE_MODE_LIVE;
    if (branches_check(daemon, request, &mode, status) != GRPC_STATUS_OK)
        return status->code;
    struct vm *vm = vm_lookup(engine_registry(daemon->engine), request->vm_id);
    if (!vm)
        return rpc_status_set(status, GRPC_STATUS_NOT_FOUND, "no VM '%s'", request->vm_id);
    struct vm_status vm_now;
    vm_get_status(vm, &vm_now);
    if (vm_now.active_branch_id[0] || !vm_is_alive(vm)) {
        vm_unref(vm);
        return branches_refuse_vm(&vm_now, status);
    }
    /* A client that left before its branch began gets nothing begun. (It may still leave just
     * after this check: then the branch starts and the follower cancels it.) */
    if (call_is_cancelled(call)) {
        vm_unref(vm);
        return rpc_status_set(status, GRPC_STATUS_CANCELLED,
                              "the client left before the branch began: nothing was done");
    }
    struct branch_job *job = branches_new_job(daemon, vm, request, mode);
    if (!job) {
        vm_unref(vm);
        return rpc_status_set(status, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    }
    if (branches_start(daemon, job, status) != GRPC_STATUS_OK) {
        branches_job_unref(job);
        return status->code;
    }
    /* The store's modes have the proto's values. */
    log_info("%s: %s branch of %s into snapshot %s%s", job->id,
             convert_enum_name(&forkd__v1__branch_mode__descriptor, (int)mode), job->vm_id,
             job->snapshot_name, job->detach ? " (detached)" : "");
    if (branches_follow(call, job, branches_interval(request->progress_interval_ms), status) < 0)
        branches_client_left(job, status);
    branches_job_unref(job);
    return status->code;
}

grpc_status_code handle_watch_branch(struct rpc_call *call, const ProtobufCMessage *message,
                                     struct rpc_status *status)
{
    const Forkd__V1__WatchBranchRequest *request = (const Forkd__V1__WatchBranchRequest *)message;
    struct daemon_state *daemon = call->daemon;
    const char *id = request->target_case == FORKD__V1__WATCH_BRANCH_REQUEST__TARGET_BRANCH_ID
                         ? request->branch_id
                         : "";
    const char *name = request->target_case == FORKD__V1__WATCH_BRANCH_REQUEST__TARGET_SNAPSHOT_NAME
                           ? request->snapshot_name
                           : "";
    if (!*id && !*name)
        return rpc_status_set(status, GRPC_STATUS_INVALID_ARGUMENT,
                              "give a branch_id or a snapshot_name");
    struct branch_job *job = branches_find(daemon->branches, id, name);
    if (!job)
        return rpc_status_set(status, GRPC_STATUS_NOT_FOUND, "no branch %s '%s'",
                              *id ? "with id" : "writing snapshot", *id ? id : name);
    if (branches_follow(call, job, branches_interval(request->progress_interval_ms), status) < 0)
        rpc_status_set(status, GRPC_STATUS_CANCELLED, "the watcher left; the branch goes on");
    branches_job_unref(job);
    return status->code;
}
