/*
 * The page server's templates (see page_server_internal.h): the read-only mapping of a
 * snapshot's memory.bin that all its forks are served from, identified by path and by the
 * file's identity so a new file under an old name is never served the old mapping; the hot
 * set recorded from the first forks' faults (or seeded with the snapshot's own); and the
 * prefetch that copies that set into a new fork before it runs.
 */
#include "page_server_internal.h"

#include "basic/cleanup.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static int page_server_map_memory(struct page_server_template *t, const char *path,
                                  struct forkd_error *err)
{
    _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        return forkd_error_errno(err, -errno, "page server: open %s", path);
    if (st.st_size <= 0 || (uint64_t)st.st_size % PAGE_SERVER_SMALL_PAGE)
        return forkd_error_set(err, -EINVAL,
                               "page server: %s: size %lld is not a non-zero "
                               "multiple of 4096",
                               path, (long long)st.st_size);
    void *memory = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    if (memory == MAP_FAILED)
        return forkd_error_errno(err, -errno, "page server: mmap %s", path);
    t->memory = memory;
    t->size = (uint64_t)st.st_size;
    t->dev = st.st_dev;
    t->ino = st.st_ino;
    t->file_size = st.st_size;
    t->mtime = st.st_mtim;
    t->ctime = st.st_ctim;
    return 0;
}

static int page_server_template_new(const char *name, const char *path, unsigned times_mapped,
                                    struct page_server_template **out, struct forkd_error *err)
{
    struct page_server_template *t = calloc(1, sizeof(*t));
    if (!t)
        return forkd_error_set(err, -ENOMEM, "page server: out of memory");
    atomic_init(&t->refs, 1);
    pthread_mutex_init(&t->chunk_lock, NULL);
    snprintf(t->name, sizeof(t->name), "%s", name);
    snprintf(t->path, sizeof(t->path), "%s", path);
    t->times_mapped = times_mapped;
    int rc = page_server_map_memory(t, path, err);
    if (rc < 0) {
        pthread_mutex_destroy(&t->chunk_lock);
        free(t);
        return rc;
    }
    *out = t;
    return 0;
}

static bool page_server_same_time(struct timespec a, struct timespec b)
{
    return a.tv_sec == b.tv_sec && a.tv_nsec == b.tv_nsec;
}

/* The template's file is still the one mapped (same path, inode, size and change times; a lazy
 * template's file changes as its chunks arrive, so its times are not compared). */
static bool page_server_template_current(const struct page_server_template *t, const char *path)
{
    struct stat st;
    return strcmp(t->path, path) == 0 && stat(path, &st) == 0 && st.st_dev == t->dev &&
           st.st_ino == t->ino && st.st_size == t->file_size &&
           (t->chunk_ready || (page_server_same_time(st.st_mtim, t->mtime) &&
                               page_server_same_time(st.st_ctim, t->ctime)));
}

static struct page_server_template **page_server_template_slot(struct page_server *server,
                                                               const char *name)
{
    struct page_server_template **slot = &server->templates;
    while (*slot && strcmp((*slot)->name, name) != 0)
        slot = &(*slot)->next;
    return slot;
}

static int page_server_template_enable_recording(struct page_server_template *t, unsigned record_ms,
                                                 struct forkd_error *err)
{
    size_t words = (size_t)((t->size / PAGE_SERVER_SMALL_PAGE + 63) / 64);
    if (record_ms && !t->hot) {
        t->hot = calloc(words, sizeof(*t->hot));
        if (!t->hot)
            return forkd_error_set(err, -ENOMEM, "page server: out of memory");
    }
    t->record_ms = record_ms;
    return 0;
}

int page_server_template_get_locked(struct page_server *server, const char *name, const char *path,
                                    struct page_server_template **out, struct forkd_error *err)
{
    if (strlen(name) >= PAGE_SERVER_NAME_MAX)
        return forkd_error_set(err, -ENAMETOOLONG, "page server: template name too long");
    struct page_server_template **slot = page_server_template_slot(server, name);
    if (*slot && page_server_template_current(*slot, path)) {
        *out = *slot;
        return 0;
    }
    unsigned times = *slot ? (*slot)->times_mapped + 1 : 1;
    struct page_server_template *fresh = NULL;
    int rc = page_server_template_new(name, path, times, &fresh, err);
    if (rc < 0)
        return rc;
    if (*slot) { /* replaced on disk: the old mapping lives on for its forks */
        struct page_server_template *old = *slot;
        rc = page_server_template_enable_recording(fresh, old->record_ms, err);
        if (rc < 0) {
            page_server_template_unref(fresh);
            return rc;
        }
        fresh->next = old->next;
        page_server_template_unref(old);
    }
    *slot = fresh;
    *out = fresh;
    return 0;
}

