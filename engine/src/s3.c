/* An S3 client over libcurl (see s3.h). */
#include "s3.h"

#include "basic/cleanup.h"

#include <ctype.h>
#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define S3_ERROR_BODY_MAX  4096
#define S3_LIST_BODY_MAX   (8u << 20)
#define S3_MIN_PART_SIZE   (5u << 20)
#define S3_MAX_PARTS       10000
#define S3_BACKOFF_BASE_MS 100
#define S3_BACKOFF_MAX_MS  2000

struct s3_client {
    struct s3_config config;
    const s3_atomic_bool *cancel;
    CURL *curl;
    char sigv4[128];
    char userpwd[2 * S3_SECRET_MAX + 2];
    uint64_t bytes_sent, bytes_received;
};

/* ---- credentials and configuration -------------------------------------------------------- */

static void s3_trim(char *s)
{
    size_t n = strlen(s);
    while (n && isspace((unsigned char)s[n - 1]))
        s[--n] = '\0';
    size_t start = 0;
    while (s[start] && isspace((unsigned char)s[start]))
        start++;
    memmove(s, s + start, n - start + 1);
}

int s3_credentials_load(struct s3_config *config, const char *file, struct forkd_error *err)
{
    config->access_key[0] = config->secret_key[0] = '\0';
    if (!file || !*file) {
        const char *access = getenv("AWS_ACCESS_KEY_ID");
        const char *secret = getenv("AWS_SECRET_ACCESS_KEY");
        if (!access || !*access || !secret || !*secret)
            return forkd_error_set(err, -ENOENT,
                                   "no remote credentials: give --remote-credentials FILE or set "
                                   "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY");
        if (strlen(access) >= sizeof(config->access_key) ||
            strlen(secret) >= sizeof(config->secret_key))
            return forkd_error_set(err, -EINVAL,
                                   "AWS_ACCESS_KEY_ID or AWS_SECRET_ACCESS_KEY "
                                   "is too long");
        snprintf(config->access_key, sizeof(config->access_key), "%s", access);
        snprintf(config->secret_key, sizeof(config->secret_key), "%s", secret);
        return 0;
    }
    _cleanup_fclose_ FILE *f = fopen(file, "re");
    if (!f)
        return forkd_error_errno(err, -errno, "remote credentials %s", file);
    char line[1024];
    while (fgets(line, sizeof(line), f)) {
        char *eq = strchr(line, '=');
        if (!eq || line[0] == '#' || line[0] == '[')
            continue;
        *eq = '\0';
        char *key = line, *value = eq + 1;
        s3_trim(key);
        s3_trim(value);
        char *target = NULL;
        if (strcmp(key, "aws_access_key_id") == 0)
            target = config->access_key;
        else if (strcmp(key, "aws_secret_access_key") == 0)
            target = config->secret_key;
        if (!target)
            continue;
        if (strlen(value) >= S3_SECRET_MAX)
            return forkd_error_set(err, -EINVAL, "remote credentials %s: %s is too long", file,
                                   key);
        snprintf(target, S3_SECRET_MAX, "%s", value);
    }
    if (!config->access_key[0] || !config->secret_key[0])
        return forkd_error_set(err, -EINVAL,
                               "remote credentials %s: needs aws_access_key_id and "
                               "aws_secret_access_key",
                               file);
    return 0;
}

int s3_config_check(const struct s3_config *config, struct forkd_error *err)
{
    if (strncmp(config->endpoint, "http://", 7) != 0 &&
        strncmp(config->endpoint, "https://", 8) != 0)
        return forkd_error_set(err, -EINVAL,
                               "--remote-endpoint must start with http:// or https://");
    size_t n = strlen(config->endpoint);
    if (config->endpoint[n - 1] == '/')
        return forkd_error_set(err, -EINVAL, "--remote-endpoint must not end with /");
    if (!config->region[0])
        return forkd_error_set(err, -EINVAL, "--remote-region is empty");
    for (const char *c = config->region; *c; c++)
        if (!isalnum((unsigned char)*c) && *c != '-')
            return forkd_error_set(err, -EINVAL, "--remote-region: only letters, digits and -");
    size_t b = strlen(config->bucket);
    if (b < 3 || b > 63)
        return forkd_error_set(err, -EINVAL, "--remote-bucket must be 3 to 63 characters");
    for (const char *c = config->bucket; *c; c++)
        if (!islower((unsigned char)*c) && !isdigit((unsigned char)*c) && *c != '-' && *c != '.')
            return forkd_error_set(err, -EINVAL,
                                   "--remote-bucket: only lower-case letters, digits, - and .");
    return 0;
}

