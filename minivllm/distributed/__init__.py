"""The parallel groundwork the layers and the workers stand on: tensor, pipeline and expert parallel.

* `parallel_state`: this process's tensor-parallel group (the parallel layers read it).
* `layout`: who is who (a rank's place in the TP x PP grid) and the size checks done before any
  process starts.
* `comm`: counting the collectives a rank's forward pass calls (`minivllm.core.records` holds the counts).
* `pipeline`: micro-batches through the stages.

The processes themselves are `minivllm.executor`'s; data-parallel replicas are `minivllm.engine.data_parallel`.
"""
