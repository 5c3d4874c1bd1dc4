/* Clocks (see forkd/clock.h). */
#include "basic/clock.h"

#include <limits.h>

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

static struct timespec clock_after_ms(clockid_t clock, int64_t timeout_ms)
{
    struct timespec at;
    clock_gettime(clock, &at);
    uint64_t ns = (uint64_t)at.tv_nsec + (uint64_t)(timeout_ms < 0 ? 0 : timeout_ms) * 1000000ULL;
    at.tv_sec += (time_t)(ns / 1000000000ULL);
    at.tv_nsec = (long)(ns % 1000000000ULL);
    return at;
}

struct timespec forkd_realtime_after_ms(int64_t timeout_ms)
{
    return clock_after_ms(CLOCK_REALTIME, timeout_ms);
}

struct timespec forkd_monotonic_after_ms(int64_t timeout_ms)
{
    return clock_after_ms(CLOCK_MONOTONIC, timeout_ms);
}

uint64_t forkd_deadline_after_ms(int64_t timeout_ms)
{
    if (timeout_ms < 0)
        return FORKD_NO_DEADLINE;
    return forkd_monotonic_ns() + (uint64_t)timeout_ms * 1000000ULL;
}

int forkd_ms_left(uint64_t deadline)
{
    if (deadline == FORKD_NO_DEADLINE)
        return -1;
    uint64_t now = forkd_monotonic_ns();
    if (now >= deadline)
        return 0;
    uint64_t ms = (deadline - now + 999999) / 1000000;
    return ms > INT_MAX ? INT_MAX : (int)ms;
}
