"""The evidence format both sides share: the age stream a segment is encrypted with, the minisign
signature of its manifest, the manifest's schema and hash chain, bech32 keys, and the durable
file writes they are stored with.

It sits at the bottom with `protocol/`: the firmware writes this format, the control centre reads
and checks it, and neither imports the other (docs/DESIGN.md, "Layers").
"""
