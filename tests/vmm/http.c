/* http: HTTP/1.1 request framing and responses for the API socket. */
#include "http.h"

#include <ctype.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "vmm_error.h"

#define HTTP_BUFFER_BYTES (HTTP_MAX_HEADER_BYTES + HTTP_MAX_BODY_BYTES)
#define SEND_TIMEOUT_MS   5000

int http_connection_init(struct http_connection *connection, int fd)
{
    memset(connection, 0, sizeof(*connection));
    connection->buffer = malloc(HTTP_BUFFER_BYTES + 1);
    if (!connection->buffer)
        return -ENOMEM;
    connection->fd = fd;
    return 0;
}

void http_connection_release(struct http_connection *connection)
{
    free(connection->buffer);
    connection->buffer = NULL;
    if (connection->fd >= 0)
        close(connection->fd);
    connection->fd = -1;
}

int http_connection_read(struct http_connection *connection)
{
    if (connection->length >= HTTP_BUFFER_BYTES)
        return -ENOBUFS;
    ssize_t n = recv(connection->fd, connection->buffer + connection->length,
                     HTTP_BUFFER_BYTES - connection->length, MSG_DONTWAIT);
    if (n < 0)
        return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    connection->length += (size_t)n;
    return (int)n;
}

static const char *find_header_end(const char *data, size_t length)
{
    for (size_t i = 0; i + 3 < length; i++)
        if (data[i] == '\r' && data[i + 1] == '\n' && data[i + 2] == '\r' && data[i + 3] == '\n')
            return data + i;
    return NULL;
}

static int parse_request_line(const char *line, size_t length, struct http_request *request,
                              char *err, size_t err_size)
{
    char copy[512];
    char *save = NULL;

    if (length >= sizeof(copy))
        return error_set(err, err_size, EINVAL, "request line too long");
    memcpy(copy, line, length);
    copy[length] = '\0';
    const char *method = strtok_r(copy, " ", &save);
    const char *path = strtok_r(NULL, " ", &save);
    const char *version = strtok_r(NULL, " ", &save);
    if (!method || !path || !version || strtok_r(NULL, " ", &save))
        return error_set(err, err_size, EINVAL, "malformed request line");
    if (strcmp(version, "HTTP/1.1") != 0 && strcmp(version, "HTTP/1.0") != 0)
        return error_set(err, err_size, EINVAL, "unsupported protocol version");
    if (strlen(method) >= sizeof(request->method) || strlen(path) >= sizeof(request->path) ||
        path[0] != '/')
        return error_set(err, err_size, EINVAL, "malformed method or path");
    strcpy(request->method, method);
    strcpy(request->path, path);
    request->close = strcmp(version, "HTTP/1.0") == 0;
    return 0;
}

static bool header_is(const char *line, size_t length, const char *name, const char **value)
{
    size_t name_length = strlen(name);

    if (length <= name_length || line[name_length] != ':' ||
        strncasecmp(line, name, name_length) != 0)
        return false;
    *value = line + name_length + 1;
    while (*value < line + length && (**value == ' ' || **value == '\t'))
        (*value)++;
    return true;
}

static bool value_is(const char *value, const char *line_end, const char *expected)
{
    size_t length = (size_t)(line_end - value);
    while (length > 0 && (value[length - 1] == ' ' || value[length - 1] == '\t'))
        length--;
    return length == strlen(expected) && strncasecmp(value, expected, length) == 0;
}

struct header_facts {
    long long content_length;
    bool expect_continue;
};

static int parse_content_length(const char *value, const char *end, long long *out, char *err,
                                size_t err_size)
{
    long long parsed = 0;
    const char *p = value;

    if (p >= end || !isdigit((unsigned char)*p))
        return error_set(err, err_size, EINVAL, "invalid Content-Length");
    for (; p < end && isdigit((unsigned char)*p); p++) {
        parsed = parsed * 10 + (*p - '0');
        if (parsed > (1ll << 40))
            return error_set(err, err_size, EFBIG, "Content-Length too large");
    }
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    if (p != end)
        return error_set(err, err_size, EINVAL, "invalid Content-Length");
    *out = parsed;
    return 0;
}

static int parse_headers(const char *start, const char *end, struct http_request *request,
                         struct header_facts *facts, char *err, size_t err_size)
{
    const char *line = start;

    while (line < end) {
        const char *line_end = memchr(line, '\r', (size_t)(end - line));
        const char *value;
        if (!line_end)
            line_end = end;
        size_t length = (size_t)(line_end - line);
        if (header_is(line, length, "Content-Length", &value)) {
            if (facts->content_length >= 0)
                return error_set(err, err_size, EINVAL, "duplicate Content-Length");
            int r = parse_content_length(value, line_end, &facts->content_length, err, err_size);
            if (r < 0)
                return r;
        } else if (header_is(line, length, "Transfer-Encoding", &value)) {
            return error_set(err, err_size, EINVAL, "Transfer-Encoding is not supported");
        } else if (header_is(line, length, "Connection", &value)) {
            request->close = value_is(value, line_end, "close");
        } else if (header_is(line, length, "Expect", &value)) {
            facts->expect_continue = value_is(value, line_end, "100-continue");
        } else if (length > 0 && !memchr(line, ':', length)) {
            return error_set(err, err_size, EINVAL, "malformed header line");
        }
        line = line_end + 2;
    }
    return 0;
}

