"""``edgefleet demo``: the whole system on one machine — a fleet service with its embedded MQTT
broker, three enrolled agents under steady traffic, four model versions to roll out — and
``edgefleet demo --scripted``, which rolls a good and a bad version out and tells what happens.

bundles    the demo's model versions, built once into the work directory
processes  child processes that never outlive the demo, the work directory's lock, ports
stack      the fleet service and the agents: keys, publishing, enrollment, labels, stack.json
traffic    steady requests to every agent, with outcomes posted back
story      the scripted rollouts, told step by step
command    the click command: banner and wait, or the story; one teardown
"""

from edgefleet.demo.bundles import DemoBundles, build_demo_bundles
from edgefleet.demo.command import demo

__all__ = ["DemoBundles", "build_demo_bundles", "demo"]
