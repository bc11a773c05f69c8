"""Chapters 02 and 03's lab, the PagedAttention Cinema: the real BlockManager of a real run, frame by frame.

Every frame is one `StepRecord` of the engine's trace: its `BlockSnapshot` says which request holds
which physical block after the step; the step's block events (allocated, freed, cache hits,
evictions) give the order of the free queue and which free blocks still hold cached KV, replayed
from the engine's first step exactly as the BlockManager does it. Nothing is simulated.
"""
from __future__ import annotations

import html
from dataclasses import dataclass

import ipywidgets as widgets
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from minivllm.core.trace import StepRecord
from minivllm.lab.base import Lab, LabError

MAX_DRAWN_BLOCKS = 512  # a bigger grid is unreadable (and slow to draw); build the engine with num_kv_blocks


@dataclass(frozen=True)
class Frame:
    """The KV cache after one engine step."""

    record: StepRecord
    ref_counts: tuple[int, ...]  # per physical block: how many block tables point at it
    free_queue: tuple[int, ...]  # unreferenced blocks, the one the next allocation takes first
    cached_free: frozenset[int]  # unreferenced blocks that still hold cached KV (a later prompt may hit them)

    @property
    def num_blocks(self) -> int:
        return len(self.ref_counts)

    @property
    def num_used(self) -> int:
        return sum(1 for r in self.ref_counts if r)

    @property
    def num_shared(self) -> int:
        return sum(1 for r in self.ref_counts if r > 1)

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def block_fill(self) -> list[int]:
        """Per physical block, how many of its slots hold a token (a shared block counts once)."""
        snap = self.record.blocks
        fill = [0] * self.num_blocks
        for tokens, table in zip(snap.num_tokens, snap.block_tables):
            for i, b in enumerate(table):
                fill[b] = max(fill[b], min(snap.block_size, tokens - i * snap.block_size))
        return fill

    def eviction_order(self) -> list[int]:
        """Cached free blocks, the first to lose its contents first (least recently freed)."""
        return [b for b in self.free_queue if b in self.cached_free]

    def table(self, request_id: str) -> tuple[tuple[int, ...], int] | None:
        """``(block table, tokens in the cache)`` of a request holding blocks in this frame, else None."""
        snap = self.record.blocks
        if request_id not in snap.request_ids:
            return None
        i = snap.request_ids.index(request_id)
        return snap.block_tables[i], snap.num_tokens[i]


def replay(trace: list[StepRecord]) -> list[Frame]:
    """One `Frame` per step. The trace must start at the engine's first step (an empty cache whose
    free queue is block 0, 1, 2, ...), as a fresh BlockManager does."""
    if not trace:
        raise ValueError("trace is empty: run the engine first")
    if trace[0].step != 0:
        raise ValueError(f"trace starts at step {trace[0].step}: the Cinema replays from the engine's step 0")
    queue = list(range(trace[0].blocks.num_blocks))
    cached: set[int] = set()
    frames = []
    for rec in trace:
        refs = tuple(rec.blocks.ref_counts())
        freed = set(rec.blocks_freed)
        # blocks freed this step join the queue's tail in the order they were (last) freed
        tail = list(dict.fromkeys(reversed(rec.blocks_freed)))[::-1]
        queue = [b for b in queue if not refs[b] and b not in freed] + [b for b in tail if not refs[b]]
        cached = {b for b in queue if (b in rec.blocks.freed_cached if b in freed else b in cached)}
        frames.append(Frame(rec, refs, tuple(queue), frozenset(cached)))
    return frames


