/*
 * The daemon's shared state, handed to every handler through rpc_call.daemon. Written once at
 * start-up by main(); afterwards only `shutting_down` changes (set by the main thread, read by
 * any call thread). The engine objects it points to are thread-safe themselves.
 */
#ifndef FORKD_SERVICE_DAEMON_H
#define FORKD_SERVICE_DAEMON_H

#include "options.h"

#include "forkd/engine.h"
#include "forkd/probe.h"

#include <stdatomic.h>
#include <stdint.h>

struct branch_table;

struct daemon_state {
    const struct forkd_options *options;
    struct probe_host_caps caps;
    int64_t started_at_unix_ms;
    atomic_bool shutting_down;
    struct engine *engine;         /* thread-safe: store, VM registry, page server */
    struct branch_table *branches; /* thread-safe (branches.c) */
};

#endif
