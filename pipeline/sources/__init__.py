"""Where steps come from: the MQTT source with its payload decoder, channel assembler and
ack ledger; audio capture from microphones and WAV files."""
