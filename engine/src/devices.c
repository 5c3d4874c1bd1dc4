/* A VM's devices: rules, file identities, JSON form (see forkd/devices.h). */
#include "forkd/devices.h"

#include "basic/cleanup.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- rules ------------------------------------------------------------------------------ */

static int devices_check_id(const char *field, const char *id, struct forkd_error *err)
{
    size_t length = strlen(id);
    if (length == 0 || length >= DEVICES_ID_MAX)
        return forkd_error_set(err, -EINVAL, "%s: must be 1 to %d characters, got %zu", field,
                               DEVICES_ID_MAX - 1, length);
    for (const char *c = id; *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
              *c == '_'))
            return forkd_error_set(err, -EINVAL,
                                   "%s '%s': only letters, digits and '_' are allowed", field, id);
    return 0;
}

/* An absolute path without "." or ".." components, empty components or control bytes. */
static int devices_check_path(const char *field, const char *path, size_t max,
                              struct forkd_error *err)
{
    size_t length = strlen(path);
    if (length == 0)
        return forkd_error_set(err, -EINVAL, "%s: a path is required", field);
    if (length >= max)
        return forkd_error_set(err, -EINVAL, "%s: %zu bytes, at most %zu", field, length, max - 1);
    if (path[0] != '/')
        return forkd_error_set(err, -EINVAL, "%s must be an absolute path, got '%s'", field, path);
    for (const char *c = path; *c; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7f)
            return forkd_error_set(err, -EINVAL, "%s: control characters are not allowed", field);
    for (const char *part = path + 1; *part;) {
        size_t n = strcspn(part, "/");
        if ((n == 1 && part[0] == '.') || (n == 2 && part[0] == '.' && part[1] == '.'))
            return forkd_error_set(err, -EINVAL, "%s '%s': '.' and '..' are not allowed", field,
                                   path);
        part += n;
        if (*part == '/')
            part++;
    }
    return 0;
}

