"""Decisions (binary threshold, multi-class logit biases) and calibration (temperature scaling; ECE, Brier, NLL),
fitted on validation only; per-class reports and confusion matrices; `ftdist eval` and `ftdist predict` with them.

Unit tests check the maths against scikit-learn or a hand computation. One end-to-end pair of tiny runs (in
parallel) differs only in its test file, whose labels are poisoned in the second: everything fitted must be
identical, which catches any leak of test data into the fitting.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import json
import math
import shutil

import pytest
import torch
import yaml
from helpers import assert_ok, run_ftdist

from ftdist import analysis, calibration, config, decisions
from ftdist.errors import FtdistError, RecipeError

sk = pytest.importorskip("sklearn.metrics")


# ---------------------------------------------------------------- calibration maths

def test_ece_by_hand():
    # top-class confidences 0.95, 0.9, 0.6, 0.55, 0.5 (float64: 0.6 in float32 is above 9/15)
    probs = torch.tensor([[0.95, 0.05], [0.9, 0.1], [0.4, 0.6], [0.55, 0.45], [0.5, 0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0, 1])
    # bins of width 1/15: 0.95 -> (14/15, 1] (bin 15); 0.9 -> (13/15, 14/15] (bin 14); 0.6 -> (8/15, 9/15]
    # (bin 9); 0.55 -> (8/15, 9/15] (bin 9); 0.5 -> (7/15, 8/15] (bin 8; argmax of a tie is class 0: wrong)
    # bin 15: acc 1, conf .95 -> .05; bin 14: acc 0, conf .9 -> .9; bin 9: acc 1 (both right), conf .575 -> .425;
    # bin 8: acc 0, conf .5 -> .5
    want = (1 * 0.05 + 1 * 0.9 + 2 * 0.425 + 1 * 0.5) / 5
    assert calibration.ece(probs, labels) == pytest.approx(want, abs=1e-12)
    bins = calibration.reliability(probs, labels)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 5
    assert [b["count"] for b in bins if b["count"]] == [1, 2, 1, 1]
    assert bins[8]["lo"] == pytest.approx(8 / 15) and bins[8]["accuracy"] == 1.0
    # a confidence exactly on an edge belongs to the bin it closes: 0.6 = 9/15 is in bin 9 ((8/15, 9/15])
    edge = calibration.reliability(torch.tensor([[0.6, 0.4]], dtype=torch.float64), torch.tensor([0]))
    assert edge[8]["count"] == 1


def test_brier_against_sklearn_and_by_hand():
    g = torch.Generator().manual_seed(0)
    logits2 = torch.randn(50, 2, generator=g) * 2
    y2 = torch.randint(0, 2, (50,), generator=g)
    p2 = logits2.double().softmax(-1)
    assert calibration.brier(p2, y2) == pytest.approx(sk.brier_score_loss(y2.numpy(), p2[:, 1].numpy()), abs=1e-12)
    # three classes: the sum over classes of squared differences, mean over examples, by hand
    p3 = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]], dtype=torch.float64)
    y3 = torch.tensor([0, 1, 2])
    hand = ((0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.9**2 + 0.8**2) + (0.3**2 + 0.4**2 + 0.7**2)) / 3
    assert calibration.brier(p3, y3) == pytest.approx(hand, abs=1e-12)


def test_nll_against_sklearn_log_loss():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(80, 4, generator=g) * 3
    y = torch.randint(0, 4, (80,), generator=g)
    p = logits.double().softmax(-1).numpy()
    assert calibration.nll(logits, y) == pytest.approx(sk.log_loss(y.numpy(), p, labels=[0, 1, 2, 3]), rel=1e-9)
    assert calibration.nll(logits, y, 2.0) == pytest.approx(
        sk.log_loss(y.numpy(), (logits.double() / 2).softmax(-1).numpy(), labels=[0, 1, 2, 3]), rel=1e-9)


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_temperature_fit_recovers_a_known_temperature(true_t):
    """Labels drawn from softmax(z); a model reporting z / t is recalibrated by temperature 1 / t."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(20000, 5, generator=g, dtype=torch.float64) * 2
    y = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)
    reported = z / true_t  # over-confident when true_t < 1
    fitted = calibration.fit_temperature(reported, y)
    assert fitted == pytest.approx(1 / true_t, rel=0.03)
    before, after = calibration.scores(reported, y), calibration.scores(reported, y, fitted)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"]
    assert after["ece"] < 0.01
    # temperature never changes the argmax
    assert torch.equal(calibration.probabilities(reported, fitted).argmax(-1), reported.argmax(-1))


