// Class 5: collect up to 8 digits ended by #, and report them on the BYE (X-Digits, X-Status).
async function main(data, ctx) {
  await ctx.answer();
  const r = await ctx.collect({ max: 8, timeout: 5000, interDigitTimeout: 3000, terminators: "#" });
  ctx.header("X-Digits", r.value);
  ctx.header("X-Status", r.status);
  await ctx.hangup();
}
