"""The device's MQTT link to the fleet: an asyncio wrapper around paho-mqtt and the link that
publishes the device's state and hands desired states to the update lifecycle."""

from agent.mqtt.client import (
    BrokerAddress,
    ClientConfig,
    Message,
    MqttClient,
    TlsFiles,
    Will,
    broker_address,
)
from agent.mqtt.link import DesiredHandler, FleetLink, LinkConfig
from agent.mqtt.state import StateReporter

__all__ = [
    "BrokerAddress",
    "ClientConfig",
    "DesiredHandler",
    "FleetLink",
    "LinkConfig",
    "Message",
    "MqttClient",
    "StateReporter",
    "TlsFiles",
    "Will",
    "broker_address",
]
