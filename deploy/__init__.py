"""Ways to run maw: container images, compose, Kubernetes, and the local stack (no Docker)."""
