// Class 5: send the caller DTMF "12#", then echo their audio back until they press a key,
// which is reported on the BYE (X-Echo-Digit).
async function main(data, ctx) {
  await ctx.answer();
  await ctx.sendDtmf("12#", { duration: 100 });
  const r = await ctx.echo(100);
  ctx.header("X-Echo-Digit", r.digit);
  await ctx.hangup();
}
