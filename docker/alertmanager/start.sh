#!/bin/sh
# Alertmanager's configuration from the stack's settings (.env, passed by compose.yaml), written to
# the container's tmpfs, then Alertmanager itself. Alertmanager reads no environment variables in
# its configuration file, hence this script; it runs in the upstream image's busybox sh too.
set -eu
conf=/tmp/alertmanager.yml

# A quote, backslash or line break would end the YAML string early: refuse it instead.
for name in ALERT_WEBHOOK_URL ALERT_EMAIL_TO ALERT_EMAIL_FROM ALERT_SMTP_SMARTHOST; do
    eval "value=\${$name:-}"
    case "$value" in
        *'"'* | *'\'* | *"
"*) echo "alertmanager: $name holds a quote, backslash or line break; fix it in .env" >&2; exit 1 ;;
    esac
done

{
    echo "route:"
    echo "  receiver: fedlora"
    echo "  group_by: [alertname, org]"
    echo "  group_wait: ${ALERT_GROUP_WAIT}"
    echo "  group_interval: ${ALERT_GROUP_INTERVAL}"
    echo "  repeat_interval: ${ALERT_REPEAT_INTERVAL}"
    echo "receivers:"
    echo "  - name: fedlora"
    if [ -n "${ALERT_WEBHOOK_URL:-}" ]; then
        echo "    webhook_configs:"
        echo "      - url: \"${ALERT_WEBHOOK_URL}\""
        echo "        send_resolved: true"
    fi
    if [ -n "${ALERT_EMAIL_TO:-}" ]; then
        : "${ALERT_EMAIL_FROM:?set ALERT_EMAIL_FROM in .env: e-mail alerts need a sender}"
        : "${ALERT_SMTP_SMARTHOST:?set ALERT_SMTP_SMARTHOST (host:port) in .env: e-mail alerts need a mail relay}"
        echo "    email_configs:"
        echo "      - to: \"${ALERT_EMAIL_TO}\""
        echo "        from: \"${ALERT_EMAIL_FROM}\""
        echo "        smarthost: \"${ALERT_SMTP_SMARTHOST}\""
        echo "        require_tls: ${ALERT_SMTP_REQUIRE_TLS:-true}"
        echo "        send_resolved: true"
    fi
} > "$conf"
if [ -z "${ALERT_WEBHOOK_URL:-}${ALERT_EMAIL_TO:-}" ]; then
    echo "alertmanager: no receiver configured (ALERT_WEBHOOK_URL, ALERT_EMAIL_TO in .env): alerts reach nobody" >&2
fi
# One instance: no cluster gossip port.
exec alertmanager --config.file="$conf" --storage.path=/alertmanager --web.listen-address=:9093 --cluster.listen-address= "$@"
