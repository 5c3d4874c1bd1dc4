/*
 * The page server: serves the memory of UFFD-backed forks on demand from one read-only mapping
 * of their template's memory.bin, for any number of forks, in one event loop.
 *
 * Model:
 * - A template is one memory.bin, mapped once (PROT_READ, MAP_SHARED: its pages are the page
 *   cache, shared by every fork) and named (the snapshot name). Forks of the same template
 *   share the mapping, the statistics summed over them, and the recorded hot set for prefetch.
 * - A fork is one VMM restored with backend_type "Uffd". page_server_fork_prepare creates a
 *   listening Unix socket for it; the caller passes that path to the VMM as backend_path
 *   (PUT /snapshot/load), then calls page_server_fork_wait_ready. The VMM connects and sends
 *   Firecracker's one-message handshake (a JSON array of region mappings, or {"mappings":
 *   [...]}, with its userfaultfd as SCM_RIGHTS) and keeps the socket open. The handshake is
 *   received by a short-lived thread of its own (bounded in time and size, SO_PEERCRED checked
 *   against the expected VMM pid), so a peer that never sends cannot stall anyone else; then
 *   the recorded hot pages are prefetched (if any), and the fork joins the event loop.
 * - The event loop (one thread, epoll) resolves MISSING faults of every fork with UFFDIO_COPY
 *   of the template page (page size from the mapping: 4 KiB or 2 MiB), EEXIST as done (wake),
 *   EAGAIN retried on the next round or by a timer (bounded), UFFD_EVENT_REMOVE recorded so
 *   that later faults in the range get zero pages. A fork whose VMM exits (hang-up of the
 *   handshake socket, ESRCH/ENOSPC from an ioctl) is dropped without disturbing the others:
 *   its fds and memory are released at once; its statistics stay readable until the owner
 *   releases it. UFFDIO_API / UFFDIO_REGISTER are never called on a received fd.
 * - Lazy templates (a snapshot whose memory is still arriving, see remote.h): memory.bin is
 *   mapped at its full size while its owner fills it chunk by chunk. A fault in a chunk not
 *   there yet asks the owner for it (want(), on the loop thread: it must not block) and waits,
 *   while the loop goes on serving every other fault; when the owner reports the chunk arrived,
 *   the waiting faults are served from the file. A fault in a chunk the owner reports failed
 *   ends that fork: its VMM is killed (through the pidfd given at prepare) and the reason kept
 *   (page_server_fork_memory_failed); a fork is never given bytes that did not arrive. Lazy
 *   templates have no hot-set recording or prefetch.
 * - Prefetch (optional, per template): the first forks of a template record which pages they
 *   fault during their first record_ms; forks prepared after that window get those pages
 *   copied in >= 64 KiB UFFDIO_COPY batches before they run. A template seeded with the
 *   snapshot's recorded hot set prefetches that from its first fork on.
 *
 * Using it (the service): one server per daemon (page_server_open at start-up, close at
 * shut-down after the VMs are stopped). Spawn(UFFD): vm_restore with memory = VM_MEMORY_UFFD
 * and config.page_server set does the whole fork side (socket, load, handshake, prefetch,
 * resume). GetVm: vm_page_server_stats. GetSnapshot: page_server_template_describe with the
 * snapshot name (-ENOENT: no UFFD fork yet, leave page_server unset). DeleteSnapshot:
 * page_server_template_forget. Prefetch for a snapshot: page_server_template_set_prefetch.
 *
 * Threads: any thread may call any function here. Statistics are atomics written by the loop
 * and read by anyone; the fault path takes no lock shared between forks.
 */
#ifndef FORKD_PAGE_SERVER_H
#define FORKD_PAGE_SERVER_H

#include "basic/error.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PAGE_SERVER_DEFAULT_HANDSHAKE_TIMEOUT_MS 10000
#define PAGE_SERVER_PREFETCH_BATCH_BYTES         (64 * 1024) /* smallest prefetch ioctl */

struct page_server;
struct page_server_fork;

struct page_server_config {
    /* A VMM must connect and send its whole handshake within this; 0 means the default. */
    int handshake_timeout_ms;
};

/* Figures of one fork, or summed over a template's forks (past and present). Maps onto the
 * proto's PageServerStats (the first seven fields); the rest are for tests and logs. */
