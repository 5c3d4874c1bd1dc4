/* guest_boot: image loading, page tables, GDT and workload config for a cold boot. */
#include "guest_boot.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "basic/cleanup.h"

#include "vmm_error.h"

#define PTE_PRESENT  (1ull << 0)
#define PTE_WRITABLE (1ull << 1)
#define PTE_USER     (1ull << 2)
#define PTE_HUGE     (1ull << 7)
#define PTE_ACCESSED (1ull << 5)
#define PTE_DIRTY    (1ull << 6)

static int load_image(struct guest_memory *memory, const char *path,
                      struct guest_image_header *header, char *err, size_t err_size)
{
    _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
    uint8_t *target = guest_memory_host_address(memory, GUEST_IMAGE_GPA, GUEST_IMAGE_MAX);
    struct stat st;

    if (fd < 0)
        return error_set(err, err_size, errno, "kernel_image_path %s: %s", path, strerror(errno));
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
        return error_set(err, err_size, EINVAL, "kernel_image_path %s is not a regular file", path);
    if (st.st_size < (off_t)sizeof(*header) || (uint64_t)st.st_size > GUEST_IMAGE_MAX)
        return error_set(err, err_size, EINVAL,
                         "kernel_image_path %s: %lld bytes is not a forkd-testvm guest image", path,
                         (long long)st.st_size);
    ssize_t n = pread(fd, target, (size_t)st.st_size, 0);
    if (n != st.st_size)
        return error_set(err, err_size, n < 0 ? errno : EIO, "reading %s: %s", path,
                         n < 0 ? strerror(errno) : "short read");
    memcpy(header, target, sizeof(*header));
    uint64_t end = GUEST_IMAGE_GPA + (uint64_t)st.st_size;
    if (header->magic != GUEST_IMAGE_MAGIC || header->entry < GUEST_IMAGE_GPA ||
        header->entry >= end || header->loop_start < GUEST_IMAGE_GPA || header->loop_end > end ||
        header->increment_window < header->loop_start ||
        header->increment_window >= header->loop_end || header->disk_window < header->loop_start ||
        header->disk_window >= header->loop_end)
        return error_set(err, err_size, EINVAL,
                         "kernel_image_path %s is not a forkd-testvm guest image (bad header)",
                         path);
    return 0;
}

