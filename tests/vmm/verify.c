/* verify: the snapshot consistency checker behind `forkd-testvm verify`. */
#include "verify.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "basic/cleanup.h"

#include "vmm_error.h"
#include "vmstate.h"

struct memory_image {
    const uint8_t *data;
    uint64_t size;
    const struct vmstate *state;
};

static const uint64_t *page_words(const struct memory_image *image, uint64_t gpa)
{
    for (uint32_t i = 0; i < image->state->region_count; i++) {
        const struct memory_region *r = &image->state->regions[i];
        if (gpa >= r->guest_phys_addr && gpa - r->guest_phys_addr < r->size)
            return (const uint64_t *)(image->data + r->file_offset + (gpa - r->guest_phys_addr));
    }
    return NULL;
}

static bool in_working_set(const struct guest_config *config, uint64_t gpa)
{
    for (uint64_t r = 0; r < config->range_count; r++)
        if (gpa >= config->ranges[r].gpa &&
            gpa - config->ranges[r].gpa < config->ranges[r].pages * GUEST_PAGE_SIZE)
            return true;
    return false;
}

/* [start, end) of the balloon's table and pages; empty without a balloon. */
static void balloon_area(const struct guest_config *config, uint64_t *start, uint64_t *end)
{
    *start = config->balloon_table_gpa;
    *end = config->balloon_pages ? config->balloon_gpa + config->balloon_pages * GUEST_PAGE_SIZE
                                 : *start;
}

static int check_balloon_config(const struct guest_config *config, const struct memory_image *image,
                                char *err, size_t err_size)
{
    uint64_t start, end;
    if (!config->balloon_pages)
        return 0;
    balloon_area(config, &start, &end);
    if (config->balloon_pages > GUEST_BALLOON_MAX_PAGES ||
        config->balloon_gpa !=
            start + guest_balloon_table_pages(config->balloon_pages) * GUEST_PAGE_SIZE ||
        start < GUEST_SYSTEM_AREA_END || start % GUEST_PAGE_SIZE || !page_words(image, start) ||
        !page_words(image, end - 1) ||
        (const uint8_t *)page_words(image, end - 1) - (const uint8_t *)page_words(image, start) !=
            (ptrdiff_t)(end - 1 - start))
        return error_set(err, err_size, EBADMSG,
                         "the balloon (%" PRIu64 " pages, table at 0x%" PRIx64
                         ") does not lie in one region of guest memory",
                         config->balloon_pages, start);
    for (uint64_t r = 0; r < config->range_count; r++) {
        const struct guest_page_range *range = &config->ranges[r];
        if (range->gpa < end && start < range->gpa + range->pages * GUEST_PAGE_SIZE)
            return error_set(err, err_size, EBADMSG, "the balloon overlaps the working set");
    }
    return 0;
}

static int check_config(const struct vmstate *state, const struct memory_image *image, char *err,
                        size_t err_size)
{
    const struct guest_config *config = &state->guest_config;
    uint64_t pages = 0, offset = 0;

    for (uint32_t i = 0; i < state->region_count; i++) {
        if (state->regions[i].file_offset != offset || state->regions[i].size % GUEST_PAGE_SIZE)
            return error_set(err, err_size, EBADMSG, "vmstate region %u has a bad offset or size",
                             i);
        offset += state->regions[i].size;
    }
    if (offset != image->size)
        return error_set(err, err_size, EBADMSG,
                         "memory file is %" PRIu64 " bytes but the regions add up to %" PRIu64,
                         image->size, offset);
    if (config->magic != GUEST_CONFIG_MAGIC || config->vcpu_count != state->vcpu_count ||
        config->range_count == 0 || config->range_count > GUEST_MAX_RANGES)
        return error_set(err, err_size, EBADMSG, "vmstate guest config is invalid");
    for (uint64_t r = 0; r < config->range_count; r++) {
        const struct guest_page_range *range = &config->ranges[r];
        if (range->gpa < GUEST_SYSTEM_AREA_END || !page_words(image, range->gpa) ||
            !page_words(image, range->gpa + range->pages * GUEST_PAGE_SIZE - 1))
            return error_set(err, err_size, EBADMSG,
                             "working-set range %" PRIu64 " lies outside guest memory", r);
        pages += range->pages;
    }
    if (pages != config->pages)
        return error_set(err, err_size, EBADMSG, "working-set ranges do not add up to pages");
    return check_balloon_config(config, image, err, err_size);
}

