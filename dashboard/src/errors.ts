// Turning a gRPC status into words a person can act on, with the server's field violations
// (google.rpc.BadRequest in grpc-status-details-bin) keyed by field path for the forms.
import { Code, ConnectError } from "@connectrpc/connect";
import { BadRequestSchema } from "./gen/google/rpc/error_details_pb.js";

export interface Problem {
  code: Code;
  /** One sentence: what went wrong and what to do. */
  message: string;
  /** Field path (as the server names it, e.g. `task.description`) → what is wrong with it. */
  fields: Record<string, string>;
}

const ADVICE: Partial<Record<Code, string>> = {
  [Code.Unauthenticated]: "Your session has ended. Sign in again.",
  [Code.PermissionDenied]: "Your role may not do this. Ask an admin for the operator role.",
  [Code.Unavailable]: "The gateway or a service is unreachable. Check that `make up` is running, then retry.",
  [Code.DeadlineExceeded]: "The server took too long to answer. Retry in a moment.",
  [Code.NotFound]: "It does not exist (any more). Go back to the list.",
  [Code.Aborted]: "Someone changed it meanwhile. Reload and try again.",
  [Code.FailedPrecondition]: "It is not in a state that allows this.",
  [Code.Unimplemented]: "Not available yet: this server does not implement it.",
  [Code.ResourceExhausted]: "Too many requests. Wait a moment and retry.",
};

export function problem(err: unknown): Problem {
  const e = ConnectError.from(err);
  const fields: Record<string, string> = {};
  for (const detail of e.findDetails(BadRequestSchema)) {
    for (const v of detail.fieldViolations) {
      fields[v.field] = fields[v.field] ? `${fields[v.field]}; ${v.description}` : v.description;
    }
  }
  let message = ADVICE[e.code] ?? e.rawMessage;
  if (e.code === Code.InvalidArgument) {
    message = Object.keys(fields).length ? "Please correct the highlighted fields." : e.rawMessage;
  } else if (ADVICE[e.code] && e.rawMessage && e.code !== Code.Unimplemented) {
    message = `${ADVICE[e.code]} (${e.rawMessage})`;
  }
  return { code: e.code, message, fields };
}

export function isUnimplemented(err: unknown): boolean {
  return ConnectError.from(err).code === Code.Unimplemented;
}