class Cinema:
    """The frames of one run, the frame on screen and the request whose block table is shown."""

    def __init__(self, trace: list[StepRecord]):
        num_blocks = trace[0].blocks.num_blocks if trace else 0
        if num_blocks > MAX_DRAWN_BLOCKS:
            raise ValueError(f"the cache has {num_blocks} blocks; the Cinema draws at most {MAX_DRAWN_BLOCKS}: "
                             "build the engine with a smaller num_kv_blocks")
        self.frames = replay(trace)
        self.request_ids = list(dict.fromkeys(r for f in self.frames for r in f.record.blocks.request_ids))
        self.frame_index = 0
        self.selected = self.request_ids[0] if self.request_ids else None

    @property
    def frame(self) -> Frame:
        return self.frames[self.frame_index]

    def seek(self, index: int) -> None:
        if not 0 <= index < len(self.frames):
            raise LabError(f"frame={index} is outside 0..{len(self.frames) - 1}")
        self.frame_index = index

    def select(self, request_id: str) -> None:
        if request_id not in self.request_ids:
            raise LabError(f"request_id={request_id!r} never held a block in this run")
        self.selected = request_id

    def color(self, request_id: str):
        return colormaps["tab20"](self.request_ids.index(request_id) % 20)


class CinemaLab(Lab):
    """Play, step or scrub through the frames of a run; pick a request to read its block table."""

    def __init__(self, trace: list[StepRecord], interval_ms: int = 400):
        if not isinstance(interval_ms, int) or interval_ms < 1:
            raise ValueError(f"interval_ms={interval_ms!r} must be an int >= 1 (milliseconds per frame when playing)")
        self.state = Cinema(trace)
        last = len(self.state.frames) - 1
        self.play = widgets.Play(value=0, min=0, max=last, interval=interval_ms, description="play")
        self.slider = widgets.IntSlider(value=0, min=0, max=last, description="frame")
        widgets.link((self.play, "value"), (self.slider, "value"))
        self.step_button = widgets.Button(description="step")
        self.request = widgets.Dropdown(options=self.state.request_ids, value=self.state.selected,
                                        description="request")
        super().__init__([self.play, self.on_change(self.slider, self.state.seek),
                          self.on_click(self.step_button, self._next_frame),
                          self.on_change(self.request, self.state.select)], figure=True)

    def _next_frame(self) -> None:
        if self.state.frame_index + 1 >= len(self.state.frames):
            raise LabError("this is the last frame")
        self.slider.value = self.state.frame_index + 1

    # ---- from code ---------------------------------------------------------------------------
    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.step_button.click()

    def seek(self, index: int) -> None:
        self.slider.value = index

    def select(self, request_id: str) -> None:
        self.request.value = request_id

    def first_frame(self, predicate) -> int:
        """Index of the first frame whose `StepRecord` satisfies ``predicate`` (e.g. one that preempts)."""
        for i, f in enumerate(self.state.frames):
            if predicate(f.record):
                return i
        raise LabError("no frame of this run matches")

    # ---- view --------------------------------------------------------------------------------
    def render(self) -> str:
        st, f = self.state, self.state.frame
        rec, bs = f.record, f.record.blocks.block_size
        slots, filled = f.num_used * bs, sum(f.block_fill())
        head = (f"<p><b>frame {st.frame_index} of {len(st.frames) - 1}</b> (engine step {rec.step}) &middot; "
                f"running {rec.num_running}, waiting {rec.num_waiting} &middot; block size {bs}</p>")
        counters = (
            "<table><tr><th>used</th><th>shared (ref &gt; 1)</th><th>free, cached</th><th>free, empty</th>"
            "<th>total</th><th>utilisation (used / total)</th><th>filled slots (tokens / used slots)</th></tr>"
            f"<tr><td>{f.num_used}</td><td>{f.num_shared}</td><td>{len(f.cached_free)}</td>"
            f"<td>{f.num_free - len(f.cached_free)}</td><td>{f.num_blocks}</td>"
            f"<td>{100 * f.num_used / f.num_blocks:.1f} %</td>"
            f"<td>{f'{100 * filled / slots:.1f} %' if slots else '-'}</td></tr></table>")
        return head + counters + self._events_html(rec) + self._table_html(f)

    @staticmethod
    def _events_html(rec: StepRecord) -> str:
        chunks = ", ".join(f"{c.request_id}: {c.num_tokens} {'prefill' if c.is_prefill else 'decode'}"
                           for c in rec.chunks) or "nothing"
        items = [f"ran {chunks}"]
        for label, values in [("preempted", rec.preempted), ("finished", [f"{r} ({why})" for r, why in rec.finished]),
                              ("cache hits (blocks)", rec.blocks_cache_hit), ("evicted (blocks)", rec.blocks_evicted),
                              ("allocated (blocks)", rec.blocks_allocated), ("freed (blocks)", rec.blocks_freed)]:
            if values:
                items.append(f"{label}: {', '.join(map(str, values))}")
        return "<p>this step:</p><ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"

    def _table_html(self, f: Frame) -> str:
        rid = self.state.selected
        if rid is None:
            return "<p>no request held a block in this run</p>"
        held = f.table(rid)
        if held is None:
            return f"<p>request {html.escape(rid)} holds no blocks in this frame (waiting, preempted or finished)</p>"
        table, tokens = held
        bs = f.record.blocks.block_size
        rows = "".join(
            f"<tr><td>{i}</td><td>{b}</td><td>{min(bs, tokens - i * bs)} of {bs}</td><td>{f.ref_counts[b]}</td></tr>"
            for i, b in enumerate(table))
        return (f"<p>request {html.escape(rid)}: {tokens} tokens in {len(table)} blocks</p>"
                "<table><tr><th>logical block</th><th>physical block</th><th>tokens</th><th>ref count</th></tr>"
                f"{rows}</table>")

    def figure(self):
        st, f = self.state, self.state.frame
        snap, bs = f.record.blocks, f.record.blocks.block_size
        cols = min(16, f.num_blocks)
        rows = -(-f.num_blocks // cols)
        fig = Figure(figsize=(0.55 * cols + 1.5, 0.55 * rows + 1.0))
        ax = fig.add_subplot()
        fill = f.block_fill()
        owner: dict[int, str] = {}  # a shared block takes the colour of its oldest holder
        for rid, table in zip(snap.request_ids, snap.block_tables):
            for b in table:
                owner.setdefault(b, rid)
        rank = {b: i + 1 for i, b in enumerate(f.eviction_order())}
        for b in range(f.num_blocks):
            x, y = b % cols, rows - 1 - b // cols
            ax.add_patch(Rectangle((x, y), 0.92, 0.92, facecolor="#e6e6e6", edgecolor="#b0b0b0", lw=0.8))
            if b in owner:
                ax.add_patch(Rectangle((x, y), 0.92, 0.92 * fill[b] / bs, facecolor=st.color(owner[b]), lw=0))
                shared = f.ref_counts[b] > 1
                ax.add_patch(Rectangle((x, y), 0.92, 0.92, fill=False, edgecolor="black", lw=2.2 if shared else 0.8))
                if shared:
                    ax.text(x + 0.46, y + 0.4, f"x{f.ref_counts[b]}", ha="center", va="center", fontsize=7,
                            fontweight="bold")
                if owner[b] == st.selected:
                    ax.add_patch(Rectangle((x + 0.06, y + 0.06), 0.8, 0.8, fill=False, edgecolor="white", lw=1.2,
                                           linestyle="--"))
            elif b in rank:
                ax.add_patch(Rectangle((x, y), 0.92, 0.92, facecolor="white", edgecolor="#707070", hatch="///", lw=0.8))
                ax.text(x + 0.46, y + 0.4, str(rank[b]), ha="center", va="center", fontsize=7, color="#404040",
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
            ax.text(x + 0.05, y + 0.8, str(b), fontsize=5, color="#303030")
        ax.set_xlim(-0.1, cols + 0.1)
        ax.set_ylim(-0.1, rows + 0.1)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"physical KV blocks ({bs} token slots each), numbered row by row")
        ax.set_title(f"Step {f.record.step}: colour = owning request (height = slots filled), thick edge = shared, "
                     f"hatched = cached but free (number = eviction order), grey = empty", fontsize=8)
        handles = [Rectangle((0, 0), 1, 1, facecolor=st.color(r), label=r) for r in snap.request_ids]
        if handles:
            ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, title="request",
                      title_fontsize=7, frameon=False)
        return fig
