"""The scheduler's settings: the shared ones plus the knobs of leases, retries and dispatch."""

from __future__ import annotations

import os
import socket

from pydantic import Field

from services.runtime import ServiceSettings


class SchedulerSettings(ServiceSettings):
    """Environment ``MAW_*`` as for every service, plus these."""

    replica_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="Name of this replica (diagnostics, and the owner of its agent sessions).",
    )
    heartbeat_interval_s: float = Field(5.0, gt=0, description="How often agents send a Heartbeat.")
    lease_ttl_s: float = Field(15.0, gt=0, description="Lease lifetime after the last renewal (~3 heartbeats).")
    retry_backoff_base_s: float = Field(2.0, ge=0, description="First retry delay; doubles per failed attempt.")
    default_max_attempts: int = Field(3, ge=1, le=20, description="Attempts per subtask unless the task says.")
    default_attempt_timeout_s: float = Field(1800.0, gt=0, description="Time limit of one attempt by default.")
    dispatch_batch: int = Field(512, ge=1, description="Most subtasks claimed in one transaction.")
    hello_timeout_s: float = Field(10.0, gt=0, description="Deadline for an agent's Hello.")
    drain_timeout_s: float = Field(5.0, ge=0, description="How long agents get to leave on SIGTERM.")
    max_batch_items: int = Field(1000, ge=1, description="Most items per agent-stream message.")
    unschedulable_check_s: float = Field(2.0, gt=0, description="How often READY work is checked for a fit.")
    queue_wait_limit_s: float = Field(0.0, ge=0, description="Default queue-wait limit (0: none).")
    weight_tool: float = Field(0.5, ge=0, description="Allocation: weight of how well an agent's tool fits.")
    weight_resources: float = Field(0.3, ge=0, description="Allocation: weight of an agent's free CPU/memory/disk.")
    weight_privacy: float = Field(0.2, ge=0, description="Allocation: weight of the privacy fit.")
    expiry_grace_s: float = Field(
        30.0, ge=0, description="How long past its attempt deadline a leased attempt may run before it is requeued."
    )
    decline_avoid_s: float = Field(60.0, ge=0, description="How long an agent is not offered work it declined.")
    retry_backoff_max_s: float = Field(300.0, gt=0, description="Longest delay before a retry.")
    census_sample: int = Field(200, ge=1, description="READY subtasks checked per census for an agent that fits.")
    max_diff_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest diff an agent may send back.")
