"""The contract the agent, the fleet and the exporters share: bundle format and datatypes."""
