/* forkd's command line (see options.h). */
#include "options.h"

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
    OPT_LISTEN = 256,
    OPT_INSECURE_TCP,
    OPT_KEEP_VMS,
    OPT_TLS_CERT,
    OPT_TLS_KEY,
    OPT_STATE_DIR,
    OPT_VMM_BINARY,
    OPT_MAX_BRANCHES,
    OPT_MAX_MESSAGE_BYTES,
    OPT_SHUTDOWN_GRACE_MS,
    OPT_TIMEOUT_SCALE,
    OPT_NO_REALTIME,
    OPT_REALTIME_MAX_PERCENT,
    OPT_LOG_LEVEL,
    OPT_MAX_CALLS,
    OPT_TLS_CLIENT_CA,
    OPT_TLS_NO_CLIENT_AUTH,
    OPT_ALLOW_ABSTRACT_SOCKET,
    OPT_MAX_STREAMS,
    OPT_REQUEST_TIMEOUT_MS,
    OPT_MAX_RECEIVE_MEMORY_BYTES,
    OPT_VERSION,
    OPT_ANONYMOUS_BOOT_MEMORY,
    OPT_REMOTE_ENDPOINT,
    OPT_REMOTE_REGION,
    OPT_REMOTE_BUCKET,
    OPT_REMOTE_CREDENTIALS,
    OPT_REMOTE_PARALLEL,
    OPT_REMOTE_MULTIPART_BYTES,
};

static const struct option long_options[] = {
    {"listen", required_argument, NULL, OPT_LISTEN},
    {"insecure-tcp", no_argument, NULL, OPT_INSECURE_TCP},
    {"keep-vms", no_argument, NULL, OPT_KEEP_VMS},
    {"anonymous-boot-memory", no_argument, NULL, OPT_ANONYMOUS_BOOT_MEMORY},
    {"tls-cert", required_argument, NULL, OPT_TLS_CERT},
    {"tls-key", required_argument, NULL, OPT_TLS_KEY},
    {"tls-client-ca", required_argument, NULL, OPT_TLS_CLIENT_CA},
    {"tls-no-client-auth", no_argument, NULL, OPT_TLS_NO_CLIENT_AUTH},
    {"state-dir", required_argument, NULL, OPT_STATE_DIR},
    {"vmm-binary", required_argument, NULL, OPT_VMM_BINARY},
    {"max-branches", required_argument, NULL, OPT_MAX_BRANCHES},
    {"max-message-bytes", required_argument, NULL, OPT_MAX_MESSAGE_BYTES},
    {"shutdown-grace-ms", required_argument, NULL, OPT_SHUTDOWN_GRACE_MS},
    {"timeout-scale", required_argument, NULL, OPT_TIMEOUT_SCALE},
    {"no-realtime", no_argument, NULL, OPT_NO_REALTIME},
    {"realtime-max-percent", required_argument, NULL, OPT_REALTIME_MAX_PERCENT},
    {"log-level", required_argument, NULL, OPT_LOG_LEVEL},
    {"max-calls", required_argument, NULL, OPT_MAX_CALLS},
    {"allow-abstract-socket", no_argument, NULL, OPT_ALLOW_ABSTRACT_SOCKET},
    {"max-streams", required_argument, NULL, OPT_MAX_STREAMS},
    {"request-timeout-ms", required_argument, NULL, OPT_REQUEST_TIMEOUT_MS},
    {"max-receive-memory-bytes", required_argument, NULL, OPT_MAX_RECEIVE_MEMORY_BYTES},
    {"version", no_argument, NULL, OPT_VERSION},
    {"remote-endpoint", required_argument, NULL, OPT_REMOTE_ENDPOINT},
    {"remote-region", required_argument, NULL, OPT_REMOTE_REGION},
    {"remote-bucket", required_argument, NULL, OPT_REMOTE_BUCKET},
    {"remote-credentials", required_argument, NULL, OPT_REMOTE_CREDENTIALS},
    {"remote-parallel", required_argument, NULL, OPT_REMOTE_PARALLEL},
    {"remote-multipart-bytes", required_argument, NULL, OPT_REMOTE_MULTIPART_BYTES},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
};

