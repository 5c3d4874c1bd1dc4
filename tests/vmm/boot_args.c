/* boot_args: parses the workload grammar of boot_args (see boot_args.h). */
#include "boot_args.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "basic/cleanup.h"

#include "guest_layout.h"
#include "vmm_error.h"

#define BOOT_ARGS_MAX_LENGTH 1024

static const char *const pattern_names[] = {
    [GUEST_PATTERN_SEQUENTIAL] = "sequential",
    [GUEST_PATTERN_RANDOM] = "random",
    [GUEST_PATTERN_HOTSET] = "hotset",
};

const char *boot_args_pattern_name(uint32_t pattern)
{
    if (pattern < ARRAY_SIZE(pattern_names))
        return pattern_names[pattern];
    return "unknown";
}

/* Decimal only, no sign, no trailing junk, no overflow: boot_args come from API clients. */
static int parse_u64(const char *key, const char *value, uint64_t *out, char *err, size_t err_size)
{
    char *end;

    if (value[0] < '0' || value[0] > '9')
        return error_set(err, err_size, EINVAL, "boot_args: %s=%s is not a decimal number", key,
                         value);
    errno = 0;
    unsigned long long parsed = strtoull(value, &end, 10);
    if (errno || *end != '\0')
        return error_set(err, err_size, EINVAL, "boot_args: %s=%s is not a decimal number", key,
                         value);
    *out = parsed;
    return 0;
}

static int parse_pattern(const char *value, uint32_t *out, char *err, size_t err_size)
{
    for (uint32_t i = 0; i < ARRAY_SIZE(pattern_names); i++) {
        if (strcmp(value, pattern_names[i]) == 0) {
            *out = i;
            return 0;
        }
    }
    return error_set(err, err_size, EINVAL,
                     "boot_args: pattern=%s is not one of sequential, random, hotset", value);
}

static int parse_pair(char *pair, struct workload *w, char *err, size_t err_size)
{
    char *equals = strchr(pair, '=');

    if (!equals)
        return error_set(err, err_size, EINVAL, "boot_args: '%s' is not key=value", pair);
    *equals = '\0';
    const char *key = pair, *value = equals + 1;
    if (strcmp(key, "pages") == 0) {
        int r = parse_u64(key, value, &w->pages, err, err_size);
        if (r == 0 && w->pages == 0)
            return error_set(err, err_size, EINVAL, "boot_args: pages must be at least 1");
        return r;
    }
    if (strcmp(key, "pattern") == 0)
        return parse_pattern(value, &w->pattern, err, err_size);
    if (strcmp(key, "rate") == 0)
        return parse_u64(key, value, &w->rate, err, err_size);
    if (strcmp(key, "seed") == 0)
        return parse_u64(key, value, &w->seed, err, err_size);
    if (strcmp(key, "report_us") == 0) {
        int r = parse_u64(key, value, &w->report_us, err, err_size);
        if (r == 0 && (w->report_us < 100 || w->report_us > 1000000))
            return error_set(err, err_size, EINVAL,
                             "boot_args: report_us must be from 100 to 1000000");
        return r;
    }
    if (strcmp(key, "balloon") == 0) {
        int r = parse_u64(key, value, &w->balloon_pages, err, err_size);
        if (r == 0 && w->balloon_pages > GUEST_BALLOON_MAX_PAGES)
            return error_set(err, err_size, EINVAL, "boot_args: balloon must be at most %llu",
                             (unsigned long long)GUEST_BALLOON_MAX_PAGES);
        return r;
    }
    if (strcmp(key, "skip") == 0)
        return parse_u64(key, value, &w->skip_pages, err, err_size);
    return error_set(err, err_size, EINVAL,
                     "boot_args: unknown key '%s' (expected pages, pattern, rate, seed, report_us, "
                     "balloon, skip)",
                     key);
}

int boot_args_parse(const char *text, struct workload *out, char *err, size_t err_size)
{
    struct workload w = {.pattern = GUEST_PATTERN_RANDOM, .seed = 1};
    char copy[BOOT_ARGS_MAX_LENGTH + 1];
    char *save = NULL;

    if (text) {
        if (strlen(text) > BOOT_ARGS_MAX_LENGTH)
            return error_set(err, err_size, EINVAL, "boot_args longer than %d bytes",
                             BOOT_ARGS_MAX_LENGTH);
        strcpy(copy, text);
        for (char *pair = strtok_r(copy, " \t", &save); pair; pair = strtok_r(NULL, " \t", &save)) {
            int r = parse_pair(pair, &w, err, err_size);
            if (r < 0)
                return r;
        }
    }
    *out = w;
    return 0;
}
