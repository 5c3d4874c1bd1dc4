/* Remote snapshots in an S3 bucket: layout, Push, Pull, ListRemote, DeleteRemote (see
 * forkd/remote.h). */
#include "forkd/remote.h"

#include "hot_set.h"
#include "s3.h"

#include "forkd/page_server.h"

#include "basic/cleanup.h"
#include "basic/clock.h"
#include "basic/fsutil.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define REMOTE_FORMAT            "forkd.remote-snapshot.v1"
#define REMOTE_MANIFEST_MAX      ((size_t)64 << 20)
#define REMOTE_METADATA_MAX      ((size_t)1 << 20)
#define REMOTE_VMSTATE_MAX       ((uint64_t)1 << 30)
#define REMOTE_MEMORY_MAX        ((uint64_t)1 << 40)
#define REMOTE_DEFAULT_PARALLEL  4
#define REMOTE_DEFAULT_RETRIES   4
#define REMOTE_DEFAULT_MULTIPART ((uint64_t)64 << 20)
#define REMOTE_HASH_HEX          65 /* 64 hex digits and the NUL */

struct remote {
    struct s3_config s3;
    unsigned parallel;
    uint64_t multipart_bytes;
};

int remote_open(const struct remote_config *config, struct remote **out, struct forkd_error *err)
{
    *out = NULL;
    if (!config->endpoint || !*config->endpoint || !config->bucket || !*config->bucket)
        return forkd_error_set(err, -EINVAL,
                               "a remote needs --remote-endpoint and --remote-bucket");
    _cleanup_free_ struct remote *remote = calloc(1, sizeof(*remote));
    if (!remote)
        return forkd_error_set(err, -ENOMEM, "remote: out of memory");
    const char *region = config->region && *config->region ? config->region : "us-east-1";
    if (strlen(config->endpoint) >= sizeof(remote->s3.endpoint) ||
        strlen(region) >= sizeof(remote->s3.region) ||
        strlen(config->bucket) >= sizeof(remote->s3.bucket))
        return forkd_error_set(err, -EINVAL,
                               "--remote-endpoint, --remote-region or "
                               "--remote-bucket is too long");
    snprintf(remote->s3.endpoint, sizeof(remote->s3.endpoint), "%s", config->endpoint);
    snprintf(remote->s3.region, sizeof(remote->s3.region), "%s", region);
    snprintf(remote->s3.bucket, sizeof(remote->s3.bucket), "%s", config->bucket);
    remote->s3.retries = config->retries ? config->retries : REMOTE_DEFAULT_RETRIES;
    int rc = s3_config_check(&remote->s3, err);
    if (rc == 0)
        rc = s3_credentials_load(&remote->s3, config->credentials_file, err);
    if (rc < 0)
        return rc;
    remote->parallel = config->parallel ? config->parallel : REMOTE_DEFAULT_PARALLEL;
    if (remote->parallel > REMOTE_PARALLEL_MAX)
        remote->parallel = REMOTE_PARALLEL_MAX;
    remote->multipart_bytes =
        config->multipart_bytes ? config->multipart_bytes : REMOTE_DEFAULT_MULTIPART;
    *out = take_ptr(remote);
    return 0;
}

void remote_close(struct remote *remote)
{
    if (!remote)
        return;
    explicit_bzero(&remote->s3, sizeof(remote->s3));
    free(remote);
}

/* ---- names, hashes, the manifest ---------------------------------------------------------- */

static void remote_manifest_key(const char *name, char *out, size_t size)
{
    snprintf(out, size, "snapshots/%s/manifest.json", name);
}

static void remote_vmstate_key(const char *name, char *out, size_t size)
{
    snprintf(out, size, "snapshots/%s/vmstate", name);
}

static void remote_chunk_key(const char *hash, char *out, size_t size)
{
    snprintf(out, size, "chunks/%s", hash);
}

static void remote_hex(const unsigned char *digest, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        out[2 * i] = digits[digest[i] >> 4];
        out[2 * i + 1] = digits[digest[i] & 15];
    }
    out[64] = '\0';
}

static int remote_sha256(const void *data, size_t length, char *hex, struct forkd_error *err)
{
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (!EVP_Digest(data, length, digest, &n, EVP_sha256(), NULL) || n != 32)
        return forkd_error_set(err, -EIO, "sha256 failed");
    remote_hex(digest, hex);
    return 0;
}

static bool remote_valid_hash(const char *hash)
{
    if (strlen(hash) != 64)
        return false;
    for (const char *c = hash; *c; c++)
        if (!((*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'f')))
            return false;
    return true;
}

static bool remote_all_zero(const unsigned char *data, size_t length)
{
    const uint64_t *words = (const uint64_t *)data;
    size_t n = length / 8;
    for (size_t i = 0; i < n; i++)
        if (words[i])
            return false;
    for (size_t i = n * 8; i < length; i++)
        if (data[i])
            return false;
    return true;
}

struct remote_manifest {
    char name[STORE_NAME_MAX + 1];
    uint64_t chunk_size, memory_bytes, vmstate_bytes, chunk_count;
    char vmstate_sha256[REMOTE_HASH_HEX];
    char (*chunks)[REMOTE_HASH_HEX]; /* "" for an all-zero chunk */
    char *snapshot_json;             /* snapshot.json's text */
};

static void remote_manifest_free(struct remote_manifest *manifest)
{
    free(manifest->chunks);
    free(manifest->snapshot_json);
    manifest->chunks = NULL;
    manifest->snapshot_json = NULL;
}

static bool remote_json_u64(const cJSON *object, const char *field, uint64_t *out)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(object, field);
    if (!cJSON_IsNumber(item) || item->valuedouble < 0 || item->valuedouble > 9007199254740992.0)
        return false;
    *out = (uint64_t)item->valuedouble;
    return (double)*out == item->valuedouble;
}

/* Parses and checks a manifest (every field, the chunk count against the memory size). */
static int remote_manifest_parse(const char *text, const char *key, struct remote_manifest *out,
                                 struct forkd_error *err)
{
    memset(out, 0, sizeof(*out));
    cJSON *root = cJSON_Parse(text);
    if (!root)
        return forkd_error_set(err, -EIO, "%s: not JSON", key);
    int rc = -EIO;
    const char *why = NULL;
    const cJSON *format = cJSON_GetObjectItemCaseSensitive(root, "format");
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(root, "name");
    const cJSON *vmstate = cJSON_GetObjectItemCaseSensitive(root, "vmstate");
    const cJSON *chunks = cJSON_GetObjectItemCaseSensitive(root, "chunks");
    const cJSON *snapshot = cJSON_GetObjectItemCaseSensitive(root, "snapshot");
    const cJSON *vmstate_hash = cJSON_GetObjectItemCaseSensitive(vmstate, "sha256");
    if (!cJSON_IsString(format) || strcmp(format->valuestring, REMOTE_FORMAT) != 0)
        why = "format is not " REMOTE_FORMAT;
    else if (!cJSON_IsString(name) || store_validate_name(name->valuestring, NULL) < 0)
        why = "bad name";
    else if (!remote_json_u64(root, "chunk_size", &out->chunk_size) || out->chunk_size < 4096 ||
             out->chunk_size > ((uint64_t)64 << 20) || (out->chunk_size & (out->chunk_size - 1)))
        why = "bad chunk_size";
    else if (!remote_json_u64(root, "memory_bytes", &out->memory_bytes) ||
             out->memory_bytes > REMOTE_MEMORY_MAX)
        why = "bad memory_bytes";
    else if (!cJSON_IsObject(vmstate) || !remote_json_u64(vmstate, "bytes", &out->vmstate_bytes) ||
             out->vmstate_bytes > REMOTE_VMSTATE_MAX || !cJSON_IsString(vmstate_hash) ||
             !remote_valid_hash(vmstate_hash->valuestring))
        why = "bad vmstate";
    else if (!cJSON_IsArray(chunks) ||
             (uint64_t)cJSON_GetArraySize(chunks) !=
                 (out->memory_bytes + out->chunk_size - 1) / out->chunk_size)
        why = "the chunk index does not cover memory_bytes";
    else if (!cJSON_IsObject(snapshot))
        why = "no snapshot";
    if (why) {
        forkd_error_set(err, -EIO, "%s: %s", key, why);
        goto out;
    }
    snprintf(out->name, sizeof(out->name), "%s", name->valuestring);
    snprintf(out->vmstate_sha256, sizeof(out->vmstate_sha256), "%s", vmstate_hash->valuestring);
    out->chunk_count = (uint64_t)cJSON_GetArraySize(chunks);
    out->chunks = calloc(out->chunk_count ? out->chunk_count : 1, sizeof(*out->chunks));
    out->snapshot_json = cJSON_PrintUnformatted(snapshot);
    if (!out->chunks || !out->snapshot_json) {
        rc = forkd_error_set(err, -ENOMEM, "%s: out of memory", key);
        goto out;
    }
    uint64_t i = 0;
    const cJSON *chunk;
    cJSON_ArrayForEach(chunk, chunks)
    {
        if (!cJSON_IsString(chunk) ||
            (chunk->valuestring[0] && !remote_valid_hash(chunk->valuestring))) {
            rc = forkd_error_set(err, -EIO, "%s: chunk %" PRIu64 " is not a sha256", key, i);
            goto out;
        }
        snprintf(out->chunks[i++], REMOTE_HASH_HEX, "%s", chunk->valuestring);
    }
    rc = 0;
out:
    cJSON_Delete(root);
    if (rc < 0)
        remote_manifest_free(out);
    return rc;
}

