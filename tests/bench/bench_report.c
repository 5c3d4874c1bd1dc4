/* The table on stdout and the JSON report. */
#include "bench.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static const char *const mode_names[MODE_COUNT] = {"LIVE", "ARM_IN_PAUSE", "FULL"};

/* "median [min..max]" with a precision that suits the magnitude. */
static const char *fmt(const struct series *series, char *out, size_t size)
{
    if (!series->count) {
        snprintf(out, size, "-");
        return out;
    }
    double median = series_median(series);
    int digits = fabs(median) >= 100 ? 0 : fabs(median) >= 10 ? 1 : fabs(median) >= 1 ? 2 : 3;
    snprintf(out, size, "%.*f [%.*f..%.*f]", digits, median, digits, series_min(series), digits,
             series_max(series));
    return out;
}

static void row3(const char *label, const struct series *a, const struct series *b,
                 const struct series *c)
{
    char x[64], y[64], z[64];
    printf("  %-30s %-26s %-26s %s\n", label, fmt(a, x, sizeof(x)), b ? fmt(b, y, sizeof(y)) : "",
           c ? fmt(c, z, sizeof(z)) : "");
}

static void report_pause(const struct size_result *r)
{
    const struct pause_figures *p = r->pause;
    printf("  %-30s %-26s %-26s %s\n", "Pause window (ms)", "LIVE (pre-arm)", "ARM_IN_PAUSE",
           "FULL");
    row3("window: request to resume ack", &p[0].window_ms, &p[1].window_ms, &p[2].window_ms);
    row3("engine's part (window - VMM)", &p[0].engine_ms, &p[1].engine_ms, &p[2].engine_ms);
    row3("  write-protect in the pause", &p[0].protect_ms, &p[1].protect_ms, &p[2].protect_ms);
    row3("  pause request round trip", &p[0].pause_rpc_ms, &p[1].pause_rpc_ms, &p[2].pause_rpc_ms);
    row3("  snapshot/create round trip", &p[0].vmstate_rpc_ms, &p[1].vmstate_rpc_ms,
         &p[2].vmstate_rpc_ms);
    row3("  resume request round trip", &p[0].resume_rpc_ms, &p[1].resume_rpc_ms,
         &p[2].resume_rpc_ms);
    row3("VMM: pause (signal to parked)", &p[0].vmm_pause_ms, &p[1].vmm_pause_ms,
         &p[2].vmm_pause_ms);
    row3("VMM: snapshot/create handler", &p[0].vmm_snapshot_ms, &p[1].vmm_snapshot_ms,
         &p[2].vmm_snapshot_ms);
    row3("VMM: resume", &p[0].vmm_resume_ms, &p[1].vmm_resume_ms, &p[2].vmm_resume_ms);
    row3("vCPU wait for a CPU (schedstat)", &p[0].vcpu_wait_ms, NULL, NULL);
    row3("pre-arm, outside the pause", &p[0].prearm_ms, NULL, NULL);
    row3("pages re-armed in the pause", &p[0].rearmed_pages, NULL, NULL);
    row3("ratio FULL / LIVE window", &r->full_over_live, NULL, NULL);
}

static void report_copy_and_faults(const struct size_result *r)
{
    printf("  %-30s %-26s %-26s %s\n", "Copy of memory.bin (MB/s)", "engine (LIVE)",
           "baseline memfd->file", "ratio");
    row3("bytes / copy_ns, fsync incl.", &r->copy_mb_s, &r->baseline_mb_s, &r->copy_ratio);
    printf("  %-30s %-26s %-26s %s\n", "Write-fault service (us)", "p50", "p99", "max");
    row3("engine, LIVE copy mode", &r->fault_p50_us, &r->fault_p99_us, &r->fault_max_us);
    row3("null handler (unprotect only)", &r->null_p50_us, &r->null_p99_us, &r->null_max_us);
    row3("ratio engine / null", &r->fault_ratio_p50, &r->fault_ratio_p99, NULL);
    row3("faults: engine, null, on bulk", &r->faults_served, &r->null_faults, &r->faults_on_bulk);
    printf("  %-30s %-26s %-26s %s\n", "Guest writes per second", "no branch", "during copy",
           "ratio");
    row3("guest_progress deltas", &r->rate_idle, &r->rate_copy, &r->rate_ratio);
    row3("during the null handler", &r->rate_null, NULL, NULL);
}

