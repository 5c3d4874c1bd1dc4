/* snapshot.json, the codec (see snapshot_json.h). */
#include "snapshot_json.h"

#include "forkd/utf8.h"

#include "basic/cleanup.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#define SNAPSHOT_JSON_FORMAT_VERSION 1
/* The form of "hot" (its own version: the field is optional, so a record without it is still
 * format_version 1, and a later form is refused by name rather than misread). */
#define SNAPSHOT_JSON_HOT_VERSION 1
#define SNAPSHOT_JSON_HOT_ALIGN   4096
/* JSON numbers are doubles: integers above 2^53 do not survive a round trip. */
#define SNAPSHOT_JSON_INT_MAX (UINT64_C(1) << 53)

static void snapshot_json_deletep(cJSON **json)
{
    cJSON_Delete(*json);
}

static uint64_t *snapshot_json_figure_at(struct store_figures *figures,
                                         const struct store_figure_field *field)
{
    return (uint64_t *)((char *)figures + field->offset);
}

/* ---- writing ---- */

static const char *snapshot_json_mode_name(enum store_mode mode)
{
    switch (mode) {
    case STORE_MODE_LIVE:
        return "live";
    case STORE_MODE_LIVE_ARM_IN_PAUSE:
        return "live_arm_in_pause";
    case STORE_MODE_FULL:
        return "full";
    }
    return NULL;
}

static bool snapshot_json_mode_parse(const char *text, enum store_mode *out)
{
    static const enum store_mode modes[] = {STORE_MODE_LIVE, STORE_MODE_LIVE_ARM_IN_PAUSE,
                                            STORE_MODE_FULL};
    for (size_t i = 0; i < ARRAY_SIZE(modes); i++) {
        if (strcmp(text, snapshot_json_mode_name(modes[i])) == 0) {
            *out = modes[i];
            return true;
        }
    }
    return false;
}

static bool snapshot_json_put_u64(cJSON *obj, const char *key, uint64_t value)
{
    return cJSON_AddNumberToObject(obj, key, (double)value) != NULL;
}

static bool snapshot_json_put_str(cJSON *obj, const char *key, const char *value)
{
    return cJSON_AddStringToObject(obj, key, value) != NULL;
}

static cJSON *snapshot_json_put_object(cJSON *obj, const char *key)
{
    return cJSON_AddObjectToObject(obj, key);
}

static bool snapshot_json_put_figures(cJSON *parent, const struct store_figures *f)
{
    cJSON *obj = snapshot_json_put_object(parent, "figures");
    for (size_t i = 0; obj && i < STORE_FIGURE_COUNT; i++)
        if (!snapshot_json_put_u64(obj, store_figure_fields[i].name,
                                   store_figure_get(f, &store_figure_fields[i])))
            return false;
    return obj != NULL;
}

static bool snapshot_json_put_regions(cJSON *parent, const struct store_snapshot *meta)
{
    cJSON *array = cJSON_AddArrayToObject(parent, "regions");
    if (!array)
        return false;
    for (size_t i = 0; i < meta->region_count; i++) {
        const struct store_region *r = &meta->regions[i];
        cJSON *obj = cJSON_CreateObject();
        if (!obj || !cJSON_AddItemToArray(array, obj))
            return cJSON_Delete(obj), false;
        if ((r->guest_phys_addr_known &&
             !snapshot_json_put_u64(obj, "guest_phys_addr", r->guest_phys_addr)) ||
            !snapshot_json_put_u64(obj, "size", r->size) ||
            !snapshot_json_put_u64(obj, "file_offset", r->file_offset) ||
            !snapshot_json_put_u64(obj, "page_size", r->page_size))
            return false;
    }
    return true;
}

static bool snapshot_json_put_labels(cJSON *parent, const struct store_snapshot *meta)
{
    cJSON *obj = snapshot_json_put_object(parent, "labels");
    if (!obj)
        return false;
    for (size_t i = 0; i < meta->label_count; i++)
        if (!snapshot_json_put_str(obj, meta->labels[i].key, meta->labels[i].value))
            return false;
    return true;
}

