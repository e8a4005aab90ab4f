"""Stage 4, the method interface: the registry of methods and post-steps, options, pipelines, MethodContext."""
