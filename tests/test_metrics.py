"""ftdist.metrics: shipped offline evaluate metrics, checked against sklearn / scipy and hand-made NER cases."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NAMES = ("accuracy", "f1", "f1_micro", "precision", "recall", "mcc", "pearson", "spearman", "seqeval")
CLASSIFICATION = ("accuracy", "f1", "f1_micro", "precision", "recall", "mcc")
N_PROCS = 3  # concurrent offline loaders sharing one empty HF_HOME

OFFLINE_SCRIPT = textwrap.dedent(
    """
    import socket
    import sys
    def _no_network(*args, **kwargs):
        raise RuntimeError("network access attempted")
    socket.socket.connect = socket.create_connection = _no_network
    class _NoTransformers:  # evaluate's evaluator then skips transformers + torch: ~4 s less CPU per process
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "transformers":
                raise ImportError(name)
    sys.meta_path.insert(0, _NoTransformers())

    import evaluate
    import ftdist.metrics as M
    from ftdist import config
    from ftdist.errors import FtdistError
    from ftdist.metrics import counting

    cls = dict(predictions=[0, 1, 2, 2, 1, 0], references=[0, 2, 2, 1, 1, 1])
    reg = dict(predictions=[0.1, 0.4, 0.35, 0.8], references=[0.0, 0.5, 0.3, 0.9])
    ner = dict(predictions=[["B-PER", "I-PER", "O"], ["I-LOC"]], references=[["B-PER", "I-PER", "O"], ["B-ORG"]])
    for name in M.NAMES:
        inputs = ner if name == "seqeval" else reg if name in ("pearson", "spearman") else cls
        ours = M.compute([name], **inputs)[name]
        for path in (M.path(name).parent, M.path(name)):  # the folder and the script
            module = evaluate.load(str(path))
            assert isinstance(module, evaluate.Metric), type(module)
            result = module.compute(**inputs)
            got = result["overall_f1"] if name == "seqeval" else result[name]
            assert got == ours, (name, path, got, ours)
            if name in ("f1", "precision", "recall", "mcc"):  # evaluate's copy imports the one shared counts()
                assert sys.modules[type(module).__module__].counts is counting.counts, name
    print("OK", len(M.NAMES))

    # a local evaluate module named in a recipe, end to end: validation, then metrics.compute
    folder = sys.argv[1]
    raw = {"data": {"dataset": "vader"}, "eval": {"metrics": ["accuracy", f"{folder}/my_metric"], "best_metric": "my_metric_n"}}
    recipe = config.from_dict(raw)
    got = M.compute(recipe.eval.metrics, **cls)
    assert got == {"accuracy": 0.5, "my_metric": 0.5, "my_metric_n": 6.0}, got
    assert M.compute([f"{folder}/my_metric/my_metric.py"], **cls) == {"my_metric": 0.5, "my_metric_n": 6.0}
    try:
        M.compute([f"{folder}/bad_metric"], **cls)
        raise AssertionError("a list-valued result passed")
    except FtdistError as e:
        assert "bad_metric" in str(e) and "'hist'" in str(e) and "not a number" in str(e), e
    print("OK local")

    # a hub id without network: one clear FtdistError, no chained traceback
    try:
        M.compute(["accuracy", "ftdist-tests/no_such_metric"], **cls)
        raise AssertionError("a hub id loaded offline")
    except FtdistError as e:
        msg = str(e)
        assert e.__cause__ is None and e.__suppress_context__, "chained traceback"
        assert "'ftdist-tests/no_such_metric'" in msg and "network" in msg and "local evaluate module" in msg, msg
        assert len(msg.splitlines()) == 1, msg
    print("OK hub")
    """
)

LOCAL_METRIC = """
import datasets
import evaluate


class {cls}(evaluate.Metric):
    def _info(self):
        ints = datasets.Value("int64")
        return evaluate.MetricInfo(description="", citation="", inputs_description="",
                                   features=datasets.Features({{"predictions": ints, "references": ints}}))

    def _compute(self, predictions, references):
        return {result}
"""


def _local_metrics(folder: Path) -> Path:
    """my_metric (a result named like it, plus "n") and bad_metric (a list-valued result), as evaluate module folders."""
    for name, cls, result in [
        (
            "my_metric",
            "MyMetric",
            '{"my_metric": sum(p == r for p, r in zip(predictions, references)) / len(references), "n": len(references)}',
        ),
        ("bad_metric", "BadMetric", '{"hist": [1, 2]}'),
    ]:
        (folder / name).mkdir(parents=True)
        (folder / name / f"{name}.py").write_text(LOCAL_METRIC.format(cls=cls, result=result))
    return folder


@pytest.fixture(scope="module", autouse=True)
def offline_procs(tmp_path_factory):
    """Start the offline subprocesses first, so they overlap with this process importing evaluate (slow)."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    local = _local_metrics(tmp_path_factory.mktemp("local_metrics"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "XDG_CACHE"))}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_EVALUATE_OFFLINE="1",
        HF_HOME=str(hf_home),
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    # They block transformers to keep this test fast; this process runs the metrics with transformers imported.
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OFFLINE_SCRIPT, str(local)],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(N_PROCS)
    ]
    yield hf_home, local, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def M():
    import ftdist.metrics

    return ftdist.metrics


