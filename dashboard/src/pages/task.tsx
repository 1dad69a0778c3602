// Task detail: the DAG drawn with live states from WatchTask (replayed from the start, then followed and
// resumed after the last sequence), per-subtask progress, streaming logs, evaluation scores and diffs.
import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import { evaluations, tasks } from "../api.js";
import { isUnimplemented, problem, type Problem } from "../errors.js";
import { enumName, leaf, toolName, when } from "../format.js";
import { layout } from "../dag.js";
import { SubtaskState, TaskState, type Subtask, type Task } from "../gen/maw/scheduler/v1/resources_pb.js";
import type { TaskEvent } from "../gen/maw/scheduler/v1/task_service_pb.js";
import { Dimension, Grade, type Evaluation } from "../gen/maw/evaluator/v1/resources_pb.js";
import { ErrorBanner, LinkBadge, Loading } from "../ui.js";
import { runWatch, type LinkState } from "../watch.js";

const MAX_LOG_CHARS = 200_000;
const COL_W = 190;
const ROW_H = 74;
const NODE_W = 160;
const NODE_H = 54;

interface View {
  task?: Task;
  subtasks: Map<string, Subtask>;
  logs: Map<string, string>;
  logEnd: Map<string, bigint>;
  checkpoint?: { name: string; reason: string };
}

function apply(view: View, ev: TaskEvent, decoder: TextDecoder): void {
  const k = ev.kind;
  switch (k.case) {
    case "taskStateChanged":
      if (k.value.task) view.task = k.value.task;
      break;
    case "subtaskStateChanged": {
      // The event carries the fields that changed (state, attempt, worker); keep the rest we know.
      const next = k.value.subtask;
      if (!next) break;
      const known = view.subtasks.get(next.name);
      view.subtasks.set(
        next.name,
        known ? { ...known, state: next.state, attempt: next.attempt, worker: next.worker, stateMessage: k.value.reason || known.stateMessage } : next,
      );
      break;
    }
    case "subtasksAdded":
      k.value.subtasks.forEach((s) => view.subtasks.set(s.name, s));
      break;
    case "subtaskProgress": {
      const s = view.subtasks.get(k.value.subtask);
      if (s) view.subtasks.set(s.name, { ...s, progressPercent: k.value.percent, progressMessage: k.value.message });
      if (view.task) view.task = { ...view.task, progressPercent: k.value.taskProgressPercent };
      break;
    }
    case "subtaskLogChunk": {
      const c = k.value;
      const end = view.logEnd.get(c.subtask) ?? 0n;
      if (c.offset < end) break; // already shown (a replay after reconnect)
      const text = (view.logs.get(c.subtask) ?? "") + decoder.decode(c.data, { stream: true });
      view.logs.set(c.subtask, text.length > MAX_LOG_CHARS ? text.slice(-MAX_LOG_CHARS) : text);
      view.logEnd.set(c.subtask, c.offset + BigInt(c.data.length));
      break;
    }
    case "evaluationCompleted": {
      const s = view.subtasks.get(k.value.subtask);
      if (s) view.subtasks.set(s.name, { ...s, evaluation: k.value.evaluation, evaluationScore: k.value.overallScore, grade: k.value.grade });
      break;
    }
    case "checkpointReached":
      view.checkpoint = { name: k.value.checkpoint, reason: k.value.reason };
      break;
    case "checkpointResolved":
      view.checkpoint = undefined;
      break;
  }
}

const stateName = (s: SubtaskState) => enumName(SubtaskState, s, "").toLowerCase();

