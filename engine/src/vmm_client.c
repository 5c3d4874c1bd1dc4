/* The VMM API client over the VMM's Unix socket (see forkd/vmm_client.h). */
#include "vmm_client.h"

#include "basic/cleanup.h"

#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define VMM_RESPONSE_MAX_BYTES (256 * 1024)

struct vmm_client {
    pthread_mutex_t lock; /* one request at a time on the handle */
    CURL *curl;
    struct curl_slist *headers;
    long timeout_ms;
    char socket_path[4096];
};

struct vmm_response {
    char *data;
    size_t length;
    bool overflow;
};

static pthread_once_t vmm_curl_once = PTHREAD_ONCE_INIT;
static CURLcode vmm_curl_init_result;

static void vmm_curl_global_init(void)
{
    vmm_curl_init_result = curl_global_init(CURL_GLOBAL_NOTHING);
}

static size_t vmm_collect_body(char *data, size_t size, size_t count, void *user)
{
    struct vmm_response *response = user;
    size_t bytes = size * count;
    if (response->length + bytes > VMM_RESPONSE_MAX_BYTES) {
        response->overflow = true;
        return 0; /* makes curl fail the transfer */
    }
    char *grown = realloc(response->data, response->length + bytes + 1);
    if (!grown)
        return 0;
    memcpy(grown + response->length, data, bytes);
    response->data = grown;
    response->length += bytes;
    grown[response->length] = '\0';
    return bytes;
}

int vmm_client_open(const char *socket_path, struct vmm_client **out, struct forkd_error *err)
{
    pthread_once(&vmm_curl_once, vmm_curl_global_init);
    if (vmm_curl_init_result != CURLE_OK)
        return forkd_error_set(err, -EIO, "curl_global_init: %s",
                               curl_easy_strerror(vmm_curl_init_result));
    _cleanup_free_ struct vmm_client *client = calloc(1, sizeof(*client));
    if (!client)
        return forkd_error_set(err, -ENOMEM, "VMM client: out of memory");
    if (strlen(socket_path) >= sizeof(client->socket_path))
        return forkd_error_set(err, -ENAMETOOLONG, "VMM socket path too long: %s", socket_path);
    strcpy(client->socket_path, socket_path);
    client->curl = curl_easy_init();
    if (!client->curl)
        return forkd_error_set(err, -ENOMEM, "curl_easy_init failed");
    /* Firecracker answers small JSON bodies; "Expect: 100-continue" would only add a round trip. */
    client->headers = curl_slist_append(NULL, "Content-Type: application/json");
    client->headers = curl_slist_append(client->headers, "Accept: application/json");
    client->headers = curl_slist_append(client->headers, "Expect:");
    client->timeout_ms = VMM_CLIENT_DEFAULT_TIMEOUT_MS;
    pthread_mutex_init(&client->lock, NULL);
    curl_easy_setopt(client->curl, CURLOPT_UNIX_SOCKET_PATH, client->socket_path);
    curl_easy_setopt(client->curl, CURLOPT_HTTPHEADER, client->headers);
    curl_easy_setopt(client->curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(client->curl, CURLOPT_WRITEFUNCTION, vmm_collect_body);
    *out = take_ptr(client);
    return 0;
}

void vmm_client_close(struct vmm_client *client)
{
    if (!client)
        return;
    curl_easy_cleanup(client->curl);
    curl_slist_free_all(client->headers);
    pthread_mutex_destroy(&client->lock);
    free(client);
}

void vmm_client_set_timeout_ms(struct vmm_client *client, long timeout_ms)
{
    pthread_mutex_lock(&client->lock);
    client->timeout_ms = timeout_ms;
    pthread_mutex_unlock(&client->lock);
}

/* "fault_message" of an error body, or the body itself when it is not that JSON. */
static void vmm_fault_message(const char *body, char *out, size_t out_len)
{
    cJSON *json = body ? cJSON_Parse(body) : NULL;
    const cJSON *fault = cJSON_GetObjectItemCaseSensitive(json, "fault_message");
    if (cJSON_IsString(fault))
        snprintf(out, out_len, "%s", fault->valuestring);
    else
        snprintf(out, out_len, "%s", body && *body ? body : "(no body)");
    cJSON_Delete(json);
}

static int vmm_curl_errno(CURLcode code)
{
    switch (code) {
    case CURLE_OPERATION_TIMEDOUT:
        return -ETIMEDOUT;
    case CURLE_COULDNT_CONNECT:
        return -ECONNREFUSED;
    default:
        return -EIO;
    }
}

static int vmm_perform(struct vmm_client *client, const char *method, const char *path,
                       const char *body, long timeout_ms, struct vmm_response *response,
                       long *status, struct forkd_error *err)
{
    char url[512];
    snprintf(url, sizeof(url), "http://localhost%s", path);
    CURL *curl = client->curl;
    curl_easy_setopt(curl, CURLOPT_URL, url);
    curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(curl, CURLOPT_HTTPGET, 0L);
    if (body) {
        curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
    } else if (strcmp(method, "GET") == 0) {
        curl_easy_setopt(curl, CURLOPT_HTTPGET, 1L);
    } else {
        curl_easy_setopt(curl, CURLOPT_POSTFIELDS, "");
        curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE, 0L);
    }
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, timeout_ms > 0 ? timeout_ms : client->timeout_ms);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, response);
    CURLcode code = curl_easy_perform(curl);
    if (code != CURLE_OK) {
        const char *why =
            response->overflow ? "response larger than 256 KiB" : curl_easy_strerror(code);
        return forkd_error_set(err, vmm_curl_errno(code), "%s %s: %s (VMM socket %s)", method, path,
                               why, client->socket_path);
    }
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, status);
    return 0;
}

