"""Frozen dataclass configs for pretraining; one Python file per experiment in `configs/`.

A config file defines `get_config() -> TrainConfig`. Any field can be overridden from the command
line with `--set section.field=value` (e.g. `--set optim.lr=0.005 --set epochs=3`).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import re
import types
import typing
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    channels: tuple[int, ...] = (32, 64, 128, 256, 256, 64)
    dropout: float = 0.5
    dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"; parameters are always float32


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """SGD with coupled L2 weight decay and step decay, as PyTorch's `SGD` + `StepLR`. The defaults are Peng's
    pretraining recipe as the transfer code's defaults give it, [UNVERIFIED] against the SFCN paper's text
    (paper-spec section 4)."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-3
    step_epochs: int = 30  # multiply lr by `gamma` every `step_epochs` epochs
    gamma: float = 0.3


@dataclasses.dataclass(frozen=True)
class DataConfig:
    shift: int = 2  # random integer shift per axis, U{-shift..shift} voxels
    mirror: bool = True  # left-right flip with p = 0.5
    wrap: bool = True  # shifts wrap around (np.roll) as in the paper's code; False zero-fills
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int | None = None  # seed of the participant-level train/val/test split; None: TrainConfig.seed
    workers: int = 0  # grain worker processes; 0 = threads in the main process, faster for a cache
    downsample: int | None = None  # the cache resolution the recipe is for (1: 1mm); None: any


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A pretraining run. Defaults: Peng's UK Biobank recipe (bins 42-82, batch 8, 130 epochs, `OptimConfig`),
    [UNVERIFIED] against the SFCN paper's text (paper-spec section 4)."""

    task: str = "age"  # "age" or "sex"
    bin_range: tuple[float, float] = (42.0, 82.0)
    sigma: float = 1.0
    batch_size: int = 8  # global batch, split over all devices of all hosts
    epochs: int = 130
    seed: int = 0
    checkpoint_every_steps: int = 0  # 0: checkpoint at the end of each epoch only
    log_every_steps: int = 10
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()


def check_train_config(config: TrainConfig) -> None:
    """Refuse values that would fail later (or train something else), naming the field and what to use."""
    def bad(field: str, value: Any, use: str) -> ValueError:
        return ValueError(f"{field}={value!r}: {use} (--set {field}=...)")

    if config.task not in ("age", "sex"):
        raise bad("task", config.task, "use age or sex")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise bad("model.dtype", config.model.dtype, "use float32 or bfloat16")
    lo, hi = config.bin_range
    if not lo < hi:
        raise bad("bin_range", config.bin_range, "give (MIN, MAX) with MIN < MAX")
    if config.task == "age" and not float(hi - lo).is_integer():
        raise bad("bin_range", config.bin_range, "give (MIN, MAX) with MAX - MIN a whole number (1-year bins)")
    if config.task == "age" and not config.sigma > 0:
        raise bad("sigma", config.sigma, "give the soft labels' positive width in years, e.g. 1.0")
    counts = {"batch_size": config.batch_size, "epochs": config.epochs, "log_every_steps": config.log_every_steps,
              "optim.step_epochs": config.optim.step_epochs}
    for field, value in counts.items():
        if value < 1:
            raise bad(field, value, "give a positive integer")
    # 0 is meaningful for these (checkpoint at epoch ends only; data loading in the main process)
    for field, value in {"seed": config.seed, "checkpoint_every_steps": config.checkpoint_every_steps,
                         "data.workers": config.data.workers}.items():
        if value < 0:
            raise bad(field, value, "give an integer >= 0")
    if len(config.model.channels) < 2 or min(config.model.channels) < 1:
        raise bad("model.channels", config.model.channels,
                  "give at least 2 positive channel counts, one per block, e.g. (32,64,128,256,256,64)")
    if not 0 <= config.model.dropout < 1:
        raise bad("model.dropout", config.model.dropout, "give a rate in [0, 1)")
    if not config.optim.lr > 0:
        raise bad("optim.lr", config.optim.lr, "give a positive learning rate")
    if not config.optim.gamma > 0:
        raise bad("optim.gamma", config.optim.gamma, "give the learning rate's positive step factor, e.g. 0.3")
    for field in ("momentum", "weight_decay"):
        if not getattr(config.optim, field) >= 0:
            raise bad(f"optim.{field}", getattr(config.optim, field), "give a value >= 0")
    data = config.data
    if data.shift < 0:
        raise bad("data.shift", data.shift, "give the largest random shift in voxels, >= 0 (0: none)")
    for field in ("val_fraction", "test_fraction"):
        if not getattr(data, field) >= 0:
            raise bad(f"data.{field}", getattr(data, field), "give a fraction >= 0")
    if data.val_fraction + data.test_fraction >= 1:
        raise bad("data.val_fraction", data.val_fraction,
                  f"give val and test fractions that leave a training split (test_fraction={data.test_fraction})")


