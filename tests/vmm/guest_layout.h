/*
 * The contract between forkd-testvm, its guest program and the verifier: where things live in
 * guest-physical memory, the guest image header, the workload the VMM hands the guest, the
 * boot fill pattern and the I/O ports the guest reports through. Freestanding: this header is
 * compiled into the guest (no libc) as well as the VMM.
 *
 * Guest-physical layout (identity-mapped with 2 MiB pages, everything below 1 MiB is the
 * "system area" the verifier skips):
 *   0x01000 guest_config          0x02000 GDT       0x03000 PML4     0x04000 PDPT
 *   0x08000 page directories (GUEST_PD_COUNT pages, one per GiB of guest-physical space)
 *   0x20000 guest image (header first, at most GUEST_IMAGE_MAX bytes)
 *   0x40000 vCPU stacks (GUEST_STACK_SIZE each, GUEST_MAX_VCPUS of them)
 *   0x100000 onwards: working-set pages (after boot_args skip= pages), then region 1 (after the
 *   MMIO gap) in full.
 */
#ifndef FORKD_TESTVM_GUEST_LAYOUT_H
#define FORKD_TESTVM_GUEST_LAYOUT_H

#include <stdint.h>

#define GUEST_PAGE_SIZE       4096ull
#define GUEST_HUGE_PAGE_SIZE  (2ull << 20)
#define GUEST_CONFIG_GPA      0x1000ull
#define GUEST_GDT_GPA         0x2000ull
#define GUEST_PML4_GPA        0x3000ull
#define GUEST_PDPT_GPA        0x4000ull
#define GUEST_PD_GPA          0x8000ull
#define GUEST_DEVICE_GPA      0x5000ull /* the VMM's device page (struct guest_device_page) */
#define GUEST_PD_COUNT        16ull     /* maps guest-physical [0, 16 GiB) */
#define GUEST_IMAGE_GPA       0x20000ull
#define GUEST_IMAGE_MAX       0x20000ull
#define GUEST_STACKS_GPA      0x40000ull
#define GUEST_STACK_SIZE      0x4000ull
#define GUEST_MAX_VCPUS       32u
#define GUEST_SYSTEM_AREA_END 0x100000ull
#define GUEST_PHYS_LIMIT      (GUEST_PD_COUNT << 30)
/* The guest runs at CPL 3 (user mode) with IOPL 3: the nested hypervisor on our CI machines
 * (KVM PVM) runs guest user mode natively but emulates a non-paravirtualised guest kernel
 * instruction by instruction, about 100x slower. The guest needs no privilege. */
#define GUEST_CODE_SELECTOR 0x23 /* GDT entry 4, RPL 3 */
#define GUEST_DATA_SELECTOR 0x1b /* GDT entry 3, RPL 3 */

#define GUEST_IMAGE_MAGIC  0x31474d56544b4446ull /* "FDKTVMG1" little-endian */
#define GUEST_CONFIG_MAGIC 0x31464e4354564446ull /* "FDVTCNF1" */

/* About every 10 ms (guest_config.report_us) the guest reports its running total: the high 32 bits
 * to GUEST_PORT_PROGRESS_HIGH, then the low 32 bits to GUEST_PORT_PROGRESS. */
#define GUEST_PORT_PROGRESS      0x510
#define GUEST_PORT_PROGRESS_HIGH 0x512
/* Port the guest writes a guest_panic_code to before halting for good. */
#define GUEST_PORT_PANIC 0x511
/*
 * The guest's disk (guest_config.disk set: the VMM has a writable drive): each time the guest
 * looks at the clock it writes the low 32 bits of its running total to GUEST_PORT_DISK, and the
 * VMM writes them, zero-extended to 8 bytes, into its first writable drive at
 * GUEST_DISK_OFFSET + 8 * vCPU index before the guest's next instruction. The instruction
 * after the write (guest_disk_window) stores the full total into the guest's own memory (its
 * loop parameters, at %rbx + GUEST_DISK_RECORD_OFFSET): disk and memory agree except while a
 * vCPU stands at guest_disk_window, where the disk is one write ahead. A disk captured at
 * another instant than memory disagrees with it.
 */
#define GUEST_PORT_DISK          0x514
#define GUEST_DISK_OFFSET        4096ull
#define GUEST_DISK_RECORD_OFFSET 128u
/*
 * The balloon (guest_config.balloon_pages > 0, boot_args balloon=N): N pages outside the
 * working set that the guest hands back to the VMM and takes back again, each time it looks at
 * the clock, as a guest's balloon driver does. The state table at balloon_table_gpa holds one
 * 8-byte entry per balloon page: FREE (even, generation << 1; zero at boot) or IN_USE (odd,
 * generation << 1 | 1). vCPU v owns the pages whose index i has i % vcpu_count == v, and visits
 * them in turn: an IN_USE page is freed (its entry goes FREE first, then i is written to
 * GUEST_PORT_BALLOON and the VMM discards the page inside the exit: MADV_DONTNEED, or
 * MADV_REMOVE for shared memory), a FREE page is taken back (filled with guest_balloon_word of
 * the next generation first, then its entry goes IN_USE). So at every instruction boundary an
 * IN_USE(g) entry means the page holds generation g's signature; a FREE page may hold anything.
 */
