// The browser half of bench/dashboard_latency.py: signs in, opens a task's page, and records when the DOM
// shows each subtask state (epoch ms: performance.timeOrigin + performance.now(), taken in a
// MutationObserver callback, and again at the next animation frame, i.e. when it is painted).
// Protocol on stdout, one JSON object a line: {"step": "observing"} once the DAG is drawn and recorded;
// then, after any line on stdin, {"records": [[subtask, state, dom_ms, frame_ms], ...]}.
import { createInterface } from "node:readline";
import { launch, waitFor } from "./browser.mjs";

const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const stdin = createInterface({ input: process.stdin });
const lines = stdin[Symbol.asyncIterator]();

const { browser, page, errors } = await launch();
try {
  await page.goto(process.env.MAW_URL);
  await page.getByLabel("User name").fill(process.env.MAW_USER);
  await page.getByLabel("Password").fill(process.env.MAW_PASSWORD);
  await page.keyboard.press("Enter");
  await waitFor(page, "[data-testid=who]");
  const task = process.env.MAW_TASK;
  await page.evaluate((id) => (window.location.hash = `#/tasks/${id}`), task.split("/").pop());
  const expected = Number(process.env.MAW_SUBTASKS);
  await page.waitForFunction((n) => document.querySelectorAll("[data-subtask]").length === n, expected, { timeout: 30_000 });
  await page.evaluate(() => {
    const records = [];
    const last = new Map();
    const now = () => performance.timeOrigin + performance.now();
    const record = () => {
      const t = now();
      const fresh = [];
      for (const g of document.querySelectorAll("svg [data-subtask]")) {
        const name = g.getAttribute("data-subtask");
        const state = g.getAttribute("data-state");
        if (last.get(name) !== state) {
          last.set(name, state);
          const row = [name, state, t, 0];
          records.push(row);
          fresh.push(row);
        }
      }
      if (fresh.length) requestAnimationFrame(() => { const f = now(); for (const row of fresh) row[3] = f; });
    };
    new MutationObserver(record).observe(document.body, { subtree: true, attributes: true, childList: true, attributeFilter: ["data-state"] });
    record();
    window.__records = records;
  });
  say({ step: "observing" });
  await lines.next();
  // The last frame callbacks run before we read.
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
  say({ records: await page.evaluate(() => window.__records), page_errors: errors });
} catch (err) {
  say({ error: String(err?.stack ?? err), page_errors: errors });
  process.exitCode = 1;
} finally {
  stdin.close();
  await browser.close();
}