def test_temperature_at_the_bound_and_bad_input():
    separable = torch.tensor([[5.0, -5.0], [-5.0, 5.0]] * 10)
    assert calibration.fit_temperature(separable, torch.tensor([0, 1] * 10)) == calibration.T_MIN
    with pytest.raises(ValueError):
        calibration.fit_temperature(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))


# ---------------------------------------------------------------- decisions

def binary_logits(margins):
    m = torch.tensor(margins, dtype=torch.float64)
    return torch.stack([torch.zeros_like(m), m], 1)


def test_threshold_targets_by_hand():
    # margins sorted high to low, with labels: 1 1 0 1 0 0 1 0
    margins = [3.0, 2.0, 1.5, 1.0, 0.0, -1.0, -2.0, -3.0]
    y = torch.tensor([1, 1, 0, 1, 0, 0, 1, 0])
    z = binary_logits(margins)
    # F1 by number predicted positive k: k=2: 2tp/(k+4)=4/6; k=4 (tp 3): 6/8 = .75; k=7 (tp 4): 8/11 = .727
    d = decisions.fit_threshold(z, y, 1, "f1")
    assert d["validation"]["predicted_positive"] == 4 and d["validation"]["f1"] == pytest.approx(0.75)
    assert d["margin"] == pytest.approx(0.5)  # halfway between 1.0 (last positive) and 0.0
    assert d["threshold"] == pytest.approx(1 / (1 + math.exp(-0.5)))
    assert decisions.apply({**d, "positive_id": 1}, z).tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    # precision >= 0.9: k=1 or 2 (precision 1); the most recall: k=2
    p = decisions.fit_threshold(z, y, 1, "precision>=0.9")
    assert p["validation"]["predicted_positive"] == 2 and p["target_met"] and p["margin"] == pytest.approx(1.75)
    # recall >= 1.0 needs k=7 (precision 4/7)
    r = decisions.fit_threshold(z, y, 1, "recall>=1.0")
    assert r["validation"]["predicted_positive"] == 7 and r["validation"]["recall"] == 1.0
    # the negative class as positive (margins flip): F1 of class 0
    d0 = decisions.fit_threshold(z, y, 0, "f1")
    assert d0["positive_id"] == 0 and 0 < d0["validation"]["f1"] <= 1
    # an unreachable precision floor: the most precise cut, flagged
    hard = decisions.fit_threshold(binary_logits([1.0, 0.0]), torch.tensor([0, 1]), 1, "precision>=0.99")
    assert hard["target_met"] is False and hard["validation"]["precision"] == 0.5
    with pytest.raises(decisions.Unfit):
        decisions.fit_threshold(z, torch.zeros(8, dtype=torch.long), 1, "f1")


def test_threshold_cuts_only_between_distinct_scores():
    z = binary_logits([1.0, 1.0, 1.0, 0.0])
    d = decisions.fit_threshold(z, torch.tensor([1, 0, 0, 1]), 1, "f1")
    assert d["validation"]["predicted_positive"] in (3, 4)  # never splits the three tied scores


@pytest.mark.parametrize("bad", ["f2", "precision", "precision>=0", "recall>=1.5", "f1>=0.5", "precision>=x", 3])
def test_bad_targets(bad):
    assert not decisions.valid_target(bad)


def imbalanced_three_classes(n=900, seed=3):
    """A model biased toward class 0: class 2 (rare) is under-predicted by argmax."""
    g = torch.Generator().manual_seed(seed)
    y = torch.multinomial(torch.tensor([0.7, 0.22, 0.08]), n, replacement=True, generator=g)
    z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    z[torch.arange(n), y] += 2.0
    z[:, 0] += 2.0  # the prior the training data taught it
    return z, y


def macro_f1(pred, y, k):
    return sk.f1_score(y.numpy(), pred.numpy(), average="macro", labels=list(range(k)), zero_division=0)


