// What a person needs at a checkpoint beyond the diff: each dimension's score with its evidence, the peer
// reviews (and why one could not be used), the voting round's ranking with a way to choose another
// solution, and rollback to an earlier checkpoint with a preview of what it resets.
import { useState } from "preact/hooks";
import { checkpoints } from "../api.js";
import { problem, type Problem } from "../errors.js";
import { enumName, leaf, toolName, when } from "../format.js";
import { Severity } from "../gen/maw/common/v1/work_pb.js";
import type { CheckpointSubject, PreviewRollbackResponse } from "../gen/maw/evaluator/v1/checkpoint_service_pb.js";
import {
  CheckpointState,
  CheckpointTrigger,
  Dimension,
  ReviewState,
  Verdict,
  VotingState,
  type Checkpoint,
  type VotingRound,
} from "../gen/maw/evaluator/v1/resources_pb.js";
import { ErrorBanner } from "../ui.js";

const words = (e: Record<number | string, string | number>, v: number) => enumName(e, v, "").toLowerCase().replace(/_/g, " ");

/** One subtask the checkpoint is about: its scores per dimension with evidence, and its peer reviews. */
export function Subject({ s }: { s: CheckpointSubject }) {
  const evaluation = s.evaluation;
  return (
    <div class="subject" data-testid="subject">
      <h3>{s.displayName || leaf(s.subtask)}</h3>
      <p>{s.summary}</p>
      {evaluation && (
        <>
          <p data-testid="verdict">
            Score {evaluation.overallScore.toFixed(1)} · {words(Verdict, evaluation.verdict)} — {evaluation.verdictReason}
          </p>
          <table class="scores" data-testid="dimensions">
            <tbody>
              {evaluation.dimensions.map((d) => (
                <tr key={d.dimension}>
                  <th>{words(Dimension, d.dimension)}</th>
                  <td>{d.measured ? d.score.toFixed(1) : "not measured"}</td>
                  <td>
                    {d.measured && d.summary}
                    {d.evidence.slice(0, 5).map((f) => (
                      <div class="muted">
                        {words(Severity, f.severity)} {f.path}
                        {f.line ? `:${f.line}` : ""} {f.message} ({f.scorer})
                      </div>
                    ))}
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </>
      )}
      {s.reviews.length > 0 && (
        <ul class="reviews" data-testid="reviews">
          {s.reviews.map((r) => (
            <li key={r.name}>
              {leaf(r.reviewer)} ({toolName(r.reviewerTool?.kind ?? 0)}): {words(ReviewState, r.state)}
              {r.state === ReviewState.VALID && ` · ${r.overallScore.toFixed(1)} · ${words(Verdict, r.recommendation)} — ${r.summary}`}
              {r.error && <span class="error"> — {r.error}</span>}
            </li>
          ))}
        </ul>
      )}
      {s.history.length > 0 && <p class="muted">{s.history.length} earlier evaluation(s) of this work.</p>}
      {s.diff?.unifiedDiff && <pre class="diff">{s.diff.unifiedDiff}</pre>}
    </div>
  );
}

/** The competing solutions of a voting round, best first, with a choice that overrides the vote. */
export function Solutions({ round, chosen, onChoose }: { round: VotingRound; chosen: string; onChoose: (name: string) => void }) {
  return (
    <fieldset data-testid="solutions">
      <legend>
        Voting round: {words(VotingState, round.state)} — {round.decisionReason}
      </legend>
      {round.solutions.map((sol) => (
        <label class="inline solution" key={sol.name}>
          <input type="radio" name="solution" value={sol.name} checked={chosen === sol.name} onChange={() => onChoose(sol.name)} />
          {sol.rank ? `#${sol.rank} ` : ""}
          {leaf(sol.subtask)} by {leaf(sol.worker)} ({toolName(sol.tool?.kind ?? 0)}): score {sol.score.toFixed(1)}, {sol.totalPoints.toFixed(2)} points
          {sol.selected ? " · the vote's choice" : ""}
        </label>
      ))}
      <label class="inline">
        <input type="radio" name="solution" value="" checked={chosen === ""} onChange={() => onChoose("")} />
        Keep the vote's result
      </label>
    </fieldset>
  );
}

/** The task's earlier checkpoints, each with a rollback that is previewed before it is done. */
export function History({ items }: { items: Checkpoint[] }) {
  if (items.length === 0) return null;
  return (
    <div class="history" data-testid="history">
      <h3>Earlier checkpoints</h3>
      <ul>
        {items.map((c) => (
          <li key={c.name}>
            {words(CheckpointTrigger, c.trigger)}: {c.reason} — {words(CheckpointState, c.state)} {when(c.createTime)}
            <Rollback checkpoint={c} />
          </li>
        ))}
      </ul>
    </div>
  );
}

function Rollback({ checkpoint }: { checkpoint: Checkpoint }) {
  const [preview, setPreview] = useState<PreviewRollbackResponse>();
  const [err, setErr] = useState<Problem>();
  const [done, setDone] = useState(false);
  const show = async () => {
    setErr(undefined);
    try {
      setPreview(await checkpoints.previewRollback({ name: checkpoint.name }));
    } catch (e) {
      setErr(problem(e));
    }
  };
  const rollBack = async () => {
    setErr(undefined);
    try {
      await checkpoints.rollbackToCheckpoint({ name: checkpoint.name, etag: preview?.etag ?? "", requestId: crypto.randomUUID() });
      setDone(true);
    } catch (e) {
      setErr(problem(e));
    }
  };
  const effect = preview?.effect;
  return (
    <div class="rollback" data-checkpoint={checkpoint.name}>
      <ErrorBanner problem={err} />
      {!preview && (
        <button type="button" onClick={show}>
          Preview rollback
        </button>
      )}
      {effect && !done && (
        <div data-testid="rollback-preview">
          <p>
            Resets {effect.resetSubtasks.map(leaf).join(", ") || "nothing"}
            {effect.cancelledSubtasks.length > 0 && ` (stops ${effect.cancelledSubtasks.map(leaf).join(", ")})`}; closes{" "}
            {effect.closedCheckpoints.length} checkpoint(s); progress goes back to {effect.progressPercent} %.
          </p>
          <button type="button" onClick={rollBack}>
            Roll back
          </button>
        </div>
      )}
      {done && <p class="notice" data-testid="rolled-back">Rolled back; the task runs again.</p>}
    </div>
  );
}
