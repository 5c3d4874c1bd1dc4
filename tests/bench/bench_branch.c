/*
 * One guest size: a MEMFD-backed VM writing flat out, branched repeatedly in each mode, with
 * the baselines (copy, null handler, undisturbed write rate) measured between the branches.
 */
#include "bench.h"

#include "forkd/branch.h"
#include "basic/cleanup.h"
#include "thread_priority.h"
#include "vmm_client.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SAMPLE_INTERVAL_MS 20
#define SETTLE_WINDOW_MS   250
#define SETTLE_FIRST_MS    30000  /* after the restore: every page is cold */
#define SETTLE_MAX_MS      10000  /* after a branch: bounded, the run must end in time */
#define VM_API_TIMEOUT_MS  600000 /* a FULL branch of 4 GiB on a slow disk */
#define ORDER_DRAWS        64     /* shuffles drawn per repetition, the best spread kept */

static const char *const mode_names[MODE_COUNT] = {"LIVE", "ARM_IN_PAUSE", "FULL"};
static const enum store_mode store_modes[MODE_COUNT] = {
    STORE_MODE_LIVE, STORE_MODE_LIVE_ARM_IN_PAUSE, STORE_MODE_FULL};

/* Phase times seen from the branch's own thread, and the sampler kept quiet in the pause. */
struct branch_watch {
    struct branch *branch;
    struct rate_sampler *sampler;
    bool boost_vcpus; /* --boost-vcpus: vCPU threads at SCHED_FIFO from ARMED to PAUSED */
    bool boosted;
    pid_t vmm_pid;
    struct run_delay armed, resumed; /* LIVE: vCPU threads' run delay around the pause */
    uint64_t at[BRANCH_PHASE_CANCELLED + 1];
};

static void watch_phase(void *context, enum branch_phase phase,
                        const struct branch_progress *progress)
{
    (void)progress;
    struct branch_watch *watch = context;
    watch->at[phase] = bench_now_ns();
    /* Read outside the pause (ARMED comes just before the pause request): the reading must
     * not lengthen what it explains. */
    if (phase == BRANCH_PHASE_ARMED)
        guest_read_run_delay(watch->vmm_pid, &watch->armed);
    if (phase == BRANCH_PHASE_ARMED && watch->boost_vcpus)
        watch->boosted = guest_set_vcpu_policy(&watch->armed, SCHED_FIFO) == 0;
    if (phase >= BRANCH_PHASE_PAUSED && watch->boosted)
        watch->boosted = guest_set_vcpu_policy(&watch->armed, SCHED_OTHER) != 0;
    if (phase == BRANCH_PHASE_RESUMED && watch->armed.count)
        guest_read_run_delay(watch->vmm_pid, &watch->resumed);
    if (phase == BRANCH_PHASE_STARTED)
        rate_sampler_quiet(watch->sampler, true);
    if (phase == BRANCH_PHASE_RESUMED || phase >= BRANCH_PHASE_DONE)
        rate_sampler_quiet(watch->sampler, false);
}

struct size_run {
    struct bench_context *context;
    struct size_result *result;
    struct vm *vm;
    struct rate_sampler *sampler;
    unsigned rep;
    bool keep_live; /* keep this rep's LIVE snapshot for the fan-out */
    bool settled_once;
    double last_idle_rate; /* sampler's write rate over the last branch's undisturbed window */
    uint64_t random;       /* the seeded stream that orders this size's rows */
    unsigned placed[COST_ROWS][COST_ROWS]; /* times each row ran at each position */
};

static double ms(uint64_t ns)
{
    return (double)ns / 1e6;
}