def test_bias_raises_validation_macro_f1_and_generalises():
    z, y = imbalanced_three_classes()
    d = decisions.fit_bias(z, y, train_counts=[700, 220, 80])
    tuned = decisions.apply(d, z)
    assert torch.equal(tuned, (z + torch.tensor(d["bias"], dtype=torch.float64)).argmax(-1))
    assert d["validation"]["macro_f1_tuned"] == pytest.approx(macro_f1(tuned, y, 3), abs=1e-12)
    assert macro_f1(tuned, y, 3) > macro_f1(z.argmax(-1), y, 3) + 0.05
    assert all(abs(b) <= decisions.BIAS_BOUND for b in d["bias"])
    # fresh data from the same model: the gain holds
    z2, y2 = imbalanced_three_classes(5000, seed=4)
    assert macro_f1(decisions.apply(d, z2), y2, 3) > macro_f1(z2.argmax(-1), y2, 3) + 0.05


def test_bias_keeps_a_class_absent_from_validation_at_its_start():
    z, y = imbalanced_three_classes()
    keep = y != 2
    d = decisions.fit_bias(z[keep], y[keep], train_counts=[700, 220, 80])
    log_prior = torch.log(torch.tensor([700, 220, 80.0], dtype=torch.float64) / 1000)
    start = -d["prior_strength"] * (log_prior - log_prior.mean())
    assert d["prior_strength"] > 0
    assert d["bias"][2] == pytest.approx(float(start[2]), abs=1e-9)
    assert d["validation"]["classes_fitted"] == 2


def test_decision_json_is_checked(tmp_path):
    names = ["neg", "pos"]
    assert decisions.load(tmp_path, names) is None
    z, y = binary_logits([2.0, 1.0, -1.0, -2.0]), torch.tensor([1, 0, 1, 0])
    d = decisions.fit("threshold", "f1", z, y, names)
    (tmp_path / decisions.FILE).write_text(decisions.save(d))
    assert decisions.load(tmp_path, names) == d
    for broken in ("{not json", json.dumps({**d, "labels": ["a", "b"]}), json.dumps({**d, "margin": "x"}), "[]"):
        (tmp_path / decisions.FILE).write_text(broken)
        with pytest.raises(FtdistError, match="decision.json"):
            decisions.load(tmp_path, names)


# ---------------------------------------------------------------- per class

