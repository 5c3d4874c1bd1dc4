#!/usr/bin/env bash
# kvm-runner: runs one command inside a throw-away VM that has /dev/kvm, for hosts that have none.
#
#   scripts/kvm-runner.sh [options] [--] COMMAND [ARG...]
#
# The VM is QEMU with software emulation (TCG, one thread: multi-threaded TCG corrupts this guest)
# and a CPU model that exposes AMD SVM with nested paging, booting Debian 12's stock kernel with a
# busybox initramfs. The host's root file system is shared read-only over 9p and becomes the
# guest's root under a RAM overlay, so the command runs in the same directory with the same
# absolute paths and the same programs; what it writes stays in the guest. Its output streams to
# this script's standard output, and its exit status is this script's.
#
# The kernel and busybox are never installed on the host (a kernel package would run the boot
# loader's hooks; busybox-static conflicts with busybox): they are downloaded with apt and unpacked
# into a cache directory. QEMU is installed with apt if missing. The guest has no network.
#
# Options:
#   --timeout SEC     end the VM after SEC seconds of command time (default 3600); exit 124
#   --boot-timeout S  the guest must start the command within S seconds (default 180); exit 125
#   --mem MIB         guest memory (default 8192)
#   --cpus N          guest vCPUs (default 2)
#   --cache DIR       where the kernel and busybox are kept (default /var/cache/forkd/kvm-runner,
#                     or $FORKD_RUNNER_CACHE)
#   --kernel-package  PKG   the Debian kernel package to boot (default: what linux-image-amd64 names)
#   --kernel-arg ARG  one more word for the guest kernel's command line (repeatable)
#   --quiet           no runner status lines on standard error
#
# Exit status: the command's; 124 when it timed out; 125 when the guest did not boot or stopped
# without reporting a status (the reason and the end of the console log are printed); 2 when the
# runner could not set up (a package that cannot be had, a bad option).
#
# The command sees FORKD_NESTED_KVM=1 and FORKD_TIME_SCALE (default 30 unless already set): tests
# scale their guard timeouts by it: an emulated CPU runs nested guests, userfaultfd round trips and
# sanitizer builds tens of times slower than hardware (a Full snapshot of a UFFD fork, every page
# pulled through the page server, took over 110 s under ASan here).
set -euo pipefail

# Everything runs inside main, so bash has read the whole file before the first command runs
# (editing the script while it runs cannot derail a run in progress).
main() {

timeout_s=3600
boot_timeout_s=180
mem_mib=8192
cpus=2
cache=${FORKD_RUNNER_CACHE:-/var/cache/forkd/kvm-runner}
kernel_pkg=
kernel_args=()
quiet=0

say() { [ "$quiet" = 1 ] || echo "kvm-runner: $*" >&2; }
die() { echo "kvm-runner: $*" >&2; exit 2; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -gt 0 ]; }

while [ $# -gt 0 ]; do
  case "$1" in
    --timeout) is_uint "${2:-}" || die "--timeout needs a positive number of seconds"
               timeout_s=$2; shift 2 ;;
    --boot-timeout) is_uint "${2:-}" || die "--boot-timeout needs a positive number of seconds"
                    boot_timeout_s=$2; shift 2 ;;
    --mem) is_uint "${2:-}" || die "--mem needs a size in MiB"; mem_mib=$2; shift 2 ;;
    --cpus) is_uint "${2:-}" || die "--cpus needs a count"; cpus=$2; shift 2 ;;
    --cache) [ -n "${2:-}" ] || die "--cache needs a directory"; cache=$2; shift 2 ;;
    --kernel-package) [ -n "${2:-}" ] || die "--kernel-package needs a name"; kernel_pkg=$2
                      shift 2 ;;
    --kernel-arg) [ -n "${2:-}" ] || die "--kernel-arg needs a value"; kernel_args+=("$2")
                  shift 2 ;;
    --quiet) quiet=1; shift ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see the top of $0)" ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || die "no command given (usage: $0 [options] [--] COMMAND [ARG...])"
