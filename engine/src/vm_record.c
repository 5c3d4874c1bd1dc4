/* Durable VM records (see vm_record.h). */
#include "vm_record.h"

#include "basic/cleanup.h"
#include "basic/fsutil.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define VM_RECORD_FORMAT_VERSION 1
#define VM_RECORD_MAX_BYTES      (64 * 1024)

/* ---- identity --------------------------------------------------------------------------- */

/* Field 22 of /proc/<pid>/stat. The command name may hold spaces and parentheses: fields
 * start after the last ')'. */
static int vm_identity_start_time(pid_t pid, unsigned long long *out)
{
    char path[64], stat[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? -ESRCH : -errno;
    ssize_t n = read(fd, stat, sizeof(stat) - 1);
    if (n <= 0)
        return n < 0 ? -errno : -ESRCH;
    stat[n] = '\0';
    char *fields = strrchr(stat, ')');
    if (!fields || fields[1] == '\0' || fields[2] == 'Z')
        return -ESRCH; /* a zombie has exited already */
    char *save = NULL;
    char *field = strtok_r(fields + 1, " ", &save);
    for (int i = 3; field && i < 22; i++) /* field 3 is the state; 22 the start time */
        field = strtok_r(NULL, " ", &save);
    if (!field)
        return -EIO;
    *out = strtoull(field, NULL, 10);
    return 0;
}

int vm_identity_of(pid_t pid, struct vm_identity *out)
{
    if (pid <= 0)
        return -ESRCH;
    int rc = vm_identity_start_time(pid, &out->start_time);
    if (rc < 0)
        return rc;
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/exe", (int)pid);
    ssize_t length = readlink(path, out->exe, sizeof(out->exe) - 1);
    if (length < 0)
        return errno == ENOENT ? -ESRCH : -errno;
    out->exe[length] = '\0';
    out->pid = pid;
    return 0;
}

bool vm_identity_is_live(const struct vm_identity *recorded)
{
    struct vm_identity live;
    return vm_identity_of(recorded->pid, &live) == 0 && live.start_time == recorded->start_time &&
           strcmp(live.exe, recorded->exe) == 0;
}

/* ---- paths ------------------------------------------------------------------------------ */

static int vm_record_path(const char *run_dir, const char *vm_id, const char *suffix, char *path,
                          size_t size)
{
    int n = snprintf(path, size, "%s/%s.vm%s", run_dir, vm_id, suffix);
    return n < 0 || (size_t)n >= size ? -ENAMETOOLONG : 0;
}

unsigned long vm_record_file_id(const char *file_name)
{
    unsigned long id = 0;
    int used = 0;
    if (sscanf(file_name, "vm-%lu%n", &id, &used) != 1 || strcmp(file_name + used, ".vm") != 0)
        return 0;
    return id;
}

/* ---- writing ---------------------------------------------------------------------------- */

static void vm_record_deletep(cJSON **json)
{
    cJSON_Delete(*json);
}

static bool vm_record_put_number(cJSON *obj, const char *key, double value)
{
    return cJSON_AddNumberToObject(obj, key, value) != NULL;
}

static bool vm_record_put_string(cJSON *obj, const char *key, const char *value)
{
    return cJSON_AddStringToObject(obj, key, value) != NULL;
}

static bool vm_record_put_labels(cJSON *root, const struct vm_record *r)
{
    cJSON *labels = cJSON_AddObjectToObject(root, "labels");
    for (size_t i = 0; labels && i < r->label_count; i++)
        if (!vm_record_put_string(labels, r->labels[i].key, r->labels[i].value))
            return false;
    return labels != NULL;
}

static bool vm_record_put_regions(cJSON *root, const struct vm_record *r)
{
    cJSON *array = cJSON_AddArrayToObject(root, "regions");
    for (size_t i = 0; array && i < r->region_count; i++) {
        const struct uffd_region *region = &r->regions[i];
        cJSON *obj = cJSON_CreateObject();
        if (!obj || !cJSON_AddItemToArray(array, obj))
            return cJSON_Delete(obj), false;
        if (!vm_record_put_number(obj, "base_host_virt_addr", (double)region->host_base) ||
            !vm_record_put_number(obj, "size", (double)region->size) ||
            !vm_record_put_number(obj, "offset", (double)region->file_offset) ||
            !vm_record_put_number(obj, "page_size", (double)region->page_size))
            return false;
    }
    return array != NULL;
}

static bool vm_record_put(cJSON *root, const struct vm_record *r)
{
    cJSON *vmm, *held;
    return vm_record_put_number(root, "format_version", VM_RECORD_FORMAT_VERSION) &&
           vm_record_put_string(root, "id", r->id) && vm_record_put_string(root, "name", r->name) &&
           (vmm = cJSON_AddObjectToObject(root, "vmm")) &&
           vm_record_put_number(vmm, "pid", r->vmm.pid) &&
           vm_record_put_number(vmm, "start_time", (double)r->vmm.start_time) &&
           vm_record_put_string(vmm, "exe", r->vmm.exe) &&
           cJSON_AddBoolToObject(root, "starting", r->starting) &&
           vm_record_put_number(root, "memory", r->memory) &&
           vm_record_put_number(root, "vcpu_count", r->vcpu_count) &&
           vm_record_put_number(root, "mem_size_mib", (double)r->mem_size_mib) &&
           vm_record_put_number(root, "memory_bytes", (double)r->memory_bytes) &&
           vm_record_put_number(root, "page_size", (double)r->page_size) &&
           vm_record_put_string(root, "source_snapshot", r->source_snapshot) &&
           vm_record_put_number(root, "created_at_unix_ms", (double)r->created_at_unix_ms) &&
           vm_record_put_labels(root, r) && vm_record_put_regions(root, r) &&
           devices_json_put(root, &r->devices) && (held = cJSON_AddObjectToObject(root, "held")) &&
           vm_record_put_number(held, "memfd_inode", (double)r->memfd_inode) &&
           cJSON_AddBoolToObject(held, "uffd", r->memory == VM_MEMORY_UFFD) &&
           vm_record_put_string(root, "branch", r->branch_id) &&
           vm_record_put_string(root, "exit_reason", r->exit_reason);
}

/* Writes text to path.tmp, fsyncs it and renames it over path: a reader sees the old record or
 * the new one, never a part. */
static int vm_record_replace(const char *run_dir, const char *id, const char *text)
{
    char name[128], tmp_name[128];
    if (snprintf(name, sizeof(name), "%s.vm", id) >= (int)sizeof(name) ||
        snprintf(tmp_name, sizeof(tmp_name), "%s.vm.tmp", id) >= (int)sizeof(tmp_name))
        return -ENAMETOOLONG;
    return fs_replace_file(run_dir, name, tmp_name, text, strlen(text));
}

int vm_record_save(const char *run_dir, const struct vm_record *record)
{
    __attribute__((cleanup(vm_record_deletep))) cJSON *root = cJSON_CreateObject();
    if (!root || !vm_record_put(root, record))
        return -ENOMEM;
    _cleanup_free_ char *text = cJSON_Print(root);
    if (!text)
        return -ENOMEM;
    return vm_record_replace(run_dir, record->id, text);
}

void vm_record_remove(const char *run_dir, const char *vm_id)
{
    char path[PATH_MAX];
    if (vm_record_path(run_dir, vm_id, "", path, sizeof(path)) == 0 && unlink(path) == 0)
        fs_sync_dir(run_dir);
}

/* ---- reading ---------------------------------------------------------------------------- */

static bool vm_record_get_number(const cJSON *obj, const char *key, double max, double *out)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!cJSON_IsNumber(item) || item->valuedouble < 0 || item->valuedouble > max)
        return false;
    *out = item->valuedouble;
    return true;
}

