// End-to-end test of the web client in a real browser: starts the `chat`
// binary (path in CHAT_BIN) on a free loopback port with a fresh data dir,
// drives headless system Chromium through playwright-core, and checks that
// two users talk live, that message bodies are shown as text and never run
// as markup, and that a late joiner gets the earlier messages from history.
//
// Run: CHAT_BIN=target/debug/chat node --test tests/browser/
// Needs /usr/bin/chromium (or CHROMIUM) and tests/browser/node_modules:
// scripts/install-browser-deps.sh installs both.
//
// Every wait is a condition with a deadline, never a fixed sleep.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const WAIT_MS = 15_000;        // one UI expectation
const STARTUP_MS = 30_000;     // server up and healthy
const ROOM = 'general';
const XSS_BODY = '<script>window.__pwned=1</script><b>bold</b>';

let server;                    // ChildProcess of the chat binary
let serverOutput = '';         // its stdout and stderr, printed on failure
let dataDir;
let browser;
let baseUrl;
let failed = false;
const pageLog = [];            // browser-side errors, printed on failure
const pages = {};              // nick -> Page

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

async function waitHealthy(url) {
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

// Opens the page in its own browser context (own localStorage) and connects as `nick`.
async function openUser(nick) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  page.on('pageerror', (e) => pageLog.push(`[${nick}] page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') pageLog.push(`[${nick}] console.${m.type()}: ${m.text()}`);
  });
  await page.goto(`${baseUrl}/`);
  await page.fill('#nick', nick);
  await page.click('#connect');
  await page.waitForFunction(() => document.querySelector('#status')?.dataset.state === 'connected',
    null, { timeout: WAIT_MS });
  pages[nick] = page;
  return page;
}

async function joinRoom(page, room) {
  await page.fill('#room', room);
  await page.click('#join');
  // Listed, and confirmed by the server's `joined` frame.
  await page.locator(`#rooms li[data-room="${room}"][data-state="joined"]`).waitFor({ timeout: WAIT_MS });
}

async function sendMessage(page, body, { viaEnter = false } = {}) {
  await page.fill('#text', body);
  if (viaEnter) await page.press('#text', 'Enter');
  else await page.click('#send');
  await page.waitForFunction(() => document.querySelector('#text').value === '', null, { timeout: WAIT_MS });
}

// Waits until a message with exactly this user and body text is shown.
async function waitForMessage(page, user, body) {
  await page.waitForFunction(([u, b]) =>
    [...document.querySelectorAll('#messages .msg')].some((m) =>
      m.querySelector('.user')?.textContent === u && m.querySelector('.body')?.textContent === b),
  [user, body], { timeout: WAIT_MS });
}

// The bodies shown in #messages, in page order, with their offsets.
function shownMessages(page) {
  return page.$$eval('#messages .msg', (els) => els.map((m) => ({
    offset: Number(m.dataset.offset),
    user: m.querySelector('.user')?.textContent,
    body: m.querySelector('.body')?.textContent,
  })));
}

// Marks the run failed when a test throws, so `after` prints the logs.
function step(name, fn) {
  test(name, async () => {
    try {
      await fn();
    } catch (e) {
      failed = true;
      throw e;
    }
  });
}

describe('web client in a real browser', { timeout: 120_000 }, () => {
  before(async () => {
    try {
      const bin = process.env.CHAT_BIN;
      if (!bin) {
        throw new Error('CHAT_BIN is not set: point it at the chat binary, '
          + 'e.g. CHAT_BIN=target/debug/chat node --test tests/browser/');
      }
      fs.accessSync(bin, fs.constants.X_OK);

      const port = await freePort();
      baseUrl = `http://127.0.0.1:${port}`;
      dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chat-browser-'));
      server = spawn(bin, [
        'serve', '--listen', `127.0.0.1:${port}`, '--data-dir', dataDir, '--partitions', '4',
      ], { stdio: ['ignore', 'pipe', 'pipe'], env: { RUST_LOG: 'info', ...process.env } });
      server.stdout.on('data', (d) => { serverOutput += d; });
      server.stderr.on('data', (d) => { serverOutput += d; });
      const spawned = once(server, 'spawn');
      const spawnError = once(server, 'error').then(([e]) => { throw e; });
      await Promise.race([spawned, spawnError]);
      spawnError.catch(() => {});
      await waitHealthy(`${baseUrl}/healthz`);

      browser = await chromium.launch({
        executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
        headless: true,
        args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
          '--disable-background-networking', '--disable-component-update', '--disable-sync'],
      });
    } catch (e) {
      failed = true;
      throw e;
    }
  });

  after(async () => {
    if (browser) await browser.close().catch(() => {});
    if (server && !exited(server)) {
      const gone = once(server, 'exit');
      try { process.kill(server.pid, 'SIGKILL'); } catch { /* already gone */ }
      await gone;
    }
    if (dataDir) fs.rmSync(dataDir, { recursive: true, force: true });
    if (failed) {
      process.stderr.write(`\n----- chat server output (stdout + stderr) -----\n${serverOutput}\n`);
      if (pageLog.length) process.stderr.write(`----- browser log -----\n${pageLog.join('\n')}\n`);
    }
  });

  step('alice and bob talk live in general', async () => {
    const alice = await openUser('alice');
    const bob = await openUser('bob');
    await joinRoom(alice, ROOM);
    await joinRoom(bob, ROOM);

    await sendMessage(alice, 'hello bob', { viaEnter: true });
    await waitForMessage(bob, 'alice', 'hello bob');
    await sendMessage(bob, 'hi alice');
    await waitForMessage(alice, 'bob', 'hi alice');

    // Ack and live copy of alice's own message share an offset: shown once.
    const shown = await shownMessages(alice);
    assert.equal(shown.filter((m) => m.body === 'hello bob').length, 1, JSON.stringify(shown));
  });

  step('message bodies are shown as text, never run as markup', async () => {
    const { alice, bob } = pages;
    await sendMessage(alice, XSS_BODY);
    await waitForMessage(bob, 'alice', XSS_BODY);
    await waitForMessage(alice, 'alice', XSS_BODY);
    for (const [nick, page] of Object.entries(pages)) {
      assert.equal(await page.evaluate(() => window.__pwned), undefined, `script ran on ${nick}'s page`);
      assert.equal(await page.locator('#messages b').count(), 0, `<b> rendered on ${nick}'s page`);
      assert.equal(await page.locator('#messages script').count(), 0, `<script> inserted on ${nick}'s page`);
    }
  });

  step('a late joiner sees the earlier messages from history', async () => {
    const carol = await openUser('carol');
    await joinRoom(carol, ROOM);
    await waitForMessage(carol, 'alice', 'hello bob');
    await waitForMessage(carol, 'bob', 'hi alice');
    await waitForMessage(carol, 'alice', XSS_BODY);

    const shown = await shownMessages(carol);
    const offsets = shown.map((m) => m.offset);
    assert.deepEqual(offsets, [...offsets].sort((a, b) => a - b), 'messages sorted by offset');
    assert.equal(new Set(offsets).size, offsets.length, 'no message shown twice');
    assert.deepEqual(shown.map((m) => m.body), ['hello bob', 'hi alice', XSS_BODY]);
    assert.equal(await carol.evaluate(() => window.__pwned), undefined);
    assert.equal(await carol.locator('#messages b').count(), 0);
  });
});