CHECKOUT = Path(__file__).resolve().parents[1]  # the jaxtl source tree (configs/ lives there)


def shipped_dir(name: str) -> Path:
    """A top-level directory that also ships inside the package (`configs`, `benchmarks`; pyproject.toml maps
    them to `jaxtl.<name>`): the source checkout's, else the installed package's copy (what a wheel holds)."""
    if (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / name).is_dir():  # a checkout, not site-packages
        return CHECKOUT / name
    spec = importlib.util.find_spec(f"jaxtl.{name}")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else CHECKOUT / name


def shipped_configs() -> Path:
    """The directory of jaxtl's shipped configs (`shipped_dir("configs")`)."""
    return shipped_dir("configs")


def load_config(path: str | Path, overrides: list[str] | None = None, expected: type | None = None) -> Any:
    """Load `get_config()` from a config file (a `TrainConfig`, or `expected`) and apply `section.field=value`
    overrides. A `.json` file is a run's saved `TrainConfig` (`WORKDIR/config.json`)."""
    expected = expected or TrainConfig
    path = Path(path)
    if not path.is_file() and not path.is_absolute() and path.parts[:1] == ("configs",):
        shipped = shipped_configs().joinpath(*path.parts[1:])  # "configs/x.py" from any working directory
        path = shipped if shipped.is_file() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file (a path configs/NAME.py is read from the working "
                                f"directory, then from jaxtl's shipped configs in {shipped_configs()})")
    if path.suffix == ".json":
        if expected is not TrainConfig:
            raise ValueError(f"{path}: a .json config is a pretraining run's config.json; give a .py config file")
        config = from_dict(TrainConfig, json.loads(path.read_text()), str(path))
        for item in overrides or []:
            config = override(config, item)
        return config
    if path.suffix != ".py":
        raise ValueError(f"{path}: a config file is Python (.py, defining get_config()) or a run's config.json")
    spec = importlib.util.spec_from_file_location(f"jaxtl_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: a config file must define get_config() -> {expected.__name__}")
    config = module.get_config()
    if not isinstance(config, expected):
        raise ValueError(f"{path}: get_config() returned {type(config).__name__}, expected {expected.__name__}")
    for item in overrides or []:
        config = override(config, item)
    return config


def override(config: Any, item: str) -> Any:
    """Return `config` with one `a.b=value` override applied; the value is parsed like a Python literal."""
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected section.field=value, e.g. optim.lr=0.005")
    key, raw = item.split("=", 1)
    *parents, field = key.strip().split(".")
    return _replace_path(config, parents, field, raw.strip(), key)