static void options_print_help(FILE *out)
{
    fprintf(out,
            "Usage: forkd [OPTIONS]\n"
            "\n"
            "forkd live-branches running microVMs: it snapshots a running VM while pausing it\n"
            "only for a moment, and starts many VMs from any snapshot. Clients speak gRPC\n"
            "(forkd.v1.Forkd, and grpc.health.v1.Health).\n"
            "\n"
            "Options:\n"
            "  --listen ADDR            where to serve gRPC (default %s).\n"
            "                           unix:PATH is a Unix socket created mode 0600, its\n"
            "                           directory created if missing. HOST:PORT (or\n"
            "                           tcp:HOST:PORT) is TCP and needs --tls-cert, --tls-key\n"
            "                           and --tls-client-ca, or --insecure-tcp.\n"
            "                           An empty or abstract Unix name (unix-abstract:NAME,\n"
            "                           unix:@NAME) is refused unless --allow-abstract-socket.\n"
            "  --allow-abstract-socket  accept an abstract Unix socket address: it has no file\n"
            "                           permissions, so any local user in this network\n"
            "                           namespace can connect and drive VMs as root.\n"
            "  --insecure-tcp           allow a TCP listener without TLS (anyone who reaches the\n"
            "                           port can drive VMs).\n"
            "  --tls-cert PATH          PEM certificate chain for a TCP listener.\n"
            "  --tls-key PATH           PEM private key for a TCP listener.\n"
            "  --tls-client-ca PATH     PEM CA certificates: with TLS, every client must present\n"
            "                           a certificate that chains to one of them (mutual TLS).\n"
            "                           Required with --tls-cert unless --tls-no-client-auth.\n"
            "  --tls-no-client-auth     server-only TLS: clients are not authenticated, so any\n"
            "                           client that reaches the port and trusts the server\n"
            "                           certificate drives VMs as root. Use only behind\n"
            "                           another layer that authenticates clients.\n"
            "  --state-dir DIR          where snapshots and VM records live (default %s).\n"
            "                           One forkd per state directory: a second one refuses.\n"
            "  --vmm-binary PATH        the VMM to launch per VM: a patched firecracker or\n"
            "                           forkd-testvm (default %s, looked up in PATH).\n"
            "  --anonymous-boot-memory  boot VMs on the VMM's own anonymous memory instead of\n"
            "                           a memfd forkd owns (for a VMM without the machine-config\n"
            "                           memory file). LIVE branches of such VMs need Linux 6.4+\n"
            "                           (UFFD_FEATURE_WP_UNPOPULATED) and are refused before.\n"
            "  --keep-vms               on shutdown, leave the VMs forkd started running\n"
            "                           (default: stop them). The next forkd on the same state\n"
            "                           directory adopts them, as it adopts the VMs of a forkd\n"
            "                           that died: same ids, UFFD forks served again.\n"
            "  --max-branches N         branches allowed to run at once; more are refused with\n"
            "                           RESOURCE_EXHAUSTED (default 4).\n"
            "  --max-calls N            unary calls (everything but the streams below) in\n"
            "                           flight at once; more are refused with\n"
            "                           RESOURCE_EXHAUSTED (default 64).\n"
            "  --max-streams N          streaming calls (Branch, WatchBranch, health Watch) in\n"
            "                           flight at once, counted apart so they cannot starve\n"
            "                           unary calls; more are refused with RESOURCE_EXHAUSTED\n"
            "                           (default 32).\n"
            "  --request-timeout-ms N   a call's request message must arrive within N ms of the\n"
            "                           call, or the call ends with DEADLINE_EXCEEDED\n"
            "                           (default 10000).\n"
            "  --max-message-bytes N    largest request accepted; larger ones are refused with\n"
            "                           RESOURCE_EXHAUSTED (default 4194304). gRPC checks the\n"
            "                           size once the whole message is in, so a larger one\n"
            "                           still takes memory while it arrives: see below.\n"
            "  --max-receive-memory-bytes N\n"
            "                           memory that requests still arriving may hold, all\n"
            "                           connections together. Beyond it gRPC slows reading and\n"
            "                           cancels streams (RESOURCE_EXHAUSTED) until enough is\n"
            "                           freed, so oversized requests cannot exhaust the host\n"
            "                           (default 4 x --max-message-bytes, at least 64 MiB;\n"
            "                           never below --max-message-bytes).\n"
            "  --shutdown-grace-ms N    on a stop signal (see below), how long running calls\n"
            "                           may finish before they are cancelled (default 10000).\n"
            "  --timeout-scale N        multiply every time limit forkd puts on a VMM (start,\n"
            "                           API calls, snapshots) by N, for slow or emulated hosts\n"
            "                           (default 1).\n"
            "  --no-realtime            never raise threads to SCHED_FIFO. By default the thread\n"
            "                           inside a branch's pause and the threads serving guest\n"
            "                           page faults run SCHED_FIFO (a vCPU waits on them).\n"
            "  --realtime-max-percent N a SCHED_FIFO thread that uses more than N%% of a core\n"
            "                           over 100 ms goes back to normal priority for good, so it\n"
            "                           can never starve the host (default 50).\n"
            "  --remote-endpoint URL    the S3 server remote snapshots go to (Push, Pull,\n"
            "                           ListRemote, DeleteRemote), http(s)://host[:port];\n"
            "                           requests are path-style and signed (SigV4).\n"
            "  --remote-bucket NAME     the bucket holding them (needed with --remote-endpoint).\n"
            "  --remote-region NAME     the region requests are signed for (default us-east-1).\n"
            "  --remote-credentials FILE\n"
            "                           an AWS-style credentials file (aws_access_key_id,\n"
            "                           aws_secret_access_key); without it the environment's\n"
            "                           AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.\n"
            "  --remote-parallel N      chunk transfers at once per Push or Pull (default 4).\n"
            "  --remote-multipart-bytes N\n"
            "                           a vmstate larger than N bytes is uploaded in parts of N\n"
            "                           bytes (default 67108864, at least 5 MiB).\n"
            "  --log-level LEVEL        error, warn, info or debug (default info). Logs go to\n"
            "                           stderr.\n"
            "  --version                print the version and exit.\n"
            "  -h, --help               print this help and exit.\n"
            "\n"
            "Signals: SIGTERM, SIGINT, SIGHUP or SIGQUIT stop accepting calls, let running\n"
            "calls and branches finish within the grace period, cancel the rest (a cancelled\n"
            "branch leaves its VM running and no snapshot), stop the VMs (unless --keep-vms)\n"
            "and exit 0. SIGUSR1, SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGIO, SIGXCPU and\n"
            "SIGPWR are logged and ignored; SIGPIPE and SIGXFSZ are ignored.\n",
            OPTIONS_DEFAULT_LISTEN, OPTIONS_DEFAULT_STATE_DIR, OPTIONS_DEFAULT_VMM);
}

