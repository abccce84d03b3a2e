// Edits, deletes and reactions in a real browser, across two `chat`
// gateways (CHAT_BIN) on one Kafka-protocol broker (tansu, TANSU_BIN):
// alice (gateway A) writes, edits and deletes her message; bob (gateway B)
// reacts to it and takes the reaction back. Each page shows every change
// live, bob's page offers no edit or delete of alice's message, and a page
// opened afterwards gets the same state from history.
//
// Run: CHAT_BIN=target/debug/chat node --test tests/browser/

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  failureTracker, joinRoom, launchBrowser, openDevUser, sendMessage, startTwoGateways,
  waitForMessage, WAIT_MS,
} from './harness.mjs';

const ROOM = 'changes';
let cluster;
let gateways = [];
let browser;
const pageLog = [];
const pages = {};
const { step, guard, report } = failureTracker(test);

// The message of `page` whose body once was (or now is) `body`, by the
// offset found when it first showed.
let offset = null;
const msg = (page) => page.locator(`#messages .msg[data-offset="${offset}"]`);

// Waits until the message shows `body` on `page`, with `edited` marked or not.
async function shows(page, body, edited) {
  await page.waitForFunction(([o, b, e]) => {
    const m = document.querySelector(`#messages .msg[data-offset="${o}"]`);
    return m && m.querySelector('.body')?.textContent === b
      && (m.querySelector('.edited')?.textContent === '(edited)') === e;
  }, [offset, body, edited], { timeout: WAIT_MS });
}

// Waits until the message's reactions on `page` read `want` ("👍 1", …; '' for none).
async function reactions(page, want) {
  await page.waitForFunction(([o, w]) => {
    const m = document.querySelector(`#messages .msg[data-offset="${o}"]`);
    if (!m) return false;
    const got = [...m.querySelectorAll('.reactions .reaction')]
      .map((r) => `${r.querySelector('.emoji').textContent} ${r.querySelector('.count').textContent}`)
      .join(', ');
    return got === w;
  }, [offset, want], { timeout: WAIT_MS });
}

describe('edits, deletes and reactions across two gateways', { timeout: 180_000 }, () => {
  before(() => guard(async () => {
    cluster = await startTwoGateways();
    gateways = cluster.gateways;
    browser = await launchBrowser();
  }));

  after(async () => {
    if (browser) await browser.close().catch(() => {});
    report(gateways[0], pageLog);
    if (gateways[1]) report(gateways[1], []);
    if (cluster) await cluster.stop();
  });

  step('alice writes on gateway A; bob, on B, sees it with no edit or delete of his own', async () => {
    const alice = await openDevUser(browser, `${gateways[0].url}/`, 'alice', pageLog);
    const bob = await openDevUser(browser, `${gateways[1].url}/`, 'bob', pageLog);
    Object.assign(pages, { alice, bob });
    await joinRoom(alice, ROOM);
    await joinRoom(bob, ROOM);
    await sendMessage(alice, 'teh first draft');
    await waitForMessage(alice, 'alice', 'teh first draft');
    await waitForMessage(bob, 'alice', 'teh first draft');
    offset = await alice.locator('#messages .msg', { hasText: 'teh first draft' }).getAttribute('data-offset');
    assert.match(offset, /^\d+$/);
    assert.equal(await msg(alice).locator('button.edit').count(), 1);
    assert.equal(await msg(bob).locator('button.edit').count(), 0, "bob may not edit alice's message");
    assert.equal(await msg(bob).locator('button.delete').count(), 0, "bob may not delete alice's message");
  });

  step('alice edits it: both pages show the new body, marked edited', async () => {
    const { alice, bob } = pages;
    await msg(alice).hover();
    await msg(alice).locator('button.edit').click();
    const input = msg(alice).locator('input.edit-input');
    await input.fill('the first draft');
    await input.press('Enter');
    await shows(alice, 'the first draft', true);
    await shows(bob, 'the first draft', true);
  });

  step('bob reacts, then alice too, then bob takes his back: both pages follow', async () => {
    const { alice, bob } = pages;
    await msg(bob).hover();
    await msg(bob).locator('button.react-add').click();
    await msg(bob).locator('.picker button[data-emoji="👍"]').click();
    await reactions(bob, '👍 1');
    await reactions(alice, '👍 1');
    // Alice adds hers by clicking the reaction itself.
    await msg(alice).locator('.reactions .reaction[data-emoji="👍"]').click();
    await reactions(alice, '👍 2');
    await reactions(bob, '👍 2');
    assert.equal(await msg(bob).locator('.reaction.mine').count(), 1);
    await msg(bob).locator('.reactions .reaction[data-emoji="👍"]').click();
    await reactions(bob, '👍 1');
    await reactions(alice, '👍 1');
    assert.equal(await msg(bob).locator('.reaction.mine').count(), 0);
  });

  step('a page opened now gets the edit and the reaction from history', async () => {
    const carol = await openDevUser(browser, `${gateways[1].url}/`, 'carol', pageLog);
    pages.carol = carol;
    await joinRoom(carol, ROOM);
    await shows(carol, 'the first draft', true);
    await reactions(carol, '👍 1');
  });

  step('alice deletes it: every page shows a tombstone without the body', async () => {
    const { alice, bob, carol } = pages;
    alice.once('dialog', (d) => d.accept());
    await msg(alice).hover();
    await msg(alice).locator('button.delete').click();
    for (const page of [alice, bob, carol]) {
      await msg(page).and(page.locator('.msg.deleted')).waitFor({ timeout: WAIT_MS });
      await shows(page, 'message deleted', false);
      await reactions(page, '');
    }
    // The history (a projection, which may trail the live frames) agrees.
    const deadline = Date.now() + WAIT_MS;
    let tombstone;
    for (;;) {
      const res = await fetch(`${gateways[1].url}/rooms/${ROOM}/messages`);
      tombstone = (await res.json()).messages.find((m) => String(m.offset) === offset);
      if (tombstone?.deleted || Date.now() > deadline) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.deepEqual(
      { body: tombstone.body, deleted: tombstone.deleted, reactions: tombstone.reactions },
      { body: '', deleted: true, reactions: undefined },
    );
  });
});