static void record_pause(struct size_run *run, enum bench_mode mode,
                         const struct branch_progress *progress, const struct branch_watch *watch,
                         const struct guest_info *vmm)
{
    struct pause_figures *pause = &run->result->pause[mode];
    const struct store_figures *figures = &progress->figures;
    uint64_t vmm_ns = vmm->last_pause_ns + vmm->last_snapshot_ns + vmm->last_resume_ns;
    series_add(&pause->window_ms, ms(figures->pause_ns));
    series_add(&pause->engine_ms, ms(figures->pause_ns - vmm_ns));
    series_add(&pause->vmm_pause_ms, ms(vmm->last_pause_ns));
    series_add(&pause->vmm_snapshot_ms, ms(vmm->last_snapshot_ns));
    series_add(&pause->vmm_resume_ms, ms(vmm->last_resume_ns));
    series_add(&pause->vmstate_rpc_ms,
               ms(mode == MODE_FULL ? figures->copy_ns : figures->vmstate_ns));
    if (mode == MODE_LIVE) {
        series_add(&pause->protect_ms, ms(figures->rearm_ns));
        series_add(&pause->prearm_ms, ms(figures->arm_ns));
        series_add(&pause->rearmed_pages, (double)figures->rearmed_pages);
    } else if (mode == MODE_ARM_IN_PAUSE) {
        series_add(&pause->protect_ms, ms(figures->arm_ns));
    }
    series_add(&pause->pause_rpc_ms, ms(figures->pause_request_ns));
    series_add(&pause->resume_rpc_ms, ms(figures->resume_request_ns));
    if (watch->armed.count && watch->resumed.count)
        series_add(&pause->vcpu_wait_ms, ms(guest_run_delay_max(&watch->armed, &watch->resumed)));
}

static void record_copy(struct size_run *run, const struct branch_progress *progress,
                        const struct branch_watch *watch)
{
    struct size_result *result = run->result;
    const struct store_figures *figures = &progress->figures;
    series_add(&result->copy_mb_s, (double)figures->bytes_copied * 1e3 / (double)figures->copy_ns);
    series_add(&result->fault_p50_us, progress->fault_service_p50_ns / 1e3);
    series_add(&result->fault_p99_us, progress->fault_service_p99_ns / 1e3);
    series_add(&result->fault_max_us, progress->fault_service_max_ns / 1e3);
    series_add(&result->faults_served, (double)progress->faults_served);
    /* A fault on a page the bulk copier has claimed waits for the copier's read. */
    series_add(&result->faults_on_bulk, (double)progress->faults_left_to_bulk);
    double rate = rate_sampler_rate(run->sampler, watch->at[BRANCH_PHASE_COPYING],
                                    watch->at[BRANCH_PHASE_PUBLISHING]);
    if (rate >= 0)
        series_add(&result->rate_copy, rate);
}

/* Runs one branch; on success progress and watch hold its figures and times. */
static int run_branch(struct size_run *run, enum bench_mode mode, unsigned levers_off,
                      const char *name, struct branch_progress *progress,
                      struct branch_watch *watch, struct forkd_error *err)
{
    struct branch *branch = branch_new();
    if (!branch)
        return forkd_error_set(err, -ENOMEM, "branch: out of memory");
    *watch = (struct branch_watch){.branch = branch,
                                   .sampler = run->sampler,
                                   .boost_vcpus = run->context->options->boost_vcpus,
                                   .vmm_pid = vm_pid(run->vm)};
    struct branch_request request = {.vm = run->vm,
                                     .snapshot_name = name,
                                     .mode = store_modes[mode],
                                     .on_phase = watch_phase,
                                     .context = watch,
                                     .levers_off = levers_off};
    struct store_snapshot snapshot;
    /* The diagnosis of the fault handler's tail: the copier at the handler's priority. */
    struct thread_priority priority = {0};
    if (run->context->options->copier_fifo)
        thread_priority_raise(&priority);
    int rc = branch_run(branch, run->context->store, &request, &snapshot, err);
    thread_priority_restore(&priority);
    branch_get_progress(branch, progress);
    branch_free(branch);
    rate_sampler_quiet(run->sampler, false);
    /* A row measures the levers it names, or nothing (an early bench never passed them on). */
    if (rc == 0 && mode != MODE_FULL && progress->levers != (BRANCH_LEVER_ALL & ~levers_off))
        return forkd_error_set(err, -EPROTO,
                               "branch %s ran with levers 0x%x, its row asked for 0x%x", name,
                               progress->levers, BRANCH_LEVER_ALL & ~levers_off);
    return rc;
}

