// A small Veil client for Node.js: the any-language proof of the public API.
//
// It speaks the gateway's gRPC API (@grpc/grpc-js + @grpc/proto-loader, and protobufjs for the
// enclave's messages, both loading the .proto files of ../../protos at run time) and
// re-implements, byte for byte, what the Python SDK does (enclave/wire.py is the reference for
// every byte string; veil/verify/bundle.py, veil/sdk/client.py and veil/sdk/sealing.py for the rules):
//
//   1. the policy (expected-measurement.json): a policy that restricts accepted_tcb_statuses
//      (anything but ["*"], including the default UpToDate + SWHardeningNeeded) must pin `jwks`,
//      since only the keyvault's token states the TCB status and a JWKS the gateway supplies
//      proves nothing; such a policy is refused before anything is fetched;
//   2. verify the enclave before sending anything:
//      - the DCAP v3 quote: PCK chain to the pinned SGX root, QE report signed by the PCK key,
//        QE report data = SHA-256(attestation key || QE auth data) || 32 zero bytes, the QE is
//        Intel's (MRSIGNER, ISVPRODID 1, not debug: checked on every quote), ISV signature over
//        header || body by the attestation key;
//      - all 64 bytes of report data = SHA-256("veil/report-data/v1" || bytes32(runtime_data)
//        || bytes16(nonce)) || 32 zero bytes, with a 32-byte nonce;
//      - the keyvault's ES256 attestation token (jose) against the pinned JWKS (or, only for a
//        policy accepting every TCB status, the bundle's), its lifetime, and its MAA-style
//        claims against the quote, the bundle and the policy;
//      - the bundle's keys = the decoded runtime data, whose keyvault release key is the pinned one;
//      - the instance descriptor: names the instance, Ed25519-signed by the attested signing key
//        over "veil/instance/v1" || str16(id) || SHA-256(config) || genesis_hash; its config is
//        what the client seals under (auth scheme included), never the gateway's `instance`;
//   3. seal a command (HPKE base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM,
//      info "veil/command/v1", aad = instance id) with an Ed25519 signature proof, and never
//      send an Ed25519 identity's command to an instance that authenticates nobody;
//   4. open the AES-256-GCM response and verify the enclave's receipt whenever there is one,
//      whatever the host's unauthenticated `accepted` flag says;
//   5. counters: the enclave's typed CounterState decides whether a call ran; after an
//      ambiguous attempt the call is only ever sealed again under the same counter; a refusal
//      naming a later counter than the call's proves only that that delivery did not run
//      (OutcomeUnknown); a new call is sealed above the high-water mark (sealed.json, raised
//      before sending), never at or below a sealing the host may still hold (CounterGap until
//      the unsettled calls are resumed); a refusal before running is final only when the
//      sealed bytes decide it (a malformed call, an invalid proof) and no other sealing of the
//      call may still run: one the host controls (its budget, its clock: `mayRunLater`) keeps
//      the call unsettled (NotRunYet).
//
//   6. recipients: a transfer names a local identity, a contact (the Python SDK's files) or a
//      canonical account, never a free-form string the enclave would take as a new account;
//   7. credentials: the gateway (run by the host) gets none, so never an identity's proof. This
//      client has no OAuth2 identity; one added must seal its JWT only and refuse a gateway
//      bearer the enclave would accept (docs/protocol.md section 8, `gateway-credential`).
//
// Failures throw PolicyError / AttestationError / IdentityError / InputError (nothing sent),
// IntegrityError, CommandRefused, OutcomeUnknown (NoAnswer, NotRunYet: retry under the same request id),
// ResultLost, GatewayError or GatewayUnreachable.

import {
  createDecipheriv,
  createHash,
  createPrivateKey,
  createPublicKey,
  randomBytes,
  sign,
  timingSafeEqual,
  verify,
  X509Certificate,
} from "node:crypto";
import { closeSync, existsSync, fsyncSync, mkdirSync, openSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync, writeSync } from "node:fs";
import path from "node:path";
import { connect } from "node:net";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import { Aes128Gcm, CipherSuite, HkdfSha256 } from "@hpke/core";
import { DhkemX25519HkdfSha256 } from "@hpke/dhkem-x25519";
import { decodeProtectedHeader, importJWK, jwtVerify } from "jose";
import protobuf from "protobufjs";
import lockfile from "proper-lockfile";

import {
  ACCOUNT_HEX_CHARS,
  checkAmount,
  checkRequestId,
  IdentityError,
  InputError,
  isCanonicalAccount,
  MAX_ACCOUNT_CHARS,
  parseAddress,
  UnknownRecipient,
  VeilError,
  whyUnreadable,
} from "./inputs.mjs";

export {
  ACCOUNT_HEX_CHARS,
  accountName,
  checkAmount,
  checkRequestId,
  CONTACTS_FILE,
  IDENTITIES_DIR,
  IDENTITY_NAME,
  IdentityError,
  InputError,
  INSTANCE_ID,
  isCanonicalAccount,
  loadContacts,
  MAX_ACCOUNT_CHARS,
  MAX_UINT64,
  parseAddress,
  resolveRecipient,
  UnknownRecipient,
  VeilError,
} from "./inputs.mjs";

import { duplicateMember, policySchemaError } from "./policy-schema.mjs";

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const PROTO_ROOT = path.resolve(HERE, "../../protos");

// --- errors ---------------------------------------------------------------------------------

// The policy file itself is malformed or unsafe; nothing was fetched.
export class PolicyError extends VeilError {
  constructor(reason) {
    super(`policy refused: ${reason}`);
    this.reason = reason;
  }
}

// The attestation bundle did not verify; nothing was sent.
export class AttestationError extends VeilError {
  constructor(reason) {
    super(`attestation refused: ${reason}`);
    this.reason = reason;
  }
}

// An answer or receipt does not authenticate: the host or the gateway tampered.
export class IntegrityError extends VeilError {}
// The answer under a call's request id opens under none of the call's sealings (veil/sdk/errors.py
// `ForeignAnswer`): the mesh's record of a sealing this client does not hold (the call ran before,
// from a client that lost its records, or another call used the id), or the host's forgery.
// Nothing of this attempt ran through that request; the client uses the call's counter up so
// none of its sealings can run later either (the call is kept when that cannot be done now).
export class ForeignAnswer extends IntegrityError {}

// The enclave refused the command; `code` is the EcallErrorCode name.
export class CommandRefused extends VeilError {
  // `code` is the EcallErrorCode's full name; the message shows it as the Python CLI does.
  constructor(code, message, receipt = null) {
    super(`${code.replace(/^ECALL_ERROR_CODE_/, "")}: ${message}`);
    this.code = code;
    this.reason = message;
    this.receipt = receipt;
  }
}

// A command may or may not have run, and the client cannot prove which: it stopped.
export class OutcomeUnknown extends VeilError {}

// The enclave waits for a lower counter: earlier sealings of this client (a batch, or a call that
// ended without a definitive answer) are not settled. This call's sealing stays valid and runs
// once those counters are used, so it is never sealed under another counter: resume the calls
// named in `waitingFor` (their request ids), then this one (`requestId`).
export class CounterGap extends OutcomeUnknown {
  constructor(message, waitingFor = []) {
    super(message);
    this.waitingFor = waitingFor;
  }
}

// The mesh answered the call's request id with what none of its sealings opens (ForeignAnswer),
// and the call's counter could not be used up now (no answer, refused for now, or an earlier
// counter still open): its sealing may still run, so the call is kept. Calling again with
// `requestId` resumes it; never send it as a new call (veil/sdk/errors.py `NotSettledYet`).
export class NotSettledYet extends OutcomeUnknown {
  constructor(instanceId, requestId, cause) {
    super(
      `${instanceId}: the mesh answered request id ${requestId} with an answer this client cannot open (${cause}), and the call's counter ` +
        `could not be used up now, so its sealing may still run; the call is kept: resume it with request id ${requestId}, never as a new call`,
    );
    this.requestId = requestId;
    this.waitingFor = [];
  }
}

// The enclave refused the command *for now*, for a reason the host controls: its memory budget
// (RESOURCE_EXHAUSTED) or its clock outside the token's validity (UNAUTHENTICATED). The very
// same sealing stays valid in the host's hands and may still run later, so the call is kept:
// calling again with `requestId` resumes it (its sealed bytes first, then one fresh sealing under
// the same counter, with a renewed token); never send it as a new call. `code`, `reason`: the
// enclave's sealed refusal.
export class NotRunYet extends OutcomeUnknown {
  constructor(instanceId, requestId, code, reason) {
    super(
      `${instanceId}: not run so far: the enclave refused it for now (${code.replace("ECALL_ERROR_CODE_", "")}: ${reason}), and the same sealed command ` +
        `may still run later (the host sets the memory budget and the clock); the call is kept: resume it with request id ${requestId}, never as a new call`,
    );
    this.requestId = requestId;
    this.code = code;
    this.reason = reason;
    this.waitingFor = [];
  }
}

// No answer came before the deadline (UNAVAILABLE, DEADLINE_EXCEEDED): the command may have run.
// Calling again with the error's `requestId` resumes the same call, so it runs at most once.
export class NoAnswer extends OutcomeUnknown {}

// The command ran, exactly once (the enclave says so), but its answer was lost.
// A sealed command is larger than the gateway accepts (veil/sdk/errors.py `RequestTooLarge`):
// refused before it is kept or sent, since the gateway refuses it unread and every resend
// carries the same bytes (kept, it would hold the account's later calls up for good).
// When the gateway refuses one anyway (a maxRequestBytes above the gateway's limit), the
// client uses the call's counter up with the app's read-only command, so that no sealing of it
// the host may hold can ever run, and drops the call (`sent`: nothing ran).
const TOO_LARGE_REFUSAL = (size) => `the gateway refused the sealed command of ${size} bytes unread, over its request limit`;

export class RequestTooLarge extends VeilError {
  constructor(size, limit, { sent = false, earlierSent = false } = {}) {
    super(
      earlierSent
        ? `a new sealing of this call is ${size} bytes, over the gateway's request limit of ${limit} bytes, so it was not sent; an earlier sealing of the call was sent and may still run: resume the call by its request id, never send it as a new call`
        : sent
        ? `${TOO_LARGE_REFUSAL(size)}; its counter was used up by a read-only command, so it never runs: nothing ran (send less, or raise the gateway's VEIL_GATEWAY_MAX_MESSAGE_BYTES)`
        : `the sealed command is ${size} bytes, over the gateway's request limit of ${limit} bytes (maxRequestBytes; the gateway's VEIL_GATEWAY_MAX_MESSAGE_BYTES): nothing was sent`,
    );
    this.size = size;
    this.limit = limit;
    this.sent = sent;
    this.earlierSent = earlierSent;
    // What the gateway did, without what the client did about it: the cause of a NotSettledYet
    // when the counter could not be used up.
    this.refusal = sent ? TOO_LARGE_REFUSAL(size) : this.message;
  }
}

// The largest request the gateway accepts by default (its VEIL_GATEWAY_MAX_MESSAGE_BYTES).
export const MAX_REQUEST_BYTES = 1024 * 1024;

// The encoded size of ExecuteRequest{instance_id, command, request_id} carrying `sealed`
// (protobuf: a tag byte, the length as a varint, the bytes; the suite is a varint field).
export function executeRequestBytes(sealed) {
  const field = (length) => (length ? 1 + varintBytes(length) + length : 0); // tag, length, bytes
  const { suite, encapsulated_key: enc, ciphertext } = sealed.command; // SealedCommand, fields 1-3
  const command = (suite ? 1 + varintBytes(suite) : 0) + field(enc.length) + field(ciphertext.length);
  return field(Buffer.byteLength(sealed.instanceId, "utf8")) + field(command) + field(Buffer.byteLength(sealed.requestId, "utf8"));
}

function varintBytes(value) {
  let bytes = 1;
  for (let rest = value; rest >= 0x80; rest = Math.floor(rest / 0x80)) bytes += 1;
  return bytes;
}

export class ResultLost extends VeilError {
  constructor(instanceId, sequence) {
    super(`${instanceId}: the command ran (log sequence ${sequence}) but its answer was lost; it must not be sent again`);
    this.instanceId = instanceId;
    this.sequence = sequence;
  }
}

// The gateway (or the mesh behind it) failed the call; `reason` is its ErrorInfo reason.
export class GatewayError extends VeilError {
  constructor(error) {
    const codeName = STATUS_NAMES[error.code] ?? String(error.code);
    const info = statusDetails(error);
    super(`${codeName}: ${error.details ?? ""}` + (info.reason ? ` (${info.reason})` : ""));
    this.code = error.code;
    this.codeName = codeName;
    this.reason = info.reason;
    this.retryDelayMs = info.retryDelayMs;
    this.details = error.details ?? "";
  }
}

// No TLS connection to the gateway came up in time: the mesh is down, or the address is wrong.
export class GatewayUnreachable extends VeilError {
  // `listening`: whether a TCP connection to the address works (then TLS or HTTP/2 failed).
  constructor(address, timeoutMs, reason, { listening = false } = {}) {
    const why = reason ? ` (${reason})` : "";
    super(
      `cannot reach the gateway at ${address} within ${timeoutMs / 1000} s` +
        (listening
          ? `: it accepts connections, but no TLS session came up${why}; is it the gateway's public port (its ` +
            "mutual-TLS port wants a client certificate), and do --server-name and the mesh's CA match it?"
          : `${why}; is the mesh running? Start one with \`veil up\` (\`make run\` in a checkout), or pass the right --gateway`),
    );
    this.address = address;
    this.reason = reason;
    this.listening = listening;
  }
}

// Whether a TCP connection to host:port opens within `timeoutMs`: null, or the error code.
function tcpProbe(host, port, timeoutMs) {
  return new Promise((resolve) => {
    const socket = connect({ host: host.replace(/^\[|\]$/g, ""), port });
    const done = (result) => {
      socket.destroy();
      resolve(result);
    };
    socket.setTimeout(timeoutMs, () => done("ETIMEDOUT"));
    socket.once("connect", () => done(null));
    socket.once("error", (error) => done(error.code ?? error.message));
  });
}