/* A row's name, with the mark of a row whose undisturbed windows drifted apart. */
static const char *row_name(const struct size_result *r, unsigned row, char *out, size_t size)
{
    snprintf(out, size, "%s%s", r->cost_names[row], r->cost[row].unsteady ? " *" : "");
    return out;
}

static void report_unsteady(const struct size_result *r)
{
    bool any = false;
    for (unsigned row = 0; row < r->cost_rows; row++) {
        const struct cost_figures *c = &r->cost[row];
        if (!c->unsteady)
            continue;
        printf("%s%s: %u of %u", any ? "; " : "  * ", r->cost_names[row], c->unsteady,
               c->drift.count);
        any = true;
    }
    if (any)
        printf(" repetitions: the guest's undisturbed rate after the branch is more than %.0f%%\n"
               "    off the one before it (drift), so these rows' lost work and stalls are not "
               "results\n",
               DRIFT_LIMIT * 100);
}

static void report_order(const struct size_result *r)
{
    printf("  order of the rows in each repetition (seed %u):\n", r->seed);
    for (unsigned rep = 0; rep < r->cost[0].drift.count && rep < BENCH_MAX_REPS; rep++) {
        printf("    %u:", rep + 1);
        for (unsigned position = 0; position < r->cost_rows; position++)
            printf("%s %s", position ? " |" : "", r->cost_names[r->order[rep][position]]);
        printf("\n");
    }
}

/* What each kind of branch cost the guest: one row per kind, medians with their ranges. */
static void report_cost(const struct size_result *r)
{
    printf("  What the guest felt (ms; ratios per repetition; lost counted to %s)\n",
           "the branch's end + tail");
    printf("  %-26s %-22s %-22s %-20s %-22s %-22s %-20s %-22s %s\n", "branch", "guest work lost",
           "lost / FULL's", "longest stall", "resume->captured", "resume->READY",
           "READY / plain copy", "request->READY", "drift after/before");
    for (unsigned row = 0; row < r->cost_rows; row++) {
        const struct cost_figures *c = &r->cost[row];
        char n[48], a[64], b[64], d[64], e[64], f[64], g[64], h[64], i[64];
        printf("  %-26s %-22s %-22s %-20s %-22s %-22s %-20s %-22s %s\n",
               row_name(r, row, n, sizeof(n)), fmt(&c->lost_ms, a, sizeof(a)),
               fmt(&c->lost_over_full, b, sizeof(b)), fmt(&c->stall_ms, d, sizeof(d)),
               fmt(&c->captured_ms, e, sizeof(e)), fmt(&c->ready_ms, f, sizeof(f)),
               fmt(&c->ready_over_copy, g, sizeof(g)), fmt(&c->total_ms, h, sizeof(h)),
               fmt(&c->drift, i, sizeof(i)));
    }
    report_unsteady(r);
    printf("  %-26s %-22s %-22s %-22s %s\n", "where the work was lost", "request->resume",
           "resume->captured", "captured->READY", "READY->tail end");
    for (unsigned row = 0; row < r->cost_rows; row++) {
        const struct cost_figures *c = &r->cost[row];
        char n[48], s[BENCH_COST_STAGES][64];
        for (unsigned stage = 0; stage < BENCH_COST_STAGES; stage++)
            fmt(&c->stage_lost_ms[stage], s[stage], sizeof(s[stage]));
        printf("  %-26s %-22s %-22s %-22s %s\n", row_name(r, row, n, sizeof(n)), s[0], s[1], s[2],
               s[3]);
    }
    char x[64], y[64];
    printf("  plain copy of the same bytes (ms): %s; guest report spacing (ms): %s\n",
           fmt(&r->copy_ms, x, sizeof(x)), fmt(&r->cost[0].report_spacing_ms, y, sizeof(y)));
    report_order(r);
}