static void snapshot_name(struct size_run *run, enum bench_mode mode, char *out, size_t size)
{
    snprintf(out, size, "bench-%u-%s-%u-%u", run->result->mem_mib, mode_names[mode], run->rep,
             run->context->snapshot_seq++);
}

/* Lets the disk finish what earlier steps left (deleted snapshots are discarded, dirty pages
 * written back), so neither copy pays for the other's leftovers. */
static void quiet_disk(struct size_run *run)
{
    _cleanup_close_ int fd = open(run->context->state_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0)
        syncfs(fd);
}

static void settle(struct size_run *run)
{
    rate_sampler_settle(run->sampler, SETTLE_WINDOW_MS,
                        run->settled_once ? SETTLE_MAX_MS : SETTLE_FIRST_MS);
    run->settled_once = true;
}

/* What every undisturbed window starts from, before a branch and after it: the disk quiet and
 * the guest's rate steady. */
static void steady(struct size_run *run)
{
    quiet_disk(run);
    settle(run);
}

/* The snapshot of a branch whose figures are taken: kept for the fan-out, or deleted. */
static void release_snapshot(struct size_run *run, unsigned row, const char *name)
{
    if (row == 0 && run->keep_live)
        snprintf(run->context->fanout_snapshot, sizeof(run->context->fanout_snapshot), "%s", name);
    else
        store_delete(run->context->store, name, true, NULL);
}

/* The guest's undisturbed rates over a window of --rate-ms after a branch, once it is steady. */
static int rates_after(struct size_run *run, struct guest_rates *after, struct forkd_error *err)
{
    unsigned rate_ms = run->context->options->rate_ms;
    steady(run);
    uint64_t from = bench_now_ns();
    bench_sleep_ms(rate_ms + 100); /* and the first report after the window */
    _cleanup_(progress_log_free) struct progress_log log = {0};
    /* From a little before the window, in case the reports are sparser than it. */
    int rc = guest_read_progress_log(vm_client(run->vm), from - 2000000000ull, &log, err);
    if (rc == 0)
        rc = guest_rates_compute(&log, from, from + rate_ms * 1000000ull, after, err);
    return rc < 0 ? forkd_error_prefix(err, "the undisturbed window after the branch: ") : 0;
}

static void add_cost(struct cost_figures *figures, const struct guest_cost *cost,
                     const struct guest_rates *before, const struct guest_rates *after)
{
    struct guest_rates mean;
    guest_rates_mean(before, after, &mean);
    double drift = guest_rates_per_s(after) / guest_rates_per_s(before);
    series_add(&figures->lost_ms, cost->lost_ms);
    series_add(&figures->stall_ms, cost->stall_ms);
    series_add(&figures->undisturbed_per_s, guest_rates_per_s(&mean));
    series_add(&figures->before_per_s, guest_rates_per_s(before));
    series_add(&figures->after_per_s, guest_rates_per_s(after));
    series_add(&figures->drift, drift);
    if (fabs(drift - 1) > DRIFT_LIMIT)
        figures->unsteady++;
    series_add(&figures->report_spacing_ms, cost->report_spacing_ms);
}

/* Splits the guest's lost work over the branch's stages (cost_figures.stage_lost_ms). A FULL
 * branch captures nothing after its resume: its second stage is empty. */
static int record_stage_costs(struct cost_figures *figures, const struct progress_log *log,
                              const struct guest_rates *mean, const struct branch_watch *watch,
                              const struct branch_progress *progress, uint64_t tail_end,
                              struct forkd_error *err)
{
    uint64_t resumed = watch->at[BRANCH_PHASE_RESUMED], done = watch->at[BRANCH_PHASE_DONE];
    uint64_t captured = resumed + progress->captured_ns;
    if (captured > done)
        captured = done;
    uint64_t bounds[BENCH_COST_STAGES + 1] = {watch->at[BRANCH_PHASE_STARTED], resumed, captured,
                                              done, tail_end};
    for (unsigned stage = 0; stage < BENCH_COST_STAGES; stage++) {
        struct guest_cost cost = {0};
        if (bounds[stage + 1] > bounds[stage]) {
            int rc = guest_cost_compute(log, mean, bounds[stage], bounds[stage + 1], &cost, err);
            if (rc < 0)
                return forkd_error_prefix(
                    err, "the guest's cost of stage %u of the branch: ", stage + 1);
        }
        series_add(&figures->stage_lost_ms[stage], cost.lost_ms);
    }
    return 0;
}

