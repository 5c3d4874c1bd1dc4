/* api: endpoint handlers and the VMM state machine (see api.h). */
#include "api.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <forkd_compat/userfaultfd.h>

#include "basic/cleanup.h"

#include "guest_boot.h"
#include "uffd_handshake.h"
#include "vmm_error.h"
#include "vmstate.h"

#ifndef FORKD_VERSION
#define FORKD_VERSION "0.0.0"
#endif

#define MIN_MEM_SIZE_MIB 4u
#define MAX_MEM_SIZE_MIB (15u << 10)

static void cjson_deletep(cJSON **json)
{
    cJSON_Delete(*json);
}
#define _cleanup_json_ _cleanup_(cjson_deletep)

static uint64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void vmm_init(struct vmm *vmm, const char *id, uint32_t mmio_gap_mib, unsigned pause_timeout_ms)
{
    memset(vmm, 0, sizeof(*vmm));
    snprintf(vmm->id, sizeof(vmm->id), "%s", id);
    vmm->mmio_gap_mib = mmio_gap_mib;
    vmm->pause_timeout_ms = pause_timeout_ms;
    vmm->vcpu_count = 1;
    vmm->mem_size_mib = 128; /* Firecracker's defaults */
    vmm->memory.restore_uffd = vmm->memory.restore_socket = -1;
    vmm->write_protect_socket = -1;
    boot_args_parse(NULL, &vmm->workload, NULL, 0);
}

static const char *state_name(enum vmm_state state)
{
    switch (state) {
    case VMM_RUNNING:
        return "Running";
    case VMM_PAUSED:
        return "Paused";
    default:
        return "Not started";
    }
}

/* ---- request body schema checks: unknown fields and wrong types are 400s ---- */

enum field_type {
    FIELD_STRING,
    FIELD_UNSIGNED,
    FIELD_BOOL,
    FIELD_OBJECT,
    FIELD_ARRAY,
};

struct field_spec {
    const char *name;
    enum field_type type;
    bool required;
};

static const char *field_type_name(enum field_type type)
{
    static const char *const names[] = {"a string", "a non-negative integer", "a boolean",
                                        "an object", "an array"};
    return names[type];
}

static bool field_has_type(const cJSON *item, enum field_type type)
{
    switch (type) {
    case FIELD_STRING:
        return cJSON_IsString(item);
    case FIELD_UNSIGNED:
        return cJSON_IsNumber(item) && item->valuedouble >= 0 &&
               item->valuedouble <= 9007199254740992.0 &&
               floor(item->valuedouble) == item->valuedouble;
    case FIELD_BOOL:
        return cJSON_IsBool(item);
    case FIELD_ARRAY:
        return cJSON_IsArray(item);
    default:
        return cJSON_IsObject(item);
    }
}

static int check_fields(const cJSON *object, const char *what, const struct field_spec *specs,
                        size_t count, char *err, size_t err_size)
{
    const cJSON *item;

    if (!cJSON_IsObject(object))
        return error_set(err, err_size, EINVAL, "%s must be a JSON object", what);
    cJSON_ArrayForEach(item, object)
    {
        size_t i;
        for (i = 0; i < count; i++)
            if (item->string && strcmp(item->string, specs[i].name) == 0)
                break;
        if (i == count)
            return error_set(err, err_size, EINVAL, "%s: unknown field '%s'", what,
                             item->string ? item->string : "");
        if (!field_has_type(item, specs[i].type))
            return error_set(err, err_size, EINVAL, "%s: field '%s' must be %s", what,
                             specs[i].name, field_type_name(specs[i].type));
    }
    for (size_t i = 0; i < count; i++)
        if (specs[i].required && !cJSON_GetObjectItemCaseSensitive(object, specs[i].name))
            return error_set(err, err_size, EINVAL, "%s: missing field '%s'", what, specs[i].name);
    return 0;
}

static const char *string_field(const cJSON *object, const char *name)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(object, name);
    return cJSON_IsString(item) ? item->valuestring : NULL;
}

static bool bool_field(const cJSON *object, const char *name, bool fallback)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(object, name);
    return cJSON_IsBool(item) ? cJSON_IsTrue(item) : fallback;
}

static int require_fresh(const struct vmm *vmm, const char *what, char *err, size_t err_size)
{
    if (vmm->state != VMM_NOT_STARTED)
        return error_set(err, err_size, EINVAL, "%s is not allowed after the microVM started",
                         what);
    return 0;
}

/* ---- GET / ---- */

static void add_regions(cJSON *root, const struct guest_memory *memory)
{
    cJSON *regions = cJSON_AddArrayToObject(root, "regions");
    for (unsigned i = 0; regions && i < memory->region_count; i++) {
        cJSON *region = cJSON_CreateObject();
        cJSON_AddNumberToObject(region, "guest_phys_addr",
                                (double)memory->regions[i].guest_phys_addr);
        cJSON_AddNumberToObject(region, "size", (double)memory->regions[i].size);
        cJSON_AddNumberToObject(region, "offset", (double)memory->regions[i].file_offset);
        cJSON_AddItemToArray(regions, region);
    }
}

static void add_drives(cJSON *root, const struct vmm *vmm)
{
    cJSON *drives = cJSON_AddArrayToObject(root, "drives");
    for (unsigned i = 0; drives && i < vmm->drive_count; i++) {
        cJSON *drive = cJSON_CreateObject();
        cJSON_AddStringToObject(drive, "drive_id", vmm->drives[i].id);
        cJSON_AddStringToObject(drive, "path_on_host", vmm->drives[i].path);
        cJSON_AddBoolToObject(drive, "is_root_device", vmm->drives[i].root);
        cJSON_AddBoolToObject(drive, "is_read_only", vmm->drives[i].read_only);
        cJSON_AddItemToArray(drives, drive);
    }
}

static void add_network_and_vsock(cJSON *root, const struct vmm *vmm)
{
    cJSON *nets = cJSON_AddArrayToObject(root, "network_interfaces");
    for (unsigned i = 0; nets && i < vmm->net_count; i++) {
        cJSON *net = cJSON_CreateObject();
        cJSON_AddStringToObject(net, "iface_id", vmm->nets[i].id);
        cJSON_AddStringToObject(net, "host_dev_name", vmm->nets[i].host_dev_name);
        cJSON_AddStringToObject(net, "guest_mac", vmm->nets[i].guest_mac);
        cJSON_AddItemToArray(nets, net);
    }
    if (!vmm->vsock.present) {
        cJSON_AddNullToObject(root, "vsock");
    } else {
        cJSON *vsock = cJSON_AddObjectToObject(root, "vsock");
        cJSON_AddNumberToObject(vsock, "guest_cid", vmm->vsock.guest_cid);
        cJSON_AddStringToObject(vsock, "uds_path", vmm->vsock.uds_path);
    }
    cJSON_AddStringToObject(root, "initrd_path", vmm->initrd_path);
}

