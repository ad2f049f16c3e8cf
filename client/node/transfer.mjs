#!/usr/bin/env node
// Transfer tokens through a Veil gateway from Node.js, verifying the enclave first.
//
//   node transfer.mjs --gateway 127.0.0.1:50050 --data-dir ../../.veil \
//       --key ../../.veil/identities/alice.key --instance coins --to <account hex> --amount 5 \
//       [--server-name localhost] [--counter N] [--policy FILE]
//
// Reads the CA (<data-dir>/pki/ca.pem), the pinned SGX root (<data-dir>/pki/sgx-root.pem when
// the policy's root is "dev") and the expected measurement (<data-dir>/expected-measurement.json).
// Prints one JSON object: what was verified, the result and the verified receipt. Exit 0 on a
// committed transfer, 1 on any refusal (attestation, integrity, enclave) with the reason on stderr.

import { readFileSync } from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";

import { CommandRefused, VeilNodeClient, loadIdentity } from "./veil-client.mjs";

const { values } = parseArgs({
  options: {
    gateway: { type: "string", default: "127.0.0.1:50050" },
    "data-dir": { type: "string", default: ".veil" },
    policy: { type: "string" },
    key: { type: "string" },
    instance: { type: "string" },
    to: { type: "string" },
    amount: { type: "string" },
    counter: { type: "string", default: "0" },
    "server-name": { type: "string" },
  },
});

function fail(message) {
  process.stderr.write(`error: ${message}\n`);
  process.exit(1);
}

for (const required of ["key", "instance", "to", "amount"]) {
  if (!values[required]) fail(`--${required} is required`);
}

const dataDir = values["data-dir"];
const policy = JSON.parse(readFileSync(values.policy ?? path.join(dataDir, "expected-measurement.json"), "utf8"));
if (policy.root !== "dev" && !String(policy.root).endsWith(".pem")) fail("this client pins a PEM root or the dev root");
const rootPem = readFileSync(policy.root === "dev" ? path.join(dataDir, "pki", "sgx-root.pem") : policy.root);
const ca = readFileSync(path.join(dataDir, "pki", "ca.pem"));
const identity = loadIdentity(values.key);

const client = new VeilNodeClient(values.gateway, ca, { serverName: values["server-name"] });
try {
  const attestation = await client.attest(values.instance, policy, rootPem);
  const call = { token: { transfer: { to: values.to, amount: values.amount } } };
  // The counter is the account's last accepted one + 1; resynchronise from an ABORTED refusal.
  let counter = Number(values.counter) || 1;
  let outcome;
  for (let attempt = 0; attempt < 4; attempt += 1) {
    outcome = await client.execute(attestation, values.instance, call, identity, counter);
    const error = outcome.result.error;
    const wanted = error?.code === "ECALL_ERROR_CODE_ABORTED" && /counter must be (\d+)/.exec(error.message ?? "");
    if (!wanted) break;
    counter = Number(wanted[1]);
  }
  if (outcome.result.error) throw new CommandRefused(outcome.result.error.code, outcome.result.error.message);
  process.stdout.write(
    `${JSON.stringify({
      verified: { mrenclave: attestation.mrenclave, tcb_status: attestation.tcbStatus, token_expires: attestation.expires },
      account: identity.account,
      counter,
      balance: outcome.result.result.token.transfer.amount,
      receipt: outcome.receipt,
    })}\n`,
  );
} catch (error) {
  if (process.env.VEIL_DEBUG) console.error(error); // the stack, for debugging
  fail(error.message ?? String(error));
} finally {
  client.close();
}
