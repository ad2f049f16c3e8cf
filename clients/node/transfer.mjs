#!/usr/bin/env node
// Transfer tokens through a Veil gateway from Node.js, verifying the enclave first.

import { readFileSync } from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";

import {
  FileCounters,
  InstancePins,
  OutcomeUnknown,
  ResultLost,
  VeilNodeClient,
  loadIdentity,
  loadPolicy,
  messages,
  resolveRecipient,
} from "./veil-client.mjs";

const USAGE = `usage: node transfer.mjs --key FILE --instance ID --to RECIPIENT --amount N
                        [--gateway HOST:PORT] [--data-dir DIR] [--policy FILE]
                        [--server-name NAME] [--counters FILE]

Transfer N tokens from the key's account to RECIPIENT on a token instance, through a Veil
gateway, after verifying the enclave: DCAP quote to the pinned SGX root (Intel's QE), report
data binding its keys, the keyvault token (against the pinned JWKS), the expected measurement
and keyvault, and the instance's enclave-signed descriptor. The command is sealed to the
enclave and its answer and signed receipt are verified.

  --gateway HOST:PORT   gateway address (default 127.0.0.1:50050, TLS without client certificate)
  --data-dir DIR        Veil data directory (default .veil): pki/ca.pem, pki/sgx-root.pem for the
                        "dev" root, expected-measurement.json, counters.json, instances.json
  --policy FILE         expected-measurement policy (default DIR/expected-measurement.json); a
                        policy restricting accepted_tcb_statuses must pin jwks
  --key FILE            Ed25519 identity key (PKCS#8 PEM, mode 0600)
  --instance ID         token instance
  --to RECIPIENT        who receives: a local identity's name (DIR/identities/NAME.pub), a
                        contact's name (\`veil contact add NAME ACCOUNT\`) or an account (64
                        lowercase hex characters); anything else is refused before sealing
  --amount N            number of tokens
  --server-name NAME    name expected in the gateway's certificate (e.g. localhost)
  --counters FILE       the accounts' last accepted counters (default DIR/counters.json, shared
                        with the Python SDK)
  -h, --help            print this help

Prints one JSON object: what was verified, the result and the verified receipt.
Exit status: 0 committed (answer and receipt verified); 1 refused or failed, with the reason on
stderr; 2 usage error; 3 the transfer ran but its answer was lost, or may have run (outcome
unknown): do not send it again before checking the balance.
`;

function fail(message, status = 1) {
  process.stderr.write(`error: ${message}\n`);
  if (status === 2) process.stderr.write(`${USAGE.split("\n\n")[0]}\n(--help for more)\n`);
  process.exit(status);
}

let values;
try {
  ({ values } = parseArgs({
    options: {
      gateway: { type: "string", default: "127.0.0.1:50050" },
      "data-dir": { type: "string", default: ".veil" },
      policy: { type: "string" },
      key: { type: "string" },
      instance: { type: "string" },
      to: { type: "string" },
      amount: { type: "string" },
      "server-name": { type: "string" },
      counters: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  }));
} catch (error) {
  fail(error.message, 2);
}
if (values.help) {
  process.stdout.write(USAGE);
  process.exit(0);
}
for (const required of ["key", "instance", "to", "amount"]) {
  if (!values[required]) fail(`--${required} is required`, 2);
}
if (!/^[1-9][0-9]*$/.test(values.amount)) fail("--amount must be a positive integer", 2);

const dataDir = values["data-dir"];
let client;
let status = 1;
try {
  const recipient = resolveRecipient(dataDir, values.to); // a mistyped name never becomes an account
  const policy = loadPolicy(values.policy ?? path.join(dataDir, "expected-measurement.json"));
  if (policy.root !== "dev" && !policy.root.endsWith(".pem")) fail("this client pins a PEM root or the dev root");
  const rootPem = readFileSync(policy.root === "dev" ? path.join(dataDir, "pki", "sgx-root.pem") : policy.root);
  const ca = readFileSync(path.join(dataDir, "pki", "ca.pem"));
  const identity = loadIdentity(values.key);
  client = new VeilNodeClient(values.gateway, ca, {
    serverName: values["server-name"],
    policy,
    rootPem,
    counters: new FileCounters(values.counters ?? path.join(dataDir, "counters.json")),
    pins: new InstancePins(path.join(dataDir, "instances.json")),
  });
  const attestation = await client.attest(values.instance);
  const tokens = client.token(values.instance, identity);
  let balance;
  try {
    balance = await tokens.transfer(recipient.account, values.amount);
  } catch (error) {
    if (error instanceof ResultLost) {
      status = 3;
      throw new Error(`the transfer ran (log sequence ${error.sequence}, the enclave says so) but its answer was lost; do not send it again`);
    }
    throw error;
  }
  const opened = tokens.last;
  const descriptor = attestation.descriptor;
  process.stdout.write(
    `${JSON.stringify({
      verified: {
        mrenclave: attestation.mrenclave,
        tcb_status: attestation.tcbStatus,
        token_expires: attestation.expires,
        jwks_pinned: attestation.jwksPinned,
        instance: {
          instance_id: descriptor.instanceId,
          config_hash: descriptor.configHash.toString("hex"),
          genesis_hash: descriptor.genesisHash.toString("hex"),
          auth_scheme: messages.AuthScheme.valuesById[descriptor.config.authScheme],
        },
      },
      account: identity.account,
      to: recipient,
      counter: opened.counter,
      balance: balance.toString(),
      receipt: opened.receipt,
    })}\n`,
  );
  status = 0;
} catch (error) {
  if (process.env.VEIL_DEBUG) console.error(error); // the stack, for debugging
  if (error instanceof OutcomeUnknown) status = 3;
  process.stderr.write(`error: ${error?.message ?? String(error)}\n`);
} finally {
  client?.close();
}
process.exit(status);
