/* Clocks (see forkd/clock.h). */
#include "basic/clock.h"

uint64_t forkd_monotonic_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000ULL + (uint64_t)now.tv_nsec;
}

int64_t forkd_unix_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

struct timespec forkd_realtime_after_ms(int64_t timeout_ms)
{
    struct timespec at;
    clock_gettime(CLOCK_REALTIME, &at);
    uint64_t ns = (uint64_t)at.tv_nsec + (uint64_t)(timeout_ms < 0 ? 0 : timeout_ms) * 1000000ULL;
    at.tv_sec += (time_t)(ns / 1000000000ULL);
    at.tv_nsec = (long)(ns % 1000000000ULL);
    return at;
}