[ "$(id -u)" -eq 0 ] || die "must run as root (it shares / with the guest and installs packages)"

# --- Host packages --------------------------------------------------------------------------

apt_updated=0
apt_update_once() {
  [ "$apt_updated" = 1 ] && return 0
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true
  apt_updated=1
}

ensure_host_package() { # package, program it provides
  command -v "$2" >/dev/null 2>&1 && return 0
  say "installing $1"
  apt_update_once
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$1" >/dev/null \
    || die "cannot install the Debian package $1 (apt-get install failed)"
  command -v "$2" >/dev/null 2>&1 || die "$1 is installed but $2 is not on PATH"
}

# Runners may start side by side (CI runs two legs at once): one at a time installs, downloads
# and unpacks; the others wait for it and then find everything in place.
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
ensure_host_package qemu-system-x86 qemu-system-x86_64
ensure_host_package binutils objcopy

# Downloads a package's .deb into $cache/debs and unpacks it into $2 (once).
unpack_package() { # package, destination
  local pkg=$1 dest=$2 deb
  [ -e "$dest/.unpacked" ] && return 0
  mkdir -p "$cache/debs"
  deb=$(ls "$cache/debs/${pkg}_"*.deb 2>/dev/null | head -n1 || true)
  if [ -z "$deb" ]; then
    say "downloading $pkg"
    apt_update_once
    # apt's sandbox user cannot write into root's cache: download as root, quietly.
    (cd "$cache/debs" && apt-get download -o APT::Sandbox::User=root "$pkg" >/dev/null 2>&1) \
      || die "cannot download the Debian package $pkg (apt-get download failed)"
    deb=$(ls "$cache/debs/${pkg}_"*.deb | head -n1)
  fi
  rm -rf "$dest.tmp"
  mkdir -p "$dest.tmp"
  dpkg-deb -x "$deb" "$dest.tmp" || die "cannot unpack $deb"
  touch "$dest.tmp/.unpacked"
  rm -rf "$dest"
  mv "$dest.tmp" "$dest"
}

if [ -z "$kernel_pkg" ]; then
  apt-cache show linux-image-amd64 >/dev/null 2>&1 || { apt_updated=0; apt_update_once; }
  kernel_pkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
    | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1)
  [ -n "$kernel_pkg" ] || die "cannot find the kernel that linux-image-amd64 depends on (apt-cache)"
fi
unpack_package "$kernel_pkg" "$cache/$kernel_pkg"
unpack_package busybox-static "$cache/busybox-static"