static void add_guest_status(cJSON *root, struct vmm *vmm)
{
    char failure[200];
    cJSON *progress = cJSON_AddArrayToObject(root, "guest_progress");

    for (unsigned i = 0; progress && vmm->vm_created && i < vmm->vm.vcpu_count; i++)
        cJSON_AddItemToArray(progress,
                             cJSON_CreateNumber((double)atomic_load(&vmm->vm.vcpus[i].progress)));
    if (vmm->vm_created && kvm_vm_failure(&vmm->vm, failure, sizeof(failure)))
        cJSON_AddStringToObject(root, "guest_error", failure);
    else
        cJSON_AddNullToObject(root, "guest_error");
}

static int parse_decimal(const char *text, uint64_t *out)
{
    char *end;
    if (!text || text[0] < '0' || text[0] > '9')
        return -EINVAL;
    errno = 0;
    *out = strtoull(text, &end, 10);
    return errno || *end ? -EINVAL : 0;
}

/* GET /progress/<since_ns>: each vCPU's progress reports that arrived after since_ns
 * (CLOCK_MONOTONIC), oldest first, at most PROGRESS_PAGE per vCPU so the answer stays small;
 * "more" says a vCPU had more (ask again from its last at_ns).
 * {"vcpus":[{"at_ns":[...],"progress":[...]},...],"more":false} */
#define PROGRESS_PAGE 2048u
static int handle_get_progress(struct vmm *vmm, const char *resource_id, const cJSON *body,
                               char **response, char *err, size_t err_size)
{
    uint64_t since = 0;
    (void)body;
    if (parse_decimal(resource_id, &since) < 0)
        return error_set(err, err_size, EINVAL, "GET /progress/%s: not a decimal time in ns",
                         resource_id);
    _cleanup_json_ cJSON *root = cJSON_CreateObject();
    cJSON *vcpus = root ? cJSON_AddArrayToObject(root, "vcpus") : NULL;
    _cleanup_free_ struct vcpu_report *reports = malloc((PROGRESS_PAGE + 1) * sizeof(*reports));
    if (!vcpus || !reports)
        return error_set(err, err_size, ENOMEM, "out of memory");
    bool more = false;
    for (unsigned i = 0; vmm->vm_created && i < vmm->vm.vcpu_count; i++) {
        uint64_t n = kvm_vm_read_reports(&vmm->vm.vcpus[i], since, reports, PROGRESS_PAGE + 1);
        more |= n > PROGRESS_PAGE;
        n = n > PROGRESS_PAGE ? PROGRESS_PAGE : n;
        cJSON *vcpu = cJSON_CreateObject();
        cJSON *at = cJSON_AddArrayToObject(vcpu, "at_ns");
        cJSON *progress = cJSON_AddArrayToObject(vcpu, "progress");
        for (uint64_t r = 0; r < n; r++) {
            cJSON_AddItemToArray(at, cJSON_CreateNumber((double)reports[r].at_ns));
            cJSON_AddItemToArray(progress, cJSON_CreateNumber((double)reports[r].progress));
        }
        cJSON_AddItemToArray(vcpus, vcpu);
    }
    cJSON_AddBoolToObject(root, "more", more);
    *response = cJSON_PrintUnformatted(root);
    return *response ? 0 : error_set(err, err_size, ENOMEM, "out of memory");
}

static int handle_get_root(struct vmm *vmm, const char *resource_id, const cJSON *body,
                           char **response, char *err, size_t err_size)
{
    _cleanup_json_ cJSON *root = cJSON_CreateObject();

    (void)body;
    if (!root)
        return error_set(err, err_size, ENOMEM, "out of memory");
    cJSON_AddStringToObject(root, "id", vmm->id);
    cJSON_AddStringToObject(root, "state", state_name(vmm->state));
    cJSON_AddStringToObject(root, "vmm_version", FORKD_VERSION);
    cJSON_AddStringToObject(root, "app_name", "forkd-testvm");
    cJSON_AddNumberToObject(root, "pid", getpid());
    cJSON_AddNumberToObject(root, "vcpu_count", vmm->vcpu_count);
    cJSON_AddNumberToObject(root, "mem_size_mib", vmm->mem_size_mib);
    cJSON_AddNumberToObject(root, "mmio_gap_mib", vmm->mmio_gap_mib);
    cJSON_AddStringToObject(root, "memory_backend", guest_memory_backend_name(vmm->memory.backend));
    cJSON_AddStringToObject(root, "huge_pages", vmm->huge_pages ? "2M" : "None");
    add_regions(root, &vmm->memory);
    add_drives(root, vmm);
    add_network_and_vsock(root, vmm);
    cJSON_AddNumberToObject(root, "pause_count", (double)vmm->pause_count);
    cJSON_AddNumberToObject(root, "last_pause_ns", (double)vmm->last_pause_ns);
    cJSON_AddNumberToObject(root, "last_resume_ns", (double)vmm->last_resume_ns);
    cJSON_AddNumberToObject(root, "last_snapshot_ns", (double)vmm->last_snapshot_ns);
    cJSON_AddNumberToObject(root, "balloon_discards",
                            vmm->vm_created ? (double)atomic_load(&vmm->vm.balloon_discards) : 0);
    add_guest_status(root, vmm);
    *response = cJSON_PrintUnformatted(root);
    return *response ? 0 : error_set(err, err_size, ENOMEM, "out of memory");
}

/* ---- configuration ---- */

static int vmm_record_drive(struct vmm *vmm, const char *id, const char *path, bool root,
                            bool read_only, char *err, size_t err_size)
{
    struct vmm_drive *drive = NULL;

    for (unsigned i = 0; i < vmm->drive_count && !drive; i++)
        if (strcmp(vmm->drives[i].id, id) == 0)
            drive = &vmm->drives[i]; /* PUT replaces, like Firecracker */
    if (!drive && vmm->drive_count == VMM_MAX_DRIVES)
        return error_set(err, err_size, ENOSPC, "at most %d drives", VMM_MAX_DRIVES);
    if (strlen(id) >= sizeof(drive->id) || strlen(path) >= sizeof(drive->path))
        return error_set(err, err_size, ENAMETOOLONG, "drive_id or path_on_host too long");
    if (!drive)
        drive = &vmm->drives[vmm->drive_count++];
    strcpy(drive->id, id);
    strcpy(drive->path, path);
    drive->root = root;
    drive->read_only = read_only;
    return 0;
}

