// The class5 ctx methods written in JS (`waitFor`, `on`, `off`): they need RegExps,
// callbacks or background loops, which do not cross into Rust as JSON. Compiled once, and
// evaluated in a call's context with the raw ctx (see ctx.rs and media_bind.rs) only when
// the script first calls one of them. The rules it implements are written down in
// docs/ctx.md and docs/compat/ctx.md.
(function (raw) {
  const ctx = raw;
  const dtmfCount = raw.dtmfCount;
  const digitsAfter = raw.digitsAfter;
  const dtmfWatch = raw.dtmfWatch;
  const waitForHangup = raw.waitForHangup;
  const log = raw.log;

  // A string made only of keys is literal text; any other string is a regular expression
  // (the stub's example passes '\d{4}'); a function's truthy result is the match.
  const KEYS = /^[0-9*#A-Da-d]+$/;
  const matcher = (m, what) => {
    if (m === undefined || m === null || m === "") return null;
    if (typeof m === "function") return m;
    if (m instanceof RegExp) return (s) => { m.lastIndex = 0; return m.test(s); };
    const text = String(m);
    if (KEYS.test(text)) return (s) => s.includes(text);
    let re;
    try {
      re = new RegExp(text);
    } catch (e) {
      throw new TypeError("ctx.waitFor: " + what + " '" + text + "' is neither keys nor a valid regular expression");
    }
    return (s) => re.test(s);
  };

  // The stub's default is 60 (seconds); its example passes 3000 (milliseconds). Below 1000
  // the number is seconds, from 1000 up milliseconds; 0 or null waits without a limit.
  const waitLimitMs = (timeout) => {
    if (timeout === undefined) return 60000;
    if (timeout === null) return Infinity;
    const n = Number(timeout);
    if (!Number.isFinite(n) || n < 0) throw new TypeError("ctx.waitFor: timeout must be a non-negative number");
    if (n === 0) return Infinity;
    return n < 1000 ? n * 1000 : n;
  };

  const waitFor = async function (match, quit, timeout) {
    const ok = matcher(match, "match");
    if (!ok) throw new TypeError("ctx.waitFor: match is required");
    const stop = matcher(quit, "quit");
    const limit = waitLimitMs(timeout);
    const deadline = Date.now() + limit;
    let count = dtmfCount();
    let seen = "";
    for (;;) {
      const left = deadline - Date.now();
      if (left <= 0) {
        const e = new Error("ctx.waitFor: timed out after " + limit + " ms with digits '" + seen + "'");
        e.name = "Timeout";
        e.digits = seen;
        throw e;
      }
      const r = await digitsAfter(count, Math.min(left, 3600000));
      if (r.count < count) {
        // A bridge restarted the call's media: its key count starts again.
        count = r.count;
        continue;
      }
      count = r.count;
      if (r.digits === "") continue;
      seen += r.digits;
      if (stop && stop(seen)) {
        const e = new Error("ctx.waitFor: quit on digits '" + seen + "'");
        e.name = "Quit";
        e.digits = seen;
        throw e;
      }
      const hit = ok(seen);
      if (hit) return typeof match === "function" ? hit : seen;
    }
  };

  // ctx.on(event, fn) for the events callforge has: "dtmf" (fn(key)) and "hangup" (fn({by})).
  // Handlers run while the script runs; an error in one is logged and the others go on.
  const handlers = { dtmf: [], hangup: [] };
  const report = (e) => log("ctx.on handler failed: " + (e && e.stack ? e.stack : String(e)));
  const fire = (list, arg) => {
    for (const fn of list.slice()) {
      try {
        const p = fn(arg);
        if (p && typeof p.then === "function") p.then(undefined, report);
      } catch (e) {
        report(e);
      }
    }
  };
  let watchingDtmf = false;
  let watchingHangup = false;
  const on = function (event, fn) {
    const list = handlers[event];
    if (!list) throw new TypeError("ctx.on: no event '" + event + "' in callforge; it has: dtmf, hangup");
    if (typeof fn !== "function") throw new TypeError("ctx.on: the handler must be a function");
    list.push(fn);
    if (event === "dtmf" && !watchingDtmf) {
      watchingDtmf = true;
      (async () => {
        let count = dtmfCount();
        for (;;) {
          const r = await dtmfWatch(count, 1000);
          count = r.count;
          for (const key of r.digits) fire(handlers.dtmf, key);
        }
      })().catch(() => {});
    }
    if (event === "hangup" && !watchingHangup) {
      watchingHangup = true;
      waitForHangup().then((how) => fire(handlers.hangup, how), () => {});
    }
    return ctx;
  };
  const off = function (event, fn) {
    const list = handlers[event];
    if (list) {
      const at = list.indexOf(fn);
      if (at >= 0) list.splice(at, 1);
    }
    return ctx;
  };

  return { waitFor, on, off };
})
