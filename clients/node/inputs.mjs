// What a user or an application gives the Node client, checked before anything is loaded,
// fetched or sealed: recipients (identities, contacts, canonical accounts, as
// veil/sdk/contacts.py reads them), amounts, gateway addresses, request ids; and the error
// classes every module of the client shares. No dependencies, so a command refuses bad input
// in a fraction of the time it takes to load gRPC and the protos.

import { readdirSync, readFileSync } from "node:fs";
import path from "node:path";

export class VeilError extends Error {
  get name() {
    return this.constructor.name;
  }
}

// An identity cannot (or must not) prove itself to this instance; nothing was sent.
export class IdentityError extends VeilError {}

// A recipient that is neither a known identity or contact nor an account in canonical form.
export class UnknownRecipient extends IdentityError {}

// An argument the enclave could never accept as meant (an amount out of range, a malformed
// request id); nothing was sent.
export class InputError extends VeilError {}

// --- recipients (veil/sdk/contacts.py) ---------------------------------------------------------------

export const IDENTITIES_DIR = "identities";
export const CONTACTS_FILE = "contacts.json"; // <data_dir>/identities/contacts.json: {name: account}
export const ACCOUNT_HEX_CHARS = 64;
export const IDENTITY_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
export const INSTANCE_ID = /^[a-z0-9][a-z0-9-]{0,62}$/;
const CANONICAL_ACCOUNT = /^[0-9a-f]{64}$/;
export const MAX_ACCOUNT_CHARS = 256;

// 64 lowercase hex characters: the account of an Ed25519 key.
export function isCanonicalAccount(value) {
  return typeof value === "string" && CANONICAL_ACCOUNT.test(value);
}

// Every contact (name -> account), as `veil contact add` writes them; none without the file.
export function loadContacts(dataDir) {
  const file = path.join(dataDir, IDENTITIES_DIR, CONTACTS_FILE);
  let document;
  try {
    document = JSON.parse(readFileSync(file, "utf8"));
  } catch (error) {
    if (error.code === "ENOENT") return {};
    throw new IdentityError(`cannot read contacts ${file}: ${error.code ?? error.message}`);
  }
  const valid =
    document !== null && typeof document === "object" && !Array.isArray(document) && Object.values(document).every((v) => typeof v === "string");
  if (!valid) throw new IdentityError(`${file} is not a JSON object of name -> account`);
  return document;
}

function identityAccount(dataDir, name) {
  try {
    return readFileSync(path.join(dataDir, IDENTITIES_DIR, `${name}.pub`), "utf8").trim();
  } catch {
    return null;
  }
}

// The account `value` names, and the name it is known by: a local identity, then a contact,
// then an account in canonical form; UnknownRecipient for anything else (nothing is sent).
export function resolveRecipient(dataDir, value) {
  const text = String(value ?? "");
  if (IDENTITY_NAME.test(text)) {
    const own = identityAccount(dataDir, text);
    if (own !== null) return { name: text, account: own };
    const contacts = loadContacts(dataDir);
    if (Object.hasOwn(contacts, text)) return { name: text, account: contacts[text] };
  }
  if (isCanonicalAccount(text)) return { name: accountName(dataDir, text), account: text };
  throw new UnknownRecipient(
    `${JSON.stringify(text.slice(0, 80))} is not a known identity or contact, nor an account (${ACCOUNT_HEX_CHARS} lowercase ` +
      `hex characters); nothing was sent (add it with \`veil contact add NAME ACCOUNT\`)`,
  );
}

// The name an account is known by (identities before contacts), or null.
export function accountName(dataDir, account) {
  let names = [];
  try {
    names = readdirSync(path.join(dataDir, IDENTITIES_DIR)).filter((f) => f.endsWith(".pub")).sort();
  } catch {
    // No identities directory: no names.
  }
  for (const file of names) {
    const name = file.slice(0, -4);
    if (identityAccount(dataDir, name) === account) return name;
  }
  let contacts = {};
  try {
    contacts = loadContacts(dataDir);
  } catch {
    // An unreadable address book only costs the name.
  }
  return Object.keys(contacts).sort().find((name) => contacts[name] === account) ?? null;
}

export const MAX_UINT64 = (1n << 64n) - 1n;

// A token amount: a positive integer the enclave's uint64 holds exactly (never wrapped), as a
// decimal string; a number, bigint or decimal string in.
export function checkAmount(value) {
  let amount = null;
  if (typeof value === "bigint") amount = value;
  else if (typeof value === "number" && Number.isSafeInteger(value)) amount = BigInt(value);
  else if (typeof value === "string" && /^[0-9]{1,30}$/.test(value)) amount = BigInt(value);
  if (amount === null || amount < 1n || amount > MAX_UINT64) {
    throw new InputError(`the amount must be a whole number from 1 to ${MAX_UINT64}; nothing was sent`);
  }
  return amount.toString();
}

// HOST:PORT (a name, an IPv4 address or a bracketed IPv6 address; port 1-65535, decimal),
// checked before dialling: grpc-js would otherwise take port 99999 or a URL and fail obscurely.
export function parseAddress(text) {
  const match = /^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?):([0-9]{1,5})$/.exec(String(text ?? ""));
  const port = match ? Number(match[2]) : 0;
  if (!match || port < 1 || port > 65535) {
    throw new InputError(`${JSON.stringify(String(text ?? "").slice(0, 80))} is not a gateway address: HOST:PORT with a port from 1 to 65535`);
  }
  return { host: match[1], port };
}

const REQUEST_ID = /^[\x20-\x7e]{1,64}$/; // the gateway takes 1 to 64 printable characters

// A request id the gateway accepts, or InputError.
export function checkRequestId(requestId) {
  if (typeof requestId !== "string" || !REQUEST_ID.test(requestId)) {
    throw new InputError("a request id is 1 to 64 printable ASCII characters; nothing was sent");
  }
  return requestId;
}

// Why a file could not be read, in words ("no such file"), for the one-line errors.
export function whyUnreadable(error) {
  const words = { ENOENT: "no such file", EACCES: "permission denied", EISDIR: "a directory, not a file" };
  return words[error?.code] ?? error?.code ?? error?.message ?? String(error);
}