static int handle_machine_config(struct vmm *vmm, const char *resource_id, const cJSON *body,
                                 char **response, char *err, size_t err_size)
{
    static const struct field_spec specs[] = {
        {"vcpu_count", FIELD_UNSIGNED, true},
        {"mem_size_mib", FIELD_UNSIGNED, true},
        {"smt", FIELD_BOOL, false},
        {"track_dirty_pages", FIELD_BOOL, false},
        {"mem_backend_path", FIELD_STRING, false},
        {"huge_pages", FIELD_STRING, false},
    };
    int r = check_fields(body, "machine-config", specs, 6, err, err_size);

    (void)response;
    if (r == 0)
        r = require_fresh(vmm, "PUT /machine-config", err, err_size);
    if (r < 0)
        return r;
    double vcpus = cJSON_GetObjectItemCaseSensitive(body, "vcpu_count")->valuedouble;
    double mib = cJSON_GetObjectItemCaseSensitive(body, "mem_size_mib")->valuedouble;
    if (vcpus < 1 || vcpus > GUEST_MAX_VCPUS)
        return error_set(err, err_size, EINVAL, "vcpu_count must be 1 to %u", GUEST_MAX_VCPUS);
    if (mib < MIN_MEM_SIZE_MIB || mib > MAX_MEM_SIZE_MIB)
        return error_set(err, err_size, EINVAL, "mem_size_mib must be %u to %u", MIN_MEM_SIZE_MIB,
                         MAX_MEM_SIZE_MIB);
    if (bool_field(body, "smt", false))
        return error_set(err, err_size, EINVAL, "smt is not supported");
    const char *backend_path = string_field(body, "mem_backend_path");
    if (backend_path && (!*backend_path || strlen(backend_path) >= sizeof(vmm->boot_memory_path)))
        return error_set(err, err_size, EINVAL, "mem_backend_path must be a path");
    const char *huge_pages = string_field(body, "huge_pages");
    if (huge_pages && strcmp(huge_pages, "None") != 0 && strcmp(huge_pages, "2M") != 0)
        return error_set(err, err_size, EINVAL, "huge_pages must be \"None\" or \"2M\"");
    bool huge = huge_pages && strcmp(huge_pages, "2M") == 0;
    if (huge && (uint32_t)mib % (GUEST_HUGE_PAGE_SIZE >> 20))
        return error_set(err, err_size, EINVAL,
                         "mem_size_mib must be a multiple of 2 with huge_pages \"2M\"");
    snprintf(vmm->boot_memory_path, sizeof(vmm->boot_memory_path), "%s",
             backend_path ? backend_path : "");
    vmm->huge_pages = huge;
    vmm->vcpu_count = (uint32_t)vcpus;
    vmm->mem_size_mib = (uint32_t)mib;
    vmm->machine_configured = true;
    return 0;
}

static int handle_boot_source(struct vmm *vmm, const char *resource_id, const cJSON *body,
                              char **response, char *err, size_t err_size)
{
    static const struct field_spec specs[] = {
        {"kernel_image_path", FIELD_STRING, true},
        {"boot_args", FIELD_STRING, false},
        {"initrd_path", FIELD_STRING, false},
    };
    struct workload workload;
    int r = check_fields(body, "boot-source", specs, 3, err, err_size);

    (void)response;
    if (r == 0)
        r = require_fresh(vmm, "PUT /boot-source", err, err_size);
    if (r == 0)
        r = boot_args_parse(string_field(body, "boot_args"), &workload, err, err_size);
    if (r < 0)
        return r;
    const char *path = string_field(body, "kernel_image_path");
    if (strlen(path) >= sizeof(vmm->kernel_image_path) || path[0] == '\0')
        return error_set(err, err_size, EINVAL, "kernel_image_path is empty or too long");
    if (access(path, R_OK) < 0)
        return error_set(err, err_size, errno, "kernel_image_path %s: %s", path, strerror(errno));
    const char *initrd = string_field(body, "initrd_path");
    if (initrd && (initrd[0] == '\0' || strlen(initrd) >= sizeof(vmm->initrd_path)))
        return error_set(err, err_size, EINVAL, "initrd_path is empty or too long");
    if (initrd && access(initrd, R_OK) < 0) /* Firecracker opens it here */
        return error_set(err, err_size, errno, "initrd_path %s: %s", initrd, strerror(errno));
    snprintf(vmm->initrd_path, sizeof(vmm->initrd_path), "%s", initrd ? initrd : "");
    strcpy(vmm->kernel_image_path, path);
    vmm->workload = workload;
    vmm->boot_source_configured = true;
    return 0;
}

/* The guest has no block devices: drives are validated like Firecracker does (the file must
 * open) and recorded for GET /, so callers that configure a rootfs work unchanged. */
static int handle_drive(struct vmm *vmm, const char *resource_id, const cJSON *body,
                        char **response, char *err, size_t err_size)
{
    static const struct field_spec specs[] = {
        {"drive_id", FIELD_STRING, true},     {"path_on_host", FIELD_STRING, true},
        {"is_root_device", FIELD_BOOL, true}, {"is_read_only", FIELD_BOOL, false},
        {"partuuid", FIELD_STRING, false},    {"cache_type", FIELD_STRING, false},
    };
    int r = check_fields(body, "drives", specs, 6, err, err_size);

    (void)response;
    if (r == 0)
        r = require_fresh(vmm, "PUT /drives", err, err_size);
    if (r < 0)
        return r;
    const char *id = string_field(body, "drive_id");
    const char *path = string_field(body, "path_on_host");
    if (strcmp(id, resource_id) != 0)
        return error_set(err, err_size, EINVAL, "drive_id '%s' does not match the path's '%s'", id,
                         resource_id);
    if (access(path, bool_field(body, "is_read_only", false) ? R_OK : R_OK | W_OK) < 0)
        return error_set(err, err_size, errno, "path_on_host %s: %s", path, strerror(errno));
    return vmm_record_drive(vmm, id, path, bool_field(body, "is_root_device", false),
                            bool_field(body, "is_read_only", false), err, err_size);
}

static bool is_mac(const char *mac)
{
    if (strlen(mac) != 17)
        return false;
    for (int i = 0; i < 17; i++)
        if (i % 3 == 2 ? mac[i] != ':' : !isxdigit((unsigned char)mac[i]))
            return false;
    return true;
}

/* PUT /network-interfaces/{id}, before boot. Firecracker opens the tap here; the guest has no
 * NIC, so the tap is recorded, with Firecracker's refusals of a reused device or MAC. */
