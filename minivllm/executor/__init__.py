"""What runs the model for the engine: `base.Executor` (the interface) and `base.make_executor`,
which picks the model runner in this process or `multiproc.MultiprocExecutor`, one worker process per
rank (`worker_proc` is the loop each rank's process runs)."""