int vmm_request(struct vmm_client *client, const char *method, const char *path, const char *body,
                char **response_out, struct forkd_error *err)
{
    return vmm_request_within(client, method, path, body, 0, response_out, err);
}

int vmm_request_within(struct vmm_client *client, const char *method, const char *path,
                       const char *body, long timeout_ms, char **response_out,
                       struct forkd_error *err)
{
    struct vmm_response response = {0};
    long status = 0;
    pthread_mutex_lock(&client->lock);
    int rc = vmm_perform(client, method, path, body, timeout_ms, &response, &status, err);
    pthread_mutex_unlock(&client->lock);
    if (rc == 0 && (status < 200 || status > 299)) {
        char fault[FORKD_ERROR_MESSAGE_MAX];
        vmm_fault_message(response.data, fault, sizeof(fault));
        /* EREMOTEIO: the VMM refused (its fault_message says why), not a local I/O error. */
        rc = forkd_error_set(err, -EREMOTEIO, "%s %s: %ld: %s", method, path, status, fault);
    }
    if (rc == 0 && response_out)
        *response_out = response.data ? response.data : strdup("");
    else
        free(response.data);
    return rc;
}

/* Sends a JSON body built by the caller; frees it. */
static int vmm_send_json_within(struct vmm_client *client, const char *method, const char *path,
                                cJSON *body, long timeout_ms, struct forkd_error *err)
{
    if (!body)
        return forkd_error_set(err, -ENOMEM, "%s %s: out of memory", method, path);
    _cleanup_free_ char *text = cJSON_PrintUnformatted(body);
    cJSON_Delete(body);
    if (!text)
        return forkd_error_set(err, -ENOMEM, "%s %s: out of memory", method, path);
    return vmm_request_within(client, method, path, text, timeout_ms, NULL, err);
}

static int vmm_send_json(struct vmm_client *client, const char *method, const char *path,
                         cJSON *body, struct forkd_error *err)
{
    return vmm_send_json_within(client, method, path, body, 0, err);
}

