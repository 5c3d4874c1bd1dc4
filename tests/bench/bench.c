/*
 * forkd-bench: the benchmark of tests/bench/README.md. Drives the engine directly (no daemon)
 * against the real test VMM: per guest size, LIVE / ARM_IN_PAUSE / FULL branches of a guest
 * writing flat out, with the copy, fault-handler and write-rate baselines measured in between;
 * then fan-out of FILE, MEMFD and UFFD forks. Prints a table and writes JSON.
 */
#include "bench.h"

#include "basic/cleanup.h"
#include "forkd/branch.h"
#include "huge_pages.h"

#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

static void usage(FILE *out)
{
    fprintf(out,
            "usage: forkd-bench [--quick] [--sizes MIB,...] [--reps N] [--reps-large N]\n"
            "                   [--fanout N,...] [--json PATH] [--state-dir DIR] [--seed-dir DIR]\n"
            "                   [--null-ms MS] [--rate-ms MS] [--settle-ms MS] [--copier-fifo]\n"
            "                   [--boost-vcpus] [--null-sweep] [--spawn-paused] [--no-branch]\n"
            "                   [--no-fanout] [--no-realtime] [--timeout-scale N]\n"
            "                   [--workloads random,hotset,sequential] [--levers VARIANT,...]\n"
            "                   [--report-us US] [--tail-ms MS] [--vcpus N] [--seed N]\n"
            "                   [--huge-pages]\n"
            "Defaults: sizes 256,1024,4096; every workload; 5 repetitions (3 at 1 GiB and up);\n"
            "fan-out 1,8,32; the guest reports its progress every 1000 us; a branch's cost is\n"
            "counted until 500 ms after it ends.\n"
            "--quick: 256 MiB, 2 repetitions, fan-out 1,8. JSON to build/bench.json.\n"
            "--reps N: N repetitions at every size (1 to 16); --reps-large N then sets those of\n"
            "1 GiB and up, wherever it appears.\n"
            "--rate-ms MS: each undisturbed window, one before and one after every branch.\n"
            "--seed N (0 to 4294967295): the rows of each repetition run in an order shuffled\n"
            "from N; default from the clock, printed with the results so a run can be repeated.\n"
            "--levers: the LIVE branches of each repetition, the first giving the LIVE figures:\n"
            "all (every copy-phase lever), none (the engine without them), or all but one:\n"
            "no-staging, no-hot, no-around, no-release, no-direct, no-mirror. Default all,none.\n"
            "--huge-pages: the source VMs' memory in 2 MiB hugetlbfs pages (the bench raises\n"
            "vm.nr_hugepages for the largest size and puts it back); no fan-out then.\n"
            "--vcpus: of the source VMs (default 2; 1 leaves a core to forkd on a 2-core host).\n"
            "Diagnoses: --copier-fifo runs the bulk copier at SCHED_FIFO like the fault handler;\n"
            "--boost-vcpus runs the VMM's vCPU threads at SCHED_FIFO from just before a LIVE\n"
            "pause request until it is acknowledged; --spawn-paused restores every fork paused\n"
            "and resumes them all at the end; --no-realtime runs every engine thread at normal\n"
            "priority (forkd --no-realtime), to measure what real-time priority buys.\n"
            "--timeout-scale N multiplies the engine's VMM time limits (slow or emulated hosts;\n"
            "default: $FORKD_TIME_SCALE, else 1).\n"
            "Needs root, /dev/kvm and userfaultfd.\n");
}

static int parse_list(const char *text, unsigned *out, size_t max, size_t *count)
{
    *count = 0;
    _cleanup_free_ char *copy = strdup(text);
    char *save = NULL;
    for (char *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        char *end;
        unsigned long value = strtoul(item, &end, 10);
        if (*end || value == 0 || *count == max)
            return -EINVAL;
        out[(*count)++] = (unsigned)value;
    }
    return *count ? 0 : -EINVAL;
}

struct lever_name {
    const char *option, *label;
    unsigned levers_off;
};