static bool devices_hex(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

static int devices_check_mac(const char *field, const char *mac, struct forkd_error *err)
{
    bool ok = strlen(mac) == 17;
    for (int i = 0; ok && i < 17; i++)
        ok = (i % 3 == 2) ? mac[i] == ':' : devices_hex(mac[i]);
    if (!ok)
        return forkd_error_set(err, -EINVAL,
                               "%s '%.40s': expected six hex pairs like "
                               "06:00:ac:10:00:02",
                               field, mac);
    unsigned first = 0;
    sscanf(mac, "%2x", &first);
    if (first & 1)
        return forkd_error_set(err, -EINVAL, "%s '%s' is a multicast address", field, mac);
    return 0;
}

static int devices_check_tap(const char *field, const char *name, struct forkd_error *err)
{
    size_t length = strlen(name);
    if (length == 0 || length >= DEVICES_TAP_NAME_MAX)
        return forkd_error_set(err, -EINVAL, "%s: a device name of 1 to %d bytes, got %zu", field,
                               DEVICES_TAP_NAME_MAX - 1, length);
    for (const char *c = name; *c; c++)
        if ((unsigned char)*c <= 0x20 || *c == 0x7f || *c == '/' || *c == ':')
            return forkd_error_set(err, -EINVAL,
                                   "%s '%s': spaces, '/', ':' and control bytes are not allowed",
                                   field, name);
    if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
        return forkd_error_set(err, -EINVAL, "%s '%s' is not a device name", field, name);
    return 0;
}

static int devices_validate_drives(const struct vm_devices *d, struct forkd_error *err)
{
    char field[64];
    int root = -1;
    if (d->drive_count > DEVICES_MAX_DRIVES)
        return forkd_error_set(err, -EINVAL, "drives: at most %d, got %zu", DEVICES_MAX_DRIVES,
                               d->drive_count);
    for (size_t i = 0; i < d->drive_count; i++) {
        const struct devices_drive *drive = &d->drives[i];
        snprintf(field, sizeof(field), "drives[%zu].drive_id", i);
        int rc = devices_check_id(field, drive->id, err);
        snprintf(field, sizeof(field), "drives[%zu].path_on_host", i);
        if (rc == 0)
            rc = devices_check_path(field, drive->path, DEVICES_PATH_MAX, err);
        if (rc < 0)
            return rc;
        for (size_t j = 0; j < i; j++)
            if (strcmp(d->drives[j].id, drive->id) == 0)
                return forkd_error_set(err, -EINVAL,
                                       "drives[%zu].drive_id '%s' is also drives[%zu]'s", i,
                                       drive->id, j);
        if (drive->root && root >= 0)
            return forkd_error_set(err, -EINVAL,
                                   "drives[%zu].is_root_device: drives[%d] is the root device "
                                   "already; a VM has at most one",
                                   i, root);
        if (drive->root)
            root = (int)i;
    }
    return 0;
}

static int devices_validate_nets(const struct vm_devices *d, struct forkd_error *err)
{
    char field[64];
    if (d->net_count > DEVICES_MAX_NETS)
        return forkd_error_set(err, -EINVAL, "network_interfaces: at most %d, got %zu",
                               DEVICES_MAX_NETS, d->net_count);
    for (size_t i = 0; i < d->net_count; i++) {
        const struct devices_net *net = &d->nets[i];
        snprintf(field, sizeof(field), "network_interfaces[%zu].iface_id", i);
        int rc = devices_check_id(field, net->id, err);
        snprintf(field, sizeof(field), "network_interfaces[%zu].host_dev_name", i);
        if (rc == 0)
            rc = devices_check_tap(field, net->host_dev_name, err);
        snprintf(field, sizeof(field), "network_interfaces[%zu].guest_mac", i);
        if (rc == 0 && net->guest_mac[0])
            rc = devices_check_mac(field, net->guest_mac, err);
        if (rc < 0)
            return rc;
        for (size_t j = 0; j < i; j++) {
            if (strcmp(d->nets[j].id, net->id) == 0)
                return forkd_error_set(err, -EINVAL,
                                       "network_interfaces[%zu].iface_id '%s' is also "
                                       "network_interfaces[%zu]'s",
                                       i, net->id, j);
            if (strcmp(d->nets[j].host_dev_name, net->host_dev_name) == 0)
                return forkd_error_set(err, -EINVAL,
                                       "network_interfaces[%zu].host_dev_name '%s' is also "
                                       "network_interfaces[%zu]'s",
                                       i, net->host_dev_name, j);
            if (net->guest_mac[0] && strcasecmp(d->nets[j].guest_mac, net->guest_mac) == 0)
                return forkd_error_set(err, -EINVAL,
                                       "network_interfaces[%zu].guest_mac '%s' is also "
                                       "network_interfaces[%zu]'s",
                                       i, net->guest_mac, j);
        }
    }
    return 0;
}

int devices_validate(const struct vm_devices *devices, struct forkd_error *err)
{
    int rc = devices_validate_drives(devices, err);
    if (rc == 0)
        rc = devices_validate_nets(devices, err);
    if (rc == 0 && devices->initrd_path[0])
        rc = devices_check_path("initrd_path", devices->initrd_path, DEVICES_PATH_MAX, err);
    if (rc < 0 || !devices->vsock.present)
        return rc;
    if (devices->vsock.guest_cid < DEVICES_MIN_GUEST_CID)
        return forkd_error_set(err, -EINVAL,
                               "vsock.guest_cid %u: CIDs 0 to 2 are reserved, use 3 or more",
                               devices->vsock.guest_cid);
    return devices_check_path("vsock.uds_path", devices->vsock.uds_path, DEVICES_VSOCK_PATH_MAX,
                              err);
}

/* ---- Spawn's per-fork overrides --------------------------------------------------------- */

#define DEVICES_HAS_INDEX 1u /* a pattern's placeholders */
#define DEVICES_HAS_VM_ID 2u

struct devices_expansion {
    const char *field; /* "network_overrides[0].host_dev_name", for messages */
    const char *pattern;
    bool tap; /* {vm_id} is refused */
};

/* Expands the pattern for one fork into out; *found gets the placeholders seen. -EINVAL for
 * an unknown placeholder, -ENAMETOOLONG when out is too small, both naming the field. */
static int devices_expand(const struct devices_expansion *x, unsigned index, const char *vm_id,
                          char *out, size_t size, unsigned *found, struct forkd_error *err)
{
    char digits[16];
    size_t used = 0;
    *found = 0;
    for (const char *c = x->pattern; *c;) {
        const char *text = c;
        size_t n = 1;
        if (strncmp(c, "{i}", 3) == 0) {
            snprintf(digits, sizeof(digits), "%u", index);
            text = digits, n = strlen(digits), c += 3, *found |= DEVICES_HAS_INDEX;
        } else if (strncmp(c, "{vm_id}", 7) == 0 && !x->tap) {
            text = vm_id, n = strlen(vm_id), c += 7, *found |= DEVICES_HAS_VM_ID;
        } else if (strncmp(c, "{vm_id}", 7) == 0) {
            return forkd_error_set(err, -EINVAL,
                                   "%s '%s': {vm_id} is not allowed in a tap name (at most 15 "
                                   "bytes, chosen before the fork exists): use {i}",
                                   x->field, x->pattern);
        } else if (*c == '{' || *c == '}') {
            return forkd_error_set(err, -EINVAL,
                                   "%s '%s': unknown placeholder at '%.16s': the placeholders "
                                   "are {i} (the fork's index)%s",
                                   x->field, x->pattern, c, x->tap ? "" : " and {vm_id}");
        } else {
            c++;
        }
        if (used + n >= size)
            return forkd_error_set(err, -ENAMETOOLONG, "%s '%s' gives fork %u a name too long",
                                   x->field, x->pattern, index);
        memcpy(out + used, text, n);
        used += n;
    }
    out[used] = '\0';
    return 0;
}

/* Every fork's tap from one pattern (taps[index]), each a valid device name. */
static int devices_expand_taps(const struct devices_expansion *x, unsigned count,
                               char (*taps)[DEVICES_TAP_NAME_MAX], struct forkd_error *err)
{
    char name[DEVICES_PATTERN_MAX + 16], field[128];
    unsigned found = 0;
    for (unsigned index = 0; index < count; index++) {
        int rc = devices_expand(x, index, "", name, sizeof(name), &found, err);
        snprintf(field, sizeof(field), "%s '%s' for fork %u", x->field, x->pattern, index);
        if (rc == 0)
            rc = devices_check_tap(field, name, err);
        if (rc < 0)
            return rc;
        memcpy(taps[index], name, strlen(name) + 1); /* < DEVICES_TAP_NAME_MAX: checked */
    }
    if (count > 1 && !(found & DEVICES_HAS_INDEX))
        return forkd_error_set(err, -EINVAL,
                               "%s '%s': %u forks would share this tap: put {i} (the fork's "
                               "index) in the pattern",
                               x->field, x->pattern, count);
    return 0;
}

static int devices_validate_vsock_override(const char *pattern, unsigned count,
                                           struct forkd_error *err)
{
    const struct devices_expansion x = {"vsock_override.uds_path", pattern, false};
    char path[DEVICES_PATTERN_MAX + 64];
    unsigned found = 0;
    /* The longest expansion: the most digits for {i}, the longest id for {vm_id}. */
    int rc = devices_expand(&x, count - 1, DEVICES_VM_ID_LONGEST, path, sizeof(path), &found, err);
    if (rc == 0)
        rc = devices_check_path("vsock_override.uds_path", path, DEVICES_VSOCK_PATH_MAX, err);
    if (rc < 0)
        return forkd_error_prefix(err, "%s",
                                  found ? "(expanded for the last fork and the "
                                          "longest VM id) "
                                        : "");
    if (count > 1 && !found)
        return forkd_error_set(err, -EINVAL,
                               "vsock_override.uds_path '%s': %u forks would share this socket: "
                               "put {i} (the fork's index) or {vm_id} in the pattern",
                               pattern, count);
    return 0;
}

/* taps[k * count + index]: fork index's tap from overrides->nets[k]. */
static int devices_overrides_taps(const struct devices_overrides *o, unsigned count,
                                  char (*taps)[DEVICES_TAP_NAME_MAX], struct forkd_error *err)
{
    char field[64];
    for (size_t k = 0; k < o->net_count; k++) {
        snprintf(field, sizeof(field), "network_overrides[%zu].host_dev_name", k);
        const struct devices_expansion x = {field, o->nets[k].host_dev_name, true};
        int rc = devices_expand_taps(&x, count, taps + k * count, err);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Two overrides that give some forks the same tap. */
static int devices_overrides_distinct(const struct devices_overrides *o, unsigned count,
                                      char (*taps)[DEVICES_TAP_NAME_MAX], struct forkd_error *err)
{
    for (size_t k = 0; k < o->net_count; k++)
        for (size_t l = 0; l < k; l++)
            for (unsigned a = 0; a < count; a++)
                for (unsigned b = 0; b < count; b++)
                    if (strcmp(taps[k * count + a], taps[l * count + b]) == 0)
                        return forkd_error_set(err, -EINVAL,
                                               "network_overrides[%zu].host_dev_name '%s' gives "
                                               "fork %u tap %s, which network_overrides[%zu] "
                                               "gives fork %u",
                                               k, o->nets[k].host_dev_name, a, taps[k * count + a],
                                               l, b);
    return 0;
}

int devices_overrides_validate(const struct devices_overrides *o, unsigned count,
                               struct forkd_error *err)
{
    char field[64];
    if (count < 1)
        return forkd_error_set(err, -EINVAL, "overrides: count must be at least 1");
    if (o->net_count > DEVICES_MAX_NETS)
        return forkd_error_set(err, -EINVAL, "network_overrides: at most %d, got %zu",
                               DEVICES_MAX_NETS, o->net_count);
    for (size_t k = 0; k < o->net_count; k++) {
        snprintf(field, sizeof(field), "network_overrides[%zu].iface_id", k);
        int rc = devices_check_id(field, o->nets[k].iface_id, err);
        if (rc < 0)
            return rc;
        for (size_t l = 0; l < k; l++)
            if (strcmp(o->nets[l].iface_id, o->nets[k].iface_id) == 0)
                return forkd_error_set(err, -EINVAL,
                                       "network_overrides[%zu].iface_id '%s' is also "
                                       "network_overrides[%zu]'s",
                                       k, o->nets[k].iface_id, l);
    }
    _cleanup_free_ char(*taps)[DEVICES_TAP_NAME_MAX] =
        calloc(o->net_count * count + 1, DEVICES_TAP_NAME_MAX);
    if (!taps)
        return forkd_error_set(err, -ENOMEM, "overrides: out of memory");
    int rc = devices_overrides_taps(o, count, taps, err);
    if (rc == 0)
        rc = devices_overrides_distinct(o, count, taps, err);
    if (rc == 0 && o->vsock_uds_path[0])
        rc = devices_validate_vsock_override(o->vsock_uds_path, count, err);
    return rc;
}

static const struct devices_net_override *devices_override_of(const struct devices_overrides *o,
                                                              const char *iface_id)
{
    for (size_t k = 0; k < o->net_count; k++)
        if (strcmp(o->nets[k].iface_id, iface_id) == 0)
            return &o->nets[k];
    return NULL;
}

/* The interfaces of the snapshot's VM, for messages: "eth0, eth1" or "none". */
static const char *devices_net_names(const struct vm_devices *d, char *out, size_t size)
{
    size_t used = 0;
    snprintf(out, size, "none");
    for (size_t i = 0; i < d->net_count && used < size; i++)
        used += (size_t)snprintf(out + used, size - used, "%s%s", i ? ", " : "", d->nets[i].id);
    return out;
}

/* With more than one fork, everything two forks cannot share must be overridden. */
static int devices_overrides_cover(const struct vm_devices *d, const struct devices_overrides *o,
                                   unsigned count, const char *snapshot, struct forkd_error *err)
{
    for (size_t i = 0; count > 1 && i < d->net_count; i++)
        if (!devices_override_of(o, d->nets[i].id))
            return forkd_error_set(err, -EINVAL,
                                   "spawn of %u forks from %s: its VM's interface '%s' uses tap "
                                   "%s, which two forks cannot share: give network_overrides "
                                   "{iface_id: \"%s\", host_dev_name: a pattern with {i}, e.g. "
                                   "\"tap{i}\"}, one tap per fork",
                                   count, snapshot, d->nets[i].id, d->nets[i].host_dev_name,
                                   d->nets[i].id);
    if (count > 1 && d->vsock.present && !o->vsock_uds_path[0])
        return forkd_error_set(err, -EINVAL,
                               "spawn of %u forks from %s: its VM's vsock uses socket %s, which "
                               "two forks cannot share: give vsock_override {uds_path: an "
                               "absolute path with {i} or {vm_id}, e.g. \"/run/vsock-{i}.sock\"}",
                               count, snapshot, d->vsock.uds_path);
    return 0;
}

/* An interface that keeps its tap (count 1) must not get another interface's override. */
static int devices_overrides_keep_apart(const struct vm_devices *d,
                                        const struct devices_overrides *o, unsigned count,
                                        struct forkd_error *err)
{
    char name[DEVICES_PATTERN_MAX + 16], field[64];
    unsigned found;
    for (size_t k = 0; k < o->net_count; k++) {
        snprintf(field, sizeof(field), "network_overrides[%zu].host_dev_name", k);
        const struct devices_expansion x = {field, o->nets[k].host_dev_name, true};
        for (unsigned index = 0; index < count; index++) {
            int rc = devices_expand(&x, index, "", name, sizeof(name), &found, err);
            if (rc < 0)
                return rc;
            for (size_t i = 0; i < d->net_count; i++)
                if (!devices_override_of(o, d->nets[i].id) &&
                    strcmp(d->nets[i].host_dev_name, name) == 0)
                    return forkd_error_set(err, -EINVAL,
                                           "%s '%s' gives fork %u tap %s, which interface '%s' "
                                           "keeps (it is not overridden)",
                                           field, x.pattern, index, name, d->nets[i].id);
        }
    }
    return 0;
}

int devices_overrides_check(const struct vm_devices *d, const struct devices_overrides *o,
                            unsigned count, const char *snapshot, struct forkd_error *err)
{
    char names[DEVICES_MAX_NETS * DEVICES_ID_MAX + 8];
    for (size_t k = 0; k < o->net_count; k++) {
        bool known = false;
        for (size_t i = 0; i < d->net_count && !known; i++)
            known = strcmp(d->nets[i].id, o->nets[k].iface_id) == 0;
        if (!known)
            return forkd_error_set(err, -EINVAL,
                                   "network_overrides[%zu].iface_id '%s': the VM of snapshot %s "
                                   "has no such interface (its interfaces: %s)",
                                   k, o->nets[k].iface_id, snapshot,
                                   devices_net_names(d, names, sizeof(names)));
    }
    if (o->vsock_uds_path[0] && !d->vsock.present)
        return forkd_error_set(
            err, -EINVAL, "vsock_override.uds_path: the VM of snapshot %s has no vsock", snapshot);
    int rc = devices_overrides_cover(d, o, count, snapshot, err);
    if (rc == 0)
        rc = devices_overrides_keep_apart(d, o, count, err);
    return rc;
}

int devices_overrides_apply(struct vm_devices *d, const struct devices_overrides *o, unsigned index,
                            const char *vm_id, struct forkd_error *err)
{
    char field[64];
    unsigned found;
    for (size_t k = 0; k < o->net_count; k++) {
        struct devices_net *net = NULL;
        for (size_t i = 0; i < d->net_count && !net; i++)
            if (strcmp(d->nets[i].id, o->nets[k].iface_id) == 0)
                net = &d->nets[i];
        if (!net)
            return forkd_error_set(err, -EINVAL,
                                   "network_overrides[%zu].iface_id '%s': no such "
                                   "interface",
                                   k, o->nets[k].iface_id);
        snprintf(field, sizeof(field), "network_overrides[%zu].host_dev_name", k);
        const struct devices_expansion x = {field, o->nets[k].host_dev_name, true};
        int rc = devices_expand(&x, index, vm_id, net->host_dev_name, sizeof(net->host_dev_name),
                                &found, err);
        if (rc < 0)
            return rc;
    }
    if (!o->vsock_uds_path[0])
        return 0;
    if (!d->vsock.present)
        return forkd_error_set(err, -EINVAL, "vsock_override.uds_path: the VM has no vsock");
    const struct devices_expansion x = {"vsock_override.uds_path", o->vsock_uds_path, false};
    return devices_expand(&x, index, vm_id, d->vsock.uds_path, sizeof(d->vsock.uds_path), &found,
                          err);
}

/* ---- files ------------------------------------------------------------------------------ */

static void devices_identity_from_stat(const struct stat *st, struct devices_file_identity *out)
{
    out->size = (uint64_t)st->st_size;
    out->mtime_ns = (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec;
    out->ctime_ns = (int64_t)st->st_ctim.tv_sec * 1000000000 + st->st_ctim.tv_nsec;
    out->inode = (uint64_t)st->st_ino;
    out->device = (uint64_t)st->st_dev;
}

int devices_file_identity_of(const char *path, struct devices_file_identity *out)
{
    struct stat st;
    if (stat(path, &st) < 0)
        return -errno;
    devices_identity_from_stat(&st, out);
    return 0;
}

bool devices_file_identity_equal(const struct devices_file_identity *a,
                                 const struct devices_file_identity *b)
{
    return a->size == b->size && a->mtime_ns == b->mtime_ns && a->ctime_ns == b->ctime_ns &&
           a->inode == b->inode && a->device == b->device;
}

int devices_check_files(struct vm_devices *devices, struct forkd_error *err)
{
    for (size_t i = 0; i < devices->drive_count; i++) {
        struct devices_drive *drive = &devices->drives[i];
        int flags = (drive->read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NONBLOCK;
        _cleanup_close_ int fd = open(drive->path, flags);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) < 0)
            return forkd_error_errno(err, -errno, "drives[%zu].path_on_host %s", i, drive->path);
        if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
            return forkd_error_set(err, -EINVAL,
                                   "drives[%zu].path_on_host %s is not a regular file or a block "
                                   "device",
                                   i, drive->path);
        devices_identity_from_stat(&st, &drive->identity);
    }
    if (devices->initrd_path[0] && access(devices->initrd_path, R_OK) < 0)
        return forkd_error_errno(err, -errno, "initrd_path %s", devices->initrd_path);
    return 0;
}

bool devices_have_writable_drive(const struct vm_devices *devices)
{
    for (size_t i = 0; i < devices->drive_count; i++)
        if (!devices->drives[i].read_only)
            return true;
    return false;
}

/* ---- JSON ------------------------------------------------------------------------------- */

/* Identity numbers go beyond what a JSON number holds exactly (2^53: nanosecond times, 64-bit
 * inodes): they are written as decimal strings. */
static bool devices_put_decimal(cJSON *obj, const char *key, long long value, bool is_signed)
{
    char text[32];
    if (is_signed)
        snprintf(text, sizeof(text), "%lld", value);
    else
        snprintf(text, sizeof(text), "%llu", (unsigned long long)value);
    return cJSON_AddStringToObject(obj, key, text) != NULL;
}

static bool devices_put_identity(cJSON *obj, const struct devices_file_identity *id)
{
    cJSON *out = cJSON_AddObjectToObject(obj, "identity");
    return out && devices_put_decimal(out, "size", (long long)id->size, false) &&
           devices_put_decimal(out, "mtime_ns", id->mtime_ns, true) &&
           devices_put_decimal(out, "ctime_ns", id->ctime_ns, true) &&
           devices_put_decimal(out, "inode", (long long)id->inode, false) &&
           devices_put_decimal(out, "device", (long long)id->device, false);
}

static bool devices_put_drives(cJSON *root, const struct vm_devices *d)
{
    cJSON *array = cJSON_AddArrayToObject(root, "drives");
    for (size_t i = 0; array && i < d->drive_count; i++) {
        const struct devices_drive *drive = &d->drives[i];
        cJSON *obj = cJSON_CreateObject();
        if (!obj || !cJSON_AddItemToArray(array, obj))
            return cJSON_Delete(obj), false;
        if (!cJSON_AddStringToObject(obj, "drive_id", drive->id) ||
            !cJSON_AddStringToObject(obj, "path_on_host", drive->path) ||
            !cJSON_AddBoolToObject(obj, "is_read_only", drive->read_only) ||
            !cJSON_AddBoolToObject(obj, "is_root_device", drive->root) ||
            !devices_put_identity(obj, &drive->identity))
            return false;
    }
    return array != NULL;
}

static bool devices_put_nets(cJSON *root, const struct vm_devices *d)
{
    cJSON *array = cJSON_AddArrayToObject(root, "network_interfaces");
    for (size_t i = 0; array && i < d->net_count; i++) {
        cJSON *obj = cJSON_CreateObject();
        if (!obj || !cJSON_AddItemToArray(array, obj))
            return cJSON_Delete(obj), false;
        if (!cJSON_AddStringToObject(obj, "iface_id", d->nets[i].id) ||
            !cJSON_AddStringToObject(obj, "host_dev_name", d->nets[i].host_dev_name) ||
            !cJSON_AddStringToObject(obj, "guest_mac", d->nets[i].guest_mac))
            return false;
    }
    return array != NULL;
}

bool devices_json_put(void *parent, const struct vm_devices *devices)
{
    cJSON *root = cJSON_AddObjectToObject(parent, "devices");
    if (!root || !cJSON_AddStringToObject(root, "initrd_path", devices->initrd_path) ||
        !devices_put_drives(root, devices) || !devices_put_nets(root, devices))
        return false;
    if (!devices->vsock.present)
        return cJSON_AddNullToObject(root, "vsock") != NULL;
    cJSON *vsock = cJSON_AddObjectToObject(root, "vsock");
    return vsock && cJSON_AddNumberToObject(vsock, "guest_cid", devices->vsock.guest_cid) &&
           cJSON_AddStringToObject(vsock, "uds_path", devices->vsock.uds_path);
}

static int devices_get_string(const cJSON *obj, const char *key, char *out, size_t size,
                              struct forkd_error *err)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!cJSON_IsString(item) || strlen(item->valuestring) >= size)
        return forkd_error_set(err, -EINVAL, "devices: %s is missing, not a string or too long",
                               key);
    memcpy(out, item->valuestring, strlen(item->valuestring) + 1);
    return 0;
}

static int devices_get_bool(const cJSON *obj, const char *key, bool *out, struct forkd_error *err)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!cJSON_IsBool(item))
        return forkd_error_set(err, -EINVAL, "devices: %s is missing or not a boolean", key);
    *out = cJSON_IsTrue(item);
    return 0;
}

