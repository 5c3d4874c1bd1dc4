/*
 * forkd-testvm entry point: command line parsing for the VMM (`--api-sock PATH ...`) and the
 * verifier (`verify DIR` or `verify --vmstate PATH --mem PATH`).
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "server.h"
#include "verify.h"

#define DEFAULT_MMIO_GAP_MIB     3072u
#define DEFAULT_PAUSE_TIMEOUT_MS 2000u

static void usage(FILE *out)
{
    fprintf(out, "usage: forkd-testvm --api-sock PATH [--id ID] [--mmio-gap-mib N] "
                 "[--pause-timeout-ms N] [--pause-delay-ms N]\n"
                 "                    [--boot-memory sparse|fill] "
                 "[--balloon-discard precise|firecracker]\n"
                 "       forkd-testvm verify SNAPSHOT_DIR [--disk PATH]\n"
                 "       forkd-testvm verify --vmstate PATH --mem PATH [--disk PATH]\n"
                 "       forkd-testvm --version\n");
}

static int parse_unsigned(const char *flag, const char *text, unsigned *out)
{
    char *end;
    errno = 0;
    unsigned long value = strtoul(text, &end, 10);
    if (errno || *end || end == text || value > 0xffffffffu || text[0] == '-') {
        fprintf(stderr, "forkd-testvm: %s needs a number, not '%s'\n", flag, text);
        return -EINVAL;
    }
    *out = (unsigned)value;
    return 0;
}

static int run_verify(int argc, char **argv)
{
    char vmstate_path[4096], memory_path[4096], err[512];
    struct verify_result result;
    const char *disk_path = NULL;

    /* --disk PATH last: the snapshot's copy of the guest's disk */
    if (argc >= 5 && strcmp(argv[argc - 2], "--disk") == 0) {
        disk_path = argv[argc - 1];
        argc -= 2;
    }
    if (argc == 3) {
        snprintf(vmstate_path, sizeof(vmstate_path), "%s/vmstate", argv[2]);
        snprintf(memory_path, sizeof(memory_path), "%s/memory.bin", argv[2]);
    } else if (argc == 6 && strcmp(argv[2], "--vmstate") == 0 && strcmp(argv[4], "--mem") == 0) {
        snprintf(vmstate_path, sizeof(vmstate_path), "%s", argv[3]);
        snprintf(memory_path, sizeof(memory_path), "%s", argv[5]);
    } else {
        usage(stderr);
        return 2;
    }
    int r =
        verify_snapshot_with_disk(vmstate_path, memory_path, disk_path, &result, err, sizeof(err));
    if (r < 0) {
        fprintf(stderr, "inconsistent: %s\n", err);
        return r == -EBADMSG ? 1 : 3;
    }
    for (unsigned v = 0; v < result.vcpu_count; v++)
        printf("vcpu %u total %" PRIu64 "\n", v, result.totals[v]);
    printf("consistent: %u vCPUs, %" PRIu64 " working-set pages, %" PRIu64
           " other pages hold the boot pattern\n",
           result.vcpu_count, result.working_set_pages, result.other_pages);
    if (result.disk_checked)
        printf("disk agrees with memory and vCPU state\n");
    if (result.balloon_in_use + result.balloon_free)
        printf("balloon: %" PRIu64 " pages in use hold their signature, %" PRIu64 " free\n",
               result.balloon_in_use, result.balloon_free);
    return 0;
}

struct options {
    const char *socket_path;
    const char *id;
    unsigned mmio_gap_mib;
    unsigned pause_timeout_ms;
    unsigned pause_delay_ms;
    bool fill_boot_memory;
    bool balloon_discard_firecracker;
};

static int parse_boot_memory(const char *value, bool *fill)
{
    if (strcmp(value, "sparse") != 0 && strcmp(value, "fill") != 0) {
        fprintf(stderr, "forkd-testvm: --boot-memory is sparse or fill, not '%s'\n", value);
        return -EINVAL;
    }
    *fill = strcmp(value, "fill") == 0;
    return 0;
}

/* precise: the balloon's discards take the page away wherever it lives (MADV_REMOVE on shared
 * memory) and the write-protect uffd reports them (EVENT_REMOVE). firecracker: as Firecracker
 * 1.12 to 1.16 discard: MADV_DONTNEED on any mapping (shared memory keeps the page in its file),
 * and no EVENT_REMOVE on the write-protect uffd (forkd's Firecracker patch does not ask for it). */