/* GETs and parses the manifest of name. -ENOENT when there is none. */
static int remote_manifest_get(struct s3_client *client, const char *name,
                               struct remote_manifest *out, struct forkd_error *err)
{
    char key[S3_KEY_MAX];
    remote_manifest_key(name, key, sizeof(key));
    _cleanup_free_ char *text = NULL;
    size_t length = 0;
    int rc = s3_get_alloc(client, key, REMOTE_MANIFEST_MAX, &text, &length, err);
    if (rc == -ENOENT)
        return forkd_error_set(err, -ENOENT, "no remote snapshot '%s' in the bucket", name);
    if (rc < 0)
        return rc;
    rc = remote_manifest_parse(text, key, out, err);
    if (rc == 0 && strcmp(out->name, name) != 0) {
        remote_manifest_free(out);
        return forkd_error_set(err, -EIO, "%s names another snapshot", key);
    }
    return rc;
}

/* ---- parallel chunk transfers ------------------------------------------------------------- */

struct remote_job;

struct remote_worker {
    struct remote_job *job;
    struct s3_client *client;
    unsigned char *buffer; /* one chunk */
    pthread_t thread;
    bool started;
};

struct remote_job {
    struct remote *remote;
    const char *verb; /* "push" or "pull" */
    const char *name;
    atomic_bool stop;
    atomic_uint_fast64_t next;
    uint64_t chunk_count, memory_bytes;
    int memory_fd;
    char (*chunks)[REMOTE_HASH_HEX];
    int (*work)(struct remote_worker *worker, uint64_t index, struct forkd_error *err);

    atomic_uint_fast64_t bytes_done, bytes_transferred, chunks_done, chunks_skipped, chunks_zero;

    pthread_mutex_t lock; /* guards the fields below */
    pthread_cond_t changed;
    unsigned running;
    struct forkd_error error; /* the first failure */
};

/* Bytes of chunk index in memory of memory_bytes (the last one may be short). */
static uint64_t remote_chunk_length(uint64_t memory_bytes, uint64_t index)
{
    uint64_t left = memory_bytes - index * REMOTE_CHUNK_SIZE;
    return left < REMOTE_CHUNK_SIZE ? left : REMOTE_CHUNK_SIZE;
}

static void *remote_worker_main(void *arg)
{
    struct remote_worker *worker = arg;
    struct remote_job *job = worker->job;
    struct forkd_error err = {0};
    int rc = 0;
    while (rc == 0 && !atomic_load(&job->stop)) {
        uint64_t index = atomic_fetch_add(&job->next, 1);
        if (index >= job->chunk_count)
            break;
        uint64_t before =
            s3_client_bytes_sent(worker->client) + s3_client_bytes_received(worker->client);
        rc = job->work(worker, index, &err);
        atomic_fetch_add(&job->bytes_transferred, s3_client_bytes_sent(worker->client) +
                                                      s3_client_bytes_received(worker->client) -
                                                      before);
        if (rc == 0) {
            atomic_fetch_add(&job->bytes_done, remote_chunk_length(job->memory_bytes, index));
            atomic_fetch_add(&job->chunks_done, 1);
        }
    }
    pthread_mutex_lock(&job->lock);
    if (rc < 0 && (job->error.code == 0 || job->error.code == -ECANCELED)) {
        job->error = err;
        forkd_error_prefix(&job->error, "%s '%s': ", job->verb, job->name);
    }
    if (rc < 0)
        atomic_store(&job->stop, true);
    job->running--;
    pthread_cond_broadcast(&job->changed);
    pthread_mutex_unlock(&job->lock);
    return NULL;
}

static void remote_progress_fill(const struct remote_job *job, uint64_t extra_total,
                                 uint64_t extra_done, uint64_t extra_transferred, uint64_t start_ns,
                                 struct remote_progress *out)
{
    *out = (struct remote_progress){
        .bytes_total = job->memory_bytes + extra_total,
        .bytes_done = atomic_load(&job->bytes_done) + extra_done,
        .bytes_transferred = atomic_load(&job->bytes_transferred) + extra_transferred,
        .chunks_total = job->chunk_count,
        .chunks_done = atomic_load(&job->chunks_done),
        .chunks_skipped = atomic_load(&job->chunks_skipped),
        .chunks_zero = atomic_load(&job->chunks_zero),
        .elapsed_ns = forkd_monotonic_ns() - start_ns,
    };
}

static bool remote_control_cancelled(const struct remote_transfer_control *control)
{
    return control && control->cancelled && control->cancelled(control->arg);
}

static void remote_control_report(const struct remote_transfer_control *control,
                                  const struct remote_progress *progress)
{
    if (control && control->progress)
        control->progress(progress, control->arg);
}

/* Runs job->work on every chunk with the remote's workers, reporting progress from this thread.
 * Returns 0 or the first failure (-ECANCELED when the caller cancelled). */
static int remote_job_run(struct remote_job *job, const struct remote_transfer_control *control,
                          uint64_t vmstate_bytes, uint64_t start_ns, struct forkd_error *err)
{
    unsigned count = job->remote->parallel;
    if (count > job->chunk_count)
        count = (unsigned)job->chunk_count;
    struct remote_worker workers[REMOTE_PARALLEL_MAX] = {0};
    int rc = 0;
    for (unsigned i = 0; i < count && rc == 0; i++) {
        workers[i].job = job;
        workers[i].buffer = malloc(REMOTE_CHUNK_SIZE);
        if (!workers[i].buffer)
            rc = forkd_error_set(err, -ENOMEM, "%s '%s': out of memory", job->verb, job->name);
        else
            rc = s3_client_new(&job->remote->s3, &job->stop, &workers[i].client, err);
    }
    for (unsigned i = 0; i < count && rc == 0; i++) {
        pthread_mutex_lock(&job->lock);
        job->running++;
        pthread_mutex_unlock(&job->lock);
        int e = pthread_create(&workers[i].thread, NULL, remote_worker_main, &workers[i]);
        if (e) {
            pthread_mutex_lock(&job->lock);
            job->running--;
            pthread_mutex_unlock(&job->lock);
            atomic_store(&job->stop, true);
            rc = forkd_error_errno(err, -e, "%s '%s': start a transfer thread", job->verb,
                                   job->name);
            break;
        }
        workers[i].started = true;
    }
    unsigned interval = control && control->interval_ms ? control->interval_ms : 100;
    bool cancelled = false;
    pthread_mutex_lock(&job->lock);
    while (job->running > 0) {
        struct timespec deadline = forkd_realtime_after_ms((int)interval);
        pthread_cond_timedwait(&job->changed, &job->lock, &deadline);
        pthread_mutex_unlock(&job->lock);
        if (!cancelled && remote_control_cancelled(control)) {
            cancelled = true;
            atomic_store(&job->stop, true);
        }
        struct remote_progress progress;
        remote_progress_fill(job, vmstate_bytes, 0, 0, start_ns, &progress);
        remote_control_report(control, &progress);
        pthread_mutex_lock(&job->lock);
    }
    pthread_mutex_unlock(&job->lock);
    for (unsigned i = 0; i < count; i++) {
        if (workers[i].started)
            pthread_join(workers[i].thread, NULL);
        s3_client_free(workers[i].client);
        free(workers[i].buffer);
    }
    if (rc < 0)
        return rc;
    if (cancelled || remote_control_cancelled(control))
        return forkd_error_set(err, -ECANCELED, "%s '%s': cancelled", job->verb, job->name);
    if (job->error.code < 0) {
        *err = job->error;
        return job->error.code;
    }
    return 0;
}

