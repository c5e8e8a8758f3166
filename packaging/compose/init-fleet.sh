#!/bin/sh
# fleet-init in compose.yaml: set up what the fleet, the broker and the agents need. Runs at
# every `docker compose up` and does only what is missing, except that it hands the broker the
# current CRL each time (a fresh one comes from `edgefleet fleet crl`).
#
# Runs as root so that it can give the fresh volumes to their users; every edgefleet command
# runs as the edgefleet user. The paths can be changed for a run outside the container.
set -eu

HOME_DIR="${EDGEFLEET_FLEET_HOME:-/var/lib/edgefleet/fleet}"
BROKER_OUT="${BROKER_OUT:-/broker}"                     # the broker-config volume
BROKER_DIR="${BROKER_DIR:-/mosquitto/edgefleet}"        # where the broker mounts it
BROKER_DATA="${BROKER_DATA:-/mosquitto/data}"
BROKER_USER="${BROKER_USER:-mosquitto}"
BROKER_GID="${BROKER_GID:-1883}"                        # mosquitto in eclipse-mosquitto
BROKER_PORT="${BROKER_PORT:-8883}"
BROKER_BIND="${BROKER_BIND:-0.0.0.0}"
TEMPLATES="${TEMPLATES:-/packaging/mosquitto}"
ENROLLMENT="${ENROLLMENT:-/enrollment}"
DEVICES="${DEVICES:-agent-1 agent-2}"
RUN_AS="${RUN_AS-edgefleet}"                            # empty: as whoever runs this

as_fleet() {
  if [ -n "$RUN_AS" ]; then
    setpriv --reuid="$RUN_AS" --regid="$RUN_AS" --clear-groups -- "$@"
  else
    "$@"
  fi
}

if [ -n "$RUN_AS" ]; then
  chown "$RUN_AS:$RUN_AS" "$HOME_DIR" "$ENROLLMENT"
fi

if [ ! -f "$HOME_DIR/repository/metadata/root.json" ]; then
  # The broker's certificate names the host agents connect to: the compose service.
  as_fleet edgefleet fleet --home "$HOME_DIR" keys init --broker-host mosquitto
fi

# The broker reads its key as root at start, the CRL again as mosquitto on a reload.
install -m 0644 "$HOME_DIR/broker/ca.pem" "$HOME_DIR/broker/crl.pem" \
  "$HOME_DIR/broker/broker.pem" "$TEMPLATES/acl" "$BROKER_OUT/"
install -m 0640 "$HOME_DIR/broker/broker.key" "$BROKER_OUT/broker.key"
if [ -n "$RUN_AS" ]; then
  chgrp "$BROKER_GID" "$BROKER_OUT/broker.key"
fi
sed -e "s|[\$]{EDGEFLEET_BROKER_DIR}|$BROKER_DIR|g" \
    -e "s|[\$]{EDGEFLEET_BROKER_DATA}|$BROKER_DATA|g" \
    -e "s|[\$]{EDGEFLEET_BROKER_USER}|$BROKER_USER|g" \
    -e "s|[\$]{EDGEFLEET_BROKER_PORT}|$BROKER_PORT|g" \
    -e "s|[\$]{EDGEFLEET_BROKER_BIND}|$BROKER_BIND|g" \
    "$TEMPLATES/mosquitto.conf" > "$BROKER_OUT/mosquitto.conf"

# One token per agent that has none: the agent enrolls with it on its first start. A used
# token is refused, so a leftover file is harmless; delete it to enroll a device again.
for device in $DEVICES; do
  if [ ! -s "$ENROLLMENT/$device.token" ]; then
    as_fleet sh -c "umask 077; edgefleet fleet --home '$HOME_DIR' enroll-token '$device' --ttl 1h \
      > '$ENROLLMENT/$device.token'"
  fi
done
echo "fleet-init: fleet home, broker files and enrollment tokens are in place"
