/*
 * libFuzzer target: request decoding and validation, as glue_unpack runs them on every call.
 * The first byte picks the request type (the input of one of forkd.v1.Forkd's methods), the
 * rest is the wire bytes: decoded by protobuf-c, then the string (NUL, UTF-8) and map-key
 * checks. Nothing may crash, leak or read out of bounds whatever the bytes.
 */
#include "glue.h"

#include "forkd/v1/forkd.pb-c.h"

#include <grpc/byte_buffer.h>
#include <grpc/slice.h>
#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    const ProtobufCServiceDescriptor *service = &forkd__v1__forkd__descriptor;
    const ProtobufCMessageDescriptor *type = service->methods[data[0] % service->n_methods].input;
    grpc_slice slice = grpc_slice_from_copied_buffer((const char *)data + 1, size - 1);
    grpc_byte_buffer *buffer = grpc_raw_byte_buffer_create(&slice, 1);
    grpc_slice_unref(slice);
    ProtobufCMessage *message = NULL;
    struct forkd_error err = {0};
    if (glue_unpack(type, buffer, &message, &err) == 0)
        protobuf_c_message_free_unpacked(message, NULL);
    grpc_byte_buffer_destroy(buffer);
    return 0;
}