/* What boot left in the word at gpa: the pattern if boot memory was filled, else zero (a sparse
 * guest's pages are empty until it writes them). */
static uint64_t boot_word(const struct vmstate *state, uint64_t gpa)
{
    return state->boot_filled ? guest_boot_pattern(gpa) : 0;
}

static const char *boot_contents(const struct vmstate *state)
{
    return state->boot_filled ? "" : " of sparse memory (zero)";
}

/* Adds this page's counters to sums; every word that is not a vCPU's counter must be what boot
 * left there. */
static int check_working_page(const struct vmstate *state, const uint64_t *words, uint64_t gpa,
                              uint64_t *sums, char *err, size_t err_size)
{
    const uint64_t stride = GUEST_COUNTER_STRIDE / 8;

    for (uint32_t v = 0; v < state->vcpu_count; v++) {
        uint64_t count = words[v * stride] - boot_word(state, gpa + GUEST_COUNTER_STRIDE * v);
        if (count > vmstate_vcpu_total(state, v) + 1)
            return error_set(err, err_size, EBADMSG,
                             "page 0x%" PRIx64 ": vCPU %u counter is %" PRIu64
                             ", more than its register total %" PRIu64 " (memory leads the vCPU)",
                             gpa, v, count, vmstate_vcpu_total(state, v));
        sums[v] += count;
    }
    for (uint64_t w = 0; w < GUEST_PAGE_SIZE / 8; w++)
        if ((w % stride != 0 || w / stride >= state->vcpu_count) &&
            words[w] != boot_word(state, gpa + 8 * w))
            return error_set(err, err_size, EBADMSG,
                             "page 0x%" PRIx64 " word %" PRIu64 " is 0x%" PRIx64
                             ", not the boot pattern%s",
                             gpa, w, words[w], boot_contents(state));
    return 0;
}

static int check_untouched_page(const struct vmstate *state, const uint64_t *words, uint64_t gpa,
                                char *err, size_t err_size)
{
    for (uint64_t w = 0; w < GUEST_PAGE_SIZE / 8; w++)
        if (words[w] != boot_word(state, gpa + 8 * w))
            return error_set(err, err_size, EBADMSG,
                             "page 0x%" PRIx64 " is outside the working set but word %" PRIu64
                             " is 0x%" PRIx64 ", not the boot pattern%s",
                             gpa, w, words[w], boot_contents(state));
    return 0;
}

/* The VMM writes the device page while it saves (save_device_page in api.c): memory taken
 * before that write, or restored from elsewhere, shows another count than the vmstate. */
static int check_device_page(const struct memory_image *image, char *err, size_t err_size)
{
    const uint64_t *words = page_words(image, GUEST_DEVICE_GPA);
    struct guest_device_page page;
    if (!words)
        return error_set(err, err_size, EBADMSG, "the device page is outside guest memory");
    memcpy(&page, words, sizeof(page));
    if (page.magic != GUEST_DEVICE_MAGIC || page.saves != image->state->device_saves)
        return error_set(err, err_size, EBADMSG,
                         "device page: memory holds save %" PRIu64 "%s but the vmstate was "
                         "recorded at save %" PRIu64 ": memory misses the VMM's writes during "
                         "the save (inconsistent)",
                         page.magic == GUEST_DEVICE_MAGIC ? page.saves : 0,
                         page.magic == GUEST_DEVICE_MAGIC ? "" : " (no device magic)",
                         image->state->device_saves);
    return 0;
}

/* A balloon page: IN_USE(g) in the table (as memory.bin holds it) means the page holds
 * generation g's signature; a FREE page may hold anything. The table itself may hold anything
 * the guest wrote. */
