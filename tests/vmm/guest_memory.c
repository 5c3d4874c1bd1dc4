/* guest_memory: guest RAM regions, their backends, the boot pattern and memory.bin output. */
#include "guest_memory.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <linux/magic.h>
#include <linux/mman.h> /* MAP_HUGE_2MB */

#include <forkd_compat/userfaultfd.h>

#include "basic/cleanup.h"
#include "basic/fsutil.h"

#include "guest_layout.h"
#include "uffd_handshake.h"
#include "vmm_error.h"

#define WRITE_CHUNK (8u << 20)

int guest_memory_plan(struct guest_memory *memory, uint64_t mem_size, uint64_t gap_start, char *err,
                      size_t err_size)
{
    struct memory_region *regions = memory->regions;

    if (mem_size < 2 * GUEST_SYSTEM_AREA_END || mem_size % GUEST_PAGE_SIZE)
        return error_set(err, err_size, EINVAL, "guest memory of %" PRIu64 " bytes is too small",
                         mem_size);
    if (gap_start < 2 * GUEST_SYSTEM_AREA_END || gap_start % GUEST_HUGE_PAGE_SIZE)
        return error_set(err, err_size, EINVAL,
                         "MMIO gap start %" PRIu64 " must be a multiple of 2 MiB, at least 2 MiB",
                         gap_start);
    memset(memory, 0, sizeof(*memory));
    memory->page_size = GUEST_PAGE_SIZE;
    memory->restore_uffd = -1;
    memory->restore_socket = -1;
    regions[0] = (struct memory_region){.size = mem_size < gap_start ? mem_size : gap_start};
    memory->region_count = 1;
    if (mem_size > gap_start) {
        regions[1] =
            (struct memory_region){.guest_phys_addr = gap_start + GUEST_MEMORY_MMIO_GAP_SIZE,
                                   .size = mem_size - gap_start,
                                   .file_offset = gap_start};
        memory->region_count = 2;
    }
    const struct memory_region *last = &regions[memory->region_count - 1];
    if (last->guest_phys_addr + last->size > GUEST_PHYS_LIMIT)
        return error_set(err, err_size, EINVAL,
                         "guest memory ends at 0x%" PRIx64 ", past the 0x%llx the guest can map",
                         last->guest_phys_addr + last->size, GUEST_PHYS_LIMIT);
    memory->total_size = mem_size;
    return 0;
}

int guest_memory_adopt_layout(struct guest_memory *memory, const struct memory_region *regions,
                              unsigned region_count, char *err, size_t err_size)
{
    uint64_t offset = 0, previous_end = 0;

    if (region_count == 0 || region_count > GUEST_MEMORY_MAX_REGIONS)
        return error_set(err, err_size, EINVAL, "%u memory regions (1 to %d allowed)", region_count,
                         GUEST_MEMORY_MAX_REGIONS);
    memset(memory, 0, sizeof(*memory));
    memory->page_size = GUEST_PAGE_SIZE;
    memory->restore_uffd = -1;
    memory->restore_socket = -1;
    for (unsigned i = 0; i < region_count; i++) {
        const struct memory_region *r = &regions[i];
        if (r->size == 0 || r->size % GUEST_PAGE_SIZE || r->guest_phys_addr % GUEST_PAGE_SIZE ||
            r->guest_phys_addr < previous_end || r->file_offset != offset ||
            r->guest_phys_addr >= GUEST_PHYS_LIMIT ||
            r->size > GUEST_PHYS_LIMIT - r->guest_phys_addr)
            return error_set(err, err_size, EINVAL,
                             "region %u (gpa 0x%" PRIx64 ", size 0x%" PRIx64 ", offset 0x%" PRIx64
                             ") is misaligned, overlapping or out of range",
                             i, r->guest_phys_addr, r->size, r->file_offset);
        memory->regions[i] = (struct memory_region){
            .guest_phys_addr = r->guest_phys_addr, .size = r->size, .file_offset = r->file_offset};
        previous_end = r->guest_phys_addr + r->size;
        offset += r->size;
    }
    if (regions[0].guest_phys_addr != 0 || regions[0].size < 2 * GUEST_SYSTEM_AREA_END)
        return error_set(err, err_size, EINVAL,
                         "region 0 must start at 0 and hold the system area");
    memory->region_count = region_count;
    memory->total_size = offset;
    return 0;
}

