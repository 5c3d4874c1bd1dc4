// Command forkd-example shows the Go client end to end: it boots a VM (or takes a running
// one), live-branches it while printing the branch's progress, and spawns forks from the
// new snapshot.
//
//	forkd-example -kernel /path/to/guest.bin -snapshot base -forks 2
//	forkd-example -kernel /path/to/vmlinux -drive id=rootfs,path=/images/root.ext4,ro,root
//	forkd-example -vm agent -snapshot step-2
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"time"

	"google.golang.org/grpc/status"

	"forkd.dev/forkd/clients/go/forkd"
	"forkd.dev/forkd/clients/go/forkdv1"
)

// drives collects -drive id=ID,path=PATH[,ro][,root] flags into BootRequest drives.
type drives []*forkdv1.Drive

func (d *drives) String() string { return fmt.Sprint(len(*d), " drives") }

func (d *drives) Set(text string) error {
	drive := &forkdv1.Drive{}
	for _, part := range strings.Split(text, ",") {
		key, value, _ := strings.Cut(part, "=")
		switch key {
		case "id":
			drive.DriveId = value
		case "path":
			drive.PathOnHost = value
		case "ro":
			drive.IsReadOnly = true
		case "root":
			drive.IsRootDevice = true
		default:
			return fmt.Errorf("unknown drive option %q (id=, path=, ro, root)", part)
		}
	}
	*d = append(*d, drive)
	return nil
}

func main() {
	addr := flag.String("addr", "", "forkd's address (default $FORKD_ADDR or "+forkd.DefaultTarget+")")
	kernel := flag.String("kernel", "", "boot a new VM from this kernel or guest program")
	bootArgs := flag.String("boot-args", "", "kernel command line or test guest workload")
	memMiB := flag.Uint64("mem", 128, "guest memory of the new VM, MiB")
	vmID := flag.String("vm", "", "branch this running VM instead of booting one")
	snapshot := flag.String("snapshot", "base", "name of the new snapshot")
	forks := flag.Uint("forks", 0, "spawn this many MEMFD forks from the snapshot")
	var bootDrives drives
	flag.Var(&bootDrives, "drive", "a drive of the new VM: id=ID,path=PATH[,ro][,root] (repeatable)")
	flag.Parse()
	if (*kernel == "") == (*vmID == "") {
		fmt.Fprintln(os.Stderr, "forkd-example: give either -kernel or -vm")
		os.Exit(2)
	}
	// Ctrl-C cancels the context, and with it a running branch.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, *addr, *kernel, *bootArgs, *memMiB, bootDrives, *vmID, *snapshot, uint32(*forks)); err != nil {
		st := status.Convert(err)
		fmt.Fprintf(os.Stderr, "forkd-example: %s: %s\n", st.Code(), st.Message())
		os.Exit(1)
	}
}

func run(ctx context.Context, addr, kernel, bootArgs string, memMiB uint64, bootDrives drives, vmID, name string, forks uint32) error {
	c, err := forkd.Dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()

	if kernel != "" {
		callCtx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		vm, err := c.Boot(callCtx, &forkdv1.BootRequest{
			KernelImagePath: kernel, BootArgs: bootArgs,
			Machine: &forkdv1.MachineConfig{VcpuCount: 1, MemSizeMib: memMiB},
			Drives:  bootDrives,
		})
		if err != nil {
			return err
		}
		fmt.Printf("booted %s (%s)\n", vm.Id, vm.Name)
		vmID = vm.Id
	}

	b, err := c.Branch(ctx, &forkdv1.BranchRequest{VmId: vmID, SnapshotName: name})
	if err != nil {
		return err
	}
	fmt.Printf("branch %s: %s -> %s\n", b.ID(), vmID, name)
	for ev := range b.Events() {
		p := ev.GetProgress()
		phase := strings.TrimPrefix(ev.Phase.String(), "BRANCH_PHASE_")
		fmt.Printf("  %-14s %5d/%d MiB  pause %v\n", phase, p.GetBytesCopied()>>20, p.GetBytesTotal()>>20,
			time.Duration(ev.GetFigures().GetPauseNs()))
	}
	snap, err := b.Wait()
	if err != nil {
		return err
	}
	fmt.Printf("snapshot %s READY at %s (paused %v)\n", snap.Name, snap.Path, time.Duration(snap.Figures.PauseNs))

	if forks > 0 {
		callCtx, cancel := context.WithTimeout(ctx, 5*time.Minute)
		defer cancel()
		reply, err := c.Spawn(callCtx, &forkdv1.SpawnRequest{
			Snapshot: name, Count: forks, Backend: forkdv1.MemoryBackend_MEMORY_BACKEND_MEMFD})
		if err != nil {
			return err
		}
		for _, vm := range reply.Vms {
			fmt.Printf("spawned %s (%s)\n", vm.Id, vm.Name)
		}
	}
	return nil
}
