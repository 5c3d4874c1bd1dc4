/*
 * guest_memory: the guest RAM regions of one VM and how they are backed (anonymous at boot,
 * memory.bin private, a shared memfd, or anonymous filled lazily through a userfaultfd), the
 * boot fill pattern, and writing memory.bin. Owned by the API thread; vCPU threads only touch
 * the mappings through KVM.
 */
#ifndef FORKD_TESTVM_GUEST_MEMORY_H
#define FORKD_TESTVM_GUEST_MEMORY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define GUEST_MEMORY_MAX_REGIONS 2
/* Like x86 Firecracker: RAM from the MMIO gap's start resumes 1 GiB higher (at 4 GiB by default).
 */
#define GUEST_MEMORY_MMIO_GAP_SIZE (1ull << 30)

enum memory_backend {
    MEMORY_BACKEND_NONE = 0,
    MEMORY_BACKEND_ANONYMOUS, /* booted: private anonymous, like Firecracker */
    MEMORY_BACKEND_FILE,      /* restored: memory.bin MAP_PRIVATE */
    MEMORY_BACKEND_SHARED,    /* restored: a file (memfd) MAP_SHARED read-write */
    MEMORY_BACKEND_UFFD,      /* restored: anonymous, missing pages served over a userfaultfd */
};

struct memory_region {
    uint64_t guest_phys_addr;
    uint64_t size;
    uint64_t file_offset; /* offset in memory.bin: the sum of the sizes before it */
    uint8_t *host;        /* NULL until mapped */
};

struct guest_memory {
    enum memory_backend backend;
    /* GUEST_PAGE_SIZE, or GUEST_HUGE_PAGE_SIZE for guest memory from hugetlbfs (Firecracker's
     * machine-config huge_pages "2M"): anonymous MAP_HUGETLB, or a file on hugetlbfs (a memfd
     * made with MFD_HUGETLB). Set by plan/adopt to 4 KiB; the caller raises it before mapping. */
    uint64_t page_size;
    unsigned region_count;
    struct memory_region regions[GUEST_MEMORY_MAX_REGIONS];
    uint64_t total_size;
    int restore_uffd;   /* Uffd backend: kept open, like Firecracker */
    int restore_socket; /* Uffd backend: the page server connection, kept open */
};

/* Splits mem_size bytes into regions around the MMIO gap starting at gap_start (bytes). */
int guest_memory_plan(struct guest_memory *memory, uint64_t mem_size, uint64_t gap_start, char *err,
                      size_t err_size);

/*
 * Takes a layout recorded in a vmstate: checks that regions are page-aligned, do not overlap,
 * stay below the guest's mappable limit and have contiguous file offsets.
 */
int guest_memory_adopt_layout(struct guest_memory *memory, const struct memory_region *regions,
                              unsigned region_count, char *err, size_t err_size);

/* Sets up a planned (or, for restores, vmstate-described) layout with the given backend, in
 * pages of memory->page_size: a file must then live on a file system of that page size
 * (hugetlbfs for 2 MiB, anything else for 4 KiB), and anonymous huge pages are reserved at
 * mapping time (ENOMEM, named, when the host has too few free). */
int guest_memory_map_anonymous(struct guest_memory *memory, char *err, size_t err_size);
int guest_memory_map_file(struct guest_memory *memory, const char *path, bool shared, char *err,
                          size_t err_size);
int guest_memory_map_uffd(struct guest_memory *memory, const char *socket_path, char *err,
                          size_t err_size);

/* Writes every word of guest memory with guest_boot_pattern(its guest-physical address). */
void guest_memory_fill_boot_pattern(struct guest_memory *memory);

/* Host address of [gpa, gpa + length) if it lies inside one region, else NULL. */
void *guest_memory_host_address(const struct guest_memory *memory, uint64_t gpa, uint64_t length);

/* Writes the regions, concatenated in order, to path and fsyncs it. */
int guest_memory_write_file(const struct guest_memory *memory, const char *path, char *err,
                            size_t err_size);

const char *guest_memory_backend_name(enum memory_backend backend);

void guest_memory_release(struct guest_memory *memory);

#endif