const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

// --- protos ---------------------------------------------------------------------------------

function loadMessages() {
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => path.join(PROTO_ROOT, target);
  root.loadSync(["veil/enclave/v1/command.proto", "veil/enclave/v1/apps.proto", "veil/enclave/v1/envelope.proto"]);
  const type = (name) => root.lookupType(`veil.enclave.v1.${name}`);
  return {
    Command: type("Command"),
    AppCall: type("AppCall"),
    CommandResponse: type("CommandResponse"),
    CommandResult: type("CommandResult"),
    EnclavePublicKeys: type("EnclavePublicKeys"),
    InstanceConfig: type("InstanceConfig"),
    AuthScheme: root.lookupEnum("veil.enclave.v1.AuthScheme"),
    AppKind: root.lookupEnum("veil.enclave.v1.AppKind"),
    ReceiptKind: root.lookupEnum("veil.enclave.v1.ReceiptKind"),
    EcallErrorCode: root.lookupEnum("veil.enclave.v1.EcallErrorCode"),
  };
}

export const messages = loadMessages();

// google.rpc.Status in the `grpc-status-details-bin` trailer: ErrorInfo (reason) and RetryInfo.
const rpc = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: {
            Any: { fields: { typeUrl: { type: "string", id: 1 }, value: { type: "bytes", id: 2 } } },
            Duration: { fields: { seconds: { type: "int64", id: 1 }, nanos: { type: "int32", id: 2 } } },
          },
        },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: "int32", id: 1 },
                message: { type: "string", id: 2 },
                details: { rule: "repeated", type: "google.protobuf.Any", id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: "string", id: 1 },
                domain: { type: "string", id: 2 },
                metadata: { keyType: "string", type: "string", id: 3 },
              },
            },
            RetryInfo: { fields: { retryDelay: { type: "google.protobuf.Duration", id: 1 } } },
          },
        },
      },
    },
  },
});

function statusDetails(error) {
  const found = { reason: "", retryDelayMs: null };
  const raw = error?.metadata?.get?.("grpc-status-details-bin")?.[0];
  if (!raw) return found;
  try {
    const status = rpc.lookupType("google.rpc.Status").decode(Buffer.from(raw));
    for (const detail of status.details) {
      if (detail.typeUrl.endsWith("/google.rpc.ErrorInfo")) {
        found.reason = rpc.lookupType("google.rpc.ErrorInfo").decode(detail.value).reason;
      } else if (detail.typeUrl.endsWith("/google.rpc.RetryInfo")) {
        const delay = rpc.lookupType("google.rpc.RetryInfo").decode(detail.value).retryDelay;
        if (delay) found.retryDelayMs = Number(delay.seconds) * 1000 + delay.nanos / 1e6;
      }
    }
  } catch {
    // Unparseable details carry no reason: the error is still reported by its status.
  }
  return found;
}

function gatewayService() {
  const definition = protoLoader.loadSync("veil/gateway/v1/gateway.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: String,
    enums: Number,
    bytes: Buffer,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).veil.gateway.v1.GatewayService;
}

// --- canonical bytes (enclave/wire.py) ----------------------------------------------------------

const u = (value, size) => {
  let v = BigInt(value);
  if (v < 0n || v >= 1n << BigInt(8 * size)) throw new RangeError(`${value} does not fit in ${size} bytes`);
  const out = Buffer.alloc(size);
  for (let i = size - 1; i >= 0; i -= 1) {
    out[i] = Number(v & 0xffn);
    v >>= 8n;
  }
  return out;
};
const prefixed = (data, size) => Buffer.concat([u(data.length, size), Buffer.from(data)]);
const str16 = (text) => prefixed(Buffer.from(text, "utf8"), 2);
const sha256 = (...parts) => createHash("sha256").update(Buffer.concat(parts.map((p) => Buffer.from(p)))).digest();
const hash32 = (value, what) => {
  const bytes = Buffer.from(value ?? []);
  if (bytes.length !== 32) throw new RangeError(`${what} must be 32 bytes`);
  return bytes;
};
const same = (a, b) => {
  const x = Buffer.from(a ?? []);
  const y = Buffer.from(b ?? []);
  return x.length === y.length && timingSafeEqual(x, y);
};

export const COMMAND_INFO = Buffer.from("veil/command/v1");
export const REPORT_NONCE_SIZE = 32;

// wire.report_data: the quote's 64 bytes of report data over the enclave's keys and the nonce.
export function reportData(runtimeData, nonce) {
  if (Buffer.from(nonce ?? []).length !== REPORT_NONCE_SIZE) throw new RangeError(`nonce must be ${REPORT_NONCE_SIZE} bytes`);
  const digest = sha256(Buffer.from("veil/report-data/v1"), prefixed(Buffer.from(runtimeData ?? []), 4), prefixed(Buffer.from(nonce), 2));
  return Buffer.concat([digest, Buffer.alloc(32)]);
}

export function commandSigningBytes({ instanceId, counter, requestId, responseKey, call }) {
  return Buffer.concat([
    Buffer.from("veil/command-signature/v1"),
    str16(instanceId),
    u(counter, 8),
    str16(requestId),
    prefixed(responseKey, 2),
    prefixed(call, 4),
  ]);
}

export function receiptSigningBytes({ kind, instanceId, sequence, commandHash, resultHash }) {
  return Buffer.concat([
    Buffer.from("veil/receipt/v1"),
    u(kind, 1),
    str16(instanceId),
    u(sequence, 8),
    hash32(commandHash, "command hash"),
    hash32(resultHash, "result hash"),
  ]);
}

export function instanceDescriptorBytes(instanceId, configHash, genesisHash) {
  return Buffer.concat([
    Buffer.from("veil/instance/v1"),
    str16(instanceId),
    hash32(configHash, "config hash"),
    hash32(genesisHash, "genesis hash"),
  ]);
}

export function responseAad(instanceId, requestId) {
  return Buffer.concat([Buffer.from("veil/response/v1"), str16(instanceId), str16(requestId)]);
}

// wire.command_hash: names a sealed command in receipts and in the enclave's counter state.
export function commandHash(encapsulatedKey, ciphertext) {
  return sha256(encapsulatedKey, ciphertext);
}

export function verifyEd25519(publicKey, signature, message) {
  try {
    const raw = Buffer.from(publicKey ?? []);
    if (raw.length !== 32) return false;
    const key = createPublicKey({ key: { kty: "OKP", crv: "Ed25519", x: raw.toString("base64url") }, format: "jwk" });
    return verify(null, message, key, Buffer.from(signature ?? []));
  } catch {
    return false;
  }
}

// --- policy (veil/sdk/trust_policy.py) ------------------------------------------------------------------

export const ANY_TCB_STATUS = "*";
export const DEFAULT_TCB_STATUSES = Object.freeze(["UpToDate", "SWHardeningNeeded"]);
// Every status a token can state (Intel's, and Unevaluated from a keyvault without collateral).
export const ALL_TCB_STATUSES = Object.freeze([
  "ConfigurationAndSWHardeningNeeded",
  "ConfigurationNeeded",
  "OutOfDate",
  "OutOfDateConfigurationNeeded",
  "Revoked",
  "SWHardeningNeeded",
  "Unevaluated",
  "UpToDate",
]);
const POLICY_KEYS = new Set([
  "mrenclave",
  "mrsigner",
  "product_id",
  "min_svn",
  "allow_debug",
  "accepted_tcb_statuses",
  "root",
  "issuer",
  "jwks",
  "keyvault_release_key",
]);

function hex32(value, what) {
  if (typeof value !== "string" || !/^[0-9a-fA-F]{64}$/.test(value)) throw new PolicyError(`${what} must be 32 bytes of hex (64 digits)`);
  return value.toLowerCase();
}

function optionalInt(document, name) {
  const value = document[name];
  if (value === undefined || value === null) return null;
  if (!Number.isSafeInteger(value) || value < 0) throw new PolicyError(`${name} must be a non-negative integer`);
  return value;
}

// A checked, normalised expected-measurement policy (see veil/sdk/trust_policy.py for the file format).
export class Policy {
  constructor(document) {
    if (document === null || typeof document !== "object" || Array.isArray(document)) throw new PolicyError("the policy must be a JSON object");
    const unknown = Object.keys(document).filter((key) => !POLICY_KEYS.has(key));
    if (unknown.length) throw new PolicyError(`unknown policy keys: ${unknown.sort().join(", ")}`);
    let mrenclave = document.mrenclave ?? [];
    if (typeof mrenclave === "string") mrenclave = [mrenclave];
    if (!Array.isArray(mrenclave)) throw new PolicyError("mrenclave must be a hex string or a list of them");
    this.mrenclaves = Object.freeze(mrenclave.map((m) => hex32(m, "mrenclave")));
    this.mrsigner = document.mrsigner == null ? null : hex32(document.mrsigner, "mrsigner");
    if (!this.mrenclaves.length && this.mrsigner === null) throw new PolicyError("a policy must pin at least one MRENCLAVE or an MRSIGNER");
    this.productId = optionalInt(document, "product_id");
    this.minSvn = optionalInt(document, "min_svn");
    const allowDebug = document.allow_debug ?? false;
    if (typeof allowDebug !== "boolean") throw new PolicyError("allow_debug must be true or false");
    this.allowDebug = allowDebug;
    this.root = String(document.root ?? "intel");
    if (document.issuer != null && typeof document.issuer !== "string") throw new PolicyError("issuer must be a string");
    this.issuer = document.issuer ?? null;
    this.keyvaultReleaseKey = document.keyvault_release_key == null ? null : Buffer.from(hex32(document.keyvault_release_key, "keyvault_release_key"), "hex");

    const statuses = document.accepted_tcb_statuses ?? [...DEFAULT_TCB_STATUSES];
    if (!Array.isArray(statuses) || !statuses.every((s) => typeof s === "string")) throw new PolicyError("accepted_tcb_statuses must be a list of strings");
    if (!statuses.length) throw new PolicyError("accepted_tcb_statuses must not be empty");
    let expanded = statuses;
    if (statuses.includes(ANY_TCB_STATUS)) {
      if (statuses.length !== 1) throw new PolicyError(`"${ANY_TCB_STATUS}" accepts every TCB status and must stand alone`);
      expanded = [...ALL_TCB_STATUSES];
    }
    const unknownStatuses = expanded.filter((s) => !ALL_TCB_STATUSES.includes(s));
    if (unknownStatuses.length) throw new PolicyError(`unknown TCB status(es) ${unknownStatuses.join(", ")}; known: ${ALL_TCB_STATUSES.join(", ")}`);
    this.acceptedTcbStatuses = Object.freeze([...new Set(expanded)]);
    this.acceptsEveryTcbStatus = ALL_TCB_STATUSES.every((s) => this.acceptedTcbStatuses.includes(s));

    const jwks = document.jwks ?? null;
    if (jwks !== null) {
      const keys = typeof jwks === "object" && !Array.isArray(jwks) ? jwks.keys : undefined;
      if (!Array.isArray(keys) || !keys.length || !keys.every((k) => k !== null && typeof k === "object" && !Array.isArray(k))) {
        throw new PolicyError('jwks must be a JWKS object with a non-empty "keys" list of JWKs');
      }
    } else if (!this.acceptsEveryTcbStatus) {
      throw new PolicyError(
        "a policy that restricts accepted_tcb_statuses must pin jwks: the token's TCB status is only as " +
          "trustworthy as the key that signed it, and without a pinned JWKS that key comes from the gateway " +
          `with the bundle (pin the keyvault's JWKS, or accept every status with ["${ANY_TCB_STATUS}"])`,
      );
    }
    this.jwks = jwks;
    Object.freeze(this);
  }

  static from(policy) {
    return policy instanceof Policy ? policy : new Policy(policy);
  }
}

export function loadPolicy(file) {
  let text;
  try {
    text = readFileSync(file, "utf8");
  } catch (error) {
    throw new PolicyError(`cannot read ${file}: ${whyUnreadable(error)}`);
  }
  let document;
  try {
    document = JSON.parse(text);
  } catch (error) {
    throw new PolicyError(`${file} is not valid JSON: ${error.message}`);
  }
  const duplicate = duplicateMember(text);
  if (duplicate !== null) throw new PolicyError(`${file}: duplicate key ${JSON.stringify(duplicate)} (a policy must have one reading)`);
  // Policy's own checks (their messages name the rule), then the schema the Python SDK ships
  // (veil/sdk/policy.schema.json): a document must satisfy both, and the schema names the field
  // and the rule for whatever Policy does not look at.
  const policy = new Policy(document);
  const refused = policySchemaError(document);
  if (refused !== null) throw new PolicyError(`${file}: ${refused}`);
  return policy;
}

// --- DCAP v3 quote ----------------------------------------------------------------------------

const HEADER = 48;
const BODY = 384;
const DEBUG_ATTRIBUTE = 0x02;
const INTEL_QE_VENDOR_ID = Buffer.from("939a7233f79c4ca9940a0db3957f0607", "hex");
// Intel's Quoting Enclave (QE3) as Intel's QE identity names it (veil/verify/verifier.py).
export const INTEL_QE_MRSIGNER = Buffer.from("8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff", "hex");
export const INTEL_QE_ISV_PROD_ID = 1;

function p1363Verify(publicKey, data, signature) {
  try {
    return verify("sha256", data, { key: publicKey, dsaEncoding: "ieee-p1363" }, signature);
  } catch {
    return false;
  }
}

function rawP256Key(raw) {
  return createPublicKey({
    key: { kty: "EC", crv: "P-256", x: raw.subarray(0, 32).toString("base64url"), y: raw.subarray(32, 64).toString("base64url") },
    format: "jwk",
  });
}

