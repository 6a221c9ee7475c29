#!/usr/bin/env node
// Checks that tests/fixtures/scriptforge/*.js call the ConnexCS platform API the same way as the
// published scripts of github.com/connexcs/scriptforge-examples. Both versions of each script
// run under Node's vm with the same recording mocks (cxRest, cxHelper, cxUserspace, cxKV,
// cxSend, rss-parser, the global api, ctx, a fixed clock and a scripted Math.random); the API
// call traces and the outcomes must match. TTS and console text are masked: the fixtures word
// those in their own way. Prints one line per script, and each difference.
//
//   SF_EXAMPLES_DIR=/path/to/scriptforge-examples TZ=UTC node tools/scriptforge-fixture-diff.js
//
// Expected differences (the only ones): ctx-ivr #3 and dnc-add #0/#1 (fixture wording, shown
// unmasked on purpose) and better-date-time-restriction #42-#45 and #48 (a TypeError message
// naming a local variable). This tool checks the fixtures; it is not part of the test suite.
const vm = require('vm');
const fs = require('fs');
const RealDate = Date;

function makeEnv(sc, trace) {
  const kvStore = new Map(Object.entries(sc.kv || {}));
  const us = new Map(Object.entries(sc.userspace || {}));
  const ivrAnswers = (sc.ivr || []).slice();
  const randoms = (sc.random || [0.5, 0.5, 0.5, 0.5]).slice();
  const t = (...a) => trace.push(JSON.stringify(a));
  const mods = {
    cxRest: { auth(user) { t('auth', user); return {
      get(path, q) { t('rest.get', path, q); return Promise.resolve(sc.rest ? sc.rest(path, q) : []); } }; } },
    cxHelper: { generatePbxSecurityKey(a, b) { t('pbxkey', a, b); return `sec:${a}:${b}`; } },
    cxUserspace: {
      create(area, key, data) { t('us.create', area, key, typeof data); const k = area + '/' + key;
        if (us.has(k)) return Promise.reject(new Error('exists ' + k)); us.set(k, data); return Promise.resolve(true); },
      read(area, key) { t('us.read', area, key); const k = area + '/' + key; return Promise.resolve(us.has(k) ? us.get(k) : null); },
    },
    cxKV: {
      kv: { get(k) { t('kv.get', k); return Promise.resolve(kvStore.has(k) ? kvStore.get(k) : null); } },
      incr(k, by = 1, exp = 0) { t('incr', k, by, exp); const v = (kvStore.get(k) || 0) + by; kvStore.set(k, v); return Promise.resolve(v); },
    },
    cxSend: { email(p) { t('email', p); return Promise.resolve({ ok: true }); } },
    'rss-parser': function () { t('new rss'); this.parseURL = (u) => { t('parseURL', u); return Promise.resolve({ items: [] }); }; },
  };
  const nowMs = sc.now !== undefined ? sc.now : RealDate.UTC(2024, 0, 3, 12, 0, 0);
  function FakeDate(...a) { if (!new.target) return new RealDate(nowMs).toString(); return a.length ? new RealDate(...a) : new RealDate(nowMs); }
  FakeDate.now = () => nowMs; FakeDate.prototype = RealDate.prototype; FakeDate.UTC = RealDate.UTC;
  const ctxVars = Object.assign({}, sc.ctxVars || {});
  const mask = (s) => 'TEXT';
  const ctx = {
    answer() { t('answer'); return Promise.resolve(); },
    tts(x) { t('tts', sc.keepTts ? x : mask(x)); return Promise.resolve(); },
    play(f) { t('play', f); return Promise.resolve(); },
    ivr(...a) { t('ivr', ...a); return Promise.resolve(ivrAnswers.shift() || { status: 'timeout', value: '' }); },
    bridge(...a) { t('bridge', ...a); return Promise.resolve(); },
    hangup() { t('hangup'); return Promise.resolve(); },
    echo(...a) { t('echo', ...a); return Promise.resolve(); },
    blockDtmf(...a) { t('blockDtmf', ...a); return Promise.resolve(); },
    get(k) { t('ctx.get', k); return ctxVars[k]; },
    set(k, v) { t('ctx.set', k); ctxVars[k] = v; },
    waitForHangup() { t('waitForHangup'); return Promise.resolve('hung'); },
  };
  const env = {
    require(n) { t('require', n); if (!(n in mods)) throw new TypeError('no module ' + n); return mods[n]; },
    console: { log() {}, error() {}, info() {} },
    api: { lookup: { asrplus(n) { t('asrplus', n); return Promise.resolve(sc.asr); } } },
    vars: function vars() { return sc.data; },
    module: {}, exports: {},
    Date: FakeDate,
    __rand: () => randoms.length ? randoms.shift() : 0.5,
  };
  return { env, ctx };
}

