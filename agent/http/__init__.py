"""The agent's local API: Open Inference Protocol v2 over HTTP and a Unix socket."""
