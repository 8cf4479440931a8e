// End-to-end test of the chat demo page in headless Chromium.
//
// Starts a real `warren serve` on free ports, opens the page in two browser
// contexts (alice and bob), and drives login, join, chat and departure through
// the page's stable element ids. Run from the repository root:
//
//   npm ci --prefix tests/browser && node tests/browser/chat.test.mjs
//
// Environment: WARREN_BIN (else target/release/warren, else target/debug/warren)
// and CHROMIUM (else /usr/bin/chromium).

import assert from 'node:assert/strict';
import path from 'node:path';
import {
  REPO_ROOT,
  SHOT_DIR,
  SHUTDOWN_TIMEOUT_MS,
  collectProblems,
  findWarren,
  freePorts,
  launchChromium,
  runTest,
  screenshot,
  shownPath,
  start,
  waitForPorts,
  waitInPage as waitInPageFor,
} from './harness.mjs';

/** Whole-test budget. */
const OVERALL_TIMEOUT_MS = 60_000;
/** Budget for one waited-for condition in the page. */
const STEP_TIMEOUT_MS = 10_000;

const ROOM = 'mqant';

// ------------------------------------------------------------------ helpers

/** What the page shows, for failure messages. */
async function pageState(page) {
  try {
    return await page.evaluate(() => ({
      status: document.querySelector('#status')?.textContent,
      error: document.querySelector('#error')?.textContent,
      members: [...document.querySelectorAll('#members li')].map((li) => li.textContent.trim()),
      lines: [...document.querySelectorAll('#messages .line')].map((l) => l.textContent.trim()),
    }));
  } catch (err) {
    return { unavailable: err.message };
  }
}

/** Waits for `predicate(arg)` to hold in the page; explains the page state on timeout. */
function waitInPage(who, page, what, predicate, arg) {
  return waitInPageFor(page, `${who}: ${what}`, predicate, arg, { timeout: STEP_TIMEOUT_MS, pageState });
}

function waitForConnected(who, page) {
  return waitInPage(who, page, '#status should say connected', () =>
    (document.querySelector('#status')?.textContent || '').includes('connected'),
  );
}

function waitForLine(who, page, text) {
  return waitInPage(
    who,
    page,
    `a #messages .line containing ${JSON.stringify(text)}`,
    (t) => [...document.querySelectorAll('#messages .line')].some((l) => l.textContent.includes(t)),
    text,
  );
}

function waitForMembers(who, page, expected) {
  return waitInPage(
    who,
    page,
    `#members should be exactly ${JSON.stringify(expected)}`,
    (want) => {
      const got = [...document.querySelectorAll('#members li')].map((li) => li.textContent.trim());
      return got.length === want.length && want.every((w) => got.includes(w));
    },
    expected,
  );
}

async function assertNoError(who, page) {
  const error = (await page.textContent('#error')) || '';
  assert.equal(error.trim(), '', `${who}: #error shows ${JSON.stringify(error)}`);
}

async function login(who, page, user) {
  await page.waitForSelector('#login:not([disabled])', { timeout: STEP_TIMEOUT_MS });
  await page.fill('#user', user);
  await page.fill('#room', ROOM);
  await page.click('#login');
  await page.waitForSelector('#text:not([disabled])', { timeout: STEP_TIMEOUT_MS }).catch(async (err) => {
    throw new Error(
      `${who}: login/join did not complete: ${JSON.stringify(await pageState(page))} (${err.message.split('\n')[0]})`,
    );
  });
}

async function openUser(browser, base, user, problems) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 700 } });
  const page = await context.newPage();
  collectProblems(page, problems, { prefix: `${user}: ` });
  const res = await page.goto(base, { timeout: STEP_TIMEOUT_MS });
  assert.ok(res && res.ok(), `${user}: GET ${base} answered ${res ? res.status() : 'nothing'}`);
  assert.equal(await page.title(), 'warren chat', `${user}: unexpected page title`);
  await waitForConnected(user, page);
  return { context, page };
}

// ------------------------------------------------------------------ the test

async function run(state) {
  const bin = findWarren();
  const [mqttPort, wsPort, httpPort] = await freePorts(3);
  const args = [
    'serve',
    '--no-demo-listeners',
    '--listen',
    `mqtt+mqant://127.0.0.1:${mqttPort}`,
    '--listen',
    `ws+mqant://127.0.0.1:${wsPort}`,
    '--http',
    `127.0.0.1:${httpPort}`,
  ];
  console.log(`starting ${shownPath(bin)} ${args.join(' ')}`);
  state.warren = start(bin, args, 'warren');
  await waitForPorts(state.warren, [httpPort, wsPort]);

  const base = `http://127.0.0.1:${httpPort}/`;
  const config = await (await fetch(`${base}config.json`)).json();
  assert.ok(
    typeof config.ws_url === 'string' && config.ws_url.startsWith(`ws://127.0.0.1:${wsPort}`),
    `/config.json should point at the ws+mqant listener on port ${wsPort}: ${JSON.stringify(config)}`,
  );

  state.browser = await launchChromium(STEP_TIMEOUT_MS);

  const alice = await openUser(state.browser, base, 'alice', state.problems);
  const bob = await openUser(state.browser, base, 'bob', state.problems);

  // Both join the same room and see each other.
  await login('alice', alice.page, 'alice');
  await waitForMembers('alice', alice.page, ['alice']);
  await login('bob', bob.page, 'bob');
  await waitForMembers('bob', bob.page, ['alice', 'bob']);
  await waitForMembers('alice', alice.page, ['alice', 'bob']);
  await waitForLine('alice', alice.page, 'bob joined');
  console.log('ok: alice and bob joined and see each other');

  // alice → bob, sent with Enter.
  await alice.page.fill('#text', 'hello bob');
  await alice.page.press('#text', 'Enter');
  await waitForLine('bob', bob.page, 'alice: hello bob');
  await waitForLine('alice', alice.page, 'alice: hello bob');
  console.log('ok: bob received "hello bob"');

  // bob → alice, sent with the button.
  await bob.page.fill('#text', 'hi alice');
  await bob.page.click('#send');
  await waitForLine('alice', alice.page, 'bob: hi alice');
  await waitForLine('bob', bob.page, 'bob: hi alice');
  console.log('ok: alice received "hi alice"');

  await assertNoError('alice', alice.page);
  await assertNoError('bob', bob.page);

  await screenshot(bob.page, 'chat-bob.png');

  // bob leaves: alice gets OnLeave.
  await bob.context.close();
  await waitForLine('alice', alice.page, 'bob left');
  await waitForMembers('alice', alice.page, ['alice']);
  await assertNoError('alice', alice.page);
  console.log('ok: alice saw "bob left" and bob left the member list');

  await screenshot(alice.page, 'chat-alice.png');
  console.log(`screenshots in ${path.relative(REPO_ROOT, SHOT_DIR)}/chat-alice.png, chat-bob.png`);

  assert.deepEqual(state.problems, [], 'the pages reported errors');
}

runTest(run, { overallTimeoutMs: OVERALL_TIMEOUT_MS, cleanupGraceMs: 2 * SHUTDOWN_TIMEOUT_MS });