/* ---- Push --------------------------------------------------------------------------------- */

static int remote_read_full(int fd, void *buffer, size_t length, uint64_t offset)
{
    size_t done = 0;
    while (done < length) {
        ssize_t n = pread(fd, (char *)buffer + done, length - done, (off_t)(offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0)
            return -EIO;
        done += (size_t)n;
    }
    return 0;
}

static int remote_push_chunk(struct remote_worker *worker, uint64_t index, struct forkd_error *err)
{
    struct remote_job *job = worker->job;
    uint64_t length = remote_chunk_length(job->memory_bytes, index);
    int rc = remote_read_full(job->memory_fd, worker->buffer, length, index * REMOTE_CHUNK_SIZE);
    if (rc < 0)
        return forkd_error_errno(err, rc, "read chunk %" PRIu64 " of memory.bin", index);
    if (remote_all_zero(worker->buffer, length)) {
        job->chunks[index][0] = '\0';
        atomic_fetch_add(&job->chunks_zero, 1);
        return 0;
    }
    rc = remote_sha256(worker->buffer, length, job->chunks[index], err);
    if (rc < 0)
        return rc;
    char key[S3_KEY_MAX];
    remote_chunk_key(job->chunks[index], key, sizeof(key));
    uint64_t size = 0;
    rc = s3_head(worker->client, key, &size, err);
    if (rc == 0 && size == length) {
        atomic_fetch_add(&job->chunks_skipped, 1);
        return 0;
    }
    if (rc < 0 && rc != -ENOENT)
        return rc;
    return s3_put(worker->client, key, worker->buffer, length, err);
}

/* sha256 of a whole file, streaming. */
static int remote_sha256_file(int fd, uint64_t length, char *hex, struct forkd_error *err)
{
    EVP_MD_CTX *context = EVP_MD_CTX_new();
    _cleanup_free_ unsigned char *buffer = malloc(1 << 20);
    int rc = 0;
    if (!context || !buffer || !EVP_DigestInit_ex(context, EVP_sha256(), NULL))
        rc = forkd_error_set(err, -ENOMEM, "sha256: out of memory");
    for (uint64_t offset = 0; rc == 0 && offset < length;) {
        size_t n = length - offset < (1u << 20) ? (size_t)(length - offset) : (1u << 20);
        rc = remote_read_full(fd, buffer, n, offset);
        if (rc < 0)
            forkd_error_errno(err, rc, "read vmstate");
        else if (!EVP_DigestUpdate(context, buffer, n))
            rc = forkd_error_set(err, -EIO, "sha256 failed");
        offset += n;
    }
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (rc == 0 && (!EVP_DigestFinal_ex(context, digest, &n) || n != 32))
        rc = forkd_error_set(err, -EIO, "sha256 failed");
    if (rc == 0)
        remote_hex(digest, hex);
    EVP_MD_CTX_free(context);
    return rc;
}

static int remote_read_text(const char *path, size_t max, char **out, struct forkd_error *err)
{
    _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return forkd_error_errno(err, -errno, "open %s", path);
    struct stat st;
    if (fstat(fd, &st) < 0)
        return forkd_error_errno(err, -errno, "stat %s", path);
    if ((uint64_t)st.st_size > max)
        return forkd_error_set(err, -EFBIG, "%s is larger than %zu bytes", path, max);
    char *text = malloc((size_t)st.st_size + 1);
    if (!text)
        return forkd_error_set(err, -ENOMEM, "read %s: out of memory", path);
    int rc = remote_read_full(fd, text, (size_t)st.st_size, 0);
    if (rc < 0) {
        free(text);
        return forkd_error_errno(err, rc, "read %s", path);
    }
    text[st.st_size] = '\0';
    *out = text;
    return 0;
}

static char *remote_manifest_text(const struct remote_job *job, const char *name,
                                  const char *snapshot_json, uint64_t vmstate_bytes,
                                  const char *vmstate_hash)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *snapshot = cJSON_Parse(snapshot_json);
    cJSON *vmstate = cJSON_CreateObject();
    cJSON *chunks = cJSON_CreateArray();
    char *text = NULL;
    if (!root || !snapshot || !vmstate || !chunks) {
        cJSON_Delete(snapshot);
        cJSON_Delete(vmstate);
        cJSON_Delete(chunks);
        goto out;
    }
    cJSON_AddStringToObject(root, "format", REMOTE_FORMAT);
    cJSON_AddStringToObject(root, "name", name);
    cJSON_AddNumberToObject(root, "chunk_size", (double)REMOTE_CHUNK_SIZE);
    cJSON_AddNumberToObject(root, "memory_bytes", (double)job->memory_bytes);
    cJSON_AddNumberToObject(vmstate, "bytes", (double)vmstate_bytes);
    cJSON_AddStringToObject(vmstate, "sha256", vmstate_hash);
    cJSON_AddItemToObject(root, "vmstate", vmstate);
    for (uint64_t i = 0; i < job->chunk_count; i++) {
        cJSON *item = cJSON_CreateString(job->chunks[i]);
        if (!item || !cJSON_AddItemToArray(chunks, item)) {
            cJSON_Delete(item);
            break;
        }
    }
    cJSON_AddItemToObject(root, "chunks", chunks);
    cJSON_AddItemToObject(root, "snapshot", snapshot);
    if ((uint64_t)cJSON_GetArraySize(chunks) == job->chunk_count)
        text = cJSON_PrintUnformatted(root);
out:
    cJSON_Delete(root);
    return text;
}

static void remote_job_init(struct remote_job *job, struct remote *remote, const char *verb,
                            const char *name)
{
    memset(job, 0, sizeof(*job));
    job->remote = remote;
    job->verb = verb;
    job->name = name;
    job->memory_fd = -1;
    pthread_mutex_init(&job->lock, NULL);
    pthread_cond_init(&job->changed, NULL);
}

static void remote_job_destroy(struct remote_job *job)
{
    pthread_mutex_destroy(&job->lock);
    pthread_cond_destroy(&job->changed);
    free(job->chunks);
    if (job->memory_fd >= 0)
        close(job->memory_fd);
}

static int remote_push_files(struct remote *remote, struct s3_client *client,
                             struct remote_job *job, const struct store_snapshot *record,
                             const struct remote_transfer_control *control,
                             struct remote_progress *final, struct forkd_error *err)
{
    const char *name = record->name;
    uint64_t start_ns = forkd_monotonic_ns();
    char key[S3_KEY_MAX], path[PATH_MAX];
    remote_manifest_key(name, key, sizeof(key));
    int rc = s3_head(client, key, NULL, err);
    if (rc == 0)
        return forkd_error_set(err, -EEXIST, "the bucket already holds a snapshot '%s'", name);
    if (rc != -ENOENT)
        return rc;
    _cleanup_free_ char *snapshot_json = NULL;
    rc = store_file_path(record->path, STORE_FILE_METADATA, path, sizeof(path));
    if (rc == 0)
        rc = remote_read_text(path, REMOTE_METADATA_MAX, &snapshot_json, err);
    if (rc < 0)
        return rc;
    if ((rc = store_file_path(record->path, STORE_FILE_MEMORY, path, sizeof(path))) < 0)
        return forkd_error_set(err, rc, "memory.bin path too long");
    job->memory_fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (job->memory_fd < 0)
        return forkd_error_errno(err, -errno, "open %s", path);
    struct stat st;
    if (fstat(job->memory_fd, &st) < 0)
        return forkd_error_errno(err, -errno, "stat %s", path);
    job->memory_bytes = (uint64_t)st.st_size;
    if (job->memory_bytes > REMOTE_MEMORY_MAX)
        return forkd_error_set(err, -EFBIG, "%s: larger than a remote snapshot may be", path);
    job->chunk_count = (job->memory_bytes + REMOTE_CHUNK_SIZE - 1) / REMOTE_CHUNK_SIZE;
    job->chunks = calloc(job->chunk_count ? job->chunk_count : 1, sizeof(*job->chunks));
    if (!job->chunks)
        return forkd_error_set(err, -ENOMEM, "push '%s': out of memory", name);
    if ((rc = store_file_path(record->path, STORE_FILE_VMSTATE, path, sizeof(path))) < 0)
        return forkd_error_set(err, rc, "vmstate path too long");
    _cleanup_close_ int vmstate_fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (vmstate_fd < 0 || fstat(vmstate_fd, &st) < 0)
        return forkd_error_errno(err, -errno, "open %s", path);
    uint64_t vmstate_bytes = (uint64_t)st.st_size;
    if (vmstate_bytes > REMOTE_VMSTATE_MAX)
        return forkd_error_set(err, -EFBIG, "%s: larger than a remote snapshot may be", path);

