/*
 * forkd's entry point and lifecycle: flags, the state-directory lock, the host probe, the
 * server, and the staged shutdown on SIGTERM/SIGINT/SIGHUP/SIGQUIT. Signals are blocked in every
 * thread and taken synchronously here with sigwaitinfo, so no handler runs on an arbitrary thread.
 */
#include "branches.h"
#include "daemon.h"
#include "log.h"
#include "options.h"
#include "routes.h"
#include "server.h"

#include "basic/cleanup.h"
#include "basic/clock.h"
#include "basic/fsutil.h"

#include <errno.h>
#include <fcntl.h>
#include <grpc/grpc.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>
#include <time.h>

/* Refuses a directory that someone other than forkd's user could change: whoever can write
 * there can plant snapshots or VM sockets for a root daemon to act on. A parent with the sticky
 * bit (/tmp) is accepted: others cannot rename or remove what is ours in it. */
static int main_check_dir_private(const char *path, bool parent)
{
    struct stat st;
    if (stat(path, &st) < 0) {
        log_error("cannot check %s: %s", path, strerror(errno));
        return -errno;
    }
    bool shared = (st.st_mode & (S_IWGRP | S_IWOTH)) && !(parent && (st.st_mode & S_ISVTX));
    if (shared || (!parent && st.st_uid != geteuid()) ||
        (parent && st.st_uid != geteuid() && st.st_uid != 0)) {
        log_error("%s directory %s is writable by others or owned by another user (mode %04o, "
                  "owner %u): refusing to use it",
                  parent ? "the state directory's parent" : "state", path,
                  (unsigned)(st.st_mode & 07777), (unsigned)st.st_uid);
        return -EPERM;
    }
    return 0;
}

static int main_check_state_dir(const char *state_dir)
{
    char parent[4096];
    snprintf(parent, sizeof(parent), "%s", state_dir);
    char *slash = strrchr(parent, '/');
    if (slash == parent)
        slash[1] = '\0';
    else if (slash)
        *slash = '\0';
    else
        snprintf(parent, sizeof(parent), ".");
    int rc = main_check_dir_private(state_dir, false);
    return rc < 0 ? rc : main_check_dir_private(parent, true);
}

/* Creates the state directory and takes its lock, held for the daemon's life: two daemons on
 * one state directory would corrupt each other's snapshots. Returns the lock fd or -errno. */
static int main_lock_state_dir(const char *state_dir)
{
    int rc = fs_mkdir_parents(state_dir, 0700);
    if (rc < 0) {
        log_error("cannot create state directory %s: %s", state_dir, strerror(-rc));
        return rc;
    }
    rc = main_check_state_dir(state_dir);
    if (rc < 0)
        return rc;
    char path[4096];
    snprintf(path, sizeof(path), "%s/forkd.lock", state_dir);
    _cleanup_close_ int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        log_error("cannot open %s: %s", path, strerror(errno));
        return -errno;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
        char holder[32] = "";
        ssize_t n = pread(fd, holder, sizeof(holder) - 1, 0);
        holder[n > 0 ? n : 0] = '\0';
        log_error("state directory %s is in use by another forkd (pid %s); refusing to start",
                  state_dir, holder[0] ? strtok(holder, "\n") : "unknown");
        return -EBUSY;
    }
    char pid[32];
    int length = snprintf(pid, sizeof(pid), "%d\n", (int)getpid());
    rc = ftruncate(fd, 0) < 0 ? -errno : fs_pwrite_all(fd, pid, (size_t)length, 0);
    if (rc < 0)
        log_warn("cannot record the pid in %s: %s", path, strerror(-rc));
    return take_fd(fd);
}

static void main_log_capabilities(const struct probe_host_caps *caps)
{
    log_info("host: kernel %s, kvm %s%s%s, userfaultfd %s (features 0x%llx, wp anon %s, "
             "wp shmem %s)",
             caps->kernel_release, caps->kvm_usable ? "usable" : "unusable",
             caps->kvm_usable ? "" : ": ", caps->kvm_error,
             caps->uffd_usable ? "usable" : "unusable", (unsigned long long)caps->uffd_features,
             caps->uffd_wp_anonymous ? "yes" : "no", caps->uffd_wp_shmem ? "yes" : "no");
    if (!probe_live_branch_supported(caps))
        log_warn("LIVE branches are not available on this host: %s%s",
                 caps->kvm_usable ? "" : caps->kvm_error, caps->uffd_error);
    else if (!probe_live_branch_anonymous_supported(caps))
        log_info("LIVE branches of anonymous guest memory are refused on this kernel (no "
                 "UFFD_FEATURE_WP_UNPOPULATED); VMs booted on a memfd (the default) branch live");
}

/* Signals that stop the daemon the staged way (SIGTERM's way). SIGHUP and SIGQUIT would kill it
 * by their default action, leaving the socket behind and the VMs orphaned. */
