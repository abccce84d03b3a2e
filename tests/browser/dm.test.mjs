// The web client with tokens, in a real browser: the `chat` binary (CHAT_BIN)
// runs with CHAT_JWT_SECRET, `chat token` mints each user's token, and two
// pages signed in with tokens exchange a direct message that a third user
// can neither join nor read.
//
// Run: CHAT_BIN=target/debug/chat node --test tests/browser/

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  failureTracker, joinRoom, launchBrowser, mintToken, newPage, sendMessage, shownMessages,
  startChat, waitConnected, waitForMessage, WAIT_MS,
} from './harness.mjs';

const ENV = { CHAT_JWT_SECRET: 'browser-test-secret-0123456789abcdef' };
const DM = 'dm:alice:bob';

let chat;
let browser;
const pageLog = [];
const pages = {};
const { step, guard, report } = failureTracker(test);

async function waitDmJoined(page, room) {
  await page.locator(`#dms li[data-room="${room}"][data-state="joined"]`).waitFor({ timeout: WAIT_MS });
}

async function waitError(page, text) {
  await page.waitForFunction((t) => document.querySelector('#errors')?.textContent.includes(t),
    text, { timeout: WAIT_MS });
}

describe('direct messages between users signed in with tokens', { timeout: 120_000 }, () => {
  before(() => guard(async () => {
    chat = await startChat(ENV);
    browser = await launchBrowser();
  }));

  after(async () => {
    if (browser) await browser.close().catch(() => {});
    report(chat, pageLog);
    if (chat) await chat.stop();
  });

  step('a token in the URL signs alice in, and leaves the address bar', async () => {
    const alice = await newPage(browser, `${chat.url}/?token=${mintToken(ENV, 'alice')}`, 'alice', pageLog);
    await alice.locator('#auth-mode[data-mode="token"]').waitFor();
    await waitConnected(alice);
    assert.equal(new URL(alice.url()).searchParams.get('token'), null, alice.url());
    assert.equal(await alice.locator('#nick').isVisible(), false, 'no nickname field with tokens');
    pages.alice = alice;
  });

  step('a bad token is refused with its reason', async () => {
    const mallory = await newPage(browser, `${chat.url}/`, 'mallory', pageLog);
    await mallory.locator('#auth-mode[data-mode="token"]').waitFor();
    await mallory.fill('#token', `${mintToken(ENV, 'mallory')}x`);
    await mallory.click('#connect');
    await waitError(mallory, 'token refused');
    assert.equal(await mallory.locator('#status').getAttribute('data-state'), 'failed');
    await mallory.context().close();
  });

  step('alice opens a DM with bob; bob, signed in by pasting his token, reads and answers it', async () => {
    const { alice } = pages;
    await alice.fill('#dm-user', 'bob');
    await alice.click('#dm-start');
    await waitDmJoined(alice, DM);
    await sendMessage(alice, 'psst bob');
    await waitForMessage(alice, 'alice', 'psst bob');

    const bob = await newPage(browser, `${chat.url}/`, 'bob', pageLog);
    await bob.locator('#auth-mode[data-mode="token"]').waitFor();
    await bob.fill('#token', mintToken(ENV, 'bob'));
    await bob.click('#connect');
    await waitConnected(bob);
    await bob.fill('#dm-user', 'alice');
    await bob.click('#dm-start');
    await waitDmJoined(bob, DM);
    await waitForMessage(bob, 'alice', 'psst bob');  // from history
    await sendMessage(bob, 'hi alice, only you see this');
    await waitForMessage(alice, 'bob', 'hi alice, only you see this');  // live
    pages.bob = bob;

    // The DM is listed apart from the rooms, under the other user's name.
    assert.equal(await alice.locator(`#rooms li[data-room="${DM}"]`).count(), 0);
    assert.match(await alice.locator(`#dms li[data-room="${DM}"]`).textContent(), /bob/);
  });

  step('carol can neither join the DM nor read it', async () => {
    const carol = await newPage(browser, `${chat.url}/?token=${mintToken(ENV, 'carol')}`, 'carol', pageLog);
    await waitConnected(carol);
    await carol.fill('#room', DM);
    await carol.click('#join');
    await waitError(carol, 'forbidden');
    // The refused join names its room, and the page takes it off the list.
    await carol.locator(`#dms li[data-room="${DM}"]`).waitFor({ state: 'detached', timeout: WAIT_MS });
    assert.deepEqual(await shownMessages(carol), []);
    const res = await fetch(`${chat.url}/rooms/${encodeURIComponent(DM)}/messages`,
      { headers: { Authorization: `Bearer ${mintToken(ENV, 'carol')}` } });
    assert.equal(res.status, 403);

    // Alice's view holds the two DM messages, nothing else.
    const shown = await shownMessages(pages.alice);
    assert.deepEqual(shown.map((m) => m.body), ['psst bob', 'hi alice, only you see this']);
  });
});