static bool huge_pages(const struct guest_memory *memory)
{
    return memory->page_size == GUEST_HUGE_PAGE_SIZE;
}

static int map_regions(struct guest_memory *memory, int fd, int flags, char *err, size_t err_size)
{
    for (unsigned i = 0; i < memory->region_count; i++) {
        struct memory_region *r = &memory->regions[i];
        if (r->size % memory->page_size || r->file_offset % memory->page_size)
            return error_set(err, err_size, EINVAL,
                             "region %u (%" PRIu64 " bytes at offset %" PRIu64
                             ") is not a whole number of %" PRIu64 "-byte pages",
                             i, r->size, r->file_offset, memory->page_size);
        void *host = mmap(NULL, r->size, PROT_READ | PROT_WRITE, flags, fd,
                          fd >= 0 ? (off_t)r->file_offset : 0);
        if (host == MAP_FAILED && errno == ENOMEM && huge_pages(memory))
            return error_set(err, err_size, ENOMEM,
                             "mmap of region %u (%" PRIu64 " bytes): not enough free 2 MiB huge "
                             "pages (see /proc/sys/vm/nr_hugepages)",
                             i, r->size);
        if (host == MAP_FAILED)
            return error_set(err, err_size, errno, "mmap of region %u (%" PRIu64 " bytes): %s", i,
                             r->size, strerror(errno));
        r->host = host;
    }
    return 0;
}

/* Anonymous guest memory: huge pages are reserved when mapped (no MAP_NORESERVE, which would
 * turn a shortage into a SIGBUS inside KVM_RUN later). */
static int anonymous_flags(const struct guest_memory *memory)
{
    if (huge_pages(memory))
        return MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_HUGE_2MB;
    return MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
}

int guest_memory_map_anonymous(struct guest_memory *memory, char *err, size_t err_size)
{
    memory->backend = MEMORY_BACKEND_ANONYMOUS;
    return map_regions(memory, -1, anonymous_flags(memory), err, err_size);
}

/* A memory file's pages must be the guest's: a hugetlbfs file for 2 MiB pages, any other file
 * for 4 KiB ones (mapping a hugetlbfs file as 4 KiB memory would silently hand KVM huge pages
 * the snapshot does not record, and the reverse cannot work). */
static int check_file_page_size(const struct guest_memory *memory, int fd, const char *path,
                                char *err, size_t err_size)
{
    struct statfs fs;
    if (fstatfs(fd, &fs) < 0)
        return error_set(err, err_size, errno, "fstatfs(%s): %s", path, strerror(errno));
    bool hugetlbfs = fs.f_type == HUGETLBFS_MAGIC;
    if (huge_pages(memory) && (!hugetlbfs || (uint64_t)fs.f_bsize != GUEST_HUGE_PAGE_SIZE))
        return error_set(err, err_size, EINVAL,
                         "%s is not on hugetlbfs with 2 MiB pages, but guest memory uses 2 MiB "
                         "pages (huge_pages \"2M\")",
                         path);
    if (!huge_pages(memory) && hugetlbfs)
        return error_set(err, err_size, EINVAL,
                         "%s is on hugetlbfs, but guest memory uses 4 KiB pages (set huge_pages "
                         "\"2M\")",
                         path);
    return 0;
}