static int handle_network_interface(struct vmm *vmm, const char *resource_id, const cJSON *body,
                                    char **response, char *err, size_t err_size)
{
    static const struct field_spec specs[] = {
        {"iface_id", FIELD_STRING, true},         {"host_dev_name", FIELD_STRING, true},
        {"guest_mac", FIELD_STRING, false},       {"rx_rate_limiter", FIELD_OBJECT, false},
        {"tx_rate_limiter", FIELD_OBJECT, false},
    };
    int r = check_fields(body, "network-interfaces", specs, 5, err, err_size);

    (void)response;
    if (r == 0)
        r = require_fresh(vmm, "PUT /network-interfaces", err, err_size);
    if (r < 0)
        return r;
    const char *id = string_field(body, "iface_id");
    const char *tap = string_field(body, "host_dev_name");
    const char *mac = string_field(body, "guest_mac");
    if (strcmp(id, resource_id) != 0)
        return error_set(err, err_size, EINVAL, "iface_id '%s' does not match the path's '%s'", id,
                         resource_id);
    if (!*tap || strlen(tap) >= sizeof(vmm->nets[0].host_dev_name) || strchr(tap, '/'))
        return error_set(err, err_size, EINVAL, "host_dev_name '%s' is not a tap device name", tap);
    if (mac && !is_mac(mac))
        return error_set(err, err_size, EINVAL, "guest_mac '%s' is not a MAC address", mac);
    if (strlen(id) >= sizeof(vmm->nets[0].id))
        return error_set(err, err_size, EINVAL, "iface_id too long");
    struct vmm_net *net = NULL;
    for (unsigned i = 0; i < vmm->net_count; i++) {
        if (strcmp(vmm->nets[i].id, id) == 0) {
            net = &vmm->nets[i]; /* PUT replaces */
            continue;
        }
        if (strcmp(vmm->nets[i].host_dev_name, tap) == 0)
            return error_set(err, err_size, EINVAL, "host_dev_name %s is already in use", tap);
        if (mac && strcasecmp(vmm->nets[i].guest_mac, mac) == 0)
            return error_set(err, err_size, EINVAL, "guest_mac %s is already in use", mac);
    }
    if (!net && vmm->net_count == VMM_MAX_NETS)
        return error_set(err, err_size, ENOSPC, "at most %d network interfaces", VMM_MAX_NETS);
    if (!net)
        net = &vmm->nets[vmm->net_count++];
    snprintf(net->id, sizeof(net->id), "%s", id);
    snprintf(net->host_dev_name, sizeof(net->host_dev_name), "%s", tap);
    snprintf(net->guest_mac, sizeof(net->guest_mac), "%s", mac ? mac : "");
    return 0;
}

/* PUT /vsock, before boot: recorded (the guest has no vsock). */
static int handle_vsock(struct vmm *vmm, const char *resource_id, const cJSON *body,
                        char **response, char *err, size_t err_size)
{
    static const struct field_spec specs[] = {
        {"guest_cid", FIELD_UNSIGNED, true},
        {"uds_path", FIELD_STRING, true},
        {"vsock_id", FIELD_STRING, false},
    };
    int r = check_fields(body, "vsock", specs, 3, err, err_size);

    (void)response;
    (void)resource_id;
    if (r == 0)
        r = require_fresh(vmm, "PUT /vsock", err, err_size);
    if (r < 0)
        return r;
    double cid = cJSON_GetObjectItemCaseSensitive(body, "guest_cid")->valuedouble;
    const char *path = string_field(body, "uds_path");
    if (cid < 3 || cid > 4294967295.0)
        return error_set(err, err_size, EINVAL, "guest_cid must be 3 to 2^32-1");
    if (!*path || strlen(path) >= sizeof(vmm->vsock.uds_path))
        return error_set(err, err_size, EINVAL, "uds_path is empty or too long");
    vmm->vsock.present = true;
    vmm->vsock.guest_cid = (uint32_t)cid;
    strcpy(vmm->vsock.uds_path, path);
    return 0;
}

/* The guest's disk: the first writable drive, -1 when there is none. */
static int guest_disk_drive(const struct vmm *vmm)
{
    for (unsigned i = 0; i < vmm->drive_count; i++)
        if (!vmm->drives[i].read_only)
            return (int)i;
    return -1;
}

/* Points the guest's disk writes at path (opened read-write); the vCPUs must be parked or not
 * started. */
static int open_guest_disk(struct vmm *vmm, const char *path, char *err, size_t err_size)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return error_set(err, err_size, errno, "drive %s: %s", path, strerror(errno));
    int old = atomic_exchange(&vmm->vm.disk_fd, fd);
    if (old >= 0)
        close(old);
    return 0;
}

/* PATCH /drives/{id}, after the start or a load (before: PUT): re-points a drive at another
 * file, as Firecracker does. The guest's disk is switched with every vCPU parked. */
static int handle_patch_drive(struct vmm *vmm, const char *resource_id, const cJSON *body,
                              char **response, char *err, size_t err_size)
{
    static const struct field_spec specs[] = {
        {"drive_id", FIELD_STRING, true},
        {"path_on_host", FIELD_STRING, false},
        {"rate_limiter", FIELD_OBJECT, false},
    };
    int r = check_fields(body, "drives", specs, 3, err, err_size);

    (void)response;
    if (r < 0)
        return r;
    if (vmm->state == VMM_NOT_STARTED)
        return error_set(err, err_size, EINVAL,
                         "PATCH /drives is not allowed before the microVM started (use PUT)");
    const char *id = string_field(body, "drive_id");
    const char *path = string_field(body, "path_on_host");
    if (strcmp(id, resource_id) != 0)
        return error_set(err, err_size, EINVAL, "drive_id '%s' does not match the path's '%s'", id,
                         resource_id);
    int index = -1;
    for (unsigned i = 0; i < vmm->drive_count; i++)
        if (strcmp(vmm->drives[i].id, id) == 0)
            index = (int)i;
    if (index < 0)
        return error_set(err, err_size, EINVAL, "no drive '%s'", id);
    if (!path)
        return 0;
    struct vmm_drive *drive = &vmm->drives[index];
    if (!*path || strlen(path) >= sizeof(drive->path))
        return error_set(err, err_size, EINVAL, "path_on_host is empty or too long");
    if (access(path, drive->read_only ? R_OK : R_OK | W_OK) < 0)
        return error_set(err, err_size, errno, "path_on_host %s: %s", path, strerror(errno));
    if (index == guest_disk_drive(vmm) && vmm->vm_created) {
        bool running = vmm->state == VMM_RUNNING;
        if (running && (r = kvm_vm_pause(&vmm->vm, vmm->pause_timeout_ms, err, err_size)) < 0)
            return r;
        r = open_guest_disk(vmm, path, err, err_size);
        if (running)
            kvm_vm_resume(&vmm->vm);
        if (r < 0)
            return r;
    }
    strcpy(drive->path, path);
    return 0;
}

/* ---- InstanceStart ---- */

static void release_machine(struct vmm *vmm)
{
    if (vmm->vm_created) {
        kvm_vm_destroy(&vmm->vm);
        int fd = atomic_exchange(&vmm->vm.disk_fd, -1);
        if (fd >= 0)
            close(fd);
    }
    vmm->vm_created = false;
    guest_memory_release(&vmm->memory);
}