/* Identity-maps [0, GUEST_PHYS_LIMIT) with 2 MiB pages; unbacked parts are never touched. */
static void write_page_tables(struct guest_memory *memory)
{
    uint64_t *pml4 = guest_memory_host_address(memory, GUEST_PML4_GPA, GUEST_PAGE_SIZE);
    uint64_t *pdpt = guest_memory_host_address(memory, GUEST_PDPT_GPA, GUEST_PAGE_SIZE);
    uint64_t *pd =
        guest_memory_host_address(memory, GUEST_PD_GPA, GUEST_PD_COUNT * GUEST_PAGE_SIZE);

    memset(pml4, 0, GUEST_PAGE_SIZE);
    memset(pdpt, 0, GUEST_PAGE_SIZE);
    pml4[0] = GUEST_PDPT_GPA | PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_ACCESSED;
    for (uint64_t gib = 0; gib < GUEST_PD_COUNT; gib++) {
        pdpt[gib] = (GUEST_PD_GPA + gib * GUEST_PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_USER |
                    PTE_ACCESSED;
        for (uint64_t entry = 0; entry < 512; entry++)
            pd[gib * 512 + entry] = ((gib << 30) | (entry << 21)) | PTE_PRESENT | PTE_WRITABLE |
                                    PTE_USER | PTE_HUGE | PTE_ACCESSED | PTE_DIRTY;
    }
}

static void write_gdt(struct guest_memory *memory)
{
    uint64_t *gdt = guest_memory_host_address(memory, GUEST_GDT_GPA, GUEST_PAGE_SIZE);

    memset(gdt, 0, GUEST_PAGE_SIZE);
    gdt[GUEST_DATA_SELECTOR / 8] = 0x00cff2000000ffffull; /* data, read/write, DPL 3 */
    gdt[GUEST_CODE_SELECTOR / 8] = 0x00affa000000ffffull; /* 64-bit code, DPL 3 */
}

uint64_t guest_boot_available_pages(const struct guest_memory *memory)
{
    uint64_t pages = (memory->regions[0].size - GUEST_SYSTEM_AREA_END) / GUEST_PAGE_SIZE;
    for (unsigned i = 1; i < memory->region_count; i++)
        pages += memory->regions[i].size / GUEST_PAGE_SIZE;
    return pages;
}

/* The working set is `pages` pages after the system area and `skip` pages more, across
 * regions. */
static void plan_working_set(const struct guest_memory *memory, uint64_t skip, uint64_t pages,
                             struct guest_config *config)
{
    config->pages = pages;
    config->range_count = 0;
    for (unsigned i = 0; i < memory->region_count && pages > 0; i++) {
        const struct memory_region *r = &memory->regions[i];
        uint64_t start = i == 0 ? GUEST_SYSTEM_AREA_END : r->guest_phys_addr;
        uint64_t available = (r->guest_phys_addr + r->size - start) / GUEST_PAGE_SIZE;
        uint64_t skipped = skip < available ? skip : available;
        skip -= skipped;
        available -= skipped;
        if (available == 0)
            continue;
        uint64_t take = pages < available ? pages : available;
        config->ranges[config->range_count++] =
            (struct guest_page_range){start + skipped * GUEST_PAGE_SIZE, take};
        pages -= take;
    }
}

/* The balloon's table and pages: the last pages of the last region, after the working set. */
static int plan_balloon(const struct guest_memory *memory, uint64_t balloon_pages,
                        struct guest_config *config, char *err, size_t err_size)
{
    const struct memory_region *last = &memory->regions[memory->region_count - 1];
    uint64_t start = memory->region_count == 1 ? GUEST_SYSTEM_AREA_END : last->guest_phys_addr;
    uint64_t need = guest_balloon_table_pages(balloon_pages) + balloon_pages;
    if (balloon_pages == 0)
        return 0;
    if ((last->guest_phys_addr + last->size - start) / GUEST_PAGE_SIZE < need)
        return error_set(err, err_size, EINVAL,
                         "boot_args: balloon=%" PRIu64 " needs %" PRIu64
                         " pages at the end of the last memory region",
                         balloon_pages, need);
    config->balloon_pages = balloon_pages;
    config->balloon_table_gpa = last->guest_phys_addr + last->size - need * GUEST_PAGE_SIZE;
    config->balloon_gpa =
        config->balloon_table_gpa + guest_balloon_table_pages(balloon_pages) * GUEST_PAGE_SIZE;
    return 0;
}

int guest_boot_prepare(struct guest_memory *memory, const char *image_path,
                       const struct workload *workload, unsigned vcpu_count, uint64_t tsc_khz,
                       struct guest_boot_result *out, char *err, size_t err_size)
{
    uint64_t balloon = workload->balloon_pages;
    uint64_t reserved = balloon ? guest_balloon_table_pages(balloon) + balloon : 0;
    uint64_t available = guest_boot_available_pages(memory);
    available = available > reserved ? available - reserved : 0;
    uint64_t skip = workload->skip_pages;
    if (skip >= available)
        return error_set(err, err_size, EINVAL,
                         "boot_args: skip=%" PRIu64 " leaves none of the guest's %" PRIu64
                         " usable pages%s",
                         skip, available, balloon ? " besides its balloon" : "");
    available -= skip;
    uint64_t pages = workload->pages ? workload->pages : available;
    int r;

    if (pages > available || pages == 0)
        return error_set(err, err_size, EINVAL,
                         "boot_args: pages=%" PRIu64 " but the guest has only %" PRIu64
                         " usable pages%s%s",
                         pages, available, balloon ? " besides its balloon" : "",
                         skip ? " after those skipped" : "");
    r = load_image(memory, image_path, &out->header, err, err_size);
    if (r < 0)
        return r;
    write_page_tables(memory);
    write_gdt(memory);
    out->config = (struct guest_config){
        .magic = GUEST_CONFIG_MAGIC,
        .vcpu_count = vcpu_count,
        .pattern = workload->pattern,
        .rate = workload->rate,
        .seed = workload->seed,
        .tsc_khz = tsc_khz,
        .report_us = workload->report_us,
        .disk = workload->disk ? 1 : 0,
    };
    plan_working_set(memory, skip, pages, &out->config);
    r = plan_balloon(memory, balloon, &out->config, err, err_size);
    if (r < 0)
        return r;
    memcpy(guest_memory_host_address(memory, GUEST_CONFIG_GPA, sizeof(out->config)), &out->config,
           sizeof(out->config));
    return 0;
}
