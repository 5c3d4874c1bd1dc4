/*
 * What a branch costs the guest, from the test VMM's log of progress reports (GET /progress):
 * each vCPU reports its running total every report_us, timed by the host as it arrives, so
 * the work done between any two reports is exact, and a vCPU that cannot run reports nothing
 * (its next report comes late, with little progress since the last one).
 */
#include "bench.h"

#include "basic/cleanup.h"
#include "vmm_client.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STALL_FRACTION 0.1 /* a vCPU below this share of its undisturbed rate is stalled */

static int log_append(struct progress_series *series, uint64_t at_ns, uint64_t progress)
{
    if (series->count == series->capacity) {
        size_t capacity = series->capacity ? series->capacity * 2 : 4096;
        uint64_t *at = realloc(series->at_ns, capacity * sizeof(*at));
        if (at)
            series->at_ns = at;
        uint64_t *value = at ? realloc(series->progress, capacity * sizeof(*value)) : NULL;
        if (!value)
            return -ENOMEM;
        series->progress = value;
        series->capacity = capacity;
    }
    series->at_ns[series->count] = at_ns;
    series->progress[series->count++] = progress;
    return 0;
}

/* Appends one page of the answer; *next is where the next page starts, 0 when none is left. */
static int log_add_page(struct progress_log *log, const cJSON *root, uint64_t *next)
{
    const cJSON *vcpus = cJSON_GetObjectItemCaseSensitive(root, "vcpus");
    bool more = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "more"));
    *next = 0;
    unsigned index = 0;
    const cJSON *vcpu;
    cJSON_ArrayForEach(vcpu, vcpus)
    {
        if (index >= BENCH_MAX_VCPUS)
            break;
        struct progress_series *series = &log->vcpus[index++];
        const cJSON *at = cJSON_GetObjectItemCaseSensitive(vcpu, "at_ns");
        const cJSON *progress = cJSON_GetObjectItemCaseSensitive(vcpu, "progress");
        int n = cJSON_GetArraySize(at);
        if (n != cJSON_GetArraySize(progress))
            return -EPROTO;
        for (int i = 0; i < n; i++) {
            uint64_t t = (uint64_t)cJSON_GetArrayItem(at, i)->valuedouble;
            uint64_t p = (uint64_t)cJSON_GetArrayItem(progress, i)->valuedouble;
            if (series->count && t <= series->at_ns[series->count - 1])
                continue; /* seen on an earlier page */
            if (log_append(series, t, p) < 0)
                return -ENOMEM;
        }
        /* A vCPU that filled its page continues from its last report. */
        if (more && n > 0) {
            uint64_t last = series->at_ns[series->count - 1];
            if (!*next || last < *next)
                *next = last;
        }
    }
    log->vcpu_count = index;
    return 0;
}

int guest_read_progress_log(struct vmm_client *client, uint64_t since_ns, struct progress_log *out,
                            struct forkd_error *err)
{
    memset(out, 0, sizeof(*out));
    for (uint64_t since = since_ns;;) {
        char path[64];
        snprintf(path, sizeof(path), "/progress/%" PRIu64, since);
        _cleanup_free_ char *body = NULL;
        int rc = vmm_request(client, "GET", path, NULL, &body, err);
        if (rc < 0)
            return rc;
        cJSON *root = cJSON_Parse(body);
        if (!root)
            return forkd_error_set(err, -EPROTO, "GET %s: not JSON", path);
        uint64_t next = 0;
        rc = log_add_page(out, root, &next);
        cJSON_Delete(root);
        if (rc < 0)
            return forkd_error_set(err, rc, "GET %s: %s", path, strerror(-rc));
        if (!next)
            return 0;
        since = next;
    }
}

void progress_log_free(struct progress_log *log)
{
    for (unsigned i = 0; i < BENCH_MAX_VCPUS; i++) {
        free(log->vcpus[i].at_ns);
        free(log->vcpus[i].progress);
    }
    memset(log, 0, sizeof(*log));
}

/* The last report at or before t, or -1. */
static long report_before(const struct progress_series *s, uint64_t t)
{
    long found = -1;
    for (size_t i = 0; i < s->count && s->at_ns[i] <= t; i++)
        found = (long)i;
    return found;
}

/* The first report at or after t, or -1. */
static long report_after(const struct progress_series *s, uint64_t t)
{
    for (size_t i = 0; i < s->count; i++)
        if (s->at_ns[i] >= t)
            return (long)i;
    return -1;
}

/* Longest run of consecutive report intervals in [a, b] below STALL_FRACTION of rate; *start_ns
 * is where it began (the report before its first interval). */
static double longest_stall_ns(const struct progress_series *s, long a, long b, double rate,
                               uint64_t *start_ns)
{
    double longest = 0, current = 0;
    long current_from = a;
    *start_ns = s->at_ns[a];
    for (long i = a; i < b; i++) {
        double dt = (double)(s->at_ns[i + 1] - s->at_ns[i]);
        double dp = (double)(s->progress[i + 1] - s->progress[i]);
        if (dp >= STALL_FRACTION * rate * dt) {
            current = 0;
            continue;
        }
        if (current == 0)
            current_from = i;
        current += dt;
        if (current > longest) {
            longest = current;
            *start_ns = s->at_ns[current_from];
        }
    }
    return longest;
}

