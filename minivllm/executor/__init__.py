"""Running the model runner in several processes, one per rank: `multiproc.MultiprocExecutor` is the
driver's side, `worker_proc` the loop each rank's process runs."""
