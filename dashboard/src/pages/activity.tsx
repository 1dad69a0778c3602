// Activity feed: the latest entries, then every new one live from WatchActivity, resumed after the last
// sequence received so a reconnect neither misses nor repeats an entry.
import { useEffect, useState } from "preact/hooks";
import { activity } from "../api.js";
import { problem, type Problem } from "../errors.js";
import { enumName, when } from "../format.js";
import { ActivityLevel, type ActivityEntry } from "../gen/maw/registry/v1/resources_pb.js";
import { ErrorBanner, LinkBadge, Loading } from "../ui.js";
import { runWatch, type LinkState } from "../watch.js";

const KEEP = 500;

export function Activity() {
  const [entries, setEntries] = useState<ActivityEntry[]>();
  const [link, setLink] = useState<LinkState>("connecting");
  const [err, setErr] = useState<Problem>();

  useEffect(() => {
    let stop = () => {};
    let current: ActivityEntry[] = [];
    const list = async () => {
      const reply = await activity.listActivity({ pageSize: 100 });
      current = reply.activityEntries;
      setEntries(current);
      return reply.sequence;
    };
    list()
      .then((sequence) => {
        stop = runWatch(
          {
            open: (after, signal) => activity.watchActivity({ afterSequence: after }, { signal }),
            apply: (resp) => {
              const fresh = [...resp.activityEntries].reverse();
              current = [...fresh, ...current].slice(0, KEEP);
              setEntries(current);
              return resp.activityEntries.at(-1)?.sequence;
            },
            resync: list,
            onState: (s) => setLink(s),
          },
          sequence,
        );
      })
      .catch((e) => setErr(problem(e)));
    return () => stop();
  }, []);

  return (
    <section>
      <div class="title">
        <h1>Activity</h1>
        <LinkBadge state={link} />
      </div>
      <ErrorBanner problem={err} />
      {!entries && !err && <Loading />}
      {entries && (
        <ol class="feed" data-testid="activity">
          {entries.map((e) => (
            <li key={String(e.sequence)} class={`level-${enumName(ActivityLevel, e.level, "").toLowerCase()}`} data-verb={e.verb} data-task={e.task} data-sequence={String(e.sequence)}>
              <time>{when(e.time)}</time> <code>{e.verb}</code> {e.summary || e.resource}
              <span class="muted"> — {e.actor?.name}</span>
            </li>
          ))}
        </ol>
      )}
    </section>
  );
}
