/*
 * The latency histogram: fault service times of the branch's fault handler and of the page
 * server, and the benchmark's null handler (quantised the same way so ratios compare like with
 * like). Log-linear buckets: exact below 16 ns, then 8 per power of two (12.5% resolution).
 * Recording is lock-free and safe from any number of threads; a summary may be read at any time.
 */
#ifndef FORKD_LATENCY_H
#define FORKD_LATENCY_H

#include <stdatomic.h>
#include <stdint.h>

#define LATENCY_BUCKETS 496 /* 16 linear + 60 powers of two x 8 sub-buckets */

struct latency_histogram {
    atomic_uint_fast64_t buckets[LATENCY_BUCKETS];
    atomic_uint_fast64_t max_ns;
};

struct latency_summary {
    uint64_t count;
    uint64_t p50_ns, p99_ns; /* the bucket's upper bound, never above max_ns */
    uint64_t max_ns;
};

void latency_record(struct latency_histogram *histogram, uint64_t ns);
void latency_summarize(const struct latency_histogram *histogram, struct latency_summary *out);

/* The value a sample of ns is reported as: its bucket's upper bound. */
uint64_t latency_quantize(uint64_t ns);

#endif