    job->work = remote_push_chunk;
    rc = remote_job_run(job, control, vmstate_bytes, start_ns, err);
    if (rc < 0)
        return rc;
    char vmstate_hash[REMOTE_HASH_HEX];
    rc = remote_sha256_file(vmstate_fd, vmstate_bytes, vmstate_hash, err);
    if (rc < 0)
        return rc;
    uint64_t before = s3_client_bytes_sent(client);
    remote_vmstate_key(name, key, sizeof(key));
    rc = s3_put_file(client, key, vmstate_fd, vmstate_bytes, (size_t)remote->multipart_bytes, err);
    if (rc < 0)
        return forkd_error_prefix(err, "push '%s': ", name);
    uint64_t vmstate_sent = s3_client_bytes_sent(client) - before;
    if (remote_control_cancelled(control))
        return forkd_error_set(err, -ECANCELED, "push '%s': cancelled", name);
    _cleanup_free_ char *manifest =
        remote_manifest_text(job, name, snapshot_json, vmstate_bytes, vmstate_hash);
    if (!manifest)
        return forkd_error_set(err, -EIO,
                               "push '%s': cannot build the manifest (snapshot.json "
                               "unreadable or out of memory)",
                               name);
    remote_manifest_key(name, key, sizeof(key));
    before = s3_client_bytes_sent(client);
    rc = s3_put(client, key, manifest, strlen(manifest), err);
    if (rc < 0)
        return forkd_error_prefix(err, "push '%s': ", name);
    struct remote_progress progress;
    remote_progress_fill(job, vmstate_bytes, vmstate_bytes,
                         vmstate_sent + s3_client_bytes_sent(client) - before, start_ns, &progress);
    remote_control_report(control, &progress);
    if (final)
        *final = progress;
    return 0;
}

int remote_push(struct remote *remote, struct store *store, const char *name,
                const struct remote_transfer_control *control, struct remote_progress *final,
                struct forkd_error *err)
{
    struct store_snapshot record;
    int rc = store_acquire(store, name, &record, err);
    if (rc < 0)
        return rc;
    struct s3_client *client = NULL;
    struct remote_job job;
    remote_job_init(&job, remote, "push", name);
    rc = s3_client_new(&remote->s3, &job.stop, &client, err);
    if (rc == 0)
        rc = remote_push_files(remote, client, &job, &record, control, final, err);
    s3_client_free(client);
    remote_job_destroy(&job);
    store_release(store, name);
    return rc;
}

/* ---- Pull --------------------------------------------------------------------------------- */

/* GETs chunk index (hash, length bytes) into buffer and checks its size and sha256: -EIO for
 * a missing or corrupt one, naming it. */
static int remote_fetch_chunk(struct s3_client *client, unsigned char *buffer, uint64_t index,
                              const char *hash, uint64_t length, struct forkd_error *err)
{
    char key[S3_KEY_MAX];
    remote_chunk_key(hash, key, sizeof(key));
    size_t got = 0;
    int rc = s3_get(client, key, 0, 0, buffer, REMOTE_CHUNK_SIZE, &got, err);
    if (rc == -ENOENT)
        return forkd_error_set(err, -EIO, "chunk %" PRIu64 " (%s) is missing from the bucket",
                               index, key);
    if (rc == -EFBIG)
        return forkd_error_set(err, -EIO,
                               "chunk %" PRIu64 " (%s) is corrupt: larger than a "
                               "chunk",
                               index, key);
    if (rc < 0)
        return rc;
    char actual[REMOTE_HASH_HEX];
    if (got != length)
        return forkd_error_set(err, -EIO,
                               "chunk %" PRIu64 " (%s) is corrupt: %zu bytes, expected %" PRIu64,
                               index, key, got, length);
    rc = remote_sha256(buffer, length, actual, err);
    if (rc < 0)
        return rc;
    if (strcmp(actual, hash) != 0)
        return forkd_error_set(err, -EIO, "chunk %" PRIu64 " (%s) is corrupt: its sha256 is %s",
                               index, key, actual);
    return 0;
}

static int remote_pull_chunk(struct remote_worker *worker, uint64_t index, struct forkd_error *err)
{
    struct remote_job *job = worker->job;
    uint64_t length = remote_chunk_length(job->memory_bytes, index);
    const char *hash = job->chunks[index];
    if (!hash[0]) { /* all zero: the file's hole already reads as zero */
        atomic_fetch_add(&job->chunks_zero, 1);
        return 0;
    }
    int rc = remote_fetch_chunk(worker->client, worker->buffer, index, hash, length, err);
    if (rc < 0)
        return rc;
    rc = fs_pwrite_all(job->memory_fd, worker->buffer, length, (off_t)(index * REMOTE_CHUNK_SIZE));
    if (rc < 0)
        return forkd_error_errno(err, rc, "write chunk %" PRIu64 " into memory.bin", index);
    return 0;
}

/* The part of a pull before the memory moves: checks the manifest's snapshot.json against it
 * (meta gets it), fetches and checks the vmstate into the writer's directory, and creates
 * memory.bin at its full size (a hole reads as zeros) as *memory_fd. */
