// node tests/browser/inspector.mjs URL SCREENSHOT
// Opens the exposr client's inspector page in Debian's headless chromium, waits for a
// captured request row, clicks its Replay button, waits for the replayed row and saves
// a screenshot. Prints one line per step; exits non-zero on any failure.
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [url, screenshot] = process.argv.slice(2);
if (!url || !screenshot) {
  console.error("usage: node inspector.mjs URL SCREENSHOT");
  process.exit(2);
}
const profile = mkdtempSync(join(tmpdir(), "exposr-inspector-chromium-"));
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-background-networking", "--disable-component-update"],
    viewport: { width: 1200, height: 700 },
    timeout: 30000,
  });
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(20000);
  await page.goto(url);
  await page.locator("#conn", { hasText: "live" }).waitFor();
  console.log("page loaded");
  // the row of a request made through the tunnel (already there, or arriving live)
  const first = page.locator("tr.row").filter({ hasNotText: "replay of" }).first();
  await first.waitFor();
  const id = await first.getAttribute("data-id");
  await page.locator(`#r${id} td.status`).filter({ hasText: /\d{3}/ }).waitFor();
  console.log(`request row #${id} seen`);
  await first.click();
  await page.locator("#detail h3").first().waitFor();
  await first.locator("button.replay").click();
  await page.locator("tr.row", { hasText: `replay of #${id}` }).locator("td.status")
    .filter({ hasText: /\d{3}/ }).waitFor();
  console.log(`replay of #${id} seen`);
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`screenshot ${screenshot}`);
} catch (e) {
  console.error(`browser test failed: ${e.message}`);
  process.exitCode = 1;
} finally {
  if (context) await context.close();
  rmSync(profile, { recursive: true, force: true });
}