def test_per_class_and_confusion_against_sklearn():
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 4, (200,), generator=g)
    pred = torch.where(torch.rand(200, generator=g) < 0.6, y, torch.randint(0, 4, (200,), generator=g))
    pred[pred == 3] = 2  # class 3 never predicted: precision 0 by convention
    names = ["a", "b", "c", "d"]
    rep = analysis.per_class(pred, y, names)
    p, r, f, s = sk.precision_recall_fscore_support(y.numpy(), pred.numpy(), labels=[0, 1, 2, 3], zero_division=0)
    for i, n in enumerate(names):
        assert rep[n] == pytest.approx({"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]}, abs=1e-12)
    assert analysis.confusion(pred, y, 4) == sk.confusion_matrix(y.numpy(), pred.numpy(), labels=[0, 1, 2, 3]).tolist()


def test_per_entity_type():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-LOC", "B-PER"]]
    rep = analysis.per_entity(pred, true)
    assert rep["PER"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert rep["LOC"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}


# ---------------------------------------------------------------- never fitted on test data

def recipe_with(*overrides):
    return config.from_dict({"data": {"dataset": "vader"}}, list(overrides))


@pytest.mark.parametrize("kind", ["threshold", "bias"])
def test_after_training_fits_on_validation_only(kind):
    """The same validation with a clean and a poisoned test split (labels permuted, logits shuffled): the
    decision and temperature are identical, and only the test split's scores change."""
    names = ["n", "p"] if kind == "threshold" else ["x", "y", "z"]
    if kind == "threshold":
        g = torch.Generator().manual_seed(6)
        y = torch.randint(0, 2, (300,), generator=g)
        z = binary_logits((y.double() * 2 - 1 + torch.randn(300, generator=g, dtype=torch.float64) * 1.5).tolist()) * 3
    else:
        z, y = imbalanced_three_classes(300)
    val = analysis.Outputs(z[:150], y[:150])
    test = analysis.Outputs(z[150:], y[150:])
    g = torch.Generator().manual_seed(7)
    poisoned = analysis.Outputs(z[150:][torch.randperm(150, generator=g)], (y[150:] + 1) % len(names))
    r = recipe_with(f"eval.decision={kind}", "eval.calibration=temperature")
    counts = {n: 10 * (i + 1) for i, n in enumerate(names)}
    clean = analysis.after_training(r, names, counts, {"validation": val, "test": test}, False)
    dirty = analysis.after_training(r, names, counts, {"validation": val, "test": poisoned}, False)
    assert clean.files == dirty.files and set(clean.files) == {"decision.json", "calibration.json"}
    assert clean.analysis["decision"] == dirty.analysis["decision"]
    assert clean.analysis["temperature"] == dirty.analysis["temperature"]
    assert clean.final["tuned"]["validation"] == dirty.final["tuned"]["validation"]
    assert clean.final["tuned"]["test"] != dirty.final["tuned"]["test"]
    # what was fitted is what validation alone gives
    only_val = analysis.after_training(r, names, counts, {"validation": val}, False)
    assert only_val.files == clean.files
    # the test split is scored with the fitted decision
    d = clean.analysis["decision"]
    assert clean.analysis["splits"]["test"]["tuned"]["confusion"]["matrix"] == analysis.confusion(
        decisions.apply(d, test.logits), test.labels, len(names))


def test_a_failed_fit_leaves_argmax(caplog):
    r = recipe_with("eval.decision=threshold")
    val = analysis.Outputs(binary_logits([1.0, 2.0]), torch.tensor([0, 0]))  # no positives
    post = analysis.after_training(r, ["n", "p"], {}, {"validation": val}, False)
    assert post.files == {} and "tuned" not in post.final
    assert "not fitted" in caplog.text


# ---------------------------------------------------------------- recipe errors

@pytest.mark.parametrize("overrides,words", [
    (["data.task=regression", "eval.metrics=[pearson]", "eval.best_metric=pearson", "eval.calibration=temperature"],
     ["eval.calibration", "regression"]),
    (["data.task=regression", "eval.metrics=[pearson]", "eval.best_metric=pearson", "eval.decision=bias"],
     ["eval.decision", "regression"]),
    (["data.task=token-classification", "eval.metrics=[seqeval]", "eval.best_metric=seqeval", "eval.decision=bias"],
     ["eval.decision", "classification"]),
    (["eval.decision=threshold", "eval.decision_target=precision>=2"], ["eval.decision_target", "precision>=X"]),
    (["eval.decision=bias", "eval.decision_target=recall>=0.9"], ["eval.decision_target", "threshold"]),
    (["eval.decision_target=precision>=0.9"], ["eval.decision_target", "eval.decision=threshold"]),  # under auto
    (["eval.positive_label=positive"], ["eval.positive_label", "threshold"]),
    (["eval.decision=threshold", "data.labels=[a,b,c]"], ["two classes", "bias"]),
    (["eval.decision=threshold", "data.labels=[neg,pos]", "eval.positive_label=poss"], ["'pos'"]),
    (["eval.calibration=temperature", "data.validation_split=0"], ["validation", "never the test split"]),
])
def test_recipe_errors(overrides, words):
    with pytest.raises(RecipeError) as e:
        recipe_with(*overrides)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "Traceback" not in str(e.value)


# ---------------------------------------------------------------- end to end: a tiny run, eval, predict

def write_csv(path, rows):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two tiny runs with decision=threshold and calibration=temperature, alike but for their test files (the
    second one's labels are flipped), run side by side."""
    from ftdist import data

    tmp = tmp_path_factory.mktemp("decide")
    ds = data._vader()
    rows = list(zip(ds["text"], ds["label"]))
    g = torch.Generator().manual_seed(0)
    rows = [rows[i] for i in torch.randperm(len(rows), generator=g)[:1500].tolist()]
    train, val, test = rows[:1000], rows[1000:1250], rows[1250:]
    flip = {"positive": "negative", "negative": "positive"}
    files = {"train": write_csv(tmp / "train.csv", train), "val": write_csv(tmp / "val.csv", val),
             "test": write_csv(tmp / "test.csv", test),
             "poisoned": write_csv(tmp / "poisoned.csv", [(t, flip[lab]) for t, lab in test])}
    common = ["data.dataset=null", f"data.train_file={files['train']}", f"data.validation_file={files['val']}",
              "train.max_steps=20", "eval.decision=threshold", "eval.calibration=temperature"]
    with cf.ThreadPoolExecutor(2) as pool:
        futs = {name: pool.submit(run_ftdist, tmp, [*common, f"data.test_file={files[name]}"], name=name)
                for name in ("test", "poisoned")}
        res = {name: f.result() for name, f in futs.items()}
    for r in res.values():
        assert_ok(r, world=1)
    return res, files


@pytest.mark.timeout(300)
def test_run_fits_on_validation_and_exports(pair):
    res, _ = pair
    clean, dirty = res["test"].run_dir, res["poisoned"].run_dir
    for name in ("decision.json", "calibration.json"):
        assert (clean / "model" / name).read_text() == (dirty / "model" / name).read_text(), f"{name}: test data leaked"
    final = json.loads((clean / "final_metrics.json").read_text())
    final_dirty = json.loads((dirty / "final_metrics.json").read_text())
    assert final["tuned"]["validation"] == final_dirty["tuned"]["validation"]
    assert final["tuned"]["test"] != final_dirty["tuned"]["test"]  # the poisoned test was scored, not fitted on
    assert final["validation"]["n_examples"] == final["tuned"]["validation"]["n_examples"] == 250
    cal = final["calibration"]
    assert cal["binning"] == "15 equal-width bins over top-class confidence"
    assert cal["validation"]["calibrated"]["nll"] <= cal["validation"]["uncalibrated"]["nll"] + 1e-12
    assert cal["validation"]["uncalibrated"]["nll"] == pytest.approx(final["validation"]["loss"], rel=1e-6)
    d = json.loads((clean / "model" / "decision.json").read_text())
    assert d["fitted_on"] == "validation" and d["labels"] == ["negative", "positive"] and d["positive_label"] == "positive"
    # the run report: both ways, calibration, per class, plots
    report = (clean / "report.md").read_text()
    for words in ("## Decision (fitted on validation)", "| validation | accuracy |", "## Calibration",
                  "15 equal-width bins", "![reliability.png](reliability.png)", "## Per class (test)",
                  "rows: true, columns: predicted", "confusion-test.png", "confusion-test-tuned.png"):
        assert words in report, words
    for png in ("reliability.png", "confusion-validation.png", "confusion-test.png", "confusion-test-tuned.png"):
        assert (clean / png).stat().st_size > 1000
    data = json.loads((clean / "report_data.json").read_text())
    conf = data["confusion"]["test"]["matrix"]
    assert sum(map(sum, conf)) == final["test"]["n_examples"]
    assert sum(b["count"] for b in data["reliability"]["validation"]["uncalibrated"]) == 250


@pytest.mark.timeout(300)
def test_eval_and_predict_apply_decision_and_temperature(pair, cli_main, tmp_path):
    res, files = pair
    run = res["test"].run_dir
    model = run / "model"
    final = json.loads((run / "final_metrics.json").read_text())
    rc, out, err = cli_main(["eval", model, "--data", files["val"], "--report", tmp_path / "rep"])
    assert rc == 0, err
    text, got = out[:out.index("{")], json.loads(out[out.index("{"):])
    assert "per class:" in text and "confusion matrix" in text and "15 equal-width bins" in text
    for k in ("accuracy", "f1"):  # argmax and tuned: the trainer's numbers on the same file
        assert got[k] == pytest.approx(final["validation"][k], abs=1e-9)
        assert got["tuned"][k] == pytest.approx(final["tuned"]["validation"][k], abs=1e-9)
    for k in ("ece", "brier", "nll"):
        for when in ("uncalibrated", "calibrated"):
            assert got["calibration"][when][k] == pytest.approx(final["calibration"]["validation"][when][k], abs=1e-6)
    assert sum(r["support"] for r in got["per_class"].values()) == 250
    assert (tmp_path / "rep" / "reliability.png").is_file() and (tmp_path / "rep" / "confusion-eval.png").is_file()
    rc, out, _ = cli_main(["eval", model, "--data", files["val"], "--json"])
    assert rc == 0 and json.loads(out)["n_examples"] == 250

    # predict: labels follow the decision; --calibrated rescales the probabilities by the temperature
    d = json.loads((model / "decision.json").read_text())
    t = json.loads((model / "calibration.json").read_text())["temperature"]
    outs = {}
    for name, flags in (("plain", []), ("cal", ["--calibrated"]), ("argmax", ["--argmax"])):
        rc, _, err = cli_main(["predict", model, files["test"], "--out", tmp_path / f"{name}.jsonl", *flags])
        assert rc == 0, err
        outs[name] = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    for plain, cal, arg in zip(outs["plain"], outs["cal"], outs["argmax"], strict=True):
        margin = math.log(plain["p_positive"]) - math.log(plain["p_negative"])
        assert plain["label"] == ("positive" if margin >= d["margin"] else "negative")
        assert plain["label"] == cal["label"] and plain["argmax_label"] == arg["label"]
        assert "argmax_label" not in arg
        assert math.log(cal["p_positive"]) - math.log(cal["p_negative"]) == pytest.approx(margin / t, abs=1e-4)

    # errors: one paragraph, no traceback
    bare = tmp_path / "bare"
    shutil.copytree(model, bare)
    (bare / "calibration.json").unlink()
    rc, _, err = cli_main(["predict", bare, files["test"], "--out", tmp_path / "x.csv", "--calibrated"])
    assert rc == 2 and "eval.calibration=temperature" in err and "Traceback" not in err
    (bare / "decision.json").write_text("{broken")
    rc, _, err = cli_main(["eval", bare, "--data", files["val"]])
    assert rc == 2 and "decision.json" in err and "Traceback" not in err
    rc, _, err = cli_main(["eval", model, "--data", files["val"], "--report", files["val"]])
    assert rc == 2 and "--report" in err


@pytest.mark.parametrize("task, counts, has_val, want", [
    ("classification", {"a": 871, "b": 2, "c": 300}, True, "bias"),  # the benchmark's kind of skew
    ("classification", {"a": 300, "b": 100}, True, "bias"),          # 3x: the rule's edge
    ("classification", {"a": 299, "b": 100}, True, "none"),          # just under it
    ("classification", {"a": 3333, "b": 4170}, True, "none"),        # the demo data's balance
    ("classification", {"a": 871, "b": 2}, False, "none"),           # nothing to fit on
    ("token-classification", {"O": 900, "B-PER": 3}, True, "none"),  # scored per entity
    ("regression", {}, True, "none"),
])
def test_decision_auto_rule(task, counts, has_val, want):
    assert decisions.resolve_auto(task, counts, has_val) == want


def test_decision_auto_is_the_default_and_asks_nothing_of_regression():
    r = recipe_with()
    assert r.eval.decision == "auto"
    reg = recipe_with("data.task=regression", "eval.metrics=[pearson]", "eval.best_metric=pearson")
    assert reg.eval.decision == "auto"  # no error: auto resolves to none where no decision applies


def test_run_records_the_resolved_decision(tmp_path):
    """A run on skewed labels under the default eval.decision=auto fits biases, exports decision.json and
    writes `bias`, not `auto`, to its recipe.yaml; the plan and resume compare against what was done."""
    from ftdist import data

    ds = data._vader()
    pos = [(t, lab) for t, lab in zip(ds["text"], ds["label"]) if lab == "positive"]
    neg = [(t, lab) for t, lab in zip(ds["text"], ds["label"]) if lab == "negative"]
    rows = pos[:400] + neg[:100]  # 4:1
    g = torch.Generator().manual_seed(1)
    rows = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
    train, val = write_csv(tmp_path / "train.csv", rows[:400]), write_csv(tmp_path / "val.csv", rows[400:])
    res = run_ftdist(tmp_path, ["data.dataset=null", f"data.train_file={train}", f"data.validation_file={val}",
                                "train.max_steps=6"], name="auto")
    assert_ok(res, world=1)
    saved = yaml.safe_load((res.run_dir / "recipe.yaml").read_text())
    assert saved["eval"]["decision"] == "bias"
    assert (res.run_dir / "model" / decisions.FILE).is_file()
    final = json.loads((res.run_dir / "final_metrics.json").read_text())
    assert "tuned" in final and "bias" in final["tuned"]["decision"]