/* What the branch cost the guest: its progress reports over the branch and its tail, against
 * each vCPU's mean rate over two undisturbed windows, [idle_from, start] before the branch and
 * one once the guest is steady again after the tail. The snapshot goes only after the tail:
 * deleting it is the bench's work, not the branch's. */
static int record_cost(struct size_run *run, unsigned row, const char *name, uint64_t idle_from,
                       const struct branch_progress *progress, const struct branch_watch *watch,
                       struct forkd_error *err)
{
    const struct bench_options *options = run->context->options;
    uint64_t start = watch->at[BRANCH_PHASE_STARTED], done = watch->at[BRANCH_PHASE_DONE];
    bench_sleep_ms(options->tail_ms + 100); /* and the first report after the tail */
    _cleanup_(progress_log_free) struct progress_log log = {0};
    int rc = guest_read_progress_log(vm_client(run->vm), idle_from - 2000000000ull, &log, err);
    release_snapshot(run, row, name);
    struct guest_rates before, after, mean;
    if (rc == 0)
        rc = guest_rates_compute(&log, idle_from, start, &before, err);
    if (rc < 0)
        return forkd_error_prefix(err, "the undisturbed window before the branch: ");
    if ((rc = rates_after(run, &after, err)) < 0)
        return rc;
    guest_rates_mean(&before, &after, &mean);
    struct guest_cost cost;
    rc = guest_cost_compute(&log, &mean, start, done + options->tail_ms * 1000000ull, &cost, err);
    if (rc < 0)
        return forkd_error_prefix(err, "the guest's cost of the branch: ");
    struct cost_figures *figures = &run->result->cost[row];
    add_cost(figures, &cost, &before, &after);
    series_add(&figures->stall_from_resume_ms,
               ((double)cost.stall_start_ns - (double)watch->at[BRANCH_PHASE_RESUMED]) / 1e6);
    series_add(&figures->captured_ms, ms(progress->captured_ns));
    series_add(&figures->mirror_mib, (double)progress->mirror_bytes / (1 << 20));
    series_add(&figures->ready_ms, ms(done - watch->at[BRANCH_PHASE_RESUMED]));
    series_add(&figures->total_ms, ms(done - start));
    return record_stage_costs(figures, &log, &mean, watch, progress,
                              done + options->tail_ms * 1000000ull, err);
}

/* A branch in one mode (LIVE: with some levers left out) between two windows of undisturbed
 * guest progress; its figures recorded in cost row `row`. */
static int measure_mode(struct size_run *run, enum bench_mode mode, unsigned row,
                        unsigned levers_off, struct forkd_error *err)
{
    char name[STORE_NAME_MAX + 1];
    snapshot_name(run, mode, name, sizeof(name));
    uint64_t idle_from = bench_now_ns();
    bench_sleep_ms(run->context->options->rate_ms);
    run->last_idle_rate = rate_sampler_rate(run->sampler, idle_from, bench_now_ns());
    struct branch_progress progress;
    struct branch_watch watch;
    int rc = run_branch(run, mode, levers_off, name, &progress, &watch, err);
    if (rc < 0)
        return rc;
    struct guest_info vmm;
    rc = guest_get_info(vm_client(run->vm), &vmm, err);
    if (rc < 0) {
        release_snapshot(run, row, name);
        return rc;
    }
    if (row == 0 || mode != MODE_LIVE)
        record_pause(run, mode, &progress, &watch, &vmm);
    if (row == 0)
        record_copy(run, &progress, &watch);
    return record_cost(run, row, name, idle_from, &progress, &watch, err);
}