struct page_server_stats {
    uint64_t faults_served;    /* demand faults resolved: copied, zero-filled or already there */
    uint64_t bytes_copied;     /* by UFFDIO_COPY, demand and prefetch */
    uint64_t pages_prefetched; /* copied before the fork ran (in the region's page size) */
    uint64_t zero_pages;       /* faults in removed ranges, served as zero pages */
    uint64_t service_p50_ns;   /* fault service time: from reading the fault to its ioctl done */
    uint64_t service_p99_ns;
    uint64_t service_max_ns;
    uint64_t already_present; /* EEXIST: another fault or the prefetch got there first */
    uint64_t retries;         /* EAGAIN answers, retried later */
    uint64_t remove_events;   /* UFFD_EVENT_REMOVE received */
    uint32_t forks_active;    /* template: forks being served now; fork: 1 while served */
    uint32_t forks_total;     /* template: forks that completed a handshake */
};

/* Facts about a template (for tests and GetSnapshot). */
struct page_server_template_info {
    uint64_t memory_bytes; /* size of memory.bin */
    unsigned times_mapped; /* how often memory.bin was opened and mapped under this name */
    uint64_t hot_pages;    /* 4 KiB pages in the recorded hot set */
    bool hot_set_ready;    /* new forks are prefetched (seeded, or the recording window closed) */
    struct page_server_stats stats;
};

/* Starts the server and its event-loop thread. */
int page_server_open(const struct page_server_config *config, struct page_server **out,
                     struct forkd_error *err);

/* Stops the loop, drops every fork (their VMMs hang on their next fault: stop them first),
 * waits for handshakes in flight (they are cancelled), and unmaps the templates. Forks still
 * held by owners stay valid for page_server_fork_stats / page_server_fork_release. */
void page_server_close(struct page_server *server);

/* Prefetch setting of a template (created if unknown, memory.bin mapped then): forks prepared
 * from now record the pages they fault during their first record_ms (0: recording and
 * prefetch off, the default), until the first recording fork's window has closed; forks
 * prepared after that are prefetched. */
int page_server_template_set_prefetch(struct page_server *server, const char *name,
                                      const char *memory_path, unsigned record_ms,
                                      struct forkd_error *err);

/* A run of memory.bin, in bytes (offset and length multiples of 4096). */
struct page_server_range {
    uint64_t offset, length;
};

/* Seeds the hot set of a template (created if unknown) with ranges of memory.bin known to be
 * hot already: the snapshot's recorded hot set. With prefetch on (page_server_template_set_
 * prefetch first), forks prepared from now are prefetched from the first one on, not only once
 * a recording window has closed; the first forks still record, adding the pages they fault
 * in. A template whose prefetch is off keeps no hot set: nothing happens then. -EINVAL (and
 * nothing marked) for a range that is not whole pages of memory.bin. */
int page_server_template_seed_hot(struct page_server *server, const char *name,
                                  const char *memory_path, const struct page_server_range *ranges,
                                  size_t count, struct forkd_error *err);

/* -ENOENT when no template has that name. */
int page_server_template_describe(struct page_server *server, const char *name,
                                  struct page_server_template_info *out);

/* Unlists a template (DeleteSnapshot); its mapping goes with its last fork. -ENOENT when
 * unknown. A later fork of the same name maps memory.bin afresh. */
int page_server_template_forget(struct page_server *server, const char *name);

/* Forks being served now, over all templates. */
unsigned page_server_active_forks(struct page_server *server);

struct page_server_fork_config {
    const char *template_name; /* the snapshot name; NULL or "": memory_path is the name */
    const char *memory_path;   /* memory.bin; mapped on the template's first fork */
    const char *socket_path;   /* where to listen (< 108 bytes); removed once accepted */
    pid_t vmm_pid;             /* SO_PEERCRED must match (0: any peer) */
    const int *vmm_pidfd;      /* the VMM's pidfd (dup'd); NULL: none (never killed) */
    const char *label;         /* for messages (the VM id); may be NULL */
};

/* Creates the fork's listening socket and starts receiving its handshake. The template is
 * found by name, or created (memory.bin opened and mapped) on first use; a template whose
 * memory.bin was replaced (another inode) is mapped afresh. *out holds the owner's reference.
 * Errors: -ENAMETOOLONG (socket path), -ENOENT/-EACCES (memory.bin), -ESHUTDOWN (closing). */
int page_server_fork_prepare(struct page_server *server,
                             const struct page_server_fork_config *config,
                             struct page_server_fork **out, struct forkd_error *err);