// An SGX report body (sgx_report_body_t offsets).
export function parseReportBody(raw) {
  const body = Buffer.from(raw);
  if (body.length !== BODY) throw new AttestationError("quote: a report body is 384 bytes");
  return {
    raw: body,
    attributes: body.subarray(48, 64),
    mrenclave: body.subarray(64, 96),
    mrsigner: body.subarray(128, 160),
    isvProdId: body.readUInt16LE(256),
    isvSvn: body.readUInt16LE(258),
    reportData: body.subarray(320, 384),
    debug: (body[48] & DEBUG_ATTRIBUTE) !== 0,
  };
}

export function parseQuote(quote) {
  const q = Buffer.from(quote ?? []);
  if (q.length < HEADER + BODY + 4) throw new AttestationError("quote: not a DCAP v3 quote (truncated)");
  if (q.readUInt16LE(0) !== 3) throw new AttestationError(`quote: unsupported version ${q.readUInt16LE(0)} (only 3)`);
  if (q.readUInt16LE(2) !== 2) throw new AttestationError("quote: unsupported attestation key type (only 2, ECDSA-P256)");
  if (q.readUInt32LE(4) !== 0) throw new AttestationError("quote: unsupported TEE type (only SGX)");
  if (!q.subarray(12, 28).equals(INTEL_QE_VENDOR_ID)) throw new AttestationError("quote: unknown QE vendor id");
  const sigLength = q.readUInt32LE(HEADER + BODY);
  const sig = q.subarray(HEADER + BODY + 4);
  if (sig.length !== sigLength) throw new AttestationError("quote: signature data length mismatch");
  let offset = 0;
  const take = (n) => {
    if (offset + n > sig.length) throw new AttestationError("quote: truncated signature data");
    const part = sig.subarray(offset, offset + n);
    offset += n;
    return part;
  };
  const isvSignature = take(64);
  const attestationKey = take(64);
  const qeReport = parseReportBody(take(BODY));
  const qeReportSignature = take(64);
  const qeAuthData = take(take(2).readUInt16LE(0));
  const certType = take(2).readUInt16LE(0);
  const certData = take(take(4).readUInt32LE(0));
  if (certType !== 5) throw new AttestationError(`quote: unsupported certification data type ${certType} (only 5, PEM PCK chain)`);
  if (offset !== sig.length) throw new AttestationError("quote: trailing bytes after the certification data");
  return {
    signed: q.subarray(0, HEADER + BODY),
    ...parseReportBody(q.subarray(HEADER, HEADER + BODY)),
    isvSignature,
    attestationKey,
    qeReport,
    qeReportSignature,
    qeAuthData,
    pckChain: certData.toString("utf8"),
  };
}

// The baseline of Intel's QE identity, held on every quote (no collateral needed): the PCK key
// signs the report of any enclave the platform lets request provisioning, so only this says the
// attestation key is Intel's Quoting Enclave's.
export function checkIntelQe(qeReport) {
  if (!Buffer.from(qeReport.mrsigner).equals(INTEL_QE_MRSIGNER)) {
    throw new AttestationError(
      `quote: QE report is not Intel's Quoting Enclave: MRSIGNER ${Buffer.from(qeReport.mrsigner).toString("hex")} is not Intel's ${INTEL_QE_MRSIGNER.toString("hex")}`,
    );
  }
  if (qeReport.isvProdId !== INTEL_QE_ISV_PROD_ID) {
    throw new AttestationError(`quote: QE report is not Intel's Quoting Enclave: ISVPRODID ${qeReport.isvProdId} is not ${INTEL_QE_ISV_PROD_ID} (QE3)`);
  }
  // A debug QE's memory, and so its attestation key, is readable by the host.
  if (qeReport.debug) throw new AttestationError("quote: QE report is from a debug Quoting Enclave (DEBUG attribute set)");
}

function pemCertificates(pem) {
  return (pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) || []).map((c) => new X509Certificate(c));
}

export function verifyQuote(quoteBytes, rootPem, now = new Date()) {
  const quote = parseQuote(quoteBytes);
  let chain;
  try {
    chain = pemCertificates(quote.pckChain);
  } catch {
    throw new AttestationError("quote: the PCK chain does not parse");
  }
  if (chain.length !== 3) throw new AttestationError("quote: the PCK chain must be leaf, CA and root");
  const [leaf, ca, root] = chain;
  const spki = (key) => key.export({ format: "der", type: "spki" });
  if (!spki(root.publicKey).equals(spki(new X509Certificate(rootPem).publicKey))) {
    throw new AttestationError("quote: the PCK chain does not end at the pinned root");
  }
  for (const [child, parent] of [
    [leaf, ca],
    [ca, root],
    [root, root],
  ]) {
    if (!child.checkIssued(parent) || !child.verify(parent.publicKey)) throw new AttestationError("quote: PCK chain signature invalid");
    if (now < new Date(child.validFrom) || now > new Date(child.validTo)) throw new AttestationError("quote: PCK certificate not valid now");
  }
  if (!p1363Verify(leaf.publicKey, quote.qeReport.raw, quote.qeReportSignature)) throw new AttestationError("quote: QE report signature invalid");
  // The QE vouches for the attestation key by hashing it into its own signed report.
  if (!same(quote.qeReport.reportData.subarray(0, 32), sha256(quote.attestationKey, quote.qeAuthData))) {
    throw new AttestationError("quote: QE report does not bind the attestation key and QE auth data");
  }
  if (!quote.qeReport.reportData.subarray(32).equals(Buffer.alloc(32))) {
    throw new AttestationError("quote: QE report data is not zero after the key binding");
  }
  checkIntelQe(quote.qeReport);
  let attestationKey;
  try {
    attestationKey = rawP256Key(quote.attestationKey);
  } catch {
    throw new AttestationError("quote: the attestation key is not a P-256 point");
  }
  if (!p1363Verify(attestationKey, quote.signed, quote.isvSignature)) throw new AttestationError("quote: ISV signature invalid");
  return quote;
}

// --- attestation token (veil/verify/tokens.py) -------------------------------------------

const LEEWAY_S = 30;
const MAX_TOKEN_LIFETIME_S = 24 * 3600;
const MAX_TOKEN_CHARS = 16 * 1024;
const REQUIRED_CLAIMS = [
  "iss",
  "iat",
  "nbf",
  "exp",
  "jti",
  "nonce",
  "x-ms-ver",
  "x-ms-attestation-type",
  "x-ms-sgx-is-debuggable",
  "x-ms-sgx-product-id",
  "x-ms-sgx-svn",
  "x-ms-sgx-mrenclave",
  "x-ms-sgx-mrsigner",
  "x-ms-sgx-report-data",
  "x-ms-sgx-ehd",
  "x-ms-sgx-tcb-status",
];

export async function verifyToken(token, jwks, { issuer = null, now = new Date(), pinned = false } = {}) {
  const fail = (reason) => new AttestationError(`token: ${reason}`);
  if (typeof token !== "string" || !token || token.length > MAX_TOKEN_CHARS) throw fail("empty or too long");
  let header;
  try {
    header = decodeProtectedHeader(token);
  } catch {
    throw fail("not a JWS");
  }
  // Checked first and explicitly: 'none' and HMAC confusion never reach a key.
  if (header.alg !== "ES256") throw fail(`algorithm ${JSON.stringify(header.alg)} is not ES256`);
  if (Object.keys(header).some((k) => !["alg", "kid", "typ"].includes(k)) || (header.typ ?? "JWT") !== "JWT") throw fail("header has unexpected fields");
  if (typeof header.kid !== "string" || !header.kid) throw fail("header has no kid");
  const keys = Array.isArray(jwks?.keys) ? jwks.keys : [];
  const matches = keys.filter((key) => key && typeof key === "object" && key.kid === header.kid);
  if (matches.length !== 1) throw fail(`kid ${JSON.stringify(header.kid)} is not a known signing key of the ${pinned ? "pinned" : "bundle's"} JWKS`);
  const { kty, crv, x, y } = matches[0];
  let key;
  try {
    if (kty !== "EC" || crv !== "P-256") throw new Error("not P-256");
    key = await importJWK({ kty, crv, x, y }, "ES256");
  } catch {
    throw fail(`the JWKS key ${JSON.stringify(header.kid)} is not a P-256 public key`);
  }
  let claims;
  try {
    ({ payload: claims } = await jwtVerify(token, key, {
      algorithms: ["ES256"],
      issuer: issuer ?? undefined,
      currentDate: now,
      clockTolerance: LEEWAY_S,
      requiredClaims: REQUIRED_CLAIMS,
    }));
  } catch (error) {
    throw fail(error.code === "ERR_JWS_SIGNATURE_VERIFICATION_FAILED" ? "signature does not verify" : error.message);
  }
  if (typeof claims.iss !== "string") throw fail("no issuer");
  const nowS = now.getTime() / 1000;
  const { iat, exp } = claims;
  if (!Number.isSafeInteger(iat) || !Number.isSafeInteger(exp)) throw fail("iat and exp must be integers");
  if (iat > nowS + LEEWAY_S) throw fail("is not valid yet");
  if (!(iat <= exp) || exp - iat > MAX_TOKEN_LIFETIME_S) throw fail("lifetime is invalid");
  if (typeof claims.jti !== "string" || claims.jti.length < 16 || claims.jti.length > 128) throw fail("jti is malformed");
  if (claims["x-ms-attestation-type"] !== "sgx") throw fail("not an SGX attestation token");
  if (typeof claims["x-ms-sgx-tcb-status"] !== "string") throw fail("claim 'x-ms-sgx-tcb-status' must be a string");
  return claims;
}

// --- attestation --------------------------------------------------------------------------------

// Check an enclave-signed instance descriptor (a GetAttestationResponse.descriptor, as loaded by
// proto-loader) against the attested signing key; its configuration is what the client seals under.
export function verifyDescriptor(descriptor, signingKey, instanceId) {
  if (!descriptor) throw new AttestationError(`the bundle carries no descriptor of instance ${JSON.stringify(instanceId)}`);
  const named = String(descriptor.instance_id ?? "");
  if (named !== instanceId) throw new AttestationError(`the instance descriptor names ${JSON.stringify(named.slice(0, 64))}, not ${JSON.stringify(instanceId)}`);
  const configBytes = Buffer.from(descriptor.config ?? []);
  const configHash = sha256(configBytes);
  const genesisHash = Buffer.from(descriptor.genesis_hash ?? []);
  let message;
  try {
    message = instanceDescriptorBytes(named, configHash, genesisHash);
  } catch {
    message = null;
  }
  if (message === null || !verifyEd25519(signingKey, descriptor.signature, message)) {
    throw new AttestationError("the instance descriptor is not signed by the attested enclave");
  }
  let config;
  try {
    config = messages.InstanceConfig.decode(configBytes);
  } catch {
    throw new AttestationError("the instance descriptor's configuration does not parse");
  }
  return { instanceId: named, config, configHash, genesisHash };
}

const KEY_FIELDS = [
  ["hpke_x25519_public_key", "hpkeX25519PublicKey"],
  ["hpke_mlkem768x25519_public_key", "hpkeMlkem768x25519PublicKey"],
  ["signing_public_key", "signingPublicKey"],
  ["keyvault_release_public_key", "keyvaultReleasePublicKey"],
];

// Verify a GetAttestationResponse (as loaded by proto-loader) against `policy`, and the named
// instance's descriptor when `instanceId` is given; AttestationError with the reason.
export async function verifyBundle(bundle, policy, rootPem, { now = new Date(), instanceId = "" } = {}) {
  const checked = Policy.from(policy);
  const quote = verifyQuote(bundle.quote, rootPem, now);
  let expected;
  try {
    expected = reportData(bundle.runtime_data, bundle.nonce);
  } catch (error) {
    throw new AttestationError(`bundle: ${error.message}`);
  }
  if (!same(quote.reportData, expected)) throw new AttestationError("quote report data does not bind the runtime data and nonce");

  // Only a pinned JWKS makes the token's TCB status mean anything (Policy refuses a policy
  // that restricts the status without one); the bundle's JWKS is used only under ["*"].
  let jwks = checked.jwks;
  if (jwks === null) {
    try {
      jwks = JSON.parse(bundle.jwks_json);
    } catch {
      throw new AttestationError("the bundle's JWKS is not valid JSON");
    }
    if (jwks === null || typeof jwks !== "object" || Array.isArray(jwks)) throw new AttestationError("the bundle's JWKS is not a JSON object");
  }
  const claims = await verifyToken(bundle.attestation_token, jwks, { issuer: checked.issuer, now, pinned: checked.jwks !== null });
  const agree = [
    ["x-ms-sgx-mrenclave", quote.mrenclave.toString("hex")],
    ["x-ms-sgx-mrsigner", quote.mrsigner.toString("hex")],
    ["x-ms-sgx-product-id", quote.isvProdId],
    ["x-ms-sgx-svn", quote.isvSvn],
    ["x-ms-sgx-is-debuggable", quote.debug],
    ["x-ms-sgx-report-data", quote.reportData.toString("hex")],
    ["x-ms-sgx-ehd", Buffer.from(bundle.runtime_data).toString("base64url")],
    ["nonce", Buffer.from(bundle.nonce).toString("base64url")],
  ];
  for (const [claim, value] of agree) {
    if (claims[claim] !== value) throw new AttestationError(`token claim ${claim} disagrees with the quote or bundle`);
  }

  const mrenclave = quote.mrenclave.toString("hex");
  const mrsigner = quote.mrsigner.toString("hex");
  if (checked.mrenclaves.length && !checked.mrenclaves.includes(mrenclave)) throw new AttestationError(`MRENCLAVE ${mrenclave} is not an expected measurement`);
  if (checked.mrsigner !== null && mrsigner !== checked.mrsigner) throw new AttestationError(`MRSIGNER ${mrsigner} is not the expected signer`);
  if (checked.productId !== null && quote.isvProdId !== checked.productId) throw new AttestationError(`product id ${quote.isvProdId} is not ${checked.productId}`);
  if (checked.minSvn !== null && quote.isvSvn < checked.minSvn) throw new AttestationError(`SVN ${quote.isvSvn} is below the minimum ${checked.minSvn}`);
  if (quote.debug && !checked.allowDebug) throw new AttestationError("the enclave is debuggable (its memory is readable by the host)");
  const tcbStatus = claims["x-ms-sgx-tcb-status"];
  if (!checked.acceptedTcbStatuses.includes(tcbStatus)) throw new AttestationError(`TCB status ${JSON.stringify(tcbStatus)} is not accepted`);

  let decoded;
  try {
    decoded = messages.EnclavePublicKeys.decode(Buffer.from(bundle.runtime_data));
  } catch {
    throw new AttestationError("runtime data is not EnclavePublicKeys");
  }
  const keys = bundle.keys ?? {};
  for (const [snake, camel] of KEY_FIELDS) {
    if (!Buffer.from(decoded[camel] ?? []).equals(Buffer.from(keys[snake] ?? []))) throw new AttestationError("the bundle's keys are not the attested runtime data");
  }
  const hpke = Buffer.from(decoded.hpkeX25519PublicKey ?? []);
  const signing = Buffer.from(decoded.signingPublicKey ?? []);
  if (hpke.length !== 32 || signing.length !== 32) throw new AttestationError("the attested keys have the wrong sizes");
  // The enclave accepts data keys only from the keyvault release key it binds here; a client
  // that did not pin that key could be talking to an enclave fed keys the host knows.
  if (checked.keyvaultReleaseKey === null) throw new AttestationError("the policy pins no keyvault release key, so the enclave's data keys cannot be trusted");
  if (!same(decoded.keyvaultReleasePublicKey, checked.keyvaultReleaseKey)) {
    throw new AttestationError("the enclave accepts keys from another keyvault than the pinned one");
  }
  const descriptor = instanceId ? verifyDescriptor(bundle.descriptor, signing, instanceId) : null;
  return {
    keys: { hpke, signing },
    mrenclave,
    mrsigner,
    tcbStatus,
    issuer: claims.iss,
    expires: claims.exp,
    jwksPinned: checked.jwks !== null,
    descriptor,
  };
}