static int boot_machine(struct vmm *vmm, char *err, size_t err_size)
{
    struct guest_boot_result boot;
    int r;

    r = guest_memory_plan(&vmm->memory, (uint64_t)vmm->mem_size_mib << 20,
                          (uint64_t)vmm->mmio_gap_mib << 20, err, err_size);
    vmm->memory.page_size = vmm->huge_pages ? GUEST_HUGE_PAGE_SIZE : GUEST_PAGE_SIZE;
    /* A memory file given at machine-config (a memfd as /proc/<pid>/fd/<n>) is guest memory
     * from the first instruction, mapped shared as a restore with shared: true maps it. */
    if (r == 0 && vmm->boot_memory_path[0])
        r = guest_memory_map_file(&vmm->memory, vmm->boot_memory_path, true, err, err_size);
    else if (r == 0)
        r = guest_memory_map_anonymous(&vmm->memory, err, err_size);
    if (r < 0)
        return r;
    /* Sparse by default, as Firecracker leaves it: a page the guest never touches is never
     * populated (an empty page-table entry, or a hole in the memfd) and reads as zeros. The
     * fill makes every page resident and non-zero from the start. */
    vmm->boot_filled = vmm->fill_boot_memory;
    if (vmm->boot_filled)
        guest_memory_fill_boot_pattern(&vmm->memory);
    r = kvm_vm_create(&vmm->vm, &vmm->memory, vmm->vcpu_count, err, err_size);
    vmm->vm_created = true;
    int disk = guest_disk_drive(vmm);
    vmm->workload.disk = disk >= 0;
    if (r == 0 && disk >= 0)
        r = open_guest_disk(vmm, vmm->drives[disk].path, err, err_size);
    if (r == 0)
        r = guest_boot_prepare(&vmm->memory, vmm->kernel_image_path, &vmm->workload,
                               vmm->vcpu_count, vmm->vm.tsc_khz, &boot, err, err_size);
    if (r == 0)
        r = kvm_vm_set_balloon(&vmm->vm, &vmm->memory, &boot.config,
                               vmm->balloon_discard_firecracker, err, err_size);
    if (r == 0)
        r = kvm_vm_set_boot_state(&vmm->vm, boot.header.entry, err, err_size);
    if (r == 0)
        r = kvm_vm_start(&vmm->vm, false, err, err_size);
    if (r < 0)
        return r;
    vmm->guest_config = boot.config;
    vmm->increment_window = boot.header.increment_window;
    vmm->loop_start = boot.header.loop_start;
    vmm->loop_end = boot.header.loop_end;
    vmm->disk_window = boot.header.disk_window;
    return 0;
}

static int handle_actions(struct vmm *vmm, const char *resource_id, const cJSON *body,
                          char **response, char *err, size_t err_size)
{
    static const struct field_spec specs[] = {{"action_type", FIELD_STRING, true}};
    int r = check_fields(body, "actions", specs, 1, err, err_size);

    (void)response;
    if (r < 0)
        return r;
    const char *action = string_field(body, "action_type");
    if (strcmp(action, "InstanceStart") != 0)
        return error_set(err, err_size, EINVAL, "action_type '%s' is not supported", action);
    r = require_fresh(vmm, "InstanceStart", err, err_size);
    if (r < 0)
        return r;
    if (!vmm->boot_source_configured)
        return error_set(err, err_size, EINVAL, "InstanceStart needs PUT /boot-source first");
    r = boot_machine(vmm, err, err_size);
    if (r < 0) {
        release_machine(vmm);
        return r;
    }
    vmm->state = VMM_RUNNING;
    return 0;
}

/* ---- PATCH /vm ---- */

static int pause_machine(struct vmm *vmm, char *err, size_t err_size)
{
    if (vmm->pause_delay_ms) {
        struct timespec delay = {.tv_sec = vmm->pause_delay_ms / 1000,
                                 .tv_nsec = (long)(vmm->pause_delay_ms % 1000) * 1000000L};
        while (nanosleep(&delay, &delay) < 0 && errno == EINTR)
            ;
    }
    uint64_t start = monotonic_ns();
    int r = kvm_vm_pause(&vmm->vm, vmm->pause_timeout_ms, err, err_size);

    if (r < 0)
        return r;
    vmm->last_pause_ns = monotonic_ns() - start;
    vmm->pause_count++;
    vmm->state = VMM_PAUSED;
    return 0;
}

static void resume_machine(struct vmm *vmm)
{
    uint64_t start = monotonic_ns();

    kvm_vm_resume(&vmm->vm);
    vmm->last_resume_ns = monotonic_ns() - start;
    vmm->state = VMM_RUNNING;
}

static int handle_vm_state(struct vmm *vmm, const char *resource_id, const cJSON *body,
                           char **response, char *err, size_t err_size)
{
    static const struct field_spec specs[] = {{"state", FIELD_STRING, true}};
    int r = check_fields(body, "vm", specs, 1, err, err_size);

    (void)response;
    if (r < 0)
        return r;
    const char *wanted = string_field(body, "state");
    bool pause = strcmp(wanted, "Paused") == 0;
    if (!pause && strcmp(wanted, "Resumed") != 0)
        return error_set(err, err_size, EINVAL,
                         "state must be \"Paused\" or \"Resumed\", not \"%s\"", wanted);
    if (vmm->state == VMM_NOT_STARTED)
        return error_set(err, err_size, EINVAL, "the microVM is not started");
    if (pause && vmm->state == VMM_RUNNING)
        return pause_machine(vmm, err, err_size);
    if (!pause && vmm->state == VMM_PAUSED)
        resume_machine(vmm);
    return 0;
}

/* ---- snapshots ---- */

static int collect_vmstate(struct vmm *vmm, struct vmstate *state, char *err, size_t err_size)
{
    memset(state, 0, sizeof(*state));
    state->vcpu_count = vmm->vcpu_count;
    state->mem_size_mib = vmm->mem_size_mib;
    state->mmio_gap_mib = vmm->mmio_gap_mib;
    state->region_count = vmm->memory.region_count;
    state->increment_window = vmm->increment_window;
    state->loop_start = vmm->loop_start;
    state->loop_end = vmm->loop_end;
    state->guest_config = vmm->guest_config;
    state->boot_filled = vmm->boot_filled;
    state->huge_pages = vmm->huge_pages;
    /* The guest's disk writes are synchronous (written before its next instruction): at the
     * pause they are all on the drive file already, nothing is left to drain. */
    state->disk_window = vmm->disk_window;
    state->drive_count = vmm->drive_count;
    for (unsigned i = 0; i < vmm->drive_count; i++) {
        snprintf(state->drives[i].id, sizeof(state->drives[i].id), "%s", vmm->drives[i].id);
        snprintf(state->drives[i].path, sizeof(state->drives[i].path), "%s", vmm->drives[i].path);
        state->drives[i].root = vmm->drives[i].root;
        state->drives[i].read_only = vmm->drives[i].read_only;
    }
    state->net_count = vmm->net_count;
    for (unsigned i = 0; i < vmm->net_count; i++) {
        memcpy(state->nets[i].id, vmm->nets[i].id, sizeof(state->nets[i].id));
        memcpy(state->nets[i].host_dev_name, vmm->nets[i].host_dev_name,
               sizeof(state->nets[i].host_dev_name));
        memcpy(state->nets[i].guest_mac, vmm->nets[i].guest_mac, sizeof(state->nets[i].guest_mac));
    }
    state->vsock.present = vmm->vsock.present;
    state->vsock.guest_cid = vmm->vsock.guest_cid;
    memcpy(state->vsock.uds_path, vmm->vsock.uds_path, sizeof(state->vsock.uds_path));
    for (unsigned i = 0; i < vmm->memory.region_count; i++) {
        state->regions[i] = vmm->memory.regions[i];
        state->regions[i].host = NULL;
    }
    for (unsigned i = 0; i < vmm->vcpu_count; i++) {
        int r = kvm_vm_save_vcpu(&vmm->vm, i, &state->vcpus[i], err, err_size);
        if (r < 0)
            return r;
    }
    return 0;
}

