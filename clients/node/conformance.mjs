#!/usr/bin/env node
// Run every conformance vector (testdata/conformance/, docs/protocol.md section 12) through
// this client's own functions: verifyBundle for attestation bundles, openOutcome for answers,
// receiptSigningBytes + verifyEd25519 for receipts, commandSigningBytes + HPKE for sealed
// commands, the policy schema + Policy for policy files.
//
//   node conformance.mjs [DIR]     (default: ../../testdata/conformance)
//
// Prints one JSON object: {"results": [{file, id, expected, got, ok, detail}], "failed": N};
// exits 1 when a vector's verdict (or refusal class) differs from the expected one.

import { createPrivateKey, sign } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { Aes128Gcm, CipherSuite, HkdfSha256 } from "@hpke/core";
import { DhkemX25519HkdfSha256 } from "@hpke/dhkem-x25519";

import { duplicateMember, policySchemaError } from "./policy-schema.mjs";
import {
  AttestationError,
  COMMAND_INFO,
  CommandRefused,
  IntegrityError,
  Policy,
  PolicyError,
  commandHash,
  commandSigningBytes,
  messages,
  openOutcome,
  receiptSigningBytes,
  verifyBundle,
  verifyEd25519,
} from "./veil-client.mjs";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const USAGE = "usage: node conformance.mjs [DIR]   run the conformance vectors of DIR (default ../../testdata/conformance)\n";
// Arguments: help, or one directory of vectors; anything else is one line, never a stack.
const [argument, ...extra] = process.argv.slice(2);
if (argument === "-h" || argument === "--help") {
  process.stdout.write(USAGE);
  process.exit(0);
}
if (argument?.startsWith("-") || extra.length) {
  process.stderr.write(`error: unexpected argument ${JSON.stringify(argument?.startsWith("-") ? argument : extra[0])} (usage: node conformance.mjs --help)\n`);
  process.exit(2);
}
const DIRECTORY = path.resolve(argument ?? path.join(HERE, "../../testdata/conformance"));
if (!existsSync(path.join(DIRECTORY, "attestation.json"))) {
  process.stderr.write(`error: no conformance vectors in ${DIRECTORY} (attestation.json is missing)\n`);
  process.exit(1);
}
const X25519_SUITE = 1;
const HPKE = new CipherSuite({ kem: new DhkemX25519HkdfSha256(), kdf: new HkdfSha256(), aead: new Aes128Gcm() });

const hex = (text) => Buffer.from(text ?? "", "hex");
const load = (name) => JSON.parse(readFileSync(path.join(DIRECTORY, name), "utf8")).vectors;

// A policy document as this client loads a policy file (loadPolicy): Policy's checks, then the schema.
function policyFrom(document) {
  const policy = new Policy(document);
  const refused = policySchemaError(document);
  if (refused !== null) throw new PolicyError(refused);
  return policy;
}

// --- one runner per file: resolve with nothing for "valid", throw for "refused" ------------------

function bundleObject(bundle) {
  const keys = Object.fromEntries(Object.entries(bundle.keys).map(([name, value]) => [name, hex(value)]));
  const descriptor = bundle.descriptor && {
    instance_id: bundle.descriptor.instance_id,
    config: hex(bundle.descriptor.config),
    genesis_hash: hex(bundle.descriptor.genesis_hash),
    signature: hex(bundle.descriptor.signature),
  };
  return {
    quote: hex(bundle.quote),
    runtime_data: hex(bundle.runtime_data),
    nonce: hex(bundle.nonce),
    attestation_token: bundle.attestation_token,
    keys,
    jwks_json: bundle.jwks_json,
    descriptor: descriptor ?? null,
  };
}

async function attestation(vector) {
  const policy = policyFrom(vector.policy);
  const rootPem = readFileSync(path.join(DIRECTORY, vector.root), "utf8");
  await verifyBundle(bundleObject(vector.bundle), policy, rootPem, { now: new Date(vector.now * 1000), instanceId: vector.instance_id });
}

function requestObject(request, signingKey) {
  const command = {
    suite: request.command.suite,
    encapsulated_key: hex(request.command.encapsulated_key),
    ciphertext: hex(request.command.ciphertext),
  };
  return {
    instanceId: request.instance_id,
    requestId: request.request_id,
    counter: request.counter,
    responseKey: hex(request.response_key),
    signingKey: hex(signingKey),
    command,
    commandHash: commandHash(command.encapsulated_key, command.ciphertext),
  };
}

