"""Chapters 02 and 03's lab, the PagedAttention Cinema: the real BlockManager of a real run, frame by frame.

Every frame is one `StepRecord` of the engine's trace: its `BlockSnapshot` says which request holds
which physical block after the step; the step's block events (allocated, freed, cache hits,
evictions) give the order of the free queue and which free blocks still hold cached KV, replayed
from the engine's first step exactly as the BlockManager does it. Nothing is simulated.

Two ways in: `CinemaLab` replays the trace of a run that already happened; `LiveCinemaLab` owns a
real engine that the learner feeds (cache settings, requests with a shared prefix) and steps, and
shows each step's frame as the engine appends it. Both draw with the same code.
"""
from __future__ import annotations

import html
import random
from dataclasses import dataclass

import ipywidgets as widgets
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from minivllm.core.trace import StepRecord
from minivllm.lab.base import WHOLE_DESCRIPTION, Lab, LabError, html_table

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


class _Replayer:
    """The free queue and the cached free blocks, carried from one step's record to the next."""

    def __init__(self, num_blocks: int):
        self.queue = list(range(num_blocks))  # a fresh BlockManager's free queue: block 0, 1, 2, ...
        self.cached: set[int] = set()

    def push(self, rec: StepRecord) -> Frame:
        refs = tuple(rec.blocks.ref_counts())
        freed = set(rec.blocks_freed)
        # blocks freed this step join the queue's tail in the order they were (last) freed
        tail = list(dict.fromkeys(reversed(rec.blocks_freed)))[::-1]
        self.queue = [b for b in self.queue if not refs[b] and b not in freed] + [b for b in tail if not refs[b]]
        self.cached = {b for b in self.queue if (b in rec.blocks.freed_cached if b in freed else b in self.cached)}
        return Frame(rec, refs, tuple(self.queue), frozenset(self.cached))


def _check_start(trace: list[StepRecord]) -> None:
    if not trace:
        raise ValueError("trace is empty: run the engine first")
    if trace[0].step != 0:
        raise ValueError(f"trace starts at step {trace[0].step}: the Cinema replays from the engine's step 0")


def replay(trace: list[StepRecord]) -> list[Frame]:
    """One `Frame` per step. The trace must start at the engine's first step (an empty cache whose
    free queue is block 0, 1, 2, ...), as a fresh BlockManager does."""
    _check_start(trace)
    replayer = _Replayer(trace[0].blocks.num_blocks)
    return [replayer.push(rec) for rec in trace]


def _check_drawable(num_blocks: int) -> None:
    if num_blocks > MAX_DRAWN_BLOCKS:
        raise LabError(f"the cache has {num_blocks} blocks; the Cinema draws at most {MAX_DRAWN_BLOCKS}: "
                       "build the engine with a smaller num_kv_blocks")


