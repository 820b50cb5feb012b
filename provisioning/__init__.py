"""Provisioning: turn a blank SD card into an enrolled token or pillar.

It runs on the centre's workstation, where the fleet CA is, never on a device: it joins the
centre's side (the CA, the fleet registry) with the firmware's (its config loader checks what is
written), so it sits on top of both, beside the simulator (docs/DESIGN.md, "Layers"). What it
copies onto the card holds the firmware, `protocol` and `evidence_format` and nothing else.
"""
