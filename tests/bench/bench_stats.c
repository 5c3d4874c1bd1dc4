/* Repeated measurements, percentiles, clocks, and the seeded stream that orders the rows. */
#include "bench.h"

#include "pause.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void series_add(struct series *series, double value)
{
    if (series->count < BENCH_MAX_REPS)
        series->values[series->count++] = value;
}

static int compare_doubles(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

double series_median(const struct series *series)
{
    if (!series->count)
        return NAN;
    double sorted[BENCH_MAX_REPS];
    memcpy(sorted, series->values, series->count * sizeof(double));
    qsort(sorted, series->count, sizeof(double), compare_doubles);
    unsigned mid = series->count / 2;
    return series->count % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

double series_min(const struct series *series)
{
    double min = series->count ? series->values[0] : NAN;
    for (unsigned i = 1; i < series->count; i++)
        if (series->values[i] < min)
            min = series->values[i];
    return min;
}

double series_max(const struct series *series)
{
    double max = series->count ? series->values[0] : NAN;
    for (unsigned i = 1; i < series->count; i++)
        if (series->values[i] > max)
            max = series->values[i];
    return max;
}

cJSON *series_json(const struct series *series)
{
    if (!series->count)
        return cJSON_CreateNull();
    cJSON *object = cJSON_CreateObject();
    cJSON_AddNumberToObject(object, "median", series_median(series));
    cJSON_AddNumberToObject(object, "min", series_min(series));
    cJSON_AddNumberToObject(object, "max", series_max(series));
    cJSON_AddNumberToObject(object, "n", series->count);
    cJSON_AddItemToObject(object, "values",
                          cJSON_CreateDoubleArray(series->values, (int)series->count));
    return object;
}

uint64_t bench_percentile(const uint64_t *sorted, size_t count, double percentile)
{
    if (!count)
        return 0;
    size_t rank = (size_t)ceil(percentile / 100.0 * (double)count);
    return sorted[rank ? rank - 1 : 0];
}

uint64_t bench_now_ns(void)
{
    return forkd_monotonic_ns(); /* the engine's clock, so our windows line up with its figures */
}

void bench_sleep_ms(unsigned ms)
{
    struct timespec pause = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&pause, &pause) < 0 && errno == EINTR) {
    }
}

uint64_t bench_random_next(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void bench_shuffle(uint64_t *state, unsigned *items, unsigned count)
{
    for (unsigned i = count; i > 1; i--) {
        /* An index below i from the high bits: no modulo bias worth the name for small i. */
        unsigned j = (unsigned)(((unsigned __int128)bench_random_next(state) * i) >> 64);
        unsigned item = items[i - 1];
        items[i - 1] = items[j];
        items[j] = item;
    }
}