/* Waits (up to timeout_ms, -1: the handshake's own limit) until the fork's handshake was
 * received, checked and prefetched, and the loop serves it. Returns 0, or the handshake's
 * error with its message: -ETIMEDOUT (no peer, or it sent nothing/too little), -EPROTO (no fd,
 * several fds), -EINVAL (bad JSON, or regions beyond memory.bin), -ECONNRESET (the peer closed
 * mid-message), -EPERM (peer pid is not vmm_pid), -EMSGSIZE. */
int page_server_fork_wait_ready(struct page_server_fork *fork, int timeout_ms,
                                struct forkd_error *err);

struct uffd_region; /* the engine's userfaultfd region (internal) */

/* Serves again a fork that an earlier forkd served (forkd restarted): the VMM still holds its
 * userfaultfd, taken back from it (pidfd_getfd) as uffd, and its regions come from the VM's
 * record. The fork joins the loop at once, before this returns; every vCPU still waiting on a
 * fault that the earlier forkd read but never resolved is woken (UFFDIO_WAKE over every
 * region) and faults again, now served here. pidfd (the VMM's) replaces the handshake
 * connection: it turns readable when the VMM exits, and the fork is dropped. Takes uffd and
 * pidfd over, also on failure. Errors as page_server_fork_prepare, and -EINVAL for regions
 * beyond memory.bin. */
int page_server_fork_adopt(struct page_server *server, const struct page_server_fork_config *config,
                           const struct uffd_region *regions, size_t region_count, int uffd,
                           int pidfd, struct page_server_fork **out, struct forkd_error *err);

/* The regions the fork's handshake announced (up to max); returns how many there are. */
size_t page_server_fork_regions(const struct page_server_fork *fork, struct uffd_region *out,
                                size_t max);

/* The fork's figures (forks_active is 1 while it is served). */
void page_server_fork_stats(const struct page_server_fork *fork, struct page_server_stats *out);

/* The peer's pid from SO_PEERCRED (0 before the handshake), its guest memory size in bytes. */
pid_t page_server_fork_peer_pid(const struct page_server_fork *fork);
uint64_t page_server_fork_memory_bytes(const struct page_server_fork *fork);

/* True while the loop serves the fork (false before the handshake and once dropped). */
bool page_server_fork_active(const struct page_server_fork *fork);

/* Why the fork was dropped ("" while served): "peer hung up", "ESRCH", ... */
void page_server_fork_drop_reason(const struct page_server_fork *fork, char *out, size_t size);

/* True when the fork was ended because its memory could not be served (a lazy template's
 * chunk failed); why gets the reason. */
bool page_server_fork_memory_failed(const struct page_server_fork *fork, char *why, size_t size);

/* ---- lazy templates ---- */

struct page_server_template;

struct page_server_lazy_source {
    uint64_t chunk_size;  /* a power of two, at least 2 MiB (a huge page lies in one chunk) */
    uint64_t chunk_count; /* covers memory.bin's size */
    const bool *present;  /* chunk_count flags: chunks there from the start; NULL: none */
    /* Asks for a chunk (loop thread; must not block; may be asked again for the same one). */
    void (*want)(void *arg, uint64_t chunk);
    void *arg;
};

/* Lists a lazy template under name (replacing one of that name: its forks keep the old one),
 * memory.bin at memory_path already at its full size. *out is the caller's reference, for
 * page_server_chunk_arrived/failed; release it with page_server_template_release. Forks are
 * then prepared as usual, with this name and path. */
int page_server_template_open_lazy(struct page_server *server, const char *name,
                                   const char *memory_path,
                                   const struct page_server_lazy_source *source,
                                   struct page_server_template **out, struct forkd_error *err);

/* The chunk's bytes are in memory.bin (written before this call): its waiting faults are
 * served. */
void page_server_chunk_arrived(struct page_server *server, struct page_server_template *t,
                               uint64_t chunk);

/* The chunk cannot be had: every fork faulting in it, now or later, is ended with why (the
 * template's first failure's reason). */
void page_server_chunk_failed(struct page_server *server, struct page_server_template *t,
                              uint64_t chunk, const char *why);

void page_server_template_release(struct page_server_template *t);

/* Drops the owner's reference: a pending handshake is cancelled, a served fork is dropped
 * from the loop (asynchronously: its fds are closed by the loop thread). NULL is a no-op. */
void page_server_fork_release(struct page_server_fork *fork);

#ifdef __cplusplus
}
#endif

#endif
