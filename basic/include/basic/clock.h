/* Clocks: monotonic durations, wall-clock timestamps, and deadlines for condition waits. */
#ifndef FORKD_CLOCK_H
#define FORKD_CLOCK_H

#include <stdint.h>
#include <time.h>

#ifdef __cplusplus
extern "C" {
#endif

/* CLOCK_MONOTONIC in nanoseconds: for durations. */
uint64_t forkd_monotonic_ns(void);

/* Wall-clock time in Unix epoch milliseconds: for records users read. */
int64_t forkd_unix_ms(void);

/* The CLOCK_REALTIME instant timeout_ms from now (negative counts as 0), as
 * pthread_cond_timedwait wants it. */
struct timespec forkd_realtime_after_ms(int64_t timeout_ms);

#ifdef __cplusplus
}
#endif

#endif
