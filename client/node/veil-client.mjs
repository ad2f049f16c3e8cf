// A small Veil client for Node.js: the any-language proof of the public API.
//
// It speaks the gateway's gRPC API (@grpc/grpc-js + @grpc/proto-loader over ../../protos) and
// re-implements, from the documented byte formats in enclave/wire.py, what a client must do:
//
//   1. verify the enclave before sending anything:
//      - the DCAP v3 quote: PCK chain to the pinned SGX root, QE report signed by the PCK key,
//        QE report data binding the attestation key, ISV signature over header || body;
//      - report data = SHA-256(runtime_data || nonce) || 32 zero bytes;
//      - the keyvault's ES256 attestation token (jose) against the JWKS, its lifetime, and its
//        MAA-style claims against the quote, the bundle and the expected-measurement policy;
//      - the bundle's keys = the decoded runtime data, and the keyvault release key it binds is
//        the pinned one (policy.keyvault_release_key);
//   2. seal a command (HPKE base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM,
//      info "veil/command/v1", aad = instance id) with an Ed25519 signature proof;
//   3. open the AES-256-GCM response and verify the enclave's Ed25519 receipt.
//
// Any verification failure throws an AttestationError / IntegrityError and nothing is sent.

import { createHash, createPrivateKey, createPublicKey, randomBytes, sign, verify, X509Certificate, createDecipheriv } from "node:crypto";
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import { Aes128Gcm, CipherSuite, HkdfSha256 } from "@hpke/core";
import { DhkemX25519HkdfSha256 } from "@hpke/dhkem-x25519";
import { createLocalJWKSet, jwtVerify } from "jose";
import protobuf from "protobufjs";

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const PROTO_ROOT = path.resolve(HERE, "../../protos");

export class AttestationError extends Error {
  constructor(reason) {
    super(`attestation refused: ${reason}`);
    this.reason = reason;
  }
}

export class IntegrityError extends Error {}

export class CommandRefused extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
    this.reason = message;
  }
}

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
    EcallErrorCode: root.lookupEnum("veil.enclave.v1.EcallErrorCode"),
  };
}

export const messages = loadMessages();

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
  const out = Buffer.alloc(size);
  let v = BigInt(value);
  for (let i = size - 1; i >= 0; i -= 1) {
    out[i] = Number(v & 0xffn);
    v >>= 8n;
  }
  return out;
};
const prefixed = (data, size) => Buffer.concat([u(data.length, size), Buffer.from(data)]);
const str16 = (text) => prefixed(Buffer.from(text, "utf8"), 2);
const sha256 = (...parts) => createHash("sha256").update(Buffer.concat(parts.map((p) => Buffer.from(p)))).digest();

export const COMMAND_INFO = Buffer.from("veil/command/v1");

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
    Buffer.from(commandHash),
    Buffer.from(resultHash),
  ]);
}

export function responseAad(instanceId, requestId) {
  return Buffer.concat([Buffer.from("veil/response/v1"), str16(instanceId), str16(requestId)]);
}

// --- DCAP v3 quote ----------------------------------------------------------------------------

const HEADER = 48;
const BODY = 384;

function p1363Verify(publicKey, data, signature) {
  return verify("sha256", data, { key: publicKey, dsaEncoding: "ieee-p1363" }, signature);
}

function rawP256Key(raw) {
  return createPublicKey({
    key: { kty: "EC", crv: "P-256", x: raw.subarray(0, 32).toString("base64url"), y: raw.subarray(32, 64).toString("base64url") },
    format: "jwk",
  });
}

export function parseQuote(quote) {
  const q = Buffer.from(quote);
  if (q.length < HEADER + BODY + 4 || q.readUInt16LE(0) !== 3) throw new AttestationError("quote: not a DCAP v3 quote");
  const body = q.subarray(HEADER, HEADER + BODY);
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
  const qeReport = take(BODY);
  const qeReportSignature = take(64);
  const qeAuthData = take(take(2).readUInt16LE(0));
  const certType = take(2).readUInt16LE(0);
  const certData = take(take(4).readUInt32LE(0));
  if (offset !== sig.length || certType !== 5) throw new AttestationError("quote: unexpected certification data");
  return {
    signed: q.subarray(0, HEADER + BODY),
    attributes: body.subarray(48, 64),
    mrenclave: body.subarray(64, 96),
    mrsigner: body.subarray(128, 160),
    isvProdId: body.readUInt16LE(256),
    isvSvn: body.readUInt16LE(258),
    reportData: body.subarray(320, 384),
    isvSignature,
    attestationKey,
    qeReport,
    qeReportSignature,
    qeAuthData,
    pckChain: certData.toString("utf8"),
  };
}

