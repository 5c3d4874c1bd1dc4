/*
 * The forkd-testvm guest: a freestanding long-mode program, one instance per vCPU, that writes
 * guest memory continuously in a way that exposes torn snapshots. Each step picks a working-set
 * page, increments this vCPU's counter in that page, then increments the vCPU's running total,
 * which lives only in %r15. A snapshot is consistent exactly when, for every vCPU, the counters
 * in memory add up to %r15 (or one more, if the vCPU stopped between the two instructions, at
 * guest_increment_window).
 *
 * Why the loop is assembly: the total must stay in one register at every instruction
 * boundary, and clang (unlike gcc) cannot be told to keep its hands off %r15. Why not a vector
 * register: SSE instructions are not usable under the nested hypervisor of our CI machines.
 * So C prepares the loop's parameters and the loop itself, page choice and pacing included,
 * is hand-written and never returns.
 */
#include <stddef.h>

#include "../guest_layout.h"

/* Read by guest_loop at the fixed offsets below: keep the two in step. */
struct loop_params {
    uint64_t pattern;        /* 0 */
    uint64_t pages;          /* 8 */
    uint64_t hot_pages;      /* 16 */
    uint64_t walk_state;     /* 24: sequential cursor, or xorshift state */
    uint64_t slot_offset;    /* 32: GUEST_COUNTER_STRIDE * vCPU index */
    uint64_t range0_gpa;     /* 40 */
    uint64_t range0_pages;   /* 48 */
    uint64_t range1_gpa;     /* 56 */
    uint64_t tsc_per_write;  /* 64: 0 = flat out */
    uint64_t tsc_per_report; /* 72 */
    uint64_t deadline;       /* 80 */
    uint64_t last_report;    /* 88 */
    uint64_t tsc_per_second; /* 96 */
    uint64_t hot_base;       /* 104: first page of the hot set */
    uint64_t clock_mask;     /* 112: flat out, look at the clock when total & mask == 0 */
    uint64_t disk;           /* 120: write the total to the disk port at each clock look */
    uint64_t disk_record;    /* 128: the total last written to the disk */
    uint64_t balloon_pages;  /* 136: 0 = this vCPU owns no balloon page */
    uint64_t balloon_next;   /* 144: the balloon page this vCPU visits next */
    uint64_t balloon_first;  /* 152: its first balloon page (the vCPU index) */
    uint64_t balloon_stride; /* 160: the vCPU count */
    uint64_t balloon_table;  /* 168: guest_config.balloon_table_gpa */
    uint64_t balloon_gpa;    /* 176: guest_config.balloon_gpa */
};
_Static_assert(offsetof(struct loop_params, pages) == 8, "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, hot_pages) == 16, "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, walk_state) == 24, "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, slot_offset) == 32, "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, range0_gpa) == 40, "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, range0_pages) == 48, "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, range1_gpa) == 56, "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, tsc_per_write) == 64, "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, tsc_per_report) == 72, "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, deadline) == 80, "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, last_report) == 88, "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, tsc_per_second) == 96, "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, hot_base) == 104, "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, clock_mask) == 112, "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, disk) == 120, "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, disk_record) == GUEST_DISK_RECORD_OFFSET,
               "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, balloon_pages) == 136, "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, balloon_next) == 144, "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, balloon_first) == 152, "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, balloon_stride) == 160, "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, balloon_table) == 168, "guest_loop offsets");
_Static_assert(offsetof(struct loop_params, balloon_gpa) == 176, "guest_loop offsets");
_Static_assert(GUEST_PORT_DISK == 0x514, "guest_loop hard-codes the disk port");
_Static_assert(GUEST_PORT_BALLOON == 0x516, "guest_loop hard-codes the balloon port");
_Static_assert(GUEST_PAGE_SIZE == 4096, "guest_loop fills a balloon page in 512 words");
_Static_assert(GUEST_PORT_PROGRESS == 0x510 && GUEST_PORT_PROGRESS_HIGH == 0x512,
               "guest_loop hard-codes the progress ports");
_Static_assert(GUEST_PATTERN_SEQUENTIAL == 0 && GUEST_PATTERN_RANDOM == 1, "guest_loop patterns");