async function answer(vector) {
  const outcome = {
    accepted: vector.outcome.accepted,
    sequence: String(vector.outcome.sequence),
    sealed_response: hex(vector.outcome.sealed_response),
    error: vector.outcome.error,
  };
  const opened = openOutcome(outcome, requestObject(vector.request, vector.signing_public_key), { query: vector.query });
  const expect = vector.expect;
  const checks = [
    ["accepted", opened.accepted, expect.accepted],
    ["sequence", opened.sequence, String(expect.sequence)],
    ["result", Buffer.from(messages.CommandResult.encode(opened.message).finish()).toString("hex"), expect.result],
    ["error code", opened.message.error?.code ?? 0, expect.error_code],
  ];
  if (expect.next_counter !== null) {
    const counter = opened.message.counter;
    checks.push(["next_counter", counter ? Number(counter.nextCounter.toString()) : null, expect.next_counter]);
    checks.push(["last_command_hash", counter ? Buffer.from(counter.lastCommandHash).toString("hex") : null, expect.last_command_hash]);
  } else {
    checks.push(["counter", opened.message.counter ?? null, null]);
  }
  for (const [what, got, wanted] of checks) {
    if (got !== wanted) throw new Error(`${what}: got ${JSON.stringify(got)}, expected ${JSON.stringify(wanted)}`);
  }
}

async function receipt(vector) {
  const fields = vector.receipt;
  const signed = receiptSigningBytes({
    kind: fields.kind,
    instanceId: fields.instance_id,
    sequence: String(fields.sequence),
    commandHash: hex(fields.command_hash),
    resultHash: hex(fields.result_hash),
  });
  if (vector.signing_bytes !== null && signed.toString("hex") !== vector.signing_bytes) throw new Error("signing bytes differ");
  if (!verifyEd25519(hex(vector.signing_public_key), hex(fields.signature), signed)) {
    throw new IntegrityError("the receipt's signature is not the attested enclave's");
  }
}

// Returns a note when a step is outside this client (it seals with the X25519 suite only).
async function command(vector) {
  const signingBytes = commandSigningBytes({
    instanceId: vector.instance_id,
    counter: vector.counter,
    requestId: vector.request_id,
    responseKey: hex(vector.response_key),
    call: hex(vector.call),
  });
  if (signingBytes.toString("hex") !== vector.signing_bytes) throw new Error("command signing bytes differ");
  const identity = createPrivateKey({
    key: { kty: "OKP", crv: "Ed25519", d: hex(vector.identity_private_seed).toString("base64url"), x: hex(vector.account).toString("base64url") },
    format: "jwk",
  });
  if (sign(null, signingBytes, identity).toString("hex") !== vector.signature) throw new Error("the Ed25519 signature differs");
  const sealed = vector.command;
  if (commandHash(hex(sealed.encapsulated_key), hex(sealed.ciphertext)).toString("hex") !== vector.command_hash) throw new Error("command hash differs");
  if (hex(vector.hpke.info).toString() !== COMMAND_INFO.toString() || hex(vector.hpke.aad).toString("utf8") !== vector.instance_id) {
    throw new Error("HPKE info or aad differ");
  }
  const plaintext = messages.Command.decode(hex(vector.plaintext));
  if (plaintext.requestId !== vector.request_id || Number(plaintext.counter.toString()) !== vector.counter) throw new Error("plaintext fields differ");
  if (vector.hpke.suite !== X25519_SUITE) return "X-Wing HPKE not opened: this client seals with the X25519 suite only";
  const recipientKey = await HPKE.kem.deserializePrivateKey(hex(vector.hpke.recipient_private_key.x25519));
  const opened = await HPKE.open({ recipientKey, enc: hex(sealed.encapsulated_key), info: COMMAND_INFO }, hex(sealed.ciphertext), hex(vector.hpke.aad));
  if (Buffer.from(opened).toString("hex") !== vector.plaintext) throw new Error("the opened plaintext differs");
  return "";
}

async function policy(vector) {
  if (vector.text === null) return void policyFrom(vector.document);
  // A file's text, read as loadPolicy reads it: one reading (no duplicate members), then checked.
  const duplicate = duplicateMember(vector.text);
  if (duplicate !== null) throw new PolicyError(`duplicate key ${JSON.stringify(duplicate)}`);
  policyFrom(JSON.parse(vector.text));
}

const RUNNERS = {
  "attestation.json": [attestation, AttestationError],
  "answers.json": [answer, IntegrityError],
  "receipts.json": [receipt, IntegrityError],
  "commands.json": [command, null],
  "policies.json": [policy, PolicyError],
};

const results = [];
for (const [file, [run, refusalClass]] of Object.entries(RUNNERS)) {
  for (const vector of load(file)) {
    const expected = vector.expect.verdict;
    let got = "valid";
    let detail = "";
    try {
      detail = (await run(vector)) ?? "";
    } catch (error) {
      const refusal = refusalClass !== null && (error instanceof refusalClass || error instanceof CommandRefused);
      got = refusal ? "refused" : "error";
      detail = `${error.name}: ${error.message}`;
    }
    results.push({ file, id: vector.id, refusal: vector.expect.refusal ?? null, expected, got, ok: got === expected, detail });
  }
}
const failed = results.filter((r) => !r.ok).length;
process.stdout.write(`${JSON.stringify({ results, failed }, null, 1)}\n`);
process.exitCode = failed ? 1 : 0;
