// Package forkd is a Go client for forkd, the daemon that live-branches running microVMs.
//
// It is a thin layer over the generated gRPC stubs in package forkdv1 (generated from
// proto/forkd/v1/forkd.proto, which documents every field and status code): requests and
// replies are the forkdv1 messages, deadlines come from the context, and errors are the
// daemon's gRPC statuses, so status.FromError and status.Code work on every error returned:
//
//	c, err := forkd.Dial("") // $FORKD_ADDR or unix:/run/forkd/forkd.sock
//	...
//	b, err := c.Branch(ctx, &forkdv1.BranchRequest{VmId: "vm-1", SnapshotName: "base"})
//	for ev := range b.Events() {
//		fmt.Println(ev.Phase, ev.Progress.GetBytesCopied())
//	}
//	snap, err := b.Wait()
//	if status.Code(err) == codes.FailedPrecondition { ... }
package forkd

import (
	"context"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"forkd.dev/forkd/clients/go/forkdv1"
)

// DefaultTarget is where forkd listens unless told otherwise.
const DefaultTarget = "unix:/run/forkd/forkd.sock"

// Target returns the address to dial for target: target itself if set, else $FORKD_ADDR,
// else DefaultTarget. A bare absolute path means a Unix socket.
func Target(target string) string {
	if target == "" {
		target = os.Getenv("FORKD_ADDR")
	}
	if target == "" {
		target = DefaultTarget
	}
	if strings.HasPrefix(target, "/") {
		target = "unix:" + target
	}
	return target
}

// Client is a connection to one forkd daemon. It is safe for concurrent use.
type Client struct {
	conn *grpc.ClientConn
	rpc  forkdv1.ForkdClient
}

// Dial connects to forkd at target (see Target). It does not wait for the daemon: the first
// call fails with codes.Unavailable if nobody answers. By default the connection is
// plaintext, as forkd serves on a Unix socket; pass grpc.WithTransportCredentials for a TLS
// listener (later options win).
func Dial(target string, opts ...grpc.DialOption) (*Client, error) {
	conn, err := grpc.Dial(Target(target), append([]grpc.DialOption{grpc.WithInsecure()}, opts...)...)
	if err != nil {
		return nil, err
	}
	return NewClient(conn), nil
}

// NewClient wraps a connection the caller dialled and owns.
func NewClient(conn *grpc.ClientConn) *Client {
	return &Client{conn: conn, rpc: forkdv1.NewForkdClient(conn)}
}

// Close closes the connection; running branch streams end with codes.Canceled.
func (c *Client) Close() error { return c.conn.Close() }

// RPC returns the generated client, for anything this package does not wrap.
func (c *Client) RPC() forkdv1.ForkdClient { return c.rpc }

// Info returns the daemon's version and what its host can do.
func (c *Client) Info(ctx context.Context) (*forkdv1.Info, error) {
	return c.rpc.GetInfo(ctx, &forkdv1.GetInfoRequest{})
}

// Boot boots a fresh VM and returns it once its vCPUs run.
func (c *Client) Boot(ctx context.Context, req *forkdv1.BootRequest) (*forkdv1.Vm, error) {
	return c.rpc.Boot(ctx, req)
}

// Spawn starts req.Count VMs restored from a READY snapshot, all or none. With req.Remote
// (backend UFFD only) the snapshot comes from the daemon's remote bucket chunk by chunk: the
// VMs start before its memory has arrived (see SpawnRequest.remote in the proto).
func (c *Client) Spawn(ctx context.Context, req *forkdv1.SpawnRequest) (*forkdv1.SpawnResponse, error) {
	return c.rpc.Spawn(ctx, req)
}

// ListVms returns every VM the daemon started, including exited ones not yet stopped. It
// follows the daemon's pages to the last one.
func (c *Client) ListVms(ctx context.Context) ([]*forkdv1.Vm, error) {
	var vms []*forkdv1.Vm
	token := ""
	for {
		reply, err := c.rpc.ListVms(ctx, &forkdv1.ListVmsRequest{PageToken: token})
		if err != nil {
			return nil, err
		}
		vms = append(vms, reply.GetVms()...)
		if token = reply.GetNextPageToken(); token == "" {
			return vms, nil
		}
	}
}

