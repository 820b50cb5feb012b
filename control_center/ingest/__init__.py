"""Evidence ingest: devices upload encrypted segments over tus 1.0.0 with mutual TLS.

    from control_center.ingest import IngestServer, DirectoryStore
    server = IngestServer(fleet, DirectoryStore(root), AuditLog(path), workdir=..., cert_file=...,
                          key_file=...)
    server.start(); server.url; server.pause(); server.resume(); server.stop()

Modules: `server` (the upload life cycle), `handler` (HTTP, TLS per connection), `tus`
(protocol details), `uploads` (durable upload state), `verify` (what is checked), `stores`
(directory and S3), `receipts`, `identity` (certificates and the fleet registry), `cli`
(`sos-center ingest`). See docs/UPLOAD.md.
"""

from control_center.ingest.receipts import make_receipt, receipt_problems
from control_center.ingest.server import IngestServer
from control_center.ingest.stores import DirectoryStore, EvidenceStore, S3Store, StoreError
from control_center.ingest.tus import Refusal

__all__ = ["DirectoryStore", "EvidenceStore", "IngestServer", "Refusal", "S3Store",
           "StoreError", "make_receipt", "receipt_problems"]