/* One of the goals the LIVE branch is held to, from the medians of the table's columns. */
struct goal {
    const char *name; /* in the JSON */
    char text[80];
    double value, limit;
    bool strict;   /* value < limit, else value <= limit */
    bool unsteady; /* computed from a row marked unsteady: not a result */
};

static double median_or_nan(const struct series *series)
{
    return series->count ? series_median(series) : NAN;
}

/* The goals that apply to this size and workload: LIVE's lost work against FULL's (a tenth on
 * the hot set at 1 GiB, half on random memory, never more than FULL's), its longest stall, and
 * its time to READY against a plain copy of the same bytes. */
static unsigned collect_goals(const struct size_result *r, struct goal *goals)
{
    const struct cost_figures *live = &r->cost[0], *full = &r->cost[r->cost_rows - 1];
    const char *name = r->cost_names[0];
    bool lost_unsteady = live->unsteady || full->unsteady;
    double over_full = median_or_nan(&live->lost_over_full);
    double share = r->workload == WORKLOAD_RANDOM                         ? 0.5
                   : r->workload == WORKLOAD_HOTSET && r->mem_mib == 1024 ? 0.1
                                                                          : 0;
    unsigned n = 0;
    if (share > 0) {
        goals[n] = (struct goal){"lost_over_full", "", over_full, share, false, lost_unsteady};
        snprintf(goals[n++].text, sizeof(goals[0].text), "%s lost / FULL's <= %.1f", name, share);
    }
    goals[n] = (struct goal){"lost_at_most_full", "", over_full, 1, false, lost_unsteady};
    snprintf(goals[n++].text, sizeof(goals[0].text), "%s lost <= FULL's (ratio <= 1)", name);
    goals[n] = (struct goal){"longest_stall_ms", "", median_or_nan(&live->stall_ms), 10, true,
                             live->unsteady > 0};
    snprintf(goals[n++].text, sizeof(goals[0].text), "%s longest stall < 10 ms", name);
    goals[n] = (struct goal){
        "ready_over_plain_copy", "", median_or_nan(&live->ready_over_copy), 1.25, false, false};
    snprintf(goals[n++].text, sizeof(goals[0].text), "%s resume->READY / plain copy <= 1.25", name);
    return n;
}

static const char *goal_verdict(const struct goal *goal)
{
    if (isnan(goal->value))
        return "n/a";
    bool pass = goal->strict ? goal->value < goal->limit : goal->value <= goal->limit;
    return pass ? "PASS" : "MISS";
}

#define MAX_GOALS 4

static void report_goals(const struct size_result *r)
{
    struct goal goals[MAX_GOALS];
    unsigned count = collect_goals(r, goals);
    printf("  Goals (medians; reported, not asserted):\n");
    for (unsigned i = 0; i < count; i++)
        printf("    %-4s  %-44s %8.3f%s\n", goal_verdict(&goals[i]), goals[i].text, goals[i].value,
               goals[i].unsteady ? "   * from a row marked unsteady" : "");
}

static cJSON *goals_json(const struct size_result *r)
{
    struct goal goals[MAX_GOALS];
    unsigned count = collect_goals(r, goals);
    cJSON *array = cJSON_CreateArray();
    for (unsigned i = 0; i < count; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "goal", goals[i].name);
        cJSON_AddStringToObject(o, "text", goals[i].text);
        if (isnan(goals[i].value))
            cJSON_AddNullToObject(o, "value");
        else
            cJSON_AddNumberToObject(o, "value", goals[i].value);
        cJSON_AddStringToObject(o, "comparison", goals[i].strict ? "<" : "<=");
        cJSON_AddNumberToObject(o, "limit", goals[i].limit);
        cJSON_AddStringToObject(o, "result", goal_verdict(&goals[i]));
        cJSON_AddBoolToObject(o, "from_unsteady_row", goals[i].unsteady);
        cJSON_AddItemToArray(array, o);
    }
    return array;
}

static cJSON *orders_json(const struct size_result *r)
{
    cJSON *orders = cJSON_CreateArray();
    for (unsigned rep = 0; rep < r->cost[0].drift.count && rep < BENCH_MAX_REPS; rep++) {
        cJSON *order = cJSON_CreateArray();
        for (unsigned position = 0; position < r->cost_rows; position++)
            cJSON_AddItemToArray(order, cJSON_CreateString(r->cost_names[r->order[rep][position]]));
        cJSON_AddItemToArray(orders, order);
    }
    return orders;
}

