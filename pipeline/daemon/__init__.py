"""The single-box daemon: the TOML reader, the composition root, life cycle, systemd, /status."""
