"""Chapter 12's lab: which engine for which job, read from the sourced table
(`minivllm.course.landscape`).

**Filter** (the first part): tick the needs a job has ("runs on CPU", "multi-LoRA", "P/D
disaggregation", ...) or pick a scenario; the lab shows the engines that meet every need, with the
rows the needs filter on (or every row), each cell with its source links, the date it was checked
and a mark where it repeats a project's own speed claim. A set of needs that no engine meets is
refused: the message names the engines closest to it and what each lacks, and the needs go back to
the set in effect.

**Hash vs radix** (the second part): choose a workload (multi-turn chat, few-shot prompts, branching
continuations, a prefix shared up to the middle of a block), a driver (the simulator, or the real
engine on the course model) and a size, press compare: `minivllm.benchmarks.prefix_cache.compare`
runs it once with each prefix cache and the tab shows hit rates, prefill tokens and bookkeeping cost.
"""
from __future__ import annotations

import html

import ipywidgets as widgets

from minivllm.course.landscape import Cell, Landscape, is_url, load_landscape
from minivllm.lab.base import Lab, LabError

NO_SCENARIO = ""
ROW_CHOICES = (("rows the needs filter on", "needs"), ("every row", "all"))
SELF_REPORTED_MARK = ('<span title="a speed claim the project makes about itself" '
                      'style="color:#9a6700;font-weight:bold">self-reported</span>')


def source_link(source: str) -> str:
    """A link to a source: URLs as they are; repository paths relative to the notebooks/ folder the
    chapter runs in."""
    href = source if is_url(source) else f"../{source}"
    label = source if not is_url(source) else source.split("://", 1)[1]
    return f'<a href="{html.escape(href)}" target="_blank">{html.escape(label)}</a>'


def cell_html(cell: Cell) -> str:
    links = "<br>".join(source_link(s) for s in cell.sources)
    mark = f" {SELF_REPORTED_MARK}" if cell.self_reported else ""
    return (f"{html.escape(cell.text)}{mark}<br><small>source: {links}; checked "
            f"{cell.checked.isoformat()}</small>")


class LandscapeState:
    """The lab's state: the needs in effect, the scenario they came from (if any) and the rows shown.
    Every setter refuses a setting the table cannot show and leaves the state as it was."""

    def __init__(self, table: Landscape, needs: tuple[str, ...] = (), rows: str = "needs"):
        self.table = table
        self.needs: tuple[str, ...] = ()
        self.scenario: str = NO_SCENARIO
        self.rows = "needs"
        self.set_rows(rows)
        self.set_needs(needs)

    def set_needs(self, needs) -> None:
        needs = tuple(dict.fromkeys(needs))  # keep the order, drop repeats
        if not self.table.engines_meeting(needs):
            raise LabError(self.no_engine_message(needs))
        self.needs = needs
        if self.scenario and set(needs) != set(self.table.scenario(self.scenario).needs):
            self.scenario = NO_SCENARIO  # the needs no longer are the scenario's

    def set_scenario(self, key: str) -> None:
        if key == NO_SCENARIO:
            self.scenario = NO_SCENARIO
            return
        scenario = self.table.scenario(key)
        self.set_needs(scenario.needs)
        self.scenario = key

    def set_rows(self, rows: str) -> None:
        if rows not in dict(map(reversed, ROW_CHOICES)):
            raise LabError(f"rows={rows!r} is not one of: {', '.join(v for _, v in ROW_CHOICES)}")
        self.rows = rows

    def no_engine_message(self, needs: tuple[str, ...]) -> str:
        """Which engines come closest to ``needs``, and what each lacks."""
        labels = ", ".join(self.table.need(n).label for n in needs)
        missing = {e.key: self.table.missing_needs(e.key, needs) for e in self.table.engines}
        fewest = min(len(m) for m in missing.values())
        closest = "; ".join(f"{self.table.engine(k).name} lacks {', '.join(n.label for n in m)}"
                            for k, m in missing.items() if len(m) == fewest)
        return f"No engine in the table has all of: {labels}. Closest: {closest}."

    @property
    def engines(self):
        return self.table.engines_meeting(self.needs)

    @property
    def shown_rows(self):
        if self.rows == "all":
            return self.table.capabilities
        keys = {c.key for c in self.table.rows_for(self.needs)}
        if self.scenario:
            keys |= set(self.table.scenario(self.scenario).deciding)
        return tuple(c for c in self.table.capabilities if c.key in keys)


