// Class 5: tag the call with a header on the 200 OK, answer, then hang up.
async function main(data, ctx) {
  ctx.header("X-Call-Tag", "vip-" + data.from_user);
  ctx.header("Via", "not allowed"); // core-owned headers are dropped, not duplicated
  await ctx.answer();
  await ctx.hangup();
}
