"""Exercise checks, one module per exercise. Each one plugs the learner's piece into the real engine,
compares it with an independent reference, prints ``ok`` per stage and then ``PASS``, or ``FAIL``
with the first failing case in words, and returns a `CheckResult` (also appended to `HISTORY`,
which the tests read).

A check never raises because the learner's code raised: that is reported as the failing case.

| exercise | check | module |
|---|---|---|
| 01 | `check_sampling` | `sampling.py` |
| 02 | `check_block_manager` | `block_manager.py` |
| 04 | `check_scheduling_policy` | `scheduling_policy.py` |
| 06 | `check_paged_decode` | `paged_decode.py` |
| 07 | `check_rejection_sampler` | `rejection_sampler.py` |
| 08 | `check_row_parallel_linear` | `row_parallel.py` |
| 09 | `check_slo_search` | `slo_search.py` |
| 10 | `check_kv_receiver` | `kv_receiver.py` |
| 11 | `check_detokenizer` | `detokenizer.py` |
| 12 | `check_radix_tree` | `radix_tree.py` |
"""
from minivllm.course.checks.base import CheckFailed, CheckResult, chi_square_pvalue, HISTORY
from minivllm.course.checks.block_manager import BlockManagerRun, check_block_manager, stock_block_manager_run
from minivllm.course.checks.detokenizer import check_detokenizer
from minivllm.course.checks.kv_receiver import check_kv_receiver
from minivllm.course.checks.paged_decode import check_paged_decode
from minivllm.course.checks.radix_tree import check_radix_tree
from minivllm.course.checks.rejection_sampler import check_rejection_sampler, spec_check_engine
from minivllm.course.checks.row_parallel import check_row_parallel_linear
from minivllm.course.checks.sampling import LearnerSampler, check_sampling, describe, reference_probs
from minivllm.course.checks.scheduling_policy import check_scheduling_policy
from minivllm.course.checks.slo_search import check_slo_search

__all__ = ["BlockManagerRun", "CheckFailed", "CheckResult", "HISTORY", "LearnerSampler", "check_block_manager",
           "check_detokenizer", "check_kv_receiver",
           "check_paged_decode", "check_radix_tree", "check_rejection_sampler", "check_row_parallel_linear",
           "check_sampling", "check_scheduling_policy", "check_slo_search", "chi_square_pvalue", "describe",
           "reference_probs", "spec_check_engine", "stock_block_manager_run"]
