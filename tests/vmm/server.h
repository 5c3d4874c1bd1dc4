/*
 * server: the API socket's accept/poll loop on the API thread: owns the listening socket and
 * the client connections, feeds complete requests to api_handle and writes the responses.
 */
#ifndef FORKD_TESTVM_SERVER_H
#define FORKD_TESTVM_SERVER_H

#include "api.h"

/* Binds socket_path and serves requests until a fatal error; returns a negative errno. */
int server_run(struct vmm *vmm, const char *socket_path, char *err, size_t err_size);

#endif
