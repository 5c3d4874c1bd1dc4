/* vmstate: serialises and validates forkd-testvm's snapshot state file (format in vmstate.h). */
#include "vmstate.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "basic/cleanup.h"
#include "basic/fsutil.h"

#include "vmm_error.h"

#define VMSTATE_MAX_FILE_SIZE (1u << 20)

struct vmstate_file_header {
    char magic[8];
    uint32_t version;
    uint32_t header_size;
    uint32_t vcpu_count;
    uint32_t region_count;
    uint32_t mem_size_mib;
    uint32_t mmio_gap_mib;
    uint64_t increment_window;
    uint64_t loop_start;
    uint64_t loop_end;
    uint64_t device_saves;
    uint64_t flags; /* VMSTATE_FLAG_* */
    uint64_t disk_window;
    uint32_t drive_count;
    uint32_t net_count;
};

#define VMSTATE_FLAG_BOOT_FILLED 1ull
#define VMSTATE_FLAG_HUGE_PAGES  2ull

struct vmstate_file_drive {
    char id[64];
    char path[4096];
    uint32_t root;
    uint32_t read_only;
};

struct vmstate_file_net {
    char id[64];
    char host_dev_name[16];
    char guest_mac[24]; /* 18 used */
};

struct vmstate_file_vsock {
    uint32_t present;
    uint32_t guest_cid;
    char uds_path[112]; /* 108 used */
};

struct vmstate_file_region {
    uint64_t guest_phys_addr;
    uint64_t size;
    uint64_t file_offset;
};

static uint64_t fnv1a64(const uint8_t *data, size_t length)
{
    uint64_t hash = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < length; i++)
        hash = (hash ^ data[i]) * 0x100000001b3ull;
    return hash;
}

static size_t file_size_for(const struct vmstate_file_header *header)
{
    return sizeof(struct vmstate_file_header) +
           header->region_count * sizeof(struct vmstate_file_region) + sizeof(struct guest_config) +
           header->vcpu_count * sizeof(struct vcpu_state) +
           header->drive_count * sizeof(struct vmstate_file_drive) +
           header->net_count * sizeof(struct vmstate_file_net) + sizeof(struct vmstate_file_vsock) +
           sizeof(uint64_t);
}

static uint8_t *append(uint8_t *cursor, const void *data, size_t length);

static uint8_t *append_devices(uint8_t *cursor, const struct vmstate *state)
{
    for (uint32_t i = 0; i < state->net_count; i++) {
        struct vmstate_file_net net = {0};
        memcpy(net.id, state->nets[i].id, sizeof(state->nets[i].id));
        memcpy(net.host_dev_name, state->nets[i].host_dev_name, sizeof(net.host_dev_name));
        memcpy(net.guest_mac, state->nets[i].guest_mac, sizeof(state->nets[i].guest_mac));
        cursor = append(cursor, &net, sizeof(net));
    }
    struct vmstate_file_vsock vsock = {.present = state->vsock.present,
                                       .guest_cid = state->vsock.guest_cid};
    memcpy(vsock.uds_path, state->vsock.uds_path, sizeof(state->vsock.uds_path));
    return append(cursor, &vsock, sizeof(vsock));
}

static uint8_t *append(uint8_t *cursor, const void *data, size_t length)
{
    memcpy(cursor, data, length);
    return cursor + length;
}

static int write_all_and_sync(const char *path, const uint8_t *data, size_t length, bool sync,
                              char *err, size_t err_size)
{
    _cleanup_close_ int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);

    if (fd < 0)
        return error_set(err, err_size, errno, "open(%s): %s", path, strerror(errno));
    int r = fs_write_all(fd, data, length);
    if (r < 0)
        return error_set(err, err_size, -r, "write(%s): %s", path, strerror(-r));
    if (sync && fsync(fd) < 0)
        return error_set(err, err_size, errno, "fsync(%s): %s", path, strerror(errno));
    return 0;
}