def _replace_path(obj: Any, parents: list[str], field: str, raw: str, key: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    head = parents[0] if parents else field
    if head not in names:
        fields = ', '.join(sorted(names))
        raise ValueError(f"--set {key}: {type(obj).__name__} has no field {head!r} (fields: {fields})")
    if parents:
        inner = getattr(obj, head)
        if not dataclasses.is_dataclass(inner):
            raise ValueError(f"--set {key}: {head} is {inner!r}, which has no fields to set")
        return dataclasses.replace(obj, **{head: _replace_path(inner, parents[1:], field, raw, key)})
    try:
        hint = typing.get_type_hints(type(obj)).get(field)
    except (NameError, TypeError):
        hint = None
    row = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple and typing.get_args(hint) else None
    if dataclasses.is_dataclass(row):  # a tuple of rows, e.g. methods: selected by name (`_select_rows`)
        return dataclasses.replace(obj, **{field: _select_rows(_literal(raw), getattr(obj, field), row,
                                                               _default_of(type(obj), field), key, raw)})
    return dataclasses.replace(obj, **{field: _parse(raw, getattr(obj, field), key, hint)})


def _default_of(cls: type, field: str) -> Any:
    """`field`'s default in dataclass `cls` (() when it has none)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == field)
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else ()


def _literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # bare strings: --set model.dtype=bfloat16


def _parse(raw: str, current: Any, key: str, hint: Any = None) -> Any:
    """`raw` as a value for a field now holding `current`, declared as `hint` (a union admits each member)."""
    value = _literal(raw)
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else ()
    if value is None and type(None) in allowed:  # --set scarcity=None
        return None
    if isinstance(value, str) and str in allowed and not isinstance(current, str):  # --set target=caches/ixi
        return value
    if dataclasses.is_dataclass(current):
        fields = ", ".join(f.name for f in dataclasses.fields(current))
        alternatives = " or None" * (type(None) in allowed) + " or a path / name" * (str in allowed)
        raise ValueError(f"--set {key}={raw}: {key} is a {type(current).__name__}{alternatives}; set its fields "
                         f"one by one, --set {key}.FIELD=VALUE (fields: {fields})")
    if current is None:  # optional fields (e.g. data.split_seed): any literal; the user of the field checks it
        return value
    if isinstance(current, tuple) and isinstance(value, str) and typing.get_args(hint) == (str, ...):
        # --set tasks=age or tasks=age,sex: plain words only (an override string keeps its commas and brackets)
        parts = [v.strip() for v in value.split(",")]
        value = tuple(parts) if all(re.fullmatch(r"[\w.\-]+", v) for v in parts) else (value,)
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"--set {key}={raw}: expected True or False")
        return value
    if isinstance(current, tuple):
        if not isinstance(value, list | tuple):
            raise ValueError(f"--set {key}={raw}: expected a list such as [32,64,64,64,64,64]")
        return tuple(value)
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if type(value) is not type(current):
        raise ValueError(f"--set {key}={raw}: expected a {type(current).__name__}")
    return value


def _select_rows(value: Any, current: tuple, cls: type, defaults: tuple, key: str, raw: str) -> tuple:
    """`--set methods=features,direct` for a tuple of dataclass rows (`cls`): for each name, the rows whose first
    field it is, from the config (`current`), else from the field's default (`defaults`), else `cls(name)`."""
    first = dataclasses.fields(cls)[0].name
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not names or not all(
            isinstance(n, str) and re.fullmatch(r"[\w.\-]+", n) for n in names):
        have = ", ".join(dict.fromkeys(str(getattr(r, first)) for r in (*current, *defaults))) or "none"
        raise ValueError(f"--set {key}={raw}: give {first} names, e.g. --set {key}=NAME,NAME (rows of the config "
                         f"or its defaults: {have}; another name adds a row with default settings); rows of other "
                         "settings: edit the config file")
    rows = []
    for name in dict.fromkeys(names):
        rows += ([r for r in current if getattr(r, first) == name] or [r for r in defaults if getattr(r, first) == name]
                 or [cls(name)])
    return tuple(rows)


def to_dict(config: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """The dataclass `cls` from `to_dict`'s output (lists become tuples; absent fields keep their defaults, as a
    run saved before a field existed)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for {cls.__name__} (fields: {', '.join(fields)})")
    values = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            value = from_dict(type(default), value, f"{where}: {name}")
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)
