// Class 5: answer and play a long prompt; the caller hangs up in the middle of it. The
// play() promise must reject with an error named "Hangup" (it does not resolve "stopped"),
// and waitForHangup() afterwards says who hung up.
async function main(data, ctx) {
  await ctx.answer();
  try {
    const r = await ctx.play("ivr/menu.wav");
    ctx.log("play resolved:", JSON.stringify(r));
  } catch (e) {
    ctx.log("play rejected:", e.name);
  }
  const how = await ctx.waitForHangup();
  ctx.log("hung up by", how.by);
}
