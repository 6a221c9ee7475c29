// Class 5: answer and stay on the line until the caller hangs up.
async function main(data, ctx) {
  await ctx.answer();
  const how = await ctx.waitForHangup();
  try {
    await ctx.answer(); // the caller is gone: this rejects with a Hangup error
  } catch (e) {
    ctx.log("after hang-up:", e.name, JSON.stringify(how));
  }
  // Asked again after the end, it still says who hung up.
  const again = await ctx.waitForHangup();
  ctx.log("waitForHangup after the end:", JSON.stringify(again));
}
