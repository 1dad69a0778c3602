// Tasks: the list with a state filter (refreshed every few seconds) and the create form, from a template
// or as a small DAG. The server's field violations appear next to the field they name.
import { create, type JsonObject } from "@bufbuild/protobuf";
import { useEffect, useState } from "preact/hooks";
import { tasks, templates } from "../api.js";
import { problem, type Problem } from "../errors.js";
import { enumName, leaf, when } from "../format.js";
import { ToolKind } from "../gen/maw/common/v1/machine_pb.js";
import { Priority } from "../gen/maw/common/v1/work_pb.js";
import { TaskState, type Task, type Template, SubtaskSpecSchema, TaskSchema } from "../gen/maw/scheduler/v1/resources_pb.js";
import { SubtaskGraphSchema, type CreateTaskRequest } from "../gen/maw/scheduler/v1/task_service_pb.js";
import { ErrorBanner, FieldError, Loading } from "../ui.js";

const STATES = ["", "PENDING", "RUNNING", "WAITING_CHECKPOINT", "SUCCEEDED", "FAILED", "CANCELLED"];
const REFRESH_MS = 2000;

export function Tasks() {
  const [filter, setFilter] = useState("");
  const [list, setList] = useState<Task[]>();
  const [err, setErr] = useState<Problem>();
  const [creating, setCreating] = useState(false);

  useEffect(() => {
    let alive = true;
    let timer: ReturnType<typeof setTimeout>;
    const load = async () => {
      try {
        const reply = await tasks.listTasks({ pageSize: 100, filter: filter ? `state = ${filter}` : "" });
        if (alive) {
          setList(reply.tasks);
          setErr(undefined);
        }
      } catch (e) {
        if (alive) setErr(problem(e));
      }
      if (alive) timer = setTimeout(load, REFRESH_MS);
    };
    void load();
    return () => {
      alive = false;
      clearTimeout(timer);
    };
  }, [filter]);

  return (
    <section>
      <div class="title">
        <h1>Tasks</h1>
        <label class="inline">
          State
          <select name="state-filter" value={filter} onChange={(e) => setFilter(e.currentTarget.value)}>
            {STATES.map((s) => (
              <option value={s}>{s ? s.toLowerCase().replace("_", " ") : "any"}</option>
            ))}
          </select>
        </label>
        <button type="button" onClick={() => setCreating(!creating)} aria-expanded={creating}>
          {creating ? "Close" : "New task"}
        </button>
      </div>
      {creating && <CreateTask />}
      <ErrorBanner problem={err} />
      {!list && !err && <Loading />}
      {list && list.length === 0 && <p class="empty">No task{filter ? " in this state" : " yet"}. Create one with “New task”.</p>}
      {list && list.length > 0 && (
        <table class="grid" data-testid="tasks">
          <thead>
            <tr>
              <th>Task</th>
              <th>State</th>
              <th>Progress</th>
              <th>Subtasks</th>
              <th>Created</th>
            </tr>
          </thead>
          <tbody>
            {list.map((t) => {
              const state = enumName(TaskState, t.state, "").toLowerCase();
              return (
                <tr key={t.name} data-task={t.name} data-state={state}>
                  <td>
                    <a href={`#/tasks/${leaf(t.name)}`}>{t.displayName || leaf(t.name)}</a>
                    <div class="muted">{t.description.slice(0, 80)}</div>
                  </td>
                  <td>
                    <span class={`pill state-${state}`}>{state}</span>
                  </td>
                  <td>
                    <progress max={100} value={t.progressPercent} /> {t.progressPercent} %
                  </td>
                  <td>{t.subtaskCount}</td>
                  <td>{when(t.createTime)}</td>
                </tr>
              );
            })}
          </tbody>
        </table>
      )}
    </section>
  );
}

interface Row {
  key: string;
  deps: string;
  tool: ToolKind;
  options: string;
}

const TOOLS = [ToolKind.TEST, ToolKind.SHELL, ToolKind.CLAUDE_CODE, ToolKind.GEMINI_CLI, ToolKind.CODEX_CLI, ToolKind.OLLAMA];