function norm(v) {
  if (v instanceof Error || (v && v.constructor && /Error$/.test(v.constructor.name) && v.message !== undefined))
    return { error: v.constructor.name, message: v.message };
  if (Array.isArray(v)) return v.map(norm);
  return v;
}

async function runOne(file, sc) {
  const trace = [];
  const { env, ctx } = makeEnv(sc, trace);
  let outcome;
  try {
    const c = vm.createContext(env);
    vm.runInContext('Math.random = __rand;', c);
    vm.runInContext(fs.readFileSync(file, 'utf8'), c, { filename: file });
    const data = sc.data === undefined ? undefined : JSON.parse(JSON.stringify(sc.data));
    if (sc.fn) {
      const m = c.module.export || c.module.exports;
      outcome = { ok: await m[sc.fn](...(sc.args || [])) };
    } else {
      outcome = { ok: await c.main(data, ctx) };
    }
    outcome.ok = JSON.parse(JSON.stringify(outcome.ok === undefined ? null : outcome.ok));
  } catch (e) { outcome = { rejected: norm(e) }; }
  return { trace, outcome };
}

const path = require('path');
const PUBLISHED = process.env.SF_EXAMPLES_DIR;
const FIXTURES = path.join(__dirname, '..', 'tests', 'fixtures', 'scriptforge');
if (!PUBLISHED) { console.error('set SF_EXAMPLES_DIR to a checkout of connexcs/scriptforge-examples'); process.exit(2); }

async function compare(name, scenarios) {
  let bad = 0;
  for (const [i, sc] of scenarios.entries()) {
    const a = JSON.stringify(await runOne(path.join(PUBLISHED, name), sc));
    const b = JSON.stringify(await runOne(path.join(FIXTURES, name), sc));
    if (a !== b) { bad++; console.log(`DIFF ${name} #${i}\n published: ${a}\n fixture:   ${b}`); }
  }
  console.log(`${name}: ${scenarios.length - bad}/${scenarios.length} identical`);
}
const R = (extra) => ({ routing: Object.assign({ cli: '447700900001', dest_number: '15551234567', account_id: 42, server: 'srv1',
  egress_routing: [ { headers: [{ key: 'X-Customer-ID', value: '' }, { key: 'X-CX-Sec', value: '' }], gw: { a: { cli: 'x' }, b: { cli: 'y' } } },
                    { headers: [{ key: 'X-CX-Sec', value: '' }, { key: 'X-Customer-ID', value: '' }], gw: { c: { cli: 'z' } } } ] }, extra || {}) });
