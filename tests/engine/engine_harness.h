// Shared set-up for engine tests: a temporary state directory, a VM registry driving the real
// forkd-testvm, and the test VMM's snapshot verifier.
#pragma once

#include <string>

extern "C" {
#include "forkd/vm.h"
}

struct VerifyResult {
    int exit_code;
    std::string output;
};

class EngineTest : public ::testing::Test
{
  protected:
    void SetUp() override;
    void TearDown() override;

    // Boots a guest writing flat out (on a memfd unless memory says ANONYMOUS); fails the
    // test on error.
    struct vm *Boot(unsigned vcpus, unsigned mem_mib, const std::string &workload,
                    const std::string &name = "", const char *const *extra_args = nullptr,
                    enum vm_memory memory = VM_MEMORY_MEMFD, uint64_t page_size = 0);

    // Waits (bounded) until the guest's vCPUs have counted at least `writes` page writes in
    // total, as the test VMM reports in GET /; fails the test otherwise.
    static void WaitForGuestWrites(struct vm *vm, unsigned long long writes);
    // The guest's page writes so far, summed over its vCPUs (GET / guest_progress).
    static unsigned long long GuestWrites(struct vm *vm);

    // Restores the snapshot in dir (vmstate + memory.bin) with the given memory backend;
    // fails the test and returns nullptr on error.
    struct vm *Restore(const std::string &dir, enum vm_memory memory,
                       const char *snapshot_name = nullptr, bool start_paused = false);

    // The test VMM's count of pause requests it carried out (GET / pause_count).
    static unsigned long long VmmPauseCount(struct vm *vm);
    // A number from the test VMM's GET / (pause_count, balloon_discards, ...).
    static unsigned long long VmmCounter(struct vm *vm, const std::string &key);

    // The state the VMM reports in GET / ("Running", "Paused"), or the error.
    static std::string VmmState(struct vm *vm);

    // Runs `forkd-testvm verify` on a snapshot directory (vmstate + memory.bin).
    static VerifyResult Verify(const std::string &dir);
    // The per-vCPU totals the verifier printed, summed.
    static unsigned long long TotalFromVerify(const std::string &output);

    std::string state_dir_;
    struct vm_registry *registry_ = nullptr;
};
