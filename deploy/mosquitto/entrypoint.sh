#!/bin/sh
# Start Mosquitto with a password file written from the environment (none is in the repo).
# MQTT_PASSWORD, MQTT_TELEMETRY_PASSWORD and MQTT_OPERATOR_PASSWORD must be set; the file is
# rewritten at every start, so changing a variable and restarting rotates that password.
# Passwords go to mosquitto_passwd on standard input, never on a command line (ps shows those).
set -eu
CONF="${MOSQUITTO_CONF:-/mosquitto/config/mosquitto.conf}"
PASSWD="${MOSQUITTO_PASSWD_FILE:-/mosquitto/data/passwd}"
umask 077
rm -f "$PASSWD"
: > "$PASSWD"
add() {
    if [ -z "$2" ]; then
        echo "entrypoint: the password of MQTT user $1 is empty" >&2
        exit 64
    fi
    printf '%s\n%s\n' "$2" "$2" | mosquitto_passwd "$PASSWD" "$1" > /dev/null
}
add voltpool "${MQTT_PASSWORD:?MQTT_PASSWORD is not set}"
add telemetry "${MQTT_TELEMETRY_PASSWORD:?MQTT_TELEMETRY_PASSWORD is not set}"
add operator "${MQTT_OPERATOR_PASSWORD:?MQTT_OPERATOR_PASSWORD is not set}"
unset MQTT_PASSWORD MQTT_TELEMETRY_PASSWORD MQTT_OPERATOR_PASSWORD
chown mosquitto "$PASSWD" 2> /dev/null || true
exec mosquitto -c "$CONF"