/* Parses a decimal in [min, max]; returns 0 or -EINVAL. */
static int options_parse_number(const char *text, unsigned long long min, unsigned long long max,
                                unsigned long long *out)
{
    if (!*text || *text == '-')
        return -EINVAL;
    char *end;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 10);
    if (errno || *end || value < min || value > max)
        return -EINVAL;
    *out = value;
    return 0;
}

static int options_apply_number(int option, const char *text, struct forkd_options *opts)
{
    unsigned long long value;
    switch (option) {
    case OPT_MAX_BRANCHES:
        if (options_parse_number(text, 1, 1024, &value) < 0)
            return -EINVAL;
        opts->max_branches = (unsigned)value;
        return 0;
    case OPT_MAX_MESSAGE_BYTES:
        if (options_parse_number(text, 1024, 64ULL << 20, &value) < 0)
            return -EINVAL;
        opts->max_message_bytes = (size_t)value;
        return 0;
    case OPT_MAX_RECEIVE_MEMORY_BYTES:
        if (options_parse_number(text, 1ULL << 20, 1ULL << 40, &value) < 0)
            return -EINVAL;
        opts->max_receive_memory_bytes = (size_t)value;
        return 0;
    case OPT_MAX_CALLS:
        if (options_parse_number(text, 1, 4096, &value) < 0)
            return -EINVAL;
        opts->max_calls = (unsigned)value;
        return 0;
    case OPT_MAX_STREAMS:
        if (options_parse_number(text, 1, 4096, &value) < 0)
            return -EINVAL;
        opts->max_streams = (unsigned)value;
        return 0;
    case OPT_REQUEST_TIMEOUT_MS:
        if (options_parse_number(text, 10, 3600000, &value) < 0)
            return -EINVAL;
        opts->request_timeout_ms = (unsigned)value;
        return 0;
    case OPT_SHUTDOWN_GRACE_MS:
        if (options_parse_number(text, 0, 3600000, &value) < 0)
            return -EINVAL;
        opts->shutdown_grace_ms = (unsigned)value;
        return 0;
    case OPT_TIMEOUT_SCALE:
        if (options_parse_number(text, 1, 1000, &value) < 0)
            return -EINVAL;
        opts->timeout_scale = (unsigned)value;
        return 0;
    case OPT_REALTIME_MAX_PERCENT:
        if (options_parse_number(text, 1, 100, &value) < 0)
            return -EINVAL;
        opts->realtime_max_percent = (unsigned)value;
        return 0;
    case OPT_REMOTE_PARALLEL:
        if (options_parse_number(text, 1, 16, &value) < 0)
            return -EINVAL;
        opts->remote_parallel = (unsigned)value;
        return 0;
    case OPT_REMOTE_MULTIPART_BYTES:
        if (options_parse_number(text, 5ULL << 20, 5ULL << 30, &value) < 0)
            return -EINVAL;
        opts->remote_multipart_bytes = value;
        return 0;
    }
    return -EINVAL;
}

