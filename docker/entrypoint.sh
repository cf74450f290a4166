#!/bin/sh
# Run the service as an unprivileged user that can still read the federation's secrets, with
# its metrics exporter beside it when METRICS_PORT is set.
#
# Compose file secrets are bind mounts that keep the host's owner and mode (keys are 0600), so
# the unprivileged user could not read them. As root, copy them to a tmpfs readable by that user
# only, make the writable mounts its own if they are not yet, then drop root for good.
set -eu
uid=${APP_UID:-10001}
gid=${APP_GID:-$uid}
[ "$uid" != 0 ] || { uid=10001; gid=10001; }  # never keep root, even if the host user is root
as_user=""
if [ "$(id -u)" = 0 ]; then
    if [ -d /run/secrets ]; then
        install -d -m 0700 -o "$uid" -g "$gid" /run/fedlora
        for f in /run/secrets/*; do
            [ -f "$f" ] && install -m 0400 -o "$uid" -g "$gid" "$f" "/run/fedlora/$(basename "$f")"
        done
    fi
    # The container's stdout/stderr pipes are root's, mode 0600: a service that opens them by path
    # (nginx's access log, /dev/stdout) could not once it is unprivileged.
    chown "$uid:$gid" /proc/self/fd/1 /proc/self/fd/2 2>/dev/null || true
    for d in ${WRITABLE_DIRS:-}; do
        [ -d "$d" ] && [ "$(stat -c %u "$d")" != "$uid" ] && chown "$uid:$gid" "$d"
    done
    as_user="setpriv --reuid=$uid --regid=$gid --clear-groups --inh-caps=-all --bounding-set=-all --"
fi
if [ -n "${METRICS_PORT:-}" ]; then
    # Lives as long as the service: the container ends when the service (PID 1 below) does.
    # shellcheck disable=SC2086
    $as_user python /usr/local/bin/metrics_exporter.py --port "$METRICS_PORT" ${METRICS_ARGS:-} &
fi
# shellcheck disable=SC2086
exec $as_user "$@"
