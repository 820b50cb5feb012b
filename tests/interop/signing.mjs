// Ed25519 signatures over RFC 8785 (JCS), as docs/PROTOCOL.md "Signatures" specifies them.

import { createPublicKey, sign, verify } from 'node:crypto';

import canonicalize from 'canonicalize';

// The registry and trust.centre_keys hold raw 32-byte public keys in base64. Node takes them as
// SPKI DER, which for Ed25519 is a fixed 12-byte header followed by the raw key.
const ED25519_SPKI_HEADER = Buffer.from('302a300506032b6570032100', 'hex');

export function publicKeyFromBase64(text) {
  const raw = Buffer.from(text, 'base64');
  if (raw.length !== 32) throw new Error(`not a base64 Ed25519 public key: ${text}`);
  return createPublicKey({ key: Buffer.concat([ED25519_SPKI_HEADER, raw]), format: 'der',
    type: 'spki' });
}

// A signature covers the message without `sig` in the JSON Canonicalization Scheme (RFC 8785):
// keys sorted by UTF-16 code units, no whitespace, numbers as ECMAScript prints them (76.0 is
// `76`), strings as JSON.stringify writes them (UTF-8, no \u escapes for non-ASCII). So the
// signed bytes are re-made from the parsed message, never taken from the wire: the sender may
// have serialised it any way it liked.
export function signedBytes(message) {
  const { sig, ...body } = message;
  return Buffer.from(canonicalize(body), 'utf8');
}

export function signatureValid(message, publicKey) {
  // Ed25519 hashes internally: Node wants `null` as the digest algorithm.
  return verify(null, signedBytes(message), publicKey, Buffer.from(message.sig, 'base64'));
}

export function signed(message, privateKey) {
  return { ...message, sig: sign(null, signedBytes(message), privateKey).toString('base64') };
}
