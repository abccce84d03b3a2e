// Unread counts and read markers across gateways, in a real browser: two
// `chat` gateways (CHAT_BIN) share one Kafka-protocol broker (tansu,
// TANSU_BIN). Bob, on one, writes to alice in a direct message she has
// never opened; alice's page, on the other, finds the DM with its unread
// badge; when she opens it, bob's page marks his message seen by her.
//
// Run: CHAT_BIN=target/debug/chat node --test tests/browser/

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  failureTracker, launchBrowser, openDevUser, sendMessage, startTwoGateways,
  waitForMessage, WAIT_MS,
} from './harness.mjs';

const DM = 'dm:alice:bob';
let cluster;
let gateways = [];
let browser;
const pageLog = [];
const pages = {};
const { step, guard, report } = failureTracker(test);

// Polls `GET /me/rooms` of `user` until `room` has `unread` unread.
async function serverSaysUnread(gateway, user, room, unread) {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const res = await fetch(`${gateway.url}/me/rooms?user=${user}`);
    const body = await res.json();
    const entry = (body.rooms ?? []).find((r) => r.room === room);
    if (entry && entry.unread === unread) return;
    assert.ok(Date.now() < deadline, `${user}'s ${room}: ${JSON.stringify(body)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe('unread badges and read markers across two gateways', { timeout: 120_000 }, () => {
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

  step('bob writes twice to alice, who has not opened the DM', async () => {
    const bob = await openDevUser(browser, `${gateways[1].url}/`, 'bob', pageLog);
    pages.bob = bob;
    await bob.fill('#dm-user', 'alice');
    await bob.click('#dm-start');
    await bob.locator(`#dms li[data-room="${DM}"][data-state="joined"]`).waitFor({ timeout: WAIT_MS });
    await sendMessage(bob, 'are you there?');
    await sendMessage(bob, 'ping');
    await waitForMessage(bob, 'bob', 'ping');
    await serverSaysUnread(gateways[0], 'alice', DM, 2);
  });

  step("alice's page, on the other gateway, lists the DM with 2 unread", async () => {
    const alice = await openDevUser(browser, `${gateways[0].url}/`, 'alice', pageLog);
    pages.alice = alice;
    const badge = alice.locator(`#dms li[data-room="${DM}"] .badge`);
    await badge.filter({ hasText: /^2$/ }).waitFor({ timeout: WAIT_MS });
  });

  step("opening it clears her badge and marks bob's message seen on his page", async () => {
    const { alice, bob } = pages;
    await alice.click(`#dms li[data-room="${DM}"]`);
    await waitForMessage(alice, 'bob', 'ping');
    await alice.waitForFunction((room) =>
      document.querySelector(`#dms li[data-room="${room}"] .badge`)?.textContent === '',
    DM, { timeout: WAIT_MS });
    await bob.locator('#messages .msg', { hasText: 'ping' })
      .locator('.seen', { hasText: 'seen by alice' })
      .waitFor({ timeout: WAIT_MS });
    await serverSaysUnread(gateways[1], 'alice', DM, 0);
  });
});
