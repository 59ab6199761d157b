"""Fuzzing the recipe front door: whatever comes in, the answer is a valid Recipe or a RecipeError.

In-process (no subprocess per example): random recipe dicts (wrong types, deep nesting, unicode,
huge numbers, NaN/inf, None, lists) through `config.from_dict`, random `a.b=c` override strings, and
random YAML files (junk bytes, anchors and alias bombs, deep nesting, odd tags) through
`config.read_yaml` / `config.load`. Every example is timed: nothing may hang. A valid Recipe must
also survive what training does with it first: dump it to recipe.yaml and read that back.
A few CLI subprocesses check that such recipes end with exit 2 and no traceback.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import time
import typing

import pytest
import yaml
from helpers import base_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftdist import config, yamlio
from ftdist.config import Recipe
from ftdist.errors import RecipeError
from ftdist.redaction import redact

FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
LIMIT_S = 20.0  # per example: a hang, not a slow machine (the slowest, a 20000-deep YAML, takes ~1 s)

SECTIONS = list(config.SECTIONS)
KEYS = {s: [f.name for f in dataclasses.fields(typing.get_type_hints(Recipe)[s])] for s in SECTIONS}
ALL_KEYS = sorted({k for ks in KEYS.values() for k in ks})

# ------------------------------------------------------------------ strategies

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)  # unicode, no lone surrogates
huge_ints = st.sampled_from([10**20, -(10**20), 2**63, 2**64 + 1, 10**308, 10**309, 10**400, -(10**1000), 10**3800])
numbers = st.one_of(st.integers(), huge_ints, st.floats(allow_nan=True, allow_infinity=True))
scalars = st.one_of(st.none(), st.booleans(), numbers, text, st.sampled_from(["", "null", "~", "1e-3", "3e-5", "yes"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.one_of(text, st.sampled_from(ALL_KEYS)),
                                                                       inner, max_size=4)), max_leaves=12)


def _nest(depth: int, leaf=1):
    for i in range(depth):
        leaf = {"k": leaf} if i == depth - 1 or i % 2 else [leaf]
    return leaf


@st.composite
def deep(draw):
    """A list or dict nested 1..3000 levels (built iteratively; repr of the deepest overflows the stack)."""
    depth = draw(st.sampled_from([1, 5, 33, 400, 3000]))
    leaf = draw(scalars)
    for _ in range(depth):
        leaf = [leaf] if draw(st.booleans()) else {"k": leaf}
    return leaf


any_value = st.one_of(values, deep(), numbers)


def section_of(name: str):
    """A section: mostly its real keys (so values reach the type and range checks), some unknown ones."""
    return st.dictionaries(st.one_of(st.sampled_from(KEYS[name]), st.sampled_from(ALL_KEYS), text), any_value,
                           max_size=6)


section = st.sampled_from(SECTIONS).flatmap(section_of)
recipes = st.lists(st.one_of(st.sampled_from(SECTIONS).flatmap(lambda n: st.tuples(st.just(n), section_of(n))),
                             st.tuples(st.sampled_from(SECTIONS), any_value),
                             st.tuples(st.one_of(text, st.integers(), huge_ints), any_value)),
                   max_size=5).map(dict)


def _yaml_scalar(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True, allow_unicode=True).strip().removesuffix("...").strip()


override_value = st.one_of(
    scalars.map(lambda v: _yaml_scalar(v) if not (isinstance(v, int) and abs(v) > 10**4000) else str(v)),
    text,
    st.sampled_from(["[", "]", "{a: ", "*x", "&a 1", "!!python/object:os.system ls", "2024-13-45", "1" * 5000,
                     "[" * 500 + "]" * 500, "- a", "{a: 1, a: 2}", "!!binary ////", "!!float abc", ".nan", "-.inf",
                     "0x1F", "0o17", "1_000", "1e400", "!!set {a, b}", "!!timestamp 2001-12-14"]),
)
override_key = st.one_of(
    st.tuples(st.sampled_from(SECTIONS), st.sampled_from(ALL_KEYS)).map(lambda t: f"{t[0]}.{t[1]}"),
    text, st.sampled_from(["train", "train.", ".lr", "a.b.c", "train..lr", "=", ""]))
overrides = st.lists(st.one_of(st.tuples(override_key, override_value).map(lambda t: f"{t[0]}={t[1]}"), text), max_size=4)


def _bomb(levels: int = 9) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


SPECIAL_YAML = [
    "", " ", "\n\n", "---\n", "...\n", "~", "null", "[]", "{}", "- 1\n- 2\n", "just a string", "42",
    _bomb(), "train: &t {lr: 0.1}\neval: *t\n", "data: {dataset: vader}\n<<: {train: {}}\n",
    "[" * 20000 + "]" * 20000, "- " * 2000 + "x", "a:\n" + "".join(" " * i + "b:\n" for i in range(1, 400)),
    "train: !!python/object/apply:os.system [echo pwned]\n", "train: !!binary aGVsbG8=\n",
    "train: {lr: 1" + "0" * 400 + "}\n", "train: {epochs: " + "9" * 4500 + "}\n", "train: {lr: 1e400}\n",
    "data: {dataset: vader}\ntrain: {lr: .nan, warmup: .inf, seed: -.inf}\n", "a: 1\n---\nb: 2\n",
    "data: {dataset: vader}\ntrain: {lr: 2024-13-45}\n", "? [a, b]\n: 1\n", "train: {lr: !!set {a, b}}\n",
    "data: {dataset: vader}\nunfreeze: {group_patterns: ['(']}\n", "\ufeffdata: {dataset: vader}\n",
    "data: {dataset: vader}\nmodel: {config_overrides: {pad_token_id: 0}}\n", "\t\x00\x01", "a: b: c",
]


def _timed(fn, *args):
    t0 = time.perf_counter()
    try:
        out = fn(*args)
    except RecipeError as e:
        out = e
    took = time.perf_counter() - t0
    assert took < LIMIT_S, f"took {took:.1f} s"
    return out


def _has_nan(v) -> bool:
    stack = [v]
    while stack:
        x = stack.pop()
        if isinstance(x, float) and math.isnan(x):
            return True
        if isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
    return False


def check_outcome(out) -> None:
    """A RecipeError with a readable message, or a Recipe that can be saved and read back."""
    if isinstance(out, RecipeError):
        msg = str(out)
        assert msg.startswith(("recipe", "override")) and len(msg) < 20_000
        return
    assert isinstance(out, Recipe), f"neither a Recipe nor a RecipeError: {out!r}"
    saved = config.dump(out)  # what train writes to recipe.yaml (redacted)
    raw = yamlio.load_no_alias(saved, yaml12_floats=True)
    try:
        again = config.from_dict(raw)
    except RecipeError:
        assert redact(out.to_dict()) != out.to_dict(), "a saved recipe does not load back"
        return
    if redact(out.to_dict()) == out.to_dict() and not _has_nan(out.to_dict()):
        assert again == out, "recipe.yaml does not reload to the same recipe"


# ------------------------------------------------------------------ in-process fuzzing

@pytest.mark.timeout(120)
@FUZZ
@given(raw=recipes, extra=overrides)
def test_random_recipe_dicts(raw, extra):
    check_outcome(_timed(config.from_dict, raw, extra))


@pytest.mark.timeout(120)
@FUZZ
@given(named=st.sampled_from(SECTIONS).flatmap(lambda n: st.tuples(st.just(n), section_of(n))))
def test_random_values_in_a_real_section(named):
    """Half-valid recipes: a known-good base plus one random section, so values reach every check."""
    name, body = named
    if name == "data":
        body = {"dataset": "vader", **body}
    raw = {"data": {"dataset": "vader"}, name: body}
    check_outcome(_timed(config.from_dict, raw))


nasty = st.one_of(deep(), huge_ints, st.floats(allow_nan=True, allow_infinity=True), text,
                  st.lists(st.one_of(huge_ints, deep(), text), min_size=1, max_size=3),
                  st.dictionaries(st.one_of(text, st.sampled_from(["pad_token_id", "hf_token"])),
                                  st.one_of(deep(), huge_ints, text), min_size=1, max_size=2))
# many entries per example: with 60 examples, each real key meets several kinds of nasty value
CONTAINER_KEYS = [(s, f.name) for s in SECTIONS for f in dataclasses.fields(typing.get_type_hints(Recipe)[s])
                  if typing.get_type_hints(typing.get_type_hints(Recipe)[s])[f.name] in (list, dict, list | None)]
nasty_entries = st.lists(st.sampled_from(SECTIONS).flatmap(
    lambda n: st.tuples(st.just(n), st.sampled_from(KEYS[n]), nasty)), min_size=4, max_size=16)
NASTY_OVERRIDE_VALUES = ["1" * 5000, "-" + "9" * 4400, "2024-13-45", "[" * 500 + "]" * 500, "{" * 400 + "}" * 400,
                         "1" + "0" * 400, "-1e999", ".nan", "!!binary ////", "*x", "&a [1]", "[1, [2, [3]]]", "é☃𝄞",
                         "!!python/object:os.system ls", "{a: 1, a: 2}", "'unterminated", "null", ""]
nasty_overrides = st.lists(st.tuples(st.sampled_from(SECTIONS).flatmap(lambda n: st.tuples(st.just(n),
                                                                                          st.sampled_from(KEYS[n]))),
                                     st.sampled_from(NASTY_OVERRIDE_VALUES))
                           .map(lambda t: f"{t[0][0]}.{t[0][1]}={t[1]}"), min_size=2, max_size=8)


@pytest.mark.timeout(120)
@FUZZ
@given(entries=nasty_entries)
def test_nasty_values_at_real_keys(entries):
    """Every example puts deep nesting, a huge number, NaN/inf or unicode at real keys of a good recipe."""
    raw = {"data": {"dataset": "vader"}}
    for name, key, value in entries:
        raw.setdefault(name, {})[key] = value
    check_outcome(_timed(config.from_dict, raw))


@pytest.mark.timeout(120)
@FUZZ
@given(where=st.sampled_from(CONTAINER_KEYS), value=st.one_of(deep(), st.lists(st.one_of(deep(), huge_ints, text))))
def test_anything_in_list_and_dict_keys(where, value):
    """List and dict keys pass the type check whatever they hold; on an otherwise good recipe the result
    must still be saveable (deep nesting, huge integers) or refused."""
    section_name, key = where
    raw = {"data": {"dataset": "vader"}}
    raw.setdefault(section_name, {})[key] = value
    check_outcome(_timed(config.from_dict, raw))


@pytest.mark.timeout(120)
@FUZZ
@given(extra=st.one_of(overrides, nasty_overrides))
def test_random_overrides_on_a_builtin(extra):
    raw = config.read_yaml(config.resolve_recipe_path("tiny"))
    check_outcome(_timed(config.from_dict, raw, extra))


def _dumpable(v) -> bool:
    """What yaml.safe_dump can write: nesting well below the recursion limit, integers Python can print."""
    stack = [(v, 0)]
    while stack:
        x, depth = stack.pop()
        if depth > 100 or (isinstance(x, int) and x.bit_length() > 13_000):
            return False
        if isinstance(x, (list, dict)):
            stack.extend((y, depth + 1) for y in ([*x.keys(), *x.values()] if isinstance(x, dict) else x))
    return True


@pytest.fixture(scope="module")
def yaml_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-yaml")


def _load_file(folder, name: str, content: bytes):
    path = folder / name
    path.write_bytes(content)
    return _timed(config.load, str(path))


@pytest.mark.timeout(120)
@FUZZ
@given(doc=st.one_of(st.binary(max_size=200),
                     text.map(lambda t: t.encode()),
                     recipes.filter(_dumpable).map(
                         lambda r: yaml.safe_dump(r, allow_unicode=True, sort_keys=False).encode()),
                     st.sampled_from(SPECIAL_YAML).map(str.encode)))
def test_random_yaml_files(yaml_dir, doc):
    check_outcome(_load_file(yaml_dir, "fuzz.yaml", doc))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("doc", SPECIAL_YAML, ids=range(len(SPECIAL_YAML)))
def test_special_yaml_files(yaml_dir, doc):
    out = _load_file(yaml_dir, "special.yaml", doc.encode())
    check_outcome(out)


def test_alias_bomb_is_refused_fast(yaml_dir):
    out = _load_file(yaml_dir, "bomb.yaml", _bomb(12).encode())
    assert isinstance(out, RecipeError) and "aliases" in str(out)


def test_huge_file_is_refused(yaml_dir):
    out = _load_file(yaml_dir, "huge.yaml", b"# " + b"x" * 1_100_000 + b"\n")
    assert isinstance(out, RecipeError) and "limit 1 MB" in str(out)


@pytest.mark.parametrize("raw, overrides, words", [
    ({"data": {"dataset": "vader"}, "train": {"lr": 10**400}}, [], "train.lr"),
    ({"data": {"dataset": "vader"}}, ["train.lr=" + "1" * 5000], "train.lr"),
    ({"data": {"dataset": "vader"}}, ["train.max_steps=" + "[" * 3000 + "]" * 3000], "train.max_steps"),
    ({"data": {"dataset": "vader"}}, ["data.split_seed=2024-13-45"], "data.split_seed"),
    ({"data": {"dataset": "vader"}, "unfreeze": {"group_patterns": ["layer\\.(0"]}}, [], "group_patterns"),
    ({"data": {"dataset": "vader", "labels": ["a", "a"]}}, [], "data.labels"),
    ({"data": {"dataset": "vader"}, "train": {"epochs": 10**5000}}, [], "train.epochs"),
    ({"data": {"dataset": "vader"}, "model": {"config_overrides": _nest(3000)}}, [], "config_overrides"),
    ({"data": {"dataset": "vader"}, "log": {"tags": _nest(40)}}, [], "log.tags"),
    ({"data": {"dataset": "vader"}, 10**5000: {}}, [], "unknown section"),
])
def test_fuzz_found_inputs_are_recipe_errors(raw, overrides, words):
    """Inputs that once escaped as OverflowError / ValueError / RecursionError (or passed validation and
    crashed later: an invalid group regex, duplicate labels)."""
    with pytest.raises(RecipeError, match=words.replace(".", r"\.")):
        config.from_dict(raw, overrides)


def test_data_file_named_like_an_impossible_date_is_a_string():
    r = config.from_dict({}, ["data.train_file=2024-13-45"])
    assert r.data.train_file == "2024-13-45"


# ------------------------------------------------------------------ the CLI

def _cli(tmp_path, *args, timeout=120):
    p = subprocess.run([sys.executable, "-m", "ftdist", *args], cwd=tmp_path, env=base_env(), capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.timeout(200)
def test_cli_bad_recipes_exit_2_without_traceback(tmp_path):
    """Fuzz-found recipes through the real CLI: exit 2, one message, no traceback. One process checks all of
    them (python -c driving cli.main per recipe), so the cost is one interpreter start."""
    docs = {"big-int.yaml": "data: {dataset: vader}\ntrain: {lr: 1" + "0" * 400 + "}\n",
            "bad-regex.yaml": "data: {dataset: vader}\nunfreeze: {group_patterns: ['(']}\n",
            "bomb.yaml": _bomb(), "junk.yaml": "\x00\x01\x02", "list.yaml": "- 1\n"}
    for name, doc in docs.items():
        (tmp_path / name).write_text(doc)
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    # the real entry point once, end to end
    rc, out = _cli(tmp_path, "train", "big-int.yaml", "--quiet")
    assert rc == 2, out
    assert "Traceback" not in out and "train.lr" in out and "ftdist: error:" in out
    rc, out = _cli(tmp_path, "train", "tiny", "train.max_steps=" + "[" * 3000 + "]" * 3000, "--quiet")
    assert rc == 2 and "Traceback" not in out and "train.max_steps" in out, out
    # the rest through cli.main in one interpreter (each call sets up logging and catches like the CLI)
    script = ("import sys, contextlib, io\nfrom ftdist import cli\n"
              "for name in sys.argv[1:]:\n"
              "    err = io.StringIO()\n"
              "    with contextlib.redirect_stderr(err):\n"
              "        rc = cli.main(['train', name, '--quiet'])\n"
              "    print(name, rc, repr(err.getvalue()[:300]))\n")
    names = sorted(p.name for p in tmp_path.glob("*.yaml"))
    p = subprocess.run([sys.executable, "-c", script, *names], cwd=tmp_path, env=base_env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stdout + p.stderr, p.stdout + p.stderr
    results = {line.split()[0]: line for line in p.stdout.splitlines()}
    assert set(results) == set(names)
    for name, line in results.items():
        assert line.split()[1] == "2", line
        assert "ftdist: error:" in line and name in line, line


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bad", [{"num_hidden_layers": "2"}, {"hidden_size": 2.5}, {"hidden_size": 33}])
def test_config_overrides_the_model_refuses_are_user_errors(bad):
    """model.config_overrides is a free mapping (any config key): values transformers refuses (wrong type,
    an inconsistent architecture) must end as an FtdistError naming the key, not a traceback."""
    from ftdist import model as modellib
    from ftdist.errors import FtdistError

    tiny = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
    r = config.from_dict({"data": {"dataset": "vader"}, "model": {"init": "random", "config_overrides": {**tiny, **bad}}})
    with pytest.raises(FtdistError, match="model.config_overrides"):
        modellib.build(r.model, "classification", ["neg", "pos"])