static int measure_copy_baseline(struct size_run *run, double *mb_s, struct forkd_error *err)
{
    _cleanup_close_ int memfd = vm_dup_memfd(run->vm);
    if (memfd < 0)
        return forkd_error_set(err, memfd, "the source VM has no memfd");
    quiet_disk(run);
    double rate = 0;
    int rc =
        bench_copy_baseline(memfd, vm_memory_bytes(run->vm), run->context->state_dir, &rate, err);
    *mb_s = rate / 1e6;
    return rc;
}

static int measure_null(struct size_run *run, struct forkd_error *err)
{
    struct null_result null;
    const struct series *copy = &run->result->copy_mb_s;
    double sweep = run->context->options->null_sweep && copy->count
                       ? copy->values[copy->count - 1] * 1e6 /* this repetition's LIVE copy */
                       : 0;
    int rc = bench_null_handler(run->vm, run->context->options->null_ms, sweep, &null, err);
    if (rc < 0)
        return rc;
    struct size_result *result = run->result;
    series_add(&result->null_p50_us, null.p50_ns / 1e3);
    series_add(&result->null_p99_us, null.p99_ns / 1e3);
    series_add(&result->null_max_us, null.max_ns / 1e3);
    series_add(&result->null_exact_p50_us, null.exact_p50_ns / 1e3);
    series_add(&result->null_faults, (double)null.faults);
    double rate = rate_sampler_rate(run->sampler, null.armed_ns, null.finished_ns);
    if (rate >= 0)
        series_add(&result->rate_null, rate);
    unsigned last = result->fault_p50_us.count - 1;
    if (null.p50_ns)
        series_add(&result->fault_ratio_p50, result->fault_p50_us.values[last] * 1e3 / null.p50_ns);
    if (null.p99_ns)
        series_add(&result->fault_ratio_p99, result->fault_p99_us.values[last] * 1e3 / null.p99_ns);
    return 0;
}

/* The LIVE branch and the copy baseline, in alternating order (the disk is shared and its
 * speed drifts), with the undisturbed write rate measured just before the branch. */
static int measure_live_and_copy(struct size_run *run, struct forkd_error *err)
{
    struct size_result *result = run->result;
    bool baseline_first = run->rep % 2 == 1;
    double baseline = 0;
    int rc = baseline_first ? measure_copy_baseline(run, &baseline, err) : 0;
    if (rc < 0)
        return rc;
    steady(run);
    unsigned copies = result->copy_mb_s.count, rates = result->rate_copy.count;
    if ((rc = measure_mode(run, MODE_LIVE, 0, run->context->options->variants[0].levers_off, err)) <
        0)
        return rc;
    double idle = run->last_idle_rate;
    if (!baseline_first && (rc = measure_copy_baseline(run, &baseline, err)) < 0)
        return rc;
    series_add(&result->baseline_mb_s, baseline);
    series_add(&result->copy_ms, (double)vm_memory_bytes(run->vm) / (baseline * 1e6) * 1e3);
    if (result->copy_mb_s.count > copies)
        series_add(&result->copy_ratio, result->copy_mb_s.values[copies] / baseline);
    if (idle > 0 && result->rate_copy.count > rates) {
        series_add(&result->rate_idle, idle);
        series_add(&result->rate_ratio, result->rate_copy.values[rates] / idle);
    }
    return 0;
}

static double last_value(const struct series *series)
{
    return series->count ? series->values[series->count - 1] : 0;
}

/* Ratios within the repetition just measured: each row's guest cost against FULL's, and its
 * time to READY against the plain copy. */
static void finish_rep(struct size_run *run)
{
    struct size_result *result = run->result;
    unsigned last = result->pause[MODE_FULL].window_ms.count - 1;
    series_add(&result->full_over_live, result->pause[MODE_FULL].window_ms.values[last] /
                                            result->pause[MODE_LIVE].window_ms.values[last]);
    const struct cost_figures *full = &result->cost[result->cost_rows - 1];
    double copy = last_value(&result->copy_ms);
    for (unsigned row = 0; row < result->cost_rows; row++) {
        struct cost_figures *figures = &result->cost[row];
        if (last_value(&full->lost_ms) > 0)
            series_add(&figures->lost_over_full,
                       last_value(&figures->lost_ms) / last_value(&full->lost_ms));
        if (copy > 0)
            series_add(&figures->ready_over_copy, last_value(&figures->ready_ms) / copy);
    }
}

