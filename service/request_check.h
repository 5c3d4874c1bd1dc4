/*
 * Checks on requests that protobuf-c's decoder does not make, run by glue_unpack on every
 * request before a handler sees it:
 * - a string field must be valid UTF-8 (proto3 says so; conforming clients refuse to decode a
 *   reply that echoes an invalid one) and hold no NUL byte: protobuf-c hands strings over
 *   NUL-terminated, so "good-1\0../../etc" would silently become "good-1". This is checked on
 *   the wire bytes, where the real length is known;
 * - a map field must not repeat a key (the wire format lets the last one win silently).
 */
#ifndef FORKD_SERVICE_REQUEST_CHECK_H
#define FORKD_SERVICE_REQUEST_CHECK_H

#include "basic/error.h"

#include <protobuf-c/protobuf-c.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Walks the encoded message of type descriptor: every string field, nested ones included, must
 * be valid UTF-8 without NUL. Returns 0, or -EINVAL with the field named in err. Malformed
 * framing is left to the decoder (returns 0). */
int request_check_strings(const ProtobufCMessageDescriptor *descriptor, const uint8_t *data,
                          size_t length, struct forkd_error *err);

/* Refuses a map field (nested ones included) that repeats a key. Returns 0 or -EINVAL. */
int request_check_map_keys(const ProtobufCMessage *message, struct forkd_error *err);

#ifdef __cplusplus
}
#endif

#endif
