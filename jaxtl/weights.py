"""Model directories: Peng's PyTorch weights -> jaxtl, saving and loading, named weights.

A jaxtl model directory holds `model.json` (task, bins, channels, input shape, preprocessing)
and `state/`, an orbax checkpoint of the SFCN's parameters and BatchNorm statistics.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxtl.labels import AgeTask, SexTask, make_task
from jaxtl.model import SFCN, WEIGHTS

FORMAT_VERSION = 1
DEFAULT_PREPROCESSING = {
    "grid": "MNI152 1mm, 182x218x182, LAS (FSL)",
    "crop": [[11, 171], [13, 205], [11, 171]],
    "normalise": "divide by the mean of the whole conformed volume",
    "downsample": 1,
}

# Peng's published UK Biobank weights (github.com/ha-ha-ha-han/UKBiobank_deep_pretrain). Nothing is
# downloaded at run time: users fetch the .p file and convert it once.
PUBLISHED = {
    "peng2021-age": {
        "file": "brain_age/run_20190719_00_epoch_best_mae.p",
        "where": "github.com/ha-ha-ha-han/UKBiobank_deep_pretrain",
        "task": "age",
        "bins": (42, 82),
        "note": "SFCN [32,64,128,256,256,64], trained on 12,949 UK Biobank subjects, test MAE 2.14 (Peng's README)",
    },
    "peng2021-sex": {
        # [UNVERIFIED] the path other projects cite; the README of Peng's repository that we could read lists only
        # the age model
        "file": "sex_prediction/run_20191008_00_epoch_last.p",
        "where": "github.com/ha-ha-ha-han/UKBiobank_deep_pretrain",
        "task": "sex",
        "bins": None,
        "note": "SFCN [28,58,128,256,256,64], 2 classes (0 = female, 1 = male)",
    },
}


@dataclasses.dataclass
class JaxtlModel:
    """An eval-mode SFCN and what is needed to use it correctly."""

    model: SFCN
    task: AgeTask | SexTask
    input_shape: tuple[int, int, int]
    preprocessing: dict[str, Any]
    meta: dict[str, Any]
    path: Path | None = None

    @property
    def channels(self) -> tuple[int, ...]:
        return self.model.channels

    def __repr__(self) -> str:  # the dataclass's listed every layer's arrays (~320 lines)
        where = f", path='{self.path}'" if self.path else ""
        return (f"JaxtlModel(task={self.task!r}, channels={self.channels}, input_shape={tuple(self.input_shape)}, "
                f"downsample={self.preprocessing.get('downsample', 1)}{where})")

    def digest(self) -> str:
        """A fingerprint of the weights (parameters and BatchNorm statistics) and the task: equal for equal models,
        wherever they are stored; another after retraining in place."""
        import hashlib

        task = (self.task.name, [float(x) for x in getattr(self.task, "bin_range", ())],
                float(getattr(self.task, "sigma", 0.0)), self.task.num_outputs)
        h = hashlib.sha256(repr((task, tuple(int(x) for x in self.input_shape))).encode())
        state = nnx.to_pure_dict(nnx.state(self.model, (nnx.Param, nnx.BatchStat)))
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            a = np.asarray(leaf)
            h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


def jaxtl_home() -> Path:
    return Path(os.environ.get("JAXTL_HOME", Path.home() / ".cache" / "jaxtl"))


# --------------------------------------------------------------------------------------------
# Saving and loading


def save_model(model: SFCN, out_dir: str | os.PathLike, task: AgeTask | SexTask, *,
               input_shape=(160, 192, 160), preprocessing: dict | None = None,
               meta: dict | None = None, overwrite: bool = False) -> Path:
    """Write `model` (parameters + BatchNorm statistics) as a jaxtl model directory."""
    if model.num_outputs != task.num_outputs:  # else it loads, and its outputs are decoded as the wrong labels
        bins = f" (age bins {task.bin_range[0]:g}-{task.bin_range[1]:g})" if isinstance(task, AgeTask) else ""
        raise ValueError(f"the model has {model.num_outputs} outputs, but the {task.name} task{bins} decodes "
                         f"{task.num_outputs}; save it with the task it was trained for")
    out = Path(out_dir).absolute()
    if (out / "model.json").exists() and not overwrite:
        raise ValueError(f"{out} already holds a jaxtl model; remove it, choose another directory or overwrite it "
                         "(overwrite=True, `jaxtl convert --overwrite`)")
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:  # overwriting: the directory reads as no model until the new one is complete
        (out / "model.json").unlink(missing_ok=True)
    state = nnx.to_pure_dict(nnx.state(model, WEIGHTS))
    with ocp.StandardCheckpointer() as ckptr:  # collective: every process of a multi-host run calls it
        ckptr.save(out / "state", state, force=overwrite)
        ckptr.wait_until_finished()
    config = {
        "format_version": FORMAT_VERSION,
        "task": task.name,
        "bin_range": list(task.bin_range) if isinstance(task, AgeTask) else None,
        "sigma": task.sigma if isinstance(task, AgeTask) else None,
        "channels": list(model.channels),
        "num_outputs": model.num_outputs,
        "dropout": float(model.dropout.rate),
        "input_shape": list(input_shape),
        "preprocessing": preprocessing or DEFAULT_PREPROCESSING,
        "meta": meta or {},
    }
    if jax.process_index() == 0:
        tmp = out / "model.json.tmp"
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, out / "model.json")  # model.json appears only once the weights are complete
    return out


def _resolve(name_or_dir: str | os.PathLike) -> Path:
    path = Path(name_or_dir).expanduser()
    if (path / "model.json").exists():
        return path
    if path.name == "model.json" and path.is_file():  # the file of a model directory: that directory
        return path.parent
    name = str(name_or_dir)
    if name in PUBLISHED:
        path = jaxtl_home() / name
        if (path / "model.json").exists():
            return path
        info = PUBLISHED[name]
        bins = f" --bins {info['bins'][0]} {info['bins'][1]}" if info["bins"] else ""
        raise FileNotFoundError(
            f"'{name}' is not in {jaxtl_home()} (set $JAXTL_HOME to change that). jaxtl downloads nothing: get "
            f"{info['file']} from {info['where']} and run "
            f"`jaxtl convert {Path(info['file']).name} {path} --task {info['task']}{bins}`"
        )
    if path.exists():
        inside = [p.parent for p in (path / "model" / "model.json", path / "best" / "model.json",
                                     path / "head" / "head.json") if p.exists()]
        hint = f"; did you mean {' or '.join(str(p) for p in inside)}?" if inside else ""
        if path.is_file() and path.suffix.lower() in (".p", ".pt", ".pth", ".pkl"):
            hint = (f"; a PyTorch weights file (e.g. Peng's) is converted once: `jaxtl convert {path} MODEL_DIR "
                    "--task age --bins 42 82` (see README, SFCN and Peng's weights), then pass MODEL_DIR")
        raise FileNotFoundError(f"{path} is not a jaxtl model directory (no model.json){hint}")
    raise FileNotFoundError(
        f"no jaxtl model at {path}; pass a model directory or one of: {', '.join(PUBLISHED)}"
    )


def load_model(name_or_dir: str | os.PathLike, *, dtype=jnp.float32) -> JaxtlModel:
    """Load a jaxtl model directory (or a published name such as "peng2021-age") in eval mode."""
    path = _resolve(name_or_dir).absolute()  # orbax wants absolute paths
    config = json.loads((path / "model.json").read_text())
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer jaxtl (format {config['format_version']}); upgrade jaxtl")
    sigma = config.get("sigma")  # None for sex models and old files; 0 (one-hot age labels) is a valid value
    task = make_task(config["task"], config.get("bin_range"), 1.0 if sigma is None else float(sigma))
    # shapes only: every variable of an SFCN is a weight, all restored below (a random init took ~1 s on a CPU)
    model = nnx.eval_shape(lambda: SFCN(config["channels"], config["num_outputs"], config.get("dropout", 0.5),
                                        dtype=dtype, rngs=nnx.Rngs(0)))
    abstract = nnx.state(model, WEIGHTS)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.to_pure_dict(abstract))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path / "state", target)
    nnx.replace_by_pure_dict(abstract, restored)
    nnx.update(model, abstract)
    model.eval()
    return JaxtlModel(model, task, tuple(config["input_shape"]), config["preprocessing"],
                      config.get("meta", {}), path)


# --------------------------------------------------------------------------------------------
# Conversion of Peng's PyTorch state_dicts


def _load_torch_state_dict(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ValueError("converting PyTorch weights needs torch: pip install 'jaxtl[torch]'") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line message
        # PyTorch's own text suggests weights_only=False, i.e. running code from the file: not repeated here
        raise ValueError(f"{path}: not a PyTorch state_dict of tensors (a .p/.pt file saved with "
                         f"torch.save(model.state_dict(), ...)); torch.load(weights_only=True) failed with "
                         f"{type(e).__name__}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a model state_dict), got {type(sd).__name__}")
    return {k.removeprefix("module."): v.detach().cpu().numpy() for k, v in sd.items()}


def _infer_channels(sd: dict[str, np.ndarray], path: Path) -> tuple[int, ...]:
    channels, i = [], 0
    while f"feature_extractor.conv_{i}.0.weight" in sd:
        channels.append(int(sd[f"feature_extractor.conv_{i}.0.weight"].shape[0]))
        i += 1
    if not channels:
        raise ValueError(f"{path}: missing key 'feature_extractor.conv_0.0.weight'; not an SFCN state_dict")
    return tuple(channels)


def _check_keys_and_shapes(sd: dict[str, np.ndarray], channels: tuple[int, ...], num_outputs: int, path: Path):
    n = len(channels)
    expected: dict[str, tuple[int, ...]] = {}
    cin = 1
    for b, cout in enumerate(channels):
        k = 3 if b < n - 1 else 1
        p = f"feature_extractor.conv_{b}"
        expected[f"{p}.0.weight"] = (cout, cin, k, k, k)
        expected[f"{p}.0.bias"] = (cout,)
        for name in ("weight", "bias", "running_mean", "running_var"):
            expected[f"{p}.1.{name}"] = (cout,)
        cin = cout
    expected["classifier.conv_6.weight"] = (num_outputs, channels[-1], 1, 1, 1)
    expected["classifier.conv_6.bias"] = (num_outputs,)
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; "
                         "not a complete SFCN state_dict")
    for key, shape in expected.items():
        if tuple(sd[key].shape) != shape:
            raise ValueError(f"{path}: '{key}' has shape {tuple(sd[key].shape)}, expected {shape} "
                             f"for channels {list(channels)} and {num_outputs} outputs")


def state_from_torch(sd: dict[str, Any], channels: tuple[int, ...]) -> dict:
    """Map a (prefix-stripped) PyTorch SFCN state_dict (numpy arrays or CPU tensors) to jaxtl's pure-dict state."""
    # np.asarray first: numpy functions on a torch.Tensor go through Tensor.__array_wrap__ (deprecated by NumPy 2)
    sd = {k: np.asarray(v.detach() if hasattr(v, "detach") else v) for k, v in sd.items()}
    blocks = {}
    for b in range(len(channels)):
        p = f"feature_extractor.conv_{b}"
        blocks[b] = {
            "conv": {"kernel": np.transpose(sd[f"{p}.0.weight"], (2, 3, 4, 1, 0)), "bias": sd[f"{p}.0.bias"]},
            "bn": {"scale": sd[f"{p}.1.weight"], "bias": sd[f"{p}.1.bias"],
                   "mean": sd[f"{p}.1.running_mean"], "var": sd[f"{p}.1.running_var"]},
        }
    w = sd["classifier.conv_6.weight"]
    head = {"kernel": w.reshape(w.shape[0], w.shape[1]).T, "bias": sd["classifier.conv_6.bias"]}
    tree = {"blocks": blocks, "head": head}
    return jax.tree.map(lambda a: jnp.array(a, jnp.float32), tree)  # a copy: never alias torch memory


