// Form: maintain the do-not-call list in the userspace table "dnc", which routing scripts
// read (dnc_check.js through api.lookup.tps with provider = "table", userspace = "dnc").
// Fields: action = "add" | "remove", number, reason (optional).
const userspace = require("cxUserspace");

export default async function (fields) {
  const number = String(fields.number || "").replace(/[^0-9]/g, "");
  if (number.length < 5) throw [400, "number is required (digits only, at least 5)"];
  if (fields.action === "add") {
    const existing = await userspace.read("dnc", number);
    if (existing) return { ok: true, number, added: false };
    await userspace.create("dnc", number, { reason: fields.reason || "requested", added: Date.now() });
    return { ok: true, number, added: true };
  }
  if (fields.action === "remove") {
    return { ok: true, number, removed: await userspace.delete("dnc", number) };
  }
  throw [400, "action must be add or remove"];
}
