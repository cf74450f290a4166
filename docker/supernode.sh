#!/bin/sh
# Start one organisation's Flower SuperNode from environment settings, and say what to fix when
# the SuperLink refuses it. Used by every silo: docker/join/compose.yaml and the demo's compose.yaml.
#
#   SUPERLINK_ADDRESS  HOST:PORT of the federation's gateway (required)
#   ORG                this organisation's name, as the coordinator registered it (required)
#   NODE_CONFIG_EXTRA  more --node-config pairs, e.g. default-caption="a photo" (optional)
#   REQUIRE_SECAGG     node setting require-secagg: true refuses any training message outside SecAgg+
#                      (optional; the join kit sets true, docker/join/.env; the demo leaves it off)
#   MAX_RETRIES        give up after this many failed connection attempts (optional; default: retry forever)
#   NODE_KEY           node private key (default /run/fedlora/node.key)
#   CA_CERT            federation CA (default /run/fedlora/ca.pem)
#   DATA_DIR           the organisation's images, as the ClientApp container sees them (default /data)
#   SUPEREXEC_SECRET   the organisation's SuperExec secret (default /run/fedlora/superexec.secret)
#   RELAY_DIR          the volume shared with the organisation's ClientApp container (optional)
#   Arguments are passed on to flower-supernode (e.g. --port), which starts through docker/supernode.py
#   (Flower's SuperNode, made to answer every message it took).
#
# Process isolation (docs/isolation.md): this node runs no app code. The ClientApp container's
# SuperExec, holding the same secret, takes the messages from this node's ClientAppIo API, which
# listens on this container's loopback only; with RELAY_DIR set, socat gives that API to the
# ClientApp container as a Unix socket there, and passes Prometheus' scrapes of :9200 the other way.
#
# Exits with flower-supernode's exit status. SIGTERM/SIGINT reach flower-supernode, so that it
# deactivates at once rather than after the SuperLink's ~60 s heartbeat timeout.
set -u
: "${SUPERLINK_ADDRESS:?set SUPERLINK_ADDRESS to the federation gateway's HOST:PORT}"
: "${ORG:?set ORG to this organisation's registered name}"
key=${NODE_KEY:-/run/fedlora/node.key}
ca=${CA_CERT:-/run/fedlora/ca.pem}
data=${DATA_DIR:-/data}
secret=${SUPEREXEC_SECRET:-/run/fedlora/superexec.secret}
export NODE_KEY="$key" CA_CERT="$ca" DATA_DIR="$data" SUPEREXEC_SECRET="$secret"  # for the preflight below
[ -s "$secret" ] || { echo "no SuperExec secret at $secret: run \`make org-key ORG=$ORG\` (it creates certs/nodes/$ORG.superexec.secret)" >&2; exit 1; }
if [ -n "${RELAY_DIR:-}" ]; then
    socat "UNIX-LISTEN:$RELAY_DIR/appio.sock,fork,unlink-early,mode=600" TCP:127.0.0.1:9094 &
    socat TCP-LISTEN:9200,fork,reuseaddr "UNIX-CONNECT:$RELAY_DIR/metrics.sock" &
fi

# Not exec: this shell stays to explain a refusal, so it forwards the signals itself. Flower
# logs "Exit Code: 305" but the process exits 1: the output passes through a filter that notes
# the code Flower logged.
tmp=$(mktemp -d)
mkfifo "$tmp/output"
# Line by line in the shell: mawk (Debian's awk) reads a pipe in 4 KB blocks, which held a running
# node's log back until it exited.
while IFS= read -r line || [ -n "$line" ]; do
    printf '%s\n' "$line"
    case $line in
        *"Exit Code: "[0-9]*) code=${line#*Exit Code: }; printf '%s\n' "${code%%[!0-9]*}" >"$tmp/flower-exit-code" ;;
    esac
done <"$tmp/output" &
filter=$!
# shellcheck disable=SC2086
supernode.py --superlink "$SUPERLINK_ADDRESS" --root-certificates "$ca" \
    --auth-supernode-private-key "$key" --isolation process --superexec-auth-secret-file "$secret" \
    --node-config "data-dir='$data' org='$ORG' ${REQUIRE_SECAGG:+require-secagg=$REQUIRE_SECAGG} ${NODE_CONFIG_EXTRA:-}" \
    ${MAX_RETRIES:+--max-retries "$MAX_RETRIES"} "$@" >"$tmp/output" 2>&1 &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM
trap 'kill -INT "$pid" 2>/dev/null' INT
# `wait` returns early when a trapped signal arrives; wait again until the node has really exited.
while :; do
    wait "$pid"
    rc=$?
    kill -0 "$pid" 2>/dev/null || break
done
wait "$filter"
flower_code=$(cat "$tmp/flower-exit-code" 2>/dev/null)
rm -rf "$tmp"

if [ "$flower_code" = 305 ]; then
    cat >&2 <<EOF

flower-supernode could not join the federation at $SUPERLINK_ADDRESS (Flower exit code 305, above).
If it says "Failed to activate SuperNode": this organisation's node key ($key) is not registered
with the federation, or another node with this key is already connected. Fix: send
certs/nodes/$ORG.pub to the coordinator and ask them to run
    make register-org ORG=$ORG KEY=$ORG.pub
(a key registered under another name than '$ORG' starts, but the coordinator's runs refuse it).
Any other error: run \`make join-check\`. Checking now:
EOF
    # The same checks as `make join-check`, minus data and GPU; they tell the cases apart.
    python "$(dirname "$0")/preflight.py" --skip data,gpu --after-exit-305 >&2 || true
fi
exit "$rc"