/* ---- the client --------------------------------------------------------------------------- */

static pthread_once_t s3_curl_once = PTHREAD_ONCE_INIT;
static CURLcode s3_curl_init_result;

static void s3_curl_global_init(void)
{
    s3_curl_init_result = curl_global_init(CURL_GLOBAL_DEFAULT);
}

int s3_client_new(const struct s3_config *config, const s3_atomic_bool *cancel,
                  struct s3_client **out, struct forkd_error *err)
{
    pthread_once(&s3_curl_once, s3_curl_global_init);
    if (s3_curl_init_result != CURLE_OK)
        return forkd_error_set(err, -EIO, "curl_global_init: %s",
                               curl_easy_strerror(s3_curl_init_result));
    struct s3_client *client = calloc(1, sizeof(*client));
    if (!client)
        return forkd_error_set(err, -ENOMEM, "S3 client: out of memory");
    client->config = *config;
    if (!client->config.connect_timeout_ms)
        client->config.connect_timeout_ms = 5000;
    if (!client->config.stall_timeout_ms)
        client->config.stall_timeout_ms = 30000;
    client->cancel = cancel;
    client->curl = curl_easy_init();
    if (!client->curl) {
        free(client);
        return forkd_error_set(err, -ENOMEM, "curl_easy_init failed");
    }
    snprintf(client->sigv4, sizeof(client->sigv4), "aws:amz:%s:s3", config->region);
    snprintf(client->userpwd, sizeof(client->userpwd), "%s:%s", config->access_key,
             config->secret_key);
    *out = client;
    return 0;
}

void s3_client_free(struct s3_client *client)
{
    if (!client)
        return;
    curl_easy_cleanup(client->curl);
    explicit_bzero(client->userpwd, sizeof(client->userpwd));
    explicit_bzero(&client->config, sizeof(client->config));
    free(client);
}

uint64_t s3_client_bytes_sent(const struct s3_client *client)
{
    return client->bytes_sent;
}

uint64_t s3_client_bytes_received(const struct s3_client *client)
{
    return client->bytes_received;
}

static bool s3_cancelled(const struct s3_client *client)
{
    return client->cancel && atomic_load(client->cancel);
}

/* ---- one request -------------------------------------------------------------------------- */

struct s3_body_in { /* what a request uploads: from memory or from a file */
    const char *data;
    int fd;
    uint64_t offset, length, done;
};

struct s3_body_out { /* where a response body goes */
    char *buffer;
    size_t capacity, length;
    bool grow;     /* realloc up to capacity */
    bool overflow; /* the body did not fit */
};

struct s3_request {
    const char *method;
    const char *key;                     /* for messages; "" for the bucket */
    const char *query;                   /* "" or "a=b&c=d", keys sorted, values encoded */
    uint64_t range_offset, range_length; /* range_length 0: no Range */
    struct s3_body_in in;
    bool has_body;
    struct s3_body_out *out; /* the 2xx body; NULL: discarded */
    /* filled */
    long status;
    char etag[128];
    uint64_t content_length;
    char error_code[64];
};

static size_t s3_read_body(char *dest, size_t size, size_t nitems, void *arg)
{
    struct s3_body_in *in = arg;
    size_t want = size * nitems;
    uint64_t left = in->length - in->done;
    if (want > left)
        want = (size_t)left;
    if (!want)
        return 0;
    if (in->data) {
        memcpy(dest, in->data + in->done, want);
    } else {
        ssize_t n = pread(in->fd, dest, want, (off_t)(in->offset + in->done));
        if (n <= 0)
            return CURL_READFUNC_ABORT;
        want = (size_t)n;
    }
    in->done += want;
    return want;
}

static int s3_seek_body(void *arg, curl_off_t offset, int origin)
{
    struct s3_body_in *in = arg;
    if (origin != SEEK_SET || offset < 0 || (uint64_t)offset > in->length)
        return CURL_SEEKFUNC_FAIL;
    in->done = (uint64_t)offset;
    return CURL_SEEKFUNC_OK;
}

