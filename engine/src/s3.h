/*
 * An S3 client over libcurl: one client is one reused connection (one curl easy handle), used by
 * one thread at a time. libcurl signs every request (CURLOPT_AWS_SIGV4); URLs are path-style
 * (<endpoint>/<bucket>/<key>). Requests that fail on the transport (refused, reset, timed out)
 * or with a 5xx are retried with exponential backoff; a request in flight is abandoned as soon as
 * the client's cancel flag is set.
 *
 * Errors name the request and the server's S3 error code: "PUT chunks/ab..: 403
 * SignatureDoesNotMatch". Codes: -ENOENT (404: NoSuchKey, NoSuchBucket), -EKEYREJECTED (the
 * server does not know the key or the signature does not match: wrong credentials), -EACCES
 * (AccessDenied), -ECONNREFUSED / -ETIMEDOUT / -EREMOTEIO (the server cannot be reached, does
 * not answer, or answers 5xx after every retry, or anything else unexpected), -ECANCELED.
 * The secret key never appears in an error or a log line.
 */
#ifndef FORKD_S3_H
#define FORKD_S3_H

#include "basic/error.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
#include <atomic>
typedef std::atomic<bool> s3_atomic_bool; /* for the white-box tests */
extern "C" {
#else
#include <stdatomic.h>
typedef atomic_bool s3_atomic_bool;
#endif

#define S3_KEY_MAX    512
#define S3_SECRET_MAX 256

struct s3_config {
    char endpoint[256]; /* http(s)://host[:port], no trailing slash */
    char region[64];
    char bucket[64];
    char access_key[S3_SECRET_MAX];
    char secret_key[S3_SECRET_MAX];
    unsigned retries; /* attempts after the first on 5xx and transport errors */
    unsigned connect_timeout_ms;
    unsigned stall_timeout_ms; /* a request that moves no byte for this long times out */
};

/* Fills access_key and secret_key from file (AWS credentials format: lines
 * "aws_access_key_id = ..." and "aws_secret_access_key = ..."; NULL or "": the environment's
 * AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY). -ENOENT/-EINVAL naming what is missing. */
int s3_credentials_load(struct s3_config *config, const char *file, struct forkd_error *err);

/* Checks endpoint, region and bucket (names the bad field). */
int s3_config_check(const struct s3_config *config, struct forkd_error *err);

struct s3_client;

/* cancel may be NULL; when it becomes true, requests fail with -ECANCELED. */
int s3_client_new(const struct s3_config *config, const s3_atomic_bool *cancel,
                  struct s3_client **out, struct forkd_error *err);
void s3_client_free(struct s3_client *client);

int s3_put(struct s3_client *client, const char *key, const void *data, size_t length,
           struct forkd_error *err);

/* Uploads length bytes of fd from offset 0 as key: one PUT up to part_size, a multipart upload
 * (parts of part_size, at least 5 MiB) above it; a failed multipart upload is aborted. */
int s3_put_file(struct s3_client *client, const char *key, int fd, uint64_t length,
                size_t part_size, struct forkd_error *err);

/* GETs key (length 0: the whole object, otherwise bytes [offset, offset+length)) into buffer;
 * -EFBIG when the object holds more than capacity. *got: bytes received. */
int s3_get(struct s3_client *client, const char *key, uint64_t offset, uint64_t length,
           void *buffer, size_t capacity, size_t *got, struct forkd_error *err);

/* GETs the whole object into a malloc'd, NUL-terminated buffer of at most max bytes. */
int s3_get_alloc(struct s3_client *client, const char *key, size_t max, char **out, size_t *length,
                 struct forkd_error *err);

/* HEAD: 0 and *size when the object exists, -ENOENT when not. */
int s3_head(struct s3_client *client, const char *key, uint64_t *size, struct forkd_error *err);

/* DELETE (an object that is not there is no error). */
int s3_delete(struct s3_client *client, const char *key, struct forkd_error *err);

/* Lists every key under prefix (ListObjectsV2, page after page), calling fn for each; fn
 * returning non-zero stops the listing with that value. */
int s3_list(struct s3_client *client, const char *prefix,
            int (*fn)(const char *key, uint64_t size, void *arg), void *arg,
            struct forkd_error *err);

/* The transfer counters of this client since it was made (bytes sent and received bodies). */
uint64_t s3_client_bytes_sent(const struct s3_client *client);
uint64_t s3_client_bytes_received(const struct s3_client *client);

#ifdef __cplusplus
}
#endif

#endif
