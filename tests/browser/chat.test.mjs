// End-to-end test of the web client in a real browser: starts the `chat`
// binary (path in CHAT_BIN) in open dev mode, drives headless system
// Chromium through playwright-core, and checks that two users talk live, that
// message bodies are shown as text and never run as markup, and that a late
// joiner gets the earlier messages from history.
//
// Run: CHAT_BIN=target/debug/chat node --test tests/browser/
// Needs /usr/bin/chromium (or CHROMIUM) and tests/browser/node_modules:
// scripts/install-browser-deps.sh installs both.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  failureTracker, joinRoom, launchBrowser, openDevUser, sendMessage, shownMessages, startChat,
  waitForMessage,
} from './harness.mjs';

const ROOM = 'general';
const XSS_BODY = '<script>window.__pwned=1</script><b>bold</b>';

let chat;                      // the chat server
let browser;
const pageLog = [];            // browser-side errors, printed on failure
const pages = {};              // nick -> Page

// Opens the page in its own browser context and connects as `nick`.
async function openUser(nick) {
  const page = await openDevUser(browser, `${chat.url}/`, nick, pageLog);
  pages[nick] = page;
  return page;
}

const { step, guard, report } = failureTracker(test);

describe('web client in a real browser', { timeout: 120_000 }, () => {
  before(() => guard(async () => {
    chat = await startChat();
    browser = await launchBrowser();
  }));

  after(async () => {
    if (browser) await browser.close().catch(() => {});
    report(chat, pageLog);
    if (chat) await chat.stop();
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