static size_t s3_write_body(char *data, size_t size, size_t nmemb, void *arg)
{
    struct s3_body_out *out = arg;
    size_t n = size * nmemb;
    if (out->length + n > out->capacity) {
        out->overflow = true;
        return 0; /* makes curl fail the transfer */
    }
    if (out->grow) {
        size_t have = out->buffer ? out->length : 0;
        char *bigger = realloc(out->buffer, have + n + 1);
        if (!bigger)
            return 0;
        out->buffer = bigger;
    }
    memcpy(out->buffer + out->length, data, n);
    out->length += n;
    if (out->grow)
        out->buffer[out->length] = '\0';
    return n;
}

static size_t s3_header(char *data, size_t size, size_t nitems, void *arg)
{
    struct s3_request *request = arg;
    size_t n = size * nitems;
    if (n > 5 && strncasecmp(data, "ETag:", 5) == 0) {
        size_t start = 5;
        while (start < n && data[start] == ' ')
            start++;
        size_t end = n;
        while (end > start && (data[end - 1] == '\r' || data[end - 1] == '\n'))
            end--;
        if (end - start < sizeof(request->etag)) {
            memcpy(request->etag, data + start, end - start);
            request->etag[end - start] = '\0';
        }
    }
    return n;
}

static int s3_progress(void *arg, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                       curl_off_t ulnow)
{
    (void)dltotal, (void)dlnow, (void)ultotal, (void)ulnow;
    return s3_cancelled(arg) ? 1 : 0;
}

/* The text between <tag> and </tag> in xml, into out; false when absent. */
static bool s3_xml_value(const char *xml, const char *tag, char *out, size_t size)
{
    char open[80], close[80];
    snprintf(open, sizeof(open), "<%s>", tag);
    snprintf(close, sizeof(close), "</%s>", tag);
    const char *start = strstr(xml, open);
    if (!start)
        return false;
    start += strlen(open);
    const char *end = strstr(start, close);
    if (!end || (size_t)(end - start) >= size)
        return false;
    memcpy(out, start, (size_t)(end - start));
    out[end - start] = '\0';
    return true;
}

static int s3_status_errno(long status, const char *code)
{
    if (status == 404)
        return -ENOENT;
    if (status == 403 && (strcmp(code, "AccessDenied") == 0 || strcmp(code, "") == 0))
        return -EACCES;
    if (status == 403)
        return -EKEYREJECTED; /* InvalidAccessKeyId, SignatureDoesNotMatch, ... */
    if (status == 401)
        return -EKEYREJECTED;
    return -EREMOTEIO;
}

static bool s3_retryable_curl(CURLcode rc)
{
    switch (rc) {
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
        return true;
    default:
        return false;
    }
}

static int s3_curl_errno(CURLcode rc)
{
    switch (rc) {
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
        return -ECONNREFUSED;
    case CURLE_OPERATION_TIMEDOUT:
        return -ETIMEDOUT;
    case CURLE_ABORTED_BY_CALLBACK:
        return -ECANCELED;
    default:
        return -ECONNRESET;
    }
}

/* Sleeps the backoff before retry attempt (1, 2, ...), waking early on cancel. */
static void s3_backoff(const struct s3_client *client, unsigned attempt)
{
    unsigned ms = S3_BACKOFF_BASE_MS << (attempt > 5 ? 5 : attempt - 1);
    if (ms > S3_BACKOFF_MAX_MS)
        ms = S3_BACKOFF_MAX_MS;
    for (unsigned slept = 0; slept < ms && !s3_cancelled(client); slept += 10)
        nanosleep(&(struct timespec){.tv_nsec = 10 * 1000000L}, NULL);
}