int guest_memory_map_file(struct guest_memory *memory, const char *path, bool shared, char *err,
                          size_t err_size)
{
    _cleanup_close_ int fd = -1;
    struct stat st;

    fd = open(path, (shared ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (fd < 0)
        return error_set(err, err_size, errno, "open(%s): %s", path, strerror(errno));
    if (fstat(fd, &st) < 0)
        return error_set(err, err_size, errno, "fstat(%s): %s", path, strerror(errno));
    if ((uint64_t)st.st_size != memory->total_size)
        return error_set(err, err_size, EINVAL,
                         "%s is %lld bytes but the snapshot's regions add up to %" PRIu64, path,
                         (long long)st.st_size, memory->total_size);
    if (huge_pages(memory) && !shared)
        return error_set(err, err_size, EINVAL,
                         "guest memory with 2 MiB pages cannot be a private file mapping "
                         "(restore with backend Uffd, or a shared hugetlbfs file)");
    int r = check_file_page_size(memory, fd, path, err, err_size);
    if (r < 0)
        return r;
    memory->backend = shared ? MEMORY_BACKEND_SHARED : MEMORY_BACKEND_FILE;
    /* The mappings keep the file alive; the descriptor is not needed afterwards. */
    return map_regions(memory, fd, shared ? MAP_SHARED : MAP_PRIVATE, err, err_size);
}

int guest_memory_map_uffd(struct guest_memory *memory, const char *socket_path, char *err,
                          size_t err_size)
{
    struct uffd_handshake_region handshake[GUEST_MEMORY_MAX_REGIONS];
    _cleanup_close_ int uffd = -1;
    int r;

    memory->backend = MEMORY_BACKEND_UFFD;
    r = map_regions(memory, -1, anonymous_flags(memory), err, err_size);
    if (r < 0)
        return r;
    uffd = uffd_open(UFFD_FEATURE_EVENT_REMOVE, 0, NULL, err, err_size);
    if (uffd < 0)
        return uffd;
    for (unsigned i = 0; i < memory->region_count; i++) {
        const struct memory_region *region = &memory->regions[i];
        r = uffd_register(uffd, (uint64_t)region->host, region->size, UFFDIO_REGISTER_MODE_MISSING,
                          err, err_size);
        if (r < 0)
            return r;
        handshake[i] = (struct uffd_handshake_region){
            .base_host_virt_addr = (uint64_t)region->host,
            .size = region->size,
            .offset = region->file_offset,
            .page_size = memory->page_size,
        };
    }
    r = uffd_handshake_send(socket_path, uffd, handshake, memory->region_count,
                            &memory->restore_socket, err, err_size);
    if (r < 0)
        return r;
    memory->restore_uffd = take_fd(uffd);
    return 0;
}

void guest_memory_fill_boot_pattern(struct guest_memory *memory)
{
    for (unsigned i = 0; i < memory->region_count; i++) {
        const struct memory_region *r = &memory->regions[i];
        uint64_t *words = (uint64_t *)r->host;
        for (uint64_t w = 0; w < r->size / 8; w++)
            words[w] = guest_boot_pattern(r->guest_phys_addr + 8 * w);
    }
}

void *guest_memory_host_address(const struct guest_memory *memory, uint64_t gpa, uint64_t length)
{
    for (unsigned i = 0; i < memory->region_count; i++) {
        const struct memory_region *r = &memory->regions[i];
        if (gpa >= r->guest_phys_addr && length <= r->size &&
            gpa - r->guest_phys_addr <= r->size - length)
            return r->host + (gpa - r->guest_phys_addr);
    }
    return NULL;
}

static int write_all(int fd, const uint8_t *data, uint64_t length, const char *path, char *err,
                     size_t err_size)
{
    while (length > 0) {
        size_t chunk = length < WRITE_CHUNK ? length : WRITE_CHUNK;
        int r = fs_write_all(fd, data, chunk);
        if (r < 0)
            return error_set(err, err_size, -r, "write(%s): %s", path, strerror(-r));
        data += chunk;
        length -= chunk;
    }
    return 0;
}

int guest_memory_write_file(const struct guest_memory *memory, const char *path, char *err,
                            size_t err_size)
{
    _cleanup_close_ int fd = -1;
    int r;

    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return error_set(err, err_size, errno, "open(%s): %s", path, strerror(errno));
    for (unsigned i = 0; i < memory->region_count; i++) {
        r = write_all(fd, memory->regions[i].host, memory->regions[i].size, path, err, err_size);
        if (r < 0)
            return r;
    }
    if (fsync(fd) < 0)
        return error_set(err, err_size, errno, "fsync(%s): %s", path, strerror(errno));
    return 0;
}

const char *guest_memory_backend_name(enum memory_backend backend)
{
    switch (backend) {
    case MEMORY_BACKEND_ANONYMOUS:
        return "Anonymous";
    case MEMORY_BACKEND_FILE:
        return "File";
    case MEMORY_BACKEND_SHARED:
        return "FileShared";
    case MEMORY_BACKEND_UFFD:
        return "Uffd";
    default:
        return "None";
    }
}

void guest_memory_release(struct guest_memory *memory)
{
    for (unsigned i = 0; i < memory->region_count; i++) {
        if (memory->regions[i].host)
            munmap(memory->regions[i].host, memory->regions[i].size);
        memory->regions[i].host = NULL;
    }
    forkd_closep(&memory->restore_uffd);
    forkd_closep(&memory->restore_socket);
    memory->restore_uffd = memory->restore_socket = -1;
    memory->backend = MEMORY_BACKEND_NONE;
}