static int check_balloon_page(const struct memory_image *image, const uint64_t *words, uint64_t gpa,
                              struct verify_result *out, char *err, size_t err_size)
{
    const struct guest_config *config = &image->state->guest_config;
    if (gpa < config->balloon_gpa) {
        out->balloon_table_pages++;
        return 0;
    }
    uint64_t index = (gpa - config->balloon_gpa) / GUEST_PAGE_SIZE;
    uint64_t entry = page_words(image, config->balloon_table_gpa)[index];
    if (!(entry & 1)) {
        out->balloon_free++;
        return 0;
    }
    uint64_t generation = entry >> 1;
    for (uint64_t w = 0; w < GUEST_PAGE_SIZE / 8; w++)
        if (words[w] != guest_balloon_word(gpa + 8 * w, generation))
            return error_set(err, err_size, EBADMSG,
                             "balloon page %" PRIu64 " (0x%" PRIx64 ") is in use at generation "
                             "%" PRIu64 " but word %" PRIu64 " is 0x%" PRIx64 ", not its "
                             "signature 0x%" PRIx64 ": memory lost a page the guest was using "
                             "(torn)",
                             index, gpa, generation, w, words[w],
                             guest_balloon_word(gpa + 8 * w, generation));
    out->balloon_in_use++;
    return 0;
}

static int scan_pages(const struct memory_image *image, uint64_t *sums, struct verify_result *out,
                      char *err, size_t err_size)
{
    const struct vmstate *state = image->state;

    for (uint32_t i = 0; i < state->region_count; i++) {
        const struct memory_region *r = &state->regions[i];
        for (uint64_t gpa = r->guest_phys_addr; gpa < r->guest_phys_addr + r->size;
             gpa += GUEST_PAGE_SIZE) {
            const uint64_t *words = page_words(image, gpa);
            int rc = 0;
            if (gpa < GUEST_SYSTEM_AREA_END)
                continue;
            uint64_t balloon_start, balloon_end;
            balloon_area(&state->guest_config, &balloon_start, &balloon_end);
            if (gpa >= balloon_start && gpa < balloon_end) {
                rc = check_balloon_page(image, words, gpa, out, err, err_size);
            } else if (in_working_set(&state->guest_config, gpa)) {
                rc = check_working_page(state, words, gpa, sums, err, err_size);
                out->working_set_pages++;
            } else {
                rc = check_untouched_page(state, words, gpa, err, err_size);
                out->other_pages++;
            }
            if (rc < 0)
                return rc;
        }
    }
    return 0;
}

static int compare_totals(const struct vmstate *state, const uint64_t *sums,
                          struct verify_result *out, char *err, size_t err_size)
{
    for (uint32_t v = 0; v < state->vcpu_count; v++) {
        const struct vcpu_state *vcpu = &state->vcpus[v];
        uint64_t total = vmstate_vcpu_total(state, v);
        bool in_window = vcpu->regs.rip == state->increment_window;
        if (sums[v] == total || (sums[v] == total + 1 && in_window)) {
            out->totals[v] = total;
            continue;
        }
        return error_set(err, err_size, EBADMSG,
                         "vCPU %u: counters in memory add up to %" PRIu64
                         " but its register total is %" PRIu64 " (rip 0x%llx%s): memory %s",
                         v, sums[v], total, (unsigned long long)vcpu->regs.rip,
                         in_window ? ", between the increments" : "",
                         sums[v] < total ? "lags the vCPU state" : "leads the vCPU state");
    }
    out->vcpu_count = state->vcpu_count;
    return 0;
}

