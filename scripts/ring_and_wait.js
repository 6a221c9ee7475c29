// Class 5: ring (180) and never answer; a caller's CANCEL ends the call with 487.
async function main(data, ctx) {
  await ctx.ring();
  try {
    await ctx.waitForHangup();
  } catch (e) {
    ctx.log(e.name);
  }
}
