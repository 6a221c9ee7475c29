// Class 4: outbound honeypot. Numbers nobody legitimate calls (vars: honeypot.numbers) are
// fraud probes: each call to one counts against the account with kv.incr in a time window,
// and once an account reaches honeypot.max_attempts every call it makes is blocked with 603
// until the window ends.
const kv = require("cxKV");

async function main(data) {
  const routing = data.routing;
  const cfg = data.honeypot || {};
  const key = "honeypot:" + routing.account_id;
  const max = cfg.max_attempts || 3;
  let attempts = Number((await kv.get(key)) || 0);
  if ((cfg.numbers || []).includes(String(routing.dest_number))) {
    attempts = await kv.incr(key, 1, cfg.window_s || 3600);
    console.warn("honeypot call", routing.account_id, routing.dest_number, attempts);
  }
  if (attempts >= max) {
    throw [603, "Declined: account blocked after " + attempts + " honeypot calls"];
  }
  return routing;
}