class LandscapeLab(Lab):
    """Filter the engine table by need; compare the hash and radix prefix caches (see the module)."""

    def __init__(self, *, needs: tuple[str, ...] = (), scenario: str = NO_SCENARIO, rows: str = "needs",
                 table: Landscape | None = None):
        self.state = LandscapeState(table or load_landscape(), needs, rows)
        if scenario:
            self.state.set_scenario(scenario)
        t = self.state.table
        self.needs = widgets.SelectMultiple(options=[(n.label, n.key) for n in t.needs], value=self.state.needs,
                                            rows=8, description="needs")
        self.scenario = widgets.Dropdown(options=[("(none)", NO_SCENARIO)] + [(s.title, s.key) for s in t.scenarios],
                                         value=self.state.scenario, description="scenario",
                                         layout=widgets.Layout(width="480px"))
        self.rows = widgets.ToggleButtons(options=ROW_CHOICES, value=self.state.rows, description="rows")
        controls = [self.on_change(self.needs, self._needs_changed),
                    self.on_change(self.scenario, self._scenario_changed),
                    self.on_change(self.rows, self.state.set_rows)]
        super().__init__(controls)
        filter_part = widgets.VBox([widgets.HBox([self.needs, widgets.VBox([self.scenario, self.rows])]),
                                    self.error, self.view])
        from minivllm.benchmarks.prefix_cache import DRIVERS
        from minivllm.benchmarks.prefix_workloads import SCALES, WORKLOADS

        self.workload = widgets.Dropdown(options=list(WORKLOADS), value="unaligned_prefix", description="workload")
        self.driver = widgets.ToggleButtons(options=list(DRIVERS), value="sim", description="driver")
        self.size = widgets.Dropdown(options=list(SCALES), value="small", description="size")
        self.compare_button = widgets.Button(description="compare")
        self.on_click(self.compare_button, self.run_comparison)
        self.benchmark_view = widgets.HTML("<p>Choose a workload and press compare.</p>")
        benchmark_part = widgets.VBox([widgets.HBox([self.workload, self.driver, self.size, self.compare_button]),
                                       self.benchmark_view])
        self.tabs = widgets.Tab(children=[filter_part, benchmark_part])
        self.tabs.set_title(0, "which engine for which job")
        self.tabs.set_title(1, "hash vs radix")
        self.widget.children = (self.tabs,)

    # ---- callbacks: change the state, then keep the other controls in step ---------------------------
    def _needs_changed(self, value) -> None:
        self.state.set_needs(value)
        if self.scenario.value != self.state.scenario:  # the needs left the scenario
            self.sync(self.scenario, value=self.state.scenario)

    def _scenario_changed(self, key: str) -> None:
        self.state.set_scenario(key)
        self.sync(self.needs, value=self.state.needs)

    # ---- the same actions, from code ----------------------------------------------------------------
    def choose(self, *, needs=None, scenario: str | None = None, rows: str | None = None) -> bool:
        """Set needs, a scenario and/or the rows from code through the controls; returns whether
        every setting was accepted (a refused one shows its message and changes nothing)."""
        accepted = True
        for control, value in ((self.scenario, scenario), (self.needs, None if needs is None else tuple(needs)),
                               (self.rows, rows)):
            if value is not None and control.value != value:
                control.value = value
                accepted = accepted and control.value == value and not self.error.value
        return accepted

    # ---- view ---------------------------------------------------------------------------------------
    def render(self) -> str:
        s, t = self.state, self.state.table
        engines = s.engines
        parts = []
        if s.scenario:
            sc = t.scenario(s.scenario)
            deciding = ", ".join(t.capability(c).name for c in sc.deciding)
            parts.append(f"<p><b>{html.escape(sc.title)}</b>: {html.escape(sc.reasoning)} "
                         f"<i>Deciding rows: {html.escape(deciding)}.</i></p>")
        wanted = ", ".join(t.need(n).label for n in s.needs) or "nothing (every engine)"
        names = ", ".join(e.name for e in engines)
        parts.append(f"<p>Needs: {html.escape(wanted)}. <b>{len(engines)} of {len(t.engines)} engines</b>: "
                     f"{html.escape(names)}.</p>")
        rows = s.shown_rows
        if not rows:
            parts.append("<p>Tick a need or choose every row to see the cells.</p>")
            return "".join(parts)
        head = "".join(f"<th>{html.escape(e.name)}</th>" for e in engines)
        body = "".join(
            f"<tr><th style='text-align:left'>{html.escape(c.name)}</th>"
            + "".join(f"<td style='vertical-align:top'>{cell_html(t.cell(c.key, e.key))}</td>" for e in engines)
            + "</tr>" for c in rows)
        parts.append(f"<table class='minivllm-landscape'><tr><th>capability</th>{head}</tr>{body}</table>")
        return "".join(parts)

    # ---- the second part: hash vs radix on a chosen workload -----------------------------------------
    def run_comparison(self) -> None:
        """Run the chosen workload once with each prefix cache; show the benchmark's table."""
        from minivllm.benchmarks.prefix_cache import compare

        result = compare(self.workload.value, self.driver.value, self.size.value)
        self.comparison = result
        self.benchmark_view.value = f"<pre>{html.escape(result.table())}</pre>"
