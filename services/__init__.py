"""maw's server side: the registry, scheduler and evaluator services and their shared runtime."""