void guest_start(void);
void guest_main(uint64_t vcpu_index, const struct guest_config *config);
__attribute__((noreturn)) void guest_loop(struct loop_params *params);
extern char guest_increment_window[], guest_loop_start[], guest_loop_end[], guest_disk_window[];

/* The VMM enters here, at CPL 3, with %rsp at the top of this vCPU's stack, %rdi = vCPU
 * index and %rsi = config. */
__asm__(".pushsection .text.entry, \"ax\"\n"
        ".globl guest_start\n"
        "guest_start:\n"
        "    call guest_main\n"
        "1:  pause\n" /* never reached: guest_main does not return */
        "    jmp 1b\n"
        ".popsection\n");

/*
 * Registers: %rbx params, %rbp pattern, %r12 pages, %r13 slot offset, %r14 walk state,
 * %r15 the running total. Only the two instructions around guest_increment_window write
 * counters or the total.
 */
__asm__(".pushsection .text, \"ax\"\n"
        ".globl guest_loop\n"
        "guest_loop:\n"
        "    movq %rdi, %rbx\n"
        "    movq 0(%rbx), %rbp\n"
        "    movq 8(%rbx), %r12\n"
        "    movq 32(%rbx), %r13\n"
        "    movq 24(%rbx), %r14\n"
        "    xorl %r15d, %r15d\n"
        ".globl guest_loop_start\n"
        "guest_loop_start:\n"
        /* choose a page index into %rax */
        "    testq %rbp, %rbp\n"
        "    jnz 10f\n"
        "    incq %r14\n"
        "    cmpq %r12, %r14\n"
        "    jb 1f\n"
        "    xorl %r14d, %r14d\n"
        "1:  movq %r14, %rax\n"
        "    jmp 20f\n"
        "10: movq %r14, %rax\n" /* xorshift64* */
        "    shrq $12, %rax\n"
        "    xorq %rax, %r14\n"
        "    movq %r14, %rax\n"
        "    shlq $25, %rax\n"
        "    xorq %rax, %r14\n"
        "    movq %r14, %rax\n"
        "    shrq $27, %rax\n"
        "    xorq %rax, %r14\n"
        "    movabsq $0x2545F4914F6CDD1D, %rax\n"
        "    imulq %r14, %rax\n"
        "    xorl %edx, %edx\n"
        "    cmpq $1, %rbp\n"
        "    je 12f\n"
        "    movzbl %al, %ecx\n" /* hot set: 230 in 256 writes go to a tenth, mid-memory */
        "    shrq $8, %rax\n"
        "    cmpl $230, %ecx\n"
        "    jae 12f\n"
        "    divq 16(%rbx)\n"
        "    movq %rdx, %rax\n"
        "    addq 104(%rbx), %rax\n"
        "    jmp 20f\n"
        "12: divq %r12\n"
        "    movq %rdx, %rax\n"
        /* index -> guest-physical address of this vCPU's counter */
        "20: movq 48(%rbx), %rcx\n"
        "    cmpq %rcx, %rax\n"
        "    jb 21f\n"
        "    subq %rcx, %rax\n"
        "    shlq $12, %rax\n"
        "    addq 56(%rbx), %rax\n"
        "    jmp 22f\n"
        "21: shlq $12, %rax\n"
        "    addq 40(%rbx), %rax\n"
        "22: addq %r13, %rax\n"
        /* the invariant: counter first, then total */
        "    incq (%rax)\n"
        ".globl guest_increment_window\n"
        "guest_increment_window:\n"
        "    incq %r15\n"
        /* pacing and progress: flat out looks at the clock every clock_mask + 1 writes */
        "    cmpq $0, 64(%rbx)\n"
        "    jne 30f\n"
        "    testq 112(%rbx), %r15\n"
        "    jnz guest_loop_start\n"
        /* the disk: the total goes out to the disk first, then into memory */
        "30: cmpq $0, 120(%rbx)\n"
        "    je 36f\n"
        "    movl %r15d, %eax\n"
        "    movl $0x514, %edx\n"
        "    outl %eax, %dx\n"
        ".globl guest_disk_window\n"
        "guest_disk_window:\n"
        "    movq %r15, 128(%rbx)\n"
        /* the balloon: visit this vCPU's next balloon page (guest_layout.h, GUEST_PORT_BALLOON) */
        "36: cmpq $0, 136(%rbx)\n"
        "    je 40f\n"
        "    movq 144(%rbx), %rax\n" /* %rax = i */
        "    movq %rax, %rcx\n"
        "    addq 160(%rbx), %rcx\n"
        "    cmpq 136(%rbx), %rcx\n"
        "    jb 37f\n"
        "    movq 152(%rbx), %rcx\n"
        "37: movq %rcx, 144(%rbx)\n"
        "    movq 168(%rbx), %rsi\n"
        "    leaq (%rsi,%rax,8), %rsi\n" /* %rsi = its table entry */
        "    movq %rax, %rdi\n"
        "    shlq $12, %rdi\n"
        "    addq 176(%rbx), %rdi\n" /* %rdi = its guest-physical address */
        "    movq (%rsi), %rcx\n"
        "    testq $1, %rcx\n"
        "    jz 38f\n"
        "    andq $-2, %rcx\n" /* free it: FREE first, then the VMM discards it */
        "    movq %rcx, (%rsi)\n"
        "    movl $0x516, %edx\n"
        "    outl %eax, %dx\n"
        "    jmp 40f\n"
        "38: addq $2, %rcx\n" /* take it back: the next generation's signature first */
        "    movq %rcx, %r8\n"
        "    shrq $1, %r8\n"
        "    andl $0xfffff, %r8d\n"
        "    shlq $34, %r8\n"
        "    movabsq $0xBA00000000000000, %r9\n"
        "    orq %r9, %r8\n"
        "    orq %rdi, %r8\n"
        "    movl $512, %r9d\n"
        "39: movq %r8, (%rdi)\n"
        "    addq $8, %rdi\n"
        "    addq $8, %r8\n"
        "    decl %r9d\n"
        "    jnz 39b\n"
        "    orq $1, %rcx\n" /* then IN_USE */
        "    movq %rcx, (%rsi)\n"
        "40: rdtsc\n"
        "    shlq $32, %rdx\n"
        "    orq %rdx, %rax\n"
        "    movq %rax, %rsi\n" /* %rsi = now */
        "    subq 88(%rbx), %rax\n"
        "    cmpq 72(%rbx), %rax\n"
        "    jb 31f\n"
        "    movq %r15, %rax\n" /* report the total: high half, then low half */
        "    shrq $32, %rax\n"
        "    movl $0x512, %edx\n"
        "    outl %eax, %dx\n"
        "    movl %r15d, %eax\n"
        "    movl $0x510, %edx\n"
        "    outl %eax, %dx\n"
        "    movq %rsi, 88(%rbx)\n"
        "31: movq 64(%rbx), %rcx\n"
        "    testq %rcx, %rcx\n"
        "    jz guest_loop_start\n"
        "    movq 80(%rbx), %rax\n"
        "    addq %rcx, %rax\n"     /* next deadline */
        "    movq 96(%rbx), %rdx\n" /* one second of TSC */
        "    leaq (%rax,%rdx), %rdi\n"
        "    cmpq %rsi, %rdi\n"
        "    jb 32f\n" /* far behind (after a long pause): do not burst */
        "    leaq (%rsi,%rdx), %rdi\n"
        "    cmpq %rdi, %rax\n"
        "    jbe 33f\n" /* far ahead (clock moved back): do not stall */
        "32: leaq (%rsi,%rcx), %rax\n"
        "33: movq %rax, 80(%rbx)\n"
        "    movq %rax, %rdi\n"
        "34: rdtsc\n"
        "    shlq $32, %rdx\n"
        "    orq %rdx, %rax\n"
        "    cmpq %rdi, %rax\n"
        "    jae guest_loop_start\n"
        "    pause\n"
        "    jmp 34b\n"
        ".globl guest_loop_end\n"
        "guest_loop_end:\n"
        ".popsection\n");

