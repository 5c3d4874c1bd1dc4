// Command forkd-example shows the Go client end to end: it boots a VM (or takes a running
// one), live-branches it while printing the branch's progress, and spawns forks from the
// new snapshot.
//
//	forkd-example -kernel /path/to/guest.bin -snapshot base -forks 2
//	forkd-example -kernel /path/to/vmlinux -drive id=rootfs,path=/images/root.ext4,ro,root \
//	    -net id=eth0,tap=tap0 -vsock cid=3,path=/run/agent.sock \
//	    -forks 4 -tap-pattern eth0=tap{i} -vsock-pattern /run/agent-{i}.sock
//	forkd-example -vm agent -snapshot step-2
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/status"

	"forkd.dev/forkd/clients/go/forkd"
	"forkd.dev/forkd/clients/go/forkdv1"
)

// options splits "key=value,flag,..." into values and flags, refusing unknown keys.
func options(text string, keys, flags []string) (map[string]string, error) {
	out := map[string]string{}
	for _, part := range strings.Split(text, ",") {
		key, value, isValue := strings.Cut(part, "=")
		known := false
		for _, k := range keys {
			known = known || (isValue && k == key)
		}
		for _, f := range flags {
			known = known || (!isValue && f == key)
		}
		if !known {
			return nil, fmt.Errorf("unknown option %q (known: %s=, %s)", part,
				strings.Join(keys, "=, "), strings.Join(flags, ", "))
		}
		out[key] = value
	}
	return out, nil
}

// drives collects -drive id=ID,path=PATH[,ro][,root] flags into BootRequest drives.
type drives []*forkdv1.Drive

func (d *drives) String() string { return fmt.Sprint(len(*d), " drives") }

func (d *drives) Set(text string) error {
	o, err := options(text, []string{"id", "path"}, []string{"ro", "root"})
	if err != nil {
		return err
	}
	_, ro := o["ro"]
	_, root := o["root"]
	*d = append(*d, &forkdv1.Drive{DriveId: o["id"], PathOnHost: o["path"], IsReadOnly: ro, IsRootDevice: root})
	return nil
}

// nets collects -net id=ID,tap=TAP[,mac=MAC] flags into BootRequest network interfaces.
type nets []*forkdv1.NetworkInterface

func (n *nets) String() string { return fmt.Sprint(len(*n), " network interfaces") }

func (n *nets) Set(text string) error {
	o, err := options(text, []string{"id", "tap", "mac"}, nil)
	if err != nil {
		return err
	}
	*n = append(*n, &forkdv1.NetworkInterface{IfaceId: o["id"], HostDevName: o["tap"], GuestMac: o["mac"]})
	return nil
}

// vsock takes -vsock cid=CID,path=PATH into BootRequest's vsock.
type vsock struct{ v *forkdv1.Vsock }

func (v *vsock) String() string { return fmt.Sprint(v.v) }

func (v *vsock) Set(text string) error {
	o, err := options(text, []string{"cid", "path"}, nil)
	if err != nil {
		return err
	}
	cid, err := strconv.ParseUint(o["cid"], 10, 32)
	if err != nil {
		return fmt.Errorf("cid: %v", err)
	}
	v.v = &forkdv1.Vsock{GuestCid: uint32(cid), UdsPath: o["path"]}
	return nil
}

// tapPatterns collects -tap-pattern IFACE=PATTERN flags into SpawnRequest network overrides:
// each fork's own tap, "{i}" being the fork's index.
type tapPatterns []*forkdv1.NetworkOverride

func (t *tapPatterns) String() string { return fmt.Sprint(len(*t), " tap patterns") }

func (t *tapPatterns) Set(text string) error {
	iface, pattern, ok := strings.Cut(text, "=")
	if !ok || iface == "" || pattern == "" {
		return fmt.Errorf("want IFACE=PATTERN, e.g. eth0=tap{i}")
	}
	*t = append(*t, &forkdv1.NetworkOverride{IfaceId: iface, HostDevName: pattern})
	return nil
}

// config is what the flags ask for.
type config struct {
	addr, kernel, bootArgs string
	memMiB                 uint64
	hugePages              bool
	drives                 drives
	nets                   nets
	vsock                  vsock
	vmID, snapshot         string
	forks                  uint
	tapPatterns            tapPatterns
	vsockPattern           string
}

