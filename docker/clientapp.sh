#!/bin/sh
# An organisation's ClientApp container (docs/isolation.md): no network (network_mode: none), no
# node key. Flower's SuperExec here starts one `flwr-clientapp` process per message; it and they
# reach this organisation's SuperNode only through the relay below, over a Unix socket on the
# volume the two containers share.
#
#   RELAY_DIR         the volume shared with the SuperNode container (default /relay)
#   SUPEREXEC_SECRET  the organisation's SuperExec secret (default /run/fedlora/superexec.secret)
#   RUNTIME_PORT      where the SuperNode's ClientAppIo (Runtime) API appears here, on 127.0.0.1 (9094)
#   METRICS_PORT      this container's metrics exporter (docker/entrypoint.sh), relayed the other way
set -eu
relay=${RELAY_DIR:-/relay}
port=${RUNTIME_PORT:-9094}
secret=${SUPEREXEC_SECRET:-/run/fedlora/superexec.secret}

# Flower's ClientAppIo API is HTTP/1.1 (uvicorn); socat passes the bytes through unchanged.
socat "TCP-LISTEN:$port,bind=127.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$relay/appio.sock" &
if [ -n "${METRICS_PORT:-}" ]; then
    # Prometheus scrapes the SuperNode container, which passes the scrape on to this socket.
    socat "UNIX-LISTEN:$relay/metrics.sock,fork,unlink-early,mode=600" "TCP:127.0.0.1:$METRICS_PORT" &
fi

# The secret reaches the SuperExec as an open file and leaves the filesystem: the run's code runs
# as this same user, and Flower makes the SuperExec non-dumpable, so the code cannot read it back
# (not from the file, nor from /proc/<pid>/fd).
[ -s "$secret" ] || { echo "no SuperExec secret at $secret: run \`make org-key ORG=...\` (it creates certs/nodes/ORG.superexec.secret)" >&2; exit 1; }
exec 3<"$secret"
rm -f "$secret"
exec flower-superexec --runtime-api-address "127.0.0.1:$port" --insecure \
    --superexec-auth-secret-file /dev/fd/3 --health-server-address 127.0.0.1:9098 "$@"
