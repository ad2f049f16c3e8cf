#!/usr/bin/env node
// Transfer tokens through a Veil gateway from Node.js, verifying the enclave first.

import { readFileSync, statSync } from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";

// Only the argument checks load at start: a usage error never waits for gRPC and the protos.
import { IDENTITIES_DIR, IDENTITY_NAME, INSTANCE_ID, InputError, checkAmount, checkRequestId, parseAddress, resolveRecipient, whyUnreadable } from "./inputs.mjs";

const CALLS_DIR = "node-calls"; // calls without a definitive answer, and those named by --request-id

const USAGE = `usage: node transfer.mjs (--as NAME | --key FILE) --instance ID --to RECIPIENT --amount N
                        [--gateway HOST:PORT] [--data-dir DIR] [--policy FILE]
                        [--server-name NAME] [--counters FILE] [--request-id ID]
                        [--timeout SECONDS]

Transfer N tokens from the key's account to RECIPIENT on a token instance, through a Veil
gateway, after verifying the enclave: DCAP quote to the pinned SGX root (Intel's QE), report
data binding its keys, the keyvault token (against the pinned JWKS), the expected measurement
and keyvault, and the instance's enclave-signed descriptor. The command is sealed to the
enclave and its answer and signed receipt are verified.

  --gateway HOST:PORT   gateway address (default 127.0.0.1:50050, TLS without client certificate);
                        a gateway that does not answer within 3 s fails the command
  --data-dir DIR        Veil data directory (default $VEIL_DATA_DIR, else .veil): pki/ca.pem, pki/sgx-root.pem for the
                        "dev" root, expected-measurement.json, counters.json, instances.json
  --policy FILE         expected-measurement policy (default DIR/expected-measurement.json); a
                        policy restricting accepted_tcb_statuses must pin jwks
  --as NAME             the sender: identity NAME of the data directory (DIR/identities/NAME.key)
  --key FILE            the sender's Ed25519 key file instead (PKCS#8 PEM, mode 0600)
  --instance ID         token instance
  --to RECIPIENT        who receives: a local identity's name (DIR/identities/NAME.pub), a
                        contact's name (\`veil contact add NAME ACCOUNT\`) or an account (64
                        lowercase hex characters); anything else is refused before sealing
  --amount N            number of tokens: a whole number from 1 to 18446744073709551615
  --server-name NAME    name expected in the gateway's certificate (e.g. localhost)
  --counters FILE       the accounts' last accepted counters (default DIR/counters.json, shared
                        with the Python SDK)
  --request-id ID       names this transfer (1 to 64 printable characters): running the command
                        again with the same id resumes it or prints its answer again, and never
                        transfers twice (the call is kept in DIR/node-calls, mode 0600)
  --timeout SECONDS     how long a call is retried while the mesh does not answer (default 15)
  -h, --help            print this help

Prints one JSON object: what was verified, the result and the verified receipt.
Exit status: 0 committed (answer and receipt verified); 1 refused or failed, with the reason on
stderr; 2 usage error; 3 the transfer ran but its answer was lost, or may have run (outcome
unknown): do not send it again as a new transfer; when the message names a request id, the
same command with --request-id ID resumes it safely.
`;

// Node warns (DEP0123) when a TLS name is an IP address, as 127.0.0.1 is without --server-name;
// the certificate is still checked against the address. One line on stderr is the contract.
const emitWarning = process.emitWarning.bind(process);
process.emitWarning = (warning, ...rest) => {
  const code = typeof rest[0] === "object" ? rest[0]?.code : rest[1];
  if (code !== "DEP0123") emitWarning(warning, ...rest);
};

function fail(message, status = 1) {
  const line = String(message).replace(/\s*\n\s*/g, " "); // one line, whatever the reason
  process.stderr.write(`error: ${line}${status === 2 ? " (usage: node transfer.mjs --help)" : ""}\n`);
  process.exit(status);
}

// A file the command needs, or a one-line reason naming it.
function readNeeded(file, what) {
  try {
    return readFileSync(file);
  } catch (error) {
    throw new InputError(`cannot read ${what} ${file} (${whyUnreadable(error)})`);
  }
}