def _sklearn(name, y_true, y_pred):
    from sklearn import metrics as skm

    return {
        "accuracy": lambda: skm.accuracy_score(y_true, y_pred),
        "f1": lambda: skm.f1_score(y_true, y_pred, average="macro", zero_division=0),
        "f1_micro": lambda: skm.f1_score(y_true, y_pred, average="micro", zero_division=0),
        "precision": lambda: skm.precision_score(y_true, y_pred, average="macro", zero_division=0),
        "recall": lambda: skm.recall_score(y_true, y_pred, average="macro", zero_division=0),
        "mcc": lambda: skm.matthews_corrcoef(y_true, y_pred),
    }[name]()


def _classification_cases():
    rng = np.random.default_rng(0)
    cases = []
    for n, k_true, k_pred in [(50, 2, 2), (200, 5, 5), (300, 3, 6), (300, 7, 2), (1000, 10, 10), (7, 4, 4)]:
        y_true = rng.integers(0, k_true, n)
        y_pred = np.where(rng.random(n) < 0.5, y_true, rng.integers(0, k_pred, n))  # correlated, some labels only predicted
        cases.append((y_true.tolist(), y_pred.tolist()))
    cases += [([1, 1, 1], [1, 1, 1]), ([0, 0, 1, 1], [1, 1, 1, 1]), ([3, 5, 9], [9, 9, 4]), ([0], [1])]
    return cases


@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")  # sklearn, on the one-class cases
@pytest.mark.parametrize("case", range(len(_classification_cases())))
def test_classification_matches_sklearn(M, case):
    y_true, y_pred = _classification_cases()[case]
    got = M.compute(list(CLASSIFICATION), predictions=y_pred, references=y_true)
    assert list(got) == list(CLASSIFICATION)
    for name in CLASSIFICATION:
        assert isinstance(got[name], float)
        assert got[name] == pytest.approx(_sklearn(name, y_true, y_pred), abs=1e-12, rel=0), name


def test_classification_accepts_numpy(M):
    y = np.array([0, 1, 2, 1])
    assert M.compute(["accuracy", "f1"], predictions=y, references=np.array([0, 1, 1, 1])) == pytest.approx(
        {"accuracy": 0.75, "f1": (1 + 0.8 + 0) / 3}, abs=1e-12
    )


@pytest.mark.parametrize("seed", range(4))
def test_correlations_match_scipy(M, seed):
    from scipy import stats

    rng = np.random.default_rng(seed)
    n = [10, 100, 1000, 37][seed]
    ref = rng.normal(size=n)
    pred = ref + rng.normal(scale=0.5 + seed, size=n)
    if seed == 3:  # ties for spearman
        ref, pred = np.round(ref), np.round(pred * 2) / 2
    got = M.compute(["pearson", "spearman"], predictions=pred.tolist(), references=ref.tolist())
    assert got["pearson"] == pytest.approx(stats.pearsonr(pred, ref)[0], abs=1e-12, rel=0)
    assert got["pearson"] == pytest.approx(np.corrcoef(pred, ref)[0, 1], abs=1e-12, rel=0)
    assert got["spearman"] == pytest.approx(stats.spearmanr(pred, ref)[0], abs=1e-12, rel=0)


def test_correlation_of_constant_is_nan(M):
    got = M.compute(["pearson", "spearman"], predictions=[1.0, 1.0, 1.0], references=[0.1, 0.2, 0.3])
    assert np.isnan(got["pearson"]) and np.isnan(got["spearman"])