static const struct lever_name lever_names[] = {
    {"all", "LIVE", 0},
    {"none", "LIVE, levers off", BRANCH_LEVER_ALL},
    {"no-staging", "LIVE, no staging", BRANCH_LEVER_STAGING},
    {"no-hot", "LIVE, no hot-first", BRANCH_LEVER_HOT_FIRST},
    {"no-around", "LIVE, no fault-around", BRANCH_LEVER_FAULT_AROUND},
    {"no-release", "LIVE, no release-first", BRANCH_LEVER_RELEASE_FIRST},
    {"no-direct", "LIVE, no direct capture", BRANCH_LEVER_DIRECT},
    {"no-mirror", "LIVE, no mirror", BRANCH_LEVER_MIRROR},
};

static int parse_variants(const char *text, struct bench_options *o)
{
    o->variant_count = 0;
    _cleanup_free_ char *copy = strdup(text);
    char *save = NULL;
    for (char *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        size_t i = 0;
        while (i < sizeof(lever_names) / sizeof(lever_names[0]) &&
               strcmp(item, lever_names[i].option) != 0)
            i++;
        if (i == sizeof(lever_names) / sizeof(lever_names[0]) ||
            o->variant_count == BENCH_MAX_VARIANTS)
            return -EINVAL;
        struct live_variant *v = &o->variants[o->variant_count++];
        snprintf(v->name, sizeof(v->name), "%s", lever_names[i].label);
        v->levers_off = lever_names[i].levers_off;
    }
    return o->variant_count ? 0 : -EINVAL;
}

static int parse_workloads(const char *text, struct bench_options *o)
{
    o->workload_count = 0;
    _cleanup_free_ char *copy = strdup(text);
    char *save = NULL;
    for (char *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        unsigned w = 0;
        while (w < WORKLOAD_COUNT && strcmp(item, bench_workload_names[w]) != 0)
            w++;
        if (w == WORKLOAD_COUNT || o->workload_count == WORKLOAD_COUNT)
            return -EINVAL;
        o->workloads[o->workload_count++] = w;
    }
    return o->workload_count ? 0 : -EINVAL;
}

