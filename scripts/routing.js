// Class 4 least-cost routing: keep the carriers that serve the dialled prefix and are up,
// cheapest first; randomise the presented CLI from a pool; refuse calls outside opening hours.
//
// Input (ConnexCS shape): data.routing = {cli, dest_number, account_id, egress_routing: [...]},
// each egress entry {gw: {<gateway id>: {cli}}, prefixes: [...], cost, available, headers}.
// Vars (routing.toml beside this file): [schedule] open/close hours, [cli] pool.

function withinHours(schedule, now) {
  if (!schedule) return true;
  const hour = now.getUTCHours();
  return hour >= schedule.open && hour < schedule.close;
}

function pickCli(pool, fallback) {
  if (!pool || pool.length === 0) return fallback;
  return pool[Math.floor(Math.random() * pool.length)];
}

function main(data) {
  const routing = data.routing;
  const now = data.now ? new Date(data.now) : new Date();
  if (!withinHours(data.schedule, now)) {
    throw new Error("480 Outside opening hours");
  }
  const dest = String(routing.dest_number || "");
  const candidates = routing.egress_routing
    .filter((e) => e.available !== false)
    .filter((e) => (e.prefixes || [""]).some((p) => dest.startsWith(p)))
    .sort((a, b) => a.cost - b.cost);
  if (candidates.length === 0) {
    return Promise.reject([503, "No route for " + dest]);
  }
  const pool = data.cli && data.cli.pool;
  for (const e of candidates) {
    for (const id of Object.keys(e.gw)) {
      e.gw[id].cli = pickCli(pool, routing.cli);
    }
    e.headers = (e.headers || []).concat([{ key: "X-Route-Cost", value: String(e.cost) }]);
  }
  routing.egress_routing = candidates;
  return routing;
}
