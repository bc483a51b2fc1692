"""Cluster mode: several daemons share the streams through a NATS JetStream cluster.

Recurrent state pins a stream to one daemon: its steps must reach the holder of its
state, in order, and the state must move with the stream when daemons come and go.
Nothing here is a home-made distributed system; NATS provides every guarantee:

* **Partitions** are the unit of ownership and of state. The servers' subject mapping
  (``deploy/cluster/nats.conf``) sends MQTT ``sensors/<id>/data`` (NATS
  ``sensors.<id>.data``) to ``part.<P>.sensors.<id>.data``, P = FNV-1a(id) mod N, the
  same on every server.
* **Durable input**: the MQTT gateway's own stream ``$MQTT_msgs`` (R3 by the servers'
  ``stream_replicas``), where the gateway stores a QoS 1 PUBLISH before acknowledging
  it, as ``$MQTT.msgs.part.<P>.sensors.<id>.data``; readings wait there while nobody
  owns their partition, kept by one never-read durable consumer per partition. (A
  stream of our own capturing the gateway's plain NATS publish loses what arrives while
  it elects a leader: see deploy/cluster/RUNBOOK.md.)
* **Leases** in a JetStream key-value bucket with a TTL (``<group>-leases``): a member
  creates ``p.<P>`` (fails while another holds it), renews it with compare-and-set on
  its revision, and treats the revision as its fencing token. A member that has not
  renewed within the TTL (less a margin) stops publishing and checkpointing for the
  partition before the server lets anyone else create the key.
* **Checkpoints** per partition in a key-value bucket (``<group>-checkpoints``): the
  engine's own checkpoint format (:meth:`pipeline.engine.engine.Engine.save`) behind a JSON
  header holding the input sequence it covers; written with compare-and-set, so a
  stale owner's write fails. A new owner restores it and replays the input after it:
  the state an uninterrupted run would have.
* **Membership** by heartbeats in ``<group>-members`` (same TTL); each member wants
  the partitions whose rendezvous hash over the live members picks it
  (:func:`pipeline.cluster.assign.owner`). A joining member makes the others release
  its share (final checkpoint, lease deleted); a leaving one does the same for all of
  its partitions; a dead one's leases expire and the survivors take over.

Predictions go to NATS ``predictions.<stream>``, which the servers' MQTT gateway
delivers to MQTT subscribers of ``predictions/<stream>``. After a takeover (the
previous owner died, so it may have published beyond its last checkpoint) the
replayed steps' predictions carry ``"replayed":true``; they are the same values as
the ones published before (same state, same input), so a consumer may drop a
prediction whose ``seq`` it has already seen.
"""