void report_size(const struct size_result *r)
{
    printf("\n== %u MiB guest%s, workload %s, %u region%s, %u repetitions, seed %u: median "
           "[min..max] ==\n",
           r->mem_mib, r->huge_pages ? " on 2 MiB pages" : "", bench_workload_names[r->workload],
           r->regions, r->regions == 1 ? "" : "s", r->reps, r->seed);
    report_cost(r);
    report_goals(r);
    report_pause(r);
    report_copy_and_faults(r);
    fflush(stdout);
}

static cJSON *cost_json(const struct cost_figures *c)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddItemToObject(o, "guest_lost_ms", series_json(&c->lost_ms));
    cJSON_AddItemToObject(o, "lost_over_full", series_json(&c->lost_over_full));
    cJSON_AddItemToObject(o, "longest_stall_ms", series_json(&c->stall_ms));
    cJSON_AddItemToObject(o, "stall_from_resume_ms", series_json(&c->stall_from_resume_ms));
    cJSON_AddItemToObject(o, "resume_to_captured_ms", series_json(&c->captured_ms));
    cJSON_AddItemToObject(o, "mirror_mib", series_json(&c->mirror_mib));
    cJSON_AddItemToObject(o, "resume_to_ready_ms", series_json(&c->ready_ms));
    cJSON_AddItemToObject(o, "ready_over_plain_copy", series_json(&c->ready_over_copy));
    cJSON_AddItemToObject(o, "request_to_ready_ms", series_json(&c->total_ms));
    cJSON_AddItemToObject(o, "undisturbed_writes_per_s", series_json(&c->undisturbed_per_s));
    cJSON_AddItemToObject(o, "undisturbed_before_per_s", series_json(&c->before_per_s));
    cJSON_AddItemToObject(o, "undisturbed_after_per_s", series_json(&c->after_per_s));
    cJSON_AddItemToObject(o, "drift_after_over_before", series_json(&c->drift));
    cJSON_AddNumberToObject(o, "unsteady_repetitions", c->unsteady);
    cJSON_AddItemToObject(o, "report_spacing_ms", series_json(&c->report_spacing_ms));
    static const char *const stages[BENCH_COST_STAGES] = {"request_to_resume", "resume_to_captured",
                                                          "captured_to_ready", "ready_to_tail_end"};
    cJSON *split = cJSON_AddObjectToObject(o, "lost_ms_by_stage");
    for (unsigned stage = 0; stage < BENCH_COST_STAGES; stage++)
        cJSON_AddItemToObject(split, stages[stage], series_json(&c->stage_lost_ms[stage]));
    return o;
}

static cJSON *pause_json(const struct pause_figures *p)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddItemToObject(o, "window_ms", series_json(&p->window_ms));
    cJSON_AddItemToObject(o, "engine_part_ms", series_json(&p->engine_ms));
    cJSON_AddItemToObject(o, "protect_in_pause_ms", series_json(&p->protect_ms));
    cJSON_AddItemToObject(o, "pause_request_ms", series_json(&p->pause_rpc_ms));
    cJSON_AddItemToObject(o, "snapshot_create_request_ms", series_json(&p->vmstate_rpc_ms));
    cJSON_AddItemToObject(o, "resume_request_ms", series_json(&p->resume_rpc_ms));
    cJSON_AddItemToObject(o, "vmm_pause_ms", series_json(&p->vmm_pause_ms));
    cJSON_AddItemToObject(o, "vmm_snapshot_ms", series_json(&p->vmm_snapshot_ms));
    cJSON_AddItemToObject(o, "vmm_resume_ms", series_json(&p->vmm_resume_ms));
    cJSON_AddItemToObject(o, "vcpu_run_delay_max_ms", series_json(&p->vcpu_wait_ms));
    cJSON_AddItemToObject(o, "prearm_ms", series_json(&p->prearm_ms));
    cJSON_AddItemToObject(o, "rearmed_pages", series_json(&p->rearmed_pages));
    return o;
}