/* Writes guest memory during the save, as Firecracker's device drain does: the device page's
 * count of saves goes up by one, and the vmstate records the new count. A page the guest or a
 * fresh boot left without the device magic starts from zero. */
static int save_device_page(struct vmm *vmm, struct vmstate *state, char *err, size_t err_size)
{
    struct guest_device_page *page =
        guest_memory_host_address(&vmm->memory, GUEST_DEVICE_GPA, sizeof(*page));
    if (!page)
        return error_set(err, err_size, EINVAL, "the device page 0x%llx is not guest memory",
                         (unsigned long long)GUEST_DEVICE_GPA);
    volatile struct guest_device_page *device = page;
    uint64_t saves = device->magic == GUEST_DEVICE_MAGIC ? device->saves : 0;
    device->magic = GUEST_DEVICE_MAGIC;
    device->saves = saves + 1;
    state->device_saves = saves + 1;
    return 0;
}

static int handle_snapshot_create(struct vmm *vmm, const char *resource_id, const cJSON *body,
                                  char **response, char *err, size_t err_size)
{
    static const struct field_spec specs[] = {
        {"snapshot_type", FIELD_STRING, false},
        {"snapshot_path", FIELD_STRING, true},
        {"mem_file_path", FIELD_STRING, true},
    };
    _cleanup_free_ struct vmstate *state = NULL;
    char failure[200];
    uint64_t start = monotonic_ns();
    int r = check_fields(body, "snapshot/create", specs, 3, err, err_size);

    (void)response;
    if (r < 0)
        return r;
    const char *type = string_field(body, "snapshot_type");
    bool full = !type || strcmp(type, "Full") == 0;
    if (!full && strcmp(type, "VmstateOnly") != 0)
        return error_set(err, err_size, EINVAL,
                         "snapshot_type must be \"Full\" or \"VmstateOnly\", not \"%s\"", type);
    if (vmm->state != VMM_PAUSED)
        return error_set(err, err_size, EINVAL,
                         "snapshot/create needs a paused microVM (state: %s)",
                         state_name(vmm->state));
    if (kvm_vm_failure(&vmm->vm, failure, sizeof(failure)))
        return error_set(err, err_size, EINVAL, "cannot snapshot a failed guest: %s", failure);
    state = malloc(sizeof(*state));
    if (!state)
        return error_set(err, err_size, ENOMEM, "out of memory");
    r = collect_vmstate(vmm, state, err, err_size);
    if (r == 0)
        r = save_device_page(vmm, state, err, err_size);
    /* VmstateOnly never opens mem_file_path: forkd passes a path that must not be created. */
    if (r == 0 && full)
        r = guest_memory_write_file(&vmm->memory, string_field(body, "mem_file_path"), err,
                                    err_size);
    if (r == 0)
        r = vmstate_write(string_field(body, "snapshot_path"), state, full, err, err_size);
    if (r == 0)
        vmm->last_snapshot_ns = monotonic_ns() - start;
    return r;
}

struct restore_backend {
    bool uffd;
    bool shared;
    const char *path;
};

static int parse_restore_backend(const cJSON *backend, struct restore_backend *out, char *err,
                                 size_t err_size)
{
    static const struct field_spec specs[] = {
        {"backend_type", FIELD_STRING, true},
        {"backend_path", FIELD_STRING, true},
        {"shared", FIELD_BOOL, false},
    };
    int r = check_fields(backend, "mem_backend", specs, 3, err, err_size);

    if (r < 0)
        return r;
    const char *type = string_field(backend, "backend_type");
    out->uffd = strcmp(type, "Uffd") == 0;
    out->shared = bool_field(backend, "shared", false);
    out->path = string_field(backend, "backend_path");
    if (!out->uffd && strcmp(type, "File") != 0)
        return error_set(err, err_size, EINVAL, "backend_type must be \"File\" or \"Uffd\"");
    if (out->uffd && out->shared)
        return error_set(err, err_size, EINVAL, "shared is only valid with backend_type File");
    return 0;
}

static int map_restore_memory(struct vmm *vmm, const struct restore_backend *backend, char *err,
                              size_t err_size)
{
    if (backend->uffd)
        return guest_memory_map_uffd(&vmm->memory, backend->path, err, err_size);
    return guest_memory_map_file(&vmm->memory, backend->path, backend->shared, err, err_size);
}

/* The drives of the vmstate, opened at their recorded paths as Firecracker does at load (a
 * missing file fails the load); PATCH /drives re-points them before the guest resumes. */
static int restore_drives(struct vmm *vmm, const struct vmstate *state, char *err, size_t err_size)
{
    vmm->drive_count = 0;
    for (unsigned i = 0; i < state->drive_count; i++) {
        const struct vmstate_drive *drive = &state->drives[i];
        if (access(drive->path, drive->read_only ? R_OK : R_OK | W_OK) < 0)
            return error_set(err, err_size, errno, "drive %s: path_on_host %s: %s", drive->id,
                             drive->path, strerror(errno));
        int r = vmm_record_drive(vmm, drive->id, drive->path, drive->root, drive->read_only, err,
                                 err_size);
        if (r < 0)
            return r;
    }
    int disk = guest_disk_drive(vmm);
    if (state->guest_config.disk && disk < 0)
        return error_set(err, err_size, EINVAL,
                         "vmstate: the guest writes a disk but no drive is "
                         "writable");
    return state->guest_config.disk ? open_guest_disk(vmm, vmm->drives[disk].path, err, err_size)
                                    : 0;
}

/* Recorded as PUT /network-interfaces and PUT /vsock record them (no tap is opened, no socket
 * bound: the guest has neither). */
static void restore_network_and_vsock(struct vmm *vmm, const struct vmstate *state)
{
    vmm->net_count = state->net_count;
    for (unsigned i = 0; i < state->net_count; i++) {
        memcpy(vmm->nets[i].id, state->nets[i].id, sizeof(vmm->nets[i].id));
        memcpy(vmm->nets[i].host_dev_name, state->nets[i].host_dev_name,
               sizeof(vmm->nets[i].host_dev_name));
        memcpy(vmm->nets[i].guest_mac, state->nets[i].guest_mac, sizeof(vmm->nets[i].guest_mac));
    }
    vmm->vsock.present = state->vsock.present;
    vmm->vsock.guest_cid = state->vsock.guest_cid;
    memcpy(vmm->vsock.uds_path, state->vsock.uds_path, sizeof(vmm->vsock.uds_path));
}

