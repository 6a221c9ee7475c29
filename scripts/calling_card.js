// Class 5 calling card: ask for a number, bridge the caller to it through the default trunk,
// and if that fails, say so and let them try once more.
async function main(data, ctx) {
  await ctx.answer();
  for (let attempt = 1; attempt <= 2; attempt++) {
    const dialled = await ctx.ivr("ivr/enter_number.wav", 8, 3, 15, "#", { tries: 2 });
    if (dialled.status !== "success") break;
    const leg = await ctx.bridge(dialled.value, { timeout: 30, continueOnFail: true });
    ctx.log("bridge", dialled.value, leg.status, leg.sipCode);
    if (leg.status === "completed") return;
    await ctx.tts("The call could not be connected.");
  }
  await ctx.play("ivr/goodbye.wav");
  await ctx.hangup();
}