static bool vm_record_get_u64(const cJSON *obj, const char *key, uint64_t *out)
{
    double value;
    if (!vm_record_get_number(obj, key, 9007199254740992.0, &value))
        return false;
    *out = (uint64_t)value;
    return true;
}

static bool vm_record_get_string(const cJSON *obj, const char *key, char *out, size_t size)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!cJSON_IsString(item) || strlen(item->valuestring) >= size)
        return false;
    memcpy(out, item->valuestring, strlen(item->valuestring) + 1);
    return true;
}

static bool vm_record_get_labels(const cJSON *root, struct vm_record *r)
{
    const cJSON *labels = cJSON_GetObjectItemCaseSensitive(root, "labels"), *label;
    if (!cJSON_IsObject(labels))
        return false;
    cJSON_ArrayForEach(label, labels)
    {
        if (r->label_count == VM_MAX_LABELS || !cJSON_IsString(label) ||
            strlen(label->string) >= sizeof(r->labels[0].key) ||
            strlen(label->valuestring) >= sizeof(r->labels[0].value))
            return false;
        struct vm_label *out = &r->labels[r->label_count++];
        snprintf(out->key, sizeof(out->key), "%s", label->string);
        snprintf(out->value, sizeof(out->value), "%s", label->valuestring);
    }
    return true;
}

