// The smallest useful class4 script, for tests/load/compare_kamailio_redirect.sh: one
// carrier, hence one Contact, the same answer as Kamailio's trivial native redirect, but
// still a fresh sandboxed context per call.
function main(data) {
  data.routing.egress_routing = [{ gw: { alpha: {} } }];
  return data.routing;
}
