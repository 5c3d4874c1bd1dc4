/* The guests: GET / of the test VMM, write-rate sampling, seed snapshots. */
#include "bench.h"

#include "basic/cleanup.h"
#include "basic/fsutil.h"
#include "vmm_client.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

static uint64_t json_u64(const cJSON *root, const char *name)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, name);
    return cJSON_IsNumber(item) ? (uint64_t)item->valuedouble : 0;
}

int guest_get_info(struct vmm_client *client, struct guest_info *out, struct forkd_error *err)
{
    _cleanup_free_ char *body = NULL;
    int rc = vmm_request(client, "GET", "/", NULL, &body, err);
    if (rc < 0)
        return rc;
    cJSON *root = cJSON_Parse(body);
    if (!root)
        return forkd_error_set(err, -EPROTO, "GET /: not JSON: %.80s", body);
    memset(out, 0, sizeof(*out));
    const cJSON *progress = cJSON_GetObjectItemCaseSensitive(root, "guest_progress");
    const cJSON *item;
    out->min_progress = UINT64_MAX;
    cJSON_ArrayForEach(item, progress)
    {
        uint64_t value = (uint64_t)item->valuedouble;
        out->progress += value;
        if (value < out->min_progress)
            out->min_progress = value;
    }
    if (out->min_progress == UINT64_MAX)
        out->min_progress = 0;
    out->last_pause_ns = json_u64(root, "last_pause_ns");
    out->last_resume_ns = json_u64(root, "last_resume_ns");
    out->last_snapshot_ns = json_u64(root, "last_snapshot_ns");
    out->region_count = (unsigned)cJSON_GetArraySize(cJSON_GetObjectItem(root, "regions"));
    const cJSON *state = cJSON_GetObjectItemCaseSensitive(root, "state");
    if (cJSON_IsString(state))
        snprintf(out->state, sizeof(out->state), "%s", state->valuestring);
    cJSON_Delete(root);
    return 0;
}

/* ---- the rate sampler ------------------------------------------------------------------- */

struct rate_sample {
    uint64_t at_ns, progress;
};

struct rate_sampler {
    struct vmm_client *client;
    unsigned interval_ms;
    pthread_t thread;
    atomic_bool stop;
    pthread_mutex_t request_lock; /* held while a request is in flight */
    bool quiet;                   /* guarded by request_lock */
    pthread_mutex_t samples_lock;
    struct rate_sample *samples;
    size_t count, capacity;
    double peak; /* the best settle window so far */
};

static void sampler_record(struct rate_sampler *sampler, uint64_t at_ns, uint64_t progress)
{
    pthread_mutex_lock(&sampler->samples_lock);
    if (sampler->count == sampler->capacity) {
        size_t capacity = sampler->capacity ? sampler->capacity * 2 : 1024;
        struct rate_sample *grown = realloc(sampler->samples, capacity * sizeof(*grown));
        if (grown) {
            sampler->samples = grown;
            sampler->capacity = capacity;
        }
    }
    if (sampler->count < sampler->capacity)
        sampler->samples[sampler->count++] = (struct rate_sample){at_ns, progress};
    pthread_mutex_unlock(&sampler->samples_lock);
}

static void *sampler_loop(void *arg)
{
    struct rate_sampler *sampler = arg;
    while (!atomic_load(&sampler->stop)) {
        pthread_mutex_lock(&sampler->request_lock);
        if (!sampler->quiet) {
            struct guest_info info;
            /* The answer reflects the guest's last report at the time the VMM read it: take
             * the time after the answer, which is when we know the value. */
            if (guest_get_info(sampler->client, &info, NULL) == 0)
                sampler_record(sampler, bench_now_ns(), info.progress);
        }
        pthread_mutex_unlock(&sampler->request_lock);
        bench_sleep_ms(sampler->interval_ms);
    }
    return NULL;
}

