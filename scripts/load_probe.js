// Load test probe: answer and play an eight-second tone, so a probe caller can measure RTP
// pacing while the load runs. Driven by tests/load/sipp_ivr.sh.
async function main(data, ctx) {
  await ctx.answer();
  await ctx.play("tone:1000,8000");
  await ctx.hangup();
}