#define GUEST_PORT_BALLOON      0x516
#define GUEST_BALLOON_MAX_PAGES 65536ull

static inline uint64_t guest_balloon_word(uint64_t gpa, uint64_t generation)
{
    /* gpa < GUEST_PHYS_LIMIT = 2^34: the generation's low 20 bits sit above it. */
    return 0xBA00000000000000ull | ((generation & 0xFFFFFull) << 34) | gpa;
}

static inline uint64_t guest_balloon_table_pages(uint64_t balloon_pages)
{
    return (balloon_pages * 8 + GUEST_PAGE_SIZE - 1) / GUEST_PAGE_SIZE;
}

enum guest_panic_code {
    GUEST_PANIC_BAD_CONFIG = 1,
    GUEST_PANIC_BAD_VCPU = 2,
};

enum guest_pattern {
    GUEST_PATTERN_SEQUENTIAL = 0,
    GUEST_PATTERN_RANDOM = 1,
    GUEST_PATTERN_HOTSET = 2,
};

/*
 * First bytes of the guest image, linked at GUEST_IMAGE_GPA. increment_window is the address
 * of the instruction that increments the register total (%r15): a vCPU whose RIP equals it
 * has already incremented a page counter but not yet its total. [loop_start, loop_end) is the
 * counting loop; a vCPU whose RIP lies outside it has not started counting (its %r15 means
 * nothing yet and its counters are all zero).
 */
struct guest_image_header {
    uint64_t magic;
    uint64_t entry;
    uint64_t increment_window;
    uint64_t loop_start;
    uint64_t loop_end;
    uint64_t disk_window; /* the instruction after the disk write (GUEST_PORT_DISK) */
};

/* A run of consecutive working-set pages: index i of the run is page gpa + i * 4096. */
struct guest_page_range {
    uint64_t gpa;
    uint64_t pages;
};

#define GUEST_MAX_RANGES 2

/* Written by the VMM at GUEST_CONFIG_GPA before the first vCPU runs; read-only to the guest. */
struct guest_config {
    uint64_t magic;
    uint32_t vcpu_count;
    uint32_t pattern; /* enum guest_pattern */
    uint64_t pages;   /* working-set size in pages, the sum of the ranges' pages */
    uint64_t rate;    /* page writes per second per vCPU; 0 = as fast as possible */
    uint64_t seed;
    uint64_t tsc_khz;
    uint64_t range_count;
    struct guest_page_range ranges[GUEST_MAX_RANGES];
    uint64_t report_us;     /* progress report interval; 0 (older images and snapshots) = 10 ms */
    uint64_t disk;          /* 1: write the running total to GUEST_PORT_DISK (see above) */
    uint64_t balloon_pages; /* 0: no balloon (see GUEST_PORT_BALLOON) */
    uint64_t balloon_table_gpa; /* the state table, guest_balloon_table_pages() pages */
    uint64_t balloon_gpa;       /* balloon page i is balloon_gpa + i * GUEST_PAGE_SIZE */
};

/*
 * Each working-set page holds one 8-byte counter per vCPU at offset GUEST_COUNTER_STRIDE * vcpu
 * (a cache line each, so vCPUs writing the same page do not bounce one line between them).
 * Counters start at what boot left (the pattern of a filled boot, or zero in sparse memory), so
 * a counter's value is (word - that) and an untouched page is all pattern, or all zeros.
 */
#define GUEST_COUNTER_STRIDE 64u
_Static_assert(GUEST_COUNTER_STRIDE *GUEST_MAX_VCPUS <= GUEST_PAGE_SIZE, "counters fit a page");

static inline uint64_t guest_boot_pattern(uint64_t gpa)
{
    return 0xF0CD000000000000ull | gpa;
}

/* The guest-physical address of working-set page index (0 <= index < config->pages). */
static inline uint64_t guest_page_gpa(const struct guest_config *config, uint64_t index)
{
    for (uint64_t r = 0; r < config->range_count && r < GUEST_MAX_RANGES; r++) {
        if (index < config->ranges[r].pages)
            return config->ranges[r].gpa + index * GUEST_PAGE_SIZE;
        index -= config->ranges[r].pages;
    }
    return 0;
}

/*
 * The device page: what the VMM writes into guest memory while it saves a snapshot, as
 * Firecracker does (block completions into guest buffers and rings, the vsock reset). Every
 * snapshot/create bumps `saves` here before it records the vmstate, which holds the same value:
 * a snapshot whose memory misses the VMM's writes during the save fails the verifier.
 */
#define GUEST_DEVICE_MAGIC 0x31564544544b4446ull /* "FDKTDEV1" */
struct guest_device_page {
    uint64_t magic;
    uint64_t saves;
};

#endif