static int map_memory(const char *path, struct memory_image *image, char *err, size_t err_size)
{
    _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;

    if (fd < 0)
        return error_set(err, err_size, errno, "open(%s): %s", path, strerror(errno));
    if (fstat(fd, &st) < 0)
        return error_set(err, err_size, errno, "fstat(%s): %s", path, strerror(errno));
    image->size = (uint64_t)st.st_size;
    if (image->size == 0)
        return error_set(err, err_size, EBADMSG, "%s is empty", path);
    void *data = mmap(NULL, image->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (data == MAP_FAILED)
        return error_set(err, err_size, errno, "mmap(%s): %s", path, strerror(errno));
    image->data = data;
    return 0;
}

/* What the disk holds for each vCPU (a file shorter than the slots reads as zeros there). */
static int read_disk_words(const char *path, uint32_t count, uint64_t *words, char *err,
                           size_t err_size)
{
    _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return error_set(err, err_size, errno, "open(%s): %s", path, strerror(errno));
    memset(words, 0, count * sizeof(*words));
    size_t want = count * sizeof(*words), done = 0;
    while (done < want) {
        ssize_t n =
            pread(fd, (uint8_t *)words + done, want - done, (off_t)(GUEST_DISK_OFFSET + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return error_set(err, err_size, errno, "read(%s): %s", path, strerror(errno));
        if (n == 0)
            break;
        done += (size_t)n;
    }
    return 0;
}

/* The guest's disk against its memory and vCPU state (guest_layout.h, GUEST_PORT_DISK). */
static int check_disk(const struct memory_image *image, const char *disk_path,
                      struct verify_result *out, char *err, size_t err_size)
{
    const struct vmstate *state = image->state;
    uint64_t disk[GUEST_MAX_VCPUS];
    if (!state->guest_config.disk)
        return disk_path ? error_set(err, err_size, EINVAL,
                                     "--disk given, but this snapshot's guest writes no disk")
                         : 0;
    if (!disk_path)
        return error_set(err, err_size, EINVAL,
                         "this snapshot's guest writes a disk: pass --disk with the snapshot's "
                         "copy of its first writable drive");
    int r = read_disk_words(disk_path, state->vcpu_count, disk, err, err_size);
    if (r < 0)
        return r;
    for (uint32_t v = 0; v < state->vcpu_count; v++) {
        const struct vcpu_state *vcpu = &state->vcpus[v];
        uint64_t expected = 0;
        bool in_window = false;
        if (vmstate_vcpu_counting(state, v)) {
            const uint64_t *record = page_words(image, vcpu->regs.rbx + GUEST_DISK_RECORD_OFFSET);
            if (!record)
                return error_set(err, err_size, EBADMSG,
                                 "vCPU %u: its loop parameters (rbx 0x%llx) are not in memory", v,
                                 (unsigned long long)vcpu->regs.rbx);
            in_window = vcpu->regs.rip == state->disk_window;
            expected = (uint32_t)(in_window ? vcpu->regs.r15 : *record);
        }
        if (disk[v] != expected)
            return error_set(err, err_size, EBADMSG,
                             "vCPU %u: the disk holds %" PRIu64 " but memory says it last wrote "
                             "%" PRIu64 " (rip 0x%llx%s): the disk was captured at another "
                             "instant than memory",
                             v, disk[v], expected, (unsigned long long)vcpu->regs.rip,
                             in_window ? ", right after a disk write" : "");
    }
    out->disk_checked = true;
    return 0;
}

int verify_snapshot(const char *vmstate_path, const char *memory_path, struct verify_result *out,
                    char *err, size_t err_size)
{
    return verify_snapshot_with_disk(vmstate_path, memory_path, NULL, out, err, err_size);
}

int verify_snapshot_with_disk(const char *vmstate_path, const char *memory_path,
                              const char *disk_path, struct verify_result *out, char *err,
                              size_t err_size)
{
    _cleanup_free_ struct vmstate *state = malloc(sizeof(*state));
    struct memory_image image = {0};
    uint64_t sums[GUEST_MAX_VCPUS] = {0};
    int r;

    memset(out, 0, sizeof(*out));
    if (!state)
        return error_set(err, err_size, ENOMEM, "out of memory");
    r = vmstate_read(vmstate_path, state, err, err_size);
    if (r < 0)
        return r;
    image.state = state;
    r = map_memory(memory_path, &image, err, err_size);
    if (r < 0)
        return r;
    r = check_config(state, &image, err, err_size);
    if (r == 0)
        r = scan_pages(&image, sums, out, err, err_size);
    if (r == 0)
        r = compare_totals(state, sums, out, err, err_size);
    /* Last: memory that lags or leads the vCPUs is named as such first. */
    if (r == 0)
        r = check_device_page(&image, err, err_size);
    if (r == 0)
        r = check_disk(&image, disk_path, out, err, err_size);
    munmap((void *)image.data, image.size);
    return r;
}
