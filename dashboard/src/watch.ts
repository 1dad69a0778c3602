// Watch streams that survive: reconnect with exponential backoff and full jitter, resume after the last
// sequence applied (so nothing is missed and nothing repeats), and report the link state for the UI.
import { Code, ConnectError } from "@connectrpc/connect";

export type LinkState = "connecting" | "live" | "reconnecting";

export interface WatchSpec<R> {
  /** Open the stream for everything after `after`. */
  open(after: bigint, signal: AbortSignal): AsyncIterable<R>;
  /** Apply one response; return the last sequence it carried (undefined: none). */
  apply(response: R): bigint | undefined;
  /** The sequence is older than the server keeps (OUT_OF_RANGE): list again, return where to resume. */
  resync(): Promise<bigint>;
  onState(state: LinkState, detail?: string): void;
}

const BASE_MS = 250;
const CAP_MS = 10_000;
/** A stream open this long without an error counts as live even before its first message. */
const SETTLE_MS = 800;

export function backoffMs(failures: number, random: () => number = Math.random): number {
  return Math.floor(random() * Math.min(CAP_MS, BASE_MS * 2 ** failures));
}

/** Run the watch until the returned stop function is called. */
export function runWatch<R>(spec: WatchSpec<R>, after: bigint): () => void {
  const controller = new AbortController();
  const { signal } = controller;
  void (async () => {
    let failures = 0;
    while (!signal.aborted) {
      spec.onState(failures ? "reconnecting" : "connecting");
      const settle = setTimeout(() => spec.onState("live"), SETTLE_MS);
      try {
        for await (const response of spec.open(after, signal)) {
          clearTimeout(settle);
          failures = 0;
          spec.onState("live");
          const seq = spec.apply(response);
          if (seq !== undefined && seq > after) after = seq;
        }
        // The server ended the stream (a restart, a drain): resume from where we are.
      } catch (err) {
        if (signal.aborted) break;
        const e = ConnectError.from(err);
        if (e.code === Code.OutOfRange) {
          try {
            after = await spec.resync();
            clearTimeout(settle);
            continue;
          } catch {
            // fall through to backoff
          }
        }
        spec.onState("reconnecting", e.rawMessage || e.message);
      } finally {
        clearTimeout(settle);
      }
      if (signal.aborted) break;
      failures += 1;
      spec.onState("reconnecting");
      await sleep(backoffMs(failures), signal);
    }
  })();
  return () => controller.abort();
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(t);
      resolve();
    });
  });
}
