/* GetInfo: the daemon's version and the host capabilities probed at start-up. */
#include "daemon.h"
#include "handlers.h"

#include "forkd/v1/forkd.pb-c.h"

#include <unistd.h>

grpc_status_code handle_get_info(struct rpc_call *call, const ProtobufCMessage *request,
                                 struct rpc_status *status)
{
    const struct daemon_state *daemon = call->daemon;
    const struct probe_host_caps *caps = &daemon->caps;

    Forkd__V1__HostCapabilities host = FORKD__V1__HOST_CAPABILITIES__INIT;
    host.kernel_release = (char *)caps->kernel_release;
    host.kvm_usable = caps->kvm_usable;
    host.kvm_api_version = caps->kvm_api_version;
    host.kvm_error = (char *)caps->kvm_error;
    host.userfaultfd_usable = caps->uffd_usable;
    host.userfaultfd_features = caps->uffd_features;
    host.userfaultfd_wp_anonymous = caps->uffd_wp_anonymous;
    host.userfaultfd_wp_shmem = caps->uffd_wp_shmem;
    host.userfaultfd_wp_unpopulated = caps->uffd_wp_unpopulated;
    host.userfaultfd_error = (char *)caps->uffd_error;
    host.unprivileged_userfaultfd = caps->unprivileged_userfaultfd;
    host.live_branch_supported = probe_live_branch_supported(caps);

    Forkd__V1__Info info = FORKD__V1__INFO__INIT;
    info.version = (char *)FORKD_VERSION;
    info.host = &host;
    info.started_at_unix_ms = daemon->started_at_unix_ms;
    info.state_dir = (char *)daemon->options->state_dir;
    info.vmm_binary = (char *)daemon->options->vmm_binary;
    info.max_concurrent_branches = daemon->options->max_branches;
    info.pid = (uint32_t)getpid();

    if (call_set_response(call, &info.base) < 0)
        return rpc_status_set(status, GRPC_STATUS_RESOURCE_EXHAUSTED, "GetInfo: out of memory");
    return GRPC_STATUS_OK;
}
