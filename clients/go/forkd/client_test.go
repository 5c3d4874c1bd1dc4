package forkd_test

import (
	"context"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"forkd.dev/forkd/clients/go/forkd"
	"forkd.dev/forkd/clients/go/forkdv1"
)

// daemon starts a real forkd launching the KVM test VMM, on a private socket and state
// directory, and returns a client for it. ctest sets the paths; missing ones fail the test.
func daemon(t *testing.T) (*forkd.Client, string) {
	t.Helper()
	bin, testvm := requiredPath(t, "FORKD_BIN"), requiredPath(t, "FORKD_TESTVM")
	dir := t.TempDir()
	sock := filepath.Join(dir, "forkd.sock")
	log, err := os.Create(filepath.Join(dir, "forkd.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--listen", "unix:"+sock, "--state-dir", filepath.Join(dir, "state"),
		"--vmm-binary", testvm, "--timeout-scale", timeScaleArg())
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
		log.Close()
		if t.Failed() {
			out, _ := os.ReadFile(log.Name())
			t.Logf("forkd log:\n%s", out)
		}
	})
	for deadline := time.Now().Add(scaled(20 * time.Second)); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("forkd did not create its socket")
		}
	}
	c, err := forkd.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, dir
}

// scaled stretches a guard time for this machine: the nested-KVM runner emulates the CPU and
// sets FORKD_TIME_SCALE. Tests wait for conditions; none asserts how fast anything is.
func scaled(d time.Duration) time.Duration {
	factor, err := strconv.ParseFloat(os.Getenv("FORKD_TIME_SCALE"), 64)
	if err != nil || factor < 1 {
		return d
	}
	return time.Duration(float64(d) * factor)
}

// timeScaleArg is forkd's --timeout-scale for this machine.
func timeScaleArg() string {
	return strconv.Itoa(int(math.Ceil(float64(scaled(time.Second)) / float64(time.Second))))
}

func requiredPath(t *testing.T, name string) string {
	t.Helper()
	path := os.Getenv(name)
	if _, err := os.Stat(path); path == "" || err != nil {
		t.Fatalf("$%s must name an existing file (set by ctest), got %q", name, path)
	}
	return path
}

func boot(t *testing.T, c *forkd.Client, name string, memMiB uint64) *forkdv1.Vm {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), scaled(time.Minute))
	defer cancel()
	vm, err := c.Boot(ctx, &forkdv1.BootRequest{
		Name:            name,
		KernelImagePath: requiredPath(t, "FORKD_GUEST"),
		BootArgs:        "pattern=random",
		Machine:         &forkdv1.MachineConfig{VcpuCount: 1, MemSizeMib: memMiB},
	})
	if err != nil {
		t.Fatalf("boot: %v", err)
	}
	return vm
}

// phases returns the phase sequence with repeated COPYING events folded into one.
func phases(events []*forkdv1.BranchEvent) []forkdv1.BranchPhase {
	var out []forkdv1.BranchPhase
	for _, ev := range events {
		if n := len(out); n > 0 && out[n-1] == ev.Phase && ev.Phase == forkdv1.BranchPhase_BRANCH_PHASE_COPYING {
			continue
		}
		out = append(out, ev.Phase)
	}
	return out
}

func TestTarget(t *testing.T) {
	t.Setenv("FORKD_ADDR", "")
	if got := forkd.Target(""); got != forkd.DefaultTarget {
		t.Errorf("Target(\"\") = %q, want %q", got, forkd.DefaultTarget)
	}
	t.Setenv("FORKD_ADDR", "/tmp/x.sock")
	if got := forkd.Target(""); got != "unix:/tmp/x.sock" {
		t.Errorf("Target with FORKD_ADDR = %q", got)
	}
	if got := forkd.Target("localhost:7000"); got != "localhost:7000" {
		t.Errorf("explicit target rewritten: %q", got)
	}
}

