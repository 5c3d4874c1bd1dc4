/*
 * The forkd-testvm guest: a freestanding long-mode program, one instance per vCPU, that writes
 * guest memory continuously in a way that exposes torn snapshots. Each step picks a working-set
 * page, increments this vCPU's counter in that page, then increments the vCPU's running total,
 * which lives only in %xmm15. A snapshot is consistent exactly when, for every vCPU, the
 * counters in memory add up to %xmm15 (or one more, if the vCPU stopped between the two
 * instructions, at guest_increment_window).
 *
 * Why %xmm15: the total must live in a register the compiler never touches. The guest is built
 * with -mgeneral-regs-only, so no compiled code uses vector registers; only guest_touch does.
 * Everything else is ordinary C on a per-vCPU stack; there are no globals.
 */
#include "../guest_layout.h"

void guest_start(void);
void guest_main(uint64_t vcpu_index, const struct guest_config *config);
void guest_touch(volatile uint64_t *counter);
extern char guest_increment_window[];

/* The VMM enters here with %rsp at the top of this vCPU's stack, %rdi = vCPU index and
 * %rsi = config; %xmm14 = 1 and %xmm15 = 0 are set by the VMM too. */
__asm__(".pushsection .text.entry, \"ax\"\n"
        ".globl guest_start\n"
        "guest_start:\n"
        "    call guest_main\n"
        "1:  hlt\n"
        "    jmp 1b\n"
        ".popsection\n");

/* The two instructions the whole invariant is about, kept together and out of the
 * compiler's hands. */
__asm__(".pushsection .text, \"ax\"\n"
        ".globl guest_touch\n"
        "guest_touch:\n"
        "    incq (%rdi)\n"
        ".globl guest_increment_window\n"
        "guest_increment_window:\n"
        "    paddq %xmm14, %xmm15\n"
        "    ret\n"
        ".popsection\n");

__attribute__((section(".header"), used)) const struct guest_image_header guest_header = {
    .magic = GUEST_IMAGE_MAGIC,
    .entry = (uint64_t)guest_start,
    .increment_window = (uint64_t)guest_increment_window,
};

static inline uint64_t read_tsc(void)
{
    uint32_t low, high;
    __asm__ volatile("rdtsc" : "=a"(low), "=d"(high));
    return ((uint64_t)high << 32) | low;
}

static inline uint64_t read_total(void)
{
    uint64_t total;
    __asm__ volatile("movq %%xmm15, %0" : "=r"(total));
    return total;
}

static inline void port_write32(uint16_t port, uint32_t value)
{
    __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port) : "memory");
}

static void guest_panic(enum guest_panic_code code)
{
    for (;;) {
        port_write32(GUEST_PORT_PANIC, (uint32_t)code);
        __asm__ volatile("hlt");
    }
}

/* xorshift64*: cheap, decent, and needs no state beyond one word. */
static inline uint64_t next_random(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1Dull;
}

struct walker {
    uint64_t pattern;
    uint64_t pages;
    uint64_t hot_pages;
    uint64_t cursor;
    uint64_t random_state;
};

static uint64_t next_page_index(struct walker *w)
{
    uint64_t r;

    switch (w->pattern) {
    case GUEST_PATTERN_SEQUENTIAL:
        if (++w->cursor >= w->pages)
            w->cursor = 0;
        return w->cursor;
    case GUEST_PATTERN_RANDOM:
        return next_random(&w->random_state) % w->pages;
    default:
        /* Hot set: nine writes in ten go to the first tenth of the working set. */
        r = next_random(&w->random_state);
        if ((r & 0xff) < 230)
            return (r >> 8) % w->hot_pages;
        return (r >> 8) % w->pages;
    }
}

/*
 * Paces writes to config->rate per second with the TSC and reports progress. After a restore
 * or a long pause the deadline may be far behind (or, with a new TSC, far ahead): resynchronise
 * instead of bursting or stalling.
 */
struct pacer {
    uint64_t tsc_per_write;
    uint64_t tsc_per_report;
    uint64_t deadline;
    uint64_t next_report;
    uint64_t iterations;
};

static void pace(struct pacer *p)
{
    uint64_t now;

    if (p->tsc_per_write == 0 && (++p->iterations & 0x3ff) != 0)
        return;
    now = read_tsc();
    if (now >= p->next_report || p->next_report - now > 4 * p->tsc_per_report) {
        port_write32(GUEST_PORT_PROGRESS, (uint32_t)read_total());
        p->next_report = now + p->tsc_per_report;
    }
    if (p->tsc_per_write == 0)
        return;
    p->deadline += p->tsc_per_write;
    if (p->deadline + 1000 * p->tsc_per_report < now || p->deadline > now + 1000 * p->tsc_per_report)
        p->deadline = now + p->tsc_per_write;
    while (read_tsc() < p->deadline)
        __asm__ volatile("pause");
}

void guest_main(uint64_t vcpu_index, const struct guest_config *config)
{
    struct walker walker;
    struct pacer pacer;
    uint64_t tsc_hz;

    if (config->magic != GUEST_CONFIG_MAGIC || config->pages == 0 || config->tsc_khz == 0)
        guest_panic(GUEST_PANIC_BAD_CONFIG);
    if (vcpu_index >= config->vcpu_count || vcpu_index >= GUEST_MAX_VCPUS)
        guest_panic(GUEST_PANIC_BAD_VCPU);

    walker.pattern = config->pattern;
    walker.pages = config->pages;
    walker.hot_pages = config->pages / 10 ? config->pages / 10 : 1;
    walker.cursor = vcpu_index * config->pages / config->vcpu_count;
    walker.random_state = (config->seed ^ ((vcpu_index + 1) * 0x9E3779B97F4A7C15ull)) | 1;

    tsc_hz = config->tsc_khz * 1000;
    pacer.tsc_per_write = config->rate ? tsc_hz / config->rate : 0;
    pacer.tsc_per_report = tsc_hz / 100;
    pacer.deadline = read_tsc();
    pacer.next_report = 0;
    pacer.iterations = 0;

    for (;;) {
        uint64_t gpa = guest_page_gpa(config, next_page_index(&walker));
        guest_touch((volatile uint64_t *)(gpa + 8 * vcpu_index));
        pace(&pacer);
    }
}