int vmm_put_machine_config(struct vmm_client *client, unsigned vcpu_count, uint64_t mem_size_mib,
                           struct forkd_error *err)
{
    return vmm_put_machine_config_backed(client, vcpu_count, mem_size_mib, NULL, false, err);
}

int vmm_put_machine_config_backed(struct vmm_client *client, unsigned vcpu_count,
                                  uint64_t mem_size_mib, const char *mem_backend_path,
                                  bool huge_pages, struct forkd_error *err)
{
    cJSON *body = cJSON_CreateObject();
    cJSON_AddNumberToObject(body, "vcpu_count", vcpu_count);
    cJSON_AddNumberToObject(body, "mem_size_mib", (double)mem_size_mib);
    if (mem_backend_path)
        cJSON_AddStringToObject(body, "mem_backend_path", mem_backend_path);
    if (huge_pages) /* only when asked: a VMM without the field keeps working otherwise */
        cJSON_AddStringToObject(body, "huge_pages", "2M");
    return vmm_send_json(client, "PUT", "/machine-config", body, err);
}

int vmm_put_boot_source(struct vmm_client *client, const char *kernel_image_path,
                        const char *boot_args, struct forkd_error *err)
{
    cJSON *body = cJSON_CreateObject();
    cJSON_AddStringToObject(body, "kernel_image_path", kernel_image_path);
    if (boot_args && *boot_args)
        cJSON_AddStringToObject(body, "boot_args", boot_args);
    return vmm_send_json(client, "PUT", "/boot-source", body, err);
}

int vmm_put_boot_source_initrd(struct vmm_client *client, const char *kernel_image_path,
                               const char *boot_args, const char *initrd_path,
                               struct forkd_error *err)
{
    cJSON *body = cJSON_CreateObject();
    cJSON_AddStringToObject(body, "kernel_image_path", kernel_image_path);
    if (boot_args && *boot_args)
        cJSON_AddStringToObject(body, "boot_args", boot_args);
    if (initrd_path && *initrd_path)
        cJSON_AddStringToObject(body, "initrd_path", initrd_path);
    return vmm_send_json(client, "PUT", "/boot-source", body, err);
}

/* "/<collection>/<id>"; ids are checked ([A-Za-z0-9_]) before they get here. */
static int vmm_resource_path(char *out, size_t size, const char *collection, const char *id,
                             struct forkd_error *err)
{
    int n = snprintf(out, size, "/%s/%s", collection, id);
    if (n < 0 || (size_t)n >= size)
        return forkd_error_set(err, -ENAMETOOLONG, "%s id '%.64s' is too long", collection, id);
    return 0;
}

int vmm_put_drive(struct vmm_client *client, const char *drive_id, const char *path_on_host,
                  bool is_root_device, bool is_read_only, struct forkd_error *err)
{
    char path[128];
    int rc = vmm_resource_path(path, sizeof(path), "drives", drive_id, err);
    if (rc < 0)
        return rc;
    cJSON *body = cJSON_CreateObject();
    cJSON_AddStringToObject(body, "drive_id", drive_id);
    cJSON_AddStringToObject(body, "path_on_host", path_on_host);
    cJSON_AddBoolToObject(body, "is_root_device", is_root_device);
    cJSON_AddBoolToObject(body, "is_read_only", is_read_only);
    return vmm_send_json(client, "PUT", path, body, err);
}

int vmm_patch_drive(struct vmm_client *client, const char *drive_id, const char *path_on_host,
                    struct forkd_error *err)
{
    char path[128];
    int rc = vmm_resource_path(path, sizeof(path), "drives", drive_id, err);
    if (rc < 0)
        return rc;
    cJSON *body = cJSON_CreateObject();
    cJSON_AddStringToObject(body, "drive_id", drive_id);
    cJSON_AddStringToObject(body, "path_on_host", path_on_host);
    return vmm_send_json(client, "PATCH", path, body, err);
}