def convert_torch_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike, task: str = "age",
                             bin_range: tuple[float, float] = (42, 82), *, overwrite: bool = False) -> Path:
    """Convert Peng's PyTorch SFCN weights (an `nn.DataParallel` state_dict, `.p`) to a jaxtl model directory.

    The channel list is inferred from the tensor shapes. The file is read with
    `torch.load(weights_only=True)`, which never runs code from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    sd = _load_torch_state_dict(path)
    channels = _infer_channels(sd, path)
    task_obj = make_task(task, bin_range)
    head_w = sd.get("classifier.conv_6.weight")
    if head_w is not None and head_w.shape[0] != task_obj.num_outputs:
        if task == "sex":
            hint = f"--task age (with --bins MIN MAX, MAX - MIN = {head_w.shape[0]})"
        elif head_w.shape[0] == 2:
            hint = "--task sex (a 2-output head is a sex model)"
        else:
            hint = f"--bins MIN MAX with MAX - MIN = {head_w.shape[0]}"
        raise ValueError(f"{path}: the head has {head_w.shape[0]} outputs but task '{task}'"
                         f"{' with bins ' + str(tuple(bin_range)) if task == 'age' else ''} needs "
                         f"{task_obj.num_outputs}; use {hint}")
    _check_keys_and_shapes(sd, channels, task_obj.num_outputs, path)
    model = SFCN(channels, task_obj.num_outputs, rngs=nnx.Rngs(0))
    state = nnx.state(model, WEIGHTS)
    nnx.replace_by_pure_dict(state, state_from_torch(sd, channels))
    nnx.update(model, state)
    meta = {"source": str(path.name), "converted_from": "PyTorch SFCN state_dict (Peng et al. 2021)"}
    return save_model(model, out_dir, task_obj, meta=meta, overwrite=overwrite)