class Cinema:
    """The frames of one run, the frame on screen and the request whose block table is shown."""

    def __init__(self, trace: list[StepRecord]):
        _check_start(trace)
        self._start(trace[0].blocks.num_blocks, trace[0].blocks.block_size)
        self.extend(trace)

    def _start(self, num_blocks: int, block_size: int) -> None:
        _check_drawable(num_blocks)
        self.num_blocks, self.block_size = num_blocks, block_size
        self._replayer = _Replayer(num_blocks)
        self.frames: list[Frame] = []
        self.request_ids: list[str] = []  # every request that held a block, in order of first holding one
        self.frame_index = 0
        self.selected: str | None = None

    def extend(self, records: list[StepRecord]) -> None:
        """Add the frames of the next steps (records continuing the trace)."""
        for rec in records:
            frame = self._replayer.push(rec)
            self.frames.append(frame)
            self.request_ids += [r for r in frame.record.blocks.request_ids if r not in self.request_ids]
        if self.selected is None and self.request_ids:
            self.selected = self.request_ids[0]

    @property
    def frame(self) -> Frame | None:
        return self.frames[self.frame_index] if self.frames else None

    def seek(self, index: int) -> None:
        if not 0 <= index < len(self.frames):
            raise LabError(f"frame={index} is outside 0..{len(self.frames) - 1}" if self.frames
                           else "no frame yet: step the engine first")
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
        self.state = Cinema(trace)
        super().__init__(self._player_rows(interval_ms, self._next_frame), figure=True)

    def _player_rows(self, interval_ms: int, step_action) -> list[list[widgets.Widget]]:
        """The controls of the frames: play, a frame slider wide enough to pick any frame, step, and
        the request whose block table is shown."""
        if not isinstance(interval_ms, int) or isinstance(interval_ms, bool) or interval_ms < 1:
            raise ValueError(f"interval_ms={interval_ms!r} must be an int >= 1 (milliseconds per frame when playing)")
        last = max(len(self.state.frames) - 1, 0)
        self.play = widgets.Play(value=0, min=0, max=last, interval=interval_ms, description="play")
        self.slider = widgets.IntSlider(value=0, min=0, max=last, description="frame",
                                        layout=widgets.Layout(width="640px"))
        widgets.link((self.play, "value"), (self.slider, "value"))
        self.step_button = widgets.Button(description="step")
        self.request = widgets.Dropdown(options=tuple(self.state.request_ids), value=self.state.selected,
                                        description="request")
        return [[self.play, self.on_change(self.slider, self.state.seek)],
                [self.on_click(self.step_button, step_action), self.on_change(self.request, self.state.select)]]

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
        if f is None:
            return (f"<p><b>no step yet</b> &middot; {st.num_blocks} empty blocks of {st.block_size} token slots: "
                    "add a request and step</p>")
        rec, bs = f.record, f.record.blocks.block_size
        slots, filled = f.num_used * bs, sum(f.block_fill())
        head = (f"<p><b>frame {st.frame_index} of {len(st.frames) - 1}</b> (engine step {rec.step}) &middot; "
                f"running {rec.num_running}, waiting {rec.num_waiting} &middot; block size {bs}</p>")
        counters = html_table(
            ["used", "shared (ref &gt; 1)", "free, cached", "free, empty", "total", "utilisation (used / total)",
             "filled slots (tokens / used slots)"],
            [[f.num_used, f.num_shared, len(f.cached_free), f.num_free - len(f.cached_free), f.num_blocks,
              f"{100 * f.num_used / f.num_blocks:.1f} %", f"{100 * filled / slots:.1f} %" if slots else "-"]])
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
        return (f"<p>request {html.escape(rid)}: {tokens} tokens in {len(table)} blocks</p>" + html_table(
            ["logical block", "physical block", "tokens", "ref count"],
            [[i, b, f"{min(bs, tokens - i * bs)} of {bs}", f.ref_counts[b]] for i, b in enumerate(table)]))

    def figure(self):
        st, f = self.state, self.state.frame
        num_blocks, bs = st.num_blocks, st.block_size
        cols = min(16, num_blocks)
        rows = -(-num_blocks // cols)
        fig = Figure(figsize=(0.55 * cols + 1.5, 0.55 * rows + 1.0))
        ax = fig.add_subplot()
        owner: dict[int, str] = {}  # a shared block takes the colour of its oldest holder
        request_ids, fill, rank = (), [0] * num_blocks, {}  # before the first step: every block empty
        if f is not None:
            request_ids, fill = f.record.blocks.request_ids, f.block_fill()
            rank = {b: i + 1 for i, b in enumerate(f.eviction_order())}
            for rid, table in zip(request_ids, f.record.blocks.block_tables):
                for b in table:
                    owner.setdefault(b, rid)
        for b in range(num_blocks):
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
        title = f"Step {f.record.step}" if f is not None else "Before the first step"
        ax.set_title(f"{title}: colour = owning request (height = slots filled), thick edge = shared, "
                     f"hatched = cached but free (number = eviction order), grey = empty", fontsize=8)
        handles = [Rectangle((0, 0), 1, 1, facecolor=st.color(r), label=r) for r in request_ids]
        if handles:
            ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, title="request",
                      title_fontsize=7, frameon=False)
        return fig


# ---- live: the learner's own run ------------------------------------------------------------------
@dataclass(frozen=True)
class LiveRequest:
    """A request the learner added: ``prompt_len`` tokens, the first ``shared_prefix`` of them the
    lab's shared prefix (the same tokens in every request), the rest its own."""

    request_id: str
    prompt_len: int
    shared_prefix: int
    max_tokens: int