int vmstate_write(const char *path, const struct vmstate *state, bool sync, char *err,
                  size_t err_size)
{
    struct vmstate_file_header header = {
        .magic = VMSTATE_MAGIC,
        .version = VMSTATE_VERSION,
        .header_size = sizeof(header),
        .vcpu_count = state->vcpu_count,
        .region_count = state->region_count,
        .mem_size_mib = state->mem_size_mib,
        .mmio_gap_mib = state->mmio_gap_mib,
        .increment_window = state->increment_window,
        .loop_start = state->loop_start,
        .loop_end = state->loop_end,
        .device_saves = state->device_saves,
        .flags = (state->boot_filled ? VMSTATE_FLAG_BOOT_FILLED : 0) |
                 (state->huge_pages ? VMSTATE_FLAG_HUGE_PAGES : 0),
        .disk_window = state->disk_window,
        .drive_count = state->drive_count,
        .net_count = state->net_count,
    };
    size_t size = file_size_for(&header);
    _cleanup_free_ uint8_t *buffer = calloc(1, size);

    if (!buffer)
        return error_set(err, err_size, ENOMEM, "vmstate buffer of %zu bytes", size);
    uint8_t *cursor = append(buffer, &header, sizeof(header));
    for (uint32_t i = 0; i < state->region_count; i++) {
        struct vmstate_file_region region = {
            .guest_phys_addr = state->regions[i].guest_phys_addr,
            .size = state->regions[i].size,
            .file_offset = state->regions[i].file_offset,
        };
        cursor = append(cursor, &region, sizeof(region));
    }
    cursor = append(cursor, &state->guest_config, sizeof(state->guest_config));
    cursor = append(cursor, state->vcpus, state->vcpu_count * sizeof(state->vcpus[0]));
    for (uint32_t i = 0; i < state->drive_count; i++) {
        struct vmstate_file_drive drive = {.root = state->drives[i].root,
                                           .read_only = state->drives[i].read_only};
        memcpy(drive.id, state->drives[i].id, sizeof(drive.id));
        memcpy(drive.path, state->drives[i].path, sizeof(drive.path));
        cursor = append(cursor, &drive, sizeof(drive));
    }
    cursor = append_devices(cursor, state);
    uint64_t checksum = fnv1a64(buffer, (size_t)(cursor - buffer));
    append(cursor, &checksum, sizeof(checksum));
    return write_all_and_sync(path, buffer, size, sync, err, err_size);
}

