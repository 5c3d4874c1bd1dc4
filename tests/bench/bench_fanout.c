/*
 * Fan-out: N forks of one snapshot started as the daemon's Spawn starts them (one restore after
 * the other), timed to "every fork's guest runs", then their memory read from the kernel's
 * accounting; for UFFD forks, the page server's own figures.
 */
#include "bench.h"

#include "basic/cleanup.h"
#include "vmm_client.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define RUNNING_TIMEOUT_MS 60000

struct fanout_run {
    struct bench_context *context;
    struct store_snapshot snapshot;
    char name_prefix[STORE_NAME_MAX + 1];
    char memory_path[PATH_MAX + 16];
    enum vm_memory memory;
    struct vm **vms;
    unsigned started;
};

static const char *backend_name(enum vm_memory memory)
{
    return memory == VM_MEMORY_FILE ? "FILE" : memory == VM_MEMORY_MEMFD ? "MEMFD" : "UFFD";
}

/* Pss, Pss_Shmem ... in KiB from a smaps or smaps_rollup style file; every mapping counts, or
 * with path only the mappings of that file. */
struct smaps_figures {
    uint64_t pss_kib, pss_shmem_kib;
};

static int read_smaps(const char *file, const char *path, struct smaps_figures *out)
{
    _cleanup_fclose_ FILE *f = fopen(file, "re");
    if (!f)
        return -errno;
    memset(out, 0, sizeof(*out));
    char line[PATH_MAX + 128];
    bool counting = path == NULL;
    while (fgets(line, sizeof(line), f)) {
        unsigned long long kib;
        char name[64];
        /* A field is "Name: N kB"; a header's first word holds no colon but its device does. */
        if (sscanf(line, "%63[^: ]: %llu kB", name, &kib) != 2) {
            /* A mapping's header line: address range, perms, offset, dev, inode, path. */
            if (path) {
                char *slash = strchr(line, '/');
                counting =
                    slash && strncmp(slash, path, strlen(path)) == 0 && slash[strlen(path)] == '\n';
            }
            continue;
        }
        if (!counting)
            continue;
        if (strcmp(name, "Pss") == 0)
            out->pss_kib += kib;
        else if (strcmp(name, "Pss_Shmem") == 0)
            out->pss_shmem_kib += kib;
    }
    return 0;
}

/* Every fork has run guest code: each of its vCPUs reported progress since the restore (the
 * test VMM's counters start at 0 in a restored VMM). */
static int wait_running(struct fanout_run *run, struct forkd_error *err)
{
    uint64_t deadline = bench_now_ns() + RUNNING_TIMEOUT_MS * 1000000ULL;
    for (unsigned i = 0; i < run->started; i++) {
        struct guest_info info = {0};
        while (info.min_progress == 0) {
            int rc = guest_get_info(vm_client(run->vms[i]), &info, err);
            if (rc < 0)
                return rc;
            if (info.min_progress)
                break;
            if (bench_now_ns() > deadline)
                return forkd_error_set(err, -ETIMEDOUT, "fork %s never ran", vm_id(run->vms[i]));
            bench_sleep_ms(1);
        }
    }
    return 0;
}

/* Memory of the forks now, as the kernel accounts it (see README: what is counted). */
static void measure_memory(struct fanout_run *run, struct fanout_result *out)
{
    uint64_t vmm_kib = 0, shmem_kib = 0, memfd_bytes = 0;
    for (unsigned i = 0; i < run->started; i++) {
        char file[64];
        snprintf(file, sizeof(file), "/proc/%d/smaps_rollup", (int)vm_pid(run->vms[i]));
        struct smaps_figures figures;
        if (read_smaps(file, NULL, &figures) == 0) {
            vmm_kib += figures.pss_kib;
            shmem_kib += figures.pss_shmem_kib;
        }
        _cleanup_close_ int memfd = vm_dup_memfd(run->vms[i]);
        struct stat st;
        if (memfd >= 0 && fstat(memfd, &st) == 0)
            memfd_bytes += (uint64_t)st.st_blocks * 512;
    }
    struct smaps_figures template = {0};
    if (run->memory == VM_MEMORY_UFFD)
        read_smaps("/proc/self/smaps", run->memory_path, &template);
    out->vmm_pss_mib = vmm_kib / 1024.0;
    out->vmm_shmem_mib = shmem_kib / 1024.0;
    out->memfd_mib = (double)memfd_bytes / (1 << 20);
    out->template_mib = template.pss_kib / 1024.0;
    double total_mib = out->vmm_pss_mib - out->vmm_shmem_mib + out->memfd_mib + out->template_mib;
    out->pss_mib_per_fork = total_mib / run->started;
}