/* "hot": {"version": 1, "ranges": [[offset, length], ...]}, only when there is a hot set. */
static bool snapshot_json_put_hot(cJSON *parent, const struct store_snapshot *meta)
{
    if (meta->hot_count == 0)
        return true;
    cJSON *obj = snapshot_json_put_object(parent, "hot");
    cJSON *ranges = obj ? cJSON_AddArrayToObject(obj, "ranges") : NULL;
    if (!ranges || !snapshot_json_put_u64(obj, "version", SNAPSHOT_JSON_HOT_VERSION))
        return false;
    for (size_t i = 0; i < meta->hot_count; i++) {
        const double pair[2] = {(double)meta->hot[i].offset, (double)meta->hot[i].length};
        cJSON *item = cJSON_CreateDoubleArray(pair, 2);
        if (!item || !cJSON_AddItemToArray(ranges, item))
            return cJSON_Delete(item), false;
    }
    return true;
}

static bool snapshot_json_put_snapshot(cJSON *root, const struct store_snapshot *meta)
{
    cJSON *source, *machine, *vmm;
    return snapshot_json_put_u64(root, "format_version", SNAPSHOT_JSON_FORMAT_VERSION) &&
           snapshot_json_put_str(root, "name", meta->name) &&
           (source = snapshot_json_put_object(root, "source_vm")) &&
           snapshot_json_put_str(source, "id", meta->source_vm_id) &&
           snapshot_json_put_str(source, "name", meta->source_vm_name) &&
           snapshot_json_put_str(root, "parent_snapshot", meta->parent_snapshot) &&
           snapshot_json_put_str(root, "mode", snapshot_json_mode_name(meta->mode)) &&
           (machine = snapshot_json_put_object(root, "machine")) &&
           snapshot_json_put_u64(machine, "vcpu_count", meta->vcpu_count) &&
           snapshot_json_put_u64(machine, "mem_size_mib", meta->mem_size_mib) &&
           snapshot_json_put_u64(root, "memory_bytes", meta->memory_bytes) &&
           snapshot_json_put_u64(root, "vmstate_bytes", meta->vmstate_bytes) &&
           snapshot_json_put_u64(root, "page_size", meta->page_size) &&
           snapshot_json_put_regions(root, meta) &&
           snapshot_json_put_figures(root, &meta->figures) &&
           (vmm = snapshot_json_put_object(root, "vmm")) &&
           snapshot_json_put_str(vmm, "binary", meta->vmm_binary) &&
           snapshot_json_put_str(vmm, "version", meta->vmm_version) &&
           cJSON_AddNumberToObject(root, "created_at_unix_ms", (double)meta->created_at_unix_ms) &&
           snapshot_json_put_labels(root, meta) && devices_json_put(root, &meta->devices) &&
           snapshot_json_put_hot(root, meta);
}

/* Returns a malloc'd, pretty-printed snapshot.json, or NULL when out of memory. */
char *snapshot_json_format(const struct store_snapshot *meta)
{
    _cleanup_(snapshot_json_deletep) cJSON *root = cJSON_CreateObject();
    if (!root || !snapshot_json_put_snapshot(root, meta))
        return NULL;
    return cJSON_Print(root);
}

/* ---- reading (strict: a missing field or a wrong type is corruption) ---- */

static const cJSON *snapshot_json_field(const cJSON *obj, const char *key, struct forkd_error *err)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!item)
        forkd_error_set(err, -EIO, "field \"%s\" is missing", key);
    return item;
}

static int snapshot_json_get_u64(const cJSON *obj, const char *key, uint64_t max, uint64_t *out,
                                 struct forkd_error *err)
{
    const cJSON *item = snapshot_json_field(obj, key, err);
    if (!item)
        return -EIO;
    double d = item->valuedouble;
    /* Written so that NaN fails too, before the cast that would be undefined for it. */
    if (!cJSON_IsNumber(item) || !(d >= 0 && d <= (double)max) || d != (double)(uint64_t)d)
        return forkd_error_set(err, -EIO, "field \"%s\" must be an integer from 0 to %llu", key,
                               (unsigned long long)max);
    *out = (uint64_t)d;
    return 0;
}

