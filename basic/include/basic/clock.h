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
/* The same on CLOCK_MONOTONIC, for condition variables set to that clock. */
struct timespec forkd_monotonic_after_ms(int64_t timeout_ms);

/* Deadlines: a CLOCK_MONOTONIC instant in ns, or FORKD_NO_DEADLINE. */
#define FORKD_NO_DEADLINE UINT64_MAX

/* The deadline timeout_ms from now; FORKD_NO_DEADLINE when timeout_ms is negative. */
uint64_t forkd_deadline_after_ms(int64_t timeout_ms);

/* Milliseconds left until deadline, as poll() takes them: -1 for FORKD_NO_DEADLINE, 0 once
 * passed, rounded up (a wait never ends just short of the deadline), at most INT_MAX. */
int forkd_ms_left(uint64_t deadline);

#ifdef __cplusplus
}
#endif

#endif
