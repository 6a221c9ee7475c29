// Class 5 echo test (the embedded default's `echo` / `600` route): the caller hears
// themselves 100 ms late until they press a key, then hears goodbye.
async function main(data, ctx) {
  await ctx.answer();
  await ctx.play("ivr/welcome.wav");
  const r = await ctx.echo(100);
  ctx.log("echo ended with", r.digit);
  await ctx.play("ivr/goodbye.wav");
  await ctx.hangup();
}
