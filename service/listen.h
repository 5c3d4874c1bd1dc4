/*
 * Listen addresses: which ones forkd accepts, and why a listen failed. forkd runs as root and
 * whoever reaches its socket drives VMs, so an address that any local user can reach without a
 * file permission check (an abstract Unix socket, which also is what an empty "unix:" name
 * becomes) is refused unless asked for explicitly. gRPC's own "cannot bind" carries no reason:
 * listen_explain_failure finds it by trying the bind itself.
 */
#ifndef FORKD_SERVICE_LISTEN_H
#define FORKD_SERVICE_LISTEN_H

#include "basic/error.h"

#include <stdbool.h>
#include <stddef.h>
#include <sys/un.h>

enum listen_kind { LISTEN_UNIX, LISTEN_UNIX_ABSTRACT, LISTEN_TCP };

struct listen_address {
    enum listen_kind kind;
    const char *target;                                 /* the address as gRPC takes it */
    char unix_path[sizeof(((struct sockaddr_un *)0)->sun_path)]; /* LISTEN_UNIX only */
};

/* Classifies address ("unix:PATH", "unix-abstract:NAME", "unix:@NAME", "tcp:HOST:PORT",
 * "HOST:PORT"). Refuses an empty Unix path, a path too long for a socket address (checked on
 * the whole path, before any copy), and abstract names unless allow_abstract. Returns 0 or
 * -EINVAL with the reason in err. out->target points into address. */
int listen_parse(const char *address, bool allow_abstract, struct listen_address *out,
                 struct forkd_error *err);

/* After gRPC could not listen on address: records "cannot listen on ADDRESS: REASON" in err,
 * the reason found by binding a socket to the same address (without SO_REUSEPORT), and returns
 * its code (-EADDRNOTAVAIL when the bind works). */
int listen_explain_failure(const struct listen_address *address, struct forkd_error *err);

#endif
