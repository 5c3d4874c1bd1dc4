/*
 * forkd-bench: measures what a guest notices of a live branch (pause window, guest write rate,
 * fault service time), how fast memory.bin is written, and what forks cost, each against a
 * baseline measured in the same run (see tests/bench/README.md).
 */
#ifndef FORKD_BENCH_H
#define FORKD_BENCH_H

#include "forkd/engine.h"
#include "basic/error.h"
#include "forkd/page_server.h"
#include "forkd/store.h"
#include "forkd/vm.h"

#include <cjson/cJSON.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BENCH_MAX_REPS     16
#define BENCH_MAX_SIZES    4
#define BENCH_MAX_FANOUT   4
#define BENCH_VCPUS        2
#define BENCH_MAX_VCPUS    4
#define BENCH_MAX_VARIANTS 7

/* The guest's write pattern (boot_args pattern=): random over all memory (the worst case for
 * a live branch), a hot set (9 in 10 writes to a tenth of memory), sequential sweeps. */
enum bench_workload { WORKLOAD_RANDOM, WORKLOAD_HOTSET, WORKLOAD_SEQUENTIAL, WORKLOAD_COUNT };
extern const char *const bench_workload_names[WORKLOAD_COUNT];

/* A LIVE branch with some of the engine's copy-phase levers left out (branch_request.levers_off).
 */
struct live_variant {
    char name[32];
    unsigned levers_off;
};

/* ---- options ---------------------------------------------------------------------------- */

struct bench_options {
    bool quick;
    bool no_realtime;       /* every engine thread at normal priority */
    unsigned timeout_scale; /* engine VMM time limits multiplied by this */
    size_t size_count;
    unsigned sizes_mib[BENCH_MAX_SIZES];
    unsigned reps;       /* per size and mode */
    unsigned reps_large; /* for guests of 1 GiB and more */
    bool reps_large_set; /* --reps-large given: --reps leaves it alone */
    uint32_t seed;       /* of the order of the rows in each repetition */
    size_t fanout_count;
    unsigned fanout[BENCH_MAX_FANOUT];
    unsigned null_ms;   /* how long the null handler serves faults */
    unsigned rate_ms;   /* window of the guest's undisturbed write rate */
    unsigned settle_ms; /* forks run this long before their memory is read */
    bool copier_fifo;   /* diagnosis: the bulk copier (branch thread) at SCHED_FIFO */
    bool boost_vcpus;   /* diagnosis: vCPU threads at SCHED_FIFO while a LIVE pause is requested */
    bool null_sweep;    /* diagnosis: the null handler with a copier-like unprotect sweep */
    bool spawn_paused;  /* diagnosis: restore every fork paused, resume them all at the end */
    bool skip_branch, skip_fanout;
    size_t workload_count;
    unsigned workloads[WORKLOAD_COUNT];
    size_t variant_count; /* LIVE branches per repetition; the first gives the LIVE figures */
    struct live_variant variants[BENCH_MAX_VARIANTS];
    unsigned report_us; /* the guest's progress report interval */
    unsigned vcpus;     /* of the source VMs */
    unsigned tail_ms;   /* the guest's cost is counted this long after a branch ends */
    bool huge_pages;    /* source VMs on 2 MiB hugetlbfs pages (no fan-out then) */
    const char *json_path;
    const char *state_dir; /* NULL: a fresh directory under /var/tmp */
    const char *seed_dir;  /* where seed snapshots are written (tmpfs) */
};

/* ---- statistics ------------------------------------------------------------------------- */

/* Repeated measurements of one figure. */
struct series {
    unsigned count;
    double values[BENCH_MAX_REPS];
};

void series_add(struct series *series, double value);
double series_median(const struct series *series);
double series_min(const struct series *series);
double series_max(const struct series *series);
/* {"median","min","max","n","values"} or null when empty. */
cJSON *series_json(const struct series *series);

