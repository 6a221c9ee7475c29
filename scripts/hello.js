// App: the smallest async script, echoing its input after a timer.
async function main(data) {
  await new Promise((resolve) => setTimeout(resolve, 10));
  return { hello: data.name || "world", script: process.env.SCRIPTFORGE_NAME };
}