static int parse_balloon_discard(const char *value, bool *firecracker)
{
    if (strcmp(value, "precise") != 0 && strcmp(value, "firecracker") != 0) {
        fprintf(stderr, "forkd-testvm: --balloon-discard is precise or firecracker, not '%s'\n",
                value);
        return -EINVAL;
    }
    *firecracker = strcmp(value, "firecracker") == 0;
    return 0;
}

static int parse_options(int argc, char **argv, struct options *options)
{
    *options = (struct options){.id = "anonymous-instance",
                                .mmio_gap_mib = DEFAULT_MMIO_GAP_MIB,
                                .pause_timeout_ms = DEFAULT_PAUSE_TIMEOUT_MS};
    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i];
        if (i + 1 >= argc) {
            fprintf(stderr, "forkd-testvm: unknown or incomplete option '%s'\n", flag);
            return -EINVAL;
        }
        const char *value = argv[++i];
        int r = 0;
        if (strcmp(flag, "--api-sock") == 0)
            options->socket_path = value;
        else if (strcmp(flag, "--id") == 0)
            options->id = value;
        else if (strcmp(flag, "--mmio-gap-mib") == 0)
            r = parse_unsigned(flag, value, &options->mmio_gap_mib);
        else if (strcmp(flag, "--pause-timeout-ms") == 0)
            r = parse_unsigned(flag, value, &options->pause_timeout_ms);
        else if (strcmp(flag, "--pause-delay-ms") == 0)
            r = parse_unsigned(flag, value, &options->pause_delay_ms);
        else if (strcmp(flag, "--boot-memory") == 0)
            r = parse_boot_memory(value, &options->fill_boot_memory);
        else if (strcmp(flag, "--balloon-discard") == 0)
            r = parse_balloon_discard(value, &options->balloon_discard_firecracker);
        else {
            fprintf(stderr, "forkd-testvm: unknown option '%s'\n", flag);
            r = -EINVAL;
        }
        if (r < 0)
            return r;
    }
    if (!options->socket_path) {
        fprintf(stderr, "forkd-testvm: --api-sock is required\n");
        return -EINVAL;
    }
    if (options->mmio_gap_mib < 2 || options->mmio_gap_mib % 2) {
        fprintf(stderr, "forkd-testvm: --mmio-gap-mib must be an even number, at least 2\n");
        return -EINVAL;
    }
    return 0;
}

/*
 * The API thread answers pause and resume. On a host whose cores the guest's vCPUs keep busy
 * (two flat-out vCPUs on a two-core machine), an ordinary thread woken by a request may wait a
 * whole scheduler tick for a core, which would dominate the pause window forkd measures. Run it
 * SCHED_FIFO when permitted (it only blocks or does bounded work); vCPU threads stay ordinary.
 */
static void raise_api_thread_priority(void)
{
    struct sched_param fifo = {.sched_priority = 1};
    int r = pthread_setschedparam(pthread_self(), SCHED_FIFO, &fifo);
    if (r != 0)
        fprintf(stderr, "forkd-testvm: API thread stays at normal priority: %s\n", strerror(r));
}

int main(int argc, char **argv)
{
    static struct vmm vmm; /* large (paths, vCPU table): keep it off the stack */
    struct options options;
    char err[512];

    if (argc >= 2 && strcmp(argv[1], "verify") == 0)
        return run_verify(argc, argv);
    if (argc == 2 && strcmp(argv[1], "--version") == 0) {
        printf("forkd-testvm %s\n", FORKD_VERSION);
        return 0;
    }
    if (argc == 2 && strcmp(argv[1], "--help") == 0) {
        usage(stdout);
        return 0;
    }
    if (parse_options(argc, argv, &options) < 0) {
        usage(stderr);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    raise_api_thread_priority();
    vmm_init(&vmm, options.id, options.mmio_gap_mib, options.pause_timeout_ms);
    vmm.pause_delay_ms = options.pause_delay_ms;
    vmm.fill_boot_memory = options.fill_boot_memory;
    vmm.balloon_discard_firecracker = options.balloon_discard_firecracker;
    int r = server_run(&vmm, options.socket_path, err, sizeof(err));
    fprintf(stderr, "forkd-testvm: %s\n", err);
    return r < 0 ? 1 : 0;
}
