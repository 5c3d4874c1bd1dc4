/*
 * Generic glue between gRPC C-core byte buffers and protobuf-c messages: any message type,
 * driven by its protobuf-c descriptor. The only place the service encodes or decodes the wire.
 */
#ifndef FORKD_SERVICE_GLUE_H
#define FORKD_SERVICE_GLUE_H

#include "basic/error.h"

#include <grpc/byte_buffer.h>
#include <protobuf-c/protobuf-c.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Decodes buffer as a message of type descriptor. On success *out holds a message to release
 * with protobuf_c_message_free_unpacked(*out, NULL) and 0 is returned. A NULL buffer (no
 * message) or bytes that do not decode give -EINVAL and a message naming the type in err
 * (request_check.h's checks give theirs). */
int glue_unpack(const ProtobufCMessageDescriptor *descriptor, grpc_byte_buffer *buffer,
                ProtobufCMessage **out, struct forkd_error *err);

/* Encodes message into a new byte buffer (release with grpc_byte_buffer_destroy), or NULL when
 * memory runs out. */
grpc_byte_buffer *glue_pack(const ProtobufCMessage *message);

#ifdef __cplusplus
}
#endif

#endif
