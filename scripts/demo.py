"""The demo client: talks to a running forkd through the stubs generated from proto/."""
import os
import sys

sys.path.insert(0, os.environ["FORKD_PROTO_PYTHON"])

import grpc  # noqa: E402
from forkd.v1 import forkd_pb2, forkd_pb2_grpc  # noqa: E402
from health.v1 import health_pb2, health_pb2_grpc  # noqa: E402


def main(target):
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=20)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    info = forkd_pb2_grpc.ForkdStub(channel).GetInfo(forkd_pb2.GetInfoRequest(), timeout=10)
    host = info.host
    print("forkd %s (pid %d) on %s: %s" % (info.version, info.pid, target,
                                           health_pb2.HealthCheckResponse.ServingStatus.Name(
                                               health.status)))
    print("  kernel            %s" % host.kernel_release)
    print("  KVM               %s" % ("usable, API %d" % host.kvm_api_version
                                      if host.kvm_usable else "unusable: " + host.kvm_error))
    print("  userfaultfd       %s" % ("features 0x%x" % host.userfaultfd_features
                                      if host.userfaultfd_usable
                                      else "unusable: " + host.userfaultfd_error))
    print("  WP anon / shmem   %s / %s" % (host.userfaultfd_wp_anonymous,
                                           host.userfaultfd_wp_shmem))
    print("  live branch       %s" % ("supported" if host.live_branch_supported
                                      else "not supported: " + host.userfaultfd_error))
    return 0 if host.live_branch_supported else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