// --- local state: counters and instance pins (the Python SDK's files) ------------------------------

// Replace `file` with `text` atomically; `durable` flushes it (and the directory entry) to disk
// before returning: what must survive a power loss before a command is sent.
function replaceFile(file, text, { durable = false, mode = 0o666 } = {}) {
  const temporary = `${file}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`;
  if (!durable) {
    writeFileSync(temporary, text, { mode });
    renameSync(temporary, file);
    return;
  }
  const descriptor = openSync(temporary, "w", mode);
  try {
    writeSync(descriptor, text);
    fsyncSync(descriptor);
  } finally {
    closeSync(descriptor);
  }
  renameSync(temporary, file);
  const directory = openSync(path.dirname(file), "r");
  try {
    fsyncSync(directory);
  } finally {
    closeSync(directory);
  }
}

// Per (instance, account): the last accepted counter (`last`, a cache) and the high-water mark
// (`sealed`: the highest counter this client sealed, raised before the sealing is sent). A
// sealing sent without a definitive answer stays valid in the host's hands, so a new call is
// sealed above both, never at or below a counter whose sealing may still run
// (docs/protocol.md, section 6). In memory:
export class MemoryCounters {
  constructor() {
    this.values = new Map();
    this.marks = new Map();
  }

  last(instanceId, account) {
    return this.values.get(`${instanceId}\u0000${account}`) ?? 0;
  }

  record(instanceId, account, counter) {
    this.values.set(`${instanceId}\u0000${account}`, counter);
  }

  sealed(instanceId, account) {
    return this.marks.get(`${instanceId}\u0000${account}`) ?? 0;
  }

  // Raise the mark to `counter` (never lowers it).
  seal(instanceId, account, counter) {
    if (counter > this.sealed(instanceId, account)) this.marks.set(`${instanceId}\u0000${account}`, counter);
  }

  // The sealing under `counter` can never run and nothing above it was sealed: lower the mark
  // to `counter - 1`, only if it is still exactly `counter`.
  unseal(instanceId, account, counter) {
    if (this.sealed(instanceId, account) === counter) this.marks.set(`${instanceId}\u0000${account}`, counter - 1);
  }
}

// The same in the Python SDK's JSON files, so both clients continue where the other stopped:
// <data_dir>/counters.json ({instance: {account: last}}; a missing or broken file only costs a
// resync) and <data_dir>/sealed.json (same shape: the high-water mark, flushed to disk before
// a command is sent).
export class FileCounters {
  constructor(file, sealedFile = path.join(path.dirname(file), "sealed.json")) {
    this.file = file;
    this.sealedFile = sealedFile;
  }

  read(file = this.file) {
    try {
      const document = JSON.parse(readFileSync(file, "utf8"));
      return document !== null && typeof document === "object" && !Array.isArray(document) ? document : {};
    } catch {
      return {};
    }
  }

  value(file, instanceId, account) {
    const value = this.read(file)[instanceId]?.[account];
    return Number.isSafeInteger(value) && value > 0 ? value : 0;
  }

  write(file, instanceId, account, counter) {
    const document = this.read(file);
    const accounts = document[instanceId] !== null && typeof document[instanceId] === "object" ? document[instanceId] : {};
    document[instanceId] = { ...accounts, [account]: counter };
    replaceFile(file, `${JSON.stringify(document, null, 1)}\n`, { durable: file === this.sealedFile });
  }

  last(instanceId, account) {
    return this.value(this.file, instanceId, account);
  }

  record(instanceId, account, counter) {
    this.write(this.file, instanceId, account, counter);
  }

  sealed(instanceId, account) {
    return this.value(this.sealedFile, instanceId, account);
  }

  seal(instanceId, account, counter) {
    if (counter > this.sealed(instanceId, account)) this.write(this.sealedFile, instanceId, account, counter);
  }

  unseal(instanceId, account, counter) {
    if (this.sealed(instanceId, account) === counter) this.write(this.sealedFile, instanceId, account, counter - 1);
  }
}

// Instance pins (<data_dir>/instances.json, written by the Python `veil instance create/pin`):
// the genesis and configuration an instance id must name. Read only; unpinned ids pass.
export class InstancePins {
  constructor(file = null) {
    this.pins = {};
    if (file === null) return;
    let text;
    try {
      text = readFileSync(file, "utf8");
    } catch (error) {
      if (error.code === "ENOENT") return;
      throw new PolicyError(`cannot read instance pins ${file}: ${whyUnreadable(error)}`);
    }
    try {
      const document = JSON.parse(text);
      for (const [id, pin] of Object.entries(document)) {
        this.pins[id] = { genesisHash: hex32(pin.genesis_hash, "genesis_hash"), configHash: hex32(pin.config_hash, "config_hash") };
      }
    } catch {
      throw new PolicyError(`instance pins ${file} are malformed`);
    }
  }

  check(descriptor) {
    const pin = this.pins[descriptor.instanceId];
    if (!pin) return;
    if (descriptor.genesisHash.toString("hex") !== pin.genesisHash) {
      throw new AttestationError(`instance ${JSON.stringify(descriptor.instanceId)} is not the pinned one: its genesis differs (it was created again, possibly by the host)`);
    }
    if (descriptor.configHash.toString("hex") !== pin.configHash) {
      throw new AttestationError(`instance ${JSON.stringify(descriptor.instanceId)} has another configuration than pinned`);
    }
  }
}

// --- identity -----------------------------------------------------------------------------------

export function loadIdentity(keyFile) {
  let mode;
  try {
    ({ mode } = statSync(keyFile));
  } catch (error) {
    throw new IdentityError(`cannot read identity ${keyFile}: ${whyUnreadable(error)}`);
  }
  if (mode & 0o077) throw new IdentityError(`${keyFile} is readable by others; chmod 600 it`);
  let privateKey;
  try {
    privateKey = createPrivateKey(readFileSync(keyFile));
  } catch {
    throw new IdentityError(`${keyFile} is not a PEM private key`);
  }
  if (privateKey.asymmetricKeyType !== "ed25519") throw new IdentityError(`${keyFile} is not an Ed25519 key`);
  const publicKey = Buffer.from(createPublicKey(privateKey).export({ format: "jwk" }).x, "base64url");
  return { privateKey, publicKey, account: publicKey.toString("hex") };
}

// The AuthProof of an Ed25519 identity under the scheme the enclave signed for the instance.
export function signatureProof(scheme, identity, signingBytes) {
  const name = messages.AuthScheme.valuesById[scheme] ?? String(scheme);
  if (name === "AUTH_SCHEME_SIGNATURE") {
    return { signature: { publicKey: identity.publicKey, signature: sign(null, signingBytes, identity.privateKey) } };
  }
  if (name === "AUTH_SCHEME_NONE") {
    // Never downgrade: on an instance that checks no proof, anyone can claim this account.
    throw new IdentityError(
      "this instance authenticates nobody (auth scheme none, as its enclave describes it): anyone may act as any " +
        "account there, so an Ed25519 identity is not used and nothing was sent",
    );
  }
  throw new IdentityError(`an Ed25519 identity cannot prove a ${name.replace(/^AUTH_SCHEME_/, "").toLowerCase()} identity`);
}

// An account a command of an instance under `scheme` may name: under signatures only an Ed25519
// key can ever act, so anything else would take the tokens for good.
export function checkRecipient(scheme, account) {
  const name = messages.AuthScheme.valuesById[scheme] ?? String(scheme);
  if (name === "AUTH_SCHEME_SIGNATURE") {
    if (!isCanonicalAccount(account)) {
      throw new UnknownRecipient(
        `${JSON.stringify(String(account).slice(0, 80))} is not an account of this instance (it authenticates Ed25519 keys: ` +
          `${ACCOUNT_HEX_CHARS} lowercase hex characters); nothing was sent`,
      );
    }
  } else if (typeof account !== "string" || !account || account.length > MAX_ACCOUNT_CHARS || /[\u0000-\u001f\u007f]/.test(account)) {
    throw new UnknownRecipient(`an account is 1 to ${MAX_ACCOUNT_CHARS} printable characters; nothing was sent`);
  }
  return account;
}

// --- sealing and opening ------------------------------------------------------------------------

const HPKE = new CipherSuite({ kem: new DhkemX25519HkdfSha256(), kdf: new HkdfSha256(), aead: new Aes128Gcm() });
const X25519_SUITE = 1;

// Build, prove and HPKE-seal one command to the attested enclave (sealing.seal_command).
export async function sealCommand(attestation, { instanceId, identity, call, counter, requestId }) {
  const descriptor = attestation.descriptor;
  if (!descriptor || descriptor.instanceId !== instanceId) throw new AttestationError(`the enclave did not describe instance ${JSON.stringify(instanceId)}`);
  const responseKey = randomBytes(32);
  const callBytes = Buffer.from(messages.AppCall.encode(messages.AppCall.fromObject(call)).finish());
  const signingBytes = commandSigningBytes({ instanceId, counter, requestId, responseKey, call: callBytes });
  const auth = signatureProof(descriptor.config.authScheme, identity, signingBytes);
  const command = messages.Command.encode(
    messages.Command.fromObject({ instanceId, counter: String(counter), requestId, responseKey, call: callBytes, auth }),
  ).finish();
  const recipientPublicKey = await HPKE.kem.deserializePublicKey(attestation.keys.hpke);
  const sealed = await HPKE.seal({ recipientPublicKey, info: COMMAND_INFO }, command, Buffer.from(instanceId, "utf8"));
  const enc = Buffer.from(sealed.enc);
  const ciphertext = Buffer.from(sealed.ct);
  return {
    instanceId,
    requestId,
    counter,
    responseKey,
    signingKey: attestation.keys.signing,
    command: { suite: X25519_SUITE, encapsulated_key: enc, ciphertext },
    commandHash: commandHash(enc, ciphertext),
  };
}

const codeName = (code) => messages.EcallErrorCode.valuesById[code] ?? `ECALL_ERROR_CODE_${code}`;

function toResult(message) {
  return messages.CommandResult.toObject(message, { longs: String, enums: String, defaults: false });
}

// Open and verify the enclave's answer to `request` (sealing.open_outcome): the receipt is
// checked whenever the answer carries one, and `accepted` (host-controlled) must agree with it.
export function openOutcome(outcome, request, { query = false } = {}) {
  if (!outcome || !outcome.sealed_response || outcome.sealed_response.length === 0) {
    if (outcome?.error) throw new CommandRefused(codeName(outcome.error.code), outcome.error.message ?? "");
    throw new IntegrityError("the outcome carries no sealed response");
  }
  const blob = Buffer.from(outcome.sealed_response);
  let response;
  let result;
  try {
    if (blob.length < 28) throw new Error("short");
    const decipher = createDecipheriv("aes-256-gcm", request.responseKey, blob.subarray(0, 12));
    decipher.setAAD(responseAad(request.instanceId, request.requestId));
    decipher.setAuthTag(blob.subarray(blob.length - 16));
    const plaintext = Buffer.concat([decipher.update(blob.subarray(12, blob.length - 16)), decipher.final()]);
    response = messages.CommandResponse.decode(plaintext);
    result = messages.CommandResult.decode(response.result);
  } catch {
    throw new ForeignAnswer("the response does not authenticate under this request's key");
  }
  if (response.requestId !== request.requestId) throw new IntegrityError("the response answers another request");
  const receipt = response.receipt ?? null;
  const accepted = outcome.accepted === true;
  if (receipt !== null) {
    checkReceipt(receipt, request, response.result, outcome, { query });
  } else if (accepted || (query && result.error == null)) {
    throw new IntegrityError("the enclave's answer lacks its signed receipt, yet the host says it was accepted");
  }
  return answerOf(request, result, receipt, accepted);
}

// Whether two kept calls are the same call (veil/sdk/calls.py `PendingCall.same_call`): another
// call that took the same request id is never this one, whatever its counter.
const sameCall = (a, b) => a === b || (a.instanceId === b.instanceId && a.account === b.account && same(a.callBytes, b.callBytes));