/* Exact percentile (0..100) of a sorted array. */
uint64_t bench_percentile(const uint64_t *sorted, size_t count, double percentile);

uint64_t bench_now_ns(void);
void bench_sleep_ms(unsigned ms);

/* A seeded pseudo-random stream (splitmix64): the same seed gives the same orders. */
uint64_t bench_random_next(uint64_t *state);
/* Fisher-Yates shuffle of items[0..count). */
void bench_shuffle(uint64_t *state, unsigned *items, unsigned count);

/* ---- guests ----------------------------------------------------------------------------- */

/* What GET / of the test VMM says, beyond vmm_get_info. */
struct guest_info {
    uint64_t progress;     /* guest_progress summed over the vCPUs */
    uint64_t min_progress; /* of the least advanced vCPU: 0 until every vCPU reported */
    uint64_t last_pause_ns, last_resume_ns, last_snapshot_ns;
    unsigned region_count;
    char state[32];
};

int guest_get_info(struct vmm_client *client, struct guest_info *out, struct forkd_error *err);

/* Polls GET / of one VM on its own connection (so it never queues behind the branch's calls)
 * and keeps (time, progress) samples, from which write rates over any window are read. */
struct rate_sampler;

int rate_sampler_start(struct vm *vm, unsigned interval_ms, struct rate_sampler **out,
                       struct forkd_error *err);
void rate_sampler_stop(struct rate_sampler *sampler);
/* Quiet: no request is in flight from the return of this call until it is called with false.
 * Used around pause windows so the sampler cannot delay the VMM's API thread. */
void rate_sampler_quiet(struct rate_sampler *sampler, bool quiet);
/* Guest writes per second between the first and the last sample inside [from, to]; -1 when
 * fewer than two samples fall there. */
double rate_sampler_rate(struct rate_sampler *sampler, uint64_t from_ns, uint64_t to_ns);
/* Waits until the write rate over consecutive windows of window_ms is steady (two in a row
 * within 10%, and at least half the best window seen on this VM) or max_ms passes: after a boot, a
 * restore or a branch, a nested guest runs slow until its shadow page tables are rebuilt. Returns
 * the last window's rate. */
double rate_sampler_settle(struct rate_sampler *sampler, unsigned window_ms, unsigned max_ms);
/* Measures the write rate over the next window_ms. */
double rate_sampler_measure(struct rate_sampler *sampler, unsigned window_ms);

/* Every progress report of each vCPU since a time (GET /progress of the test VMM). */
struct progress_series {
    size_t count, capacity;
    uint64_t *at_ns, *progress;
};

struct progress_log {
    unsigned vcpu_count;
    struct progress_series vcpus[BENCH_MAX_VCPUS];
};

int guest_read_progress_log(struct vmm_client *client, uint64_t since_ns, struct progress_log *out,
                            struct forkd_error *err);
void progress_log_free(struct progress_log *log);

/* Each vCPU's undisturbed progress rate (per ns) over the reports inside a window with the guest
 * left alone, and the spacing of those reports. */
struct guest_rates {
    unsigned vcpu_count;
    double per_ns[BENCH_MAX_VCPUS];
    double spacing_ns[BENCH_MAX_VCPUS];
};

/* -ENODATA without enough reports in [from, to]. */
int guest_rates_compute(const struct progress_log *log, uint64_t from, uint64_t to,
                        struct guest_rates *out, struct forkd_error *err);
/* Every vCPU's mean of two windows' rates (before and after a branch). */
void guest_rates_mean(const struct guest_rates *a, const struct guest_rates *b,
                      struct guest_rates *out);
/* Writes per second, all vCPUs. */
double guest_rates_per_s(const struct guest_rates *rates);

/* What the guest lost over [from, to] against its undisturbed rates: work lost (ms of guest work
 * per vCPU) and the longest interval a vCPU made under 10% of its undisturbed progress.
 * -ENODATA without enough reports. */
struct guest_cost {
    double lost_ms, stall_ms, window_ms, report_spacing_ms;
    uint64_t stall_start_ns; /* where the longest stall began (bench_now_ns's clock) */
};