static int s3_perform_once(struct s3_client *client, struct s3_request *request, char *url,
                           struct s3_body_out *error_body, CURLcode *curl_rc)
{
    CURL *curl = client->curl;
    curl_easy_reset(curl);
    curl_easy_setopt(curl, CURLOPT_URL, url);
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_AWS_SIGV4, client->sigv4);
    curl_easy_setopt(curl, CURLOPT_USERPWD, client->userpwd);
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, (long)client->config.connect_timeout_ms);
    curl_easy_setopt(curl, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(curl, CURLOPT_LOW_SPEED_TIME,
                     (long)((client->config.stall_timeout_ms + 999) / 1000));
    curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, s3_progress);
    curl_easy_setopt(curl, CURLOPT_XFERINFODATA, client);
    curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, s3_header);
    curl_easy_setopt(curl, CURLOPT_HEADERDATA, request);
    struct curl_slist *headers = curl_slist_append(NULL, "x-amz-content-sha256: UNSIGNED-PAYLOAD");
    if (!headers)
        return -ENOMEM;
    char range[80];
    if (request->range_length) {
        snprintf(range, sizeof(range), "%" PRIu64 "-%" PRIu64, request->range_offset,
                 request->range_offset + request->range_length - 1);
        curl_easy_setopt(curl, CURLOPT_RANGE, range);
    }
    if (strcmp(request->method, "PUT") == 0) {
        curl_easy_setopt(curl, CURLOPT_UPLOAD, 1L);
        curl_easy_setopt(curl, CURLOPT_INFILESIZE_LARGE, (curl_off_t)request->in.length);
    } else if (strcmp(request->method, "POST") == 0) {
        curl_easy_setopt(curl, CURLOPT_POST, 1L);
        curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)request->in.length);
    } else if (strcmp(request->method, "HEAD") == 0) {
        curl_easy_setopt(curl, CURLOPT_NOBODY, 1L);
    } else if (strcmp(request->method, "DELETE") == 0) {
        curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, "DELETE");
    }
    if (request->has_body) {
        request->in.done = 0;
        curl_easy_setopt(curl, CURLOPT_READFUNCTION, s3_read_body);
        curl_easy_setopt(curl, CURLOPT_READDATA, &request->in);
        curl_easy_setopt(curl, CURLOPT_SEEKFUNCTION, s3_seek_body);
        curl_easy_setopt(curl, CURLOPT_SEEKDATA, &request->in);
    }
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
    /* The body goes to the caller only on success; an error body is kept for its code. We
     * cannot know the status before the body, so both start in the caller's sink and an error
     * body is copied out of it. The caller's sink is reset per attempt. */
    struct s3_body_out *sink = request->out ? request->out : error_body;
    if (request->out) {
        request->out->length = 0;
        request->out->overflow = false;
    }
    error_body->length = 0;
    error_body->overflow = false;
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, s3_write_body);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, sink);
    request->etag[0] = '\0';
    *curl_rc = curl_easy_perform(curl);
    curl_slist_free_all(headers);
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &request->status);
    curl_off_t up = 0, down = 0, length = -1;
    curl_easy_getinfo(curl, CURLINFO_SIZE_UPLOAD_T, &up);
    curl_easy_getinfo(curl, CURLINFO_SIZE_DOWNLOAD_T, &down);
    curl_easy_getinfo(curl, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &length);
    request->content_length = length > 0 ? (uint64_t)length : 0;
    client->bytes_sent += (uint64_t)up;
    client->bytes_received += (uint64_t)down;
    request->error_code[0] = '\0';
    if (request->status >= 300 && sink->buffer) {
        size_t n = sink->length < S3_ERROR_BODY_MAX - 1 ? sink->length : S3_ERROR_BODY_MAX - 1;
        char text[S3_ERROR_BODY_MAX];
        memcpy(text, sink->buffer, n);
        text[n] = '\0';
        s3_xml_value(text, "Code", request->error_code, sizeof(request->error_code));
    }
    return 0;
}

