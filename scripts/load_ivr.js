// Load test IVR: answer, play a 3-second prompt while collecting one digit, report it on the
// BYE (X-Digit), hang up. Driven by tests/load/sipp_ivr.sh.
async function main(data, ctx) {
  await ctx.answer();
  const r = await ctx.ivr("tone:440,3000", 5, 1, 1, "#");
  ctx.header("X-Digit", r.value || r.status);
  await ctx.hangup();
}
