"""Fleet service: registry, rollouts, console (built in later issues)."""
