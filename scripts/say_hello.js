// Class 5: answer, speak a sentence with text to speech, hang up.
async function main(data, ctx) {
  await ctx.answer();
  await ctx.say("Hello from callforge. Your call is important to us.");
  await ctx.hangup();
}
