// Headless Debian Chromium through playwright-core, set up the same way for tests and benchmarks.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

export async function launch() {
  const profile = mkdtempSync(join(tmpdir(), "maw-chromium-"));
  // A fresh profile per run (playwright passes it to Chromium as --user-data-dir).
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.MAW_CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1366, height: 800 },
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync",
    ],
  });
  const browser = {
    close: async () => {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
  const page = context.pages()[0] ?? (await context.newPage());
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => m.type() === "error" && errors.push(m.text()));
  return { browser, page, errors };
}

export async function waitFor(page, selector, timeout = 15_000) {
  await page.waitForSelector(selector, { timeout });
}

export async function text(page, selector, timeout = 15_000) {
  await page.waitForSelector(selector, { timeout });
  return (await page.textContent(selector)) ?? "";
}