int page_server_template_set_prefetch(struct page_server *server, const char *name,
                                      const char *memory_path, unsigned record_ms,
                                      struct forkd_error *err)
{
    pthread_mutex_lock(&server->lock);
    struct page_server_template *t = NULL;
    int rc = page_server_template_get_locked(server, name && *name ? name : memory_path,
                                             memory_path, &t, err);
    if (rc == 0)
        rc = page_server_template_enable_recording(t, record_ms, err);
    pthread_mutex_unlock(&server->lock);
    return rc;
}

int page_server_template_seed_hot(struct page_server *server, const char *name,
                                  const char *memory_path, const struct page_server_range *ranges,
                                  size_t count, struct forkd_error *err)
{
    pthread_mutex_lock(&server->lock);
    struct page_server_template *t = NULL;
    int rc = page_server_template_get_locked(server, name && *name ? name : memory_path,
                                             memory_path, &t, err);
    for (size_t i = 0; rc == 0 && i < count; i++)
        if (ranges[i].offset % PAGE_SERVER_SMALL_PAGE ||
            ranges[i].length % PAGE_SERVER_SMALL_PAGE || ranges[i].offset > t->size ||
            ranges[i].length > t->size - ranges[i].offset)
            rc = forkd_error_set(err, -EINVAL,
                                 "page server: template %s: hot range %zu [%" PRIu64 ", +%" PRIu64
                                 ") is not whole pages of its %" PRIu64 " bytes",
                                 t->name, i, ranges[i].offset, ranges[i].length, t->size);
    for (size_t i = 0; rc == 0 && t->hot && i < count; i++)
        for (uint64_t p = ranges[i].offset / PAGE_SERVER_SMALL_PAGE;
             p < (ranges[i].offset + ranges[i].length) / PAGE_SERVER_SMALL_PAGE; p++)
            if (page_server_bit_set(t->hot, p))
                page_server_count(&t->hot_pages, 1);
    if (rc == 0 && t->hot && count > 0)
        t->hot_seeded = true;
    pthread_mutex_unlock(&server->lock);
    return rc;
}

bool page_server_hot_ready(const struct page_server_template *t, uint64_t now)
{
    uint64_t ready = atomic_load(&t->hot_ready_ns);
    return ready != 0 && now >= ready;
}

int page_server_template_describe(struct page_server *server, const char *name,
                                  struct page_server_template_info *out)
{
    pthread_mutex_lock(&server->lock);
    struct page_server_template *t = *page_server_template_slot(server, name);
    if (t) {
        *out = (struct page_server_template_info){
            .memory_bytes = t->size,
            .times_mapped = t->times_mapped,
            .hot_pages = page_server_load(&t->hot_pages),
            .hot_set_ready =
                t->hot && (t->hot_seeded || page_server_hot_ready(t, page_server_now_ns())),
        };
        page_server_counters_read(&t->counters, &out->stats);
        out->stats.forks_active = atomic_load(&t->forks_active);
        out->stats.forks_total = atomic_load(&t->forks_total);
    }
    pthread_mutex_unlock(&server->lock);
    return t ? 0 : -ENOENT;
}

static int page_server_template_make_lazy(struct page_server_template *t,
                                          const struct page_server_lazy_source *source,
                                          struct forkd_error *err)
{
    if (source->chunk_size < PAGE_SERVER_HUGE_PAGE ||
        (source->chunk_size & (source->chunk_size - 1)) || !source->want ||
        source->chunk_count != (t->size + source->chunk_size - 1) / source->chunk_size)
        return forkd_error_set(err, -EINVAL,
                               "page server: lazy template %s: chunks do not cover its %" PRIu64
                               " bytes",
                               t->name, t->size);
    size_t words = (size_t)((source->chunk_count + 63) / 64);
    t->chunk_ready = calloc(words, sizeof(*t->chunk_ready));
    t->chunk_failed = calloc(words, sizeof(*t->chunk_failed));
    if (!t->chunk_ready || !t->chunk_failed)
        return forkd_error_set(err, -ENOMEM, "page server: out of memory");
    for (uint64_t c = 0; source->present && c < source->chunk_count; c++)
        if (source->present[c])
            atomic_fetch_or(&t->chunk_ready[c / 64], 1ULL << (c % 64));
    t->chunk_size = source->chunk_size;
    t->chunk_count = source->chunk_count;
    t->want = source->want;
    t->want_arg = source->arg;
    return 0;
}

