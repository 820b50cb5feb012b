"""Uplink: the durable outbox and the MQTT 5 link to the control centre."""