/* Runs a request with retries. 0 on a 2xx answer; otherwise the error (see s3.h). */
static int s3_perform(struct s3_client *client, struct s3_request *request, struct forkd_error *err)
{
    char url[1024];
    int n = snprintf(url, sizeof(url), "%s/%s%s%s%s%s", client->config.endpoint,
                     client->config.bucket, request->key[0] ? "/" : "/", request->key,
                     request->query[0] ? "?" : "", request->query);
    if (n < 0 || (size_t)n >= sizeof(url))
        return forkd_error_set(err, -ENAMETOOLONG, "%s %s: URL too long", request->method,
                               request->key);
    char error_text[S3_ERROR_BODY_MAX];
    struct s3_body_out error_body = {.buffer = error_text, .capacity = sizeof(error_text) - 1};
    const char *what = request->key[0] ? request->key : client->config.bucket;
    for (unsigned attempt = 0;; attempt++) {
        if (s3_cancelled(client))
            return forkd_error_set(err, -ECANCELED, "%s %s: cancelled", request->method, what);
        CURLcode curl_rc = CURLE_OK;
        if (s3_perform_once(client, request, url, &error_body, &curl_rc) < 0)
            return forkd_error_set(err, -ENOMEM, "%s %s: out of memory", request->method, what);
        if (curl_rc == CURLE_ABORTED_BY_CALLBACK || s3_cancelled(client))
            return forkd_error_set(err, -ECANCELED, "%s %s: cancelled", request->method, what);
        if (curl_rc == CURLE_WRITE_ERROR && request->out && request->out->overflow &&
            request->status >= 200 && request->status < 300)
            return forkd_error_set(err, -EFBIG, "%s %s: the object is larger than %zu bytes",
                                   request->method, what, request->out->capacity);
        bool retry = false;
        if (curl_rc != CURLE_OK && !(curl_rc == CURLE_WRITE_ERROR && request->status >= 300)) {
            retry = s3_retryable_curl(curl_rc);
            if (!retry || attempt >= client->config.retries)
                return forkd_error_set(err, s3_curl_errno(curl_rc), "%s %s: %s%s", request->method,
                                       what, curl_easy_strerror(curl_rc),
                                       attempt ? " (after retries)" : "");
        } else if (request->status >= 200 && request->status < 300) {
            return 0;
        } else {
            retry = request->status >= 500;
            if (!retry || attempt >= client->config.retries) {
                int code = s3_status_errno(request->status, request->error_code);
                if (code == -ENOENT && strcmp(request->method, "HEAD") == 0)
                    return forkd_error_set(err, code, "HEAD %s: 404 NoSuchKey", what);
                return forkd_error_set(
                    err, code, "%s %s: %ld %s%s", request->method, what, request->status,
                    request->error_code[0] ? request->error_code : "(no S3 error code)",
                    attempt ? " (after retries)" : "");
            }
        }
        s3_backoff(client, attempt + 1);
    }
}

static int s3_check_key(const char *key, struct forkd_error *err)
{
    size_t n = strlen(key);
    if (n == 0 || n >= S3_KEY_MAX)
        return forkd_error_set(err, -EINVAL, "S3 key '%s': empty or too long", key);
    for (const char *c = key; *c; c++)
        if (!isalnum((unsigned char)*c) && !strchr("/._-", *c))
            return forkd_error_set(err, -EINVAL, "S3 key '%s': unsupported character", key);
    return 0;
}

/* ---- operations --------------------------------------------------------------------------- */

int s3_put(struct s3_client *client, const char *key, const void *data, size_t length,
           struct forkd_error *err)
{
    int rc = s3_check_key(key, err);
    if (rc < 0)
        return rc;
    struct s3_request request = {.method = "PUT",
                                 .key = key,
                                 .query = "",
                                 .has_body = true,
                                 .in = {.data = data, .fd = -1, .length = length}};
    return s3_perform(client, &request, err);
}

static int s3_multipart_abort(struct s3_client *client, const char *key, const char *upload_id)
{
    char query[600];
    char *escaped = curl_easy_escape(client->curl, upload_id, 0);
    if (!escaped)
        return -ENOMEM;
    snprintf(query, sizeof(query), "uploadId=%s", escaped);
    curl_free(escaped);
    struct s3_request request = {.method = "DELETE", .key = key, .query = query};
    struct forkd_error ignored = {0};
    return s3_perform(client, &request, &ignored);
}