export function TaskDetail({ id }: { id: string }) {
  const name = `tasks/${id}`;
  const view = useRef<View>({ subtasks: new Map(), logs: new Map(), logEnd: new Map() });
  const [, setVersion] = useState(0);
  const [link, setLink] = useState<LinkState>("connecting");
  const [err, setErr] = useState<Problem>();
  const [selected, setSelected] = useState<string>();
  const [cancelErr, setCancelErr] = useState<Problem>();

  useEffect(() => {
    const decoder = new TextDecoder();
    let stop = () => {};
    tasks
      .getTask({ name })
      .then((reply) => {
        view.current.task = reply.task;
        setVersion((v) => v + 1);
        stop = runWatch(
          {
            open: (after, signal) => tasks.watchTask({ name, afterSequence: after, includeLogs: true }, { signal }),
            apply: (resp) => {
              let last: bigint | undefined;
              for (const ev of resp.events) {
                apply(view.current, ev, decoder);
                last = ev.sequence;
              }
              setVersion((v) => v + 1);
              return last;
            },
            // WatchTask replays from any sequence it retains; start over when it does not.
            resync: async () => 0n,
            onState: (s) => setLink(s),
          },
          0n,
        );
      })
      .catch((e) => setErr(problem(e)));
    return () => stop();
  }, [name]);

  const { task, subtasks, logs, checkpoint } = view.current;
  // Dependencies are subtask names; accept bare keys too, so drawing never depends on which form arrives.
  const depName = (d: string) => (d.includes("/") ? d : `${name}/subtasks/${d}`);
  const nodes = [...subtasks.values()].map((s) => ({ name: s.name, dependencies: s.dependencies.map(depName) }));
  const shape = nodes.map((n) => `${n.name}<${n.dependencies.join()}`).join(";");
  const placed = useMemo(() => layout(nodes), [shape]);
  if (err) return <ErrorBanner problem={err} />;
  if (!task) return <Loading />;
  const taskState = enumName(TaskState, task.state, "").toLowerCase();
  const pos = new Map(placed.map((p) => [p.name, p]));
  const width = (Math.max(0, ...placed.map((p) => p.column)) + 1) * COL_W;
  const height = (Math.max(0, ...placed.map((p) => p.row)) + 1) * ROW_H;
  const chosen = selected ? subtasks.get(selected) : undefined;
  const cancel = async () => {
    setCancelErr(undefined);
    try {
      await tasks.cancelTask({ name, reason: "cancelled from the dashboard", requestId: crypto.randomUUID() });
    } catch (e) {
      setCancelErr(problem(e));
    }
  };

  return (
    <section data-testid="task" data-task={name} data-state={taskState}>
      <div class="title">
        <h1>{task.displayName || id}</h1>
        <span class={`pill state-${taskState}`} data-testid="task-state">
          {taskState}
        </span>
        <progress max={100} value={task.progressPercent} aria-label="Task progress" /> {task.progressPercent} %
        <LinkBadge state={link} />
        {!["succeeded", "failed", "cancelled", "cancelling"].includes(taskState) && (
          <button type="button" onClick={cancel}>
            Cancel task
          </button>
        )}
      </div>
      <ErrorBanner problem={cancelErr} />
      <p class="muted">{task.description}</p>
      {checkpoint && (
        <div class="notice" role="status">
          Waiting at a checkpoint: {checkpoint.reason}. <a href="#/checkpoints">Decide in the checkpoint inbox</a>.
        </div>
      )}
      <div class="detail">
        <svg class="dag" width={width} height={height} role="group" aria-label="Subtask graph" data-testid="dag">
          {placed.flatMap((p) =>
            (subtasks.get(p.name)?.dependencies ?? []).map((d) => {
              const from = pos.get(depName(d));
              if (!from) return null;
              const x1 = from.column * COL_W + NODE_W;
              const y1 = from.row * ROW_H + NODE_H / 2 + 6;
              const x2 = p.column * COL_W;
              const y2 = p.row * ROW_H + NODE_H / 2 + 6;
              return <path class="edge" d={`M${x1},${y1} C${x1 + 20},${y1} ${x2 - 20},${y2} ${x2},${y2}`} />;
            }),
          )}
          {placed.map((p) => {
            const s = subtasks.get(p.name)!;
            const st = stateName(s.state);
            return (
              <g
                key={p.name}
                class={`node state-${st}${selected === p.name ? " selected" : ""}`}
                transform={`translate(${p.column * COL_W},${p.row * ROW_H + 6})`}
                data-subtask={p.name}
                data-state={st}
                {...{ tabindex: 0 } /* SVG wants the attribute in lower case */}
                role="button"
                aria-label={`${s.key}: ${st}`}
                onClick={() => setSelected(p.name)}
                onKeyDown={(e) => (e.key === "Enter" || e.key === " ") && setSelected(p.name)}
              >
                <rect width={NODE_W} height={NODE_H} rx={8} />
                <text x={10} y={20} class="key">
                  {s.displayName || s.key}
                </text>
                <text x={10} y={38} class="state">
                  {st}
                  {s.attempt > 1 ? ` · try ${s.attempt}` : ""}
                  {s.evaluationScore ? ` · ${s.evaluationScore.toFixed(1)}` : ""}
                </text>
                <rect class="bar" x={10} y={44} width={(NODE_W - 20) * ((s.state === SubtaskState.SUCCEEDED ? 100 : s.progressPercent) / 100)} height={3} />
              </g>
            );
          })}
        </svg>
        <aside class="card subtask" aria-live="polite">
          {chosen ? <SubtaskPanel s={chosen} log={logs.get(chosen.name) ?? ""} /> : <p class="muted">Select a subtask (click, or Tab then Enter) to see its progress, logs, scores and diff.</p>}
        </aside>
      </div>
    </section>
  );
}