// The enclave's answer to `sent`, one of a call's `attempts` (veil/sdk/client.py
// `_open_call_answer`). Every sealing of a call goes out under the call's request id, so the mesh
// may answer with what it recorded for an earlier sealing (the one that ran), or join `sent` to
// one still in flight. Accepted, an earlier sealing's answer is the call's (its signed receipt
// names that sealing's command); anything else it says of an earlier sealing says nothing of
// `sent`: null (ambiguous). ForeignAnswer when no sealing opens it.
export function openCallAnswer(outcome, sent, attempts) {
  try {
    return openOutcome(outcome, sent);
  } catch (error) {
    if (!(error instanceof ForeignAnswer)) throw error;
    for (const other of attempts) {
      if (other === sent) continue;
      let opened;
      try {
        opened = openOutcome(outcome, other);
      } catch (again) {
        if (again instanceof ForeignAnswer) continue;
        throw again;
      }
      return opened.accepted ? opened : null;
    }
    throw error;
  }
}

// An opened answer as `execute` returns it.
function answerOf(request, result, receipt, accepted) {
  return {
    requestId: request.requestId,
    counter: request.counter,
    accepted,
    sequence: receipt !== null ? receipt.sequence.toString() : "0",
    message: result,
    result: toResult(result),
    receipt: receipt && {
      sequence: receipt.sequence.toString(),
      signature: Buffer.from(receipt.signature).toString("hex"),
      commandHash: Buffer.from(receipt.commandHash).toString("hex"),
      resultHash: Buffer.from(receipt.resultHash).toString("hex"),
    },
    resultLost: false,
  };
}

// The answer the enclave kept with the counter for `ran`, the sealing that used it
// (veil/sdk/client.py `_kept_answer`): when its receipt verifies under the key that signed
// `sealed`'s answer (the enclave re-signs it), else null.
function keptAnswer(state, ran, sealed) {
  if (!state.lastReceipt || !state.lastResult?.length) return null;
  const resultBytes = Buffer.from(state.lastResult);
  try {
    const outcome = { accepted: true, sequence: state.lastSequence.toString() };
    checkReceipt(state.lastReceipt, { ...ran, signingKey: sealed.signingKey }, resultBytes, outcome, { query: false });
    return answerOf(ran, messages.CommandResult.decode(resultBytes), state.lastReceipt, true);
  } catch {
    return null; // unverifiable or undecodable: the mesh's records, or ResultLost
  }
}

function checkReceipt(receipt, request, resultBytes, outcome, { query }) {
  let signed;
  try {
    signed = receiptSigningBytes({
      kind: receipt.kind,
      instanceId: receipt.instanceId,
      sequence: receipt.sequence.toString(),
      commandHash: receipt.commandHash,
      resultHash: receipt.resultHash,
    });
  } catch {
    signed = null;
  }
  if (signed === null || !verifyEd25519(request.signingKey, receipt.signature, signed)) throw new IntegrityError("the receipt's signature is not the attested enclave's");
  if (receipt.instanceId !== request.instanceId) throw new IntegrityError("the receipt is for another instance");
  if (!same(receipt.commandHash, request.commandHash)) throw new IntegrityError("the receipt is for another command");
  if (!same(receipt.resultHash, sha256(resultBytes))) throw new IntegrityError("the receipt is for another result");
  const kind = messages.ReceiptKind.values[query ? "RECEIPT_KIND_QUERY" : "RECEIPT_KIND_COMMAND"];
  if (receipt.kind !== kind) throw new IntegrityError("the receipt is of the wrong kind");
  if (query) return;
  if (outcome.accepted !== true) throw new IntegrityError("the enclave signed a receipt for this command, yet the host says it was not accepted");
  if (receipt.sequence.toString() !== String(outcome.sequence)) throw new IntegrityError("the receipt's sequence does not match the committed outcome");
}

// --- calls a request id may resume ------------------------------------------------------------------

// In memory, for this client object (the newest MAX_REMEMBERED_CALLS).
export class MemoryCalls {
  constructor() {
    this.states = new Map();
  }

  get(requestId) {
    return this.states.get(requestId);
  }

  // Past MAX_REMEMBERED_CALLS the oldest *settled* calls go; an unsettled one never does (its
  // sealing may still run).
  put(state) {
    this.states.delete(state.requestId);
    this.states.set(state.requestId, state);
    let excess = this.states.size - MAX_REMEMBERED_CALLS;
    for (const [requestId, kept] of this.states) {
      if (excess <= 0) break;
      if (kept.answer === null) continue;
      this.states.delete(requestId);
      excess -= 1;
    }
  }

  delete(requestId) {
    this.states.delete(requestId);
  }

  // One client object: its own per-account turns suffice.
  async lock() {
    return () => {};
  }

  // The kept calls of one account that were sent without a definitive answer, lowest counter first.
  pending(instanceId, account) {
    return [...this.states.values()]
      .filter((s) => s.instanceId === instanceId && s.account === account && s.answer === null && s.attempts.length)
      .sort((a, b) => a.counter - b.counter);
  }
}

const hexOf = (bytes) => Buffer.from(bytes ?? []).toString("hex");
const bytesOf = (text) => Buffer.from(String(text ?? ""), "hex");

// One file per call in `directory` (mode 0600: a call keeps its response key, which opens the
// enclave's answer), so another process can resume it: `transfer.mjs --request-id`.
export class FileCalls {
  // `alsoPending`: other clients' stores on the same data dir (the Python SDK's `calls/` next to
  // this one by default, same format): their unsettled calls hold counters too.
  constructor(directory, { alsoPending } = {}) {
    this.directory = directory;
    this.alsoPending = alsoPending ?? [path.join(path.dirname(directory), "calls")];
  }

  file(requestId) {
    return path.join(this.directory, `${sha256(Buffer.from(requestId, "utf8")).toString("hex")}.json`);
  }

  get(requestId) {
    let document;
    try {
      document = JSON.parse(readFileSync(this.file(requestId), "utf8"));
    } catch (error) {
      if (error.code === "ENOENT") return undefined;
      throw new InputError(`the call journal ${this.file(requestId)} is unreadable (${error.code ?? error.message}); nothing was sent`);
    }
    try {
      return FileCalls.parse(document, requestId);
    } catch {
      throw new InputError(`the call journal ${this.file(requestId)} is malformed; nothing was sent`);
    }
  }

  put(state) {
    mkdirSync(this.directory, { recursive: true, mode: 0o700 });
    replaceFile(this.file(state.requestId), JSON.stringify(FileCalls.render(state)), { durable: true, mode: 0o600 });
  }

  delete(requestId) {
    rmSync(this.file(requestId), { force: true });
  }

  // Whether another client's store on the same data dir keeps a call by this id.
  keptElsewhere(requestId) {
    const name = path.basename(this.file(requestId));
    return this.alsoPending.some((directory) => existsSync(path.join(directory, name)));
  }

  // Hold one account's calls against other processes (proper-lockfile: a lock directory whose
  // mtime its holder refreshes; one not refreshed for LOCK_STALE_MS, its holder dead or stopped,
  // is taken over). Waits up to `waitMs`, then InputError (nothing sent).
  async lock(instanceId, account, waitMs) {
    mkdirSync(this.directory, { recursive: true, mode: 0o700 });
    const name = path.join(this.directory, sha256(Buffer.from(`${instanceId}\0${account}`, "utf8")).toString("hex"));
    const tries = Math.max(1, Math.ceil(waitMs / LOCK_POLL_MS));
    try {
      return await lockfile.lock(name, {
        realpath: false,
        lockfilePath: `${name}.lock`,
        stale: LOCK_STALE_MS,
        retries: { retries: tries, factor: 1, minTimeout: LOCK_POLL_MS, maxTimeout: LOCK_POLL_MS },
        onCompromised: () => {}, // taken over after a stall: the calls it kept on disk still hold
      });
    } catch (error) {
      if (error.code !== "ELOCKED") throw error;
      throw new InputError(`another process has held this account's calls (${name}.lock) for over ${waitMs / 1000} s; nothing was sent`);
    }
  }

  // The kept calls of one account that were sent without a definitive answer, lowest counter
  // first (an unreadable file is skipped: this only names calls to resume).
  pending(instanceId, account) {
    const files = [];
    for (const directory of [this.directory, ...this.alsoPending]) {
      try {
        for (const name of readdirSync(directory)) if (/^[0-9a-f]{64}\.json$/.test(name)) files.push(path.join(directory, name));
      } catch {
        // no such store
      }
    }
    const found = [];
    for (const file of files) {
      try {
        const document = JSON.parse(readFileSync(file, "utf8"));
        const state = FileCalls.parse(document, String(document.request_id));
        if (state.instanceId === instanceId && state.account === account && state.answer === null && state.attempts.length) found.push(state);
      } catch {
        // not a call this client can read
      }
    }
    return found.sort((a, b) => a.counter - b.counter);
  }

  static render(state) {
    const answer = state.answer;
    return {
      request_id: state.requestId,
      explicit: state.explicit,
      instance_id: state.instanceId,
      account: state.account,
      call: hexOf(state.callBytes),
      counter: state.counter,
      ambiguous: state.ambiguous,
      attempts: state.attempts.map((a) => ({
        request_id: a.requestId,
        counter: a.counter,
        response_key: hexOf(a.responseKey),
        signing_key: hexOf(a.signingKey),
        suite: a.command.suite,
        encapsulated_key: hexOf(a.command.encapsulated_key),
        ciphertext: hexOf(a.command.ciphertext),
      })),
      answer: answer && {
        request_id: answer.requestId,
        counter: answer.counter,
        accepted: answer.accepted,
        sequence: answer.sequence,
        result: hexOf(messages.CommandResult.encode(answer.message).finish()),
        receipt: answer.receipt,
        result_lost: answer.resultLost,
      },
    };
  }

  static parse(document, requestId) {
    if (document.request_id !== requestId) throw new Error("another call");
    const attempts = document.attempts.map((a) => {
      const command = { suite: a.suite, encapsulated_key: bytesOf(a.encapsulated_key), ciphertext: bytesOf(a.ciphertext) };
      return {
        instanceId: document.instance_id,
        requestId: String(a.request_id),
        counter: Number(a.counter),
        responseKey: bytesOf(a.response_key),
        signingKey: bytesOf(a.signing_key),
        command,
        commandHash: commandHash(command.encapsulated_key, command.ciphertext),
      };
    });
    const saved = document.answer;
    let answer = null;
    if (saved) {
      const message = messages.CommandResult.decode(bytesOf(saved.result));
      answer = {
        requestId: String(saved.request_id),
        counter: Number(saved.counter),
        accepted: saved.accepted === true,
        sequence: String(saved.sequence),
        message,
        result: toResult(message),
        receipt: saved.receipt ?? null,
        resultLost: saved.result_lost === true,
      };
    }
    return {
      requestId,
      explicit: document.explicit === true,
      instanceId: String(document.instance_id),
      account: String(document.account),
      callBytes: bytesOf(document.call),
      counter: Number(document.counter),
      ambiguous: document.ambiguous === true,
      attempts,
      answer,
    };
  }
}

// --- client -----------------------------------------------------------------------------------

const MAX_ROUNDS = 6; // sealings of one call: re-attestations and counter resynchronisations
const MAX_BACKOFF_MS = 1000;
const MAX_RETRY_HINT_MS = 5000;
const RETRYABLE = new Set([grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED]);
// The state service's reason for a command its enclave could not open (sealed to keys it no
// longer has). The host can claim it of a command that ran, so it makes an attempt ambiguous.
const UNOPENABLE = "COMMAND_UNOPENABLE";
// Refusals before running that the command's own bytes decide (the app's call, the proof), when
// the enclave does not say the sealing may run later: that sealing can never run.
// A read-only method of each app, sent as a *command* only to use up a counter that a call refused
// for good left unused below later sealings (any answer uses it, an app refusal included).
const GAP_FILLERS = {
  APP_KIND_TOKEN: { token: { balance: {} } },
  APP_KIND_VAULT: { vault: { get: {} } },
  APP_KIND_BALLOT: { ballot: { info: {} } },
};
// What a kept call is, for comparing the store's copy with this process's: its counter, whether
// it is settled, and its sealings.
const fingerprintOf = (state) =>
  `${state.counter}/${state.answer ? "settled" : ""}/${state.attempts.map((a) => a.commandHash.toString("hex")).sort().join(",")}`;
const FILLER_BYTES = new Set(Object.values(GAP_FILLERS).map((call) => hexOf(Buffer.from(messages.AppCall.encode(messages.AppCall.fromObject(call)).finish()))));
const FINAL_REFUSALS = new Set(["ECALL_ERROR_CODE_INVALID_ARGUMENT", "ECALL_ERROR_CODE_UNIMPLEMENTED", "ECALL_ERROR_CODE_UNAUTHENTICATED"]);