int s3_put_file(struct s3_client *client, const char *key, int fd, uint64_t length,
                size_t part_size, struct forkd_error *err)
{
    int rc = s3_check_key(key, err);
    if (rc < 0)
        return rc;
    if (part_size < S3_MIN_PART_SIZE)
        part_size = S3_MIN_PART_SIZE;
    if (length <= part_size) {
        struct s3_request request = {.method = "PUT",
                                     .key = key,
                                     .query = "",
                                     .has_body = true,
                                     .in = {.fd = fd, .length = length}};
        return s3_perform(client, &request, err);
    }
    uint64_t parts = (length + part_size - 1) / part_size;
    if (parts > S3_MAX_PARTS)
        return forkd_error_set(err, -EFBIG, "PUT %s: %" PRIu64 " bytes need more than %d parts",
                               key, length, S3_MAX_PARTS);
    /* CreateMultipartUpload */
    struct s3_body_out body = {.capacity = S3_ERROR_BODY_MAX, .grow = true};
    struct s3_request create = {.method = "POST",
                                .key = key,
                                .query = "uploads=",
                                .has_body = true,
                                .in = {.data = "", .fd = -1},
                                .out = &body};
    rc = s3_perform(client, &create, err);
    char upload_id[256] = "";
    if (rc == 0 &&
        (!body.buffer || !s3_xml_value(body.buffer, "UploadId", upload_id, sizeof(upload_id))))
        rc = forkd_error_set(err, -EREMOTEIO, "POST %s?uploads=: no UploadId in the answer", key);
    free(body.buffer);
    if (rc < 0)
        return rc;
    char *escaped = curl_easy_escape(client->curl, upload_id, 0);
    if (!escaped)
        return forkd_error_set(err, -ENOMEM, "PUT %s: out of memory", key);
    size_t xml_size = 128 + parts * 200;
    _cleanup_free_ char *xml = malloc(xml_size);
    if (!xml) {
        curl_free(escaped);
        s3_multipart_abort(client, key, upload_id);
        return forkd_error_set(err, -ENOMEM, "PUT %s: out of memory", key);
    }
    size_t used = (size_t)snprintf(xml, xml_size, "<CompleteMultipartUpload>");
    for (uint64_t part = 0; part < parts && rc == 0; part++) {
        char query[600];
        snprintf(query, sizeof(query), "partNumber=%" PRIu64 "&uploadId=%s", part + 1, escaped);
        uint64_t offset = part * part_size;
        uint64_t size = length - offset < part_size ? length - offset : part_size;
        struct s3_request put = {.method = "PUT",
                                 .key = key,
                                 .query = query,
                                 .has_body = true,
                                 .in = {.fd = fd, .offset = offset, .length = size}};
        rc = s3_perform(client, &put, err);
        if (rc == 0)
            used +=
                (size_t)snprintf(xml + used, xml_size - used,
                                 "<Part><PartNumber>%" PRIu64 "</PartNumber><ETag>%s</ETag></Part>",
                                 part + 1, put.etag);
    }
    if (rc == 0) {
        snprintf(xml + used, xml_size - used, "</CompleteMultipartUpload>");
        char query[600];
        snprintf(query, sizeof(query), "uploadId=%s", escaped);
        struct s3_body_out answer = {.capacity = S3_ERROR_BODY_MAX, .grow = true};
        struct s3_request complete = {.method = "POST",
                                      .key = key,
                                      .query = query,
                                      .has_body = true,
                                      .in = {.data = xml, .fd = -1, .length = strlen(xml)},
                                      .out = &answer};
        rc = s3_perform(client, &complete, err);
        /* A 200 may still carry an error (S3 sends it once the parts are combined). */
        char code[64];
        if (rc == 0 && answer.buffer && strstr(answer.buffer, "<Error>") &&
            s3_xml_value(answer.buffer, "Code", code, sizeof(code)))
            rc = forkd_error_set(err, -EREMOTEIO, "POST %s?uploadId=: %s", key, code);
        free(answer.buffer);
    }
    curl_free(escaped);
    if (rc < 0)
        s3_multipart_abort(client, key, upload_id);
    return rc;
}

int s3_get(struct s3_client *client, const char *key, uint64_t offset, uint64_t length,
           void *buffer, size_t capacity, size_t *got, struct forkd_error *err)
{
    int rc = s3_check_key(key, err);
    if (rc < 0)
        return rc;
    struct s3_body_out body = {.buffer = buffer, .capacity = capacity};
    struct s3_request request = {.method = "GET",
                                 .key = key,
                                 .query = "",
                                 .range_offset = offset,
                                 .range_length = length,
                                 .out = &body};
    rc = s3_perform(client, &request, err);
    *got = body.length;
    return rc;
}

int s3_get_alloc(struct s3_client *client, const char *key, size_t max, char **out, size_t *length,
                 struct forkd_error *err)
{
    *out = NULL;
    *length = 0;
    int rc = s3_check_key(key, err);
    if (rc < 0)
        return rc;
    struct s3_body_out body = {.capacity = max, .grow = true};
    struct s3_request request = {.method = "GET", .key = key, .query = "", .out = &body};
    rc = s3_perform(client, &request, err);
    if (rc < 0) {
        free(body.buffer);
        return rc;
    }
    if (!body.buffer) {
        body.buffer = calloc(1, 1);
        if (!body.buffer)
            return forkd_error_set(err, -ENOMEM, "GET %s: out of memory", key);
    }
    *out = body.buffer;
    *length = body.length;
    return 0;
}

