// Class 5: try the destination in X-Bridge-To; if it is busy, unanswered or fails, try the
// backup in X-Bridge-Backup (an operator, say). Returns both attempts' outcomes.
async function main(data, ctx) {
  await ctx.answer();
  const first = await ctx.bridge(ctx.header("X-Bridge-To"), { timeout: 10, continueOnFail: true });
  if (first.status === "completed") return { first };
  const second = await ctx.bridge(ctx.header("X-Bridge-Backup"), { timeout: 10, continueOnFail: true });
  ctx.header("X-Bridge", second.status + "/" + second.sipCode);
  await ctx.hangup();
  return { first, second };
}