static int snapshot_json_get_u32(const cJSON *obj, const char *key, uint32_t *out,
                                 struct forkd_error *err)
{
    uint64_t value;
    int r = snapshot_json_get_u64(obj, key, UINT32_MAX, &value, err);
    if (r == 0)
        *out = (uint32_t)value;
    return r;
}

static int snapshot_json_get_str(const cJSON *obj, const char *key, char *buf, size_t size,
                                 struct forkd_error *err)
{
    const cJSON *item = snapshot_json_field(obj, key, err);
    if (!item)
        return -EIO;
    if (!cJSON_IsString(item))
        return forkd_error_set(err, -EIO, "field \"%s\" must be a string", key);
    if (strlen(item->valuestring) >= size)
        return forkd_error_set(err, -EIO, "field \"%s\" is longer than %zu bytes", key, size - 1);
    memcpy(buf, item->valuestring, strlen(item->valuestring) + 1);
    return 0;
}

static const cJSON *snapshot_json_get_object(const cJSON *obj, const char *key,
                                             struct forkd_error *err)
{
    const cJSON *item = snapshot_json_field(obj, key, err);
    if (item && !cJSON_IsObject(item)) {
        forkd_error_set(err, -EIO, "field \"%s\" must be an object", key);
        return NULL;
    }
    return item;
}

static int snapshot_json_get_figures(const cJSON *root, struct store_figures *f,
                                     struct forkd_error *err)
{
    const cJSON *obj = snapshot_json_get_object(root, "figures", err);
    if (!obj)
        return forkd_error_prefix(err, "figures: ");
    for (size_t i = 0; i < STORE_FIGURE_COUNT; i++) {
        const struct store_figure_field *field = &store_figure_fields[i];
        /* Figures added with drives: absent from records written before them. */
        bool optional = strcmp(field->name, "disk_capture_ns") == 0 ||
                        strcmp(field->name, "disk_copied_bytes") == 0;
        if (optional && !cJSON_GetObjectItemCaseSensitive(obj, field->name))
            continue;
        if (snapshot_json_get_u64(obj, field->name, SNAPSHOT_JSON_INT_MAX,
                                  snapshot_json_figure_at(f, field), err))
            return forkd_error_prefix(err, "figures: ");
    }
    return 0;
}

static int snapshot_json_get_regions(const cJSON *root, struct store_snapshot *meta,
                                     struct forkd_error *err)
{
    const cJSON *array = snapshot_json_field(root, "regions", err);
    if (!array)
        return -EIO;
    if (!cJSON_IsArray(array) || cJSON_GetArraySize(array) > STORE_MAX_REGIONS)
        return forkd_error_set(err, -EIO, "field \"regions\" must be an array of at most %d",
                               STORE_MAX_REGIONS);
    const cJSON *item;
    cJSON_ArrayForEach(item, array)
    {
        struct store_region *r = &meta->regions[meta->region_count];
        r->guest_phys_addr_known =
            cJSON_IsObject(item) && cJSON_GetObjectItemCaseSensitive(item, "guest_phys_addr");
        if (!cJSON_IsObject(item) ||
            (r->guest_phys_addr_known &&
             snapshot_json_get_u64(item, "guest_phys_addr", SNAPSHOT_JSON_INT_MAX,
                                   &r->guest_phys_addr, err)) ||
            snapshot_json_get_u64(item, "size", SNAPSHOT_JSON_INT_MAX, &r->size, err) ||
            snapshot_json_get_u64(item, "file_offset", SNAPSHOT_JSON_INT_MAX, &r->file_offset,
                                  err) ||
            snapshot_json_get_u32(item, "page_size", &r->page_size, err)) {
            if (!cJSON_IsObject(item))
                forkd_error_set(err, -EIO, "not an object");
            return forkd_error_prefix(err, "regions[%zu]: ", meta->region_count);
        }
        meta->region_count++;
    }
    return 0;
}