static void set_defaults(struct bench_options *o, bool quick)
{
    static const unsigned sizes[] = {256, 1024, 4096}, fanout[] = {1, 8, 32};
    o->quick = quick;
    o->size_count = quick ? 1 : 3;
    memcpy(o->sizes_mib, sizes, sizeof(sizes));
    o->reps = quick ? 2 : 5;
    o->reps_large = quick ? 2 : 3;
    o->fanout_count = quick ? 2 : 3;
    memcpy(o->fanout, fanout, sizeof(fanout));
    o->null_ms = quick ? 500 : 1000;
    o->rate_ms = quick ? 500 : 1000;
    o->settle_ms = quick ? 500 : 1000;
    const char *scale = getenv("FORKD_TIME_SCALE");
    o->timeout_scale = scale && atoi(scale) > 0 ? (unsigned)atoi(scale) : 1;
    o->json_path = "build/bench.json";
    o->seed_dir = "/dev/shm";
    o->report_us = 1000;
    o->vcpus = BENCH_VCPUS;
    o->tail_ms = 500;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    o->seed = (uint32_t)((uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec);
    parse_workloads("random,hotset,sequential", o);
    parse_variants("all,none", o);
}

enum {
    OPT_SIZES = 256,
    OPT_REPS,
    OPT_REPS_LARGE,
    OPT_FANOUT,
    OPT_JSON,
    OPT_STATE,
    OPT_SEED,
    OPT_NULL,
    OPT_RATE,
    OPT_SETTLE,
    OPT_FIFO,
    OPT_NO_BRANCH,
    OPT_NO_FANOUT,
    OPT_NO_REALTIME,
    OPT_TIMEOUT_SCALE,
    OPT_QUICK,
    OPT_SPAWN_PAUSED,
    OPT_BOOST,
    OPT_NULL_SWEEP,
    OPT_WORKLOADS,
    OPT_LEVERS,
    OPT_REPORT_US,
    OPT_TAIL_MS,
    OPT_VCPUS,
    OPT_SEED_ORDER,
    OPT_HUGE_PAGES,
    OPT_HELP
};

static const struct option long_options[] = {
    {"quick", no_argument, NULL, OPT_QUICK},
    {"sizes", required_argument, NULL, OPT_SIZES},
    {"reps", required_argument, NULL, OPT_REPS},
    {"reps-large", required_argument, NULL, OPT_REPS_LARGE},
    {"fanout", required_argument, NULL, OPT_FANOUT},
    {"json", required_argument, NULL, OPT_JSON},
    {"state-dir", required_argument, NULL, OPT_STATE},
    {"seed-dir", required_argument, NULL, OPT_SEED},
    {"null-ms", required_argument, NULL, OPT_NULL},
    {"rate-ms", required_argument, NULL, OPT_RATE},
    {"settle-ms", required_argument, NULL, OPT_SETTLE},
    {"copier-fifo", no_argument, NULL, OPT_FIFO},
    {"spawn-paused", no_argument, NULL, OPT_SPAWN_PAUSED},
    {"boost-vcpus", no_argument, NULL, OPT_BOOST},
    {"null-sweep", no_argument, NULL, OPT_NULL_SWEEP},
    {"no-branch", no_argument, NULL, OPT_NO_BRANCH},
    {"no-fanout", no_argument, NULL, OPT_NO_FANOUT},
    {"no-realtime", no_argument, NULL, OPT_NO_REALTIME},
    {"timeout-scale", required_argument, NULL, OPT_TIMEOUT_SCALE},
    {"workloads", required_argument, NULL, OPT_WORKLOADS},
    {"levers", required_argument, NULL, OPT_LEVERS},
    {"report-us", required_argument, NULL, OPT_REPORT_US},
    {"tail-ms", required_argument, NULL, OPT_TAIL_MS},
    {"vcpus", required_argument, NULL, OPT_VCPUS},
    {"seed", required_argument, NULL, OPT_SEED_ORDER},
    {"huge-pages", no_argument, NULL, OPT_HUGE_PAGES},
    {"help", no_argument, NULL, OPT_HELP},
    {NULL, 0, NULL, 0},
};

static int parse_number(const char *text, unsigned *out)
{
    char *end;
    unsigned long value = strtoul(text, &end, 10);
    if (*end || value == 0 || value > BENCH_MAX_REPS * 100000UL)
        return -EINVAL;
    *out = (unsigned)value;
    return 0;
}

static int parse_seed(const char *text, uint32_t *out)
{
    char *end;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 10);
    if (!*text || *end || *text == '-' || errno || value > UINT32_MAX)
        return -EINVAL;
    *out = (uint32_t)value;
    return 0;
}

