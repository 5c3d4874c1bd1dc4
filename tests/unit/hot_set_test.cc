// A snapshot's hot set: built from written pages (merged, coalesced to the bound across the
// narrowest gaps, the sparsest ranges dropped when that is not enough), and the chunks it
// touches.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

extern "C" {
#include "hot_set.h"
}

namespace
{

constexpr uint64_t kPage = 4096;
constexpr uint64_t kChunk = 2 << 20;

std::vector<store_hot_range> Build(std::vector<store_hot_range> runs, uint64_t memory_bytes)
{
    std::vector<store_hot_range> out(STORE_MAX_HOT_RANGES);
    size_t n = 0;
    EXPECT_EQ(0, hot_set_build(runs.data(), runs.size(), memory_bytes, out.data(), &n));
    out.resize(n);
    return out;
}

bool Covers(const std::vector<store_hot_range> &set, uint64_t offset)
{
    for (const auto &r : set)
        if (offset >= r.offset && offset - r.offset < r.length)
            return true;
    return false;
}

// What the store accepts: sorted, apart, aligned, non-empty, within memory.
void ExpectValid(const std::vector<store_hot_range> &set, uint64_t memory_bytes)
{
    ASSERT_LE(set.size(), (size_t)STORE_MAX_HOT_RANGES);
    for (size_t i = 0; i < set.size(); i++) {
        EXPECT_EQ(0u, set[i].offset % kPage) << i;
        EXPECT_EQ(0u, set[i].length % kPage) << i;
        EXPECT_GT(set[i].length, 0u) << i;
        EXPECT_LE(set[i].offset + set[i].length, memory_bytes) << i;
        if (i > 0) {
            EXPECT_GT(set[i].offset, set[i - 1].offset + set[i - 1].length) << i;
        }
    }
}

TEST(HotSet, PagesInAnyOrderAreSortedAndAdjacentOnesMerged)
{
    // Pages 7, 3, 4, 5 (twice), 9 and a 2 MiB page at 4 MiB.
    auto set = Build({{7 * kPage, kPage},
                      {3 * kPage, kPage},
                      {5 * kPage, kPage},
                      {4 * kPage, kPage},
                      {5 * kPage, kPage},
                      {9 * kPage, kPage},
                      {2 * kChunk, kChunk}},
                     16 << 20);
    ASSERT_EQ(4u, set.size());
    EXPECT_EQ(3 * kPage, set[0].offset);
    EXPECT_EQ(3 * kPage, set[0].length);
    EXPECT_EQ(7 * kPage, set[1].offset);
    EXPECT_EQ(kPage, set[1].length);
    EXPECT_EQ(9 * kPage, set[2].offset);
    EXPECT_EQ(2 * kChunk, set[3].offset);
    EXPECT_EQ(kChunk, set[3].length);
    ExpectValid(set, 16 << 20);
}

TEST(HotSet, TooManyRunsAreCoalescedToTheBoundAndKeepEveryPage)
{
    const uint64_t memory = 1ULL << 30;
    std::mt19937_64 random(7);
    std::vector<store_hot_range> pages;
    for (int i = 0; i < 20000; i++)
        pages.push_back({random() % (memory / kPage) * kPage, kPage});
    auto set = Build(pages, memory);
    ExpectValid(set, memory);
    EXPECT_EQ((size_t)STORE_MAX_HOT_RANGES, set.size()) << "coalesced further than needed";
    for (const auto &p : pages)
        EXPECT_TRUE(Covers(set, p.offset)) << p.offset;
}

TEST(HotSet, TheSmallestGapsAreClosedFirst)
{
    // 257 single pages: 256 of them 8 pages apart, one a page after the 101st. Only the
    // narrowest gap (one page) closes.
    std::vector<store_hot_range> pages;
    for (uint64_t i = 0; i < 256; i++)
        pages.push_back({i * 8 * kPage, kPage});
    pages.push_back({100 * 8 * kPage + 2 * kPage, kPage});
    auto set = Build(pages, 1 << 30);
    ASSERT_EQ((size_t)STORE_MAX_HOT_RANGES, set.size());
    uint64_t covered = 0;
    for (const auto &r : set)
        covered += r.length;
    EXPECT_EQ(257 * kPage + kPage, covered);
    EXPECT_EQ(100 * 8 * kPage, set[100].offset);
    EXPECT_EQ(3 * kPage, set[100].length);
}

TEST(HotSet, WritesScatteredWideApartKeepTheDensestRangesAndNeverSpanAWideGap)
{
    // 300 single pages 4 MiB apart, and a cluster of 100 pages after them: no gap may close
    // (each is wider than a chunk), so the 256 ranges the guest wrote most in stay.
    std::vector<store_hot_range> pages;
    for (uint64_t i = 0; i < 300; i++)
        pages.push_back({i * (4 << 20), kPage});
    const uint64_t cluster = 300ULL * (4 << 20);
    pages.push_back({cluster, 100 * kPage});
    auto set = Build(pages, 2ULL << 30);
    ExpectValid(set, 2ULL << 30);
    ASSERT_EQ((size_t)STORE_MAX_HOT_RANGES, set.size());
    EXPECT_EQ(cluster, set.back().offset);
    EXPECT_EQ(100 * kPage, set.back().length);
    for (size_t i = 0; i + 1 < set.size(); i++) {
        EXPECT_EQ(i * (4 << 20), set[i].offset) << "the earliest of the single pages stay";
        EXPECT_EQ(kPage, set[i].length) << "no range spans a gap wider than a chunk";
    }
}

TEST(HotSet, RunsBeyondMemoryAreCutAndAnEmptyListGivesNoSet)
{
    // memory.bin of 10 pages and a half: the half page is not a page the set may name.
    const uint64_t memory = 10 * kPage + kPage / 2;
    auto set = Build({{8 * kPage, 4 * kPage}, {12 * kPage, kPage}, {2 * kPage, 0}}, memory);
    ASSERT_EQ(1u, set.size());
    EXPECT_EQ(8 * kPage, set[0].offset);
    EXPECT_EQ(2 * kPage, set[0].length);
    EXPECT_TRUE(Build({}, memory).empty());
}

TEST(HotSet, ChunksAreTheOnesTouchedAscendingEachOnce)
{
    struct store_snapshot meta = {};
    meta.hot_count = 3;
    meta.hot[0] = {kPage, kPage};                   // chunk 0
    meta.hot[1] = {kChunk - kPage, 2 * kPage};      // chunks 0 and 1
    meta.hot[2] = {5 * kChunk, 3 * kChunk + kPage}; // chunks 5 to 8, the last cut at the count
    std::vector<uint64_t> chunks(8);
    uint64_t n = hot_set_chunks(&meta, kChunk, chunks.size(), chunks.data());
    chunks.resize(n);
    EXPECT_EQ((std::vector<uint64_t>{0, 1, 5, 6, 7}), chunks);
}

} // namespace