static int snapshot_json_get_label(const cJSON *item, struct store_snapshot *meta,
                                   struct forkd_error *err)
{
    struct store_label *label = &meta->labels[meta->label_count];
    if (strlen(item->string) >= sizeof(label->key))
        return forkd_error_set(err, -EIO, "key \"%.64s...\" is too long", item->string);
    for (size_t i = 0; i < meta->label_count; i++)
        if (strcmp(meta->labels[i].key, item->string) == 0)
            return forkd_error_set(err, -EIO, "key \"%s\" appears twice", item->string);
    if (!cJSON_IsString(item) || strlen(item->valuestring) >= sizeof(label->value))
        return forkd_error_set(err, -EIO, "\"%s\" must be a string of less than %zu bytes",
                               item->string, sizeof(label->value));
    memcpy(label->key, item->string, strlen(item->string) + 1);
    memcpy(label->value, item->valuestring, strlen(item->valuestring) + 1);
    meta->label_count++;
    return 0;
}

static int snapshot_json_get_labels(const cJSON *root, struct store_snapshot *meta,
                                    struct forkd_error *err)
{
    const cJSON *obj = snapshot_json_get_object(root, "labels", err);
    if (!obj)
        return -EIO;
    if (cJSON_GetArraySize(obj) > STORE_MAX_LABELS)
        return forkd_error_set(err, -EIO, "more than %d labels", STORE_MAX_LABELS);
    const cJSON *item;
    cJSON_ArrayForEach(item, obj)
    {
        if (snapshot_json_get_label(item, meta, err))
            return forkd_error_prefix(err, "labels: ");
    }
    return 0;
}

static int snapshot_json_get_identity(const cJSON *root, struct store_snapshot *meta,
                                      struct forkd_error *err)
{
    uint64_t version;
    char mode[32];
    const cJSON *source, *machine, *vmm;
    if (snapshot_json_get_u64(root, "format_version", SNAPSHOT_JSON_INT_MAX, &version, err))
        return -EIO;
    if (version != SNAPSHOT_JSON_FORMAT_VERSION)
        return forkd_error_set(err, -EIO, "format_version %llu is not supported (expected %d)",
                               (unsigned long long)version, SNAPSHOT_JSON_FORMAT_VERSION);
    if (snapshot_json_get_str(root, "name", meta->name, sizeof(meta->name), err) ||
        !(source = snapshot_json_get_object(root, "source_vm", err)) ||
        snapshot_json_get_str(source, "id", meta->source_vm_id, sizeof(meta->source_vm_id), err) ||
        snapshot_json_get_str(source, "name", meta->source_vm_name, sizeof(meta->source_vm_name),
                              err) ||
        snapshot_json_get_str(root, "parent_snapshot", meta->parent_snapshot,
                              sizeof(meta->parent_snapshot), err) ||
        snapshot_json_get_str(root, "mode", mode, sizeof(mode), err) ||
        !(machine = snapshot_json_get_object(root, "machine", err)) ||
        snapshot_json_get_u32(machine, "vcpu_count", &meta->vcpu_count, err) ||
        snapshot_json_get_u64(machine, "mem_size_mib", SNAPSHOT_JSON_INT_MAX, &meta->mem_size_mib,
                              err) ||
        !(vmm = snapshot_json_get_object(root, "vmm", err)) ||
        snapshot_json_get_str(vmm, "binary", meta->vmm_binary, sizeof(meta->vmm_binary), err) ||
        snapshot_json_get_str(vmm, "version", meta->vmm_version, sizeof(meta->vmm_version), err))
        return -EIO;
    if (!snapshot_json_mode_parse(mode, &meta->mode))
        return forkd_error_set(err, -EIO, "mode \"%s\" is not live, live_arm_in_pause or full",
                               mode);
    return 0;
}

