#!/usr/bin/env node
// Verify signed messages given on stdin, with the canonical bytes this side computed, so a test
// can compare them with Python's (tests/test_interop_node.py).
// stdin: {"public_key": BASE64, "messages": [signed message, ...]}
// stdout: one JSON line per message: {"valid": bool, "canonical": "the RFC 8785 text"}

import { readFileSync } from 'node:fs';

import { publicKeyFromBase64, signatureValid, signedBytes } from './signing.mjs';

const { public_key: publicKey, messages } = JSON.parse(readFileSync(0, 'utf8'));
const key = publicKeyFromBase64(publicKey);
for (const message of messages) {
  const line = { valid: signatureValid(message, key), canonical: signedBytes(message).toString() };
  process.stdout.write(`${JSON.stringify(line)}\n`);
}
