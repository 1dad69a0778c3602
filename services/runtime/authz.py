"""The one authorisation table of maw: which principals may call which RPC.

Every RPC of every ``maw.*.v1`` service has exactly one rule here. The list of RPCs comes from the
generated descriptors (:func:`all_methods`), and :func:`rule_for` answers ``None`` for an RPC without a
rule, which the auth interceptor treats as "denied" — so a new RPC is closed until someone decides who
may call it (a unit test names the missing ones). Health and reflection are open and never reach here.

Roles are ordered (viewer < operator < admin); a rule names the lowest role that may call the RPC.
Finer checks that depend on the request (an admin may act on someone else's tokens, a user on their
own) live in the servicers, which read the caller with ``current_principal()``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .contracts import services_in
from .principal import Principal, PrincipalKind

MAW_PACKAGES = ("maw.registry.v1", "maw.scheduler.v1", "maw.agent.v1", "maw.evaluator.v1")
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


class Role(enum.IntEnum):
    """User roles, ordered: each may do everything the one below may."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, name: str) -> Role | None:
        """The role called ``name`` (``viewer``, ``operator``, ``admin``), or None."""
        try:
            return cls[name.upper()]
        except KeyError:
            return None


@dataclass(frozen=True)
class Rule:
    """Who may call one RPC."""

    public: bool = False
    min_role: Role | None = None
    agents: bool = False
    services: bool = False
    # When set, only these services (``services/{name}``) may call, e.g. one half of an internal loop.
    only_services: frozenset[str] = frozenset()

    def allows(self, principal: Principal) -> bool:
        """Whether ``principal`` (already authenticated) may call the RPC."""
        if self.public:
            return True
        if principal.kind == PrincipalKind.USER:
            role = Role.parse(principal.role)
            return self.min_role is not None and role is not None and role >= self.min_role
        if principal.kind == PrincipalKind.AGENT:
            return self.agents
        if principal.kind == PrincipalKind.SERVICE:
            return self.services and (not self.only_services or principal.name in self.only_services)
        return False


PUBLIC = Rule(public=True)
# Services may read what users may read (e.g. the scheduler follows WatchWorkers to learn revocations).
READ = Rule(min_role=Role.VIEWER, services=True)
SELF = Rule(min_role=Role.VIEWER)  # any user; the servicer limits them to their own resources
WHOAMI = Rule(min_role=Role.VIEWER, services=True)
OPERATE = Rule(min_role=Role.OPERATOR)
ADMIN = Rule(min_role=Role.ADMIN)
AGENT = Rule(agents=True)
INTERNAL = Rule(services=True)
FROM_SCHEDULER = Rule(services=True, only_services=frozenset({"services/scheduler"}))
FROM_EVALUATOR = Rule(services=True, only_services=frozenset({"services/evaluator"}))