static int restore_machine(struct vmm *vmm, const struct vmstate *state,
                           const struct restore_backend *backend, bool resume, char *err,
                           size_t err_size)
{
    int r =
        guest_memory_adopt_layout(&vmm->memory, state->regions, state->region_count, err, err_size);

    vmm->memory.page_size = state->huge_pages ? GUEST_HUGE_PAGE_SIZE : GUEST_PAGE_SIZE;
    if (r == 0 && ((uint64_t)state->mem_size_mib << 20) != vmm->memory.total_size)
        r = error_set(err, err_size, EINVAL, "vmstate: regions do not add up to mem_size_mib");
    if (r == 0 && state->guest_config.vcpu_count != state->vcpu_count)
        r = error_set(err, err_size, EINVAL, "vmstate: guest config and vCPU count disagree");
    if (r == 0)
        r = map_restore_memory(vmm, backend, err, err_size);
    if (r == 0) {
        r = kvm_vm_create(&vmm->vm, &vmm->memory, state->vcpu_count, err, err_size);
        vmm->vm_created = true;
    }
    if (r == 0)
        r = restore_drives(vmm, state, err, err_size);
    if (r == 0)
        restore_network_and_vsock(vmm, state);
    if (r == 0)
        r = kvm_vm_set_balloon(&vmm->vm, &vmm->memory, &state->guest_config,
                               vmm->balloon_discard_firecracker, err, err_size);
    for (unsigned i = 0; r == 0 && i < state->vcpu_count; i++)
        r = kvm_vm_load_vcpu(&vmm->vm, i, &state->vcpus[i], err, err_size);
    if (r == 0)
        r = kvm_vm_start(&vmm->vm, !resume, err, err_size);
    return r;
}

/* network_overrides: [{iface_id, host_dev_name}], as Firecracker (v1.12 on) applies them to the
 * saved state before the devices are built: each names an interface the snapshot has (else a
 * 400, Firecracker's UnknownNetworkDevice), and the restored interface uses the new tap. Only
 * the tap changes: the guest MAC is the guest's (its virtio-net config space), kept as saved. */
static int apply_network_overrides(const cJSON *overrides, struct vmstate *state, char *err,
                                   size_t err_size)
{
    static const struct field_spec specs[] = {{"iface_id", FIELD_STRING, true},
                                              {"host_dev_name", FIELD_STRING, true}};
    const cJSON *entry;

    if (!overrides)
        return 0;
    if (!cJSON_IsArray(overrides))
        return error_set(err, err_size, EINVAL,
                         "snapshot/load: network_overrides must be an array");
    cJSON_ArrayForEach(entry, overrides)
    {
        int r = check_fields(entry, "snapshot/load: network_overrides[]", specs, 2, err, err_size);
        if (r < 0)
            return r;
        const char *id = string_field(entry, "iface_id");
        const char *tap = string_field(entry, "host_dev_name");
        if (!*tap || strlen(tap) >= sizeof(state->nets[0].host_dev_name) || strchr(tap, '/'))
            return error_set(err, err_size, EINVAL,
                             "network_overrides: host_dev_name '%s' is not a tap device name", tap);
        struct vmstate_net *net = NULL;
        for (unsigned i = 0; i < state->net_count && !net; i++)
            if (strcmp(state->nets[i].id, id) == 0)
                net = &state->nets[i];
        if (!net)
            return error_set(err, err_size, EINVAL,
                             "network_overrides: unknown network device '%s' (the snapshot has "
                             "no interface of that iface_id)",
                             id);
        snprintf(net->host_dev_name, sizeof(net->host_dev_name), "%s", tap);
    }
    for (unsigned i = 0; i < state->net_count; i++)
        for (unsigned j = 0; j < i; j++)
            if (strcmp(state->nets[i].host_dev_name, state->nets[j].host_dev_name) == 0)
                return error_set(err, err_size, EINVAL,
                                 "network_overrides: host_dev_name %s is already in use",
                                 state->nets[i].host_dev_name);
    return 0;
}

/* vsock_override: {uds_path}, as Firecracker (v1.16 on): the snapshot must have a vsock (else
 * a 400, Firecracker's UnknownVsockDevice), which then uses the new socket path. */
static int apply_vsock_override(const cJSON *override, struct vmstate *state, char *err,
                                size_t err_size)
{
    static const struct field_spec specs[] = {{"uds_path", FIELD_STRING, true}};

    if (!override)
        return 0;
    int r = check_fields(override, "snapshot/load: vsock_override", specs, 1, err, err_size);
    if (r < 0)
        return r;
    const char *path = string_field(override, "uds_path");
    if (!state->vsock.present)
        return error_set(err, err_size, EINVAL,
                         "vsock_override: unknown vsock device (the snapshot has no vsock)");
    if (!*path || strlen(path) >= sizeof(state->vsock.uds_path))
        return error_set(err, err_size, EINVAL, "vsock_override: uds_path is empty or too long");
    snprintf(state->vsock.uds_path, sizeof(state->vsock.uds_path), "%s", path);
    return 0;
}

static int handle_snapshot_load(struct vmm *vmm, const char *resource_id, const cJSON *body,
                                char **response, char *err, size_t err_size)
{
    static const struct field_spec specs[] = {
        {"snapshot_path", FIELD_STRING, true},    {"mem_backend", FIELD_OBJECT, true},
        {"resume_vm", FIELD_BOOL, false},         {"enable_diff_snapshots", FIELD_BOOL, false},
        {"track_dirty_pages", FIELD_BOOL, false}, {"network_overrides", FIELD_ARRAY, false},
        {"vsock_override", FIELD_OBJECT, false},
    };
    _cleanup_free_ struct vmstate *state = NULL;
    struct restore_backend backend = {0};
    int r = check_fields(body, "snapshot/load", specs, 7, err, err_size);

    (void)response;
    if (r == 0)
        r = parse_restore_backend(cJSON_GetObjectItemCaseSensitive(body, "mem_backend"), &backend,
                                  err, err_size);
    if (r < 0)
        return r;
    if (vmm->state != VMM_NOT_STARTED || vmm->machine_configured || vmm->boot_source_configured ||
        vmm->drive_count > 0 || vmm->net_count > 0 || vmm->vsock.present)
        return error_set(err, err_size, EINVAL,
                         "snapshot/load is only allowed on a fresh, unconfigured process");
    state = malloc(sizeof(*state));
    if (!state)
        return error_set(err, err_size, ENOMEM, "out of memory");
    r = vmstate_read(string_field(body, "snapshot_path"), state, err, err_size);
    if (r == 0)
        r = apply_network_overrides(cJSON_GetObjectItemCaseSensitive(body, "network_overrides"),
                                    state, err, err_size);
    if (r == 0)
        r = apply_vsock_override(cJSON_GetObjectItemCaseSensitive(body, "vsock_override"), state,
                                 err, err_size);
    if (r < 0)
        return r;
    bool resume = bool_field(body, "resume_vm", false);
    r = restore_machine(vmm, state, &backend, resume, err, err_size);
    if (r < 0) {
        release_machine(vmm);
        vmm->drive_count = vmm->net_count = 0; /* fresh again */
        vmm->vsock.present = false;
        return r;
    }
    vmm->vcpu_count = state->vcpu_count;
    vmm->mem_size_mib = state->mem_size_mib;
    vmm->mmio_gap_mib = state->mmio_gap_mib;
    vmm->guest_config = state->guest_config;
    vmm->boot_filled = state->boot_filled;
    vmm->huge_pages = state->huge_pages;
    vmm->increment_window = state->increment_window;
    vmm->loop_start = state->loop_start;
    vmm->loop_end = state->loop_end;
    vmm->disk_window = state->disk_window;
    vmm->state = resume ? VMM_RUNNING : VMM_PAUSED;
    return 0;
}