static int read_file(const char *path, uint8_t **data_out, size_t *size_out, char *err,
                     size_t err_size)
{
    _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
    _cleanup_free_ uint8_t *data = NULL;
    struct stat st;
    size_t done = 0;

    if (fd < 0)
        return error_set(err, err_size, errno, "open(%s): %s", path, strerror(errno));
    if (fstat(fd, &st) < 0)
        return error_set(err, err_size, errno, "fstat(%s): %s", path, strerror(errno));
    if (st.st_size <= 0 || st.st_size > VMSTATE_MAX_FILE_SIZE)
        return error_set(err, err_size, EINVAL, "%s: %lld bytes is not a plausible vmstate size",
                         path, (long long)st.st_size);
    data = malloc((size_t)st.st_size);
    if (!data)
        return error_set(err, err_size, ENOMEM, "reading %s", path);
    while (done < (size_t)st.st_size) {
        ssize_t n = read(fd, data + done, (size_t)st.st_size - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return error_set(err, err_size, n < 0 ? errno : EIO, "read(%s): %s", path,
                             n < 0 ? strerror(errno) : "file shrank");
        done += (size_t)n;
    }
    *data_out = take_ptr(data);
    *size_out = done;
    return 0;
}

static int check_header(const char *path, const struct vmstate_file_header *header, size_t size,
                        char *err, size_t err_size)
{
    if (memcmp(header->magic, VMSTATE_MAGIC, sizeof(header->magic)) != 0)
        return error_set(err, err_size, EINVAL, "%s is not a forkd-testvm vmstate (bad magic)",
                         path);
    if (header->version != VMSTATE_VERSION || header->header_size != sizeof(*header))
        return error_set(err, err_size, EINVAL,
                         "%s: vmstate version %u (header %u bytes) is not supported (want %u)",
                         path, header->version, header->header_size, VMSTATE_VERSION);
    if (header->vcpu_count == 0 || header->vcpu_count > GUEST_MAX_VCPUS ||
        header->region_count == 0 || header->region_count > GUEST_MEMORY_MAX_REGIONS ||
        header->drive_count > VMSTATE_MAX_DRIVES || header->net_count > VMSTATE_MAX_NETS)
        return error_set(err, err_size, EINVAL,
                         "%s: %u vCPUs, %u regions, %u drives and %u network interfaces are out "
                         "of range",
                         path, header->vcpu_count, header->region_count, header->drive_count,
                         header->net_count);
    size_t expected = file_size_for(header);
    if (size != expected)
        return error_set(err, err_size, EINVAL, "%s: %zu bytes, expected %zu for %u vCPUs", path,
                         size, expected, header->vcpu_count);
    return 0;
}

/* The network interfaces and the vsock, after the drives. */
static int read_devices(const char *path, const uint8_t *cursor, struct vmstate *state, char *err,
                        size_t err_size)
{
    for (uint32_t i = 0; i < state->net_count; i++) {
        struct vmstate_file_net net;
        memcpy(&net, cursor, sizeof(net));
        cursor += sizeof(net);
        if (!memchr(net.id, '\0', sizeof(state->nets[i].id)) ||
            !memchr(net.host_dev_name, '\0', sizeof(net.host_dev_name)) ||
            !memchr(net.guest_mac, '\0', sizeof(state->nets[i].guest_mac)))
            return error_set(err, err_size, EINVAL, "%s: network interface %u is malformed", path,
                             i);
        memcpy(state->nets[i].id, net.id, sizeof(state->nets[i].id));
        memcpy(state->nets[i].host_dev_name, net.host_dev_name, sizeof(net.host_dev_name));
        memcpy(state->nets[i].guest_mac, net.guest_mac, sizeof(state->nets[i].guest_mac));
    }
    struct vmstate_file_vsock vsock;
    memcpy(&vsock, cursor, sizeof(vsock));
    if (!memchr(vsock.uds_path, '\0', sizeof(state->vsock.uds_path)))
        return error_set(err, err_size, EINVAL, "%s: the vsock is malformed", path);
    state->vsock.present = vsock.present != 0;
    state->vsock.guest_cid = vsock.guest_cid;
    memcpy(state->vsock.uds_path, vsock.uds_path, sizeof(state->vsock.uds_path));
    return 0;
}

int vmstate_read(const char *path, struct vmstate *state, char *err, size_t err_size)
{
    _cleanup_free_ uint8_t *data = NULL;
    struct vmstate_file_header header;
    size_t size = 0;
    uint64_t checksum;
    int r;

    r = read_file(path, &data, &size, err, err_size);
    if (r < 0)
        return r;
    if (size < sizeof(header) + sizeof(checksum))
        return error_set(err, err_size, EINVAL, "%s: truncated vmstate", path);
    memcpy(&header, data, sizeof(header));
    r = check_header(path, &header, size, err, err_size);
    if (r < 0)
        return r;
    memcpy(&checksum, data + size - sizeof(checksum), sizeof(checksum));
    if (checksum != fnv1a64(data, size - sizeof(checksum)))
        return error_set(err, err_size, EINVAL, "%s: checksum mismatch (corrupt vmstate)", path);

    memset(state, 0, sizeof(*state));
    state->vcpu_count = header.vcpu_count;
    state->region_count = header.region_count;
    state->mem_size_mib = header.mem_size_mib;
    state->mmio_gap_mib = header.mmio_gap_mib;
    state->increment_window = header.increment_window;
    state->loop_start = header.loop_start;
    state->loop_end = header.loop_end;
    state->device_saves = header.device_saves;
    state->boot_filled = header.flags & VMSTATE_FLAG_BOOT_FILLED;
    state->huge_pages = header.flags & VMSTATE_FLAG_HUGE_PAGES;
    const uint8_t *cursor = data + sizeof(header);
    for (uint32_t i = 0; i < header.region_count; i++) {
        struct vmstate_file_region region;
        memcpy(&region, cursor, sizeof(region));
        cursor += sizeof(region);
        state->regions[i] = (struct memory_region){.guest_phys_addr = region.guest_phys_addr,
                                                   .size = region.size,
                                                   .file_offset = region.file_offset};
    }
    memcpy(&state->guest_config, cursor, sizeof(state->guest_config));
    cursor += sizeof(state->guest_config);
    memcpy(state->vcpus, cursor, header.vcpu_count * sizeof(state->vcpus[0]));
    cursor += header.vcpu_count * sizeof(state->vcpus[0]);
    state->disk_window = header.disk_window;
    state->drive_count = header.drive_count;
    for (uint32_t i = 0; i < header.drive_count; i++) {
        struct vmstate_file_drive drive;
        memcpy(&drive, cursor, sizeof(drive));
        cursor += sizeof(drive);
        if (!memchr(drive.id, '\0', sizeof(drive.id)) ||
            !memchr(drive.path, '\0', sizeof(drive.path)))
            return error_set(err, err_size, EINVAL, "%s: drive %u is malformed", path, i);
        memcpy(state->drives[i].id, drive.id, sizeof(drive.id));
        memcpy(state->drives[i].path, drive.path, sizeof(drive.path));
        state->drives[i].root = drive.root != 0;
        state->drives[i].read_only = drive.read_only != 0;
    }
    state->net_count = header.net_count;
    return read_devices(path, cursor, state, err, err_size);
}

bool vmstate_vcpu_counting(const struct vmstate *state, unsigned index)
{
    uint64_t rip = state->vcpus[index].regs.rip;
    return rip >= state->loop_start && rip < state->loop_end;
}

uint64_t vmstate_vcpu_total(const struct vmstate *state, unsigned index)
{
    return vmstate_vcpu_counting(state, index) ? state->vcpus[index].regs.r15 : 0;
}