const D = (y, mo, d, h, mi) => Date.UTC(y, mo - 1, d, h, mi || 0);
(async () => {
  await compare('account-jump.js', [
    { data: R(), rest: () => [{ company_id: 77 }] },
    { data: R(), rest: () => [] },
    { data: R({ egress_routing: [{ headers: [{ key: 'X-CX-Sec', value: '' }] }] }), rest: () => [{ company_id: 5 }] },
    { data: R({ egress_routing: [{ headers: [{ key: 'X-Customer-ID', value: '' }] }] }), rest: () => [{ company_id: 5 }] },
  ]);
  await compare('add-header.js', [{ data: R() }]);
  await compare('api.js', [{ data: {}, rest: () => [{ id: 1 }] }]);
  await compare('asrplus-faster-call-fail.js', [
    { data: R(), asr: { status: 'Invalid' } }, { data: R(), asr: { status: 'Valid', asr: 0.4 } }, { data: R(), asr: {} },
    { data: {}, asr: { x: 1 } }, { data: R(), asr: null }]);
  const bal = (credit, currency, hdr = '12') => ({ ctxVars: hdr ? { 'sip_h_X-Customer-ID': hdr } : {}, keepTts: false,
    data: {}, rest: () => ({ credit, currency }) });
  await compare('balance-announcer.js', [bal('12.50', 'USD'), bal('0', 'GBP'), bal('-3.2', 'NGN'), bal('abc', 'EUR'), bal('5', 'XYZ', null),
    bal('1234567.89', 'INR'), bal('5', 'JPY')]);
  const sched = (s, now) => ({ data: Object.assign(R(), s === undefined ? {} : { schedule: s }), now });
  const sc = [];
  for (const s of [undefined, { week: '9-21' }, { week: '9-21', weekend: '10-12', offset: -4 }, { week: 'x-5' }, { week: '9' }, { week: '0-23', offset: 3.5 }, { week: 9 }, { week: '9-21', offset: 'abc' }])
    for (const now of [D(2024, 1, 3, 8), D(2024, 1, 3, 9), D(2024, 1, 3, 21, 59), D(2024, 1, 3, 22), D(2024, 1, 6, 11), D(2024, 1, 7, 13), D(2024, 1, 8, 2)])
      sc.push(sched(s, now));
  await compare('better-date-time-restriction.js', sc);
  for (const f of ['ctx-answer.js', 'ctx-blockdtmf.js', 'ctx-bridge.js', 'ctx-echo.js', 'ctx-example.js', 'ctx-play.js', 'ctx-set-get.js', 'ctx-tts.js'])
    await compare(f, [{ data: {} }]);
  await compare('ctx-ivr.js', [{ data: {}, ivr: [{ status: 'timeout', value: '' }] }, { data: {}, ivr: [{ status: 'success', value: '1' }] },
    { data: {}, ivr: [{ status: 'success', value: '7' }] }, { data: {}, ivr: [{ status: 'success', value: '7' }], keepTts: true }]);
  await compare('did-driver.js', [{ fn: 'search', args: [{ number: '44' }] }, { fn: 'search', args: [] }, { fn: 'list', args: [] },
    { fn: 'allocate', args: [{ did: '1' }] }, { fn: 'release', args: [{ did: '1' }] }]);
  await compare('dnc-add.js', [{ data: { 'Caller-Caller-ID-Number': '+447700900123' } }, { data: { 'Caller-Caller-ID-Number': '+44+77' } },
    { data: { 'Caller-Caller-ID-Number': '447700900123' }, userspace: { 'dnc/447700900123': 1 } }, { data: {} }]);
  await compare('dnc-check.js', [{ data: R() }, { data: R(), userspace: { 'dnc/15551234567': 17e11 } }, { data: R(), userspace: { 'dnc/15551234567': 0 } }, { data: {} }]);
  await compare('email.js', [{ data: {} }]);
  const hp = [];
  for (const start of [null, 1, 2, 3, 103]) hp.push({ data: R(), kv: start === null ? {} : { '42:15551234567': start } });
  await compare('outbound-honeypot.js', hp);
  const pinSc = [];
  const ok = v => ({ status: 'success', value: v }), to = { status: 'timeout', value: '' };
  for (const ivr of [[ok('1234')], [ok('1111'), ok('1234')], [ok('1'), ok('2'), ok('3')], [to, to, to], [ok('1'), to, ok('5')], [ok('9999')], [to, ok('1234')]])
    for (const kv of [{}, { pin_2001: '9999' }, { pin_2001: 9999 }])
      for (const ctxVars of [{ sip_from_user: '2001' }, {}])
        pinSc.push({ data: {}, ivr, kv, ctxVars });
  await compare('pin-verification.js', pinSc);
  await compare('simple-greeting.js', pinSc);
  await compare('random-cli-from-did.js', [{ data: R(), rest: () => [{ did: '1' }, { did: '2' }] }]);
  await compare('random-cli-from-ranges.js', [{ data: Object.assign(R(), { cli: { range: [[1000, 2000], [6000, 8000]] } }), random: [0.7, 0.3] },
    { data: Object.assign(R(), { cli: { range: [[100, 200]] } }), random: [0.1, 0.999] }, { data: R() },
    { data: Object.assign(R({ egress_routing: [{ x: 1 }] }), { cli: { range: [[5, 5]] } }) }]);
  await compare('random-cli.js', [{ data: R(), random: [0.8] }, { data: R({ egress_routing: undefined }), random: [0.1] }, { data: R({ egress_routing: [{}] }) }]);
  await compare('rss-feed.js', [{ data: {} }]);
  await compare('simple-calling-card.js', [{ data: {}, ivr: [ok('447700900123')] }, { data: {}, ivr: [to] }]);
  const tb = [];
  for (let d = 1; d <= 7; d++) for (const h of [0, 7, 8, 12, 19, 20, 21, 23]) tb.push({ data: R(), now: D(2024, 1, d, h) });
  await compare('time-based-dialling.js', tb);
})();