static int devices_get_number(const cJSON *obj, const char *key, double min, double max,
                              double *out, struct forkd_error *err)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!cJSON_IsNumber(item) || item->valuedouble < min || item->valuedouble > max)
        return forkd_error_set(err, -EINVAL, "devices: %s is missing or out of range", key);
    *out = item->valuedouble;
    return 0;
}

static int devices_get_decimal(const cJSON *obj, const char *key, bool is_signed, uint64_t *out,
                               struct forkd_error *err)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    const char *text = cJSON_IsString(item) ? item->valuestring : "";
    char *end = NULL;
    errno = 0;
    if (is_signed)
        *out = (uint64_t)strtoll(text, &end, 10);
    else
        *out = strtoull(text, &end, 10);
    if (!*text || *end || errno || (!is_signed && *text == '-'))
        return forkd_error_set(err, -EINVAL, "devices: identity %s is missing or not a number",
                               key);
    return 0;
}

static int devices_get_identity(const cJSON *obj, struct devices_file_identity *out,
                                struct forkd_error *err)
{
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(obj, "identity");
    uint64_t mtime = 0, ctime = 0;
    if (!cJSON_IsObject(id))
        return forkd_error_set(err, -EINVAL, "devices: a drive's identity is missing");
    int rc = devices_get_decimal(id, "size", false, &out->size, err);
    if (rc == 0)
        rc = devices_get_decimal(id, "mtime_ns", true, &mtime, err);
    if (rc == 0)
        rc = devices_get_decimal(id, "ctime_ns", true, &ctime, err);
    if (rc == 0)
        rc = devices_get_decimal(id, "inode", false, &out->inode, err);
    if (rc == 0)
        rc = devices_get_decimal(id, "device", false, &out->device, err);
    out->mtime_ns = (int64_t)mtime;
    out->ctime_ns = (int64_t)ctime;
    return rc;
}