static int apply_option(struct bench_options *o, int option, const char *arg)
{
    switch (option) {
    case OPT_SIZES:
        return parse_list(arg, o->sizes_mib, BENCH_MAX_SIZES, &o->size_count);
    case OPT_FANOUT:
        return parse_list(arg, o->fanout, BENCH_MAX_FANOUT, &o->fanout_count);
    case OPT_REPS:
        if (parse_number(arg, &o->reps) < 0 || o->reps > BENCH_MAX_REPS)
            return -EINVAL;
        if (!o->reps_large_set)
            o->reps_large = o->reps;
        return 0;
    case OPT_REPS_LARGE:
        o->reps_large_set = true;
        return parse_number(arg, &o->reps_large) < 0 || o->reps_large > BENCH_MAX_REPS ? -EINVAL
                                                                                       : 0;
    case OPT_SEED_ORDER:
        return parse_seed(arg, &o->seed);
    case OPT_NULL:
        return parse_number(arg, &o->null_ms);
    case OPT_RATE:
        return parse_number(arg, &o->rate_ms);
    case OPT_SETTLE:
        return parse_number(arg, &o->settle_ms);
    case OPT_WORKLOADS:
        return parse_workloads(arg, o);
    case OPT_LEVERS:
        return parse_variants(arg, o);
    case OPT_REPORT_US:
        return parse_number(arg, &o->report_us) < 0 || o->report_us < 100 ? -EINVAL : 0;
    case OPT_TAIL_MS:
        return parse_number(arg, &o->tail_ms);
    case OPT_VCPUS:
        return parse_number(arg, &o->vcpus) < 0 || o->vcpus > BENCH_MAX_VCPUS ? -EINVAL : 0;
    case OPT_JSON:
        o->json_path = arg;
        return 0;
    case OPT_STATE:
        o->state_dir = arg;
        return 0;
    case OPT_SEED:
        o->seed_dir = arg;
        return 0;
    case OPT_FIFO:
        o->copier_fifo = true;
        return 0;
    case OPT_NULL_SWEEP:
        o->null_sweep = true;
        return 0;
    case OPT_BOOST:
        o->boost_vcpus = true;
        return 0;
    case OPT_SPAWN_PAUSED:
        o->spawn_paused = true;
        return 0;
    case OPT_NO_BRANCH:
        o->skip_branch = true;
        return 0;
    case OPT_NO_FANOUT:
        o->skip_fanout = true;
        return 0;
    case OPT_NO_REALTIME:
        o->no_realtime = true;
        return 0;
    case OPT_HUGE_PAGES:
        o->huge_pages = o->skip_fanout = true; /* forks would need huge pages of their own */
        return 0;
    case OPT_TIMEOUT_SCALE: {
        char *end;
        unsigned long value = strtoul(arg, &end, 10);
        if (*end || value == 0 || value > 1000)
            return -EINVAL;
        o->timeout_scale = (unsigned)value;
        return 0;
    }
    default:
        return -EINVAL;
    }
}

/* --quick sets defaults that the other options then refine, wherever it appears. */
static int parse_options(int argc, char **argv, struct bench_options *o)
{
    bool quick = false;
    for (int i = 1; i < argc; i++)
        quick |= strcmp(argv[i], "--quick") == 0;
    set_defaults(o, quick);
    int option, index = 0;
    while ((option = getopt_long(argc, argv, "", long_options, &index)) != -1) {
        if (option == OPT_HELP) {
            usage(stdout);
            exit(0);
        }
        if (option == '?') {
            usage(stderr);
            return -EINVAL;
        }
        if (option != OPT_QUICK && apply_option(o, option, optarg) < 0) {
            fprintf(stderr, "forkd-bench: --%s %s: not a valid value (see below)\n",
                    long_options[index].name, optarg);
            usage(stderr);
            return -EINVAL;
        }
    }
    if (optind != argc) {
        usage(stderr);
        return -EINVAL;
    }
    return 0;
}

/* ---- set-up ----------------------------------------------------------------------------- */

static int open_context(struct bench_context *context, struct forkd_error *err)
{
    const struct bench_options *o = context->options;
    if (o->state_dir) {
        snprintf(context->state_dir, sizeof(context->state_dir), "%s", o->state_dir);
        if (mkdir(o->state_dir, 0700) < 0 && errno != EEXIST)
            return forkd_error_errno(err, -errno, "mkdir %s", o->state_dir);
    } else {
        snprintf(context->state_dir, sizeof(context->state_dir), "/var/tmp/forkd-bench-XXXXXX");
        if (!mkdtemp(context->state_dir))
            return forkd_error_errno(err, -errno, "mkdtemp");
    }
    struct engine_config config = {.state_dir = context->state_dir,
                                   .vmm_binary = FORKD_TESTVM_PATH,
                                   .timeout_scale = o->timeout_scale,
                                   .no_realtime = o->no_realtime};
    int rc = engine_open(&config, &context->engine, err);
    if (rc < 0)
        return rc;
    context->registry = engine_registry(context->engine);
    context->store = engine_store(context->engine);
    context->page_server = engine_page_server(context->engine);
    return 0;
}

/* ---- huge pages ------------------------------------------------------------------------- */

static long huge_pages_setting = -1; /* vm.nr_hugepages before the bench raised it */

/* Makes free 2 MiB pages for the largest source VM (one at a time; the seed VMM is gone before
 * the source is restored), plus a few for the VMM's own rounding; the old setting is put back
 * by huge_pages_restore. */