int vmm_put_network_interface(struct vmm_client *client, const char *iface_id,
                              const char *host_dev_name, const char *guest_mac,
                              struct forkd_error *err)
{
    char path[128];
    int rc = vmm_resource_path(path, sizeof(path), "network-interfaces", iface_id, err);
    if (rc < 0)
        return rc;
    cJSON *body = cJSON_CreateObject();
    cJSON_AddStringToObject(body, "iface_id", iface_id);
    cJSON_AddStringToObject(body, "host_dev_name", host_dev_name);
    if (guest_mac && *guest_mac)
        cJSON_AddStringToObject(body, "guest_mac", guest_mac);
    return vmm_send_json(client, "PUT", path, body, err);
}

int vmm_put_vsock(struct vmm_client *client, uint32_t guest_cid, const char *uds_path,
                  struct forkd_error *err)
{
    cJSON *body = cJSON_CreateObject();
    cJSON_AddNumberToObject(body, "guest_cid", guest_cid);
    cJSON_AddStringToObject(body, "uds_path", uds_path);
    return vmm_send_json(client, "PUT", "/vsock", body, err);
}

int vmm_start(struct vmm_client *client, struct forkd_error *err)
{
    return vmm_start_within(client, 0, err);
}

int vmm_start_within(struct vmm_client *client, long timeout_ms, struct forkd_error *err)
{
    return vmm_request_within(client, "PUT", "/actions", "{\"action_type\":\"InstanceStart\"}",
                              timeout_ms, NULL, err);
}

int vmm_pause(struct vmm_client *client, struct forkd_error *err)
{
    return vmm_request(client, "PATCH", "/vm", "{\"state\":\"Paused\"}", NULL, err);
}

int vmm_resume(struct vmm_client *client, struct forkd_error *err)
{
    return vmm_request(client, "PATCH", "/vm", "{\"state\":\"Resumed\"}", NULL, err);
}

int vmm_snapshot_create(struct vmm_client *client, enum vmm_snapshot_type type,
                        const char *snapshot_path, const char *mem_file_path,
                        struct forkd_error *err)
{
    return vmm_snapshot_create_within(client, type, snapshot_path, mem_file_path, 0, err);
}

int vmm_snapshot_create_within(struct vmm_client *client, enum vmm_snapshot_type type,
                               const char *snapshot_path, const char *mem_file_path,
                               long timeout_ms, struct forkd_error *err)
{
    cJSON *body = cJSON_CreateObject();
    cJSON_AddStringToObject(body, "snapshot_type",
                            type == VMM_SNAPSHOT_FULL ? "Full" : "VmstateOnly");
    cJSON_AddStringToObject(body, "snapshot_path", snapshot_path);
    cJSON_AddStringToObject(body, "mem_file_path", mem_file_path);
    return vmm_send_json_within(client, "PUT", "/snapshot/create", body, timeout_ms, err);
}

/* False when out of memory (the body is then incomplete and must not be sent). */
static bool vmm_add_load_overrides(cJSON *body, const struct vmm_load_overrides *overrides)
{
    if (overrides->net_count) {
        cJSON *nets = cJSON_AddArrayToObject(body, "network_overrides");
        for (size_t i = 0; i < overrides->net_count; i++) {
            cJSON *net = cJSON_CreateObject();
            if (!nets || !net || !cJSON_AddItemToArray(nets, net) ||
                !cJSON_AddStringToObject(net, "iface_id", overrides->nets[i].iface_id) ||
                !cJSON_AddStringToObject(net, "host_dev_name", overrides->nets[i].host_dev_name))
                return false;
        }
    }
    if (overrides->vsock_uds_path) {
        cJSON *vsock = cJSON_AddObjectToObject(body, "vsock_override");
        if (!vsock || !cJSON_AddStringToObject(vsock, "uds_path", overrides->vsock_uds_path))
            return false;
    }
    return true;
}