# (predictions, references, precision, recall, f1, token accuracy)
SEQEVAL_CASES = {
    "exact_match": ([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-LOC"]], 1, 1, 1, 1),
    "partial_overlap": (
        [["B-PER", "I-PER", "O", "O", "B-LOC"]],
        [["B-PER", "I-PER", "I-PER", "O", "B-LOC"]],
        1 / 2,
        1 / 2,
        1 / 2,
        4 / 5,
    ),
    "i_starts_chunk": ([["I-PER", "I-PER", "O", "I-LOC"]], [["B-PER", "I-PER", "O", "B-LOC"]], 1, 1, 1, 2 / 4),
    # sentences never share a chunk: the I-PER opening sentence 2 is a new entity
    "i_starts_sentence": ([["B-PER", "I-PER"], ["I-PER", "O"]], [["B-PER", "I-PER"], ["B-PER", "O"]], 1, 1, 1, 3 / 4),
    "type_mismatch": ([["B-ORG", "I-ORG", "O"]], [["B-PER", "I-PER", "O"]], 0, 0, 0, 1 / 3),
    # B-PER I-LOC is two chunks: PER [0,0] and LOC [1,1]
    "b_then_i_other_type": ([["B-PER", "I-LOC", "O"]], [["B-PER", "B-LOC", "O"]], 1, 1, 1, 2 / 3),
    "b_then_i_other_type_vs_one_chunk": ([["B-PER", "I-LOC", "O"]], [["B-PER", "I-PER", "O"]], 0, 0, 0, 2 / 3),
    "empty_predictions": ([["O", "O"], ["O"]], [["B-PER", "O"], ["B-LOC"]], 0, 0, 0, 1 / 3),
    "no_entities_anywhere": ([["O", "O"]], [["O", "O"]], 0, 0, 0, 1),
    # micro average over types: 1 of 3 predicted entities is right, 1 of 3 true ones is found
    "micro_average": (
        [["B-PER", "O", "B-LOC", "I-LOC"], ["B-ORG"]],
        [["B-PER", "O", "B-LOC", "O"], ["B-MISC"]],
        1 / 3,
        1 / 3,
        1 / 3,
        3 / 5,
    ),
    "micro_average_unbalanced": (
        [["B-PER", "O", "B-LOC", "O"], ["O"]],
        [["B-PER", "O", "B-LOC", "I-LOC"], ["B-ORG"]],
        1 / 2,
        1 / 3,
        2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3),
        3 / 5,
    ),
}


@pytest.mark.parametrize("case", list(SEQEVAL_CASES))
def test_seqeval_cases(M, case):
    pred, ref, p, r, f, acc = SEQEVAL_CASES[case]
    got = M.compute(["seqeval"], predictions=pred, references=ref)
    expected = {"seqeval_precision": p, "seqeval_recall": r, "seqeval_f1": f, "seqeval_accuracy": acc, "seqeval": f}
    assert got.keys() == expected.keys()
    assert all(isinstance(v, float) for v in got.values())
    assert got == pytest.approx(expected, abs=1e-12), case


def test_seqeval_per_type_and_length_check(M):
    module = M.load("seqeval")
    res = module.compute(predictions=[["B-PER", "I-PER", "O", "B-LOC"]], references=[["B-PER", "I-PER", "O", "B-ORG"]])
    assert res["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "number": 1}
    assert res["ORG"]["number"] == 1 and res["LOC"]["number"] == 0 and res["overall_f1"] == 0.5
    with pytest.raises(ValueError, match="as many tags"):
        module.compute(predictions=[["O"]], references=[["O", "O"]])


def test_compute_goes_through_evaluate_public_api(M, monkeypatch):
    """Every metric's math (`_compute`) is called by evaluate's public EvaluationModule.compute (the Arrow
    round trip included), and the result is bitwise the module's own math on the same inputs."""
    import evaluate

    reached = []
    for name in NAMES:
        cls = type(M._module(name))

        def _compute(self, _private=cls._compute, **kwargs):
            caller = sys._getframe(1).f_code
            reached.append((self, caller.co_name, caller.co_filename))
            return _private(self, **kwargs)

        monkeypatch.setattr(cls, "_compute", _compute)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300).tolist()
    p = np.where(rng.random(300) < 0.6, y, rng.integers(0, 5, 300)).tolist()
    r = rng.normal(size=100)
    reg = (np.float32(r + rng.normal(size=100)).tolist(), np.float32(r).tolist())
    ner = ([["B-PER", "I-PER", "O", "I-LOC"], ["O"]], [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG"]])
    got = {**M.compute(list(CLASSIFICATION), p, y), **M.compute(["pearson", "spearman"], *reg), **M.compute(["seqeval"], *ner)}
    public = evaluate.EvaluationModule.compute.__code__
    assert reached == [(M._LOADED[name], public.co_name, public.co_filename) for name in NAMES]
    for name in NAMES:
        inputs = ner if name == "seqeval" else reg if name in ("pearson", "spearman") else (p, y)
        own = M._LOADED[name]._compute(predictions=inputs[0], references=inputs[1])
        assert got[name] == (own["overall_f1"] if name == "seqeval" else own[name]), name


def test_counts_shared(M):
    import importlib

    from ftdist.metrics import counting

    scripts = sorted(Path(M.__file__).parent.rglob("*.py"))
    assert [p.name for p in scripts if "def counts(" in p.read_text()] == ["counting.py"]
    for name in ("f1", "precision", "recall", "mcc"):
        assert importlib.import_module(f"ftdist.metrics.{name}.{name}").counts is counting.counts, name


def test_recipe_validation_uses_the_one_list(tmp_path, monkeypatch):
    """config validates eval.metrics with ftdist.metrics (shipped names, local module paths, hub ids) and
    imports it without evaluate."""
    from ftdist import config
    from ftdist.errors import RecipeError

    assert not hasattr(config, "KNOWN_METRICS") and config.metrics.NAMES == NAMES
    _local_metrics(tmp_path)
    monkeypatch.chdir(tmp_path)

    def errors(metrics, best):
        try:
            config.from_dict({"data": {"dataset": "vader"}, "eval": {"metrics": metrics, "best_metric": best}})
        except RecipeError as e:
            return str(e)
        return ""

    assert errors(["accuracy", "./my_metric/my_metric.py", "my_metric", str(tmp_path / "my_metric")], "my_metric") == ""
    assert errors(["./my_metric"], "my_metric_n") == ""  # a result key of a local module, flattened
    assert errors(["bleu", "org/name"], "name_score") == ""  # hub ids: what they report is known once they ran
    assert "unknown metric 'acuracy' (did you mean 'accuracy'?)" in errors(["acuracy"], "loss")
    assert "unknown metric './no_such.py'" in errors(["./no_such.py"], "loss")
    assert "unknown metric './bad_metric/x.py'" in errors(["./bad_metric/x.py"], "loss")  # not there
    assert "eval.best_metric: 'bleu' is not in eval.metrics" in errors(["accuracy"], "bleu")
    code = "import sys, ftdist.config; sys.exit('evaluate' in sys.modules or 'datasets' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0, "import ftdist.config imports evaluate"


def test_result_flattening(M):
    from ftdist.errors import FtdistError

    assert M._flatten("./x/acc.py", {"acc": 1, "n": np.int64(3)}) == {"acc": 1.0, "acc_n": 3.0}
    assert M._flatten("org/score", {"f": 0.5}) == {"score_f": 0.5}
    for bad in ({"acc": [1]}, {"acc": "0.5"}, {"acc": True}, {}, None):
        with pytest.raises(FtdistError, match="metric './x/acc.py'"):
            M._flatten("./x/acc.py", bad)


def test_load_returns_evaluate_module_without_modules_cache(M):
    import evaluate

    for name in NAMES:
        module = M.load(name)
        assert isinstance(module, evaluate.Metric)
        assert type(module).__module__ == f"ftdist.metrics.{name}.{name}"  # imported in place, not copied
        assert M.path(name).is_file() and M.path(name).parent.name == name
    assert M.load("accuracy") is not M.load("accuracy")  # load gives fresh instances; compute caches
    M.compute(["accuracy"], [1], [1])
    cached = M._LOADED["accuracy"]
    M.compute(["accuracy", "accuracy"], [1, 0], [1, 1])
    assert M._LOADED["accuracy"] is cached


def test_unknown_metric(M):
    from ftdist.errors import FtdistError

    calls = (
        lambda: M.load("bleu"),
        lambda: M.compute(["accuracy", "acuracy"], [1], [1]),
        lambda: M.path("x"),
        lambda: M.compute(["./no_such_metric.py"], [1], [1]),
        lambda: M.compute([3], [1], [1]),
    )
    for call in calls:
        with pytest.raises(FtdistError) as err:
            call()
        msg = str(err.value)
        assert "unknown metric" in msg and all(name in msg for name in NAMES), msg


@pytest.fixture(scope="module")
def offline_outputs(offline_procs):
    hf_home, _, procs = offline_procs
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        outputs.append((p.returncode, out))
    return hf_home, outputs


def test_offline_concurrent_loading(offline_outputs):
    """N processes, HF_HUB_OFFLINE / HF_EVALUATE_OFFLINE, sockets disabled, one empty HF_HOME:
    ftdist.metrics and evaluate.load(<folder or script>) both work and agree."""
    hf_home, outputs = offline_outputs
    for rc, out in outputs:
        assert rc == 0, out
        assert "OK 9" in out, out
    copied = hf_home / "modules" / "evaluate_modules" / "metrics"  # evaluate.load copies scripts into HF_HOME
    assert sorted(p.name for p in copied.iterdir() if p.is_dir()) == sorted(NAMES + ("bad_metric", "my_metric"))


def test_local_module_in_recipe_end_to_end(offline_outputs):
    """A local evaluate module folder in a recipe's eval.metrics: validated, loaded with evaluate.load and
    computed through metrics.compute, its results flattened (my_metric, my_metric_n); a non-numeric result is
    an FtdistError naming the metric."""
    for _, out in offline_outputs[1]:
        assert "OK local" in out, out


def test_hub_id_offline_is_a_clear_error(offline_outputs):
    for _, out in offline_outputs[1]:
        assert "OK hub" in out, out
