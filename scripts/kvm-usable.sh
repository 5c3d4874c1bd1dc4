#!/usr/bin/env bash
# Exits 0 when this host has a usable /dev/kvm: a character device this user can open for
# reading and writing. It never creates anything (a plain `exec 3<>/dev/kvm` would create an
# empty regular file where the device is missing, and every later check would be fooled).
[ -c /dev/kvm ] || exit 1
{ exec 3<>/dev/kvm; } 2>/dev/null || exit 1
exec 3>&-
exit 0