cJSON *size_json(const struct size_result *r)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "mem_mib", r->mem_mib);
    cJSON_AddStringToObject(o, "workload", bench_workload_names[r->workload]);
    cJSON_AddBoolToObject(o, "huge_pages", r->huge_pages);
    cJSON_AddNumberToObject(o, "seed", r->seed);
    cJSON_AddItemToObject(o, "orders", orders_json(r));
    cJSON *cost = cJSON_AddObjectToObject(o, "guest_cost");
    for (unsigned row = 0; row < r->cost_rows; row++)
        cJSON_AddItemToObject(cost, r->cost_names[row], cost_json(&r->cost[row]));
    cJSON_AddItemToObject(o, "plain_copy_ms", series_json(&r->copy_ms));
    cJSON_AddItemToObject(o, "goals", goals_json(r));
    cJSON_AddNumberToObject(o, "regions", r->regions);
    cJSON_AddNumberToObject(o, "repetitions", r->reps);
    cJSON_AddNumberToObject(o, "seed_boot_s", r->boot_s);
    cJSON *pause = cJSON_AddObjectToObject(o, "pause");
    for (int m = 0; m < MODE_COUNT; m++)
        cJSON_AddItemToObject(pause, mode_names[m], pause_json(&r->pause[m]));
    cJSON_AddItemToObject(pause, "ratio_full_over_live", series_json(&r->full_over_live));
    cJSON *copy = cJSON_AddObjectToObject(o, "copy");
    cJSON_AddItemToObject(copy, "engine_mb_s", series_json(&r->copy_mb_s));
    cJSON_AddItemToObject(copy, "baseline_mb_s", series_json(&r->baseline_mb_s));
    cJSON_AddItemToObject(copy, "ratio", series_json(&r->copy_ratio));
    cJSON *faults = cJSON_AddObjectToObject(o, "fault_service");
    cJSON_AddItemToObject(faults, "engine_p50_us", series_json(&r->fault_p50_us));
    cJSON_AddItemToObject(faults, "engine_p99_us", series_json(&r->fault_p99_us));
    cJSON_AddItemToObject(faults, "engine_max_us", series_json(&r->fault_max_us));
    cJSON_AddItemToObject(faults, "engine_faults", series_json(&r->faults_served));
    cJSON_AddItemToObject(faults, "engine_faults_on_bulk_claimed_pages",
                          series_json(&r->faults_on_bulk));
    cJSON_AddItemToObject(faults, "null_p50_us", series_json(&r->null_p50_us));
    cJSON_AddItemToObject(faults, "null_p99_us", series_json(&r->null_p99_us));
    cJSON_AddItemToObject(faults, "null_max_us", series_json(&r->null_max_us));
    cJSON_AddItemToObject(faults, "null_exact_p50_us", series_json(&r->null_exact_p50_us));
    cJSON_AddItemToObject(faults, "null_faults", series_json(&r->null_faults));
    cJSON_AddItemToObject(faults, "ratio_p50", series_json(&r->fault_ratio_p50));
    cJSON_AddItemToObject(faults, "ratio_p99", series_json(&r->fault_ratio_p99));
    cJSON *rate = cJSON_AddObjectToObject(o, "guest_write_rate");
    cJSON_AddItemToObject(rate, "no_branch_per_s", series_json(&r->rate_idle));
    cJSON_AddItemToObject(rate, "during_copy_per_s", series_json(&r->rate_copy));
    cJSON_AddItemToObject(rate, "ratio", series_json(&r->rate_ratio));
    cJSON_AddItemToObject(rate, "during_null_handler_per_s", series_json(&r->rate_null));
    return o;
}

static double median_ratio(const struct series *a, const struct series *b)
{
    return a->count && b->count ? series_median(a) / series_median(b) : NAN;
}

