// App: send a SIP MESSAGE (RFC 3428) through the engine's own SIP stack.
async function main(data) {
  return await api.send.sip({ to: data.to, body: data.body || "hello from callforge" });
}