int s3_head(struct s3_client *client, const char *key, uint64_t *size, struct forkd_error *err)
{
    int rc = s3_check_key(key, err);
    if (rc < 0)
        return rc;
    struct s3_request request = {.method = "HEAD", .key = key, .query = ""};
    rc = s3_perform(client, &request, err);
    if (rc == 0 && size)
        *size = request.content_length;
    return rc;
}

int s3_delete(struct s3_client *client, const char *key, struct forkd_error *err)
{
    int rc = s3_check_key(key, err);
    if (rc < 0)
        return rc;
    struct s3_request request = {.method = "DELETE", .key = key, .query = ""};
    rc = s3_perform(client, &request, err);
    return rc == -ENOENT ? 0 : rc;
}

/* Replaces the XML entities S3 writes in keys and tokens (in place). */
static void s3_xml_unescape(char *s)
{
    static const struct {
        const char *entity;
        char c;
    } entities[] = {
        {"&amp;", '&'}, {"&lt;", '<'}, {"&gt;", '>'}, {"&quot;", '"'}, {"&apos;", '\''}};
    char *w = s;
    for (const char *r = s; *r;) {
        bool replaced = false;
        for (size_t i = 0; i < ARRAY_SIZE(entities) && *r == '&'; i++) {
            size_t n = strlen(entities[i].entity);
            if (strncmp(r, entities[i].entity, n) == 0) {
                *w++ = entities[i].c;
                r += n;
                replaced = true;
                break;
            }
        }
        if (!replaced)
            *w++ = *r++;
    }
    *w = '\0';
}

int s3_list(struct s3_client *client, const char *prefix,
            int (*fn)(const char *key, uint64_t size, void *arg), void *arg,
            struct forkd_error *err)
{
    char token[1024] = "";
    char *escaped_prefix = curl_easy_escape(client->curl, prefix, 0);
    if (!escaped_prefix)
        return forkd_error_set(err, -ENOMEM, "list %s: out of memory", prefix);
    int rc = 0;
    for (;;) {
        char query[2048];
        if (token[0]) {
            char *escaped = curl_easy_escape(client->curl, token, 0);
            if (!escaped) {
                rc = forkd_error_set(err, -ENOMEM, "list %s: out of memory", prefix);
                break;
            }
            snprintf(query, sizeof(query), "continuation-token=%s&list-type=2&prefix=%s", escaped,
                     escaped_prefix);
            curl_free(escaped);
        } else {
            snprintf(query, sizeof(query), "list-type=2&prefix=%s", escaped_prefix);
        }
        struct s3_body_out body = {.capacity = S3_LIST_BODY_MAX, .grow = true};
        struct s3_request request = {.method = "GET", .key = "", .query = query, .out = &body};
        rc = s3_perform(client, &request, err);
        if (rc < 0) {
            free(body.buffer);
            break;
        }
        const char *cursor = body.buffer ? body.buffer : "";
        while (rc == 0 && (cursor = strstr(cursor, "<Contents>"))) {
            const char *end = strstr(cursor, "</Contents>");
            if (!end)
                break;
            size_t n = (size_t)(end - cursor);
            char entry[2048];
            if (n >= sizeof(entry)) {
                cursor = end;
                continue;
            }
            memcpy(entry, cursor, n);
            entry[n] = '\0';
            char key[S3_KEY_MAX * 2], size_text[32] = "0";
            if (s3_xml_value(entry, "Key", key, sizeof(key))) {
                s3_xml_value(entry, "Size", size_text, sizeof(size_text));
                s3_xml_unescape(key);
                rc = fn(key, strtoull(size_text, NULL, 10), arg);
            }
            cursor = end;
        }
        char truncated[16] = "";
        bool more = body.buffer &&
                    s3_xml_value(body.buffer, "IsTruncated", truncated, sizeof(truncated)) &&
                    strcmp(truncated, "true") == 0;
        token[0] = '\0';
        if (more && body.buffer)
            s3_xml_value(body.buffer, "NextContinuationToken", token, sizeof(token));
        s3_xml_unescape(token);
        free(body.buffer);
        if (rc != 0 || !more)
            break;
        if (!token[0]) {
            rc = forkd_error_set(err, -EREMOTEIO,
                                 "list %s: truncated without a continuation "
                                 "token",
                                 prefix);
            break;
        }
    }
    curl_free(escaped_prefix);
    return rc;
}
