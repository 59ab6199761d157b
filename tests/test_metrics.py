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
    print("OK", len(M.NAMES))
    """
)


@pytest.fixture(scope="module", autouse=True)
def offline_procs(tmp_path_factory):
    """Start the offline subprocesses first, so they overlap with this process importing evaluate (slow)."""
    hf_home = tmp_path_factory.mktemp("hf_home")
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
            [sys.executable, "-c", OFFLINE_SCRIPT], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(N_PROCS)
    ]
    yield hf_home, procs
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


def test_names_match_recipe_validation(M):
    from ftdist.config import KNOWN_METRICS

    assert M.NAMES == NAMES == tuple(KNOWN_METRICS)


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

    for call in (lambda: M.load("bleu"), lambda: M.compute(["accuracy", "bleu"], [1], [1]), lambda: M.path("x")):
        with pytest.raises(FtdistError) as err:
            call()
        msg = str(err.value)
        assert "unknown metric" in msg and all(name in msg for name in NAMES), msg


def test_offline_concurrent_loading(offline_procs):
    """N processes, HF_HUB_OFFLINE / HF_EVALUATE_OFFLINE, sockets disabled, one empty HF_HOME:
    ftdist.metrics and evaluate.load(<folder or script>) both work and agree."""
    hf_home, procs = offline_procs
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
        assert "OK 9" in out, out
    copied = hf_home / "modules" / "evaluate_modules" / "metrics"  # evaluate.load copies scripts into HF_HOME
    assert sorted(p.name for p in copied.iterdir() if p.is_dir()) == sorted(NAMES)