void report_cross_size(const struct size_result *results, size_t count, cJSON *json)
{
    const struct size_result *small = NULL, *large = NULL;
    for (size_t i = 0; i < count; i++) {
        if (!small || results[i].mem_mib < small->mem_mib)
            small = &results[i];
        if (!large || results[i].mem_mib > large->mem_mib)
            large = &results[i];
    }
    if (!small || small == large)
        return;
    printf("\n== LIVE pause, %u MiB / %u MiB (ratio of medians) ==\n", large->mem_mib,
           small->mem_mib);
    cJSON *o = cJSON_AddObjectToObject(json, "live_pause_large_over_small");
    cJSON_AddNumberToObject(o, "large_mib", large->mem_mib);
    cJSON_AddNumberToObject(o, "small_mib", small->mem_mib);
    for (int m = 0; m < MODE_FULL; m++) {
        double window = median_ratio(&large->pause[m].window_ms, &small->pause[m].window_ms);
        double engine = median_ratio(&large->pause[m].engine_ms, &small->pause[m].engine_ms);
        printf("  %-14s window %.2fx   engine's part %.2fx\n", mode_names[m], window, engine);
        cJSON *mode = cJSON_AddObjectToObject(o, mode_names[m]);
        cJSON_AddNumberToObject(mode, "window", window);
        cJSON_AddNumberToObject(mode, "engine_part", engine);
    }
}

void report_fanout(const struct fanout_result *results, size_t count)
{
    printf("\n== Fan-out: forks of the 256 MiB LIVE snapshot ==\n");
    printf("  %-6s %5s %10s %11s %9s %9s %9s %9s\n", "backend", "forks", "spawn ms", "running ms",
           "MiB/fork", "VMM Pss", "memfd", "template");
    for (size_t i = 0; i < count; i++) {
        const struct fanout_result *r = &results[i];
        if (r->error) {
            printf("  %-6s %5u  not measured: %s\n", r->backend, r->forks, r->message);
            continue;
        }
        printf("  %-7s %5u %10.1f %11.1f %9.1f %9.1f %9.1f %9.1f\n", r->backend, r->forks,
               r->spawn_ms, r->running_ms, r->pss_mib_per_fork, r->vmm_pss_mib, r->memfd_mib,
               r->template_mib);
    }
    printf("\n== Page server (UFFD forks) ==\n");
    printf("  %5s %12s %10s %10s %10s %10s\n", "forks", "faults/s", "p50 us", "p99 us", "max us",
           "faults");
    for (size_t i = 0; i < count; i++) {
        const struct fanout_result *r = &results[i];
        if (r->has_page_server)
            printf("  %5u %12.0f %10.1f %10.1f %10.1f %10llu\n", r->forks, r->ps_faults_per_s,
                   r->ps_p50_us, r->ps_p99_us, r->ps_max_us, (unsigned long long)r->ps_faults);
    }
    fflush(stdout);
}

cJSON *fanout_json(const struct fanout_result *r)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "backend", r->backend);
    cJSON_AddNumberToObject(o, "forks", r->forks);
    if (r->error) {
        cJSON_AddStringToObject(o, "error", r->message);
        return o;
    }
    cJSON_AddNumberToObject(o, "spawn_ms", r->spawn_ms);
    cJSON_AddNumberToObject(o, "all_running_ms", r->running_ms);
    cJSON_AddNumberToObject(o, "memory_per_fork_mib", r->pss_mib_per_fork);
    cJSON_AddNumberToObject(o, "vmm_pss_total_mib", r->vmm_pss_mib);
    cJSON_AddNumberToObject(o, "vmm_pss_shmem_total_mib", r->vmm_shmem_mib);
    cJSON_AddNumberToObject(o, "memfd_allocated_total_mib", r->memfd_mib);
    cJSON_AddNumberToObject(o, "template_mapping_pss_mib", r->template_mib);
    if (r->has_page_server) {
        cJSON *ps = cJSON_AddObjectToObject(o, "page_server");
        cJSON_AddNumberToObject(ps, "faults_per_s", r->ps_faults_per_s);
        cJSON_AddNumberToObject(ps, "window_s", r->ps_window_s);
        cJSON_AddNumberToObject(ps, "faults_served", (double)r->ps_faults);
        cJSON_AddNumberToObject(ps, "service_p50_us", r->ps_p50_us);
        cJSON_AddNumberToObject(ps, "service_p99_us", r->ps_p99_us);
        cJSON_AddNumberToObject(ps, "service_max_us", r->ps_max_us);
    }
    return o;
}
