#!/bin/sh
# Entry point of the agents in compose.yaml: enroll with the fleet on the first start (with the
# token fleet-init made for DEVICE_ID), then serve. Enrollment keeps the device's identity in its
# state volume, so later starts go straight to serving.
set -eu

STATE="${EDGEFLEET_AGENT_STATE_DIR:-/var/lib/edgefleet/agent}"
if [ ! -f "$STATE/trust/identity/device.crt" ]; then
  edgefleet agent enroll --fleet "$FLEET_URL" --device-id "$DEVICE_ID" \
    --token "$(cat "/enrollment/$DEVICE_ID.token")" --state-dir "$STATE"
fi
exec edgefleet agent serve
