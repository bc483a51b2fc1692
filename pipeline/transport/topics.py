"""The placeholders of topic templates, one notation for every MQTT user.

``{stream}`` marks the topic level that carries the stream id (``sensors/{stream}/data``):
an input template is subscribed with it replaced by ``+``, an output template is filled
with the id. ``{channel}`` marks the level naming one of the model's features (one topic
per channel), ``{client_id}`` the daemon's MQTT client id in its status and error topics.
They live here, below the sources, sinks and config that all read them, so each is
defined once.
"""

STREAM = "{stream}"
CHANNEL = "{channel}"  # per-channel input: the level naming one of the model's features
CLIENT_ID = "{client_id}"
