// Presence and typing across gateways, in a real browser: two `chat`
// gateways (CHAT_BIN) share one Kafka-protocol broker (tansu, TANSU_BIN),
// alice's page talks to one and bob's to the other; each page shows the
// other user online, and bob's typing shows on alice's page.
//
// Run: CHAT_BIN=target/debug/chat node --test tests/browser/

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  failureTracker, joinRoom, launchBrowser, openDevUser, startTwoGateways, WAIT_MS,
} from './harness.mjs';

const ROOM = 'lobby';
let cluster;
let gateways = [];
let browser;
const pageLog = [];
const pages = {};
const { step, guard, report } = failureTracker(test);

async function openUser(gateway, nick) {
  const page = await openDevUser(browser, `${gateway.url}/`, nick, pageLog);
  pages[nick] = page;
  return page;
}

async function waitOnline(page, users) {
  await page.waitForFunction((want) => {
    const text = document.querySelector('#online')?.textContent ?? '';
    return text === 'online: ' + want.join(', ');
  }, users, { timeout: WAIT_MS });
}

describe('presence and typing across two gateways', { timeout: 120_000 }, () => {
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

  step('each page shows the other user online', async () => {
    const [a, b] = gateways;
    const alice = await openUser(a, 'alice');
    const bob = await openUser(b, 'bob');
    assert.match(await alice.locator('#status').textContent(), /gw-a/);
    assert.match(await bob.locator('#status').textContent(), /gw-b/);
    await joinRoom(alice, ROOM);
    await joinRoom(bob, ROOM);
    await waitOnline(alice, ['alice', 'bob']);
    await waitOnline(bob, ['alice', 'bob']);
  });

  step("bob's typing shows on alice's page, from the other gateway", async () => {
    const { alice, bob } = pages;
    await bob.locator('#text').pressSequentially('hel');
    await alice.locator('#typing', { hasText: 'bob is typing' }).waitFor({ timeout: WAIT_MS });
    assert.equal(await bob.locator('#typing').textContent(), '', 'no one else is typing for bob');
  });

  step('when bob closes his page, alice sees him leave', async () => {
    await pages.bob.context().close();
    await waitOnline(pages.alice, ['alice']);
  });
});