int snapshot_json_hot_check(const struct store_snapshot *meta, struct forkd_error *err)
{
    if (meta->hot_count > STORE_MAX_HOT_RANGES)
        return forkd_error_set(err, -EIO, "hot: %zu ranges (at most %d)", meta->hot_count,
                               STORE_MAX_HOT_RANGES);
    uint64_t end = 0;
    for (size_t i = 0; i < meta->hot_count; i++) {
        const struct store_hot_range *r = &meta->hot[i];
        if (r->offset % SNAPSHOT_JSON_HOT_ALIGN || r->length % SNAPSHOT_JSON_HOT_ALIGN ||
            r->length == 0)
            return forkd_error_set(err, -EIO,
                                   "hot: ranges[%zu]: offset and length must be multiples of "
                                   "%d, the length above 0",
                                   i, SNAPSHOT_JSON_HOT_ALIGN);
        if (i > 0 && r->offset < end)
            return forkd_error_set(
                err, -EIO,
                "hot: ranges[%zu] starts at %llu, before ranges[%zu] ends (%llu): "
                "ranges must be sorted and apart",
                i, (unsigned long long)r->offset, i - 1, (unsigned long long)end);
        if (r->offset > meta->memory_bytes || r->length > meta->memory_bytes - r->offset)
            return forkd_error_set(err, -EIO,
                                   "hot: ranges[%zu] ends at %llu, beyond memory_bytes (%llu)", i,
                                   (unsigned long long)(r->offset + r->length),
                                   (unsigned long long)meta->memory_bytes);
        end = r->offset + r->length;
    }
    return 0;
}

/* The optional "hot" (absent: no hot set). Read after memory_bytes, which bounds it. */
static int snapshot_json_get_hot(const cJSON *root, struct store_snapshot *meta,
                                 struct forkd_error *err)
{
    const cJSON *obj = cJSON_GetObjectItemCaseSensitive(root, "hot");
    if (!obj)
        return 0;
    uint64_t version;
    if (!cJSON_IsObject(obj))
        return forkd_error_set(err, -EIO, "field \"hot\" must be an object");
    if (snapshot_json_get_u64(obj, "version", SNAPSHOT_JSON_INT_MAX, &version, err))
        return forkd_error_prefix(err, "hot: ");
    if (version != SNAPSHOT_JSON_HOT_VERSION)
        return forkd_error_set(err, -EIO, "hot: version %llu is not supported (expected %d)",
                               (unsigned long long)version, SNAPSHOT_JSON_HOT_VERSION);
    const cJSON *ranges = snapshot_json_field(obj, "ranges", err);
    if (!ranges) {
        forkd_error_prefix(err, "hot: ");
        return -EIO;
    }
    if (!cJSON_IsArray(ranges) || cJSON_GetArraySize(ranges) > STORE_MAX_HOT_RANGES)
        return forkd_error_set(err, -EIO, "hot: \"ranges\" must be an array of at most %d",
                               STORE_MAX_HOT_RANGES);
    const cJSON *item;
    cJSON_ArrayForEach(item, ranges)
    {
        struct store_hot_range *r = &meta->hot[meta->hot_count];
        const cJSON *offset = cJSON_GetArrayItem(item, 0), *length = cJSON_GetArrayItem(item, 1);
        double o = offset ? offset->valuedouble : -1, l = length ? length->valuedouble : -1;
        /* Written so that NaN fails too, before the casts that would be undefined for it. */
        if (!cJSON_IsArray(item) || cJSON_GetArraySize(item) != 2 || !cJSON_IsNumber(offset) ||
            !cJSON_IsNumber(length) || !(o >= 0 && o <= (double)SNAPSHOT_JSON_INT_MAX) ||
            !(l >= 0 && l <= (double)SNAPSHOT_JSON_INT_MAX) || o != (double)(uint64_t)o ||
            l != (double)(uint64_t)l)
            return forkd_error_set(err, -EIO,
                                   "hot: ranges[%zu] must be [offset, length], two integers "
                                   "from 0 to 2^53",
                                   meta->hot_count);
        *r = (struct store_hot_range){(uint64_t)o, (uint64_t)l};
        meta->hot_count++;
    }
    return snapshot_json_hot_check(meta, err);
}

