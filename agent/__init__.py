"""The on-device agent: serves bundles over OIP v2 on HTTP and a Unix socket."""