int page_server_template_open_lazy(struct page_server *server, const char *name,
                                   const char *memory_path,
                                   const struct page_server_lazy_source *source,
                                   struct page_server_template **out, struct forkd_error *err)
{
    if (strlen(name) >= PAGE_SERVER_NAME_MAX)
        return forkd_error_set(err, -ENAMETOOLONG, "page server: template name too long");
    pthread_mutex_lock(&server->lock);
    struct page_server_template **slot = page_server_template_slot(server, name);
    unsigned times = *slot ? (*slot)->times_mapped + 1 : 1;
    struct page_server_template *fresh = NULL;
    int rc = server->closing ? forkd_error_set(err, -ESHUTDOWN, "page server: closing")
                             : page_server_template_new(name, memory_path, times, &fresh, err);
    if (rc == 0 && (rc = page_server_template_make_lazy(fresh, source, err)) < 0)
        page_server_template_unref(fresh);
    if (rc == 0) {
        if (*slot) { /* the old mapping lives on for its forks */
            struct page_server_template *old = *slot;
            fresh->next = old->next;
            page_server_template_unref(old);
        }
        *slot = fresh;
        atomic_fetch_add(&fresh->refs, 1); /* the caller's */
        *out = fresh;
    }
    pthread_mutex_unlock(&server->lock);
    return rc;
}

void page_server_template_release(struct page_server_template *t)
{
    page_server_template_unref(t);
}

int page_server_template_forget(struct page_server *server, const char *name)
{
    pthread_mutex_lock(&server->lock);
    struct page_server_template **slot = page_server_template_slot(server, name);
    struct page_server_template *t = *slot;
    if (t)
        *slot = t->next;
    pthread_mutex_unlock(&server->lock);
    page_server_template_unref(t);
    return t ? 0 : -ENOENT;
}

unsigned page_server_active_forks(struct page_server *server)
{
    return atomic_load(&server->active_forks);
}

/* ---------------------------------------------------------------- prefetch */

/* Any hot 4 KiB page in the file range [offset, offset + length). */
static bool page_server_hot_in(const struct page_server_template *t, uint64_t offset,
                               uint64_t length)
{
    for (uint64_t p = offset / PAGE_SERVER_SMALL_PAGE;
         p < (offset + length) / PAGE_SERVER_SMALL_PAGE; p++)
        if (page_server_bit_test(t->hot, p))
            return true;
    return false;
}

/* Copies one run of whole pages; pages already there are skipped. A page already present in
 * the middle of the run makes the kernel copy the pages before it and answer EAGAIN with their
 * count: go on after them (the present page then answers EEXIST and is stepped over). EAGAIN
 * with nothing copied (an event waits to be read) or another error ends the prefetch: the
 * rest is served on demand. */
static int page_server_prefetch_run(struct page_server_fork *fork, const struct uffd_region *r,
                                    uint64_t start, uint64_t length)
{
    const struct page_server_template *t = fork->template;
    while (length > 0) {
        struct uffdio_copy copy = {
            .dst = r->host_base + start,
            .src = (uint64_t)(uintptr_t)(t->memory + r->file_offset + start),
            .len = length,
        };
        int rc = ioctl(fork->handshake.uffd, UFFDIO_COPY, &copy) == 0 ? 0 : -errno;
        uint64_t done = copy.copy > 0 ? (uint64_t)copy.copy : 0;
        page_server_count(&fork->counters.bytes, done);
        page_server_count(&fork->counters.prefetched, done / r->page_size);
        if (rc == 0)
            return 0;
        if (rc == -EAGAIN && done > 0) {
            start += done;
            length -= done;
            continue;
        }
        if (rc != -EEXIST)
            return rc;
        done += r->page_size; /* the page that was there */
        start += done;
        length = length > done ? length - done : 0;
    }
    return 0;
}

/* Handshake thread, before the fork runs: copies every 64 KiB chunk holding a hot page, in
 * runs of adjacent chunks (at least 64 KiB per ioctl, at most PAGE_SERVER_PREFETCH_MAX_RUN). */
static int page_server_prefetch_region(struct page_server_fork *fork, const struct uffd_region *r)
{
    const struct page_server_template *t = fork->template;
    uint64_t chunk = r->page_size > PAGE_SERVER_PREFETCH_BATCH_BYTES
                         ? r->page_size
                         : PAGE_SERVER_PREFETCH_BATCH_BYTES;
    uint64_t run_start = 0, run_length = 0;
    for (uint64_t at = 0; at < r->size; at += chunk) {
        uint64_t length = r->size - at < chunk ? r->size - at : chunk;
        bool hot = page_server_hot_in(t, r->file_offset + at, length);
        if (hot && run_length == 0)
            run_start = at;
        if (hot)
            run_length += length;
        if (run_length &&
            (!hot || run_length >= PAGE_SERVER_PREFETCH_MAX_RUN || at + length >= r->size)) {
            int rc = page_server_prefetch_run(fork, r, run_start, run_length);
            if (rc < 0)
                return rc;
            run_length = 0;
        }
    }
    return 0;
}

void page_server_prefetch(struct page_server_fork *fork)
{
    for (size_t i = 0; i < fork->handshake.region_count; i++)
        if (page_server_prefetch_region(fork, &fork->handshake.regions[i]) < 0)
            break;
    struct page_server_counters *all = &fork->template->counters;
    page_server_count(&all->bytes, page_server_load(&fork->counters.bytes));
    page_server_count(&all->prefetched, page_server_load(&fork->counters.prefetched));
}