/* The order of this repetition's rows: shuffled by the seeded stream, the best of a few draws
 * at putting each row where it has run least often, so that whatever drifts over a repetition
 * (the machine, the disk, the guest) lands on a different row each time. */
static void choose_order(struct size_run *run, unsigned *order)
{
    unsigned rows = run->result->cost_rows, best = UINT_MAX, draw[COST_ROWS];
    for (unsigned attempt = 0; attempt < ORDER_DRAWS && best > 0; attempt++) {
        for (unsigned i = 0; i < rows; i++)
            draw[i] = i;
        bench_shuffle(&run->random, draw, rows);
        unsigned repeats = 0;
        for (unsigned position = 0; position < rows; position++)
            repeats += run->placed[draw[position]][position];
        if (repeats < best) {
            best = repeats;
            memcpy(order, draw, rows * sizeof(*order));
        }
    }
    for (unsigned position = 0; position < rows; position++)
        run->placed[order[position]][position]++;
}

/* One cost row. The first LIVE row brings its baselines along: the copy baseline next to it
 * (alternating sides) and the null handler after it, which is judged against its faults. */
static int measure_row(struct size_run *run, unsigned row, struct forkd_error *err)
{
    const struct bench_options *options = run->context->options;
    unsigned rows = run->result->cost_rows;
    if (row == 0) {
        int rc = measure_live_and_copy(run, err);
        if (rc < 0)
            return rc;
        settle(run);
        return measure_null(run, err);
    }
    steady(run);
    if (row < rows - 2)
        return measure_mode(run, MODE_LIVE, row, options->variants[row].levers_off, err);
    return measure_mode(run, row == rows - 2 ? MODE_ARM_IN_PAUSE : MODE_FULL, row, 0, err);
}

/* One repetition: every figure of this size once, the rows in a seeded random order. */
static int measure_rep(struct size_run *run, struct forkd_error *err)
{
    unsigned *order = run->result->order[run->rep];
    choose_order(run, order);
    for (unsigned position = 0; position < run->result->cost_rows; position++) {
        int rc = measure_row(run, order[position], err);
        if (rc < 0)
            return rc;
    }
    finish_rep(run);
    return 0;
}

/* A MEMFD VM of mem_mib writing flat out, restored from a seed snapshot on tmpfs. */
static int make_source_vm(struct bench_context *context, unsigned mem_mib,
                          enum bench_workload workload, struct size_result *result, struct vm **out,
                          struct forkd_error *err)
{
    char seed[PATH_MAX];
    snprintf(seed, sizeof(seed), "%s/forkd-bench-seed-XXXXXX", context->options->seed_dir);
    if (!mkdtemp(seed))
        return forkd_error_errno(err, -errno, "mkdtemp %s", seed);
    snprintf(context->seed_path, sizeof(context->seed_path), "%s", seed);
    uint64_t boot_ns = 0;
    int rc = guest_seed_snapshot(context->options, mem_mib, workload, seed, &boot_ns, err);
    result->boot_s = (double)boot_ns / 1e9;
    char vmstate[PATH_MAX + 16], memory[PATH_MAX + 16], name[64];
    store_file_path(seed, STORE_FILE_VMSTATE, vmstate, sizeof(vmstate));
    store_file_path(seed, STORE_FILE_MEMORY, memory, sizeof(memory));
    snprintf(name, sizeof(name), "source-%u-%s", mem_mib, bench_workload_names[workload]);
    struct vm_restore_config config = {
        .name = name,
        .vmstate_path = vmstate,
        .memory_path = memory,
        .memory = VM_MEMORY_MEMFD,
        .page_size = context->options->huge_pages ? VM_HUGE_PAGE_SIZE : VM_SMALL_PAGE_SIZE};
    if (rc == 0)
        rc = vm_restore(context->registry, &config, out, err);
    unlink(vmstate);
    unlink(memory);
    char log[PATH_MAX + 16];
    snprintf(log, sizeof(log), "%s/seed.log", seed);
    unlink(log);
    rmdir(seed);
    context->seed_path[0] = '\0';
    if (rc == 0)
        vmm_client_set_timeout_ms(vm_client(*out), VM_API_TIMEOUT_MS);
    return rc;
}

