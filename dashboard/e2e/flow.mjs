// The dashboard walked through by a person, in headless Chromium (driven by tests/e2e/test_dashboard.py).
// Prints one JSON object per line: {"step": ...} as it goes (the test reacts to "waiting-for-worker"),
// and finally {"result": {...}} with what it saw. Screenshots go to $MAW_ARTIFACTS.
import { createInterface } from "node:readline";
import { launch, text, waitFor } from "./browser.mjs";

const url = process.env.MAW_URL;
const user = process.env.MAW_USER;
const password = process.env.MAW_PASSWORD;
const worker = process.env.MAW_WORKER;
const artifacts = process.env.MAW_ARTIFACTS;
const result = {};
const stdin = createInterface({ input: process.stdin });
const lines = stdin[Symbol.asyncIterator]();
const nextLine = async () => (await lines.next()).value ?? "";
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const shot = (page, name) => page.screenshot({ path: `${artifacts}/${name}.png`, fullPage: true });

const { browser, page, errors } = await launch();
try {
  await page.goto(url);
  await page.getByLabel("User name").fill(user);
  await page.getByLabel("Password").fill("wrong-password");
  await page.keyboard.press("Enter");
  result.bad_login_error = await text(page, "[data-testid=error]");
  await page.getByLabel("Password").fill(password);
  await page.keyboard.press("Enter");
  await waitFor(page, "[data-testid=who]");
  result.signed_in_as = await text(page, "[data-testid=who]");

  // Workers: the page is open and live before the agent starts; its row must turn online by itself.
  await waitFor(page, "[data-testid=link-state][data-state=live]");
  say({ step: "waiting-for-worker" });
  await waitFor(page, `tr[data-worker="${worker}"][data-status=online]`, 30_000);
  result.worker_online = true;
  result.worker_row = await text(page, `tr[data-worker="${worker}"]`);
  await shot(page, "workers");

  // Tasks: bad input first, the server's field messages shown next to the fields.
  await page.getByRole("link", { name: "Tasks" }).click();
  await page.getByRole("button", { name: "New task" }).click();
  await page.getByLabel("Subtask 2 depends on").fill("nowhere");
  await page.getByRole("button", { name: "Create task" }).click();
  result.description_error = await text(page, '[data-field="task.description"]');
  await page.getByLabel("Description").fill("Browser test: a small DAG on the test tool");
  await page.getByRole("button", { name: "Create task" }).click();
  result.dependency_error = await text(page, '[data-field="graph.subtasks[1]"]');
  await shot(page, "create-task-errors");

  // A valid DAG: design -> (build, test) -> ship.
  await page.getByLabel("Name").fill("browser-dag");
  await page.getByLabel("Subtask 2 depends on").fill("design");
  await page.getByRole("button", { name: "Add subtask" }).click();
  await page.getByLabel("Subtask 3 key").fill("test");
  await page.getByLabel("Subtask 3 depends on").fill("design");
  await page.getByRole("button", { name: "Add subtask" }).click();
  await page.getByLabel("Subtask 4 key").fill("ship");
  await page.getByLabel("Subtask 4 depends on").fill("build, test");
  for (const i of [1, 2, 3, 4]) {
    await page.getByLabel(`Subtask ${i} tool options`).fill(`{"sleep_s": 0.4, "echo": "hello from step ${i}", "progress": 50}`);
  }
  await page.getByRole("button", { name: "Create task" }).click();
  await waitFor(page, "[data-testid=dag]");
  result.task = await page.getAttribute("[data-testid=task]", "data-task");
  // Watch the DAG advance: record every state each node shows until the task is done.
  result.seen_states = await page.evaluate(
    () =>
      new Promise((resolve) => {
        const seen = {};
        const record = () => {
          for (const g of document.querySelectorAll("[data-subtask]")) {
            const key = g.getAttribute("data-subtask").split("/").pop();
            const state = g.getAttribute("data-state");
            seen[key] ??= [];
            if (seen[key].at(-1) !== state) seen[key].push(state);
          }
          const done = document.querySelector("[data-testid=task]")?.getAttribute("data-state") === "succeeded";
          if (done) {
            observer.disconnect();
            record.final = true;
            resolve(seen);
          }
        };
        const observer = new MutationObserver(record);
        observer.observe(document.body, { subtree: true, attributes: true, childList: true });
        record();
        setTimeout(() => resolve(seen), 30_000);
      }),
  );
  result.task_state = await page.getAttribute("[data-testid=task]", "data-state");
  await page.locator('[data-subtask$="/ship"]').focus();
  await page.keyboard.press("Enter");
  await waitFor(page, "[data-testid=subtask-panel]");
  result.ship_log = await text(page, "[data-testid=log]");
  await shot(page, "task-done");

  // Checkpoints: decided when the evaluator implements them; otherwise the page must say so.
  await page.getByRole("link", { name: "Checkpoints" }).click();
  await page.waitForSelector("[data-testid=checkpoints-unavailable], [data-testid=checkpoints], .empty", { timeout: 10_000 });
  result.checkpoints = (await page.$("[data-testid=checkpoints-unavailable]")) ? "unavailable" : "available";
  await shot(page, "checkpoints");

  // Activity: the feed shows the task's creation.
  await page.getByRole("link", { name: "Activity" }).click();
  await waitFor(page, "[data-testid=activity] li");
  result.activity_verbs = await page.$$eval("[data-testid=activity] li", (lis) => lis.map((li) => li.getAttribute("data-verb")));
  await shot(page, "activity");

  // The gateway goes away and comes back: the feed says "reconnecting", then resumes after the last entry
  // it had, so what happened meanwhile appears (the test creates a task while the gateway is down).
  await waitFor(page, "[data-testid=link-state][data-state=live]");
  result.page_errors = [...errors];
  say({ step: "stop-gateway" });
  await waitFor(page, "[data-testid=link-state][data-state=reconnecting]", 20_000);
  result.saw_reconnecting = true;
  await shot(page, "activity-reconnecting");
  const created = (await nextLine()).trim();
  await waitFor(page, "[data-testid=link-state][data-state=live]", 30_000);
  await waitFor(page, `[data-testid=activity] li[data-task="${created}"]`, 20_000);
  result.resumed_with = await page.$$eval(`[data-testid=activity] li[data-task="${created}"]`, (lis) => lis.map((li) => li.getAttribute("data-verb")));
  const sequences = await page.$$eval("[data-testid=activity] li", (lis) => lis.map((li) => li.getAttribute("data-sequence")));
  result.duplicate_entries = sequences.length - new Set(sequences).size;
  // During the outage Chromium logs the failed requests; anything else is a defect.
  result.errors_during_outage = errors.slice(result.page_errors.length).filter((e) => !e.startsWith("Failed to load resource"));
  say({ result });
} catch (err) {
  await shot(page, "failure").catch(() => {});
  say({ error: String(err?.stack ?? err), result, page_errors: errors });
  process.exitCode = 1;
} finally {
  stdin.close();
  await browser.close();
}