func main() {
	var cfg config
	flag.StringVar(&cfg.addr, "addr", "", "forkd's address (default $FORKD_ADDR or "+forkd.DefaultTarget+")")
	flag.StringVar(&cfg.kernel, "kernel", "", "boot a new VM from this kernel or guest program")
	flag.StringVar(&cfg.bootArgs, "boot-args", "", "kernel command line or test guest workload")
	flag.Uint64Var(&cfg.memMiB, "mem", 128, "guest memory of the new VM, MiB")
	flag.BoolVar(&cfg.hugePages, "huge-pages", false,
		"back the new VM's memory with 2 MiB huge pages (the host needs that many free)")
	flag.StringVar(&cfg.vmID, "vm", "", "branch this running VM instead of booting one")
	flag.StringVar(&cfg.snapshot, "snapshot", "base", "name of the new snapshot")
	flag.UintVar(&cfg.forks, "forks", 0, "spawn this many MEMFD forks from the snapshot")
	flag.Var(&cfg.drives, "drive", "a drive of the new VM: id=ID,path=PATH[,ro][,root] (repeatable)")
	flag.Var(&cfg.nets, "net", "a network interface of the new VM: id=ID,tap=TAP[,mac=MAC] (repeatable)")
	flag.Var(&cfg.vsock, "vsock", "a vsock device of the new VM: cid=CID,path=PATH")
	flag.Var(&cfg.tapPatterns, "tap-pattern",
		"each fork's tap for an interface: IFACE=PATTERN, {i} the fork's index (repeatable)")
	flag.StringVar(&cfg.vsockPattern, "vsock-pattern", "",
		"each fork's vsock socket: a path with {i} (the fork's index) or {vm_id}")
	flag.Parse()
	if (cfg.kernel == "") == (cfg.vmID == "") {
		fmt.Fprintln(os.Stderr, "forkd-example: give either -kernel or -vm")
		os.Exit(2)
	}
	// Ctrl-C cancels the context, and with it a running branch.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, &cfg); err != nil {
		st := status.Convert(err)
		fmt.Fprintf(os.Stderr, "forkd-example: %s: %s\n", st.Code(), st.Message())
		os.Exit(1)
	}
}

func run(ctx context.Context, cfg *config) error {
	c, err := forkd.Dial(cfg.addr)
	if err != nil {
		return err
	}
	defer c.Close()

	vmID := cfg.vmID
	if cfg.kernel != "" {
		callCtx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		machine := &forkdv1.MachineConfig{VcpuCount: 1, MemSizeMib: cfg.memMiB}
		if cfg.hugePages {
			machine.HugePages = forkdv1.HugePages_HUGE_PAGES_2M
		}
		vm, err := c.Boot(callCtx, &forkdv1.BootRequest{
			KernelImagePath: cfg.kernel, BootArgs: cfg.bootArgs,
			Machine:           machine,
			Drives:            cfg.drives,
			NetworkInterfaces: cfg.nets,
			Vsock:             cfg.vsock.v,
		})
		if err != nil {
			return err
		}
		fmt.Printf("booted %s (%s)\n", vm.Id, vm.Name)
		vmID = vm.Id
	}

	b, err := c.Branch(ctx, &forkdv1.BranchRequest{VmId: vmID, SnapshotName: cfg.snapshot})
	if err != nil {
		return err
	}
	fmt.Printf("branch %s: %s -> %s\n", b.ID(), vmID, cfg.snapshot)
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

	if cfg.forks > 0 {
		callCtx, cancel := context.WithTimeout(ctx, 5*time.Minute)
		defer cancel()
		req := &forkdv1.SpawnRequest{
			Snapshot: cfg.snapshot, Count: uint32(cfg.forks),
			Backend:          forkdv1.MemoryBackend_MEMORY_BACKEND_MEMFD,
			NetworkOverrides: cfg.tapPatterns,
		}
		if cfg.vsockPattern != "" {
			req.VsockOverride = &forkdv1.VsockOverride{UdsPath: cfg.vsockPattern}
		}
		reply, err := c.Spawn(callCtx, req)
		if err != nil {
			return err
		}
		for _, vm := range reply.Vms {
			fmt.Printf("spawned %s (%s)", vm.Id, vm.Name)
			for _, n := range vm.NetworkInterfaces {
				fmt.Printf(" %s:%s", n.IfaceId, n.HostDevName)
			}
			if vm.Vsock != nil {
				fmt.Printf(" vsock:%s", vm.Vsock.UdsPath)
			}
			fmt.Println()
		}
	}
	return nil
}
