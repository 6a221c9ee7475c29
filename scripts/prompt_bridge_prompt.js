// Class 5: a prompt, a bridge to the destination in the X-Bridge-To header (or the route's
// `bridge_to` var, for phones that cannot add headers) that hands the caller back to the
// script when the far end hangs up (hangupAfterBridge: false), a closing prompt, then BYE.
// X-Bridge-Answer: "no" bridges before answering instead (the callee's answer answers the
// caller) and skips the first prompt.
async function main(data, ctx) {
  const early = ctx.header("X-Bridge-Answer") === "no";
  if (!early) {
    await ctx.answer();
    await ctx.play("ivr/welcome.wav");
  }
  const result = await ctx.bridge(ctx.header("X-Bridge-To") || data.bridge_to, {
    hangupAfterBridge: false,
    headers: { "X-Leg": "b" },
  });
  ctx.log("bridge", JSON.stringify(result));
  await ctx.play("ivr/goodbye.wav");
  await ctx.hangup();
  return result;
}