func TestBootBranchSpawnListDelete(t *testing.T) {
	c, _ := daemon(t)
	ctx, cancel := context.WithTimeout(context.Background(), scaled(2*time.Minute))
	defer cancel()

	info, err := c.Info(ctx)
	if err != nil || !info.GetHost().GetLiveBranchSupported() {
		t.Fatalf("info: %v, %v", info, err)
	}
	vm := boot(t, c, "agent", 64)
	if vm.State != forkdv1.VmState_VM_STATE_RUNNING || vm.MemoryBackend != forkdv1.MemoryBackend_MEMORY_BACKEND_MEMFD {
		t.Fatalf("booted VM: %v", vm)
	}

	b, err := c.Branch(ctx, &forkdv1.BranchRequest{VmId: vm.Id, SnapshotName: "base", ProgressIntervalMs: 5})
	if err != nil {
		t.Fatalf("branch: %v", err)
	}
	var events []*forkdv1.BranchEvent
	var copied uint64
	for ev := range b.Events() {
		if ev.BranchId != b.ID() {
			t.Errorf("event of branch %q in the stream of %q", ev.BranchId, b.ID())
		}
		if p := ev.GetProgress().GetBytesCopied(); p < copied {
			t.Errorf("progress went back from %d to %d", copied, p)
		} else {
			copied = p
		}
		events = append(events, ev)
	}
	snap, err := b.Wait()
	if err != nil {
		t.Fatalf("branch ended with %v", err)
	}
	want := []forkdv1.BranchPhase{
		forkdv1.BranchPhase_BRANCH_PHASE_STARTED, forkdv1.BranchPhase_BRANCH_PHASE_ARMED,
		forkdv1.BranchPhase_BRANCH_PHASE_PAUSED, forkdv1.BranchPhase_BRANCH_PHASE_VMSTATE_SAVED,
		forkdv1.BranchPhase_BRANCH_PHASE_RESUMED, forkdv1.BranchPhase_BRANCH_PHASE_COPYING,
		forkdv1.BranchPhase_BRANCH_PHASE_PUBLISHING, forkdv1.BranchPhase_BRANCH_PHASE_DONE,
	}
	if got := phases(events); len(got) != len(want) || !equal(got, want) {
		t.Fatalf("phases %v, want %v", got, want)
	}
	if snap.State != forkdv1.SnapshotState_SNAPSHOT_STATE_READY || snap.MemoryBytes != 64<<20 || snap.Figures.PauseNs == 0 {
		t.Fatalf("snapshot: %v", snap)
	}
	verify(t, snap.Path)

	forks, err := c.Spawn(ctx, &forkdv1.SpawnRequest{
		Snapshot: "base", Count: 2, Backend: forkdv1.MemoryBackend_MEMORY_BACKEND_MEMFD, NamePrefix: "f"})
	if err != nil || len(forks.Vms) != 2 || forks.Vms[1].Name != "f-1" {
		t.Fatalf("spawn: %v, %v", forks, err)
	}
	vms, err := c.ListVms(ctx)
	if err != nil || len(vms) != 3 {
		t.Fatalf("list VMs: %v, %v", vms, err)
	}
	if s, err := c.GetSnapshot(ctx, "base"); err != nil || s.VmsUsing != 2 {
		t.Fatalf("get snapshot: %v, %v", s, err)
	}
	if err := c.DeleteSnapshot(ctx, "base", false); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("deleting a snapshot in use: %v", err)
	}
	for _, fork := range forks.Vms {
		last, err := c.StopVm(ctx, fork.Id, scaled(5*time.Second))
		if err != nil || last.State != forkdv1.VmState_VM_STATE_STOPPED {
			t.Fatalf("stop %s: %v, %v", fork.Id, last, err)
		}
	}
	if err := c.DeleteSnapshot(ctx, "base", false); err != nil {
		t.Fatalf("delete: %v", err)
	}
	if snaps, err := c.ListSnapshots(ctx); err != nil || len(snaps) != 0 {
		t.Fatalf("snapshots left: %v, %v", snaps, err)
	}
}