function SubtaskPanel({ s: live, log }: { s: Subtask; log: string }) {
  const logRef = useRef<HTMLPreElement>(null);
  // Events carry state changes; the result, times and scores come from GetSubtask when the state moves.
  const [full, setFull] = useState<Subtask>();
  useEffect(() => {
    tasks.getSubtask({ name: live.name }).then((r) => setFull(r.subtask)).catch(() => setFull(undefined));
  }, [live.name, live.state, live.attempt]);
  const s: Subtask = full && full.state === live.state ? { ...full, progressPercent: Math.max(full.progressPercent, live.progressPercent) } : live;
  useEffect(() => {
    const el = logRef.current;
    if (el) el.scrollTop = el.scrollHeight;
  }, [log]);
  const r = s.result;
  return (
    <div data-testid="subtask-panel" data-subtask={s.name}>
      <h2>{s.displayName || s.key}</h2>
      <dl>
        <dt>State</dt>
        <dd>{stateName(s.state)}{s.stateMessage ? ` — ${s.stateMessage}` : ""}</dd>
        <dt>Worker</dt>
        <dd>{s.worker ? leaf(s.worker) : "—"}{s.tool ? ` (${toolName(s.tool.kind)})` : ""}</dd>
        <dt>Attempt</dt>
        <dd>{s.attempt} of {s.maxAttempts || "∞"}</dd>
        <dt>Progress</dt>
        <dd><progress max={100} value={s.progressPercent} /> {s.progressPercent} % {s.progressMessage}</dd>
        {s.unschedulableReason && (
          <>
            <dt>Waiting because</dt>
            <dd class="warn">{s.unschedulableReason.message}</dd>
          </>
        )}
        <dt>Started / ended</dt>
        <dd>{when(s.startTime)} / {when(s.endTime)}</dd>
        {r && (
          <>
            <dt>Result</dt>
            <dd>exit {r.exitCode}{r.summary ? ` — ${r.summary}` : ""}{r.errorMessage ? ` — ${r.errorMessage}` : ""}</dd>
          </>
        )}
      </dl>
      {s.evaluation && <Scores evaluation={s.evaluation} score={s.evaluationScore} grade={s.grade} />}
      {r?.diff?.unifiedDiff && (
        <>
          <h3>Diff</h3>
          <pre class="diff">{r.diff.unifiedDiff.split("\n").map((line) => <div class={line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : ""}>{line}</div>)}</pre>
        </>
      )}
      <h3>Log</h3>
      <pre class="log" ref={logRef} data-testid="log" tabIndex={0}>{log || (r?.output ?? "") || "No output yet."}</pre>
    </div>
  );
}

function Scores({ evaluation, score, grade }: { evaluation: string; score: number; grade: Grade }) {
  const [ev, setEv] = useState<Evaluation>();
  const [note, setNote] = useState("");
  useEffect(() => {
    evaluations
      .getEvaluation({ name: evaluation })
      .then((r) => setEv(r.evaluation))
      .catch((e) => setNote(isUnimplemented(e) ? "Per-dimension scores are not available yet." : problem(e).message));
  }, [evaluation]);
  return (
    <div class="scores">
      <h3>Evaluation: {score.toFixed(1)} ({enumName(Grade, grade, "").toLowerCase()})</h3>
      {note && <p class="muted">{note}</p>}
      {ev && (
        <table class="grid">
          <tbody>
            {ev.dimensions.map((d) => (
              <tr>
                <td>{enumName(Dimension, d.dimension, "").toLowerCase().replace(/_/g, " ")}</td>
                <td>{d.score.toFixed(1)}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </div>
  );
}
