// Guard timeouts for tests that scale with the machine. A test never asserts how fast something
// is; it only waits for a condition, and gives up after a guard time. On a slow machine (the
// nested-KVM runner emulates the CPU, and sets FORKD_TIME_SCALE) the guard grows by that factor,
// so a slow machine is slow, not red.
#ifndef FORKD_TEST_TIME_H
#define FORKD_TEST_TIME_H

#include <chrono>
#include <cstdlib>

// FORKD_TIME_SCALE from the environment: a factor of at least 1 (1 when unset or malformed).
inline double forkd_time_scale()
{
    const char *text = std::getenv("FORKD_TIME_SCALE");
    if (!text)
        return 1.0;
    char *end = nullptr;
    double value = std::strtod(text, &end);
    return end != text && value >= 1.0 && value <= 1000.0 ? value : 1.0;
}

// A guard duration scaled by forkd_time_scale().
template <typename Rep, typename Period>
std::chrono::duration<Rep, Period> scaled(std::chrono::duration<Rep, Period> guard)
{
    return std::chrono::duration<Rep, Period>(static_cast<Rep>(guard.count() * forkd_time_scale()));
}

// A guard in milliseconds, scaled, for C interfaces that take an int.
inline int scaled_ms(int guard_ms)
{
    return static_cast<int>(guard_ms * forkd_time_scale());
}

#endif
