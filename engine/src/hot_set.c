/* A snapshot's hot set: building it, and the chunks it touches (see hot_set.h). */
#include "hot_set.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define HOT_SET_PAGE 4096ULL

static int hot_set_compare_runs(const void *a, const void *b)
{
    const struct store_hot_range *x = a, *y = b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static int hot_set_compare_gaps(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static uint64_t hot_set_end(const struct store_hot_range *run)
{
    return run->offset + run->length;
}

/* Merges the sorted runs that touch or overlap, in place; returns how many are left. */
static size_t hot_set_merge(struct store_hot_range *runs, size_t count)
{
    size_t kept = 0;
    for (size_t i = 0; i < count; i++) {
        struct store_hot_range *last = kept ? &runs[kept - 1] : NULL;
        if (last && runs[i].offset <= hot_set_end(last)) {
            if (hot_set_end(&runs[i]) > hot_set_end(last))
                last->length = hot_set_end(&runs[i]) - last->offset;
            continue;
        }
        runs[kept++] = runs[i];
    }
    return kept;
}

/* Joins runs across their smallest gaps (sorted, apart runs) until STORE_MAX_HOT_RANGES are
 * left: of all the ways to fit the bound, the one that adds the fewest bytes. */
static int hot_set_close_gaps(struct store_hot_range *runs, size_t *count)
{
    size_t n = *count;
    if (n <= STORE_MAX_HOT_RANGES)
        return 0;
    uint64_t *gaps = malloc((n - 1) * sizeof(*gaps));
    if (!gaps)
        return -ENOMEM;
    for (size_t i = 1; i < n; i++)
        gaps[i - 1] = runs[i].offset - hot_set_end(&runs[i - 1]);
    qsort(gaps, n - 1, sizeof(*gaps), hot_set_compare_gaps);
    size_t to_close = n - STORE_MAX_HOT_RANGES;
    uint64_t widest = gaps[to_close - 1]; /* every gap below it closes, and enough of its size */
    size_t below = 0;
    for (size_t i = 0; i < to_close; i++)
        below += gaps[i] < widest;
    free(gaps);
    size_t of_widest = to_close - below;
    for (size_t i = 1; i < n; i++) {
        uint64_t gap = runs[i].offset - hot_set_end(&runs[i - 1]);
        bool close = gap < widest || (gap == widest && of_widest > 0);
        if (gap == widest && close)
            of_widest--;
        if (close) { /* reaches back over the gap; merged below */
            runs[i].length += gap;
            runs[i].offset -= gap;
        }
    }
    *count = hot_set_merge(runs, n);
    return 0;
}

int hot_set_build(struct store_hot_range *runs, size_t count, uint64_t memory_bytes,
                  struct store_hot_range *out, size_t *out_count)
{
    *out_count = 0;
    uint64_t limit = memory_bytes / HOT_SET_PAGE * HOT_SET_PAGE;
    size_t kept = 0;
    for (size_t i = 0; i < count; i++) {
        if (runs[i].length == 0 || runs[i].offset >= limit)
            continue;
        uint64_t length =
            runs[i].length < limit - runs[i].offset ? runs[i].length : limit - runs[i].offset;
        runs[kept++] = (struct store_hot_range){runs[i].offset, length};
    }
    if (kept > 1)
        qsort(runs, kept, sizeof(*runs), hot_set_compare_runs);
    kept = hot_set_merge(runs, kept);
    int rc = hot_set_close_gaps(runs, &kept);
    if (rc < 0)
        return rc;
    memcpy(out, runs, kept * sizeof(*runs));
    *out_count = kept;
    return 0;
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
