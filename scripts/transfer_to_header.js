// Class 5: blind-transfer the caller to the destination in its X-Transfer-To header (after
// answering, unless X-Transfer-Answer is "no", which makes the transfer a 302).
async function main(data, ctx) {
  const to = ctx.header("X-Transfer-To");
  if (ctx.header("X-Transfer-Answer") !== "no") await ctx.answer();
  const result = await ctx.transfer(to);
  ctx.log("transfer", JSON.stringify(result));
  return result;
}
