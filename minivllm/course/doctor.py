"""Is this machine ready for the course? One line per check, PASS, WARN or FAIL, with advice.

    python -m minivllm.course.doctor                # or: make doctor
    python -m minivllm.course.doctor --skip-model   # everything but loading the course model

It prints the versions that matter (Python, torch, transformers, ipywidgets, jupyterlab, triton)
beside those ``make test`` last passed with (``constraints.txt``, when run from the repository
root); whether JupyterLab's widget extension is installed (without it every lab shows "Error
displaying widget"); whether the notebooks' ``python3`` kernel is this Python; the user, the port and
the memory; a matrix product's GFLOP/s; and, unless ``--skip-model``, loads the course model, generates
32 greedy tokens and reports tokens per second. Both speeds are measured with torch's threads and with
one: on a machine whose cores other programs keep busy, torch's threads wait on each other and one
thread can be ten times faster (then ``OMP_NUM_THREADS=1 make course``). The speeds are compared with the machine that
measured the chapter times in ``exercises/INSTRUCTOR.md``, which gives the factor by which to scale
them. Exit status 1 when a line FAILs, else 0.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass

# The machine that measured exercises/INSTRUCTOR.md's chapter times (2 cores shared with other work,
# torch 2.13 CPU build), at its better thread count.
REFERENCE_GFLOPS = 130.0        # float32 512x512 matmuls (one thread)
REFERENCE_TOKENS_PER_S = 140.0  # the course model, one greedy request of 32 tokens (one thread)
SLOW_FACTOR = 3.0  # slower than the reference by more than this: WARN
PACKAGES = ("torch", "transformers", "ipywidgets", "jupyterlab", "triton")
NEEDED = {"torch", "transformers", "ipywidgets"}  # FAIL when missing; the others WARN
WIDGET_EXTENSION = "@jupyter-widgets/jupyterlab-manager"
EXTENSION_MAJOR_FOR_IPYWIDGETS = {"8": "5", "7": "3"}  # ipywidgets 8 <-> jupyterlab_widgets 3 <-> 5.x
JUPYTER_PORT = 8888


@dataclass
class Line:
    status: str  # "PASS", "WARN" or "FAIL"
    what: str
    detail: str
    advice: str = ""

    def __post_init__(self):
        if self.status not in ("PASS", "WARN", "FAIL"):
            raise ValueError(f"status={self.status!r} must be PASS, WARN or FAIL")

    def __str__(self) -> str:
        text = f"{self.status:<5} {self.what:<18} {self.detail}"
        return text + (f"\n{'':24}-> {self.advice}" if self.advice else "")


def python_line(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> Line:
    shown = ".".join(map(str, version))
    if tuple(version[:2]) >= (3, 11):
        return Line("PASS", "python", f"{shown} ({sys.executable})")
    return Line("FAIL", "python", f"{shown}: minivllm needs 3.11 or newer",
                "install Python 3.11+ and run `make course` again (it makes .venv with `python3`; "
                "`make course PYTHON=python3.11` picks another)")


def pinned_versions(constraints_path: str = "constraints.txt") -> dict[str, str]:
    """{package name, lower case: version} from a pip constraints file; {} when there is none."""
    if not os.path.exists(constraints_path):
        return {}
    pins = {}
    with open(constraints_path, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
            if m:
                pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_line(package: str, installed: str | None, pinned: str | None) -> Line:
    if installed is None:
        advice = "`make course` installs it (or `pip install -c constraints.txt -e \".[test,course]\"`)"
        if package == "triton":
            advice = ("chapter 06 and exercise 06 run Triton's interpreter on the CPU; triton has wheels for "
                      "Linux only (on macOS or Windows use a Linux container or WSL); the rest runs without it")
        return Line("FAIL" if package in NEEDED else "WARN", package, "not installed", advice)
    local = installed.split("+")[0]  # torch's "+cpu"
    if pinned is None:
        return Line("PASS", package, installed)
    if local == pinned:
        return Line("PASS", package, f"{installed} (the version make test passed with)")
    return Line("WARN", package, f"{installed}; make test passed with {pinned}",
                "outputs may differ from the committed notebooks; `rm .venv/.installed && make course` "
                "reinstalls the pinned versions")


def widget_extension_line(labextension_dirs: list[str], ipywidgets: str | None) -> Line:
    for folder in labextension_dirs:
        manifest = os.path.join(folder, *WIDGET_EXTENSION.split("/"), "package.json")
        if os.path.exists(manifest):
            with open(manifest, encoding="utf-8") as f:
                version = json.load(f).get("version", "?")
            want = EXTENSION_MAJOR_FOR_IPYWIDGETS.get((ipywidgets or "").split(".")[0])
            if want and version.split(".")[0] != want:
                return Line("WARN", "widget extension", f"{WIDGET_EXTENSION} {version} in {folder}, for "
                            f"ipywidgets {ipywidgets}", f"ipywidgets {ipywidgets} needs the extension's "
                            f"{want}.x, a matching jupyterlab_widgets: `pip install -c constraints.txt "
                            "jupyterlab_widgets`")
            return Line("PASS", "widget extension", f"{WIDGET_EXTENSION} {version}")
    return Line("FAIL", "widget extension", f"{WIDGET_EXTENSION} is in none of {len(labextension_dirs)} "
                "labextension folders", "the labs would show \"Error displaying widget\": install "
                "jupyterlab_widgets in the environment that runs `jupyter lab` (`make course` does), then "
                "restart JupyterLab and reload the page")


def kernel_line(argv0: str | None, executable: str = sys.executable) -> Line:
    """Whether the ``python3`` kernel that the notebooks name runs ``executable``."""
    if argv0 is None:
        return Line("FAIL", "python3 kernel", "no python3 kernelspec",
                    "`pip install ipykernel` in this environment (`make course` does)")
    # jupyter_client runs a kernelspec's bare "python" as the Python that runs Jupyter
    if argv0 in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}"):
        return Line("PASS", "python3 kernel", "runs the Python that runs JupyterLab")
    if os.path.realpath(argv0) == os.path.realpath(executable):
        return Line("PASS", "python3 kernel", f"runs {argv0}")
    return Line("WARN", "python3 kernel", f"runs {argv0}, not {executable}",
                "the notebooks would not find minivllm: delete that kernelspec "
                "(`jupyter kernelspec list` shows where it is)")


def python3_kernel_argv0() -> str | None:
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    except ImportError:
        return None
    try:
        return KernelSpecManager().get_kernel_spec("python3").argv[0]
    except NoSuchKernel:
        return None


def user_line(uid: int) -> Line:
    if uid == 0:
        return Line("PASS", "user", "root: `make course` passes --allow-root to JupyterLab",
                    "starting `jupyter lab` yourself as root, add --allow-root")
    return Line("PASS", "user", f"uid {uid}")


def port_line(port: int = JUPYTER_PORT) -> Line:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return Line("WARN", "port", f"{port} is in use (another JupyterLab?)",
                        "JupyterLab then takes the next free port and prints its URL; or choose one: "
                        "make course JUPYTER_ARGS=\"--port 8890\"")
    return Line("PASS", "port", f"{port} is free")


def memory_line(total_bytes: int) -> Line:
    gib = total_bytes / 2**30
    if gib < 4:
        return Line("WARN", "memory", f"{gib:.1f} GiB", "chapter 08 runs two engine processes and chapter 11 a "
                    "server: close other programs, or expect swapping")
    return Line("PASS", "memory", f"{gib:.1f} GiB")


def total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def triton_interpret_line(interpret: str | None) -> Line:
    if interpret and interpret != "0":
        return Line("WARN", "TRITON_INTERPRET", f"{interpret!r} in the environment", "chapter 06 and exercise 06 "
                    "set it themselves; set for everything, every Triton kernel on a GPU runs in the (slow) "
                    "interpreter: unset it")
    return Line("PASS", "TRITON_INTERPRET", "unset (chapter 06 and exercise 06 set it themselves)")


def speed_line(what: str, measured: float, reference: float, unit: str) -> Line:
    if measured <= 0 or reference <= 0:
        raise ValueError(f"measured={measured!r}, reference={reference!r}: speeds must be > 0")
    factor = reference / measured
    detail = (f"{measured:.0f} {unit}; the guide's machine: {reference:.0f} "
              f"({'%.1fx slower' % factor if factor > 1 else '%.1fx faster' % (1 / factor)})")
    if factor > SLOW_FACTOR:
        return Line("WARN", what, detail, f"scale the chapter times in exercises/INSTRUCTOR.md by about "
                    f"{factor:.0f}; other programs busy on the CPU? (`top`)")
    return Line("PASS", what, detail)


def threads_line(what: str, all_threads: float, one_thread: float, threads: int, unit: str) -> Line:
    """Whether torch's threads help: on a machine whose cores are busy with other programs they wait on
    each other, and one thread is faster."""
    if threads == 1:
        return Line("PASS", what, f"{all_threads:.0f} {unit} with torch's one thread")
    detail = f"{all_threads:.0f} {unit} with {threads} threads, {one_thread:.0f} with 1"
    if threads > 1 and one_thread > 1.5 * all_threads:
        return Line("WARN", what, detail, "the cores are shared with other programs and torch's threads wait on "
                    "each other: close them, or start the course with OMP_NUM_THREADS=1 make course")
    return Line("PASS", what, detail)


def matmul_gflops(n: int = 512, seconds: float = 0.25) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        runs += 1
    return 2 * n ** 3 * runs / elapsed / 1e9


def speed_lines(what: str, measure, reference: float, unit: str) -> list[Line]:
    """``measure()`` with torch's threads and with one; the faster against ``reference``, and
    whether the threads help."""
    import torch

    from minivllm.course.checks.base import torch_threads

    threads = torch.get_num_threads()
    all_threads = measure()
    if threads > 1:
        with torch_threads(1):
            one_thread = measure()
    else:
        one_thread = all_threads
    return [speed_line(what, max(all_threads, one_thread), reference, unit),
            threads_line(f"{what.split()[0]} threads", all_threads, one_thread, threads, unit)]


def course_model_lines() -> list[Line]:
    """Load the course model, generate 32 greedy tokens; a line for the load, two for the speed."""
    from minivllm import course
    try:
        folder = course.model_path("target")
    except FileNotFoundError as e:
        return [Line("FAIL", "course model", str(e).split(";")[0], "the weights ship with the repository; a "
                     "clone without them needs `python -m minivllm.course.train`")]
    from minivllm import LLM, SamplingParams
    from minivllm.course.checks.base import quiet_engine_logs

    def tokens_per_second() -> float:
        start = time.perf_counter()
        out = llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
        return len(out.token_ids) / (time.perf_counter() - start)

    start = time.perf_counter()
    with quiet_engine_logs():
        llm = LLM(folder, max_model_len=256)
        loaded = time.perf_counter() - start
        text = llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0, max_tokens=16),
                            use_tqdm=False)[0].outputs[0].text
        if not text.strip():
            return [Line("FAIL", "course model", "loaded, but generated no text", "run `make test` to find out why")]
        speed = speed_lines("model speed", tokens_per_second, REFERENCE_TOKENS_PER_S, "tokens/s")
    first = text.strip().splitlines()[0]
    return [Line("PASS", "course model", f"loaded in {loaded:.1f} s; `def fibonacci(n):` -> {first[:40]!r}"), *speed]


def run_checks(skip_model: bool = False, constraints_path: str = "constraints.txt") -> list[Line]:
    lines = [python_line()]
    pins = pinned_versions(constraints_path)
    versions = {p: installed_version(p) for p in PACKAGES}
    lines += [version_line(p, versions[p], pins.get(p)) for p in PACKAGES]
    try:
        from jupyter_core.paths import jupyter_path
        dirs = jupyter_path("labextensions")
    except ImportError:
        dirs = []
    lines.append(widget_extension_line(dirs, versions["ipywidgets"]))
    lines.append(kernel_line(python3_kernel_argv0()))
    lines.append(user_line(os.getuid()))
    lines.append(port_line())
    lines.append(memory_line(total_memory()))
    lines.append(triton_interpret_line(os.environ.get("TRITON_INTERPRET")))
    if versions["torch"] is not None:
        import torch
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        lines.append(Line("PASS", "cpu", f"{cores} cores available, torch uses {torch.get_num_threads()} "
                          f"thread{'s' if torch.get_num_threads() > 1 else ''}"))
        lines += speed_lines("matmul speed", matmul_gflops, REFERENCE_GFLOPS, "GFLOP/s")
        if not skip_model:
            try:
                lines += course_model_lines()
            except Exception as e:  # the finding is the line, not a traceback
                lines.append(Line("FAIL", "course model", f"{type(e).__name__}: {e}",
                                  "run `make test` (tests/test_course_models.py) to find out why"))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-model", action="store_true", help="do not load the course model (a few seconds less)")
    parser.add_argument("--constraints", default="constraints.txt",
                        help="the versions to compare with (default: ./constraints.txt; absent: no comparison)")
    args = parser.parse_args(argv)
    print("minivllm course: set-up check")
    lines = run_checks(args.skip_model, args.constraints)
    for line in lines:
        print(line)
    counts = {s: sum(line.status == s for line in lines) for s in ("PASS", "WARN", "FAIL")}
    print(f"{counts['PASS']} PASS, {counts['WARN']} WARN, {counts['FAIL']} FAIL"
          + (": ready for the course" if not counts["FAIL"] else ": fix the FAIL lines first"))
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
