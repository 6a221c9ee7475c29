// Class 4: reject calls to numbers on the do-not-call list with ConnexCS's 604.
// The list is whatever [lookup.tps] points at: a CSV file, an SQLite table, an HTTP API, or
// the userspace table "dnc" that dnc_form.js maintains (see README, "api.lookup").
async function main(data) {
  const dest = String(data.routing.dest_number || "");
  const tps = await api.lookup.tps(dest);
  if (tps.found) {
    console.log("DNC hit", dest);
    throw [604, "Number on DNC List"];
  }
  return data.routing;
}
