#!/usr/bin/env bash
# A real S3 server for forkd's remote-snapshot tests and demo: Ceph's radosgw from Debian 12's
# packages (scripts/setup.sh installs ceph-mon, ceph-osd, radosgw, ceph-common), single node,
# localhost only, one monitor and one memstore OSD (RAM only: nothing outlives `down`).
#
#   scripts/radosgw.sh up DIR [--memory-mib N]   start an instance in DIR (created; must be empty)
#   scripts/radosgw.sh down DIR                  stop the instance of DIR, remove its data
#   scripts/radosgw.sh gateway-stop DIR          stop only its radosgw (the S3 endpoint goes
#                                                away, the data stays)
#   scripts/radosgw.sh gateway-start DIR         start that radosgw again, same endpoint
#
# Every instance lives in its own directory with its own free ports, so two test runs side by
# side never meet. `up` prints three lines: "endpoint http://127.0.0.1:PORT", "credentials
# DIR/credentials" (an AWS-style file: aws_access_key_id, aws_secret_access_key) and "bucket NAME"
# (created empty). `down` stops only the processes `up` started: by the pid it recorded, after
# checking that the pid still runs the program it started with this instance's configuration.
set -euo pipefail

usage() {
  echo "usage: $0 up DIR [--memory-mib N] | down DIR | gateway-stop DIR | gateway-start DIR" >&2
  exit 2
}

[ $# -ge 2 ] || usage
action=$1
dir=$2
shift 2
memory_mib=1024
while [ $# -gt 0 ]; do
  case $1 in
    --memory-mib) memory_mib=$2; shift 2 ;;
    *) usage ;;
  esac
done

if [ "$action" != up ] && [ -d "$dir" ]; then dir=$(cd "$dir" && pwd); fi

# A free TCP port on 127.0.0.1 (the kernel picks; the small race with another binder is taken
# care of by the caller retrying up once).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Whether pid runs program with this instance's configuration file on its command line.
ours() {
  local pid=$1 program=$2
  [ -r "/proc/$pid/cmdline" ] || return 1
  local cmdline
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmdline == *"$program"* && $cmdline == *"$dir/ceph.conf"* ]]
}

stop_one() {
  local name=$1 program=$2 pidfile="$dir/$1.pid"
  [ -f "$pidfile" ] || return 0
  local pid
  pid=$(cat "$pidfile")
  if ours "$pid" "$program"; then
    kill -TERM "$pid" 2>/dev/null || true
    # radosgw ignores SIGTERM while operations block; SIGKILL after a grace is safe (memstore).
    for _ in $(seq 1 50); do
      ours "$pid" "$program" || break
      sleep 0.1
    done
    if ours "$pid" "$program"; then kill -KILL "$pid" 2>/dev/null || true; fi
    # Gone, or a zombie its (exited) parent's reaper will collect.
    while [ -e "/proc/$pid" ] && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]; do
      sleep 0.05
    done
  fi
  rm -f "$pidfile"
}