function pemCertificates(pem) {
  return (pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) || []).map((c) => new X509Certificate(c));
}

export function verifyQuote(quoteBytes, rootPem, now = new Date()) {
  const quote = parseQuote(quoteBytes);
  const chain = pemCertificates(quote.pckChain);
  if (chain.length !== 3) throw new AttestationError("quote: the PCK chain must be leaf, CA and root");
  const [leaf, ca, root] = chain;
  const pinned = createPublicKey(new X509Certificate(rootPem).publicKey.export({ format: "pem", type: "spki" }));
  const samePinned = root.publicKey.export({ format: "der", type: "spki" }).equals(pinned.export({ format: "der", type: "spki" }));
  if (!samePinned) throw new AttestationError("quote: the PCK chain does not end at the pinned root");
  for (const [child, parent] of [[leaf, ca], [ca, root], [root, root]]) {
    if (!child.checkIssued(parent) || !child.verify(parent.publicKey)) throw new AttestationError("quote: PCK chain signature invalid");
    if (now < new Date(child.validFrom) || now > new Date(child.validTo)) throw new AttestationError("quote: PCK certificate not valid now");
  }
  if (!p1363Verify(leaf.publicKey, quote.qeReport, quote.qeReportSignature)) throw new AttestationError("quote: QE report signature invalid");
  const binding = sha256(quote.attestationKey, quote.qeAuthData);
  if (!quote.qeReport.subarray(320, 352).equals(binding)) throw new AttestationError("quote: QE report does not bind the attestation key");
  if (!p1363Verify(rawP256Key(quote.attestationKey), quote.signed, quote.isvSignature)) throw new AttestationError("quote: ISV signature invalid");
  return quote;
}

// --- attestation --------------------------------------------------------------------------------

const DEBUG_ATTRIBUTE = 0x02;

