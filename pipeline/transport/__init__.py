"""The MQTT client every broker user shares."""
