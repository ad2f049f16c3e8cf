// The client policy file's JSON Schema, checked with Ajv: the same file the Python SDK ships
// (veil/sdk/policy.schema.json; docs/protocol.md section 2 describes every field). A document
// the schema refuses is refused with the field and the rule it breaks, before anything else.

import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import Ajv2020 from "ajv/dist/2020.js";

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const POLICY_SCHEMA_PATH = path.resolve(HERE, "../../veil/sdk/policy.schema.json");

export const policySchema = JSON.parse(readFileSync(POLICY_SCHEMA_PATH, "utf8"));
// allErrors off: the first refusal is the one reported; verbose: errors carry their subschema.
const validate = new Ajv2020({ strict: true, allErrors: false, verbose: true }).compile(policySchema);

const short = (value) => {
  const text = JSON.stringify(value) ?? String(value);
  return text.length <= 40 ? text : `${text.slice(0, 37)}...`;
};

// One refusal in the file's own terms: where, what, and the rule (the schema's description).
function describe(error) {
  const where = error.instancePath.replace(/^\//, "");
  if (!where && error.keyword === "anyOf") return "a policy must pin at least one MRENCLAVE or an MRSIGNER";
  if (!where && error.keyword === "type") return "the policy must be a JSON object";
  if (error.keyword === "additionalProperties") return `unknown key ${JSON.stringify(error.params.additionalProperty)}`;
  let message = ["oneOf", "anyOf"].includes(error.keyword) ? `${short(error.data)} is not valid` : error.message;
  const description = error.parentSchema !== policySchema ? error.parentSchema?.description : undefined;
  if (error.keyword === "required" && error.params?.missingProperty) message = `${JSON.stringify(error.params.missingProperty)} is required`;
  if (error.keyword === "enum") message += ` (${error.params.allowedValues.join(", ")})`;
  if (description) message += `: ${description}`;
  return where ? `${where}: ${message}` : message;
}

// JSON.parse keeps the last of duplicate members; a pinned policy must have one reading
// (docs/protocol.md section 10, as the Python SDK's strict_json_object): refuse duplicates.
// Returns the first duplicated member name, or null. `text` must already parse as JSON.
export function duplicateMember(text) {
  const objects = []; // one Set of member names per open object; null for an open array
  let expectKey = false;
  for (let i = 0; i < text.length; i += 1) {
    const c = text[i];
    if (c === '"') {
      let j = i + 1;
      while (text[j] !== '"') j += text[j] === "\\" ? 2 : 1;
      if (expectKey) {
        const name = JSON.parse(text.slice(i, j + 1));
        const members = objects[objects.length - 1];
        if (members.has(name)) return name;
        members.add(name);
        expectKey = false;
      }
      i = j;
    } else if (c === "{") {
      objects.push(new Set());
      expectKey = true;
    } else if (c === "[") {
      objects.push(null);
    } else if (c === "}" || c === "]") {
      objects.pop();
    } else if (c === ",") {
      expectKey = objects[objects.length - 1] instanceof Set;
    }
  }
  return null;
}

// Returns null for a document the schema admits, else the reason it is refused.
export function policySchemaError(document) {
  if (validate(document)) return null;
  return describe(validate.errors[0]);
}