// GetVm returns one VM by id or name.
func (c *Client) GetVm(ctx context.Context, vm string) (*forkdv1.Vm, error) {
	return c.rpc.GetVm(ctx, &forkdv1.GetVmRequest{VmId: vm})
}

// StopVm stops a VM and forgets it, returning its last record. grace is how long its VMM
// gets between SIGTERM and SIGKILL; 0 means the daemon's default (2 s).
func (c *Client) StopVm(ctx context.Context, vm string, grace time.Duration) (*forkdv1.Vm, error) {
	reply, err := c.rpc.StopVm(ctx, &forkdv1.StopVmRequest{VmId: vm, GraceMs: uint32(grace.Milliseconds())})
	return reply.GetVm(), err
}

// ListSnapshots returns every snapshot, READY, WRITING and CORRUPT, sorted by name. It follows
// the daemon's pages to the last one.
func (c *Client) ListSnapshots(ctx context.Context) ([]*forkdv1.Snapshot, error) {
	var snapshots []*forkdv1.Snapshot
	token := ""
	for {
		reply, err := c.rpc.ListSnapshots(ctx, &forkdv1.ListSnapshotsRequest{PageToken: token})
		if err != nil {
			return nil, err
		}
		snapshots = append(snapshots, reply.GetSnapshots()...)
		if token = reply.GetNextPageToken(); token == "" {
			return snapshots, nil
		}
	}
}

// GetSnapshot returns one snapshot by name.
func (c *Client) GetSnapshot(ctx context.Context, name string) (*forkdv1.Snapshot, error) {
	return c.rpc.GetSnapshot(ctx, &forkdv1.GetSnapshotRequest{Name: name})
}

// DeleteSnapshot deletes a snapshot; force also when VMs use it or a branch writes it.
func (c *Client) DeleteSnapshot(ctx context.Context, name string, force bool) error {
	_, err := c.rpc.DeleteSnapshot(ctx, &forkdv1.DeleteSnapshotRequest{Name: name, Force: force})
	return err
}

// Branch starts branching a running VM into a new snapshot. It returns once the daemon
// accepted the branch (its first event, STARTED, carries the branch id) or refused it, with
// the refusal's status as the error. Cancelling ctx (or calling Cancel) aborts the branch
// and leaves no snapshot, unless req.Detach is set; then it goes on without the client and
// Watch re-attaches.
func (c *Client) Branch(ctx context.Context, req *forkdv1.BranchRequest) (*Branch, error) {
	ctx, cancel := context.WithCancel(ctx)
	stream, err := c.rpc.Branch(ctx, req)
	if err != nil {
		cancel()
		return nil, err
	}
	return follow(ctx, stream, cancel)
}

// Watch re-attaches to a branch by id or snapshot name: it replays the branch's phases so
// far, then follows it. Leaving a watch does not cancel the branch.
func (c *Client) Watch(ctx context.Context, req *forkdv1.WatchBranchRequest) (*Branch, error) {
	ctx, cancel := context.WithCancel(ctx)
	stream, err := c.rpc.WatchBranch(ctx, req)
	if err != nil {
		cancel()
		return nil, err
	}
	return follow(ctx, stream, cancel)
}

// Branch is a branch in progress: its events arrive on Events, in order, the channel
// closes when the stream ends, and Wait then tells how it ended.
type Branch struct {
	id       string
	events   chan *forkdv1.BranchEvent
	ctx      context.Context
	cancel   context.CancelFunc
	snapshot *forkdv1.Snapshot // written by the receiving goroutine before events closes
	err      error             // likewise
}

type eventStream interface {
	Recv() (*forkdv1.BranchEvent, error)
}

func follow(ctx context.Context, stream eventStream, cancel context.CancelFunc) (*Branch, error) {
	first, err := stream.Recv()
	if err != nil {
		cancel()
		return nil, err
	}
	// A small buffer lets the receiver run ahead of a slow reader; the daemon coalesces
	// progress events for slow readers anyway, so nothing piles up.
	b := &Branch{
		id:     first.GetBranchId(),
		events: make(chan *forkdv1.BranchEvent, 16),
		ctx:    ctx,
		cancel: cancel,
	}
	go b.receive(stream, first)
	return b, nil
}