/* Finds the end of the header section; NULL while incomplete, or on error (status set). */
static const char *header_section_end(const struct http_connection *connection, int *error_status,
                                      bool *failed, char *err, size_t err_size)
{
    const char *end = find_header_end(connection->buffer, connection->length);
    size_t length = end ? (size_t)(end - connection->buffer) : connection->length;

    *failed = length > HTTP_MAX_HEADER_BYTES;
    if (*failed) {
        *error_status = 431;
        error_set(err, err_size, E2BIG, "request headers larger than %u bytes",
                  HTTP_MAX_HEADER_BYTES);
        return NULL;
    }
    return end;
}

/* Parses the request line and headers into request and facts; returns 0 or the HTTP status. */
static int parse_head(const char *data, const char *header_end, struct http_request *request,
                      struct header_facts *facts, char *err, size_t err_size)
{
    const char *line_end = memchr(data, '\r', (size_t)(header_end - data) + 1);

    facts->content_length = -1;
    facts->expect_continue = false;
    if (parse_request_line(data, (size_t)(line_end - data), request, err, err_size) < 0)
        return 400;
    int r = 0;
    if (line_end < header_end)
        r = parse_headers(line_end + 2, header_end, request, facts, err, err_size);
    if (r < 0)
        return r == -EFBIG ? 413 : 400;
    if (facts->content_length > (long long)HTTP_MAX_BODY_BYTES) {
        error_set(err, err_size, EFBIG, "request body of %lld bytes exceeds %u",
                  facts->content_length, HTTP_MAX_BODY_BYTES);
        return 413;
    }
    return 0;
}

static void send_continue(struct http_connection *connection)
{
    static const char go_on[] = "HTTP/1.1 100 Continue\r\n\r\n";

    if (connection->sent_continue)
        return;
    connection->sent_continue = true;
    send(connection->fd, go_on, sizeof(go_on) - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
}

enum http_parse_result http_parse_request(struct http_connection *connection,
                                          struct http_request *request, size_t *consumed,
                                          int *error_status, char *err, size_t err_size)
{
    struct header_facts facts;
    bool failed;

    memset(request, 0, sizeof(*request));
    const char *header_end = header_section_end(connection, error_status, &failed, err, err_size);
    if (failed)
        return HTTP_PARSE_ERROR;
    if (!header_end)
        return HTTP_PARSE_INCOMPLETE;
    *error_status = parse_head(connection->buffer, header_end, request, &facts, err, err_size);
    if (*error_status)
        return HTTP_PARSE_ERROR;
    size_t body_length = facts.content_length > 0 ? (size_t)facts.content_length : 0;
    size_t header_length = (size_t)(header_end - connection->buffer) + 4;
    if (connection->length < header_length + body_length) {
        if (facts.expect_continue)
            send_continue(connection);
        return HTTP_PARSE_INCOMPLETE;
    }
    /* Not NUL-terminated: a pipelined request may follow. Parse with an explicit length. */
    request->body = connection->buffer + header_length;
    request->body_length = body_length;
    *consumed = header_length + body_length;
    return HTTP_PARSE_COMPLETE;
}

void http_connection_consume(struct http_connection *connection, size_t consumed)
{
    memmove(connection->buffer, connection->buffer + consumed, connection->length - consumed);
    connection->length -= consumed;
    connection->sent_continue = false;
}

static const char *status_text(int status)
{
    switch (status) {
    case 200:
        return "OK";
    case 204:
        return "No Content";
    case 400:
        return "Bad Request";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 413:
        return "Payload Too Large";
    case 431:
        return "Request Header Fields Too Large";
    case 500:
        return "Internal Server Error";
    default:
        return "Error";
    }
}

static int send_all(int fd, const char *data, size_t length)
{
    while (length > 0) {
        ssize_t n = send(fd, data, length, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            /* A client that stops reading must not wedge the VMM forever. */
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            if (poll(&pfd, 1, SEND_TIMEOUT_MS) <= 0)
                return -ETIMEDOUT;
            continue;
        }
        if (n < 0)
            return -errno;
        data += n;
        length -= (size_t)n;
    }
    return 0;
}

int http_send_response(struct http_connection *connection, int status, const char *body, bool close)
{
    char head[256];
    size_t body_length = body ? strlen(body) : 0;
    int head_length;

    if (status == 204 || !body)
        head_length =
            snprintf(head, sizeof(head), "HTTP/1.1 %d %s\r\nServer: forkd-testvm\r\n%s\r\n", status,
                     status_text(status), close ? "Connection: close\r\n" : "");
    else
        head_length = snprintf(head, sizeof(head),
                               "HTTP/1.1 %d %s\r\nServer: forkd-testvm\r\nContent-Type: "
                               "application/json\r\nContent-Length: %zu\r\n%s\r\n",
                               status, status_text(status), body_length,
                               close ? "Connection: close\r\n" : "");
    int r = send_all(connection->fd, head, (size_t)head_length);
    if (r == 0 && body_length && status != 204)
        r = send_all(connection->fd, body, body_length);
    return r;
}

char *http_fault_body(const char *message)
{
    cJSON *object = cJSON_CreateObject();
    char *text = NULL;

    if (object && cJSON_AddStringToObject(object, "fault_message", message))
        text = cJSON_PrintUnformatted(object);
    cJSON_Delete(object);
    return text;
}
