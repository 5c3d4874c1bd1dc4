/* The latency histogram (see latency.h). */
#include "latency.h"

static unsigned latency_bucket(uint64_t ns)
{
    if (ns < 16)
        return (unsigned)ns;
    unsigned exponent = 63u - (unsigned)__builtin_clzll(ns);
    unsigned sub = (unsigned)(ns >> (exponent - 3)) & 7u;
    return 16u + (exponent - 4u) * 8u + sub;
}

static uint64_t latency_bucket_upper(unsigned bucket)
{
    if (bucket < 16)
        return bucket;
    unsigned exponent = (bucket - 16u) / 8u + 4u, sub = (bucket - 16u) % 8u;
    return ((9ULL + sub) << (exponent - 3)) - 1; /* wraps to UINT64_MAX for the last one */
}

uint64_t latency_quantize(uint64_t ns)
{
    return latency_bucket_upper(latency_bucket(ns));
}

void latency_record(struct latency_histogram *histogram, uint64_t ns)
{
    atomic_fetch_add_explicit(&histogram->buckets[latency_bucket(ns)], 1, memory_order_relaxed);
    uint64_t max = atomic_load_explicit(&histogram->max_ns, memory_order_relaxed);
    while (ns > max &&
           !atomic_compare_exchange_weak_explicit(&histogram->max_ns, &max, ns,
                                                  memory_order_relaxed, memory_order_relaxed)) {
    }
}

/* The sample of rank ceil(count * permille / 1000), reported as its bucket's upper bound. */
static uint64_t latency_percentile(const uint64_t *buckets, uint64_t count, unsigned permille,
                                   uint64_t max_ns)
{
    if (count == 0)
        return 0;
    uint64_t rank = (count * permille + 999) / 1000, seen = 0;
    for (unsigned b = 0; b < LATENCY_BUCKETS; b++) {
        seen += buckets[b];
        if (seen >= rank)
            return latency_bucket_upper(b) < max_ns ? latency_bucket_upper(b) : max_ns;
    }
    return max_ns;
}

void latency_summarize(const struct latency_histogram *histogram, struct latency_summary *out)
{
    uint64_t buckets[LATENCY_BUCKETS], count = 0;
    for (unsigned b = 0; b < LATENCY_BUCKETS; b++)
        count += buckets[b] = atomic_load_explicit(&histogram->buckets[b], memory_order_relaxed);
    out->count = count;
    out->max_ns = atomic_load_explicit(&histogram->max_ns, memory_order_relaxed);
    out->p50_ns = latency_percentile(buckets, count, 500, out->max_ns);
    out->p99_ns = latency_percentile(buckets, count, 990, out->max_ns);
}