kroot=$cache/$kernel_pkg
vmlinuz=$(ls "$kroot"/boot/vmlinuz-* 2>/dev/null | head -n1)
[ -n "$vmlinuz" ] || die "$kernel_pkg has no boot/vmlinuz-*"
kver=${vmlinuz##*/vmlinuz-}
moddir=$kroot/lib/modules/$kver
busybox=$cache/busybox-static/bin/busybox
[ -x "$busybox" ] || die "busybox-static has no bin/busybox"
flock -u 9
exec 9>&-

# --- Initramfs: busybox, /init and the modules for 9p, overlay and KVM ----------------------

run_dir=$(mktemp -d "${TMPDIR:-/tmp}/forkd-kvm-runner.XXXXXX")
qemu_pid=
tail_pid=
finish() {
  local rc=$?
  [ -n "$tail_pid" ] && kill "$tail_pid" 2>/dev/null || true
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
    kill -KILL "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
  fi
  rm -rf "$run_dir"
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A module's dependencies are in its .modinfo section ("depends=a,b"); the package has no
# modules.dep (depmod runs at install time), so resolve them here, dependencies first.
declare -gA module_path=() module_done=()
while IFS= read -r ko; do
  name=${ko##*/}; name=${name%.ko}; name=${name//-/_}
  module_path[$name]=$ko
done < <(find "$moddir/kernel" -name '*.ko')
module_order=()
add_module() {
  local name=${1//-/_} dep deps
  [ -n "${module_done[$name]:-}" ] && return 0
  module_done[$name]=1
  [ -n "${module_path[$name]:-}" ] || die "kernel $kver has no module $name"
  objcopy -O binary --only-section=.modinfo "${module_path[$name]}" "$run_dir/modinfo"
  deps=$(tr '\0' '\n' <"$run_dir/modinfo" | sed -n 's/^depends=//p' | tr ',' ' ')
  for dep in $deps; do add_module "$dep"; done
  module_order+=("$name")
}
# loop, xfs (and crc32c, which libcrc32c asks the crypto API for by name): the disk tests make
# an XFS file system on a loop device for reflink clones.
for m in virtio_pci 9pnet_virtio 9p overlay crc32c_generic loop xfs kvm_amd; do
  add_module "$m"
done

initrd_root=$run_dir/initramfs
mkdir -p "$initrd_root"/{bin,modules,proc,sys,dev,host,ctl,upper,newroot}
cp "$busybox" "$initrd_root/bin/busybox"
: >"$initrd_root/modules/order"
for m in "${module_order[@]}"; do
  cp "${module_path[$m]}" "$initrd_root/modules/$m.ko"
  echo "$m" >>"$initrd_root/modules/order"
done

cat >"$initrd_root/init" <<'INIT'
#!/bin/busybox sh
# Guest side of kvm-runner: mount the shares, build the overlay root, load KVM, run the command
# in a chroot, report its status through the control share, power off.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "kvm-runner guest: $*" >/dev/ttyS0; echo "$*" >/ctl/failed 2>/dev/null; poweroff -f; }
for m in $(cat /modules/order); do
  case "$m" in kvm|kvm_amd|ccp) continue ;; esac
  insmod "/modules/$m.ko" || fail "insmod $m failed"
done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 ctl /ctl || fail "cannot mount the control share"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro,cache=loose hostroot /host \
  || fail "cannot mount the host root"
for m in $(cat /modules/order); do
  case "$m" in kvm|kvm_amd|ccp) insmod "/modules/$m.ko" || fail "insmod $m failed" ;; esac
done
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm_amd (does the CPU model expose SVM?)"
# No network device, but tests talk over loopback (127.0.0.1, [::1]).
ip link set lo up || fail "cannot bring up the loopback interface"
mount -t tmpfs -o mode=0755 upper /upper
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/host,upperdir=/upper/data,workdir=/upper/work overlay /newroot \
  || fail "cannot mount the overlay root"
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm /newroot/dev/hugepages
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
mount -t hugetlbfs hugetlbfs /newroot/dev/hugepages
mount -t tmpfs -o mode=0755 run /newroot/run
ctl_path=$(cat /ctl/path)
mount --bind /ctl "/newroot$ctl_path" || fail "cannot bind the control share at $ctl_path"
uname -r >/ctl/kernel
: >/ctl/started
chroot /newroot /bin/bash "$ctl_path/command.sh" >>/ctl/output 2>&1 </dev/null
echo $? >/ctl/status.tmp && mv /ctl/status.tmp /ctl/status
sync
poweroff -f
INIT
chmod +x "$initrd_root/init"
(cd "$initrd_root" && find . | "$busybox" cpio -o -H newc >"$run_dir/initramfs.cpio" 2>/dev/null) \
  || die "cannot build the initramfs"
rm -rf "$initrd_root"

# --- The command, its environment and the control share -------------------------------------

ctl=$run_dir/ctl
mkdir -p "$ctl"
echo "$ctl" >"$ctl/path"
: >"$ctl/output"
{
  echo '#!/bin/bash'
  # The host's exported environment, less what names this shell or host-only sockets.
  export -p | grep -vE '^declare -[a-zA-Z]* (PWD|OLDPWD|SHLVL|_|SSH_AUTH_SOCK|DBUS_SESSION_BUS_ADDRESS)='
  echo 'export FORKD_NESTED_KVM=1'
  echo "export FORKD_TIME_SCALE=${FORKD_TIME_SCALE:-30}"
  printf 'cd -- %q || exit 125\n' "$PWD"
  printf 'exec'; printf ' %q' "$@"; printf '\n'
} >"$ctl/command.sh"

# --- Boot, stream, wait ---------------------------------------------------------------------

say "kernel $kver (Debian $kernel_pkg), QEMU TCG single-threaded, $cpus vCPUs, $mem_mib MiB," \
    "nested KVM (AMD SVM); running: $*"
# no_timer_check: on a loaded host the emulated CPU can be too slow for the kernel's check that
# the timer reaches the IO-APIC, and the guest panics at boot ("IO-APIC + timer doesn't work!",
# seen with two other emulators and a build sharing the two cores); the timer works all the same.
qemu-system-x86_64 \
  -accel tcg,thread=single -machine q35 -cpu max -smp "$cpus" -m "$mem_mib" \
  -kernel "$vmlinuz" -initrd "$run_dir/initramfs.cpio" \
  -append "console=ttyS0 panic=-1 loglevel=4 mitigations=off no_timer_check rdinit=/init ${kernel_args[*]}" \
  -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
  -virtfs "local,path=$ctl,mount_tag=ctl,security_model=none,multidevs=remap" \
  -nic none -display none -vga none -no-reboot -nodefaults \
  -serial "file:$run_dir/console.log" \
  </dev/null >"$run_dir/qemu.log" 2>&1 &
qemu_pid=$!
tail -n +1 -f --pid="$qemu_pid" "$ctl/output" &
tail_pid=$!

console_tail() {
  echo "--- last lines of the guest console ---" >&2
  tail -n 30 "$run_dir/console.log" >&2 2>/dev/null || true
  tail -n 5 "$run_dir/qemu.log" >&2 2>/dev/null || true
}

started_at=$SECONDS
command_started=
outcome=
while kill -0 "$qemu_pid" 2>/dev/null; do
  if [ -z "$command_started" ] && [ -e "$ctl/started" ]; then
    command_started=$SECONDS
    say "guest booted in $((SECONDS - started_at)) s"
  fi
  if [ -z "$command_started" ] && [ $((SECONDS - started_at)) -ge "$boot_timeout_s" ]; then
    outcome=boot-timeout; break
  fi
  if [ -n "$command_started" ] && [ $((SECONDS - command_started)) -ge "$timeout_s" ]; then
    outcome=timeout; break
  fi
  sleep 1
done
kill -KILL "$qemu_pid" 2>/dev/null || true
wait "$qemu_pid" 2>/dev/null || true
qemu_pid=
wait "$tail_pid" 2>/dev/null || true
tail_pid=

case "$outcome" in
  boot-timeout)
    echo "kvm-runner: the guest did not start the command within $boot_timeout_s s" >&2
    console_tail; exit 125 ;;
  timeout)
    echo "kvm-runner: the command did not finish within $timeout_s s; the VM was stopped" >&2
    exit 124 ;;
esac
if [ -e "$ctl/failed" ]; then
  echo "kvm-runner: guest set-up failed: $(cat "$ctl/failed")" >&2
  console_tail; exit 125
fi
if [ ! -e "$ctl/status" ]; then
  reason="the guest stopped without reporting the command's status"
  grep -q "Kernel panic" "$run_dir/console.log" 2>/dev/null && reason="the guest kernel panicked"
  [ -e "$ctl/started" ] || reason="the guest did not boot ($reason)"
  echo "kvm-runner: $reason" >&2
  console_tail; exit 125
fi
rc=$(cat "$ctl/status")
say "command exited with status $rc after $((SECONDS - ${command_started:-started_at})) s" \
    "(kernel $(cat "$ctl/kernel"))"
exit "$rc"
}

main "$@"