const MAX_REMEMBERED_CALLS = 1024;
const LOCK_POLL_MS = 50;
const LOCK_STALE_MS = 10000; // proper-lockfile's holder refreshes its lock every half of this
export const MAX_BATCH = 256; // commands per ExecuteBatch (the gateway's cap)
// A batched call whose counter another command used: sealed again after the rest of its batch.
class Restart extends Error {}
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export class VeilNodeClient {
  // `serverName` overrides the name checked in the gateway's certificate (and sent as SNI),
  // e.g. "localhost" when dialling 127.0.0.1. `policy` is a Policy or its JSON object,
  // `rootPem` the pinned SGX root; `counters`/`pins` default to memory-only / none.
  // `calls` keeps the calls a request id may resume (MemoryCalls by default; FileCalls lets
  // another process resume them).
  constructor(
    address,
    caPem,
    { serverName, policy, rootPem, counters = new MemoryCounters(), pins = new InstancePins(), calls = new MemoryCalls(), timeoutMs = 15000, clock = () => new Date(), maxRequestBytes = MAX_REQUEST_BYTES } = {},
  ) {
    const GatewayService = gatewayService();
    const options = serverName ? { "grpc.ssl_target_name_override": serverName, "grpc.default_authority": serverName } : {};
    parseAddress(address);
    this.address = address;
    this.stub = new GatewayService(address, grpc.credentials.createSsl(caPem), options);
    this.policy = Policy.from(policy);
    this.rootPem = rootPem;
    this.counters = counters;
    this.pins = pins;
    this.timeoutMs = timeoutMs;
    this.maxRequestBytes = maxRequestBytes; // a larger sealed command is refused unsent (RequestTooLarge)
    this.clock = clock;
    this.accountTurns = new Map(); // instance NUL account -> the promise the next call of it waits for
    this.prefix = randomBytes(12).toString("hex");
    this.attestations = new Map();
    this.described = new Map();
    this.calls = calls; // request id -> a call without a definitive answer, or one named by the caller
  }

  close() {
    this.stub.close();
  }

  // Resolves once a TLS connection to the gateway is up; GatewayUnreachable, naming the address
  // and the last connection error, after `timeoutMs`: a mesh that is down fails fast.
  async ready(timeoutMs = 3000) {
    const deadline = new Date(Date.now() + timeoutMs);
    const failed = await new Promise((resolve) => this.stub.waitForReady(deadline, (error) => resolve(error ?? null)));
    if (!failed) return;
    // The channel keeps why it failed; an RPC on it reports that at once.
    let reason = "";
    try {
      await this.unaryOnce("GetAttestation", { instance_id: "" }, 500);
      return;
    } catch (error) {
      reason = String(error?.details ?? "")
        .replace(/^No connection established\. Last error: (\w*Error( \[\w+\])?: )?/, "")
        .replace(/\.? ?Resolution note:.*$/, "")
        .trim();
    }
    // The channel's reason can be vague ("Failed to connect"): a bare TCP connection tells a
    // mesh that is down from a port that is not the gateway's public one.
    const { host, port } = parseAddress(this.address);
    const tcp = await tcpProbe(host, port, 1000);
    if (!reason || /^Failed to connect/.test(reason)) reason = tcp ?? ""; // the timestamped generic one says nothing
    throw new GatewayUnreachable(this.address, timeoutMs, reason, { listening: tcp === null });
  }

  // Token calls on `instanceId` as `identity` (see TokenClient).
  token(instanceId, identity) {
    return new TokenClient(this, instanceId, identity);
  }

  newRequestId() {
    return `${this.prefix}-${randomBytes(12).toString("hex")}`;
  }

  // `sealed`, or RequestTooLarge when the gateway would refuse it unread (nothing of it kept or
  // sent; a call whose earlier sealing went stays kept, to be resumed by its request id).
  sendable(sealed, state = null) {
    const size = executeRequestBytes(sealed);
    if (size > this.maxRequestBytes) throw new RequestTooLarge(size, this.maxRequestBytes, { earlierSent: Boolean(state?.attempts.length) });
    return sealed;
  }

  unaryOnce(method, request, timeoutMs) {
    return new Promise((resolve, reject) => {
      // Empty metadata: nothing the host could replay to the enclave (rule 7 above).
      this.stub[method](request, new grpc.Metadata(), { deadline: new Date(Date.now() + timeoutMs) }, (error, reply) => (error ? reject(error) : resolve(reply)));
    });
  }

  // One RPC within the timeout, the same request retried on transient failures (the gateway
  // and the state host deduplicate a repeated request_id); GatewayError otherwise.
  async call(method, request) {
    const deadline = Date.now() + this.timeoutMs;
    for (let attempt = 0; ; attempt += 1) {
      try {
        return await this.unaryOnce(method, request, Math.max(deadline - Date.now(), 10));
      } catch (error) {
        if (error?.code === undefined) throw error;
        const failure = new GatewayError(error);
        const hint = failure.code === grpc.status.RESOURCE_EXHAUSTED ? failure.retryDelayMs : null;
        const retryable = RETRYABLE.has(failure.code) || (hint !== null && hint <= MAX_RETRY_HINT_MS);
        const delay = hint ?? Math.min(MAX_BACKOFF_MS, 100 * 2 ** attempt);
        const slice = Math.min(MAX_BACKOFF_MS, this.timeoutMs / 4);
        if (!retryable || Date.now() + delay + slice >= deadline) throw failure;
        await sleep(delay);
      }
    }
  }

  // The verified attestation of the enclave hosting `instanceId`, with its descriptor.
  async attest(instanceId, { refresh = false } = {}) {
    const cached = this.attestations.get(instanceId);
    if (cached && !refresh && this.clock().getTime() / 1000 < cached.expires) return cached;
    const bundle = await this.call("GetAttestation", { instance_id: instanceId });
    const verified = await verifyBundle(bundle, this.policy, this.rootPem, { now: this.clock(), instanceId });
    if (verified.descriptor) {
      this.pins.check(verified.descriptor);
      // Within one client an instance id keeps naming the same instance.
      const before = this.described.get(instanceId);
      const now = `${verified.descriptor.genesisHash.toString("hex")}/${verified.descriptor.configHash.toString("hex")}`;
      if (before !== undefined && before !== now) throw new AttestationError(`instance ${JSON.stringify(instanceId)} is not the one attested before (its genesis or configuration changed)`);
      this.described.set(instanceId, now);
    }
    this.attestations.set(instanceId, verified);
    return verified;
  }

  // One Execute of a sealing, byte for byte under its own request id (retried as `call` retries).
  executeSealed(sealed) {
    return this.call("Execute", { instance_id: sealed.instanceId, request_id: sealed.requestId, command: sealed.command });
  }

  // The enclave's verified answer to one sealing of a call (or the call's answer the mesh
  // recorded for another of its `attempts`); null when the attempt is ambiguous (the host says
  // the enclave could not open it, which it could say of a command that ran).
  async send(sealed, state) {
    const callId = state.requestId;
    let reply;
    try {
      reply = await this.executeSealed(sealed);
    } catch (error) {
      if (error instanceof GatewayError && error.code === grpc.status.INVALID_ARGUMENT && error.reason === UNOPENABLE) return null;
      if (error instanceof GatewayError && RETRYABLE.has(error.code)) {
        throw new NoAnswer(
          `${sealed.instanceId}: no answer to the command (${error.message}); it may have run: retry with the same request id ` +
            `(${callId}) to resume it, never as a new call`,
        );
      }
      throw error;
    }
    try {
      try {
        return openCallAnswer(reply.outcome, sealed, state.attempts);
      } catch (error) {
        if (!(error instanceof ForeignAnswer)) throw error;
        // Perhaps the answer of a sealing another process made of this call (after taking a
        // stalled lock over): its sealings from the calls store, then the answer once more.
        this.mergeKept(state);
        return openCallAnswer(reply.outcome, sealed, state.attempts);
      }
    } catch (error) {
      // An unsealed refusal ("could not open it", "over the memory budget") is the host's word,
      // which it can give for a command that ran: ambiguous, so only the same counter again.
      if (error instanceof CommandRefused) return null;
      throw error;
    }
  }

  // Run one command (an AppCall object) as `identity` and return its verified answer (an app
  // refusal is in `result.error`). Runs it at most once whatever the gateway or the host does
  // (veil/sdk/client.py `execute`): after an ambiguous attempt the call is sealed again only under
  // the same counter, and the enclave's typed counter state says whether a sealing of it ran.
  //
  // `requestId` names the call (1 to 64 printable ASCII characters; a fresh one by default).
  // When a call fails without a definitive answer (NoAnswer after UNAVAILABLE, or any error
  // thrown once something was sent), the error's `requestId` names it: calling again with that
  // id resumes the same call (its very same sealed bytes first, then only its counter) instead
  // of sealing a second one, so a retry can never pay twice. Called again after an answer, the same id gets
  // the same answer without sending anything. Calls are remembered by this client object.
  async execute(instanceId, call, identity, { requestId } = {}) {
    return this.exclusive(instanceId, identity.account, () => this.executeAlone(instanceId, call, identity, requestId));
  }

  // One call (or batch) of an account at a time: in this process (a promise chain per account)
  // and, with FileCalls, against other processes on the same data dir (a lock file): two
  // resumptions of one call must each see the other's sealings (veil/sdk/calls.py `locked`).
  async exclusive(instanceId, account, work) {
    const key = `${instanceId}\0${account}`;
    const before = this.accountTurns.get(key) ?? Promise.resolve();
    let done;
    const turn = before.then(() => new Promise((resolve) => (done = resolve)));
    this.accountTurns.set(key, turn);
    await before;
    try {
      const unlock = await this.calls.lock(instanceId, account, 4 * this.timeoutMs);
      try {
        return await work();
      } finally {
        // A lock taken over after a stall rejects its release: the work is done either way.
        await Promise.resolve()
          .then(() => unlock()) // no argument: proper-lockfile's release takes an optional callback
          .catch(() => {});
      }
    } finally {
      done();
      if (this.accountTurns.get(key) === turn) this.accountTurns.delete(key);
    }
  }

  async executeAlone(instanceId, call, identity, requestId) {
    const account = identity.account;
    if (requestId !== undefined && requestId !== null) checkRequestId(requestId);
    const callBytes = Buffer.from(messages.AppCall.encode(messages.AppCall.fromObject(call)).finish());
    let state = requestId ? this.calls.get(requestId) : undefined;
    if (state !== undefined) state.stored = fingerprintOf(state);
    if (state === undefined && requestId) this.notKeptElsewhere(requestId);
    if (state !== undefined) {
      if (state.instanceId !== instanceId || state.account !== account || !state.callBytes.equals(callBytes)) {
        throw new InputError(`request id ${JSON.stringify(requestId)} already names another call; nothing was sent`);
      }
      if (state.answer !== null) return state.answer;
      state.explicit = true; // named by the caller now: its answer is kept for the next retry
    } else {
      state = {
        requestId: requestId || this.newRequestId(),
        explicit: Boolean(requestId),
        instanceId,
        account,
        callBytes,
        counter: this.nextCounter(instanceId, account),
        attempts: [], // sealings of this call under `counter`
        ambiguous: false,
        answer: null,
      };
    }
    try {
      const opened = await this.run(state, call, identity);
      this.settled(state, opened);
      if (!opened.accepted) await this.fillGap(state, identity);
      return opened;
    } catch (error) {
      if (state.attempts.length) {
        // Something was sent without a definitive answer: a retry under this id resumes it.
        if (this.store(state) && error instanceof VeilError) error.requestId = state.requestId;
      } else if (this.ownsId(state)) {
        this.calls.delete(state.requestId); // nothing sent, or nothing that can run: a retry starts afresh
      }
      throw error;
    }
  }

  // For a batched call (executeMany): `first` is the batch's verified answer to its first
  // sealing (judged without sending anything; null: none, resend), `siblings` the hex hashes of
  // the batch's other sealings, and `batched` throws Restart instead of taking another counter.
  async run(state, call, identity, { first, siblings = new Set(), batched = false } = {}) {
    const { instanceId, account } = state;
    for (let round = 0; round < MAX_ROUNDS; round += 1) {
      let sealed;
      let fresh = false;
      let opened;
      if (round === 0 && first) {
        sealed = state.attempts[0];
        opened = first;
      } else if (round === 0 && state.attempts.length) {
        // Resuming: the very same bytes first (the mesh may hold their answer), and the call
        // counts as possibly run.
        sealed = state.attempts[0];
        state.ambiguous = true;
      } else {
        const attestation = await this.attest(instanceId, { refresh: round > 0 && state.ambiguous });
        // Every sealing under the call's request id: the mesh records the one that ran.
        sealed = this.sendable(await sealCommand(attestation, { instanceId, identity, call, counter: state.counter, requestId: state.requestId }), state);
        state.attempts.push(sealed);
        try {
          this.kept([state]); // the mark raised and the call kept before it is sent
        } catch (error) {
          state.attempts.pop(); // never sent
          if (!state.attempts.length) this.unsent([state]);
          throw error;
        }
        fresh = true;
      }
      if (opened === undefined) {
        try {
          opened = await this.send(sealed, state);
        } catch (error) {
          if (error instanceof ForeignAnswer) return this.foreignAnswer(state, identity, error);
          if (error instanceof GatewayError && error.code === grpc.status.RESOURCE_EXHAUSTED && error.reason === "MESSAGE_TOO_LARGE") {
            // Refused unread, and every resend is the same bytes: use the counter up, so no
            // sealing of the call the host may hold can run, and drop the call.
            return this.foreignAnswer(state, identity, new RequestTooLarge(executeRequestBytes(sealed), null, { sent: true }));
          }
          throw error;
        }
      }
      if (opened === null) {
        state.ambiguous = true; // the host may say so of a command that ran: same counter only
        continue;
      }
      if (opened.accepted) {
        this.record(instanceId, account, state.counter);
        return opened;
      }
      if (codeName(opened.message.error?.code ?? 0) !== "ECALL_ERROR_CODE_ABORTED") {
        if (this.refused(state, sealed, opened, { fresh: fresh || (round === 0 && Boolean(first)) })) return opened;
        continue;
      }
      const counterState = this.counterState(instanceId, account, opened, state, { siblings, fresh });
      if (counterState.tooEarly) {
        // The counter before this call's is not used yet (an earlier sealing of this client is
        // not settled: a batch or a call that ended without a definitive answer, or an earlier
        // command of its batch refused before running): this sealing stays valid under its
        // counter and may still run, so the call never takes another counter.
        state.ambiguous = true;
        if (!fresh) continue; // an answer from before the counter moved (reordered, or cached)
        // No kept call may use the counter it waits for (one refused for good, a filler that did
        // not run, a crash before one): use it up, then this call again under its own counter.
        const gap = counterState.nextCounter;
        const open = !FILLER_BYTES.has(hexOf(state.callBytes)) && !this.waiting(state).some((c) => c.counter === gap);
        if (open && (await this.fill(instanceId, account, gap, identity))) continue;
        throw this.counterGap(state, gap);
      }
      if (counterState.ran) return this.ran(state, counterState, sealed); // a sealing of this call used the counter: never again
      // The counter is used by another command and none of this call's sealings used it: it can
      // never run under it, so it is sealed again under the next counter, above every counter
      // this client has sealed (the high-water mark).
      this.record(instanceId, account, counterState.nextCounter - 1);
      if (batched) throw new Restart();
      state.counter = this.nextCounter(instanceId, account);
      state.attempts = [];
      state.ambiguous = false;
    }
    if (state.ambiguous) {
      // Every answer since the last definitive one was ambiguous: any of those sealings (all
      // under `counter`) may have run, or may still run if the host holds one.
      throw new OutcomeUnknown(
        `${instanceId}: ${state.attempts.length} attempts under counter ${state.counter} got no definitive answer (the gateway says ` +
          "the enclave could not open them); one may have run: check the state before sending it again",
      );
    }
    throw new CommandRefused("ECALL_ERROR_CODE_ABORTED", "could not agree on a counter with the enclave");
  }

  // A call refused for good left its counter unused, and this client sealed above it (the later
  // calls of a batch, or unsettled ones), whose sealings wait for that counter: use it up now
  // (`fill`); if that fails, the next call answered "too early" fills it.
  async fillGap(state, identity) {
    if (this.counters.sealed(state.instanceId, state.account) > state.counter) await this.fill(state.instanceId, state.account, state.counter, identity);
  }

  // Use `counter` up with the app's read-only call sent as a command (veil/sdk/client.py
  // `_fill`); whether it is used. Only for a counter no kept call of this client may still use:
  // then no sealing can run twice for it (another device's sealing under it is refused naming
  // the filler, which proves it never ran). A filler is never kept: run later, it only uses its
  // counter.
  async fill(instanceId, account, counter, identity) {
    let call;
    try {
      call = GAP_FILLERS[messages.AppKind.valuesById[(await this.attest(instanceId)).descriptor?.config?.app]];
    } catch (error) {
      if (error instanceof VeilError) return false; // nothing is sent now; the waiting calls say so
      throw error;
    }
    if (!call) return false;
    const callBytes = Buffer.from(messages.AppCall.encode(messages.AppCall.fromObject(call)).finish());
    const fill = { requestId: this.newRequestId(), explicit: false, instanceId, account, callBytes, counter, attempts: [], ambiguous: false, answer: null };
    try {
      return (await this.run(fill, call, identity, { batched: true })).accepted;
    } catch (error) {
      // Another command used it (or, after a foreign answer, a second filler): used all the same.
      if (error instanceof Restart || error instanceof ForeignAnswer) return true;
      if (error instanceof RequestTooLarge && error.sent) return true; // "too large" (a lie: a filler is small), then used up
      if (error instanceof VeilError) return false;
      throw error;
    } finally {
      this.calls.delete(fill.requestId);
    }
  }

  // The answer of a call one of whose sealings used its counter (the enclave's `judged` counter
  // state says so; veil/sdk/client.py `_ran`): the one the enclave kept with the counter, checked
  // under `sealed`'s attested key, or, failing that, the mesh's record.
  ran(state, judged, sealed) {
    this.record(state.instanceId, state.account, state.counter);
    return keptAnswer(judged.kept, judged.ran, sealed) ?? this.recordedAnswer(state.attempts, judged.lastSequence);
  }

  // The mesh answered the call's request id with what none of its sealings opens (its record of
  // a sealing this client does not hold; veil/sdk/client.py `_foreign_answer`). No sealing of the
  // call ran through that request, but each stays valid in the host's hands under the call's
  // counter, and later calls would wait for it: use the counter up with the app's read-only
  // filler. Returns the call's answer when the enclave says one of its sealings used the counter
  // after all (a host that ran it under another id); throws `failure` with the call's sealings
  // dropped once the counter is used, or NotSettledYet (the call kept) when it cannot be used now.
  async foreignAnswer(state, identity, failure) {
    const { instanceId, account } = state;
    const cause = failure.refusal ?? failure.message; // why it is kept if the counter cannot be used up
    let sealed;
    let filled;
    try {
      const attestation = await this.attest(instanceId);
      const call = GAP_FILLERS[messages.AppKind.valuesById[attestation.descriptor?.config?.app]];
      if (!call) throw failure;
      sealed = await sealCommand(attestation, { instanceId, identity, call, counter: state.counter, requestId: this.newRequestId() });
      filled = openOutcome((await this.executeSealed(sealed)).outcome, sealed);
    } catch (error) {
      if (error instanceof VeilError) throw new NotSettledYet(instanceId, state.requestId, cause); // the call is kept
      throw error;
    }
    if (filled.accepted) {
      this.record(instanceId, account, state.counter);
    } else if (codeName(filled.message.error?.code ?? 0) !== "ECALL_ERROR_CODE_ABORTED") {
      throw new NotSettledYet(instanceId, state.requestId, cause); // refused for now (a budget, a clock): the call is kept
    } else {
      const judged = this.counterState(instanceId, account, filled, state);
      if (judged.ran) return this.ran(state, judged, sealed); // a sealing of this call used the counter after all
      if (judged.tooEarly) throw new NotSettledYet(instanceId, state.requestId, cause); // an earlier counter is still open: kept, it waits
      this.record(instanceId, account, judged.nextCounter - 1);
    }
    state.attempts = []; // none of them can run any more: nothing later waits for the call
    throw failure;
  }

  // Judge a sealed refusal before running, not a counter refusal (veil/sdk/client.py `_refused`):
  // true when the call is refused for good; false to seal it again under the same counter;
  // throws to leave it unsettled. `fresh`: `sealed` was sealed for this attempt.
  refused(state, sealed, opened, { fresh }) {
    const refusal = opened.message.error ?? { code: 0, message: "" };
    const code = codeName(refusal.code);
    if (opened.message.mayRunLater || !FINAL_REFUSALS.has(code)) {
      // Refused for now by what the host controls (its budget, its clock): this sealing stays
      // valid in its hands and may run later, so the call is never taken as refused. A kept
      // sealing resent earns one fresh sealing under the same counter (a renewed token).
      state.ambiguous = true;
      if (fresh) throw new NotRunYet(state.instanceId, state.requestId, code, refusal.message);
      return false;
    }
    // Refused for good: this sealing can never run. So is the call once none of its sealings
    // can (an earlier one, sent without a definitive answer, still may).
    state.attempts = state.attempts.filter((a) => !same(a.commandHash, sealed.commandHash));
    if (!state.attempts.length) return true;
    this.store(state);
    throw new OutcomeUnknown(
      `${state.instanceId}: the enclave refused this call's latest sealing (${code}: ${refusal.message}), but an earlier ` +
        "sealing of it, sent without a definitive answer, may still run; resume it with its request id to settle that one",
    );
  }

  // Judge a "wrong counter" answer (veil/sdk/client.py `_counter_state`): whether this call ran,
  // may have, or never can; throws when following it could roll back or run the call twice.
  counterState(instanceId, account, opened, call, { siblings = new Set(), fresh = true } = {}) {
    const { counter, attempts, ambiguous } = call;
    const state = opened.message.counter;
    const next = state ? Number(state.nextCounter.toString()) : 0;
    if (!state || !Number.isSafeInteger(next) || next < 1) throw new IntegrityError(`${instanceId}: the enclave refused the counter without its state`);
    const used = next - 1;
    const lastCommandHash = Buffer.from(state.lastCommandHash ?? []);
    const lastSequence = state.lastSequence.toString();
    if (used === counter && !attempts.some((a) => same(a.commandHash, lastCommandHash))) this.mergeKept(call);
    const ran = used === counter ? attempts.find((a) => same(a.commandHash, lastCommandHash)) : undefined;
    if (ran) return { ran, kept: state, nextCounter: next, lastSequence };
    // Too early, in an answer that may predate counters accepted since (a batch's, or a resent
    // sealing's answered from a cache): it proves no rollback; `run` seals again under the same
    // counter and judges that answer.
    if (!fresh && used < counter) return { tooEarly: true, nextCounter: next, lastSequence };
    const last = this.counters.last(instanceId, account);
    if (used < last) {
      // The enclave forgot commands it acknowledged to us: its log was rolled back (a host
      // restoring an old database). Never follow it there.
      throw new IntegrityError(
        `${instanceId}: the enclave asks for counter ${next}, but counter ${last} was already accepted: its log was rolled back`,
      );
    }
    if (used > counter && siblings.has(lastCommandHash.toString("hex"))) {
      // Moved on by this client's own later commands of the batch, which could run only after
      // this call's counter was used: perhaps by this call (the enclave names only the last).
      throw new OutcomeUnknown(
        `${instanceId}: the account's counter moved from ${counter} to ${used} by later commands of the same batch; ` +
          "the client cannot prove whether this one ran and does not send it again",
      );
    }
    if (used > counter) {
      // A genuine refusal proves only that *this delivery* did not run. The enclave names the
      // last command only: this call may have used its own counter before the later ones (a
      // host that ran it, then a sealing it held, then replayed it to get this refusal). Only
      // `used === counter` with another command's hash proves it never ran.
      this.record(instanceId, account, used); // the account's counter, for the next call
      throw new OutcomeUnknown(
        `${instanceId}: the account's counter moved from ${counter} to ${used}${ambiguous ? " after an ambiguous attempt" : ""}, ` +
          "and the enclave names only the command that used the last one: this command may have run under its own counter " +
          "before them, so the client does not send it again (check the state)",
      );
    }
    // The counter before this call's is not used yet: an earlier sealing (this client's, not
    // settled) may still run, and so may this one; nothing is sealed under another counter.
    if (used < counter) return { tooEarly: true, nextCounter: next, lastSequence };
    return { ran: false, nextCounter: next, lastSequence };
  }

  // Remember `counter` as used, never moving the cache back (a batch settles out of order).
  record(instanceId, account, counter) {
    if (counter > this.counters.last(instanceId, account)) this.counters.record(instanceId, account, counter);
  }

  // A new call's counter: above the last accepted one and above every counter this client sealed
  // (the high-water mark), whose sealing the host may still hold and run.
  nextCounter(instanceId, account) {
    return Math.max(this.counters.last(instanceId, account), this.counters.sealed(instanceId, account)) + 1;
  }

  // Before anything is sent: raise the high-water mark (durably), then keep each call resumable.
  kept(states) {
    if (!states.length) return;
    const { instanceId, account } = states[0];
    this.counters.seal(instanceId, account, Math.max(...states.map((s) => s.counter)));
    for (const state of states) {
      this.assertUnchanged(state); // then written at once: nothing else runs in between here
      this.store(state);
    }
  }

  // Calls whose only sealings were never sent (keeping one was refused): out of the store (their
  // own entries only) and below the high-water mark again (veil/sdk/client.py `_unsent`).
  unsent(states) {
    for (const state of states) {
      state.attempts = [];
      if (this.ownsId(state)) this.calls.delete(state.requestId);
    }
    for (const state of [...states].sort((a, b) => b.counter - a.counter)) this.counters.unseal(state.instanceId, state.account, state.counter);
  }

  // Keep a call in the store, remembering what this process wrote (see `assertUnchanged`);
  // whether it was kept (never over another call's entry under the same id).
  store(state) {
    if (!this.ownsId(state)) return false;
    this.calls.put(state);
    state.stored = fingerprintOf(state);
    return true;
  }

  // Before a new sealing of a call is kept (and so sent): the store must hold the call exactly as
  // this process last read or wrote it. Another process can change it only after taking this
  // one's lock over (a stall past proper-lockfile's 10 s); sealing from a stale copy could run the
  // call twice and would overwrite the other's sealings (outside reviews 5 and 6).
  assertUnchanged(state) {
    let current;
    try {
      current = this.calls.get(state.requestId);
    } catch {
      current = undefined;
    }
    if (current === state) return; // MemoryCalls: this very object
    if ((current ? fingerprintOf(current) : null) === (state.stored ?? null)) return;
    if (current && !sameCall(current, state)) {
      throw new InputError(`request id ${JSON.stringify(state.requestId)} names another call (kept meanwhile by another process); this one was not sent`);
    }
    throw new OutcomeUnknown(
      `${state.instanceId}: another process took this call over (request id ${state.requestId}) while this one stalled; ` +
        "this one stops: resume the call with its request id",
    );
  }

  // A definitive answer: the call leaves the calls store (kept with its answer when the caller
  // named it, so the same id gets the same answer). Refused before running, its counter is
  // unused and none of its sealings can run: when nothing was sealed above it, the next call
  // may take that counter.
  settled(state, opened) {
    state.answer = opened;
    if (!opened.accepted) this.counters.unseal(state.instanceId, state.account, state.counter);
    if (!this.ownsId(state)) return; // another call holds the id: never overwritten, never deleted
    if (state.explicit) this.store(state);
    else this.calls.delete(state.requestId);
  }

  // Whether the calls store holds no other call under `state`'s request id (two calls that took
  // one id at once: the other is never deleted from under its owner).
  ownsId(state) {
    let stored;
    try {
      stored = this.calls.get(state.requestId);
    } catch {
      return false;
    }
    return !stored || sameCall(stored, state);
  }

  // Add the sealings the calls store holds for this call under its counter (another process may
  // have resumed it meanwhile, e.g. after taking over a stalled holder's lock), so "used by another
  // command" is never said of them (veil/sdk/client.py `_merge_kept`).
  mergeKept(state) {
    let stored;
    try {
      stored = this.calls.get(state.requestId);
    } catch {
      return;
    }
    if (!stored || stored === state || stored.counter !== state.counter) return;
    if (!sameCall(stored, state)) return; // another call under the same id (the store is keyed by id)
    for (const attempt of stored.attempts) {
      if (!state.attempts.some((a) => same(a.commandHash, attempt.commandHash))) state.attempts.push(attempt);
    }
  }

  // A request id the other client keeps on this data dir (the Python SDK's calls/) names its call:
  // resumed here it would be a new call, and could use up the counter that one holds.
  notKeptElsewhere(requestId) {
    if (this.calls.keptElsewhere?.(requestId)) {
      throw new InputError(`request id ${JSON.stringify(requestId)} names a call the Python SDK keeps on this data dir (calls/): resume it there; nothing was sent`);
    }
  }

  // The kept calls `state` waits for: this account's, under lower counters (a filler a crashed
  // process left behind is none: it only uses its counter).
  waiting(state) {
    return this.calls
      .pending(state.instanceId, state.account)
      .filter((c) => c.counter < state.counter && c.requestId !== state.requestId && !FILLER_BYTES.has(hexOf(c.callBytes)));
  }

  // The error for a fresh sealing the enclave finds too early: the calls it waits for.
  counterGap(state, nextCounter) {
    const ids = this.waiting(state).map((c) => c.requestId);
    const resume = ids.length
      ? `resume the unsettled calls first (request ids ${ids.join(", ")}), then this one`
      : "an earlier sealing of this account (refused before running, or kept by another process or data dir) must be settled first, then resume this one";
    return new CounterGap(
      `${state.instanceId}: not run so far: the enclave waits for counter ${nextCounter} before this command's ${state.counter}; ` +
        `${resume} (request id ${state.requestId}). Its sealing stays valid and runs once the counters before it are used, ` +
        "so the client never seals it under another counter",
      ids,
    );
  }

  // Run up to MAX_BATCH commands (AppCall objects) of `identity` on one instance in one
  // ExecuteBatch call (veil/sdk/client.py `execute_many`). Resolves to one entry per call, in
  // order: `{ answer }` (what `execute` resolves to) or `{ error }` (what it throws; an error
  // with a `requestId` resumes that call through `execute` or here). The commands take the
  // account's next counters in the order given and run in it; what the batch did not settle is
  // settled one call at a time, in counter order, through `execute`'s recovery (`run`): each
  // call runs at most once. `requestIds` names the calls as `execute`'s `requestId` does.
  async executeMany(instanceId, calls, identity, { requestIds } = {}) {
    return this.exclusive(instanceId, identity.account, () => this.executeManyAlone(instanceId, calls, identity, requestIds));
  }

  async executeManyAlone(instanceId, calls, identity, requestIds) {
    if (!Array.isArray(calls) || calls.length < 1 || calls.length > MAX_BATCH) throw new InputError(`a batch holds 1 to ${MAX_BATCH} calls`);
    const ids = requestIds ?? calls.map(() => undefined);
    const named = ids.filter(Boolean);
    if (ids.length !== calls.length || new Set(named).size !== named.length) throw new InputError("requestIds must name each call once");
    named.forEach(checkRequestId);
    const account = identity.account;
    const results = new Array(calls.length).fill(null);
    const states = new Map(); // index -> call state (execute's)
    const callBytes = calls.map((call) => Buffer.from(messages.AppCall.encode(messages.AppCall.fromObject(call)).finish()));
    calls.forEach((_, index) => {
      const earlier = ids[index] ? this.calls.get(ids[index]) : undefined;
      if (earlier !== undefined) earlier.stored = fingerprintOf(earlier);
      if (earlier === undefined && ids[index]) this.notKeptElsewhere(ids[index]);
      if (earlier === undefined) return;
      if (earlier.instanceId !== instanceId || earlier.account !== account || !earlier.callBytes.equals(callBytes[index])) {
        throw new InputError(`request id ${JSON.stringify(ids[index])} already names another call; nothing was sent`);
      }
      if (earlier.answer !== null) results[index] = { answer: earlier.answer };
      else {
        earlier.explicit = true;
        earlier.ambiguous = true; // resumed: its earlier attempt may have run, same counter only
        states.set(index, earlier);
      }
    });
    let counter = Math.max(this.nextCounter(instanceId, account) - 1, ...[...states.values()].map((s) => s.counter));
    calls.forEach((_, index) => {
      if (results[index] !== null || states.has(index)) return;
      counter += 1;
      states.set(index, {
        requestId: ids[index] || this.newRequestId(),
        explicit: Boolean(ids[index]),
        instanceId,
        account,
        callBytes: callBytes[index],
        counter,
        attempts: [],
        ambiguous: false,
        answer: null,
      });
    });
    const order = [...states.keys()].sort((a, b) => states.get(a).counter - states.get(b).counter);
    const firsts = await this.sendBatch(instanceId, order.map((i) => [states.get(i), calls[i]]), identity);
    const siblingsOf = (index) => new Set([...states].filter(([i]) => i !== index).flatMap(([, s]) => s.attempts.map((a) => a.commandHash.toString("hex"))));
    let stopped = null;
    let gap = null;
    const restarts = [];
    const settle = async (index, first, batched) => {
      const state = states.get(index);
      try {
        if (gap !== null && !(first && !(first instanceof Error) && first.accepted)) {
          // An earlier call of the batch waits for unsettled calls before it: so does this one
          // (its sealing stays valid: never sealed again, not even resent now).
          throw new CounterGap(`${instanceId}: not run so far: an earlier command of the batch waits for unsettled calls (${gap.message})`, [
            ...gap.waitingFor,
            gap.requestId,
          ]);
        }
        if (stopped !== null && !(first && !(first instanceof Error) && first.accepted)) {
          // An earlier call has no definitive answer: this one waits for it (resume both).
          throw new NoAnswer(`${instanceId}: not settled: an earlier command of the batch has no definitive answer (${stopped.message})`);
        }
        if (first instanceof Error) throw first;
        const opened = await this.run(state, calls[index], identity, { first, siblings: siblingsOf(index), batched });
        this.settled(state, opened);
        results[index] = { answer: opened };
        if (!opened.accepted) await this.fillGap(state, identity); // the later calls wait for its counter
      } catch (error) {
        if (error instanceof Restart) {
          restarts.push(index);
          return;
        }
        if (state.attempts.length) {
          // Something was sent without a definitive answer: resumable.
          if (this.store(state) && error instanceof VeilError) error.requestId = state.requestId;
        } else if (this.ownsId(state)) {
          this.calls.delete(state.requestId); // none of its sealings can run (a foreign answer)
        }
        if (error instanceof CounterGap || error instanceof NotRunYet) gap ??= error; // later calls wait for it
        else if (error instanceof GatewayError || error instanceof NoAnswer) stopped ??= error;
        if (!(error instanceof VeilError)) throw error;
        results[index] = { error };
      }
    };
    for (const [position, index] of order.entries()) await settle(index, firsts[position], true);
    for (const index of restarts) {
      const state = states.get(index);
      state.counter = Math.max(this.nextCounter(instanceId, account), ...[...states.values()].map((s) => s.counter + 1));
      state.attempts = [];
      state.ambiguous = false;
      await settle(index, null, false);
    }
    return results;
  }

  // Seal what is new and send everything in one ExecuteBatch, in counter order; one judged
  // answer per call: the verified answer, null when there is none to judge (lost, transient,
  // or the host's unsealed word: `run` resends it), or the error `execute` would throw.
  async sendBatch(instanceId, items, identity) {
    const attestation = await this.attest(instanceId);
    const fresh = [];
    try {
      for (const [state, call] of items) {
        if (state.attempts.length) continue;
        state.attempts.push(this.sendable(await sealCommand(attestation, { instanceId, identity, call, counter: state.counter, requestId: state.requestId })));
        fresh.push(state);
      }
    } catch (error) {
      for (const state of fresh) state.attempts = []; // none of the batch was kept or sent
      throw error;
    }
    try {
      this.kept(fresh); // the mark raised and every call kept before anything is sent
    } catch (error) {
      this.unsent(fresh);
      throw error;
    }
    const commands = items.map(([state]) => ({ instance_id: instanceId, request_id: state.attempts[0].requestId, command: state.attempts[0].command }));
    const answers = new Map();
    await new Promise((resolve) => {
      const stream = this.stub.ExecuteBatch({ commands }, new grpc.Metadata(), { deadline: new Date(Date.now() + this.timeoutMs) });
      stream.on("data", (item) => {
        if (!answers.has(item.index)) answers.set(item.index, item);
      });
      stream.on("error", () => resolve()); // what it did not answer is resent one by one
      stream.on("end", () => resolve());
    });
    return items.map(([state], position) => {
      const item = answers.get(position);
      if (!item) return null;
      if (item.result === "response") {
        try {
          return openCallAnswer(item.response.outcome, state.attempts[0], state.attempts);
        } catch (error) {
          // The host's word, or an answer no sealing of the call opens: ambiguous here; `run`
          // resends the call alone and settles a foreign answer there (`foreignAnswer`).
          if (error instanceof CommandRefused || error instanceof ForeignAnswer) return null;
          return error;
        }
      }
      const status = rpc.lookupType("google.rpc.Status").decode(Buffer.from(item.status));
      const metadata = new grpc.Metadata();
      metadata.set("grpc-status-details-bin", Buffer.from(item.status));
      const failure = new GatewayError({ code: status.code, details: status.message, metadata });
      const hint = failure.code === grpc.status.RESOURCE_EXHAUSTED ? failure.retryDelayMs : null;
      if (RETRYABLE.has(failure.code) || hint !== null || failure.reason === UNOPENABLE) return null; // `run` retries it
      return failure;
    });
  }

  // The answer of the attempt that ran, from the mesh's idempotency records if it kept it:
  // a sealing is sent again, byte for byte, once per request id (a call's sealings share one,
  // except those kept from before they did).
  async recordedAnswer(attempts, sequence) {
    const asked = new Set();
    for (const sealed of attempts.slice().reverse()) {
      if (asked.has(sealed.requestId)) continue;
      asked.add(sealed.requestId);
      let opened;
      try {
        opened = openCallAnswer((await this.executeSealed(sealed)).outcome, sealed, attempts);
      } catch (error) {
        if (error instanceof VeilError) continue;
        throw error;
      }
      if (opened?.accepted && opened.sequence === String(sequence)) return opened;
    }
    return {
      requestId: attempts[0].requestId,
      counter: attempts[0].counter,
      accepted: true,
      sequence: String(sequence),
      message: messages.CommandResult.create(),
      result: {},
      receipt: null,
      resultLost: true,
    };
  }
}

