/* UTF-8 validity, for text that clients decode strictly (proto3 strings, JSON). */
#ifndef FORKD_UTF8_H
#define FORKD_UTF8_H

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* True when data[0..length) is valid UTF-8: no overlong forms, no surrogates, nothing past
 * U+10FFFF. NUL bytes are valid UTF-8; callers that cannot hold them check apart. */
bool forkd_utf8_valid(const void *data, size_t length);

#ifdef __cplusplus
}
#endif

#endif