static int snapshot_json_get_created_at(const cJSON *root, int64_t *out, struct forkd_error *err)
{
    const cJSON *item = snapshot_json_field(root, "created_at_unix_ms", err);
    if (!item)
        return -EIO;
    double d = item->valuedouble;
    if (!cJSON_IsNumber(item) ||
        !(d >= -(double)SNAPSHOT_JSON_INT_MAX && d <= (double)SNAPSHOT_JSON_INT_MAX) ||
        d != (double)(int64_t)d)
        return forkd_error_set(err, -EIO, "field \"created_at_unix_ms\" must be an integer");
    *out = (int64_t)d;
    return 0;
}

int snapshot_json_parse(const char *text, size_t len, struct store_snapshot *meta,
                        struct forkd_error *err)
{
    /* Strings from here reach clients that refuse invalid UTF-8 (proto3): one bad label would
     * break every ListSnapshots. A NUL byte would cut a string short silently. */
    if (memchr(text, '\0', len) || !forkd_utf8_valid(text, len))
        return forkd_error_set(err, -EIO, "not valid UTF-8 text");
    _cleanup_(snapshot_json_deletep) cJSON *root = cJSON_ParseWithLength(text, len);
    if (!root)
        return forkd_error_set(err, -EIO, "not valid JSON");
    if (!cJSON_IsObject(root))
        return forkd_error_set(err, -EIO, "not a JSON object");
    memset(meta, 0, sizeof(*meta));
    if (snapshot_json_get_identity(root, meta, err) ||
        snapshot_json_get_u64(root, "memory_bytes", SNAPSHOT_JSON_INT_MAX, &meta->memory_bytes,
                              err) ||
        snapshot_json_get_u64(root, "vmstate_bytes", SNAPSHOT_JSON_INT_MAX, &meta->vmstate_bytes,
                              err) ||
        snapshot_json_get_u32(root, "page_size", &meta->page_size, err) ||
        snapshot_json_get_regions(root, meta, err) ||
        snapshot_json_get_figures(root, &meta->figures, err) ||
        snapshot_json_get_created_at(root, &meta->created_at_unix_ms, err) ||
        snapshot_json_get_labels(root, meta, err) || snapshot_json_get_hot(root, meta, err))
        return -EIO;
    if (devices_json_get(root, &meta->devices, err) < 0) {
        if (err)
            err->code = -EIO;
        return -EIO;
    }
    meta->state = STORE_STATE_READY;
    return 0;
}

static bool snapshot_json_figures_fit(const struct store_figures *f)
{
    for (size_t i = 0; i < STORE_FIGURE_COUNT; i++)
        if (store_figure_get(f, &store_figure_fields[i]) > SNAPSHOT_JSON_INT_MAX)
            return false;
    return true;
}

bool snapshot_json_numbers_fit(const struct store_snapshot *meta)
{
    for (size_t i = 0; i < meta->region_count; i++) {
        const struct store_region *r = &meta->regions[i];
        if (r->guest_phys_addr > SNAPSHOT_JSON_INT_MAX || r->size > SNAPSHOT_JSON_INT_MAX ||
            r->file_offset > SNAPSHOT_JSON_INT_MAX)
            return false;
    }
    return meta->mem_size_mib <= SNAPSHOT_JSON_INT_MAX &&
           meta->created_at_unix_ms <= (int64_t)SNAPSHOT_JSON_INT_MAX &&
           meta->created_at_unix_ms >= -(int64_t)SNAPSHOT_JSON_INT_MAX &&
           snapshot_json_figures_fit(&meta->figures);
}

bool snapshot_json_mode_known(enum store_mode mode)
{
    return snapshot_json_mode_name(mode) != NULL;
}
