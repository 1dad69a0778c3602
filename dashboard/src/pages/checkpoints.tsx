// Checkpoint inbox: open checkpoints, each with what it is about, and the decision form (approve, reject,
// or ask for a revision with feedback, for the task's future subtasks too), with the scores, reviews, voting
// round and rollback of earlier checkpoints (judgement.tsx). Degrades to a notice while the evaluator lacks them.
import { useEffect, useState } from "preact/hooks";
import { checkpoints } from "../api.js";
import { isUnimplemented, problem, type Problem } from "../errors.js";
import { enumName, leaf, when } from "../format.js";
import { FeedbackType } from "../gen/maw/common/v1/work_pb.js";
import { CheckpointDecision, CheckpointTrigger, type Checkpoint } from "../gen/maw/evaluator/v1/resources_pb.js";
import type { GetCheckpointResponse } from "../gen/maw/evaluator/v1/checkpoint_service_pb.js";
import { ErrorBanner, FieldError, Loading } from "../ui.js";
import { History, Solutions, Subject } from "./judgement.js";

const REFRESH_MS = 3000;
const DECISIONS = [
  [CheckpointDecision.APPROVE, "Approve"],
  [CheckpointDecision.CORRECT, "Ask for a revision"],
  [CheckpointDecision.REJECT, "Reject"],
] as const;

export function Checkpoints() {
  const [list, setList] = useState<Checkpoint[]>();
  const [unavailable, setUnavailable] = useState(false);
  const [err, setErr] = useState<Problem>();
  const [selected, setSelected] = useState<string>();
  const [tick, setTick] = useState(0);

  useEffect(() => {
    let alive = true;
    let timer: ReturnType<typeof setTimeout>;
    const load = async () => {
      try {
        const reply = await checkpoints.listCheckpoints({ pageSize: 100, filter: "state = OPEN" });
        if (!alive) return;
        setList(reply.checkpoints);
        setErr(undefined);
      } catch (e) {
        if (!alive) return;
        if (isUnimplemented(e)) {
          setUnavailable(true);
          return; // nothing to poll for
        }
        setErr(problem(e));
      }
      timer = setTimeout(load, REFRESH_MS);
    };
    void load();
    return () => {
      alive = false;
      clearTimeout(timer);
    };
  }, [tick]);

  if (unavailable) {
    return (
      <section>
        <h1>Checkpoints</h1>
        <p class="notice" data-testid="checkpoints-unavailable">
          Checkpoints are not available yet: the evaluator on this server does not implement them. Tasks run
          without human checkpoints until it does.
        </p>
      </section>
    );
  }
  return (
    <section>
      <div class="title">
        <h1>Checkpoints</h1>
      </div>
      <ErrorBanner problem={err} />
      {!list && !err && <Loading />}
      {list && list.length === 0 && <p class="empty">No checkpoint waits for a decision.</p>}
      {list && list.length > 0 && (
        <div class="detail">
          <ul class="inbox" data-testid="checkpoints">
            {list.map((c) => (
              <li key={c.name}>
                <button type="button" class={selected === c.name ? "selected" : ""} onClick={() => setSelected(c.name)} data-checkpoint={c.name}>
                  <strong>{enumName(CheckpointTrigger, c.trigger, "").toLowerCase().replace(/_/g, " ")}</strong> · {leaf(c.task)}
                  <div class="muted">{c.reason} — {when(c.createTime)}</div>
                </button>
              </li>
            ))}
          </ul>
          {selected && <Decide key={selected} name={selected} onDone={() => { setSelected(undefined); setTick(tick + 1); }} />}
        </div>
      )}
    </section>
  );
}

function Decide({ name, onDone }: { name: string; onDone: () => void }) {
  const [detail, setDetail] = useState<GetCheckpointResponse>();
  const [decision, setDecision] = useState(CheckpointDecision.APPROVE);
  const [feedbackType, setFeedbackType] = useState(FeedbackType.OTHER);
  const [text, setText] = useState("");
  const [comment, setComment] = useState("");
  const [future, setFuture] = useState(false);
  const [solution, setSolution] = useState("");
  const [err, setErr] = useState<Problem>();
  const [busy, setBusy] = useState(false);

  useEffect(() => {
    checkpoints.getCheckpoint({ name }).then(setDetail).catch((e) => setErr(problem(e)));
  }, [name]);

  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    setErr(undefined);
    try {
      await checkpoints.decideCheckpoint({
        name,
        decision,
        feedback: text.trim() ? [{ type: feedbackType, text }] : [],
        comment,
        applyToFuture: decision === CheckpointDecision.CORRECT && future,
        selectedSolution: solution,
        etag: detail?.checkpoint?.etag ?? "",
        requestId: crypto.randomUUID(),
      });
      onDone();
    } catch (error) {
      setErr(problem(error));
    } finally {
      setBusy(false);
    }
  };

  return (
    <form class="card decide" onSubmit={submit} aria-label="Decide checkpoint" data-testid="decide">
      <h2>{detail?.checkpoint?.reason ?? leaf(name)}</h2>
      <ErrorBanner problem={err} />
      {!detail && !err && <Loading />}
      {detail?.subjects.map((s) => <Subject key={s.subtask} s={s} />)}
      {detail?.votingRound && <Solutions round={detail.votingRound} chosen={solution} onChoose={setSolution} />}
      <FieldError problem={err} field="selected_solution" />
      <fieldset>
        <legend>Decision</legend>
        {DECISIONS.map(([d, label]) => (
          <label class="inline">
            <input type="radio" name="decision" value={d} checked={decision === d} onChange={() => setDecision(d)} />
            {label}
          </label>
        ))}
        <FieldError problem={err} field="decision" />
      </fieldset>
      <label>
        Feedback type
        <select name="feedback-type" value={feedbackType} onChange={(e) => setFeedbackType(Number(e.currentTarget.value))}>
          {[FeedbackType.WRONG_APPROACH, FeedbackType.INCOMPLETE, FeedbackType.BUG, FeedbackType.STYLE, FeedbackType.MISSING_FEATURE, FeedbackType.OTHER].map((t) => (
            <option value={t}>{enumName(FeedbackType, t, "").toLowerCase().replace(/_/g, " ")}</option>
          ))}
        </select>
      </label>
      <label>
        Feedback
        <textarea name="feedback" rows={3} value={text} onInput={(e) => setText(e.currentTarget.value)} />
        <FieldError problem={err} field="feedback" prefix />
      </label>
      <label class="inline">
        <input type="checkbox" name="apply-to-future" checked={future} onChange={(e) => setFuture(e.currentTarget.checked)} />
        Also give this feedback to the task's subtasks that have not run yet
      </label>
      <label>
        Comment
        <input name="comment" value={comment} onInput={(e) => setComment(e.currentTarget.value)} />
        <FieldError problem={err} field="comment" />
      </label>
      <button type="submit" disabled={busy}>
        {busy ? "Sending…" : "Decide"}
      </button>
      {detail && <History items={detail.history} />}
    </form>
  );
}