// --- apps (veil/sdk/apps.py) --------------------------------------------------------------------

// Token calls as one identity on one instance. The amount and the recipient are checked before
// anything is sealed (the recipient against the auth scheme the enclave signed for the
// instance); an enclave refusal throws CommandRefused, an answer lost after the command ran
// ResultLost. `last` keeps the verified answer (counter, log sequence, receipt).
export class TokenClient {
  constructor(client, instanceId, identity) {
    this.client = client;
    this.instanceId = instanceId;
    this.identity = identity;
    this.last = null;
  }

  get account() {
    return this.identity.account;
  }

  // Create tokens for `to` (issuer only); resolves to the new total supply (a bigint).
  // `requestId`: see VeilNodeClient.execute (the same id again never mints twice).
  mint(to, amount, { requestId } = {}) {
    return this.run("mint", to, amount, requestId);
  }

  // Move tokens to `to`; resolves to this identity's balance afterwards (a bigint).
  // `requestId`: see VeilNodeClient.execute (the same id again never pays twice).
  transfer(to, amount, { requestId } = {}) {
    return this.run("transfer", to, amount, requestId);
  }

  // Many transfers ([{ to, amount }]) in one ExecuteBatch (at most MAX_BATCH), run in order:
  // resolves to one `{ balance, opened }` or `{ error }` each (what `transfer` would resolve to
  // or throw). Every recipient and amount is checked before anything is sent.
  async transferMany(transfers, { requestIds } = {}) {
    const attestation = await this.client.attest(this.instanceId);
    if (!attestation.descriptor) throw new AttestationError(`the enclave did not describe instance ${JSON.stringify(this.instanceId)}`);
    const calls = transfers.map(({ to, amount }) => {
      const value = checkAmount(amount);
      checkRecipient(attestation.descriptor.config.authScheme, to);
      return { token: { transfer: { to, amount: value } } };
    });
    const results = await this.client.executeMany(this.instanceId, calls, this.identity, { requestIds });
    return results.map(({ answer, error }) => {
      if (error) return { error };
      try {
        return { balance: this.read("transfer", answer), opened: answer };
      } catch (refused) {
        if (!(refused instanceof VeilError)) throw refused;
        return { error: refused, opened: answer };
      }
    });
  }

