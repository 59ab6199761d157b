"""Issue #4: progressive unfreezing, from the pure schedule to real DDP / ZeRO runs with transitions.

Unit tests (no processes): Schedule, layer-group discovery on six architectures, apply_stage and the
optimizer's parameter groups. Real runs (gloo, fp32, `tiny` recipe's BERT with groups embeddings,
block0, block1, pooler, head; dropout 0), each run once per module and shared:
    gradual  every 2 steps, 10 steps -> 4 transitions (after steps 2, 4, 6, 8), check_sync=1,
             checkpoints every 2 steps; on 1 process, DDP, ZeRO-2, ZeRO-3
    lpft     lp-ft (head only for 4 steps) with layer-wise LR decay 0.8 and rewarmup; 1 process and DDP
    resume   from the gradual run's step-4 checkpoint (after the second transition) into a new run
             folder, to step 10; 1 process
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import helpers
import pytest
import torch

from ftdist import config, optim
from ftdist import model as modellib
from ftdist.config import UnfreezeConfig
from ftdist.errors import FtdistError
from ftdist.unfreeze import Schedule, apply_stage

WORLD = {None: 1, "cpu-2": 2, "cpu-zero2": 2, "cpu-zero3": 2}
BACKENDS = [None, "cpu-2", "cpu-zero2", "cpu-zero3"]
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5
GROUP_NAMES = ["embeddings", "block0", "block1", "pooler", "head"]


def _label(preset):
    return preset or "1-process"


# ====================================================================== Schedule (pure)


def sched(n_groups: int = 5, steps_per_epoch: int = 7, **kw) -> Schedule:
    return Schedule(UnfreezeConfig(**kw), n_groups, steps_per_epoch)


def test_full_schedule_is_one_stage_with_everything():
    s = sched(schedule="full")
    assert s.n_stages == 1
    assert all(s.stage_at(k) == 0 for k in range(100))
    assert s.trainable_groups(0) == [0, 1, 2, 3, 4]
    assert s.transition_step(0) == 0


def test_gradual_every_steps():
    s = sched(schedule="gradual", every_steps=3)
    assert s.n_stages == 5  # head alone, then one more group per stage down to the embeddings
    assert [s.stage_at(k) for k in range(16)] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 4
    assert s.stage_at(10_000) == 4, "the last stage stays in force"
    assert [s.transition_step(st) for st in range(5)] == [0, 3, 6, 9, 12]
    assert [s.trainable_groups(st) for st in range(5)] == [[4], [3, 4], [2, 3, 4], [1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert [s.unfreeze_stage_of(g) for g in range(5)] == [4, 3, 2, 1, 0]


def test_gradual_every_epoch_uses_steps_per_epoch():
    s = sched(schedule="gradual", every_epoch=True, steps_per_epoch=7)
    assert [s.stage_at(k) for k in (0, 6, 7, 13, 14, 27, 28, 500)] == [0, 0, 1, 1, 2, 3, 4, 4]
    assert [s.transition_step(st) for st in range(5)] == [0, 7, 14, 21, 28]


@pytest.mark.parametrize("n_groups,per_stage,expected", [
    (5, 2, [[4], [2, 3, 4], [0, 1, 2, 3, 4]]),
    (5, 3, [[4], [1, 2, 3, 4], [0, 1, 2, 3, 4]]),
    (5, 4, [[4], [0, 1, 2, 3, 4]]),
    (5, 10, [[4], [0, 1, 2, 3, 4]]),
    (4, 1, [[3], [2, 3], [1, 2, 3], [0, 1, 2, 3]]),  # no pooler (RoBERTa, DistilBERT)
    (14, 4, [[13], list(range(9, 14)), list(range(5, 14)), list(range(1, 14)), list(range(14))]),  # 12 blocks
])
def test_gradual_groups_per_stage(n_groups, per_stage, expected):
    s = sched(n_groups=n_groups, schedule="gradual", every_steps=2, groups_per_stage=per_stage)
    assert s.n_stages == len(expected)
    assert [s.trainable_groups(st) for st in range(s.n_stages)] == expected
    assert s.stage_at(10 ** 6) == s.n_stages - 1


def test_lp_ft():
    s = sched(schedule="lp-ft", lp_steps=5)
    assert s.n_stages == 2
    assert [s.stage_at(k) for k in range(8)] == [0] * 5 + [1] * 3
    assert s.transition_step(1) == 5
    assert s.trainable_groups(0) == [4] and s.trainable_groups(1) == [0, 1, 2, 3, 4]


def test_plateau_stage_is_not_a_function_of_the_step():
    s = sched(schedule="gradual", on_plateau=True)
    with pytest.raises(RuntimeError, match="stateful"):
        s.stage_at(3)
    assert s.transition_step(0) == 0 and s.transition_step(2) is None


SCHEDULES = [dict(schedule="gradual", every_steps=2), dict(schedule="gradual", every_steps=5, groups_per_stage=2),
             dict(schedule="gradual", every_epoch=True), dict(schedule="lp-ft", lp_steps=3), dict(schedule="full")]


@pytest.mark.parametrize("kw", SCHEDULES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_stage_is_a_pure_function_of_the_step(kw):
    """Every rank computes the stage alone: it must depend on the step only, not on call history."""
    steps = list(range(60))
    forward = [sched(**kw).stage_at(k) for k in steps]
    shuffled = steps[:]
    random.Random(0).shuffle(shuffled)
    other = sched(**kw)  # another "rank", queried in another order, twice
    assert [dict((k, other.stage_at(k)) for k in shuffled)[k] for k in steps] == forward
    assert [other.stage_at(k) for k in steps] == forward
    s = sched(**kw)
    for k in steps:
        # the stage in force is the last one whose transition step has been reached
        assert forward[k] == max(st for st in range(s.n_stages) if s.transition_step(st) <= k)
    assert forward == sorted(forward), "stages never go back"
    for st in range(s.n_stages):
        groups = s.trainable_groups(st)
        assert groups == list(range(s.n_groups - len(groups), s.n_groups)), "trainable groups are a suffix: from the top"
        if st:
            assert set(s.trainable_groups(st - 1)) < set(groups)
    assert s.trainable_groups(s.n_stages - 1) == list(range(5)), "the last stage trains everything"


# ====================================================================== layer groups


@pytest.fixture(scope="module")
def tiny_recipe():
    return config.load("tiny", ["model.dropout=0"])


def tiny_bert(recipe):
    import accelerate.utils

    accelerate.utils.set_seed(recipe.train.seed)
    return modellib.build(recipe.model, "classification", ["negative", "positive"])


def _check_partition(model, groups):
    names = [n for n, _ in model.named_parameters()]
    flat = [n for g in groups for n in g.params]
    assert sorted(flat) == sorted(names), "every parameter in exactly one group"
    assert sum(g.count(model) for g in groups) == sum(p.numel() for p in model.parameters())


def test_layer_groups_tiny_bert(tiny_recipe):
    net = tiny_bert(tiny_recipe)
    groups = modellib.layer_groups(net)
    assert [g.name for g in groups] == GROUP_NAMES
    _check_partition(net, groups)
    prefix = {"embeddings": "bert.embeddings.", "block0": "bert.encoder.layer.0.", "block1": "bert.encoder.layer.1.",
              "pooler": "bert.pooler.", "head": "classifier."}
    for g in groups:
        assert g.params and all(n.startswith(prefix[g.name]) for n in g.params), (g.name, g.params)
    counts = [g.count(net) for g in groups]
    assert counts[1] == counts[2] == 8544 and counts[3] == 32 * 32 + 32 and counts[4] == 32 * 2 + 2


def test_group_patterns_override(tiny_recipe):
    net = tiny_bert(tiny_recipe)
    groups = modellib.layer_groups(net, ["embeddings", r"layer\.0\.", r"layer\.1\."])
    assert len(groups) == 4 and groups[-1].name == "head"
    _check_partition(net, groups)
    assert all("layer.0." in n for n in groups[1].params) and all("layer.1." in n for n in groups[2].params)
    assert sorted(groups[-1].params) == sorted(["bert.pooler.dense.weight", "bert.pooler.dense.bias",
                                                "classifier.weight", "classifier.bias"]), "unmatched -> head"
    with pytest.raises(FtdistError, match="match no parameter"):
        modellib.layer_groups(net, ["embeddings", "no_such_module"])
    with pytest.raises(FtdistError, match="no head"):
        modellib.layer_groups(net, ["."])


class Weird(torch.nn.Module):
    """Not a transformers encoder: nothing named embeddings/layer/pooler."""

    def __init__(self):
        super().__init__()
        self.lookup = torch.nn.Embedding(10, 4)
        self.stack = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
        self.out = torch.nn.Linear(4, 2)


def test_unrecognised_architecture_needs_patterns():
    with pytest.raises(FtdistError) as e:
        modellib.layer_groups(Weird())
    msg = str(e.value)
    assert "Weird" in msg and "unfreeze.group_patterns" in msg and "lookup.weight" in msg
    groups = modellib.layer_groups(Weird(), ["lookup", r"stack\.0\.", r"stack\.1\."])  # patterns make it work
    assert [len(g.params) for g in groups] == [1, 2, 2, 2]


def _tiny_hf(kind: str):
    import transformers as T

    common = dict(vocab_size=100, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=40, num_labels=3)
    cfg = {
        "distilbert": lambda: T.DistilBertConfig(vocab_size=100, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                                                 max_position_embeddings=40, num_labels=3),
        "roberta": lambda: T.RobertaConfig(hidden_size=16, **common),
        "electra": lambda: T.ElectraConfig(embedding_size=8, hidden_size=16, **common),
        "deberta-v2": lambda: T.DebertaV2Config(hidden_size=16, relative_attention=True, position_buckets=8,
                                                norm_rel_ebd="layer_norm", pos_att_type=["p2c", "c2p"], **common),
        "xlm-roberta": lambda: T.XLMRobertaConfig(hidden_size=16, **common),
    }[kind]()
    torch.manual_seed(0)
    return T.AutoModelForSequenceClassification.from_config(cfg)


ARCHS = {  # group names bottom to top, and the name prefix of each block
    "distilbert": (["embeddings", "block0", "block1", "head"], "distilbert.transformer.layer."),
    "roberta": (["embeddings", "block0", "block1", "head"], "roberta.encoder.layer."),
    "electra": (["embeddings", "block0", "block1", "head"], "electra.encoder.layer."),
    "deberta-v2": (["embeddings", "block0", "block1", "pooler", "head"], "deberta.encoder.layer."),
    "xlm-roberta": (["embeddings", "block0", "block1", "head"], "roberta.encoder.layer."),
}


@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_layer_groups_other_architectures(kind):
    net = _tiny_hf(kind)
    groups = modellib.layer_groups(net)
    names, block_prefix = ARCHS[kind]
    assert [g.name for g in groups] == names
    _check_partition(net, groups)
    for i in (0, 1):
        assert all(n.startswith(f"{block_prefix}{i}.") for n in groups[1 + i].params)
    head = groups[-1].params
    assert head and all(n.startswith("classifier.") or n.startswith("pre_classifier.") for n in head), head
    embed = groups[0].params
    assert any("word_embeddings" in n for n in embed)
    if kind == "electra":
        assert "electra.embeddings_project.weight" in embed  # embedding_size != hidden_size
    if kind == "deberta-v2":  # shared by every layer, so it sits with the embeddings at the bottom
        assert "deberta.encoder.rel_embeddings.weight" in embed
        assert groups[3].params == ["pooler.dense.weight", "pooler.dense.bias"]
    # the whole pipeline works on it: schedule, stages, optimizer groups
    s = Schedule(UnfreezeConfig(schedule="gradual", every_steps=1), len(groups), 10)
    for st in range(s.n_stages):
        count = apply_stage(net, groups, s, st)
        assert count == sum(groups[g].count(net) for g in s.trainable_groups(st))


# ====================================================================== apply_stage and optimizer groups


def test_apply_stage_sets_requires_grad(tiny_recipe):
    net = tiny_bert(tiny_recipe)
    groups = modellib.layer_groups(net)
    s = Schedule(UnfreezeConfig(schedule="gradual", every_steps=2), len(groups), 100)
    named = dict(net.named_parameters())
    for st in range(s.n_stages):
        count = apply_stage(net, groups, s, st)
        on = s.trainable_groups(st)
        for i, g in enumerate(groups):
            assert all(named[n].requires_grad == (i in on) for n in g.params), (st, g.name)
        assert count == sum(p.numel() for p in net.parameters() if p.requires_grad)
        assert count == sum(groups[i].count(net) for i in on)
    assert count == sum(p.numel() for p in net.parameters())


def test_param_groups_weight_decay_and_layerwise_lr(tiny_recipe):
    net = tiny_bert(tiny_recipe)
    groups = modellib.layer_groups(net)
    train = tiny_recipe.train
    unfreeze = UnfreezeConfig(schedule="gradual", every_steps=2, lr_decay=0.8)
    pg = optim.param_groups(net, groups, train, unfreeze)
    by_id = {id(p): n for n, p in net.named_parameters()}
    seen = [by_id[id(p)] for g in pg for p in g["params"]]
    assert sorted(seen) == sorted(by_id.values()), "each parameter in one optimizer group"
    norms = {f"{mn}.{pn}" for mn, m in net.named_modules() if isinstance(m, torch.nn.LayerNorm)
             for pn, _ in m.named_parameters(recurse=False)}
    assert len(norms) == 2 * 5  # embeddings + 2 per block
    depth = {name: len(GROUP_NAMES) - 1 - i for i, name in enumerate(GROUP_NAMES)}  # head 0 ... embeddings 4
    for g in pg:
        layer, kind = g["name"].split("/")
        assert g["layer_group"] == GROUP_NAMES.index(layer)
        assert g["lr"] == pytest.approx(train.lr * 0.8 ** depth[layer], rel=1e-12)
        for p in g["params"]:
            n = by_id[id(p)]
            exempt = n.endswith(".bias") or n in norms
            assert (kind == "no_decay") == exempt, n
            assert g["weight_decay"] == (0.0 if exempt else train.weight_decay), n
    assert train.weight_decay > 0
    only = optim.param_groups(net, groups, train, unfreeze, only=[3, 4])
    assert {g["name"].split("/")[0] for g in only} == {"pooler", "head"}


def test_frozen_parameters_untouched_by_adamw_weight_decay(tiny_recipe):
    """Frozen = requires_grad False: no grad, so AdamW skips them entirely (no decay) while the rest move."""
    net = tiny_bert(tiny_recipe)
    groups = modellib.layer_groups(net)
    s = Schedule(UnfreezeConfig(schedule="gradual", every_steps=2), len(groups), 100)
    apply_stage(net, groups, s, 1)  # pooler + head
    opt = optim.build_optimizer(optim.param_groups(net, groups, tiny_recipe.train, tiny_recipe.unfreeze), tiny_recipe.train)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    ids = torch.tensor([[101, 2204, 3185, 102], [101, 2919, 2154, 102]])
    out = net(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([1, 0]))
    out.loss.backward()
    opt.step()
    for i, g in enumerate(groups):
        for n in g.params:
            same = torch.equal(before[n], dict(net.named_parameters())[n])
            assert same == (i < 3), (g.name, n)


# ====================================================================== real runs

GRADUAL = ["model.dropout=0", "unfreeze.schedule=gradual", "unfreeze.every_steps=2", "train.max_steps=10",
           "train.check_sync=1", "checkpoint.every_steps=2", "checkpoint.keep_last=10"]
LPFT = ["model.dropout=0", "unfreeze.schedule=lp-ft", "unfreeze.lp_steps=4", "unfreeze.lr_decay=0.8",
        "unfreeze.rewarmup_steps=4", "train.max_steps=10", "train.check_sync=1", "log.every_steps=1"]
RESUME_STEP = 4


class Runs:
    def __init__(self, tmp: Path):
        self.tmp, self.cache = tmp, {}

    def get(self, name: str, preset: str | None = None) -> helpers.Result:
        key = (name, preset)
        if key not in self.cache:
            tag = f"{name}-{preset or 'single'}"
            if name == "gradual":
                overrides = GRADUAL
            elif name == "lpft":
                overrides = LPFT
            elif name == "resume":
                src = self.get("gradual", preset).run_dir / "checkpoints" / f"step-{RESUME_STEP:08d}"
                overrides = GRADUAL + [f"checkpoint.resume={src}"]
            res = helpers.run_ftdist(self.tmp, overrides, preset=preset, nprocs=WORLD[preset], name=tag)
            helpers.assert_ok(res, WORLD[preset])
            self.cache[key] = res
        return self.cache[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("unfreeze"))


@pytest.fixture(scope="module")
def tiny_init(tiny_recipe):
    """The initial weights of every run: `ftdist.model.build` after set_seed(seed), as Trainer.setup does."""
    net = tiny_bert(tiny_recipe)
    groups = modellib.layer_groups(net)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, groups, net


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), f"different tensors: {sorted(set(a) ^ set(b))}"
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def max_rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), f"{len(a)} vs {len(b)} steps"
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def load_ckpt(res: helpers.Result, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(res.run_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def gradual_schedule(n_groups: int) -> Schedule:
    return Schedule(UnfreezeConfig(schedule="gradual", every_steps=2), n_groups, 10 ** 6)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("preset", BACKENDS, ids=_label)
def test_gradual_trace_follows_the_schedule(runs, tiny_init, preset):
    _, groups, net = tiny_init
    s = gradual_schedule(len(groups))
    res = runs.get("gradual", preset)
    plan = json.loads((res.run_dir / "plan.json").read_text())
    assert [g["name"] for g in plan["layer_groups"]] == GROUP_NAMES
    assert [st["from_step"] for st in plan["stages"]] == [0, 2, 4, 6, 8]
    for rank in range(WORLD[preset]):
        trace = res.trace(rank)
        assert [r["step"] for r in trace] == list(range(1, 11))
        for r in trace:
            stage = s.stage_at(r["step"] - 1)
            assert r["stage"] == stage, f"rank {rank} step {r['step']}"
            assert r["trainable"] == sum(groups[g].count(net) for g in s.trainable_groups(stage)), f"step {r['step']}"
    assert len({r["stage"] for r in res.trace()}) == 5, "4 transitions happened"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("preset", BACKENDS[1:], ids=_label)
def test_gradual_matches_one_process(runs, preset):
    """check_sync=1: parameter checksums compared across ranks after every step and every transition
    (a mismatch fails the run, and `runs.get` asserts it passed)."""
    ref, res = runs.get("gradual"), runs.get("gradual", preset)
    diff = max_rel_diff(res.losses(), ref.losses())
    assert diff <= LOSS_RTOL, f"{preset}: per-step loss differs from 1 process by {diff:.3g}"
    wdiff = max_abs_diff(res.weights(), ref.weights())
    assert wdiff <= WEIGHT_ATOL, f"{preset}: final weights differ from 1 process by {wdiff:.3g}"
    done = sorted(p.name for p in (res.run_dir / "checkpoints").iterdir() if (p / "COMPLETE").is_file())
    assert done == [f"step-{k:08d}" for k in (2, 4, 6, 8, 10)]


@pytest.mark.timeout(600)
def test_gradual_ddp_checkpoints_match_one_process_at_every_transition(runs):
    ref, ddp = runs.get("gradual"), runs.get("gradual", "cpu-2")
    for step in (2, 4, 6, 8, 10):
        diff = max_abs_diff(load_ckpt(ddp, step), load_ckpt(ref, step))
        assert diff <= WEIGHT_ATOL, f"step {step}: DDP checkpoint differs from 1 process by {diff:.3g}"
        state = json.loads((ddp.run_dir / "checkpoints" / f"step-{step:08d}" / "ftdist_state.json").read_text())
        assert state["stage"] == min(step // 2, 4), "the checkpoint is taken after the transition at its step"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("preset", [None, "cpu-2"], ids=_label)
def test_frozen_groups_bitwise_unchanged_unfrozen_groups_train(runs, tiny_init, preset):
    init, groups, _ = tiny_init
    s = gradual_schedule(len(groups))
    res = runs.get("gradual", preset)
    step2 = load_ckpt(res, 2)
    # the reproduction of the initial weights is exact: everything below the head is bitwise init at step 2
    for g in groups[:-1]:
        for n in g.params:
            assert torch.equal(step2[n], init[n]), f"initial weights not reproduced (or {g.name} moved while frozen): {n}"
    for step in (2, 4, 6, 8, 10):
        ck = load_ckpt(res, step)
        trained = set(s.trainable_groups(s.stage_at(step - 1)))  # groups that took part in steps 1..step
        for i, g in enumerate(groups):
            for n in g.params:
                if i in trained:
                    assert not torch.equal(ck[n], init[n]), f"step {step}: {g.name} is unfrozen but {n} never changed"
                else:
                    assert torch.equal(ck[n], init[n]), f"step {step}: {g.name} is frozen but {n} changed"
    # so each group was seen frozen in the checkpoint before its transition and trained in the one after:
    # head from the start, pooler after step 2, block1 after 4, block0 after 6, embeddings after 8
    assert [min(k for k in (2, 4, 6, 8, 10) if i in s.trainable_groups(s.stage_at(k - 1)))
            for i in range(len(groups))] == [10, 8, 6, 4, 2]


@pytest.mark.timeout(600)
# 1 process only: the same resume on DDP, ZeRO-2 and ZeRO-3 (mid-schedule, across a later transition, dropout on,
# bitwise) is tests/test_reliability.py::test_exact_resume_after_sigkill_*.
@pytest.mark.parametrize("preset", [None], ids=_label)
def test_resume_mid_schedule_equals_uninterrupted(runs, preset):
    """Resume from step 4 (stage 2: after the second transition) of another run folder, to step 10.
    Dropout 0 (as every run here): the gradual runs it resumes are shared with the 1-vs-N process parity tests."""
    full, res = runs.get("gradual", preset), runs.get("resume", preset)
    src = full.run_dir / "checkpoints" / f"step-{RESUME_STEP:08d}"
    state = json.loads((src / "ftdist_state.json").read_text())
    assert state["step"] == RESUME_STEP and state["stage"] == 2
    plan = json.loads((res.run_dir / "plan.json").read_text())
    assert plan["resumed_from"] == str(src)
    trace = res.trace()
    assert [r["step"] for r in trace] == list(range(RESUME_STEP + 1, 11)), "resumed at step 5"
    assert [r["stage"] for r in trace] == [r["stage"] for r in full.trace()[RESUME_STEP:]]
    assert [r["ids"] for r in trace] == [r["ids"] for r in full.trace()[RESUME_STEP:]], "same data after resume"
    diff = max_rel_diff(res.losses(), full.losses()[RESUME_STEP:])
    assert diff <= LOSS_RTOL, f"{_label(preset)}: resumed losses differ by {diff:.3g}"
    wdiff = max_abs_diff(res.weights(), full.weights())
    assert wdiff <= WEIGHT_ATOL, f"{_label(preset)}: resumed final weights differ by {wdiff:.3g}"


@pytest.mark.timeout(600)
def test_lpft_with_layerwise_lr_decay_ddp_matches_one_process(runs, tiny_init):
    _, groups, net = tiny_init
    ref, ddp = runs.get("lpft"), runs.get("lpft", "cpu-2")
    total = sum(p.numel() for p in net.parameters())
    for res in (ref, ddp):
        assert [(r["stage"], r["trainable"]) for r in res.trace()] == [(0, groups[-1].count(net))] * 4 + [(1, total)] * 6
    diff = max_rel_diff(ddp.losses(), ref.losses())
    assert diff <= LOSS_RTOL, f"DDP lp-ft losses differ from 1 process by {diff:.3g}"
    wdiff = max_abs_diff(ddp.weights(), ref.weights())
    assert wdiff <= WEIGHT_ATOL, f"DDP lp-ft weights differ from 1 process by {wdiff:.3g}"
    # layer-wise decay as logged: lr(group) = lr(head) * 0.8^depth once the head's LR is non-zero
    rows = [json.loads(line) for line in (ref.run_dir / "metrics.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r.get("step") == 1 and "lr/head/decay" in r)
    for depth, name in enumerate(reversed(GROUP_NAMES)):
        assert row[f"lr/{name}/decay"] == pytest.approx(row["lr/head/decay"] * 0.8 ** depth, rel=1e-9)


@pytest.mark.timeout(600)
def test_rewarmup_applies_after_unfreeze_on_one_process(runs):
    """lp-ft: every group below the head unfreezes at step 4; with rewarmup_steps=4 its LR factor on the
    0-based steps 4, 5, 6, 7 is 1/4, 2/4, 3/4, 1 (optim.GroupLR), as the ZeRO path does after its rebuild.
    The LR logged at step s (after s steps) is the one of 0-based step s."""
    rows = {r["step"]: r for r in (json.loads(line) for line in (runs.get("lpft").run_dir / "metrics.jsonl")
                                   .read_text().splitlines()) if "lr/head/decay" in r}
    got = {s: rows[s]["lr/pooler/decay"] / rows[s]["lr/head/decay"] for s in (5, 6, 7, 8)}
    want = {s: 0.8 * min(1.0, (s - 4 + 1) / 4) for s in (5, 6, 7, 8)}
    assert got == pytest.approx(want, rel=1e-9)
