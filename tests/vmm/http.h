/*
 * http: the HTTP/1.1 server framing of the API socket: per-connection buffering, request
 * parsing with bounded sizes (partial reads, pipelining and keep-alive included) and
 * responses. Knows nothing about the endpoints. Used by the API thread only.
 */
#ifndef FORKD_TESTVM_HTTP_H
#define FORKD_TESTVM_HTTP_H

#include <stdbool.h>
#include <stddef.h>

#define HTTP_MAX_HEADER_BYTES (16u << 10)
#define HTTP_MAX_BODY_BYTES   (64u << 10)

struct http_connection {
    int fd;
    char *buffer; /* HTTP_MAX_HEADER_BYTES + HTTP_MAX_BODY_BYTES + 1 */
    size_t length;
    bool sent_continue; /* answered "Expect: 100-continue" for the request being read */
    bool close_after_response;
};

struct http_request {
    char method[16];
    char path[256];
    const char *body; /* inside the connection buffer, NOT NUL-terminated */
    size_t body_length;
    bool close; /* client sent Connection: close */
};

enum http_parse_result {
    HTTP_PARSE_INCOMPLETE = 0,
    HTTP_PARSE_COMPLETE = 1,
    HTTP_PARSE_ERROR = -1, /* respond with *error_status and close the connection */
};

int http_connection_init(struct http_connection *connection, int fd);
void http_connection_release(struct http_connection *connection);

/* Reads what is available. Returns bytes read, 0 on EOF, -EAGAIN when nothing is pending,
 * -ENOBUFS when the buffer is full, or another negative errno. */
int http_connection_read(struct http_connection *connection);

/*
 * Parses the request at the start of the buffer. On COMPLETE fills *request and *consumed
 * (call http_connection_consume after responding). On ERROR sets *error_status and a message.
 */
enum http_parse_result http_parse_request(struct http_connection *connection,
                                          struct http_request *request, size_t *consumed,
                                          int *error_status, char *err, size_t err_size);

void http_connection_consume(struct http_connection *connection, size_t consumed);

/* Sends a complete response; body may be NULL (no body, for 204). Returns 0 or -errno. */
int http_send_response(struct http_connection *connection, int status, const char *body,
                       bool close);

/* Builds {"fault_message": message} (malloc'd) for error responses. */
char *http_fault_body(const char *message);

#endif
