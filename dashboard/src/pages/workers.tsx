// Workers: the catalog listed once, then followed live by WatchWorkers from the listing's sequence.
import { useEffect, useState } from "preact/hooks";
import { workers } from "../api.js";
import { problem, type Problem } from "../errors.js";
import { bytes, enumName, leaf, toolName } from "../format.js";
import { WorkerStatus, type Worker } from "../gen/maw/registry/v1/resources_pb.js";
import { WorkerEventType } from "../gen/maw/registry/v1/worker_service_pb.js";
import { ErrorBanner, LinkBadge, Loading } from "../ui.js";
import { runWatch, type LinkState } from "../watch.js";

async function listAll(): Promise<{ items: Map<string, Worker>; sequence: bigint }> {
  const items = new Map<string, Worker>();
  let pageToken = "";
  let sequence = 0n;
  do {
    const page = await workers.listWorkers({ pageSize: 500, pageToken });
    page.workers.forEach((w) => items.set(w.name, w));
    if (!pageToken) sequence = page.sequence;
    pageToken = page.nextPageToken;
  } while (pageToken);
  return { items, sequence };
}

export function Workers() {
  const [items, setItems] = useState<Map<string, Worker>>();
  const [link, setLink] = useState<LinkState>("connecting");
  const [err, setErr] = useState<Problem>();
  const [attempt, setAttempt] = useState(0);

  useEffect(() => {
    let stop = () => {};
    let current = new Map<string, Worker>();
    listAll()
      .then(({ items: listed, sequence }) => {
        current = listed;
        setItems(new Map(current));
        setErr(undefined);
        stop = runWatch(
          {
            open: (after, signal) => workers.watchWorkers({ afterSequence: after }, { signal }),
            apply: (resp) => {
              let last: bigint | undefined;
              for (const ev of resp.events) {
                if (!ev.worker) continue;
                if (ev.type === WorkerEventType.REMOVED) current.delete(ev.worker.name);
                else current.set(ev.worker.name, ev.worker);
                last = ev.sequence;
              }
              setItems(new Map(current));
              return last;
            },
            resync: async () => {
              const again = await listAll();
              current = again.items;
              setItems(new Map(current));
              return again.sequence;
            },
            onState: (s) => setLink(s),
          },
          sequence,
        );
      })
      .catch((e) => setErr(problem(e)));
    return () => stop();
  }, [attempt]);

  return (
    <section>
      <div class="title">
        <h1>Workers</h1>
        <LinkBadge state={link} />
      </div>
      <ErrorBanner problem={err} onRetry={() => setAttempt(attempt + 1)} />
      {!items && !err && <Loading />}
      {items && items.size === 0 && (
        <p class="empty">No worker is enrolled yet. Enroll a machine with `maw-agent enroll` (docs/agent.md).</p>
      )}
      {items && items.size > 0 && (
        <table class="grid" data-testid="workers">
          <thead>
            <tr>
              <th>Worker</th>
              <th>Status</th>
              <th>Tools</th>
              <th>CPU</th>
              <th>Memory</th>
              <th>Slots</th>
              <th>Current work</th>
            </tr>
          </thead>
          <tbody>
            {[...items.values()]
              .sort((a, b) => a.name.localeCompare(b.name))
              .map((w) => {
                const status = enumName(WorkerStatus, w.status, "").toLowerCase();
                const r = w.resources;
                return (
                  <tr key={w.name} data-worker={w.name} data-status={status}>
                    <td>
                      <div>{w.displayName || leaf(w.name)}</div>
                      <div class="muted">{w.hostname}</div>
                    </td>
                    <td>
                      <span class={`pill status-${status}`}>{status}</span>
                    </td>
                    <td>{w.tools.map((t) => toolName(t.kind)).join(", ") || "—"}</td>
                    <td>{r ? `${r.cpuPercent.toFixed(0)} % of ${r.cpuCount}` : "—"}</td>
                    <td>{r && r.memoryTotalBytes ? `${bytes(r.memoryUsedBytes)} / ${bytes(r.memoryTotalBytes)}` : "—"}</td>
                    <td>
                      {w.slotsInUse} / {w.capacitySlots || w.declaredSlots}
                    </td>
                    <td>
                      {w.assignments.length === 0
                        ? "idle"
                        : w.assignments.map((a) => {
                            const [, task] = a.subtask.split("/");
                            return (
                              <div>
                                <a href={`#/tasks/${task}`}>{a.subtask.replace(/^tasks\//, "")}</a> {a.progressPercent} %
                              </div>
                            );
                          })}
                    </td>
                  </tr>
                );
              })}
          </tbody>
        </table>
      )}
    </section>
  );
}
