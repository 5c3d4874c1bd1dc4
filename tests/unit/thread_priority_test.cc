// Bounded real-time priority: a raised thread that keeps a core busy goes back to normal priority
// by itself, one that mostly blocks keeps SCHED_FIFO, and switching real-time off means no thread
// is ever raised. These tests run as root (forkd does), where SCHED_FIFO is allowed.
#include <gtest/gtest.h>

#include <chrono>
#include <pthread.h>
#include <sched.h>
#include <thread>

#include "test_time.h"

extern "C" {
#include "thread_priority.h"
}

namespace {

using Clock = std::chrono::steady_clock;

int CurrentPolicy()
{
    int policy = -1;
    struct sched_param param;
    pthread_getschedparam(pthread_self(), &policy, &param);
    return policy;
}

class ThreadPriority : public ::testing::Test {
  protected:
    void TearDown() override { thread_priority_configure(true, 50); }
};

}  // namespace

TEST_F(ThreadPriority, SwitchedOffNothingIsRaised)
{
    thread_priority_configure(false, 50);
    std::thread([] {
        struct thread_priority saved;
        EXPECT_EQ(-ECANCELED, thread_priority_raise(&saved));
        EXPECT_FALSE(saved.raised);
        EXPECT_EQ(SCHED_OTHER, CurrentPolicy());
        EXPECT_FALSE(thread_priority_check(&saved));
    }).join();
}

TEST_F(ThreadPriority, ASpinningThreadIsDemoted)
{
    thread_priority_configure(true, 30);
    unsigned long demotions_before = thread_priority_demotions();
    std::thread([] {
        struct thread_priority saved;
        ASSERT_EQ(0, thread_priority_raise(&saved)) << "SCHED_FIFO needs root";
        EXPECT_EQ(SCHED_FIFO, CurrentPolicy());
        auto guard = Clock::now() + scaled(std::chrono::seconds(20));
        volatile unsigned long work = 0;
        while (thread_priority_check(&saved) && Clock::now() < guard)
            for (int i = 0; i < 100000; i++)
                work = work + 1;
        EXPECT_FALSE(saved.raised) << "still SCHED_FIFO after spinning for the whole guard time";
        EXPECT_EQ(SCHED_OTHER, CurrentPolicy());
    }).join();
    EXPECT_EQ(demotions_before + 1, thread_priority_demotions());
}

TEST_F(ThreadPriority, AThreadThatMostlyBlocksStaysRaised)
{
    thread_priority_configure(true, 50);
    unsigned long demotions_before = thread_priority_demotions();
    std::thread([] {
        struct thread_priority saved;
        ASSERT_EQ(0, thread_priority_raise(&saved)) << "SCHED_FIFO needs root";
        // Several usage windows of blocking: the thread uses next to no CPU.
        auto end = Clock::now() + std::chrono::milliseconds(450);
        while (Clock::now() < end) {
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
            EXPECT_TRUE(thread_priority_check(&saved));
        }
        EXPECT_EQ(SCHED_FIFO, CurrentPolicy());
        thread_priority_restore(&saved);
        EXPECT_EQ(SCHED_OTHER, CurrentPolicy());
    }).join();
    EXPECT_EQ(demotions_before, thread_priority_demotions());
}