static int remote_pull_begin(struct s3_client *client, const struct remote_manifest *manifest,
                             struct store_writer *writer, struct store_snapshot *meta,
                             size_t *vmstate_bytes, int *memory_fd, struct forkd_error *err)
{
    const char *name = manifest->name;
    int rc =
        store_parse_metadata(manifest->snapshot_json, strlen(manifest->snapshot_json), meta, err);
    if (rc < 0)
        return forkd_error_prefix(err, "pull '%s': the manifest's snapshot.json: ", name);
    if (strcmp(meta->name, name) != 0 || meta->memory_bytes != manifest->memory_bytes ||
        meta->vmstate_bytes != manifest->vmstate_bytes)
        return forkd_error_set(err, -EIO,
                               "pull '%s': the manifest's snapshot.json does not "
                               "match its name or sizes",
                               name);
    if (manifest->chunk_size != REMOTE_CHUNK_SIZE)
        return forkd_error_set(err, -EIO,
                               "pull '%s': chunks of %" PRIu64 " bytes (this forkd "
                               "reads %" PRIu64 ")",
                               name, manifest->chunk_size, REMOTE_CHUNK_SIZE);
    /* vmstate first: small, and a bad one fails the pull before the memory moves. */
    char key[S3_KEY_MAX];
    remote_vmstate_key(name, key, sizeof(key));
    _cleanup_free_ char *vmstate = NULL;
    size_t vmstate_length = 0;
    rc = s3_get_alloc(client, key, (size_t)manifest->vmstate_bytes, &vmstate, &vmstate_length, err);
    if (rc == -ENOENT || rc == -EFBIG)
        return forkd_error_set(err, -EIO, "pull '%s': %s is %s", name, key,
                               rc == -ENOENT ? "missing" : "larger than the manifest says");
    if (rc < 0)
        return forkd_error_prefix(err, "pull '%s': ", name);
    char hash[REMOTE_HASH_HEX];
    if (vmstate_length != manifest->vmstate_bytes ||
        remote_sha256(vmstate, vmstate_length, hash, err) < 0 ||
        strcmp(hash, manifest->vmstate_sha256) != 0)
        return forkd_error_set(err, -EIO, "pull '%s': %s is corrupt (size or sha256)", name, key);
    _cleanup_close_ int vmstate_fd =
        open(store_writer_vmstate_path(writer), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (vmstate_fd < 0)
        return forkd_error_errno(err, -errno, "create %s", store_writer_vmstate_path(writer));
    rc = fs_write_all(vmstate_fd, vmstate, vmstate_length);
    if (rc < 0)
        return forkd_error_errno(err, rc, "write %s", store_writer_vmstate_path(writer));
    *vmstate_bytes = vmstate_length;
    *memory_fd =
        open(store_writer_memory_path(writer), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (*memory_fd < 0)
        return forkd_error_errno(err, -errno, "create %s", store_writer_memory_path(writer));
    if (ftruncate(*memory_fd, (off_t)manifest->memory_bytes) < 0)
        return forkd_error_errno(err, -errno, "size %s", store_writer_memory_path(writer));
    return 0;
}

static int remote_pull_files(struct remote *remote, struct s3_client *client,
                             struct remote_job *job, struct remote_manifest *manifest,
                             struct store_writer **writer_slot,
                             const struct remote_transfer_control *control,
                             struct remote_progress *final, struct forkd_error *err)
{
    (void)remote;
    struct store_writer *writer = *writer_slot;
    uint64_t start_ns = forkd_monotonic_ns();
    const char *name = manifest->name;
    struct store_snapshot meta;
    size_t vmstate_length = 0;
    int rc =
        remote_pull_begin(client, manifest, writer, &meta, &vmstate_length, &job->memory_fd, err);
    if (rc < 0)
        return rc;
    job->memory_bytes = manifest->memory_bytes;
    job->chunk_count = manifest->chunk_count;
    job->chunks = manifest->chunks;
    manifest->chunks = NULL; /* the job frees it */
    job->work = remote_pull_chunk;
    atomic_store(&job->bytes_transferred, vmstate_length);
    rc = remote_job_run(job, control, vmstate_length, start_ns, err);
    if (rc < 0)
        return rc;
    if (store_writer_abandoned(writer))
        return forkd_error_set(err, -ECANCELED, "pull '%s': deleted while being written", name);
    *writer_slot = NULL; /* store_publish frees the writer, on success and failure alike */
    rc = store_publish(writer, &meta, err);
    if (rc < 0)
        return rc;
    struct remote_progress progress;
    remote_progress_fill(job, vmstate_length, vmstate_length, 0, start_ns, &progress);
    remote_control_report(control, &progress);
    if (final)
        *final = progress;
    return 0;
}

int remote_pull(struct remote *remote, struct store *store, const char *name,
                const struct remote_transfer_control *control, struct remote_progress *final,
                struct forkd_error *err)
{
    int rc = store_validate_name(name, err);
    if (rc < 0)
        return rc;
    struct remote_job job;
    remote_job_init(&job, remote, "pull", name);
    struct s3_client *client = NULL;
    struct remote_manifest manifest = {0};
    struct store_writer *writer = NULL;
    struct store_snapshot existing;
    struct forkd_error ignored = {0};
    if (store_get(store, name, &existing, &ignored) == 0)
        rc = forkd_error_set(err, -EEXIST,
                             "pull '%s': the store already has a snapshot of "
                             "that name",
                             name);
    if (rc == 0)
        rc = s3_client_new(&remote->s3, &job.stop, &client, err);
    if (rc == 0 && (rc = remote_manifest_get(client, name, &manifest, err)) < 0 && rc != -ENOENT)
        forkd_error_prefix(err, "pull '%s': ", name);
    if (rc == 0)
        rc = store_begin(store, name, &writer, err);
    if (rc == 0) {
        rc = remote_pull_files(remote, client, &job, &manifest, &writer, control, final, err);
    }
    if (writer)
        store_abort(writer);
    s3_client_free(client);
    remote_manifest_free(&manifest);
    remote_job_destroy(&job);
    return rc;
}

/* ---- Lazy pull (a pull forks run on while it proceeds) -------------------------------------- */

/* Each worker takes the chunks the page server asked for first (the oldest request first), then
 * the next chunk of the hot set not taken yet (in file order), then the next chunk in file order
 * not taken yet; a chunk is taken once (claimed), so it is fetched once and every fault waiting
 * on it is served when it arrives. */
struct remote_lazy_worker {
    struct remote_lazy *lazy;
    struct s3_client *client;
    unsigned char *buffer;
    pthread_t thread;
    bool started;
};

struct remote_lazy {
    struct remote *remote;
    struct store *store;
    struct page_server *server;
    struct page_server_template *template;
    struct remote_manifest manifest;
    struct store_snapshot meta;
    struct store_writer *writer; /* until published or aborted by the last worker */
    char memory_path[PATH_MAX], vmstate_path[PATH_MAX], dir[PATH_MAX];
    int memory_fd;
    atomic_bool stop;
    atomic_uchar *claimed;       /* per chunk: a worker took it (zero chunks from the start) */
    atomic_uchar *asked;         /* per chunk: in the request queue once */
    atomic_uint_fast64_t cursor; /* the next chunk in file order */
    uint64_t *hot_chunks;        /* the hot set's non-zero chunks, ascending */
    uint64_t hot_count;
    bool *hot;                       /* per chunk: in hot_chunks */
    atomic_uint_fast64_t hot_cursor; /* the next of hot_chunks */
    atomic_uint_fast64_t chunks_fetched, chunks_failed, bytes_fetched, chunks_demanded;
    atomic_uint_fast64_t hot_settled, hot_fetched; /* hot chunks arrived or failed; arrived */
    atomic_uint_fast64_t hot_done_ns;              /* since start_ns, once all settled; else 0 */
    uint64_t chunks_zero;
    uint64_t start_ns;
    struct remote_lazy_worker workers[REMOTE_PARALLEL_MAX];
    unsigned worker_count;

    pthread_mutex_t lock; /* guards the fields below */
    uint64_t *requests;   /* ring of chunk_count entries: each chunk is queued at most once */
    uint64_t request_head, request_count;
    unsigned running;
    /* Spawns restoring forks on the WRITING files (remote_lazy_hold): the pull publishes or
     * aborts, which moves or removes those files, only once none holds it. */
    unsigned holds;
    bool workers_done;    /* every worker ended: the end waits only for the holds */
    bool finishing;       /* remote_lazy_finish began: no new hold */
    pthread_cond_t ended; /* broadcast when result leaves 1 */
    int result;           /* 1 while fetching, 0 READY in the store, -errno failed (error) */
    struct forkd_error error;
    uint64_t done_ns;
};

/* The page server's want(): queues a chunk no worker has taken (loop thread: never blocks on
 * the network; the lock is held by workers only to pop a request). */
static void remote_lazy_want(void *arg, uint64_t chunk)
{
    struct remote_lazy *lazy = arg;
    if (chunk >= lazy->manifest.chunk_count || atomic_load(&lazy->claimed[chunk]) ||
        atomic_exchange(&lazy->asked[chunk], 1))
        return;
    pthread_mutex_lock(&lazy->lock);
    uint64_t n = lazy->manifest.chunk_count;
    lazy->requests[(lazy->request_head + lazy->request_count) % n] = chunk;
    lazy->request_count++;
    pthread_mutex_unlock(&lazy->lock);
}

/* The next chunk for a worker to fetch: false when every chunk is taken. */
static bool remote_lazy_next(struct remote_lazy *lazy, uint64_t *chunk)
{
    uint64_t n = lazy->manifest.chunk_count;
    for (;;) {
        pthread_mutex_lock(&lazy->lock);
        bool requested = lazy->request_count > 0;
        if (requested) {
            *chunk = lazy->requests[lazy->request_head];
            lazy->request_head = (lazy->request_head + 1) % n;
            lazy->request_count--;
        }
        pthread_mutex_unlock(&lazy->lock);
        if (!requested) {
            uint64_t hot = atomic_fetch_add(&lazy->hot_cursor, 1);
            *chunk =
                hot < lazy->hot_count ? lazy->hot_chunks[hot] : atomic_fetch_add(&lazy->cursor, 1);
            if (*chunk >= n)
                return false;
        }
        if (!atomic_exchange(&lazy->claimed[*chunk], 1)) {
            if (requested)
                atomic_fetch_add(&lazy->chunks_demanded, 1);
            return true;
        }
    }
}

/* A hot chunk arrived or failed: the moment the last one did is the hot set's time. */
static void remote_lazy_hot_settled(struct remote_lazy *lazy, uint64_t chunk, bool arrived)
{
    if (!lazy->hot[chunk])
        return;
    if (arrived)
        atomic_fetch_add(&lazy->hot_fetched, 1);
    if (atomic_fetch_add(&lazy->hot_settled, 1) + 1 == lazy->hot_count)
        atomic_store(&lazy->hot_done_ns, forkd_monotonic_ns() - lazy->start_ns);
}

static void remote_lazy_fetch(struct remote_lazy_worker *worker, uint64_t chunk)
{
    struct remote_lazy *lazy = worker->lazy;
    uint64_t offset = chunk * REMOTE_CHUNK_SIZE;
    uint64_t length = remote_chunk_length(lazy->manifest.memory_bytes, chunk);
    struct forkd_error err = {0};
    int rc = remote_fetch_chunk(worker->client, worker->buffer, chunk, lazy->manifest.chunks[chunk],
                                length, &err);
    if (rc == 0) {
        rc = fs_pwrite_all(lazy->memory_fd, worker->buffer, length, (off_t)offset);
        if (rc < 0)
            forkd_error_errno(&err, rc, "write chunk %" PRIu64 " into memory.bin", chunk);
    }
    if (rc == 0) {
        atomic_fetch_add(&lazy->chunks_fetched, 1);
        atomic_fetch_add(&lazy->bytes_fetched, length);
        page_server_chunk_arrived(lazy->server, lazy->template, chunk);
        remote_lazy_hot_settled(lazy, chunk, true);
        return;
    }
    /* The reason is kept before the failure is counted or a fork ended for it: a Spawn that
     * sees either reads the reason with it (remote_lazy_state). */
    struct forkd_error named = err;
    forkd_error_prefix(&named, "lazy pull '%s': ", lazy->manifest.name);
    pthread_mutex_lock(&lazy->lock);
    if (lazy->error.code == 0)
        lazy->error = named;
    pthread_mutex_unlock(&lazy->lock);
    atomic_fetch_add(&lazy->chunks_failed, 1);
    remote_lazy_hot_settled(lazy, chunk, false);
    /* Without the pull's name: the reason ends up in a fork's exit_reason (128 bytes), and the
     * fork names its snapshot itself. */
    page_server_chunk_failed(lazy->server, lazy->template, chunk, err.message);
}

/* The last worker: READY when every chunk arrived and matched, otherwise the store is left
 * clean (the forks already running keep their mapping of the unlinked file). Either way the
 * page server forgets the lazy template: later forks map the published memory.bin. */
static void remote_lazy_finish(struct remote_lazy *lazy)
{
    struct forkd_error err = {0};
    int rc = 0;
    pthread_mutex_lock(&lazy->lock);
    if (lazy->error.code < 0) {
        err = lazy->error;
        rc = err.code;
    }
    pthread_mutex_unlock(&lazy->lock);
    if (rc == 0 && atomic_load(&lazy->stop))
        rc = forkd_error_set(&err, -ECANCELED, "lazy pull '%s': stopped", lazy->manifest.name);
    if (rc == 0 && store_writer_abandoned(lazy->writer))
        rc = forkd_error_set(&err, -ECANCELED, "lazy pull '%s': deleted while being written",
                             lazy->manifest.name);
    struct store_writer *writer = lazy->writer;
    lazy->writer = NULL;
    if (rc == 0)
        rc = store_publish(writer, &lazy->meta, &err); /* frees the writer either way */
    else
        store_abort(writer);
    page_server_template_forget(lazy->server, lazy->manifest.name);
    pthread_mutex_lock(&lazy->lock);
    lazy->result = rc;
    if (rc < 0)
        lazy->error = err;
    lazy->done_ns = forkd_monotonic_ns();
    pthread_cond_broadcast(&lazy->ended);
    pthread_mutex_unlock(&lazy->lock);
}

/* A worker ended (or never started): the last one finishes the pull unless a Spawn holds it,
 * in which case the last release does. */
static void remote_lazy_worker_ended(struct remote_lazy *lazy)
{
    pthread_mutex_lock(&lazy->lock);
    bool finish = --lazy->running == 0 && lazy->holds == 0;
    lazy->workers_done = lazy->running == 0;
    lazy->finishing |= finish;
    pthread_mutex_unlock(&lazy->lock);
    if (finish)
        remote_lazy_finish(lazy);
}

int remote_lazy_hold(struct remote_lazy *lazy)
{
    pthread_mutex_lock(&lazy->lock);
    bool open = !lazy->finishing;
    lazy->holds += open;
    pthread_mutex_unlock(&lazy->lock);
    return open ? 0 : -EALREADY;
}

void remote_lazy_release(struct remote_lazy *lazy)
{
    pthread_mutex_lock(&lazy->lock);
    bool finish = --lazy->holds == 0 && lazy->workers_done && !lazy->finishing;
    lazy->finishing |= finish;
    pthread_mutex_unlock(&lazy->lock);
    if (finish)
        remote_lazy_finish(lazy);
}

void remote_lazy_wait(struct remote_lazy *lazy)
{
    pthread_mutex_lock(&lazy->lock);
    while (lazy->result == 1)
        pthread_cond_wait(&lazy->ended, &lazy->lock);
    pthread_mutex_unlock(&lazy->lock);
}

static void *remote_lazy_worker_main(void *arg)
{
    struct remote_lazy_worker *worker = arg;
    struct remote_lazy *lazy = worker->lazy;
    uint64_t chunk;
    while (!atomic_load(&lazy->stop) && remote_lazy_next(lazy, &chunk))
        remote_lazy_fetch(worker, chunk);
    if (atomic_load(&lazy->stop)) { /* what nobody took will never come: fail its faults */
        for (uint64_t c = 0; c < lazy->manifest.chunk_count; c++)
            if (!atomic_exchange(&lazy->claimed[c], 1))
                page_server_chunk_failed(lazy->server, lazy->template, c,
                                         "lazy pull stopped (forkd shutting down)");
    }
    remote_lazy_worker_ended(lazy);
    return NULL;
}

static void remote_lazy_destroy(struct remote_lazy *lazy)
{
    for (unsigned i = 0; i < lazy->worker_count; i++) {
        s3_client_free(lazy->workers[i].client);
        free(lazy->workers[i].buffer);
    }
    if (lazy->writer)
        store_abort(lazy->writer);
    if (lazy->memory_fd >= 0)
        close(lazy->memory_fd);
    page_server_template_release(lazy->template);
    remote_manifest_free(&lazy->manifest);
    free(lazy->claimed);
    free(lazy->asked);
    free(lazy->requests);
    free(lazy->hot_chunks);
    free(lazy->hot);
    pthread_cond_destroy(&lazy->ended);
    pthread_mutex_destroy(&lazy->lock);
    free(lazy);
}

/* Lists the lazy template: its zero chunks are there from the start. */
static int remote_lazy_open_template(struct remote_lazy *lazy, struct forkd_error *err)
{
    uint64_t n = lazy->manifest.chunk_count;
    _cleanup_free_ bool *present = calloc(n ? n : 1, sizeof(*present));
    if (!present)
        return forkd_error_set(err, -ENOMEM, "lazy pull: out of memory");
    for (uint64_t c = 0; c < n; c++) {
        present[c] = !lazy->manifest.chunks[c][0];
        if (present[c])
            atomic_store(&lazy->claimed[c], 1);
        lazy->chunks_zero += present[c];
    }
    struct page_server_lazy_source source = {
        .chunk_size = REMOTE_CHUNK_SIZE,
        .chunk_count = n,
        .present = present,
        .want = remote_lazy_want,
        .arg = lazy,
    };
    return page_server_template_open_lazy(lazy->server, lazy->manifest.name, lazy->memory_path,
                                          &source, &lazy->template, err);
}

static int remote_lazy_start_workers(struct remote_lazy *lazy, struct forkd_error *err)
{
    unsigned count = lazy->remote->parallel;
    if (count > lazy->manifest.chunk_count)
        count = lazy->manifest.chunk_count ? (unsigned)lazy->manifest.chunk_count : 1;
    for (unsigned i = 0; i < count; i++) {
        struct remote_lazy_worker *w = &lazy->workers[i];
        w->lazy = lazy;
        lazy->worker_count = i + 1;
        w->buffer = malloc(REMOTE_CHUNK_SIZE);
        if (!w->buffer)
            return forkd_error_set(err, -ENOMEM, "lazy pull: out of memory");
        int rc = s3_client_new(&lazy->remote->s3, &lazy->stop, &w->client, err);
        if (rc < 0)
            return rc;
    }
    /* Started last, all or none would need joins on failure: the first failure stops the ones
     * started (they see stop) and the caller joins them through remote_lazy_free. */
    for (unsigned i = 0; i < count; i++) {
        pthread_mutex_lock(&lazy->lock);
        lazy->running++;
        pthread_mutex_unlock(&lazy->lock);
        int e = pthread_create(&lazy->workers[i].thread, NULL, remote_lazy_worker_main,
                               &lazy->workers[i]);
        if (e) {
            atomic_store(&lazy->stop, true);
            forkd_error_errno(err, -e, "lazy pull: start a fetch thread");
            remote_lazy_worker_ended(lazy);
            return -e;
        }
        lazy->workers[i].started = true;
    }
    return 0;
}

/* The hot set's chunks that hold something (an all-zero one is there from the start), in file
 * order: fetched before the rest. The manifest's snapshot.json was checked, so the ranges lie
 * within memory_bytes, which the manifest's chunks cover. */
static void remote_lazy_plan_hot(struct remote_lazy *lazy)
{
    uint64_t n = hot_set_chunks(&lazy->meta, REMOTE_CHUNK_SIZE, lazy->manifest.chunk_count,
                                lazy->hot_chunks);
    lazy->hot_count = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t c = lazy->hot_chunks[i];
        if (!lazy->manifest.chunks[c][0])
            continue;
        lazy->hot_chunks[lazy->hot_count++] = c;
        lazy->hot[c] = true;
    }
}

static int remote_lazy_prepare(struct remote_lazy *lazy, const char *name, struct forkd_error *err)
{
    struct s3_client *client = NULL;
    int rc = s3_client_new(&lazy->remote->s3, &lazy->stop, &client, err);
    if (rc == 0 && (rc = remote_manifest_get(client, name, &lazy->manifest, err)) < 0 &&
        rc != -ENOENT)
        forkd_error_prefix(err, "lazy pull '%s': ", name);
    if (rc == 0)
        rc = store_begin(lazy->store, name, &lazy->writer, err);
    size_t vmstate_bytes = 0;
    if (rc == 0)
        rc = remote_pull_begin(client, &lazy->manifest, lazy->writer, &lazy->meta, &vmstate_bytes,
                               &lazy->memory_fd, err);
    s3_client_free(client);
    if (rc < 0)
        return rc;
    snprintf(lazy->memory_path, sizeof(lazy->memory_path), "%s",
             store_writer_memory_path(lazy->writer));
    snprintf(lazy->vmstate_path, sizeof(lazy->vmstate_path), "%s",
             store_writer_vmstate_path(lazy->writer));
    snprintf(lazy->dir, sizeof(lazy->dir), "%s", store_writer_dir(lazy->writer));
    uint64_t n = lazy->manifest.chunk_count;
    lazy->claimed = calloc(n ? n : 1, sizeof(*lazy->claimed));
    lazy->asked = calloc(n ? n : 1, sizeof(*lazy->asked));
    lazy->requests = calloc(n ? n : 1, sizeof(*lazy->requests));
    lazy->hot_chunks = calloc(n ? n : 1, sizeof(*lazy->hot_chunks));
    lazy->hot = calloc(n ? n : 1, sizeof(*lazy->hot));
    if (!lazy->claimed || !lazy->asked || !lazy->requests || !lazy->hot_chunks || !lazy->hot)
        return forkd_error_set(err, -ENOMEM, "lazy pull: out of memory");
    remote_lazy_plan_hot(lazy);
    rc = remote_lazy_open_template(lazy, err);
    if (rc == 0)
        rc = remote_lazy_start_workers(lazy, err);
    return rc;
}

int remote_lazy_start(struct remote *remote, struct store *store, struct page_server *server,
                      const char *name, struct remote_lazy **out, struct forkd_error *err)
{
    *out = NULL;
    int rc = store_validate_name(name, err);
    if (rc < 0)
        return rc;
    struct store_snapshot existing;
    struct forkd_error ignored = {0};
    if (store_get(store, name, &existing, &ignored) == 0)
        return forkd_error_set(err, existing.state == STORE_STATE_WRITING ? -EAGAIN : -EEXIST,
                               "lazy pull '%s': the store already has a snapshot of that name "
                               "(%s)",
                               name,
                               existing.state == STORE_STATE_WRITING ? "being written" : "ready");
    struct remote_lazy *lazy = calloc(1, sizeof(*lazy));
    if (!lazy)
        return forkd_error_set(err, -ENOMEM, "lazy pull: out of memory");
    lazy->remote = remote;
    lazy->store = store;
    lazy->server = server;
    lazy->memory_fd = -1;
    lazy->result = 1;
    lazy->start_ns = forkd_monotonic_ns();
    pthread_mutex_init(&lazy->lock, NULL);
    pthread_cond_init(&lazy->ended, NULL);
    rc = remote_lazy_prepare(lazy, name, err);
    if (rc < 0) {
        remote_lazy_free(lazy);
        return rc;
    }
    *out = lazy;
    return 0;
}

void remote_lazy_free(struct remote_lazy *lazy)
{
    if (!lazy)
        return;
    atomic_store(&lazy->stop, true);
    for (unsigned i = 0; i < lazy->worker_count; i++)
        if (lazy->workers[i].started)
            pthread_join(lazy->workers[i].thread, NULL);
    /* No worker ran to the end (a start that failed): the template is still listed. */
    if (lazy->template && lazy->result == 1)
        page_server_template_forget(lazy->server, lazy->manifest.name);
    remote_lazy_destroy(lazy);
}

int remote_lazy_state(struct remote_lazy *lazy, struct remote_lazy_status *out,
                      struct forkd_error *err)
{
    pthread_mutex_lock(&lazy->lock);
    int rc = lazy->result;
    if (err && lazy->error.code < 0) /* a chunk failed: the pull may still run for the others */
        *err = lazy->error;
    uint64_t end = lazy->result == 1 ? forkd_monotonic_ns() : lazy->done_ns;
    pthread_mutex_unlock(&lazy->lock);
    if (out)
        *out = (struct remote_lazy_status){
            .chunks_total = lazy->manifest.chunk_count,
            .chunks_fetched = atomic_load(&lazy->chunks_fetched),
            .chunks_failed = atomic_load(&lazy->chunks_failed),
            .bytes_fetched = atomic_load(&lazy->bytes_fetched),
            .elapsed_ns = end - lazy->start_ns,
            .chunks_zero = lazy->chunks_zero,
            .chunks_demanded = atomic_load(&lazy->chunks_demanded),
            .hot_chunks = lazy->hot_count,
            .hot_chunks_fetched = atomic_load(&lazy->hot_fetched),
            .hot_done_ns = atomic_load(&lazy->hot_done_ns),
        };
    return rc;
}

const struct store_snapshot *remote_lazy_snapshot(const struct remote_lazy *lazy)
{
    return &lazy->meta;
}

const char *remote_lazy_memory_path(const struct remote_lazy *lazy)
{
    return lazy->memory_path;
}

const char *remote_lazy_vmstate_path(const struct remote_lazy *lazy)
{
    return lazy->vmstate_path;
}

const char *remote_lazy_dir(const struct remote_lazy *lazy)
{
    return lazy->dir;
}

/* ---- ListRemote and DeleteRemote ---------------------------------------------------------- */

struct remote_names {
    char (*names)[STORE_NAME_MAX + 1];
    size_t count, capacity;
    const char *skip; /* a name to leave out, or NULL */
    bool truncated;
};

static int remote_collect_name(const char *key, uint64_t size, void *arg)
{
    (void)size;
    struct remote_names *list = arg;
    static const char prefix[] = "snapshots/", suffix[] = "/manifest.json";
    size_t n = strlen(key);
    if (strncmp(key, prefix, sizeof(prefix) - 1) != 0 || n <= sizeof(prefix) + sizeof(suffix) - 2 ||
        strcmp(key + n - (sizeof(suffix) - 1), suffix) != 0)
        return 0;
    size_t name_length = n - (sizeof(prefix) - 1) - (sizeof(suffix) - 1);
    if (name_length > STORE_NAME_MAX)
        return 0;
    char name[STORE_NAME_MAX + 1];
    memcpy(name, key + sizeof(prefix) - 1, name_length);
    name[name_length] = '\0';
    if (store_validate_name(name, NULL) < 0 || (list->skip && strcmp(name, list->skip) == 0))
        return 0;
    if (list->count == list->capacity) {
        list->truncated = true;
        return 0;
    }
    snprintf(list->names[list->count++], STORE_NAME_MAX + 1, "%s", name);
    return 0;
}

static int remote_compare_names(const void *a, const void *b)
{
    return strcmp(a, b);
}

static int remote_list_names(struct s3_client *client, struct remote_names *list,
                             struct forkd_error *err)
{
    list->names = calloc(list->capacity, sizeof(*list->names));
    if (!list->names)
        return forkd_error_set(err, -ENOMEM, "list remote snapshots: out of memory");
    int rc = s3_list(client, "snapshots/", remote_collect_name, list, err);
    if (rc < 0)
        return forkd_error_prefix(err, "list remote snapshots: ");
    qsort(list->names, list->count, sizeof(*list->names), remote_compare_names);
    return 0;
}

int remote_list(struct remote *remote, struct remote_snapshot_info **out, size_t *count,
                bool *truncated, struct forkd_error *err)
{
    *out = NULL;
    *count = 0;
    *truncated = false;
    struct s3_client *client = NULL;
    int rc = s3_client_new(&remote->s3, NULL, &client, err);
    if (rc < 0)
        return rc;
    struct remote_names list = {.capacity = REMOTE_LIST_MAX};
    rc = remote_list_names(client, &list, err);
    struct remote_snapshot_info *infos = NULL;
    size_t filled = 0;
    if (rc == 0 && list.count) {
        infos = calloc(list.count, sizeof(*infos));
        if (!infos)
            rc = forkd_error_set(err, -ENOMEM, "list remote snapshots: out of memory");
    }
    for (size_t i = 0; rc == 0 && i < list.count; i++) {
        struct remote_manifest manifest;
        struct forkd_error one = {0};
        int r = remote_manifest_get(client, list.names[i], &manifest, &one);
        if (r == -ENOENT)
            continue; /* deleted meanwhile */
        if (r < 0 && r != -EIO) {
            *err = one;
            rc = r;
            break;
        }
        struct remote_snapshot_info *info = &infos[filled++];
        snprintf(info->name, sizeof(info->name), "%s", list.names[i]);
        if (r < 0)
            continue; /* unreadable: listed by name only */
        info->memory_bytes = manifest.memory_bytes;
        info->vmstate_bytes = manifest.vmstate_bytes;
        info->chunk_count = manifest.chunk_count;
        for (uint64_t c = 0; c < manifest.chunk_count; c++)
            info->zero_chunks += manifest.chunks[c][0] == '\0';
        struct store_snapshot meta;
        if (store_parse_metadata(manifest.snapshot_json, strlen(manifest.snapshot_json), &meta,
                                 NULL) == 0) {
            snprintf(info->parent_snapshot, sizeof(info->parent_snapshot), "%s",
                     meta.parent_snapshot);
            info->created_at_unix_ms = meta.created_at_unix_ms;
            for (size_t h = 0; h < meta.hot_count; h++)
                info->hot_bytes += meta.hot[h].length;
        }
        remote_manifest_free(&manifest);
    }
    s3_client_free(client);
    free(list.names);
    if (rc < 0) {
        free(infos);
        return rc;
    }
    *out = filled ? infos : NULL;
    if (!filled)
        free(infos);
    *count = filled;
    *truncated = list.truncated;
    return 0;
}

static int remote_compare_hashes(const void *a, const void *b)
{
    return strcmp(a, b);
}

int remote_delete(struct remote *remote, const char *name, struct remote_delete_report *report,
                  struct forkd_error *err)
{
    *report = (struct remote_delete_report){0};
    int rc = store_validate_name(name, err);
    if (rc < 0)
        return rc;
    struct s3_client *client = NULL;
    rc = s3_client_new(&remote->s3, NULL, &client, err);
    if (rc < 0)
        return rc;
    struct remote_manifest manifest = {0};
    struct remote_names others = {.capacity = REMOTE_LIST_MAX * 100, .skip = name};
    char(*referenced)[REMOTE_HASH_HEX] = NULL;
    size_t referenced_count = 0, referenced_capacity = 0;
    char key[S3_KEY_MAX];
    rc = remote_manifest_get(client, name, &manifest, err);
    bool have_manifest = rc == 0;
    if (rc == -EIO) { /* unreadable: remove the manifest and vmstate, keep every chunk */
        rc = 0;
        manifest.chunk_count = 0;
    }
    if (rc == 0) {
        remote_manifest_key(name, key, sizeof(key));
        rc = s3_delete(client, key, err);
    }
    if (rc == 0) {
        remote_vmstate_key(name, key, sizeof(key));
        rc = s3_delete(client, key, err);
    }
    /* Every chunk another manifest names stays. */
    if (rc == 0 && have_manifest)
        rc = remote_list_names(client, &others, err);
    if (rc == 0 && others.truncated)
        rc = forkd_error_set(err, -E2BIG,
                             "delete remote '%s': too many other snapshots to check "
                             "which chunks they use; the manifest is gone, the "
                             "chunks are kept",
                             name);
    for (size_t i = 0; rc == 0 && have_manifest && i < others.count; i++) {
        struct remote_manifest other;
        struct forkd_error one = {0};
        int r = remote_manifest_get(client, others.names[i], &other, &one);
        if (r == -ENOENT)
            continue;
        if (r < 0) {
            rc = forkd_error_set(err, r, "delete remote '%s': the chunks are kept: %s", name,
                                 one.message);
            break;
        }
        for (uint64_t c = 0; c < other.chunk_count && rc == 0; c++) {
            if (!other.chunks[c][0])
                continue;
            if (referenced_count == referenced_capacity) {
                size_t bigger = referenced_capacity ? referenced_capacity * 2 : 1024;
                void *grown = realloc(referenced, bigger * sizeof(*referenced));
                if (!grown) {
                    rc = forkd_error_set(err, -ENOMEM, "delete remote '%s': out of memory", name);
                    break;
                }
                referenced = grown;
                referenced_capacity = bigger;
            }
            memcpy(referenced[referenced_count++], other.chunks[c], REMOTE_HASH_HEX);
        }
        remote_manifest_free(&other);
    }
    if (rc == 0 && have_manifest) {
        if (referenced_count)
            qsort(referenced, referenced_count, sizeof(*referenced), remote_compare_hashes);
        qsort(manifest.chunks, manifest.chunk_count, sizeof(*manifest.chunks),
              remote_compare_hashes);
        for (uint64_t c = 0; c < manifest.chunk_count && rc == 0; c++) {
            const char *hash = manifest.chunks[c];
            if (!hash[0] || (c > 0 && strcmp(hash, manifest.chunks[c - 1]) == 0))
                continue;
            if (referenced_count && bsearch(hash, referenced, referenced_count, sizeof(*referenced),
                                            remote_compare_hashes)) {
                report->chunks_kept++;
                continue;
            }
            remote_chunk_key(hash, key, sizeof(key));
            rc = s3_delete(client, key, err);
            if (rc == 0)
                report->chunks_deleted++;
        }
    }
    if (rc < 0 && rc != -ENOENT)
        forkd_error_prefix(err, "delete remote '%s': ", name);
    free(referenced);
    free(others.names);
    remote_manifest_free(&manifest);
    s3_client_free(client);
    return rc;
}
