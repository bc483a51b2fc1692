"""Where results go: one module per sink (MQTT)."""