int guest_cost_compute(const struct progress_log *log, const struct guest_rates *undisturbed,
                       uint64_t from, uint64_t to, struct guest_cost *out, struct forkd_error *err);

/* Boots a guest writing flat out in a VMM of our own, takes a Full snapshot of it into dir
 * (vmstate, memory.bin) and stops it. Used to seed MEMFD VMs of any size: vm_boot gives up on
 * a guest whose boot takes longer than the VMM client's timeout (a 4 GiB guest here). */
int guest_seed_snapshot(const struct bench_options *options, unsigned mem_mib,
                        enum bench_workload workload, const char *dir, uint64_t *boot_ns,
                        struct forkd_error *err);

/* The scheduler's run delay (time runnable but waiting for a CPU, from schedstat) of each
 * vCPU thread of a VMM: a vCPU that waits for a CPU cannot take the pause signal. */
#define RUN_DELAY_THREADS 32
struct run_delay {
    unsigned count;
    pid_t tid[RUN_DELAY_THREADS];
    uint64_t delay_ns[RUN_DELAY_THREADS];
};

void guest_read_run_delay(pid_t pid, struct run_delay *out);
/* The largest growth of one thread's run delay between two readings. */
uint64_t guest_run_delay_max(const struct run_delay *before, const struct run_delay *after);
/* Sets the scheduling policy of the threads of a reading (--boost-vcpus). */
int guest_set_vcpu_policy(const struct run_delay *threads, int policy);

/* ---- the parts of the run --------------------------------------------------------------- */

struct bench_context {
    const struct bench_options *options;
    char state_dir[4096];
    struct engine *engine;
    /* The engine's parts (borrowed from it). */
    struct vm_registry *registry;
    struct store *store;
    struct page_server *page_server;
    char fanout_snapshot[STORE_NAME_MAX + 1]; /* kept by the branch part for the fan-out */
    cJSON *json;                              /* the report being built */
    char seed_path[4096];                     /* a seed snapshot being made, "" otherwise */
    unsigned snapshot_seq;
};

enum bench_mode { MODE_LIVE, MODE_ARM_IN_PAUSE, MODE_FULL, MODE_COUNT };

enum { BENCH_COST_STAGES = 4 };

struct pause_figures {
    struct series window_ms, engine_ms, protect_ms, prearm_ms, rearmed_pages;
    struct series vmm_pause_ms, vmm_snapshot_ms, vmm_resume_ms, vmstate_rpc_ms;
    struct series pause_rpc_ms, resume_rpc_ms;
    struct series vcpu_wait_ms; /* LIVE: longest vCPU run delay from ARMED to RESUMED */
};

/* What one kind of branch cost the guest (tests/bench/README.md, "What the guest feels"). */
struct cost_figures {
    struct series lost_ms;              /* guest work lost over the branch and its tail */
    struct series stall_ms;             /* longest interval of a vCPU under 10% of its rate */
    struct series stall_from_resume_ms; /* where it began, from the resume (< 0: before it) */
    struct series captured_ms;          /* resume to every page captured and unprotected */
    struct series mirror_mib;           /* the in-memory image captured into (0: none) */
    struct series ready_ms;             /* resume to READY (published) */
    struct series total_ms;             /* request to READY */
    struct series ready_over_copy;      /* ready_ms / the plain copy of the same bytes */
    struct series lost_over_full;       /* lost_ms / FULL's lost_ms, same repetition */
    struct series undisturbed_per_s;    /* the mean of the windows before and after, lost_ms's u */
    struct series before_per_s, after_per_s, drift; /* drift: after / before */
    unsigned unsteady; /* repetitions whose drift is beyond DRIFT_LIMIT: not a result */
    struct series report_spacing_ms;
    /* Where lost_ms falls: request to resume, resume to every page captured, captured to READY,
     * the tail after READY (each over the reports enclosing its stage, so they overlap by up to
     * a report interval and need not sum exactly to lost_ms). */
    struct series stage_lost_ms[BENCH_COST_STAGES];
};