int rate_sampler_start(struct vm *vm, unsigned interval_ms, struct rate_sampler **out,
                       struct forkd_error *err)
{
    struct vm_status status;
    vm_get_status(vm, &status);
    struct rate_sampler *sampler = calloc(1, sizeof(*sampler));
    if (!sampler)
        return forkd_error_set(err, -ENOMEM, "rate sampler: out of memory");
    sampler->interval_ms = interval_ms;
    pthread_mutex_init(&sampler->request_lock, NULL);
    pthread_mutex_init(&sampler->samples_lock, NULL);
    int rc = vmm_client_open(status.api_socket_path, &sampler->client, err);
    if (rc == 0 && (rc = -pthread_create(&sampler->thread, NULL, sampler_loop, sampler)) < 0)
        forkd_error_errno(err, rc, "rate sampler thread");
    if (rc < 0) {
        vmm_client_close(sampler->client);
        free(sampler);
        return rc;
    }
    *out = sampler;
    return 0;
}

void rate_sampler_stop(struct rate_sampler *sampler)
{
    if (!sampler)
        return;
    atomic_store(&sampler->stop, true);
    pthread_join(sampler->thread, NULL);
    vmm_client_close(sampler->client);
    pthread_mutex_destroy(&sampler->request_lock);
    pthread_mutex_destroy(&sampler->samples_lock);
    free(sampler->samples);
    free(sampler);
}

void rate_sampler_quiet(struct rate_sampler *sampler, bool quiet)
{
    pthread_mutex_lock(&sampler->request_lock);
    sampler->quiet = quiet;
    pthread_mutex_unlock(&sampler->request_lock);
}

double rate_sampler_rate(struct rate_sampler *sampler, uint64_t from_ns, uint64_t to_ns)
{
    const struct rate_sample *first = NULL, *last = NULL;
    pthread_mutex_lock(&sampler->samples_lock);
    for (size_t i = 0; i < sampler->count; i++) {
        const struct rate_sample *sample = &sampler->samples[i];
        if (sample->at_ns < from_ns || sample->at_ns > to_ns)
            continue;
        if (!first)
            first = sample;
        last = sample;
    }
    double rate = first && last != first && last->at_ns > first->at_ns
                      ? (double)(last->progress - first->progress) * 1e9 /
                            (double)(last->at_ns - first->at_ns)
                      : -1;
    pthread_mutex_unlock(&sampler->samples_lock);
    return rate;
}

double rate_sampler_measure(struct rate_sampler *sampler, unsigned window_ms)
{
    uint64_t from = bench_now_ns();
    bench_sleep_ms(window_ms);
    return rate_sampler_rate(sampler, from, bench_now_ns());
}

double rate_sampler_settle(struct rate_sampler *sampler, unsigned window_ms, unsigned max_ms)
{
    uint64_t deadline = bench_now_ns() + (uint64_t)max_ms * 1000000ULL;
    double previous = -1, rate = -1;
    while (bench_now_ns() < deadline) {
        rate = rate_sampler_measure(sampler, window_ms);
        if (rate > sampler->peak)
            sampler->peak = rate;
        /* Steady, and not on a slow plateau of a guest still rebuilding its page tables. */
        if (previous > 0 && rate > 0 && fabs(rate - previous) <= 0.1 * previous &&
            rate >= 0.5 * sampler->peak)
            break;
        previous = rate;
    }
    return rate;
}

/* ---- seed snapshots --------------------------------------------------------------------- */

static int seed_spawn(const char *socket_path, const char *log_path, pid_t *pid,
                      struct forkd_error *err)
{
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, log_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    char *argv[] = {(char *)FORKD_TESTVM_PATH, (char *)"--api-sock", (char *)socket_path, NULL};
    int rc = posix_spawn(pid, FORKD_TESTVM_PATH, &actions, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&actions);
    if (rc != 0)
        return forkd_error_errno(err, -rc, "spawn %s", FORKD_TESTVM_PATH);
    for (int i = 0; i < 1000 && !fs_unix_socket_answers(socket_path); i++)
        bench_sleep_ms(10);
    return 0;
}

