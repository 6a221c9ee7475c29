// Class 5: wait for the caller to key a PIN ending in # (RegExp), giving up on * (quit) or
// after 10 s; report what happened on the BYE (X-Wait).
async function main(data, ctx) {
  await ctx.answer();
  ctx.blockDtmf("9");
  try {
    const keyed = await ctx.waitFor(/^[0-8]{4}#$/, (d) => d.includes("*"), 10000);
    ctx.header("X-Wait", "pin " + keyed);
  } catch (e) {
    ctx.header("X-Wait", e.name + " " + (e.digits || ""));
  }
  await ctx.hangup();
}