_RULES: dict[str, Rule] = {
    # registry
    "maw.registry.v1.AuthService/Login": PUBLIC,
    "maw.registry.v1.AuthService/RefreshToken": PUBLIC,
    "maw.registry.v1.AuthService/Logout": SELF,
    "maw.registry.v1.AuthService/CreateApiToken": SELF,
    "maw.registry.v1.AuthService/ListApiTokens": SELF,
    "maw.registry.v1.AuthService/RevokeApiToken": SELF,
    "maw.registry.v1.AuthService/WhoAmI": WHOAMI,
    "maw.registry.v1.UserService/CreateUser": ADMIN,
    "maw.registry.v1.UserService/GetUser": READ,
    "maw.registry.v1.UserService/ListUsers": READ,
    "maw.registry.v1.UserService/UpdateUser": SELF,
    "maw.registry.v1.UserService/DeleteUser": ADMIN,
    "maw.registry.v1.UserService/SetPassword": SELF,
    "maw.registry.v1.EnrollmentService/CreateEnrollmentToken": OPERATE,
    "maw.registry.v1.EnrollmentService/GetEnrollmentToken": READ,
    "maw.registry.v1.EnrollmentService/ListEnrollmentTokens": READ,
    "maw.registry.v1.EnrollmentService/RevokeEnrollmentToken": OPERATE,
    "maw.registry.v1.EnrollmentService/EnrollAgent": PUBLIC,
    "maw.registry.v1.WorkerService/GetWorker": READ,
    "maw.registry.v1.WorkerService/ListWorkers": READ,
    "maw.registry.v1.WorkerService/UpdateWorker": OPERATE,
    "maw.registry.v1.WorkerService/DeleteWorker": ADMIN,
    "maw.registry.v1.WorkerService/RevokeWorker": ADMIN,
    "maw.registry.v1.WorkerService/WatchWorkers": READ,
    "maw.registry.v1.ActivityService/ListActivity": READ,
    "maw.registry.v1.ActivityService/WatchActivity": READ,
    "maw.registry.v1.ActivityIntakeService/AppendActivity": INTERNAL,
    "maw.registry.v1.WorkerIntakeService/AuthenticateAgent": INTERNAL,
    "maw.registry.v1.WorkerIntakeService/ReportWorkers": INTERNAL,
    "maw.registry.v1.CredentialIntakeService/AuthenticateApiToken": INTERNAL,
    # scheduler
    "maw.scheduler.v1.TaskService/CreateTask": OPERATE,
    "maw.scheduler.v1.TaskService/GetTask": READ,
    "maw.scheduler.v1.TaskService/ListTasks": READ,
    "maw.scheduler.v1.TaskService/UpdateTask": OPERATE,
    "maw.scheduler.v1.TaskService/CancelTask": OPERATE,
    "maw.scheduler.v1.TaskService/BatchCancelTasks": OPERATE,
    "maw.scheduler.v1.TaskService/BatchUpdateTaskPriority": OPERATE,
    "maw.scheduler.v1.TaskService/RetrySubtask": OPERATE,
    "maw.scheduler.v1.TaskService/GetSubtask": READ,
    "maw.scheduler.v1.TaskService/ListSubtasks": READ,
    "maw.scheduler.v1.TaskService/WatchTask": READ,
    "maw.scheduler.v1.TemplateService/ListTemplates": READ,
    "maw.scheduler.v1.TemplateService/GetTemplate": READ,
    "maw.scheduler.v1.TemplateService/CreateTemplate": OPERATE,
    "maw.scheduler.v1.TemplateService/UpdateTemplate": OPERATE,
    "maw.scheduler.v1.TemplateService/DeleteTemplate": OPERATE,
    "maw.scheduler.v1.StatsService/GetStats": READ,
    "maw.scheduler.v1.VerdictService/DeliverVerdicts": FROM_EVALUATOR,
    "maw.scheduler.v1.VerdictService/GetRollbackPlan": FROM_EVALUATOR,
    "maw.agent.v1.AgentService/Connect": AGENT,
    # evaluator
    "maw.evaluator.v1.EvaluationService/GetEvaluation": READ,
    "maw.evaluator.v1.EvaluationService/ListEvaluations": READ,
    "maw.evaluator.v1.ReviewService/GetReview": READ,
    "maw.evaluator.v1.ReviewService/ListReviews": READ,
    "maw.evaluator.v1.ReviewService/GetVotingRound": READ,
    "maw.evaluator.v1.ReviewService/ListVotingRounds": READ,
    "maw.evaluator.v1.ReviewService/ListSolutions": READ,
    "maw.evaluator.v1.CheckpointService/ListCheckpoints": READ,
    "maw.evaluator.v1.CheckpointService/GetCheckpoint": READ,
    "maw.evaluator.v1.CheckpointService/CreateCheckpoint": OPERATE,
    "maw.evaluator.v1.CheckpointService/DecideCheckpoint": OPERATE,
    "maw.evaluator.v1.CheckpointService/PreviewRollback": READ,
    "maw.evaluator.v1.CheckpointService/RollbackToCheckpoint": OPERATE,
    # The default policy needs admin, a task's operator: the evaluator checks which one is named.
    "maw.evaluator.v1.PolicyService/GetPolicy": READ,
    "maw.evaluator.v1.PolicyService/UpdatePolicy": OPERATE,
    "maw.evaluator.v1.EvaluationIntakeService/RegisterTask": FROM_SCHEDULER,
    "maw.evaluator.v1.EvaluationIntakeService/SubmitResults": FROM_SCHEDULER,
    "maw.evaluator.v1.EvaluationIntakeService/ReportTaskUpdates": FROM_SCHEDULER,
}


def all_methods() -> list[str]:
    """``package.Service/Method`` of every RPC of every maw service, from the generated descriptors."""
    return [
        f"{contract.full_name}/{method.name}"
        for package in MAW_PACKAGES
        for contract in services_in(package)
        for method in contract.descriptor.methods
    ]


def is_open(method_path: str) -> bool:
    """Health and reflection (``/grpc.health.v1.Health/Check`` …) need no credential."""
    return method_path.startswith(OPEN_PREFIXES)


def rule_for(method: str) -> Rule | None:
    """The rule of ``package.Service/Method`` (leading slash optional); None means nobody may call it."""
    return _RULES.get(method.lstrip("/"))


def missing_rules() -> list[str]:
    """RPCs of the contracts without a rule (denied to everyone until one is written)."""
    return [m for m in all_methods() if m not in _RULES]


def stale_rules() -> list[str]:
    """Rules naming an RPC that no longer exists."""
    known = set(all_methods())
    return [m for m in _RULES if m not in known]


__all__ = ["Role", "Rule", "all_methods", "is_open", "missing_rules", "rule_for", "stale_rules"]
