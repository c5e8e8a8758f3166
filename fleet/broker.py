"""An MQTT broker inside the fleet service, for one machine: ``fleet serve --embedded-broker``.

It listens on loopback only, without TLS or client certificates — a development and demo
convenience so that nothing has to be installed by hand. Desired states stay director-signed,
so a local process that publishes on the broker can still at worst cause a refused no-op.
Production runs Mosquitto (or any MQTT 3.1.1/5 broker) with the packaged mTLS + ACL config.
"""

from __future__ import annotations

import logging
from typing import Any

from fleet.errors import LinkError

__all__ = ["EmbeddedBroker"]

log = logging.getLogger(__name__)


class EmbeddedBroker:
    """amqtt on ``127.0.0.1:port``; start and stop from the service's event loop."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def start(self) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError as e:
            raise LinkError(
                "the embedded broker needs amqtt: pip install 'edgefleet[fleet]'"
            ) from e
        # amqtt (and its state machine library) log every packet and transition at INFO.
        for chatty in ("amqtt", "transitions"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        self._broker = Broker(config)
        try:
            await self._broker.start()
        except Exception as e:  # amqtt raises its own BrokerError or a bare OSError
            raise LinkError(
                f"the embedded broker cannot listen on {self.host}:{self.port}: {e}; pick "
                "another --embedded-broker-port or stop what uses it"
            ) from e
        log.warning(
            "embedded MQTT broker running: loopback only, no TLS; use Mosquitto in production",
            extra={"broker": self.url},
        )

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
