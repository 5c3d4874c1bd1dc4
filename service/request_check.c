/* Request checks protobuf-c does not make (see request_check.h). */
#include "request_check.h"

#include "forkd/utf8.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

/* Nested messages deeper than this are left to the decoder's own limits. */
#define CHECK_MAX_DEPTH 32

/* Reads a varint; returns bytes used, 0 when malformed or truncated. */
static size_t check_varint(const uint8_t *data, size_t length, uint64_t *out)
{
    uint64_t value = 0;
    for (size_t i = 0; i < length && i < 10; i++) {
        value |= (uint64_t)(data[i] & 0x7F) << (7 * i);
        if (!(data[i] & 0x80)) {
            *out = value;
            return i + 1;
        }
    }
    return 0;
}

static int check_string(const ProtobufCMessageDescriptor *descriptor,
                        const ProtobufCFieldDescriptor *field, const uint8_t *data, size_t length,
                        struct forkd_error *err)
{
    const char *problem = memchr(data, '\0', length) ? "holds a NUL byte"
                          : !forkd_utf8_valid(data, length) ? "is not valid UTF-8"
                                                      : NULL;
    if (!problem)
        return 0;
    return forkd_error_set(err, -EINVAL, "field %s.%s %s", descriptor->short_name, field->name,
                           problem);
}

static int check_message(const ProtobufCMessageDescriptor *descriptor, const uint8_t *data,
                         size_t length, unsigned depth, struct forkd_error *err)
{
    size_t at = 0;
    while (at < length && depth < CHECK_MAX_DEPTH) {
        uint64_t key, size = 0;
        size_t used = check_varint(data + at, length - at, &key);
        if (!used)
            return 0;
        at += used;
        switch (key & 7) {
        case 0:
            used = check_varint(data + at, length - at, &size);
            if (!used)
                return 0;
            at += used;
            continue;
        case 1:
            at += 8;
            continue;
        case 5:
            at += 4;
            continue;
        case 2:
            break;
        default:
            return 0; /* groups, or garbage: the decoder decides */
        }
        used = check_varint(data + at, length - at, &size);
        if (!used || size > length - at - used)
            return 0;
        at += used;
        const ProtobufCFieldDescriptor *field =
            protobuf_c_message_descriptor_get_field(descriptor, (unsigned)(key >> 3));
        int rc = 0;
        if (field && field->type == PROTOBUF_C_TYPE_STRING)
            rc = check_string(descriptor, field, data + at, size, err);
        else if (field && field->type == PROTOBUF_C_TYPE_MESSAGE)
            rc = check_message(field->descriptor, data + at, size, depth + 1, err);
        if (rc < 0)
            return rc;
        at += size;
    }
    return 0;
}

int request_check_strings(const ProtobufCMessageDescriptor *descriptor, const uint8_t *data,
                          size_t length, struct forkd_error *err)
{
    return check_message(descriptor, data, length, 0, err);
}

/* protoc-c generates a map<K, V> as a repeated message "...Entry" with fields key and value. */
static bool check_is_map_entry(const ProtobufCMessageDescriptor *d)
{
    size_t name_length = strlen(d->name);
    return d->n_fields == 2 && strcmp(d->fields[0].name, "key") == 0 &&
           strcmp(d->fields[1].name, "value") == 0 && name_length > 5 &&
           strcmp(d->name + name_length - 5, "Entry") == 0 &&
           d->fields[0].type == PROTOBUF_C_TYPE_STRING;
}

static int check_map_field(const ProtobufCMessage *message, const ProtobufCFieldDescriptor *field,
                           struct forkd_error *err)
{
    size_t count = *(const size_t *)((const char *)message + field->quantifier_offset);
    ProtobufCMessage *const *entries =
        *(ProtobufCMessage *const *const *)((const char *)message + field->offset);
    const ProtobufCMessageDescriptor *entry = field->descriptor;
    size_t key_offset = entry->fields[0].offset;
    for (size_t i = 0; i < count; i++) {
        const char *key = *(const char *const *)((const char *)entries[i] + key_offset);
        for (size_t j = 0; j < i; j++) {
            const char *other = *(const char *const *)((const char *)entries[j] + key_offset);
            if (strcmp(key, other) == 0)
                return forkd_error_set(err, -EINVAL, "field %s.%s repeats the key '%s'",
                                       message->descriptor->short_name, field->name, key);
        }
    }
    return 0;
}

static int check_map_keys(const ProtobufCMessage *message, unsigned depth, struct forkd_error *err)
{
    const ProtobufCMessageDescriptor *d = message->descriptor;
    for (unsigned f = 0; f < d->n_fields && depth < CHECK_MAX_DEPTH; f++) {
        const ProtobufCFieldDescriptor *field = &d->fields[f];
        if (field->type != PROTOBUF_C_TYPE_MESSAGE)
            continue;
        const char *slot = (const char *)message + field->offset;
        int rc = 0;
        if (field->label == PROTOBUF_C_LABEL_REPEATED && check_is_map_entry(field->descriptor)) {
            rc = check_map_field(message, field, err);
        } else if (field->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t count = *(const size_t *)((const char *)message + field->quantifier_offset);
            ProtobufCMessage *const *items = *(ProtobufCMessage *const *const *)slot;
            for (size_t i = 0; i < count && rc == 0; i++)
                rc = check_map_keys(items[i], depth + 1, err);
        } else if (*(ProtobufCMessage *const *)slot) {
            rc = check_map_keys(*(ProtobufCMessage *const *)slot, depth + 1, err);
        }
        if (rc < 0)
            return rc;
    }
    return 0;
}

int request_check_map_keys(const ProtobufCMessage *message, struct forkd_error *err)
{
    return check_map_keys(message, 0, err);
}
