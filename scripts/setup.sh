#!/usr/bin/env bash
# Installs every Debian 12 package forkd needs to build, test and run its demo.
# Idempotent: apt-get skips what is already installed. Needs root (or sudo).
set -euo pipefail

packages=(
  # toolchain and build
  build-essential clang cmake pkg-config git ca-certificates
  # daemon: gRPC C core, protobuf-c, libcurl, cJSON
  libgrpc-dev libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev
  libcurl4-openssl-dev libcjson-dev
  # sd_notify (the systemd unit is Type=notify)
  libsystemd-dev
  # protoc and the gRPC code generator plugins (grpc_python_plugin)
  protobuf-compiler protobuf-compiler-grpc
  # C/C++ tests; openssl makes the certificates of the mutual-TLS tests; xfsprogs makes the
  # XFS file system (reflink) of the disk tests
  googletest libgtest-dev openssl xfsprogs
  # Python client and its tests (rich: forkctl's progress display; setuptools, wheel and pip:
  # the offline install of clients/python)
  python3 python3-grpcio python3-protobuf python3-pytest python3-rich
  python3-setuptools python3-wheel python3-pip
  # Go client (built offline; see REFERENCE: golang-goprotobuf-dev conflicts)
  golang-go golang-google-grpc-dev golang-google-protobuf-dev
  golang-github-golang-protobuf-1-5-dev protoc-gen-go protoc-gen-go-grpc
  # remote snapshots: sha256 of memory chunks (libcrypto); the S3 server of the tests and the
  # demo (scripts/radosgw.sh: Ceph's radosgw, one monitor, one memstore OSD)
  libssl-dev ceph-mon ceph-osd radosgw ceph-common
)

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages already installed"
  exit 0
fi

echo "setup: installing ${#missing[@]} packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "setup: done"