class LiveCinema(Cinema):
    """A real `LLMEngine` with the learner's cache settings, the requests added to it, and the frames of
    the steps it ran (read from its trace after every step)."""

    def __init__(self, model: str | None = None, *, num_kv_blocks: int = 16, block_size: int = 16,
                 enable_prefix_caching: bool = True, max_model_len: int = 256, max_num_batched_tokens: int = 128,
                 max_num_seqs: int = 8, seed: int = 0):
        if model is None:
            from minivllm import course
            model = course.model_path("target")
        self.model, self.seed = model, seed
        self.engine_args = dict(device="cpu", max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens,
                                max_num_seqs=max_num_seqs)
        self.engine = None
        self.rebuild(num_kv_blocks=num_kv_blocks, block_size=block_size, enable_prefix_caching=enable_prefix_caching)

    # ---- the engine ------------------------------------------------------------------------------
    @property
    def settings(self) -> dict:
        """The cache settings in effect."""
        cache = self.engine.config.cache_config
        return {"num_kv_blocks": self.engine.block_manager.num_blocks, "block_size": cache.block_size,
                "enable_prefix_caching": cache.enable_prefix_caching}

    def rebuild(self, **changes) -> None:
        """A new engine, with ``changes`` to the cache settings (``num_kv_blocks``, ``block_size``,
        ``enable_prefix_caching``) and no requests; refused settings change nothing."""
        from minivllm.llm import LLM

        settings = {**self.settings, **changes} if self.engine is not None else changes
        n = settings["num_kv_blocks"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise LabError(f"num_kv_blocks={n!r} must be an int >= 1")
        _check_drawable(n)
        llm = LLM(self.model, **self.engine_args, **settings)  # raises ValueError on a bad setting
        if self.engine is not None:
            self.engine.close()
        self.engine = llm.llm_engine
        bm = self.engine.block_manager
        self._start(bm.num_blocks, bm.block_size)
        self.requests: list[LiveRequest] = []
        self.finished: dict[str, str] = {}
        rng = random.Random(self.seed)
        vocab = self.engine.model_config.vocab_size
        self.prefix = [rng.randrange(vocab) for _ in range(self.engine.max_model_len)]

    # ---- requests and steps --------------------------------------------------------------------
    def prompt(self, number: int, prompt_len: int, shared_prefix: int) -> list[int]:
        """The token ids of request ``number``: the shared prefix, then tokens of its own (seeded by its number)."""
        rng = random.Random(self.seed * 100_003 + number + 1)
        vocab = self.engine.model_config.vocab_size
        return self.prefix[:shared_prefix] + [rng.randrange(vocab) for _ in range(prompt_len - shared_prefix)]

    def add(self, prompt_len: int, max_tokens: int, shared_prefix: int = 0) -> str:
        """Queue a greedy request that generates exactly ``max_tokens`` tokens; the engine's own checks
        refuse one that could never run (longer than max_model_len, or than the whole cache)."""
        for name, value, low in (("prompt_len", prompt_len, 1), ("max_tokens", max_tokens, 1),
                                 ("shared_prefix", shared_prefix, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise LabError(f"{name}={value!r} must be an int >= {low}")
        if shared_prefix > prompt_len:
            raise LabError(f"shared_prefix={shared_prefix} is longer than the prompt (prompt_len={prompt_len})")
        from minivllm.sampling_params import SamplingParams

        request_id = f"r{len(self.requests)}"
        self.engine.add_request(request_id, {"prompt_token_ids": self.prompt(len(self.requests), prompt_len,
                                                                             shared_prefix)},
                                SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        self.requests.append(LiveRequest(request_id, prompt_len, shared_prefix, max_tokens))
        return request_id

    def step(self) -> None:
        """One `engine.step()`; its record becomes the frame on screen."""
        if not self.engine.has_unfinished_requests():
            raise LabError("nothing to run: add a request first" if not self.requests
                           else "every request has finished: add another one")
        for out in self.engine.step():
            self.finished[out.request_id] = out.outputs[0].finish_reason
        self.extend(self.engine.trace[len(self.frames):])
        self.frame_index = len(self.frames) - 1


class LiveCinemaLab(CinemaLab):
    """The Cinema on a run you make: set the cache, add requests (prompt length, max tokens, how much
    of the prompt is the shared prefix), press *step*. Every frame is the real BlockManager's after
    that step; when the cache runs out the scheduler preempts, on screen. Changing a cache setting (or
    *reset*) starts a new engine with no requests."""

    def __init__(self, model: str | None = None, *, num_kv_blocks: int = 16, block_size: int = 16,
                 enable_prefix_caching: bool = True, max_model_len: int = 256, max_num_batched_tokens: int = 128,
                 max_num_seqs: int = 8, seed: int = 0, prompt_len: int = 40, max_tokens: int = 40,
                 shared_prefix: int = 0, interval_ms: int = 400):
        self.state = LiveCinema(model, num_kv_blocks=num_kv_blocks, block_size=block_size,
                                enable_prefix_caching=enable_prefix_caching, max_model_len=max_model_len,
                                max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs, seed=seed)
        wide = {"style": WHOLE_DESCRIPTION}
        self.num_kv_blocks = widgets.IntText(value=self.state.num_blocks, description="num_kv_blocks",
                                             layout=widgets.Layout(width="180px"), **wide)
        self.block_size = widgets.Dropdown(options=sorted({1, 2, 4, 8, 16, 32, self.state.block_size}),
                                           value=self.state.block_size, description="block_size",
                                           layout=widgets.Layout(width="160px"), **wide)
        self.prefix_caching = widgets.Checkbox(value=enable_prefix_caching, description="enable_prefix_caching",
                                               indent=False)
        self.reset_button = widgets.Button(description="reset (new engine)")
        limit = self.state.engine.max_model_len
        self.prompt_len = widgets.IntSlider(value=prompt_len, min=1, max=limit, description="prompt_len", **wide)
        self.max_tokens = widgets.IntSlider(value=max_tokens, min=1, max=limit, description="max_tokens", **wide)
        self.shared_prefix = widgets.IntSlider(value=shared_prefix, min=0, max=limit, description="shared_prefix",
                                               **wide)
        self.add_button = widgets.Button(description="add request")
        self._last_request = (prompt_len, max_tokens, shared_prefix)
        rows = [[self.on_change(self.num_kv_blocks, lambda n: self.state.rebuild(num_kv_blocks=n)),
                 self.on_change(self.block_size, lambda b: self.state.rebuild(block_size=b)),
                 self.on_change(self.prefix_caching, lambda on: self.state.rebuild(enable_prefix_caching=on)),
                 self.on_click(self.reset_button, self.state.rebuild)],
                [self.prompt_len, self.shared_prefix, self.max_tokens,
                 self.on_click(self.add_button, self._add_from_controls)]]
        rows += self._player_rows(interval_ms, self.state.step)
        Lab.__init__(self, rows, figure=True)

    # ---- actions -------------------------------------------------------------------------------
    def _add_from_controls(self) -> None:
        """Add the request the controls describe; a refused one puts them back to the last request
        added (or the lab's first), never holding what the engine refused."""
        try:
            self.state.add(self.prompt_len.value, self.max_tokens.value, self.shared_prefix.value)
        except ValueError:
            for control, value in zip((self.prompt_len, self.max_tokens, self.shared_prefix), self._last_request):
                self.sync(control, value=value)
            raise
        self._last_request = (self.prompt_len.value, self.max_tokens.value, self.shared_prefix.value)

    def refresh(self) -> None:
        """The frame controls follow the state (a step shows its frame; a new engine has none), then the view."""
        st, last = self.state, max(len(self.state.frames) - 1, 0)
        self.sync(self.slider, max=last, value=st.frame_index)
        self.sync(self.play, max=last, value=st.frame_index)
        self.sync(self.request, options=tuple(st.request_ids), value=st.selected)
        super().refresh()

    # ---- from code ---------------------------------------------------------------------------
    def add(self, prompt_len: int, max_tokens: int, shared_prefix: int = 0) -> None:
        """What the *add request* button does, from code."""
        for control, value in ((self.prompt_len, prompt_len), (self.max_tokens, max_tokens),
                               (self.shared_prefix, shared_prefix)):
            control.value = value
        self.add_button.click()

    def set(self, **settings) -> None:
        """Set cache controls as a learner would (``num_kv_blocks=8``, ``block_size=4``,
        ``enable_prefix_caching=False``); each change starts a new engine."""
        controls = {"num_kv_blocks": self.num_kv_blocks, "block_size": self.block_size,
                    "enable_prefix_caching": self.prefix_caching}
        for name, value in settings.items():
            if name not in controls:
                raise ValueError(f"{name}= is not a cache setting of the lab; one of {sorted(controls)}")
            controls[name].value = value

    def reset(self) -> None:
        self.reset_button.click()

    # ---- view --------------------------------------------------------------------------------
    def render(self) -> str:
        st = self.state
        s = st.settings
        engine = (f"<p>engine: {s['num_kv_blocks']} KV blocks of {s['block_size']} tokens, prefix caching "
                  f"{'on' if s['enable_prefix_caching'] else 'off'} &middot; requests added {len(st.requests)}, "
                  f"finished {len(st.finished)}</p>")
        if st.requests:
            engine += html_table(
                ["request", "prompt tokens", "of them shared prefix", "max_tokens", "now"],
                [[r.request_id, r.prompt_len, r.shared_prefix, r.max_tokens, self._status(r.request_id)]
                 for r in st.requests])
        return engine + super().render()

    def _status(self, request_id: str) -> str:
        if request_id in self.state.finished:
            return f"finished ({self.state.finished[request_id]})"
        seq = self.state.engine.requests.get(request_id)
        return seq.status.value if seq is not None else "-"
