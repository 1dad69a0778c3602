// Small display helpers shared by the pages.
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { ToolKind } from "./gen/maw/common/v1/machine_pb.js";

/** `SUBTASK_STATE_RUNNING` → `RUNNING`, from a generated enum object and a value. */
export function enumName(e: Record<number | string, string | number>, value: number, prefix: string): string {
  const name = e[value];
  return typeof name === "string" ? name.replace(prefix, "") : String(value);
}

export function toolName(kind: ToolKind): string {
  return enumName(ToolKind, kind, "").toLowerCase().replace(/_/g, "-");
}

export function when(ts: Timestamp | undefined): string {
  return ts ? timestampDate(ts).toLocaleTimeString() : "—";
}

export function bytes(n: bigint | number): string {
  const v = Number(n);
  if (v >= 1 << 30) return `${(v / (1 << 30)).toFixed(1)} GiB`;
  if (v >= 1 << 20) return `${(v / (1 << 20)).toFixed(0)} MiB`;
  return `${v} B`;
}

/** The last segment of a resource name: `tasks/t1/subtasks/build` → `build`. */
export function leaf(name: string): string {
  return name.slice(name.lastIndexOf("/") + 1);
}
