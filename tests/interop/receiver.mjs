#!/usr/bin/env node
// A partner control centre in JavaScript, written from docs/PROTOCOL.md and docs/INTEGRATION.md
// as an outside integrator would, to prove the protocol is not "whatever Python happens to do".
//
// It connects over mutual TLS with its own centre identity, subscribes in its own shared group,
// and for the first SOS of one device: validates it against protocol/schemas, verifies its
// Ed25519 signature with the device's key from the fleet registry, sends a signed delivery
// receipt, then acknowledges and closes the alert with signed commands of its own, and waits for
// the device's `command_applied` event for each. Every device message it gets is validated,
// verified and receipted; anything that fails is a conformance failure.
//
// Usage: node receiver.mjs CONFIG.json, where CONFIG holds
//   host, port                           the broker (MQTT 5 over TLS)
//   ca_file, cert_file, key_file         the fleet CA; this centre's certificate and TLS key
//   signing_key_file                     this centre's Ed25519 signing key (PKCS#8 PEM)
//   schemas_dir, registry_file           protocol/schemas; the fleet's registry.json
//   device_id                            whose first SOS to take through its life cycle
//   group, operator, timeout_s           optional: "partner", "partner-operator", 30
// Prints one JSON line per step on stdout. On any failure: a {"step": "failed"} line, the
// reason on stderr, exit status 1.

