// The one place the dashboard talks to the gateway: a gRPC-Web transport to the page's own origin and
// typed clients generated from protos/ (src/gen, `make dashboard`). No request is written by hand.
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { AuthService, type TokenPair } from "./gen/maw/registry/v1/auth_service_pb.js";
import { WorkerService } from "./gen/maw/registry/v1/worker_service_pb.js";
import { ActivityService } from "./gen/maw/registry/v1/activity_service_pb.js";
import type { User } from "./gen/maw/registry/v1/resources_pb.js";
import { TaskService } from "./gen/maw/scheduler/v1/task_service_pb.js";
import { TemplateService } from "./gen/maw/scheduler/v1/template_service_pb.js";
import { CheckpointService } from "./gen/maw/evaluator/v1/checkpoint_service_pb.js";
import { EvaluationService } from "./gen/maw/evaluator/v1/evaluation_service_pb.js";

/** Refresh the access token this long before it expires. */
const REFRESH_MARGIN_MS = 30_000;

/**
 * The signed-in session. Tokens live in memory only (never localStorage): a reload signs out, and a script
 * injected into the page cannot read a token that outlives the tab.
 */
export class Session {
  private access = "";
  private refresh = "";
  private accessExpireMs = 0;
  private refreshing: Promise<void> | undefined;
  user: User | undefined;
  private listeners = new Set<() => void>();

  get signedIn(): boolean {
    return this.access !== "";
  }

  subscribe(listener: () => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  set(tokens: TokenPair | undefined, user?: User): void {
    this.access = tokens?.accessToken ?? "";
    this.refresh = tokens?.refreshToken ?? "";
    this.accessExpireMs = tokens?.accessTokenExpireTime ? timestampMs(tokens.accessTokenExpireTime) : 0;
    if (user !== undefined || !tokens) this.user = user;
    this.listeners.forEach((l) => l());
  }

  /** The bearer token to send now, refreshed first when it is about to expire. */
  async bearer(): Promise<string> {
    if (this.access && this.refresh && Date.now() > this.accessExpireMs - REFRESH_MARGIN_MS) {
      await this.renew();
    }
    return this.access;
  }

  /** Trade the refresh token for a new pair, once even when many calls ask at the same moment. */
  renew(): Promise<void> {
    this.refreshing ??= (async () => {
      try {
        const reply = await auth.refreshToken({ refreshToken: this.refresh, requestId: crypto.randomUUID() });
        this.set(reply.tokens);
      } catch (err) {
        // A refresh token that is used up or revoked ends the session: the person signs in again.
        if (ConnectError.from(err).code === Code.Unauthenticated) this.set(undefined);
        throw err;
      } finally {
        this.refreshing = undefined;
      }
    })();
    return this.refreshing;
  }
}

export const session = new Session();

const UNAUTHENTICATED_METHODS = new Set(["Login", "RefreshToken"]);

const authenticate: Interceptor = (next) => async (req) => {
  if (!UNAUTHENTICATED_METHODS.has(req.method.name)) {
    const token = await session.bearer();
    if (token) req.header.set("authorization", `Bearer ${token}`);
  }
  return next(req);
};

export const transport = createGrpcWebTransport({
  baseUrl: window.location.origin,
  useBinaryFormat: true,
  interceptors: [authenticate],
});

export const auth: Client<typeof AuthService> = createClient(AuthService, transport);
export const workers: Client<typeof WorkerService> = createClient(WorkerService, transport);
export const activity: Client<typeof ActivityService> = createClient(ActivityService, transport);
export const tasks: Client<typeof TaskService> = createClient(TaskService, transport);
export const templates: Client<typeof TemplateService> = createClient(TemplateService, transport);
export const checkpoints: Client<typeof CheckpointService> = createClient(CheckpointService, transport);
export const evaluations: Client<typeof EvaluationService> = createClient(EvaluationService, transport);