export async function verifyBundle(bundle, policy, rootPem, { now = new Date() } = {}) {
  const quote = verifyQuote(bundle.quote, rootPem, now);
  const expected = Buffer.concat([sha256(bundle.runtime_data, bundle.nonce), Buffer.alloc(32)]);
  if (!quote.reportData.equals(expected)) throw new AttestationError("quote report data is not SHA-256(runtime data || nonce)");

  const jwks = policy.jwks ?? JSON.parse(bundle.jwks_json);
  let claims;
  try {
    ({ payload: claims } = await jwtVerify(bundle.attestation_token, createLocalJWKSet(jwks), {
      algorithms: ["ES256"],
      issuer: policy.issuer ?? undefined,
      currentDate: now,
      clockTolerance: 30,
      requiredClaims: ["exp", "iat", "iss", "nonce", "x-ms-sgx-ehd", "x-ms-sgx-mrenclave", "x-ms-sgx-tcb-status"],
    }));
  } catch (error) {
    throw new AttestationError(`token: ${error.message}`);
  }
  const agree = [
    ["x-ms-sgx-mrenclave", quote.mrenclave.toString("hex")],
    ["x-ms-sgx-mrsigner", quote.mrsigner.toString("hex")],
    ["x-ms-sgx-product-id", quote.isvProdId],
    ["x-ms-sgx-svn", quote.isvSvn],
    ["x-ms-sgx-is-debuggable", (quote.attributes[0] & DEBUG_ATTRIBUTE) !== 0],
    ["x-ms-sgx-report-data", quote.reportData.toString("hex")],
    ["x-ms-sgx-ehd", Buffer.from(bundle.runtime_data).toString("base64url")],
    ["nonce", Buffer.from(bundle.nonce).toString("base64url")],
  ];
  for (const [claim, value] of agree) {
    if (claims[claim] !== value) throw new AttestationError(`token claim ${claim} disagrees with the quote or bundle`);
  }
  const mrenclave = claims["x-ms-sgx-mrenclave"];
  if ((policy.mrenclave ?? []).length && !policy.mrenclave.includes(mrenclave)) {
    throw new AttestationError(`MRENCLAVE ${mrenclave} is not an expected measurement`);
  }
  if (policy.mrsigner && claims["x-ms-sgx-mrsigner"] !== policy.mrsigner) throw new AttestationError("MRSIGNER is not the expected signer");
  if (policy.product_id != null && claims["x-ms-sgx-product-id"] !== policy.product_id) throw new AttestationError("product id mismatch");
  if (policy.min_svn != null && claims["x-ms-sgx-svn"] < policy.min_svn) throw new AttestationError("SVN below the minimum");
  if (claims["x-ms-sgx-is-debuggable"] && !policy.allow_debug) throw new AttestationError("the enclave is debuggable");
  const accepted = policy.accepted_tcb_statuses ?? ["UpToDate", "SWHardeningNeeded"];
  if (!accepted.includes(claims["x-ms-sgx-tcb-status"])) throw new AttestationError(`TCB status ${claims["x-ms-sgx-tcb-status"]} is not accepted`);

  const decoded = messages.EnclavePublicKeys.decode(bundle.runtime_data);
  const keys = bundle.keys;
  for (const field of ["hpke_x25519_public_key", "signing_public_key"]) {
    const camel = field.replace(/_([a-z0-9])/g, (_m, c) => c.toUpperCase());
    if (!Buffer.from(decoded[camel]).equals(Buffer.from(keys[field]))) throw new AttestationError("the bundle's keys are not the attested runtime data");
  }
  // The enclave accepts data keys only from the keyvault release key it binds here; a client
  // that did not pin that key could be talking to an enclave fed keys the host knows.
  if (!policy.keyvault_release_key) throw new AttestationError("the policy pins no keyvault release key");
  const pinned = Buffer.from(policy.keyvault_release_key, "hex");
  if (!Buffer.from(decoded.keyvaultReleasePublicKey ?? []).equals(pinned)) {
    throw new AttestationError("the enclave accepts keys from another keyvault than the pinned one");
  }
  return {
    keys: { hpke: Buffer.from(keys.hpke_x25519_public_key), signing: Buffer.from(keys.signing_public_key) },
    mrenclave,
    tcbStatus: claims["x-ms-sgx-tcb-status"],
    expires: claims.exp,
    instance: bundle.instance,
  };
}

// --- client -----------------------------------------------------------------------------------

const HPKE = new CipherSuite({ kem: new DhkemX25519HkdfSha256(), kdf: new HkdfSha256(), aead: new Aes128Gcm() });
const X25519_SUITE = 1;
const RECEIPT_KIND_COMMAND = 1;

function unary(client, method, request, metadata = new grpc.Metadata(), timeoutMs = 15000) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: new Date(Date.now() + timeoutMs) }, (error, reply) => (error ? reject(error) : resolve(reply)));
  });
}

export class VeilNodeClient {
  // `serverName` overrides the name checked in the gateway's certificate (and sent as SNI),
  // e.g. "localhost" when dialling 127.0.0.1.
  constructor(address, caPem, { serverName } = {}) {
    const GatewayService = gatewayService();
    const options = serverName ? { "grpc.ssl_target_name_override": serverName, "grpc.default_authority": serverName } : {};
    this.stub = new GatewayService(address, grpc.credentials.createSsl(caPem), options);
    this.prefix = randomBytes(12).toString("hex");
  }

  close() {
    this.stub.close();
  }

  async attest(instanceId, policy, rootPem) {
    const bundle = await unary(this.stub, "GetAttestation", { instance_id: instanceId });
    return verifyBundle(bundle, policy, rootPem);
  }

