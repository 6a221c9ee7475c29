// The isolated-vm peer for tests/load/compare_isolated_vm.sh: an HTTP server that answers
// every POST by running a routing script's `main(data)` in a brand-new V8 isolate and
// context, the same "nothing survives from one run to the next" promise callforge makes,
// with a 64 MiB heap limit (callforge's default `memory_mb`) and a 2 s limit (its class4 CPU
// limit). The request body is the class4 input; the vars (a JSON object, callforge reads them
// from the script's .toml) are merged in as top-level keys, as callforge does. The answer has
// the shape of callforge's `POST /v1/run/NAME?mode=class4` answer, `{duration_us, logs,
// result}` with `result` the input with `routing` replaced by what `main` returned, so both
// servers send the same bytes' worth and the benchmark script can check they agree.
//
// Usage: [MODE=isolate|context] [SLOTS=N] node server.js SCRIPT.js VARS.json PORT
// (prints "listening PORT" when ready; MODE is explained at runFreshIsolate/runFreshContext).
'use strict';

const fs = require('fs');
const http = require('http');
const os = require('os');
const ivm = require('isolated-vm');

const [scriptPath, varsPath, portArg] = process.argv.slice(2);
if (!scriptPath || !varsPath || !portArg) {
  console.error('usage: node server.js SCRIPT.js VARS.json PORT');
  process.exit(2);
}
const source = fs.readFileSync(scriptPath, 'utf8');
const vars = JSON.parse(fs.readFileSync(varsPath, 'utf8'));
const MEMORY_MB = 64;
const TIMEOUT_MS = 2000;

// The input crosses as a JSON string and the result comes back as one, the cheapest copy
// isolated-vm offers for plain data.
const wrapped = `${source}
;(function (input) {
  const data = JSON.parse(input);
  return Promise.resolve(main(data)).then((r) => JSON.stringify({ ...data, routing: r }));
})`;

// A compiled Script belongs to one isolate, so each fresh isolate compiles the source again;
// V8's code cache (produced by the first compile) lets it skip parsing, the best an
// isolated-vm user can do for a fresh isolate.
let cachedData;
async function compile(isolate) {
  const script = await isolate.compileScript(wrapped, cachedData ? { cachedData } : { produceCachedData: true });
  if (!cachedData && script.cachedData) cachedData = script.cachedData;
  return script;
}

async function runIn(isolate, script, data) {
  const context = await isolate.createContext();
  try {
    const entry = await script.run(context, { timeout: TIMEOUT_MS, reference: true });
    return await entry.apply(undefined, [JSON.stringify(data)], {
      timeout: TIMEOUT_MS,
      result: { promise: true, copy: true },
    });
  } finally {
    context.release();
  }
}

// Runs go through SLOTS slots (default: one per core), one run at a time per slot, as
// callforge runs one script at a time per worker thread; more requests wait for a slot.
const SLOTS = Number(process.env.SLOTS) || Math.max(1, os.availableParallelism());
const free = [...Array(SLOTS).keys()];
const waiting = [];
async function withSlot(fn) {
  const slot = free.length > 0 ? free.pop() : await new Promise((resolve) => waiting.push(resolve));
  try {
    return await fn(slot);
  } finally {
    const next = waiting.shift();
    if (next) next(slot);
    else free.push(slot);
  }
}

// MODE=isolate (the default): a new isolate per run, so the heap and its 64 MiB limit are the
// run's alone, as a callforge run has a runtime to itself while it runs.
async function runFreshIsolate(data) {
  return withSlot(async () => {
    const isolate = new ivm.Isolate({ memoryLimit: MEMORY_MB });
    try {
      return await runIn(isolate, await compile(isolate), data);
    } finally {
      isolate.dispose();
    }
  });
}

// MODE=context: a fresh context per run in the slot's long-lived isolate: cheaper, but
// weaker, since the runs of one slot share its heap and its memory limit (an isolate that
// hits the limit is disposed by isolated-vm; the slot then makes a new one).
const isolates = [];
async function runFreshContext(data) {
  return withSlot(async (slot) => {
    if (!isolates[slot] || isolates[slot].isolate.isDisposed) {
      const isolate = new ivm.Isolate({ memoryLimit: MEMORY_MB });
      isolates[slot] = { isolate, script: await compile(isolate) };
    }
    const { isolate, script } = isolates[slot];
    return runIn(isolate, script, data);
  });
}

const MODE = process.env.MODE || 'isolate';
if (MODE !== 'isolate' && MODE !== 'context') {
  console.error('MODE must be "isolate" or "context"');
  process.exit(2);
}
const runFresh = MODE === 'isolate' ? runFreshIsolate : runFreshContext;

function reply(res, status, body) {
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(body),
  });
  res.end(body);
}

const server = http.createServer((req, res) => {
  if (req.method !== 'POST') {
    reply(res, 405, '{"error":"POST only"}');
    return;
  }
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    let data;
    try {
      data = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    } catch (e) {
      reply(res, 400, JSON.stringify({ error: `bad JSON: ${e.message}` }));
      return;
    }
    if (data === null || typeof data !== 'object' || Array.isArray(data)) {
      reply(res, 400, '{"error":"the body must be a JSON object"}');
      return;
    }
    Object.assign(data, vars);
    const t0 = process.hrtime.bigint();
    runFresh(data).then(
      (out) => {
        const us = (process.hrtime.bigint() - t0) / 1000n;
        reply(res, 200, `{"duration_us":${us},"logs":[],"result":${out}}`);
      },
      (err) => reply(res, 500, JSON.stringify({ code: 500, message: String(err && err.message || err) })),
    );
  });
});

server.listen(Number(portArg), '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