/* Boots, lets the guest run, pauses and writes a Full snapshot. */
static int seed_drive(struct vmm_client *client, const struct bench_options *options,
                      unsigned mem_mib, const char *boot_args, const char *dir, uint64_t *boot_ns,
                      struct forkd_error *err)
{
    vmm_client_set_timeout_ms(client, 600000); /* the VMM touches all memory at boot */
    uint64_t start = bench_now_ns();
    int rc = vmm_put_machine_config_backed(client, options->vcpus, mem_mib, NULL,
                                           options->huge_pages, err);
    if (rc == 0)
        rc = vmm_put_boot_source(client, FORKD_GUEST_PATH, boot_args, err);
    if (rc == 0)
        rc = vmm_start(client, err);
    if (rc < 0)
        return rc;
    *boot_ns = bench_now_ns() - start;
    struct guest_info info = {0};
    for (int i = 0; i < 500 && info.progress == 0; i++) {
        bench_sleep_ms(10);
        if ((rc = guest_get_info(client, &info, err)) < 0)
            return rc;
    }
    char vmstate[4200], memory[4200];
    store_file_path(dir, STORE_FILE_VMSTATE, vmstate, sizeof(vmstate));
    store_file_path(dir, STORE_FILE_MEMORY, memory, sizeof(memory));
    rc = vmm_pause(client, err);
    if (rc == 0)
        rc = vmm_snapshot_create(client, VMM_SNAPSHOT_FULL, vmstate, memory, err);
    return rc;
}

const char *const bench_workload_names[WORKLOAD_COUNT] = {"random", "hotset", "sequential"};

int guest_seed_snapshot(const struct bench_options *options, unsigned mem_mib,
                        enum bench_workload workload, const char *dir, uint64_t *boot_ns,
                        struct forkd_error *err)
{
    /* Flat out; reports often enough to see a stall of a few milliseconds. */
    char boot_args[128];
    snprintf(boot_args, sizeof(boot_args), "pattern=%s rate=0 report_us=%u",
             bench_workload_names[workload], options->report_us);
    char socket_path[4200], log_path[4200];
    snprintf(socket_path, sizeof(socket_path), "%s/seed.sock", dir);
    snprintf(log_path, sizeof(log_path), "%s/seed.log", dir);
    _cleanup_pid_ pid_t pid = 0;
    int rc = seed_spawn(socket_path, log_path, &pid, err);
    if (rc < 0)
        return rc;
    struct vmm_client *client = NULL;
    rc = vmm_client_open(socket_path, &client, err);
    if (rc == 0)
        rc = seed_drive(client, options, mem_mib, boot_args, dir, boot_ns, err);
    vmm_client_close(client);
    forkd_kill_reapp(&pid); /* before the socket goes: the VMM must not be left serving it */
    unlink(socket_path);
    if (rc < 0)
        forkd_error_prefix(err, "seed snapshot of %u MiB (log %s): ", mem_mib, log_path);
    return rc;
}

/* ---- scheduler accounting of the vCPU threads ------------------------------------------- */

void guest_read_run_delay(pid_t pid, struct run_delay *out)
{
    memset(out, 0, sizeof(*out));
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
    _cleanup_closedir_ DIR *dir = opendir(path);
    if (!dir)
        return;
    struct dirent *entry;
    while ((entry = readdir(dir)) && out->count < RUN_DELAY_THREADS) {
        pid_t tid = (pid_t)atoi(entry->d_name);
        if (tid <= 0 || tid == pid) /* the main thread serves the API; the others run vCPUs */
            continue;
        char file[96];
        snprintf(file, sizeof(file), "/proc/%d/task/%d/schedstat", (int)pid, (int)tid);
        _cleanup_fclose_ FILE *f = fopen(file, "re");
        unsigned long long run_ns, delay_ns;
        if (!f || fscanf(f, "%llu %llu", &run_ns, &delay_ns) != 2)
            continue;
        out->tid[out->count] = tid;
        out->delay_ns[out->count++] = delay_ns;
    }
}

uint64_t guest_run_delay_max(const struct run_delay *before, const struct run_delay *after)
{
    uint64_t max = 0;
    for (unsigned i = 0; i < after->count; i++)
        for (unsigned j = 0; j < before->count; j++)
            if (after->tid[i] == before->tid[j] && after->delay_ns[i] - before->delay_ns[j] > max)
                max = after->delay_ns[i] - before->delay_ns[j];
    return max;
}

int guest_set_vcpu_policy(const struct run_delay *threads, int policy)
{
    struct sched_param param = {.sched_priority = policy == SCHED_FIFO ? 1 : 0};
    int rc = 0;
    for (unsigned i = 0; i < threads->count; i++)
        if (sched_setscheduler(threads->tid[i], policy, &param) < 0)
            rc = -errno;
    return rc;
}