down() {
  [ -d "$dir" ] || return 0
  stop_one rgw radosgw
  stop_one osd ceph-osd
  stop_one mon ceph-mon
  # Remove only what `up` made (the marker says this is one of ours).
  if [ -f "$dir/.forkd-radosgw" ]; then
    rm -rf "${dir:?}"/mon "${dir:?}"/osd "${dir:?}"/run "${dir:?}"/ceph.conf "${dir:?}"/*.log \
      "${dir:?}"/credentials "${dir:?}"/endpoint "${dir:?}"/bucket "${dir:?}"/monmap \
      "${dir:?}"/.forkd-radosgw
    rmdir "$dir" 2>/dev/null || true
  fi
}

# Guard times grow with the machine (the nested-KVM runner emulates the CPU and sets
# FORKD_TIME_SCALE); they are only guards: every wait ends as soon as its condition holds.
time_scale=${FORKD_TIME_SCALE:-1}
[[ $time_scale =~ ^[0-9]+$ ]] && [ "$time_scale" -ge 1 ] || time_scale=1

wait_for() { # what, seconds, command...
  local what=$1 seconds=$(($2 * time_scale))
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      echo "radosgw.sh: $what did not come up within ${seconds}s (logs in $dir)" >&2
      for log in "$dir"/*.log; do
        [ -s "$log" ] && { echo "--- $log (last lines)" >&2; tail -n 5 "$log" >&2; }
      done
      return 1
    fi
    sleep 0.05
  done
}

up() {
  for program in ceph-mon ceph-osd radosgw radosgw-admin ceph monmaptool; do
    command -v "$program" >/dev/null || {
      echo "radosgw.sh: $program not found; run scripts/setup.sh" >&2
      exit 1
    }
  done
  mkdir -p "$dir"
  if [ -n "$(ls -A "$dir")" ]; then
    echo "radosgw.sh: $dir is not empty" >&2
    exit 1
  fi
  dir=$(cd "$dir" && pwd)
  touch "$dir/.forkd-radosgw"
  mkdir -p "$dir/mon" "$dir/osd" "$dir/run"
  local mon_port rgw_port fsid
  mon_port=$(free_port)
  rgw_port=$(free_port)
  fsid=$(cat /proc/sys/kernel/random/uuid)
  # Deleted objects go to radosgw's garbage collector; the low waits keep memstore from
  # filling with them (a full memstore hangs writes instead of failing them).
  cat >"$dir/ceph.conf" <<EOF
[global]
fsid = $fsid
mon_host = [v2:127.0.0.1:$mon_port]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr1 = false
ms_mon_client_mode = crc
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
mon_allow_pool_size_one = true
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_crush_chooseleaf_type = 0
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
paxos_propose_interval = 0.05
run_dir = $dir/run
admin_socket = $dir/run/\$name.asok
log_file = $dir/\$name.log
pid_file =
mon_data = $dir/mon
osd_data = $dir/osd
osd_objectstore = memstore
memstore_device_bytes = $((memory_mib << 20))
osd_fast_shutdown = false
# The host name may be none at all (a minimal VM): the OSD's CRUSH location is given here.
crush_location = root=default host=forkd-radosgw
mon_warn_on_pool_no_redundancy = false
rgw_gc_obj_min_wait = 1
rgw_gc_processor_period = 2
rgw_gc_processor_max_time = 2
rgw_frontends = beast endpoint=127.0.0.1:$rgw_port
rgw_dns_name = 127.0.0.1
rgw_data = $dir/run
EOF
  local conf=(-c "$dir/ceph.conf")
  local start_ns
  start_ns=$(date +%s%N)
  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_port]" "$dir/monmap" >/dev/null
  ceph-mon "${conf[@]}" -i a --mkfs --monmap "$dir/monmap" >/dev/null 2>"$dir/mkfs.log"
  ceph-mon "${conf[@]}" -i a -f >/dev/null 2>>"$dir/mon.log" &
  echo $! >"$dir/mon.pid"
  local ceph=(ceph "${conf[@]}" --connect-timeout 10)
  wait_for "ceph-mon" 60 "${ceph[@]}" mon stat
  local osd_uuid osd_id
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  osd_id=$("${ceph[@]}" osd new "$osd_uuid")
  ceph-osd "${conf[@]}" -i "$osd_id" --mkfs --osd-uuid "$osd_uuid" >/dev/null 2>>"$dir/mkfs.log"
  ceph-osd "${conf[@]}" -i "$osd_id" -f >/dev/null 2>>"$dir/osd.log" &
  echo $! >"$dir/osd.pid"
  radosgw "${conf[@]}" -n client.rgw -f >/dev/null 2>>"$dir/rgw.log" &
  echo $! >"$dir/rgw.pid"
  local endpoint="http://127.0.0.1:$rgw_port"
  wait_for "radosgw" 120 curl -sf -o /dev/null "$endpoint/"
  local access secret
  access=$(head -c 10 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr a-f A-F)
  secret=$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')
  radosgw-admin "${conf[@]}" user create --uid=forkd --display-name=forkd \
    --access-key="$access" --secret="$secret" >/dev/null 2>>"$dir/admin.log"
  umask 077
  printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n' "$access" "$secret" \
    >"$dir/credentials"
  local bucket=forkd-snapshots
  # The secret goes to curl through a file, never on a command line.
  local curl_config="$dir/run/curl.conf"
  printf 'user = "%s:%s"\n' "$access" "$secret" >"$curl_config"
  wait_for "bucket creation" 60 curl -sf -K "$curl_config" --aws-sigv4 "aws:amz:us-east-1:s3" \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -X PUT "$endpoint/$bucket"
  rm -f "$curl_config"
  local end_ns
  end_ns=$(date +%s%N)
  echo "$endpoint" >"$dir/endpoint"
  echo "$bucket" >"$dir/bucket"
  echo "endpoint $endpoint"
  echo "credentials $dir/credentials"
  echo "bucket $bucket"
  echo "start_ms $(((end_ns - start_ns) / 1000000))"
}

gateway_start() {
  [ -f "$dir/.forkd-radosgw" ] || { echo "radosgw.sh: no instance in $dir" >&2; exit 1; }
  radosgw -c "$dir/ceph.conf" -n client.rgw -f >/dev/null 2>>"$dir/rgw.log" &
  echo $! >"$dir/rgw.pid"
  wait_for "radosgw" 120 curl -sf -o /dev/null "$(cat "$dir/endpoint")/"
}

case $action in
  up)
    if ! up; then
      down
      exit 1
    fi
    ;;
  down) down ;;
  gateway-stop) stop_one rgw radosgw ;;
  gateway-start) gateway_start ;;
  *) usage ;;
esac
