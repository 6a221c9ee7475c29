// DID driver: a small in-script inventory answering search/allocate/release/list.
// (A real driver calls a carrier's API with fetch; the shape of the answers is the same.)
const INVENTORY = [
  { did: "442071000001", city: "London", monthly: 1.5 },
  { did: "442071000002", city: "London", monthly: 1.5 },
  { did: "441614000003", city: "Manchester", monthly: 1.2 },
];

async function search({ number = "" } = {}) {
  return INVENTORY.filter((d) => d.did.startsWith(String(number)));
}

async function allocate({ did } = {}) {
  const found = INVENTORY.find((d) => d.did === did);
  if (!found) throw new Error("404 DID " + did + " is not in the inventory");
  return { did, status: "allocated" };
}

async function release({ did } = {}) {
  return { did, status: "released" };
}

function list() {
  return INVENTORY.map((d) => d.did);
}

// ConnexCS drivers export with this (misspelt) name too; both are accepted.
module.export = { search, allocate, release, list };