static void options_set_defaults(struct forkd_options *opts)
{
    *opts = (struct forkd_options){
        .listen = OPTIONS_DEFAULT_LISTEN,
        .state_dir = OPTIONS_DEFAULT_STATE_DIR,
        .vmm_binary = OPTIONS_DEFAULT_VMM,
        .max_branches = 4,
        .max_message_bytes = 4u << 20,
        .max_calls = 64,
        .max_streams = 32,
        .request_timeout_ms = 10000,
        .shutdown_grace_ms = 10000,
        .timeout_scale = 1,
        .realtime = true,
        .realtime_max_percent = 50,
        .log_level = LOG_LEVEL_INFO,
    };
}

static int options_apply(int option, const char *arg, struct forkd_options *opts)
{
    switch (option) {
    case OPT_LISTEN:
        opts->listen = arg;
        return 0;
    case OPT_INSECURE_TCP:
        opts->insecure_tcp = true;
        return 0;
    case OPT_KEEP_VMS:
        opts->keep_vms = true;
        return 0;
    case OPT_ANONYMOUS_BOOT_MEMORY:
        opts->anonymous_boot_memory = true;
        return 0;
    case OPT_ALLOW_ABSTRACT_SOCKET:
        opts->allow_abstract_socket = true;
        return 0;
    case OPT_NO_REALTIME:
        opts->realtime = false;
        return 0;
    case OPT_TLS_CERT:
        opts->tls_cert = arg;
        return 0;
    case OPT_TLS_KEY:
        opts->tls_key = arg;
        return 0;
    case OPT_TLS_CLIENT_CA:
        opts->tls_client_ca = arg;
        return 0;
    case OPT_TLS_NO_CLIENT_AUTH:
        opts->tls_no_client_auth = true;
        return 0;
    case OPT_STATE_DIR:
        opts->state_dir = arg;
        return 0;
    case OPT_VMM_BINARY:
        opts->vmm_binary = arg;
        return 0;
    case OPT_LOG_LEVEL:
        return log_parse_level(arg, &opts->log_level);
    case OPT_REMOTE_ENDPOINT:
        opts->remote_endpoint = arg;
        return 0;
    case OPT_REMOTE_REGION:
        opts->remote_region = arg;
        return 0;
    case OPT_REMOTE_BUCKET:
        opts->remote_bucket = arg;
        return 0;
    case OPT_REMOTE_CREDENTIALS:
        opts->remote_credentials = arg;
        return 0;
    default:
        return options_apply_number(option, arg, opts);
    }
}