int vmm_snapshot_load(struct vmm_client *client, const char *snapshot_path,
                      enum vmm_memory_backend backend, const char *backend_path, bool shared,
                      bool resume_vm, const struct vmm_load_overrides *overrides,
                      struct forkd_error *err)
{
    cJSON *body = cJSON_CreateObject();
    cJSON_AddStringToObject(body, "snapshot_path", snapshot_path);
    cJSON *memory = cJSON_AddObjectToObject(body, "mem_backend");
    cJSON_AddStringToObject(memory, "backend_type", backend == VMM_MEMORY_FILE ? "File" : "Uffd");
    cJSON_AddStringToObject(memory, "backend_path", backend_path);
    if (shared)
        cJSON_AddBoolToObject(memory, "shared", true);
    cJSON_AddBoolToObject(body, "resume_vm", resume_vm);
    if (body && overrides && !vmm_add_load_overrides(body, overrides)) {
        cJSON_Delete(body);
        body = NULL; /* refused as out of memory */
    }
    return vmm_send_json(client, "PUT", "/snapshot/load", body, err);
}

int vmm_uffd_wp(struct vmm_client *client, const char *socket_path, struct forkd_error *err)
{
    cJSON *body = cJSON_CreateObject();
    cJSON_AddStringToObject(body, "socket", socket_path);
    return vmm_send_json(client, "PUT", "/uffd/wp", body, err);
}

static void vmm_copy_string_field(const cJSON *json, const char *name, char *out, size_t out_len)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(json, name);
    snprintf(out, out_len, "%s", cJSON_IsString(item) ? item->valuestring : "");
}

static bool vmm_get_u64_field(const cJSON *json, const char *name, uint64_t *out)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(json, name);
    if (!cJSON_IsNumber(item) || item->valuedouble < 0 || item->valuedouble > 9007199254740992.0)
        return false;
    *out = (uint64_t)item->valuedouble;
    return true;
}

/* GET /'s optional "regions": [{guest_phys_addr, size, offset}, ...]. Anything malformed
 * counts as not reported: the layout is information, never needed to branch. */
static void vmm_copy_regions(const cJSON *json, struct vmm_info *out)
{
    const cJSON *array = cJSON_GetObjectItemCaseSensitive(json, "regions");
    const cJSON *item;
    out->region_count = 0;
    if (!cJSON_IsArray(array) || cJSON_GetArraySize(array) > VMM_INFO_MAX_REGIONS)
        return;
    cJSON_ArrayForEach(item, array)
    {
        struct vmm_region *r = &out->regions[out->region_count];
        if (!vmm_get_u64_field(item, "guest_phys_addr", &r->guest_phys_addr) ||
            !vmm_get_u64_field(item, "size", &r->size) ||
            !vmm_get_u64_field(item, "offset", &r->file_offset)) {
            out->region_count = 0;
            return;
        }
        out->region_count++;
    }
}

int vmm_get_info(struct vmm_client *client, struct vmm_info *out, struct forkd_error *err)
{
    return vmm_get_info_within(client, 0, out, err);
}

int vmm_get_info_within(struct vmm_client *client, long timeout_ms, struct vmm_info *out,
                        struct forkd_error *err)
{
    _cleanup_free_ char *body = NULL;
    int rc = vmm_request_within(client, "GET", "/", NULL, timeout_ms, &body, err);
    if (rc < 0)
        return rc;
    cJSON *json = cJSON_Parse(body);
    if (!cJSON_IsObject(json)) {
        cJSON_Delete(json);
        return forkd_error_set(err, -EPROTO, "GET /: answer is not a JSON object: %.200s", body);
    }
    vmm_copy_string_field(json, "id", out->id, sizeof(out->id));
    vmm_copy_string_field(json, "state", out->state, sizeof(out->state));
    vmm_copy_string_field(json, "vmm_version", out->vmm_version, sizeof(out->vmm_version));
    vmm_copy_regions(json, out);
    cJSON_Delete(json);
    return 0;
}