import { X509Certificate, createHash, createPrivateKey, randomBytes } from 'node:crypto';
import { readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import process from 'node:process';

import Ajv2020 from 'ajv/dist/2020.js';
import addFormats from 'ajv-formats';
import mqtt from 'mqtt';

import { publicKeyFromBase64, signatureValid, signed } from './signing.mjs';

// -- output ----------------------------------------------------------------------------------------
function report(step, fields = {}) {
  process.stdout.write(`${JSON.stringify({ step, ...fields })}\n`);
}

function fail(reason) {
  report('failed', { error: reason });
  process.stderr.write(`interop receiver: ${reason}\n`);
  process.exit(1);
}

// -- schemas: every file in protocol/schemas, `$ref`s resolved by `$id` ---------------------------
function loadSchemas(directory) {
  // The schemas are JSON Schema 2020-12; `format` (date-time, uuid) needs ajv-formats.
  const ajv = new Ajv2020({ allErrors: true, allowUnionTypes: true });
  addFormats(ajv);
  const byName = new Map();
  for (const file of readdirSync(directory).filter((f) => f.endsWith('.schema.json')).sort()) {
    const schema = JSON.parse(readFileSync(path.join(directory, file), 'utf8'));
    ajv.addSchema(schema); // registered under its `$id`: a relative `$ref` resolves against it
    byName.set(file.replace('.schema.json', ''), schema.$id);
  }
  return (name, message) => {
    const validate = ajv.getSchema(byName.get(name));
    if (!validate) throw new Error(`no schema ${name}.schema.json in ${directory}`);
    if (validate(message)) return null;
    return ajv.errorsText(validate.errors, { dataVar: name });
  };
}

// -- the fleet registry: whose key signs a device's messages --------------------------------------
function deviceKeys(registryFile) {
  // registry.json: {"identities": [{name, kind, serial, status, signing_key, ...}]}; a name has
  // at most one "active" entry, and only that one's key counts (a re-keyed device's old key and a
  // revoked device's key are dead). Re-read when a device is unknown: it may be new.
  let cache = new Map();
  const load = () => {
    const { identities } = JSON.parse(readFileSync(registryFile, 'utf8'));
    cache = new Map(identities
      .filter((i) => i.status === 'active' && i.kind !== 'centre' && i.signing_key)
      .map((i) => [i.name, publicKeyFromBase64(i.signing_key)]));
  };
  load();
  return (deviceId) => {
    if (!cache.has(deviceId)) load();
    return cache.get(deviceId) ?? null;
  };
}

// -- the run --------------------------------------------------------------------------------------
const LEAVES = { alert: 'alert', position: 'position-update', event: 'event' }; // leaf -> schema
const TOPIC = /^sos\/v1\/dev\/([a-z0-9][a-z0-9-]{2,62})\/(alert|position|event)$/;
const utcNow = () => new Date().toISOString(); // 2025-03-14T09:27:05.402Z, as the schemas want

async function main(configFile) {
  const config = JSON.parse(readFileSync(configFile, 'utf8'));
  const group = config.group ?? 'partner';
  const operator = config.operator ?? 'partner-operator';
  const timeoutS = config.timeout_s ?? 30;
  const invalid = loadSchemas(config.schemas_dir);
  const keyOf = deviceKeys(config.registry_file);
  const signingKey = createPrivateKey(readFileSync(config.signing_key_file));
  const cert = readFileSync(config.cert_file);
  // The broker makes the client id the certificate's common name whatever we ask for, so ask
  // for exactly that: centre.<name>.
  const identity = new X509Certificate(cert).subject.match(/CN=([^\n,]+)/)[1];

  let waitingFor = 'the connection';
  const timer = setTimeout(() => fail(`timed out after ${timeoutS} s waiting for ${waitingFor}`),
    timeoutS * 1000);

  const client = await mqtt.connectAsync(`mqtts://${config.host}:${config.port}`, {
    protocolVersion: 5,
    clientId: identity,
    clean: true, // no session: devices re-send whatever we miss until we receipt it
    ca: readFileSync(config.ca_file), cert, key: readFileSync(config.key_file),
    rejectUnauthorized: true,
    reconnectPeriod: 1000,
  }).catch((error) => fail(`cannot connect to ${config.host}:${config.port} as ${identity}: `
                           + `${error.message}`));
  client.on('error', (error) => fail(`broker connection: ${error.message}`));
  report('connected', { identity });

  // Our own shared group, never the project centre's (`sos-devices-primary-centre`):
  // the broker hands each message to one member of each group, so joining theirs would steal their alerts.
  const topics = Object.keys(LEAVES).map((leaf) => `$share/${group}/sos/v1/dev/+/${leaf}`);
  await client.subscribeAsync(topics, { qos: 1 }).catch((error) => fail(
    `subscription refused (${error.message}): a centre identity may subscribe only to `
    + 'sos/v1/dev/+/<leaf> and $share/<group>/sos/v1/dev/+/<leaf>'));
  report('subscribed', { topics });
  waitingFor = `an alert from ${config.device_id}`;

  // Commands carry our own sequence number: the device keeps a replay window per centre signing
  // key, so ours never collides with the project centre's. Milliseconds since 1970 (as the
  // project's centre does), or one more than the last if the clock has not moved; strictly
  // increasing also across restarts as long as the clock does not go back.
  let lastSeq = 0;
  const nextSeq = () => (lastSeq = Math.max(Date.now(), lastSeq + 1));

  async function publish(deviceId, kind, message) {
    const problem = invalid(kind, message); // validate what we send, as the project does
    if (problem) throw new Error(`we built an invalid ${kind}: ${problem}`);
    // Any JSON serialisation will do on the wire: the device re-canonicalises to verify.
    await client.publishAsync(`sos/v1/dev/${deviceId}/cmd`, JSON.stringify(message), { qos: 1 });
  }

  async function command(deviceId, type, alertId) {
    const body = { v: 1, command_id: randomBytes(16).toString('hex'), type, alert_id: alertId,
      issued_at: utcNow(), operator, seq: nextSeq() }; // issued_at: within the device's 40 s
    await publish(deviceId, 'command', signed(body, signingKey));
    report('command_sent', { type, command_id: body.command_id, seq: body.seq });
    return body.command_id;
  }

  // What we stored, to answer a re-send with `duplicate: true`. Alerts are keyed by alert_id,
  // updates and events by (device_id, seq, created_at), as docs/PROTOCOL.md says.
  const stored = new Map();
  const scenario = { alertId: null, ack: null, close: null };

  async function handle(topic, payload) {
    const match = TOPIC.exec(topic);
    if (!match) throw new Error(`a message on ${topic}, which is no device topic`);
    const [, deviceId, leaf] = match;
    const kind = LEAVES[leaf];
    let message;
    try {
      // Numbers: the protocol keeps integers within +-(2^53 - 1), so JSON.parse loses nothing.
      message = JSON.parse(payload.toString('utf8'));
    } catch (error) {
      throw new Error(`${kind} on ${topic} is not JSON: ${error.message}`);
    }
    const problem = invalid(kind, message);
    if (problem) throw new Error(`${kind} from ${deviceId} breaks its schema: ${problem}`);
    if (message.device_id !== deviceId) {
      throw new Error(`${kind} on ${topic} names device ${message.device_id}`);
    }
    const key = keyOf(deviceId);
    if (!key) throw new Error(`${deviceId} has no active signing key in the registry`);
    if (typeof message.sig !== 'string') throw new Error(`${kind} from ${deviceId} is unsigned`);
    if (!signatureValid(message, key)) {
      throw new Error(`${kind} seq=${message.seq} from ${deviceId}: bad signature`);
    }

    // "Store" it, then receipt it: the device deletes the message from its outbox (and shows
    // DELIVERED for an alert) only on this. The digest is over the exact bytes received, not
    // a re-serialisation: the device compares it with the row it sent. Every copy is receipted.
    const storeKey = kind === 'alert' ? message.alert_id
      : `${deviceId}/${message.seq}/${message.created_at}`;
    const duplicate = stored.has(storeKey);
    if (!duplicate) stored.set(storeKey, utcNow());
    const receipt = { v: 1, type: 'delivered', device_id: deviceId, seq: message.seq,
      message: kind, digest: createHash('sha256').update(payload).digest('hex'),
      stored_at: stored.get(storeKey), duplicate };
    if (message.alert_id) receipt.alert_id = message.alert_id;
    if (kind === 'alert' && !duplicate) {
      report('alert_verified', { device_id: deviceId, alert_id: message.alert_id,
        seq: message.seq, trigger: message.trigger, position: message.position.source });
    } else {
      report('verified', { kind, device_id: deviceId, seq: message.seq, duplicate,
        type: message.type });
    }
    await publish(deviceId, 'delivery-receipt', signed(receipt, signingKey));
    report('receipt_sent', { message: kind, seq: message.seq, digest: receipt.digest, duplicate });
    if (deviceId === config.device_id && !duplicate) await advance(kind, message);
  }

  // The life cycle of the first alert: ack after its receipt, close once the ack is applied.
  async function advance(kind, message) {
    if (kind === 'alert' && scenario.alertId === null) {
      scenario.alertId = message.alert_id;
      scenario.ack = await command(config.device_id, 'ack', scenario.alertId);
      waitingFor = `the device's command_applied for ack ${scenario.ack}`;
      return;
    }
    if (kind !== 'event' || ![scenario.ack, scenario.close].includes(message.command_id)) return;
    const which = message.command_id === scenario.ack ? 'ack' : 'close';
    if (message.type === 'command_rejected') {
      throw new Error(`the device rejected our ${which}: ${message.reason_code ?? ''} `
                      + `${message.reason ?? ''}`);
    }
    if (message.type !== 'command_applied') return;
    report(`${which}_applied`, { command_id: message.command_id, alert_id: message.alert_id });
    if (which === 'ack') {
      scenario.close = await command(config.device_id, 'close', scenario.alertId);
      waitingFor = `the device's command_applied for close ${scenario.close}`;
    } else {
      clearTimeout(timer);
      await client.endAsync();
      report('done');
      process.exit(0);
    }
  }

  // One message at a time, in arrival order: a receipt must leave before the command after it.
  let queue = Promise.resolve();
  client.on('message', (topic, payload) => {
    queue = queue.then(() => handle(topic, payload)).catch((error) => fail(error.message));
  });
}

if (process.argv.length !== 3) fail('usage: node receiver.mjs CONFIG.json');
main(process.argv[2]).catch((error) => fail(error.stack ?? String(error)));
