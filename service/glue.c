/* protobuf-c <-> gRPC byte buffer glue (see glue.h). */
#include "glue.h"

#include "request_check.h"

#include "basic/cleanup.h"

#include <errno.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>
#include <stdio.h>
#include <string.h>

int glue_unpack(const ProtobufCMessageDescriptor *descriptor, grpc_byte_buffer *buffer,
                ProtobufCMessage **out, struct forkd_error *err)
{
    *out = NULL;
    if (!buffer)
        return forkd_error_set(err, -EINVAL, "no request message (expected %s)", descriptor->name);
    grpc_byte_buffer_reader reader;
    if (!grpc_byte_buffer_reader_init(&reader, buffer))
        return forkd_error_set(err, -EINVAL, "cannot read the request bytes (expected %s)",
                               descriptor->name);
    /* Flatten: protobuf-c needs one contiguous buffer, the wire may deliver several slices. */
    grpc_slice flat = grpc_byte_buffer_reader_readall(&reader);
    grpc_byte_buffer_reader_destroy(&reader);
    ProtobufCMessage *message = protobuf_c_message_unpack(descriptor, NULL, GRPC_SLICE_LENGTH(flat),
                                                          GRPC_SLICE_START_PTR(flat));
    size_t length = GRPC_SLICE_LENGTH(flat);
    /* On the wire bytes: after decoding, a string's NUL byte cannot be told from its end. */
    int rc =
        message ? request_check_strings(descriptor, GRPC_SLICE_START_PTR(flat), length, err) : 0;
    grpc_slice_unref(flat);
    if (!message)
        return forkd_error_set(err, -EINVAL, "malformed request: %zu bytes do not decode as %s",
                               length, descriptor->name);
    if (rc == 0)
        rc = request_check_map_keys(message, err);
    if (rc < 0) {
        protobuf_c_message_free_unpacked(message, NULL);
        return rc;
    }
    *out = message;
    return 0;
}

grpc_byte_buffer *glue_pack(const ProtobufCMessage *message)
{
    size_t length = protobuf_c_message_get_packed_size(message);
    grpc_slice slice = grpc_slice_malloc(length);
    protobuf_c_message_pack(message, GRPC_SLICE_START_PTR(slice));
    grpc_byte_buffer *buffer = grpc_raw_byte_buffer_create(&slice, 1);
    grpc_slice_unref(slice);
    return buffer;
}
