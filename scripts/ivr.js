// Class 5 IVR: a menu with retries, a message recorded and played back.
// Press 1 for sales, 2 for support, 3 to leave a message. The branch taken is set as a call
// variable and as an X-IVR-Choice header on the BYE callforge sends at the end.
async function main(data, ctx) {
  await ctx.answer();
  await ctx.play("ivr/welcome.wav");
  const choice = await ctx.ivr("ivr/menu.wav", 5, 1, 1, "#", {
    tries: 3,
    invalid_file: "ivr/invalid.wav",
    regexp: "[123]",
  });
  ctx.set("ivr_choice", choice.value);
  ctx.header("X-IVR-Choice", choice.status === "success" ? choice.value : choice.status);
  ctx.log("menu", choice.status, choice.value);
  if (choice.status !== "success") {
    await ctx.play("ivr/goodbye.wav");
    return ctx.hangup();
  }
  if (choice.value === "1") {
    await ctx.play("ivr/sales.wav");
  } else if (choice.value === "2") {
    await ctx.play("ivr/support.wav");
  } else {
    await ctx.play("ivr/record.wav");
    const message = await ctx.record("msg-" + data.call_id, {
      maxSeconds: 30,
      silenceSeconds: 5,
      beep: true,
      terminators: "#",
    });
    ctx.set("recording", message.file);
    await ctx.play("ivr/playback.wav");
    await ctx.play(message.file);
  }
  await ctx.play("ivr/goodbye.wav");
  await ctx.hangup();
}