__attribute__((section(".header"), used)) const struct guest_image_header guest_header = {
    .magic = GUEST_IMAGE_MAGIC,
    .entry = (uint64_t)guest_start,
    .increment_window = (uint64_t)guest_increment_window,
    .loop_start = (uint64_t)guest_loop_start,
    .loop_end = (uint64_t)guest_loop_end,
    .disk_window = (uint64_t)guest_disk_window,
};

static inline uint64_t read_tsc(void)
{
    uint32_t low, high;
    __asm__ volatile("rdtsc" : "=a"(low), "=d"(high));
    return ((uint64_t)high << 32) | low;
}

static void guest_panic(enum guest_panic_code code)
{
    for (;;) {
        __asm__ volatile("outl %0, %1" : : "a"((uint32_t)code), "Nd"((uint16_t)GUEST_PORT_PANIC));
        __asm__ volatile("pause"); /* the VMM stops this vCPU at the first report */
    }
}

static int config_is_valid(uint64_t vcpu_index, const struct guest_config *config)
{
    if (config->magic != GUEST_CONFIG_MAGIC || config->pages == 0 || config->tsc_khz == 0 ||
        config->pattern > GUEST_PATTERN_HOTSET || config->range_count == 0 ||
        config->range_count > GUEST_MAX_RANGES)
        return 0;
    if (config->range_count == 1 && config->ranges[0].pages != config->pages)
        return 0;
    if (config->balloon_pages && (config->balloon_pages > GUEST_BALLOON_MAX_PAGES ||
                                  !config->balloon_table_gpa || !config->balloon_gpa))
        return 0;
    return vcpu_index < config->vcpu_count && vcpu_index < GUEST_MAX_VCPUS;
}

