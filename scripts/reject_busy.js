// Class 5: refuse the call before answering, with a header explaining why.
async function main(data, ctx) {
  ctx.header("X-Reason", "closed");
  await ctx.reject(486, "Busy Here");
}
