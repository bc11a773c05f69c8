"""The simulator: the real Scheduler and BlockManager in virtual time, a roofline cost model of a
named GPU (or of this CPU, `minivllm.benchmarks.sim_calibration.measure_this_cpu`) instead of a model
runner. No torch: `tests/test_layers.py` imports it and runs it with torch unimportable.

    from minivllm.sim import SimConfig, Simulator, get_hardware, get_model, preset, compute_metrics
    sim = Simulator(SimConfig(get_model("Llama-3.1-8B"), get_hardware("H100-SXM")))
    result = sim.run(preset("balanced", 1000, request_rate=10).generate())
    print(compute_metrics(result.trace, result.arrival_times).table())
"""
from minivllm.sim.cost_model import CostModel
from minivllm.sim.deployment import DeploymentCost, StepCost
from minivllm.sim.hardware import HARDWARE, Hardware, get_hardware
from minivllm.sim.metrics import (SLO, LatencyStats, Metrics, RequestRecord, RequestTimeline, Timeline,
                                  compute_metrics, report, request_timelines, step_timeline, summarize)
from minivllm.sim.model_specs import MODELS, ModelSpec, get_model
from minivllm.sim.planner import Communication, LayoutPlan, ParallelLayout, plan_layout
from minivllm.sim.simulator import SimConfig, SimResult, Simulator
from minivllm.sim.speculation import SimSpeculation
from minivllm.sim.workload import PRESETS, Lengths, Request, Workload, preset

__all__ = ["CostModel", "DeploymentCost", "StepCost", "SimSpeculation", "HARDWARE", "Hardware", "get_hardware", "SLO", "LatencyStats",
           "Metrics", "RequestRecord", "RequestTimeline", "Timeline", "compute_metrics", "report",
           "request_timelines", "step_timeline", "summarize",
           "MODELS", "ModelSpec", "get_model", "Communication", "LayoutPlan", "ParallelLayout",
           "plan_layout", "SimConfig", "SimResult", "Simulator", "PRESETS", "Lengths",
           "Request", "Workload", "preset"]
