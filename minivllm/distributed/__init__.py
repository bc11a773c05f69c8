"""Running the model split over several processes: tensor, pipeline and data parallel.

* `layout`: who is who (a rank's place in the TP x PP grid) and the size checks done before any
  process starts.
* `records`: the per-rank communication counts the step trace carries (pure Python).
* `comm`: counting the collectives a rank's forward pass calls.
* `worker`: the loop each rank's process runs; `executor`: the driver's side of it.
* `data_parallel`: independent engine replicas behind a request router.
"""
