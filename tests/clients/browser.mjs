// A real headless Chromium (Debian's, through playwright-core) on the test page; the test calls the page's
// functions ({"call": name, "args": [...]} on stdin) and gets back what the page reports and returns.
import { chromium } from "playwright-core";
import { args, cleanups, command, emit, run } from "./lib.mjs";

run(async () => {
  const browser = await chromium.launch({ executablePath: args.chromium ?? "/usr/bin/chromium", headless: true });
  cleanups.push(() => browser.close());
  try {
    const page = await browser.newPage();
    await page.exposeFunction("report", (obj) => emit({ kind: "page", ...obj }));
    page.on("console", (m) => emit({ kind: "console", type: m.type(), text: m.text() }));
    page.on("pageerror", (e) => emit({ kind: "pageerror", error: String(e) }));
    await page.goto(args.page);
    emit({ kind: "ready", origin: await page.evaluate(() => location.origin), version: browser.version() });
    for (let cmd = await command(); cmd && cmd.call; cmd = await command()) {
      const result = await page.evaluate(([name, a]) => window[name](...a), [cmd.call, cmd.args ?? []]);
      emit({ kind: "called", name: cmd.call, result });
    }
    return { console: null };
  } finally {
    await browser.close();
  }
});
