"""Where steps come from: one module per source (MQTT; the microphone lives beside it)."""
