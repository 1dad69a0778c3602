// A person decides a checkpoint in headless Chromium (driven by tests/e2e/test_dashboard.py): the task's page
// says it waits at a checkpoint, the link leads to the inbox (scores per dimension with their evidence), a revision without words gets the server's field
// message next to the feedback box, a revision with words is sent, and the task's page then shows it moving
// on to done. Prints {"result": {...}} (or {"error": ...}); screenshots go to $MAW_ARTIFACTS.
import { launch, text, waitFor } from "./browser.mjs";

const task = process.env.MAW_TASK;
const checkpoint = process.env.MAW_CHECKPOINT;
const words = process.env.MAW_FEEDBACK;
const artifacts = process.env.MAW_ARTIFACTS;
const result = {};
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const shot = (page, name) => page.screenshot({ path: `${artifacts}/${name}.png`, fullPage: true });

const { browser, page, errors } = await launch();
try {
  await page.goto(process.env.MAW_URL);
  await page.getByLabel("User name").fill(process.env.MAW_USER);
  await page.getByLabel("Password").fill(process.env.MAW_PASSWORD);
  await page.keyboard.press("Enter");
  await waitFor(page, "[data-testid=who]");

  // The task's page: waiting at the checkpoint, with the way to the inbox.
  await page.evaluate((id) => (window.location.hash = `#/tasks/${id}`), task.split("/").pop());
  await waitFor(page, `[data-testid=task][data-task="${task}"]`);
  await waitFor(page, "[data-testid=task][data-state=waiting_checkpoint]");
  result.task_state_before = await page.getAttribute("[data-testid=task]", "data-state");
  result.notice = await text(page, ".notice[role=status]");
  await shot(page, "checkpoint-task-waiting");
  await page.getByRole("link", { name: "Decide in the checkpoint inbox" }).click();

  // The inbox: open this checkpoint; the form shows what it is about (the weak diff and its score).
  await page.click(`[data-testid=checkpoints] button[data-checkpoint="${checkpoint}"]`);
  await waitFor(page, "[data-testid=decide] .subject");
  result.subject = await text(page, "[data-testid=decide] .subject");
  result.dimensions = await text(page, "[data-testid=decide] [data-testid=dimensions]");
  result.verdict = await text(page, "[data-testid=decide] [data-testid=verdict]");

  // A revision needs words: the server says so, next to the feedback box, and nothing is decided.
  await page.getByLabel("Ask for a revision").check();
  await page.getByRole("button", { name: "Decide" }).click();
  result.feedback_error = await text(page, '[data-testid=decide] [data-field="feedback"]');
  await shot(page, "checkpoint-feedback-error");
  result.still_listed = (await page.$(`[data-testid=checkpoints] button[data-checkpoint="${checkpoint}"]`)) !== null;

  // With words, sent: the checkpoint leaves the inbox.
  await page.getByLabel("Feedback type").selectOption({ label: "wrong approach" });
  await page.locator("[data-testid=decide] textarea[name=feedback]").fill(words);
  await page.getByRole("button", { name: "Decide" }).click();
  await page.waitForSelector(`button[data-checkpoint="${checkpoint}"]`, { state: "detached", timeout: 15_000 });
  result.decided = true;
  await shot(page, "checkpoint-decided");

  // Back on the task's page: the correction runs and the task finishes.
  await page.evaluate((id) => (window.location.hash = `#/tasks/${id}`), task.split("/").pop());
  await waitFor(page, "[data-testid=task][data-state=succeeded]", 60_000);
  result.task_state_after = await page.getAttribute("[data-testid=task]", "data-state");
  result.nodes = await page.$$eval("svg [data-subtask]", (gs) => Object.fromEntries(gs.map((g) => [g.getAttribute("data-subtask").split("/").pop(), g.getAttribute("data-state")])));
  await shot(page, "checkpoint-task-done");
  result.page_errors = [...errors];
  say({ result });
} catch (err) {
  await shot(page, "checkpoint-failure").catch(() => {});
  say({ error: String(err?.stack ?? err), result, page_errors: errors });
  process.exitCode = 1;
} finally {
  await browser.close();
}
