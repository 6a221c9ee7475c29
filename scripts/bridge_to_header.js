// Class 5: bridge the caller to the destination named in its X-Bridge-To header.
// X-Bridge-Answer: "no" bridges before answering (the callee's answer answers the caller);
// X-Bridge-Timeout: ring timeout in seconds; X-Continue: "1" goes on after a failed attempt,
// then hangs up with the outcome in an X-Bridge header on the BYE.
async function main(data, ctx) {
  const to = ctx.header("X-Bridge-To");
  if (ctx.header("X-Bridge-Answer") !== "no") await ctx.answer();
  const keepGoing = ctx.header("X-Continue") === "1";
  const result = await ctx.bridge(to, {
    timeout: Number(ctx.header("X-Bridge-Timeout") || 20),
    continueOnFail: keepGoing,
    headers: { "X-Leg": "b" },
  });
  ctx.log("bridge", JSON.stringify(result));
  if (keepGoing && result.status !== "completed") {
    ctx.header("X-Bridge", result.status + "/" + result.sipCode);
    await ctx.hangup();
  }
  return result;
}
