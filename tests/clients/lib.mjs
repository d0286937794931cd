// What every client script shares: its arguments, a JSON-lines channel with the pytest test that drives it
// (stdout: reports, stdin: commands), and a deadline, so a client that waits for ever ends the test instead.
import { createInterface } from "node:readline";

export const args = JSON.parse(process.argv[2] ?? "{}");

/** Report one thing to the test (one JSON object per line). */
export function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

/** The test's next command (a JSON object), or null once it closed stdin. */
export async function command() {
  const { value, done } = await lines.next();
  return done ? null : JSON.parse(value);
}

/** What to undo before a script gives up (a browser to close: exiting alone would orphan its processes). */
export const cleanups = [];

/** Run `main`, report its result or its error, and exit; give up after args.deadline_ms (default 40 s). */
export function run(main) {
  const timer = setTimeout(async () => {
    emit({ kind: "timeout", after_ms: args.deadline_ms ?? 40000 });
    await Promise.race([Promise.allSettled(cleanups.map((undo) => undo())), new Promise((r) => setTimeout(r, 5000))]);
    process.exit(3);
  }, args.deadline_ms ?? 40000);
  timer.unref();
  main().then(
    (result) => {
      emit({ kind: "result", result: result ?? null });
      process.exit(0);
    },
    (err) => {
      emit({ kind: "failed", error: String(err?.stack ?? err), status: err?.status ?? null, body: err?.error ?? null });
      process.exit(2);
    },
  );
}