  // Seal `call` (an AppCall object) as `identity` ({privateKey, publicKey}) and run it.
  async execute(attestation, instanceId, call, identity, counter) {
    const requestId = `${this.prefix}-${randomBytes(12).toString("hex")}`;
    const responseKey = randomBytes(32);
    const callBytes = Buffer.from(messages.AppCall.encode(messages.AppCall.fromObject(call)).finish());
    const signature = sign(null, commandSigningBytes({ instanceId, counter, requestId, responseKey, call: callBytes }), identity.privateKey);
    const command = messages.Command.encode(
      messages.Command.fromObject({
        instanceId,
        counter: String(counter),
        requestId,
        responseKey,
        call: callBytes,
        auth: { signature: { publicKey: identity.publicKey, signature } },
      }),
    ).finish();
    const recipientPublicKey = await HPKE.kem.deserializePublicKey(attestation.keys.hpke);
    const sealed = await HPKE.seal({ recipientPublicKey, info: COMMAND_INFO }, command, Buffer.from(instanceId, "utf8"));
    const enc = Buffer.from(sealed.enc);
    const ciphertext = Buffer.from(sealed.ct);
    const reply = await unary(this.stub, "Execute", {
      instance_id: instanceId,
      request_id: requestId,
      command: { suite: X25519_SUITE, encapsulated_key: enc, ciphertext },
    });
    return openOutcome(reply.outcome, { instanceId, requestId, responseKey, commandHash: sha256(enc, ciphertext) }, attestation.keys.signing);
  }
}

export function openOutcome(outcome, request, signingKey) {
  if (!outcome.sealed_response || outcome.sealed_response.length === 0) {
    const code = outcome.error ? messages.EcallErrorCode.valuesById[outcome.error.code] : "UNKNOWN";
    throw new CommandRefused(code, outcome.error?.message ?? "no sealed response");
  }
  const blob = Buffer.from(outcome.sealed_response);
  let plaintext;
  try {
    const decipher = createDecipheriv("aes-256-gcm", request.responseKey, blob.subarray(0, 12));
    decipher.setAAD(responseAad(request.instanceId, request.requestId));
    decipher.setAuthTag(blob.subarray(blob.length - 16));
    plaintext = Buffer.concat([decipher.update(blob.subarray(12, blob.length - 16)), decipher.final()]);
  } catch {
    throw new IntegrityError("the response does not authenticate under this request's key");
  }
  const response = messages.CommandResponse.decode(plaintext);
  if (response.requestId !== request.requestId) throw new IntegrityError("the response answers another request");
  const result = messages.CommandResult.toObject(messages.CommandResult.decode(response.result), { longs: String, enums: String, defaults: false });
  const receipt = response.receipt;
  if (outcome.accepted) {
    if (!receipt) throw new IntegrityError("the committed answer lacks its receipt");
    const signed = receiptSigningBytes({
      kind: receipt.kind,
      instanceId: receipt.instanceId,
      sequence: receipt.sequence.toString(),
      commandHash: receipt.commandHash,
      resultHash: receipt.resultHash,
    });
    const publicKey = createPublicKey({ key: { kty: "OKP", crv: "Ed25519", x: signingKey.toString("base64url") }, format: "jwk" });
    if (!verify(null, signed, publicKey, Buffer.from(receipt.signature))) throw new IntegrityError("the receipt's signature is not the attested enclave's");
    if (receipt.kind !== RECEIPT_KIND_COMMAND || receipt.instanceId !== request.instanceId) throw new IntegrityError("the receipt is for something else");
    if (!Buffer.from(receipt.commandHash).equals(request.commandHash)) throw new IntegrityError("the receipt is for another command");
    if (!Buffer.from(receipt.resultHash).equals(sha256(response.result))) throw new IntegrityError("the receipt is for another result");
    if (receipt.sequence.toString() !== String(outcome.sequence)) throw new IntegrityError("the receipt's sequence does not match the outcome");
  }
  return {
    accepted: outcome.accepted,
    result,
    receipt: receipt && {
      sequence: receipt.sequence.toString(),
      signature: Buffer.from(receipt.signature).toString("hex"),
      commandHash: Buffer.from(receipt.commandHash).toString("hex"),
      resultHash: Buffer.from(receipt.resultHash).toString("hex"),
    },
  };
}

export function loadIdentity(keyFile) {
  const privateKey = createPrivateKey(readFileSync(keyFile));
  const publicKey = Buffer.from(createPublicKey(privateKey).export({ format: "jwk" }).x, "base64url");
  return { privateKey, publicKey, account: publicKey.toString("hex") };
}
