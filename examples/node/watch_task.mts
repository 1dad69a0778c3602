// The dashboard's generated TypeScript client, used from Node: list the workers, create a task, watch it.
//
//   MAW_GATEWAY=http://localhost:8080 MAW_TOKEN=<access or API token> \
//     dashboard/node_modules/.bin/tsx --tsconfig examples/node/tsconfig.json examples/node/watch_task.mts [--cancel-after-events N]
//
// Speaks gRPC-Web through the gateway (the same protocol the browser uses). Prints one JSON object per line.
// With --cancel-after-events N it cancels the task after N events, so it ends without any agent.
import { createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-node";
import { WorkerService } from "../../dashboard/src/gen/maw/registry/v1/worker_service_pb.js";
import { TaskService } from "../../dashboard/src/gen/maw/scheduler/v1/task_service_pb.js";
import { TaskState } from "../../dashboard/src/gen/maw/scheduler/v1/resources_pb.js";
import { ToolKind } from "../../dashboard/src/gen/maw/common/v1/machine_pb.js";

const gateway = process.env.MAW_GATEWAY ?? "http://localhost:8080";
const token = process.env.MAW_TOKEN ?? "";
const flag = process.argv.indexOf("--cancel-after-events");
const cancelAfter = flag > 0 ? Number(process.argv[flag + 1]) : 0;
const out = (o: object) => process.stdout.write(JSON.stringify(o, (_, v) => (typeof v === "bigint" ? v.toString() : v)) + "\n");

const bearer: Interceptor = (next) => (req) => {
  req.header.set("authorization", `Bearer ${token}`);
  return next(req);
};
const transport = createGrpcWebTransport({ baseUrl: gateway, httpVersion: "1.1", interceptors: [bearer] });
const workers = createClient(WorkerService, transport);
const tasks = createClient(TaskService, transport);

const listed = await workers.listWorkers({ pageSize: 100 });
out({ workers: listed.workers.map((w) => ({ name: w.name, status: w.status, tools: w.tools.map((t) => ToolKind[t.kind]) })) });

const created = await tasks.createTask({
  task: { description: "example: a two-step DAG from Node" },
  plan: {
    case: "graph",
    value: {
      subtasks: [
        { key: "first", preferredTool: { kind: ToolKind.TEST } },
        { key: "second", dependencies: ["first"], preferredTool: { kind: ToolKind.TEST } },
      ],
    },
  },
  requestId: crypto.randomUUID(),
});
const name = created.task!.name;
out({ created: name, subtasks: created.subtasks.map((s) => s.key) });

const TERMINAL = new Set([TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED]);
const controller = new AbortController();
let seen = 0;
try {
  for await (const batch of tasks.watchTask({ name }, { signal: controller.signal })) {
    for (const ev of batch.events) {
      seen += 1;
      out({ sequence: ev.sequence, event: ev.kind.case, state: ev.kind.case === "taskStateChanged" ? TaskState[ev.kind.value.task!.state] : undefined });
      if (ev.kind.case === "taskStateChanged" && TERMINAL.has(ev.kind.value.task!.state)) controller.abort();
      if (seen === cancelAfter) await tasks.cancelTask({ name, reason: "example done", requestId: crypto.randomUUID() });
    }
  }
} catch (err) {
  if (!controller.signal.aborted) throw err;
}
out({ done: name });