/* The default follows --max-message-bytes; a limit below one message would refuse every large
 * request however quiet the daemon is. */
static enum options_result options_check_receive_memory(struct forkd_options *opts)
{
    if (!opts->max_receive_memory_bytes) {
        size_t four_messages = 4 * opts->max_message_bytes;
        opts->max_receive_memory_bytes =
            four_messages > OPTIONS_MIN_RECEIVE_MEMORY ? four_messages : OPTIONS_MIN_RECEIVE_MEMORY;
    }
    if (opts->max_receive_memory_bytes < opts->max_message_bytes) {
        fprintf(stderr, "forkd: --max-receive-memory-bytes %zu is below --max-message-bytes %zu\n",
                opts->max_receive_memory_bytes, opts->max_message_bytes);
        return OPTIONS_EXIT_USAGE;
    }
    return OPTIONS_RUN;
}

enum options_result options_parse(int argc, char **argv, struct forkd_options *opts)
{
    options_set_defaults(opts);
    optind = 1;
    opterr = 0;
    int option;
    int index = 0;
    while ((option = getopt_long(argc, argv, "h", long_options, &index)) != -1) {
        if (option == 'h') {
            options_print_help(stdout);
            return OPTIONS_EXIT_OK;
        }
        if (option == OPT_VERSION) {
            printf("forkd %s\n", FORKD_VERSION);
            return OPTIONS_EXIT_OK;
        }
        if (option == '?' || option == ':') {
            fprintf(stderr, "forkd: unknown option or missing value: %s\n", argv[optind - 1]);
            fprintf(stderr, "Try 'forkd --help'.\n");
            return OPTIONS_EXIT_USAGE;
        }
        if (options_apply(option, optarg, opts) < 0) {
            fprintf(stderr, "forkd: invalid value '%s' for --%s\n", optarg,
                    long_options[index].name);
            return OPTIONS_EXIT_USAGE;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "forkd: unexpected argument '%s'\nTry 'forkd --help'.\n", argv[optind]);
        return OPTIONS_EXIT_USAGE;
    }
    if (!opts->tls_cert != !opts->tls_key) {
        fprintf(stderr, "forkd: --tls-cert and --tls-key go together\n");
        return OPTIONS_EXIT_USAGE;
    }
    if ((opts->tls_client_ca || opts->tls_no_client_auth) && !opts->tls_cert) {
        fprintf(stderr, "forkd: --tls-client-ca and --tls-no-client-auth need --tls-cert\n");
        return OPTIONS_EXIT_USAGE;
    }
    if (opts->tls_client_ca && opts->tls_no_client_auth) {
        fprintf(stderr, "forkd: --tls-client-ca and --tls-no-client-auth contradict each other\n");
        return OPTIONS_EXIT_USAGE;
    }
    if (!opts->remote_endpoint != !opts->remote_bucket) {
        fprintf(stderr, "forkd: --remote-endpoint and --remote-bucket go together\n");
        return OPTIONS_EXIT_USAGE;
    }
    if ((opts->remote_region || opts->remote_credentials || opts->remote_parallel ||
         opts->remote_multipart_bytes) &&
        !opts->remote_endpoint) {
        fprintf(stderr, "forkd: the --remote-* flags need --remote-endpoint and "
                        "--remote-bucket\n");
        return OPTIONS_EXIT_USAGE;
    }
    return options_check_receive_memory(opts);
}