func TestCancelBranchWithContext(t *testing.T) {
	c, dir := daemon(t)
	vm := boot(t, c, "c", 256)
	ctx, cancel := context.WithCancel(context.Background())
	b, err := c.Branch(ctx, &forkdv1.BranchRequest{VmId: vm.Id, SnapshotName: "gone"})
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	if _, err := b.Wait(); status.Code(err) != codes.Canceled {
		t.Fatalf("a cancelled branch ended with %v", err)
	}
	// The daemon remembers how the branch ended.
	wctx, wcancel := context.WithTimeout(context.Background(), scaled(time.Minute))
	defer wcancel()
	w, err := c.Watch(wctx, &forkdv1.WatchBranchRequest{Target: &forkdv1.WatchBranchRequest_BranchId{BranchId: b.ID()}})
	if err != nil {
		t.Fatal(err)
	}
	var last *forkdv1.BranchEvent
	for ev := range w.Events() {
		last = ev
	}
	if _, err := w.Wait(); status.Code(err) != codes.Canceled || last.Phase != forkdv1.BranchPhase_BRANCH_PHASE_CANCELLED {
		t.Fatalf("watch of a cancelled branch: %v, last %v", err, last)
	}
	got, err := c.GetVm(wctx, vm.Id)
	if err != nil || got.State != forkdv1.VmState_VM_STATE_RUNNING || got.ActiveBranchId != "" {
		t.Fatalf("VM after cancel: %v, %v", got, err)
	}
	if entries, _ := os.ReadDir(filepath.Join(dir, "state", "snapshots")); len(entries) != 0 {
		t.Fatalf("the store is not clean: %v", entries)
	}
	// Cancel on the branch itself, then a clean branch of the same VM.
	b, err = c.Branch(wctx, &forkdv1.BranchRequest{VmId: vm.Id, SnapshotName: "early"})
	if err != nil {
		t.Fatal(err)
	}
	b.Cancel()
	if _, err := b.Wait(); status.Code(err) != codes.Canceled {
		t.Fatalf("Cancel: %v", err)
	}
	for deadline := time.Now().Add(scaled(30 * time.Second)); ; time.Sleep(50 * time.Millisecond) {
		if v, err := c.GetVm(wctx, vm.Id); err == nil && v.ActiveBranchId == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the cancelled branch did not wind down")
		}
	}
	b, err = c.Branch(wctx, &forkdv1.BranchRequest{VmId: vm.Id, SnapshotName: "again"})
	if err != nil {
		t.Fatal(err)
	}
	snap, err := b.Wait()
	if err != nil {
		t.Fatal(err)
	}
	verify(t, snap.Path)
}

