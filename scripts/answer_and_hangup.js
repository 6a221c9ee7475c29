// Class 5: answer, note who called, hang up after a moment (callforge sends the BYE).
async function main(data, ctx) {
  await ctx.answer();
  ctx.set("greeted", data.from_user);
  ctx.log("answered", ctx.get("sip_call_id"), "from", ctx.get("greeted"));
  await new Promise((resolve) => setTimeout(resolve, 100));
  await ctx.hangup();
}