static int bench_reserve_huge_pages(const struct bench_options *o, struct forkd_error *err)
{
    unsigned largest = 0;
    for (size_t i = 0; i < o->size_count; i++)
        largest = o->sizes_mib[i] > largest ? o->sizes_mib[i] : largest;
    long need = largest / 2 + 4;
    int rc = huge_pages_reserve(need, &huge_pages_setting);
    if (rc < 0)
        return forkd_error_errno(err, rc, "make %ld 2 MiB huge pages free (%s, %s)", need,
                                 HUGE_PAGES_NR, HUGE_PAGES_FREE);
    return 0;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    remove(path);
    return 0;
}

static void close_context(struct bench_context *context)
{
    engine_close(context->engine, false, 2000);
    if (!context->options->state_dir && context->state_dir[0])
        nftw(context->state_dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* ---- interruption ----------------------------------------------------------------------- */

/* On SIGINT/SIGTERM: the VMMs are our children and outlive us unless killed, and the state
 * directory holds gigabytes. A thread waits for the signal, kills the children, removes what
 * we created, and exits; the main thread may be anywhere in a measurement. */
static struct bench_context *interrupt_context;

static void kill_children(void)
{
    _cleanup_closedir_ DIR *tasks = opendir("/proc/self/task");
    struct dirent *task;
    while (tasks && (task = readdir(tasks))) {
        char path[300];
        snprintf(path, sizeof(path), "/proc/self/task/%s/children", task->d_name);
        _cleanup_fclose_ FILE *f = task->d_name[0] != '.' ? fopen(path, "re") : NULL;
        int pid;
        while (f && fscanf(f, "%d", &pid) == 1)
            kill(pid, SIGKILL);
    }
}

static void *interrupt_loop(void *arg)
{
    sigset_t *signals = arg;
    int signal_number = 0;
    sigwait(signals, &signal_number);
    fprintf(stderr, "forkd-bench: interrupted, stopping the VMs\n");
    kill_children();
    struct bench_context *context = interrupt_context;
    if (!context->options->state_dir && context->state_dir[0])
        nftw(context->state_dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    if (context->seed_path[0])
        nftw(context->seed_path, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    huge_pages_restore(huge_pages_setting);
    _exit(128 + signal_number);
}

static void watch_interrupts(struct bench_context *context)
{
    static sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGINT);
    sigaddset(&signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &signals, NULL); /* every thread created later inherits it */
    interrupt_context = context;
    pthread_t thread;
    if (pthread_create(&thread, NULL, interrupt_loop, &signals) == 0)
        pthread_detach(thread);
}

/* ---- the run ---------------------------------------------------------------------------- */

static cJSON *machine_json(void)
{
    cJSON *o = cJSON_CreateObject();
    struct utsname name;
    if (uname(&name) == 0)
        cJSON_AddStringToObject(o, "kernel", name.release);
    cJSON_AddNumberToObject(o, "cpus", (double)sysconf(_SC_NPROCESSORS_ONLN));
    cJSON_AddNumberToObject(o, "memory_mib",
                            (double)sysconf(_SC_PHYS_PAGES) * sysconf(_SC_PAGESIZE) / (1 << 20));
    time_t now = time(NULL);
    char stamp[32];
    strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    cJSON_AddStringToObject(o, "started_at", stamp);
    return o;
}

/* Every size, each with every workload; the pause's flatness across sizes is read from the
 * first workload's results. */
static int run_sizes(struct bench_context *context, struct forkd_error *err)
{
    const struct bench_options *o = context->options;
    static struct size_result results[BENCH_MAX_SIZES][WORKLOAD_COUNT]; /* large */
    struct size_result first[BENCH_MAX_SIZES];
    cJSON *sizes = cJSON_AddArrayToObject(context->json, "sizes");
    size_t done = 0;
    for (size_t i = 0; i < o->size_count; i++, done++) {
        for (size_t w = 0; w < o->workload_count; w++) {
            struct size_result *result = &results[i][w];
            int rc = bench_size(context, o->sizes_mib[i], o->workloads[w], result, err);
            if (rc < 0)
                return rc;
            report_size(result);
            cJSON_AddItemToArray(sizes, size_json(result));
        }
        first[i] = results[i][0];
    }
    report_cross_size(first, done, context->json);
    return 0;
}

static void run_fanout(struct bench_context *context)
{
    const struct bench_options *o = context->options;
    static const enum vm_memory backends[] = {VM_MEMORY_FILE, VM_MEMORY_MEMFD, VM_MEMORY_UFFD};
    struct fanout_result results[BENCH_MAX_FANOUT * 3];
    size_t count = 0;
    cJSON *fanout = cJSON_AddArrayToObject(context->json, "fanout");
    for (size_t i = 0; i < o->fanout_count; i++) {
        for (size_t b = 0; b < 3; b++) {
            struct fanout_result *r = &results[count++];
            fprintf(stderr, "forkd-bench: fan-out of %u forks, backend %zu of 3\n", o->fanout[i],
                    b + 1);
            struct forkd_error err = {0};
            if (backends[b] == VM_MEMORY_UFFD && !context->page_server) {
                *r = (struct fanout_result){.backend = "UFFD", .forks = o->fanout[i], .error = 1};
                snprintf(r->message, sizeof(r->message), "pending: no page server");
            } else if (bench_fanout(context, context->fanout_snapshot, o->fanout[i], backends[b], r,
                                    &err) < 0) {
                fprintf(stderr, "forkd-bench: fan-out: %s\n", err.message);
            }
            cJSON_AddItemToArray(fanout, fanout_json(r));
        }
    }
    report_fanout(results, count);
}

static int write_json(const char *path, cJSON *json)
{
    _cleanup_free_ char *text = cJSON_Print(json);
    _cleanup_fclose_ FILE *f = text ? fopen(path, "we") : NULL;
    if (!f || fputs(text, f) < 0 || fputc('\n', f) < 0)
        return -errno;
    return 0;
}

static int run(struct bench_context *context, struct forkd_error *err)
{
    const struct bench_options *o = context->options;
    if (!o->skip_branch) {
        int rc = run_sizes(context, err);
        if (rc < 0)
            return rc;
    }
    if (!o->skip_fanout) {
        if (!context->fanout_snapshot[0]) {
            int rc = bench_fanout_source(context, 256, err);
            if (rc < 0)
                return rc;
        }
        run_fanout(context);
    }
    return 0;
}

int main(int argc, char **argv)
{
    struct bench_options options;
    if (parse_options(argc, argv, &options) < 0)
        return 2;
    uint64_t start = bench_now_ns();
    struct bench_context context = {.options = &options, .json = cJSON_CreateObject()};
    watch_interrupts(&context);
    cJSON_AddItemToObject(context.json, "machine", machine_json());
    cJSON_AddNumberToObject(context.json, "seed", options.seed);
    printf("forkd-bench: seed %u (--seed %u runs the rows in the same orders)\n", options.seed,
           options.seed);
    fflush(stdout);
    struct forkd_error err = {0};
    cJSON_AddBoolToObject(context.json, "huge_pages", options.huge_pages);
    int rc = options.huge_pages ? bench_reserve_huge_pages(&options, &err) : 0;
    if (rc == 0)
        rc = open_context(&context, &err);
    if (rc == 0)
        rc = run(&context, &err);
    close_context(&context);
    huge_pages_restore(huge_pages_setting);
    double wall = (double)(bench_now_ns() - start) / 1e9;
    cJSON_AddNumberToObject(context.json, "wall_s", wall);
    cJSON_AddBoolToObject(context.json, "complete", rc == 0);
    if (rc < 0)
        cJSON_AddStringToObject(context.json, "error", err.message);
    if (write_json(options.json_path, context.json) < 0)
        fprintf(stderr, "forkd-bench: cannot write %s: %s\n", options.json_path, strerror(errno));
    cJSON_Delete(context.json);
    printf("\nwall time %.0f s; JSON in %s\n", wall, options.json_path);
    if (rc < 0) {
        fprintf(stderr, "forkd-bench: %s\n", err.message);
        return 1;
    }
    return 0;
}