void guest_main(uint64_t vcpu_index, const struct guest_config *config)
{
    struct loop_params params;
    uint64_t tsc_hz;

    if (!config_is_valid(vcpu_index, config))
        guest_panic(GUEST_PANIC_BAD_CONFIG);
    tsc_hz = config->tsc_khz * 1000;
    params.pattern = config->pattern;
    params.pages = config->pages;
    params.hot_pages = config->pages / 10 ? config->pages / 10 : 1;
    /* The hot set sits in the middle of the working set, where neither a sweep from the start
     * nor one from the end reaches it first by accident. */
    params.hot_base = (config->pages - params.hot_pages) / 2;
    /* Sequential walkers start spread out (the loop pre-increments); random ones differ by seed. */
    params.walk_state = config->pattern == GUEST_PATTERN_SEQUENTIAL
                            ? vcpu_index * config->pages / config->vcpu_count
                            : (config->seed ^ ((vcpu_index + 1) * 0x9E3779B97F4A7C15ull)) | 1;
    params.slot_offset = GUEST_COUNTER_STRIDE * vcpu_index;
    params.range0_gpa = config->ranges[0].gpa;
    params.range0_pages = config->ranges[0].pages;
    params.range1_gpa = config->range_count > 1 ? config->ranges[1].gpa : 0;
    params.tsc_per_write = config->rate ? (tsc_hz / config->rate ? tsc_hz / config->rate : 1) : 0;
    params.tsc_per_report =
        config->report_us ? config->tsc_khz * config->report_us / 1000 : tsc_hz / 100;
    params.tsc_per_second = tsc_hz;
    /* Every 1024 writes keeps the clock out of the loop; a short report interval asks for
     * reports on time even where a write costs tens of microseconds (nested, emulated). */
    params.clock_mask = config->report_us ? 0xf : 0x3ff;
    params.deadline = read_tsc();
    params.last_report = 0;
    params.disk = config->disk;
    params.disk_record = 0;
    /* vCPU v owns balloon pages v, v + vcpu_count, ...; none when there are fewer pages. */
    params.balloon_pages = vcpu_index < config->balloon_pages ? config->balloon_pages : 0;
    params.balloon_next = vcpu_index;
    params.balloon_first = vcpu_index;
    params.balloon_stride = config->vcpu_count;
    params.balloon_table = config->balloon_table_gpa;
    params.balloon_gpa = config->balloon_gpa;
    guest_loop(&params);
}