  async run(method, to, amount, requestId) {
    const value = checkAmount(amount);
    const attestation = await this.client.attest(this.instanceId);
    if (!attestation.descriptor) throw new AttestationError(`the enclave did not describe instance ${JSON.stringify(this.instanceId)}`);
    checkRecipient(attestation.descriptor.config.authScheme, to);
    if (requestId !== undefined && requestId !== null) checkRequestId(requestId);
    const opened = await this.client.execute(this.instanceId, { token: { [method]: { to, amount: value } } }, this.identity, { requestId });
    return this.read(method, opened);
  }

  // The app's answer to a verified `opened` (kept in `last`): the amount, or what it throws.
  read(method, opened) {
    this.last = opened;
    if (opened.resultLost) throw new ResultLost(this.instanceId, opened.sequence);
    const { error, result } = opened.message;
    if (error) throw new CommandRefused(codeName(error.code), error.message ?? "", opened.receipt);
    // A decoded oneof names its member; a zero amount is absent on the wire, so read the message.
    if (result?.result !== "token" || result.token.method !== method) {
      throw new IntegrityError(`the enclave answered a token.${method} call with another result`);
    }
    return BigInt(result.token[method].amount.toString());
  }
}

// Run directly, the library says what it is: the command is transfer.mjs.
if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const help = process.argv.slice(2).every((arg) => arg === "-h" || arg === "--help");
  (help ? process.stdout : process.stderr).write(
    `${help ? "" : "error: "}veil-client.mjs is the Veil Node.js client library (import it); the command is transfer.mjs: node transfer.mjs --help\n`,
  );
  process.exit(help ? 0 : 2);
}
