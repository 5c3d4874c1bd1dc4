/*
 * The method table: every method of the served services, by path ("/forkd.v1.Forkd/GetInfo"),
 * with its message descriptors (from protoc-c's service descriptors), whether it streams its
 * responses (protoc-c drops that, so this table keeps it) and its handler.
 */
#ifndef FORKD_SERVICE_ROUTES_H
#define FORKD_SERVICE_ROUTES_H

#include "call.h"

#include "basic/error.h"

#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

struct route {
    char path[160];
    const ProtobufCServiceDescriptor *service;
    const ProtobufCMethodDescriptor *method;
    bool server_streaming;
    rpc_handler_fn handler;
};

/* Builds the table. Fails (-EINVAL, err filled) if a method of a served service has no entry in
 * the handler table or an entry names no method: a proto change must decide both. */
int routes_init(struct forkd_error *err);

/* The route for a method path, or NULL. */
const struct route *routes_find(const char *path);

/* Iteration for tests and --help: returns the i-th route or NULL past the end. */
const struct route *routes_at(size_t index);

#ifdef __cplusplus
}
#endif

#endif