/* ---- PUT /uffd/wp ---- */

static int open_write_protect_uffd(const struct guest_memory *memory, bool report_discards,
                                   char *err, size_t err_size)
{
    uint64_t remove = report_discards ? UFFD_FEATURE_EVENT_REMOVE : 0;
    if (memory->backend == MEMORY_BACKEND_FILE)
        return error_set(err, err_size, EINVAL,
                         "guest memory is a private file mapping, which cannot be write-protected "
                         "(restore with shared memory or boot fresh)");
    if (memory->backend == MEMORY_BACKEND_UFFD)
        return error_set(err, err_size, EINVAL,
                         "guest memory is registered with the restore userfaultfd already");
    /* EVENT_REMOVE when offered: a page the guest's balloon discards (MADV_DONTNEED,
     * MADV_REMOVE) loses its contents without a write-protect fault; the event tells the
     * receiver which pages, before they are gone (the discard waits until it is read). */
    if (memory->backend == MEMORY_BACKEND_SHARED || memory->page_size == GUEST_HUGE_PAGE_SIZE)
        return uffd_open(UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM, remove,
                         NULL, err, err_size);
    /* Never-touched anonymous ptes would be skipped by UFFDIO_WRITEPROTECT without
     * WP_UNPOPULATED: take it when offered. */
    return uffd_open(UFFD_FEATURE_PAGEFAULT_FLAG_WP, UFFD_FEATURE_WP_UNPOPULATED | remove, NULL,
                     err, err_size);
}

static int handle_uffd_wp(struct vmm *vmm, const char *resource_id, const cJSON *body,
                          char **response, char *err, size_t err_size)
{
    static const struct field_spec specs[] = {{"socket", FIELD_STRING, true}};
    struct uffd_handshake_region handshake[GUEST_MEMORY_MAX_REGIONS];
    _cleanup_close_ int uffd = -1;
    int socket_fd = -1;
    int r = check_fields(body, "uffd/wp", specs, 1, err, err_size);

    (void)response;
    if (r < 0)
        return r;
    if (vmm->state == VMM_NOT_STARTED)
        return error_set(err, err_size, EINVAL, "uffd/wp needs a started microVM");
    uffd = open_write_protect_uffd(&vmm->memory, !vmm->balloon_discard_firecracker, err, err_size);
    if (uffd < 0)
        return uffd;
    for (unsigned i = 0; i < vmm->memory.region_count; i++) {
        const struct memory_region *region = &vmm->memory.regions[i];
        r = uffd_register(uffd, (uint64_t)region->host, region->size, UFFDIO_REGISTER_MODE_WP, err,
                          err_size);
        if (r == -EBUSY)
            return error_set(err, err_size, EBUSY,
                             "guest memory is still registered with an earlier write-protect "
                             "userfaultfd; close that one first");
        if (r < 0)
            return r;
        handshake[i] = (struct uffd_handshake_region){(uint64_t)region->host, region->size,
                                                      region->file_offset, vmm->memory.page_size};
    }
    r = uffd_handshake_send(string_field(body, "socket"), uffd, handshake, vmm->memory.region_count,
                            &socket_fd, err, err_size);
    if (r < 0)
        return r;
    /* Our copy of the uffd closes on return: the receiver owns the registration, and closing
     * its fd drops it (and wakes any blocked vCPU) even if it dies. */
    forkd_closep(&vmm->write_protect_socket);
    vmm->write_protect_socket = socket_fd;
    return 0;
}

/* ---- routing ---- */

/* resource_id: for routes ending in '/', the rest of the path (a drive id); else NULL. */
typedef int (*handler_fn)(struct vmm *vmm, const char *resource_id, const cJSON *body,
                          char **response, char *err, size_t err_size);

struct route {
    const char *method;
    const char *path;
    handler_fn handler;
    bool has_body;
};

static const struct route routes[] = {
    {"GET", "/", handle_get_root, false},
    {"GET", "/progress/", handle_get_progress, false},
    {"PUT", "/machine-config", handle_machine_config, true},
    {"PUT", "/boot-source", handle_boot_source, true},
    {"PUT", "/actions", handle_actions, true},
    {"PATCH", "/vm", handle_vm_state, true},
    {"PUT", "/snapshot/create", handle_snapshot_create, true},
    {"PUT", "/snapshot/load", handle_snapshot_load, true},
    {"PUT", "/uffd/wp", handle_uffd_wp, true},
    {"PUT", "/drives/", handle_drive, true},
    {"PATCH", "/drives/", handle_patch_drive, true},
    {"PUT", "/network-interfaces/", handle_network_interface, true},
    {"PUT", "/vsock", handle_vsock, true},
};

/* A route ending in '/' matches any non-empty, slash-free remainder, which it receives. */
static bool route_matches(const struct route *route, const char *path, const char **resource_id)
{
    size_t length = strlen(route->path);

    *resource_id = NULL;
    if (route->path[length - 1] != '/' || length == 1)
        return strcmp(route->path, path) == 0;
    if (strncmp(route->path, path, length) != 0 || path[length] == '\0' ||
        strchr(path + length, '/'))
        return false;
    *resource_id = path + length;
    return true;
}

static const struct route *find_route(const struct http_request *request, bool *path_known,
                                      const char **resource_id)
{
    *path_known = false;
    for (size_t i = 0; i < ARRAY_SIZE(routes); i++) {
        if (!route_matches(&routes[i], request->path, resource_id))
            continue;
        *path_known = true;
        if (strcmp(routes[i].method, request->method) == 0)
            return &routes[i];
    }
    return NULL;
}

void api_handle(struct vmm *vmm, const struct http_request *request, int *status, char **body)
{
    char err[512] = "";
    _cleanup_json_ cJSON *json = NULL;
    bool path_known;
    const char *resource_id;
    const struct route *route = find_route(request, &path_known, &resource_id);

    *body = NULL;
    if (!route) {
        *status = path_known ? 400 : 404;
        snprintf(err, sizeof(err),
                 path_known ? "invalid request method %s for %s" : "no such resource: %s %s",
                 request->method, request->path);
        *body = http_fault_body(err);
        return;
    }
    if (route->has_body) {
        json = cJSON_ParseWithLength(request->body, request->body_length);
        if (!json) {
            *status = 400;
            *body = http_fault_body(request->body_length ? "request body is not valid JSON"
                                                         : "request body is empty");
            return;
        }
    }
    if (route->handler(vmm, resource_id, json, body, err, sizeof(err)) < 0) {
        free(*body);
        *status = 400;
        *body = http_fault_body(err);
        return;
    }
    *status = *body ? 200 : 204;
}