let values;
try {
  ({ values } = parseArgs({
    options: {
      gateway: { type: "string", default: "127.0.0.1:50050" },
      "data-dir": { type: "string", default: process.env.VEIL_DATA_DIR || ".veil" },
      policy: { type: "string" },
      key: { type: "string" },
      as: { type: "string" },
      instance: { type: "string" },
      to: { type: "string" },
      amount: { type: "string" },
      "server-name": { type: "string" },
      counters: { type: "string" },
      "request-id": { type: "string" },
      timeout: { type: "string", default: "15" },
      help: { type: "boolean", short: "h" },
    },
  }));
} catch (error) {
  // "--amount -3": Node's parser asks for "--amount=-3"; say what an amount is instead.
  if (/'--amount/.test(error.message)) fail("--amount must be a whole number from 1 to 18446744073709551615", 2);
  fail(error.message, 2);
}
if (values.help) {
  process.stdout.write(USAGE);
  process.exit(0);
}
if (Boolean(values.key) === Boolean(values.as)) fail("give the sender as --as NAME or --key FILE (one of them)", 2);
if (values.as && !IDENTITY_NAME.test(values.as)) fail("--as names an identity: 1 to 64 letters, digits, dots, dashes or underscores", 2);
for (const required of ["instance", "to", "amount"]) {
  if (!values[required]) fail(`--${required} is required`, 2);
}
if (!INSTANCE_ID.test(values.instance)) fail("--instance must be lowercase letters, digits and dashes (1 to 63 characters)", 2);
let amount;
try {
  amount = checkAmount(values.amount);
  parseAddress(values.gateway);
  if (values["request-id"] !== undefined) checkRequestId(values["request-id"]);
  if (!/^[0-9]{1,3}$/.test(values.timeout) || Number(values.timeout) < 1 || Number(values.timeout) > 300) {
    throw new InputError("--timeout must be a whole number of seconds from 1 to 300");
  }
} catch (error) {
  fail(error.message.replace(/^the amount/, "--amount").replace(/; nothing was sent$/, ""), 2);
}

const dataDir = values["data-dir"];
let veil; // the client library
let client;
let status = 1;
try {
  if (!statSync(dataDir, { throwIfNoEntry: false })?.isDirectory()) {
    throw new InputError(`no Veil data directory at ${dataDir}: \`veil up\` (\`make run\` in a checkout) creates .veil, or pass --data-dir or set VEIL_DATA_DIR`);
  }
  const recipient = resolveRecipient(dataDir, values.to); // a mistyped name never becomes an account
  const countersFile = values.counters ?? path.join(dataDir, "counters.json");
  if (!statSync(path.dirname(countersFile), { throwIfNoEntry: false })?.isDirectory()) {
    throw new InputError(`--counters ${countersFile}: its directory does not exist`);
  }
  veil = await import("./veil-client.mjs");
  const { FileCalls, FileCounters, InstancePins, ResultLost, VeilNodeClient, loadIdentity, loadPolicy, messages } = veil;
  const policy = loadPolicy(values.policy ?? path.join(dataDir, "expected-measurement.json"));
  if (policy.root !== "dev" && !policy.root.endsWith(".pem")) throw new InputError("this client pins a PEM root or the dev root");
  const rootPem = readNeeded(policy.root === "dev" ? path.join(dataDir, "pki", "sgx-root.pem") : policy.root, "the SGX root");
  const ca = readNeeded(path.join(dataDir, "pki", "ca.pem"), "the mesh's CA");
  const identity = values.as ? loadIdentity(path.join(dataDir, IDENTITIES_DIR, `${values.as}.key`)) : loadIdentity(values.key);
  client = new VeilNodeClient(values.gateway, ca, {
    serverName: values["server-name"],
    policy,
    rootPem,
    counters: new FileCounters(countersFile),
    pins: new InstancePins(path.join(dataDir, "instances.json")),
    calls: new FileCalls(path.join(dataDir, CALLS_DIR)),
    timeoutMs: Number(values.timeout) * 1000,
  });
  await client.ready(); // a mesh that is down fails in seconds, naming the address
  const attestation = await client.attest(values.instance);
  const tokens = client.token(values.instance, identity);
  let balance;
  try {
    balance = await tokens.transfer(recipient.account, amount, { requestId: values["request-id"] });
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
  let message = String(error?.message ?? error);
  if (veil !== undefined && error instanceof veil.OutcomeUnknown) {
    status = 3;
    // The call is in DIR/node-calls: the same command under its id resumes it, never a second one.
    if (error.requestId) message = `${message.replace(/: retry with the same request id.*$/, "")}; run the same command with --request-id ${error.requestId} to resume it (it runs at most once)`;
  }
  process.stderr.write(`error: ${message.replace(/\s*\n\s*/g, " ")}\n`);
} finally {
  client?.close();
}
process.exit(status);
