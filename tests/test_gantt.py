"""Gantt charts of plans (`raymerge.gantt`): PNG output, operator kinds, missing matplotlib."""

from __future__ import annotations

import sys

import pytest

from planners import MergeProblem, Node, Operator, Worker, lpt, solve
from raymerge.gantt import draw_gantt, gantt_figure, makespan_setter, operator_kind

GB = 1e9
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _problem(layers: int = 3, nodes: int = 2, per_node: int = 2) -> MergeProblem:
    """A small llama-like merge: embed, per-layer attention/MLP/norm tensors, final norm, lm_head."""
    names = ["model.embed_tokens.weight"]
    for i in range(layers):
        names += [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"]
        names += [f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        names += [f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"]
    names += ["model.norm.weight", "lm_head.weight"]

    def size(name: str) -> float:
        return 0.001 * GB if "norm" in name else (2 * GB if "embed" in name or "lm_head" in name else 0.5 * GB)

    ops = [
        Operator(n, bytes_read=3 * size(n), bytes_written=size(n), compute_s=size(n) / GB, peak_memory=5 * size(n),
                 split_degrees=(1, 2, 4))
        for n in names
    ]
    node_list = [Node(f"node{j}", network_bandwidth=10 * GB) for j in range(nodes)]
    workers = [
        Worker(f"node{j}/gpu{k}", f"node{j}", memory_bytes=8 * GB, speed=1.0 + 0.5 * k, read_bandwidth=5 * GB)
        for j in range(nodes) for k in range(per_node)
    ]
    return MergeProblem(ops, workers, node_list, remote_bandwidth=20 * GB)


def _check_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000  # bars, labels and a legend, not an empty canvas


def test_draws_a_solved_plan(tmp_path):
    problem = _problem()
    plan = solve(problem, time_limit=5)
    out = draw_gantt(plan, problem, tmp_path / "plan.png")
    assert out == tmp_path / "plan.png"
    _check_png(out)


def test_draws_many_workers_with_a_title(tmp_path):
    problem = _problem(layers=8, nodes=40, per_node=8)  # 320 workers: capped height, thinned labels
    plan = lpt(problem)
    out = draw_gantt(plan, problem, tmp_path / "sub" / "big.png", title="320 workers")
    _check_png(out)


def test_makespan_label_names_what_sets_it():
    one = lpt(_problem(nodes=1, per_node=1))
    assert makespan_setter(one) == "worker node0/gpu0"  # one worker: its row is the makespan
    storage_bound = lpt(_problem(layers=8, nodes=40, per_node=8))  # 320 workers share 20 GB/s
    assert makespan_setter(storage_bound) == "remote storage"


def test_figure_shows_compute_links_and_every_kind():
    """Read from the Figure itself: the axis labels, a row per node link, the makespan's cause, and
    a legend entry (with visible bars) for every kind, norms included."""
    problem = _problem()
    plan = solve(problem, time_limit=5)
    fig = gantt_figure(plan, problem)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "seconds (predicted)"
    assert ax.get_ylabel() == "worker (compute) / node link"
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert ticks[:4] == [w.name for w in problem.workers]
    assert [t for t in ticks if t.startswith("link ")] == [f"link {n}" for n, s in sorted(plan.link_seconds.items()) if s > 0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    for kind in ("embed", "lm_head", "attn", "mlp", "norm"):
        assert any(entry.startswith(f"{kind}: ") for entry in legend), (kind, legend)
    assert any(entry.startswith("makespan ") and "set by " in entry for entry in legend)
    # the norm parts are ~1000x shorter than the rest: still drawn a visible width
    xmax = ax.get_xlim()[1]
    norm_bars = [b for c in ax.containers for b in c if c.get_label().startswith("norm")]
    assert norm_bars and min(b.get_width() for b in norm_bars) >= xmax * 0.0019


@pytest.mark.parametrize(
    "name, kind",
    [
        ("model.embed_tokens.weight", "embed"),
        ("transformer.wte.weight", "embed"),
        ("lm_head.weight", "lm_head"),
        ("model.layers.3.self_attn.q_proj.weight", "attn"),
        ("model.layers.3.self_attn.o_proj.bias", "attn"),
        ("transformer.h.0.attn.c_attn.weight", "attn"),
        ("model.layers.3.mlp.down_proj.weight", "mlp"),
        ("model.layers.3.block_sparse_moe.experts.7.w1.weight", "mlp"),
        ("model.layers.3.input_layernorm.weight", "norm"),
        ("model.layers.3.post_attention_layernorm.weight", "norm"),
        ("model.layers.3.self_attn.q_norm.weight", "norm"),
        ("model.norm.weight", "norm"),
        ("model.rotary_emb.inv_freq", "other"),
        ("score.weight", "other"),
    ],
)
def test_operator_kind(name, kind):
    assert operator_kind(name) == kind


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)  # makes `import` raise ImportError
    problem = _problem(layers=1)
    with pytest.raises(RuntimeError, match=r"pip install matplotlib"):
        draw_gantt(lpt(problem), problem, tmp_path / "plan.png")
    assert not (tmp_path / "plan.png").exists()