static bool vm_record_get_regions(const cJSON *root, struct vm_record *r)
{
    const cJSON *regions = cJSON_GetObjectItemCaseSensitive(root, "regions"), *region;
    if (!cJSON_IsArray(regions))
        return false;
    cJSON_ArrayForEach(region, regions)
    {
        if (r->region_count == UFFD_MAX_REGIONS)
            return false;
        struct uffd_region *out = &r->regions[r->region_count++];
        if (!vm_record_get_u64(region, "base_host_virt_addr", &out->host_base) ||
            !vm_record_get_u64(region, "size", &out->size) ||
            !vm_record_get_u64(region, "offset", &out->file_offset) ||
            !vm_record_get_u64(region, "page_size", &out->page_size) || out->size == 0 ||
            (out->page_size != 4096 && out->page_size != 2u << 20))
            return false;
    }
    return true;
}

static bool vm_record_get(const cJSON *root, struct vm_record *r)
{
    const cJSON *vmm = cJSON_GetObjectItemCaseSensitive(root, "vmm");
    const cJSON *held = cJSON_GetObjectItemCaseSensitive(root, "held");
    const cJSON *starting = cJSON_GetObjectItemCaseSensitive(root, "starting");
    double pid, memory, vcpus, created;
    uint64_t start_time, memfd_inode;
    bool ok = vm_record_get_string(root, "id", r->id, sizeof(r->id)) &&
              vm_record_get_string(root, "name", r->name, sizeof(r->name)) &&
              cJSON_IsObject(vmm) && vm_record_get_number(vmm, "pid", 4194304, &pid) &&
              vm_record_get_u64(vmm, "start_time", &start_time) &&
              vm_record_get_string(vmm, "exe", r->vmm.exe, sizeof(r->vmm.exe)) &&
              cJSON_IsBool(starting) && vm_record_get_number(root, "memory", 4, &memory) &&
              vm_record_get_number(root, "vcpu_count", 1024, &vcpus) &&
              vm_record_get_u64(root, "mem_size_mib", &r->mem_size_mib) &&
              vm_record_get_u64(root, "memory_bytes", &r->memory_bytes) &&
              vm_record_get_string(root, "source_snapshot", r->source_snapshot,
                                   sizeof(r->source_snapshot)) &&
              vm_record_get_number(root, "created_at_unix_ms", 9007199254740992.0, &created) &&
              vm_record_get_labels(root, r) && vm_record_get_regions(root, r) &&
              cJSON_IsObject(held) && vm_record_get_u64(held, "memfd_inode", &memfd_inode) &&
              vm_record_get_string(root, "branch", r->branch_id, sizeof(r->branch_id)) &&
              vm_record_get_string(root, "exit_reason", r->exit_reason, sizeof(r->exit_reason));
    struct forkd_error err = {0};
    if (!ok || pid < 1 || devices_json_get(root, &r->devices, &err) < 0)
        return false;
    /* Written since 2 MiB pages came; older records are of 4 KiB guests. */
    r->page_size = 4096;
    if (cJSON_GetObjectItemCaseSensitive(root, "page_size") &&
        (!vm_record_get_u64(root, "page_size", &r->page_size) ||
         (r->page_size != 4096 && r->page_size != (2u << 20))))
        return false;
    r->vmm.pid = (pid_t)pid;
    r->vmm.start_time = start_time;
    r->memfd_inode = memfd_inode;
    r->starting = cJSON_IsTrue(starting);
    r->memory = (enum vm_memory)memory;
    r->vcpu_count = (unsigned)vcpus;
    r->created_at_unix_ms = (int64_t)created;
    return true;
}

int vm_record_load(const char *run_dir, const char *id, struct vm_record *out)
{
    char path[PATH_MAX];
    int rc = vm_record_path(run_dir, id, "", path, sizeof(path));
    if (rc < 0)
        return rc;
    _cleanup_close_ int fd = open(path, O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC);
    struct stat st;
    if (fd < 0)
        return errno == ELOOP ? -EPERM : -errno;
    if (fstat(fd, &st) < 0)
        return -errno;
    if (!S_ISREG(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 0022) ||
        st.st_size >= VM_RECORD_MAX_BYTES)
        return -EPERM;
    _cleanup_free_ char *text = malloc((size_t)st.st_size + 1);
    if (!text)
        return -ENOMEM;
    ssize_t n = read(fd, text, (size_t)st.st_size);
    if (n != st.st_size)
        return -EINVAL;
    text[n] = '\0';
    __attribute__((cleanup(vm_record_deletep))) cJSON *root = cJSON_Parse(text);
    memset(out, 0, sizeof(*out));
    if (!root || !vm_record_get(root, out) || strcmp(out->id, id) != 0)
        return -EINVAL;
    return 0;
}