static int devices_get_drives(const cJSON *root, struct vm_devices *out, struct forkd_error *err)
{
    const cJSON *array = cJSON_GetObjectItemCaseSensitive(root, "drives"), *item;
    if (!cJSON_IsArray(array))
        return forkd_error_set(err, -EINVAL, "devices: drives is not an array");
    cJSON_ArrayForEach(item, array)
    {
        if (out->drive_count == DEVICES_MAX_DRIVES)
            return forkd_error_set(err, -EINVAL, "devices: more than %d drives",
                                   DEVICES_MAX_DRIVES);
        struct devices_drive *drive = &out->drives[out->drive_count++];
        int rc = devices_get_string(item, "drive_id", drive->id, sizeof(drive->id), err);
        if (rc == 0)
            rc = devices_get_string(item, "path_on_host", drive->path, sizeof(drive->path), err);
        if (rc == 0)
            rc = devices_get_bool(item, "is_read_only", &drive->read_only, err);
        if (rc == 0)
            rc = devices_get_bool(item, "is_root_device", &drive->root, err);
        if (rc == 0)
            rc = devices_get_identity(item, &drive->identity, err);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int devices_get_nets(const cJSON *root, struct vm_devices *out, struct forkd_error *err)
{
    const cJSON *array = cJSON_GetObjectItemCaseSensitive(root, "network_interfaces"), *item;
    if (!cJSON_IsArray(array))
        return forkd_error_set(err, -EINVAL, "devices: network_interfaces is not an array");
    cJSON_ArrayForEach(item, array)
    {
        if (out->net_count == DEVICES_MAX_NETS)
            return forkd_error_set(err, -EINVAL, "devices: more than %d network interfaces",
                                   DEVICES_MAX_NETS);
        struct devices_net *net = &out->nets[out->net_count++];
        int rc = devices_get_string(item, "iface_id", net->id, sizeof(net->id), err);
        if (rc == 0)
            rc = devices_get_string(item, "host_dev_name", net->host_dev_name,
                                    sizeof(net->host_dev_name), err);
        if (rc == 0)
            rc = devices_get_string(item, "guest_mac", net->guest_mac, sizeof(net->guest_mac), err);
        if (rc < 0)
            return rc;
    }
    return 0;
}

int devices_json_get(const void *parent, struct vm_devices *out, struct forkd_error *err)
{
    memset(out, 0, sizeof(*out));
    const cJSON *root = cJSON_GetObjectItemCaseSensitive(parent, "devices");
    if (!root)
        return 0;
    if (!cJSON_IsObject(root))
        return forkd_error_set(err, -EINVAL, "devices is not an object");
    int rc =
        devices_get_string(root, "initrd_path", out->initrd_path, sizeof(out->initrd_path), err);
    if (rc == 0)
        rc = devices_get_drives(root, out, err);
    if (rc == 0)
        rc = devices_get_nets(root, out, err);
    if (rc < 0)
        return rc;
    const cJSON *vsock = cJSON_GetObjectItemCaseSensitive(root, "vsock");
    if (cJSON_IsNull(vsock))
        return 0;
    if (!cJSON_IsObject(vsock))
        return forkd_error_set(err, -EINVAL, "devices: vsock is not an object or null");
    double cid = 0;
    rc = devices_get_number(vsock, "guest_cid", DEVICES_MIN_GUEST_CID, 4294967295.0, &cid, err);
    if (rc == 0)
        rc = devices_get_string(vsock, "uds_path", out->vsock.uds_path, sizeof(out->vsock.uds_path),
                                err);
    if (rc < 0)
        return rc;
    out->vsock.present = true;
    out->vsock.guest_cid = (uint32_t)cid;
    return 0;
}