static const int main_stop_signals[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT};
/* Signals whose default action would also kill the daemon: logged and otherwise ignored. */
static const int main_ignored_signals[] = {SIGUSR1, SIGUSR2, SIGALRM, SIGVTALRM,
                                           SIGPROF, SIGIO,   SIGXCPU, SIGPWR};

static bool main_is_stop_signal(int signal_number)
{
    for (size_t i = 0; i < sizeof(main_stop_signals) / sizeof(main_stop_signals[0]); i++)
        if (main_stop_signals[i] == signal_number)
            return true;
    return false;
}

/* Fills set with every signal main() takes synchronously. */
static void main_signal_set(sigset_t *set)
{
    sigemptyset(set);
    for (size_t i = 0; i < sizeof(main_stop_signals) / sizeof(main_stop_signals[0]); i++)
        sigaddset(set, main_stop_signals[i]);
    for (size_t i = 0; i < sizeof(main_ignored_signals) / sizeof(main_ignored_signals[0]); i++)
        sigaddset(set, main_ignored_signals[i]);
}

static int main_wait_for_stop_signal(const sigset_t *signals)
{
    for (;;) {
        siginfo_t info;
        int signal_number = sigwaitinfo(signals, &info);
        if (signal_number > 0 && main_is_stop_signal(signal_number))
            return signal_number;
        if (signal_number > 0)
            log_warn("%s (from pid %d) ignored: SIGTERM, SIGINT, SIGHUP or SIGQUIT stop forkd",
                     strsignal(signal_number), (int)info.si_pid);
        else if (errno != EINTR)
            return -errno;
    }
}

/* Stop accepting; give running calls and branches the grace period; cancel what remains. */
static void main_shutdown(struct server *server, struct daemon_state *daemon)
{
    atomic_store(&daemon->shutting_down, true);
    server_begin_shutdown(server);
    unsigned grace = daemon->options->shutdown_grace_ms;
    uint64_t deadline = forkd_deadline_after_ms(grace);
    bool calls_done = server_wait_idle(server, forkd_ms_left(deadline));
    bool branches_done = branches_wait_idle(daemon->branches, forkd_ms_left(deadline));
    if (!calls_done || !branches_done) {
        log_warn("calls or branches still running after the %u ms grace period: cancelling them",
                 grace);
        branches_cancel_all(daemon->branches);
        server_cancel_all(server);
        branches_wait_idle(daemon->branches, -1);
        server_wait_idle(server, -1);
    }
    server_destroy(server);
}

/* A corrupt snapshot is kept (it is user data) and listed as CORRUPT; say so once, loudly. */
static void main_log_corrupt_snapshot(const char *reason, void *context)
{
    (void)context;
    log_warn("%s; it is listed as CORRUPT and kept until deleted", reason);
}

static void main_log_adoption(void *context, bool warning, const char *message)
{
    (void)context;
    if (warning)
        log_warn("%s", message);
    else
        log_info("%s", message);
}

/* A branch that ran when the earlier forkd died: WatchBranch reports it FAILED. */
static void main_branch_failed(void *context, const char *vm_id, const char *snapshot_name)
{
    struct daemon_state *daemon = context;
    log_warn("the branch of %s to snapshot %s failed: forkd restarted (the VM runs on, "
             "unprotected; the partial snapshot is removed)",
             vm_id, snapshot_name);
    branches_record_interrupted(daemon->branches, snapshot_name, vm_id);
}

static int main_open_engine(struct daemon_state *daemon)
{
    const struct forkd_options *opts = daemon->options;
    struct forkd_error err = {0};
    struct engine_config config = {
        .state_dir = opts->state_dir,
        .vmm_binary = opts->vmm_binary,
        .timeout_scale = opts->timeout_scale,
        .anonymous_boot_memory = opts->anonymous_boot_memory,
        .kvm_unusable_reason = daemon->caps.kvm_usable ? NULL : daemon->caps.kvm_error,
        .no_realtime = !opts->realtime,
        .realtime_max_percent = opts->realtime_max_percent,
    };
    struct remote_config remote = {
        .endpoint = opts->remote_endpoint,
        .region = opts->remote_region,
        .bucket = opts->remote_bucket,
        .credentials_file = opts->remote_credentials,
        .parallel = opts->remote_parallel,
        .multipart_bytes = opts->remote_multipart_bytes,
    };
    if (opts->remote_endpoint)
        config.remote = &remote;
    if (engine_open(&config, &daemon->engine, &err) < 0) {
        log_error("%s", err.message);
        return err.code;
    }
    struct serial *branch_ids;
    if (serial_open(opts->state_dir, "branch-ids", &branch_ids, &err) < 0) {
        log_error("branch ids: %s", err.message);
        return err.code;
    }
    daemon->branches = branches_table_new(opts->max_branches, branch_ids);
    if (!daemon->branches) {
        serial_close(branch_ids);
        return -ENOMEM;
    }
    struct vm_adopt_config adopt = {.log = main_log_adoption,
                                    .branch_failed = main_branch_failed,
                                    .arg = daemon};
    struct vm_adopt_report report;
    if (engine_adopt_vms(daemon->engine, &adopt, &report, &err) < 0)
        log_warn("VM run directory: %s", err.message);
    else if (report.adopted || report.exited || report.stopped || report.foreign)
        log_info("VMs of an earlier forkd on %s: %u adopted, %u exited meanwhile, %u stopped "
                 "(start cut short), %u processes on VM sockets spared (not proven to be a VMM "
                 "forkd started), %u branches failed by the restart",
                 opts->state_dir, report.adopted, report.exited, report.stopped, report.foreign,
                 report.branches_failed);
    store_for_each_corrupt(engine_store(daemon->engine), main_log_corrupt_snapshot, NULL);
    return 0;
}

