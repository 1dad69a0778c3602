// A person rolls a task back to an earlier checkpoint from the inbox in headless Chromium (driven by
// tests/e2e/test_dashboard.py): the open checkpoint's card lists the task's earlier checkpoints, the preview
// says what a rollback resets, and "Roll back" does it. Prints {"result": {...}} (or {"error": ...}).
import { launch, text, waitFor } from "./browser.mjs";

const open = process.env.MAW_CHECKPOINT;
const earlier = process.env.MAW_EARLIER;
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

  await page.evaluate(() => (window.location.hash = "#/checkpoints"));
  await page.click(`[data-testid=checkpoints] button[data-checkpoint="${open}"]`);
  await waitFor(page, "[data-testid=decide] [data-testid=history]");
  result.history = await text(page, "[data-testid=decide] [data-testid=history]");

  const row = `[data-testid=history] .rollback[data-checkpoint="${earlier}"]`;
  await page.click(`${row} button`);
  await waitFor(page, `${row} [data-testid=rollback-preview]`);
  result.preview = await text(page, `${row} [data-testid=rollback-preview]`);
  await shot(page, "rollback-preview");
  await page.getByRole("button", { name: "Roll back" }).click();
  await waitFor(page, `${row} [data-testid=rolled-back]`);
  result.rolled_back = await text(page, `${row} [data-testid=rolled-back]`);
  await shot(page, "rollback-done");
  result.page_errors = [...errors];
  say({ result });
} catch (err) {
  await shot(page, "rollback-failure").catch(() => {});
  say({ error: String(err?.stack ?? err), result, page_errors: errors });
  process.exitCode = 1;
} finally {
  await browser.close();
}