func (b *Branch) receive(stream eventStream, ev *forkdv1.BranchEvent) {
	defer close(b.events)
	defer b.cancel() // releases the stream's context once the stream ended
	for {
		if ev.GetPhase() == forkdv1.BranchPhase_BRANCH_PHASE_DONE {
			b.snapshot = ev.GetSnapshot()
		}
		select {
		case b.events <- ev:
		case <-b.ctx.Done():
			// The caller gave up and may not read any more; the next Recv reports it.
		}
		var err error
		if ev, err = stream.Recv(); err != nil {
			b.err = err
			if err == io.EOF {
				b.err = nil
				if b.snapshot == nil {
					b.err = status.Error(codes.Unknown, "the branch stream ended without a DONE event")
				}
			}
			return
		}
	}
}

// ID is the branch's id, for Watch.
func (b *Branch) ID() string { return b.id }

// Events returns the branch's events. The channel is closed when the stream ends.
func (b *Branch) Events() <-chan *forkdv1.BranchEvent { return b.events }

// Wait reads the remaining events and returns the READY snapshot, or the status error the
// branch ended with (codes.Canceled after Cancel).
func (b *Branch) Wait() (*forkdv1.Snapshot, error) {
	for range b.events {
	}
	return b.snapshot, b.err
}

// Cancel leaves the stream. The daemon aborts the branch (VM resumed, no snapshot left)
// unless it was started detached or this is a watch.
func (b *Branch) Cancel() { b.cancel() }

// Push uploads a READY snapshot to the daemon's remote bucket (forkd's --remote-* flags),
// calling progress (may be nil) with each event, and returns the last one (Done set).
// Cancelling ctx stops the upload: no remote snapshot is left.
func (c *Client) Push(ctx context.Context, name string, progress func(*forkdv1.TransferEvent)) (*forkdv1.TransferEvent, error) {
	stream, err := c.rpc.Push(ctx, &forkdv1.PushRequest{SnapshotName: name})
	if err != nil {
		return nil, err
	}
	return followTransfer(stream, progress)
}

// Pull downloads a remote snapshot into the daemon's store, calling progress (may be nil)
// with each event; the last one (Done set) carries the local READY snapshot. A missing or
// corrupt chunk fails it with codes.DataLoss and leaves nothing.
func (c *Client) Pull(ctx context.Context, name string, progress func(*forkdv1.TransferEvent)) (*forkdv1.TransferEvent, error) {
	stream, err := c.rpc.Pull(ctx, &forkdv1.PullRequest{SnapshotName: name})
	if err != nil {
		return nil, err
	}
	return followTransfer(stream, progress)
}

type transferStream interface {
	Recv() (*forkdv1.TransferEvent, error)
}

func followTransfer(stream transferStream, progress func(*forkdv1.TransferEvent)) (*forkdv1.TransferEvent, error) {
	var last *forkdv1.TransferEvent
	for {
		ev, err := stream.Recv()
		if err == io.EOF {
			if last == nil || !last.GetDone() {
				return last, status.Error(codes.Unknown, "the transfer stream ended without a done event")
			}
			return last, nil
		}
		if err != nil {
			return last, err
		}
		last = ev
		if progress != nil {
			progress(ev)
		}
	}
}

// ListRemote returns the complete snapshots in the daemon's remote bucket, sorted by name.
func (c *Client) ListRemote(ctx context.Context) ([]*forkdv1.RemoteSnapshot, error) {
	reply, err := c.rpc.ListRemote(ctx, &forkdv1.ListRemoteRequest{})
	if err != nil {
		return nil, err
	}
	return reply.GetSnapshots(), nil
}

// DeleteRemote deletes a remote snapshot and the chunks no other remote snapshot uses.
func (c *Client) DeleteRemote(ctx context.Context, name string) (*forkdv1.DeleteRemoteResponse, error) {
	return c.rpc.DeleteRemote(ctx, &forkdv1.DeleteRemoteRequest{SnapshotName: name})
}
