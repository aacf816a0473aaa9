"""The pool actor: one class, every job's actor, composed of capabilities, called through typed methods."""

from __future__ import annotations

import inspect

import pytest
import torch

from raymerge.runtime import pool_actor as sa
from raymerge.runtime.actor_pool import ActorPool
from raymerge.runtime.pool_actor import ActorRef, PoolActor, actor_methods
from raymerge.runtime.worker import MergeWorkerImpl

CAPABILITIES = (MergeWorkerImpl, sa.StageLayers, sa.StageOutput, sa.Pruning, sa.Trial, sa.ReferenceLogits, sa.Statistics)


def test_pool_actor_has_no_base_classes_besides_object():
    assert PoolActor.__bases__ == (object,)
    assert PoolActor.__mro__ == (PoolActor, object)


def test_capabilities_are_separate_classes_composed_by_the_actor():
    for cap in CAPABILITIES:
        assert cap.__bases__ == (object,), cap  # no inheritance chain among them
    assert len(set(CAPABILITIES)) == len(CAPABILITIES)
    actor = PoolActor(0)
    held = {type(v) for v in vars(actor).values()}
    assert set(CAPABILITIES) <= held
    # Each capability has its own job.
    public = [{n for n, v in vars(c).items() if callable(v) and not n.startswith("_")} for c in CAPABILITIES]
    assert "apply_merge" in public[CAPABILITIES.index(sa.Trial)]
    assert "aim_begin" in public[CAPABILITIES.index(sa.Statistics)]
    assert "prune_collected" in public[CAPABILITIES.index(sa.Pruning)]
    assert "aim_begin" not in public[CAPABILITIES.index(sa.Trial)]
    assert "apply_merge" not in public[CAPABILITIES.index(sa.Statistics)]
    assert "run" in public[CAPABILITIES.index(MergeWorkerImpl)]
    assert "prune_collected" not in public[CAPABILITIES.index(MergeWorkerImpl)]


def test_stage_ref_exposes_exactly_the_actor_methods_with_their_signatures():
    names = actor_methods()
    assert {"load", "reload", "forward", "embed", "loss", "prune_sequential", "apply_merge", "aim_end",
            "merge_begin", "merge_run", "merge_finish", "calibrate", "histogram"} <= set(names)
    for name in names:
        routed = getattr(ActorRef, name)
        assert routed.__wrapped__ is getattr(PoolActor, name)
        assert inspect.signature(routed) == inspect.signature(getattr(PoolActor, name))


def test_unknown_call_fails_at_the_call_site():
    local = ActorPool.in_process().workers[0]
    with pytest.raises(AttributeError):
        local.lod  # noqa: B018 - a typo of load
    remote = ActorRef(object(), remote=True)  # never reaches the actor
    with pytest.raises(AttributeError):
        remote.forwrad(torch.zeros(1))
    with pytest.raises(AttributeError):
        ActorRef.not_a_method  # noqa: B018


def test_calls_route_to_remote_or_to_the_local_object():
    calls = []

    class _Method:
        def __init__(self, name):
            self.name = name

        def remote(self, *args, **kwargs):
            calls.append((self.name, args, kwargs))
            return f"ref:{self.name}"

    class _FakeHandle:
        def __getattr__(self, name):
            return _Method(name)

    ref = ActorRef(_FakeHandle(), remote=True)
    assert ref.forward("h", ("norms",), emit=False) == "ref:forward"
    assert calls == [("forward", ("h", ("norms",)), {"emit": False})]

    local = ActorPool.in_process()
    assert local.workers[0].describe().device == str(local.actors[0].device)
    with pytest.raises(RuntimeError, match="before load"):
        local.workers[0].embed(torch.zeros(1, 2, dtype=torch.long))
    local.kill()


def test_in_process_stage_runs_a_model_block(llama_models):
    from raymerge.checkpoints import SourceSpec
    from raymerge.blocks.decoder import describe_model
    from raymerge.blocks.stage import PruneSettings

    spec = SourceSpec(str(llama_models["base"]))
    src = spec.open()
    config = src.config()
    src.close()
    shape = describe_model(config)
    settings = PruneSettings(method="wanda", modules=shape.modules, dtype="float32")
    stages = ActorPool.in_process()
    s = stages.workers[0]
    try:
        assert stages.get(s.load(config, spec, 0, shape.num_layers - 1, settings, True, True)) > 0
        ids = torch.randint(0, int(config["vocab_size"]), (2, 8))
        h = s.forward(s.embed(ids), ("norms",))
        nll, n = s.loss(h, ids)
        assert n == 2 * 7 and nll > 0
        ratios = s.outlier_ratios(5.0)
        assert sorted(ratios) == list(range(shape.num_layers))
        # a search's trial re-masks from the kept dense weights; OWL ratios still come from those
        s.keep_dense()
        zeros = s.apply_prune({i: 0.5 for i in range(shape.num_layers)})
        assert zeros == pytest.approx(0.5, abs=0.01)
        assert s.outlier_ratios(5.0) == ratios
        s.keep_reference(h, 0)
        err, count = s.reconstruction(h, 0)
        assert err == 0.0 and count > 0
        # reload keeps the kept references (Sens-Merging compares models against them)
        s.reload(SourceSpec(str(llama_models["ft1"])))
        dist, _ = s.logit_distance(h, 0)
        assert dist > 0
    finally:
        stages.kill()
