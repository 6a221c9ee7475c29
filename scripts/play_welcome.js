// Class 5: play the welcome prompt, then stay on the line until the other side (or the API)
// hangs up. Used for originated calls.
async function main(data, ctx) {
  await ctx.answer();
  ctx.log("direction", data.direction, "campaign", data.campaign);
  await ctx.play("ivr/welcome.wav");
  await ctx.waitForHangup();
  return { direction: data.direction, campaign: data.campaign };
}