static int page_server_figures(struct fanout_run *run, struct page_server_stats *out)
{
    struct page_server_template_info info;
    int rc = page_server_template_describe(run->context->page_server, run->snapshot.name, &info);
    if (rc == 0)
        *out = info.stats;
    return rc;
}

/* Serves for settle_ms with every fork running, then reads memory and page-server figures. */
static void measure_running(struct fanout_run *run, struct fanout_result *out)
{
    struct page_server_stats before = {0}, after = {0};
    bool served = run->memory == VM_MEMORY_UFFD && page_server_figures(run, &before) == 0;
    uint64_t from = bench_now_ns();
    bench_sleep_ms(run->context->options->settle_ms);
    served = served && page_server_figures(run, &after) == 0;
    uint64_t window = bench_now_ns() - from;
    measure_memory(run, out);
    if (!served)
        return;
    out->has_page_server = true;
    out->ps_faults = after.faults_served;
    out->ps_window_s = (double)window / 1e9;
    out->ps_faults_per_s = (double)(after.faults_served - before.faults_served) * 1e9 / window;
    out->ps_p50_us = after.service_p50_ns / 1e3;
    out->ps_p99_us = after.service_p99_ns / 1e3;
    out->ps_max_us = after.service_max_ns / 1e3;
}

/* Stops the forks (each gives back its use of the snapshot) and forgets the page server's
 * template, so the next run maps memory.bin afresh. */
static void stop_forks(struct fanout_run *run)
{
    for (unsigned i = 0; i < run->started; i++)
        vm_stop(run->context->registry, run->vms[i], 500, NULL);
    vm_list_free(run->vms, run->started);
    if (run->memory == VM_MEMORY_UFFD)
        page_server_template_forget(run->context->page_server, run->snapshot.name);
}

/* The daemon's Spawn, through the engine. --spawn-paused restores every fork paused and
 * resumes them all at the end (as the daemon does); otherwise each fork runs as restored, so
 * the started ones compete with the next restore. */
static int spawn_forks(struct fanout_run *run, unsigned forks, struct forkd_error *err)
{
    struct engine_spawn_request request = {
        .snapshot = run->snapshot.name,
        .count = forks,
        .memory = run->memory,
        .name_prefix = run->name_prefix,
        .run_as_restored = !run->context->options->spawn_paused,
    };
    int rc = engine_spawn(run->context->engine, &request, &run->vms, err);
    if (rc == 0)
        run->started = forks;
    return rc;
}

int bench_fanout(struct bench_context *context, const char *snapshot, unsigned forks,
                 enum vm_memory memory, struct fanout_result *out, struct forkd_error *err)
{
    memset(out, 0, sizeof(*out));
    out->backend = backend_name(memory);
    out->forks = forks;
    struct fanout_run run = {.context = context, .memory = memory};
    int rc = store_get(context->store, snapshot, &run.snapshot, err);
    if (rc < 0)
        return rc;
    store_file_path(run.snapshot.path, STORE_FILE_MEMORY, run.memory_path, sizeof(run.memory_path));
    snprintf(run.name_prefix, sizeof(run.name_prefix), "fork-%s-%u-%u", out->backend, forks,
             context->snapshot_seq++);
    uint64_t start = bench_now_ns();
    rc = spawn_forks(&run, forks, err);
    out->spawn_ms = (double)(bench_now_ns() - start) / 1e6;
    if (rc == 0)
        rc = wait_running(&run, err);
    out->running_ms = (double)(bench_now_ns() - start) / 1e6;
    if (rc == 0)
        measure_running(&run, out);
    stop_forks(&run);
    if (rc < 0) {
        out->error = rc;
        snprintf(out->message, sizeof(out->message), "%s", err->message);
    }
    return rc;
}