/* The two undisturbed windows of a branch may differ by this share before its row is marked. */
#define DRIFT_LIMIT 0.1

#define COST_ROWS (BENCH_MAX_VARIANTS + 2) /* the LIVE variants, ARM_IN_PAUSE, FULL */

struct size_result {
    unsigned mem_mib;
    enum bench_workload workload;
    bool huge_pages; /* the source VM's memory in 2 MiB pages */
    unsigned cost_rows;
    char cost_names[COST_ROWS][40];
    struct cost_figures cost[COST_ROWS];
    struct series copy_ms; /* the plain copy baseline, as a time */
    uint32_t seed;
    unsigned order[BENCH_MAX_REPS][COST_ROWS]; /* the cost rows in the order each repetition ran */
    unsigned regions;
    unsigned reps;
    double boot_s;
    struct pause_figures pause[MODE_COUNT];
    struct series full_over_live;
    struct series copy_mb_s, baseline_mb_s, copy_ratio;
    struct series fault_p50_us, fault_p99_us, fault_max_us, faults_served, faults_on_bulk;
    struct series null_p50_us, null_p99_us, null_max_us, null_exact_p50_us, null_faults;
    struct series fault_ratio_p50, fault_ratio_p99;
    struct series rate_idle, rate_copy, rate_ratio, rate_null;
};

int bench_size(struct bench_context *context, unsigned mem_mib, enum bench_workload workload,
               struct size_result *out, struct forkd_error *err);

/* A LIVE snapshot of a fresh guest of mem_mib for the fan-out (when no size was measured). */
int bench_fanout_source(struct bench_context *context, unsigned mem_mib, struct forkd_error *err);

/* Baseline of the copy: the same bytes read from a memfd and written to a file in dir with the
 * engine's chunk size, then fsynced. Returns bytes per second. */
int bench_copy_baseline(int memfd, uint64_t bytes, const char *dir, double *bytes_per_s,
                        struct forkd_error *err);

struct null_result {
    uint64_t faults;
    uint64_t p50_ns, p99_ns, max_ns; /* bucketed like the engine's */
    uint64_t exact_p50_ns;
    uint64_t armed_ns, finished_ns; /* window in which faults were served */
};

/* The null handler: the engine's fault path reduced to "unprotect", on the same uffd set-up.
 * With sweep_bytes_per_s > 0 (--null-sweep), a thread meanwhile unprotects memory in 2 MiB
 * steps at that rate, as the bulk copier does. */
int bench_null_handler(struct vm *vm, unsigned duration_ms, double sweep_bytes_per_s,
                       struct null_result *out, struct forkd_error *err);

struct fanout_result {
    const char *backend;
    unsigned forks;
    double spawn_ms;         /* Spawn's sequence of restores returned */
    double running_ms;       /* every fork's guest has made progress */
    double pss_mib_per_fork; /* see README: what is counted */
    double vmm_pss_mib, vmm_shmem_mib, memfd_mib, template_mib; /* totals over the forks */
    bool has_page_server;
    double ps_faults_per_s, ps_p50_us, ps_p99_us, ps_max_us;
    uint64_t ps_faults;
    double ps_window_s;
    int error; /* 0, or why it was not measured */
    char message[FORKD_ERROR_MESSAGE_MAX];
};

int bench_fanout(struct bench_context *context, const char *snapshot, unsigned forks,
                 enum vm_memory memory, struct fanout_result *out, struct forkd_error *err);

/* ---- report ----------------------------------------------------------------------------- */

void report_size(const struct size_result *result);
cJSON *size_json(const struct size_result *result);
void report_cross_size(const struct size_result *results, size_t count, cJSON *json);
void report_fanout(const struct fanout_result *results, size_t count);
cJSON *fanout_json(const struct fanout_result *result);

#endif
