/* A snapshot's hot set: building it, and the chunks it touches (see hot_set.h). */
#include "hot_set.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define HOT_SET_PAGE 4096ULL

/* A run being coalesced: the bytes the guest wrote in it, gaps closed into it excluded. */
struct hot_set_run {
    uint64_t offset, length, written;
};

static int hot_set_compare_offsets(const void *a, const void *b)
{
    const struct store_hot_range *x = a, *y = b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static int hot_set_compare_gaps(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Most written first; the earlier of two alike. */
static int hot_set_compare_written(const void *a, const void *b)
{
    const struct hot_set_run *x = *(struct hot_set_run *const *)a,
                             *y = *(struct hot_set_run *const *)b;
    if (x->written != y->written)
        return x->written > y->written ? -1 : 1;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static uint64_t hot_set_end(const struct hot_set_run *run)
{
    return run->offset + run->length;
}

static uint64_t hot_set_gap(const struct hot_set_run *runs, size_t i)
{
    return runs[i].offset - hot_set_end(&runs[i - 1]);
}

/* The sorted ranges as runs, those that touch or overlap merged; returns how many. */
static size_t hot_set_runs(const struct store_hot_range *ranges, size_t count,
                           struct hot_set_run *runs)
{
    size_t n = 0;
    for (size_t i = 0; i < count; i++) {
        struct hot_set_run *last = n ? &runs[n - 1] : NULL;
        uint64_t end = ranges[i].offset + ranges[i].length;
        if (last && ranges[i].offset <= hot_set_end(last)) {
            if (end > hot_set_end(last)) {
                last->written += end - hot_set_end(last);
                last->length = end - last->offset;
            }
            continue;
        }
        runs[n++] = (struct hot_set_run){ranges[i].offset, ranges[i].length, ranges[i].length};
    }
    return n;
}

/* Joins runs across their smallest gaps, none wider than HOT_SET_MAX_GAP, until at most
 * STORE_MAX_HOT_RANGES are left or no such gap is: the fewest bytes added for the bound. */
static int hot_set_close_gaps(struct hot_set_run *runs, size_t *count)
{
    size_t n = *count;
    if (n <= STORE_MAX_HOT_RANGES)
        return 0;
    uint64_t *gaps = malloc((n - 1) * sizeof(*gaps));
    if (!gaps)
        return -ENOMEM;
    size_t narrow = 0;
    for (size_t i = 1; i < n; i++)
        if (hot_set_gap(runs, i) <= HOT_SET_MAX_GAP)
            gaps[narrow++] = hot_set_gap(runs, i);
    qsort(gaps, narrow, sizeof(*gaps), hot_set_compare_gaps);
    size_t to_close = n - STORE_MAX_HOT_RANGES < narrow ? n - STORE_MAX_HOT_RANGES : narrow;
    uint64_t widest = to_close ? gaps[to_close - 1] : 0; /* gaps below it close, and enough of it */
    size_t of_widest = 0;
    for (size_t i = 0; i < to_close; i++)
        of_widest += gaps[i] == widest;
    free(gaps);
    size_t kept = to_close ? 1 : n;
    for (size_t i = 1; to_close && i < n; i++) {
        uint64_t gap = hot_set_gap(runs, i);
        bool close = gap < widest || (gap == widest && of_widest > 0);
        of_widest -= close && gap == widest;
        if (!close) {
            runs[kept++] = runs[i];
            continue;
        }
        runs[kept - 1].length = hot_set_end(&runs[i]) - runs[kept - 1].offset;
        runs[kept - 1].written += runs[i].written;
    }
    *count = kept;
    return 0;
}

/* Keeps the STORE_MAX_HOT_RANGES runs the guest wrote most in, in file order. */
static int hot_set_keep_densest(struct hot_set_run *runs, size_t *count)
{
    size_t n = *count;
    if (n <= STORE_MAX_HOT_RANGES)
        return 0;
    struct hot_set_run **order = malloc(n * sizeof(*order));
    if (!order)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++)
        order[i] = &runs[i];
    qsort(order, n, sizeof(*order), hot_set_compare_written);
    for (size_t i = STORE_MAX_HOT_RANGES; i < n; i++)
        order[i]->length = 0; /* dropped */
    free(order);
    size_t kept = 0;
    for (size_t i = 0; i < n; i++)
        if (runs[i].length)
            runs[kept++] = runs[i];
    *count = kept;
    return 0;
}

int hot_set_build(struct store_hot_range *ranges, size_t count, uint64_t memory_bytes,
                  struct store_hot_range *out, size_t *out_count)
{
    *out_count = 0;
    uint64_t limit = memory_bytes / HOT_SET_PAGE * HOT_SET_PAGE;
    size_t kept = 0;
    for (size_t i = 0; i < count; i++) {
        if (ranges[i].length == 0 || ranges[i].offset >= limit)
            continue;
        uint64_t room = limit - ranges[i].offset;
        ranges[kept++] = (struct store_hot_range){
            ranges[i].offset, ranges[i].length < room ? ranges[i].length : room};
    }
    if (kept > 1)
        qsort(ranges, kept, sizeof(*ranges), hot_set_compare_offsets);
    struct hot_set_run *runs = malloc((kept ? kept : 1) * sizeof(*runs));
    if (!runs)
        return -ENOMEM;
    size_t n = hot_set_runs(ranges, kept, runs);
    int rc = hot_set_close_gaps(runs, &n);
    if (rc == 0)
        rc = hot_set_keep_densest(runs, &n);
    for (size_t i = 0; rc == 0 && i < n; i++)
        out[i] = (struct store_hot_range){runs[i].offset, runs[i].length};
    if (rc == 0)
        *out_count = n;
    free(runs);
    return rc;
}

uint64_t hot_set_chunks(const struct store_snapshot *meta, uint64_t chunk_size,
                        uint64_t chunk_count, uint64_t *out)
{
    uint64_t n = 0;
    for (size_t i = 0; i < meta->hot_count; i++) {
        const struct store_hot_range *r = &meta->hot[i];
        if (r->length == 0)
            continue;
        uint64_t last = (r->offset + r->length - 1) / chunk_size;
        for (uint64_t c = r->offset / chunk_size; c <= last && c < chunk_count; c++)
            if (n == 0 || out[n - 1] < c)
                out[n++] = c;
    }
    return n;
}
