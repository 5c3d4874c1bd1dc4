/* forkd's command line: the flags, their defaults, parsing and --help. */
#ifndef FORKD_SERVICE_OPTIONS_H
#define FORKD_SERVICE_OPTIONS_H

#include "log.h"

#include <stdbool.h>
#include <stddef.h>

#define OPTIONS_DEFAULT_LISTEN    "unix:/run/forkd/forkd.sock"
#define OPTIONS_DEFAULT_STATE_DIR "/var/lib/forkd"
#define OPTIONS_DEFAULT_VMM       "firecracker"
/* The least default for --max-receive-memory-bytes. */
#define OPTIONS_MIN_RECEIVE_MEMORY ((size_t)64 << 20)

struct forkd_options {
    const char *listen;
    bool insecure_tcp;
    bool allow_abstract_socket;
    bool keep_vms;
    bool anonymous_boot_memory; /* boot on the VMM's own memory, not a forkd memfd */
    const char *tls_cert;
    const char *tls_key;
    const char *tls_client_ca;
    bool tls_no_client_auth;
    const char *state_dir;
    const char *vmm_binary;
    unsigned max_branches;
    size_t max_message_bytes;
    /* Memory the requests being received may hold, every connection together; beyond it
     * gRPC cancels streams. Never below max_message_bytes. */
    size_t max_receive_memory_bytes;
    unsigned max_calls;          /* unary calls in flight */
    unsigned max_streams;        /* streaming calls in flight */
    unsigned request_timeout_ms; /* deadline for a call's request message */
    unsigned shutdown_grace_ms;
    unsigned timeout_scale;        /* multiplies every VMM time limit */
    bool realtime;                 /* SCHED_FIFO for the pause and fault-serving threads */
    unsigned realtime_max_percent; /* CPU share a real-time thread may use before demotion */
    enum log_level log_level;
    /* The S3 bucket of remote snapshots; endpoint NULL: none. */
    const char *remote_endpoint;
    const char *remote_region;
    const char *remote_bucket;
    const char *remote_credentials;            /* a file; NULL: the environment */
    unsigned remote_parallel;                  /* 0: the engine's default */
    unsigned long long remote_multipart_bytes; /* 0: the engine's default */
};

enum options_result { OPTIONS_RUN, OPTIONS_EXIT_OK, OPTIONS_EXIT_USAGE };

/* Parses argv into opts (strings point into argv). Prints --help/--version to stdout and
 * usage errors to stderr itself, and says whether to run or exit. */
enum options_result options_parse(int argc, char **argv, struct forkd_options *opts);

#endif