static int run_reps(struct size_run *run, struct forkd_error *err)
{
    struct guest_info info;
    int rc = guest_get_info(vm_client(run->vm), &info, err);
    if (rc < 0)
        return rc;
    run->result->regions = info.region_count;
    for (run->rep = 0; run->rep < run->result->reps; run->rep++) {
        run->keep_live = run->rep + 1 == run->result->reps && !run->context->fanout_snapshot[0];
        const char *workload = bench_workload_names[run->result->workload];
        fprintf(stderr, "forkd-bench: %u MiB, %s, repetition %u of %u\n", run->result->mem_mib,
                workload, run->rep + 1, run->result->reps);
        if ((rc = measure_rep(run, err)) < 0)
            return forkd_error_prefix(err, "%u MiB, %s, repetition %u: ", run->result->mem_mib,
                                      workload, run->rep + 1);
    }
    return 0;
}

static void name_cost_rows(const struct bench_options *options, struct size_result *out)
{
    out->cost_rows = (unsigned)options->variant_count + 2;
    for (size_t v = 0; v < options->variant_count; v++)
        snprintf(out->cost_names[v], sizeof(out->cost_names[v]), "%s", options->variants[v].name);
    snprintf(out->cost_names[out->cost_rows - 2], sizeof(out->cost_names[0]), "ARM_IN_PAUSE");
    snprintf(out->cost_names[out->cost_rows - 1], sizeof(out->cost_names[0]), "FULL");
}

int bench_size(struct bench_context *context, unsigned mem_mib, enum bench_workload workload,
               struct size_result *out, struct forkd_error *err)
{
    const struct bench_options *options = context->options;
    memset(out, 0, sizeof(*out));
    out->mem_mib = mem_mib;
    out->workload = workload;
    out->huge_pages = options->huge_pages;
    out->reps = mem_mib >= 1024 ? options->reps_large : options->reps;
    out->seed = options->seed;
    name_cost_rows(options, out);
    /* The orders of a size and workload follow from the seed and the rows alone, so a run
     * narrowed to them (--sizes, --workloads) repeats what the whole run did there. */
    struct size_run run = {.context = context,
                           .result = out,
                           .random = ((uint64_t)options->seed << 32) ^ ((uint64_t)mem_mib << 8) ^
                                     (uint64_t)workload};
    fprintf(stderr, "forkd-bench: %u MiB, %s: booting and seeding the source VM\n", mem_mib,
            bench_workload_names[workload]);
    int rc = make_source_vm(context, mem_mib, workload, out, &run.vm, err);
    if (rc < 0)
        return rc;
    rc = rate_sampler_start(run.vm, SAMPLE_INTERVAL_MS, &run.sampler, err);
    if (rc == 0)
        rc = run_reps(&run, err);
    rate_sampler_stop(run.sampler);
    vm_stop(context->registry, run.vm, 2000, NULL);
    vm_unref(run.vm);
    return rc;
}

int bench_fanout_source(struct bench_context *context, unsigned mem_mib, struct forkd_error *err)
{
    static struct size_result result; /* large: not on the stack */
    memset(&result, 0, sizeof(result));
    result.mem_mib = mem_mib;
    result.reps = 1;
    name_cost_rows(context->options, &result);
    struct size_run run = {.context = context, .result = &result, .keep_live = true};
    int rc = make_source_vm(context, mem_mib, WORKLOAD_RANDOM, &result, &run.vm, err);
    if (rc < 0)
        return rc;
    rc = rate_sampler_start(run.vm, SAMPLE_INTERVAL_MS, &run.sampler, err);
    if (rc == 0) {
        settle(&run);
        rc = measure_mode(&run, MODE_LIVE, 0, context->options->variants[0].levers_off, err);
    }
    rate_sampler_stop(run.sampler);
    vm_stop(context->registry, run.vm, 2000, NULL);
    vm_unref(run.vm);
    return rc;
}