function CreateTask() {
  const [mode, setMode] = useState<"template" | "graph">("graph");
  const [tpls, setTpls] = useState<Template[]>([]);
  const [template, setTemplate] = useState("");
  const [displayName, setDisplayName] = useState("");
  const [description, setDescription] = useState("");
  const [priority, setPriority] = useState(Priority.NORMAL);
  const [rows, setRows] = useState<Row[]>([
    { key: "design", deps: "", tool: ToolKind.TEST, options: "" },
    { key: "build", deps: "design", tool: ToolKind.TEST, options: "" },
  ]);
  const [err, setErr] = useState<Problem>();
  const [busy, setBusy] = useState(false);

  useEffect(() => {
    templates
      .listTemplates({ pageSize: 100 })
      .then((r) => {
        setTpls(r.templates);
        setTemplate((t) => t || r.templates[0]?.name || "");
      })
      .catch((e) => setErr(problem(e)));
  }, []);

  const setRow = (i: number, patch: Partial<Row>) => setRows(rows.map((r, j) => (j === i ? { ...r, ...patch } : r)));

  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    setErr(undefined);
    try {
      const task = create(TaskSchema, { displayName, description, priority });
      let plan: CreateTaskRequest["plan"];
      if (mode === "template") {
        plan = { case: "template", value: template };
      } else {
        const local: Record<string, string> = {};
        const subtasks = rows.map((r, i) => {
          let toolOptions: JsonObject | undefined;
          if (r.options.trim()) {
            try {
              const parsed: unknown = JSON.parse(r.options);
              if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) throw new Error("not an object");
              toolOptions = parsed as JsonObject;
            } catch {
              local[`graph.subtasks[${i}].tool_options`] = "must be a JSON object, e.g. {\"sleep_s\": 1}";
            }
          }
          return create(SubtaskSpecSchema, {
            key: r.key.trim(),
            dependencies: r.deps.split(",").map((d) => d.trim()).filter(Boolean),
            preferredTool: { kind: r.tool },
            toolOptions,
          });
        });
        if (Object.keys(local).length) {
          setErr({ code: 3, message: "Please correct the highlighted fields.", fields: local });
          return;
        }
        plan = { case: "graph", value: create(SubtaskGraphSchema, { subtasks }) };
      }
      const reply = await tasks.createTask({ task, plan, requestId: crypto.randomUUID() });
      window.location.hash = `#/tasks/${leaf(reply.task!.name)}`;
    } catch (error) {
      setErr(problem(error));
    } finally {
      setBusy(false);
    }
  };

  return (
    <form class="card create" onSubmit={submit} aria-label="New task" data-testid="create-task">
      <ErrorBanner problem={err} />
      <div class="row">
        <label>
          Name
          <input name="display_name" value={displayName} onInput={(e) => setDisplayName(e.currentTarget.value)} />
          <FieldError problem={err} field="task.display_name" />
        </label>
        <label>
          Priority
          <select name="priority" value={priority} onChange={(e) => setPriority(Number(e.currentTarget.value))}>
            {[Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.URGENT].map((p) => (
              <option value={p}>{enumName(Priority, p, "").toLowerCase()}</option>
            ))}
          </select>
          <FieldError problem={err} field="task.priority" />
        </label>
      </div>
      <label>
        Description
        <textarea name="description" rows={3} value={description} onInput={(e) => setDescription(e.currentTarget.value)} />
        <FieldError problem={err} field="task.description" />
      </label>
      <fieldset>
        <legend>Plan</legend>
        <label class="inline">
          <input type="radio" name="mode" checked={mode === "graph"} onChange={() => setMode("graph")} /> Subtask DAG
        </label>
        <label class="inline">
          <input type="radio" name="mode" checked={mode === "template"} onChange={() => setMode("template")} /> Template
        </label>
        {mode === "template" && (
          <label>
            Template
            <select name="template" value={template} onChange={(e) => setTemplate(e.currentTarget.value)}>
              {tpls.map((t) => (
                <option value={t.name}>
                  {t.displayName || leaf(t.name)} ({t.steps.length} steps)
                </option>
              ))}
            </select>
            <FieldError problem={err} field="template" prefix />
          </label>
        )}
        {mode === "graph" && (
          <div class="dag-form">
            <FieldError problem={err} field="graph.subtasks" />
            {rows.map((r, i) => (
              <div class="dag-row" data-row={i}>
                <input aria-label={`Subtask ${i + 1} key`} name={`key-${i}`} placeholder="key" value={r.key} onInput={(e) => setRow(i, { key: e.currentTarget.value })} />
                <input aria-label={`Subtask ${i + 1} depends on`} name={`deps-${i}`} placeholder="depends on (keys, comma-separated)" value={r.deps} onInput={(e) => setRow(i, { deps: e.currentTarget.value })} />
                <select aria-label={`Subtask ${i + 1} tool`} name={`tool-${i}`} value={r.tool} onChange={(e) => setRow(i, { tool: Number(e.currentTarget.value) })}>
                  {TOOLS.map((t) => (
                    <option value={t}>{enumName(ToolKind, t, "").toLowerCase()}</option>
                  ))}
                </select>
                <input aria-label={`Subtask ${i + 1} tool options`} name={`options-${i}`} placeholder='tool options JSON, e.g. {"sleep_s": 1}' value={r.options} onInput={(e) => setRow(i, { options: e.currentTarget.value })} />
                <button type="button" aria-label={`Remove subtask ${i + 1}`} onClick={() => setRows(rows.filter((_, j) => j !== i))}>
                  ✕
                </button>
                <FieldError problem={err} field={`graph.subtasks[${i}]`} prefix />
              </div>
            ))}
            <button type="button" onClick={() => setRows([...rows, { key: "", deps: rows.at(-1)?.key ?? "", tool: ToolKind.TEST, options: "" }])}>
              Add subtask
            </button>
          </div>
        )}
      </fieldset>
      <button type="submit" disabled={busy}>
        {busy ? "Creating…" : "Create task"}
      </button>
    </form>
  );
}