func TestErrorsAreStatuses(t *testing.T) {
	c, dir := daemon(t)
	ctx, cancel := context.WithTimeout(context.Background(), scaled(time.Minute))
	defer cancel()
	expect := func(what string, want codes.Code, err error) {
		t.Helper()
		st, ok := status.FromError(err)
		if !ok || st.Code() != want || st.Message() == "" {
			t.Errorf("%s: got %v, want %v with a message", what, err, want)
		}
	}
	_, err := c.GetVm(ctx, "vm-404")
	expect("GetVm of a missing VM", codes.NotFound, err)
	if !strings.Contains(status.Convert(err).Message(), "vm-404") {
		t.Errorf("message does not name the VM: %v", err)
	}
	_, err = c.Branch(ctx, &forkdv1.BranchRequest{VmId: "vm-404", SnapshotName: "x"})
	expect("Branch of a missing VM", codes.NotFound, err)
	vm := boot(t, c, "taken", 64)
	_, err = c.Branch(ctx, &forkdv1.BranchRequest{VmId: vm.Id, SnapshotName: "../x"})
	expect("Branch to a bad name", codes.InvalidArgument, err)
	_, err = c.Boot(ctx, &forkdv1.BootRequest{Name: "taken", KernelImagePath: requiredPath(t, "FORKD_GUEST"),
		Machine: &forkdv1.MachineConfig{VcpuCount: 1, MemSizeMib: 64}})
	expect("Boot of a taken name", codes.AlreadyExists, err)
	_, err = c.Spawn(ctx, &forkdv1.SpawnRequest{Snapshot: "nope", Count: 1})
	expect("Spawn from a missing snapshot", codes.NotFound, err)
	_, err = c.ListRemote(ctx)
	expect("ListRemote without a remote store", codes.FailedPrecondition, err)
	_, err = c.Push(ctx, "taken", nil)
	expect("Push without a remote store", codes.FailedPrecondition, err)
	_, err = c.Pull(ctx, "../x", nil)
	expect("Pull of a bad name", codes.InvalidArgument, err)

	short, stop := context.WithTimeout(ctx, time.Microsecond)
	defer stop()
	<-short.Done()
	_, err = c.ListVms(short)
	expect("a call past its deadline", codes.DeadlineExceeded, err)

	absent, err := forkd.Dial(filepath.Join(dir, "nobody.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer absent.Close()
	_, err = absent.Info(ctx)
	expect("a call to no daemon", codes.Unavailable, err)
}

func verify(t *testing.T, path string) {
	t.Helper()
	out, err := exec.Command(requiredPath(t, "FORKD_TESTVM"), "verify", path).CombinedOutput()
	if err != nil {
		t.Fatalf("snapshot %s is not consistent: %v\n%s", path, err, out)
	}
}

func equal(a, b []forkdv1.BranchPhase) bool {
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return len(a) == len(b)
}

// Firecracker's devices travel through the Go stubs both ways: booted with a root drive, a
// data drive, a tap and a vsock, the VM is described completely; a bad one is refused naming it.
func TestBootWithDevicesIsDescribed(t *testing.T) {
	c, dir := daemon(t)
	ctx, cancel := context.WithTimeout(context.Background(), scaled(2*time.Minute))
	defer cancel()
	root, data := filepath.Join(dir, "root.img"), filepath.Join(dir, "data.img")
	for _, path := range []string{root, data} {
		if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	req := &forkdv1.BootRequest{
		KernelImagePath: requiredPath(t, "FORKD_GUEST"),
		BootArgs:        "pattern=random",
		Machine:         &forkdv1.MachineConfig{VcpuCount: 1, MemSizeMib: 64},
		Drives: []*forkdv1.Drive{
			{DriveId: "rootfs", PathOnHost: root, IsReadOnly: true, IsRootDevice: true},
			{DriveId: "data", PathOnHost: data},
		},
		NetworkInterfaces: []*forkdv1.NetworkInterface{
			{IfaceId: "eth0", HostDevName: "fk-tap0", GuestMac: "06:00:ac:10:00:02"},
		},
		Vsock: &forkdv1.Vsock{GuestCid: 3, UdsPath: filepath.Join(dir, "v.sock")},
	}
	vm, err := c.Boot(ctx, req)
	if err != nil {
		t.Fatalf("boot: %v", err)
	}
	got, err := c.GetVm(ctx, vm.Id)
	if err != nil {
		t.Fatalf("get: %v", err)
	}
	if len(got.Drives) != 2 || got.Drives[0].PathOnHost != root || !got.Drives[0].IsRootDevice ||
		got.Drives[0].GetIdentity().GetSizeBytes() != 1<<20 || got.Drives[1].IsReadOnly {
		t.Errorf("drives: %v", got.Drives)
	}
	if len(got.NetworkInterfaces) != 1 || got.NetworkInterfaces[0].HostDevName != "fk-tap0" {
		t.Errorf("network interfaces: %v", got.NetworkInterfaces)
	}
	if got.GetVsock().GetGuestCid() != 3 {
		t.Errorf("vsock: %v", got.Vsock)
	}
	req.Vsock.GuestCid = 2
	_, err = c.Boot(ctx, req)
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "vsock.guest_cid") {
		t.Errorf("a CID of 2: %v", err)
	}
	// Spawn's per-fork overrides travel too: a MAC cannot be overridden, and the daemon says so.
	_, err = c.Spawn(ctx, &forkdv1.SpawnRequest{Snapshot: "base", Count: 2,
		NetworkOverrides: []*forkdv1.NetworkOverride{
			{IfaceId: "eth0", HostDevName: "fk-t{i}", GuestMac: "06:00:ac:10:00:09"}},
		VsockOverride: &forkdv1.VsockOverride{UdsPath: filepath.Join(dir, "v-{i}.sock")}})
	if status.Code(err) != codes.InvalidArgument ||
		!strings.Contains(err.Error(), "network_overrides[0].guest_mac: a fork's MAC cannot be changed") {
		t.Errorf("a MAC override: %v", err)
	}
}