static void main_close_engine(struct daemon_state *daemon)
{
    branches_table_free(daemon->branches);
    if (daemon->engine)
        log_info("%s the VMs", daemon->options->keep_vms ? "leaving running" : "stopping");
    engine_close(daemon->engine, daemon->options->keep_vms, 2000);
    if (engine_realtime_demotions())
        log_warn("%lu real-time threads went back to normal priority after using more than "
                 "%u%% of a core (--realtime-max-percent)",
                 engine_realtime_demotions(), daemon->options->realtime_max_percent);
}

static int main_serve(struct daemon_state *daemon, const sigset_t *stop_signals)
{
    const struct forkd_options *opts = daemon->options;
    struct server_config config = {
        .listen_address = opts->listen,
        .insecure_tcp = opts->insecure_tcp,
        .allow_abstract_socket = opts->allow_abstract_socket,
        .tls_cert_path = opts->tls_cert,
        .tls_key_path = opts->tls_key,
        .tls_client_ca_path = opts->tls_client_ca,
        .tls_no_client_auth = opts->tls_no_client_auth,
        .max_message_bytes = opts->max_message_bytes,
        .max_receive_memory_bytes = opts->max_receive_memory_bytes,
        .max_calls = opts->max_calls,
        .max_streams = opts->max_streams,
        .request_timeout_ms = opts->request_timeout_ms,
        .daemon = daemon,
    };
    struct server *server = NULL;
    struct forkd_error err = {0};
    int rc = server_start(&config, &server, &err);
    if (rc < 0) {
        log_error("%s", err.message);
        return rc;
    }
    log_info("forkd %s listening on %s (state dir %s, vmm %s)", FORKD_VERSION, opts->listen,
             opts->state_dir, opts->vmm_binary);
    /* Ready only now: the VMs of an earlier forkd are adopted and calls are answered. Outside
     * systemd (no NOTIFY_SOCKET) this does nothing. */
    sd_notifyf(0, "READY=1\nSTATUS=listening on %s", opts->listen);
    int signal_number = main_wait_for_stop_signal(stop_signals);
    sd_notify(0, "STOPPING=1");
    log_info("%s received: shutting down (grace %u ms)",
             signal_number > 0 ? strsignal(signal_number) : "error", opts->shutdown_grace_ms);
    main_shutdown(server, daemon);
    log_info("stopped");
    return 0;
}

int main(int argc, char **argv)
{
    static struct forkd_options opts;
    switch (options_parse(argc, argv, &opts)) {
    case OPTIONS_EXIT_OK:
        return 0;
    case OPTIONS_EXIT_USAGE:
        return 2;
    case OPTIONS_RUN:
        break;
    }
    log_set_level(opts.log_level);

    /* Block before any thread exists so every thread (gRPC's included) inherits the mask. */
    sigset_t stop_signals;
    main_signal_set(&stop_signals);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGXFSZ, SIG_IGN); /* a write past the file size limit fails with EFBIG instead */

    struct forkd_error route_err = {0};
    if (routes_init(&route_err) < 0) {
        log_error("internal error: %s", route_err.message);
        return 1;
    }
    _cleanup_close_ int state_lock = main_lock_state_dir(opts.state_dir);
    if (state_lock < 0)
        return 1;

    static struct daemon_state daemon;
    daemon.options = &opts;
    daemon.started_at_unix_ms = forkd_unix_ms();
    probe_host(&daemon.caps);
    main_log_capabilities(&daemon.caps);

    int rc = main_open_engine(&daemon);
    if (rc == 0) {
        grpc_init();
        rc = main_serve(&daemon, &stop_signals);
        grpc_shutdown();
    }
    main_close_engine(&daemon);
    return rc < 0 ? 1 : 0;
}