/* One vCPU's rate over the reports inside [from, to], widened to the last three reports before
 * `to` when they are sparser than the window. */
static int vcpu_rate(const struct progress_series *s, uint64_t from, uint64_t to,
                     double *rate_per_ns, double *spacing_ns)
{
    long i0 = report_after(s, from), i1 = report_before(s, to);
    if (i1 >= 2 && (i0 < 0 || i1 - i0 < 2))
        i0 = i1 - 2;
    if (i0 < 0 || i1 <= i0)
        return -ENODATA;
    double rate =
        (double)(s->progress[i1] - s->progress[i0]) / (double)(s->at_ns[i1] - s->at_ns[i0]);
    if (rate <= 0)
        return -ENODATA;
    *rate_per_ns = rate;
    *spacing_ns = (double)(s->at_ns[i1] - s->at_ns[i0]) / (double)(i1 - i0);
    return 0;
}

/* Where the reports of a vCPU lie against a window, for an error that says why it had too few. */
static int no_reports(struct forkd_error *err, const char *what, unsigned vcpu,
                      const struct progress_series *s, uint64_t from, uint64_t to)
{
    return forkd_error_set(err, -ENODATA,
                           "%s: vCPU %u: %zu reports from %+.0f to %+.0f ms of the window's "
                           "start, which lasted %.0f ms",
                           what, vcpu, s->count,
                           s->count ? ((double)s->at_ns[0] - (double)from) / 1e6 : 0,
                           s->count ? ((double)s->at_ns[s->count - 1] - (double)from) / 1e6 : 0,
                           (double)(to - from) / 1e6);
}

int guest_rates_compute(const struct progress_log *log, uint64_t from, uint64_t to,
                        struct guest_rates *out, struct forkd_error *err)
{
    memset(out, 0, sizeof(*out));
    if (!log->vcpu_count)
        return forkd_error_set(err, -ENODATA, "no vCPU progress reports");
    for (unsigned v = 0; v < log->vcpu_count; v++)
        if (vcpu_rate(&log->vcpus[v], from, to, &out->per_ns[v], &out->spacing_ns[v]) < 0)
            return no_reports(err, "undisturbed rate", v, &log->vcpus[v], from, to);
    out->vcpu_count = log->vcpu_count;
    return 0;
}

void guest_rates_mean(const struct guest_rates *a, const struct guest_rates *b,
                      struct guest_rates *out)
{
    *out = *a;
    for (unsigned v = 0; v < a->vcpu_count && v < b->vcpu_count; v++) {
        out->per_ns[v] = (a->per_ns[v] + b->per_ns[v]) / 2;
        out->spacing_ns[v] = (a->spacing_ns[v] + b->spacing_ns[v]) / 2;
    }
}

double guest_rates_per_s(const struct guest_rates *rates)
{
    double total = 0;
    for (unsigned v = 0; v < rates->vcpu_count; v++)
        total += rates->per_ns[v] * 1e9;
    return total;
}

/* One vCPU, over the reports that enclose [from, to]: lost = elapsed - progress / rate (the
 * telescoped sum of (1 - rate_i/rate) dt_i), and the longest stall. */
static int vcpu_cost(const struct progress_series *s, double rate, uint64_t from, uint64_t to,
                     double *lost_ns, double *stall_ns, uint64_t *stall_start_ns)
{
    long a = report_before(s, from), b = report_after(s, to);
    if (b < 0) /* no report yet after the end: the last one is as close as we know */
        b = (long)s->count - 1;
    if (a < 0 || b <= a)
        return -ENODATA;
    double elapsed = (double)(s->at_ns[b] - s->at_ns[a]);
    *lost_ns = elapsed - (double)(s->progress[b] - s->progress[a]) / rate;
    *stall_ns = longest_stall_ns(s, a, b, rate, stall_start_ns);
    return 0;
}

int guest_cost_compute(const struct progress_log *log, const struct guest_rates *undisturbed,
                       uint64_t from, uint64_t to, struct guest_cost *out, struct forkd_error *err)
{
    memset(out, 0, sizeof(*out));
    if (!log->vcpu_count || log->vcpu_count != undisturbed->vcpu_count)
        return forkd_error_set(err, -ENODATA, "%u vCPUs reported progress, %u have a rate",
                               log->vcpu_count, undisturbed->vcpu_count);
    for (unsigned v = 0; v < log->vcpu_count; v++) {
        double lost, stall;
        uint64_t stall_start;
        const struct progress_series *s = &log->vcpus[v];
        if (vcpu_cost(s, undisturbed->per_ns[v], from, to, &lost, &stall, &stall_start) < 0)
            return no_reports(err, "the branch", v, s, from, to);
        out->lost_ms += lost / 1e6 / log->vcpu_count; /* per vCPU: a pause of X costs X */
        if (stall / 1e6 > out->stall_ms) {
            out->stall_ms = stall / 1e6;
            out->stall_start_ns = stall_start;
        }
        out->report_spacing_ms += undisturbed->spacing_ns[v] / 1e6 / log->vcpu_count;
    }
    out->window_ms = (double)(to - from) / 1e6;
    return 0;
}
