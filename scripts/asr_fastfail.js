// Class 4: ASR-based fast fail. Destinations whose answer-seizure ratio (api.lookup.asrplus,
// configured as [lookup.asrplus]) is below asr.min are refused at once with 503 instead of
// ringing through every carrier; the rest route normally, cheapest carrier first.
async function main(data) {
  const routing = data.routing;
  const min = (data.asr && data.asr.min) || 10;
  const stats = await api.lookup.asrplus(String(routing.dest_number));
  if (typeof stats.asr === "number" && stats.asr < min) {
    throw [503, "Fast fail: ASR " + stats.asr + "% below " + min + "%"];
  }
  routing.egress_routing = (routing.egress_routing || []).slice().sort((a, b) => a.cost - b.cost);
  return routing;
}
